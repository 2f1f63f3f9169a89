"""The yielding primitives: lock context, sleeping in atomic context, deadlock in sequential runs."""

from __future__ import annotations

import pytest

from hmmirror.errors import Deadlock, ModelBug
from hmmirror.kernel import sched


def test_might_sleep_under_spinlock_is_reported() -> None:
    # mm-substrate.md §8: sleeping primitives may not run while a spinlock is held
    lock = sched.Lock("ptl", "spin")

    def body():  # type: ignore[no-untyped-def]
        yield from sched.spin_lock(lock)
        yield from sched.might_sleep("handle_mm_fault")

    with pytest.raises(ModelBug, match="sleep_in_atomic"):
        sched.run(body(), sched.Task("t"))


def test_recursive_spinlock_is_reported() -> None:
    # §8: spinlocks are not recursive
    lock = sched.Lock("l", "spin")

    def body():  # type: ignore[no-untyped-def]
        yield from sched.spin_lock(lock)
        yield from sched.spin_lock(lock)

    with pytest.raises(ModelBug, match="recursive_lock"):
        sched.run(body(), sched.Task("t"))


def test_wait_that_nobody_can_satisfy_is_a_deadlock() -> None:
    def body():  # type: ignore[no-untyped-def]
        yield from sched.wait_event(lambda: False, "never")

    with pytest.raises(Deadlock):
        sched.run(body(), sched.Task("t"))


def test_rwsem_readers_share_and_release() -> None:
    sem = sched.Lock("mmap_lock", "rwsem")
    t = sched.Task("t")

    def body():  # type: ignore[no-untyped-def]
        yield from sched.down_read(sem)
        assert sem.held_by(t)
        assert sched.lock_context(t).locks == ["rwsem:mmap_lock"]
        sched.up_read(sem)
        return 7

    assert sched.run(body(), t) == 7
    assert not sem.is_locked() and t.held == []


def test_double_unlock_is_reported() -> None:
    lock = sched.Lock("m", "mutex")

    def body():  # type: ignore[no-untyped-def]
        yield from sched.mutex_lock(lock)
        sched.mutex_unlock(lock)
        sched.mutex_unlock(lock)

    with pytest.raises(ModelBug, match="bad_unlock"):
        sched.run(body(), sched.Task("t"))
