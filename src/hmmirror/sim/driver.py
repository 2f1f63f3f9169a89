"""The pluggable mirroring driver: the interface the simulator drives, and a base class for users.

A real mirroring driver has three routines, and so does a simulated one:

* ``fault(start, end, write)`` -- the device fault handler: mirror ``[start, end)`` of the bound mm into the
  device page table (the hmm.rst retry loop around ``hmm_range_fault``), returning 0 or ``-errno``;
* ``invalidate(inv)`` -- the MMU-notifier callback: drop (or write-protect) device entries of
  ``[inv.start, inv.end)``; returns True, or False when it would have to sleep and ``inv.blockable`` is false;
* ``gc()`` -- optional garbage collection (e.g. dropping device entries in the background).

plus ``bind(mm)`` / ``unbind()`` (registering and unregistering with the profile's notifier API) and ``pt``,
the device page table as a :class:`DevicePageTable` (the simulator reads it: coherence and result-contract
invariants).  :class:`DriverBase` implements ``bind``/``unbind`` for both profiles ([5.2] an ``hmm_mirror``
whose ``sync_cpu_device_pagetables`` calls ``invalidate``; [6.x] an ``mmu_interval_notifier`` over the whole
address space whose ``invalidate`` calls it), so a user writes only the three routines.  The built-in
drivers are used through the same interface (:func:`builtin_driver`).

All routines that may sleep are generators using :mod:`hmmirror.kernel.sched` primitives, as model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import InputError
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock

ULONG_MAX = (1 << 64) - 1
PAGE_MASK = ULONG_MAX & ~(PAGE_SIZE - 1)
EAGAIN = 11


class DevicePageTable:
    """The device's page table: virtual page -> ``(pfn, writable)``.

    Every change goes through :meth:`map` / :meth:`unmap` / :meth:`clear`, which tell the simulator's
    listener (coherence and commit invariants look only at entries touched since the last step).
    """

    __slots__ = ("entries", "listener")

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, bool]] = {}
        self.listener: Callable[[str, int, int, bool], None] | None = None

    def map(self, va: int, pfn: int, write: bool) -> None:
        """Install (commit) a device entry for the page at ``va``."""
        va &= ~(PAGE_SIZE - 1)
        self.entries[va] = (int(pfn), bool(write))
        if self.listener is not None:
            self.listener("map", va, int(pfn), bool(write))

    def unmap(self, start: int, end: int) -> int:
        """Drop the device entries of ``[start, end)``; returns how many were dropped."""
        ents = self.entries
        if not ents:
            return 0
        if (end - start) // PAGE_SIZE < len(ents):
            gone = [va for va in range(start & ~(PAGE_SIZE - 1), end, PAGE_SIZE) if va in ents]
        else:
            gone = [va for va in ents if start <= va < end]
        for va in gone:
            del ents[va]
            if self.listener is not None:
                self.listener("unmap", va, 0, False)
        return len(gone)

    def wrprotect(self, start: int, end: int) -> None:
        """Make the device entries of ``[start, end)`` read-only."""
        for va, (pfn, w) in list(self.entries.items()):
            if start <= va < end and w:
                self.entries[va] = (pfn, False)

    def clear(self) -> None:
        self.unmap(0, ULONG_MAX)

    def get(self, va: int) -> tuple[int, bool] | None:
        return self.entries.get(va & ~(PAGE_SIZE - 1))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class Invalidation:
    """What an invalidate callback is told: the range, the event, whether it may sleep.

    ``seq`` is the interval notifier's ``cur_seq`` ([6.x]; the callback must ``mmu_interval_set_seq(sub,
    seq)`` under its lock); None on [5.2].  ``raw`` is the kernel object (``mmu_notifier_range`` or
    ``hmm_update``).
    """

    start: int
    end: int
    event: Any
    blockable: bool
    seq: int | None = None
    sub: Any = None
    raw: Any = None


@runtime_checkable
class MirrorDriver(Protocol):
    """What the simulator needs from a mirroring driver."""

    name: str
    pt: DevicePageTable

    def bind(self, mm: Any) -> Gen[int]: ...

    def fault(self, start: int, end: int, write: bool) -> Gen[int]: ...

    def invalidate(self, inv: Invalidation) -> Gen[bool]: ...

    def unbind(self) -> Gen[None]: ...


class DriverBase:
    """Registration for both profiles; subclasses write ``fault``, ``invalidate`` and optionally ``gc``.

    Attributes a subclass uses: ``self.mm`` (the mirrored mm), ``self.machine``, ``self.profile``,
    ``self.lock`` (the driver's ``update`` lock: a mutex, as in hmm.rst), ``self.pt`` (device page table),
    ``self.sub`` ([6.x] the ``mmu_interval_notifier``) or ``self.mirror`` ([5.2] the ``hmm_mirror``).
    """

    name = "driver"
    #: profile names this driver supports (None: all)
    profiles: tuple[str, ...] | None = None

    def __init__(self, name: str | None = None) -> None:
        if name:
            self.name = name
        self.pt = DevicePageTable()
        self.lock = Lock(f"{self.name}.update", "mutex")
        self.mm: Any = None
        self.machine: Any = None
        self.profile: Any = None
        self.sub: Any = None
        self.mirror: Any = None
        self._classic: Any = None
        self.bound = False

    # -- the three routines ------------------------------------------------------------------------------
    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        raise NotImplementedError
        yield

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        raise NotImplementedError
        yield

    gc: Any = None

    # -- registration ------------------------------------------------------------------------------------
    def bind(self, mm: Any) -> Gen[int]:
        """Register with ``mm``: an interval notifier [6.x], an hmm mirror [5.2] (a classic notifier when the
        5.2 HMM module is not available)."""
        self.mm, self.machine, self.profile = mm, mm.machine, mm.machine.profile
        if self.profile.interval_notifiers:
            from hmmirror.mm.mmu_notifier import (
                MmuIntervalNotifier,
                MmuIntervalNotifierOps,
                mmu_interval_notifier_insert,
            )

            drv = self

            class _Ops(MmuIntervalNotifierOps):
                def invalidate(self, sub: Any, r: Any, cur_seq: int) -> Gen[bool]:
                    from hmmirror.mm.mmu_notifier import mmu_notifier_range_blockable
                    inv = Invalidation(r.start, r.end, r.event, mmu_notifier_range_blockable(r), cur_seq, sub, r)
                    return (yield from drv.invalidate(inv))

            self.sub = MmuIntervalNotifier()
            ret = yield from mmu_interval_notifier_insert(self.sub, mm, 0, PAGE_MASK, _Ops())
        else:
            ret = yield from self._bind_v5_2(mm)
        self.bound = ret == 0
        return ret

    def _bind_v5_2(self, mm: Any) -> Gen[int]:
        drv = self
        try:
            v52 = importlib.import_module("hmmirror.mm.hmm.v5_2")
        except ModuleNotFoundError:
            v52 = None
        if v52 is not None and hasattr(v52, "hmm_mirror_register") and hasattr(v52, "HmmMirror"):
            ops_cls = getattr(v52, "HmmMirrorOps", object)

            class _MOps(ops_cls):  # type: ignore[misc, valid-type]
                def sync_cpu_device_pagetables(self, mirror: Any, update: Any) -> Gen[int]:
                    inv = Invalidation(update.start, update.end, getattr(update, "event", None),
                                       bool(getattr(update, "blockable", True)), None, mirror, update)
                    ok = yield from drv.invalidate(inv)
                    return 0 if ok else -EAGAIN

                def release(self, mirror: Any) -> Gen[None]:
                    yield from drv.release()

            self.mirror = v52.HmmMirror(ops=_MOps())
            yield from sched.down_write(mm.mmap_sem)
            try:
                return (yield from v52.hmm_mirror_register(self.mirror, mm))
            finally:
                sched.up_write(mm.mmap_sem)
        # fallback: a classic notifier (the mechanism under the 5.2 mirror)
        from hmmirror.mm.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_range_blockable, \
            mmu_notifier_register

        class _COps(MmuNotifierOps):
            def invalidate_range_start(self, mn: Any, r: Any) -> Gen[int]:
                inv = Invalidation(r.start, r.end, r.event, mmu_notifier_range_blockable(r), None, mn, r)
                ok = yield from drv.invalidate(inv)
                return 0 if ok else -EAGAIN

            def release(self, mn: Any, mm: Any) -> Gen[None]:
                yield from drv.release()

        self._classic = MmuNotifier(_COps())
        return (yield from mmu_notifier_register(self._classic, mm))

    def release(self) -> Gen[None]:
        """The mm is going away ([5.2] ``mirror->ops->release``; classic ``release``): drop everything."""
        self.pt.clear()
        return
        yield

    def unbind(self) -> Gen[None]:
        """Unregister (interval notifier remove / hmm_mirror_unregister / mmu_notifier_unregister)."""
        if not self.bound:
            return
        self.bound = False
        if self.sub is not None:
            from hmmirror.mm.mmu_notifier import mmu_interval_notifier_remove
            yield from mmu_interval_notifier_remove(self.sub)
        elif self.mirror is not None:
            v52 = importlib.import_module("hmmirror.mm.hmm.v5_2")
            ret = v52.hmm_mirror_unregister(self.mirror)
            if hasattr(ret, "send"):
                yield from ret
        elif self._classic is not None:
            from hmmirror.mm.mmu_notifier import mmu_notifier_unregister
            yield from mmu_notifier_unregister(self._classic, self.mm)
        self.pt.clear()


# --- loading drivers -------------------------------------------------------------------------------------
def load_driver(spec: str) -> Callable[[], Any]:
    """``"pkg.mod:Class"`` (or ``"builtin"``) -> a factory returning a new driver instance."""
    if spec in ("builtin", "", None):
        return lambda: None
    if ":" not in spec:
        raise InputError(f"--driver must look like package.module:ClassName, not {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"cannot import driver module {mod_name!r}: {exc}") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise InputError(f"module {mod_name!r} has no {attr!r}")
    return cls  # type: ignore[no-any-return]


def check_driver(drv: Any) -> None:
    """Misuse fails early with a sentence naming the fix."""
    for name in ("bind", "fault", "invalidate", "unbind"):
        if not callable(getattr(drv, name, None)):
            raise InputError(f"driver {type(drv).__name__} has no {name}() method "
                             f"(derive from hmmirror.sim.driver.DriverBase and write fault/invalidate)")
    if not isinstance(getattr(drv, "pt", None), DevicePageTable):
        raise InputError(f"driver {type(drv).__name__}.pt must be a hmmirror.sim.driver.DevicePageTable")


def builtin_driver(profile: Any) -> Any:
    """The built-in driver of a profile, through the same interface (:mod:`hmmirror.sim.refdrivers`)."""
    from hmmirror.sim import refdrivers
    return refdrivers.builtin_for(profile)
