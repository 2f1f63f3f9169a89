"""Page-table storage: every table of every mm is one row of a 2-D numpy uint64 array.

A table (PGD, P4D, PUD, PMD or PTE table) is a row of :attr:`TablePool.tables`, identified by its row
number (the *table id*).  Upper-level entries store the id of the table below in their pfn field
(:func:`~hmmirror.arch.x86.pgtable.mk_table_entry`).  A "pointer to an entry" (``pte_t *``) is a pair
``(table_id, index)``.

This layout serves both walks: the reference walk reads one entry at a time; the fast walk gathers whole
rows (all leaf tables of a range) with one fancy-indexing step.

Split page-table locks: each PTE and PMD table has its own spinlock (created on first use, one Python object
per table, never per page); the PUD lock is ``mm.page_table_lock`` (x86-64).
"""

from __future__ import annotations

import numpy as np

from hmmirror.arch.x86.pgtable import (
    PMD_LEVEL,
    PTE_LEVEL,
    PTRS_PER_TABLE,
    PUD_LEVEL,
    Geometry,
    mk_table_entry,
    pte_none,
    pmd_leaf,
    pud_leaf,
    table_id_of,
)
from hmmirror.kernel.sched import Lock

Ptr = tuple[int, int]   # (table id, index): the model's "pXd_t *"


class TablePool:
    """All page tables of a machine, as rows of one growable uint64 array."""

    def __init__(self, capacity: int = 64) -> None:
        self.tables = np.zeros((capacity, PTRS_PER_TABLE), dtype=np.uint64)
        self.level = np.zeros(capacity, dtype=np.int8)     # 0 unused, else the level number (5 pgd .. 1 pte)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._locks: dict[int, Lock] = {}
        self.nr_tables = 0

    def _grow(self) -> None:
        old = self.tables.shape[0]
        new = old + max(64, old // 4)                     # 1.25x: bounded slack for the memory figure
        tables = np.zeros((new, PTRS_PER_TABLE), dtype=np.uint64)
        tables[:old] = self.tables
        level = np.zeros(new, dtype=np.int8)
        level[:old] = self.level
        self.tables, self.level = tables, level
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def alloc(self, level: int) -> int:
        """Allocate a zeroed table for ``level`` (5 PGD, 4 P4D, 3 PUD, 2 PMD, 1 PTE)."""
        if not self._free:
            self._grow()
        tid = self._free.pop()
        self.tables[tid] = 0
        self.level[tid] = level
        self.nr_tables += 1
        return tid

    def free(self, tid: int) -> None:
        """Return a table to the pool (free_pgtables)."""
        self.level[tid] = 0
        self._free.append(tid)
        self._locks.pop(tid, None)
        self.nr_tables -= 1

    def ptlock(self, tid: int) -> Lock:
        """The split page-table lock of a PTE or PMD table (pte_lockptr / pmd_lockptr)."""
        lock = self._locks.get(tid)
        if lock is None:
            lock = self._locks[tid] = Lock(f"ptl[{tid}]", "spin")
        return lock

    def get(self, p: Ptr) -> int:
        """Read an entry (READ_ONCE(*p))."""
        return self.tables.item(p[0], p[1])

    def set(self, p: Ptr, val: int) -> None:
        """Write an entry (set_pte_at / set_pmd_at / set_pud_at / pte_clear)."""
        self.tables[p[0], p[1]] = val

    def nbytes(self) -> int:
        """Bytes of live tables (the allocated rows)."""
        return self.nr_tables * PTRS_PER_TABLE * 8


# Level numbers used in TablePool.level
LVL_PGD, LVL_P4D, LVL_PUD, LVL_PMD, LVL_PTE = 5, 4, 3, 2, 1


class PageTables:
    """One mm's page tables: the pgd root and the offset/alloc helpers of include/linux/pgtable.h."""

    def __init__(self, pool: TablePool, geo: Geometry) -> None:
        self.pool = pool
        self.geo = geo
        self.pgd = pool.alloc(LVL_PGD)

    # -- offsets: pointers to the entry for addr at each level (no allocation) --
    def pgd_offset(self, addr: int) -> Ptr:
        """pgd_offset()."""
        return (self.pgd, self.geo.pgd.index(addr))

    def p4d_offset(self, pgdp: Ptr, addr: int) -> Ptr:
        """p4d_offset(): with 4-level paging the P4D is folded, the PGD entry is the P4D entry."""
        if self.geo.p4d_folded:
            return pgdp
        return (table_id_of(self.pool.get(pgdp)), self.geo.p4d.index(addr))

    def pud_offset(self, p4dp: Ptr, addr: int) -> Ptr:
        """pud_offset()."""
        return (table_id_of(self.pool.get(p4dp)), PUD_LEVEL.index(addr))

    def pmd_offset(self, pudp: Ptr, addr: int) -> Ptr:
        """pmd_offset()."""
        return (table_id_of(self.pool.get(pudp)), PMD_LEVEL.index(addr))

    def pte_offset_map(self, pmdp: Ptr, addr: int) -> Ptr:
        """pte_offset_map() (no-op mapping on 64-bit without HIGHPTE)."""
        return (table_id_of(self.pool.get(pmdp)), PTE_LEVEL.index(addr))

    def pgd_none(self, pgdp: Ptr) -> bool:
        """pgd_none(): always false when the P4D is folded (the hole is seen at the P4D step)."""
        return False if self.geo.p4d_folded else pte_none(self.pool.get(pgdp))

    def p4d_none(self, p4dp: Ptr) -> bool:
        """p4d_none()."""
        return pte_none(self.pool.get(p4dp))

    # -- allocation of missing levels (__pXd_alloc) --
    def _alloc_below(self, p: Ptr, level: int) -> None:
        if pte_none(self.pool.get(p)):
            self.pool.set(p, mk_table_entry(self.pool.alloc(level)))

    def p4d_alloc(self, pgdp: Ptr, addr: int) -> Ptr:
        """p4d_alloc()."""
        if not self.geo.p4d_folded:
            self._alloc_below(pgdp, LVL_P4D)
        return self.p4d_offset(pgdp, addr)

    def pud_alloc(self, p4dp: Ptr, addr: int) -> Ptr:
        """pud_alloc()."""
        self._alloc_below(p4dp, LVL_PUD)
        return self.pud_offset(p4dp, addr)

    def pmd_alloc(self, pudp: Ptr, addr: int) -> Ptr:
        """pmd_alloc() (caller checked the PUD is not a leaf)."""
        self._alloc_below(pudp, LVL_PMD)
        return self.pmd_offset(pudp, addr)

    def pte_alloc(self, pmdp: Ptr) -> int:
        """pte_alloc(): make sure a PTE table exists below ``pmdp``; returns its id."""
        self._alloc_below(pmdp, LVL_PTE)
        return table_id_of(self.pool.get(pmdp))

    def walk_to_pud(self, addr: int, alloc: bool = False) -> Ptr | None:
        """pgd -> p4d -> pud pointer for ``addr``; None if a level is missing (and ``alloc`` is false)."""
        pgdp = self.pgd_offset(addr)
        if alloc:
            return self.pud_alloc(self.p4d_alloc(pgdp, addr), addr)
        if self.pgd_none(pgdp):
            return None
        p4dp = self.p4d_offset(pgdp, addr)
        if self.p4d_none(p4dp):
            return None
        return self.pud_offset(p4dp, addr)

    def p4d_range(self, addr: int, end: int) -> "list[tuple[Ptr, int, int]]":
        """The present P4D entries over ``[addr, end)`` as (p4d pointer, chunk start, chunk end)."""
        out = []
        geo = self.geo
        while addr < end:
            nxt = geo.pgd.addr_end(addr, end)
            pgdp = self.pgd_offset(addr)
            if not self.pgd_none(pgdp):
                a = addr
                while a < nxt:
                    n2 = geo.p4d.addr_end(a, nxt)
                    p4dp = self.p4d_offset(pgdp, a)
                    if not self.p4d_none(p4dp):
                        out.append((p4dp, a, n2))
                    a = n2
            addr = nxt
        return out

    def lookup(self, addr: int) -> tuple[str, Ptr | None, int]:
        """Find what maps ``addr``: (level name, entry pointer, entry value).

        Stops at the first none entry or leaf: ``("pud", p, e)`` for a PUD leaf or none PUD, ``("pmd", ...)``
        likewise, ``("pte", ...)`` at the PTE level; ``("p4d", None, 0)`` when the top levels are missing.
        """
        pudp = self.walk_to_pud(addr)
        if pudp is None:
            return ("p4d", None, 0)
        pud = self.pool.get(pudp)
        if pte_none(pud) or pud_leaf(pud):
            return ("pud", pudp, pud)
        pmdp = self.pmd_offset(pudp, addr)
        pmd = self.pool.get(pmdp)
        if pte_none(pmd) or pmd_leaf(pmd) or not (pmd & 1):
            return ("pmd", pmdp, pmd)
        ptep = self.pte_offset_map(pmdp, addr)
        return ("pte", ptep, self.pool.get(ptep))
