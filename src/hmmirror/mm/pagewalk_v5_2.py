"""The generic page-table walker of Linux 5.2 (mm/pagewalk.c [5.2]), as HMM 5.2 uses it.

Version followed: the 5.2-era ``mm/pagewalk.c`` described in hmm-5.2.md §6 (callbacks *inside*
``struct mm_walk``, ``walk_page_range(start, end, walk)``, ``pud_entry`` called under
``pud_trans_huge_lock``), re-read against stored 5.2/5.3-era copies of the file (the 5.3 ``mm_walk_ops``
conversion only moved the callbacks; the level loops are the same).  5.4 and later replaced this shape
(``walk_page_range(mm, start, end, ops, private)``, ``ACTION_*``, depth argument of ``pte_hole``); the
modern profile has its own walker.

Shape of every level (the kernel's loop, kept so the two can be read side by side)::

    next = pXd_addr_end(addr, end)
    if none:      pte_hole(addr, next)          # a non-zero result stops the walk
    else:         callback or descend
    while (addr = next) != end

Per level (hmm-5.2.md §6 table):

========  =====================================================  ==========================================
level     condition                                              action (lock held during the callback)
========  =====================================================  ==========================================
PGD/P4D   ``pXd_none_or_clear_bad``                               ``pte_hole`` (none)
PUD       ``pud_none`` or ``walk.vma is None``                    ``pte_hole`` (none)
PUD       ``pud_trans_huge_lock`` returns the lock                ``pud_entry``, no descent (``mm.page_table_lock``)
PUD       otherwise                                               ``split_huge_pud``; re-test if none; descend
PMD       ``pmd_none`` or ``walk.vma is None``                    ``pte_hole`` (none)
PMD       otherwise                                               ``pmd_entry``; with ``pte_entry``: split, descend
hugetlb   per huge page ``huge_pte_offset``                       ``hugetlb_entry`` or ``pte_hole`` (none)
========  =====================================================  ==========================================

Model conventions:

* Every walker function and every callback is a generator (callbacks may fault and sleep); a callback
  returns its int result through ``StopIteration`` (``err = yield from walk.pmd_entry(...)``).
* Pointers to entries (``pud_t *``) are ``(table_id, index)`` pairs of :class:`~hmmirror.mm.pgtable.TablePool`;
  ``pmd++`` is ``(tid, index + 1)``.
* The 5.2 walker has no ``cond_resched`` between PMD entries; the model adds a
  :func:`~hmmirror.kernel.sched.preempt_point` there (a place where the kernel can be preempted on a
  preemptible kernel), so a simulator can interleave other tasks between two PMD chunks.
* The diagnostic ``VM_BUG_ON_MM(!rwsem_is_locked(&walk->mm->mmap_sem))`` of ``walk_page_range`` and
  ``pud_trans_huge_lock`` is checked (CONFIG_DEBUG_VM is assumed on: the model is a checker) and reported
  through :func:`~hmmirror.kernel.sched.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_LEVEL,
    PUD_LEVEL,
    pmd_devmap,
    pmd_none,
    pmd_present,
    pmd_trans_huge,
    pud_devmap,
    pud_none,
    pud_trans_huge,
    pte_none,
)
from hmmirror.include.mm_types import VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.hugetlb import huge_page_order, huge_pte_offset
from hmmirror.mm.mm_struct import is_vm_hugetlb_page
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

EINVAL = 22

#: ``int (*pud_entry)(pud_t *pud, unsigned long addr, unsigned long next, struct mm_walk *walk)`` etc.:
#: every callback is a generator function returning an int.
Callback = Callable[..., Gen[int]]


# --- struct mm_walk (include/linux/mm.h [5.2]) -------------------------------------------------------------
@dataclass(eq=False)
class MmWalk:
    """``struct mm_walk`` [5.2]: the callbacks live *inside* the walk (5.3 moved them to ``mm_walk_ops``).

    * ``pud_entry(pudp, addr, next, walk)``: called with the PUD lock held, only for trans-huge/devmap PUDs.
    * ``pmd_entry(pmdp, addr, next, walk)``: every non-none PMD; must handle huge PMDs itself.
    * ``pte_entry(ptep, addr, next, walk)``: every PTE (the walker splits huge PMDs first).
    * ``pte_hole(addr, next, walk)``: a range without a table (or outside any VMA).
    * ``hugetlb_entry(ptep, hmask, addr, next, walk)``: one call per huge page of a hugetlb VMA.
    * ``test_walk(start, end, walk)``: 0 walk the VMA, 1 skip it, < 0 stop.

    ``mm`` is the address space, ``vma`` the current VMA (None in a gap between VMAs), ``private`` the
    caller's state (HMM: its ``struct hmm_vma_walk``).
    """

    pud_entry: Callback | None = None
    pmd_entry: Callback | None = None
    pte_entry: Callback | None = None
    pte_hole: Callback | None = None
    hugetlb_entry: Callback | None = None
    test_walk: Callback | None = None
    mm: "MMStruct | None" = None
    vma: "VMA | None" = None
    private: Any = None


# --- helpers the walker calls (include/linux/pgtable.h, huge_mm.h, hugetlb.h [5.2]) ----------------------
def pgd_none_or_clear_bad(mm: "MMStruct", pgdp: Ptr) -> bool:
    """pgd_none_or_clear_bad(): none -> True; a bad entry is reported, cleared (pgd_clear_bad) -> True.

    With 4-level paging the P4D is folded onto the PGD: ``pgd_none`` is always false and the hole is seen
    at the P4D step.
    """
    if mm.pt.geo.p4d_folded:
        return False
    return _none_or_clear_bad(mm, pgdp, "pgd")


def p4d_none_or_clear_bad(mm: "MMStruct", p4dp: Ptr) -> bool:
    """p4d_none_or_clear_bad()."""
    return _none_or_clear_bad(mm, p4dp, "p4d")


def _none_or_clear_bad(mm: "MMStruct", p: Ptr, level: str) -> bool:
    pool = mm.machine.pool
    e = pool.get(p)
    if pte_none(e):
        return True
    # pXd_bad(): a table entry is _KERNPG_TABLE (| _PAGE_USER); anything else is bad
    if (e & x86.PTE_FLAGS_MASK & ~x86._PAGE_USER) != (x86._PAGE_TABLE & ~x86._PAGE_USER):
        mm.machine.log(f"{level}_clear_bad", mm=mm.name, entry=e)     # pgd_ERROR(): "bad pgd"
        pool.set(p, 0)
        return True
    return False


def pmd_trans_unstable(pmd: int) -> bool:
    """pmd_trans_unstable() / pmd_none_or_trans_huge_or_clear_bad(): none, huge or a migration entry."""
    return pmd_none(pmd) or pmd_trans_huge(pmd) or pmd_devmap(pmd) or not pmd_present(pmd)


def pud_trans_huge_lock(pudp: Ptr, vma: "VMA") -> Gen[Lock | None]:
    """pud_trans_huge_lock() (include/linux/huge_mm.h [5.2]): the locked PUD lock if ``*pud`` is trans-huge
    or devmap (rechecked under the lock), else None without holding it.

    The PUD lock on x86-64 is ``mm.page_table_lock`` (``pud_lockptr``).
    """
    mm = vma.vm_mm
    if not mm.mmap_sem.is_locked():
        sched.report("VM_BUG_ON_VMA", f"pud_trans_huge_lock on {vma} without mmap_sem")
    pool = mm.machine.pool
    pud = pool.get(pudp)
    if not (pud_trans_huge(pud) or pud_devmap(pud)):
        return None
    # __pud_trans_huge_lock()
    ptl = mm.page_table_lock
    yield from sched.spin_lock(ptl)
    pud = pool.get(pudp)
    if pud_trans_huge(pud) or pud_devmap(pud):
        return ptl
    sched.spin_unlock(ptl)
    return None


def split_huge_pud(vma: "VMA | None", pudp: Ptr, address: int) -> Gen[None]:
    """split_huge_pud() (include/linux/huge_mm.h [5.2], a macro): ``__split_huge_pud`` if ``*pud`` is
    trans-huge or devmap.

    ``__split_huge_pud`` emits a CLEAR notifier over the 1 GiB block (may sleep) and then takes the PUD lock
    (``mm.page_table_lock``); called with that lock already held (HMM's ``hmm_vma_walk_pud`` split path)
    this is a sleep in atomic context followed by a recursive spinlock, which the model reports.
    """
    if vma is None:
        return
    pud = vma.vm_mm.machine.pool.get(pudp)
    if pud_trans_huge(pud) or pud_devmap(pud):
        from hmmirror.mm.huge_memory import __split_huge_pud
        yield from __split_huge_pud(vma, pudp, address)


def split_huge_pmd(vma: "VMA", pmdp: Ptr, address: int) -> Gen[None]:
    """split_huge_pmd() (a macro): ``__split_huge_pmd`` for a trans-huge, devmap or migration PMD."""
    pmd = vma.vm_mm.machine.pool.get(pmdp)
    if pmd_trans_huge(pmd) or pmd_devmap(pmd) or (not pmd_none(pmd) and not pmd_present(pmd)):
        from hmmirror.mm.huge_memory import __split_huge_pmd
        yield from __split_huge_pmd(vma, pmdp, address)


def huge_page_shift_of(vma: "VMA") -> int:
    """Ours: ``huge_page_shift(hstate_vma(vma))``: 21 for 2 MiB pages, 30 for 1 GiB pages."""
    return PAGE_SHIFT + huge_page_order(vma)


# --- the level loops (mm/pagewalk.c [5.2]) ---------------------------------------------------------------
def walk_pte_range(pmdp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pte_range() [5.2]: ``pte_entry`` for every PTE of ``[addr, end)`` (within one PTE table)."""
    assert walk.mm is not None and walk.pte_entry is not None
    pt = walk.mm.pt
    err = 0
    ptep = pt.pte_offset_map(pmdp, addr)
    walk.mm.machine.log("pte_offset_map", mm=walk.mm.name, addr=addr, caller="walk_pte_range")
    sched.pte_map_get("mm.pagewalk_v5_2.walk_pte_range")
    while True:
        err = yield from walk.pte_entry(ptep, addr, addr + PAGE_SIZE, walk)
        if err:
            break
        addr += PAGE_SIZE
        if addr == end:
            break
        ptep = (ptep[0], ptep[1] + 1)
    walk.mm.machine.log("pte_unmap", mm=walk.mm.name, addr=addr, caller="walk_pte_range")
    sched.pte_map_put("mm.pagewalk_v5_2.walk_pte_range")
    return err


def walk_pmd_range(pudp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pmd_range() [5.2]: ``pte_hole`` for none PMDs (or in a gap), else ``pmd_entry``; descends to the
    PTEs only when ``pte_entry`` is set (splitting a huge PMD first)."""
    assert walk.mm is not None
    pool = walk.mm.machine.pool
    err = 0
    pmdp = walk.mm.pt.pmd_offset(pudp, addr)
    while True:
        nxt = PMD_LEVEL.addr_end(addr, end)
        while True:                                          # again:
            if pmd_none(pool.get(pmdp)) or walk.vma is None:
                if walk.pte_hole is not None:
                    err = yield from walk.pte_hole(addr, nxt, walk)
                break                                        # if (err) break; continue;
            # This implies that each ->pmd_entry() handler needs to know about pmd_trans_huge() pmds
            if walk.pmd_entry is not None:
                err = yield from walk.pmd_entry(pmdp, addr, nxt, walk)
            if err:
                break
            # Check this here so we only break down trans_huge pages when we _need_ to
            if walk.pte_entry is None:
                break
            yield from split_huge_pmd(walk.vma, pmdp, addr)
            if pmd_trans_unstable(pool.get(pmdp)):
                continue                                     # goto again
            err = yield from walk_pte_range(pmdp, addr, nxt, walk)
            break
        if err:
            break
        addr = nxt
        if addr == end:
            break
        pmdp = (pmdp[0], pmdp[1] + 1)
        yield from sched.preempt_point("walk_pmd_range")    # model: preemptible between PMD entries
    return err


def walk_pud_range(p4dp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pud_range() [5.2]: ``pte_hole`` for none PUDs (or in a gap); ``pud_entry`` under the PUD lock
    for trans-huge/devmap PUDs (no descent); otherwise ``split_huge_pud`` and the PMD level."""
    assert walk.mm is not None
    pool = walk.mm.machine.pool
    err = 0
    pudp = walk.mm.pt.pud_offset(p4dp, addr)
    while True:
        nxt = PUD_LEVEL.addr_end(addr, end)
        while True:                                          # again:
            if pud_none(pool.get(pudp)) or walk.vma is None:
                if walk.pte_hole is not None:
                    err = yield from walk.pte_hole(addr, nxt, walk)
                break
            if walk.pud_entry is not None:
                ptl = yield from pud_trans_huge_lock(pudp, walk.vma)
                if ptl is not None:
                    err = yield from walk.pud_entry(pudp, addr, nxt, walk)
                    sched.spin_unlock(ptl)
                    break                                    # if (err) break; continue;
            yield from split_huge_pud(walk.vma, pudp, addr)
            if pud_none(pool.get(pudp)):
                continue                                     # goto again
            if walk.pmd_entry is not None or walk.pte_entry is not None:
                err = yield from walk_pmd_range(pudp, addr, nxt, walk)
            break
        if err:
            break
        addr = nxt
        if addr == end:
            break
        pudp = (pudp[0], pudp[1] + 1)
    return err


def walk_p4d_range(pgdp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_p4d_range() [5.2]."""
    assert walk.mm is not None
    mm = walk.mm
    geo = mm.pt.geo
    err = 0
    while True:
        nxt = geo.p4d.addr_end(addr, end)
        p4dp = mm.pt.p4d_offset(pgdp, addr)
        if p4d_none_or_clear_bad(mm, p4dp):
            if walk.pte_hole is not None:
                err = yield from walk.pte_hole(addr, nxt, walk)
        elif walk.pmd_entry is not None or walk.pte_entry is not None:
            err = yield from walk_pud_range(p4dp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_pgd_range(addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pgd_range() [5.2]."""
    assert walk.mm is not None
    mm = walk.mm
    geo = mm.pt.geo
    err = 0
    while True:
        nxt = geo.pgd.addr_end(addr, end)
        pgdp = mm.pt.pgd_offset(addr)
        if pgd_none_or_clear_bad(mm, pgdp):
            if walk.pte_hole is not None:
                err = yield from walk.pte_hole(addr, nxt, walk)
        elif walk.pmd_entry is not None or walk.pte_entry is not None:
            err = yield from walk_p4d_range(pgdp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def hugetlb_entry_end(shift: int, addr: int, end: int) -> int:
    """hugetlb_entry_end(): the next huge-page boundary after ``addr``, clipped to ``end``."""
    size = 1 << shift
    boundary = (addr & ~(size - 1)) + size
    return boundary if boundary < end else end


def walk_hugetlb_range(addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_hugetlb_range() [5.2]: ``hugetlb_entry(pte, hmask, addr, next)`` per huge page, ``pte_hole``
    where ``huge_pte_offset`` finds no entry.  No lock is held around the callbacks."""
    vma, mm = walk.vma, walk.mm
    assert vma is not None and mm is not None and walk.hugetlb_entry is not None
    shift = huge_page_shift_of(vma)
    sz = 1 << shift
    hmask = ~(sz - 1) & ((1 << 64) - 1)                      # huge_page_mask(h)
    err = 0
    while True:
        nxt = hugetlb_entry_end(shift, addr, end)
        pte = huge_pte_offset(mm, addr & hmask, sz)
        if pte is not None:
            err = yield from walk.hugetlb_entry(pte, hmask, addr, nxt, walk)
        elif walk.pte_hole is not None:
            err = yield from walk.pte_hole(addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_page_test(start: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_page_test() [5.2]: ``test_walk`` if given; else a ``VM_PFNMAP`` VMA is handed to ``pte_hole``
    (if any) and skipped (result 1), every other VMA is walked (0)."""
    vma = walk.vma
    assert vma is not None
    if walk.test_walk is not None:
        return (yield from walk.test_walk(start, end, walk))
    if vma.vm_flags & VM.PFNMAP:
        err = 1
        if walk.pte_hole is not None:
            err = yield from walk.pte_hole(start, end, walk)
        return err if err else 1
    return 0


def __walk_page_range(start: int, end: int, walk: MmWalk) -> Gen[int]:
    """__walk_page_range() [5.2]: hugetlb VMAs go to ``walk_hugetlb_range`` (only if ``hugetlb_entry`` is
    set), everything else (a gap included) to ``walk_pgd_range``."""
    vma = walk.vma
    if vma is not None and is_vm_hugetlb_page(vma):
        if walk.hugetlb_entry is not None:
            return (yield from walk_hugetlb_range(start, end, walk))
        return 0
    return (yield from walk_pgd_range(start, end, walk))


def walk_page_range(start: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_page_range(start, end, walk) (mm/pagewalk.c [5.2]): walk ``[start, end)`` VMA by VMA.

    Returns 0, -EINVAL (``start >= end`` or no ``walk.mm``), or the first non-zero callback result.  In a gap
    between VMAs ``walk.vma`` is None and only ``pte_hole`` is called (per PGD/P4D/PUD chunk).

    Locking: the caller holds ``walk.mm.mmap_sem`` (for read at least); checked as the kernel's
    ``VM_BUG_ON_MM`` of diagnostic builds.
    """
    if start >= end:
        return -EINVAL
    mm = walk.mm
    if mm is None:
        return -EINVAL
    if not mm.mmap_sem.is_locked():
        sched.report("VM_BUG_ON_MM", f"walk_page_range({start:#x}, {end:#x}) on {mm.name} without mmap_sem")
    mm.machine.counters["walk_page_range"] += 1
    err = 0
    vma = mm.find_vma(start)
    while True:
        skip = False
        if vma is None:                                      # after the last vma
            walk.vma = None
            nxt = end
        elif start < vma.vm_start:                           # outside vma
            walk.vma = None
            nxt = min(end, vma.vm_start)
        else:                                                # inside vma
            walk.vma = vma
            nxt = min(end, vma.vm_end)
            vma = mm.find_vma(vma.vm_end)                    # vma = vma->vm_next
            err = yield from walk_page_test(start, nxt, walk)
            if err > 0:
                # positive return values are purely for controlling the pagewalk
                err = 0
                skip = True
            elif err < 0:
                break
        if not skip:
            if walk.vma is not None or walk.pte_hole is not None:
                err = yield from __walk_page_range(start, nxt, walk)
            if err:
                break
        start = nxt
        if start >= end:
            break
    return err


