"""mremap(2) (optional module): move keeps the pfns, THP kept when aligned, split otherwise.

Expected values: mm-substrate.md §6 (mremap row: UNMAP over the old range; THP kept / split) and observations
A18, T12/T13 of §9; error codes: v5.2 mm/mremap.c.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.kernel import sched
from hmmirror.mm.debug import check_counts, entries_in

mremap = pytest.importorskip("hmmirror.mm.mremap")

P = 4096
M2 = PMD_SIZE


def do(p, *args):  # type: ignore[no-untyped-def]
    return sched.run(mremap.do_mremap(p.mm, *args), p.mm.task)


def starts(m: Machine, since: int) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["event"]) for e in m.events[since:] if e["what"] == "invalidate_range_start"]


def test_a18_move_keeps_pfns(machine: Machine) -> None:
    # A18: mremap move: same pfns at the new VA; old range empty; UNMAP over the old range
    p = machine.spawn()
    a = p.mmap(4 * P)
    blocker = p.mmap(P, addr=a + 4 * P, flags=["private", "anonymous", "fixed"])   # no room to grow in place
    p.touch(a, 4 * P, write=True, fill="index32")
    pfns = [s.pfn for s in p.inspect(a, 4 * P)]
    ev = len(machine.events)
    b = do(p, a, 4 * P, 8 * P, mremap.MREMAP_MAYMOVE)
    assert b != a and b > 0
    assert [s.pfn for s in p.inspect(b, 4 * P)] == pfns
    assert entries_in(p.mm, a, a + 4 * P) == [] and p.mm.vma_lookup(a) is None
    assert p.check(b, 4 * P, "index32") == 0
    assert starts(machine, ev)[0] == (a, a + 4 * P, "UNMAP")
    assert check_counts(machine) == []
    _ = blocker


def test_shrink_and_grow_in_place(machine: Machine) -> None:
    p = machine.spawn()
    a = p.mmap(8 * P)
    p.touch(a, 8 * P, write=True)
    assert do(p, a, 8 * P, 4 * P, 0) == a                   # shrinking always allowed (munmap of the tail)
    assert p.mm.vma_lookup(a).vm_end == a + 4 * P
    assert do(p, a, 4 * P, 6 * P, 0) == a                   # the room above is free again: grows in place
    assert p.mm.vma_lookup(a).vm_end == a + 6 * P
    assert do(p, a + 1, P, P, 0) == -22                     # unaligned address: EINVAL


@pytest.mark.parametrize("offset,level", [(0, "pmd"), (PMD_SIZE // 2, "pte")])
def test_t12_t13_thp_move(machine: Machine, offset: int, level: str) -> None:
    # T12/T13: mremap a THP to an aligned address: PMD kept; to a non-aligned one: split, same pfns
    p = machine.spawn()
    a = p.mmap(M2, align=M2)
    p.madvise(a, M2, "hugepage")
    p.touch(a, 1, write=True)
    head = p.inspect(a, P)[0].pfn
    dest = 0x7E0000000000 + offset
    ev = len(machine.events)
    assert do(p, a, M2, M2, mremap.MREMAP_MAYMOVE | mremap.MREMAP_FIXED, dest) == dest
    st = p.inspect(dest, M2)
    assert all(s.level == level and s.pfn == head + i for i, s in enumerate(st))
    ranges = starts(machine, ev)
    assert ranges[0] == (a, a + M2, "UNMAP")
    assert ((a, a + M2, "CLEAR") in ranges) is (level == "pte")
    assert check_counts(machine) == []
