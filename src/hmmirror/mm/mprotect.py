"""mprotect(2): change the protection of a range (mm/mprotect.c, and hugetlb_change_protection of mm/hugetlb.c).

``do_mprotect_pkey`` splits and merges VMAs (mm/mmap.py ``split_range`` / ``vma_merge_range``) and rewrites
every present entry of the range from the new ``vm_page_prot`` (``change_protection``): PROT_NONE makes entries
protnone with their pfn kept; write is removed when ``VM_WRITE`` goes.  Writable private entries lose write
(the VMA's protection is the COW one); [6.18] exclusive anonymous entries get write back at once
(``can_change_pte_writable``, obs A10), [5.2] they wait for a write fault that reuses them.  Shared writable
mappings under write-notify keep write on dirty entries in both versions.

MMU notifiers (mm-substrate.md §6): one PROTECTION_VMA per chunk of the walk that holds a populated entry, from
that entry's address to the chunk end (clipped to the range).  [5.2] the chunk is a PUD and the notifier lives
in ``change_pmd_range`` (populated = a PMD that is not none); [6.18] the chunk is a P4D and the notifier lives
in ``change_pud_range`` (populated = a PUD that is not none).  A THP only partly covered by a chunk is split
(CLEAR [2M)) inside that range; THPs straddling the VMA split points are split by ``__split_vma`` before.
hugetlb VMAs: one PROTECTION_VMA over the VMA's part of the range, populated or not.

Followed: v5.2 mm/mprotect.c (do_mprotect_pkey, mprotect_fixup, change_*_range) and mm/huge_memory.c
change_huge_pmd; v6.18 mm/mprotect.c (change_pud_range with the notifier, can_change_pte_writable,
vma_wants_manual_pte_write_upgrade) and change_huge_pmd / change_huge_pud.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PAGE_SIZE,
    PMD_LEVEL,
    PMD_SIZE,
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
from hmmirror.errors import InputError
from hmmirror.include.mm_types import MMU_NOTIFY, PROT, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import pmd_lockptr, pte_lockptr
from hmmirror.mm.mm_struct import VMA, is_vm_hugetlb_page, vm_set_page_prot, vma_wants_writenotify
from hmmirror.mm.mmap import calc_vm_prot_bits, page_align, split_range, vma_merge_range
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, ENOMEM, EACCES = 22, 12, 13
PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
_VM_ACCESS = VM.READ | VM.WRITE | VM.EXEC
_ULONG_MAX = (1 << 64) - 1

# pte_modify(): the bits an entry keeps (pfn, A/D, special, devmap, PSE, soft-dirty), as the x86 helper
# defines them; everything else comes from the new protection.
_KEEP = x86.pte_modify((1 << 64) - 1, 0)
_KEEP_U = np.uint64(_KEEP)
_PRESENT_U = np.uint64(_PAGE_PRESENT | _PAGE_PROTNONE)
_P_U = np.uint64(_PAGE_PRESENT)
_RW_U = np.uint64(_PAGE_RW)
_SPECIAL_U = np.uint64(_PAGE_SPECIAL)
_DIRTY_U = np.uint64(_PAGE_DIRTY)
_PFN_U = np.uint64(PTE_PFN_MASK)
_ANON_EXCL = PG.anon | PG.anon_exclusive


# --- deciders ---------------------------------------------------------------------------------------------
def vma_wants_manual_pte_write_upgrade(vma: VMA) -> bool:
    """vma_wants_manual_pte_write_upgrade() [6.18] / ``dirty_accountable`` [5.2]: may change_protection set the
    write bit itself?  Shared: under write-notify (dirty entries); private: [6.18] when ``VM_WRITE``
    (exclusive anon entries, obs A10), [5.2] never."""
    if vma.vm_flags & VM.SHARED:
        return vma_wants_writenotify(vma)
    return bool(vma.vm_flags & VM.WRITE) and vma.vm_mm.machine.profile.mprotect_keeps_exclusive_writable


def _writable_upgrade_mask(vma: VMA, ents: np.ndarray, special_ok: bool) -> np.ndarray:
    """can_change_pte_writable() over an array of new entries (true where write may be set in place).

    Accessible (not protnone), not already writable; private: a normal anonymous exclusive page; shared: dirty.
    """
    mem = vma.vm_mm.machine.mem
    cand = ((ents & _P_U) != 0) & ((ents & _RW_U) == 0)
    if not cand.any():
        return cand
    if vma.vm_flags & VM.SHARED:
        return cand & ((ents & _DIRTY_U) != 0)
    if not special_ok:
        cand &= (ents & _SPECIAL_U) == 0                   # vm_normal_page(): special entries have no page
    if vma.vm_flags & VM.PFNMAP:
        return np.zeros_like(cand)
    pfns = ((ents & _PFN_U) >> np.uint64(12)).astype(np.int64)
    inside = cand & (pfns < mem.nr_pfns)
    ok = np.zeros_like(cand)
    if inside.any():
        fl = mem.flags[pfns[inside]]
        ok[inside] = (fl & _ANON_EXCL) == _ANON_EXCL
    return ok


def _wrprotect_nonpresent(e: int) -> int:
    """change_pte_range() / change_huge_pmd() for swap-format entries: writable migration and device-private
    entries become readable ("a protection check is difficult so just be safe and disable write")."""
    s = pte_to_swp_entry(e)
    if s.type == SwpType.SWP_MIGRATION_WRITE:
        return swp_entry_to_pte(SwpEntry(int(SwpType.SWP_MIGRATION_READ), s.offset))
    if s.type == SwpType.SWP_DEVICE_PRIVATE_WRITE:
        return swp_entry_to_pte(SwpEntry(int(SwpType.SWP_DEVICE_PRIVATE_READ), s.offset))
    return e


# --- the walk ---------------------------------------------------------------------------------------------
def change_pte_range(vma: VMA, pmdp: Ptr, addr: int, end: int, newprot: int, upgrade: bool) -> Gen[int]:
    """change_pte_range(): rewrite the PTEs of ``[addr, end)`` in one table under its PTE lock (vectorised)."""
    mm = vma.vm_mm
    pool = mm.machine.pool
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    tid = table_id_of(pool.get(pmdp))
    lo = (addr >> 12) & (PTRS_PER_TABLE - 1)
    hi = lo + ((end - addr) >> 12)
    old = pool.tables[tid, lo:hi].copy()
    present = (old & _PRESENT_U) != 0
    new = np.where(present, (old & _KEEP_U) | (np.uint64(newprot) & ~_KEEP_U), old)
    if upgrade:
        new[_writable_upgrade_mask(vma, new, False) & present] |= _RW_U
    swap = ~present & (old != 0)
    if swap.any():
        for i in np.nonzero(swap)[0].tolist():
            new[i] = _wrprotect_nonpresent(int(old[i]))
    pool.tables[tid, lo:hi] = new
    sched.spin_unlock(ptl)
    return int(present.sum())


def change_huge_pmd(vma: VMA, pmdp: Ptr, addr: int, newprot: int, upgrade: bool) -> Gen[int]:
    """change_huge_pmd(): a whole PMD leaf (THP, huge zero page, DAX) or PMD migration entry, under the PMD
    lock.  Returns HPAGE_PMD_NR, or 0 when the entry is no longer huge (the caller looks again)."""
    mm = vma.vm_mm
    pool = mm.machine.pool
    ptl = pmd_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    pmd = pool.get(pmdp)
    if pte_none(pmd) or (not pmd_leaf(pmd) and pmd & _PAGE_PRESENT):
        sched.spin_unlock(ptl)
        return 0
    if not x86.pmd_present(pmd):                       # PMD migration entry
        pool.set(pmdp, _wrprotect_nonpresent(pmd))
    else:
        entry = x86.pte_modify(pmd, newprot)
        if upgrade and _writable_upgrade_mask(vma, np.array([entry], dtype=np.uint64), True)[0]:
            entry = x86.pte_mkwrite(entry)            # can_change_pmd_writable() [6.18]
        pool.set(pmdp, entry)
    sched.spin_unlock(ptl)
    return x86.HPAGE_PMD_NR


def change_huge_pud(vma: VMA, pudp: Ptr, addr: int, newprot: int) -> Gen[int]:
    """change_huge_pud() [6.18]: a whole PUD leaf (device-dax 1 GiB) under the PUD lock."""
    mm = vma.vm_mm
    pool = mm.machine.pool
    yield from sched.spin_lock(mm.page_table_lock)
    pud = pool.get(pudp)
    if not pud_leaf(pud):
        sched.spin_unlock(mm.page_table_lock)
        return 0
    pool.set(pudp, x86.pte_modify(pud, newprot))
    sched.spin_unlock(mm.page_table_lock)
    return x86.HPAGE_PUD_NR


def change_pmd_range(vma: VMA, pudp: Ptr, addr: int, end: int, newprot: int, upgrade: bool,
                     notify: bool) -> Gen[int]:
    """change_pmd_range(): [5.2] owns the PROTECTION_VMA notifier (``notify``): started at the first PMD that
    is not none, ended after the loop.  A huge PMD only partly inside ``[addr, end)`` is split first."""
    from hmmirror.mm.huge_memory import __split_huge_pmd

    mm = vma.vm_mm
    pool = mm.machine.pool
    r = None
    pages = 0
    while addr != end:
        nxt = PMD_LEVEL.addr_end(addr, end)
        pmdp = mm.pt.pmd_offset(pudp, addr)
        pmd = pool.get(pmdp)
        if not pte_none(pmd):
            if notify and r is None:
                # [5.2] "invoke the mmu notifier if the pmd is populated"
                r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_VMA, vma, mm, addr, end)
                yield from mmu_notifier_invalidate_range_start(r)
            huge = pmd_leaf(pmd) or not pmd & _PAGE_PRESENT
            n = 0
            if huge and nxt - addr == PMD_SIZE:
                n = yield from change_huge_pmd(vma, pmdp, addr, newprot, upgrade)
                pages += n
            if not n:                                   # partly covered, or no longer huge: PTE level
                if huge and nxt - addr != PMD_SIZE:
                    yield from __split_huge_pmd(vma, pmdp, addr)      # CLEAR [2M), nested in the range
                pmd = pool.get(pmdp)
                if not pte_none(pmd) and not pmd_leaf(pmd) and pmd & _PAGE_PRESENT:
                    pages += yield from change_pte_range(vma, pmdp, addr, nxt, newprot, upgrade)
        yield from sched.preempt_point("change_pmd_range")         # cond_resched()
        addr = nxt
    if r is not None:
        yield from mmu_notifier_invalidate_range_end(r)
    return pages


def change_pud_range(vma: VMA, p4dp: Ptr, addr: int, end: int, newprot: int, upgrade: bool) -> Gen[int]:
    """change_pud_range(): [6.18] owns the PROTECTION_VMA notifier, started at the first PUD that is not none
    (ended after the loop); PUD leaves are changed in place or split.  [5.2] the notifier is per PMD table
    (change_pmd_range) and PUD leaves never get here (rejected by ``do_mprotect_pkey``)."""
    from hmmirror.mm.huge_memory import __split_huge_pud

    mm = vma.vm_mm
    pool = mm.machine.pool
    at_pud = mm.machine.profile.mprotect_chunk_shift > PUD_LEVEL.shift
    r = None
    pages = 0
    while addr != end:
        nxt = PUD_LEVEL.addr_end(addr, end)
        pudp = mm.pt.pud_offset(p4dp, addr)
        pud = pool.get(pudp)
        if not pte_none(pud):
            if at_pud and r is None:
                r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_VMA, vma, mm, addr, end)
                yield from mmu_notifier_invalidate_range_start(r)
            if pud_leaf(pud):
                if nxt - addr == PUD_SIZE:
                    pages += yield from change_huge_pud(vma, pudp, addr, newprot)
                else:
                    yield from __split_huge_pud(vma, pudp, addr)      # DAX PUD: cleared, refaults later
            else:
                pages += yield from change_pmd_range(vma, pudp, addr, nxt, newprot, upgrade, not at_pud)
        addr = nxt
    if r is not None:
        yield from mmu_notifier_invalidate_range_end(r)
    return pages


def change_protection_range(vma: VMA, start: int, end: int, newprot: int, upgrade: bool) -> Gen[int]:
    """change_protection_range(): walk the present P4D (PGD) entries of ``[start, end)``."""
    pages = 0
    for p4dp, a, nxt in vma.vm_mm.pt.p4d_range(start, end):
        pages += yield from change_pud_range(vma, p4dp, a, nxt, newprot, upgrade)
    return pages


def hugetlb_change_protection(vma: VMA, start: int, end: int, newprot: int) -> Gen[int]:
    """hugetlb_change_protection() (mm/hugetlb.c, 5.2 and 6.18): one PROTECTION_VMA over ``[start, end)``,
    then every huge entry rewritten under its lock (2 MiB: the PMD table lock, 1 GiB: ``page_table_lock``).

    PMD sharing (``adjust_range_if_pmd_sharing_possible``) is not modelled: the range is not widened.
    """
    mm = vma.vm_mm
    pool = mm.machine.pool
    hsize = PAGE_SIZE << vma.hstate_order
    r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_VMA, vma, mm, start, end)
    yield from mmu_notifier_invalidate_range_start(r)
    pages = 0
    for addr in range(start, end, hsize):
        level, p, e = mm.pt.lookup(addr)                     # huge_pte_offset()
        want = "pud" if hsize == PUD_SIZE else "pmd"
        if p is None or level != want or pte_none(e):
            continue
        lock = mm.page_table_lock if want == "pud" else pmd_lockptr(mm, p)
        yield from sched.spin_lock(lock)
        e = pool.get(p)
        if not pte_none(e):
            if x86.pmd_present(e):
                pool.set(p, x86.pte_modify(e, newprot))
                pages += 1
            else:                                            # migration: made readable; hwpoison: kept
                pool.set(p, _wrprotect_nonpresent(e))
        sched.spin_unlock(lock)
    yield from mmu_notifier_invalidate_range_end(r)
    return pages


def change_protection(vma: VMA, start: int, end: int, upgrade: bool) -> Gen[int]:
    """change_protection(): to ``vma.vm_page_prot``; hugetlb VMAs have their own walk."""
    if is_vm_hugetlb_page(vma):
        return (yield from hugetlb_change_protection(vma, start, end, vma.vm_page_prot))
    return (yield from change_protection_range(vma, start, end, vma.vm_page_prot, upgrade))


# --- VMA level --------------------------------------------------------------------------------------------
def mprotect_fixup(vma: VMA, start: int, end: int, newflags: int) -> Gen[int]:
    """mprotect_fixup(): split ``vma`` at ``start``/``end`` (THPs there are split, CLEAR [2M)), set the flags
    and the page protection, rewrite the entries, merge with compatible neighbours.  0 or -errno."""
    mm = vma.vm_mm
    oldflags = vma.vm_flags
    if newflags == oldflags:
        return 0
    ret = yield from split_range(mm, start, end)
    if ret:
        return ret
    vma = mm.vma_lookup(start)
    assert vma is not None and vma.vm_start == start and vma.vm_end == end
    vma.vm_flags = newflags
    vma.vm_page_prot = vm_set_page_prot(vma)
    yield from change_protection(vma, start, end, vma_wants_manual_pte_write_upgrade(vma))
    vma_merge_range(mm, start, end)
    # "Private VM_LOCKED VMA becoming writable: trigger COW to avoid major fault on access."
    if (oldflags & (VM.WRITE | VM.SHARED | VM.LOCKED)) == VM.LOCKED and newflags & VM.WRITE:
        from hmmirror.mm.gup import populate_vma_page_range
        cur = mm.vma_lookup(start)
        if cur is not None:
            yield from populate_vma_page_range(cur, start, end)
    return 0


def _reject_pud_leaves(mm: "MMStruct", start: int, end: int) -> None:
    """[5.2] change_pud_range() treats a PUD leaf as a bad PUD and clears it (mm-substrate.md §6): not modelled;
    the call is refused before anything changes."""
    addr = start & ~(PUD_SIZE - 1)
    while addr < end:
        level, p, e = mm.pt.lookup(addr)
        if level == "pud" and p is not None and pud_leaf(e):
            vma = mm.vma_lookup(max(addr, start))
            if vma is not None and not is_vm_hugetlb_page(vma):
                raise InputError(
                    f"mprotect over the 1 GiB PUD leaf at {addr:#x} is not modelled for kernel 5.2 (the 5.2 walk "
                    f"clears it as a bad PUD); use the 6.18 profile or avoid PUD-mapped ranges", "EOPNOTSUPP")
        addr += PUD_SIZE


def do_mprotect_pkey(mm: "MMStruct", start: int, len_: int, prot: int, pkey: int = -1) -> Gen[int]:
    """do_mprotect_pkey() (mm/mprotect.c): takes the mmap lock for write.  0 or -errno.

    -EINVAL: ``start`` not page aligned, unknown ``prot`` bits, PROT_GROWSDOWN/UP (no VM_GROWS* in the
    model), a pkey (none is allocated), a hugetlb/device-dax split at an unaligned address; -ENOMEM: the range
    reaches an unmapped hole (VMAs before the hole keep their new protection, as in the kernel); -EACCES:
    the protection asks for more than the VMA's ``VM_MAY*`` allow.
    """
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~(PROT_GROWSDOWN | PROT_GROWSUP)
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        return -EINVAL
    if start & (PAGE_SIZE - 1):
        return -EINVAL
    if not len_:
        return 0
    if len_ < 0 or start + page_align(len_) > _ULONG_MAX:
        return -ENOMEM                                       # PAGE_ALIGN wrapped: end <= start
    end = start + page_align(len_)
    if prot & ~(PROT.READ | PROT.WRITE | PROT.EXEC | PROT_SEM):
        return -EINVAL                                       # arch_validate_prot()
    yield from sched.down_write(mm.mmap_sem)
    try:
        if pkey != -1:
            return -EINVAL                                   # !mm_pkey_is_allocated()
        ret = yield from _mprotect_locked(mm, start, end, prot, grows)
    finally:
        sched.up_write(mm.mmap_sem)
    if ret == 0:
        mm.machine.log("mprotect", mm=mm.name, start=start, end=end, prot=prot)
    return ret


def _mprotect_locked(mm: "MMStruct", start: int, end: int, prot: int, grows: int) -> Gen[int]:
    """The VMA loop of do_mprotect_pkey() (mmap lock held for write)."""
    vma = mm.find_vma(start)
    if vma is None:
        return -ENOMEM
    if grows & PROT_GROWSDOWN:
        return -EINVAL                                       # the VMA has no VM_GROWSDOWN
    if vma.vm_start > start:
        return -ENOMEM
    if grows & PROT_GROWSUP:
        return -EINVAL                                       # VM_GROWSUP is 0 on x86
    if not mm.machine.profile.mprotect_pud_leaf:
        _reject_pud_leaves(mm, start, end)
    nstart = start
    while True:
        newflags = calc_vm_prot_bits(prot) | (vma.vm_flags & ~_VM_ACCESS)
        # newflags >> 4 shifts VM_MAY* in place of VM_*
        if (newflags & ~(newflags >> 4)) & _VM_ACCESS:
            return -EACCES
        tmp = min(vma.vm_end, end)
        ret = yield from mprotect_fixup(vma, nstart, tmp, newflags)
        if ret:
            return ret
        prev = mm.vma_lookup(tmp - 1)                        # may have merged beyond tmp
        nstart = max(tmp, prev.vm_end) if prev is not None else tmp
        if nstart >= end:
            return 0
        vma = mm.find_vma(nstart)
        if vma is None or vma.vm_start != nstart:
            return -ENOMEM
