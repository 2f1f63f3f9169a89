"""``hmmirror show``: page tables of a range as a tree, JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmmirror.cli.main import main

SCN = '''
[machine]
ram = "256M"
thp.enabled = "always"

[[process]]
name = "app"

[[op]]
op = "mmap"
as = "buf"
length = "4M"
align = "2M"

[[op]]
op = "touch"
addr = "buf"
length = "4K"
access = "write"

[[op]]
op = "touch"
addr = "buf+2M"
length = "64K"
access = "read"
'''


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


@pytest.fixture
def scn(tmp_path: Path) -> str:
    p = tmp_path / "s.toml"
    p.write_text(SCN)
    return str(p)


def test_cli_show_tree(scn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["show", scn], capsys)
    assert code == 0 and err == ""
    assert "pgd[" in out and "pud[" in out and "pmd[" in out
    assert "huge" in out and "anon" in out             # §5.4: write fault, THP enabled=always -> PMD leaf


def test_cli_show_json(scn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["show", scn, "--proc", "app", "--range", "buf:buf+2M", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and {"vmas", "page_tables", "kernel", "records"} <= set(doc)
    (view,) = doc["page_tables"]
    assert view["end"] == hex(int(view["start"], 16) + (2 << 20))
    assert view["summary"]["pmd:anon"] == 1


def test_cli_show_png(scn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png = tmp_path / "t.png"
    code, out, _ = cli(["show", scn, "--png", str(out_png)], capsys)
    assert code == 0 and out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,word", [
    (["--range", "buf+1M:buf"], "above START"),
    (["--range", "nobody:buf"], "nobody"),
    (["--range", "0x1000:0x900000000000"], "outside"),
    (["--proc", "ghost"], "ghost"),
    (["--bogus"], "--bogus"),
])
def test_cli_show_bad_input(scn: str, argv: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["show", scn, *argv], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and word in err
