"""Workqueues (kernel/workqueue.c): deferred driver work run by a kernel worker thread.

A driver queues a :class:`WorkStruct` (its ``func`` is a generator function taking the work) on a
:class:`Workqueue`; a worker runs queued items one at a time, in order.  The simulator gives every workqueue
of the machine a worker task (``kworker/<name>``) as soon as work is queued on it, so work items interleave
with everything else; run sequentially (no worker attached), :func:`flush_work` / :func:`flush_workqueue`
run the pending items in the caller, as a worker would have before the flush returned.

The teardown semantics drivers get wrong are modelled as the kernel has them:

* :func:`flush_work` waits for the *current* instance only -- the item can be queued again right after
  (e.g. by an invalidation callback that is still registered);
* :func:`cancel_work_sync` removes a pending instance and waits for a running one -- but a later
  :func:`queue_work` succeeds again;
* :func:`disable_work_sync` (6.10+) does the same and makes every later :func:`queue_work` fail until
  :func:`enable_work`: the way to stop a work item for good during teardown;
* queueing on a workqueue that is being drained or was destroyed is a kernel ``WARN_ON``.

Every queueing, start and end of a work item is logged (``queue_work``, ``work_start``, ``work_end``) so
that checks can see what ran when.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen


class WorkStruct:
    """``struct work_struct``: a function to run later, its pending bit and its disable count."""

    __slots__ = ("func", "name", "owner", "pending", "running", "disable", "wq", "queued", "ran")

    def __init__(self, func: Callable[["WorkStruct"], Gen[Any]], name: str = "work", owner: Any = None) -> None:
        self.func = func
        self.name = name
        self.owner = owner            # model: the driver the item belongs to (checks)
        self.pending = False          # WORK_STRUCT_PENDING
        self.running: Any = None      # the task running it, or None
        self.disable = 0              # disable_work() count (6.10+)
        self.wq: Workqueue | None = None
        self.queued = 0               # model: times queued
        self.ran = 0                  # model: times run

    def __repr__(self) -> str:
        return f"Work({self.name})"


def INIT_WORK(func: Callable[[WorkStruct], Gen[Any]], name: str = "work", owner: Any = None) -> WorkStruct:
    """INIT_WORK()."""
    return WorkStruct(func, name, owner)


class Workqueue:
    """``struct workqueue_struct`` (an ordered workqueue: one item at a time)."""

    def __init__(self, machine: Any, name: str, owner: Any = None) -> None:
        self.machine = machine
        self.name = name
        self.owner = owner
        self.worklist: deque[WorkStruct] = deque()
        self.running: list[WorkStruct] = []
        self.draining = False
        self.destroyed = False
        self.worker: Any = None       # the simulator's worker task (None: run items in the flusher)

    def __repr__(self) -> str:
        return f"Workqueue({self.name})"

    def idle(self) -> bool:
        return not self.worklist and not self.running


def alloc_workqueue(machine: Any, name: str, owner: Any = None) -> Workqueue:
    """alloc_ordered_workqueue(): a new workqueue, registered with the machine."""
    wq = Workqueue(machine, name, owner)
    machine.workqueues.append(wq)
    return wq


def system_wq(machine: Any) -> Workqueue:
    """``system_wq``: the shared workqueue of schedule_work() (one per machine, never destroyed)."""
    for wq in machine.workqueues:
        if wq.name == "events":
            return wq
    return alloc_workqueue(machine, "events")


def schedule_work(machine: Any, work: WorkStruct) -> bool:
    """schedule_work(): queue_work() on the system workqueue."""
    return queue_work(system_wq(machine), work)


def queue_work(wq: Workqueue, work: WorkStruct) -> bool:
    """queue_work(): queue ``work`` unless it is pending already or disabled; False then."""
    machine = wq.machine
    # while draining only the workqueue's own items may queue (chained work)
    if wq.destroyed or (wq.draining and not any(w.running is sched.current() for w in wq.running)):
        machine.log("WARN_ON", what_failed=f"queue_work on {'destroyed' if wq.destroyed else 'draining'} "
                    f"workqueue {wq.name}", work=work.name)
        if wq.destroyed:
            return False
    if work.disable:
        return False
    if work.pending:
        return False
    work.pending = True
    work.wq = wq
    work.queued += 1
    wq.worklist.append(work)
    machine.log("queue_work", wq=wq.name, work=work.name)
    for hook in machine.wq_hooks:
        hook(wq)
    return True


def process_one_work(wq: Workqueue) -> Gen[None]:
    """process_one_work(): run the first queued item (its pending bit is cleared before it runs)."""
    work = wq.worklist.popleft()
    work.pending = False
    work.running = sched.current()
    wq.running.append(work)
    wq.machine.log("work_start", wq=wq.name, work=work.name)
    try:
        yield from work.func(work)
    finally:
        work.running = None
        work.ran += 1
        wq.running.remove(work)
        wq.machine.log("work_end", wq=wq.name, work=work.name)


def worker_thread(wq: Workqueue, busy: Callable[[Any], None] | None = None) -> Gen[None]:
    """worker_thread(): run queued items until the workqueue is destroyed (the simulator's kworker body).
    ``busy(work)`` is told the item the worker starts, ``busy(None)`` when it is idle again (the simulator
    marks the kworker as inside an operation meanwhile)."""
    while True:
        yield from sched.wait_event(lambda: bool(wq.worklist) or wq.destroyed, f"worker_thread({wq.name})")
        if not wq.worklist:
            return
        if busy is not None:
            busy(wq.worklist[0])
        yield from process_one_work(wq)
        if busy is not None:
            busy(None)


def _run_inline(wq: Workqueue, until: Callable[[], bool]) -> Gen[None]:
    """No worker attached (sequential use): run queued items in the caller until ``until()``."""
    while wq.worklist and not until():
        yield from process_one_work(wq)


def flush_work(work: WorkStruct) -> Gen[bool]:
    """flush_work(): wait until the queued or running instance of ``work`` finished; True if it waited."""
    yield from sched.might_sleep("flush_work")
    wq = work.wq
    if wq is None or (not work.pending and work.running is None):
        return False
    if work.running is sched.current():
        wq.machine.log("WARN_ON", what_failed=f"flush_work({work.name}) from the work itself")
        return False
    if wq.worker is None:
        yield from _run_inline(wq, lambda: not work.pending)
    yield from sched.wait_event(lambda: not work.pending and work.running is None, f"flush_work({work.name})")
    return True


def cancel_work_sync(work: WorkStruct) -> Gen[bool]:
    """cancel_work_sync(): remove a pending instance, wait for a running one; True if one was pending.
    The item can be queued again afterwards."""
    yield from sched.might_sleep("cancel_work_sync")
    wq = work.wq
    was = work.pending
    if wq is not None and work.pending:
        wq.worklist.remove(work)
        work.pending = False
    if work.running is not None and work.running is not sched.current():
        yield from sched.wait_event(lambda: work.running is None, f"cancel_work_sync({work.name})")
    return was


def disable_work_sync(work: WorkStruct) -> Gen[bool]:
    """disable_work_sync() (6.10+): cancel ``work`` and refuse every later queue_work() until enable_work()."""
    work.disable += 1
    return (yield from cancel_work_sync(work))


def enable_work(work: WorkStruct) -> bool:
    """enable_work(): undo one disable_work(); True when the item can be queued again."""
    if work.disable:
        work.disable -= 1
    return work.disable == 0


def flush_workqueue(wq: Workqueue) -> Gen[None]:
    """flush_workqueue(): wait until every item queued so far has run."""
    yield from sched.might_sleep("flush_workqueue")
    if wq.worker is None:
        yield from _run_inline(wq, lambda: False)
    yield from sched.wait_event(wq.idle, f"flush_workqueue({wq.name})")


def drain_workqueue(wq: Workqueue) -> Gen[None]:
    """drain_workqueue(): flush until empty; only the workqueue's own items may queue meanwhile."""
    wq.draining = True
    try:
        yield from flush_workqueue(wq)
    finally:
        wq.draining = False


def destroy_workqueue(wq: Workqueue) -> Gen[None]:
    """destroy_workqueue(): drain, then free (the worker exits; queueing afterwards is a bug)."""
    wq.draining = True
    yield from flush_workqueue(wq)
    wq.draining = False
    wq.destroyed = True
    wq.machine.log("destroy_workqueue", wq=wq.name)
