"""The page cache of ext4/xfs files and its fault hooks (mm/filemap.c, fs/ext4/inode.c, fs/xfs/xfs_file.c).

Model rules (mm-substrate.md §5.1, §5.5):

* A read fault first maps the already-cached pages of the fault-around window (``filemap_map_pages``), then
  ``filemap_fault`` handles the faulting page.  A page that is not cached is read with *readahead covering
  the fault-around window*: every page of the window below EOF is brought in (holes inside EOF become
  zero-filled page-cache pages, obs D9).  The model's I/O is synchronous (pages are uptodate at once).
* With ``FAULT_FLAG_ALLOW_RETRY`` a fault that had to read returns ``VM_FAULT_RETRY | VM_FAULT_MAJOR`` having
  released ``mmap_sem`` (kept with ``RETRY_NOWAIT``), as ``do_sync_mmap_readahead`` /
  ``maybe_unlock_mmap_for_io`` do; the retried fault finds the window cached and fault-around maps it.
  Without ``ALLOW_RETRY`` (GUP, [6.18] HMM) the page is returned at once (``VM_FAULT_MAJOR``) and only the
  faulting page is mapped by that fault.
* Shared mappings are read-only after a read fault (write-notify); the first write calls ``page_mkwrite``,
  which dirties the page and allocates the block, and the write bit is set in place (same pfn, no notifier).
* An access at or beyond EOF is ``VM_FAULT_SIGBUS``.
* [6.18] (``profile.file_pmd_mappings``): with ``VM_HUGEPAGE`` the readahead of a read fault allocates a
  PMD-sized folio for the 2 MiB-aligned block when the whole block is below EOF and not cached, and the
  fault maps it with one PMD (obs D12/X12).  [5.2] never.  Other 6.18 large folios (order < 9) are not
  modelled: the page cache otherwise holds 4 KiB pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, pmd_leaf, pte_none
from hmmirror.fs.file import DATA, File, Inode, pages_of
from hmmirror.fs.super import FileSystemType, SuperBlock
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.folio import folio_test_locked, folio_trylock, folio_unlock
from hmmirror.mm.memory import (
    VmFault,
    do_set_pmd,
    fault_around_window,
    folio_extent,
    pte_lockptr,
    set_pte_range_from_cache,
)
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.page_alloc import PhysMem


# --- page-cache population -------------------------------------------------------------------------------
def add_new_cache_pages(mem: "PhysMem", inode: Inode, indices: np.ndarray, kind: int) -> int:
    """Allocate frames for ``indices`` and insert them into the inode's page cache (uptodate, clean).

    ``kind`` is ``PG.file`` (disk file) or ``PG.swapbacked`` (shmem).  Returns how many were inserted (fewer
    when memory runs out; the lowest indices first).  Model helper (the allocation + add_to_page_cache_lru
    + I/O completion of readahead).
    """
    if not indices.size:
        return 0
    pfns = mem.alloc_pages_bulk(int(indices.size))
    got = int(pfns.size)
    if not got:
        return 0
    mapping = inode.i_mapping
    idx = indices[:got]
    mapping._ensure(int(idx.max()) + 1)
    mapping.pages[idx] = pfns
    if mapping.folio_order is not None:                  # each a single-page folio
        mapping.folio_order[idx] = 0
    mapping.nrpages += got
    mem.flags[pfns] = np.uint32(kind | PG.uptodate)
    return got


def write_folio_orders(start: int, nr: int, max_order: int = 9) -> list[int]:
    """Folio orders a buffered write of pages ``[start, start+nr)`` creates [6.18, large-folio mappings]:
    generic_perform_write() asks __filemap_get_folio() for a folio of ``ilog2(bytes left)`` pages, limited
    by the index's alignment (fgf_set_order) and the mapping's maximum order (PMD)."""
    out = []
    idx, left = start, nr
    while left > 0:
        order = min(left.bit_length() - 1, max_order)
        if idx:
            order = min(order, (idx & -idx).bit_length() - 1)
        out.append(order)
        idx += 1 << order
        left -= 1 << order
    return out


def filemap_can_map_large(vmf: VmFault, inode: Inode, folio_end: int) -> bool:
    """filemap_map_pages() [74207de2ba10 + "Fix logic around SIGBUS"]: a folio may be mapped by a PMD or
    whole only if it is shmem or ends before the file's last page (``file_end >= folio_next_index`` with
    ``file_end`` the index of the last page: a folio ending exactly at EOF does not qualify)."""
    if not vmf.mm.machine.profile.map_large_below_eof or vmf.vma.vm_ops.is_shmem:
        return True
    return inode.nr_pages - 1 >= folio_end


def cache_written_folios(machine: "Machine", inode: Inode, start: int, orders: list[int]) -> None:
    """The page cache after a buffered write [6.x large folios]: folios of the given orders from slot
    ``start`` on; a PMD-order folio is a real compound folio (it can be PMD-mapped, do_set_pmd), smaller
    ones are 4 KiB frames whose folio extent is recorded in the mapping."""
    mem, mapping = machine.mem, inode.i_mapping
    idx = start
    for o in orders:
        nr = 1 << o
        head = mem.alloc_folio(9) if o == 9 else -1
        if head >= 0:
            mapping.add_to_page_cache(idx, head, nr)
            mem.flags[head: head + nr] |= np.uint32(PG.file | PG.uptodate)
        else:
            add_new_cache_pages(mem, inode, np.arange(idx, idx + nr, dtype=np.int64), PG.file)
        idx += nr
    mapping.set_folio_orders(start, orders)


def folio_extended_window(vmf: VmFault, inode: Inode, start: int, end: int) -> tuple[int, int]:
    """filemap_map_folio_range() [6.18, "map entire large folio faultaround"]: the first and last folio
    touching the fault-around window are mapped whole when the folio may be mapped large (below EOF), lies
    inside the VMA and inside the page table of the fault."""
    vma = vmf.vma
    if not vma.vm_mm.machine.profile.faultaround_maps_folio:
        return start, end
    mapping, mem = inode.i_mapping, vmf.mm.machine.mem

    def va(index: int) -> int:
        return vma.vm_start + ((index - vma.vm_pgoff) << PAGE_SHIFT)

    for edge in (vma.linear_page_index(start), vma.linear_page_index(end - PAGE_SIZE)):
        if mapping.find_page(edge) < 0:
            continue
        first, last = folio_extent(mem, mapping, edge)
        if last - first < 2 or not filemap_can_map_large(vmf, inode, last):
            continue
        a, b = va(first), va(last)
        if a >= vma.vm_start and b <= vma.vm_end and (a & ~(PMD_SIZE - 1)) == ((b - 1) & ~(PMD_SIZE - 1)) \
                and (a & ~(PMD_SIZE - 1)) == (vmf.address & ~(PMD_SIZE - 1)):
            start, end = min(start, a), max(end, b)
    return start, end


def ra_pmd_index(vmf: VmFault, inode: Inode) -> int:
    """page_cache_ra_order(HPAGE_PMD_ORDER) decision [6.18, VM_HUGEPAGE]: the 2 MiB-aligned index whose block
    the readahead reads as one PMD-sized folio (it lies below EOF and none of it is cached), or -1."""
    vma = vmf.vma
    profile = vmf.mm.machine.profile
    if not profile.file_pmd_mappings or not vma.vm_flags & VM.HUGEPAGE or vma.vm_flags & VM.NOHUGEPAGE \
            or inode.sb.fstype not in profile.large_folio_fs:
        return -1                                        # page_cache_ra_order(): order 0 without large folios
    hindex = vmf.pgoff & ~(HPAGE_PMD_NR - 1)
    if hindex + HPAGE_PMD_NR > inode.nr_pages or not inode.i_mapping.range_empty(hindex, hindex + HPAGE_PMD_NR):
        return -1
    return hindex


def readahead_indices(vmf: VmFault, inode: Inode) -> np.ndarray:
    """The page indices the model's readahead reads for a fault: the file pages behind the fault-around
    window (§5.5), below EOF, not cached yet (the faulting index first)."""
    start, end = fault_around_window(vmf)
    first = vmf.vma.linear_page_index(start)
    idx = np.arange(first, first + ((end - start) >> 12), dtype=np.int64)
    idx = idx[idx < inode.nr_pages]
    slots = inode.i_mapping.lookup_range(first, first + ((end - start) >> 12))[: idx.size]
    idx = idx[slots < 0]
    faulting = idx == vmf.pgoff
    return np.concatenate([idx[faulting], idx[~faulting]])


#: VM_READAHEAD_PAGES (include/linux/mm.h): the default ``ra_pages`` of a backing device (128 KiB).
VM_READAHEAD_PAGES = 32


def mmap_readaround_mark(vmf: VmFault, inode: Inode) -> int:
    """do_sync_mmap_readahead() read-around [6.12]: the page index page_cache_ra_unbounded() marks
    PG_readahead, or -1 (profile ``faultaround_skips_ra_mark`` off, a VM_HUGEPAGE or large-folio read, or no
    mark below EOF).

    The read-around starts ``ra_pages / 2`` before the fault, reads ``ra_pages`` pages (do_page_cache_ra()
    clamps them to the page of the last byte) and marks the page ``ra_pages / 4`` before its end (the
    async region); a read shorter than the async region marks nothing.
    """
    vma = vmf.vma
    profile = vmf.mm.machine.profile
    if not profile.faultaround_skips_ra_mark or vma.vm_flags & VM.HUGEPAGE \
            or inode.sb.fstype in profile.large_folio_fs:
        return -1                               # page_cache_ra_order() large-folio paths mark folios
    start = max(0, vmf.pgoff - VM_READAHEAD_PAGES // 2)
    end_index = inode.nr_pages - 1
    if inode.nr_pages == 0 or start > end_index:
        return -1
    nr = min(VM_READAHEAD_PAGES, end_index - start + 1)
    rel = nr - VM_READAHEAD_PAGES // 4
    return start + rel if rel >= 0 else -1


def page_cache_sync_readahead(machine: "Machine", inode: Inode, hindex: int, indices: np.ndarray,
                              mark: int = -1) -> int:
    """The readahead I/O (model: synchronous, pages uptodate at once): a PMD-sized folio at ``hindex``
    (if >= 0 and still possible), else 4 KiB pages for those of ``indices`` still not cached; a page read now
    at index ``mark`` gets PG_readahead (see :func:`mmap_readaround_mark`).

    Works on the file only (the caller may have released mmap_sem).  Returns the number of slots added.
    """
    mem = machine.mem
    mapping = inode.i_mapping
    if hindex >= 0 and hindex + HPAGE_PMD_NR <= inode.nr_pages and mapping.range_empty(hindex, hindex + HPAGE_PMD_NR):
        head = mem.alloc_folio(9)
        if head >= 0:
            mapping.add_to_page_cache(hindex, head, HPAGE_PMD_NR)
            mem.flags[head: head + HPAGE_PMD_NR] |= np.uint32(PG.file | PG.uptodate)
            machine.counters["file_thp_readahead"] += 1
            return HPAGE_PMD_NR
    indices = indices[indices < inode.nr_pages]
    if indices.size:
        indices = indices[mapping.lookup_range(0, int(indices.max()) + 1)[indices] < 0]
    n = add_new_cache_pages(mem, inode, indices, PG.file)
    machine.counters["readahead_pages"] += n
    if mark >= 0 and mark in indices[:n].tolist():
        mem.flags[mapping.find_page(mark)] |= np.uint32(PG.readahead)     # folio_set_readahead()
    return n


# --- vm_operations_struct hooks --------------------------------------------------------------------------
def filemap_fault(vmf: VmFault) -> Gen[int]:
    """filemap_fault() (mm/filemap.c) [5.2 shape; readahead simplified per mm-substrate.md §5.1/§5.5].

    Returns VM_FAULT_LOCKED (| MAJOR) with ``vmf.page`` referenced and locked, VM_FAULT_RETRY (| MAJOR) after reading when the
    caller allows a retry (``mmap_sem`` released unless RETRY_NOWAIT), VM_FAULT_SIGBUS at or beyond EOF,
    VM_FAULT_OOM when no frame could be had for the faulting page.
    """
    vma, mm = vmf.vma, vmf.mm
    machine, mem = mm.machine, mm.machine.mem
    inode: Inode = vma.vm_file.inode
    mapping = inode.i_mapping
    offset = vmf.pgoff
    if offset >= inode.nr_pages:
        return int(VM_FAULT.SIGBUS)
    allow_retry = bool(vmf.flags & FAULT_FLAG.ALLOW_RETRY)
    drop_mmap = (vmf.flags & (FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.RETRY_NOWAIT)) == FAULT_FLAG.ALLOW_RETRY
    ret = 0
    pfn = mapping.find_page(offset)
    if pfn < 0:
        # No page in the page cache at all: a major fault.  maybe_unlock_mmap_for_io(): the I/O is done
        # without mmap_sem when the caller can retry; from here on only the file (not the VMA) is used.
        ret = int(VM_FAULT.MAJOR)
        machine.counters["pgmajfault"] += 1
        hindex, indices = ra_pmd_index(vmf, inode), readahead_indices(vmf, inode)
        mark = mmap_readaround_mark(vmf, inode)
        if drop_mmap:
            sched.up_read(mm.mmap_sem)
        yield from sched.might_sleep("page_cache_sync_readahead")
        page_cache_sync_readahead(machine, inode, hindex, indices, mark)
        if allow_retry:
            return ret | int(VM_FAULT.RETRY)
        pfn = mapping.find_page(offset)
        if pfn < 0:
            return ret | int(VM_FAULT.OOM)
    while not folio_trylock(mem, pfn):
        # lock_folio_maybe_drop_mmap(): the page is locked (I/O, truncation or another fault in progress)
        if allow_retry:
            if drop_mmap:
                sched.up_read(mm.mmap_sem)
                yield from sched.wait_event(lambda p=pfn: not folio_test_locked(mem, p), "__lock_page_or_retry")
            return ret | int(VM_FAULT.RETRY)
        yield from sched.wait_event(lambda p=pfn: not folio_test_locked(mem, p), "__lock_page")
        pfn = mapping.find_page(offset)                  # truncated meanwhile?
        if pfn < 0 or offset >= inode.nr_pages:
            return ret | int(VM_FAULT.SIGBUS)
    if offset >= inode.nr_pages:                          # i_size re-checked with the page locked
        folio_unlock(mem, pfn)
        return ret | int(VM_FAULT.SIGBUS)
    if mem.flags[pfn] & PG.readahead:
        # do_async_mmap_readahead() -> page_cache_async_ra(): folio_clear_readahead(), then the next async
        # readahead (model: not issued; the pages are read when a fault needs them)
        mem.flags[pfn] &= PG.mask(PG.readahead)
    mem.get_page(pfn)
    vmf.page = pfn
    return ret | int(VM_FAULT.LOCKED)                     # the caller unlocks it once mapped


def next_uptodate_folio(inode: Inode, mem: "PhysMem", first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """next_uptodate_folio() (mm/filemap.c, 6.x; 5.2: the same checks inline in filemap_map_pages), vectorised
    over the file pages ``[first, first + n)``: ``(slots, ok)``, the cached pfn of each page (-1 where it is
    not mapped) and which ones may be mapped: cached below EOF, uptodate, not locked, not PG_readahead (set
    only with the profile's faultaround_skips_ra_mark), not poisoned."""
    slots = inode.i_mapping.lookup_range(first, first + n)
    idx = np.arange(first, first + n, dtype=np.int64)
    ok = (slots >= 0) & (idx < inode.nr_pages)
    if ok.any():
        fl = mem.flags[slots[ok]]
        good = ((fl & PG.uptodate) != 0) & ((fl & (PG.locked | PG.hwpoison | PG.readahead)) == 0)
        sub = ok.copy()
        sub[ok] = good
        ok = sub
    return np.where(ok, slots, -1), ok


def filemap_map_pages(vmf: VmFault, start: int, end: int) -> Gen[int]:
    """filemap_map_pages() (mm/filemap.c, 6.x shape; 5.2 maps the same set through alloc_set_pte()).

    Maps every page of ``[start, end)`` that is cached, uptodate, not locked, not PG_readahead and below EOF
    into none PTEs.
    If the PMD is none and the first such page belongs to a PMD-sized folio that fits the VMA, the folio is
    mapped by one PMD instead (filemap_map_pmd -> do_set_pmd).  Nothing cached: no PTE table is installed.
    Takes the PTE (or PMD) lock itself.  Returns the number of entries installed (a PMD counts 1).
    """
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    inode: Inode = vma.vm_file.inode
    end = min(end, vma.vm_start + ((inode.nr_pages - vma.vm_pgoff) << PAGE_SHIFT))   # end_pgoff <= file_end
    if end <= start:
        return 0
    start, end = folio_extended_window(vmf, inode, start, end)
    first = vma.linear_page_index(start)
    n = (end - start) >> 12
    slots, ok = next_uptodate_folio(inode, mem, first, n)
    if not ok.any():
        return 0
    pmd = pool.get(vmf.pmdp)
    if pmd_leaf(pmd):
        return 0
    if pte_none(pmd):
        # filemap_map_pmd() runs only for a first folio that may be mapped large; it maps a PMD-mappable
        # folio by a PMD, else installs the preallocated PTE table.  Without it there is no PTE table and
        # fault-around maps nothing (finish_fault then maps the faulting page or its folio).
        k = int(np.flatnonzero(ok)[0])
        pfn0 = int(slots[k])
        head = mem.compound_head(pfn0)
        if not filemap_can_map_large(vmf, inode, folio_extent(mem, inode.i_mapping, first + k)[1]):
            return 0
        if int(mem.order[head]) == 9 and not mem.flags[head] & PG.hugetlb:
            at = pfn0 + ((vmf.address - (start + k * PAGE_SIZE)) >> 12)
            if head <= at < head + HPAGE_PMD_NR:
                mem.get_page(head)
                r = yield from do_set_pmd(vmf, at)
                if r == 0:
                    return 1
                mem.put_page(head)
        if pmd_leaf(pool.get(vmf.pmdp)):
            return 0
        mm.pt.pte_alloc(vmf.pmdp)                        # pmd_install(vmf->prealloc_pte)
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    # the folios are looked up (next_uptodate_folio: folio_try_get, trylock, folio->mapping and uptodate
    # re-checked) while the PTE lock is held, so one truncated while this task waited for the lock is
    # skipped, never mapped after its last reference went (5.2 filemap_map_pages: the same checks per page
    # under the PTE lock alloc_set_pte took)
    slots, ok = next_uptodate_folio(inode, mem, first, n)
    mapped = set_pte_range_from_cache(vmf, start, slots) if ok.any() else 0
    sched.spin_unlock(ptl)
    mm.machine.counters["fault_around_mapped"] += mapped
    return mapped


def filemap_page_mkwrite(vmf: VmFault, page: int) -> Gen[int]:
    """ext4_page_mkwrite() / xfs_filemap_page_mkwrite() (filemap_page_mkwrite() shape): the first write to a
    shared page: lock it, check it is still cached below EOF (else VM_FAULT_NOPAGE: the fault is retried),
    allocate its block (a hole becomes DATA), mark it dirty.  0 on success (the kernel's VM_FAULT_LOCKED)."""
    inode: Inode = vmf.vma.vm_file.inode
    mem = vmf.mm.machine.mem
    yield from sched.might_sleep("sb_start_pagefault")
    index = vmf.pgoff
    if index >= inode.nr_pages or inode.i_mapping.find_page(index) != page:
        return int(VM_FAULT.NOPAGE)                      # truncated meanwhile
    if index >= inode.blocks.shape[0] or inode.blocks[index] != DATA:
        inode.set_blocks(index, index + 1, DATA)         # delayed allocation of the hole's block
    mem.flags[page] |= PG.dirty
    vmf.mm.machine.counters["page_mkwrite"] += 1
    return 0


class FilemapVmOps(VmOps):
    """ext4_file_vm_ops / xfs_file_vm_ops: ``fault``, ``map_pages``, ``page_mkwrite``; dirty accounting."""

    name = "file"
    accounts_dirty = True
    fault = staticmethod(filemap_fault)
    map_pages = staticmethod(filemap_map_pages)
    page_mkwrite = staticmethod(filemap_page_mkwrite)


FILEMAP_VM_OPS = FilemapVmOps()


def xfs_truncate_page(inode: Inode, pos: int) -> None:
    """xfs_truncate_page() -> iomap_truncate_page() (fs/xfs/xfs_iomap.c, fs/iomap, 6.12/6.18): zero the block
    tail from ``pos`` through the page cache; a cached folio over a written block there becomes dirty (holes
    and unwritten extents are skipped).  Model: 4 KiB blocks; an uncached EOF page is not read in."""
    mem = inode.machine.mem
    index = pos >> PAGE_SHIFT
    if not pos & (PAGE_SIZE - 1) or index >= inode.blocks.shape[0] or inode.blocks[index] != DATA:
        return
    pfn = inode.i_mapping.find_page(index)
    if pfn < 0:
        return
    from hmmirror.mm.memory import folio_extent

    first, last = folio_extent(mem, inode.i_mapping, index)
    frames = inode.i_mapping.lookup_range(first, last)
    frames = frames[frames >= 0]
    mem.flags[frames] |= np.uint32(PG.dirty)                 # iomap_write_end() -> filemap_dirty_folio()
    mem.zero(pfn, pos & (PAGE_SIZE - 1), PAGE_SIZE)


class PageCacheFs(FileSystemType):
    """ext4 / xfs without DAX: regular files backed by the page cache.

    ``create_file(content="data")`` leaves the written pages in the page cache (clean), as after write(2)
    and writeback, if they fit in half of the free memory (else none is cached: a cold file).  "sparse"
    and "zero" (fallocated, unwritten extents) files start with nothing cached.
    """

    name = "pagecache"

    def new_inode(self, sb: SuperBlock, path: str, size: int, content: str) -> Inode:
        inode = super().new_inode(sb, path, size, content)
        if content == "data":
            mem = self.machine.mem
            n = pages_of(size)
            if 0 < n <= mem.nr_free_pages() // 2:
                if sb.fstype in self.machine.profile.large_folio_fs:
                    cache_written_folios(self.machine, inode, 0, write_folio_orders(0, n))
                else:
                    add_new_cache_pages(mem, inode, np.arange(n, dtype=np.int64), PG.file)
        return inode

    def setattr_size(self, inode: Inode, size: int) -> Gen[int]:
        """``->setattr(ATTR_SIZE)``; xfs_setattr_size() [6.12, 6.18] first zeroes the rest of the new EOF block
        (:func:`xfs_truncate_page`) when shrinking, then truncates the page cache."""
        if inode.sb.fstype == "xfs" and size <= inode.i_size:
            xfs_truncate_page(inode, size)
        return (yield from super().setattr_size(inode, size))

    def mmap(self, file: File, vma: VMA) -> int:
        """generic_file_mmap() / ext4_file_mmap(): page-cache ops."""
        vma.vm_ops = FILEMAP_VM_OPS
        return 0

