"""Collect the page-table entries of a VA range as numpy arrays (ours: no kernel counterpart).

The reference walks (``mm/pagewalk.py``, ``mm/pagewalk_v5_2.py``) read one entry at a time with
``pool.get``.  Here the upper levels (PGD, P4D, PUD) are walked in Python, one entry per 512 GiB / 1 GiB, and
every PMD table is handled as one :class:`PmdBatch`: its entries are read as one row slice, classified with
numpy, and the PTE tables below it are gathered with one fancy-indexing step (``pool.tables[tids]``).  PMD
and PUD leaves are expanded to per-page entries with ``arange`` (pfn advanced page by page).

Two users:

* the fast HMM walks (``fast/hmm_modern.py``, ``fast/hmm_v5_2.py``) use :class:`PmdBatch` and
  :func:`row_slice` directly, because they must reproduce the reference walker's callback units exactly;
* :func:`gather_range` gives the flat per-page view (entry, level) of a whole range, for inspection and for
  the equivalence tests.

Nothing here changes the page tables or any counter: gathering is a pure read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PMD_SHIFT, PMD_SIZE, PTRS_PER_TABLE, PUD_SHIFT, PUD_SIZE

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct
    from hmmirror.mm.pgtable import TablePool

U64 = np.uint64
PFN_MASK = U64(x86.PTE_PFN_MASK)
FLAGS_MASK = U64(x86.PTE_FLAGS_MASK)
AD = U64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
_TABLE_BITS = U64(x86._PAGE_PRESENT | x86._PAGE_RW | x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
_NOT_USER = U64(x86.PTE_FLAGS_MASK & ~x86._PAGE_USER)
_PRESENT_BITS = U64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE | x86._PAGE_PSE)
_PSE = U64(x86._PAGE_PSE)
_DEVMAP = U64(x86._PAGE_DEVMAP)

#: Level codes of :func:`gather_range` (per page).
LVL_HOLE, LVL_PTE, LVL_PMD, LVL_PUD, LVL_OTHER = 0, 1, 2, 3, 4

#: Row kinds of a :class:`PmdBatch` (one per PMD entry).
ROW_NONE, ROW_TABLE, ROW_HUGE, ROW_OTHER = 0, 1, 2, 3

_ARANGE_PTE = np.arange(PTRS_PER_TABLE, dtype=np.uint64) << U64(PAGE_SHIFT)


def entry_none(e: np.ndarray) -> np.ndarray:
    """Vectorised ``pte_none`` / ``pmd_none`` / ``pud_none``: no bits other than accessed/dirty."""
    return (e & ~AD) == 0


def entry_is_table(e: np.ndarray) -> np.ndarray:
    """Vectorised "a table pointer": not ``pmd_bad`` (flags other than USER are exactly P|RW|A|D).

    This is the x86 ``pXd_bad`` test negated; it excludes none, leaf (PSE), devmap and swap-format entries.
    """
    return (e & _NOT_USER) == _TABLE_BITS


def table_ids(e: np.ndarray) -> np.ndarray:
    """The table ids stored in table entries (the pfn field), as int64 row numbers."""
    return ((e & PFN_MASK) >> U64(PAGE_SHIFT)).astype(np.int64)


def row_slice(pool: "TablePool", tid: int, shift: int, addr: int, end: int) -> tuple[int, int, np.ndarray]:
    """The entries of table ``tid`` (a level of VA shift ``shift``) covering ``[addr, end)``.

    Returns ``(i0, i1, entries)``: indices ``i0 .. i1-1`` of the row and a *copy* of those entries (a copy,
    so a later change of the table by a fault does not alter what was classified).
    """
    i0 = (addr >> shift) & (PTRS_PER_TABLE - 1)
    last = ((end - 1) >> shift) & (PTRS_PER_TABLE - 1)
    return i0, last + 1, pool.tables[tid, i0:last + 1].copy()


def chunk_bounds(addr: int, end: int, shift: int, n: int) -> tuple[list[int], list[int]]:
    """``pXd_addr_end`` chunking of ``[addr, end)`` into ``n`` chunks of ``1 << shift``: starts and ends."""
    size = 1 << shift
    base = addr & ~(size - 1)
    starts = [addr] + [base + k * size for k in range(1, n)]
    ends = [base + k * size for k in range(1, n)] + [end]
    return starts, ends


@dataclass
class PmdBatch:
    """The part ``[start, end)`` of one PMD table: one row per PMD entry (the reference walker's units).

    ``rows`` PMD entries (copies), ``kinds`` (:data:`ROW_NONE` ... :data:`ROW_OTHER`, see :meth:`classify`),
    ``base`` the VA of row 0's 2 MiB chunk, ``off0`` the page offset of ``start`` inside row 0, ``npages``
    the pages of ``[start, end)``.  Row ``r`` covers the pages ``[r*512 - off0, (r+1)*512 - off0)`` of the
    batch, clipped to ``[0, npages)``.
    """

    pool: "TablePool"
    pmd_tid: int
    i0: int
    start: int
    end: int
    rows: np.ndarray
    kinds: np.ndarray

    @classmethod
    def read(cls, pool: "TablePool", pmd_tid: int, start: int, end: int,
             huge_fn: "Callable[[np.ndarray], np.ndarray] | None" = None) -> "PmdBatch":
        """Read the PMD entries of ``[start, end)`` (inside one PMD table) and classify them.

        ``huge_fn(rows) -> bool array`` says which non-none, non-table rows the caller handles as leaves
        (per profile: trans-huge, devmap); every other non-none non-table row is :data:`ROW_OTHER`.
        """
        i0, _i1, rows = row_slice(pool, pmd_tid, PMD_SHIFT, start, end)
        kinds = np.full(rows.shape[0], ROW_OTHER, dtype=np.int8)
        kinds[entry_none(rows)] = ROW_NONE
        kinds[entry_is_table(rows)] = ROW_TABLE
        if huge_fn is not None:
            rest = kinds == ROW_OTHER
            if rest.any():
                h = huge_fn(rows)
                kinds[rest & h] = ROW_HUGE
        return cls(pool, pmd_tid, i0, start, end, rows, kinds)

    @property
    def base(self) -> int:
        return self.start & ~(PMD_SIZE - 1)

    @property
    def off0(self) -> int:
        return (self.start - self.base) >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def nrows(self) -> int:
        return int(self.rows.shape[0])

    def row_start(self, r: int) -> int:
        """VA where row ``r``'s unit starts (``start`` for row 0)."""
        return self.start if r == 0 else self.base + r * PMD_SIZE

    def row_end(self, r: int) -> int:
        """VA where row ``r``'s unit ends (``end`` for the last row)."""
        return self.end if r == self.nrows - 1 else self.base + (r + 1) * PMD_SIZE

    def row_page(self, r: int) -> int:
        """Index of row ``r``'s first page inside the batch."""
        return 0 if r == 0 else r * PTRS_PER_TABLE - self.off0

    def pmdp(self, r: int) -> tuple[int, int]:
        """The ``pmd_t *`` of row ``r``."""
        return (self.pmd_tid, self.i0 + r)

    def pte_rows(self, sel: np.ndarray | None = None, ws: "Workspace | None" = None) -> np.ndarray:
        """The PTE tables below rows ``sel`` (default: all rows), gathered: shape ``(k, 512)``; into scratch
        memory of ``ws`` if given."""
        rows = self.rows if sel is None else self.rows[sel]
        if ws is not None:
            return gather_pte_rows(self.pool, rows, ws)
        return self.pool.tables[table_ids(rows)]

    def padded(self, values: np.ndarray) -> np.ndarray:
        """Flat per-page view of a ``(nrows, 512)`` array restricted to the batch's pages."""
        return values.reshape(-1)[self.off0:self.off0 + self.npages]


def huge_rows_pfn(rows: np.ndarray) -> np.ndarray:
    """The pfn of each huge row (``pmd_pfn``), as uint64."""
    return (rows & PFN_MASK) >> U64(PAGE_SHIFT)


def expand_leaf(entry: int, first_page: int, n: int) -> np.ndarray:
    """Per-page entries of ``n`` pages of a PMD/PUD leaf from page ``first_page`` of the leaf: the leaf
    entry with its pfn advanced page by page (``arange``)."""
    return U64(entry) + (np.arange(first_page, first_page + n, dtype=np.uint64) << U64(PAGE_SHIFT))


# --- the flat view ---------------------------------------------------------------------------------------
@dataclass
class Gathered:
    """Per-page entries of ``[start, end)``: ``entries[i]`` is the leaf entry mapping page ``i`` (for a PMD or
    PUD leaf, the leaf entry with the pfn of that page), ``level[i]`` one of :data:`LVL_HOLE` (no table or a
    none entry at an upper level), :data:`LVL_PTE`, :data:`LVL_PMD`, :data:`LVL_PUD`, :data:`LVL_OTHER` (an
    upper-level entry that is neither none, a table nor a present leaf: swap-format PMDs, bad entries)."""

    start: int
    end: int
    entries: np.ndarray
    level: np.ndarray

    def pfns(self) -> np.ndarray:
        """``pte_pfn`` of every page (meaningful for present entries only)."""
        return (self.entries & PFN_MASK) >> U64(PAGE_SHIFT)


def gather_range(mm: "MMStruct", start: int, end: int) -> Gathered:
    """Collect, for ``[start, end)`` of ``mm`` (page aligned), the leaf entry and level of every page.

    Upper levels are walked per 512 GiB / 1 GiB entry in Python; each PMD table is read as one row slice and
    its PTE tables are gathered with one fancy-indexing step; PMD/PUD leaves are expanded by ``arange``.
    """
    if start & (x86.PAGE_SIZE - 1) or end & (x86.PAGE_SIZE - 1) or end < start:
        raise ValueError(f"gather_range: bad range {start:#x}-{end:#x}")
    g = Gathered(start, end, np.zeros((end - start) >> PAGE_SHIFT, dtype=np.uint64),
                 np.zeros((end - start) >> PAGE_SHIFT, dtype=np.int8))
    pool = mm.machine.pool
    geo = mm.machine.geo
    pt = mm.pt
    addr = start
    while addr < end:
        nxt = geo.pgd.addr_end(addr, end)
        pgdp = pt.pgd_offset(addr)
        if not pt.pgd_none(pgdp):
            a = addr
            while a < nxt:
                n4 = geo.p4d.addr_end(a, nxt)
                p4dp = pt.p4d_offset(pgdp, a)
                if not pt.p4d_none(p4dp):
                    _gather_pud(g, pool, x86.table_id_of(pool.get(p4dp)), a, n4)
                a = n4
        addr = nxt
    return g


def _gather_pud(g: Gathered, pool: "TablePool", pud_tid: int, addr: int, end: int) -> None:
    _i0, _i1, puds = row_slice(pool, pud_tid, PUD_SHIFT, addr, end)
    starts, ends = chunk_bounds(addr, end, PUD_SHIFT, puds.shape[0])
    none = entry_none(puds)
    table = entry_is_table(puds)
    for k in range(puds.shape[0]):
        a, b = starts[k], ends[k]
        i, j = (a - g.start) >> PAGE_SHIFT, (b - g.start) >> PAGE_SHIFT
        if none[k]:
            continue                                     # level stays LVL_HOLE
        pud = int(puds[k])
        if table[k]:
            _gather_pmd(g, pool, x86.table_id_of(pud), a, b)
        elif x86.pud_leaf(pud) and x86.pud_present(pud):
            g.entries[i:j] = expand_leaf(pud, (a & (PUD_SIZE - 1)) >> PAGE_SHIFT, j - i)
            g.level[i:j] = LVL_PUD
        else:
            g.entries[i:j] = pud
            g.level[i:j] = LVL_OTHER


def _gather_pmd(g: Gathered, pool: "TablePool", pmd_tid: int, addr: int, end: int) -> None:
    batch = PmdBatch.read(pool, pmd_tid, addr, end,
                          huge_fn=lambda r: ((r & _PSE) != 0) & ((r & _PRESENT_BITS) != 0))
    out = np.zeros((batch.nrows, PTRS_PER_TABLE), dtype=np.uint64)
    lvl = np.zeros((batch.nrows, PTRS_PER_TABLE), dtype=np.int8)
    kinds = batch.kinds
    t = kinds == ROW_TABLE
    if t.any():
        out[t] = batch.pte_rows(t)
        lvl[t] = LVL_PTE
    h = kinds == ROW_HUGE
    if h.any():
        out[h] = batch.rows[h][:, None] + _ARANGE_PTE[None, :]
        lvl[h] = LVL_PMD
    o = kinds == ROW_OTHER
    if o.any():
        out[o] = batch.rows[o][:, None]
        lvl[o] = LVL_OTHER
    i = (addr - g.start) >> PAGE_SHIFT
    g.entries[i:i + batch.npages] = batch.padded(out)
    g.level[i:i + batch.npages] = batch.padded(lvl)


# --- scratch memory ------------------------------------------------------------------------------------
class Workspace:
    """Reusable scratch arrays of the fast walks.

    A 1 GiB PMD batch works on 2 MiB arrays; allocating them afresh for every batch costs a page fault per
    4 KiB of fresh memory, which is most of the time of a vectorised pass.  A walk takes a workspace for the
    duration of a batch (:func:`workspace`) and gets its named arrays from it; a concurrent walk (another
    generator suspended in the middle of a batch) gets its own.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def array(self, name: str, n: int, dtype: "np.dtype[Any] | type" = np.uint64) -> np.ndarray:
        """A 1-D scratch array of ``n`` elements (contents undefined)."""
        b = self._bufs.get(name)
        if b is None or b.shape[0] < n or b.dtype != np.dtype(dtype):
            b = self._bufs[name] = np.empty(max(n, 4096), dtype=dtype)
        return b[:n]


_free_workspaces: list[Workspace] = []


@contextmanager
def workspace() -> Iterator[Workspace]:
    """Lease a :class:`Workspace` for the duration of a ``with`` block."""
    ws = _free_workspaces.pop() if _free_workspaces else Workspace()
    try:
        yield ws
    finally:
        _free_workspaces.append(ws)


def gather_pte_rows(pool: "TablePool", rows: np.ndarray, ws: Workspace) -> np.ndarray:
    """``pool.tables[table ids of rows]`` into scratch memory: shape ``(len(rows), 512)``."""
    tids = table_ids(rows)
    out = ws.array("pte_rows", tids.shape[0] * PTRS_PER_TABLE).reshape(-1, PTRS_PER_TABLE)
    return np.take(pool.tables, tids, axis=0, out=out)


# --- leaf fills in cache-sized pieces -------------------------------------------------------------------
_CHUNK = 1 << 16                                    # 512 KiB of uint64: the passes of a piece stay in L2
_AR = np.arange(_CHUNK, dtype=np.uint64)
_shifted: dict[int, np.ndarray] = {}


def _arange_shifted(n: int, shift: int) -> np.ndarray:
    """``arange(n) << shift``, cached (one array per shift, grown on demand)."""
    a = _shifted.get(shift)
    if a is None or a.shape[0] < n:
        a = _shifted[shift] = np.arange(max(n, 4096), dtype=np.uint64) << U64(shift)
    return a[:n]


def fill_leaf(view: np.ndarray, pfn0: int, cpu: int, keep: int) -> None:
    """``view[k] = (view[k] & keep) | (pfn0 + k) | cpu`` -- the per-page loop of a PMD/PUD leaf [6.18]
    (``keep``: the sticky input bits).  Done per piece of 65536 entries with three in-place passes while
    the piece is in cache; ``((x & keep) | ((p + s) | cpu)) + k`` equals the formula because no sum carries
    out of the pfn field (checked; otherwise the plain formula is used)."""
    n = view.shape[0]
    if pfn0 + n >= 1 << 52 or (cpu | keep) & ((1 << 53) - 1):
        view &= U64(keep)
        view |= np.arange(pfn0, pfn0 + n, dtype=np.uint64) | U64(cpu)
        return
    for s in range(0, n, _CHUNK):
        v = view[s:s + _CHUNK]
        np.bitwise_and(v, U64(keep), out=v)
        np.bitwise_or(v, U64((pfn0 + s) | cpu), out=v)
        np.add(v, _AR[:v.shape[0]], out=v)


def fill_from_pfn(view: np.ndarray, pfn0: int, shift: int, const: int) -> None:
    """``view[k] = ((pfn0 + k) << shift) | const`` with the C ``u64`` wrap-around -- the 5.2
    ``hmm_device_entry_from_pfn(pfn0 + k) | cpu`` loop.  When ``const`` lies below the shifted pfns and
    nothing wraps, that is ``(k << shift) + ((pfn0 << shift) | const)``: one pass over a cached
    ``arange << shift``."""
    n = view.shape[0]
    if shift < 64 and const < (1 << shift) and (pfn0 + n) << shift < 1 << 64:
        np.add(_arange_shifted(n, shift), U64((pfn0 << shift) | const), out=view)
        return
    for s in range(0, n, _CHUNK):
        v = view[s:s + _CHUNK]
        np.add(_AR[:v.shape[0]], U64(pfn0 + s), out=v)
        if shift:
            np.left_shift(v, U64(shift), out=v)
        np.bitwise_or(v, U64(const), out=v)
