"""Scale-out on Dask distributed: a campaign on a local cluster of 2 workers finds the same signatures, makes the
same runs and writes the same reproducers (deduplicated into one directory) as the same seed run locally."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hmmirror.sim.dask import DaskExecutor  # noqa: E402
from hmmirror.sim.fuzz import Config, run_campaign  # noqa: E402


def test_dask_campaign_matches_the_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the workers are new processes: they find the toy driver through PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def cfg(d: str) -> Config:
        return Config(kernel="6.18", driver="sim_toy_drivers:ShortMirror", findings_dir=str(tmp_path / d),
                      runs=80, seed=11, kinds=("anon",), events=(), jobs=1)

    local = run_campaign(cfg("local"))
    dask = run_campaign(cfg("dask"), executor=DaskExecutor.factory("local:2"))
    assert not dask["errors"], dask["errors"]
    assert local["generated"] == dask["generated"] == 80
    sigs = sorted(f["signature"] for f in local["findings"])
    assert sigs, "the broken toy driver must be found"
    assert sigs == sorted(f["signature"] for f in dask["findings"])
    assert (local["runs"], local["steps"]) == (dask["runs"], dask["steps"])
    names = sorted(p.name for p in (tmp_path / "local").glob("*.toml"))
    assert names == sorted(p.name for p in (tmp_path / "dask").glob("*.toml"))
    assert len(names) == len(sigs)                      # one reproducer per signature, in one directory
    for n in names:
        a = (tmp_path / "local" / n).read_text().replace(str(tmp_path / "local"), "D")
        b = (tmp_path / "dask" / n).read_text().replace(str(tmp_path / "dask"), "D")
        assert a == b
