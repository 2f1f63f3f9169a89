"""The vectorised building blocks of hmmirror.fast against their scalar references.

decode.py against the predicates of arch/x86/pgtable.py (the scalar twins named in each docstring);
gather.py against ``PageTables.lookup`` page by page; the leaf fills against their per-page formulas
(hmm-modern.md §4.5 ``out[k] = (out & STICKY) | (pfn + k) | cpu``; hmm-5.2.md §1.4
``device_entry_from_pfn(pfn) | cpu`` with the C u64 wrap); fault.first_populated against a page scan.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import equiv_states as E  # noqa: E402
from hmmirror.arch.x86 import pgtable as x86  # noqa: E402
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE  # noqa: E402
from hmmirror.fast import decode as dec  # noqa: E402
from hmmirror.fast.decode import Kind  # noqa: E402
from hmmirror.fast.fault import first_populated  # noqa: E402
from hmmirror.fast.gather import LVL_HOLE, LVL_OTHER, LVL_PMD, LVL_PTE, LVL_PUD, fill_from_pfn, fill_leaf  # noqa: E402
from hmmirror.fast.gather import gather_range  # noqa: E402

U64 = (1 << 64) - 1


def _entries() -> list[int]:
    """Entries of every kind: present with all flag combinations, swap entries of every type, none."""
    out = [0, x86._PAGE_ACCESSED, x86._PAGE_DIRTY | x86._PAGE_ACCESSED]
    bits = [x86._PAGE_PRESENT, x86._PAGE_RW, x86._PAGE_PROTNONE, x86._PAGE_SPECIAL, x86._PAGE_DEVMAP,
            x86._PAGE_PSE, x86._PAGE_NX, x86._PAGE_USER]
    for mask in range(1 << len(bits)):
        flags = sum(b for k, b in enumerate(bits) if mask >> k & 1)
        out.append(x86.pfn_pte(0x12345 + mask, 0) | flags)
    for typ in range(32):
        for off in (0, 1, 0x777, (1 << 40) - 1):
            out.append(x86.swp_entry_to_pte(x86.SwpEntry(typ, off)))
    return out


def _kind(e: int) -> Kind:
    """The scalar classification, from the arch predicates (first match, as Kind's docstring says)."""
    if x86.pte_none(e):
        return Kind.NONE
    if x86.pte_present(e):
        return Kind.PRESENT
    s = x86.pte_to_swp_entry(e)
    if not x86.non_swap_entry(s):
        return Kind.SWAP
    if x86.is_migration_entry(s):
        return Kind.MIGRATION
    if x86.is_device_private_entry(s):
        return Kind.DEVICE_PRIVATE
    if x86.is_device_exclusive_entry(s):
        return Kind.DEVICE_EXCLUSIVE
    if x86.is_hwpoison_entry(s):
        return Kind.HWPOISON
    if x86.is_pte_marker(s):
        return Kind.MARKER
    return Kind.OTHER


def test_decode_predicates_match_the_scalar_ones() -> None:
    ents = _entries()
    e = np.array(ents, dtype=np.uint64)
    assert dec.none(e).tolist() == [x86.pte_none(x) for x in ents]
    assert dec.present(e).tolist() == [x86.pte_present(x) for x in ents]
    assert dec.protnone(e).tolist() == [x86.pte_protnone(x) for x in ents]
    assert dec.write(e).tolist() == [x86.pte_write(x) for x in ents]
    assert dec.special(e).tolist() == [x86.pte_special(x) for x in ents]
    assert dec.devmap(e).tolist() == [x86.pte_devmap(x) for x in ents]
    assert dec.pfn(e).tolist() == [x86.pte_pfn(x) for x in ents]
    sw = [x for x in ents if x86.is_swap_pte(x)]
    s = np.array(sw, dtype=np.uint64)
    assert dec.swp_type(s).tolist() == [x86.pte_to_swp_entry(x).type for x in sw]
    assert dec.swp_offset(s).tolist() == [x86.pte_to_swp_entry(x).offset for x in sw]
    assert dec.pte_kinds(e).tolist() == [int(_kind(x)) for x in ents]


@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(E.plans("6.18"))
def test_gather_range_matches_lookup(plan: E.Plan) -> None:
    w = E.build(plan)
    mm, pool = w.mm, w.m.pool
    start = w.base
    end = w.base + E.WINDOW
    g = gather_range(mm, start, end)
    for i in range(0, (end - start) >> PAGE_SHIFT, 13):              # every 13th page: all rows, many columns
        a = start + (i << PAGE_SHIFT)
        lvl, ptr, e = mm.pt.lookup(a)
        if lvl == "pte":
            pmd = pool.get(mm.pt.pmd_offset(mm.pt.walk_to_pud(a), a))
            if x86.pmd_bad(pmd):                                    # the walkers' rule: not a table
                want = (LVL_OTHER, pmd)
            else:
                want = (LVL_PTE, e)                                 # a none PTE is still under a PTE table
        elif lvl == "p4d" or x86.pte_none(e):
            want = (LVL_HOLE, None)
        elif lvl == "pmd":
            if x86.pmd_leaf(e) and x86.pmd_present(e):
                want = (LVL_PMD, e + (((a & (PMD_SIZE - 1)) >> PAGE_SHIFT) << PAGE_SHIFT))
            else:
                want = (LVL_OTHER, e)
        else:
            want = (LVL_PUD if x86.pud_leaf(e) and x86.pud_present(e) else LVL_OTHER, e)
        got = (int(g.level[i]), None if want[1] is None else int(g.entries[i]))
        assert got == want, (hex(a), lvl)


@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(E.plans("5.2"))
def test_first_populated_matches_a_page_scan(plan: E.Plan) -> None:
    w = E.build(plan)
    g = gather_range(w.mm, w.base, w.base + E.WINDOW)
    busy = [(g.level[i] != LVL_HOLE) and not (g.level[i] == LVL_PTE and x86.pte_none(int(g.entries[i])))
            for i in range(g.level.shape[0])]
    for first in (0, 1, 700, 1536, 4000):
        want = next((i for i in range(first, len(busy)) if busy[i]), len(busy))
        got = (first_populated(w.mm, w.base + first * PAGE_SIZE, w.base + E.WINDOW) - w.base) >> PAGE_SHIFT
        assert got == want


@given(st.integers(0, (1 << 40)), st.integers(1, 3000), st.sampled_from([0, 1 << 63, (1 << 63) | (1 << 62)]),
       st.integers(0, 1 << 30))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
def test_fill_leaf_formula(pfn0: int, n: int, cpu: int, seed: int) -> None:
    keep = (1 << 60) | (1 << 59) | (1 << 58)
    cpu |= 9 << 53
    x = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15 & U64)) ^ np.uint64(seed)
    want = [(int(v) & keep) | (pfn0 + k) | cpu for k, v in enumerate(x.tolist())]
    fill_leaf(x, pfn0, cpu, keep)
    assert x.tolist() == want


@pytest.mark.parametrize("shift", [0, 5, 12, 20, 40, 63])
@pytest.mark.parametrize("const", [0, 1, 7, (1 << 62) | 3])
def test_fill_from_pfn_formula_with_wraparound(shift: int, const: int) -> None:
    for pfn0 in (0, 0x1234, (1 << 40) - 5):
        n = 70000
        v = np.zeros(n, dtype=np.uint64)
        fill_from_pfn(v, pfn0, shift, const)
        ks = list(range(0, n, 997)) + [n - 1]
        assert [int(v[k]) for k in ks] == [(((pfn0 + k) << shift) | const) & U64 for k in ks]
