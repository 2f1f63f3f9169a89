"""madvise(2) (mm/madvise.c; hugepage_madvise() and madvise_collapse() of mm/huge_memory.c / khugepaged.c).

Per-VMA advice walks the VMAs of the range; holes are skipped and reported as -ENOMEM at the end.  What each
advice does to page tables and notifiers (mm-substrate.md §6):

* ``DONTNEED``: per VMA one CLEAR over its part of the range around the zap; a THP partly covered is split
  (CLEAR [2M), nested); page tables stay.  [5.2] -EINVAL on ``VM_HUGETLB|VM_PFNMAP|VM_LOCKED`` VMAs; [6.18]
  hugetlb allowed (start aligned to the huge page, end rounded down), ``VM_PFNMAP|VM_LOCKED`` -EINVAL.
* ``FREE``: anonymous VMAs only; CLEAR over the VMA's part; exclusive small pages and whole THPs become clean
  and old (lazily freeable), swap entries are dropped.  Without memory pressure nothing is reclaimed (obs A13).
* ``COLD``/``PAGEOUT`` [6.18]: page aging / reclaim hints; the model has no LRU nor swap: no effect (obs A14),
  -EINVAL on ``VM_LOCKED|VM_PFNMAP|VM_HUGETLB``.
* ``HUGEPAGE``/``NOHUGEPAGE``, ``DONTFORK``/``DOFORK``, ``WIPEONFORK``/``KEEPONFORK``, ``DONTDUMP``/``DODUMP``,
  ``NORMAL``/``RANDOM``/``SEQUENTIAL``: VMA flags only (split / merge), no notifier.
* ``WILLNEED``: readahead hint; no effect in the model.
* ``REMOVE``: punches a hole in the shared file (shmem): its pages are unmapped everywhere and freed.
* ``POPULATE_READ``/``POPULATE_WRITE`` [6.18]: faults like GUP over the whole range (not per VMA):
  -ENOMEM at a hole, -EINVAL for an incompatible VMA, -EFAULT when a fault fails (SIGBUS/SIGSEGV).
* ``COLLAPSE`` [6.18]: every 2 MiB block of an anonymous VMA inside the range becomes a new THP (CLEAR [2M)
  around clearing the PMD; the new PMD is installed after the range ends).  File/shmem collapse and
  swap-in during collapse are not modelled (-EINVAL / the block is skipped).

Not modelled (-EINVAL): KSM (``MERGEABLE``), memory-failure injection, ``DONTNEED_LOCKED``, guard regions.
Followed: v5.2 mm/madvise.c (SYSCALL madvise, madvise_vma, madvise_behavior, madvise_dontneed_free,
madvise_free_single_vma, madvise_remove); v6.18 mm/madvise.c (madvise_walk_vmas,
madvise_dontneed_free_valid_vma, madvise_populate), mm/gup.c check_vma_flags and mm/khugepaged.c
(madvise_collapse, hpage_collapse_scan_pmd, collapse_huge_page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    HPAGE_PMD_NR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    non_swap_entry,
    pmd_leaf,
    pte_none,
    pte_to_swp_entry,
    table_id_of,
)
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import pmd_lockptr, pte_lockptr, zap_page_range
from hmmirror.mm.mm_struct import VMA, is_vm_hugetlb_page, vma_is_anonymous
from hmmirror.mm.mmap import page_align, split_range, vma_merge_range
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, ENOMEM, EACCES, EFAULT, EAGAIN, EOPNOTSUPP = 22, 12, 13, 14, 11, 95

#: madvise advice values (include/uapi/asm-generic/mman-common.h), by name.
MADV_VALUES = {
    "NORMAL": 0, "RANDOM": 1, "SEQUENTIAL": 2, "WILLNEED": 3, "DONTNEED": 4, "FREE": 8, "REMOVE": 9,
    "DONTFORK": 10, "DOFORK": 11, "MERGEABLE": 12, "UNMERGEABLE": 13, "HUGEPAGE": 14, "NOHUGEPAGE": 15,
    "DONTDUMP": 16, "DODUMP": 17, "WIPEONFORK": 18, "KEEPONFORK": 19, "COLD": 20, "PAGEOUT": 21,
    "POPULATE_READ": 22, "POPULATE_WRITE": 23, "DONTNEED_LOCKED": 24, "COLLAPSE": 25,
}
MADV_NAMES = {v: k for k, v in MADV_VALUES.items()}
M = MADV_VALUES

VM_SEQ_READ = 0x8000            # include/linux/mm.h (not in include/mm_types.VM: only madvise uses them)
VM_RAND_READ = 0x10000
VM_SPECIAL = VM.IO | VM.DONTEXPAND | VM.PFNMAP | VM.MIXEDMAP

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


# --- deciders ---------------------------------------------------------------------------------------------
def madvise_behavior_valid(profile: Any, behavior: int) -> bool:
    """madvise_behavior_valid(): the advice exists in this kernel (``profile.madvise_advice``)."""
    return MADV_NAMES.get(behavior) in profile.madvise_advice


def madvise_need_mmap_write(behavior: int) -> bool:
    """madvise_need_mmap_write(): VMA flag changes take the mmap lock for write, the rest for read."""
    return behavior not in (M["REMOVE"], M["WILLNEED"], M["DONTNEED"], M["FREE"], M["COLD"], M["PAGEOUT"],
                            M["POPULATE_READ"], M["POPULATE_WRITE"], M["COLLAPSE"])


def can_madv_lru_vma(vma: VMA) -> bool:
    """can_madv_lru_vma() [6.18]: not locked, PFN-mapped or hugetlb."""
    return not vma.vm_flags & (VM.LOCKED | VM.PFNMAP | VM.HUGETLB)


def madvise_dontneed_free_valid_vma(vma: VMA, behavior: int) -> bool:
    """can_madv_dontneed_vma() [5.2] / madvise_dontneed_free_valid_vma() [6.18] (range checks aside)."""
    if is_vm_hugetlb_page(vma):
        return behavior == M["DONTNEED"] and vma.vm_mm.machine.profile.hugetlb_dontneed
    return not vma.vm_flags & (VM.LOCKED | VM.PFNMAP)


def check_vma_flags(vma: VMA, write: bool) -> int:
    """check_vma_flags() (mm/gup.c) for MADV_POPULATE_*: 0, or -EFAULT when GUP may not touch the VMA."""
    f = vma.vm_flags
    if f & (VM.IO | VM.PFNMAP):
        return -EFAULT
    if write:
        if not f & VM.WRITE:
            return -EFAULT
    elif not f & VM.READ:
        return -EFAULT
    return 0


def madvise_new_flags(vma: VMA, behavior: int) -> int:
    """The ``new_flags`` computation of madvise_behavior() / hugepage_madvise(); -EINVAL where refused."""
    f = vma.vm_flags
    if behavior == M["NORMAL"]:
        return f & ~(VM_RAND_READ | VM_SEQ_READ)
    if behavior == M["SEQUENTIAL"]:
        return (f & ~VM_RAND_READ) | VM_SEQ_READ
    if behavior == M["RANDOM"]:
        return (f & ~VM_SEQ_READ) | VM_RAND_READ
    if behavior == M["DONTFORK"]:
        return f | VM.DONTCOPY
    if behavior == M["DOFORK"]:
        return -EINVAL if f & VM.IO else f & ~VM.DONTCOPY
    if behavior == M["WIPEONFORK"]:
        # "MADV_WIPEONFORK is only supported on anonymous memory."
        return -EINVAL if vma.vm_file is not None or f & VM.SHARED else f | VM.WIPEONFORK
    if behavior == M["KEEPONFORK"]:
        return f & ~VM.WIPEONFORK
    if behavior == M["DONTDUMP"]:
        return f | VM.DONTDUMP
    if behavior == M["DODUMP"]:
        return -EINVAL if not is_vm_hugetlb_page(vma) and f & VM_SPECIAL else f & ~VM.DONTDUMP
    if behavior == M["HUGEPAGE"]:
        return (f & ~VM.NOHUGEPAGE) | VM.HUGEPAGE
    if behavior == M["NOHUGEPAGE"]:
        return (f & ~VM.HUGEPAGE) | VM.NOHUGEPAGE
    return -EINVAL


# --- per-VMA advice ---------------------------------------------------------------------------------------
def madvise_behavior(vma: VMA, start: int, end: int, behavior: int) -> Gen[int]:
    """madvise_behavior() / madvise_update_vma(): set VMA flags over ``[start, end)`` (split, then merge)."""
    mm = vma.vm_mm
    new_flags = madvise_new_flags(vma, behavior)
    if new_flags < 0:
        return new_flags
    if new_flags == vma.vm_flags:
        return 0
    ret = yield from split_range(mm, start, end)
    if ret:
        return -EAGAIN if ret == -ENOMEM else ret
    vma = mm.vma_lookup(start)
    assert vma is not None and vma.vm_start == start and vma.vm_end == end
    vma.vm_flags = new_flags                  # vm_page_prot depends on READ/WRITE/EXEC/SHARED only: unchanged
    vma_merge_range(mm, start, end)
    return 0


def madvise_dontneed_free(vma: VMA, start: int, end: int, behavior: int) -> Gen[int]:
    """madvise_dontneed_free(): validity checks, then zap (DONTNEED) or lazy-free (FREE)."""
    if not madvise_dontneed_free_valid_vma(vma, behavior):
        return -EINVAL
    if is_vm_hugetlb_page(vma):
        hsize = PAGE_SIZE << vma.hstate_order
        if start & (hsize - 1):
            return -EINVAL
        end &= ~(hsize - 1)          # "Avoid unexpected data loss by rounding down the number of huge pages"
        if start == end:
            return 0
    if behavior == M["DONTNEED"]:
        yield from zap_page_range(vma, start, end, MMU_NOTIFY.CLEAR)     # madvise_dontneed_single_vma()
        return 0
    return (yield from madvise_free_single_vma(vma, start, end))


def madvise_free_single_vma(vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_free_single_vma(): CLEAR over the range; exclusive anon pages clean and old, swap entries gone.

    Not modelled: splitting a PTE-mapped or partly covered large folio (those pages are left as they are).
    """
    if not vma_is_anonymous(vma):
        return -EINVAL
    mm = vma.vm_mm
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, max(start, vma.vm_start), min(end, vma.vm_end))
    yield from mmu_notifier_invalidate_range_start(r)
    yield from _free_range(vma, r.start, r.end)
    yield from mmu_notifier_invalidate_range_end(r)
    return 0


def _free_range(vma: VMA, start: int, end: int) -> Gen[None]:
    """madvise_free_pte_range() / madvise_free_huge_pmd() over ``[start, end)``."""
    mm = vma.vm_mm
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    clean = np.uint64(~(_PAGE_ACCESSED | _PAGE_DIRTY) & ((1 << 64) - 1))
    addr = start
    while addr < end:
        nxt = x86.PMD_LEVEL.addr_end(addr, end)
        level, p, e = mm.pt.lookup(addr)
        if p is None or level == "pud":                     # hole above the PMD level (or a PUD leaf)
            addr = x86.PUD_LEVEL.addr_end(addr, end)
            continue
        if level == "pmd":                                  # none, huge or a PMD migration entry
            pfn = x86.pte_pfn(e)
            if nxt - addr == PMD_SIZE and pmd_leaf(e) and pfn < mem.nr_pfns and mem.flags[pfn] & PG.anon \
                    and mem.mapcount[pfn] == 1:
                ptl = pmd_lockptr(mm, p)
                yield from sched.spin_lock(ptl)
                if pool.get(p) == e:
                    pool.set(p, e & int(clean))
                sched.spin_unlock(ptl)
            addr = nxt
            continue
        pudp = mm.pt.walk_to_pud(addr)
        assert pudp is not None
        pmdp = mm.pt.pmd_offset(pudp, addr)
        ptl = pte_lockptr(mm, pmdp)
        yield from sched.spin_lock(ptl)
        tid = table_id_of(pool.get(pmdp))
        lo = (addr >> 12) & (PTRS_PER_TABLE - 1)
        hi = lo + ((nxt - addr) >> 12)
        dropped = []
        for i in range(lo, hi):
            pte = int(pool.tables[tid, i])
            if pte_none(pte):
                continue
            if not x86.pte_present(pte):
                s = pte_to_swp_entry(pte)
                if not non_swap_entry(s) or x86.is_hwpoison_entry(s):
                    pool.tables[tid, i] = 0                  # free_swap_and_cache(); the data is discardable
                    dropped.append(s)
                continue
            if x86.pte_special(pte):
                continue
            pfn = x86.pte_pfn(pte)
            if pfn >= mem.nr_pfns or not mem.flags[pfn] & PG.anon or mem.order[pfn] or mem.mapcount[pfn] != 1:
                continue
            pool.tables[tid, i] = np.uint64(pte) & clean
        sched.spin_unlock(ptl)
        for s in dropped:
            machine.swap.release_entry(s)
        yield from sched.preempt_point("madvise_free_pte_range")
        addr = nxt


def _vfs_fallocate(file: Any, mode: int, offset: int, length: int, shmem: bool) -> Gen[int]:
    """vfs_fallocate(): the file's ``fallocate``; -EOPNOTSUPP when it has none.

    Looked up lazily because the filesystems live in fs/: ``hmmirror.fs.super.vfs_fallocate`` or, for shmem,
    ``hmmirror.fs.shmem.shmem_fallocate`` if they exist; else a shmem hole punch is modelled here as
    shmem_fallocate(PUNCH_HOLE) does it: unmap the whole pages (private COW copies kept), then drop them from
    the file (truncate_pagecache_range).
    """
    import importlib

    for mod, name, ok in (("hmmirror.fs.super", "vfs_fallocate", True),
                          ("hmmirror.fs.shmem", "shmem_fallocate", shmem)):
        try:
            fn = getattr(importlib.import_module(mod), name, None) if ok else None
        except ImportError:
            fn = None
        if fn is not None:
            return (yield from fn(file, mode, offset, length))
    if not shmem or getattr(file, "inode", None) is None:
        return -EOPNOTSUPP
    from hmmirror.mm.truncate import truncate_pagecache_range

    yield from truncate_pagecache_range(file.inode, offset, offset + length - 1)
    return 0


def madvise_remove(mm: "MMStruct", vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_remove(): punch a hole in the file (drops the mmap lock around vfs_fallocate())."""
    if vma.vm_flags & VM.LOCKED:
        return -EINVAL
    f = vma.vm_file
    if f is None or getattr(f, "inode", None) is None:
        return -EINVAL
    if (vma.vm_flags & (VM.SHARED | VM.WRITE)) != (VM.SHARED | VM.WRITE):
        return -EACCES
    offset = (start - vma.vm_start) + (vma.vm_pgoff << 12)
    sched.up_read(mm.mmap_sem)
    try:
        shmem = vma.vm_ops is not None and vma.vm_ops.is_shmem
        ret = yield from _vfs_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - start, shmem)
    finally:
        yield from sched.down_read(mm.mmap_sem)
    return ret


def madvise_vma(mm: "MMStruct", vma: VMA, start: int, end: int, behavior: int) -> Gen[int]:
    """madvise_vma() [5.2] / madvise_vma_behavior() [6.18]: dispatch one VMA's part of the range."""
    if behavior == M["REMOVE"]:
        return (yield from madvise_remove(mm, vma, start, end))
    if behavior == M["WILLNEED"]:
        return 0                                             # readahead / swapin: nothing to model
    if behavior == M["PAGEOUT"]:
        return (yield from madvise_pageout(vma, start, end))
    if behavior == M["COLD"]:
        return 0 if can_madv_lru_vma(vma) else -EINVAL       # no LRU: no effect (obs A14)
    if behavior in (M["DONTNEED"], M["FREE"]):
        return (yield from madvise_dontneed_free(vma, start, end, behavior))
    if behavior == M["COLLAPSE"]:
        return (yield from madvise_collapse(vma, start, end))
    return (yield from madvise_behavior(vma, start, end, behavior))


def madvise_pageout(vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_pageout() -> madvise_cold_or_pageout_pte_range() + reclaim_pages() [6.18], for a machine
    without swap (the host): anonymous memory stays; every page-cache folio this VMA maps in the range that
    no other mm maps is unmapped (try_to_unmap) -- a large folio only partly in the range is split first,
    and splitting a file folio unmaps all of it; a clean disk-file folio wholly in the range is then
    dropped from the page cache, dirty and shmem folios stay cached (no writeback from direct reclaim, no
    swap).  Private COW copies (anonymous) stay.  -EINVAL on VM_LOCKED/PFNMAP/HUGETLB VMAs."""
    from hmmirror.mm.memory import folio_extent
    from hmmirror.mm.truncate import split_cache_folio, zap_page_range_single

    if not can_madv_lru_vma(vma):
        return -EINVAL
    if vma_is_anonymous(vma) or vma.vm_file is None or vma.vm_ops is None:
        return (yield from _pageout_anon(vma, start, end))  # no swap: anonymous folios are kept
    mm = vma.vm_mm
    mem = mm.machine.mem
    inode = vma.vm_file.inode
    mapping = getattr(inode, "i_mapping", None)
    if mapping is None:
        return 0                                             # device-dax: no page cache, nothing to reclaim
    folios: dict[tuple[int, int], bool] = {}                # (first, end) slot range -> wholly in range
    for addr in range(start, end, PAGE_SIZE):
        level, p, e = mm.pt.lookup(addr)
        if p is None or pte_none(e) or not x86.pte_present(e) and not (level != "pte" and e & x86._PAGE_PSE):
            continue
        off = (addr & (PMD_SIZE - 1)) >> 12 if level == "pmd" else 0
        pfn = x86.pte_pfn(e) + off
        index = vma.linear_page_index(addr)
        if pfn >= mem.nr_ram or mem.flags[pfn] & PG.anon or mapping.find_page(index) != pfn:
            continue                                         # a COW copy, the zero page, not this file's
        first, last = folio_extent(mem, mapping, index)
        if (first, last) in folios:
            continue
        slots = mapping.lookup_range(first, last)
        frames = slots[slots >= 0]
        if (mem.mapcount[frames] > 1).any():
            continue                                         # folio_maybe_mapped_shared(): leave it alone
        a0 = vma.vm_start + ((first - vma.vm_pgoff) << PAGE_SHIFT)
        folios[(first, last)] = a0 >= start and a0 + ((last - first) << PAGE_SHIFT) <= end
    for (first, last), whole in folios.items():
        a0 = max(vma.vm_start + ((first - vma.vm_pgoff) << PAGE_SHIFT), vma.vm_start)
        a1 = min(vma.vm_start + ((last - vma.vm_pgoff) << PAGE_SHIFT), vma.vm_end)
        if not whole and not vma.vm_ops.is_shmem:
            slots = mapping.lookup_range(first, last)
            if (mem.flags[slots[slots >= 0]] & PG.dirty).any():
                continue                                     # split_folio() fails on a dirty file folio
        yield from zap_page_range_single(vma, a0, a1 - a0, even_cows=False)     # try_to_unmap()
        if not whole:
            split_cache_folio(mapping, first, last, [0] * (last - first))   # split_folio(): order 0, cached
            continue
        slots = mapping.lookup_range(first, last)
        frames = slots[slots >= 0]
        if vma.vm_ops.is_shmem or (mem.flags[frames] & PG.dirty).any() or (mem.mapcount[frames] > 0).any():
            continue                                         # kept: no swap / no writeback here / still mapped
        mapping.delete_range(mem, first, last)               # __remove_mapping(): reclaimed
        mm.machine.counters["pgsteal_file"] += int(frames.size)
    return 0


def _pageout_anon(vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_cold_or_pageout_pte_range() on anonymous memory without swap: nothing is reclaimed, but a THP
    only partly inside the range is split first (split_folio(); 6.12.118/6.18.44: remap_page() with
    RMP_USE_SHARED_ZEROPAGE maps every zero-filled subpage to the shared zero page and frees it)."""
    from hmmirror.mm.huge_memory import split_folio

    mm = vma.vm_mm
    machine = mm.machine
    mem, pool = machine.mem, machine.pool
    a = start & ~(PMD_SIZE - 1)
    while a < end:
        level, p, e = mm.pt.lookup(a)
        blk = (a, a + PMD_SIZE)
        a += PMD_SIZE
        if blk[0] >= start and blk[1] <= end:
            continue                                         # wholly inside: kept whole (no swap)
        if level == "pte" and p is not None:
            # a PTE-mapped THP (after a PMD split) partly inside the range: split_folio() too
            lo, hi = max(blk[0], start, vma.vm_start), min(blk[1], end, vma.vm_end)
            heads = set()
            for va in range(lo, hi, PAGE_SIZE):
                _l, _p, pte = mm.pt.lookup(va)
                if _p is None or pte_none(pte) or not x86.pte_present(pte) or x86.pte_special(pte):
                    continue
                pfn = x86.pte_pfn(pte)
                if pfn < mem.nr_ram and mem.flags[pfn] & PG.anon and int(mem.order[mem.compound_head(pfn)]) == 9:
                    heads.add(mem.compound_head(pfn))
            for head in sorted(heads):
                if (mem.mapcount[head: head + HPAGE_PMD_NR] > 1).any():
                    continue
                if (yield from split_folio(machine, head, caller_refs=0)) != 0:
                    continue
                if machine.profile.thp_split_zero_subpages and not vma.vm_flags & VM.LOCKED:
                    _remap_zero_subpages(vma, blk[0], head)
            continue
        if level != "pmd" or p is None or not pmd_leaf(e) or not x86.pmd_present(e):
            continue
        head = x86.pte_pfn(e)
        if head >= mem.nr_ram or not mem.flags[head] & PG.anon or mem.is_huge_zero_pfn(head):
            continue
        if (mem.mapcount[head: head + HPAGE_PMD_NR] > 1).any():
            continue                                         # folio_maybe_mapped_shared()
        if (yield from split_folio(machine, head, caller_refs=0)) != 0:
            continue
        if machine.profile.thp_split_zero_subpages and not vma.vm_flags & VM.LOCKED:
            _remap_zero_subpages(vma, blk[0], head)
    return 0


def _remap_zero_subpages(vma: VMA, haddr: int, head: int) -> None:
    """try_to_map_unused_to_zeropage() for each subpage of a just split anonymous THP mapped at ``haddr``:
    a zero-filled subpage is replaced by the shared zero page (special, read-only PTE) and freed."""
    mm = vma.vm_mm
    mem, pool = mm.machine.mem, mm.machine.pool
    pudp = mm.pt.walk_to_pud(haddr)
    if pudp is None:
        return
    pmd = pool.get(mm.pt.pmd_offset(pudp, haddr))
    if pte_none(pmd) or pmd_leaf(pmd):
        return
    tid = table_id_of(pmd)
    zero = x86.pfn_pte(mem.zero_pfn, vma.vm_page_prot & ~x86._PAGE_RW) | x86._PAGE_SPECIAL
    for i in range(HPAGE_PMD_NR):
        pte = int(pool.tables[tid, i])
        pfn = head + i
        if pte_none(pte) or not x86.pte_present(pte) or x86.pte_pfn(pte) != pfn:
            continue
        data = mem.contents.get(pfn)
        if data is not None and any(data):
            continue
        if int(mem.refcount[pfn]) != 1 or int(mem.mapcount[pfn]) != 1:
            continue
        pool.tables[tid, i] = np.uint64(x86.pte_mkyoung(zero))
        mem.mapcount[pfn] = 0
        mem.put_page(pfn)
        mm.machine.counters["thp_split_zero_remapped"] += 1


# --- whole-range advice -----------------------------------------------------------------------------------
def madvise_populate(mm: "MMStruct", start: int, end: int, behavior: int) -> Gen[int]:
    """madvise_populate() [6.18]: fault the range in (write faults for POPULATE_WRITE), VMA after VMA."""
    from hmmirror.mm.gup import populate_vma_page_range

    write = behavior == M["POPULATE_WRITE"]
    while start < end:
        vma = mm.vma_lookup(start)
        if vma is None:
            return -ENOMEM                                   # "No VMA or out of memory."
        if check_vma_flags(vma, write):
            return -EINVAL                                   # "Incompatible mappings / permissions."
        e = min(end, vma.vm_end)
        ret = yield from populate_vma_page_range(vma, start, e, write)
        if ret < 0:
            return -ENOMEM if ret == -ENOMEM else -EFAULT
        start = e
    return 0


# --- MADV_COLLAPSE [6.18] (mm/khugepaged.c) -----------------------------------------------------------------
SCAN_SUCCEED, SCAN_PMD_NULL, SCAN_PMD_MAPPED, SCAN_PTE_NON_PRESENT, SCAN_PAGE_NULL, SCAN_PAGE_COUNT = range(6)
SCAN_PAGE_RO, SCAN_PAGE_ANON, SCAN_ALLOC_HUGE_PAGE_FAIL, SCAN_VMA_CHECK = range(6, 10)
_SCAN_CONTINUE = (SCAN_PMD_NULL, SCAN_PTE_NON_PRESENT, SCAN_PAGE_NULL, SCAN_PAGE_COUNT)


def madvise_collapse_errno(r: int) -> int:
    """madvise_collapse_errno(): -ENOMEM without a huge page, -EAGAIN for transient page states, else -EINVAL."""
    if r == SCAN_ALLOC_HUGE_PAGE_FAIL:
        return -ENOMEM
    if r == SCAN_PAGE_COUNT:
        return -EAGAIN
    return -EINVAL


def collapse_allowed(vma: VMA) -> bool:
    """thp_vma_allowable_order(TVA_FORCED_COLLAPSE, PMD_ORDER) for the model's anonymous VMAs: sysfs
    ``enabled`` is ignored; VM_NOHUGEPAGE, special and hugetlb VMAs refuse; one aligned 2 MiB block must fit.
    File and shmem collapse are not modelled."""
    if not vma_is_anonymous(vma) or vma.vm_flags & (VM.NOHUGEPAGE | VM_SPECIAL | VM.HUGETLB):
        return False
    return ((vma.vm_start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)) + PMD_SIZE <= vma.vm_end


def _collapse_scan(vma: VMA, addr: int) -> int:
    """hpage_collapse_scan_pmd() for MADV_COLLAPSE (no khugepaged limits): may the block at ``addr``
    collapse?  ``SCAN_SUCCEED`` or the reason it may not."""
    mm = vma.vm_mm
    mem, pool = mm.machine.mem, mm.machine.pool
    level, p, e = mm.pt.lookup(addr)
    if p is None or level == "pud" or (level == "pmd" and (pte_none(e) or not x86.pmd_present(e))):
        return SCAN_PMD_NULL
    if level == "pmd":
        return SCAN_PMD_MAPPED                                # a THP or the huge zero page already
    pudp = mm.pt.walk_to_pud(addr)
    assert pudp is not None
    tid = table_id_of(pool.get(mm.pt.pmd_offset(pudp, addr)))
    writable = False
    for pte in pool.tables[tid].tolist():
        if pte_none(pte):
            continue
        if not x86.pte_present(pte):
            return SCAN_PTE_NON_PRESENT                       # model: no swap-in during collapse
        pfn = x86.pte_pfn(pte)
        if mem.is_zero_pfn(pfn):
            continue
        if x86.pte_special(pte) or pfn >= mem.nr_ram:
            return SCAN_PAGE_NULL
        if not mem.flags[pfn] & PG.anon:
            return SCAN_PAGE_ANON
        head = mem.compound_head(pfn)
        n = 1 << int(mem.order[head])
        if int(mem.refcount[head]) != int(mem.mapcount[head: head + n].sum()):
            return SCAN_PAGE_COUNT                            # is_refcount_suitable(): extra pins
        writable |= x86.pte_write(pte)
    if not writable and mm.machine.profile.collapse_needs_writable:
        return SCAN_PAGE_RO                                   # [6.12]; dropped in 6.18 (Dev Jain, 2025)
    return SCAN_SUCCEED


def collapse_huge_page(mm: "MMStruct", addr: int) -> Gen[int]:
    """collapse_huge_page() (mm/khugepaged.c): a new THP replaces the PTE table of ``[addr, addr+2M)``.

    Entered with the mmap lock held for read, drops it and takes it for write (revalidating the VMA), and
    returns with it held for read again.  The PMD is cleared under CLEAR [2M); after the range ends the data
    is copied (holes and zero pages become zeroes), the old pages are released and the new PMD installed.
    """
    from hmmirror.mm.huge_memory import mk_huge_pmd
    from hmmirror.mm.memory import maybe_mkwrite, release_entries
    from hmmirror.mm import rmap

    machine = mm.machine
    mem, pool = machine.mem, machine.pool
    yield from sched.might_sleep("alloc_charge_folio")
    new = mem.alloc_folio(9)
    if new < 0:
        return SCAN_ALLOC_HUGE_PAGE_FAIL
    sched.up_read(mm.mmap_sem)
    yield from sched.down_write(mm.mmap_sem)
    try:
        vma = mm.vma_lookup(addr)                             # hugepage_vma_revalidate()
        if vma is None or vma.vm_end < addr + PMD_SIZE or not collapse_allowed(vma):
            mem.put_page(new)
            return SCAN_VMA_CHECK
        if not vma.anon_vma:                                  # expect_anon: no anon_vma yet (only zero pages)
            mem.put_page(new)
            return SCAN_PAGE_ANON
        result = _collapse_scan(vma, addr)
        if result != SCAN_SUCCEED:
            mem.put_page(new)
            return result
        pudp = mm.pt.walk_to_pud(addr)
        assert pudp is not None
        pmdp = mm.pt.pmd_offset(pudp, addr)
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + PMD_SIZE)
        yield from mmu_notifier_invalidate_range_start(r)
        ptl = pmd_lockptr(mm, pmdp)
        yield from sched.spin_lock(ptl)
        tid = table_id_of(pool.get(pmdp))
        pool.set(pmdp, 0)                                     # pmdp_collapse_flush()
        ents = pool.tables[tid].copy()
        for i, pte in enumerate(ents.tolist()):               # __collapse_huge_page_copy() (model: copied
            if not pte_none(pte) and x86.pte_present(pte) and not x86.pte_special(pte):   # and released under
                mem.copy(new + i, x86.pte_pfn(pte))           # the lock, so counts never lag the tables)
        pool.tables[tid] = 0
        release_entries(machine, ents, pte_level=True)
        pool.free(tid)
        sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
        entry = maybe_mkwrite(x86.pte_mkdirty(mk_huge_pmd(new, vma.vm_page_prot)), vma)
        yield from sched.spin_lock(ptl)
        rmap.page_add_new_anon_rmap(mem, new, HPAGE_PMD_NR)
        pool.set(pmdp, entry)
        sched.spin_unlock(ptl)
        machine.counters["thp_collapse_alloc"] += 1
        return SCAN_SUCCEED
    finally:
        sched.up_write(mm.mmap_sem)
        yield from sched.down_read(mm.mmap_sem)


def madvise_collapse(vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_collapse() (mm/khugepaged.c) [6.18]: collapse every 2 MiB block of ``[start, end)`` into a new
    THP (obs T7/T11: PMD again, new pfns, holes filled), regardless of MADV_HUGEPAGE and sysfs ``enabled``.

    0 when every block ends up PMD-mapped; else the errno of the last failure.  Anonymous VMAs only.
    """
    mm = vma.vm_mm
    if vma.vm_ops is not None and vma.vm_ops.is_shmem and vma.vm_file is not None:
        return (yield from madvise_collapse_shmem(vma, start, end))
    if not collapse_allowed(vma):
        return -EINVAL
    hstart = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    hend = end & ~(PMD_SIZE - 1)
    thps, last_fail = 0, SCAN_SUCCEED
    for addr in range(hstart, hend, PMD_SIZE):
        cur = mm.vma_lookup(addr)
        if cur is None or not collapse_allowed(cur):
            last_fail = SCAN_VMA_CHECK
            break
        result = _collapse_scan(cur, addr)
        if result == SCAN_SUCCEED:
            result = yield from collapse_huge_page(mm, addr)
        if result in (SCAN_SUCCEED, SCAN_PMD_MAPPED):
            thps += 1
        else:
            last_fail = result
            if result not in _SCAN_CONTINUE or (result == SCAN_PMD_NULL
                                                and not mm.machine.profile.collapse_pmd_null_continues):
                break                                         # 6.18.44: an empty block ends the walk
    return 0 if thps == (hend - hstart) // PMD_SIZE else madvise_collapse_errno(last_fail)


def shmem_collapse_allowed(vma: VMA, addr: int) -> bool:
    """thp_vma_allowable_order(TVA_FORCED_COLLAPSE) for shmem: the huge= policy and shmem_enabled are
    ignored for MADV_COLLAPSE (6.18.44: a tmpfs mounted huge=never collapses); VM_NOHUGEPAGE refuses; the
    block must lie in the VMA with VA and file offset congruent modulo 2 MiB."""
    from hmmirror.mm.memory import transhuge_vma_suitable

    return not vma.vm_flags & (VM.NOHUGEPAGE | VM_SPECIAL) and transhuge_vma_suitable(vma, addr)


def collapse_file_shmem(vma: VMA, addr: int) -> Gen[int]:
    """collapse_file() + collapse_pte_mapped_thp(install_pmd) (mm/khugepaged.c) for the shmem block at
    ``addr``: a new 2 MiB folio replaces the block's small pages in the page cache (their data copied, holes
    zero-filled), every mapping of the old pages is removed, the emptied PTE tables are retracted and the
    caller's block is mapped by one PMD.  A block already cached as one folio is only mapped."""
    from hmmirror.mm import rmap
    from hmmirror.arch.x86.pgtable import pfn_pte
    from hmmirror.mm.memory import pmd_lockptr
    from hmmirror.mm.truncate import unmap_mapping_pages

    mm = vma.vm_mm
    machine = mm.machine
    mem, pool = machine.mem, machine.pool
    inode = vma.vm_file.inode
    mapping = inode.i_mapping
    hindex = vma.linear_page_index(addr)
    cur = mapping.find_page(hindex)
    if mapping.range_empty(hindex, hindex + HPAGE_PMD_NR):
        return SCAN_VMA_CHECK                                 # 6.18.44: nothing cached: -EINVAL, nothing done
    if not (cur >= 0 and int(mem.order[mem.compound_head(cur)]) == 9 and mem.compound_head(cur) == cur):
        yield from sched.might_sleep("alloc_charge_folio")
        new = mem.alloc_folio(9)
        if new < 0:
            return SCAN_ALLOC_HUGE_PAGE_FAIL
        yield from unmap_mapping_pages(mapping, hindex, HPAGE_PMD_NR, False)
        old = mapping.lookup_range(hindex, hindex + HPAGE_PMD_NR)
        if (old >= 0).any() and (mem.mapcount[old[old >= 0]] > 0).any():
            mem.put_page(new)
            return SCAN_PAGE_COUNT                            # still mapped (e.g. pinned): try again later
        for i in np.flatnonzero(old >= 0).tolist():
            mem.copy(new + i, int(old[i]))
        mapping.delete_range(mem, hindex, hindex + HPAGE_PMD_NR)
        mapping.add_to_page_cache(hindex, new, HPAGE_PMD_NR)
        mem.flags[new: new + HPAGE_PMD_NR] |= np.uint32(PG.swapbacked | PG.uptodate | PG.dirty)
        machine.counters["thp_collapse_alloc"] += 1
        cur = new
    # retract_page_tables(): every VMA mapping the block whole keeps no empty PTE table there
    for v in list(inode.i_mmap):
        a = v.vm_start + ((hindex - v.vm_pgoff) << PAGE_SHIFT)
        if a < v.vm_start or a + PMD_SIZE > v.vm_end or a & (PMD_SIZE - 1):
            continue
        pudp = v.vm_mm.pt.walk_to_pud(a)
        if pudp is None:
            continue
        pmdp = v.vm_mm.pt.pmd_offset(pudp, a)
        pmd = pool.get(pmdp)
        if pte_none(pmd) or pmd_leaf(pmd):
            continue
        tid = table_id_of(pmd)
        if not (pool.tables[tid] & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)).any():
            pool.set(pmdp, 0)
            pool.free(tid)
    # collapse_pte_mapped_thp(install_pmd=true) in the caller
    pudp = mm.pt.walk_to_pud(addr, alloc=True)
    assert pudp is not None
    pmdp = mm.pt.pmd_alloc(pudp, addr)
    ptl = pmd_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    if pte_none(pool.get(pmdp)):
        mem.get_page(cur)
        rmap.page_add_rmap(mem, cur, HPAGE_PMD_NR)
        pool.set(pmdp, x86.pte_mkyoung(pfn_pte(cur, vma.vm_page_prot) | x86._PAGE_PSE))
    sched.spin_unlock(ptl)
    return SCAN_SUCCEED


def madvise_collapse_shmem(vma: VMA, start: int, end: int) -> Gen[int]:
    """madvise_collapse() for a shmem VMA [6.18]: every 2 MiB block of the range becomes one PMD-mapped
    shmem THP (hpage_collapse_scan_file + collapse_file), whatever shmem_enabled or huge= say."""
    mm = vma.vm_mm
    hstart = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    hend = end & ~(PMD_SIZE - 1)
    if hstart >= hend or not shmem_collapse_allowed(vma, hstart):
        return -EINVAL
    thps, last_fail = 0, SCAN_SUCCEED
    for addr in range(hstart, hend, PMD_SIZE):
        cur = mm.vma_lookup(addr)
        if cur is None or not shmem_collapse_allowed(cur, addr) or cur.vm_file is not vma.vm_file:
            last_fail = SCAN_VMA_CHECK
            break
        level, p, e = mm.pt.lookup(addr)
        if level == "pmd" and p is not None and pmd_leaf(e):
            thps += 1
            continue
        result = yield from collapse_file_shmem(cur, addr)
        if result == SCAN_SUCCEED:
            thps += 1
        else:
            last_fail = result
    return 0 if thps == (hend - hstart) // PMD_SIZE else madvise_collapse_errno(last_fail)


def do_madvise(mm: "MMStruct", start: int, len_in: int, behavior: int) -> Gen[int]:
    """do_madvise() (mm/madvise.c): 0 or -errno.

    -EINVAL for unknown advice, an unaligned ``start`` or a wrapping range; -ENOMEM when the range covers an
    unmapped hole (the mapped parts are still advised); per-VMA errors stop the walk.
    """
    profile = mm.machine.profile
    if not madvise_behavior_valid(profile, behavior):
        return -EINVAL
    if start & (PAGE_SIZE - 1) or len_in < 0:
        return -EINVAL
    length = page_align(len_in)
    end = start + length
    if end > (1 << 64) - 1:
        return -EINVAL
    if end == start:
        return 0
    write = madvise_need_mmap_write(behavior)
    lock = sched.down_write if write else sched.down_read
    yield from lock(mm.mmap_sem)
    try:
        if behavior in (M["POPULATE_READ"], M["POPULATE_WRITE"]):
            ret = yield from madvise_populate(mm, start, end, behavior)
        else:
            ret = yield from madvise_walk_vmas(mm, start, end, behavior)
    finally:
        (sched.up_write if write else sched.up_read)(mm.mmap_sem)
    mm.machine.log("madvise", mm=mm.name, start=start, end=end, advice=MADV_NAMES.get(behavior, behavior), ret=ret)
    return ret


def madvise_walk_vmas(mm: "MMStruct", start: int, end: int, behavior: int) -> Gen[int]:
    """madvise_walk_vmas() [6.18] / the loop of sys_madvise [5.2]: holes are skipped, -ENOMEM at the end."""
    unmapped_error = 0
    vma = mm.find_vma(start)
    while True:
        if vma is None:
            return -ENOMEM
        if start < vma.vm_start:
            unmapped_error = -ENOMEM
            start = vma.vm_start
            if start >= end:
                break
        tmp = min(vma.vm_end, end)
        ret = yield from madvise_vma(mm, vma, start, tmp, behavior)
        if ret:
            return ret
        cur = mm.vma_lookup(tmp - 1)                         # after a merge the VMA may reach beyond tmp
        if cur is not None and cur.vm_end > tmp:
            tmp = cur.vm_end
        start = tmp
        if start >= end:
            break
        vma = mm.find_vma(start)
    return unmapped_error

