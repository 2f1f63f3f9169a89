"""``hmmirror run``: exit codes, one-line errors, the JSON record shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmmirror.cli.main import main

ROOT = Path(__file__).resolve().parents[2]

GOOD = '''
[machine]
ram = "256M"

[[op]]
op = "mmap"
as = "buf"
length = "16K"

[[op]]
op = "touch"
addr = "buf"
length = "16K"
access = "write"

[[op]]
op = "inspect"
addr = "buf"
# mm-substrate.md §9 A3: writing every page gives distinct exclusive anon pages, writable
expect = { ret = 4, pages = [ { range = "all", kind = "anon", write = true, exclusive = true } ] }
'''


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def write(tmp_path: Path, text: str, name: str = "s.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def one_line_error(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_cli_run_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["run", write(tmp_path, GOOD)], capsys)
    assert code == 0 and err == ""
    assert "all met" in out and "inspect" in out


def test_cli_run_json_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["run", "--json", write(tmp_path, GOOD)], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True and doc["kernel"] == "6.18"
    recs = doc["records"]
    assert [r["op"] for r in recs] == ["mmap", "touch", "inspect"]
    for r in recs:
        assert {"index", "op", "proc", "ok", "ret", "errno"} <= set(r)
    assert recs[0]["ret"].startswith("0x") and recs[1]["ret"] == 4
    assert recs[2]["expect_ok"] is True and len(recs[2]["pages"]) == 4
    assert set(recs[2]["pages"][0]) >= {"addr", "present", "pfn", "kind", "level", "write", "huge"}


def test_cli_run_json_several_files_and_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, GOOD)
    code, out, _ = cli(["run", "--json", "--kernel", "5.2", f, f], capsys)
    doc = json.loads(out)
    assert code == 0 and isinstance(doc, list) and [d["kernel"] for d in doc] == ["5.2", "5.2"]


def test_cli_run_failed_expectation_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["run", write(tmp_path, GOOD.replace("ret = 4", "ret = 5"))], capsys)
    assert code == 1 and "ret: expected 5, got 4" in out


def test_cli_run_malformed_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, '[machine]\nram = "256M"\n[[op]\nop = "mmap"\n')
    line = one_line_error(*cli(["run", f], capsys)[::2])
    assert f"{f}:3:" in line and "malformed TOML" in line


def test_cli_run_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, GOOD.replace('length = "16K"\n\n[[op]]\nop = "touch"',
                                     'lenght = "16K"\n\n[[op]]\nop = "touch"'))
    line = one_line_error(*cli(["run", f], capsys)[::2])
    assert f"{f}:8:" in line and "'lenght'" in line


def test_cli_run_unaligned_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, GOOD + '\n[[op]]\nop = "mprotect"\naddr = "buf+0x10"\nlength = "4K"\nprot = "r"\n')
    line = one_line_error(*cli(["run", f], capsys)[::2])
    assert "not page aligned" in line and f"{f}:" in line


def test_cli_run_negative_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, GOOD.replace('length = "16K"\n\n[[op]]\nop = "touch"',
                                     'length = "-16K"\n\n[[op]]\nop = "touch"'))
    line = one_line_error(*cli(["run", f], capsys)[::2])
    assert "negative length" in line and f"{f}:8:" in line


def test_cli_run_range_outside_address_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, '[[op]]\nop = "inspect"\naddr = 0x800000000000\nlength = "4K"\n')
    line = one_line_error(*cli(["run", f], capsys)[::2])
    assert "outside the user address space" in line


def test_cli_run_unknown_option_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, GOOD)
    assert "--bogus" in one_line_error(*cli(["run", "--bogus", f], capsys)[::2])
    assert "cannot read" in one_line_error(*cli(["run", str(tmp_path / "none.toml")], capsys)[::2])
    assert one_line_error(*cli(["run"], capsys)[::2])
    assert "kernel" in one_line_error(*cli(["run", "--kernel", "4.0", f], capsys)[::2])


def test_cli_run_end_to_end_subprocess(tmp_path: Path) -> None:
    """The installed entry point path: a malformed file gives exit 2, one line, no traceback."""
    f = write(tmp_path, 'title = "x"\n[machine\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "hmmirror.cli.main", "run", f], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"hmmirror: error: {f}:2:")
