"""A GPU shared-virtual-memory driver in the shape of drm_gpusvm + drm_pagemap as Intel Xe uses them (6.18;
drivers/gpu/drm/drm_gpusvm.c, include/drm/drm_gpusvm.h, drivers/gpu/drm/drm_pagemap.c, xe_svm.c), as a
simulator driver (``--driver gpusvm``).

* **Notifiers** of ``notifier_size`` (512 MiB, Xe's), inserted on the first GPU fault in their interval
  (``drm_gpusvm_range_find_or_insert``) and removed with their last range; each holds **ranges** of the largest
  chunk (2 MiB, 64 KiB, 4 KiB) that is aligned around the fault address and fits the VMA, the notifier and the
  neighbouring ranges; chunks up to 64 KiB only over pages the CPU has faulted in (``drm_gpusvm_check_pages``,
  Xe's ``check_pages_threshold``).
* **Pages** (``drm_gpusvm_range_get_pages``): ``mmu_interval_read_begin`` -> ``hmm_range_fault`` under the mmap
  read lock, retried on -EBUSY until ``HMM_RANGE_DEFAULT_TIMEOUT`` (1 s of virtual time); then under the
  ``notifier_lock`` (read) ``mmu_interval_read_retry`` and the DMA mapping of every system page (device pages of
  our own pagemap are mapped by their device address).  The GPU binding (``driver_bind_range``) programs the
  device page table under the ``notifier_lock`` only if ``drm_gpusvm_range_pages_valid`` -- an invalidation in
  between unmapped the pages and the bind retries.
* **Invalidation** (``drm_gpusvm_notifier_invalidate`` + the driver's ``invalidate``): a non-blockable range
  gets ``false``; else ``down_write(notifier_lock)``, ``mmu_interval_set_seq``, zap the GPU PTEs of every
  range it touches and flush the TLB, DMA-unmap those ranges (``drm_gpusvm_range_unmap_pages``); on
  ``MMU_NOTIFY_UNMAP`` the range is marked unmapped (partial or not, ``drm_gpusvm_range_set_unmapped``) and
  handed to the **garbage collector**, a work item, which -- and every GPU fault first -- removes it
  (``drm_gpusvm_range_remove``: a partially unmapped range's device pages go back to RAM first).
* **Device memory** (drm_pagemap): a device-private pagemap whose owner is the driver;
  ``drm_pagemap_migrate_to_devmem`` moves a whole range (``migrate_vma_setup`` of system pages, device pages
  from ``zone_device_page_init``, copy, ``migrate_vma_pages``/``_finalize``); ``migrate_to_ram`` brings the
  faulting allocation's pages of a range back (``fault_page = vmf->page``); ``drm_pagemap_evict_to_ram``
  evicts an allocation with ``migrate_device_pfns`` (device memory pressure, the ``evict`` event).

Model notes: the copy engine's own transient DMA mappings during a migration are not modelled (the pages are
locked and behind migration entries meanwhile); device pages keep their bytes at their own pfns.  A fault
handler's retries are bounded by ``HMM_RANGE_DEFAULT_TIMEOUT`` of virtual time (Xe retries some errors for as
long as they happen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.sim.driver import DriverBase, Invalidation

EPERM, ENOENT, EINTR, EAGAIN, ENOMEM, EFAULT, EBUSY, EINVAL, EOPNOTSUPP = 1, 2, 4, 11, 12, 14, 16, 22, 95
SZ_4K, SZ_64K, SZ_2M, SZ_512M = 4 << 10, 64 << 10, 2 << 20, 512 << 20
HMM_RANGE_DEFAULT_TIMEOUT = 1000            # ms (include/linux/hmm.h)
DEVMEM_PAGES = 1 << 14                      # 64 MiB of device memory (a PAGES_PER_SECTION multiple)


def _align_down(x: int, a: int) -> int:
    return x & ~(a - 1)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(eq=False)
class DrmGpusvmNotifier:
    """``struct drm_gpusvm_notifier``: an interval notifier and the ranges inside it."""

    start: int
    last: int
    sub: Any = None
    ranges: list["DrmGpusvmRange"] = field(default_factory=list)
    removed: bool = False


@dataclass(eq=False)
class DrmGpusvmRange:
    """``struct drm_gpusvm_range``: ``[start, end)`` with its DMA mappings, flags and notifier sequence."""

    start: int
    end: int
    notifier: DrmGpusvmNotifier
    migrate_devmem: bool = False
    unmapped: bool = False
    partial_unmap: bool = False
    has_dma_mapping: bool = False
    has_devmem_pages: bool = False
    notifier_seq: int = -1
    dma: list[int] = field(default_factory=list)       # iovas of the system pages (device pages: none)
    pfns: Any = None                                   # the pages bound: pfn per page, -1 none
    writable: Any = None

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT


@dataclass(eq=False)
class DrmPagemapDevmem:
    """``struct drm_pagemap_devmem``: one device-memory allocation (the pages of one migrated range)."""

    id: int
    pfns: np.ndarray
    size: int
    detached: bool = False


class _DevmemOps:
    """``dev_pagemap_ops`` of the driver's pagemap: ``page_free`` and ``migrate_to_ram``."""

    def __init__(self, drv: "DrmGpusvm") -> None:
        self.drv = drv

    def page_free(self, pgmap: Any, page: int) -> None:
        self.drv.drm_pagemap_page_free(page)

    def migrate_to_ram(self, vmf: Any) -> Gen[int]:
        return (yield from self.drv.drm_pagemap_migrate_to_ram(vmf))


class DrmGpusvm(DriverBase):
    """A drm_gpusvm driver (Xe's use of it): per-chunk notifiers, ranges, get_pages, garbage collection,
    migration to device memory with eviction."""

    name = "gpusvm"
    profiles = ("6.18",)
    notifier_size = SZ_512M
    chunk_sizes = (SZ_2M, SZ_64K, SZ_4K)
    check_pages_threshold = SZ_64K
    device_tlb = True
    #: one fault can be long, finite work: hmm_range_fault of a 2 MiB range faults page by page where no PMD
    #: can be mapped (a write to a sparse fsdax file at an unaligned offset: 512 faults of ~20 steps, ~10 000
    #: steps in one call) -- the 12 000 steps of a generated run left no room for it (campaign seed 8675309)
    run_steps_factor = 3

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.notifier_lock = Lock(f"{self.name}.notifier_lock", "rwsem")     # gpusvm->notifier_lock
        self.svm_lock = Lock(f"{self.name}.svm_lock", "mutex")               # the driver's vm lock
        self.gpusvm_notifiers: list[DrmGpusvmNotifier] = []
        self.gc_list: list[DrmGpusvmRange] = []
        self.gc_wq: Any = None
        self.gc_work: Any = None
        self.pgmap: Any = None
        self.free_pfns: list[int] = []
        self.page_alloc = None                    # np.int32 per device page: allocation id, -1 free
        self.allocations: dict[int, DrmPagemapDevmem] = {}
        self._next_alloc = 0

    @property
    def owner(self) -> Any:
        """``device_private_page_owner``: the driver."""
        return self

    # -- set-up ------------------------------------------------------------------------------------------
    def bind(self, mm: Any) -> Gen[int]:
        """drm_gpusvm_init() [6.18] and the driver's device memory (drm_pagemap: a device-private pagemap)."""
        ret = yield from super().bind(mm)
        if ret:
            return ret
        self.gc_wq = self.alloc_workqueue("gc")
        self.gc_work = self.init_work(self._gc_work, "gc")
        from hmmirror.mm.memremap import (
            MEMORY_DEVICE_PRIVATE,
            PAGES_PER_SECTION,
            devm_memremap_pages,
            new_dev_pagemap,
        )
        pgmap = new_dev_pagemap(f"{self.name}.vram", MEMORY_DEVICE_PRIVATE, DEVMEM_PAGES, dev=self,
                                ops=_DevmemOps(self), owner=self, align_pages=PAGES_PER_SECTION)
        ret = devm_memremap_pages(self.machine, pgmap)
        if ret:
            return ret
        self.pgmap = pgmap
        lo, hi = pgmap.res.start, pgmap.res.end
        self.free_pfns = list(range(hi - 1, lo - 1, -1))
        self.page_alloc = np.full(hi - lo, -1, dtype=np.int32)
        return 0

    # -- the GPU page fault handler (xe_svm_handle_pagefault / the drm_gpusvm DOC example) ------------------
    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        return (yield from self.gpu_fault(start, end, write, False))

    def fault_mode(self, start: int, end: int, write: bool, mode: str, job: dict[str, Any]) -> Gen[int]:
        """``migrate_dev``: a fault whose ranges move to device memory first (Xe's preferred location VRAM);
        ``migrate_sys``: the ranges of ``[start, end)`` evicted to RAM (``drm_gpusvm_range_evict``); any other
        mode: a plain GPU fault (read-only when ``write`` is false)."""
        if mode == "migrate_sys":
            return (yield from self.evict_range(start, end))
        return (yield from self.gpu_fault(start, end, write, mode == "migrate_dev"))

    def gpu_fault(self, start: int, end: int, write: bool, devmem: bool) -> Gen[int]:
        """The device faulted on ``[start, end)``: handle it range by range under the driver's vm lock."""
        if not self.mmget_not_zero():
            return -EFAULT
        yield from sched.mutex_lock(self.svm_lock)
        ret = 0
        addr = start
        while addr < end:
            ret, nxt = yield from self.xe_svm_handle_pagefault(addr, write, devmem)
            if ret:
                break
            addr = max(nxt, addr + PAGE_SIZE)
        sched.mutex_unlock(self.svm_lock)
        yield from self.mmput()
        return ret

    def xe_svm_handle_pagefault(self, addr: int, write: bool, devmem: bool) -> Gen[tuple[int, int]]:
        """xe_svm_handle_pagefault() [6.18], one fault address: garbage-collect, find or insert its range,
        optionally migrate it to device memory, get its pages, bind; retry when the CPU mappings changed.
        Returns ``(err, range end)``."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after

        # one GPU fault per address (the retry_bound check times each: the job's next address is progress)
        self.machine.log("device_fault_begin", addr=addr)
        timeout = jiffies(self.machine) + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT)
        migrate_tries = 3 if devmem else 0
        while True:
            if time_after(jiffies(self.machine), timeout):
                return -EBUSY, addr
            yield from self.garbage_collector()
            rng = yield from self.drm_gpusvm_range_find_or_insert(addr, write, devmem)
            if isinstance(rng, int):
                return rng, addr
            if migrate_tries > 0 and rng.migrate_devmem and not rng.has_devmem_pages:
                migrate_tries -= 1
                yield from sched.down_read(self.mm.mmap_sem)
                err = yield from self.drm_pagemap_migrate_to_devmem(rng)
                sched.up_read(self.mm.mmap_sem)
                if err:
                    continue                         # CPU mappings may have changed
            err = yield from self.drm_gpusvm_range_get_pages(rng, write)
            if err in (-EOPNOTSUPP, -EFAULT, -EPERM):
                if err == -EOPNOTSUPP:
                    yield from self.drm_gpusvm_range_evict(rng)
                if err == -EOPNOTSUPP or rng.unmapped:
                    continue                         # CPU mappings changed: the range goes, look again
                if not (yield from self._range_fits_vma(rng)):
                    # sized for VMAs that changed since (mprotect split off a part it cannot fault or write):
                    # Xe 6.18 retries with the same range; the model removes it and sizes a new one
                    yield from self.drm_gpusvm_range_remove(rng)
                    continue
                if err == -EPERM:
                    continue                         # the VMA's protection changed after the check: look again
                return err, addr
            if err:
                return err, addr
            err = yield from self.driver_bind_range(rng, write)
            if err == -EAGAIN:
                continue
            return err, rng.end

    def _range_fits_vma(self, rng: DrmGpusvmRange) -> Gen[bool]:
        """Does one VMA still cover the whole range (as when it was sized)?  (One unreadable VMA: the CPU
        refuses the access too, the -EFAULT stands.)"""
        yield from sched.down_read(self.mm.mmap_sem)
        vma = self.mm.vma_lookup(rng.start)
        ok = vma is not None and vma.vm_end >= rng.end
        sched.up_read(self.mm.mmap_sem)
        return ok

    # -- ranges and notifiers ----------------------------------------------------------------------------
    def _notifier_find(self, addr: int) -> DrmGpusvmNotifier | None:
        for n in self.gpusvm_notifiers:
            if n.start <= addr <= n.last:
                return n
        return None

    @staticmethod
    def drm_gpusvm_range_find(notifier: DrmGpusvmNotifier, start: int, end: int) -> DrmGpusvmRange | None:
        """drm_gpusvm_range_find() [6.18]: the first range of ``notifier`` overlapping ``[start, end)``."""
        for r in notifier.ranges:
            if r.start < end and start < r.end:
                return r
        return None

    def drm_gpusvm_range_find_or_insert(self, addr: int, write: bool, devmem: bool) -> Gen[Any]:
        """drm_gpusvm_range_find_or_insert() [6.18]: the range covering ``addr``, a new one (and its notifier) if none;
        -errno: no VMA (-ENOENT), a write to a VMA without VM_WRITE (-EPERM), no chunk fits (-EINVAL)."""
        from hmmirror.mm.mm_struct import vma_is_anonymous

        mm = self.mm
        if not self.mmget_not_zero():
            return -EFAULT
        notifier = self._notifier_find(addr)
        new = None
        if notifier is None:
            start = _align_down(addr, self.notifier_size)
            new = notifier = DrmGpusvmNotifier(start, start + self.notifier_size - 1)
            ret, sub = yield from self.notifier_insert(start, self.notifier_size)   # not under the mmap lock
            if ret:
                yield from self.mmput()
                return ret
            notifier.sub = sub
            sub.gpusvm_notifier = notifier
        yield from sched.down_read(mm.mmap_sem)
        vma = mm.vma_lookup(addr)
        err = 0
        rng = None
        if vma is None:
            err = -ENOENT
        elif write and not vma.vm_flags & VM.WRITE:
            err = -EPERM
        else:
            rng = self.drm_gpusvm_range_find(notifier, addr, addr + 1)
            if rng is None:
                size = yield from self.drm_gpusvm_range_chunk_size(notifier, vma, addr)
                if size < 0:
                    err = -EINVAL
                else:
                    # migrate_devmem: the range may move to device memory (Xe: ctx.devmem_possible, a property
                    # of the device, not of this fault); whether this fault moves it is the caller's choice
                    rng = DrmGpusvmRange(_align_down(addr, size), _align_down(addr, size) + size, notifier,
                                         migrate_devmem=bool(vma_is_anonymous(vma))
                                         and not vma.vm_flags & VM.HUGETLB)
                    yield from sched.down_read(self.notifier_lock)       # drm_gpusvm_range_insert()
                    notifier.ranges.append(rng)
                    sched.up_read(self.notifier_lock)
                    if new is not None:
                        self.gpusvm_notifiers.append(notifier)
                        new = None
        sched.up_read(mm.mmap_sem)
        if new is not None:                                 # err_notifier_remove
            yield from self.notifier_remove(new.sub)
        yield from self.mmput()
        return err if err else rng

    def drm_gpusvm_range_chunk_size(self, notifier: DrmGpusvmNotifier, vma: Any, addr: int) -> Gen[int]:
        """drm_gpusvm_range_chunk_size() [6.18]: the largest chunk aligned around ``addr`` inside the VMA and the
        notifier, not overlapping another range, and (up to the threshold) faulted in on the CPU; -1 if none."""
        for size in self.chunk_sizes:
            start, end = _align_down(addr, size), _align(addr + 1, size)
            if start < vma.vm_start or end > vma.vm_end or start < notifier.start or end > notifier.last + 1:
                continue
            if size != SZ_4K:
                if self.drm_gpusvm_range_find(notifier, start, end) is not None:
                    continue
                if size <= self.check_pages_threshold and \
                        not (yield from self.drm_gpusvm_check_pages(notifier, start, end)):
                    continue
            return size
        return -1

    def drm_gpusvm_check_pages(self, notifier: DrmGpusvmNotifier, start: int, end: int) -> Gen[bool]:
        """drm_gpusvm_check_pages() [6.18]: has the CPU faulted in every page of ``[start, end)``?  A snapshot
        (``default_flags = 0``) retried on -EBUSY until the timeout; the mmap lock is held."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin
        from hmmirror.mm.slab import kmalloc_array

        npages = (end - start) >> PAGE_SHIFT
        timeout = jiffies(self.machine) + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT)
        rng = hmm.HmmRange(notifier.sub, start, end, kmalloc_array(npages), default_flags=0, pfn_flags_mask=0,
                           dev_private_owner=self.owner)
        rng.notifier_seq = yield from mmu_interval_read_begin(notifier.sub)
        while True:
            err = yield from hmm.hmm_range_fault(rng)
            if err == -EBUSY:
                if time_after(jiffies(self.machine), timeout):
                    break
                rng.notifier_seq = yield from mmu_interval_read_begin(notifier.sub)
                continue
            break
        if err:
            return False
        return bool(((rng.hmm_pfns[:npages] & np.uint64(hmm.HMM_PFN_VALID)) != 0).all())

    def pages_read_retry(self, sub: Any, seq: int) -> bool:
        """mmu_interval_read_retry() as drm_gpusvm_get_pages() [6.18] calls it before mapping the pages: did an
        invalidation run since ``seq``?  (One call site, so a driver variant can change just this check.)"""
        from hmmirror.mm.mmu_notifier import mmu_interval_read_retry
        return bool(mmu_interval_read_retry(sub, seq))

    def drm_gpusvm_range_get_pages(self, rng: DrmGpusvmRange, write: bool) -> Gen[int]:
        """drm_gpusvm_range_get_pages() [6.18]: fault the range in and DMA-map its pages, valid for the sequence
        it read; 0, or -errno (-EFAULT: the range was unmapped meanwhile; -EOPNOTSUPP: a range mixing
        device and system pages)."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin
        from hmmirror.mm.slab import kmalloc_array

        mm = self.mm
        sub = rng.notifier.sub
        npages = rng.npages
        timeout = jiffies(self.machine) + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT)
        flags = hmm.HMM_PFN_REQ_FAULT | (hmm.HMM_PFN_REQ_WRITE if write else 0)
        while True:                                                     # retry:
            if time_after(jiffies(self.machine), timeout):              # (6.17+: the retry path is bounded too)
                return -EBUSY
            seq = yield from mmu_interval_read_begin(sub)
            yield from sched.down_read(self.notifier_lock)              # drm_gpusvm_range_pages_valid_unlocked()
            valid = rng.has_dma_mapping or rng.has_devmem_pages
            sched.up_read(self.notifier_lock)
            if valid and (not write or all(rng.writable)):
                rng.notifier_seq = seq
                return 0
            hr = hmm.HmmRange(sub, rng.start, rng.end, kmalloc_array(npages), default_flags=flags,
                              pfn_flags_mask=0, dev_private_owner=self.owner)
            hr.notifier_seq = seq
            if not self.mmget_not_zero():
                return -EFAULT
            while True:
                yield from sched.down_read(mm.mmap_sem)
                err = yield from hmm.hmm_range_fault(hr)
                sched.up_read(mm.mmap_sem)
                if err == -EBUSY:
                    if time_after(jiffies(self.machine), timeout):
                        break
                    hr.notifier_seq = yield from mmu_interval_read_begin(sub)
                    continue
                break
            yield from self.mmput()
            if err:
                return err
            # map_pages: all DMA mappings under the notifier lock, so an invalidation either waits for us or
            # unmaps what we mapped
            yield from sched.down_read(self.notifier_lock)
            if rng.unmapped:
                sched.up_read(self.notifier_lock)
                return -EFAULT
            if self.pages_read_retry(sub, hr.notifier_seq):
                sched.up_read(self.notifier_lock)
                continue
            self._unmap_pages(rng)                                      # what an older pass mapped
            pfns = np.full(npages, -1, dtype=np.int64)
            wr = np.zeros(npages, dtype=bool)
            devmem = sysmem = 0
            for i in range(npages):
                e = int(hr.hmm_pfns[i])
                pfn = hmm.hmm_pfn_to_pfn(e)
                pfns[i], wr[i] = pfn, bool(e & hmm.HMM_PFN_WRITE)
                if self.pgmap is not None and self.pgmap.covers(pfn):
                    devmem += 1                                         # dpagemap->ops->device_map
                else:
                    sysmem += 1
                    rng.dma.append(self.pt.dma_map_page(pfn, 0, rng.start + i * PAGE_SIZE))
            if devmem and sysmem:                                       # mixed: not supported
                self._unmap_pages(rng)
                sched.up_read(self.notifier_lock)
                return -EOPNOTSUPP
            rng.pfns, rng.writable = pfns, wr
            rng.has_dma_mapping = True
            rng.has_devmem_pages = devmem > 0
            sched.up_read(self.notifier_lock)
            rng.notifier_seq = hr.notifier_seq
            return 0

    def _unmap_pages(self, rng: DrmGpusvmRange) -> None:
        """__drm_gpusvm_range_unmap_pages() [6.18]: DMA-unmap the range (notifier lock held)."""
        for iova in rng.dma:
            self.pt.dma_unmap_page(iova)
        rng.dma = []
        rng.has_dma_mapping = rng.has_devmem_pages = False

    def driver_bind_range(self, rng: DrmGpusvmRange, write: bool) -> Gen[int]:
        """driver_bind_range() [6.18]: program the GPU page table under the notifier lock if the pages are still
        valid (``drm_gpusvm_range_pages_valid``), else -EAGAIN."""
        yield from sched.down_read(self.notifier_lock)
        if not (rng.has_dma_mapping or rng.has_devmem_pages) or rng.pfns is None:
            sched.up_read(self.notifier_lock)
            return -EAGAIN
        for i in range(rng.npages):
            self.pt.map(rng.start + i * PAGE_SIZE, int(rng.pfns[i]), bool(rng.writable[i]))
        sched.up_read(self.notifier_lock)
        return 0

    # -- the notifier callback -----------------------------------------------------------------------------
    def invalidate(self, inv: Invalidation) -> Gen[bool]:
        """drm_gpusvm_notifier_invalidate() [6.18] + the driver's ``invalidate`` (xe_svm_invalidate): not blockable ->
        false; else under ``down_write(notifier_lock)``: set the sequence, zap the GPU PTEs of every range the
        event touches and flush the TLB, DMA-unmap them; on UNMAP mark them unmapped and queue them for the
        garbage collector."""
        from hmmirror.kernel.workqueue import queue_work
        from hmmirror.mm.mmu_notifier import mmu_interval_set_seq

        if not inv.blockable:
            return False
        yield from sched.down_write(self.notifier_lock)
        mmu_interval_set_seq(inv.sub, inv.seq)
        notifier = getattr(inv.sub, "gpusvm_notifier", None)
        if notifier is not None:
            start, end = max(inv.start, notifier.start), min(inv.end, notifier.last + 1)
            hit = [r for r in notifier.ranges if r.start < end and start < r.end]
            for r in hit:                                               # driver_invalidate_device_pages()
                self.pt.unmap(r.start, r.end)
            if hit:
                self.pt.tlb_flush(min(r.start for r in hit), max(r.end for r in hit))
            for r in hit:
                self._unmap_pages(r)                                    # drm_gpusvm_range_unmap_pages()
                if inv.event == MMU_NOTIFY.UNMAP:
                    self.drm_gpusvm_range_set_unmapped(r, inv.start, inv.end)
                    if r not in self.gc_list:
                        self.gc_list.append(r)                          # driver_garbage_collector_add()
                        if self.gc_work is not None:
                            queue_work(self.gc_wq, self.gc_work)
        sched.up_write(self.notifier_lock)
        return True

    @staticmethod
    def drm_gpusvm_range_set_unmapped(rng: DrmGpusvmRange, start: int, end: int) -> None:
        """drm_gpusvm_range_set_unmapped() [6.18]: the CPU unmapped (part of) the range."""
        rng.unmapped = True
        if start > rng.start or end < rng.end:
            rng.partial_unmap = True

    # -- garbage collection --------------------------------------------------------------------------------
    def _gc_work(self, work: Any) -> Gen[None]:
        """The garbage collector's work item (Xe: vm->svm.garbage_collector.work)."""
        yield from sched.mutex_lock(self.svm_lock)
        yield from self.garbage_collector()
        sched.mutex_unlock(self.svm_lock)

    def garbage_collector(self) -> Gen[None]:
        """driver_garbage_collector() [6.18]: remove every unmapped range (driver vm lock held); a partially unmapped
        range's device pages go back to RAM first."""
        while self.gc_list:
            rng = self.gc_list.pop(0)
            if rng.partial_unmap and self.mmget_not_zero():
                yield from self.drm_gpusvm_range_evict(rng, pinned=True)
                yield from self.mmput()
            yield from self.drm_gpusvm_range_remove(rng)

    def drm_gpusvm_range_remove(self, rng: DrmGpusvmRange) -> Gen[None]:
        """drm_gpusvm_range_remove() [6.18]: unbind and DMA-unmap the range, take it out of its notifier, and remove
        the notifier with its last range (``mmu_interval_notifier_remove`` waits for a running callback)."""
        notifier = rng.notifier
        yield from sched.down_read(self.notifier_lock)
        self.pt.unmap(rng.start, rng.end)                               # driver_unbind_range()
        self.pt.tlb_flush(rng.start, rng.end)
        self._unmap_pages(rng)
        if rng in notifier.ranges:
            notifier.ranges.remove(rng)
        sched.up_read(self.notifier_lock)
        if not notifier.ranges and notifier in self.gpusvm_notifiers:
            self.gpusvm_notifiers.remove(notifier)
            if not notifier.removed:
                notifier.removed = True
                yield from self.notifier_remove(notifier.sub)

    def drm_gpusvm_range_evict(self, rng: DrmGpusvmRange, pinned: bool = False) -> Gen[int]:
        """drm_gpusvm_range_evict() [6.18]: fault the range in with ``dev_private_owner = NULL`` -- every device page
        in it migrates back to RAM through its ``migrate_to_ram`` -- retried on -EBUSY until the timeout."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin
        from hmmirror.mm.slab import kmalloc_array

        mm = self.mm
        if not pinned and not self.mmget_not_zero():
            return -EFAULT
        timeout = jiffies(self.machine) + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT)
        hr = hmm.HmmRange(rng.notifier.sub, rng.start, rng.end, kmalloc_array(rng.npages),
                          default_flags=hmm.HMM_PFN_REQ_FAULT, pfn_flags_mask=0, dev_private_owner=None)
        err = 0
        while not time_after(jiffies(self.machine), timeout):
            hr.notifier_seq = yield from mmu_interval_read_begin(rng.notifier.sub)
            yield from sched.down_read(mm.mmap_sem)
            err = yield from hmm.hmm_range_fault(hr)
            sched.up_read(mm.mmap_sem)
            if err != -EBUSY:
                break
        if not pinned:
            yield from self.mmput()
        return err

    def evict_range(self, start: int, end: int) -> Gen[int]:
        """The ``migrate_sys`` job: evict every range of ``[start, end)`` to RAM (under the vm lock)."""
        if not self.mmget_not_zero():
            return -EFAULT
        yield from sched.mutex_lock(self.svm_lock)
        ret = 0
        for n in list(self.gpusvm_notifiers):
            for r in list(n.ranges):
                if r.start < end and start < r.end and not r.unmapped:
                    ret = (yield from self.drm_gpusvm_range_evict(r, pinned=True)) or ret
        sched.mutex_unlock(self.svm_lock)
        yield from self.mmput()
        return ret if ret in (0, -EFAULT, -EBUSY) else 0

    # -- device memory (drm_pagemap) -----------------------------------------------------------------------
    def _alloc_devmem(self, npages: int) -> DrmPagemapDevmem | None:
        """The driver's VRAM allocator: ``npages`` free device pages, or None."""
        if len(self.free_pfns) < npages:
            return None
        pf = np.array([self.free_pfns.pop() for _ in range(npages)], dtype=np.int64)
        a = DrmPagemapDevmem(self._next_alloc, pf, npages << PAGE_SHIFT)
        self._next_alloc += 1
        self.allocations[a.id] = a
        return a

    def drm_pagemap_page_free(self, page: int) -> None:
        """drm_pagemap_page_free() [6.18]: a device page's last reference went (zdd put): back to the allocator."""
        off = page - self.pgmap.res.start
        aid = int(self.page_alloc[off])
        self.page_alloc[off] = -1
        self.free_pfns.append(page)
        a = self.allocations.get(aid)
        if a is not None and not (self.page_alloc[a.pfns - self.pgmap.res.start] == aid).any():
            a.detached = True                                           # devmem_release
            del self.allocations[aid]

    def drm_pagemap_migrate_to_devmem(self, rng: DrmGpusvmRange) -> Gen[int]:
        """drm_pagemap_migrate_to_devmem() (6.18; drm_gpusvm_migrate_to_devmem in 6.15): move the whole range
        to device memory; the mmap lock is held.  -EBUSY unless every page could be collected."""
        from hmmirror.mm import migrate_device as md
        from hmmirror.mm.memremap import zone_device_page_init
        from hmmirror.mm.mm_struct import vma_is_anonymous

        mm = self.mm
        mem = self.machine.mem
        npages = rng.npages
        vma = mm.vma_lookup(rng.start)
        if vma is None:
            return -ENOENT
        if rng.end > vma.vm_end or rng.start < vma.vm_start:
            return -EINVAL
        if not vma_is_anonymous(vma):
            return -EBUSY
        args = md.MigrateVma(vma, rng.start, rng.end, np.zeros(npages, dtype=np.uint64),
                             np.zeros(npages, dtype=np.uint64), pgmap_owner=self.owner,
                             flags=md.MIGRATE_VMA_SELECT_SYSTEM)
        err = yield from md.migrate_vma_setup(args)
        if err:
            return err
        if not args.cpages:
            return -EFAULT
        alloc = None
        if args.cpages != npages:
            err = -EBUSY
        else:
            alloc = self._alloc_devmem(npages)                          # ops->populate_devmem_pfn
            if alloc is None:
                err = -ENOMEM
        if not err:
            assert alloc is not None
            for i in range(npages):
                dpage = int(alloc.pfns[i])
                zone_device_page_init(self.machine, dpage)              # drm_pagemap_get_devmem_page()
                self.page_alloc[dpage - self.pgmap.res.start] = alloc.id
                spage = md.migrate_pfn_to_page(int(args.src[i]))
                if spage >= 0:
                    mem.copy(dpage, spage)                              # ops->copy_to_devmem
                else:
                    mem.clear(dpage)
                args.dst[i] = md.migrate_pfn(dpage)
        elif alloc is not None:
            for pf in alloc.pfns.tolist():
                self.free_pfns.append(int(pf))
            self.allocations.pop(alloc.id, None)
        yield from md.migrate_vma_pages(args)
        yield from md.migrate_vma_finalize(args)
        return err

    def drm_pagemap_migrate_to_ram(self, vmf: Any) -> Gen[int]:
        """drm_pagemap_migrate_to_ram() (6.18 ``migrate_to_ram``; __drm_gpusvm_migrate_to_ram in 6.15): bring the
        pages of the faulting allocation in the allocation-sized window around the address back to RAM, the
        faulting page included (``fault_page = vmf->page``).  VM_FAULT_SIGBUS if that fails."""
        from hmmirror.include.mm_types import VM_FAULT
        from hmmirror.mm import migrate_device as md
        from hmmirror.mm.folio import folio_trylock

        mem = self.machine.mem
        vma = vmf.vma
        aid = int(self.page_alloc[vmf.page - self.pgmap.res.start])
        alloc = self.allocations.get(aid)
        size = alloc.size if alloc is not None else PAGE_SIZE
        size = 1 << (max(size, PAGE_SIZE) - 1).bit_length()
        start, end = max(_align_down(vmf.address, size), vma.vm_start), min(_align(vmf.address + 1, size), vma.vm_end)
        npages = (end - start) >> PAGE_SHIFT
        args = md.MigrateVma(vma, start, end, np.zeros(npages, dtype=np.uint64), np.zeros(npages, dtype=np.uint64),
                             pgmap_owner=self.owner, flags=md.MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                             fault_page=vmf.page)
        if (yield from md.migrate_vma_setup(args)):
            return int(VM_FAULT.SIGBUS)
        if not args.cpages:
            return 0                                                    # raced with another CPU fault
        for i in range(args.npages):                                    # drm_pagemap_migrate_populate_ram_pfn
            s = int(args.src[i])
            spage = md.migrate_pfn_to_page(s)
            if spage < 0 or not s & md.MIGRATE_PFN_MIGRATE:
                continue
            if int(self.page_alloc[spage - self.pgmap.res.start]) != aid:
                continue                                                # another allocation's page
            dpage = mem.alloc_page()
            if dpage < 0:
                continue
            folio_trylock(mem, dpage)
            mem.copy(dpage, spage)                                      # ops->copy_to_ram
            args.dst[i] = md.migrate_pfn(dpage)
        yield from md.migrate_vma_pages(args)
        yield from md.migrate_vma_finalize(args)
        return 0

    def drm_pagemap_evict_to_ram(self, alloc: DrmPagemapDevmem) -> Gen[int]:
        """drm_pagemap_evict_to_ram() (6.18; drm_gpusvm_evict_to_ram in 6.15): move an allocation's pages back to RAM
        wherever they are mapped (``migrate_device_pfns``; no mmap lock)."""
        from hmmirror.mm import migrate_device as md
        from hmmirror.mm.folio import folio_trylock

        mem = self.machine.mem
        npages = len(alloc.pfns)
        src = alloc.pfns.astype(np.uint64).copy()                       # ops->populate_devmem_pfn
        dst = np.zeros(npages, dtype=np.uint64)
        yield from md.migrate_device_pfns(self.machine, src, npages)
        for i in range(npages):
            s = int(src[i])
            spage = md.migrate_pfn_to_page(s)
            if spage < 0 or not s & md.MIGRATE_PFN_MIGRATE:
                continue
            dpage = mem.alloc_page()
            if dpage < 0:
                continue
            folio_trylock(mem, dpage)
            mem.copy(dpage, spage)                                      # ops->copy_to_ram
            dst[i] = md.migrate_pfn(dpage)
        yield from md.migrate_device_pages(self.machine, src, dst, npages)
        yield from md.migrate_device_finalize(self.machine, src, dst, npages)
        return 0

    def evict(self) -> Gen[int]:
        """Device memory pressure (the ``evict`` event): every allocation goes back to RAM."""
        if self.pgmap is None:
            return -ENOENT
        for a in list(self.allocations.values()):
            yield from self.drm_pagemap_evict_to_ram(a)
        return 0

    # -- teardown ------------------------------------------------------------------------------------------
    def teardown(self) -> Gen[None]:
        """drm_gpusvm_fini() [6.18]: the notifiers are gone; remove every range (DMA unmap included)."""
        yield from sched.down_read(self.notifier_lock)
        for n in self.gpusvm_notifiers:
            n.removed = True
            for r in n.ranges:
                self._unmap_pages(r)
            n.ranges = []
        self.gpusvm_notifiers = []
        self.gc_list = []
        sched.up_read(self.notifier_lock)
