"""Helpers for a driver team's tests: run a scenario against your driver with every invariant (ours).

* :func:`check_scenario` runs a :class:`~hmmirror.sim.scenario.SimScenario` (drawn by
  :mod:`hmmirror.strategies`, loaded from a file, or written by hand) the way ``hmmirror fuzz`` runs one --
  :func:`hmmirror.sim.runner.run_scenario` with :func:`~hmmirror.sim.invariants.default_invariants` -- and
  raises :class:`DriverFinding` (an ``AssertionError``, so pytest reports it and Hypothesis shrinks it) with
  the finding's description and a reproducer that ``hmmirror replay`` runs;
* :func:`build` builds only the machine, the processes and the set-up of a scenario, for sequential tests
  (with :class:`hmmirror.mirror.Mirror`, ``Process.inspect`` ...).
"""

from __future__ import annotations

from typing import Any

from hmmirror.sim.runner import SimResult, SimRun, build_machine, run_scenario, scheduler_for
from hmmirror.sim.scenario import SimScenario
from hmmirror.sim.schedulers import SwitchListScheduler


class DriverFinding(AssertionError):
    """A run broke an invariant: ``finding`` (:class:`~hmmirror.sim.findings.Finding`), ``result``
    (:class:`~hmmirror.sim.runner.SimResult`) and ``reproducer`` (TOML text for ``hmmirror replay``)."""

    def __init__(self, result: SimResult, reproducer: str) -> None:
        self.result = result
        self.finding = result.finding
        self.reproducer = reproducer
        assert self.finding is not None
        others = [f for f in result.findings if f is not self.finding]
        more = "".join(f"\n  also: [{f.invariant}] {f.message} (step {f.step}, {f.location})" for f in others)
        super().__init__(f"{self.finding.describe()}{more}\n\nreproducer (save as a .toml file, then "
                         f"{replay_hint(result.scenario.driver)}):\n{reproducer}")


def replay_hint(driver: str) -> str:
    """How to replay a reproducer of ``driver`` (a spec) in a fresh process: ``hmmirror replay`` imports the
    driver by its module name, so a module that is not installed needs its directory on ``PYTHONPATH``; a
    class that is not importable by name (defined in a function) replays in this process only."""
    import sys
    from pathlib import Path

    from hmmirror.strategies import _REGISTRY

    mod_name = str(driver or "builtin").partition(":")[0]
    if mod_name in ("builtin", ""):
        return "`hmmirror replay FILE`"
    if mod_name == _REGISTRY:
        return ("`hmmirror.sim.replay.replay_file(FILE)` in this process: the driver class is not importable by "
                "name (define it at module level to replay it with `hmmirror replay FILE`)")
    path = getattr(sys.modules.get(mod_name), "__file__", None)
    if not path:
        return "`hmmirror replay FILE`"
    p = Path(path).resolve()
    root = p.parents[mod_name.count(".") + (p.name == "__init__.py")]
    import site
    installed = {Path(x).resolve() for x in site.getsitepackages() + [site.getusersitepackages()]}
    if root in installed:
        return "`hmmirror replay FILE`"
    return f"`PYTHONPATH={root} hmmirror replay FILE` (the driver {driver} is imported from {root})"


def reproducer_toml(result: SimResult) -> str:
    """The scenario with its recorded schedule and the finding, as ``hmmirror replay`` reads it."""
    from hmmirror.sim.tomlw import dumps

    sc = result.scenario.copy()
    sc.schedule = result.schedule
    f = result.finding
    text = sc.to_toml("hmmirror reproducer written by hmmirror.testing.check_scenario")
    if f is None:
        return text
    return text + "\n" + dumps({"finding": {"invariant": f.invariant, "location": f.location,
                                            "signature": f.signature, "step": f.step, "task": f.task,
                                            "message": f.message}})


def check_scenario(scenario: SimScenario, driver: Any = None, *, schedule: list[tuple[int, int]] | None = None,
                   every_step: bool = False) -> SimResult:
    """Run ``scenario`` with every invariant; raise :class:`DriverFinding` if one breaks, else return the
    :class:`~hmmirror.sim.runner.SimResult`.

    ``driver``: a driver class, factory or ``"package.module:Class"`` spec replacing the scenario's
    ``driver`` (a fresh instance is made for every run); ``schedule``: a switch list (from
    :func:`hmmirror.strategies.schedules`) replacing the scenario's scheduler; ``every_step``: check page
    counts at every step (slower, names the first bad step at once).
    """
    from hmmirror.strategies import driver_spec

    sc = scenario.copy()
    if driver is not None:
        sc.driver = driver_spec(driver)
    if schedule is not None:
        sc.scheduler = {"kind": "switch", "switches": [list(x) for x in schedule]}
        sc.schedule = None
    sched = SwitchListScheduler([tuple(x) for x in schedule]) if schedule is not None else scheduler_for(sc)
    res = run_scenario(sc, sched, every_step=every_step)
    if res.finding is not None:
        raise DriverFinding(res, reproducer_toml(res))
    return res


def build(scenario: SimScenario, strict: bool = True) -> SimRun:
    """The machine, processes and set-up operations of ``scenario``, run sequentially; the result has
    ``machine``, ``procs`` (name -> :class:`~hmmirror.process.Process`) and ``names`` (mapping name ->
    address).  ``strict``: a set-up operation failing with an errno raises (else it is skipped, as the
    simulator does)."""
    return build_machine(scenario, strict=strict)


__all__ = ["DriverFinding", "build", "check_scenario", "replay_hint", "reproducer_toml"]


def invalidations(machine: Any, since: int = 0, event: str = "CLEAR") -> list[tuple[str, int, int]]:
    """``(mm, start, end)`` of every ``invalidate_range_start`` of ``event`` (an ``MMU_NOTIFY`` name) logged
    since the event index ``since`` (``len(machine.events)`` taken before the step under test)."""
    return [(e["mm"], e["start"], e["end"]) for e in machine.events[since:]
            if e["what"] == "invalidate_range_start" and e["event"] == event]


def present_pages(process: Any, addr: int, npages: int) -> list[int]:
    """Indexes of the pages of ``[addr, addr + npages pages)`` that ``process`` maps present."""
    return [i for i, s in enumerate(process.inspect(addr, npages * 4096)) if s.present]

