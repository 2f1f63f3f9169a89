"""The vectorised inspection (mm/inspect.inspect_arrays) equals the reference (one lookup per page).

Three sources of page-table states: the random states of the fast-walk differential tests (every entry kind,
bad and non-present PMDs, PUD leaves, 5-level paging), machines the simulator's scenario generator builds
(the substrate's own faults, THP, files, DAX, hugetlb), and hand-made shapes that exercise the 6.18
per-folio "exclusive" test (PTE-mapped THPs shared with a child, a THP half moved by mremap, so the
folio's linear window leaves the inspected range).  Equal means every field and its Python type.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parents[1] / "equivalence"))
import equiv_states as E  # noqa: E402
from hmmirror import Machine  # noqa: E402
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE  # noqa: E402
from hmmirror.mm.inspect import inspect_arrays, inspect_range, inspect_range_reference  # noqa: E402

P = PAGE_SIZE
M2 = PMD_SIZE


def _typed(states: list) -> list:  # type: ignore[type-arg]
    return [tuple((v, type(v)) for v in astuple(s)) for s in states]


def _same(mm, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
    ref = inspect_range_reference(mm, start, end)
    fast = inspect_range(mm, start, end)
    assert len(ref) == len(fast) == -(-(end - start) // P)
    for a, b in zip(_typed(ref), _typed(fast)):
        assert a == b
    arr = inspect_arrays(mm, start, end)
    if len(arr):
        assert arr.state(len(arr) // 2) == ref[len(arr) // 2]


SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


#: the profiles, and variants with the pagemap "exclusive" rules of other kernels switched on/off, so that
#: every rule of the vectorised form is compared whatever the current profiles choose
VARIANTS = [("5.2", {}), ("6.18", {}), ("6.18", {"pagemap_exclusive_per_folio": True}),
            ("6.18", {"pagemap_pmd_exclusive_head": False}), ("5.2", {"pagemap_exclusive_per_folio": True})]
VARIANT_IDS = ["5.2", "6.18", "6.18-per-folio", "6.18-no-pmd-head", "5.2-per-folio"]


def _variant(machine, fields: dict) -> None:  # type: ignore[no-untyped-def]
    if fields:
        machine.profile = dataclasses.replace(machine.profile, **fields)


@pytest.mark.parametrize("profile,fields", VARIANTS, ids=VARIANT_IDS)
def test_random_page_table_states(profile: str, fields: dict) -> None:  # type: ignore[type-arg]
    @SETTINGS
    @given(E.plans(profile))
    def check(plan: E.Plan) -> None:
        w = E.build(plan)
        _variant(w.m, fields)
        # the window with a hole on either side, and the start of the PUD region (leaf, table or none)
        _same(w.mm, w.base - M2, w.base + E.WINDOW + M2)
        _same(w.mm, w.pud_base - 2 * P, w.pud_base + 2 * M2)

    check()


@pytest.mark.parametrize("kernel", ["6.18", "5.2"])
def test_generated_machines(kernel: str) -> None:
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import build_machine
    from hmmirror.sim.scenario import generate

    seen_kinds: set[str] = set()
    for seed in range(12):
        sc = generate(SeededChoices(1000 + seed), kernel)
        run = build_machine(sc)
        for proc in run.procs.values():
            for v in proc.mm.vmas:
                # whole VMAs up to 8 MiB; of larger ones (1 GiB device-dax) the first 8 MiB and the last 2 MiB
                for a, b in {(v.vm_start, min(v.vm_end, v.vm_start + 4 * M2)),
                             (max(v.vm_start, v.vm_end - M2), v.vm_end)}:
                    _same(proc.mm, a, b)
                    seen_kinds.update(s.kind for s in inspect_range(proc.mm, a, b))
    assert len(seen_kinds) >= 3, seen_kinds              # the machines hold mapped pages of several kinds


@pytest.mark.parametrize("kernel,fields", VARIANTS, ids=VARIANT_IDS)
def test_large_folios_shared_split_and_moved(kernel: str, fields: dict) -> None:  # type: ignore[type-arg]
    m = Machine(kernel, ram=128 << 20)
    _variant(m, fields)
    p = m.spawn("p")
    a = p.mmap(8 * M2, align=M2)
    p.madvise(a, 8 * M2, "hugepage")
    p.touch(a, 8 * M2, write=True)                        # eight PMD-mapped THPs
    p.madvise(a + P, P, "dontneed")                       # THP 0: PTE-mapped, one page gone
    p.madvise(a + 2 * M2 + 7 * P, P, "dontneed")          # THP 2 likewise
    c = p.fork("c")                                       # every folio now shared with the child
    p.touch(a + 2 * M2, P, write=True)                    # COW of one page of the PTE-mapped THP 2
    p.mprotect(a + 3 * M2 + 5 * P, 3 * P, "r")            # THP 3 split by mprotect
    b = p.mremap(a + 4 * M2 + 64 * P, 128 * P, 128 * P)   # part of THP 4 moved elsewhere
    c.exit()
    for proc in (p,):
        _same(proc.mm, a - M2, a + 9 * M2)
        _same(proc.mm, b, b + 128 * P)
        _same(proc.mm, a + 4 * M2 + 3 * P, a + 4 * M2 + 70 * P)   # starts inside a folio
        _same(proc.mm, a + 5, a + 5 + 3 * P)                       # unaligned end: a partial last page
    pages = inspect_range(p.mm, a, a + M2)
    if m.profile.pagemap_exclusive_per_folio:
        # !folio_maybe_mapped_shared: after the child exited, THP 0 is mapped only here
        assert all(s.exclusive for s in pages if s.present)


def test_empty_range() -> None:
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    assert inspect_range(p.mm, 0x10000, 0x10000) == [] == inspect_range_reference(p.mm, 0x10000, 0x10000)
    assert len(inspect_arrays(p.mm, 0x10000, 0x10000)) == 0


# --- the page-table viewer (show) reads states through inspect_arrays -----------------------------------
class _ReferenceArrays:
    """What collect() reads of PageArrays, filled from the per-page reference."""

    def __init__(self, mm, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
        import numpy as np

        self.start = start
        self.pages = inspect_range_reference(mm, start, end)
        self.present = np.array([s.present for s in self.pages])
        self.write = np.array([bool(s.write) for s in self.pages])
        self.protnone = np.array([bool(s.protnone) for s in self.pages])

    def kind_name(self, i: int) -> str:
        return self.pages[i].kind


@pytest.mark.parametrize("profile", ["6.18", "5.2"])
def test_page_table_view_equals_the_reference(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hmmirror.viz import pagetables as viz

    @settings(max_examples=6, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(E.plans(profile))
    def check(plan: E.Plan) -> None:
        w = E.build(plan)
        spans = [(w.base - M2, w.base + E.WINDOW + M2), (w.pud_base, w.pud_base + 2 * M2)]
        fast = [viz.collect(w.mm, a, b).to_json() for a, b in spans]
        with monkeypatch.context() as mp:
            mp.setattr(viz, "inspect_arrays", _ReferenceArrays)
            ref = [viz.collect(w.mm, a, b).to_json() for a, b in spans]
        assert fast == ref

    check()


def test_page_table_view_of_a_sparse_terabyte(monkeypatch: pytest.MonkeyPatch) -> None:
    # a huge mapping with two pages touched: the viewer reads the chunks that map something, not 2^28 pages
    from hmmirror.viz import pagetables as viz

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(1 << 40, align=1 << 30)
    p.touch(a + (5 << 30), P, write=True)
    p.touch(a + (700 << 30) + 3 * P, P)
    sizes: list[int] = []
    real = viz.inspect_arrays

    def counting(mm, start: int, end: int):  # type: ignore[no-untyped-def]
        arr = real(mm, start, end)
        sizes.append(len(arr))
        return arr

    monkeypatch.setattr(viz, "inspect_arrays", counting)
    view = viz.collect(p.mm, a, a + (1 << 40))
    kinds = [n.kind for n in view.leaves() if n.entry == "leaf"]
    assert kinds == ["anon", "zero"] and len(sizes) == 2 and max(sizes) <= 512
