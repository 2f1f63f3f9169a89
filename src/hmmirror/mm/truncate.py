"""Unmapping a file range from every mapping, and truncating the page cache (mm/memory.c
unmap_mapping_range/unmap_mapping_pages, mm/truncate.c).

``unmap_mapping_range`` visits every VMA of the file whose offset range meets the hole and zaps that part
under one notifier CLEAR per VMA (zap_page_range_single), in file-offset order, holding ``i_mmap_rwsem``
(read [6.x], write [5.2]).  With ``even_cows`` false, private anonymous copies (COW pages and their swap entries) are kept, as
``details->check_mapping`` does; hugetlb VMAs are always zapped whole (hugetlb ignores the details).

Used by truncate(2) (twice, as truncate_pagecache does: once before and once after dropping the page cache),
hole punching, fsdax (writes into holes) and device-dax unbind.  ``mapping`` may be an
:class:`~hmmirror.fs.file.AddressSpace`, an :class:`~hmmirror.fs.file.Inode`, or any object with an
``i_mmap`` list (a driver's device inode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    MAX_SWAPFILES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    PUD_SIZE,
    SWP_TYPE_SHIFT,
    pmd_leaf,
    pte_none,
    pud_leaf,
    table_id_of,
)
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.memory import pte_lockptr, release_entries, unmap_page_range
from hmmirror.mm.mm_struct import is_vm_hugetlb_page
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.fs.file import AddressSpace, Inode
    from hmmirror.mm.mm_struct import VMA

ULONG_MAX = (1 << 64) - 1


def _i_mmap(mapping: Any) -> tuple[list["VMA"], Lock | None]:
    """The VMA list and the i_mmap rwsem of ``mapping`` (AddressSpace, Inode or any object with i_mmap)."""
    if hasattr(mapping, "i_mapping") and hasattr(mapping.i_mapping, "i_mmap_rwsem"):
        mapping = mapping.i_mapping
    vmas = getattr(mapping, "i_mmap", None)
    if vmas is None and hasattr(mapping, "host"):
        vmas = mapping.host.i_mmap
    return (list(vmas or []), getattr(mapping, "i_mmap_rwsem", None))


# --- zapping one VMA's range ----------------------------------------------------------------------------
def _zap_pte_range_keep_cows(vma: "VMA", pmdp: Ptr, addr: int, end: int, folio: Any = None) -> Gen[None]:
    """zap_pte_range() with ``details->check_mapping``: clear every entry of ``[addr, end)`` except private
    anonymous pages and genuine swap entries (the COWed copies).  ``folio`` (an array of its pfns):
    ``details->single_folio``, only present entries mapping that folio are cleared."""
    mm = vma.vm_mm
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    tid = table_id_of(pool.get(pmdp))
    lo = (addr >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1)
    hi = lo + ((end - addr) >> PAGE_SHIFT)
    ents = pool.tables[tid, lo:hi].copy()
    notnone = (ents & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)) != 0
    present = (ents & np.uint64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE)) != 0
    pfns = ((ents & np.uint64(x86.PTE_PFN_MASK)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    inside = present & (pfns < mem.nr_pfns)
    anon = np.zeros(ents.shape, dtype=bool)
    anon[inside] = (mem.flags[pfns[inside]] & PG.anon) != 0
    swap = notnone & ~present & ((ents >> np.uint64(SWP_TYPE_SHIFT)) < np.uint64(MAX_SWAPFILES))
    zap = notnone & ~anon & ~swap
    if folio is not None:
        zap &= inside & np.isin(pfns, folio)
    if zap.any():
        pool.tables[tid, lo + np.flatnonzero(zap)] = 0
    sched.spin_unlock(ptl)
    if zap.any():
        release_entries(machine, ents[zap], pte_level=True)


def _unmap_range_keep_cows(vma: "VMA", start: int, end: int, folio: Any = None) -> Gen[None]:
    """unmap_page_range() with ``details->check_mapping`` (even_cows false); ``folio``: only the leaves
    mapping that folio (``details->single_folio``; a huge leaf of another frame is left alone)."""
    from hmmirror.mm import huge_memory

    mm = vma.vm_mm
    pool = mm.machine.pool
    for p4dp, a, nxt in mm.pt.p4d_range(start, end):
        addr = a
        while addr < nxt:
            pud_end = x86.PUD_LEVEL.addr_end(addr, nxt)
            pudp = mm.pt.pud_offset(p4dp, addr)
            pud = pool.get(pudp)
            if not pte_none(pud):
                if pud_leaf(pud) and folio is not None and not _leaf_maps(pud, folio):
                    pass
                elif pud_leaf(pud):
                    if pud_end - addr == PUD_SIZE:
                        yield from huge_memory.zap_huge_pud(vma, pudp, addr)
                    else:
                        yield from huge_memory.__split_huge_pud(vma, pudp, addr)
                else:
                    b = addr
                    while b < pud_end:
                        pmd_end = x86.PMD_LEVEL.addr_end(b, pud_end)
                        pmdp = mm.pt.pmd_offset(pudp, b)
                        pmd = pool.get(pmdp)
                        if not pte_none(pmd) and folio is not None and (pmd_leaf(pmd) or not pmd & x86._PAGE_PRESENT) \
                                and not _leaf_maps(pmd, folio):
                            pass                                  # not the folio (or a non-present huge entry)
                        elif not pte_none(pmd):
                            if pmd_leaf(pmd) or not pmd & x86._PAGE_PRESENT:
                                if pmd_end - b == PMD_SIZE:
                                    if (yield from huge_memory.zap_huge_pmd(vma, pmdp, b)):
                                        b = pmd_end
                                        continue
                                else:
                                    yield from huge_memory.__split_huge_pmd(vma, pmdp, b)
                                pmd = pool.get(pmdp)
                            if not pte_none(pmd) and not pmd_leaf(pmd) and pmd & x86._PAGE_PRESENT:
                                yield from _zap_pte_range_keep_cows(vma, pmdp, b, pmd_end, folio)
                        yield from sched.preempt_point("zap_pmd_range")
                        b = pmd_end
            addr = pud_end


def _leaf_maps(leaf: int, folio: Any) -> bool:
    """Our helper: does the present huge leaf ``leaf`` map a frame of ``folio`` (an array of pfns)?"""
    if not leaf & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE):
        return False
    pfn = (leaf & x86.PTE_PFN_MASK) >> PAGE_SHIFT
    return bool(np.isin(np.arange(pfn, pfn + 512, dtype=np.int64), folio).any())


def zap_page_range_single(vma: "VMA", address: int, size: int, even_cows: bool = True) -> Gen[None]:
    """zap_page_range_single() (mm/memory.c): notifier CLEAR over ``[address, address+size)`` of this VMA
    around the zap (unmap_single_vma; hugetlb VMAs are zapped whole whatever the details)."""
    end = address + size
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, vma.vm_mm, address, end)
    yield from mmu_notifier_invalidate_range_start(r)
    if even_cows or is_vm_hugetlb_page(vma):
        yield from unmap_page_range(vma, address, end)
    else:
        yield from _unmap_range_keep_cows(vma, address, end)
    yield from mmu_notifier_invalidate_range_end(r)


def unmap_mapping_range_tree(vmas: list["VMA"], first_index: int, last_index: int, even_cows: bool) -> Gen[None]:
    """unmap_mapping_range_tree(): every VMA whose file pages meet ``[first_index, last_index]`` (in
    vm_pgoff order, as the interval tree visits them) has that part zapped."""
    for vma in sorted(vmas, key=lambda v: v.vm_pgoff):
        vba = vma.vm_pgoff
        vea = vba + ((vma.vm_end - vma.vm_start) >> PAGE_SHIFT) - 1
        if vea < first_index or vba > last_index:
            continue
        zba = max(first_index, vba)
        zea = min(last_index, vea)
        start = ((zba - vba) << PAGE_SHIFT) + vma.vm_start
        end = ((zea - vba + 1) << PAGE_SHIFT) + vma.vm_start
        yield from zap_page_range_single(vma, start, end - start, even_cows)


def _walk_shared(mapping: Any, vmas: list["VMA"]) -> bool:
    """``profile.i_mmap_walk_shared`` of the machine ``mapping`` belongs to (True when it cannot be told)."""
    host = getattr(mapping, "host", mapping)
    machine = getattr(host, "machine", None)
    if machine is None and vmas:
        machine = vmas[0].vm_mm.machine
    return True if machine is None else bool(machine.profile.i_mmap_walk_shared)


def unmap_mapping_pages(mapping: Any, start: int, nr: int, even_cows: bool) -> Gen[None]:
    """unmap_mapping_pages() (mm/memory.c): unmap file pages ``[start, start+nr)`` (``nr`` 0: to the end)
    from every mapping; ``even_cows`` also removes private COW copies.  Holds i_mmap_rwsem across the whole
    walk: for read [6.x] (i_mmap_lock_read), for write [5.2] (``profile.i_mmap_walk_shared``).  The VMA list
    is read once under it: whoever changes i_mmap (vma_prepare in a split or merge, vma_link_file, unlink_file_vma)
    takes the rwsem for write, so it cannot change during the walk."""
    first = start
    last = start + nr - 1
    if last < first:
        last = ULONG_MAX
    vmas, lock = _i_mmap(mapping)
    shared = _walk_shared(mapping, vmas)
    if lock is not None:
        yield from (sched.down_read(lock) if shared else sched.down_write(lock))
        vmas, _ = _i_mmap(mapping)                       # the tree as it stands once the rwsem is held
    if vmas:
        yield from unmap_mapping_range_tree(vmas, first, last, even_cows)
    if lock is not None:
        (sched.up_read if shared else sched.up_write)(lock)


def unmap_mapping_range(mapping: Any, holebegin: int, holelen: int, even_cows: bool) -> Gen[None]:
    """unmap_mapping_range() (mm/memory.c): byte range ``[holebegin, holebegin+holelen)`` (``holelen`` 0:
    to the end of the file) rounded out to pages."""
    hba = holebegin >> PAGE_SHIFT
    hlen = (holelen + PAGE_SIZE - 1) >> PAGE_SHIFT
    yield from unmap_mapping_pages(mapping, hba, hlen, even_cows)


def unmap_mapping_folio(mapping: Any, first: int, end: int, folio: Any) -> Gen[None]:
    """unmap_mapping_folio() (mm/memory.c; 5.2: truncate_cleanup_page -> unmap_mapping_pages): the locked
    page-cache folio in slots ``[first, end)`` (its pfns ``folio``) is unmapped from every mapping of the file
    under ``i_mmap_rwsem`` (read [6.x]; [5.2] unmap_mapping_pages: write) -- ``details.single_folio``: only
    entries mapping it; private COW copies (``even_cows`` false) stay."""
    vmas, lock = _i_mmap(mapping)
    shared = _walk_shared(mapping, vmas)
    if lock is not None:
        yield from (sched.down_read(lock) if shared else sched.down_write(lock))
        vmas, _ = _i_mmap(mapping)                       # the tree as it stands once the rwsem is held
    for vma in sorted(vmas, key=lambda v: v.vm_pgoff):
        vba = vma.vm_pgoff
        vea = vba + ((vma.vm_end - vma.vm_start) >> PAGE_SHIFT) - 1
        if vea < first or vba > end - 1:
            continue
        start = ((max(first, vba) - vba) << PAGE_SHIFT) + vma.vm_start
        stop = ((min(end - 1, vea) - vba + 1) << PAGE_SHIFT) + vma.vm_start
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, vma.vm_mm, start, stop)
        yield from mmu_notifier_invalidate_range_start(r)
        yield from _unmap_range_keep_cows(vma, start, stop, folio)
        yield from mmu_notifier_invalidate_range_end(r)
    if lock is not None:
        (sched.up_read if shared else sched.up_write)(lock)


def _folios_to_clean(mapping: "AddressSpace", start: int, end: int) -> list[tuple[int, int]]:
    """Our helper: the slot spans ``[first, last)`` of the cached folios with a slot in ``[start, end)`` that
    truncation cannot simply drop: still mapped, or locked by another task.  Vectorised; usually empty."""
    from hmmirror.mm.memory import folio_extent

    mem = mapping.host.machine.mem
    hi = min(end, mapping.pages.shape[0])
    if hi <= start:
        return []
    sl = mapping.pages[start:hi]
    where = np.flatnonzero(sl >= 0)
    if not where.size:
        return []
    pf = sl[where]
    order = mem.order[pf].astype(np.int64)
    big = order > 0
    heads = pf & ~((np.int64(1) << order) - 1)
    busy = (mem.mapcount[pf] > 0) | ((mem.flags[heads] & PG.locked) != 0)
    if not busy.any():
        # a compound folio reaching past the range may be mapped through its other frames
        if not any((mem.mapcount[h: h + (1 << int(mem.order[h]))] > 0).any() for h in np.unique(heads[big]).tolist()):
            return []
    out: list[tuple[int, int]] = []
    k = 0
    idx = (where + start).tolist()
    while k < len(idx):
        first, last = folio_extent(mem, mapping, idx[k])
        pfns = mapping.lookup_range(first, last)
        pfns = pfns[pfns >= 0]
        head = mem.compound_head(int(pfns[0]))
        if (mem.mapcount[pfns] > 0).any() or (int(mem.order[head]) and (mem.mapcount[head: head + (1 << int(mem.order[head]))] > 0).any()) \
                or (mem.flags[_folio_lock_frames(mem, pfns)] & PG.locked).any():
            out.append((first, last))
        while k < len(idx) and idx[k] < last:
            k += 1
    return out


def _folio_lock_frames(mem: Any, pfns: Any) -> Any:
    """Our helper: the frames whose PG_locked is the lock of the folio in these page-cache slots -- the head
    of a compound folio; every frame of a large folio made of order-0 frames (a 6.x file folio recorded by
    the mapping's orders; a fault locks the frame it maps)."""
    valid = pfns[pfns >= 0]
    order = mem.order[valid].astype(np.int64)
    return np.unique(valid & ~((np.int64(1) << order) - 1))


def truncate_cleanup_folios(mapping: "AddressSpace", start: int, end: int) -> Gen[None]:
    """The folio passes of truncate_inode_pages_range() (mm/truncate.c) over slots ``[start, end)``, before the
    model drops them: every folio is locked (find_lock_entries' trylock; one locked by another task is waited
    for, as the second pass's folio_lock() does) and truncate_cleanup_folio() unmaps it if it is still mapped
    (unmap_mapping_folio: e.g. a fault mapped it after the caller's unmap_mapping_range); it leaves the cache
    unlocked.  Repeated until no folio of the range is mapped or locked ("restart to make sure all gone").
    Nothing sleeps when no folio is mapped or locked.  Returns the number of slots it dropped."""
    mem = mapping.host.machine.mem
    dropped = 0
    while True:
        spans = _folios_to_clean(mapping, start, end)
        if not spans:
            return dropped
        for first, last in spans:
            pfns = mapping.lookup_range(first, last)
            if not (pfns >= 0).any():
                continue
            pfn = int(pfns[pfns >= 0][0])
            locks = _folio_lock_frames(mem, pfns)
            if (mem.flags[locks] & PG.locked).any():
                # folio_lock(): wait for the task holding it (a fault maps the page before it unlocks)
                yield from sched.wait_event(lambda lk=locks: not (mem.flags[lk] & PG.locked).any(),
                                            "truncate_inode_pages_range")
                if mapping.find_page(first) < 0 or mem.compound_head(int(mapping.find_page(first))) != \
                        mem.compound_head(pfn):
                    continue                                # truncated meanwhile (folio->mapping != mapping)
                pfns = mapping.lookup_range(first, last)
                locks = _folio_lock_frames(mem, pfns)
            mem.flags[locks] |= np.uint32(PG.locked)
            folio = pfns[pfns >= 0]
            head = mem.compound_head(pfn)
            nr = 1 << int(mem.order[head])
            mapped = (mem.mapcount[folio] > 0).any() or (nr > 1 and (mem.mapcount[head: head + nr] > 0).any())
            if mapped:                                       # truncate_cleanup_folio()
                if nr > 1:
                    folio = np.arange(head, head + nr, dtype=np.int64)
                yield from unmap_mapping_folio(mapping, first, last, folio)
            mem.flags[locks] &= PG.mask(PG.locked)          # folio_unlock()
            dropped += mapping.delete_range(mem, max(first, start), min(last, end))


# --- the page cache ---------------------------------------------------------------------------------------
def truncate_inode_pages_range(mapping: "AddressSpace", lstart: int, lend: int) -> Gen[int]:
    """truncate_inode_pages_range() (mm/truncate.c): remove the cached pages wholly inside the byte range
    ``[lstart, lend]`` (``lend`` inclusive, -1: to the end) and zero the covered part of a partial first
    page.  A large folio stays cached while any of its pages remains (model: no folio split).  Returns the
    number of slots removed."""
    mem = mapping.host.machine.mem
    yield from sched.might_sleep("truncate_inode_pages_range")
    start = (lstart + PAGE_SIZE - 1) >> PAGE_SHIFT
    end = mapping.pages.shape[0] if lend < 0 else (lend + 1) >> PAGE_SHIFT
    if lend < 0:
        yield from truncate_inode_partial_folio(mapping, lstart)
    if lstart & (PAGE_SIZE - 1):
        pfn = mapping.find_page(lstart >> PAGE_SHIFT)
        if pfn >= 0:
            off = lstart & (PAGE_SIZE - 1)
            stop = PAGE_SIZE if lend < 0 or (lend >> PAGE_SHIFT) > (lstart >> PAGE_SHIFT) else (lend & (PAGE_SIZE - 1)) + 1
            mem.zero(pfn, off, stop)
    dropped = yield from truncate_cleanup_folios(mapping, start, end)
    return dropped + mapping.delete_range(mem, start, end)


#: Disk filesystems whose release_folio cannot release a dirty large folio's private state (iomap_folio_state,
#: dirty buffer heads), so a dirty folio is never split.
RELEASE_REFUSES_DIRTY = ("xfs", "ext4")


def truncate_inode_partial_folio(mapping: "AddressSpace", lstart: int) -> Gen[None]:
    """truncate_inode_partial_folio() (mm/truncate.c) for the large folio holding byte ``lstart`` when it
    begins below it: [6.12] split_folio() to order 0, [6.18] try_folio_split_to_order() at the page of
    ``lstart`` (the part below becomes folios of the largest aligned orders, that page one of order 0).
    Splitting a file folio unmaps all of it from every mapping (unmap_folio(); remap_page() skips file
    folios), the pages below the new EOF included; private COW copies stay.  [5.2] the folio stays whole.
    A dirty ext4/xfs folio cannot be split (filemap_release_folio): it is unmapped and stays whole
    (try_folio_split_or_unmap, 6.12.118 and 6.18)."""
    from hmmirror.fs.filemap import write_folio_orders
    from hmmirror.mm.memory import folio_extent

    machine = mapping.host.machine
    rule = machine.profile.truncate_partial_folio
    index = lstart >> PAGE_SHIFT
    if rule == "keep" or mapping.find_page(index) < 0:
        return
    mem = machine.mem
    first, last = folio_extent(mem, mapping, index)
    if last - first < 2 or first >= index and not lstart & (PAGE_SIZE - 1):
        return                                            # a small folio, or one wholly truncated
    frames = mapping.lookup_range(first, last)
    if mapping.host.sb.fstype in RELEASE_REFUSES_DIRTY and (mem.flags[frames[frames >= 0]] & PG.dirty).any():
        # split_folio() -> filemap_release_folio() refuses a dirty folio (-EBUSY): iomap_release_folio() (xfs),
        # try_to_free_buffers() with dirty buffer heads (ext4); try_folio_split_or_unmap() then unmaps the whole
        # folio, which stays whole (and cached: it is dirty)
        yield from unmap_mapping_pages(mapping, first, last - first, False)
        machine.counters["truncate_folio_split_failed"] += 1
        return
    yield from unmap_mapping_pages(mapping, first, last - first, False)
    orders = [0] * (last - first)
    if rule == "split_nonuniform":
        orders = write_folio_orders(first, index - first) + [0] * (last - index)
    split_cache_folio(mapping, first, last, orders)
    machine.counters["truncate_folio_split"] += 1


def split_cache_folio(mapping: "AddressSpace", first: int, last: int, orders: list[int]) -> None:
    """Our helper for the page-cache side of a split of the unmapped folio in slots ``[first, last)``: a
    compound folio becomes order-0 frames each holding one cache reference, and the mapping records the
    new folios' orders (small folios of 4 KiB frames keep only their recorded extent)."""
    mem = mapping.host.machine.mem
    pfn = int(mapping.find_page(first))
    if pfn >= 0:
        head = mem.compound_head(pfn)
        n = 1 << int(mem.order[head])
        if n > 1:
            keep = np.uint32(PG.file | PG.uptodate | PG.dirty | PG.swapbacked)
            mem.flags[head: head + n] &= keep
            mem.order[head: head + n] = 0
            mem.refcount[head: head + n] = 1
    if mapping.folio_order is not None or any(orders):
        mapping.set_folio_orders(first, orders)


def truncate_pagecache(inode: "Inode", newsize: int) -> Gen[None]:
    """truncate_pagecache() (mm/truncate.c): unmap the tail (private COW copies included), drop its page
    cache, unmap again for pages COWed meanwhile (so every mapping sees two CLEAR ranges)."""
    mapping = inode.i_mapping
    holebegin = (newsize + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    yield from unmap_mapping_range(mapping, holebegin, 0, True)
    yield from truncate_inode_pages_range(mapping, newsize, -1)
    yield from unmap_mapping_range(mapping, holebegin, 0, True)


def truncate_setsize(inode: "Inode", newsize: int) -> Gen[None]:
    """truncate_setsize() (mm/truncate.c): update i_size; when shrinking, truncate_pagecache()."""
    oldsize = inode.i_size
    inode.i_size = newsize
    if newsize < oldsize:
        yield from truncate_pagecache(inode, newsize)


def truncate_pagecache_range(inode: "Inode", lstart: int, lend: int) -> Gen[None]:
    """truncate_pagecache_range() (mm/truncate.c; hole punch): unmap the whole pages of ``[lstart, lend]``
    keeping private COW copies, then drop them from the cache."""
    mapping = inode.i_mapping
    unmap_start = (lstart + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    unmap_end = ((lend + 1) & ~(PAGE_SIZE - 1)) - 1
    if unmap_end > unmap_start:
        yield from unmap_mapping_range(mapping, unmap_start, 1 + unmap_end - unmap_start, False)
    yield from truncate_inode_pages_range(mapping, lstart, lend)


def invalidate_mapping_pages(mapping: "AddressSpace", start: int, end: int) -> int:
    """invalidate_mapping_pages() (mm/truncate.c; POSIX_FADV_DONTNEED): drop the clean, unlocked, unmapped
    cached pages of indices ``[start, end]`` (a large folio only if all of it qualifies and lies inside).
    Returns the number of slots dropped."""
    mem = mapping.host.machine.mem
    hi = min(end + 1, mapping.pages.shape[0])
    if hi <= start:
        return 0
    sl = mapping.pages[start:hi]
    idx = np.flatnonzero(sl >= 0) + start
    dropped = 0
    done: set[int] = set()
    for i in idx.tolist():
        pfn = int(mapping.pages[i])
        if pfn < 0:
            continue
        head = mem.compound_head(pfn)
        if head in done:
            continue
        done.add(head)
        n = 1 << int(mem.order[head])
        first = i - (pfn - head)
        if first < start or first + n - 1 > end:
            continue
        fl = mem.flags[head: head + n]
        if (mem.mapcount[head: head + n] > 0).any() or (fl & (PG.dirty | PG.locked)).any():
            continue
        if int(mem.refcount[head]) != 1:                 # pinned or referenced elsewhere
            continue
        dropped += mapping.delete_range(mem, first, first + n)
    return dropped
