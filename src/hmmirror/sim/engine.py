"""The simulation engine: many model generators interleaved at their preemption points.

The engine owns a list of :class:`SimTask` (a :class:`~hmmirror.kernel.sched.Task`, the generator it runs
and the :class:`~hmmirror.kernel.sched.Point` it is suspended at).  One *step* is: ask the scheduler for a
runnable task (suspended at a Point without ``ready`` or whose ``ready()`` holds), make it ``current``,
advance its generator to the next Point, record ``(step, task, point kind, what)`` in the trace, and call the
instruments.  Nothing else decides anything: the scheduler draws from the one stream of choices
(:mod:`hmmirror.sim.choices`).

Findings.  Every broken rule becomes a :class:`~hmmirror.sim.findings.Finding`: a ``sched.report``
(installed as the report handler while the engine runs), a Python exception escaping model code, all
remaining tasks blocked (deadlock / a wait without a waker), and every violation an instrument (invariant)
reports through :meth:`Engine.violate`.  A finding that leaves the model usable -- a report after which the
model code goes on, an invariant of the page tables, the device or the locks -- is recorded and the run
continues (``continue_after``), so one violation cannot hide another; the first finding of each invariant
is kept (``findings``; ``finding`` is the first of all).  An exception, a deadlock, a wait without a waker,
a teardown that cannot end, a recursive lock (the CPU would spin on it for ever: what the other tasks do
afterwards -- waiting for that lock -- is its consequence, not another finding) and the step bound end the run
after their step (:data:`STOPPING`).

Instruments (trio style) plug in without touching the core: any object with some of the methods
``task_spawned(engine, st)``, ``before_step(engine, st)``, ``after_step(engine, st, point)``,
``task_exited(engine, st)``, ``on_log(engine, event)`` (every ``machine.log`` record as it is appended) and
``run_finished(engine)``, and ``fault_begin(engine, st, start, end, write)`` /
``fault_end(engine, st, start, end, write, ret)`` around every device fault the driver handles, and
``op_end(engine, st)`` after every CPU-thread operation.

An instrument whose ``on_log`` reads only some log kinds says so in ``log_kinds`` (a set of ``what`` names):
the engine calls it only for those (a table from kind to hooks, in instrument order); one without
``log_kinds`` hears every record.  :data:`ROUTE_LOG` off calls every ``on_log`` for every record (the
reference; tests/sim/test_sim_fastpaths.py runs both and compares).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import Any

from hmmirror.kernel import sched
from hmmirror.kernel.sched import Lock, Point, Task
from hmmirror.sim.findings import Finding, frame_stack, gen_stack, location_of

_HOOKS = ("task_spawned", "before_step", "after_step", "task_exited", "on_log", "run_finished", "fault_begin",
          "fault_end", "op_begin", "op_end", "data_access", "explain_wait")

#: sched.report kinds -> invariant names
REPORT_INVARIANT = {
    "sleep_in_atomic": "sleep_in_atomic",
    "bad_unlock": "double_unlock",
    "recursive_lock": "recursive_lock",
    "livelock": "liveness",
    "deadlock": "deadlock",
    "pte_map_balance": "pte_map_balance",
    "zone_device_page_init_busy": "device_page_reuse",     # I6: a device page reused with a reference held
}


#: steps within which a background event counts as involved in a violation (signature)
KEVENT_WINDOW = 64

#: route log records only to the instruments subscribed to their kind (``log_kinds``); off: every ``on_log``
#: hears every record (the reference)
ROUTE_LOG = True

#: invariants after which the model is not usable: the run ends after the step that broke them
#: (``liveness``: the looping task would spin to the step bound; the rest of the run tells nothing new)
STOPPING = frozenset({"exception", "deadlock", "no_waker", "device_teardown", "locks_balanced", "liveness",
                      "recursive_lock"})


def _local_of(frame: Any, func: str, name: str, depth: int = 4) -> Any:
    """Local ``name`` of the nearest caller frame running ``func`` (within ``depth`` frames), or None."""
    f = frame
    for _ in range(depth):
        if f is None:
            return None
        if f.f_code.co_name == func:
            return f.f_locals.get(name)
        f = f.f_back
    return None


class StopRun(BaseException):
    """Raised inside a task to abandon it when the run is over (never escapes the engine)."""


class SimTask:
    """One interleaved thread: a CPU thread (``cpu``), a device job (``device``) or a kernel event (``kevent``)."""

    __slots__ = ("idx", "name", "kind", "task", "gen", "point", "ready", "done", "result", "op", "op_start",
                 "label", "steps", "error", "daemon")

    def __init__(self, idx: int, name: str, kind: str, gen: Generator[Point, None, Any], label: str = "") -> None:
        self.idx = idx
        self.name = name
        self.kind = kind
        self.task = Task(name, "kthread" if kind == "kevent" else kind)
        self.gen = gen
        self.point: Point | None = None
        self.ready: Callable[[], bool] | None = None
        self.done = False
        self.result: Any = None
        self.op = ""              # what the task is doing now (set by the task body, for reports)
        self.op_start = 0         # step at which the current operation began
        self.label = label or kind  # kevent: the event kind (reclaim, thp_split, ...)
        self.steps = 0
        self.error: BaseException | None = None
        self.daemon = False       # a worker (kworker): runs while it has work, never keeps the run alive

    def runnable(self) -> bool:
        return not self.done and (self.ready is None or self.ready())

    def __repr__(self) -> str:
        return f"SimTask({self.name})"


class Engine:
    """Interleaves :class:`SimTask` generators over one machine."""

    def __init__(self, machine: Any, scheduler: Any, instruments: list[Any] | None = None,
                 max_steps: int = 200_000) -> None:
        self.machine = machine
        self.scheduler = scheduler
        self.tasks: list[SimTask] = []
        self.step = 0
        self.max_steps = max_steps
        self.trace: list[tuple[int, int, str, str]] = []      # (step, task idx, point kind, what)
        self.picks: list[int] = []
        self.finding: Finding | None = None
        self.findings: list[Finding] = []       # the first finding of each invariant, in order
        self.extra_findings = 0                 # further violations of an invariant already recorded
        # violations an earlier finding of the run explains from the model's state (the same lock hold, the
        # references a walk kept): reported with it, never a finding (signature, reproducer) of their own
        self.consequences: list[Finding] = []
        self._atomic_holds: dict[tuple[int, int], str] = {}   # (id(task), id(spinlock)) -> signature slept under
        self.continue_after = True              # go on after a finding that leaves the model usable
        self.stop_when: Callable[[Finding], bool] | None = None   # end the run at a finding it accepts
        self.stopped = False
        self.current: SimTask | None = None
        self.last_kevent: tuple[int, str] = (-1, "")
        self.instruments: list[Any] = []
        self._hooks: dict[str, list[Callable[..., Any]]] = {h: [] for h in _HOOKS}
        self._log_subs: list[tuple[Callable[..., Any], Any]] = []     # (on_log, its log_kinds or None: all)
        self._log_route: dict[str, list[Callable[..., Any]]] = {}     # log kind -> the hooks that hear it
        self.record_trace = True
        self.in_step = False
        self._live: list[SimTask] | None = None       # the loop's unfinished tasks (while it runs)
        for inst in instruments or ():
            self.add_instrument(inst)

    # -- set-up --------------------------------------------------------------------------------------------
    def add_instrument(self, inst: Any) -> None:
        self.instruments.append(inst)
        for h in _HOOKS:
            fn = getattr(inst, h, None)
            if fn is not None:
                self._hooks[h].append(fn)
        if getattr(inst, "on_log", None) is not None:
            kinds = getattr(inst, "log_kinds", None) if ROUTE_LOG else None
            self._log_subs.append((inst.on_log, None if kinds is None else frozenset(kinds)))
            self._log_route.clear()

    def _log_hooks(self, what: str) -> list[Callable[..., Any]]:
        """The ``on_log`` hooks that hear records of kind ``what`` (computed once per kind)."""
        hooks = [fn for fn, kinds in self._log_subs if kinds is None or what in kinds]
        self._log_route[what] = hooks
        return hooks

    def spawn(self, name: str, kind: str, gen: Generator[Point, None, Any], label: str = "") -> SimTask:
        """Add a task (it first runs when the scheduler picks it)."""
        st = SimTask(len(self.tasks), name, kind, gen, label)
        self.tasks.append(st)
        if self._live is not None:
            self._live.append(st)                       # spawned while the loop runs (a kworker)
        if hasattr(self.scheduler, "on_spawn"):
            self.scheduler.on_spawn(self, st)
        for fn in self._hooks["task_spawned"]:
            fn(self, st)
        return st

    def emit(self, hook: str, *args: Any) -> None:
        """Call every instrument's ``hook(engine, *args)``."""
        for fn in self._hooks[hook]:
            fn(self, *args)

    # -- findings ------------------------------------------------------------------------------------------
    def violate(self, invariant: str, message: str, *, st: SimTask | None = None, mm: Any = None,
                addr: int | None = None, state: dict[str, Any] | None = None, location: str | None = None,
                stack: list[str] | None = None, entry: str | None = None, vma_kind: str | None = None,
                detail: str | None = None, explained_by: str | None = None) -> None:
        """Record a broken invariant: the first violation of each invariant is kept; the run stops after this
        step for a :data:`STOPPING` invariant (or any, without ``continue_after``).

        The signature comes from what the invariant passes and from the model's state: ``location`` (else
        the innermost kernel-named function of ``stack``, else of the task's own stack), ``detail``.  The
        VMA kind and entry are described at ``mm``/``addr`` when the invariant passes them (report only).
        ``explained_by``: the signature of an earlier finding of this run that the model's state shows to be
        the cause; the violation is kept in :attr:`consequences` (it still ends the run if it is a stopping
        one) and is not a finding of its own.
        """
        if explained_by is not None and not self.stopped:
            st_ = st or self.current
            stack_ = stack if stack is not None else (gen_stack(st_.gen) if st_ is not None and not st_.done else [])
            c = Finding(invariant=invariant, message=message, step=self.step, task=st_.name if st_ else "-",
                        task_kind=st_.kind if st_ else "-", op=st_.op if st_ else "", stack=stack_,
                        location=location or location_of(stack_), detail=detail or "-", addr=addr,
                        state={**(state or {}), "consequence_of": explained_by})
            self.consequences.append(c)
            if invariant in STOPPING or not self.continue_after:
                self.stopped = True
            return
        if self.stopped or any(f.invariant == invariant for f in self.findings):
            self.extra_findings += 1
            return
        st = st or self.current
        if stack is None:
            if self.in_step and st is self.current:
                stack = frame_stack(sys._getframe(1))     # the running task: its live Python stack
            else:
                stack = gen_stack(st.gen) if st is not None and not st.done else []
        if vma_kind is None or entry is None:
            vk, en = describe_address(mm, addr)
            vma_kind = vma_kind or vk
            entry = entry or en
        kevent = "-"
        if st is not None:
            if st.kind == "kevent":
                kevent = st.label
            else:
                # for the report: a background event that ran during the violating operation, recently
                k_step, k_label = self.last_kevent
                if k_step >= 0 and k_step >= st.op_start and self.step - k_step <= KEVENT_WINDOW:
                    kevent = k_label
        if detail is None:
            detail = "-"
        f = Finding(
            invariant=invariant, message=message, step=self.step, task=st.name if st else "-",
            task_kind=st.kind if st else "-", op=st.op if st else "", stack=stack,
            location=location or location_of(stack), vma_kind=vma_kind or "-", entry=entry or "-",
            kevent=kevent, detail=detail, addr=addr, state=state or {},
        )
        self.findings.append(f)
        if self.finding is None:
            self.finding = f
        if invariant in STOPPING or not self.continue_after or (self.stop_when is not None and self.stop_when(f)):
            self.stopped = True

    def _on_report(self, kind: str, message: str) -> None:
        stack = frame_stack(sys._getframe(1))
        cause = sched.report_cause()
        task = sched.current()
        why = None
        if kind == "recursive_lock" and task is not None:
            # taking again the spinlock the task already slept under (a sleep_in_atomic finding of this run):
            # one cause -- the fault under that lock -- whose consequence is the recursive acquisition
            lock = _local_of(sys._getframe(1), "_acquire", "lock")
            why = self._atomic_holds.get((id(task), id(lock))) if lock is not None else None
        n = len(self.findings)
        self.violate(REPORT_INVARIANT.get(kind, f"report:{kind}"), message, stack=stack,
                     detail=None if cause == "-" else cause, explained_by=why)
        if kind == "sleep_in_atomic" and task is not None and len(self.findings) > n:
            spin = task.holds_spinlock()
            if spin is not None:
                self._atomic_holds[(id(task), id(spin))] = self.findings[-1].signature

    def _on_log(self, orig: Callable[..., None]) -> Callable[..., None]:
        route = self._log_route
        table = self._log_hooks
        machine = self.machine
        if getattr(orig, "__func__", None) is _machine_log() and getattr(orig, "__self__", None) is machine:
            # the machine's own Machine.log: its append done here (the same record, one call less per record)
            events = machine.events

            def log_fused(what: str, **fields: Any) -> None:
                if machine.logging:
                    fields["what"] = what
                    events.append(fields)
                hooks = route.get(what)
                if hooks is None:
                    hooks = table(what)
                if hooks:
                    fields["what"] = what
                    for fn in hooks:
                        fn(self, fields)
            return log_fused

        def log(what: str, **fields: Any) -> None:
            orig(what, **fields)
            hooks = route.get(what)
            if hooks is None:
                hooks = table(what)
            if hooks:
                fields["what"] = what
                for fn in hooks:
                    fn(self, fields)
        return log

    # -- running -------------------------------------------------------------------------------------------
    def run(self) -> Finding | None:
        """Run until every task finished, a finding, or the step bound; returns the finding (or None)."""
        prev_handler = sched.set_report_handler(self._on_report)
        prev_clock = sched.set_others_clock(self._others_steps)
        prev_current = sched.current()
        machine = self.machine
        orig_log = None
        if self._hooks["on_log"]:
            orig_log = machine.log
            machine.log = self._on_log(orig_log)
        try:
            self._loop()
            if not self.stopped:
                for fn in self._hooks["run_finished"]:
                    fn(self)
                    if self.stopped:
                        break
        finally:
            self._abandon()
            if orig_log is not None:
                try:
                    del machine.log
                except AttributeError:
                    machine.log = orig_log
            sched.set_report_handler(prev_handler)
            sched.set_others_clock(prev_clock)
            sched.set_current(prev_current)
        return self.finding

    def _others_steps(self) -> int:
        """Steps taken by tasks other than the running one (``sched.others_ran``)."""
        st = self.current
        return self.step - (st.steps if st is not None else 0)

    def _loop(self) -> None:
        tasks = self.tasks
        pick = self.scheduler.pick
        before = self._hooks["before_step"]
        after = self._hooks["after_step"]
        exited = self._hooks["task_exited"]
        trace = self.trace
        picks = self.picks
        record = self.record_trace
        machine = self.machine
        smod = sched
        # the tasks not done, in creation order (a task spawned during the run is appended to both lists): the
        # same runnable list as filtering ``tasks`` every step, without walking the finished ones
        live = self._live = [t for t in tasks if not t.done]
        while not self.stopped:
            runnable = [t for t in live if t.ready is None or t.ready()]
            if not runnable:
                if any(not t.daemon for t in live):
                    self._all_blocked()
                return
            if self.step >= self.max_steps:
                self._step_bound()
                return
            st = pick(self, runnable)
            self.current = st
            for fn in before:
                fn(self, st)
            smod._current = st.task                       # sched.set_current(st.task), inlined
            point = None
            self.in_step = True
            try:
                point = st.gen.send(None)
            except StopIteration as stop:
                st.done = True
                st.result = stop.value
                st.ready = None
                st.point = None
            except StopRun:
                st.done = True
            except Exception as exc:                      # a crash of model code is a finding
                st.error = exc
                tb = exc.__traceback__
                stack = _tb_stack(tb)
                self.violate("exception", f"{type(exc).__name__}: {exc}", st=st, stack=stack)
                st.done = True
            else:
                st.point = point
                st.ready = point.ready
            self.in_step = False
            st.steps += 1
            picks.append(st.idx)
            if record:
                if point is None:
                    trace.append((self.step, st.idx, "exit", ""))
                else:
                    trace.append((self.step, st.idx, point.kind, point.what))
            if st.kind == "kevent":
                self.last_kevent = (self.step, st.label)
            for fn in after:
                fn(self, st, point)
            if st.done:
                live.remove(st)
                for fn in exited:
                    fn(self, st)
            self.step += 1
            machine.jiffies += 1                          # one tick of virtual time per step (kernel/time.py)

    def _all_blocked(self) -> None:
        """No task can run but some are not finished: a deadlock or a wait nobody will end."""
        # an idle worker waiting for work is not blocked (it holds nothing and nobody waits for it)
        blocked = [t for t in self.tasks if not t.done and not (t.daemon and not (
            t.point is not None and isinstance(t.point.obj, Lock)))]
        waits_lock = []
        for t in blocked:
            obj = t.point.obj if t.point is not None else None
            if isinstance(obj, Lock):
                waits_lock.append((t, obj))
        names = {t.task: t for t in self.tasks}
        state = {t.name: (t.point.what if t.point else "?") for t in blocked}
        for t, lock in waits_lock:
            holders = [lock.owner] if lock.owner is not None else list(lock.readers)
            for h in holders:
                hst = names.get(h)
                if hst is None or hst.done:
                    self.violate("locks_balanced", f"{t.name} waits for {lock.name}, held by "
                                 f"{h.name if h else '?'} which is no longer running", st=t, state=state)
                    return
        if len(waits_lock) == len(blocked):
            cyc = " -> ".join(f"{t.name} waits {l.name}" for t, l in waits_lock)
            self.violate("deadlock", f"lock deadlock: {cyc}", st=waits_lock[0][0], state=state)
            return
        t = next(t for t in blocked if not (t.point is not None and isinstance(t.point.obj, Lock)))
        inv = "device_teardown" if t.kind == "kevent" and t.label in ("pmem_unbind", "dax_unbind") else "no_waker"
        # an instrument may show from the model's state that an earlier finding of the run is why nobody can
        # end this wait (the references a walk kept and the pgmap teardown waits for)
        why = next((w for w in (fn(self, t) for fn in self._hooks["explain_wait"]) if w), None)
        self.violate(inv, f"{t.name} waits for {t.point.what if t.point else '?'} and no task can wake it",
                     st=t, state=state, explained_by=why)

    def _step_bound(self) -> None:
        counts: dict[int, int] = {}
        for idx in self.picks[-2000:]:
            counts[idx] = counts.get(idx, 0) + 1
        busiest = self.tasks[max(counts, key=lambda k: counts[k])] if counts else None
        stack = gen_stack(busiest.gen) if busiest is not None and not busiest.done else []
        # where a step bound is hit is arbitrary: the signature names the busiest task's outermost model
        # function (the loop that does not end), not the innermost one it happened to be in
        self.violate("liveness", f"the run did not finish within {self.max_steps} steps "
                     f"({busiest.name if busiest else '?'} ran most of the last 2000)", st=busiest, stack=stack,
                     location=("step_bound:" + stack[0].rsplit(":", 1)[0]) if stack else "step_bound",
                     vma_kind="-", entry="-")

    def _abandon(self) -> None:
        """Close unfinished generators (their ``finally`` blocks may report: ignored, the run is over)."""
        sched.set_report_handler(lambda kind, msg: None)
        for t in self.tasks:
            if not t.done:
                sched.set_current(t.task)
                try:
                    t.gen.close()
                except BaseException:       # noqa: BLE001 - a model finally-block crashing at teardown
                    pass


def _machine_log() -> Any:
    """``Machine.log`` (the function the engine's log wrapper inlines when the machine uses it unchanged)."""
    from hmmirror.machine import Machine
    return Machine.log


def _tb_stack(tb: Any) -> list[str]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    from hmmirror.sim.findings import describe_frame, is_model_frame
    return [describe_frame(f, f.f_lineno) for f in frames if is_model_frame(f)] or \
        [describe_frame(f, f.f_lineno) for f in frames[-3:]]


def describe_address(mm: Any, addr: int | None) -> tuple[str, str]:
    """(VMA kind, entry type) at ``addr`` of ``mm``: e.g. ``("anon", "pte/anon")``; ``"-"`` when unknown."""
    if mm is None or addr is None:
        return "-", "-"
    try:
        vma = mm.vma_lookup(addr)
        vk = vma.kind if vma is not None else "novma"
        from hmmirror.mm.inspect import model_page_state
        ps = model_page_state(mm, addr & ~0xFFF)
        entry = f"{ps.level or 'pte'}/{ps.kind}"
        if ps.protnone:
            entry += "/protnone"
        return vk, entry
    except Exception:                 # noqa: BLE001 - describing must never fail a run
        return "-", "-"


_ = Task
