"""The exit-code contract of every command (README, ``hmmirror --help``), one test per failure class of issue 13:

0 ran, nothing found; 1 findings / failed expectations / disagreements; 2 bad input or usage in one line naming
FILE:LINE or the option; 3 an internal error: one line and a crash report on disk, never a traceback; 130
interrupted, with the summary (and --json) so far; 141 a closed output pipe, quietly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmmirror.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE), str(ROOT / "tests" / "sim")])}


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def hm(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hmmirror.cli.main", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def one_line(code: int, err: str, want: int = 2) -> str:
    assert code == want, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- help

def test_bare_hmmirror_prints_the_help_and_exits_0() -> None:
    r = hm()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: hmmirror") and "Commands:" in r.stdout
    assert "fuzz" in r.stdout and "replay" in r.stdout
    assert r.stderr == ""


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["fuzz", "--help"], ["run", "--help"], ["crosscheck", "--help"], ["replay", "--help"]):
        code, out, _ = cli(argv, capsys)
        assert code == 0
        text = " ".join(out.split())
        assert "Exit codes: 0 ran, nothing found; 1 findings" in text and "130 interrupted" in text, argv


def test_unknown_option_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["fuzz", "--no-such-option"], capsys)
    assert "--no-such-option" in one_line(code, err)


# ---------------------------------------------------------------------------------------------- fuzz options

@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "-inf", "1e300"])
def test_fuzz_seconds_must_be_positive_and_finite(value: str, capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    code, _, err = cli(["fuzz", "--seconds", value, "--findings", str(tmp_path / "f")], capsys)
    assert "--seconds" in one_line(code, err)


def test_fuzz_findings_must_be_a_writable_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(["fuzz", "--seconds", "1", "--findings", "/dev/null"], capsys)
    assert "--findings /dev/null" in one_line(code, err)
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(["fuzz", "--seconds", "1", "--findings", str(f)], capsys)
    assert "not a directory" in one_line(code, err)
    code, _, err = cli(["fuzz", "--seconds", "1", "--findings", str(f / "sub")], capsys)
    assert "--findings" in one_line(code, err)


@pytest.mark.parametrize("spec, words", [
    ("nosuchmodule_xyz:Driver", "cannot import"),
    ("cli_bad_drivers:Missing", "has no 'Missing'"),
    ("cli_bad_drivers:NOT_A_CLASS", "not a class"),
    ("cli_bad_drivers:a_function", "not a class"),
    ("cli_bad_drivers:NeedsArgs", "constructing NeedsArgs() failed"),
    ("cli_bad_drivers:Explodes", "RuntimeError: no device"),
    ("cli_bad_drivers:NoMethods", "has no bind() method"),
    ("cli_bad_drivers:PlainFault", "must be a generator function"),
    ("cli_bad_drivers:Only52", "supports kernel 5.2, not 6.18"),
    ("no_colon", "package.module:ClassName"),
])
def test_fuzz_bad_driver_is_bad_input_before_the_campaign(spec: str, words: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(HERE))
    try:
        code, out, err = cli(["fuzz", "--seconds", "30", "--driver", spec, "--findings", str(tmp_path / "f"),
                              "--json"], capsys)
    finally:
        sys.path.remove(str(HERE))
    line = one_line(code, err)
    assert "--driver" in line and words in line, line
    assert out == ""                                  # no campaign ran
    assert not (tmp_path / "f").exists()              # nothing written either


def test_fuzz_unknown_kind_and_event(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(["fuzz", "--seconds", "1", "--kinds", "anon,bogus", "--findings", str(tmp_path)], capsys)
    assert "--kinds" in one_line(code, err)
    code, _, err = cli(["fuzz", "--seconds", "1", "--events", "bogus", "--findings", str(tmp_path)], capsys)
    assert "--events" in one_line(code, err)
    code, _, err = cli(["fuzz", "--seconds", "1", "--jobs", "0", "--findings", str(tmp_path)], capsys)
    assert "--jobs" in one_line(code, err)
    code, _, err = cli(["fuzz", "--seconds", "1", "--seed", "-1", "--findings", str(tmp_path)], capsys)
    assert "--seed" in one_line(code, err)


# ---------------------------------------------------------------------------------------------- output paths

def test_replay_output_paths_checked_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["replay", "--seed", "1", "--log", str(tmp_path)], capsys)
    assert "--log" in one_line(code, err) and "is a directory" in err
    code, _, err = cli(["replay", "--seed", "1", "--png", "/missing/dir/x.png"], capsys)
    assert "--png /missing/dir/x.png" in one_line(code, err)
    code, _, err = cli(["replay", "--seed", "1", "--driver", "nosuchmodule_xyz:D"], capsys)
    assert "--driver" in one_line(code, err)
    code, _, err = cli(["replay"], capsys)
    assert "FILE or --seed" in one_line(code, err)


def test_show_and_demo_png_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["demo", "--png", "/missing/dir/x.png"], capsys)
    assert "--png" in one_line(code, err)
    code, _, err = cli(["show", str(ROOT / "examples" / "thp.toml"), "--png", "/missing/dir/x.png"], capsys)
    assert "--png" in one_line(code, err)


def test_png_outputs_are_written_where_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `fuzz --coverage-png` is an output path like the others: a directory is bad input before the campaign,
    # and a name without ".png" is the file written (matplotlib would otherwise write NAME.png -- with "/",
    # a file "/.png")
    code, _, err = cli(["fuzz", "--runs", "1", "--kinds", "anon", "--events", "none", "--findings",
                        str(tmp_path / "f"), "--coverage-png", str(tmp_path)], capsys)
    assert "--coverage-png" in one_line(code, err) and "is a directory" in err
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())
    from hmmirror.sim.coverage import coverage_png
    coverage_png({}, "6.18", str(tmp_path / "cov"))
    assert (tmp_path / "cov").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "cov.png").exists()


# ---------------------------------------------------------------------------------------------- bounds

def test_crosscheck_random_count_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    # `--random 10**30` generated scenarios until killed, silently (host and guest alike)
    for extra in ([], ["--guest"]):
        code, _, err = cli(["crosscheck", "--random", "9" * 30, *extra], capsys)
        assert "--random" in one_line(code, err)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "5", "1e9"])
def test_guest_selftest_timeout_is_finite_and_bounded(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["guest", "selftest", "--timeout", value], capsys)   # nan was a crash report (code 3)
    assert "--timeout" in one_line(code, err)


# ---------------------------------------------------------------------------------------------- 3, 141

def test_internal_error_is_one_line_and_a_crash_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hmmirror.cli.run as run_mod

    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_mod, "run", boom)
    monkeypatch.setenv("HMMIRROR_CRASH_DIR", str(tmp_path / "crashes"))
    code, out, err = cli(["run", str(ROOT / "examples" / "thp.toml")], capsys)
    line = one_line(code, err, want=3)
    assert "internal error: ZeroDivisionError: a bug" in line
    reports = list((tmp_path / "crashes").iterdir())
    assert len(reports) == 1 and str(reports[0]) in line
    text = reports[0].read_text()
    assert "Traceback" in text and "boom" in text and "argv: ['run'" in text
    assert oct(reports[0].stat().st_mode & 0o777) == "0o644"


def test_closed_output_pipe_ends_quietly() -> None:
    p = subprocess.Popen([sys.executable, "-m", "hmmirror.cli.main", "demo", "--json"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()                              # like `| head` having read what it wanted
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""


# ---------------------------------------------------------------------------------------------- 1

def test_fuzz_findings_exit_1_and_clean_run_exit_0(tmp_path: Path) -> None:
    bad = hm("fuzz", "--runs", "60", "--json", "--findings", str(tmp_path / "a"), "--driver",
             "sim_toy_drivers:ShortMirror", "--kinds", "anon", "--events", "none")
    assert bad.returncode == 1, bad.stderr[-2000:]
    doc = json.loads(bad.stdout)
    assert doc["findings"] and doc["generated"] == 60 and doc["interrupted"] is False
    # a clean run: the drm_gpusvm-style built-in driver (lib/test_hmm.c's dmirror, the default, has real
    # behaviours a run may reach: M2-M6 of docs/known-behaviours.md, migrated pages mapped without a sequence)
    good = hm("fuzz", "--runs", "20", "--json", "--findings", str(tmp_path / "b"), "--kinds", "anon",
              "--events", "none", "--scheduler", "random", "--driver", "gpusvm")
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout)["findings"] == []


def test_replay_shows_the_saved_finding_of_a_multi_finding_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a run can break several invariants (the 5.2 PUD-lock runs give sleep_in_atomic, recursive_lock and
    # deadlock at once); replaying the deadlock's reproducer must show the deadlock, and the others as "also"
    import hmmirror.sim.replay as replay_mod
    from hmmirror.sim.findings import Finding

    repro = ROOT / "docs" / "sim-reproducers" / "sleep-in-atomic-hmm-invalidate-range-end-376317d3.toml"
    real = replay_mod.replay_file(str(repro))
    saved = real.expected["signature"]
    first = Finding("recursive_lock", "the first one", 1, "t0", location="x.y")

    class Two:
        result = real.result
        expected = real.expected
        reproduced = True

    real.result.findings[:0] = [first]                 # the saved finding is no longer the run's first
    real.result.finding = first
    monkeypatch.setattr(replay_mod, "replay_file", lambda *a, **k: Two)
    code, out, _ = cli(["replay", str(repro), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["finding"]["signature"] == saved
    assert [x["signature"] for x in doc["also"]] == [first.signature]
    code, out, _ = cli(["replay", str(repro)], capsys)
    assert f"also: [recursive_lock] {first.signature}" in out and f"reproduced: {saved}" in out
