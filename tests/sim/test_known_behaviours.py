"""Every hand-written scenario of docs/known-behaviours.md shows its behaviour, reported as the table says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hmmirror.sim.replay import replay_file

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| (B\d+|M\d+) \|.*\| \[[^\]]+\]\(([^)]+\.toml)\) \| `([^`]+)`")


def _rows() -> list[tuple[str, str, str]]:
    out = []
    for line in (DOCS / "known-behaviours.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
    return out


def test_the_list_covers_the_behaviours_of_issue_10():
    ids = {r[0] for r in _rows()}
    assert {f"B{i}" for i in range(1, 10)} <= ids


@pytest.mark.parametrize("bid,path,pattern", _rows(), ids=[r[0] for r in _rows()])
def test_scenario_shows_the_behaviour(bid, path, pattern):
    rep = replay_file(str(DOCS / path))
    assert not rep.result.diverged, rep.result.diverged
    # the pattern of the table, ``...`` standing for the rest of the signature
    rx = "^" + re.escape(pattern.split("...")[0]).replace(r"\\\|", r"\|")
    sigs = [f.signature for f in rep.result.findings]
    assert any(re.match(rx, s) for s in sigs), (bid, rx, sigs)
