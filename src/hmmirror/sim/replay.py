"""Replaying a reproducer exactly, and the seeded runs the determinism guarantee is about."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from hmmirror.errors import InputError
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.runner import SimResult, run_scenario, scheduler_for
from hmmirror.sim.scenario import SimScenario, generate
from hmmirror.sim.schedulers import RandomScheduler


@dataclass
class Replay:
    result: SimResult
    expected: dict[str, Any] | None

    @property
    def reproduced(self) -> bool:
        """The saved finding happened again (same signature); for a file without one: no finding."""
        f = self.result.finding
        if self.result.diverged:
            return False
        if self.expected is None:
            return f is None
        return any(x.signature == self.expected.get("signature") for x in self.result.findings)


def replay_file(path: str, every_step: bool = False, placement: Any = None) -> Replay:
    """Run a scenario file under its recorded ``[sim.schedule]`` (or its ``[sim.scheduler]``); ``placement``: a
    :class:`~hmmirror.sim.placement.PlaceTimeline` to observe the run with."""
    from hmmirror.scenario.schema import load_sim

    doc = load_sim(path)              # one schema: the scenario sections, [sim] and [finding] (FILE:LINE)
    sc = SimScenario.from_doc(doc)
    res = run_scenario(sc, scheduler_for(sc), every_step=every_step, placement=placement)
    exp = doc.get("finding")
    return Replay(res, exp if isinstance(exp, dict) else None)


def seeded_run(kernel: str, seed: int, driver: str = "builtin", every_step: bool = False,
               placement: Any = None) -> SimResult:
    """The run of ``seed``: scenario and random schedule from one seeded stream."""
    c = SeededChoices(seed)
    sc = generate(c, kernel, driver)
    sc.scheduler = {"kind": "random", "seed": seed}
    return run_scenario(sc, RandomScheduler(c), every_step=every_step, placement=placement)
