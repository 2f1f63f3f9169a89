"""The generic page-table walker of Linux 6.x (mm/pagewalk.c, 6.18).

A client hands :func:`walk_page_range` a constant :class:`MmWalkOps` table and never descends the tables
itself.  The walker visits the VMAs of ``[start, end)`` in address order; a gap between VMAs is reported
by **one** ``pte_hole(gap_start, gap_end, -1)`` with ``walk.vma = None``.  Inside a VMA, ``test_walk``
decides (``0`` walk, ``> 0`` skip the VMA, ``< 0`` abort); hugetlb VMAs go through
:func:`walk_hugetlb_range`, all others through the level functions below, one per level, each with the
same loop shape::

    do {
        next = pXd_addr_end(addr, end)
        if pXd_none: pte_hole(addr, next, depth); continue
        pXd_entry(...)                       # the callback may set walk.action
        descend unless walk.action == CONTINUE
    } while (addr = next) != end

Callbacks may sleep (HMM's fault from inside the walk), so every walker function is a generator and a
callback may be either a generator function or a plain function (its result is ``yield from``-ed when it
is a generator).  Any non-zero callback result stops the walk and is returned.  A preemption point sits
between PMD entries.

Version notes: this is the 6.18 shape (``walk->action`` with ``ACTION_SUBTREE / CONTINUE / AGAIN``,
``pte_hole`` with a depth, ``hugetlb_entry`` under the hugetlb VMA read lock via ``hugetlb_walk`` =
``huge_pte_offset``, ``walk_lock``).  The 2026 linux-mm "refault after PUD split" change (ACTION_AGAIN from
``walk_pmd_range`` when the PUD is no longer a table) is included because it is harmless for a PUD that is
a table.  The install_pte / pgd-override variants are not modelled.  The 5.2 walker lives in
``mm/pagewalk_v5_2.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import (
    PAGE_SIZE,
    PMD_LEVEL,
    PTE_LEVEL,
    PUD_LEVEL,
    pmd_leaf,
    pmd_present,
    pte_none,
    pud_leaf,
    pud_present,
    table_id_of,
)
from hmmirror.include.mm_types import VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

EINVAL = 22

# enum page_walk_action
ACTION_SUBTREE = 0      # descend to the next level (the default before each entry callback)
ACTION_CONTINUE = 1     # do not descend
ACTION_AGAIN = 2        # call the entry callback again for the same entry

# enum page_walk_lock
PGWALK_RDLOCK = 0       # mmap lock held for read
PGWALK_WRLOCK = 1       # mmap lock held for write
PGWALK_WRLOCK_VERIFY = 2


@dataclass(frozen=True)
class MmWalkOps:
    """``struct mm_walk_ops``: callbacks (``None`` = absent).  Signatures, as in the kernel:

    * ``pgd_entry / p4d_entry / pud_entry / pmd_entry(pXdp, addr, next, walk) -> int``
    * ``pte_entry(ptep, addr, next, walk) -> int``
    * ``pte_hole(addr, next, depth, walk) -> int`` (depth -1: no VMA or no table at all; 0..3: level)
    * ``hugetlb_entry(ptep, hmask, addr, next, walk) -> int``
    * ``test_walk(addr, next, walk) -> int`` (0 walk, >0 skip this VMA, <0 abort)
    * ``pre_vma(start, end, walk) -> int``, ``post_vma(walk) -> None``
    """

    pgd_entry: Callable[..., Any] | None = None
    p4d_entry: Callable[..., Any] | None = None
    pud_entry: Callable[..., Any] | None = None
    pmd_entry: Callable[..., Any] | None = None
    pte_entry: Callable[..., Any] | None = None
    pte_hole: Callable[..., Any] | None = None
    hugetlb_entry: Callable[..., Any] | None = None
    test_walk: Callable[..., Any] | None = None
    pre_vma: Callable[..., Any] | None = None
    post_vma: Callable[..., Any] | None = None
    walk_lock: int = PGWALK_RDLOCK


class MmWalk:
    """``struct mm_walk``: the state a callback sees (``walk.vma`` is None inside a gap)."""

    __slots__ = ("ops", "mm", "vma", "action", "no_vma", "private")

    def __init__(self, ops: MmWalkOps, mm: "MMStruct", private: Any) -> None:
        self.ops = ops
        self.mm = mm
        self.vma: "VMA | None" = None
        self.action = ACTION_SUBTREE
        self.no_vma = False
        self.private = private


def _call(fn: Callable[..., Any], *args: Any) -> Gen[Any]:
    """Run a callback that may be a generator function (may sleep) or a plain function."""
    ret = fn(*args)
    if isinstance(ret, Generator):
        ret = yield from ret
    return ret


def real_depth(mm: "MMStruct", depth: int) -> int:
    """real_depth(): with 4-level paging the folded P4D level does not count."""
    if depth >= 1 and mm.machine.geo.p4d_folded:
        return depth - 1
    return depth


# --- the levels (one small function each, same loop shape) -----------------------------------------------
def walk_pte_range(pmdp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pte_range() / walk_pte_range_inner(): ``pte_entry`` for every PTE, under the PTE lock."""
    mm = walk.mm
    pool = mm.machine.pool
    pmd = pool.get(pmdp)
    if pte_none(pmd) or pmd_leaf(pmd) or not pmd_present(pmd):     # pte_offset_map_lock() failed
        walk.action = ACTION_AGAIN
        return 0
    ptl = pool.ptlock(table_id_of(pmd))
    yield from sched.spin_lock(ptl)
    err = 0
    try:
        tid = table_id_of(pmd)
        while True:
            ptep = (tid, PTE_LEVEL.index(addr))
            err = yield from _call(walk.ops.pte_entry, ptep, addr, addr + PAGE_SIZE, walk)   # type: ignore[misc]
            if err:
                break
            addr += PAGE_SIZE
            if addr == end:
                break
    finally:
        sched.spin_unlock(ptl)
    return err


def walk_pmd_range(pudp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pmd_range(): ``pmd_entry`` unlocked for every non-none PMD; descend only with a ``pte_entry``."""
    mm = walk.mm
    pool = mm.machine.pool
    ops = walk.ops
    pud = pool.get(pudp)
    if not pud_present(pud) or pud_leaf(pud):     # the PUD is no longer a table: make the caller retry
        walk.action = ACTION_AGAIN
        return 0
    depth = real_depth(mm, 3)
    err = 0
    pmdp = mm.pt.pmd_offset(pudp, addr)
    while True:
        nxt = PMD_LEVEL.addr_end(addr, end)
        pmdp = (pmdp[0], PMD_LEVEL.index(addr))
        while True:                                            # the "again:" label
            if pte_none(pool.get(pmdp)):
                if ops.pte_hole is not None:
                    err = yield from _call(ops.pte_hole, addr, nxt, depth, walk)
                break
            walk.action = ACTION_SUBTREE
            if ops.pmd_entry is not None:
                err = yield from _call(ops.pmd_entry, pmdp, addr, nxt, walk)
            if err or walk.action == ACTION_CONTINUE:
                break
            if walk.action == ACTION_AGAIN:
                continue
            if ops.pte_entry is None:                          # no handler for the lower level
                break
            if walk.vma is not None:
                from hmmirror.mm.huge_memory import split_huge_pmd_address
                if pmd_leaf(pool.get(pmdp)):
                    yield from split_huge_pmd_address(walk.vma, addr)
            elif pmd_leaf(pool.get(pmdp)) or not pmd_present(pool.get(pmdp)):
                break
            err = yield from walk_pte_range(pmdp, addr, nxt, walk)
            if err or walk.action != ACTION_AGAIN:
                break
        if err:
            break
        addr = nxt
        if addr == end:
            break
        yield from sched.preempt_point("walk_pmd_range")
    return err


def walk_pud_range(p4dp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pud_range(): ``pud_entry`` unlocked for every non-none PUD (the callback chooses the action)."""
    mm = walk.mm
    pool = mm.machine.pool
    ops = walk.ops
    depth = real_depth(mm, 2)
    has_handler = ops.pmd_entry is not None or ops.pte_entry is not None
    err = 0
    pudp = mm.pt.pud_offset(p4dp, addr)
    while True:
        nxt = PUD_LEVEL.addr_end(addr, end)
        pudp = (pudp[0], PUD_LEVEL.index(addr))
        while True:                                            # the "again:" label
            if pte_none(pool.get(pudp)):
                if ops.pte_hole is not None:
                    err = yield from _call(ops.pte_hole, addr, nxt, depth, walk)
                break
            walk.action = ACTION_SUBTREE
            if ops.pud_entry is not None:
                err = yield from _call(ops.pud_entry, pudp, addr, nxt, walk)
            if err or walk.action == ACTION_CONTINUE:
                break
            if walk.action == ACTION_AGAIN:
                continue
            if not has_handler:
                break
            if walk.vma is not None:
                if pud_leaf(pool.get(pudp)):
                    from hmmirror.mm.huge_memory import __split_huge_pud
                    yield from __split_huge_pud(walk.vma, pudp, addr)
            elif pud_leaf(pool.get(pudp)) or not pud_present(pool.get(pudp)):
                break
            if pte_none(pool.get(pudp)):                       # the split cleared it
                continue
            err = yield from walk_pmd_range(pudp, addr, nxt, walk)
            if err or walk.action != ACTION_AGAIN:
                break
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_p4d_range(pgdp: Ptr, addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_p4d_range(): with 4-level paging the P4D entry is the PGD entry (folded)."""
    mm = walk.mm
    ops = walk.ops
    geo = mm.machine.geo
    depth = real_depth(mm, 1)
    has_handler = ops.pud_entry is not None or ops.pmd_entry is not None or ops.pte_entry is not None
    err = 0
    while True:
        nxt = geo.p4d.addr_end(addr, end)
        p4dp = mm.pt.p4d_offset(pgdp, addr)
        if mm.pt.p4d_none(p4dp):
            if ops.pte_hole is not None:
                err = yield from _call(ops.pte_hole, addr, nxt, depth, walk)
        else:
            if ops.p4d_entry is not None:
                err = yield from _call(ops.p4d_entry, p4dp, addr, nxt, walk)
            if not err and has_handler:
                err = yield from walk_pud_range(p4dp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_pgd_range(addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_pgd_range(): the top level (``pgd_none`` is always false when the P4D is folded)."""
    mm = walk.mm
    ops = walk.ops
    geo = mm.machine.geo
    has_handler = (ops.p4d_entry is not None or ops.pud_entry is not None or ops.pmd_entry is not None
                   or ops.pte_entry is not None)
    err = 0
    while True:
        nxt = geo.pgd.addr_end(addr, end)
        pgdp = mm.pt.pgd_offset(addr)
        if mm.pt.pgd_none(pgdp):
            if ops.pte_hole is not None:
                err = yield from _call(ops.pte_hole, addr, nxt, 0, walk)
        else:
            if ops.pgd_entry is not None:
                err = yield from _call(ops.pgd_entry, pgdp, addr, nxt, walk)
            if not err and has_handler:
                err = yield from walk_p4d_range(pgdp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


# --- hugetlb ---------------------------------------------------------------------------------------------
def hstate_order(vma: "VMA") -> int:
    """huge_page_order(hstate_vma(vma)): 9 (2 MiB) or 18 (1 GiB)."""
    return vma.hstate_order or 9


def huge_pte_offset(mm: "MMStruct", addr: int, sz: int) -> Ptr | None:
    """huge_pte_offset() (mm/hugetlb.c, generic): the PUD (1 GiB) or PMD (2 MiB) entry pointer for ``addr``
    — none, present or swap — or None when the level above is missing (``hugetlb_walk()`` in 6.x)."""
    from hmmirror.mm.hugetlb import huge_pte_offset as _huge_pte_offset
    return _huge_pte_offset(mm, addr, sz)


def hugetlb_vma_lock(vma: "VMA") -> Lock:
    """The hugetlb VMA lock (``vma_lock->rw_sema`` / ``resv_map->rw_sema``): one rwsem per VMA."""
    lock = vma.extra.get("hugetlb_vma_lock")
    if lock is None:
        lock = vma.extra["hugetlb_vma_lock"] = Lock(f"hugetlb_vma_lock[{vma.vm_start:#x}]", "rwsem")
    return lock   # type: ignore[no-any-return]


def hugetlb_vma_lock_read(vma: "VMA") -> Gen[None]:
    """hugetlb_vma_lock_read()."""
    try:
        from hmmirror.mm import hugetlb as _hugetlb
        fn = getattr(_hugetlb, "hugetlb_vma_lock_read", None)
    except ImportError:
        fn = None
    if fn is not None:
        yield from fn(vma)
        return
    yield from sched.down_read(hugetlb_vma_lock(vma))


def hugetlb_vma_unlock_read(vma: "VMA") -> None:
    """hugetlb_vma_unlock_read()."""
    try:
        from hmmirror.mm import hugetlb as _hugetlb
        fn = getattr(_hugetlb, "hugetlb_vma_unlock_read", None)
    except ImportError:
        fn = None
    if fn is not None:
        fn(vma)
        return
    sched.up_read(hugetlb_vma_lock(vma))


def walk_hugetlb_range(addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_hugetlb_range(): ``hugetlb_entry`` for every huge page whose entry pointer exists (none,
    present or swap), ``pte_hole(-1)`` otherwise; under the hugetlb VMA read lock."""
    vma = walk.vma
    assert vma is not None
    ops = walk.ops
    sz = PAGE_SIZE << hstate_order(vma)
    hmask = ~(sz - 1) & ((1 << 64) - 1)
    err = 0
    yield from hugetlb_vma_lock_read(vma)
    try:
        while True:
            nxt = min((addr & hmask) + sz, end)           # hugetlb_entry_end()
            ptep = huge_pte_offset(walk.mm, addr & hmask, sz)
            if ptep is not None:
                err = yield from _call(ops.hugetlb_entry, ptep, hmask, addr, nxt, walk)   # type: ignore[misc]
            elif ops.pte_hole is not None:
                err = yield from _call(ops.pte_hole, addr, nxt, -1, walk)
            if err:
                break
            addr = nxt
            if addr == end:
                break
            yield from sched.preempt_point("walk_hugetlb_range")
    finally:
        hugetlb_vma_unlock_read(vma)
    return err


# --- VMA level -------------------------------------------------------------------------------------------
def walk_page_test(start: int, end: int, walk: MmWalk) -> Gen[int]:
    """walk_page_test(): ``test_walk`` if given; else a VM_PFNMAP VMA is handed to ``pte_hole`` and skipped."""
    ops = walk.ops
    vma = walk.vma
    assert vma is not None
    if ops.test_walk is not None:
        return (yield from _call(ops.test_walk, start, end, walk))
    if vma.vm_flags & VM.PFNMAP:
        err = 1
        if ops.pte_hole is not None:
            err = yield from _call(ops.pte_hole, start, end, -1, walk)
        return err if err else 1
    return 0


def __walk_page_range(start: int, end: int, walk: MmWalk) -> Gen[int]:
    """__walk_page_range(): one VMA (pre_vma, the hugetlb or table walk, post_vma)."""
    vma = walk.vma
    ops = walk.ops
    assert vma is not None
    err = 0
    if ops.pre_vma is not None:
        err = yield from _call(ops.pre_vma, start, end, walk)
        if err:
            return err
    if vma.vm_flags & VM.HUGETLB:
        if ops.hugetlb_entry is not None:
            err = yield from walk_hugetlb_range(start, end, walk)
    else:
        err = yield from walk_pgd_range(start, end, walk)
    if ops.post_vma is not None:
        yield from _call(ops.post_vma, walk)
    return err


def process_mm_walk_lock(mm: "MMStruct", walk_lock: int) -> None:
    """process_mm_walk_lock(): mmap_assert_locked / mmap_assert_write_locked (lockdep report)."""
    lock = mm.mmap_sem
    task = sched.current()
    if walk_lock == PGWALK_RDLOCK:
        if not lock.held_by(task):
            sched.report("lockdep", f"walk_page_range on {mm.name} without {lock.name} held")
    elif lock.owner is not task:
        sched.report("lockdep", f"walk_page_range(WRLOCK) on {mm.name} without {lock.name} held for write")


def walk_page_range(mm: "MMStruct", start: int, end: int, ops: MmWalkOps, private: Any) -> Gen[int]:
    """walk_page_range() / walk_page_range_mm() (mm/pagewalk.c, 6.18): walk ``[start, end)`` of ``mm``.

    Return: the first non-zero callback result, 0 when the whole range was visited, -EINVAL if
    ``start >= end``.  Locking: the mmap lock held as ``ops.walk_lock`` says (asserted).
    """
    if start >= end:
        return -EINVAL
    process_mm_walk_lock(mm, ops.walk_lock)
    walk = MmWalk(ops, mm, private)
    vma = mm.find_vma(start)
    err = 0
    while True:
        if vma is None:                                  # after the last VMA
            walk.vma = None
            nxt = end
            if ops.pte_hole is not None:
                err = yield from _call(ops.pte_hole, start, nxt, -1, walk)
        elif start < vma.vm_start:                       # a gap before the next VMA
            walk.vma = None
            nxt = min(end, vma.vm_start)
            if ops.pte_hole is not None:
                err = yield from _call(ops.pte_hole, start, nxt, -1, walk)
        else:                                            # inside a VMA
            walk.vma = vma
            nxt = min(end, vma.vm_end)
            vma = mm.find_vma(vma.vm_end)
            err = yield from walk_page_test(start, nxt, walk)
            if err > 0:                                  # skip this VMA; never returned to the caller
                err = 0
                start = nxt
                if start >= end:
                    break
                continue
            if err < 0:
                break
            err = yield from __walk_page_range(start, nxt, walk)
        if err:
            break
        start = nxt
        if start >= end:
            break
    return err


__all__ = [
    "ACTION_AGAIN", "ACTION_CONTINUE", "ACTION_SUBTREE", "MmWalk", "MmWalkOps", "PGWALK_RDLOCK",
    "PGWALK_WRLOCK", "huge_pte_offset", "hugetlb_vma_lock_read", "hugetlb_vma_unlock_read", "walk_page_range",
]
