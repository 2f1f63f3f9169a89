"""Saved reproducers of real kernel behaviour re-trigger their violation (issue: "replaying any saved
reproducer re-triggers its violation"); the reproducers of model bugs that were fixed no longer do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hmmirror.sim.replay import replay_file

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sim-reproducers"
# reproducers found with the toy drivers of tests/sim/sim_toy_drivers.py name them as
# ``sim_toy_drivers:Class`` (their header says: tests/sim on PYTHONPATH); --import-mode=importlib adds nothing
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
KEPT = sorted(DOCS.glob("*.toml"))
FIXED = sorted((DOCS / "fixed").glob("*.toml"))


@pytest.mark.parametrize("path", KEPT, ids=[p.stem for p in KEPT])
def test_reproducer_retriggers(path: Path) -> None:
    rep = replay_file(str(path))
    assert rep.expected is not None
    assert rep.reproduced, rep.result.finding


@pytest.mark.parametrize("path", FIXED, ids=[p.stem for p in FIXED])
def test_fixed_model_bug_stays_fixed(path: Path) -> None:
    rep = replay_file(str(path))
    assert not rep.reproduced
