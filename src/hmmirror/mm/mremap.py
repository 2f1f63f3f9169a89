"""mremap(2): shrink, grow in place, or move a mapping with its page-table entries (mm/mremap.c).

A move copies the VMA to the new address (``copy_vma``), moves the entries under one UNMAP over the old range
(``move_page_tables``), then unmaps the old range (``do_munmap``: a second UNMAP, over an empty range).  A THP
moves as a PMD when the old and new addresses are 2 MiB aligned and the whole PMD moves; otherwise it is split
first (CLEAR [2M), nested in the UNMAP) and its PTEs move (obs A18, T12/T13: same pfns at the new VA, old range
empty).  Frames keep their counts: the same pages are mapped once each, at another address.

Followed: v5.2 mm/mremap.c (SYSCALL mremap, vma_to_resize, move_vma, move_page_tables, move_ptes) and
mm/huge_memory.c move_huge_pmd; the 6.18 notifier range is the same (UNMAP over the old range).
MREMAP_DONTUNMAP [6.x, ``profile.mremap_dontunmap``; -EINVAL for 5.2]: a move of the same length whose old
range stays mapped (its VMA keeps its place, empty, ``VM_LOCKED`` cleared, its anon_vma unlinked when the whole
VMA moved): no second UNMAP.
Not modelled: moving whole PTE tables or PUDs (the entries move one by one with the same effect), hugetlb
(-EINVAL, as 5.2; 6.x allows aligned hugetlb moves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_PRESENT,
    PAGE_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    pmd_leaf,
    pte_none,
    table_id_of,
)
from hmmirror.include.mm_types import MAP, MMU_NOTIFY, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import pmd_lockptr, pte_lockptr
from hmmirror.mm.mm_struct import VMA, is_vm_hugetlb_page
from hmmirror.mm.mmap import do_munmap, get_unmapped_area, page_align, vma_merge_range
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, ENOMEM, EFAULT = 22, 12, 14
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4


def _pmd_of(mm: "MMStruct", addr: int, alloc: bool) -> Ptr | None:
    """get_old_pmd() / alloc_new_pmd(): the PMD entry of ``addr`` (None if a level is missing or a PUD leaf)."""
    pudp = mm.pt.walk_to_pud(addr, alloc=alloc)
    if pudp is None:
        return None
    pud = mm.machine.pool.get(pudp)
    if x86.pud_leaf(pud) or (pte_none(pud) and not alloc):
        return None
    return mm.pt.pmd_alloc(pudp, addr) if alloc else mm.pt.pmd_offset(pudp, addr)


def move_ptes(vma: VMA, old_pmd: Ptr, old_addr: int, old_end: int, new_vma: VMA, new_pmd: Ptr,
              new_addr: int) -> Gen[None]:
    """move_ptes(): under the old then the new PTE lock, each entry leaves its old slot for the new one."""
    mm = vma.vm_mm
    pool = mm.machine.pool
    new_vma.vm_mm.pt.pte_alloc(new_pmd)
    old_ptl = pte_lockptr(mm, old_pmd)
    new_ptl = pte_lockptr(mm, new_pmd)
    yield from sched.spin_lock(old_ptl)
    if new_ptl is not old_ptl:
        yield from sched.spin_lock(new_ptl)
    ot = table_id_of(pool.get(old_pmd))
    nt = table_id_of(pool.get(new_pmd))
    lo = (old_addr >> 12) & (PTRS_PER_TABLE - 1)
    nlo = (new_addr >> 12) & (PTRS_PER_TABLE - 1)
    n = (old_end - old_addr) >> 12
    ents = pool.tables[ot, lo: lo + n].copy()
    pool.tables[ot, lo: lo + n] = 0                          # ptep_get_and_clear()
    keep = ents != 0
    pool.tables[nt, nlo: nlo + n][keep] = ents[keep]         # set_pte_at(new)
    if new_ptl is not old_ptl:
        sched.spin_unlock(new_ptl)
    sched.spin_unlock(old_ptl)


def move_huge_pmd(vma: VMA, old_addr: int, new_addr: int, old_pmd: Ptr, new_pmd: Ptr) -> Gen[bool]:
    """move_huge_pmd(): move a whole PMD leaf (both addresses 2 MiB aligned, the new PMD none)."""
    mm = vma.vm_mm
    pool = mm.machine.pool
    if old_addr & (PMD_SIZE - 1) or new_addr & (PMD_SIZE - 1) or not pte_none(pool.get(new_pmd)):
        return False
    old_ptl, new_ptl = pmd_lockptr(mm, old_pmd), pmd_lockptr(mm, new_pmd)
    yield from sched.spin_lock(old_ptl)
    if new_ptl is not old_ptl:
        yield from sched.spin_lock(new_ptl)
    pmd = pool.get(old_pmd)
    moved = pmd_leaf(pmd) or (not pte_none(pmd) and not pmd & _PAGE_PRESENT)
    if moved:
        pool.set(old_pmd, 0)                                 # pmdp_huge_get_and_clear()
        pool.set(new_pmd, pmd)
    if new_ptl is not old_ptl:
        sched.spin_unlock(new_ptl)
    sched.spin_unlock(old_ptl)
    return moved


def move_page_tables(vma: VMA, old_addr: int, new_vma: VMA, new_addr: int, length: int) -> Gen[int]:
    """move_page_tables(): one UNMAP over the old range around moving every entry; returns the bytes moved."""
    from hmmirror.mm.huge_memory import __split_huge_pmd

    mm = vma.vm_mm
    pool = mm.machine.pool
    old_end = old_addr + length
    start = old_addr
    r = mmu_notifier_range_init(MMU_NOTIFY.UNMAP, vma, mm, old_addr, old_end)
    yield from mmu_notifier_invalidate_range_start(r)
    while old_addr < old_end:
        yield from sched.preempt_point("move_page_tables")   # cond_resched()
        extent = min(((old_addr + PMD_SIZE) & ~(PMD_SIZE - 1)) - old_addr, old_end - old_addr)
        old_pmd = _pmd_of(mm, old_addr, False)
        if old_pmd is None or pte_none(pool.get(old_pmd)):
            old_addr += extent
            new_addr += extent
            continue
        new_pmd = _pmd_of(mm, new_addr, True)
        assert new_pmd is not None
        pmd = pool.get(old_pmd)
        if pmd_leaf(pmd) or not pmd & _PAGE_PRESENT:          # THP, huge zero page or PMD migration entry
            if extent == PMD_SIZE:
                moved = yield from move_huge_pmd(vma, old_addr, new_addr, old_pmd, new_pmd)
                if moved:
                    old_addr += extent
                    new_addr += extent
                    continue
            yield from __split_huge_pmd(vma, old_pmd, old_addr)       # CLEAR [2M), nested
            if pte_none(pool.get(old_pmd)):
                old_addr += extent
                new_addr += extent
                continue
        extent = min(extent, ((new_addr + PMD_SIZE) & ~(PMD_SIZE - 1)) - new_addr)
        yield from move_ptes(vma, old_pmd, old_addr, old_addr + extent, new_vma, new_pmd, new_addr)
        old_addr += extent
        new_addr += extent
    yield from mmu_notifier_invalidate_range_end(r)
    return old_addr - start


def copy_vma(vma: VMA, addr: int, new_addr: int, new_len: int) -> VMA:
    """copy_vma(): a VMA like ``vma`` at ``new_addr`` (file offset of ``addr`` kept), linked into the mm."""
    mm = vma.vm_mm
    new = VMA(mm, new_addr, new_addr + new_len, vma.vm_flags, vma.vm_pgoff + ((addr - vma.vm_start) >> 12),
              vma.vm_file, vma.vm_ops, vma.anon_vma, vma.vm_page_prot, vma.hstate_order, vma.devmap,
              dict(vma.extra))
    mm.insert_vma(new)
    if new.vm_file is not None and hasattr(new.vm_file, "inode"):
        new.vm_file.inode.i_mmap.append(new)
    return new


def move_vma(vma: VMA, old_addr: int, old_len: int, new_len: int, new_addr: int, flags: int = 0) -> Gen[int]:
    """move_vma(): copy the VMA, move the entries, unmap the old range (kept, empty, with
    MREMAP_DONTUNMAP).  The new address or -errno."""
    mm = vma.vm_mm
    new_vma = copy_vma(vma, old_addr, new_addr, new_len)
    moved = yield from move_page_tables(vma, old_addr, new_vma, new_addr, old_len)
    if moved < old_len:
        return -ENOMEM
    if flags & MREMAP_DONTUNMAP:
        vma.vm_flags &= ~VM.LOCKED                           # vm_flags_clear(vma, VM_LOCKED_MASK)
        if new_vma is not vma and vma.vm_start == old_addr and vma.vm_end == old_addr + old_len:
            vma.anon_vma = None                              # unlink_anon_vmas(): a later fault starts afresh
        vma_merge_range(mm, new_addr, new_addr + new_len)
        return new_addr
    ret = yield from do_munmap(mm, old_addr, old_len)
    if ret < 0:
        return ret
    vma_merge_range(mm, new_addr, new_addr + new_len)
    return new_addr


def vma_to_resize(mm: "MMStruct", addr: int, old_len: int, new_len: int, flags: int = 0) -> VMA | int:
    """vma_to_resize(): the VMA holding ``[addr, addr+old_len)`` if it may grow, else -EFAULT / -EINVAL."""
    vma = mm.find_vma(addr)
    if vma is None or vma.vm_start > addr:
        return -EFAULT
    if is_vm_hugetlb_page(vma):
        return -EINVAL
    if flags & MREMAP_DONTUNMAP and vma.vm_flags & (VM.DONTEXPAND | VM.PFNMAP):
        return -EINVAL
    if old_len > vma.vm_end - addr:
        return -EFAULT
    if new_len == old_len:
        return vma
    if vma.vm_flags & (VM.DONTEXPAND | VM.PFNMAP):
        return -EFAULT
    return vma


def do_mremap(mm: "MMStruct", addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> Gen[int]:
    """SYSCALL mremap(): takes the mmap lock for write.  The (new) address, or -errno."""
    known = MREMAP_FIXED | MREMAP_MAYMOVE | (MREMAP_DONTUNMAP if mm.machine.profile.mremap_dontunmap else 0)
    if flags & ~known:
        return -EINVAL
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        return -EINVAL
    if addr & (PAGE_SIZE - 1):
        return -EINVAL
    old_len, new_len = page_align(old_len), page_align(new_len)
    if flags & MREMAP_DONTUNMAP and (not flags & MREMAP_MAYMOVE or old_len != new_len):
        return -EINVAL                                   # always a move, never a resize
    if not new_len:
        return -EINVAL
    yield from sched.down_write(mm.mmap_sem)
    try:
        ret = yield from _mremap_locked(mm, addr, old_len, new_len, flags, new_addr)
    finally:
        sched.up_write(mm.mmap_sem)
    if ret >= 0:
        mm.machine.log("mremap", mm=mm.name, start=addr, end=addr + old_len, new=ret, new_end=ret + new_len)
    return ret


def _mremap_locked(mm: "MMStruct", addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> Gen[int]:
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):            # mremap_to()
        if flags & MREMAP_FIXED:
            if new_addr & (PAGE_SIZE - 1) or new_addr + new_len > mm.machine.geo.task_size:
                return -EINVAL
            if addr < new_addr + new_len and new_addr < addr + old_len:
                return -EINVAL                               # overlapping ranges
            ret = yield from do_munmap(mm, new_addr, new_len)
            if ret:
                return ret
        if old_len >= new_len:
            ret = yield from do_munmap(mm, addr + new_len, old_len - new_len)
            if ret and old_len != new_len:
                return ret
            old_len = new_len
        vma = vma_to_resize(mm, addr, old_len, new_len, flags)
        if isinstance(vma, int):
            return vma
        if not flags & MREMAP_FIXED:                         # DONTUNMAP alone: the kernel picks the address
            new_addr = get_unmapped_area(mm, 0, new_len, MAP.SHARED if vma.vm_flags & VM.MAYSHARE else 0)
            if new_addr < 0:
                return new_addr
        return (yield from move_vma(vma, addr, old_len, new_len, new_addr, flags))
    if old_len >= new_len:                                   # always allow a shrinking remap
        ret = yield from do_munmap(mm, addr + new_len, old_len - new_len)
        if ret and old_len != new_len:
            return ret
        return addr
    vma = vma_to_resize(mm, addr, old_len, new_len)
    if isinstance(vma, int):
        return vma
    if old_len == vma.vm_end - addr and not mm.vmas_in(vma.vm_end, addr + new_len) \
            and addr + new_len <= mm.machine.geo.task_size:  # vma_expandable(): grow in place
        vma.vm_end = addr + new_len
        return addr
    if not flags & MREMAP_MAYMOVE:
        return -ENOMEM
    target = get_unmapped_area(mm, 0, new_len, MAP.SHARED if vma.vm_flags & VM.MAYSHARE else 0)
    if target < 0:
        return target
    return (yield from move_vma(vma, addr, old_len, new_len, target))
