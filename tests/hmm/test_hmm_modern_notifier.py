"""mmu_interval_notifier semantics (hmm-modern.md §1-§2; mm/mmu_notifier.c 6.x).

Sequence numbers, deferred insert/remove, read_begin waiting, the callback's event / blockable flag, the
non-blocking start, release, and the interval tree (overlap queries without scanning all subscriptions).
"""

from __future__ import annotations

import random

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import ModelBug
from hmmirror.include.mm_types import MMU_NOTIFIER_RANGE_BLOCKABLE, MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.mm import mmu_notifier as mn
from hmmirror.mm.mmu_notifier import (
    ULONG_MAX,
    IntervalTree,
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    MmuNotifier,
    MmuNotifierOps,
    MmuNotifierRange,
    mmu_interval_check_retry,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_invalidate_range_start_nonblock,
    mmu_notifier_range_blockable,
    mmu_notifier_release,
)

EAGAIN, EINVAL, EOVERFLOW = 11, 22, 75


class Recorder(MmuIntervalNotifierOps):
    """An interval subscriber that records every callback and sets the sequence (a well-behaved driver)."""

    def __init__(self, ok: bool = True) -> None:
        self.calls: list[tuple[int, int, str, bool, int]] = []
        self.ok = ok

    def invalidate(self, sub, r, cur_seq):
        self.calls.append((r.start, r.end, r.event.name, mmu_notifier_range_blockable(r), cur_seq))
        if not self.ok:
            return False
        mmu_interval_set_seq(sub, cur_seq)
        return True
        yield  # pragma: no cover


@pytest.fixture
def m() -> Machine:
    return Machine("6.18", ram=256 << 20)


@pytest.fixture
def p(m):
    return m.spawn("p")


def insert(p, start: int, length: int, ops=None) -> tuple[int, MmuIntervalNotifier, Recorder]:
    sub = MmuIntervalNotifier()
    ops = ops or Recorder()
    ret = sched.run(mmu_interval_notifier_insert(sub, p.mm, start, length, ops), p.mm.task)
    return ret, sub, ops


def start_range(p, start: int, end: int, event=MMU_NOTIFY.CLEAR) -> MmuNotifierRange:
    r = mn.mmu_notifier_range_init(event, None, p.mm, start, end)
    sched.run(mmu_notifier_invalidate_range_start(r), p.mm.task)
    return r


def end_range(p, r) -> None:
    sched.run(mmu_notifier_invalidate_range_end(r), p.mm.task)


def blocked(gen, task) -> sched.Point:
    """Run ``gen`` until it blocks; return the blocking point (fails if it completes)."""
    prev = sched.set_current(task)
    try:
        while True:
            pt = next(gen)
            if pt.ready is not None and not pt.ready():
                return pt
    except StopIteration:
        raise AssertionError("expected the call to block") from None
    finally:
        sched.set_current(prev)


def resume(gen, task):
    prev = sched.set_current(task)
    try:
        while True:
            pt = next(gen)
            assert pt.ready is None or pt.ready(), f"still blocked at {pt.what}"
    except StopIteration as stop:
        return stop.value
    finally:
        sched.set_current(prev)


# --- §2.1/§2.2 sequence numbers ------------------------------------------------------------------------------
def test_insert_gives_an_odd_seq_different_from_the_mm_seq(p):
    ret, sub, _ = insert(p, 0x100000, 0x10000)
    assert ret == 0
    subs = p.mm.notifier_subscriptions
    assert subs.invalidate_seq == 2                      # §2.1 initial value 2, even = not invalidating
    assert sub.invalidate_seq == 1                       # §2.2 subs.invalidate_seq - 1: odd, != current
    assert (sub.start, sub.last) == (0x100000, 0x10FFFF)  # inclusive last
    assert subs.has_itree


def test_read_begin_retry_and_check_retry(p):
    _, sub, ops = insert(p, 0x100000, 0x10000)
    seq = sched.run(mmu_interval_read_begin(sub), p.mm.task)
    assert seq == 1
    assert not mmu_interval_read_retry(sub, seq) and not mmu_interval_check_retry(sub, seq)
    r = start_range(p, 0x100000, 0x101000)
    # §2.3: an invalidation that hit a subscription makes the mm seq odd and hands it to the callback
    assert p.mm.notifier_subscriptions.invalidate_seq == 3
    assert ops.calls == [(0x100000, 0x101000, "CLEAR", True, 3)]
    assert mmu_interval_read_retry(sub, seq) and mmu_interval_check_retry(sub, seq)
    end_range(p, r)
    assert p.mm.notifier_subscriptions.invalidate_seq == 4          # even again after the last end
    seq2 = sched.run(mmu_interval_read_begin(sub), p.mm.task)
    assert seq2 == 3 and not mmu_interval_read_retry(sub, seq2)


def test_non_overlapping_invalidation_neither_calls_nor_changes_seq(p):
    _, sub, ops = insert(p, 0x100000, 0x10000)
    r = start_range(p, 0x200000, 0x201000)
    assert ops.calls == []
    assert p.mm.notifier_subscriptions.invalidate_seq == 2
    assert p.mm.notifier_subscriptions.active_invalidate_ranges == 1
    end_range(p, r)
    assert p.mm.notifier_subscriptions.active_invalidate_ranges == 0
    assert p.mm.notifier_subscriptions.invalidate_seq == 2


def test_overlap_uses_the_exclusive_range_end(p):
    """The range is [start, end): a range ending exactly at sub.start does not overlap (itree end - 1)."""
    _, _, ops = insert(p, 0x100000, 0x1000)
    end_range(p, start_range(p, 0xFF000, 0x100000))
    assert ops.calls == []
    end_range(p, start_range(p, 0x100FFF, 0x101000))
    assert len(ops.calls) == 1


def test_read_begin_waits_for_the_invalidation_to_end(p):
    _, sub, _ = insert(p, 0x100000, 0x10000)
    r = start_range(p, 0x100000, 0x101000)
    gen = mmu_interval_read_begin(sub)
    pt = blocked(gen, p.mm.task)
    assert pt.what == "mmu_interval_read_begin"
    end_range(p, r)
    assert resume(gen, p.mm.task) == 3


def test_read_begin_of_a_subscription_not_hit_does_not_wait(p):
    _, sub_a, _ = insert(p, 0x100000, 0x1000)
    _, sub_b, _ = insert(p, 0x300000, 0x1000)
    r = start_range(p, 0x100000, 0x101000)              # hits a only; the mm seq is odd (3)
    assert sched.run(mmu_interval_read_begin(sub_b), p.mm.task) == 1
    end_range(p, r)


def test_nested_ranges_keep_seq_odd_until_the_last_end(p):
    _, sub, _ = insert(p, 0x100000, 0x10000)
    r1 = start_range(p, 0x100000, 0x101000)
    r2 = start_range(p, 0x102000, 0x103000)
    subs = p.mm.notifier_subscriptions
    assert subs.active_invalidate_ranges == 2 and subs.invalidate_seq == 3
    end_range(p, r2)
    assert subs.invalidate_seq == 3
    end_range(p, r1)
    assert subs.invalidate_seq == 4


# --- deferred insert / remove ----------------------------------------------------------------------------
def test_insert_while_invalidating_is_deferred(p):
    _, sub_a, ops_a = insert(p, 0x100000, 0x1000)
    r = start_range(p, 0x100000, 0x101000)
    subs = p.mm.notifier_subscriptions
    ret, sub_b, ops_b = insert(p, 0x100000, 0x1000)
    assert ret == 0
    assert not sub_b.in_tree and len(subs.itree) == 1
    assert sub_b.invalidate_seq == subs.invalidate_seq == 3   # so read_begin on it waits
    gen = mmu_interval_read_begin(sub_b)
    blocked(gen, p.mm.task)
    end_range(p, r)
    assert sub_b.in_tree and len(subs.itree) == 2
    assert resume(gen, p.mm.task) == 3
    end_range(p, start_range(p, 0x100000, 0x101000))
    assert len(ops_b.calls) == 1


def test_insert_during_a_range_that_hit_nothing_makes_seq_odd(p):
    insert(p, 0x100000, 0x1000)
    r = start_range(p, 0x500000, 0x501000)               # active, seq even
    subs = p.mm.notifier_subscriptions
    _, sub, _ = insert(p, 0x500000, 0x1000)
    assert sub.in_tree                                   # inserted at once
    assert subs.invalidate_seq == 3 == sub.invalidate_seq
    end_range(p, r)
    assert subs.invalidate_seq == 4


def test_remove_while_invalidating_waits_and_is_deferred(p):
    _, sub, _ = insert(p, 0x100000, 0x1000)
    r = start_range(p, 0x100000, 0x101000)
    gen = mmu_interval_notifier_remove(sub)
    blocked(gen, p.mm.task)
    assert sub.in_tree
    end_range(p, r)
    assert not sub.in_tree
    resume(gen, p.mm.task)
    end_range(p, start_range(p, 0x100000, 0x101000))


def test_remove_of_a_pending_insert_cancels_it(p):
    insert(p, 0x100000, 0x1000)
    r = start_range(p, 0x100000, 0x101000)
    _, sub_b, ops_b = insert(p, 0x200000, 0x1000)
    sched.run(mmu_interval_notifier_remove(sub_b), p.mm.task)   # no wait: it was never in the tree
    end_range(p, r)
    assert not sub_b.in_tree and len(p.mm.notifier_subscriptions.itree) == 1
    end_range(p, start_range(p, 0x200000, 0x201000))
    assert ops_b.calls == []


def test_remove_drops_the_mm_count(p):
    c = p.mm.mm_count
    _, sub, _ = insert(p, 0x100000, 0x1000)
    assert p.mm.mm_count == c + 1                        # mmgrab
    sched.run(mmu_interval_notifier_remove(sub), p.mm.task)
    assert p.mm.mm_count == c


# --- insert errors and locking ------------------------------------------------------------------------------
def test_insert_errors(p):
    assert insert(p, 0x1000, 0)[0] == -EOVERFLOW
    assert insert(p, ULONG_MAX - 0x0FFF, 0x2000)[0] == -EOVERFLOW
    assert insert(p, 0, ULONG_MAX & ~0xFFF)[0] == 0       # dmirror's [0, ULONG_MAX & PAGE_MASK)
    p.mm.mm_users = 0
    assert insert(p, 0x1000, 0x1000)[0] == -EINVAL       # registered mm, no mmget held (WARN_ON)


def test_insert_fails_on_a_kernel_without_interval_notifiers():
    m = Machine("5.2", ram=64 << 20)
    p = m.spawn("p")
    assert insert(p, 0x1000, 0x1000)[0] == -EINVAL


def test_first_insert_registers_under_the_mmap_lock_for_write(p):
    holder = sched.Task("reader")
    prev = sched.set_current(holder)
    sched.run(sched.down_read(p.mm.mmap_sem), holder)
    sched.set_current(prev)
    sub = MmuIntervalNotifier()
    gen = mmu_interval_notifier_insert(sub, p.mm, 0x1000, 0x1000, Recorder())
    pt = blocked(gen, p.mm.task)
    assert pt.obj is p.mm.mmap_sem
    prev = sched.set_current(holder)
    sched.up_read(p.mm.mmap_sem)
    sched.set_current(prev)
    assert resume(gen, p.mm.task) == 0
    # once registered, further inserts do not take the mmap lock
    sched.run(sched.down_read(p.mm.mmap_sem), holder)
    assert insert(p, 0x5000, 0x1000)[0] == 0


# --- events and the blockable flag --------------------------------------------------------------------------
def test_callback_sees_the_event_of_each_operation(m, p):
    a = p.mmap(16 * PAGE_SIZE, "rw")
    _, _, ops = insert(p, a, 16 * PAGE_SIZE)
    p.touch(a, PAGE_SIZE)                                # zero page: no invalidation (none -> present)
    p.touch(a, PAGE_SIZE, write=True)                    # COW of the zero page: CLEAR [4K)
    p.mprotect(a, 16 * PAGE_SIZE, "r")                   # PROTECTION_VMA
    p.munmap(a + 8 * PAGE_SIZE, 8 * PAGE_SIZE)           # UNMAP
    events = [(c[2], c[3]) for c in ops.calls]
    assert events == [("CLEAR", True), ("PROTECTION_VMA", True), ("UNMAP", True)]
    assert ops.calls[0][:2] == (a, a + PAGE_SIZE)
    assert ops.calls[2][:2] == (a + 8 * PAGE_SIZE, a + 16 * PAGE_SIZE)


def test_nonblock_failure_returns_eagain_and_ends_the_interval_side(p):
    class Classic(MmuNotifierOps):
        called = 0

        def invalidate_range_start(self, mn_, r):
            Classic.called += 1
            return 0
            yield  # pragma: no cover

    sched.run(mn.mmu_notifier_register(MmuNotifier(Classic()), p.mm), p.mm.task)
    _, sub, ops = insert(p, 0x100000, 0x1000, Recorder(ok=False))
    r = mn.mmu_notifier_range_init(MMU_NOTIFY.UNMAP, None, p.mm, 0x100000, 0x101000)
    ret = sched.run(mmu_notifier_invalidate_range_start_nonblock(r), p.mm.task)
    assert ret == -EAGAIN
    assert ops.calls and ops.calls[0][3] is False        # called non-blockable
    subs = p.mm.notifier_subscriptions
    assert subs.active_invalidate_ranges == 0 and subs.invalidate_seq == 4
    assert Classic.called == 0                           # §1.2: classic subscribers are not called


def test_nonblock_classic_failure_ends_classics_but_not_the_interval_side(p):
    """§1.2 / mm-substrate.md §7 [6.18]: the core ends every classic subscriber that has _end; the interval
    side stays raised (kernel: __mmu_notifier_invalidate_range_start returns the hlist error after a
    successful mn_itree_invalidate and the caller calls no _end) — derived from the kernel source."""
    ends = []

    class Failing(MmuNotifierOps):
        has_invalidate_range_end = False

        def invalidate_range_start(self, mn_, r):
            return -EAGAIN
            yield  # pragma: no cover

    class Good(MmuNotifierOps):
        def invalidate_range_end(self, mn_, r):
            ends.append(r.start)
            return
            yield  # pragma: no cover

    sched.run(mn.mmu_notifier_register(MmuNotifier(Good()), p.mm), p.mm.task)
    sched.run(mn.mmu_notifier_register(MmuNotifier(Failing()), p.mm), p.mm.task)
    insert(p, 0x100000, 0x1000)
    r = mn.mmu_notifier_range_init(MMU_NOTIFY.UNMAP, None, p.mm, 0x100000, 0x101000)
    assert sched.run(mmu_notifier_invalidate_range_start_nonblock(r), p.mm.task) == -EAGAIN
    assert ends == [0x100000]
    assert p.mm.notifier_subscriptions.active_invalidate_ranges == 1


def test_blockable_callback_returning_false_is_a_warning(p):
    insert(p, 0x100000, 0x1000, Recorder(ok=False))
    r = mn.mmu_notifier_range_init(MMU_NOTIFY.CLEAR, None, p.mm, 0x100000, 0x101000)
    with pytest.raises(ModelBug, match="WARN_ON"):
        sched.run(mmu_notifier_invalidate_range_start(r), p.mm.task)


def test_release_invalidates_everything_with_event_release(p):
    _, _, ops = insert(p, 0x100000, 0x1000)
    sched.run(mmu_notifier_release(p.mm), p.mm.task)
    assert ops.calls == [(0, ULONG_MAX, "RELEASE", True, 3)]
    assert p.mm.notifier_subscriptions.invalidate_seq == 4


def test_range_blockable_flag():
    r = MmuNotifierRange(None, 0, 4096, MMU_NOTIFY.CLEAR, MMU_NOTIFIER_RANGE_BLOCKABLE)   # type: ignore[arg-type]
    assert mmu_notifier_range_blockable(r)
    r.flags = 0
    assert not mmu_notifier_range_blockable(r)


# --- the interval tree --------------------------------------------------------------------------------------
def test_interval_tree_matches_a_scan():
    rng = random.Random(1234)
    tree = IntervalTree()
    subs = []
    for _ in range(300):
        s = rng.randrange(0, 1 << 20)
        sub = MmuIntervalNotifier(start=s, last=s + rng.randrange(0, 1 << 14))
        tree.insert(sub)
        subs.append(sub)
    for sub in subs[::3]:
        tree.remove(sub)
    live = [s for i, s in enumerate(subs) if i % 3]
    for _ in range(200):
        a = rng.randrange(0, 1 << 20)
        b = a + rng.randrange(0, 1 << 15)
        want = sorted((s.start, id(s)) for s in live if s.start <= b and s.last >= a)
        got = tree.overlapping(a, b)
        assert sorted((s.start, id(s)) for s in got) == want
        assert [s.start for s in got] == sorted(s.start for s in got)     # tree (start) order


def test_interval_tree_query_does_not_scan_all():
    tree = IntervalTree()
    for i in range(4096):
        tree.insert(MmuIntervalNotifier(start=i << 12, last=(i << 12) + 0xFFF))
    visits = 0
    orig = tree._collect

    def counting(*a):
        nonlocal visits
        visits += 1
        return orig(*a)

    tree._collect = counting   # type: ignore[method-assign]
    assert [s.start for s in tree.overlapping(1000 << 12, (1000 << 12) + 10)] == [1000 << 12]
    assert visits < 64                                   # O(log n + matches), not 4096


def test_equal_starts_keep_insertion_order():
    tree = IntervalTree()
    a, b = MmuIntervalNotifier(start=0, last=10), MmuIntervalNotifier(start=0, last=5)
    tree.insert(a)
    tree.insert(b)
    assert tree.overlapping(0, 1) == [a, b]
