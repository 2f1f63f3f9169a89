"""Built-in mirroring drivers, driven through :class:`hmmirror.sim.driver.DriverBase`.

* :class:`IntervalMirror` -- the canonical [6.x] loop of Documentation/mm/hmm.rst (hmm-modern.md §5):
  ``mmu_interval_read_begin`` -> ``hmm_range_fault`` under the mmap read lock -> driver lock ->
  ``mmu_interval_read_retry`` -> program the device page table.  The retry loop is bounded by
  ``max_tries`` (the driver's ``HMM_RANGE_DEFAULT_TIMEOUT``), after which it returns -EBUSY.

:func:`builtin_for` returns the built-in driver of a profile: the HMM engineers' drivers through the thin
adapters of :mod:`hmmirror.sim.adapters` -- [6.x] lib/test_hmm.c's dmirror (``hmmirror.drivers.test_hmm``),
[5.2] the hmm.rst 5.2 loop (``hmmirror.drivers.hmm_mirror_v5_2``); :class:`IntervalMirror` when dmirror is
not available.
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

        if not self.mmget_not_zero():            # the address space is being torn down
            return -EFAULT
        ret = yield from self._populate(start, end, write)
        yield from self.mmput()                  # on the normal path: no yield inside a finally block
        return ret

    def _populate(self, start: int, end: int, write: bool) -> Gen[int]:
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry

        mm = self.mm
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


def builtin_for(profile: Any) -> Any:
    """A new built-in driver for ``profile`` (the HMM engineers' driver when it exists)."""
    if profile.interval_notifiers:
        ext = _external("hmmirror.sim.adapters", "dmirror_driver")
        return ext() if ext is not None else IntervalMirror()
    ext = _external("hmmirror.sim.adapters", "hmm52_driver")
    if ext is None:
        from hmmirror.errors import InputError
        raise InputError("no built-in 5.2 driver (hmmirror.drivers.hmm_mirror_v5_2 is missing)")
    return ext()


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
