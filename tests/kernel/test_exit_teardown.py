"""exit(2): mmput -> exit_mmap (release first, then UNMAP [0, ULONG_MAX)), page and page-table freeing.

Expected values: mm-substrate.md §6 (exit_mmap row), §7 (mmu_notifier_release contract), §8 (mm_users /
mm_count lifetimes), §2.1 (huge zero page referenced per mm [5.2]).
"""

from __future__ import annotations

import pytest

from hmmirror import InputError, Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.kernel import sched
from hmmirror.mm.debug import check_counts
from hmmirror.mm.mmu_notifier import (
    ULONG_MAX,
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    MmuNotifier,
    MmuNotifierOps,
    mmu_interval_notifier_insert,
    mmu_notifier_register,
)

P = 4096
M2 = PMD_SIZE


class Recorder(MmuNotifierOps):
    """A classic subscriber recording its callbacks with the machine's event count at that moment."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.calls: list[tuple[str, int]] = []

    def release(self, mn, mm):  # type: ignore[no-untyped-def]
        self.calls.append(("release", len(self.machine.events)))
        return
        yield

    def invalidate_range_start(self, mn, r):  # type: ignore[no-untyped-def]
        self.calls.append(("start", len(self.machine.events)))
        return 0
        yield


def test_release_first_then_unmap_everything(machine: Machine) -> None:
    # §6/§7: exit_mmap calls release() of every subscriber, unlinks them, then one UNMAP [0, ULONG_MAX)
    # (which reaches no unlinked classic subscriber)
    p = machine.spawn("p")
    a = p.mmap(8 * P)
    p.touch(a, 8 * P, write=True)
    rec = Recorder(machine)
    sched.run(mmu_notifier_register(MmuNotifier(rec), p.mm), p.mm.task)
    ev = len(machine.events)
    p.exit()
    assert rec.calls == [("release", ev)]
    starts = [(e["start"], e["end"], e["event"]) for e in machine.events[ev:] if e["what"] == "invalidate_range_start"]
    assert starts == [(0, ULONG_MAX, "UNMAP")]
    assert p.mm.notifier_subscriptions.list == []


def test_teardown_frees_pages_and_tables(machine: Machine) -> None:
    # §1.1 / §6: every page of the exiting mm is freed, every page table below the PGD freed; the parent's
    # shared pages go back to one mapping
    free0, tables0 = machine.mem.nr_free_pages(), machine.pool.nr_tables
    p = machine.spawn("p")
    a = p.mmap(4 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a, M2 + 8 * P, write=True)                 # a THP and some small pages
    p.touch(a + 2 * M2, 4 * P, write=True)
    c = p.fork("c")
    c.exit()
    assert c.mm.exited and c.mm.mm_users == 0
    assert all(machine.mem.mapcount[s.pfn] == 1 for s in p.inspect(a + 2 * M2, 4 * P))
    assert check_counts(machine) == []
    with pytest.raises(InputError):
        c.munmap(a, P)                                 # system calls of an exited process are refused
    p.exit()
    assert machine.mem.nr_free_pages() == free0
    assert machine.pool.nr_tables == tables0
    assert check_counts(machine) == []


def test_5_2_huge_zero_reference_dropped(m52: Machine) -> None:
    # §2.1 [5.2]: the huge zero folio is referenced per mm and dropped at mm teardown
    p = m52.spawn("p")
    a = p.mmap(2 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a)
    assert p.mm.huge_zero_ref
    p.exit()
    assert not p.mm.huge_zero_ref


class IntervalRecorder(MmuIntervalNotifierOps):
    def __init__(self, mm) -> None:  # type: ignore[no-untyped-def]
        self.mm = mm
        self.seen: list[tuple[str, int, int, bool]] = []

    def invalidate(self, sub, r, cur_seq):  # type: ignore[no-untyped-def]
        self.seen.append((r.event.name, r.start, r.end, self.mm.mmap_sem.held_by()))
        return True
        yield


def test_6_18_interval_subscription_sees_release_then_unmap(m618: Machine) -> None:
    # §7 [6.18]: interval subscriptions get RELEASE, then (still in the tree) the UNMAP [0, ULONG_MAX) of
    # exit_mmap, which [6.18] runs under the mmap lock
    p = m618.spawn("p")
    a = p.mmap(4 * P)
    p.touch(a, 4 * P, write=True)
    ops = IntervalRecorder(p.mm)
    sub = MmuIntervalNotifier()
    assert sched.run(mmu_interval_notifier_insert(sub, p.mm, a, 4 * P, ops), p.mm.task) == 0
    p.exit()
    assert ops.seen == [("RELEASE", 0, ULONG_MAX, False), ("UNMAP", 0, ULONG_MAX, True)]


def test_mmput_with_other_users_keeps_the_address_space(machine: Machine) -> None:
    # §8: the address space is torn down only when mm_users reaches zero
    from hmmirror.kernel.fork import mmget, mmput

    p = machine.spawn("p")
    a = p.mmap(2 * P)
    p.touch(a, 2 * P, write=True)
    mmget(p.mm)
    sched.run(mmput(p.mm), p.mm.task)
    assert not p.mm.exited and all(s.present for s in p.inspect(a, 2 * P))
    sched.run(mmput(p.mm), p.mm.task)
    assert p.mm.exited and p.mm.vmas == []
