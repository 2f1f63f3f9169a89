"""The OOM reaper: non-blockable UNMAP per reapable VMA; a refused VMA is skipped without invalidate_range_end.

Expected values: mm-substrate.md §6 (OOM reaper row) and §7 (``..._start_nonblock`` contract).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.include.mm_types import VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Task
from hmmirror.mm.debug import check_counts
from hmmirror.mm.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_range_blockable, mmu_notifier_register
from hmmirror.mm.oom_kill import oom_reap_task_mm

P = 4096
EAGAIN = 11


class Refuser(MmuNotifierOps):
    """Refuses non-blockable ranges that meet ``refuse``; records what it saw (blockable?, atomic?)."""

    has_invalidate_range_end = False        # §7 [6.18]: a subscriber that can fail must not implement _end

    def __init__(self, refuse: tuple[int, int] | None) -> None:
        self.refuse = refuse
        self.seen: list[tuple[int, int, bool, bool]] = []

    def invalidate_range_start(self, mn, r):  # type: ignore[no-untyped-def]
        self.seen.append((r.start, r.end, mmu_notifier_range_blockable(r), sched.current().atomic > 0))
        if self.refuse and r.start < self.refuse[1] and self.refuse[0] < r.end:
            return -EAGAIN
        return 0
        yield


def reap(m: Machine, mm) -> bool:  # type: ignore[no-untyped-def]
    return sched.run(oom_reap_task_mm(mm), Task("oom_reaper", "kthread"))


def ranges(m: Machine, what: str, since: int) -> list[tuple[int, int, str, bool]]:
    return [(e["start"], e["end"], e["event"], e["blockable"]) for e in m.events[since:] if e["what"] == what]


def test_reaper_unmaps_private_memory_nonblocking(machine: Machine) -> None:
    # §6: per anon or private VMA a non-blockable UNMAP [vm_start, vm_end); shared memory is not reaped
    pytest.importorskip("hmmirror.fs.shmem")
    p = machine.spawn("p")
    a = p.mmap(4 * P)
    b = p.mmap(4 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 4 * P, write=True)
    p.touch(b, 4 * P, write=True)
    rec = Refuser(None)
    sched.run(mmu_notifier_register(MmuNotifier(rec), p.mm), p.mm.task)
    ev = len(machine.events)
    assert reap(machine, p.mm) is True
    assert ranges(machine, "invalidate_range_start", ev) == [(a, a + 4 * P, "UNMAP", False)]
    assert ranges(machine, "invalidate_range_end", ev) == [(a, a + 4 * P, "UNMAP", False)]
    assert rec.seen == [(a, a + 4 * P, False, True)]        # non-blockable: called in atomic context
    assert not any(s.present for s in p.inspect(a, 4 * P))
    assert all(s.present for s in p.inspect(b, 4 * P))
    assert check_counts(machine) == []


def test_refused_vma_is_skipped_without_end(machine: Machine) -> None:
    # §7: a failing start leaves the entries unchanged and calls no invalidate_range_end for that range;
    # the other VMAs are still reaped and the reap reports failure
    p = machine.spawn("p")
    a = p.mmap(4 * P)
    p.mprotect(a + 2 * P, 2 * P, "r")                       # two VMAs
    p.touch(a, 4 * P)
    p.touch(a, 2 * P, write=True)
    rec = Refuser((a + 2 * P, a + 4 * P))
    sched.run(mmu_notifier_register(MmuNotifier(rec), p.mm), p.mm.task)
    ev = len(machine.events)
    assert reap(machine, p.mm) is False
    assert [r[:2] for r in ranges(machine, "invalidate_range_start", ev)] == [(a, a + 2 * P), (a + 2 * P, a + 4 * P)]
    assert [r[:2] for r in ranges(machine, "invalidate_range_end", ev)] == [(a, a + 2 * P)]
    assert [s.present for s in p.inspect(a, 4 * P)] == [False, False, True, True]


def test_locked_vma(machine: Machine) -> None:
    # §6: [5.2] the reaper skips VM_LOCKED VMAs (can_madv_dontneed_vma); [6.18] it reaps them
    p = machine.spawn("p")
    a = p.mmap(2 * P)
    p.touch(a, 2 * P, write=True)
    p.mm.vmas[0].vm_flags |= VM.LOCKED                     # no mlock in the model: flag set directly
    reap(machine, p.mm)
    reaped = not any(s.present for s in p.inspect(a, 2 * P))
    assert reaped is (not machine.profile.oom_reap_skips_locked)


def test_hugetlb_not_reaped(machine: Machine) -> None:
    # §6: hugetlb VMAs are never reaped
    pytest.importorskip("hmmirror.mm.hugetlb")
    m = Machine(machine.profile, ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(2 << 20, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, 1, write=True)
    ev = len(m.events)
    assert reap(m, p.mm) is True
    assert ranges(m, "invalidate_range_start", ev) == []
    assert p.inspect(a, P)[0].present
