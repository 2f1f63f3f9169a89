"""Fuzzing campaigns: random machines, scenarios and schedules; findings shrunk, deduplicated and saved.

Generation and shrinking use Hypothesis (the ``switch`` scheduler, the default): one test function draws a
scenario and a bounded switch list through ``data.draw`` (:class:`~hmmirror.sim.choices.HypothesisChoices`),
runs it, and fails when the run breaks an invariant whose signature is not known yet.  Hypothesis then shrinks
the *choice sequence* -- fewer mappings, operations, events and context switches -- and every smaller failing
run with that signature replaces the saved reproducer.  Known signatures (already in the findings directory)
pass, so each session hunts for new causes.  A session ends after ``examples`` runs, a finding, or the
deadline; the campaign starts the next one with the next seed.

``--scheduler mixed`` (the default) alternates a Hypothesis session with a batch of seeded runs under the
per-step ``random`` and ``pct`` schedulers (bounded switch lists rarely preempt inside short critical
sections; per-step random schedules do).  With ``--scheduler random`` or ``pct`` scenarios and schedules come
from a seeded stream
(:class:`~hmmirror.sim.choices.SeededChoices`) and a finding is shrunk by :func:`shrink_greedy` (ours:
Hypothesis cannot replay a foreign choice sequence): drop events, device jobs, CPU operations, threads and
set-up steps, then context switches, while the signature still reproduces.

Reproducers are written atomically (``os.replace`` of a temporary file) the moment a new signature is seen and
again whenever a smaller one is found, so a killed campaign keeps everything found so far.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hmmirror.sim.choices import HypothesisChoices, SeededChoices
from hmmirror.sim.findings import Finding
from hmmirror.sim.runner import SimResult, run_scenario, scheduler_for
from hmmirror.sim.scenario import SimScenario, generate
from hmmirror.sim.schedulers import PCTScheduler, RandomScheduler, SwitchListScheduler


@dataclass
class Config:
    kernel: str = "6.18"
    driver: str = "builtin"
    seconds: float = 60.0
    jobs: int = 1
    findings_dir: str = "findings"
    scheduler: str = "mixed"
    seed: int = 0
    every_step: bool = False
    examples: int = 200
    max_switches: int = 24
    stop_after: int = 0                         # end the campaign after this many new findings (0: never)
    kinds: tuple[str, ...] | None = None        # VMA kinds to generate (None: every available kind)
    events: tuple[str, ...] | None = None       # background events (None: every available event)


@dataclass
class Saved:
    """A saved reproducer."""

    finding: Finding
    path: str
    seed: int
    size: tuple[int, int]


@dataclass
class Stats:
    runs: int = 0
    steps: int = 0
    findings: dict[str, Saved] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class _OutOfTime(BaseException):
    """Ends a Hypothesis session at the campaign deadline (not a test failure)."""


class _Found(Exception):
    """A run broke an invariant with a new signature (Hypothesis shrinks it)."""


_FOUND_TYPES: dict[str, type] = {}


def _found_type(sig: str) -> type:
    """One exception class per signature, so Hypothesis keeps distinct causes apart while shrinking."""
    t = _FOUND_TYPES.get(sig)
    if t is None:
        t = _FOUND_TYPES[sig] = type(f"Found_{len(_FOUND_TYPES)}", (_Found,), {})
    return t


# --- reproducer files ------------------------------------------------------------------------------------
def reproducer_text(res: SimResult, seed: int, cfg: Config, path: str) -> str:
    f = res.finding
    assert f is not None
    sc = res.scenario.copy()
    sc.schedule = res.schedule
    doc_header = "\n".join([
        "hmmirror simulator reproducer",
        f"finding: [{f.invariant}] {f.message}",
        f"where: {f.location}   vma: {f.vma_kind}   entry: {f.entry}   event: {f.kevent}",
        f"at step {f.step} in task {f.task} ({f.task_kind}) {f.op}",
        f"found by: hmmirror fuzz --kernel {cfg.kernel} --scheduler {cfg.scheduler} (run seed {seed})"
        + (f" --driver {cfg.driver}" if cfg.driver != "builtin" else ""),
        f"size: {sc.size()} operations, {res.steps} steps",
        f"replay: hmmirror replay {path}",
    ])
    text = sc.to_toml(doc_header)
    fin = {"invariant": f.invariant, "location": f.location, "signature": f.signature, "step": f.step,
           "task": f.task, "message": f.message, "seed": seed}
    from hmmirror.sim.tomlw import dumps
    return text + "\n" + dumps({"finding": fin})


def write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".toml", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def known_signatures(directory: str) -> dict[str, tuple[int, int]]:
    """Signatures of the reproducers in ``directory`` and their sizes."""
    import tomllib

    out: dict[str, tuple[int, int]] = {}
    if not os.path.isdir(directory):
        return out
    for name in os.listdir(directory):
        if not name.endswith(".toml") or name.startswith(".tmp-"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as fh:
                doc = tomllib.load(fh)
            sig = doc["finding"]["signature"]
            sc = SimScenario.from_doc(doc)
            steps = sum(int(n) for _t, n in (sc.schedule or []))
            out[sig] = (sc.size(), steps)
        except Exception:          # noqa: BLE001 - a foreign or damaged file
            continue
    return out


class Recorder:
    """Keeps the smallest reproducer per signature on disk."""

    def __init__(self, cfg: Config, stats: Stats, notify: Callable[[Saved], None] | None = None) -> None:
        self.cfg = cfg
        self.stats = stats
        self.known = known_signatures(cfg.findings_dir)
        self.preexisting = set(self.known)
        self.notify = notify

    def offer(self, res: SimResult, seed: int) -> bool:
        """Save ``res`` if its signature is new or it is smaller than the saved one; True if new."""
        f = res.finding
        assert f is not None
        sig = f.signature
        size = (res.scenario.size(), res.steps)
        old = self.known.get(sig)
        if old is not None and old <= size:
            return False
        path = os.path.join(self.cfg.findings_dir, f"{f.sig_id}.toml")
        write_atomic(path, reproducer_text(res, seed, self.cfg, path))
        self.known[sig] = size
        saved = Saved(f, path, seed, size)
        new = sig not in self.stats.findings and sig not in self.preexisting
        self.stats.findings[sig] = saved
        if self.notify is not None:
            self.notify(saved)
        return new


# --- one worker ------------------------------------------------------------------------------------------
def campaign(cfg: Config, deadline: float, worker: int = 0, report: Callable[[str, Any], None] | None = None) -> Stats:
    """Run sessions until ``deadline`` (time.monotonic()); returns this worker's statistics."""
    stats = Stats()
    rec = Recorder(cfg, stats, (lambda s: report("finding", s)) if report else None)
    session = 0
    last = [time.monotonic(), 0, 0]
    total = [0, 0]

    def tick(force: bool = False) -> None:
        if report and (force or time.monotonic() - last[0] > 0.5):
            report("stats", (stats.runs - last[1], stats.steps - last[2]))
            last[:] = [time.monotonic(), stats.runs, stats.steps]

    while time.monotonic() < deadline:
        seed = cfg.seed * 1_000_003 + worker * 10_007 + session
        session += 1
        if cfg.scheduler == "switch" or (cfg.scheduler == "mixed" and session % 2 == 1):
            _hypothesis_session(cfg, seed, deadline, stats, rec, tick)
        elif cfg.scheduler == "mixed":
            # a batch of seeded runs, per-step random and PCT schedules alternating
            for k in range(cfg.examples // 2):
                if time.monotonic() > deadline:
                    break
                _seeded_run(cfg, seed * 1000 + k, deadline, stats, rec, "random" if k % 2 == 0 else "pct")
                tick()
        else:
            _seeded_run(cfg, seed, deadline, stats, rec)
        tick()
        if cfg.stop_after and len(stats.findings) >= cfg.stop_after:
            break
    tick(True)
    if report:
        for e in stats.errors[:5]:
            report("error", e)
    _ = total
    return stats


def _hypothesis_session(cfg: Config, seed: int, deadline: float, stats: Stats, rec: Recorder,
                        tick: Callable[[], None] | None = None) -> None:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    def body(data: Any) -> None:
        c = HypothesisChoices(data)
        sc = generate(c, cfg.kernel, cfg.driver, cfg.kinds, cfg.events)
        sw = SwitchListScheduler.draw(c, cfg.max_switches)
        if time.monotonic() > deadline:           # after the draws: the same choices draw the same way
            raise _OutOfTime()
        sc.scheduler = {"kind": "switch", "switches": [list(x) for x in sw.switches]}
        res = run_scenario(sc, sw, every_step=cfg.every_step, record_trace=False)
        stats.runs += 1
        stats.steps += res.steps
        if tick is not None:
            tick()
        f = res.finding
        if f is None:
            return
        sig = f.signature
        if sig in rec.preexisting:
            return
        rec.offer(res, seed)
        raise _found_type(sig)(sig)

    # Hypothesis gives shrinking up to five minutes; bound it by the campaign deadline (and one minute per
    # finding) so a campaign ends on time and keeps hunting
    from hypothesis.internal.conjecture import engine as _hyp_engine
    _hyp_engine.MAX_SHRINKING_SECONDS = max(1, min(60, int(deadline - time.monotonic())))  # type: ignore[misc]
    test = given(st.data())(body)
    test = settings(max_examples=cfg.examples, database=None, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
                    report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)(test)
    test = hseed(seed)(test)
    try:
        test()
    except (_OutOfTime, _Found):
        pass
    except BaseExceptionGroup:            # noqa: F821 - several causes shrunk at once
        pass
    except Exception as exc:              # noqa: BLE001 - Hypothesis health/flaky errors end the session only
        stats.errors.append(f"session {seed}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    # a found signature is now known: later sessions look for others
    rec.preexisting |= set(stats.findings)


def _seeded_run(cfg: Config, seed: int, deadline: float, stats: Stats, rec: Recorder,
                scheduler: str | None = None) -> None:
    c = SeededChoices(seed)
    sc = generate(c, cfg.kernel, cfg.driver, cfg.kinds, cfg.events)
    if (scheduler or cfg.scheduler) == "random":
        sc.scheduler = {"kind": "random", "seed": seed}
        sched = RandomScheduler(c)
    else:
        sc.scheduler = {"kind": "pct", "seed": seed, "depth": 3, "expected_steps": 2000}
        sched = PCTScheduler(c, 3, 2000)
    res = run_scenario(sc, sched, every_step=cfg.every_step)
    stats.runs += 1
    stats.steps += res.steps
    f = res.finding
    if f is None or f.signature in rec.preexisting:
        return
    rec.offer(res, seed)
    small = shrink_greedy(res, deadline=min(deadline, time.monotonic() + 30), every_step=cfg.every_step)
    if small is not None:
        rec.offer(small, seed)
    rec.preexisting.add(f.signature)


# --- our shrinker for seeded runs ------------------------------------------------------------------------
class NamedSwitchScheduler:
    """Switch points by task name: at step ``s`` run task ``name`` if it is runnable (shrinking aid)."""

    name = "named-switch"

    def __init__(self, switches: list[tuple[int, str]]) -> None:
        self.switches = sorted(switches)
        self._i = 0
        self.cur: Any = None

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        sw = self.switches
        want = None
        while self._i < len(sw) and sw[self._i][0] <= engine.step:
            want = sw[self._i][1]
            self._i += 1
        if want is not None:
            for t in runnable:
                if t.name == want:
                    self.cur = t
                    return t
        if self.cur is None or self.cur.done or self.cur not in runnable:
            self.cur = runnable[0]
        return self.cur


def _switches(res: SimResult) -> list[tuple[int, str]]:
    out = []
    step = 0
    for name, n in res.schedule:
        out.append((step, name))
        step += int(n)
    return out


def shrink_greedy(res: SimResult, deadline: float, every_step: bool = False) -> SimResult | None:
    """Greedy delta debugging of a seeded finding: scenario parts, then context switches."""
    assert res.finding is not None
    sig = res.finding.signature
    best_sc = res.scenario.copy()
    best_sw = _switches(res)
    best: SimResult | None = None

    def attempt(sc: SimScenario, sw: list[tuple[int, str]]) -> SimResult | None:
        r = run_scenario(sc, NamedSwitchScheduler(sw), every_step=every_step, record_trace=False)
        return r if r.finding is not None and r.finding.signature == sig else None

    first = attempt(best_sc, best_sw)
    if first is None:
        return None
    best = first
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for cand in _scenario_cuts(best_sc):
            if time.monotonic() > deadline:
                break
            r = attempt(cand, best_sw)
            if r is not None:
                best_sc, best, progress = cand, r, True
                break
        if progress:
            continue
        # context switches: halves, then one at a time
        n = len(best_sw)
        chunk = max(n // 2, 1)
        while chunk >= 1 and time.monotonic() < deadline:
            i = 0
            changed = False
            while i < len(best_sw) and time.monotonic() < deadline:
                cand_sw = best_sw[:i] + best_sw[i + chunk:]
                r = attempt(best_sc, cand_sw)
                if r is not None:
                    best_sw, best, changed, progress = cand_sw, r, True, True
                else:
                    i += chunk
            if not changed:
                chunk //= 2
    if best is not None:
        best.scenario.scheduler = {"kind": "switch", "switches": []}
    return best


def _scenario_cuts(sc: SimScenario) -> list[SimScenario]:
    out = []
    for i in range(len(sc.events)):
        c = sc.copy()
        del c.events[i]
        out.append(c)
    for i, d in enumerate(sc.devices):
        if len(d["jobs"]) > 1:
            for j in range(len(d["jobs"])):
                c = sc.copy()
                del c.devices[i]["jobs"][j]
                out.append(c)
        elif len(sc.devices) > 1:
            c = sc.copy()
            del c.devices[i]
            out.append(c)
    for i, t in enumerate(sc.threads):
        c = sc.copy()
        del c.threads[i]
        out.append(c)
        for j in range(len(t["ops"])):
            c = sc.copy()
            del c.threads[i]["ops"][j]
            out.append(c)
    for i, op in enumerate(sc.setup):
        if op["op"] in ("touch", "madvise"):
            c = sc.copy()
            del c.setup[i]
            out.append(c)
    return out


# --- the campaign over several processes -----------------------------------------------------------------
def _worker_main(cfg: Config, deadline_wall: float, worker: int, q: Any) -> None:
    deadline = time.monotonic() + max(0.0, deadline_wall - time.time())

    def report(kind: str, payload: Any) -> None:
        if kind == "error":
            q.put(("error", worker, payload))
            return
        if kind == "finding":
            s: Saved = payload
            q.put(("finding", worker, {"invariant": s.finding.invariant, "location": s.finding.location,
                                       "signature": s.finding.signature, "reproducer": s.path,
                                       "seed": s.seed, "message": s.finding.message, "size": list(s.size)}))
        else:
            q.put(("stats", worker, payload))

    try:
        campaign(cfg, deadline, worker, report)
    except Exception as exc:            # noqa: BLE001 - report and end this worker
        q.put(("error", worker, f"{type(exc).__name__}: {exc}"))
    q.put(("done", worker, None))


def run_campaign(cfg: Config, on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole campaign (``cfg.jobs`` processes); returns ``{"findings": [...], "runs": N, "steps": N}``."""
    import multiprocessing as mp

    os.makedirs(cfg.findings_dir, exist_ok=True)
    deadline_wall = time.time() + cfg.seconds
    state: dict[str, Any] = {"runs": 0, "steps": 0, "findings": {}, "errors": [], "started": time.time()}
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(cfg, deadline_wall, w, q), daemon=True)
             for w in range(max(cfg.jobs, 1))]
    for p in procs:
        p.start()
    done = 0
    import queue as _queue
    while done < len(procs):
        try:
            kind, w, payload = q.get(timeout=0.25)
        except _queue.Empty:
            if on_update:
                on_update(state)
            if time.time() > deadline_wall + 120 or not any(p.is_alive() for p in procs):
                break
            continue
        if kind == "stats":
            state["runs"] += payload[0]
            state["steps"] += payload[1]
        elif kind == "finding":
            old = state["findings"].get(payload["signature"])
            if old is None or tuple(payload["size"]) <= tuple(old["size"]):
                state["findings"][payload["signature"]] = payload
        elif kind == "error":
            state["errors"].append(f"worker {w}: {payload}")
        elif kind == "done":
            done += 1
        if on_update:
            on_update(state)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
    findings = sorted(state["findings"].values(), key=lambda d: (d["invariant"], d["location"]))
    return {"findings": [{"invariant": d["invariant"], "location": d["location"], "reproducer": d["reproducer"],
                          "seed": d["seed"], "signature": d["signature"], "message": d["message"]}
                         for d in findings],
            "runs": state["runs"], "steps": state["steps"], "errors": state["errors"],
            "seconds": round(time.time() - state["started"], 1)}


_ = (json, scheduler_for)
