"""hugetlb faults and huge-PTE lookup (mm/hugetlb.c, arch/x86/mm/hugetlbpage.c) [5.2 shape; 6.x names noted].

A hugetlb entry is a PSE leaf at the PMD level (2 MiB hstate, ``vma.hstate_order == 9``) or the PUD level
(1 GiB, order 18).  Its lock (``huge_pte_lock``) is the split lock of the PMD table holding a 2 MiB entry, and
``mm.page_table_lock`` for a 1 GiB entry.  Faults are serialised per file by the hugetlb fault mutex (the
kernel hashes (mapping, index) into a table of mutexes; the model keeps one mutex per inode).

Rules (mm-substrate.md §5.9, obs H1-H9, F10/F11):

* No zero page: a read fault allocates the whole huge page.  Private mappings map it read-only; a later
  write with mapcount 1 sets the write bit in place (same pfns, no notifier).  A write fault on a none
  entry of a private mapping maps the page writable directly (hugetlb_no_page -> hugetlb_cow reuse).
  Shared mappings map it writable if the VMA is writable.
* A private write to a page mapped more than once (after fork) or to a page of the file's page cache
  copies the whole huge page under a notifier CLEAR over the huge page.
* No free huge page -> VM_FAULT_SIGBUS.  Model simplification: no reservations are taken at mmap time (the
  kernel fails such an mmap with -ENOMEM unless MAP_NORESERVE); the failure shows at fault time.
* Counting: a private page's allocation reference is its mapping's; a shared page holds one reference for
  the hugetlbfs page cache plus one per mapping; mapcount counts in every base frame of the huge page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_PSE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PUD_SIZE,
    is_hwpoison_entry,
    is_migration_entry,
    pfn_pte,
    pte_none,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
)
from hmmirror.include.mm_types import FAULT_FLAG, MMU_NOTIFY, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm import rmap
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.fs.file import AddressSpace, Inode
    from hmmirror.mm.mm_struct import VMA, MMStruct
    from hmmirror.mm.page_alloc import PhysMem

HSTATE_ORDERS = {PMD_SIZE: 9, PUD_SIZE: 18}


def huge_page_order(vma: "VMA") -> int:
    """huge_page_order(hstate_vma(vma)): 9 (2 MiB) or 18 (1 GiB)."""
    return vma.hstate_order or 9


def huge_page_size(vma: "VMA") -> int:
    """huge_page_size(hstate_vma(vma))."""
    return PAGE_SIZE << huge_page_order(vma)


def vma_hugecache_offset(vma: "VMA", address: int) -> int:
    """vma_hugecache_offset(): the huge-page index in the file of ``address``."""
    order = huge_page_order(vma)
    return ((address - vma.vm_start) >> (PAGE_SHIFT + order)) + (vma.vm_pgoff >> order)


# --- huge PTE lookup ---------------------------------------------------------------------------------------
def huge_pte_offset(mm: "MMStruct", addr: int, sz: int) -> Ptr | None:
    """huge_pte_offset() (mm/hugetlb.c, generic version; hmm-5.2.md §6): a pointer to the entry of ``sz`` at
    ``addr`` — present, non-present (swap-type) and none entries alike — whenever the levels above exist.

    2 MiB: NULL if the PGD/P4D is not present or the PUD is none (a PUD leaf or non-present PUD is returned
    as such).  1 GiB: NULL only if the PGD/P4D is not present.  A PMD pointing to a PTE table gives NULL.
    """
    pool = mm.machine.pool
    pudp = mm.pt.walk_to_pud(addr)
    if pudp is None:                                   # !pgd_present / !p4d_present
        return None
    pud = pool.get(pudp)
    if sz != PUD_SIZE and pte_none(pud):
        return None
    if x86.pud_huge(pud) or not x86.pud_present(pud):  # hugepage or swap?
        return pudp
    pmdp = mm.pt.pmd_offset(pudp, addr)
    pmd = pool.get(pmdp)
    if sz != PMD_SIZE and pte_none(pmd):
        return None
    if x86.pmd_huge(pmd) or not x86.pmd_present(pmd):  # hugepage or swap?
        return pmdp
    return None


def huge_pte_alloc(mm: "MMStruct", addr: int, sz: int) -> Ptr:
    """huge_pte_alloc(): allocate the levels above the entry of ``sz`` (no PMD sharing in the model)."""
    pt = mm.pt
    pudp = pt.pud_alloc(pt.p4d_alloc(pt.pgd_offset(addr), addr), addr)
    if sz == PUD_SIZE:
        return pudp
    return pt.pmd_alloc(pudp, addr)


def huge_pte_lockptr(mm: "MMStruct", order: int, ptep: Ptr) -> Lock:
    """huge_pte_lockptr(): the PMD table's split lock for 2 MiB entries, ``mm.page_table_lock`` otherwise."""
    if order == 9:
        return mm.machine.pool.ptlock(ptep[0])
    return mm.page_table_lock


def huge_pte_lock(mm: "MMStruct", order: int, ptep: Ptr) -> Gen[Lock]:
    """huge_pte_lock(): take and return the huge-PTE lock of ``ptep``."""
    ptl = huge_pte_lockptr(mm, order, ptep)
    yield from sched.spin_lock(ptl)
    return ptl


def make_huge_pte(vma: "VMA", pfn: int, writable: bool) -> int:
    """make_huge_pte(): a young PSE leaf from ``vm_page_prot``; writable (and dirty) or write-protected."""
    entry = pfn_pte(pfn, vma.vm_page_prot) | _PAGE_PSE
    if writable:
        entry = x86.pte_mkwrite(x86.pte_mkdirty(entry))
    else:
        entry = x86.pte_wrprotect(entry)
    return x86.pte_mkyoung(entry)


def is_hugetlb_entry_migration(entry: int) -> bool:
    """is_hugetlb_entry_migration()."""
    return not pte_none(entry) and not pte_present(entry) and is_migration_entry(pte_to_swp_entry(entry))


def is_hugetlb_entry_hwpoisoned(entry: int) -> bool:
    """is_hugetlb_entry_hwpoisoned()."""
    return not pte_none(entry) and not pte_present(entry) and is_hwpoison_entry(pte_to_swp_entry(entry))


def hugetlb_fault_mutex(inode: "Inode") -> Lock:
    """hugetlb_fault_mutex_table[hash(mapping, idx)]: the model keeps one mutex per inode."""
    lock = inode.private.get("hugetlb_fault_mutex")
    if lock is None:
        lock = inode.private["hugetlb_fault_mutex"] = Lock(f"hugetlb_fault_mutex[{inode.i_ino}]", "mutex")
    return lock


# --- allocation ----------------------------------------------------------------------------------------------
def alloc_huge_page(vma: "VMA", addr: int) -> int:
    """alloc_huge_page() / alloc_hugetlb_folio(): a cleared page from the pool (refcount 1), or -1
    (the kernel's -ENOSPC, which the fault turns into VM_FAULT_SIGBUS)."""
    machine = vma.vm_mm.machine
    order = huge_page_order(vma)
    head = machine.mem.alloc_hugetlb(order)
    if head < 0:
        machine.counters["hugetlb_alloc_fail"] += 1
        return -1
    machine.mem.flags[head] |= PG.uptodate                  # clear_huge_page(); __SetPageUptodate()
    machine.counters["hugetlb_pages_allocated"] += 1
    return head


def _copy_huge_page(mem: "PhysMem", dst: int, src: int, nr: int) -> None:
    """copy_user_huge_page(): only frames with stored contents cost anything."""
    for p in mem.contents.stored_in(src, src + nr):
        mem.copy(dst + (p - src), p)


# --- faults --------------------------------------------------------------------------------------------------
def hugetlb_fault(mm: "MMStruct", vma: "VMA", address: int, flags: FAULT_FLAG) -> Gen[int]:
    """hugetlb_fault() (mm/hugetlb.c): called by handle_mm_fault for VM_HUGETLB VMAs (mmap_sem held for read)."""
    machine, pool = mm.machine, mm.machine.pool
    order = huge_page_order(vma)
    sz = PAGE_SIZE << order
    haddr = address & ~(sz - 1)
    ptep = huge_pte_offset(mm, haddr, sz)
    if ptep is not None:
        entry = pool.get(ptep)
        if is_hugetlb_entry_migration(entry):
            yield from _migration_entry_wait_huge(mm, ptep)
            return 0
        if is_hugetlb_entry_hwpoisoned(entry):
            return int(VM_FAULT.HWPOISON_LARGE)
    else:
        ptep = huge_pte_alloc(mm, haddr, sz)
    inode: Inode = vma.vm_file.inode
    mapping = inode.i_mapping
    idx = vma_hugecache_offset(vma, haddr)
    mutex = hugetlb_fault_mutex(inode)
    yield from sched.mutex_lock(mutex)
    ret = yield from _hugetlb_fault_locked(mm, vma, mapping, idx, address, ptep, flags, order)
    sched.mutex_unlock(mutex)
    machine.counters["hugetlb_fault"] += 1
    return ret


def _hugetlb_fault_locked(mm: "MMStruct", vma: "VMA", mapping: "AddressSpace", idx: int, address: int,
                          ptep: Ptr, flags: FAULT_FLAG, order: int) -> Gen[int]:
    """The body of hugetlb_fault() under the fault mutex."""
    pool = mm.machine.pool
    write = bool(flags & FAULT_FLAG.WRITE)
    entry = pool.get(ptep)
    if pte_none(entry):
        return (yield from hugetlb_no_page(mm, vma, mapping, idx, address, ptep, flags))
    if not pte_present(entry):                      # migration/hwpoison raced in: the refault handles it
        return 0
    pagecache_page = -1
    if write and not x86.pte_write(entry) and not vma.vm_flags & VM.MAYSHARE:
        pagecache_page = mapping.find_page(idx)     # hugetlbfs_pagecache_page()
    ptl = yield from huge_pte_lock(mm, order, ptep)
    if pool.get(ptep) != entry:                     # pte_same() after taking the lock
        sched.spin_unlock(ptl)
        return 0
    ret = 0
    if write and not x86.pte_write(entry):
        ret = yield from hugetlb_cow(mm, vma, address, ptep, pagecache_page, ptl)
    else:
        if write:
            entry = x86.pte_mkdirty(entry)
        pool.set(ptep, x86.pte_mkyoung(entry))      # huge_ptep_set_access_flags()
    sched.spin_unlock(ptl)
    return ret


def hugetlb_no_page(mm: "MMStruct", vma: "VMA", mapping: "AddressSpace", idx: int, address: int, ptep: Ptr,
                    flags: FAULT_FLAG) -> Gen[int]:
    """hugetlb_no_page() (mm/hugetlb.c): a none entry: the file's page, or a new page from the pool (added
    to the page cache for shared mappings, anonymous for private ones); SIGBUS beyond EOF or when the pool
    is empty.  A private write then goes through hugetlb_cow (which reuses a new anonymous page)."""
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    order = huge_page_order(vma)
    nr = 1 << order
    inode = mapping.host
    haddr = address & ~((PAGE_SIZE << order) - 1)
    write = bool(flags & FAULT_FLAG.WRITE)
    anon_rmap = False
    page = mapping.find_page(idx)                   # find_lock_page()
    if page < 0:
        if idx >= inode.nr_pages:
            return int(VM_FAULT.SIGBUS)
        yield from sched.might_sleep("alloc_huge_page")
        page = mapping.find_page(idx)               # raced with another instantiation?
    if page < 0:
        page = alloc_huge_page(vma, haddr)
        if page < 0:
            return int(VM_FAULT.SIGBUS)
        if vma.vm_flags & VM.MAYSHARE:
            mapping.add_huge(idx, page)             # the allocation reference is the cache's
            mem.get_page(page)                      # ... and this one the mapping's
        else:
            rmap.anon_vma_prepare(vma)
            anon_rmap = True
    else:
        mem.get_page(page)
    ptl = yield from huge_pte_lock(mm, order, ptep)
    ret = 0
    if idx >= inode.nr_pages:
        ret = int(VM_FAULT.SIGBUS)                  # truncated meanwhile
    elif not pte_none(pool.get(ptep)):
        ret = 0                                     # someone else instantiated it
    else:
        if anon_rmap:
            rmap.page_add_new_anon_rmap(mem, page, nr)     # hugepage_add_new_anon_rmap()
        else:
            rmap.page_add_rmap(mem, page, nr)              # page_dup_rmap(page, true)
        writable = bool(vma.vm_flags & VM.WRITE) and bool(vma.vm_flags & VM.SHARED)
        pool.set(ptep, make_huge_pte(vma, page, writable))
        if write and not vma.vm_flags & VM.SHARED:
            # Optimization, do the COW without a second fault
            ret = yield from hugetlb_cow(mm, vma, address, ptep, page, ptl)
        sched.spin_unlock(ptl)
        return ret
    sched.spin_unlock(ptl)                          # backout
    mem.put_page(page)
    return ret


def hugetlb_cow(mm: "MMStruct", vma: "VMA", address: int, ptep: Ptr, pagecache_page: int, ptl: Lock) -> Gen[int]:
    """hugetlb_cow() [5.2] / hugetlb_wp() [6.x] (mm/hugetlb.c): write to a write-protected huge entry.

    Entered and left with the huge-PTE lock ``ptl`` held (it is dropped around the allocation and the
    notifier).  Shared mapping ([6.x] rule; unreachable in 5.2): write bit set in place.  An anonymous page
    mapped once: reuse, write bit set in place.  Otherwise a new huge page receives a copy and replaces the
    entry under a notifier CLEAR over the huge page; no free huge page -> VM_FAULT_SIGBUS.
    """
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    order = huge_page_order(vma)
    nr = 1 << order
    sz = PAGE_SIZE << order
    haddr = address & ~(sz - 1)
    pte = pool.get(ptep)
    old = pte_pfn(pte)
    if vma.vm_flags & VM.MAYSHARE or (int(mem.mapcount[old]) == 1 and mem.flags[old] & PG.anon):
        if not vma.vm_flags & VM.MAYSHARE:
            mem.flags[old] |= PG.anon_exclusive             # page_move_anon_rmap()
        pool.set(ptep, x86.pte_mkyoung(x86.pte_mkdirty(x86.pte_mkwrite(pte))))   # set_huge_ptep_writable()
        return int(VM_FAULT.WRITE)
    # copy-on-write of the whole huge page
    mem.get_page(old)
    sched.spin_unlock(ptl)
    yield from sched.might_sleep("alloc_huge_page")
    new = alloc_huge_page(vma, haddr)
    if new < 0:
        mem.put_page(old)
        yield from sched.spin_lock(ptl)
        return int(VM_FAULT.SIGBUS)
    _copy_huge_page(mem, new, old, nr)
    rmap.anon_vma_prepare(vma)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + sz)
    yield from mmu_notifier_invalidate_range_start(r)
    yield from sched.spin_lock(ptl)
    if pool.get(ptep) == pte:
        pool.set(ptep, make_huge_pte(vma, new, True))      # huge_ptep_clear_flush(); set_huge_pte_at()
        rmap.page_remove_rmap(mem, old, nr)
        mem.put_page(old)                                   # the old mapping's reference
        rmap.page_add_new_anon_rmap(mem, new, nr)           # hugepage_add_new_anon_rmap()
        new = -1
        machine.counters["hugetlb_cow_copies"] += 1
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    if new >= 0:
        mem.put_page(new)
    mem.put_page(old)
    yield from sched.spin_lock(ptl)                         # the caller expects the lock held
    return int(VM_FAULT.WRITE)


def _migration_entry_wait_huge(mm: "MMStruct", ptep: Ptr) -> Gen[None]:
    """migration_entry_wait_huge(): sleep until the migration entry is replaced."""
    pool = mm.machine.pool
    orig = pool.get(ptep)
    yield from sched.wait_event(lambda: pool.get(ptep) != orig, "migration_entry_wait_huge")

