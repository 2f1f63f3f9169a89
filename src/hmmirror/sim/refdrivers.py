"""Built-in mirroring drivers, driven through :class:`hmmirror.sim.driver.DriverBase`.

* :class:`IntervalMirror` -- the canonical [6.x] loop of Documentation/mm/hmm.rst (hmm-modern.md §5):
  ``mmu_interval_read_begin`` -> ``hmm_range_fault`` under the mmap read lock -> driver lock ->
  ``mmu_interval_read_retry`` -> program the device page table.  The retry loop is bounded by
  ``max_tries`` (the driver's ``HMM_RANGE_DEFAULT_TIMEOUT``), after which it returns -EBUSY.
* :class:`Hmm52Mirror` -- the [5.2] loop of Documentation/vm/hmm.rst (hmm-5.2.md §12):
  ``hmm_range_register`` -> ``hmm_range_wait_until_valid`` -> ``down_read`` -> ``hmm_range_fault`` ->
  driver lock -> ``hmm_range_valid`` -> program the device page table.  Written as the document writes it,
  except that success is ``ret >= 0`` (5.2 returns a page count, the document's ``if (ret)`` predates that).

:func:`builtin_for` returns the driver of a profile: the HMM engineers' drivers
(``hmmirror.drivers.test_hmm`` / ``hmmirror.drivers.hmm_mirror_v5_2``) through a thin adapter when they
exist, these reference loops otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.sim.driver import DriverBase, Invalidation

EFAULT, EBUSY, EAGAIN, EINVAL = 14, 16, 11, 22


class IntervalMirror(DriverBase):
    """The [6.x] hmm.rst driver loop over ``mmu_interval_notifier`` + ``hmm_range_fault``."""

    name = "interval-mirror"
    profiles = ("6.18",)
    max_tries = 64

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        """driver_populate_range() of hmm.rst [6.x]."""
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry

        mm = self.mm
        if mm.mm_users <= 0:                     # mmget_not_zero() failed
            return -EFAULT
        npages = (end - start) >> PAGE_SHIFT
        flags = hmm.HMM_PFN_REQ_FAULT | (hmm.HMM_PFN_REQ_WRITE if write else 0)
        for _ in range(self.max_tries):
            rng = hmm.HmmRange(self.sub, start, end, hmm.new_hmm_pfns(npages), default_flags=flags,
                               pfn_flags_mask=0, dev_private_owner=self)
            rng.notifier_seq = yield from mmu_interval_read_begin(self.sub)
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from hmm.hmm_range_fault(rng)
            sched.up_read(mm.mmap_sem)
            if ret:
                if ret == -EBUSY:
                    continue
                return ret
            yield from sched.mutex_lock(self.lock)
            if mmu_interval_read_retry(self.sub, rng.notifier_seq):
                sched.mutex_unlock(self.lock)
                continue
            for k in range(npages):
                e = int(rng.hmm_pfns[k])
                self.pt.map(start + k * PAGE_SIZE, hmm.hmm_pfn_to_pfn(e), bool(e & hmm.HMM_PFN_WRITE))
            sched.mutex_unlock(self.lock)
            return 0
        return -EBUSY

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        """The interval notifier's ``invalidate``: lock (trylock if not blockable), set_seq, unmap, unlock."""
        from hmmirror.mm.mmu_notifier import mmu_interval_set_seq

        if inv.blockable:
            yield from sched.mutex_lock(self.lock)
        elif not sched.mutex_trylock(self.lock):
            return False
        mmu_interval_set_seq(inv.sub, inv.seq)
        self.pt.unmap(inv.start, inv.end)
        sched.mutex_unlock(self.lock)
        return True


class Hmm52Mirror(DriverBase):
    """The [5.2] hmm.rst driver loop over ``hmm_mirror`` + ``hmm_range_register`` + ``hmm_range_fault``."""

    name = "hmm52-mirror"
    profiles = ("5.2",)
    max_tries = 64
    timeout = 1000

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        """driver_populate_range() of hmm.rst [5.2]."""
        hmm = importlib.import_module("hmmirror.mm.hmm.v5_2")
        mm = self.mm
        npages = (end - start) >> PAGE_SHIFT
        rng = hmm_range_52(hmm, start, end, npages, write)
        ret = yield from _maybe_gen(hmm.hmm_range_register(rng, mm, start, end, PAGE_SHIFT))
        if ret:
            return ret
        yield from _maybe_gen(hmm.hmm_range_wait_until_valid(rng, self.timeout))
        for _ in range(self.max_tries):
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from _maybe_gen(hmm.hmm_range_fault(rng, True))
            if ret < 0:
                sched.up_read(mm.mmap_sem)                      # as hmm.rst writes it
                if ret == -EAGAIN:
                    yield from _maybe_gen(hmm.hmm_range_wait_until_valid(rng, self.timeout))
                    continue
                yield from _maybe_gen(hmm.hmm_range_unregister(rng))
                return ret
            yield from sched.mutex_lock(self.lock)
            if not hmm.hmm_range_valid(rng):
                sched.mutex_unlock(self.lock)
                sched.up_read(mm.mmap_sem)
                continue
            for k in range(npages):
                pfn = hmm.hmm_device_entry_to_pfn(rng, int(rng.pfns[k]))
                if pfn >= 0:
                    write_bit = rng.flags[hmm.HMM_PFN_WRITE_IDX] if hasattr(hmm, "HMM_PFN_WRITE_IDX") else 2
                    self.pt.map(start + k * PAGE_SIZE, pfn, bool(int(rng.pfns[k]) & int(write_bit)))
            yield from _maybe_gen(hmm.hmm_range_unregister(rng))
            sched.mutex_unlock(self.lock)
            sched.up_read(mm.mmap_sem)
            return 0
        yield from _maybe_gen(hmm.hmm_range_unregister(rng))
        return -EBUSY

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        """``sync_cpu_device_pagetables``: take ``driver.update`` (trylock when not blockable), unmap."""
        if inv.blockable:
            yield from sched.mutex_lock(self.lock)
        elif not sched.mutex_trylock(self.lock):
            return False
        self.pt.unmap(inv.start, inv.end)
        sched.mutex_unlock(self.lock)
        return True


def hmm_range_52(hmm: Any, start: int, end: int, npages: int, write: bool) -> Any:
    """A 5.2 ``hmm_range`` with the model test encoding of hmm-5.2.md §1.4 (requests in ``pfns``)."""
    rng = hmm.HmmRange() if _no_args(hmm.HmmRange) else hmm.HmmRange(start=start, end=end)
    import numpy as np
    flags = getattr(hmm, "MODEL_FLAGS", [1 << 0, 1 << 1, 1 << 2])
    values = getattr(hmm, "MODEL_VALUES", [0xFFFF_FFFF_FFFF_FFFE, 0, 0xFFFF_FFFF_FFFF_FFFC])
    rng.flags = list(flags)
    rng.values = list(values)
    rng.pfn_shift = 12
    rng.default_flags = flags[0] | (flags[1] if write else 0)
    rng.pfn_flags_mask = 0
    rng.pfns = np.zeros(npages, dtype=np.uint64)
    return rng


def _no_args(cls: Any) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False


def _maybe_gen(x: Any) -> Gen[Any]:
    """Call sites that may be generators or plain functions in the 5.2 module."""
    if hasattr(x, "send"):
        return (yield from x)
    return x


def builtin_for(profile: Any) -> Any:
    """A new built-in driver for ``profile`` (the HMM engineers' driver when it exists)."""
    if profile.interval_notifiers:
        ext = _external("hmmirror.sim.adapters", "dmirror_driver")
        return ext() if ext is not None else IntervalMirror()
    ext = _external("hmmirror.sim.adapters", "hmm52_driver")
    return ext() if ext is not None else Hmm52Mirror()


def _external(mod: str, attr: str) -> Any:
    try:
        m = importlib.import_module(mod)
    except ModuleNotFoundError:
        return None
    fn = getattr(m, attr, None)
    if fn is None:
        return None
    try:
        return fn if fn(probe=True) else None
    except Exception:              # noqa: BLE001 - an adapter whose driver is not there yet
        return None
