"""The 6.x generic walker (mm/pagewalk.c 6.18; hmm-modern.md §4.2): callbacks, holes, actions, test_walk."""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE
from hmmirror.errors import ModelBug
from hmmirror.kernel import sched
from hmmirror.mm.pagewalk import ACTION_CONTINUE, MmWalkOps, walk_page_range

EINVAL = 22


@pytest.fixture
def p():
    return Machine("6.18", ram=128 << 20).spawn("p")


def walk(p, start, end, ops, private=None):
    def body():
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from walk_page_range(p.mm, start, end, ops, private)
        sched.up_read(p.mm.mmap_sem)
        return ret

    return sched.run(body(), p.mm.task)


def recorder():
    calls = []

    def hole(addr, end, depth, w):
        calls.append(("hole", addr, end, depth, w.vma is not None))
        return 0

    def pmd(pmdp, addr, end, w):
        calls.append(("pmd", addr, end))
        return 0

    def pte(ptep, addr, end, w):
        calls.append(("pte", addr))
        return 0

    return calls, hole, pmd, pte


def test_einval_and_lockdep(p):
    assert walk(p, 0x2000, 0x2000, MmWalkOps()) == -EINVAL
    with pytest.raises(ModelBug, match="lockdep"):
        sched.run(walk_page_range(p.mm, 0x1000, 0x2000, MmWalkOps(), None), p.mm.task)


def test_one_hole_per_gap_with_no_vma(p):
    a = p.mmap(4 * PAGE_SIZE, "rw")
    p.munmap(a + PAGE_SIZE, 2 * PAGE_SIZE)
    calls, hole, pmd, _ = recorder()
    walk(p, a - PAGE_SIZE, a + 5 * PAGE_SIZE, MmWalkOps(pte_hole=hole, pmd_entry=pmd))
    gaps = [c for c in calls if c[0] == "hole" and c[3] == -1 and not c[4]]
    assert gaps == [("hole", a - PAGE_SIZE, a, -1, False), ("hole", a + PAGE_SIZE, a + 3 * PAGE_SIZE, -1, False),
                    ("hole", a + 4 * PAGE_SIZE, a + 5 * PAGE_SIZE, -1, False)]
    # inside the VMAs nothing is populated: holes at some table level, with walk.vma set
    assert all(c[4] for c in calls if c[0] == "hole" and c not in gaps)


def test_pmd_entry_per_populated_pmd_and_pte_entry_descends(p):
    a = p.mmap(2 * PMD_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    calls, hole, pmd, pte = recorder()
    walk(p, a, a + 3 * PAGE_SIZE, MmWalkOps(pte_hole=hole, pmd_entry=pmd))
    assert ("pmd", a, a + 3 * PAGE_SIZE) in calls and not [c for c in calls if c[0] == "pte"]
    calls.clear()
    walk(p, a, a + 3 * PAGE_SIZE, MmWalkOps(pte_hole=hole, pmd_entry=pmd, pte_entry=pte))
    assert [c for c in calls if c[0] == "pte"] == [("pte", a + k * PAGE_SIZE) for k in range(3)]


def test_action_continue_stops_the_descent(p):
    a = p.mmap(PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    calls, hole, _, pte = recorder()

    def pmd(pmdp, addr, end, w):
        w.action = ACTION_CONTINUE
        return 0

    walk(p, a, a + PAGE_SIZE, MmWalkOps(pmd_entry=pmd, pte_entry=pte))
    assert calls == []


def test_nonzero_callback_result_stops_the_walk(p):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.touch(a, 2 * PAGE_SIZE, write=True)
    seen = []

    def pte(ptep, addr, end, w):
        seen.append(addr)
        return 7

    assert walk(p, a, a + 2 * PAGE_SIZE, MmWalkOps(pte_entry=pte)) == 7
    assert seen == [a]


def test_test_walk_skips_and_aborts(p):
    a = p.mmap(PAGE_SIZE, "rw")
    b = p.mmap(PAGE_SIZE, "r")
    calls, hole, pmd, _ = recorder()
    lo, hi = min(a, b), max(a, b) + PAGE_SIZE

    def skip_ro(start, end, w):
        return 1 if not w.vma.vm_flags & 2 else 0

    walk(p, lo, hi, MmWalkOps(pte_hole=hole, test_walk=skip_ro))
    assert all(not (b <= c[1] < b + PAGE_SIZE) for c in calls)             # b (read-only) skipped
    assert walk(p, lo, hi, MmWalkOps(pte_hole=hole, test_walk=lambda s, e, w: -5)) == -5


def test_pfnmap_vma_without_test_walk_is_a_hole(p):
    a = p.mmap(2 * PAGE_SIZE, "rw", ["shared"], file="pfnmap")
    calls, hole, pmd, pte = recorder()
    walk(p, a, a + 2 * PAGE_SIZE, MmWalkOps(pte_hole=hole, pte_entry=pte))
    assert calls == [("hole", a, a + 2 * PAGE_SIZE, -1, True)]


def test_hugetlb_entry(p):
    m = Machine("6.18", ram=128 << 20, hugepages_2m=1)
    q = m.spawn("q")
    a = q.mmap(2 * PMD_SIZE, "rw", ["private", "anonymous", "hugetlb"])
    q.touch(a, PAGE_SIZE, write=True)
    seen = []

    def entry(ptep, hmask, addr, end, w):
        seen.append((addr, end, hmask == (1 << 64) - PMD_SIZE))
        return 0

    calls, hole, _, _ = recorder()
    walk(q, a + PAGE_SIZE, a + PMD_SIZE + PAGE_SIZE, MmWalkOps(hugetlb_entry=entry, pte_hole=hole))
    assert seen == [(a + PAGE_SIZE, a + PMD_SIZE, True), (a + PMD_SIZE, a + PMD_SIZE + PAGE_SIZE, True)]
