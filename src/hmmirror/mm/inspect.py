"""Per-page inspection of the model's page tables (our own helper, in the vocabulary of
:mod:`hmmirror.include.pagestate`; its pagemap-like fields follow fs/proc/task_mmu.c).

Two implementations with identical results (``tests/mm/test_inspect_vectorised.py`` compares them on random
page-table states and on states the substrate reached by itself):

* the reference, :func:`model_page_state` / :func:`inspect_range_reference`: one ``pt.lookup`` per page,
  and for a page of a large folio [6.18: ``pagemap_exclusive_per_folio``] one more lookup per page of the
  folio (memoised per folio within a call);
* the vectorised :func:`inspect_arrays` (and :func:`inspect_range`, its list form): the upper levels are
  walked per entry in Python, every PMD table is read as one row slice and the PTE tables below it are
  gathered with one fancy-indexing step; classification, frame metadata and the per-folio test are numpy
  passes over the whole range.  The result is columnar (:class:`PageArrays`), so viewers never build a
  Python object per page.

Nothing here changes the model or takes a lock: call it between operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PTRS_PER_TABLE,
    PUD_SHIFT,
    PUD_SIZE,
    pte_to_swp_entry,
)
from hmmirror.include.pagestate import KINDS, LEVELS, PageState
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct


def _swap_kind(e: int) -> str:
    s = pte_to_swp_entry(e)
    if x86.is_migration_entry(s):
        return "migration"
    if x86.is_device_private_entry(s):
        return "device_private"
    if x86.is_device_exclusive_entry(s):
        return "device_exclusive"
    if x86.is_hwpoison_entry(s):
        return "hwpoison"
    if x86.is_pte_marker(s):
        return "marker"
    return "swap"


def _folio_mapped_only_here(mm: "MMStruct", addr: int, pfn: int, head: int, order: int) -> bool:
    """[6.18] ``!folio_maybe_mapped_shared()``: every mapping of the large folio is one of this mm's
    entries over the folio's linear VA range (model: compares the folio's total mapcount with them)."""
    import numpy as np

    mem = mm.machine.mem
    n = 1 << order
    total = int(mem.mapcount[head: head + n].sum())
    base = addr - ((pfn - head) << 12)
    here = 0
    for a in range(base, base + n * PAGE_SIZE, PAGE_SIZE):
        lvl, p, e = mm.pt.lookup(a)
        if p is None or x86.pte_none(e) or not x86.pte_present(e) and not (lvl != "pte" and e & x86._PAGE_PSE):
            continue
        off = (a & ((PMD_SIZE if lvl == "pmd" else PUD_SIZE) - 1)) >> 12 if lvl != "pte" else 0
        if head <= x86.pte_pfn(e) + off < head + n:
            here += 1
    _ = np
    return total == here


def model_page_state(mm: "MMStruct", addr: int, _memo: dict[int, bool] | None = None) -> PageState:
    """The state of the 4 KiB page at ``addr`` as the model's page tables describe it."""
    mem = mm.machine.mem
    level, p, e = mm.pt.lookup(addr)
    if p is None or x86.pte_none(e):
        return PageState(addr, False, None, "none", None, None, False, False, False, False, False, False)
    if level != "pte" and not x86.pmd_leaf(e) and e & x86._PAGE_PRESENT:
        return PageState(addr, False, None, "none", None, None, False, False, False, False, False, False)
    if not x86.pte_present(e) and not (level != "pte" and e & x86._PAGE_PSE):
        kind = _swap_kind(e)
        return PageState(addr, False, None, kind, level, None, False, False, False, False, True, False)
    off = (addr & ((PMD_SIZE if level == "pmd" else PUD_SIZE) - 1)) >> 12 if level != "pte" else 0
    pfn = x86.pte_pfn(e) + off
    special = level == "pte" and x86.pte_special(e)
    has_meta = pfn < mem.nr_pfns
    fl = int(mem.flags[pfn]) if has_meta else 0
    zero = bool(fl & PG.zero)
    if zero:
        kind = "zero"
    elif fl & PG.device:
        kind = "devmap"
    elif special or not has_meta:
        kind = "special"
    elif fl & PG.hugetlb:
        kind = "hugetlb"
    elif fl & PG.anon:
        kind = "anon"
    elif fl & PG.swapbacked:
        kind = "shmem"
    else:
        kind = "file"
    # pagemap: FILE for a struct page that is not anon (the huge zero folio included, the zero PTE not)
    page = has_meta and not special and not (fl & PG.device and not mm.machine.profile.dax_refcounted)
    if level != "pte" and has_meta:
        page = True                  # pagemap_pmd_range: pmd_page() of any present leaf, DAX included (6.12 guest)
    file_bit = page and not fl & PG.anon
    # PM_MMAP_EXCLUSIVE: the precise mapcount of the page is 1 (mapcount[] counts a PMD leaf in each of its
    # frames, so it is page->_mapcount + 1 + the folio's entire mapcount); a PMD leaf may read its head's
    exclusive = page and not zero and int(mem.mapcount[pfn]) == 1
    if page and not zero and level == "pmd" and mm.machine.profile.pagemap_pmd_exclusive_head \
            and pfn < mem.nr_ram and not fl & PG.hugetlb:
        exclusive = int(mem.mapcount[pfn - off]) == 1
    if page and not zero and mm.machine.profile.pagemap_exclusive_per_folio and pfn < mem.nr_ram:
        head = mem.compound_head(pfn)
        order = int(mem.order[head])
        if order and not fl & PG.hugetlb:
            memo = _memo if _memo is not None else {}
            if head not in memo:
                memo[head] = _folio_mapped_only_here(mm, addr, pfn, head, order)
            exclusive = memo[head]
    return PageState(
        addr=addr, present=True, pfn=pfn, kind=kind, level=level, write=x86.pte_write(e), zero=zero,
        huge=level != "pte", file=bool(file_bit), exclusive=bool(exclusive), swapped=False,
        protnone=x86.pte_protnone(e),
    )


def inspect_range_reference(mm: "MMStruct", start: int, end: int) -> list[PageState]:
    """Per-page states of ``[start, end)``, one lookup per page (the reference of :func:`inspect_range`)."""
    memo: dict[int, bool] = {}
    return [model_page_state(mm, a, memo) for a in range(start, end, PAGE_SIZE)]


def inspect_range(mm: "MMStruct", start: int, end: int) -> list[PageState]:
    """Per-page states of ``[start, end)`` (vectorised; equal to :func:`inspect_range_reference`)."""
    return inspect_arrays(mm, start, end).states()


# --- the vectorised form ---------------------------------------------------------------------------------
U64 = np.uint64
_AD = U64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
_P = U64(x86._PAGE_PRESENT)
_PRESENT_ANY = U64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE)
_PROTNONE = U64(x86._PAGE_PROTNONE)
_RW = U64(x86._PAGE_RW)
_PSE = U64(x86._PAGE_PSE)
_SPECIAL = U64(x86._PAGE_SPECIAL)
_PFN_MASK = U64(x86.PTE_PFN_MASK)
_PAGE_STEPS = np.arange(PTRS_PER_TABLE, dtype=np.uint64) << U64(PAGE_SHIFT)

#: Level codes of :class:`PageArrays` (``LEVEL_NAMES[code]``).
LVL_NONE, LVL_PTE, LVL_PMD, LVL_PUD = 0, 1, 2, 3
LEVEL_NAMES: tuple[str | None, ...] = (None, *LEVELS)
_KIND = {k: i for i, k in enumerate(KINDS)}
#: swap type (5 bits) -> kind code, from the scalar classification (one table, so both forms agree)
_SWAP_KIND = np.array([_KIND[_swap_kind(t << x86.SWP_TYPE_SHIFT)] for t in range(1 << x86.SWP_TYPE_BITS)],
                      dtype=np.uint8)


@dataclass
class PageArrays:
    """Per-page states of ``[start, end)`` as columns (index ``i`` is the page at ``start + i * 4096``).

    The fields of :class:`~hmmirror.include.pagestate.PageState`: ``present`` .. ``protnone`` are bool
    arrays, ``pfn`` int64 (-1 where :attr:`PageState.pfn` is None), ``kind`` uint8 codes into
    :data:`~hmmirror.include.pagestate.KINDS`, ``level`` codes into :data:`LEVEL_NAMES`.  ``write`` is
    meaningful where ``write_known`` (present pages; :attr:`PageState.write` is None elsewhere).
    """

    start: int
    end: int
    present: np.ndarray
    pfn: np.ndarray
    kind: np.ndarray
    level: np.ndarray
    write: np.ndarray
    write_known: np.ndarray
    zero: np.ndarray
    huge: np.ndarray
    file: np.ndarray
    exclusive: np.ndarray
    swapped: np.ndarray
    protnone: np.ndarray

    def __len__(self) -> int:
        return int(self.present.shape[0])

    def kind_name(self, i: int) -> str:
        return KINDS[int(self.kind[i])]

    def state(self, i: int) -> PageState:
        """The :class:`PageState` of page ``i``."""
        pfn = int(self.pfn[i])
        return PageState(self.start + i * PAGE_SIZE, bool(self.present[i]), None if pfn < 0 else pfn,
                         KINDS[int(self.kind[i])], LEVEL_NAMES[int(self.level[i])],
                         bool(self.write[i]) if self.write_known[i] else None, bool(self.zero[i]),
                         bool(self.huge[i]), bool(self.file[i]), bool(self.exclusive[i]), bool(self.swapped[i]),
                         bool(self.protnone[i]))

    def states(self) -> list[PageState]:
        """Every page as a :class:`PageState` (one object per page: for results, not for hot paths)."""
        cols = [c.tolist() for c in (self.present, self.pfn, self.kind, self.level, self.write, self.write_known,
                                     self.zero, self.huge, self.file, self.exclusive, self.swapped, self.protnone)]
        out = []
        addr = self.start
        for pr, pfn, k, lv, w, wk, z, h, f, x, sw, pn in zip(*cols):
            out.append(PageState(addr, pr, None if pfn < 0 else pfn, KINDS[k], LEVEL_NAMES[lv], w if wk else None,
                                 z, h, f, x, sw, pn))
            addr += PAGE_SIZE
        return out


def _walk(mm: "MMStruct", start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``pt.lookup`` finds for every page of ``[start, end)`` (page aligned): ``(level, entry)``.

    ``level`` is :data:`LVL_NONE` where a top level is missing (lookup's ``p is None``), else the level where
    lookup stopped; ``entry`` the entry there.  For a PMD/PUD entry that inspection treats as mapped (PSE
    set, or present) the pfn is advanced to the page's frame (``pte_pfn(e) + off``: no carry leaves the pfn
    field), so per-page pfns come out of one mask.
    """
    n = (end - start) >> PAGE_SHIFT
    lv = np.zeros(n, dtype=np.int8)
    ent = np.zeros(n, dtype=np.uint64)
    machine = mm.machine
    pool, geo, pt = machine.pool, machine.geo, mm.pt
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
                    _walk_pud(pool, x86.table_id_of(pool.get(p4dp)), a, n4, start, lv, ent)
                a = n4
        addr = nxt
    return lv, ent


def _walk_pud(pool: object, tid: int, addr: int, end: int, base: int, lv: np.ndarray, ent: np.ndarray) -> None:
    tables = pool.tables                                             # type: ignore[attr-defined]
    i0 = (addr >> PUD_SHIFT) & (PTRS_PER_TABLE - 1)
    i1 = ((end - 1) >> PUD_SHIFT) & (PTRS_PER_TABLE - 1)
    for k, i in enumerate(range(i0, i1 + 1)):
        a = addr if k == 0 else (addr & ~(PUD_SIZE - 1)) + k * PUD_SIZE
        b = min((a & ~(PUD_SIZE - 1)) + PUD_SIZE, end)
        pud = tables.item(tid, i)
        j0, j1 = (a - base) >> PAGE_SHIFT, (b - base) >> PAGE_SHIFT
        if x86.pte_none(pud) or x86.pud_leaf(pud):                    # lookup stops at the PUD
            lv[j0:j1] = LVL_PUD
            if x86.pud_leaf(pud) and not x86.pte_none(pud):
                first = (a & (PUD_SIZE - 1)) >> PAGE_SHIFT
                ent[j0:j1] = U64(pud) + (np.arange(first, first + j1 - j0, dtype=np.uint64) << U64(PAGE_SHIFT))
            else:
                ent[j0:j1] = pud
            continue
        _walk_pmd(tables, x86.table_id_of(pud), a, b, base, lv, ent)


def _walk_pmd(tables: np.ndarray, tid: int, addr: int, end: int, base: int, lv: np.ndarray, ent: np.ndarray) -> None:
    i0 = (addr >> PMD_SHIFT) & (PTRS_PER_TABLE - 1)
    i1 = ((end - 1) >> PMD_SHIFT) & (PTRS_PER_TABLE - 1)
    rows = tables[tid, i0:i1 + 1].copy()
    nrows = rows.shape[0]
    stop = ((rows & ~_AD) == 0) | ((rows & _PSE) != 0) | ((rows & _P) == 0)
    out_e = np.empty((nrows, PTRS_PER_TABLE), dtype=np.uint64)
    out_l = np.empty((nrows, PTRS_PER_TABLE), dtype=np.int8)
    table = ~stop
    if table.any():
        out_e[table] = tables[((rows[table] & _PFN_MASK) >> U64(PAGE_SHIFT)).astype(np.int64)]
        out_l[table] = LVL_PTE
    if stop.any():
        mapped = stop & ((rows & ~_AD) != 0) & (((rows & _PSE) != 0) | ((rows & _PRESENT_ANY) != 0))
        out_e[stop] = rows[stop][:, None]
        out_e[mapped] += _PAGE_STEPS[None, :]
        out_l[stop] = LVL_PMD
    off0 = (addr & (PMD_SIZE - 1)) >> PAGE_SHIFT
    npg = (end - addr) >> PAGE_SHIFT
    j0 = (addr - base) >> PAGE_SHIFT
    ent[j0:j0 + npg] = out_e.reshape(-1)[off0:off0 + npg]
    lv[j0:j0 + npg] = out_l.reshape(-1)[off0:off0 + npg]


def _mapped(lv: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Pages whose entry maps a frame as inspection sees it: not none, and present or a huge leaf."""
    return (lv != LVL_NONE) & ((e & ~_AD) != 0) & (((e & _PRESENT_ANY) != 0) | ((lv != LVL_PTE) & ((e & _PSE) != 0)))


class _Windows:
    """Walked VA intervals for the per-folio test (the folio windows may reach outside the range)."""

    def __init__(self, mm: "MMStruct", spans: list[tuple[int, int]]) -> None:
        self.parts: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for a, b in sorted(spans):
            if self.parts and a <= self.parts[-1][1]:
                a0, b0, _l, _e = self.parts.pop()
                a, b = a0, max(b, b0)
            self.parts.append((a, b, np.empty(0), np.empty(0)))
        self.parts = [(a, b, *_walk(mm, a, b)) for a, b, _l, _e in self.parts]

    def view(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        for s, e, lv, ent in self.parts:
            if s <= a and b <= e:
                i, j = (a - s) >> PAGE_SHIFT, (b - s) >> PAGE_SHIFT
                return lv[i:j], ent[i:j]
        raise AssertionError(f"window {a:#x}-{b:#x} not walked")


def inspect_arrays(mm: "MMStruct", start: int, end: int) -> PageArrays:
    """Per-page states of ``[start, end)`` (``start`` page aligned) as :class:`PageArrays`, vectorised;
    page for page equal to :func:`model_page_state`."""
    end = start + (-(-(end - start) // PAGE_SIZE) * PAGE_SIZE if end > start else 0)
    lv, e = _walk(mm, start, end)
    machine = mm.machine
    mem, profile = machine.mem, machine.profile
    n = lv.shape[0]
    notnone = (lv != LVL_NONE) & ((e & ~_AD) != 0)
    # lookup never stops at a present non-leaf upper entry, but model_page_state says "none" for one
    notnone &= ~((lv != LVL_PTE) & ((e & _PSE) == 0) & ((e & _P) != 0))
    huge_leaf = (lv != LVL_PTE) & ((e & _PSE) != 0)
    present = notnone & (((e & _PRESENT_ANY) != 0) | huge_leaf)
    swapped = notnone & ~present
    level = np.where(notnone, lv, LVL_NONE).astype(np.int8)

    kind = np.zeros(n, dtype=np.uint8)                               # "none"
    if swapped.any():
        kind[swapped] = _SWAP_KIND[(e[swapped] >> U64(x86.SWP_TYPE_SHIFT)).astype(np.int64) & 31]
    pfn = np.full(n, -1, dtype=np.int64)
    zero = np.zeros(n, dtype=bool)
    file = np.zeros(n, dtype=bool)
    exclusive = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(present)
    if idx.size:
        ep = e[idx]
        pf = ((ep & _PFN_MASK) >> U64(PAGE_SHIFT)).astype(np.int64)
        pfn[idx] = pf
        special = (lv[idx] == LVL_PTE) & ((ep & _SPECIAL) != 0)
        has_meta = pf < mem.nr_pfns
        fl = np.zeros(idx.size, dtype=np.uint32)
        fl[has_meta] = mem.flags[pf[has_meta]]
        z = (fl & PG.zero) != 0
        dev = (fl & PG.device) != 0
        anon = (fl & PG.anon) != 0
        hugetlb = (fl & PG.hugetlb) != 0
        k = np.select([z, dev, special | ~has_meta, hugetlb, anon, (fl & PG.swapbacked) != 0],
                      [_KIND["zero"], _KIND["devmap"], _KIND["special"], _KIND["hugetlb"], _KIND["anon"],
                       _KIND["shmem"]], _KIND["file"])
        kind[idx] = k
        page = has_meta & ~special
        if not profile.dax_refcounted:
            page &= ~dev
        page |= has_meta & (lv[idx] != LVL_PTE)    # pagemap_pmd_range: pmd_page() of any leaf, DAX included
        zero[idx] = z
        file[idx] = page & ~anon
        cand = page & ~z
        mc = np.zeros(idx.size, dtype=np.int32)
        mc[cand] = mem.mapcount[pf[cand]]
        excl = cand & (mc == 1)
        if profile.pagemap_pmd_exclusive_head:
            # a PMD leaf reads the mapcount of the frame its entry points to (pfn - off), for all its pages
            head_rule = cand & (level[idx] == LVL_PMD) & (pf < mem.nr_ram) & ~hugetlb
            if head_rule.any():
                off = ((start >> PAGE_SHIFT) + idx[head_rule]) & (PTRS_PER_TABLE - 1)
                excl[head_rule] = mem.mapcount[pf[head_rule] - off] == 1
        if profile.pagemap_exclusive_per_folio:
            _per_folio(mm, start, idx, pf, cand & (pf < mem.nr_ram) & ~hugetlb, excl)
        exclusive[idx] = excl
    return PageArrays(start, end, present, pfn, kind, level, (e & _RW) != 0, present, zero,
                      present & (lv != LVL_PTE), file, exclusive, swapped,
                      present & ((e & _PRESENT_ANY) == _PROTNONE))


def _per_folio(mm: "MMStruct", start: int, idx: np.ndarray, pf: np.ndarray, cand: np.ndarray,
               excl: np.ndarray) -> None:
    """[6.18] ``exclusive`` of pages of large folios: :func:`_folio_mapped_only_here`, once per folio, with
    the address of the folio's first page in the range (as the reference's memo does)."""
    mem = mm.machine.mem
    sel = np.flatnonzero(cand)
    if not sel.size:
        return
    order_at = mem.order[pf[sel]].astype(np.int64)
    head = pf[sel] & ~((np.int64(1) << order_at) - 1)
    horder = mem.order[head].astype(np.int64)
    big = horder > 0
    sel, head, horder = sel[big], head[big], horder[big]
    if not sel.size:
        return
    heads, first, inverse = np.unique(head, return_index=True, return_inverse=True)
    top = mm.machine.geo.task_size
    jobs = []
    for h, f in zip(heads.tolist(), first.tolist()):
        i = int(sel[f])
        nr = 1 << int(horder[f])
        addr = start + int(idx[i]) * PAGE_SIZE
        base = addr - ((int(pf[i]) - h) << PAGE_SHIFT)
        # pages outside [0, TASK_SIZE) are never mapped: lookup finds nothing there
        jobs.append((h, nr, max(base, 0), min(base + nr * PAGE_SIZE, top)))
    win = _Windows(mm, [(a, b) for _h, _n, a, b in jobs if a < b])
    value = np.zeros(len(jobs), dtype=bool)
    for j, (h, nr, a, b) in enumerate(jobs):
        total = int(mem.mapcount[h:h + nr].sum())
        here = 0
        if a < b:
            wl, we = win.view(a, b)
            m = _mapped(wl, we)
            p = ((we & _PFN_MASK) >> U64(PAGE_SHIFT)).astype(np.int64)
            here = int(np.count_nonzero(m & (p >= h) & (p < h + nr)))
        value[j] = total == here
    excl[sel] = value[inverse]
