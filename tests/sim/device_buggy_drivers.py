"""Driver variants with one deliberate mistake each (issue 11, "Done when"), for seeded campaigns.

Each is the correct toy driver (``sim_toy_drivers.GoodMirror``, the worked example of docs/simulator.md)
with one thing changed, the way a real driver gets it wrong.  ``tests/sim/test_device_buggy.py`` runs a short
seeded campaign with each and asserts the invariant and the location that catch it.
"""

from __future__ import annotations

from typing import Any

from sim_toy_drivers import EBUSY, GoodMirror

from hmmirror.arch.x86.pgtable import PAGE_SHIFT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.kernel.workqueue import flush_work, queue_work, schedule_work
from hmmirror.mm import slab
from hmmirror.mm.hmm import modern as hmm
from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_set_seq
from hmmirror.sim.driver import Invalidation


class NoReadRetryMirror(GoodMirror):
    """commit without mmu_interval_read_retry: the snapshot is committed under the lock, unchecked."""

    def fault_loop(self, start: int, end: int, write: bool) -> Gen[int]:
        for _ in range(self.max_tries):
            ret, rng = yield from self.snapshot(start, end, write)
            if ret == -EBUSY:
                continue
            if ret:
                return ret
            yield from sched.mutex_lock(self.lock)
            self.commit(rng)                       # BUG: no mmu_interval_read_retry(self.sub, seq) first
            sched.mutex_unlock(self.lock)
            return 0
        return -EBUSY


class DeferredZapMirror(GoodMirror):
    """an invalidate that returns before zapping: it hands the zap to a work item and returns true."""

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        self.wq = self.alloc_workqueue("zap")
        self.zap_work = self.init_work(self._zap, "zap")
        self.todo: list[tuple[int, int]] = []
        return ret

    def _zap(self, work: Any) -> Gen[None]:
        yield from sched.mutex_lock(self.lock)
        while self.todo:
            s, e = self.todo.pop()
            self.pt.unmap(s, e)
        sched.mutex_unlock(self.lock)

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        if inv.blockable:
            yield from sched.mutex_lock(self.lock)
        elif not sched.mutex_trylock(self.lock):
            return False
        mmu_interval_set_seq(inv.sub, inv.seq)
        self.todo.append((inv.start, inv.end))    # BUG: the device keeps the pages until the work runs
        queue_work(self.wq, self.zap_work)
        sched.mutex_unlock(self.lock)
        return True


class UnboundedRetryMirror(GoodMirror):
    """a retry loop with no bound: retries for as long as the range is being invalidated."""

    def fault_loop(self, start: int, end: int, write: bool) -> Gen[int]:
        while True:                                # BUG: no HMM_RANGE_DEFAULT_TIMEOUT
            ret = yield from GoodMirror.fault_loop(self, start, end, write)
            if ret != -EBUSY:
                return ret

    max_tries = 1


class PoisonRequestMirror(GoodMirror):
    """an hmm_range built from a kvmalloc'ed pfn array with a per-page request mask, the requests never
    written (drm_gpusvm kvmallocs its array, but asks with default_flags and mask 0)."""

    def snapshot(self, start: int, end: int, write: bool) -> Gen[tuple[int, Any]]:
        npages = (end - start) >> PAGE_SHIFT
        flags = hmm.HMM_PFN_REQ_FAULT | (hmm.HMM_PFN_REQ_WRITE if write else 0)
        rng = hmm.HmmRange(self.sub, start, end, slab.kvmalloc_array(npages), default_flags=flags,
                           pfn_flags_mask=hmm.HMM_PFN_REQ_FAULT | hmm.HMM_PFN_REQ_WRITE)   # BUG
        rng.notifier_seq = yield from mmu_interval_read_begin(self.sub)
        yield from sched.down_read(self.mm.mmap_sem)
        ret = yield from hmm.hmm_range_fault(rng)
        sched.up_read(self.mm.mmap_sem)
        return ret, rng


class WriteRequestMirror(GoodMirror):
    """asks for write access on every fault, also read faults (a device read of a read-only mapping fails)."""

    def snapshot(self, start: int, end: int, write: bool) -> Gen[tuple[int, Any]]:
        return (yield from GoodMirror.snapshot(self, start, end, True))      # BUG: write=True always


class MmputInCallbackMirror(GoodMirror):
    """an invalidate callback that takes and drops an mm reference itself."""

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        if not inv.blockable:
            return (yield from GoodMirror.invalidate(self, inv))
        if not self.mmget_not_zero():              # e.g. to look at the VMAs of the range
            return (yield from GoodMirror.invalidate(self, inv))
        ret = yield from GoodMirror.invalidate(self, inv)
        yield from self.mmput()                    # BUG: may be the last reference (compaction holds none)
        return ret


class FlushNotDisableMirror(GoodMirror):
    """garbage collection on the system workqueue, queued by UNMAP invalidations; unbind flushes it before
    removing the notifier instead of disabling it, so an invalidation in between queues it again."""

    unbind_races_faults = False

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        self.gc_work = self.init_work(self._gc, "gc")
        return ret

    def _gc(self, work: Any) -> Gen[None]:
        yield from sched.mutex_lock(self.lock)
        sched.mutex_unlock(self.lock)

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        ok = yield from GoodMirror.invalidate(self, inv)
        if ok and inv.blockable:
            schedule_work(self.machine, self.gc_work)
        return ok

    def unbind(self) -> Gen[None]:
        if not self.bound:
            return
        self.bound = False
        self.closed = True
        yield from flush_work(self.gc_work)        # BUG: flush, not disable_work_sync, before the remove
        yield from sched.preempt_point("unbind")
        for sub in list(self.notifiers):
            yield from self.notifier_remove(sub)
        yield from sched.mutex_lock(self.lock)
        self.pt.clear()
        sched.mutex_unlock(self.lock)


# --- device memory (dmirror, lib/test_hmm.c, with one mistake) ------------------------------------------------
from hmmirror.sim.adapters import DmirrorAdapter  # noqa: E402


class NoFaultPageDmirror(DmirrorAdapter):
    """migrate_to_ram without fault_page: dmirror_devmem_fault() starts its migration with ``fault_page`` left
    unset (the pre-6.1 shape), so the page do_swap_page locked cannot be collected."""

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        if ret == 0:
            self.dm.dmirror_devmem_fault = self._devmem_fault
        return ret

    def _devmem_fault(self, vmf: Any) -> Gen[int]:
        import numpy as np

        from hmmirror.include.mm_types import VM_FAULT
        from hmmirror.mm import migrate_device as md

        dm = self.dm
        args = md.MigrateVma(vmf.vma, vmf.address, vmf.address + 4096, np.zeros(1, dtype=np.uint64),
                             np.zeros(1, dtype=np.uint64), pgmap_owner=dm.mdevice,
                             flags=md.MIGRATE_VMA_SELECT_DEVICE_PRIVATE)          # BUG: no fault_page=vmf.page
        if (yield from md.migrate_vma_setup(args)):
            return int(VM_FAULT.SIGBUS)
        dm.dmirror_devmem_fault_alloc_and_copy(args)
        yield from md.migrate_vma_pages(args)
        yield from md.migrate_vma_finalize(args)
        return 0


class EagerFreeDmirror(DmirrorAdapter):
    """reuse of a device page with a reference still held: migrating a page back puts the device page on the
    free list right after the copy, before its last reference is dropped (page_free would have done it)."""

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        if ret == 0:
            dm = self.dm
            orig = dm.dmirror_devmem_fault_alloc_and_copy

            def alloc_and_copy(args: Any) -> int:
                import numpy as np

                from hmmirror.mm import migrate_device as md
                r = orig(args)
                for i in range((args.end - args.start) >> 12):
                    spage = md.migrate_pfn_to_page(int(args.src[i]))
                    if spage >= 0 and int(args.dst[i]) & md.MIGRATE_PFN_VALID:
                        dm.mdevice._push_free(np.array([spage], dtype=np.int64))   # BUG: still referenced
                return r
            dm.dmirror_devmem_fault_alloc_and_copy = alloc_and_copy
        return ret


class NoCopyDmirror(DmirrorAdapter):
    """a migration to device memory that skips the copy: dmirror_migrate_alloc_and_copy() clears the new
    device page's backing page instead of copying the source page into it (D1: the data is lost)."""

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        if ret == 0:
            dm = self.dm
            mem = dm.machine.mem
            orig = dm.dmirror_migrate_alloc_and_copy

            def alloc_and_copy(args: Any) -> None:
                from hmmirror.mm import migrate_device as md
                orig(args)
                for i in range((args.end - args.start) >> 12):
                    dpage = md.migrate_pfn_to_page(int(args.dst[i]))
                    if dpage >= 0:
                        mem.clear(dm.mdevice.backing_page(dpage))        # BUG: the copy is skipped
            dm.dmirror_migrate_alloc_and_copy = alloc_and_copy
        return ret


class KeepBothDmirror(DmirrorAdapter):
    """migrate_to_ram keeps the device copy: dmirror_devmem_fault() takes a reference on the device page it
    migrates back (to keep the device's copy warm), after migrate_vma_pages() moved it, and never drops it (D2:
    after the migration the page is in system memory and in device memory)."""

    def bind(self, mm: Any) -> Gen[int]:
        ret = yield from super().bind(mm)
        if ret == 0:
            self.dm.dmirror_devmem_fault = self._devmem_fault
        return ret

    def _devmem_fault(self, vmf: Any) -> Gen[int]:
        import numpy as np

        from hmmirror.include.mm_types import VM_FAULT
        from hmmirror.mm import migrate_device as md

        dm = self.dm
        mem = dm.machine.mem
        args = md.MigrateVma(vmf.vma, vmf.address, vmf.address + 4096, np.zeros(1, dtype=np.uint64),
                             np.zeros(1, dtype=np.uint64), pgmap_owner=dm.mdevice,
                             flags=md.MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault_page=vmf.page)
        if (yield from md.migrate_vma_setup(args)):
            return int(VM_FAULT.SIGBUS)
        dm.dmirror_devmem_fault_alloc_and_copy(args)
        yield from md.migrate_vma_pages(args)
        s = int(args.src[0])
        if s & md.MIGRATE_PFN_MIGRATE and md.migrate_pfn_to_page(s) >= 0:
            mem.get_page(md.migrate_pfn_to_page(s))               # BUG: the device copy is kept, never put
        yield from md.migrate_vma_finalize(args)
        return 0


# --- drm_gpusvm (drivers/drm_gpusvm.py, with one mistake) ------------------------------------------------------
from hmmirror.drivers.drm_gpusvm import DrmGpusvm  # noqa: E402


class NoReadRetryGpusvm(DrmGpusvm):
    """get_pages without mmu_interval_read_retry: drm_gpusvm_get_pages() DMA-maps the pages hmm_range_fault
    returned and marks them valid without asking whether an invalidation ran since read_begin; the bind then
    programs the GPU with the stale pages."""

    def pages_read_retry(self, sub: Any, seq: int) -> bool:
        """BUG: mmu_interval_read_retry() is never asked; the pages are mapped whatever ran since ``seq``."""
        return False


class NoDmaUnmapGpusvm(DrmGpusvm):
    """an invalidate callback that zaps the GPU PTEs and flushes the TLB but leaves the DMA mappings of the
    range in place (drm_gpusvm_range_unmap_pages forgotten): the device can still reach the pages by DMA."""

    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        from hmmirror.include.mm_types import MMU_NOTIFY

        if not inv.blockable:
            return False
        yield from sched.down_write(self.notifier_lock)
        mmu_interval_set_seq(inv.sub, inv.seq)
        notifier = getattr(inv.sub, "gpusvm_notifier", None)
        if notifier is not None:
            start, end = max(inv.start, notifier.start), min(inv.end, notifier.last + 1)
            hit = [r for r in notifier.ranges if r.start < end and start < r.end]
            for r in hit:
                self.pt.unmap(r.start, r.end)
                self.pt.tlb_flush(r.start, r.end)
                r.has_dma_mapping = r.has_devmem_pages = False      # BUG: r.dma never unmapped
                if inv.event == MMU_NOTIFY.UNMAP:
                    self.drm_gpusvm_range_set_unmapped(r, inv.start, inv.end)
                    if r not in self.gc_list:
                        self.gc_list.append(r)
                        queue_work(self.gc_wq, self.gc_work)
        sched.up_write(self.notifier_lock)
        return True
