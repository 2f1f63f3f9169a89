"""Helpers shared by the host live tests: run on a quiet host, run a scenario on both sides.

A live run the host kernel disturbed on its own (compaction, reclaim: :func:`hmmirror.live.hostenv.quiet_run`)
is repeated; a test whose runs were all disturbed is skipped with that reason, never passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import pytest

from hmmirror.live import hostenv
from hmmirror.live.crosscheck import Report, crosscheck_scenario
from hmmirror.scenario import schema

T = TypeVar("T")


def quiet(run: Callable[[], T]) -> T:
    """``run()`` on a quiet host (:func:`hostenv.quiet_run`); skip the test when the host never was."""
    try:
        return hostenv.quiet_run(run)
    except hostenv.Unavailable as exc:
        if exc.reason.startswith(hostenv.HOST_BUSY):
            pytest.skip(exc.reason)
        raise


def both(text: str, name: str = "scenario.toml") -> tuple[list, list, Report]:
    """Run ``text`` on both sides: (model records, real records, report).  Skipped only when the host was
    never quiet (the reason is printed); any other skip or a model crash fails the test."""
    rep = Report()
    res = crosscheck_scenario(schema.parse(text, name), rep)
    busy = [why for _name, why in rep.skipped if why.startswith(hostenv.HOST_BUSY)]
    if busy and len(busy) == len(rep.skipped):
        pytest.skip(busy[0])
    assert rep.skipped == [] and rep.crashes == [], (rep.skipped, rep.crashes)
    assert res is not None
    model, real = res
    return model.records, real, rep


def disagreements(rep: Report) -> list[tuple]:
    """(op index, page, field, model value, real value) of every disagreement."""
    return [(d.op_index, d.page, d.field, d.model, d.real) for d in rep.disagreements]


def fill(text: str, **fields: object) -> str:
    """``text`` with every ``{name}`` replaced by ``fields[name]`` (the braces of TOML inline tables stay)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]), text)
