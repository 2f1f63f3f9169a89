"""fork(2) and address-space teardown: dup_mm / dup_mmap (kernel/fork.c), copy_page_range (mm/memory.c),
copy_huge_pmd (mm/huge_memory.c), copy_hugetlb_page_range (mm/hugetlb.c), mmput (kernel/fork.c) and
exit_mmap (mm/mmap.c).

Fork (mm-substrate.md §6, obs F1-F11): the child gets a copy of every VMA except ``VM_DONTCOPY`` ones; a
``VM_WIPEONFORK`` VMA is copied empty.  Page tables are copied only for VMAs that cannot be refilled by faults:
an ``anon_vma``, ``VM_PFNMAP``/``VM_MIXEDMAP``, and hugetlb ([5.2] always; since 6.0 only private ones, which
have an ``anon_vma``).  In a COW mapping writable entries are write-protected in parent and child, anonymous
pages become shared (mapcount 2, one more reference) and lose their anon-exclusive mark; zero-page entries
are copied; anonymous THP PMDs are copied write-protected; file and DAX PMDs are not copied (refault).  The
parent's notifiers see one PROTECTION_PAGE ``[vm_start, vm_end)`` per copied COW VMA (CLEAR for hugetlb).

Teardown: ``mmput`` drops ``mm_users``; at zero ``exit_mmap`` calls ``mmu_notifier_release`` (every classic
subscriber's ``release``, then they are unlinked), then zaps everything under one UNMAP
``[0, ULONG_MAX)`` (which only interval subscriptions still see), frees every page table below the PGD and
removes the VMAs.  The PGD row is kept until ``mm_count`` reaches zero, so a stale walker reads holes, not
another mm's tables.  The mm stays in ``machine.mms`` marked ``exited`` (names stay unique in the event log,
and holders of an ``mm_count`` reference can still find it).

Followed: v5.2 kernel/fork.c dup_mmap, mm/memory.c copy_page_range/copy_one_pte, mm/huge_memory.c
copy_huge_pmd, mm/hugetlb.c copy_hugetlb_page_range, mm/mmap.c exit_mmap; v6.18 vma_needs_copy,
copy_present_ptes (folio_try_dup_anon_rmap_*), copy_nonpresent_pte, copy_huge_pmd, exit_mmap (mmap lock).
Not modelled: GUP pins forcing an early copy at fork (the model has no pin count), uffd-wp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    HPAGE_PMD_NR,
    HPAGE_PUD_NR,
    PAGE_SIZE,
    PMD_LEVEL,
    PTE_PFN_MASK,
    PTRS_PER_TABLE,
    PUD_LEVEL,
    PUD_SIZE,
    SwpEntry,
    SwpType,
    pmd_leaf,
    pte_none,
    pte_to_swp_entry,
    pud_leaf,
    swp_entry_to_pte,
    table_id_of,
)
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.huge_memory import _account_leaf, is_huge_zero_pmd
from hmmirror.mm.memory import free_pgtables, pmd_lockptr, pte_lockptr, unmap_page_range
from hmmirror.mm.mm_struct import VMA, is_cow_mapping, is_vm_hugetlb_page, vma_is_anonymous
from hmmirror.mm.mmu_notifier import (
    ULONG_MAX,
    mmdrop,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
    mmu_notifier_release,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

ENOMEM = 12
EAGAIN = 11

_P = _PAGE_PRESENT | _PAGE_PROTNONE
_AD = _PAGE_ACCESSED | _PAGE_DIRTY
_U = np.uint64


# --- deciders ---------------------------------------------------------------------------------------------
def vma_needs_copy(dst_vma: VMA, src_vma: VMA) -> bool:
    """vma_needs_copy() [6.x] / the early return of copy_page_range() [5.2]: page tables that faults cannot
    rebuild (PFN maps, anonymous memory; [5.2] every hugetlb VMA)."""
    f = src_vma.vm_flags
    if f & (VM.PFNMAP | VM.MIXEDMAP):
        return True
    if src_vma.anon_vma:
        return True
    return bool(f & VM.HUGETLB) and src_vma.vm_mm.machine.profile.fork_copies_shared_hugetlb


def copy_pte_marker(e: int) -> int:
    """copy_pte_marker() [6.18]: poison and guard markers are copied, uffd-wp ones only to a uffd-wp VMA (none
    in the model).  Returns the marker kind bits to install, 0 for none."""
    return pte_to_swp_entry(e).offset & (x86.PTE_MARKER_POISONED | x86.PTE_MARKER_GUARD)


# --- PTE level --------------------------------------------------------------------------------------------
def copy_nonpresent_pte(dst_vma: VMA, src_vma: VMA, src_tid: int, idx: int, e: int, addr: int) -> int:
    """copy_nonpresent_pte(): the child's value of a swap-format entry (may downgrade the parent's entry).

    Returns the entry for the child (0: nothing), or -1 for a device-exclusive entry that was restored to a
    present PTE in the parent (the caller copies it as present, the kernel's -ENOENT).
    """
    machine = src_vma.vm_mm.machine
    pool, mem = machine.pool, machine.mem
    cow = is_cow_mapping(src_vma.vm_flags)
    s = pte_to_swp_entry(e)
    if not x86.non_swap_entry(s):
        dup = getattr(machine.swap, "swap_duplicate", None)
        if dup is not None:
            dup(s)                                      # swap_duplicate(): one more entry uses the slot
        return e
    if x86.is_migration_entry(s):
        if x86.is_writable_migration_entry(s) and cow:
            e = swp_entry_to_pte(SwpEntry(int(SwpType.SWP_MIGRATION_READ), s.offset))
            pool.tables[src_tid, idx] = e
        return e
    if x86.is_device_private_entry(s):
        mem.get_page(s.offset)                         # the device page is mapped once more
        rmap.page_add_rmap(mem, s.offset)
        mem.flags[s.offset] &= PG.mask(PG.anon_exclusive)
        if x86.is_writable_device_private_entry(s) and cow:
            e = swp_entry_to_pte(SwpEntry(int(SwpType.SWP_DEVICE_PRIVATE_READ), s.offset))
            pool.tables[src_tid, idx] = e
        return e
    if x86.is_device_exclusive_entry(s):
        # restore_exclusive_pte(): the page becomes present again in the parent (its mapcount was kept)
        pte = x86.pfn_pte(s.offset, src_vma.vm_page_prot) & ~_PAGE_ACCESSED
        if src_vma.vm_flags & VM.WRITE and mem.flags[s.offset] & PG.anon_exclusive:
            pte = x86.pte_mkwrite(x86.pte_mkdirty(pte))
        if not machine.profile.make_device_exclusive_single:
            rmap.page_add_rmap(mem, s.offset)           # [6.12] the exclusive entry had dropped the rmap
        pool.tables[src_tid, idx] = pte
        return -1
    if x86.is_pte_marker(s):
        kind = copy_pte_marker(e)
        return x86.make_pte_marker(kind) if kind else 0
    return e                                            # hwpoison


def copy_pte_range(dst_vma: VMA, src_vma: VMA, dst_pmdp: Ptr, src_pmdp: Ptr, addr: int, end: int) -> Gen[int]:
    """copy_pte_range() + copy_present_ptes(): copy the PTEs of ``[addr, end)`` of one table (vectorised for
    present entries), under the child's then the parent's PTE lock."""
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    machine = src_mm.machine
    pool, mem = machine.pool, machine.mem
    dst_mm.pt.pte_alloc(dst_pmdp)
    dst_ptl = pte_lockptr(dst_mm, dst_pmdp)
    src_ptl = pte_lockptr(src_mm, src_pmdp)
    yield from sched.spin_lock(dst_ptl)
    yield from sched.spin_lock(src_ptl)
    stid = table_id_of(pool.get(src_pmdp))
    dtid = table_id_of(pool.get(dst_pmdp))
    lo = (addr >> 12) & (PTRS_PER_TABLE - 1)
    hi = lo + ((end - addr) >> 12)
    ents = pool.tables[stid, lo:hi].copy()
    nonnone = (ents & ~_U(_AD)) != 0
    # non-present entries first (a restored device-exclusive entry then copies as present)
    swapish = nonnone & ((ents & _U(_P)) == 0)
    child_np = {}
    for i in np.nonzero(swapish)[0].tolist():
        v = copy_nonpresent_pte(dst_vma, src_vma, stid, lo + i, int(ents[i]), addr + (i << 12))
        if v == -1:
            ents[i] = pool.tables[stid, lo + i]
        else:
            child_np[i] = v
    present = (ents & _U(_P)) != 0
    cow = is_cow_mapping(src_vma.vm_flags)
    if cow:
        w = present & ((ents & _U(_PAGE_RW)) != 0)
        if w.any():
            ents[w] &= ~_U(_PAGE_RW)
            src = pool.tables[stid, lo:hi]
            src[w] &= ~_U(_PAGE_RW)                     # ptep_set_wrprotect() in the parent
    child = ents.copy()
    if src_vma.vm_flags & VM.SHARED:
        child[present] &= ~_U(_PAGE_DIRTY)              # "If it's a shared mapping, mark it clean in the child"
    child[present] &= ~_U(_PAGE_ACCESSED)               # pte_mkold()
    # vm_normal_page(): not special, has a memmap, not a VM_PFNMAP VMA; counted frames only
    normal = present & ((ents & _U(_PAGE_SPECIAL)) == 0)
    if normal.any() and not src_vma.vm_flags & VM.PFNMAP:
        pfns = ((ents[normal] & _U(PTE_PFN_MASK)) >> _U(12)).astype(np.int64)
        pfns = pfns[rmap.counted_mask(mem, pfns, machine.profile.dax_refcounted)]
        if pfns.size:
            np.add.at(mem.mapcount, pfns, 1)            # page_dup_rmap()
            heads = pfns & ~((1 << mem.order[pfns].astype(np.int64)) - 1)
            np.add.at(mem.refcount, heads, 1)           # get_page()
            mem.flags[pfns] &= ~np.uint32(PG.anon_exclusive)   # folio_try_dup_anon_rmap_pte() [6.x]
    out = pool.tables[dtid, lo:hi]
    out[present] = child[present]
    for i, v in child_np.items():
        out[i] = v
    sched.spin_unlock(src_ptl)
    sched.spin_unlock(dst_ptl)
    yield from sched.preempt_point("copy_pte_range")    # cond_resched()
    return 0


# --- PMD / PUD level --------------------------------------------------------------------------------------
def copy_huge_pmd(dst_vma: VMA, src_vma: VMA, dst_pmdp: Ptr, src_pmdp: Ptr, addr: int) -> Gen[int]:
    """copy_huge_pmd(): anonymous THP / huge zero PMD / PMD migration entry; 0 done, -EAGAIN: not huge any
    more (copy the PTE table).  File and DAX PMDs are skipped ("can be re-fill on fault")."""
    if not vma_is_anonymous(src_vma):
        return 0
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    machine = src_mm.machine
    pool, mem = machine.pool, machine.mem
    dst_ptl = pmd_lockptr(dst_mm, dst_pmdp)
    src_ptl = pmd_lockptr(src_mm, src_pmdp)
    yield from sched.spin_lock(dst_ptl)
    yield from sched.spin_lock(src_ptl)
    ret = 0
    pmd = pool.get(src_pmdp)
    if not x86.pmd_present(pmd) and not pte_none(pmd):            # PMD migration entry
        s = pte_to_swp_entry(pmd)
        if x86.is_writable_migration_entry(s):
            pmd = swp_entry_to_pte(SwpEntry(int(SwpType.SWP_MIGRATION_READ), s.offset))
            pool.set(src_pmdp, pmd)
        pool.set(dst_pmdp, pmd)
    elif not pmd_leaf(pmd):
        ret = -EAGAIN
    elif is_huge_zero_pmd(src_mm, pmd):
        # mm_get_huge_zero_page(dst_mm) [5.2]; the entry is the parent's, read-only and old
        if machine.profile.huge_zero_per_mm:
            dst_mm.huge_zero_ref = True
        pool.set(dst_pmdp, x86.pte_wrprotect(pmd) & ~_PAGE_ACCESSED)
    else:
        head = x86.pte_pfn(pmd)
        _account_leaf(dst_mm, head, HPAGE_PMD_NR, +1)           # get_page() + page_dup_rmap(compound)
        mem.flags[head: head + HPAGE_PMD_NR] &= ~np.uint32(PG.anon_exclusive)
        pool.set(src_pmdp, x86.pte_wrprotect(pmd))              # pmdp_set_wrprotect()
        pool.set(dst_pmdp, x86.pte_wrprotect(pmd) & ~_PAGE_ACCESSED)
    sched.spin_unlock(src_ptl)
    sched.spin_unlock(dst_ptl)
    return ret


def copy_pmd_range(dst_vma: VMA, src_vma: VMA, dst_pudp: Ptr, src_pudp: Ptr, addr: int, end: int) -> Gen[int]:
    """copy_pmd_range(): the child's PMD table is allocated first (as in the kernel), then each PMD."""
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    pool = src_mm.machine.pool
    dst_mm.pt.pmd_alloc(dst_pudp, addr)
    while addr != end:
        nxt = PMD_LEVEL.addr_end(addr, end)
        src_pmdp = src_mm.pt.pmd_offset(src_pudp, addr)
        dst_pmdp = dst_mm.pt.pmd_offset(dst_pudp, addr)
        pmd = pool.get(src_pmdp)
        if not pte_none(pmd):
            if pmd_leaf(pmd) or not pmd & _PAGE_PRESENT:
                ret = yield from copy_huge_pmd(dst_vma, src_vma, dst_pmdp, src_pmdp, addr)
                if ret == -ENOMEM:
                    return ret
                pmd = pool.get(src_pmdp)
                if not ret or pte_none(pmd) or pmd_leaf(pmd):
                    addr = nxt
                    continue
            yield from copy_pte_range(dst_vma, src_vma, dst_pmdp, src_pmdp, addr, nxt)
        addr = nxt
    return 0


def copy_huge_pud(dst_vma: VMA, src_vma: VMA, dst_pudp: Ptr, src_pudp: Ptr, addr: int) -> Gen[int]:
    """copy_huge_pud() [5.2]: a DAX PUD leaf, write-protected in both (reached only for VMAs that need
    copying; device-dax VMAs are shared and do not)."""
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    pool = src_mm.machine.pool
    yield from sched.spin_lock(dst_mm.page_table_lock)
    yield from sched.spin_lock(src_mm.page_table_lock)
    pud = pool.get(src_pudp)
    ret = -EAGAIN
    if pud_leaf(pud):
        _account_leaf(dst_mm, x86.pte_pfn(pud), HPAGE_PUD_NR, +1)
        pool.set(src_pudp, x86.pte_wrprotect(pud))
        pool.set(dst_pudp, x86.pte_wrprotect(pud) & ~_PAGE_ACCESSED)
        ret = 0
    sched.spin_unlock(src_mm.page_table_lock)
    sched.spin_unlock(dst_mm.page_table_lock)
    return ret


def copy_pud_range(dst_vma: VMA, src_vma: VMA, src_p4dp: Ptr, addr: int, end: int) -> Gen[int]:
    """copy_p4d_range() + copy_pud_range(): the child's upper tables are allocated first, then each PUD."""
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    pool = src_mm.machine.pool
    dpt = dst_mm.pt
    dst_p4dp = dpt.p4d_alloc(dpt.pgd_offset(addr), addr)
    dpt.pud_alloc(dst_p4dp, addr)
    while addr != end:
        nxt = PUD_LEVEL.addr_end(addr, end)
        src_pudp = src_mm.pt.pud_offset(src_p4dp, addr)
        dst_pudp = dpt.pud_offset(dst_p4dp, addr)
        pud = pool.get(src_pudp)
        if pud_leaf(pud):
            ret = yield from copy_huge_pud(dst_vma, src_vma, dst_pudp, src_pudp, addr)
            if ret == 0:
                addr = nxt
                continue
        elif not pte_none(pud):
            ret = yield from copy_pmd_range(dst_vma, src_vma, dst_pudp, src_pudp, addr, nxt)
            if ret:
                return ret
        addr = nxt
    return 0


def copy_hugetlb_page_range(dst_vma: VMA, src_vma: VMA) -> Gen[int]:
    """copy_hugetlb_page_range() (mm/hugetlb.c): share every huge entry with the child (one more mapping and
    reference); a COW mapping write-protects the parent's entries under one CLEAR ``[vm_start, vm_end)``.
    PMD sharing is not modelled."""
    dst_mm, src_mm = dst_vma.vm_mm, src_vma.vm_mm
    machine = src_mm.machine
    pool, mem = machine.pool, machine.mem
    hsize = PAGE_SIZE << src_vma.hstate_order
    nr = hsize // PAGE_SIZE
    want = "pud" if hsize == PUD_SIZE else "pmd"
    cow = is_cow_mapping(src_vma.vm_flags)
    r = None
    if cow:
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, src_vma, src_mm, src_vma.vm_start, src_vma.vm_end)
        yield from mmu_notifier_invalidate_range_start(r)
    dpt = dst_mm.pt
    for addr in range(src_vma.vm_start, src_vma.vm_end, hsize):
        level, src_p, e = src_mm.pt.lookup(addr)                 # huge_pte_offset()
        if src_p is None or level != want:
            continue
        dst_pudp = dpt.pud_alloc(dpt.p4d_alloc(dpt.pgd_offset(addr), addr), addr)   # huge_pte_alloc()
        dst_p = dst_pudp if want == "pud" else dpt.pmd_alloc(dst_pudp, addr)
        if want == "pud":
            dst_ptl, src_ptl = dst_mm.page_table_lock, src_mm.page_table_lock
        else:
            dst_ptl, src_ptl = pmd_lockptr(dst_mm, dst_p), pmd_lockptr(src_mm, src_p)
        yield from sched.spin_lock(dst_ptl)
        yield from sched.spin_lock(src_ptl)
        entry = pool.get(src_p)
        if pte_none(entry) or not pte_none(pool.get(dst_p)):
            pass
        elif not x86.pmd_present(entry):                          # migration / hwpoison
            s = pte_to_swp_entry(entry)
            if x86.is_writable_migration_entry(s) and cow:
                entry = swp_entry_to_pte(SwpEntry(int(SwpType.SWP_MIGRATION_READ), s.offset))
                pool.set(src_p, entry)
            pool.set(dst_p, entry)
        else:
            if cow:
                entry = x86.pte_wrprotect(entry)                  # huge_ptep_set_wrprotect()
                pool.set(src_p, entry)
            head = x86.pte_pfn(entry)
            _account_leaf(dst_mm, head, nr, +1)
            mem.flags[head: head + nr] &= ~np.uint32(PG.anon_exclusive)
            pool.set(dst_p, entry)
        sched.spin_unlock(src_ptl)
        sched.spin_unlock(dst_ptl)
    if r is not None:
        yield from mmu_notifier_invalidate_range_end(r)
    return 0


def copy_page_range(dst_vma: VMA, src_vma: VMA) -> Gen[int]:
    """copy_page_range(): copy the VMA's page tables to the child when they cannot be refilled by faults.

    A COW mapping's copy runs inside one PROTECTION_PAGE ``[vm_start, vm_end)`` of the parent ("a permission
    downgrade will only happen if is_cow_mapping() returns true").
    """
    if not vma_needs_copy(dst_vma, src_vma):
        return 0
    if is_vm_hugetlb_page(src_vma):
        return (yield from copy_hugetlb_page_range(dst_vma, src_vma))
    src_mm = src_vma.vm_mm
    start, end = src_vma.vm_start, src_vma.vm_end
    r = None
    if is_cow_mapping(src_vma.vm_flags):
        r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_PAGE, src_vma, src_mm, start, end)
        yield from mmu_notifier_invalidate_range_start(r)
    ret = 0
    for p4dp, a, nxt in src_mm.pt.p4d_range(start, end):
        ret = yield from copy_pud_range(dst_vma, src_vma, p4dp, a, nxt)
        if ret:
            break
    if r is not None:
        yield from mmu_notifier_invalidate_range_end(r)
    return ret


# --- fork -------------------------------------------------------------------------------------------------
def dup_mmap(mm: "MMStruct", oldmm: "MMStruct") -> Gen[int]:
    """dup_mmap(): copy the VMAs (and where needed the page tables) of ``oldmm`` into the new ``mm``, both
    mmap locks held for write.  0 or -ENOMEM."""
    yield from sched.down_write(oldmm.mmap_sem)
    yield from sched.down_write(mm.mmap_sem)                 # down_write_nested(): not linked in yet
    try:
        for mpnt in list(oldmm.vmas):
            if mpnt.vm_flags & VM.DONTCOPY:
                continue
            wipe = bool(mpnt.vm_flags & VM.WIPEONFORK)
            tmp = VMA(mm, mpnt.vm_start, mpnt.vm_end, mpnt.vm_flags & ~VM.LOCKED, mpnt.vm_pgoff, mpnt.vm_file,
                      mpnt.vm_ops, None if wipe else mpnt.anon_vma, mpnt.vm_page_prot, mpnt.hstate_order,
                      mpnt.devmap, dict(mpnt.extra))
            mm.insert_vma(tmp)
            if tmp.vm_file is not None and hasattr(tmp.vm_file, "inode"):
                from hmmirror.mm.mmap import file_i_mmap_rwsem
                lock = file_i_mmap_rwsem(tmp.vm_file)         # i_mmap_lock_write(): waits for rmap walks
                if lock is not None:
                    yield from sched.down_write(lock)
                tmp.vm_file.inode.i_mmap.append(tmp)          # vma_interval_tree_insert_after()
                if lock is not None:
                    sched.up_write(lock)
            if not wipe:                                       # "VM_WIPEONFORK gets a clean slate in the child"
                ret = yield from copy_page_range(tmp, mpnt)
                if ret:
                    return ret
            opener = getattr(tmp.vm_ops, "open", None) if tmp.vm_ops is not None else None
            if callable(opener):
                opener(tmp)
        return 0
    finally:
        sched.up_write(mm.mmap_sem)
        sched.up_write(oldmm.mmap_sem)


def dup_mm(parent_mm: "MMStruct", child_name: str) -> Gen["MMStruct | int"]:
    """dup_mm() (kernel/fork.c): a new mm for the child ``child_name``; the child mm, or -errno (the partial
    child is torn down)."""
    machine = parent_mm.machine
    mm = machine.new_mm(child_name)
    ret = yield from dup_mmap(mm, parent_mm)
    if ret:
        yield from mmput(mm)
        return ret
    machine.log("fork", mm=parent_mm.name, child=child_name)
    return mm


# --- teardown ---------------------------------------------------------------------------------------------
def exit_mmap(mm: "MMStruct") -> Gen[None]:
    """exit_mmap() (mm/mmap.c): ``mmu_notifier_release``, then one UNMAP ``[0, ULONG_MAX)`` around the zap of
    every VMA, then free_pgtables and remove the VMAs.  [6.18] under the mmap lock (read for the unmap, write
    for free_pgtables); [5.2] without it (no user is left)."""
    locked = mm.machine.profile.exit_mmap_takes_mmap_lock
    yield from mmu_notifier_release(mm)
    if locked:
        yield from sched.down_read(mm.mmap_sem)
    vmas = list(mm.vmas)
    if vmas:
        r = mmu_notifier_range_init(MMU_NOTIFY.UNMAP, vmas[0], mm, 0, ULONG_MAX)
        yield from mmu_notifier_invalidate_range_start(r)
        for vma in vmas:                                       # unmap_vmas() -> unmap_single_vma()
            yield from unmap_page_range(vma, vma.vm_start, vma.vm_end)
        yield from mmu_notifier_invalidate_range_end(r)
    if locked:
        sched.up_read(mm.mmap_sem)
        yield from sched.down_write(mm.mmap_sem)
    from hmmirror.mm.mmap import unlink_file_vma

    for vma in vmas:                                           # free_pgtables(): unlink_file_vma first
        yield from unlink_file_vma(vma)
    for vma in vmas:                                           # remove_vma()
        mm.remove_vma(vma)
    free_pgtables(mm, 0, mm.machine.geo.task_size + PAGE_SIZE)
    if locked:
        sched.up_write(mm.mmap_sem)


def __mmput(mm: "MMStruct") -> Gen[None]:
    """__mmput(): exit_mmap, drop the huge zero page reference [5.2], mmdrop."""
    yield from exit_mmap(mm)
    mm.huge_zero_ref = False                                   # mm_put_huge_zero_page()
    mm.exited = True
    mm.machine.log("exit_mmap", mm=mm.name)
    mmdrop(mm)
    if mm.mm_count == 0:
        mm.machine.pool.free(mm.pt.pgd)                        # __mmdrop() -> mm_free_pgd()


def mmput(mm: "MMStruct") -> Gen[int]:
    """mmput(): drop ``mm_users``; the last one tears the address space down.  Returns 0."""
    yield from sched.might_sleep("mmput")
    if mm.mm_users <= 0:
        sched.report("BUG_ON", f"mmput({mm.name}) with mm_users == {mm.mm_users}")
        return 0
    mm.mm_users -= 1
    if mm.mm_users == 0:
        yield from __mmput(mm)
    return 0


def mmget(mm: "MMStruct") -> None:
    """mmget(): one more user of the address space."""
    mm.mm_users += 1


def mmget_not_zero(mm: "MMStruct") -> bool:
    """mmget_not_zero(): a user reference unless the address space is already being torn down."""
    if mm.mm_users <= 0:
        return False
    mm.mm_users += 1
    return True
