"""Campaign work outside the runs, made cheaper without changing what it computes: the signatures of a
findings directory (read again by every unit) and the BLAS thread count of the steering fit."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tomllib

from hmmirror.sim.fuzz import known_signatures
from hmmirror.sim.scenario import SimScenario

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parsed(path: str) -> tuple[str, tuple[int, int]]:
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    sc = SimScenario.from_doc(doc)
    return doc["finding"]["signature"], (sc.size(), sum(int(n) for _t, n in (sc.schedule or [])))


def test_known_signatures_follow_the_files_as_they_change(tmp_path):
    files = sorted(glob.glob(os.path.join(ROOT, "docs", "sim-reproducers", "*.toml")))[:4]
    assert len(files) == 4
    for f in files:
        shutil.copy(f, tmp_path)
    (tmp_path / "damaged.toml").write_text("[finding\nsignature = 'x'\n")
    (tmp_path / ".tmp-pending.toml").write_bytes(open(files[0], "rb").read())
    want: dict[str, tuple[int, int]] = {}
    for sig, size in map(_parsed, files):            # two files of one signature: the smaller one counts
        want[sig] = min(want.get(sig, size), size)
    assert known_signatures(str(tmp_path)) == want
    assert known_signatures(str(tmp_path)) == want          # the second read (remembered contents) agrees

    # a file rewritten with another signature and a longer schedule is read as it is now
    first = tmp_path / os.path.basename(files[0])
    old_sig = _parsed(files[0])[0]
    text = first.read_text().replace(old_sig, "made_up|mm.nowhere.fn|-")
    first.write_text(text)
    got = known_signatures(str(tmp_path))
    assert old_sig not in got or any(_parsed(f)[0] == old_sig for f in files[1:])
    assert got["made_up|mm.nowhere.fn|-"] == _parsed(str(first))[1]
    first.unlink()
    assert "made_up|mm.nowhere.fn|-" not in known_signatures(str(tmp_path))


def test_blas_runs_one_thread_unless_the_user_chose():
    code = "import hmmirror, os; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", out.stderr
    env["OPENBLAS_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2", out.stderr


def test_units_run_with_their_gc_thresholds_and_compute_the_same(monkeypatch, tmp_path):
    """A unit runs with :data:`fuzz.UNIT_GC_THRESHOLDS` (restored afterwards) and does exactly what it does with
    Python's default thresholds: only when garbage is collected differs."""
    import gc

    from hmmirror.sim import fuzz

    seen = []
    orig = fuzz._seeded_run

    def spy(*a, **k):
        seen.append(gc.get_threshold())
        return orig(*a, **k)

    monkeypatch.setattr(fuzz, "_seeded_run", spy)
    cfg = fuzz.Config(kernel="5.2", seconds=60, seed=4711, jobs=1, findings_dir=str(tmp_path / "f"))
    unit = next(u for u in range(8) if fuzz.unit_kind(cfg, u) != "hypothesis")
    before = gc.get_threshold()
    out = [fuzz.run_unit(cfg, unit, 12, frozenset(), float("inf"), str(tmp_path / "a"))]
    assert gc.get_threshold() == before
    assert seen and all(t == fuzz.UNIT_GC_THRESHOLDS for t in seen)
    monkeypatch.setattr(fuzz, "UNIT_GC_THRESHOLDS", (700, 10, 10))
    out.append(fuzz.run_unit(cfg, unit, 12, frozenset(), float("inf"), str(tmp_path / "b")))
    a, b = ({"runs": o.runs, "steps": o.steps, "hits": o.hits, "findings": sorted(o.findings),
             "search": o.search} for o in out)
    assert a["runs"] == 12 and a["steps"] > 0
    assert a == b
