"""Saved reproducers of real kernel behaviour re-trigger their violation (issue: "replaying any saved
reproducer re-triggers its violation"); the reproducers of model bugs that were fixed no longer do."""

from __future__ import annotations

import re
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
SIMULATOR_MD = DOCS.parent / "simulator.md"


@pytest.fixture(scope="module", autouse=True)
def worked_example_package(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reproducers found with docs/simulator.md's worked example name its driver ``mypkg.mysvm:MySvm`` (their
    header says: the example's mypkg directory on PYTHONPATH): the package is made from the document's code
    block, as a reader would save it."""
    if "mypkg" in sys.modules:
        return
    m = re.search(r"```python\n(# mypkg/mysvm\.py.*?)```", SIMULATOR_MD.read_text(), re.S)
    assert m, "the worked example's code block (# mypkg/mysvm.py) is missing from docs/simulator.md"
    root = tmp_path_factory.mktemp("worked")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "mysvm.py").write_text(m.group(1))
    sys.path.insert(0, str(root))


@pytest.mark.parametrize("path", KEPT, ids=[p.stem for p in KEPT])
def test_reproducer_retriggers(path: Path) -> None:
    rep = replay_file(str(path))
    assert rep.expected is not None
    assert rep.reproduced, rep.result.finding


@pytest.mark.parametrize("path", FIXED, ids=[p.stem for p in FIXED])
def test_fixed_model_bug_stays_fixed(path: Path) -> None:
    rep = replay_file(str(path))
    assert not rep.reproduced
