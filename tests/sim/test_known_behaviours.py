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


def _sigs(path: str) -> set[str]:
    rep = replay_file(str(DOCS / path))
    assert not rep.result.diverged, rep.result.diverged
    return {f.signature for f in rep.result.findings}


def test_b1_and_the_snapshot_form_of_b11_have_signatures_of_their_own():
    """Both commit a pfn the CPU does not map (coherence at the hmm.rst driver's commit).  B1's snapshot was
    right when taken and an invalidation of the page ran after it began (the driver was told: commit_invalid
    too); B11's walk reported pfn 0 + k for a none hugetlb entry and no invalidation ran at all."""
    b1 = _sigs("sim-reproducers/coherence-commit-194d3eea.toml")
    b11 = _sigs("known-behaviours/5.2-hugetlb-none-entry-valid-snapshot.toml")
    commit = "drivers.hmm_mirror_v5_2.HmmMirrorDriver52.commit"
    assert b1 == {f"coherence|{commit}|commit", f"commit_invalid|{commit}|-"}, b1
    assert b11 == {f"coherence|{commit}|walk"}, b11
