"""Toy mirroring drivers for the simulator tests: one correct, and one deliberately broken per invariant.

The correct one (:class:`GoodMirror`) is the worked example of docs/simulator.md: the Documentation/mm/hmm.rst
loop over ``mmu_interval_read_begin`` / ``hmm_range_fault`` / ``mmu_interval_read_retry`` ([6.x] profile).
Each broken variant changes one thing; the test says which invariant must catch it.
"""

from __future__ import annotations

from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.kernel import sched
from hmmirror.kernel.fork import mmget_not_zero, mmput
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.hmm import modern as hmm
from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry, mmu_interval_set_seq
from hmmirror.sim.driver import DriverBase, Invalidation

EBUSY, EFAULT = 16, 14


class GoodMirror(DriverBase):
    """A correct mirror: the hmm.rst retry loop, a lock shared with the invalidate callback."""

    name = "good"
    max_tries = 32

    def snapshot(self, start: int, end: int, write: bool) -> Gen[tuple[int, Any]]:
        """read_begin + hmm_range_fault under the mmap read lock: (ret, range)."""
        npages = (end - start) >> PAGE_SHIFT
        flags = hmm.HMM_PFN_REQ_FAULT | (hmm.HMM_PFN_REQ_WRITE if write else 0)
        rng = hmm.HmmRange(self.sub, start, end, hmm.new_hmm_pfns(npages), default_flags=flags)
        rng.notifier_seq = yield from mmu_interval_read_begin(self.sub)
        yield from sched.down_read(self.mm.mmap_sem)
        ret = yield from hmm.hmm_range_fault(rng)
        sched.up_read(self.mm.mmap_sem)
        return ret, rng

    def commit(self, rng: Any) -> None:
        for k in range((rng.end - rng.start) >> PAGE_SHIFT):
            e = int(rng.hmm_pfns[k])
            self.pt.map(rng.start + k * PAGE_SIZE, hmm.hmm_pfn_to_pfn(e), bool(e & hmm.HMM_PFN_WRITE))

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        # the mm is the mirrored process's: pin its address space first (lib/test_hmm.c dmirror_fault);
        # without it a fault can populate page tables that exit_mmap is about to free
        if not mmget_not_zero(self.mm):
            return -EFAULT
        ret = yield from self.fault_loop(start, end, write)
        yield from mmput(self.mm)
        return ret

    def fault_loop(self, start: int, end: int, write: bool) -> Gen[int]:
        for _ in range(self.max_tries):
            ret, rng = yield from self.snapshot(start, end, write)
            if ret == -EBUSY:
                continue
            if ret:
                return ret
            yield from sched.mutex_lock(self.lock)
            if mmu_interval_read_retry(self.sub, rng.notifier_seq):
                sched.mutex_unlock(self.lock)
                continue
            self.commit(rng)
            sched.mutex_unlock(self.lock)
            return 0
        return -EBUSY

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        if inv.blockable:
            yield from sched.mutex_lock(self.lock)
        elif not sched.mutex_trylock(self.lock):
            return False
        mmu_interval_set_seq(inv.sub, inv.seq)
        self.pt.unmap(inv.start, inv.end)
        sched.mutex_unlock(self.lock)
        return True


class NoUnmapMirror(GoodMirror):
    """coherence: the callback forgets to drop the device entries (and does everything else right)."""

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        if inv.blockable:
            yield from sched.mutex_lock(self.lock)
        elif not sched.mutex_trylock(self.lock):
            return False
        mmu_interval_set_seq(inv.sub, inv.seq)
        sched.mutex_unlock(self.lock)
        return True


class StaleCommitMirror(GoodMirror):
    """commit_invalid: commits without mmu_interval_read_retry (waits for ``go`` between walk and commit)."""

    go = False

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        ret, rng = yield from self.snapshot(start, end, write)
        if ret:
            return ret
        yield from sched.wait_event(lambda: self.go, "test: let the invalidation in")
        yield from sched.mutex_lock(self.lock)
        self.commit(rng)
        sched.mutex_unlock(self.lock)
        return 0


class ShortMirror(GoodMirror):
    """result_contract: returns success but never maps the last page."""

    def commit(self, rng: Any) -> None:
        rng.end -= PAGE_SIZE
        super().commit(rng)


class SpinSleepMirror(GoodMirror):
    """sleep_in_atomic: the callback takes a spinlock, then a mutex."""

    def __init__(self) -> None:
        super().__init__()
        self.spin = Lock("good.spin", "spin")

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        yield from sched.spin_lock(self.spin)
        yield from sched.mutex_lock(self.lock)
        mmu_interval_set_seq(inv.sub, inv.seq)
        self.pt.unmap(inv.start, inv.end)
        sched.mutex_unlock(self.lock)
        sched.spin_unlock(self.spin)
        return True


class BlockingInvalidateMirror(GoodMirror):
    """sleep_in_atomic: ignores ``blockable`` (sleeps in a non-blockable, OOM-reaper invalidation)."""

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        yield from sched.mutex_lock(self.lock)
        mmu_interval_set_seq(inv.sub, inv.seq)
        self.pt.unmap(inv.start, inv.end)
        sched.mutex_unlock(self.lock)
        return True


class LeakLockMirror(GoodMirror):
    """locks_balanced: returns from a fault still holding its lock."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        ret = yield from super().fault(start, end, write)
        yield from sched.mutex_lock(self.lock)
        return ret


class DoubleUnlockMirror(GoodMirror):
    """double_unlock: releases its lock twice."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        ret = yield from super().fault(start, end, write)
        sched.mutex_unlock(self.lock)
        return ret


class InvertedMirror(GoodMirror):
    """lock_order: takes its lock, then the mmap lock (the callback runs under the mmap lock, then takes it)."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        yield from sched.mutex_lock(self.lock)
        yield from sched.down_read(self.mm.mmap_sem)
        sched.up_read(self.mm.mmap_sem)
        sched.mutex_unlock(self.lock)
        return (yield from super().fault(start, end, write))


class LivelockMirror(GoodMirror):
    """liveness: believes every snapshot stale and retries forever."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        while True:
            ret, rng = yield from self.snapshot(start, end, write)


class WaitForeverMirror(GoodMirror):
    """no_waker: waits for a completion nobody signals."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        yield from sched.wait_event(lambda: False, "test: a completion nobody completes")
        return 0


class CrashMirror(GoodMirror):
    """exception: a Python error in the fault path."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        yield from sched.preempt_point("crash soon")
        raise ValueError("toy driver bug")


class CountCorruptMirror(GoodMirror):
    """page_counts: takes a mapcount on a page it mirrors (as if it had mapped it in a CPU page table)."""

    def commit(self, rng: Any) -> None:
        super().commit(rng)
        e = int(rng.hmm_pfns[0])
        self.machine.mem.mapcount[hmm.hmm_pfn_to_pfn(e)] += 1


class PgmapLeakMirror(GoodMirror):
    """pgmap_refcount: an HMM-call stand-in that keeps a ``get_dev_pagemap`` reference."""

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        yield from hmm_range_fault_leaky(self.machine)
        return -5                      # -EIO: nothing mirrored (so only the leak is wrong)


def hmm_range_fault_leaky(machine: Any) -> Gen[int]:
    """Named like the HMM call: the invariant must see an HMM call that returns with a reference taken."""
    from hmmirror.mm.memremap import get_dev_pagemap

    pgmap = machine.pgmaps[0]
    yield from sched.preempt_point("walk")
    got = get_dev_pagemap(machine, pgmap.res.start, None)
    yield from sched.preempt_point("walk")
    return 0 if got is not None else -EFAULT


hmm_range_fault_leaky.__code__ = hmm_range_fault_leaky.__code__.replace(co_name="hmm_range_fault")


class GcMirror(GoodMirror):
    """GoodMirror with a background collection routine (the ``gc`` event runs it)."""

    name = "good-gc"

    def gc(self) -> Gen[int]:
        yield from sched.preempt_point("gc")
        return 0
