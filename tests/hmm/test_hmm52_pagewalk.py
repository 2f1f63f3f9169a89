"""The 5.2 generic page walker (mm/pagewalk.c [5.2]) as HMM uses it: hmm-5.2.md §6."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import BASE, G1, K, M2, add_vma, devmap_huge, machine, normal_pte, set_pmd, set_pte, set_pud  # noqa: E402
from hmmirror.errors import ModelBug  # noqa: E402
from hmmirror.include.mm_types import VM  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.pagewalk_v5_2 import MmWalk, walk_page_range  # noqa: E402


def recorder(calls, ret=0, stop_at=None):
    """Callbacks that record (name, addr, next, held locks) and return ``ret`` (or -1 at ``stop_at``)."""

    def mk(name):
        def cb(*args):
            walk = args[-1]
            addr, nxt = (args[2], args[3]) if name == "hugetlb" else (args[-3], args[-2])
            calls.append((name, addr, nxt, [l.name for l in sched.current().held], walk.vma is not None))
            return -1 if stop_at == (name, addr) else ret
            yield
        return cb
    return mk


def walk(mm, start, end, **cbs):
    w = MmWalk(mm=mm, **cbs)

    def body():
        yield from sched.down_read(mm.mmap_sem)
        r = yield from walk_page_range(start, end, w)
        sched.up_read(mm.mmap_sem)
        return r
    return sched.run(body(), mm.task)


@pytest.fixture
def env():
    m = machine()
    return m, m.spawn("p").mm


def test_einval_and_mmap_sem_check(env) -> None:
    m, mm = env
    assert walk(mm, BASE, BASE) == -22
    w = MmWalk(mm=None)
    assert sched.run(walk_page_range(BASE, BASE + K, w), mm.task) == -22
    with pytest.raises(ModelBug) as exc:
        sched.run(walk_page_range(BASE, BASE + K, MmWalk(mm=mm)), mm.task)
    assert exc.value.kind == "VM_BUG_ON_MM"


def test_gap_holes_per_pud_chunk(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, K)
    add_vma(m, mm, BASE + 3 * G1, K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    set_pte(m, mm, BASE + 3 * G1, normal_pte(m.mem.alloc_page()))
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE, BASE + 3 * G1 + K, pmd_entry=mk("pmd"), pte_hole=mk("hole")) == 0
    # §6: in a gap walk.vma is None and holes are reported per PUD chunk (the P4D exists here)
    assert [c[:3] for c in calls] == [
        ("pmd", BASE, BASE + K),
        ("hole", BASE + K, BASE + G1),
        ("hole", BASE + G1, BASE + 2 * G1),
        ("hole", BASE + 2 * G1, BASE + 3 * G1),
        ("pmd", BASE + 3 * G1, BASE + 3 * G1 + K),
    ]
    assert [c[4] for c in calls] == [True, False, False, False, True]


def test_missing_top_levels_are_one_hole(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE, BASE + 4 * K, pmd_entry=mk("pmd"), pte_hole=mk("hole")) == 0
    assert [c[:3] for c in calls] == [("hole", BASE, BASE + 4 * K)]     # the P4D is none (4-level)


def test_pfnmap_vma_goes_to_pte_hole(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K, flags=VM.READ | VM.MAYREAD | VM.PFNMAP | VM.IO)
    set_pte(m, mm, BASE, normal_pte(1234))
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE, BASE + 4 * K, pmd_entry=mk("pmd"), pte_hole=mk("hole")) == 0
    assert [c[:3] for c in calls] == [("hole", BASE, BASE + 4 * K)]    # walk_page_test: hole, then skip


def test_test_walk_skip_and_stop(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, K)
    add_vma(m, mm, BASE + 2 * K, K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    calls = []
    mk = recorder(calls)

    def skip_first(start, end, w):
        return 1 if start == BASE else 0
        yield

    walk(mm, BASE, BASE + 3 * K, pmd_entry=mk("pmd"), pte_hole=mk("hole"), test_walk=skip_first)
    assert [c[:3] for c in calls] == [("hole", BASE + K, BASE + 2 * K), ("pmd", BASE + 2 * K, BASE + 3 * K)]

    def stop(start, end, w):
        return -5
        yield

    assert walk(mm, BASE, BASE + 3 * K, pmd_entry=mk("pmd"), test_walk=stop) == -5


def test_pud_entry_runs_under_the_pud_lock(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * G1)
    set_pud(m, mm, BASE, devmap_huge(1 << 18))
    set_pte(m, mm, BASE + G1, normal_pte(m.mem.alloc_page()))
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE, BASE + G1 + K, pud_entry=mk("pud"), pmd_entry=mk("pmd"), pte_hole=mk("hole")) == 0
    assert [c[:3] for c in calls] == [("pud", BASE, BASE + G1), ("pmd", BASE + G1, BASE + G1 + K)]
    assert calls[0][3] == [mm.mmap_sem.name, mm.page_table_lock.name]      # §6: PUD lock held
    assert calls[1][3] == [mm.mmap_sem.name]                               # pmd_entry: no page-table lock
    assert not mm.page_table_lock.is_locked()


def test_nonzero_result_stops_and_preempt_points_between_pmds(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 3 * M2)
    for i in range(3):
        set_pmd(m, mm, BASE + i * M2, devmap_huge((1 << 18) + 512 * i))
    calls = []
    w = MmWalk(mm=mm, pmd_entry=recorder(calls)("pmd"))
    points = []

    def body():
        yield from sched.down_read(mm.mmap_sem)
        r = yield from walk_page_range(BASE, BASE + 3 * M2, w)
        sched.up_read(mm.mmap_sem)
        return r

    gen = body()
    prev = sched.set_current(mm.task)
    try:
        for pt in gen:
            points.append((pt.kind, pt.what))
    finally:
        sched.set_current(prev)
    assert len(calls) == 3
    assert points.count(("preempt", "walk_pmd_range")) == 2                # between PMD entries
    calls.clear()
    assert walk(mm, BASE, BASE + 3 * M2, pmd_entry=recorder(calls, stop_at=("pmd", BASE + M2))("pmd")) == -1
    assert [c[1] for c in calls] == [BASE, BASE + M2]


def test_pte_entry_walks_each_pte(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE, BASE + 4 * K, pmd_entry=mk("pmd"), pte_entry=mk("pte")) == 0
    assert [c[:3] for c in calls] == [("pmd", BASE, BASE + 4 * K)] + \
        [("pte", BASE + i * K, BASE + (i + 1) * K) for i in range(4)]


def test_hugetlb_entries_and_holes(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * M2, flags=VM.READ | VM.MAYREAD | VM.HUGETLB, hstate_order=9)
    set_pmd(m, mm, BASE + M2, devmap_huge(1 << 18))
    calls = []
    mk = recorder(calls)
    assert walk(mm, BASE + K, BASE + 3 * M2, hugetlb_entry=mk("hugetlb"), pte_hole=mk("hole"),
                pmd_entry=mk("pmd")) == 0
    # one call per huge page; huge_pte_offset returns the none PMDs too once the PUD exists (§6)
    assert [c[:3] for c in calls] == [("hugetlb", BASE + K, BASE + M2), ("hugetlb", BASE + M2, BASE + 2 * M2),
                                      ("hugetlb", BASE + 2 * M2, BASE + 3 * M2)]
    calls.clear()
    assert walk(mm, BASE, BASE + 2 * M2, pmd_entry=mk("pmd")) == 0       # no hugetlb_entry: VMA skipped
    assert calls == []
