"""Running one scenario: build the machine, do the setup, spawn the tasks, interleave, check.

``run_scenario(scenario, scheduler)`` is the one entry point used by the fuzzer, ``hmmirror replay`` and the
tests.  The set-up (machine, files, processes, ``[[op]]`` list, binding the driver) runs sequentially;
then the CPU threads, device jobs and kernel events of ``[sim]`` run as tasks of an
:class:`~hmmirror.sim.engine.Engine` with every invariant of :mod:`hmmirror.sim.invariants` installed.
A crash or a broken rule during the set-up is a finding too (task ``setup``, step 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import HmmirrorError, InputError, KernelError, ModelBug
from hmmirror.include.mm_types import MADV
from hmmirror.kernel import sched
from hmmirror.sim.engine import Engine, SimTask
from hmmirror.sim.findings import Finding, frame_stack, location_of, strip_ids
from hmmirror.sim.scenario import SimScenario, parse_size, resolve_addr

PROTS = {"none": 0, "r": 1, "w": 2, "rw": 3, "x": 4, "rx": 5, "rwx": 7}


@dataclass
class SimResult:
    """What one run produced."""

    scenario: SimScenario
    finding: Finding | None
    steps: int
    elapsed: float
    schedule: list[list[Any]]
    trace: list[tuple[int, int, str, str]] = field(default_factory=list)
    tasks: list[tuple[str, str]] = field(default_factory=list)      # (name, kind) by task index
    events: list[dict[str, Any]] = field(default_factory=list)
    diverged: str | None = None
    findings: list[Finding] = field(default_factory=list)     # every finding of the run (``finding``: the first)
    extra_findings: int = 0                                    # later violations of an invariant already found
    consequences: list[Finding] = field(default_factory=list)  # violations an earlier finding explains (Engine)
    coverage: Any = None                                       # the run's RunCoverage, when collected
    placement: Any = None                                      # the run's PlaceTimeline, when observed

    def __post_init__(self) -> None:
        if self.finding is not None and not self.findings:
            self.findings = [self.finding]

    def for_finding(self, f: Finding) -> "SimResult":
        """The same run seen as the run of ``f`` (what a reproducer of ``f`` records)."""
        import copy as _copy
        r = _copy.copy(self)
        r.finding = f
        return r

    def log_bytes(self) -> bytes:
        """The event log and the trace as bytes (what the determinism test compares)."""
        return log_bytes(self.events, self.trace, self.tasks)


def log_bytes(events: list[dict[str, Any]], trace: list[tuple[int, int, str, str]],
              tasks: list[tuple[str, str]]) -> bytes:
    out = []
    for e in events:
        out.append(json.dumps(e, sort_keys=True, default=_jsonable))
    for step, idx, kind, what in trace:
        out.append(f"{step} {tasks[idx][0]} {kind} {what}")
    return ("\n".join(out) + "\n").encode()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "name") and hasattr(v, "value"):
        return v.name
    if hasattr(v, "tolist"):
        return v.tolist()
    return strip_ids(repr(v))


class SimRun:
    """The state of one run: machine, processes, address names, driver, engine."""

    def __init__(self, scenario: SimScenario) -> None:
        self.scenario = scenario
        self.machine: Any = None
        self.procs: dict[str, Any] = {}
        self.names: dict[str, int] = {}
        self.driver: Any = None
        self.engine: Engine | None = None
        self.threads_of: dict[str, list[SimTask]] = {}   # process -> its CPU threads


# --- set-up ----------------------------------------------------------------------------------------------
def build_machine(sc: SimScenario, strict: bool = False, run: SimRun | None = None) -> SimRun:
    """Machine, devices, filesystems, files, processes and the setup operations (sequential)."""
    from hmmirror.machine import Machine, ThpSettings

    run = run or SimRun(sc)
    m = sc.machine
    thp = m.get("thp", {})
    machine = Machine(str(m.get("kernel", "6.18")), ram=parse_size(m.get("ram", "64M")),
                      hugepages_2m=int(m.get("hugepages_2m", 0)), hugepages_1g=int(m.get("hugepages_1g", 0)),
                      thp=ThpSettings(enabled=thp.get("enabled", "madvise"),
                                      use_zero_page=bool(thp.get("use_zero_page", True))))
    run.machine = machine
    for pm in m.get("pmem", []):
        machine.add_pmem(pm["name"], parse_size(pm["size"]), pm.get("mode", "fsdax"),
                         parse_size(pm.get("align", "2M")))
    for fs in m.get("fs", []):
        machine.mount(fs["mount"], fs["type"], dax=fs.get("dax"), huge=fs.get("huge", "never"),
                      pagesize=parse_size(fs["pagesize"]) if "pagesize" in fs else None)
    for f in sc.files:
        machine.create_file(f["path"], parse_size(f["size"]), f.get("content", "data"), bool(f.get("cached", True)))
    for p in sc.processes:
        run.procs[p] = machine.spawn(p)
    for op in sc.setup:
        try:
            _setup_op(run, op)
        except KernelError:
            if strict:
                raise
    return run


def _open_special(machine: Any, path: Any) -> Any:
    """``mixedmap``: the VM_MIXEDMAP device of drivers/pfnmap.py (``pfnmap`` and paths go to open_file)."""
    if path == "mixedmap":
        from hmmirror.drivers.pfnmap import open_pfnmap
        return open_pfnmap(machine, "mixedmap")
    return path


def _setup_op(run: SimRun, op: dict[str, Any]) -> None:
    proc = run.procs[op.get("proc", run.scenario.processes[0])]
    kind = op["op"]
    if kind == "mmap":
        addr = resolve_addr(op["addr"], run.names) if "addr" in op else 0
        a = proc.mmap(parse_size(op["length"]), op.get("prot", "rw"), op.get("flags", ["private", "anonymous"]),
                      file=_open_special(run.machine, op.get("file")), offset=parse_size(op.get("offset", 0)), addr=addr or 0,
                      align=parse_size(op["align"]) if "align" in op else None)
        if "as" in op:
            run.names[op["as"]] = a
        return
    addr = resolve_addr(op.get("addr", 0), run.names)
    if addr is None:
        raise InputError(f"setup op {kind}: unknown address {op.get('addr')!r}")
    length = parse_size(op.get("length", PAGE_SIZE))
    if kind == "touch":
        proc.touch(addr, length, write=op.get("access", "read") == "write", fill=op.get("fill"))
    elif kind == "munmap":
        proc.munmap(addr, length)
    elif kind == "mprotect":
        proc.mprotect(addr, length, op["prot"])
    elif kind == "madvise":
        proc.madvise(addr, length, op["advice"])
    else:
        raise InputError(f"unknown setup op {kind!r}")


# --- task bodies -----------------------------------------------------------------------------------------
def _describe(op: dict[str, Any]) -> str:
    keys = [f"{k}={v}" for k, v in op.items() if k not in ("op",)]
    return f"{op['op']}({', '.join(keys)})"


def cpu_thread(run: SimRun, st: SimTask, spec: dict[str, Any]) -> Any:
    """A CPU thread: the operations of ``spec`` one after another (each may sleep, fault, take locks); a
    ``touch`` stores a tag in (or loads) the first bytes of every page (:func:`invariants_data.sim_access`)."""
    from hmmirror.mm.mmap import vm_mmap, vm_munmap
    from hmmirror.sim.invariants_data import DISCARD_ADVICE, sim_access

    eng = run.engine
    assert eng is not None
    machine = run.machine
    proc = run.procs.get(spec.get("proc", run.scenario.processes[0]))
    for op in spec.get("ops", []):
        if proc is None or proc.mm.exited:
            break
        mm = proc.mm
        kind = op["op"]
        addr = resolve_addr(op.get("addr", 0), run.names)
        if addr is None:
            machine.log("sim_op", task=st.name, op=kind, skipped="address")
            continue
        length = parse_size(op.get("length", PAGE_SIZE))
        st.op, st.op_start = _describe(op), eng.step
        ret: Any = 0
        if kind in ("munmap", "mmap") or kind == "madvise" and str(op.get("advice", "")).lower() in DISCARD_ADVICE:
            eng.emit("op_begin", st, mm, addr, length)      # the range's data is meant to go (data_lost)
        if kind == "touch":
            write = op.get("access", "read") == "write"
            for a in range(addr & ~(PAGE_SIZE - 1), addr + length, PAGE_SIZE):
                ret = yield from sim_access(run, st, mm, a, write, "cpu")
                if ret:
                    break
        elif kind == "munmap":
            ret = yield from vm_munmap(mm, addr, length)
        elif kind == "mmap":
            from hmmirror.process import parse_map_flags
            flags = parse_map_flags(op.get("flags", ["private", "anonymous"]))
            ret = yield from vm_mmap(mm, addr, length, PROTS[op.get("prot", "rw")], flags, None, 0)
            if isinstance(ret, int) and ret >= 0 and "as" in op:
                run.names[op["as"]] = ret
        elif kind == "mprotect":
            from hmmirror.mm.mprotect import do_mprotect_pkey
            ret = yield from do_mprotect_pkey(mm, addr, length, PROTS[op["prot"]])
        elif kind == "madvise":
            from hmmirror.mm.madvise import do_madvise
            ret = yield from do_madvise(mm, addr, length, int(MADV[op["advice"].upper()]))
        elif kind == "fork":
            from hmmirror.kernel.fork import dup_mm
            from hmmirror.process import Process
            child = op.get("child", "c")
            if child in machine.mms:
                ret = -17
            else:
                new = yield from dup_mm(mm, child)
                if isinstance(new, int):
                    ret = new
                else:
                    run.procs[child] = Process(machine, new)
                    ret = 0
        else:
            ret = -22
        machine.log("sim_op", task=st.name, op=kind, ret=ret if isinstance(ret, int) else 0)
        eng.emit("op_end", st)
        st.op = ""
    return 0


def device_job(run: SimRun, st: SimTask, spec: dict[str, Any]) -> Any:
    """A device job: each job is a device fault ``[addr, addr+length)`` handled by the driver, after ``delay``
    preemption points of its own (the device comes back later)."""
    eng = run.engine
    assert eng is not None
    drv = run.driver
    for job in spec.get("jobs", []):
        for _ in range(int(job.get("delay", 0))):
            yield from sched.preempt_point("delay")
        start = resolve_addr(job["addr"], run.names)
        if start is None:
            continue
        start &= ~(PAGE_SIZE - 1)
        end = start + max(parse_size(job.get("length", PAGE_SIZE)), PAGE_SIZE)
        end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        write = bool(job.get("write", False))
        mode = str(job.get("mode", "fault"))
        st.op, st.op_start = f"fault({start:#x}-{end:#x}, {'write' if write else 'read'}" + \
            (f", {mode})" if mode != "fault" else ")"), eng.step
        yield from device_fault(run, start, end, write, mode, job)
        st.op = ""
    return 0


#: API modes after which every page of a successful driver fault must be mirrored (result contract)
WHOLE_RANGE_MODES = ("fault", "fault_nonblock", "fault_noowner", "fault_huge")


def device_fault(run: SimRun, start: int, end: int, write: bool, mode: str = "fault",
                 job: dict[str, Any] | None = None) -> Any:
    """One device fault handled by the driver, with the ``fault_begin``/``fault_end`` instrument hooks (the
    result-contract and commit invariants need them).  Use it in hand-written device tasks.

    ``mode`` is the HMM API mode of the job (scenario.DEVICE_MODES); a driver with ``fault_mode(start, end,
    write, mode, job)`` runs it, any other driver gets a plain ``fault`` (mode recorded as ``fault``).
    ``engine.fault_modes[task index]`` holds the mode of the fault in progress."""
    eng = run.engine
    assert eng is not None and eng.current is not None
    st = eng.current
    fm = getattr(run.driver, "fault_mode", None)
    if fm is None:
        mode = "fault"                              # a driver with one fault routine: every job is a whole fault
    modes = eng.__dict__.setdefault("fault_modes", {})
    modes[st.idx] = mode
    if getattr(run, "unbound", False):              # the mirror was unregistered (mirror_unbind event)
        run.machine.log("sim_fault", task=st.name, start=start, end=end, write=write, ret=-19, mode=mode)
        return -19
    run.inflight = getattr(run, "inflight", 0) + 1
    eng.emit("fault_begin", st, start, end, write)
    try:
        if mode == "fault":
            ret = yield from run.driver.fault(start, end, write)
        else:
            ret = yield from fm(start, end, write, mode, job or {})
    finally:
        run.inflight -= 1
    if ret == 0:
        from hmmirror.sim.invariants_data import device_access
        device_access(run, st, start, end, write)   # the device uses what it mapped (data_lost)
    eng.emit("fault_end", st, start, end, write, ret)
    run.machine.log("sim_fault", task=st.name, start=start, end=end, write=write, ret=ret, mode=mode)
    return ret


def kevent_task(run: SimRun, st: SimTask, ev: dict[str, Any]) -> Any:
    """A kernel background event (after ``delay`` preemption points)."""
    from hmmirror.sim import kevents

    eng = run.engine
    assert eng is not None
    for _ in range(int(ev.get("delay", 0))):
        yield from sched.preempt_point("delay")
    st.op, st.op_start = _describe({"op": ev["kind"], **{k: v for k, v in ev.items() if k not in ("kind", "name")}}), \
        eng.step
    ret = yield from kevents.run_event(run, ev)
    run.machine.log("sim_event", task=st.name, kind=ev["kind"], ret=ret if isinstance(ret, int) else 0)
    st.op = ""
    return ret


# --- the run ---------------------------------------------------------------------------------------------
def make_driver(run: SimRun) -> Any:
    from hmmirror.sim.driver import builtin_driver, check_driver, load_driver

    spec = run.scenario.driver
    if spec in ("builtin", ""):
        drv = builtin_driver(run.machine.profile)
    else:
        drv = load_driver(spec)()
    check_driver(drv)
    return drv


def run_scenario(sc: SimScenario, scheduler: Any, invariants: Any = None, driver: Any = None,
                 every_step: bool = False, record_trace: bool = True, coverage: Any = None,
                 counts_from: int = 0, stop_when: Any = None, placement: Any = None) -> SimResult:
    """Run ``sc`` under ``scheduler`` with the invariants installed; never raises for model faults.

    ``coverage``: a :class:`~hmmirror.sim.coverage.RunCoverage` collecting the run's cells (``result.coverage``).
    ``placement``: a :class:`~hmmirror.sim.placement.PlaceTimeline` observing where the pages live
    (``result.placement``; the swim lanes' placement band).
    """
    from hmmirror.sim.invariants import default_invariants

    t0 = time.perf_counter()
    run = SimRun(sc)
    finding = None
    prev_handler = sched.set_report_handler(None)
    setup_stack: list[str] = []

    def setup_report(kind: str, msg: str) -> None:
        import sys
        setup_stack[:] = frame_stack(sys._getframe(1))
        raise ModelBug(kind, msg)

    sched.set_report_handler(setup_report)
    try:
        build_machine(sc, run=run)
        run.driver = driver if driver is not None else make_driver(run)
        mirror = run.procs.get(sc.mirror)
        if mirror is None:
            raise InputError(f"[sim] mirror names no process: {sc.mirror!r}")
        ret = sched.run(run.driver.bind(mirror.mm), mirror.mm.task)
        if ret:
            raise InputError(f"driver {run.driver.name}: bind failed with {ret}")
    except InputError:
        sched.set_report_handler(prev_handler)
        raise
    except (HmmirrorError, Exception) as exc:      # a crash or broken rule during the set-up
        sched.set_report_handler(prev_handler)
        stack = setup_stack or _exc_stack(exc)
        inv = f"report:{exc.kind}" if isinstance(exc, ModelBug) else "exception"
        if isinstance(exc, ModelBug) and exc.kind in ("sleep_in_atomic", "bad_unlock", "recursive_lock"):
            inv = {"bad_unlock": "double_unlock"}.get(exc.kind, exc.kind)
        finding = Finding(inv, f"during set-up: {type(exc).__name__}: {exc}", 0, "setup", "setup",
                          stack=stack, location=location_of(stack))
        return SimResult(sc, finding, 0, time.perf_counter() - t0, [],
                         events=list(run.machine.events) if run.machine else [])
    sched.set_report_handler(prev_handler)
    invs = default_invariants(every_step=every_step, counts_from=counts_from) if invariants is None else invariants
    eng = Engine(run.machine, scheduler, list(invs) + ([coverage] if coverage is not None else [])
                 + ([placement] if placement is not None else []), max_steps=sc.max_steps)
    eng.stop_when = stop_when
    eng.record_trace = record_trace
    eng.sim = run                                       # type: ignore[attr-defined]
    run.engine = eng
    try:
        return _run_engine(sc, scheduler, invariants, driver, every_step, record_trace, coverage, run, eng, t0,
                           placement)
    finally:
        if coverage is not None:
            coverage.uninstall()


def _run_engine(sc: SimScenario, scheduler: Any, invariants: Any, driver: Any, every_step: bool,
                record_trace: bool, coverage: Any, run: SimRun, eng: Engine, t0: float,
                placement: Any = None) -> SimResult:
    for inst in eng.instruments:
        if hasattr(inst, "attach"):
            inst.attach(eng, run)
    for t in sc.threads:
        st = eng.spawn(t["name"], "cpu", None)          # type: ignore[arg-type]
        st.gen = cpu_thread(run, st, t)
        run.threads_of.setdefault(t.get("proc", sc.processes[0]), []).append(st)
    for d in sc.devices:
        st = eng.spawn(d["name"], "device", None)       # type: ignore[arg-type]
        st.gen = device_job(run, st, d)
    for ev in sc.events:
        st = eng.spawn(ev.get("name", ev["kind"]), "kevent", None, label=ev["kind"])  # type: ignore[arg-type]
        st.gen = kevent_task(run, st, ev)
    diverged = None
    spawn = attach_workers(run, eng)
    try:
        finding = eng.run()
    except Exception as exc:                            # noqa: BLE001 - schedule divergence on replay
        from hmmirror.sim.schedulers import ScheduleDiverged
        if not isinstance(exc, ScheduleDiverged):
            raise
        diverged = str(exc)
        finding = eng.finding
    finally:
        detach_workers(run, spawn)
    from hmmirror.sim.schedulers import ReplayScheduler, encode_schedule
    schedule = encode_schedule(eng)
    if any(f.invariant == "page_counts" for f in eng.findings) and not every_step and invariants is None \
            and diverged is None:
        # the periodic walk saw it late: the exact replay with the walk at every step finds the step
        if coverage is not None:
            coverage.uninstall()
        # (from the last clean periodic check on: the steps before it were seen clean)
        pc = next((i for i in eng.instruments if getattr(i, "name", "") == "page_counts"), None)
        again = run_scenario(sc, ReplayScheduler(schedule), None, driver, every_step=True, record_trace=record_trace,
                             counts_from=pc.locate_from() if pc is not None else 0, stop_when=eng.stop_when,
                             placement=placement)
        if any(f.invariant == "page_counts" for f in again.findings):
            again.coverage = coverage
            return again
    if getattr(run, "injected", False):             # opt-in injected page-table state: mark every finding
        for f in eng.findings:
            f.message = "[injected state] " + f.message
            f.detail = "injected" if f.detail in ("", "-") else f"injected:{f.detail}"
            f.state["injected"] = True
    res = SimResult(sc, finding, eng.step, time.perf_counter() - t0, schedule, eng.trace,
                    [(t.name, t.kind if t.kind != "kevent" else f"kevent:{t.label}") for t in eng.tasks],
                    list(run.machine.events), diverged, list(eng.findings), eng.extra_findings)
    res.coverage = coverage
    res.placement = placement
    res.consequences = list(eng.consequences)
    return res


def _exc_stack(exc: BaseException) -> list[str]:
    from hmmirror.sim.engine import _tb_stack
    return _tb_stack(exc.__traceback__)


def scheduler_for(sc: SimScenario, choices: Any = None) -> Any:
    """The scheduler a scenario asks for (``[sim.scheduler]``), or its recorded schedule when present."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.schedulers import PCTScheduler, RandomScheduler, ReplayScheduler, SwitchListScheduler

    if sc.schedule is not None:
        return ReplayScheduler(sc.schedule)
    s = sc.scheduler or {}
    kind = s.get("kind", "switch")
    if kind == "switch":
        return SwitchListScheduler([tuple(x) for x in s.get("switches", [])])
    ch = choices or SeededChoices(int(s.get("seed", 0)))
    if kind == "random":
        return RandomScheduler(ch)
    if kind == "pct":
        return PCTScheduler(ch, int(s.get("depth", 3)), int(s.get("expected_steps", 2000)))
    raise InputError(f"unknown scheduler {kind!r} (use switch, random or pct)")


def run_tasks(machine: Any, driver: Any, mm: Any, tasks: list[tuple[str, str, Any]], scheduler: Any = None,
              invariants: Any = None, max_steps: int = 100_000, every_step: bool = True,
              bind: bool = True) -> tuple[Finding | None, Engine]:
    """Interleave hand-written tasks over an existing machine with every invariant on (tests, pytest users).

    ``tasks`` are ``(name, kind, factory)`` where ``kind`` is ``cpu``, ``device`` or ``kevent:LABEL`` and
    ``factory(run)`` returns the task's generator (``run.driver``, ``run.machine``, ``run.procs`` are set).
    The driver is bound to ``mm`` first (sequentially).  Returns the finding (or None) and the engine.
    """
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.invariants import default_invariants
    from hmmirror.sim.schedulers import RandomScheduler

    sc = SimScenario(machine={"kernel": machine.profile.name}, processes=list(machine.mms), mirror=mm.name)
    run = SimRun(sc)
    run.machine = machine
    from hmmirror.process import Process
    run.procs = {name: Process(machine, m) for name, m in machine.mms.items()}
    run.driver = driver
    if bind and driver is not None:
        ret = sched.run(driver.bind(mm), mm.task)
        if ret:
            raise InputError(f"driver {getattr(driver, 'name', driver)}: bind failed with {ret}")
    invs = default_invariants(every_step=every_step) if invariants is None else invariants
    eng = Engine(machine, scheduler or RandomScheduler(SeededChoices(0)), list(invs), max_steps=max_steps)
    eng.sim = run                                       # type: ignore[attr-defined]
    run.engine = eng
    for inst in eng.instruments:
        if hasattr(inst, "attach"):
            inst.attach(eng, run)
    for name, kind, factory in tasks:
        label = ""
        if kind.startswith("kevent:"):
            kind, label = "kevent", kind.split(":", 1)[1]
        st = eng.spawn(name, kind, None, label=label)   # type: ignore[arg-type]
        st.op = name                                    # one operation for the task's whole life
        st.gen = factory(run)
    spawn = attach_workers(run, eng)
    try:
        return eng.run(), eng
    finally:
        detach_workers(run, spawn)


def attach_workers(run: SimRun, eng: Engine) -> Any:
    """Give every workqueue of the machine a worker task (``kworker/NAME``, a daemon: it runs while work is
    queued and does not keep the run alive) as soon as work is queued on it."""
    from hmmirror.kernel.workqueue import worker_thread

    machine = run.machine

    def spawn(wq: Any) -> None:
        if wq.worker is not None or wq.destroyed:
            return
        st = eng.spawn(f"kworker/{wq.name}", "kworker", None, label="kworker")   # type: ignore[arg-type]
        st.daemon = True

        def busy(work: Any, st: Any = st) -> None:
            # a work item is an operation: checks that wait for quiescence (refcounts) wait for its end
            st.op, st.op_start = (f"work({work.name})", eng.step) if work is not None else ("", st.op_start)

        st.gen = worker_thread(wq, busy)
        wq.worker = st

    machine.wq_hooks.append(spawn)
    for wq in machine.workqueues:
        if wq.worklist:
            spawn(wq)
    return spawn


def detach_workers(run: SimRun, spawn: Any) -> None:
    """After the run: the workers are gone (a later flush runs the items itself)."""
    machine = run.machine
    if spawn in machine.wq_hooks:
        machine.wq_hooks.remove(spawn)
    for wq in machine.workqueues:
        wq.worker = None
