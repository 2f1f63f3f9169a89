"""Campaign lifecycle: signals end the whole process tree, Ctrl-C/SIGTERM give the summary and exit code 130,
``--runs N`` is exactly reproducible whatever ``--jobs``, a campaign resumes its seed sequence, reproducers
are readable files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "sim")])}
TOY = ["--driver", "sim_toy_drivers:ShortMirror", "--kinds", "anon", "--events", "none"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), rest[0]


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ps = _ppid_and_state(int(name))
            if ps is not None:
                children.setdefault(ps[0], []).append(int(name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    ps = _ppid_and_state(pid)
    return ps is not None and ps[1] not in ("Z", "X")


def _foreground_signals() -> None:
    """The child's SIGINT as a terminal's foreground job has it: a suite run from a background shell
    inherits SIGINT ignored (bash ignores it for `&` jobs), and the program rightly keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], set[int]]:
    p = subprocess.Popen([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--seconds", "120", "--jobs", "2",
                          "--json", "--findings", str(tmp_path / "f"), *extra], env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_foreground_signals)
    end = time.monotonic() + 60
    kids: set[int] = set()
    while time.monotonic() < end and len(kids) < 2:
        time.sleep(0.2)
        kids = descendants(p.pid)
        assert p.poll() is None, p.communicate()
    assert len(kids) >= 2, "the workers did not start"
    # let them work a little: CPU seconds, not wall seconds, so a loaded machine gives the same work
    end = time.monotonic() + 120
    while time.monotonic() < end and sum(cpu_seconds(k) for k in kids) < 4.0:
        time.sleep(0.2)
        assert p.poll() is None, p.communicate()
    return p, kids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return 0.0
    rest = text[text.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def wait_gone(pids: set[int], seconds: float = 10) -> set[int]:
    end = time.monotonic() + seconds
    left = {q for q in pids if alive(q)}
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = {q for q in left if alive(q)}
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_with_summary(tmp_path: Path, sig: int) -> None:
    p, kids = start(tmp_path)
    t0 = time.monotonic()
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert p.returncode == 130, err[-2000:]
    doc = json.loads(out)                              # --json still printed
    assert doc["interrupted"] is True and doc["runs"] > 0
    assert "interrupted" in err and "Traceback" not in err
    assert not wait_gone(kids), "workers survived their parent"


def test_sigkill_of_the_parent_leaves_no_worker(tmp_path: Path) -> None:
    p, kids = start(tmp_path)
    p.kill()
    p.communicate(timeout=30)
    assert not wait_gone(kids), "workers survived their parent (reparented to init)"


def _fuzz(tmp_path: Path, name: str, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--json", "--findings",
                        str(tmp_path / name), *extra], env=ENV, text=True, capture_output=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return json.loads(r.stdout)


def test_runs_is_exact_and_independent_of_jobs(tmp_path: Path) -> None:
    a = _fuzz(tmp_path, "a", "--runs", "80", "--seed", "4", "--jobs", "1", *TOY)
    b = _fuzz(tmp_path, "b", "--runs", "80", "--seed", "4", "--jobs", "2", *TOY)
    assert a["generated"] == b["generated"] == 80
    sigs_a = sorted((f["invariant"], f["seed"], os.path.basename(f["reproducer"])) for f in a["findings"])
    sigs_b = sorted((f["invariant"], f["seed"], os.path.basename(f["reproducer"])) for f in b["findings"])
    assert sigs_a and sigs_a == sigs_b
    assert a["steps"] == b["steps"] and a["runs"] == b["runs"]
    for f in (tmp_path / "a").glob("*.toml"):
        assert f.stat().st_mode & 0o777 == 0o644, f          # readable reproducers
        assert (tmp_path / "b" / f.name).read_text() == f.read_text().replace(str(tmp_path / "a"),
                                                                               str(tmp_path / "b"))


def test_resume_continues_the_seed_sequence(tmp_path: Path) -> None:
    from hmmirror.sim.fuzz import Config, load_state

    args = ("--runs", "100", "--scheduler", "random", "--kinds", "anon", "--events", "none", "--seed", "9")
    first = _fuzz(tmp_path, "f", *args)
    cfg = Config(kernel="6.18", scheduler="random", seed=9, kinds=("anon",), events=(), findings_dir=str(tmp_path / "f"))
    nxt1, _ = load_state(cfg)
    assert first["generated"] == 100 and nxt1 == 1          # one seeded unit of 100 runs
    second = _fuzz(tmp_path, "f", *args)
    nxt2, _ = load_state(cfg)
    assert second["generated"] == 100 and nxt2 == 2          # unit 1: new seeds, not a repeat
    assert first["steps"] != second["steps"]
    again = _fuzz(tmp_path, "g", *args)                      # a fresh directory starts at unit 0 ...
    assert again["steps"] == first["steps"]
    fresh = _fuzz(tmp_path, "f", *args, "--fresh")           # ... and so does --fresh
    assert fresh["steps"] == first["steps"]


def test_sigkill_of_a_dask_campaign_leaves_no_process(tmp_path: Path) -> None:
    # --dask local:N starts the cluster's processes (workers, multiprocessing's resource tracker) under the
    # campaign: a SIGKILL of the campaign must take them all with it
    pytest.importorskip("distributed")
    p = subprocess.Popen([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--seconds", "300", "--dask", "local:2",
                          "--json", "--findings", str(tmp_path / "f"), *TOY], env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kids: set[int] = set()
    end = time.monotonic() + 120
    while time.monotonic() < end:          # the workers started and ran units (CPU seconds, not wall seconds)
        time.sleep(0.3)
        assert p.poll() is None, p.communicate()
        kids |= descendants(p.pid)
        if len(kids) >= 3 and sum(cpu_seconds(k) for k in kids) > 2.0:
            break
    assert len(kids) >= 2, f"the cluster did not start: {kids}"
    p.kill()
    p.communicate(timeout=30)
    left = wait_gone(kids | descendants(p.pid), 30)
    assert not left, [open(f"/proc/{q}/cmdline").read().replace("\0", " ")[:120] for q in left if alive(q)]
