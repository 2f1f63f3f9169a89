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
from hmmirror.drivers.device_mmu import DevicePageTable
from hmmirror.errors import InputError
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock

ULONG_MAX = (1 << 64) - 1
PAGE_MASK = ULONG_MAX & ~(PAGE_SIZE - 1)
EAGAIN = 11


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
    """Registration for both profiles, and what real drivers have besides; subclasses write ``fault``,
    ``invalidate`` and optionally ``gc``.

    Attributes a subclass uses: ``self.mm`` (the mirrored mm), ``self.machine``, ``self.profile``,
    ``self.lock`` (the driver's ``update`` lock: a mutex, as in hmm.rst), ``self.pt`` (the device: page table,
    TLB, DMA mappings), ``self.sub`` ([6.x] the whole-address-space ``mmu_interval_notifier``) or
    ``self.mirror`` ([5.2] the ``hmm_mirror``).

    What a real driver has and a subclass may use ([6.x]):

    * several interval notifiers (``notifier_size`` set: none is inserted at bind; the driver inserts one per
      range or chunk with :meth:`notifier_insert` and removes it with :meth:`notifier_remove`; the callback's
      ``inv.sub`` says which one fired);
    * a workqueue for driver work items (:meth:`alloc_workqueue`, :meth:`init_work`; ``queue_work`` /
      ``flush_work`` / ``disable_work_sync`` of :mod:`hmmirror.kernel.workqueue`), run by a worker task of its
      own in the simulator;
    * a device TLB (``device_tlb = True``: a zapped entry stays reachable until ``self.pt.tlb_flush()``) and
      DMA mappings (``self.pt.dma_map_page`` / ``dma_unmap_page``), both visible to the checks;
    * close during a run (the ``close`` event calls :meth:`unbind`; with ``unbind_races_faults`` it does not
      wait for device faults in flight, as a GPU VM closed under its page-fault worker);
    * :meth:`mmget_not_zero` / :meth:`mmput` for the references a fault path holds on the mm.
    """

    name = "driver"
    #: profile names this driver supports (None: all)
    profiles: tuple[str, ...] | None = None
    #: [6.x] None: one interval notifier over the whole address space, inserted by bind() (hmm.rst); a size:
    #: the driver inserts its own notifiers (e.g. one per chunk of this size)
    notifier_size: int | None = None
    #: the device caches translations: unmapped entries stay usable until pt.tlb_flush()
    device_tlb = False
    #: the close event may call unbind() while device faults are still running
    unbind_races_faults = False
    #: generated runs of this driver get this many times the generator's step bound (a driver whose single
    #: fault can be long but finite work, e.g. a 2 MiB range faulted page by page, needs more than 1)
    run_steps_factor = 1

    def __init__(self, name: str | None = None) -> None:
        if name:
            self.name = name
        self.pt = DevicePageTable(tlb=self.device_tlb)
        self.lock = Lock(f"{self.name}.update", "mutex")
        self.mm: Any = None
        self.machine: Any = None
        self.profile: Any = None
        self.sub: Any = None
        self.mirror: Any = None
        self._classic: Any = None
        self._ops: Any = None
        self.bound = False
        self.closed = False                     # unbind() has begun
        self.notifiers: list[Any] = []          # [6.x] every interval notifier inserted and not removed
        self.workqueues: list[Any] = []
        self.works: list[Any] = []

    @property
    def owner(self) -> Any:
        """The ``dev_private_owner`` / ``pgmap->owner`` cookie of this device (the driver object itself)."""
        return self

    # -- the three routines ------------------------------------------------------------------------------
    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        raise NotImplementedError
        yield

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        raise NotImplementedError
        yield

    gc: Any = None

    # -- what real drivers have besides ---------------------------------------------------------------------
    def notifier_insert(self, start: int, length: int) -> Gen[tuple[int, Any]]:
        """[6.x] mmu_interval_notifier_insert() of ``[start, start + length)`` whose callback is
        :meth:`invalidate`; returns ``(0, notifier)`` or ``(-errno, None)``.  Must not hold the mmap lock."""
        from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, mmu_interval_notifier_insert

        sub = MmuIntervalNotifier()
        ret = yield from mmu_interval_notifier_insert(sub, self.mm, start, length, self._notifier_ops())
        if ret:
            return ret, None
        self.notifiers.append(sub)
        return 0, sub

    def notifier_remove(self, sub: Any) -> Gen[None]:
        """[6.x] mmu_interval_notifier_remove(): returns once no callback for ``sub`` can run any more."""
        from hmmirror.mm.mmu_notifier import mmu_interval_notifier_remove

        if sub not in self.notifiers:
            return                               # removed already (e.g. by the garbage collector)
        self.notifiers.remove(sub)
        yield from mmu_interval_notifier_remove(sub)

    def _notifier_ops(self) -> Any:
        if self._ops is None:
            from hmmirror.mm.mmu_notifier import MmuIntervalNotifierOps, mmu_notifier_range_blockable

            drv = self

            class _Ops(MmuIntervalNotifierOps):
                def invalidate(self, sub: Any, r: Any, cur_seq: int) -> Gen[bool]:
                    inv = Invalidation(r.start, r.end, r.event, mmu_notifier_range_blockable(r), cur_seq, sub, r)
                    return (yield from drv.invalidate(inv))

            self._ops = _Ops()
        return self._ops

    def alloc_workqueue(self, name: str) -> Any:
        """alloc_ordered_workqueue() owned by this driver (the simulator runs it on a worker task)."""
        from hmmirror.kernel.workqueue import alloc_workqueue

        wq = alloc_workqueue(self.machine, f"{self.name}.{name}", owner=self)
        self.workqueues.append(wq)
        return wq

    def init_work(self, func: Callable[[Any], Gen[Any]], name: str) -> Any:
        """INIT_WORK(): a work item of this driver running ``func(work)`` (a generator function)."""
        from hmmirror.kernel.workqueue import INIT_WORK

        w = INIT_WORK(func, f"{self.name}.{name}", owner=self)
        self.works.append(w)
        return w

    def mmget_not_zero(self) -> bool:
        """mmget_not_zero(self.mm): a user reference unless the address space is being torn down."""
        mm = self.mm
        if mm is None or mm.mm_users <= 0 or mm.exited:
            return False
        mm.mm_users += 1
        return True

    def mmput(self) -> Gen[None]:
        """mmput(self.mm): drop the reference; the last one tears the address space down (may sleep)."""
        try:
            from hmmirror.kernel.fork import mmput
        except ImportError:
            self.mm.mm_users -= 1
            return
        yield from mmput(self.mm)

    # -- registration ------------------------------------------------------------------------------------
    def bind(self, mm: Any) -> Gen[int]:
        """Register with ``mm``: [6.x] an interval notifier over the whole address space (unless the driver
        inserts its own, ``notifier_size``); [5.2] an hmm mirror (a classic notifier when the 5.2 HMM module
        is not available)."""
        self.mm, self.machine, self.profile = mm, mm.machine, mm.machine.profile
        if self.profile.interval_notifiers:
            if self.notifier_size is not None:
                ret = 0
            else:
                ret, self.sub = yield from self.notifier_insert(0, PAGE_MASK)
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

    def teardown(self) -> Gen[None]:
        """What the driver frees at unbind after its notifiers are gone and its work is disabled (override:
        e.g. DMA-unmap what is still mapped).  Default: nothing."""
        return
        yield

    def unbind(self) -> Gen[None]:
        """Unregister and tear down, in the order that is safe against everything still running: disable
        every work item (a running one is waited for; a callback can no longer queue one), remove every
        interval notifier (no callback runs afterwards), destroy the workqueues, :meth:`teardown`, then zap
        the device page table and flush its TLB.  [5.2] hmm_mirror_unregister / mmu_notifier_unregister instead of the notifiers."""
        from hmmirror.kernel.workqueue import destroy_workqueue, disable_work_sync

        if not self.bound:
            return
        self.bound = False
        self.closed = True
        for w in self.works:                     # first: nothing queued later can run, nothing runs now
            yield from disable_work_sync(w)
        if self.profile is not None and self.profile.interval_notifiers:
            for sub in list(self.notifiers):
                yield from self.notifier_remove(sub)
        elif self.mirror is not None:
            v52 = importlib.import_module("hmmirror.mm.hmm.v5_2")
            ret = v52.hmm_mirror_unregister(self.mirror)
            if hasattr(ret, "send"):
                yield from ret
        elif self._classic is not None:
            from hmmirror.mm.mmu_notifier import mmu_notifier_unregister
            yield from mmu_notifier_unregister(self._classic, self.mm)
        for wq in self.workqueues:
            yield from destroy_workqueue(wq)
        yield from self.teardown()
        yield from sched.mutex_lock(self.lock)
        self.pt.clear()
        self.pt.tlb_flush()
        sched.mutex_unlock(self.lock)
        self.closed_logged = True
        self.machine.log("sim_driver_closed", driver=self.name)


# --- loading drivers -------------------------------------------------------------------------------------
#: built-in drivers by name (``--driver gpusvm``)
BUILTIN_NAMES = {"gpusvm": "hmmirror.drivers.drm_gpusvm:DrmGpusvm"}


def load_driver(spec: str) -> Callable[[], Any]:
    """``"pkg.mod:Class"`` (or ``"builtin"``) -> a factory returning a new driver instance."""
    if spec in ("builtin", "", None):
        return lambda: None
    if spec in BUILTIN_NAMES:
        spec = BUILTIN_NAMES[spec]
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


def run_steps_factor(spec: str) -> int:
    """The ``run_steps_factor`` of the driver ``spec`` names (1 for the built-in mirror or a spec that does not
    load: the run reports that itself)."""
    try:
        cls = load_driver(spec)
    except InputError:
        return 1
    return max(1, int(getattr(cls, "run_steps_factor", 1)))


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
