"""Model self-checks (ours; the kernel's mm/debug.c dumps pages, this checks them): leaf-entry enumeration and
the page-count invariant, for tests and for the simulator's invariant checks.

Counting convention checked by :func:`check_counts` (docs/design.md "Data layout"):

* ``mapcount[pfn]`` equals the number of leaf entries, over the page tables of every live mm, that map the
  frame: a PTE maps one frame, a PMD leaf 512, a PUD leaf 262144.  Entries that do not count: special PTEs
  (zero page, ``VM_PFNMAP``/``vmf_insert_pfn`` pfns), PTEs in ``VM_PFNMAP`` VMAs, frames :func:`rmap.counted`
  rejects (zero pages, DAX frames where DAX is not refcounted).  Device-private and device-exclusive
  swap-format entries map their frame (the kernel keeps the rmap of both), migration entries do not (frames
  under migration are skipped: their counts are in flight).
* ``refcount[head]`` of a RAM folio equals one per leaf entry mapping any of its frames (plus ``extra_refs``),
  exactly for anonymous folios and as a lower bound for the others (page-cache, hugetlbfs and driver
  references are not visible to a page-table walk); tail frames hold 0; free frames are not mapped.
* device-private pages counted from zero ([6.0+]): ``refcount`` equals the device-private and
  device-exclusive entries naming the page (plus ``extra_refs``) exactly -- a page the driver holds without a
  mapping must be declared in ``extra_refs`` --, and a free page (refcount 0) is not locked.  [6.12] a
  device-exclusive entry holds a reference but no mapcount.
* every non-none leaf entry lies inside a VMA of its mm.

The checks hold at quiescent points (no fault, migration or device operation half done).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    HPAGE_PMD_NR,
    HPAGE_PUD_NR,
    PTE_PFN_MASK,
    PTRS_PER_TABLE,
    pte_to_swp_entry,
    table_id_of,
)
from hmmirror.include.mm_types import VM
from hmmirror.mm import rmap
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import MMStruct

LEVEL_PTE, LEVEL_PMD, LEVEL_PUD = 1, 2, 3
LEVEL_NAMES = {LEVEL_PTE: "pte", LEVEL_PMD: "pmd", LEVEL_PUD: "pud"}
_AD = _PAGE_ACCESSED | _PAGE_DIRTY
_IGNORED = _AD | _PAGE_SOFT_DIRTY
_U = np.uint64
_ULONG = 1 << 64


def leaf_entries(mm: "MMStruct", start: int = 0, end: int = _ULONG) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-none leaf slot of ``mm``'s page tables that intersects ``[start, end)``.

    Returns three arrays: the address each slot maps from (int64, the leaf's first address), the entry (uint64,
    present or swap-format) and the level (``LEVEL_PTE``/``PMD``/``PUD``), in address order.  The tables are
    walked, not the VMAs: the upper levels entry by entry, the PTE tables all in one numpy scan (the same
    arrays as :func:`leaf_entries_reference`, which scans them one by one)."""
    pool = mm.machine.pool
    geo = mm.machine.geo
    tables = pool.tables
    ad = _U(_AD)
    big_a: list[int] = []                     # PMD/PUD-level leaves (huge or not present): address, entry, level
    big_v: list[int] = []
    big_l: list[int] = []
    pte_tid: list[int] = []                   # PTE tables met: table id, base address, first and last slot
    pte_base: list[int] = []
    pte_first: list[int] = []
    pte_last: list[int] = []

    def walk(tid: int, base: int, shift: int) -> None:
        size = 1 << shift
        first = max(0, (start - base) >> shift) if start > base else 0
        last = min(PTRS_PER_TABLE, -(-(end - base) // size))
        if first >= last:
            return
        if shift == 12:
            pte_tid.append(tid)
            pte_base.append(base)
            pte_first.append(first)
            pte_last.append(last)
            return
        row = tables[tid, first:last]
        idx = np.nonzero(row & ~ad)[0]
        if not idx.size:
            return
        for i in idx.tolist():
            e = int(row[i])
            a = base + (first + i) * size
            if shift <= x86.PUD_SHIFT and (e & _PAGE_PSE or not e & _PAGE_PRESENT):
                big_a.append(a)
                big_v.append(e)
                big_l.append(LEVEL_PMD if shift == x86.PMD_SHIFT else LEVEL_PUD)
            elif e & _PAGE_PRESENT:
                walk(table_id_of(e), a, shift - 9)

    walk(mm.pt.pgd, 0, geo.pgdir_shift)
    parts_a: list[np.ndarray] = []
    parts_v: list[np.ndarray] = []
    parts_l: list[np.ndarray] = []
    if pte_tid:
        rows = tables[np.array(pte_tid, dtype=np.int64)]
        live = (rows & ~ad) != 0
        first_a = np.array(pte_first, dtype=np.int64)
        last_a = np.array(pte_last, dtype=np.int64)
        if first_a.any() or (last_a != PTRS_PER_TABLE).any():     # a table cut by start / end
            col = np.arange(PTRS_PER_TABLE, dtype=np.int64)
            live &= (col >= first_a[:, None]) & (col < last_a[:, None])
        r, c = np.nonzero(live)
        if r.size:
            parts_a.append(np.array(pte_base, dtype=np.int64)[r] + (c.astype(np.int64) << 12))
            parts_v.append(rows[r, c])
            parts_l.append(np.full(r.size, LEVEL_PTE, dtype=np.int8))
    if big_a:
        parts_a.append(np.array(big_a, dtype=np.int64))
        parts_v.append(np.array(big_v, dtype=np.uint64))
        parts_l.append(np.array(big_l, dtype=np.int8))
    if not parts_a:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int8))
    if len(parts_a) == 1:
        return parts_a[0], parts_v[0], parts_l[0]
    addrs, vals, lvls = np.concatenate(parts_a), np.concatenate(parts_v), np.concatenate(parts_l)
    order = np.argsort(addrs, kind="stable")  # the walk's order: ascending (one leaf per address)
    return addrs[order], vals[order], lvls[order]


def leaf_entries_reference(mm: "MMStruct", start: int = 0, end: int = _ULONG) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`leaf_entries` table by table (the reference: one numpy scan per PTE table).

    Every non-none leaf slot of ``mm``'s page tables that intersects ``[start, end)``.

    Returns three arrays: the address each slot maps from (int64, the leaf's first address), the entry (uint64,
    present or swap-format) and the level (``LEVEL_PTE``/``PMD``/``PUD``).  The tables are walked, not the VMAs.
    """
    pool = mm.machine.pool
    geo = mm.machine.geo
    addrs: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lvls: list[np.ndarray] = []
    ad = _U(_AD)

    def walk(tid: int, base: int, shift: int) -> None:
        size = 1 << shift
        first = max(0, (start - base) >> shift) if start > base else 0
        last = min(PTRS_PER_TABLE, -(-(end - base) // size))
        if first >= last:
            return
        row = pool.tables[tid, first:last]
        idx = np.nonzero(row & ~ad)[0]
        if not idx.size:
            return
        if shift == 12:
            addrs.append(base + ((idx.astype(np.int64) + first) << 12))
            vals.append(row[idx].copy())
            lvls.append(np.full(idx.size, LEVEL_PTE, dtype=np.int8))
            return
        for i in idx.tolist():
            e = int(row[i])
            a = base + (first + i) * size
            if shift <= x86.PUD_SHIFT and (e & _PAGE_PSE or not e & _PAGE_PRESENT):
                addrs.append(np.array([a], dtype=np.int64))
                vals.append(np.array([e], dtype=np.uint64))
                lvls.append(np.array([LEVEL_PMD if shift == x86.PMD_SHIFT else LEVEL_PUD], dtype=np.int8))
            elif e & _PAGE_PRESENT:
                walk(table_id_of(e), a, shift - 9)

    walk(mm.pt.pgd, 0, geo.pgdir_shift)
    if not addrs:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int8))
    return np.concatenate(addrs), np.concatenate(vals), np.concatenate(lvls)


def leaf_present(vals: np.ndarray, lvls: np.ndarray) -> np.ndarray:
    """Which leaf entries map a frame: P or PROTNONE, or a PSE leaf at the PMD/PUD level."""
    pres = (vals & _U(_PAGE_PRESENT | _PAGE_PROTNONE)) != 0
    return pres | ((lvls > LEVEL_PTE) & ((vals & _U(_PAGE_PSE)) != 0))


def page_values(mm: "MMStruct", start: int = 0, end: int = _ULONG) -> dict[int, tuple[int, int]]:
    """Per 4 KiB page of ``[start, end)``: ``(entry, level)`` of the leaf that translates it, with accessed,
    dirty and soft-dirty cleared; a huge leaf contributes its pfn plus the page's offset, PSE cleared."""
    addrs, vals, lvls = leaf_entries(mm, start, end)
    out: dict[int, tuple[int, int]] = {}
    keep = ~_U(_IGNORED)
    small = lvls == LEVEL_PTE
    for a, v in zip(addrs[small].tolist(), (vals[small] & keep).tolist()):
        if start <= a < end:
            out[a] = (v, LEVEL_PTE)
    pres = leaf_present(vals, lvls)
    for a, v, lv, p in zip(addrs[~small].tolist(), vals[~small].tolist(), lvls[~small].tolist(),
                           pres[~small].tolist()):
        n = HPAGE_PMD_NR if lv == LEVEL_PMD else HPAGE_PUD_NR
        v &= ~_IGNORED
        lo, hi = max(a, start), min(a + (n << 12), end)
        if p:
            v &= ~_PAGE_PSE
            for pa in range(lo, hi, 4096):
                out[pa] = (v + (pa - a), lv)
        else:
            for pa in range(lo, hi, 4096):
                out[pa] = (v, lv)
    return out


def _vma_mask(mm: "MMStruct", addrs: np.ndarray, flag: int = 0) -> np.ndarray:
    """Which addresses lie inside a VMA of ``mm`` (with ``flag`` set in its vm_flags, when given)."""
    vmas = [v for v in mm.vmas if not flag or v.vm_flags & flag]
    if not vmas or not addrs.size:
        return np.zeros(addrs.shape, dtype=bool)
    starts = np.array([v.vm_start for v in vmas], dtype=np.int64)
    ends = np.array([v.vm_end for v in vmas], dtype=np.int64)
    i = np.searchsorted(starts, addrs, side="right") - 1
    ok = i >= 0
    ok[ok] &= addrs[ok] < ends[i[ok]]
    return ok


class _Leaves(NamedTuple):
    """The leaf entries of one mm, sorted by what the page-count invariant does with them."""

    outside: list[int]                 # addresses of entries outside every VMA (at most ``limit``)
    small: np.ndarray                  # counted frames mapped by PTEs (one per entry, repeats kept)
    heads: np.ndarray                  # ... their folio heads
    big: list[tuple[int, int, int]]    # counted huge leaves: (first frame, frames, folio head)
    swp: list[tuple[int, int, int]]    # device-private / device-exclusive / migration entries: (frame, head, kind)


SWP_PRIVATE, SWP_EXCLUSIVE, SWP_MIGRATION = 0, 1, 2


def _counted_leaves(machine: "Machine", mm: "MMStruct", limit: int) -> _Leaves | None:
    """What every form of the page-count check reads from the page tables of ``mm`` (None: no leaf entry):
    which entries lie outside every VMA, which frames a PTE or a huge leaf maps and counts (special entries,
    ``VM_PFNMAP`` VMAs and frames :func:`rmap.counted` rejects do not), and the swap-format entries that name
    a frame (device-private, device-exclusive, migration; others -- swap, hwpoison -- do not)."""
    mem = machine.mem
    dax_rc = machine.profile.dax_refcounted
    n = mem.nr_pfns
    addrs, vals, lvls = leaf_entries(mm)
    if not addrs.size:
        return None
    outside = addrs[~_vma_mask(mm, addrs)][:limit].tolist()
    pres = leaf_present(vals, lvls)
    pfns = ((vals & _U(PTE_PFN_MASK)) >> _U(12)).astype(np.int64)
    # PTEs: special entries and VM_PFNMAP VMAs have no struct-page semantics (vm_normal_page())
    small = pres & (lvls == LEVEL_PTE) & ((vals & _U(_PAGE_SPECIAL)) == 0)
    small &= ~_vma_mask(mm, addrs, VM.PFNMAP)
    sp = pfns[small]
    sp = sp[rmap.counted_mask(mem, sp, dax_rc)]
    heads = sp.copy()
    ram = sp < mem.nr_ram
    if ram.any():
        heads[ram] = sp[ram] & ~((1 << mem.order[sp[ram]].astype(np.int64)) - 1)
    bigm = pres & (lvls > LEVEL_PTE)
    big = []
    for pfn, lv in zip(pfns[bigm].tolist(), lvls[bigm].tolist()):
        if rmap.counted(mem, pfn, dax_rc):
            big.append((pfn, HPAGE_PMD_NR if lv == LEVEL_PMD else HPAGE_PUD_NR, mem.compound_head(pfn)))
    swp = []
    for e in vals[~pres].tolist():
        s = pte_to_swp_entry(int(e))
        if s.offset >= n:
            continue
        if x86.is_device_private_entry(s):
            swp.append((s.offset, mem.compound_head(s.offset), SWP_PRIVATE))
        elif x86.is_device_exclusive_entry(s):
            swp.append((s.offset, mem.compound_head(s.offset), SWP_EXCLUSIVE))
        elif x86.is_migration_entry(s):
            swp.append((s.offset, mem.compound_head(s.offset), SWP_MIGRATION))
    return _Leaves(outside, sp, heads, big, swp)


def _segments(mem: "PhysMem") -> list[tuple[int, int]]:
    """The pfn ranges that hold frames: RAM, then every device range (ascending, merged)."""
    out = [(0, mem.nr_ram)]
    for s, e, _ in sorted(mem.device_ranges, key=lambda r: r[0]):
        if s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


_SCRATCH: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed per-pfn arrays of ``n`` frames for one check: views of arrays kept between checks and machines
    (the largest size asked for so far; each check puts back every zero it changed)."""
    size = next(iter(_SCRATCH), 0)
    if size < n:
        _SCRATCH.clear()
        size = n
        _SCRATCH[n] = (np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32), np.zeros(n, dtype=bool))
    a, b, c = _SCRATCH[size]
    return a[:n], b[:n], c[:n]


def poisoned_refs_of(mem: "PhysMem") -> dict[int, int]:
    """``{pfn: 1}`` for every RAM frame with ``PG_hwpoison`` and a reference: memory_failure() keeps the
    reference of a poisoned page it unmapped (the extra reference the page-count invariant allows it)."""
    poisoned = np.flatnonzero(mem.flags[:mem.nr_ram] & np.uint32(PG.hwpoison))
    return {int(p): 1 for p in poisoned.tolist() if mem.refcount[p] > 0}


def _add_poisoned(mem: "PhysMem", extra_refs: dict[int, int] | None) -> dict[int, int] | None:
    extra = dict(extra_refs or {})
    for p, k in poisoned_refs_of(mem).items():
        extra[p] = extra.get(p, 0) + k
    return extra or None


def check_counts(machine: "Machine", extra_refs: dict[int, int] | None = None, limit: int = 20,
                 poisoned_refs: bool = False) -> list[str]:
    """:func:`check_counts_reference` (the page-count invariant), the same mismatches in the same order, at
    the cost of the frames that exist: the walk's counts go into kept scratch arrays (only the slots it
    touched are cleared again), and the frames compared are RAM and the device ranges -- the pfns between
    them (device ranges start 1 GiB aligned, far above a small RAM) hold no frame.  When a leaf entry, a
    count or a migration names such a pfn after all, the reference runs instead.

    ``poisoned_refs``: as if :func:`poisoned_refs_of` were added to ``extra_refs`` (found among the frames
    with a reference the check looks at anyway, not by a scan of all RAM)."""
    mem = machine.mem
    if poisoned_refs:
        def reference() -> list[str]:
            return check_counts_reference(machine, _add_poisoned(mem, extra_refs), limit)
    else:
        def reference() -> list[str]:
            return check_counts_reference(machine, extra_refs, limit)
    n = mem.nr_pfns
    segs = _segments(mem)
    holes = [(a, b) for (_, a), (b, _) in zip(segs, segs[1:] + [(n, n)]) if a < b]
    for a, b in holes:
        if np.count_nonzero(mem.mapcount[a:b]):
            return reference()
    bounds = np.array([x for seg in segs for x in seg], dtype=np.int64)

    def in_holes(pfns: np.ndarray) -> bool:
        if not holes or not pfns.size:
            return False
        return bool((np.searchsorted(bounds, pfns, side="right") % 2 == 0).any())

    def span_in_holes(a: int, b: int) -> bool:
        """Whether ``[a, b)`` (within ``[0, n)``) meets a hole: it does not lie inside one segment."""
        b = min(b, n)
        return bool(holes) and a < b and not any(lo <= a and b <= hi for lo, hi in segs)

    excl_rmap = machine.profile.make_device_exclusive_single
    walked_map, walked_ref, in_flight = _scratch(n)
    map_idx: list[np.ndarray] = []             # where the walk counted mappings (pfns) ...
    ref_idx: list[np.ndarray] = []             # ... and references (heads): zeroed again at the end
    map_spans: list[tuple[int, int]] = []      # huge leaves' frame ranges (mappings)
    spans: list[tuple[int, int]] = []          # ranges to zero again (huge leaves, folios in flight)
    try:
        out: list[str] = []
        for mm in machine.mms.values():
            if mm.exited:
                continue
            lv = _counted_leaves(machine, mm, limit)
            if lv is None:
                continue
            for a in lv.outside:
                out.append(f"{mm.name}: leaf entry at {a:#x} outside every VMA")
            sp, heads = lv.small, lv.heads
            if sp.size:
                if in_holes(sp) or in_holes(heads):
                    return reference()
                map_idx.append(sp)
                ref_idx.append(heads)
                np.add.at(walked_map, sp, 1)
                np.add.at(walked_ref, heads, 1)
            for pfn, nr, head in lv.big:
                if span_in_holes(pfn, pfn + nr) or in_holes(np.array([head], dtype=np.int64)):
                    return reference()
                spans.append((pfn, pfn + nr))
                map_spans.append((pfn, min(pfn + nr, n)))
                walked_map[pfn: pfn + nr] += 1
                ref_idx.append(np.array([head], dtype=np.int64))
                walked_ref[head] += 1
            for pfn, head, kind in lv.swp:
                if kind != SWP_MIGRATION:
                    if in_holes(np.array([pfn, head], dtype=np.int64)):
                        return reference()
                    ref_idx.append(np.array([head], dtype=np.int64))
                    # [6.12] a device-exclusive entry holds the page's reference but not its rmap
                    if kind == SWP_PRIVATE or excl_rmap:
                        map_idx.append(np.array([pfn], dtype=np.int64))
                        walked_map[pfn] += 1
                    walked_ref[head] += 1
                else:
                    if in_holes(np.array([head], dtype=np.int64)):
                        return reference()
                    spans.append((head, head + 1))
                    in_flight[head] = True
        for h in sorted({a for a, b in spans if b == a + 1 and in_flight[a]}):
            end = h + (1 << int(mem.order[h]))
            if span_in_holes(h, end):
                return reference()
            spans.append((h, end))
            in_flight[h: end] = True
        # the frames that can disagree: a nonzero mapcount or a counted mapping (the walk's slots); marked
        # in a mask per segment (sorted, no duplicates) rather than sorted (np.unique: slow on long runs)
        bad_parts = []
        for lo, hi in segs:
            mask = mem.mapcount[lo:hi] != 0
            for idx in map_idx:
                mask[idx[(idx >= lo) & (idx < hi)] - lo] = True
            for a, b in map_spans:
                if a < hi and b > lo:
                    mask[max(a, lo) - lo: min(b, hi) - lo] = True
            cand = np.flatnonzero(mask)
            if cand.size > (hi - lo) >> 3:        # most of the segment: compared whole (as the reference)
                bad_parts.append(lo + np.nonzero((mem.mapcount[lo:hi] != walked_map[lo:hi]) & ~in_flight[lo:hi])[0])
                continue
            cand += lo
            bad_parts.append(cand[(mem.mapcount[cand] != walked_map[cand]) & ~in_flight[cand]])
        bad_map = np.concatenate(bad_parts)
        for pfn in bad_map[:limit].tolist():
            out.append(f"pfn {pfn:#x}: mapcount {int(mem.mapcount[pfn])}, but {int(walked_map[pfn])} leaf entries map it")
        if bad_map.size > limit:
            out.append(f"... {bad_map.size - limit} more mapcount mismatches")
        out.extend(_ram_refs_sparse(mem, walked_map, walked_ref, in_flight, ref_idx, extra_refs, limit,
                                    map_idx, map_spans, poisoned_refs))
        out.extend(_device_refs(machine, walked_ref, in_flight, extra_refs, limit))
        return out
    finally:
        for idx in map_idx + ref_idx:
            walked_map[idx] = 0
            walked_ref[idx] = 0
        for a, b in spans:
            walked_map[a:b] = 0
            in_flight[a:b] = False


def _ram_refs_sparse(mem: "PhysMem", walked_map: np.ndarray, walked_ref: np.ndarray, in_flight: np.ndarray,
                     ref_idx: list[np.ndarray], extra_refs: dict[int, int] | None, limit: int,
                     map_idx: list[np.ndarray], map_spans: list[tuple[int, int]], poisoned_refs: bool) -> list[str]:
    """:func:`_ram_refs` looking closely only at the RAM frames that can disagree: those with a nonzero
    refcount and those the walk or ``extra_refs`` expect references on (the mapped ones -- where the walk
    counted mappings, ``map_idx``/``map_spans`` -- for "free, but")."""
    out: list[str] = []
    nr = mem.nr_ram
    flags, refcount = mem.flags, mem.refcount
    # mapped free frames: among the frames the walk counted mappings on (its slots and huge spans)
    parts = []
    for idx in map_idx:
        idx = idx[idx < nr]
        parts.append(idx[(flags[idx] & PG.buddy) != 0])
    for a, b in map_spans:
        if a < nr:
            parts.append(a + np.flatnonzero(flags[a: min(b, nr)] & PG.buddy))
    mapped_free = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    for pfn in mapped_free[:limit].tolist():
        out.append(f"pfn {pfn:#x}: free, but {int(walked_map[pfn])} leaf entries map it")
    extra = {h: k for h, k in (extra_refs or {}).items() if h < nr}
    mask = refcount[:nr] != 0
    for idx in ref_idx:
        mask[idx[idx < nr]] = True
    for h in extra:
        mask[h] = True
    cand = np.flatnonzero(mask)
    if cand.size > nr >> 3:                        # most of RAM in use: the reference's whole-RAM arrays
        if poisoned_refs:
            extra_refs = _add_poisoned(mem, extra_refs)
        return out + _ram_refs_dense(mem, walked_map, walked_ref, in_flight, extra_refs, limit, skip_free=True)
    fl = flags[cand]
    rc = refcount[cand]
    want = walked_ref[cand].copy()
    for h, k in extra.items():
        want[np.searchsorted(cand, h)] += k
    if poisoned_refs:                              # (every frame with a reference is a candidate)
        want += ((fl & PG.hwpoison) != 0) & (rc > 0)
    skip = ((fl & (PG.zero | PG.reserved)) != 0) | in_flight[cand]
    free = (fl & PG.buddy) != 0
    tail = (fl & PG.tail) != 0
    for i in np.nonzero(tail & (rc != 0) & ~skip)[0][:limit].tolist():
        out.append(f"pfn {int(cand[i]):#x}: tail frame with refcount {int(rc[i])}")
    head = ~tail & ~free & ~skip
    anon = (fl & PG.anon) != 0
    for i in np.nonzero(head & anon & (rc != want))[0][:limit].tolist():
        out.append(f"pfn {int(cand[i]):#x}: anon folio refcount {int(rc[i])}, but {int(want[i])} leaf entries map it")
    for i in np.nonzero(head & ~anon & (rc < want))[0][:limit].tolist():
        out.append(f"pfn {int(cand[i]):#x}: refcount {int(rc[i])} below its {int(want[i])} mappings")
    return out


def check_counts_reference(machine: "Machine", extra_refs: dict[int, int] | None = None, limit: int = 20) -> list[str]:
    """The page-count invariant (module docstring): every frame's mapcount and every RAM folio's refcount
    agree with a walk of the page tables of all live mms.  Returns the mismatches (empty: consistent), at
    most ``limit`` of each kind.  The reference: arrays over the whole pfn space; :func:`check_counts` gives
    the same list touching only the frames that exist."""
    mem = machine.mem
    excl_rmap = machine.profile.make_device_exclusive_single
    n = mem.nr_pfns
    # int32 like the counts themselves: no widened copies of the whole pfn space
    walked_map = np.zeros(n, dtype=np.int32)
    walked_ref = np.zeros(n, dtype=np.int32)
    in_flight = np.zeros(n, dtype=bool)
    out: list[str] = []
    for mm in machine.mms.values():
        if mm.exited:
            continue
        lv = _counted_leaves(machine, mm, limit)
        if lv is None:
            continue
        for a in lv.outside:
            out.append(f"{mm.name}: leaf entry at {a:#x} outside every VMA")
        if lv.small.size:
            np.add.at(walked_map, lv.small, 1)
            np.add.at(walked_ref, lv.heads, 1)
        for pfn, nr, head in lv.big:
            walked_map[pfn: pfn + nr] += 1
            walked_ref[head] += 1
        for pfn, head, kind in lv.swp:
            if kind == SWP_MIGRATION:
                in_flight[head] = True
                continue
            # [6.12] a device-exclusive entry holds the page's reference but not its rmap
            if kind == SWP_PRIVATE or excl_rmap:
                walked_map[pfn] += 1
            walked_ref[head] += 1
    # frames of a folio under migration: spread the head's mark over the folio
    if in_flight.any():
        for h in np.nonzero(in_flight)[0].tolist():
            in_flight[h: h + (1 << int(mem.order[h]))] = True
    bad_map = np.nonzero((mem.mapcount != walked_map) & ~in_flight)[0]
    for pfn in bad_map[:limit].tolist():
        out.append(f"pfn {pfn:#x}: mapcount {int(mem.mapcount[pfn])}, but {int(walked_map[pfn])} leaf entries map it")
    if bad_map.size > limit:
        out.append(f"... {bad_map.size - limit} more mapcount mismatches")
    out.extend(_ram_refs(machine, walked_map, walked_ref, in_flight, extra_refs, limit))
    out.extend(_device_refs(machine, walked_ref, in_flight, extra_refs, limit))
    return out


def _ram_refs(machine: "Machine", walked_map: np.ndarray, walked_ref: np.ndarray, in_flight: np.ndarray,
              extra_refs: dict[int, int] | None, limit: int) -> list[str]:
    """The RAM half of the refcounts of the page-count invariant, from the walk's counts (the reference)."""
    return _ram_refs_dense(machine.mem, walked_map, walked_ref, in_flight, extra_refs, limit)


def _ram_refs_dense(mem: "PhysMem", walked_map: np.ndarray, walked_ref: np.ndarray, in_flight: np.ndarray,
                    extra_refs: dict[int, int] | None, limit: int, skip_free: bool = False) -> list[str]:
    """:func:`_ram_refs` with arrays over the whole RAM (``skip_free``: without the "free, but" lines)."""
    out: list[str] = []
    # refcounts of RAM frames
    nr = mem.nr_ram
    fl = mem.flags[:nr]
    rc = mem.refcount[:nr]
    want = walked_ref[:nr].copy()
    if extra_refs:
        for h, k in extra_refs.items():
            if h < nr:
                want[h] += k
    skip = ((fl & (PG.zero | PG.reserved)) != 0) | in_flight[:nr]
    free = (fl & PG.buddy) != 0
    tail = (fl & PG.tail) != 0
    mapped_free = np.nonzero(free & (walked_map[:nr] > 0))[0]
    for pfn in ([] if skip_free else mapped_free[:limit].tolist()):
        out.append(f"pfn {pfn:#x}: free, but {int(walked_map[pfn])} leaf entries map it")
    bad_tail = np.nonzero(tail & (rc != 0) & ~skip)[0]
    for pfn in bad_tail[:limit].tolist():
        out.append(f"pfn {pfn:#x}: tail frame with refcount {int(rc[pfn])}")
    head = ~tail & ~free & ~skip
    anon = (fl & PG.anon) != 0
    exact = head & anon & (rc != want)
    low = head & ~anon & (rc < want)
    for pfn in np.nonzero(exact)[0][:limit].tolist():
        out.append(f"pfn {pfn:#x}: anon folio refcount {int(rc[pfn])}, but {int(want[pfn])} leaf entries map it")
    for pfn in np.nonzero(low)[0][:limit].tolist():
        out.append(f"pfn {pfn:#x}: refcount {int(rc[pfn])} below its {int(want[pfn])} mappings")
    return out


def _device_refs(machine: "Machine", walked_ref: np.ndarray, in_flight: np.ndarray,
                 extra_refs: dict[int, int] | None, limit: int) -> list[str]:
    """The device-private half of the refcounts of the page-count invariant."""
    mem = machine.mem
    out: list[str] = []
    # device-private pages counted from zero [6.0+]: refcount = mappings (+ extra_refs) exactly; a free
    # page (refcount 0) is neither mapped nor locked
    for pgmap in machine.pgmaps:
        if not getattr(pgmap, "free_at_zero", False) or pgmap.res is None:
            continue
        lo, hi = pgmap.res.start, pgmap.res.end
        drc = mem.refcount[lo:hi]
        wr = walked_ref[lo:hi]
        ne = drc != wr                          # one pass; the extra references and the folios in flight are
        extra = {h - lo: k for h, k in (extra_refs or {}).items() if lo <= h < hi}   # few: fixed up after it
        for off, k in extra.items():
            ne[off] = int(drc[off]) != int(wr[off]) + k
        bad = np.flatnonzero(ne)
        bad = bad[~in_flight[lo + bad]]
        for off in bad[:limit].tolist():
            out.append(f"device pfn {lo + off:#x} ({pgmap.name}): refcount {int(drc[off])}, but "
                       f"{int(wr[off]) + extra.get(off, 0)} entries map it")
        locked = np.flatnonzero((mem.flags[lo:hi] & np.uint32(PG.locked)) != 0)
        locked_free = locked[drc[locked] == 0]
        for off in locked_free[:limit].tolist():
            out.append(f"device pfn {lo + off:#x} ({pgmap.name}): free but locked")
    return out




def entries_in(mm: "MMStruct", start: int, end: int) -> list[tuple[int, str, int]]:
    """The non-none leaf entries of ``[start, end)`` as ``(address, level name, entry)`` (for messages)."""
    addrs, vals, lvls = leaf_entries(mm, start, end)
    return [(a, LEVEL_NAMES[lv], v) for a, v, lv in zip(addrs.tolist(), vals.tolist(), lvls.tolist())]

