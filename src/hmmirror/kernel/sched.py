"""Tasks, locks and the only primitives that yield to a scheduler.

Model code that may sleep, block or be preempted is written as a generator and calls the primitives of this
module with ``yield from`` (``yield from might_sleep("handle_mm_fault")``, ``yield from mutex_lock(l)``).
A function that cannot sleep is a plain function, so a reader sees where preemption can happen, as with the
kernel's ``might_sleep()`` annotations.  Nothing outside this module yields.

What a primitive yields is a :class:`Point`: the scheduler may switch to another task there.  A ``Point``
with a ``ready`` predicate means the task is blocked until the predicate holds.  :func:`run` drives one
generator to completion for sequential use: nobody else can run, so waiting on a false predicate is a
:class:`~hmmirror.errors.Deadlock`.  The simulator (``hmmirror.sim``) drives many generators and decides
who runs at each point.

The lock context is always known: :func:`current` is the running :class:`Task` and ``task.held`` the
locks it holds, in acquisition order.  Rule checks (sleeping with a spinlock held, double unlock, recursive
spinlock) go through :func:`report`, which by default raises :class:`~hmmirror.errors.ModelBug`; the
simulator installs a handler that records a finding instead.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hmmirror.errors import Deadlock, ModelBug

T = TypeVar("T")
Gen = Generator["Point", None, T]


@dataclass(slots=True)
class Point:
    """A place where the running task may be switched out.

    ``kind`` is one of ``"preempt"`` (may be preempted), ``"sleep"`` (may sleep), ``"lock"`` (about to
    acquire ``obj``), ``"wait"`` (blocked until ``ready()``).
    """

    kind: str
    what: str
    obj: Any = None
    ready: Callable[[], bool] | None = None


class Task:
    """A thread of execution: a CPU thread of a process, a device job, or a kernel background event."""

    _next_id = 0

    def __init__(self, name: str, kind: str = "cpu") -> None:
        self.name = name
        self.kind = kind
        self.held: list[Lock] = []
        self.atomic = 0                 # >0 inside a non-blockable notifier callback or an RCU section
        self.stack: list[str] = []      # model functions currently running (for reports)
        self.pte_maps: list[str] = []   # pte_offset_map()s not yet pte_unmap()ped, by site (kmap_local-style)
        Task._next_id += 1
        self.id = Task._next_id

    def holds_spinlock(self) -> Lock | None:
        for lock in self.held:
            if lock.kind == "spin":
                return lock
        return None

    def __repr__(self) -> str:
        return f"Task({self.name})"


_boot = Task("boot", "kthread")
_current: Task = _boot


def current() -> Task:
    """The running task (``current`` in the kernel)."""
    return _current


def set_current(task: Task) -> Task:
    """Switch the running task (the scheduler's job); returns the previous one."""
    global _current
    prev, _current = _current, task
    return prev


# --- rule reports ----------------------------------------------------------------------------------------
def _raise(kind: str, message: str) -> None:
    raise ModelBug(kind, message)


_report_handler: Callable[[str, str], None] = _raise


_report_cause = "-"


def report(kind: str, message: str, cause: str = "-") -> None:
    """A broken rule (``WARN_ON``/lockdep splat): raise, or record when a simulator handles it.

    ``cause`` (ours): a short, address-free name of the reason when one call site reports several (the
    simulator puts it in the finding's signature; read it with :func:`report_cause` inside the handler)."""
    global _report_cause
    _report_cause = cause
    try:
        _report_handler(kind, message)
    finally:
        _report_cause = "-"


def report_cause() -> str:
    """The ``cause`` of the :func:`report` being handled (``-`` when none was given)."""
    return _report_cause


def set_report_handler(handler: Callable[[str, str], None] | None) -> Callable[[str, str], None]:
    """Install a handler for :func:`report` (``None`` restores raising); returns the previous one."""
    global _report_handler
    prev = _report_handler
    _report_handler = handler or _raise
    return prev


# --- what the other tasks did (livelock guards) -----------------------------------------------------------
_others_clock: Callable[[], int] | None = None


def others_ran() -> int:
    """Ours: how many steps tasks other than the running one have taken so far -- a model's livelock guard
    compares two readings: a retry loop that restarts without progress while nobody else ran can never end
    (nothing but the looping task can change what it waits for).  The simulator's engine provides the count;
    a generator run alone (:func:`run`) has no other task: 0."""
    return _others_clock() if _others_clock is not None else 0


def set_others_clock(clock: Callable[[], int] | None) -> Callable[[], int] | None:
    """Install the counter :func:`others_ran` reads (the engine, while it runs); returns the previous one."""
    global _others_clock
    prev, _others_clock = _others_clock, clock
    return prev


# --- temporary mappings of page-table pages (pte_offset_map / pte_unmap) ----------------------------------
def pte_map_get(site: str) -> None:
    """Ours: the running task mapped a PTE table (``pte_offset_map()``; a ``kmap_local``/``kmap_atomic`` of
    the table with HIGHPTE, an RCU read section in 6.5+) at ``site`` (``module.function``).  The kernel pairs
    it with ``pte_unmap()`` on every path; the simulator checks the balance (``pte_map_balance``)."""
    _current.pte_maps.append(site)


def pte_map_put(site: str) -> None:
    """Ours: ``pte_unmap()`` by the running task at ``site`` (LIFO, as ``kunmap_local``)."""
    maps = _current.pte_maps
    if not maps:
        report("pte_map_balance", f"{site}: pte_unmap() with no PTE table mapped", cause="unmap_unmapped")
        return
    maps.pop()


# --- locks -----------------------------------------------------------------------------------------------
class Lock:
    """A kernel lock: ``spin`` (spinlock_t), ``mutex`` or ``rwsem`` (rw_semaphore)."""

    __slots__ = ("name", "kind", "owner", "readers", "key")

    def __init__(self, name: str, kind: str = "spin") -> None:
        self.name = name
        self.kind = kind
        self.key: str | None = None        # lockdep class (lockdep_set_class); None: the class of its name
        self.owner: Task | None = None     # exclusive holder
        self.readers: list[Task] = []      # rwsem readers

    def is_locked(self) -> bool:
        return self.owner is not None or bool(self.readers)

    def held_by(self, task: Task | None = None) -> bool:
        task = task or _current
        return self.owner is task or task in self.readers

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


def lockdep_set_class(lock: Lock, key: str) -> Lock:
    """lockdep_set_class() (include/linux/lockdep.h): lockdep orders lock classes, not instances; ``lock``
    belongs to the class ``key`` (e.g. every mapping's ``i_mmap_rwsem`` is one class, hugetlbfs's another)."""
    lock.key = key
    return lock


def might_sleep(what: str) -> Gen[None]:
    """might_sleep(): a point where the caller may sleep; sleeping in atomic context is reported."""
    task = _current
    spin = task.holds_spinlock()
    if spin is not None:
        report("sleep_in_atomic", f"{what} may sleep while {task.name} holds spinlock {spin.name}")
    elif task.atomic:
        report("sleep_in_atomic", f"{what} may sleep in a non-blockable context of {task.name}")
    yield Point("sleep", what)


def preempt_point(what: str) -> Gen[None]:
    """A point where the kernel can be preempted (between walk entries, after dropping a lock)."""
    yield Point("preempt", what)


def wait_event(ready: Callable[[], bool], what: str) -> Gen[None]:
    """wait_event(): sleep until ``ready()`` holds."""
    yield from might_sleep(what)
    while not ready():
        yield Point("wait", what, None, ready)


def _acquire(lock: Lock, exclusive: bool) -> Gen[None]:
    task = _current
    if lock.held_by(task):
        report("recursive_lock", f"{task.name} acquires {lock.name} which it already holds")
    yield Point("lock", lock.name, lock)
    if exclusive:
        while lock.is_locked():
            yield Point("wait", lock.name, lock, lambda: not lock.is_locked())
        lock.owner = task
    else:
        while lock.owner is not None:
            yield Point("wait", lock.name, lock, lambda: lock.owner is None)
        lock.readers.append(task)
    task.held.append(lock)


def _release(lock: Lock, exclusive: bool) -> None:
    task = _current
    if exclusive:
        if lock.owner is not task:
            report("bad_unlock", f"{task.name} releases {lock.name} held by {lock.owner}")
            return
        lock.owner = None
    else:
        if task not in lock.readers:
            report("bad_unlock", f"{task.name} up_read()s {lock.name} without holding it")
            return
        lock.readers.remove(task)
    task.held.remove(lock)


def spin_lock(lock: Lock) -> Gen[None]:
    """spin_lock(): busy-waits (does not sleep) until the lock is free."""
    yield from _acquire(lock, True)


def spin_unlock(lock: Lock) -> None:
    """spin_unlock()."""
    _release(lock, True)


def spin_trylock(lock: Lock) -> bool:
    """spin_trylock()."""
    if lock.is_locked():
        return False
    lock.owner = _current
    _current.held.append(lock)
    return True


def mutex_lock(lock: Lock) -> Gen[None]:
    """mutex_lock(): may sleep."""
    yield from might_sleep(f"mutex_lock({lock.name})")
    yield from _acquire(lock, True)


mutex_unlock = spin_unlock
mutex_trylock = spin_trylock


def down_read(lock: Lock) -> Gen[None]:
    """down_read(): may sleep."""
    yield from might_sleep(f"down_read({lock.name})")
    yield from _acquire(lock, False)


def down_write(lock: Lock) -> Gen[None]:
    """down_write(): may sleep."""
    yield from might_sleep(f"down_write({lock.name})")
    yield from _acquire(lock, True)


def up_read(lock: Lock) -> None:
    """up_read()."""
    _release(lock, False)


def up_write(lock: Lock) -> None:
    """up_write()."""
    _release(lock, True)


def down_read_trylock(lock: Lock) -> bool:
    """down_read_trylock()."""
    if lock.owner is not None:
        return False
    lock.readers.append(_current)
    _current.held.append(lock)
    return True


down_write_trylock = spin_trylock


# --- running generators ----------------------------------------------------------------------------------
def run(gen: Gen[T], task: Task | None = None) -> T:
    """Drive one generator to completion with nobody else running (sequential use).

    A wait whose predicate is false can never end here: it raises :class:`Deadlock`.
    """
    prev = set_current(task) if task is not None else None
    try:
        while True:
            try:
                point = next(gen)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if point.ready is not None and not point.ready():
                raise Deadlock(f"{_current.name} waits for {point.what} and no other task can run")
    finally:
        if prev is not None:
            set_current(prev)


def run_until_blocked(gen: Gen[Any]) -> Any:
    """Step one generator (sequential use) until it waits on a false predicate -- returns that Point, the
    generator left suspended there -- or finishes: ``("done", value)``."""
    try:
        while True:
            point = next(gen)
            if point.ready is not None and not point.ready():
                return point
    except StopIteration as stop:
        return ("done", stop.value)


def finished(gen: Gen[Any]) -> Any:
    """Alias of :func:`run` for readability at call sites that only want the result."""
    return run(gen)


@dataclass
class Held:
    """Snapshot of a task's lock context (for the event log and reports)."""

    task: str
    locks: list[str] = field(default_factory=list)


def lock_context(task: Task | None = None) -> Held:
    """The current lock context as names, e.g. for logging the context of a call that may sleep."""
    task = task or _current
    return Held(task.name, [f"{l.kind}:{l.name}" for l in task.held])
