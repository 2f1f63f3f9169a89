"""The guest half of ``hmmirror crosscheck --guest``: scenarios in the 6.12 guest and in the model.

The guest plays a batch of scenarios per boot (:func:`hmmirror.live.guest.jobs.run_scenarios`); then each
scenario runs on the model (profile :func:`~hmmirror.live.guest.model_profile`, the scenario's own THP
settings, which the guest was set to; every ``mmap`` at the address the guest's kernel chose) and the two
are compared with :func:`hmmirror.live.crosscheck.compare_runs`: every page of every ``inspect`` field by field
(pagemap and kpageflags through the host's classifier), every operation's errno, and the dmirror results
(snapshot bytes one by one, ``cpages``/``faults``/``bad_pages``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hmmirror.live.crosscheck import Report, _model_side, compare_runs
from hmmirror.live.guest import model_profile
from hmmirror.live.guest.build import Artifacts
from hmmirror.live.guest.jobs import run_scenarios

#: Scenarios per boot: a boot costs seconds under TCG; a guest that dies loses one batch, not the run.
BATCH = 25


def new_info() -> dict[str, Any]:
    """Facts about a guest cross-check: model profile, boots, seconds in the guest, acceleration, device-dax."""
    return {"profile": model_profile(), "boots": 0, "guest_seconds": 0.0, "accel": None, "devdax": None}


def crosscheck_guest(art: Artifacts, scenarios: Sequence[Any], report: Report,
                     advance: Callable[[str], None] | None = None, batch: int = BATCH,
                     info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cross-check parsed scenarios against the guest into ``report``; returns ``info`` (:func:`new_info`),
    updated after every batch (so an interrupted run still has it)."""
    info = new_info() if info is None else info
    profile = info["profile"]
    for lo in range(0, len(scenarios), batch):
        chunk = list(scenarios[lo:lo + batch])
        named = [(f"c{lo + i}", scn) for i, scn in enumerate(chunk)]
        run = run_scenarios(art, named)
        info["boots"] += 1
        info["guest_seconds"] += run.seconds
        info["accel"] = run.accel
        if run.devdax is not None:
            info["devdax"] = bool(info["devdax"] is not False and run.devdax)
        for name, scn in named:
            compare_scenario(scn, run.plans[name], run.results.get(name), report, profile)
            if advance:
                advance(scn.file)
    return info


def compare_scenario(scn: Any, plan: Any, res: Any, report: Report, profile: str) -> None:
    """Run one scenario the guest played on the model and add the comparison to ``report`` (or record why
    it was skipped)."""
    label = scn.file
    if plan.skip:
        report.skipped.append((label, f"not runnable in the guest: {plan.skip}"))
        return
    if plan.unsupported:
        idx, why = next(iter(plan.unsupported.items()))
        report.skipped.append((label, f"op #{idx} not runnable in the guest: {why}"))
        return
    if res is None or not res.complete:
        report.skipped.append((label, "the guest did not finish it"))
        return
    if res.errors:
        report.skipped.append((label, "guest set-up failed: " + "; ".join(res.errors)))
        return
    try:
        model = _model_side(scn, {}, res.records, kernel=profile)
    except Exception as exc:                      # a model crash is a finding, not the end of the run
        report.crashes.append((label, f"{type(exc).__name__}: {exc}"))
        return
    compare_runs(label, model.records, res.records, report)
