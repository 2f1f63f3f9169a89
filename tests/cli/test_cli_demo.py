"""``hmmirror demo``: the seed's DAX setting, shown as VMAs and page tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmmirror.cli.main import main


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


@pytest.mark.parametrize("kernel", ["5.2", "6.x"])
def test_cli_demo_json(kernel: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["demo", "--json", "--kernel", kernel], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert {"vmas", "page_tables", "kernel"} <= set(doc)
    assert doc["kernel"] == ("5.2" if kernel == "5.2" else "6.18")
    assert [v["kind"] for v in doc["vmas"]] == ["fsdax", "fsdax", "devdax"]
    # §5.7: misaligned fsdax -> PTEs; aligned -> PMD leaves; §5.8: device-dax align 1G -> one PUD leaf
    sums = [v["summary"] for v in doc["page_tables"]]
    assert sums[0].get("pte:devmap") == 128 and "pmd:devmap" not in sums[0]
    assert sums[1].get("pmd:devmap") == 2
    assert sums[2].get("pud:devmap") == 1


def test_cli_demo_text_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "demo.png"
    code, out, _ = cli(["demo", "--png", str(png)], capsys)
    assert code == 0 and "fsdax_pte" in out and "devdax_pud" in out and "all met" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_demo_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["demo", "--kernel", "4.19"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
