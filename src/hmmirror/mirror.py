"""The sequential HMM facade: a device mirror of one process, for both kernel profiles (ours).

The model's HMM functions are generators that run only when driven, and they expect their caller to hold
the locks a kernel caller holds.  :class:`Mirror` is that caller, run to completion on every call:

* it registers with the process's mm the way a driver does -- [6.x] an ``mmu_interval_notifier`` over the
  whole address space (``mmu_interval_notifier_insert``), [5.2] an ``hmm_mirror``
  (``hmm_mirror_register`` with ``mmap_sem`` held for write) -- and records every invalidation it is told
  about (:attr:`Mirror.invalidations`);
* :meth:`Mirror.hmm_range_fault` and :meth:`Mirror.snapshot` run the caller's loop of the profile:
  [6.x] ``mmu_interval_read_begin``, ``hmm_range_fault`` under the mmap lock (read), then
  ``mmu_interval_read_retry`` under the mirror's lock, again on ``-EBUSY`` or an intervening invalidation
  (lib/test_hmm.c ``dmirror_range_fault``, Documentation/mm/hmm.rst); [5.2] ``hmm_range_register``,
  ``hmm_range_wait_until_valid``, ``hmm_range_snapshot`` / ``hmm_range_fault(range, block)`` under
  ``mmap_sem`` (read), then ``hmm_range_valid`` under the lock its ``sync_cpu_device_pagetables`` takes,
  again on ``-EAGAIN`` or an invalid range, and ``hmm_range_unregister`` (the hmm.rst 5.2 pattern);
* the answer is a :class:`MirrorResult` -- the kernel's raw output array plus profile-independent columns
  (valid, write, error, pfn, map order) -- or a :class:`HmmRangeError` carrying the errno name and the
  partial result.

Bad arguments raise :class:`~hmmirror.errors.InputError` (errno EINVAL, or ESRCH for an exited process)
before any state changes.  A raw ``HmmRange`` the caller built itself can be run under the same locks with
:meth:`Mirror.run_range`; a range without a notifier is refused with an ``InputError``, not an
``AttributeError``.

The walk is the fast vectorised one unless ``reference=True`` (or :func:`hmmirror.fast.set_reference_walk`
on the machine); both give identical results (tests/equivalence).

The dmirror device of lib/test_hmm.c ([6.x] only) is opened with :func:`open_dmirror` (or
``Process.open_dmirror``): a :class:`DmirrorHandle` whose ioctls (read, write, snapshot, migrate_to_dev,
migrate_to_sys, exclusive, check_exclusive, release) also run to completion and raise
:class:`~hmmirror.errors.KernelError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.errors import InputError, KernelError
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock

if TYPE_CHECKING:
    from hmmirror.drivers.test_hmm import DmirrorFile
    from hmmirror.process import Process

EAGAIN, EBUSY = 11, 16
U64 = (1 << 64) - 1
PAGE_MASK = U64 & ~(PAGE_SIZE - 1)

#: Passes of the caller's retry loop before the facade gives up with EBUSY (a driver's timeout; every pass
#: is taken to cost at least 1 ms of HMM_RANGE_DEFAULT_TIMEOUT = 1000 ms, as lib/test_hmm.c's bound).
MAX_PASSES = 1000


@dataclass
class MirrorInvalidation:
    """One invalidation the mirror was told about: ``[start, end)``, the event name, whether it could sleep."""

    start: int
    end: int
    event: str
    blockable: bool


@dataclass
class MirrorResult:
    """What one :meth:`Mirror.hmm_range_fault` / :meth:`Mirror.snapshot` returned, page by page.

    ``hmm_pfns`` is the kernel's output array as the profile encodes it ([6.x] ``range->hmm_pfns``:
    pfn | ``HMM_PFN_*`` | map order; [5.2] ``range->pfns`` in the range's ``flags``/``values`` encoding).
    The columns decode it the same way for both profiles: ``valid`` (a pfn the device may map, at least
    readable), ``write``, ``error`` ([6.x] ``HMM_PFN_ERROR``; [5.2] ``values[HMM_PFN_ERROR]``), ``special``
    ([5.2] ``values[HMM_PFN_SPECIAL]``; never on 6.x), ``device_private`` ([5.2] ``HMM_PFN_DEVICE_PRIVATE``),
    ``pfn`` (-1 where not valid) and ``order`` ([6.x] ``hmm_pfn_to_map_order``: the CPU maps the page with a
    ``2^order``-page entry; 0 on 5.2, which does not report it).
    """

    start: int
    end: int
    ret: int
    kernel: str
    hmm_pfns: np.ndarray
    valid: np.ndarray
    write: np.ndarray
    error: np.ndarray
    special: np.ndarray
    device_private: np.ndarray
    pfn: np.ndarray
    order: np.ndarray
    passes: int = 1
    invalidations: list[MirrorInvalidation] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def entries(self) -> list[str]:
        """Per page, one string in the notation of the scenario ops (``mirror_range``): ``"VW@0x1234"``,
        ``"V@0x1234"``, ``"NONE"``, ``"ERROR"`` and [5.2] ``"SPECIAL"``."""
        out = []
        for v, w, e, s, p in zip(self.valid.tolist(), self.write.tolist(), self.error.tolist(),
                                 self.special.tolist(), self.pfn.tolist()):
            if e:
                out.append("ERROR")
            elif s:
                out.append("SPECIAL")
            elif v:
                out.append(("VW" if w else "V") + f"@{p:#x}")
            else:
                out.append("NONE")
        return out

    def addr(self, i: int) -> int:
        """The virtual address of page ``i``."""
        return self.start + i * PAGE_SIZE


class HmmRangeError(KernelError):
    """An HMM call failed: ``errno_name`` says how (EFAULT, EPERM, EBUSY, ...); ``result`` holds the output
    array as the kernel left it (a mix of outputs and inputs, see the profile's ``hmm_range_fault``)."""

    def __init__(self, errno: int | str, message: str, result: MirrorResult | None = None) -> None:
        super().__init__(errno, message)
        self.result = result


def _decode_modern(start: int, end: int, ret: int, pfns: np.ndarray, passes: int,
                   inval: list[MirrorInvalidation]) -> MirrorResult:
    from hmmirror.mm.hmm import modern as h

    e = pfns.astype(np.uint64, copy=True)
    valid = (e & np.uint64(h.HMM_PFN_VALID)) != 0
    error = (e & np.uint64(h.HMM_PFN_ERROR)) != 0
    write = valid & ((e & np.uint64(h.HMM_PFN_WRITE)) != 0)
    pfn = np.where(valid, (e & np.uint64(~h.HMM_PFN_FLAGS & U64)).astype(np.int64), -1)
    order = np.where(valid, (e >> np.uint64(h.HMM_PFN_ORDER_SHIFT)) & np.uint64(0x1F), 0).astype(np.uint8)
    no = np.zeros(e.shape[0], dtype=bool)
    return MirrorResult(start, end, ret, "6.x", e, valid & ~error, write & ~error, error, no, no.copy(), pfn,
                        order, passes, inval)


def _decode_v5_2(rng: Any, ret: int, passes: int, inval: list[MirrorInvalidation]) -> MirrorResult:
    from hmmirror.mm.hmm import v5_2 as h

    e = rng.pfns.astype(np.uint64, copy=True)
    flags, values = rng.flags, rng.values
    error = e == np.uint64(values[h.HMM_PFN_ERROR])
    special = (e == np.uint64(values[h.HMM_PFN_SPECIAL])) & ~error
    none = e == np.uint64(values[h.HMM_PFN_NONE])
    valid = ((e & np.uint64(flags[h.HMM_PFN_VALID])) != 0) & ~error & ~special & ~none
    write = valid & ((e & np.uint64(flags[h.HMM_PFN_WRITE])) != 0)
    devp = valid & ((e & np.uint64(flags[h.HMM_PFN_DEVICE_PRIVATE])) != 0)
    pfn = np.where(valid, (e >> np.uint64(rng.pfn_shift)).astype(np.int64), -1)
    return MirrorResult(rng.start, rng.end, ret, "5.2", e, valid, write, error, special, devp, pfn,
                        np.zeros(e.shape[0], dtype=np.uint8), passes, inval)


class Mirror:
    """A device mirror of one process's address space; every call runs to completion (see the module doc).

    >>> from hmmirror import Machine
    >>> m = Machine("6.18", ram=64 << 20)
    >>> p = m.spawn("app")
    >>> a = p.mmap(8 * 4096)
    >>> with p.mirror() as mirror:
    ...     r = mirror.hmm_range_fault(a, a + 8 * 4096, write=True)
    >>> bool(r.valid.all() and r.write.all())
    True
    """

    def __init__(self, process: "Process", name: str = "mirror", *, reference: bool | None = None,
                 max_passes: int = MAX_PASSES) -> None:
        if process.mm.exited:
            raise InputError(f"process {process.name} has exited", "ESRCH")
        self.process = process
        self.mm = process.mm
        self.machine = process.machine
        self.profile = self.machine.profile
        self.name = name
        self.reference = reference
        self.max_passes = max_passes
        self.lock = Lock(f"{name}.update", "mutex")       # the driver lock its invalidate callback takes
        self.invalidations: list[MirrorInvalidation] = []
        self.released = False
        self.closed = False
        self.notifier: Any = None                          # [6.x] the mmu_interval_notifier
        self.hmm_mirror: Any = None                        # [5.2] the hmm_mirror
        ret = self._run(self._register())
        if ret:
            raise KernelError(-ret, f"{name}: registering with {self.mm.name}")

    # -- plumbing -------------------------------------------------------------------------------------------
    def _run(self, gen: Gen[Any]) -> Any:
        task = self.mm.task
        before = list(task.held)
        try:
            ret = sched.run(gen, task)
        except BaseException:
            # A kernel oops (ModelBug: the 5.2 NULL dereferences, BUG_ON) or a deadlock ended the call where
            # it stood: let the caller see it, and release what the dead call held so the process stays usable.
            _release_since(task, before)
            raise
        held = [lk.name for lk in task.held]
        if held:                                           # the facade's own contract: nothing leaks
            raise AssertionError(f"{self.name}: task {self.mm.task.name} still holds {held}")
        return ret

    def _record(self, start: int, end: int, event: Any, blockable: bool) -> None:
        self.invalidations.append(MirrorInvalidation(start, end, getattr(event, "name", str(event)), blockable))

    def _register(self) -> Gen[int]:
        if self.profile.interval_notifiers:
            from hmmirror.mm.mmu_notifier import (
                MmuIntervalNotifier,
                MmuIntervalNotifierOps,
                mmu_interval_notifier_insert,
                mmu_interval_set_seq,
                mmu_notifier_range_blockable,
            )

            mirror = self

            class _Ops(MmuIntervalNotifierOps):
                def invalidate(self, sub: Any, r: Any, cur_seq: int) -> Gen[bool]:
                    """The driver's ``invalidate`` callback: under the mirror lock, set the sequence."""
                    blockable = mmu_notifier_range_blockable(r)
                    if blockable:
                        yield from sched.mutex_lock(mirror.lock)
                    elif not sched.mutex_trylock(mirror.lock):
                        return False
                    mmu_interval_set_seq(sub, cur_seq)
                    mirror._record(r.start, r.end, r.event, blockable)
                    sched.mutex_unlock(mirror.lock)
                    return True

            self.notifier = MmuIntervalNotifier()
            return (yield from mmu_interval_notifier_insert(self.notifier, self.mm, 0, PAGE_MASK, _Ops()))
        from hmmirror.mm.hmm import v5_2 as h

        mirror = self

        class _MOps(h.HmmMirrorOps):
            def sync_cpu_device_pagetables(self, m: Any, update: Any) -> Gen[int]:
                """``sync_cpu_device_pagetables``: takes the mirror lock (-EAGAIN when it cannot sleep)."""
                if update.blockable:
                    yield from sched.mutex_lock(mirror.lock)
                elif not sched.mutex_trylock(mirror.lock):
                    return -EAGAIN
                mirror._record(update.start, update.end, update.event, update.blockable)
                sched.mutex_unlock(mirror.lock)
                return 0

            def release(self, m: Any) -> Gen[None]:
                """``release``: the mm is going away."""
                mirror.released = True
                return
                yield  # pragma: no cover

        self.hmm_mirror = h.HmmMirror(_MOps(), name=self.name)
        yield from sched.down_write(self.mm.mmap_sem)      # "THE mm->mmap_sem MUST BE HELD IN WRITE MODE !"
        try:
            return (yield from h.hmm_mirror_register(self.hmm_mirror, self.mm))
        finally:
            sched.up_write(self.mm.mmap_sem)

    def _check(self, start: int, end: int | None, length: int | None, what: str) -> tuple[int, int]:
        if self.closed:
            raise InputError(f"{what}: mirror {self.name} is closed", "EBADF")
        if self.mm.exited:
            raise InputError(f"{what}: process {self.process.name} has exited", "ESRCH")
        if (end is None) == (length is None):
            raise InputError(f"{what}: give exactly one of end and length")
        if end is None:
            end = start + int(length)                      # type: ignore[arg-type]
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end)):
            raise InputError(f"{what}: start and end must be integers")
        start, end = int(start), int(end)
        if start % PAGE_SIZE or end % PAGE_SIZE:
            raise InputError(f"{what}: range {start:#x}-{end:#x} is not page aligned")
        if not 0 <= start < end <= self.machine.geo.task_size:
            raise InputError(f"{what}: range {start:#x}-{end:#x} is empty or outside the user address space")
        return start, end

    # -- the calls ------------------------------------------------------------------------------------------
    def hmm_range_fault(self, start: int, end: int | None = None, *, length: int | None = None,
                        write: bool = False, fault: bool = True, hmm_pfns: np.ndarray | None = None,
                        default_flags: int | None = None, pfn_flags_mask: int = 0,
                        dev_private_owner: Any = None, block: bool = True) -> MirrorResult:
        """Mirror ``[start, end)`` (or ``length`` bytes): fault every page in (writable if ``write``) and
        return what the device may map.  ``fault=False`` only reads the CPU page table (:meth:`snapshot`).

        Raw inputs for finer requests, in the profile's encoding: ``hmm_pfns`` (per-page requests, e.g.
        ``HMM_PFN_REQ_FAULT`` on 6.x or ``range.flags[HMM_PFN_VALID]`` on 5.2), ``default_flags`` and
        ``pfn_flags_mask`` (the ``struct hmm_range`` fields), ``dev_private_owner`` [6.x], ``block`` [5.2:
        the ``block`` argument of ``hmm_range_fault``].  Raises :class:`HmmRangeError` with the errno name.
        """
        start, end = self._check(start, end, length, "hmm_range_fault")
        npages = (end - start) >> PAGE_SHIFT
        if hmm_pfns is not None and np.asarray(hmm_pfns).shape != (npages,):
            raise InputError(f"hmm_range_fault: hmm_pfns must hold {npages} entries, one per page")
        if self.profile.interval_notifiers:
            return self._fault_modern(start, end, write, fault, hmm_pfns, default_flags, pfn_flags_mask,
                                      dev_private_owner)
        return self._fault_v5_2(start, end, write, fault, hmm_pfns, default_flags, pfn_flags_mask, block)

    def snapshot(self, start: int, end: int | None = None, *, length: int | None = None) -> MirrorResult:
        """What the CPU page table holds for ``[start, end)``, without faulting ([6.x] ``hmm_range_fault``
        with no request flags; [5.2] ``hmm_range_snapshot``)."""
        return self.hmm_range_fault(start, end, length=length, fault=False)

    def _fault_modern(self, start: int, end: int, write: bool, fault: bool, hmm_pfns: Any,
                      default_flags: int | None, pfn_flags_mask: int, owner: Any) -> MirrorResult:
        from hmmirror.mm.hmm import modern as h

        if default_flags is None:
            default_flags = (h.HMM_PFN_REQ_FAULT | (h.HMM_PFN_REQ_WRITE if write else 0)) if fault else 0
        npages = (end - start) >> PAGE_SHIFT
        inputs = np.zeros(npages, dtype=np.uint64) if hmm_pfns is None else np.asarray(hmm_pfns, dtype=np.uint64)
        rng = h.HmmRange(self.notifier, start, end, inputs.copy(), default_flags=default_flags,
                         pfn_flags_mask=pfn_flags_mask, dev_private_owner=owner)
        first = len(self.invalidations)
        ret, passes = self._run(self._loop_modern(rng, inputs))
        res = _decode_modern(start, end, ret, rng.hmm_pfns, passes, self.invalidations[first:])
        if ret < 0:
            raise HmmRangeError(-ret, f"hmm_range_fault {start:#x}-{end:#x} of {self.mm.name}", res)
        return res

    def _loop_modern(self, rng: Any, inputs: np.ndarray) -> Gen[tuple[int, int]]:
        """dmirror_range_fault() / hmm.rst: read_begin; hmm_range_fault under the mmap read lock; -EBUSY:
        again; read_retry under the mirror lock: again; else the result is consistent."""
        from hmmirror.fast import hmm_range_fault
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry

        mm = self.mm
        for passes in range(1, self.max_passes + 1):
            rng.hmm_pfns[:] = inputs
            rng.notifier_seq = yield from mmu_interval_read_begin(rng.notifier)
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from hmm_range_fault(rng, reference=self.reference)
            sched.up_read(mm.mmap_sem)
            if ret == -EBUSY:
                continue
            if ret:
                return ret, passes
            yield from sched.mutex_lock(self.lock)
            again = mmu_interval_read_retry(rng.notifier, rng.notifier_seq)
            sched.mutex_unlock(self.lock)
            if not again:
                return 0, passes
        return -EBUSY, self.max_passes

    def _fault_v5_2(self, start: int, end: int, write: bool, fault: bool, hmm_pfns: Any,
                    default_flags: int | None, pfn_flags_mask: int, block: bool) -> MirrorResult:
        from hmmirror.mm.hmm import v5_2 as h

        rng = h.new_range(start, end, PAGE_SHIFT, name=f"{self.name}:{start:#x}")
        if default_flags is None:
            default_flags = (rng.flags[h.HMM_PFN_VALID] | (rng.flags[h.HMM_PFN_WRITE] if write else 0)) \
                if fault else 0
        rng.default_flags, rng.pfn_flags_mask = default_flags, pfn_flags_mask
        inputs = rng.pfns.copy() if hmm_pfns is None else np.asarray(hmm_pfns, dtype=np.uint64)
        first = len(self.invalidations)
        ret, passes = self._run(self._loop_v5_2(rng, inputs, fault, block))
        res = _decode_v5_2(rng, ret, passes, self.invalidations[first:])
        if ret < 0:
            raise HmmRangeError(-ret, f"hmm_range_{'fault' if fault else 'snapshot'} {start:#x}-{end:#x} "
                                      f"of {self.mm.name}", res)
        return res

    def _loop_v5_2(self, rng: Any, inputs: np.ndarray, fault: bool, block: bool) -> Gen[tuple[int, int]]:
        """driver_populate_range() of hmm.rst [5.2]: register, wait until valid, snapshot/fault under
        mmap_sem (read), -EAGAIN: again; hmm_range_valid under the lock sync_cpu_device_pagetables takes:
        invalid -> again; unregister."""
        from hmmirror.fast import hmm_range_fault, hmm_range_snapshot
        from hmmirror.mm.hmm import v5_2 as h

        mm = self.mm
        ret = yield from h.hmm_range_register(rng, mm, rng.start, rng.end, PAGE_SHIFT)
        if ret:
            return ret, 1
        try:
            yield from h.hmm_range_wait_until_valid(rng, h.HMM_RANGE_DEFAULT_TIMEOUT)
            for passes in range(1, self.max_passes + 1):
                rng.pfns[:] = inputs
                yield from sched.down_read(mm.mmap_sem)
                if fault:
                    ret = yield from hmm_range_fault(rng, block, reference=self.reference)
                else:
                    ret = yield from hmm_range_snapshot(rng, reference=self.reference)
                if ret < 0:
                    if mm.mmap_sem.held_by(sched.current()):   # -EAGAIN from a fault: HMM released it
                        sched.up_read(mm.mmap_sem)
                    if ret == -EAGAIN:
                        yield from h.hmm_range_wait_until_valid(rng, h.HMM_RANGE_DEFAULT_TIMEOUT)
                        continue
                    return ret, passes
                yield from sched.mutex_lock(self.lock)
                valid = h.hmm_range_valid(rng)
                sched.mutex_unlock(self.lock)
                sched.up_read(mm.mmap_sem)
                if valid:
                    return ret, passes
            return -EBUSY, self.max_passes
        finally:
            yield from h.hmm_range_unregister(rng)

    def run_range(self, range: Any) -> int:   # noqa: A002 - kernel name
        """Run the profile's ``hmm_range_fault`` once on a range the caller built (6.x ``HmmRange`` whose
        ``notifier`` is this mirror's or another inserted notifier of this mm; 5.2 a registered range), with
        ``mmap_sem`` held for read around the call as its callers do; returns the kernel's value (no retry
        loop: the caller owns the sequence check).  A range without a notifier (6.x) or never registered
        (5.2) is an ``InputError``."""
        if self.profile.interval_notifiers:
            sub = getattr(range, "notifier", None)
            if sub is None or getattr(sub, "mm", None) is None:
                raise InputError("hmm_range_fault: range.notifier is not set (insert an mmu_interval_notifier "
                                 "first, or use Mirror.hmm_range_fault, which does)")
            if sub.mm is not self.mm:
                raise InputError(f"hmm_range_fault: range.notifier watches {sub.mm.name}, not {self.mm.name}")
        elif getattr(range, "hmm", None) is None:
            raise InputError("hmm_range_fault: the range is not registered (hmm_range_register first, or use "
                             "Mirror.hmm_range_fault, which does)")
        from hmmirror.fast import hmm_range_fault

        def body() -> Gen[int]:
            yield from sched.down_read(self.mm.mmap_sem)
            if self.profile.interval_notifiers:
                ret = yield from hmm_range_fault(range, reference=self.reference)
            else:
                ret = yield from hmm_range_fault(range, True, reference=self.reference)
            if self.mm.mmap_sem.held_by(sched.current()):
                sched.up_read(self.mm.mmap_sem)
            return ret

        ret: int = self._run(body())
        return ret

    # -- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister ([6.x] ``mmu_interval_notifier_remove``; [5.2] ``hmm_mirror_unregister``).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.notifier is not None:
            from hmmirror.mm.mmu_notifier import mmu_interval_notifier_remove
            self._run(mmu_interval_notifier_remove(self.notifier))
        elif self.hmm_mirror is not None:
            from hmmirror.mm.hmm import v5_2 as h
            self._run(h.hmm_mirror_unregister(self.hmm_mirror))

    def __enter__(self) -> "Mirror":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mirror({self.name} of {self.mm.name}, kernel {self.profile.name}{', closed' if self.closed else ''})"


def _release_since(task: sched.Task, before: list[Lock]) -> None:
    """Release, newest first, the locks ``task`` took after ``before`` (the facade's clean-up after a call
    that died with an exception; the kernel would leave them held)."""
    prev = sched.set_current(task)
    try:
        for lk in reversed([lk for lk in task.held if lk not in before]):
            if lk.kind == "spin":
                sched.spin_unlock(lk)
            elif lk.kind == "mutex":
                sched.mutex_unlock(lk)
            elif lk.owner is task:
                sched.up_write(lk)
            else:
                sched.up_read(lk)
    finally:
        sched.set_current(prev)


class DmirrorHandle:
    """``/dev/hmm_dmirror<unit>`` opened by a process [6.x]: every ioctl of lib/test_hmm.c, run to completion.

    Each method builds the ``struct hmm_dmirror_cmd`` (with a caller buffer where the command copies data
    out), runs ``dmirror_fops_unlocked_ioctl`` in the opener's task and raises
    :class:`~hmmirror.errors.KernelError` with the errno name when it returns one.  ``file`` is the
    underlying :class:`~hmmirror.drivers.test_hmm.DmirrorFile` (raw ``ioctl(command, arg)``, ``dmirror``).
    """

    def __init__(self, file: "DmirrorFile") -> None:
        self.file = file

    @property
    def closed(self) -> bool:
        return self.file.private_data is None

    def _cmd(self, command: str, addr: int, npages: int, ptr: Any = None) -> Any:
        from hmmirror.drivers.test_hmm import HmmDmirrorCmd

        if not isinstance(addr, int) or not isinstance(npages, int) or npages < 0:
            raise InputError(f"dmirror {command}: addr and npages must be integers (npages >= 0)")
        cmd = HmmDmirrorCmd(addr, ptr, npages)
        ret = self.file.ioctl(command, cmd)
        if ret:
            raise KernelError(-ret, f"dmirror {command} at {addr:#x} ({npages} pages)")
        return cmd

    def read(self, addr: int, npages: int) -> tuple[Any, bytes]:
        """HMM_DMIRROR_READ: read through the device mirror (faulting what is missing): (cmd, bytes)."""
        buf = bytearray(npages * PAGE_SIZE)
        return self._cmd("READ", addr, npages, buf), bytes(buf)

    def write(self, addr: int, data: bytes) -> Any:
        """HMM_DMIRROR_WRITE of ``data`` (whole pages) through the device mirror (faulting writable)."""
        if len(data) % PAGE_SIZE:
            raise InputError("dmirror WRITE: data must be a whole number of pages")
        return self._cmd("WRITE", addr, len(data) // PAGE_SIZE, bytearray(data))

    def snapshot(self, addr: int, npages: int) -> bytes:
        """HMM_DMIRROR_SNAPSHOT: one ``HMM_DMIRROR_PROT_*`` byte per page, nothing faulted."""
        buf = bytearray(npages)
        self._cmd("SNAPSHOT", addr, npages, buf)
        return bytes(buf)

    def migrate_to_dev(self, addr: int, npages: int) -> tuple[Any, bytes]:
        """HMM_DMIRROR_MIGRATE_TO_DEV: migrate the range to device-private memory, then read it back through
        the device page table: (cmd with ``cpages``, the bytes)."""
        buf = bytearray(npages * PAGE_SIZE)
        return self._cmd("MIGRATE_TO_DEV", addr, npages, buf), bytes(buf)

    def migrate_to_sys(self, addr: int, npages: int) -> Any:
        """HMM_DMIRROR_MIGRATE_TO_SYS: migrate this device's pages of the range back to system memory
        (``cpages``: pages migrated)."""
        return self._cmd("MIGRATE_TO_SYS", addr, npages)

    def exclusive(self, addr: int, npages: int) -> tuple[Any, bytes]:
        """HMM_DMIRROR_EXCLUSIVE: make every page device-exclusive and map it ATOMIC, then read the range
        back: (cmd, bytes)."""
        buf = bytearray(npages * PAGE_SIZE)
        return self._cmd("EXCLUSIVE", addr, npages, buf), bytes(buf)

    def check_exclusive(self, addr: int, npages: int) -> None:
        """HMM_DMIRROR_CHECK_EXCLUSIVE: raises ``KernelError`` EPERM while the device still holds an
        exclusive (ATOMIC) entry in the range."""
        self._cmd("CHECK_EXCLUSIVE", addr, npages)

    def release(self, addr: int, npages: int) -> None:
        """HMM_DMIRROR_RELEASE: evict every device-private page of the device back to system memory.  The
        range only passes the ioctl's entry checks (page aligned, non-empty), as in hmm-tests."""
        self._cmd("RELEASE", addr, npages)

    def pt_entries(self) -> list[tuple[int, int, str]]:
        """The device page table as ``(address, pfn, "r" | "w" | "atomic")``."""
        return self.file.pt_entries()

    def close(self) -> None:
        """close(2) (``dmirror_fops_release``).  Idempotent."""
        if not self.closed:
            self.file.close()

    def __enter__(self) -> "DmirrorHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DmirrorHandle({self.file.device.path}, mm={self.file.opener.name})"


def open_dmirror(process: "Process", unit: int = 0) -> DmirrorHandle:
    """``open("/dev/hmm_dmirror<unit>")`` by ``process`` [6.x]: the lib/test_hmm.c device mirroring the
    process (:class:`DmirrorHandle`).  On a profile without interval notifiers (5.2) it raises
    ``KernelError`` ENOENT, as there is no such module."""
    from hmmirror.drivers.test_hmm import hmm_open
    return DmirrorHandle(hmm_open(process, unit))


__all__ = ["DmirrorHandle", "HmmRangeError", "MAX_PASSES", "Mirror", "MirrorInvalidation", "MirrorResult",
           "open_dmirror"]
