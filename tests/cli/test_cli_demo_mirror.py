"""``hmmirror demo --json``: the mirror half (hmm-5.2.md §1.4, §7, §8; hmm-modern.md §6.4, §7 derived DAX bytes)."""

from __future__ import annotations

import json

import pytest

from hmmirror.cli.main import main


def _demo(capsys: pytest.CaptureFixture[str], kernel: str) -> dict:  # type: ignore[type-arg]
    with pytest.raises(SystemExit) as ex:
        main(["demo", "--json", "--kernel", kernel])
    assert ex.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_demo_52_mirror_carries_cpu_pfns_and_balances_pgmap(capsys: pytest.CaptureFixture[str]) -> None:
    d = _demo(capsys, "5.2")
    assert {"mirror", "pgmap_refs", "vmas", "page_tables"} <= set(d)
    # §8: every get_dev_pagemap reference taken during the walk is put again
    assert d["pgmap_refs"]["before"] == d["pgmap_refs"]["after"]
    ranges = {m["range"]: m for m in d["mirror"]}
    assert set(ranges) == {"fsdax_pte", "fsdax_pmd", "devdax_pud", "devdax_pud+512M"}
    for m in d["mirror"]:
        assert m["ret"] == len(m["pfns"])                     # §9.2: (last - start) >> 12 pages
        for raw, cpu in zip(m["pfns"], m["cpu"]):
            # §1.4 with flags = [1<<0, 1<<1, 1<<2], pfn_shift 12: (pfn << 12) | VALID [| WRITE per the CPU entry]
            want = (int(cpu["pfn"], 16) << 12) | 1 | (2 if cpu["write"] else 0)
            assert int(raw, 16) == want
            assert cpu["kind"] == "devmap"
    assert ranges["devdax_pud+512M"]["cpu"][0]["level"] == "pud"


def test_demo_modern_snapshot_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    d = _demo(capsys, "6.x")
    ranges = {m["range"]: m for m in d["mirror"]}
    # hmm-modern.md §7 derived: fsdax PTE read-only 0x01, fsdax PMD read-only 0x05, device-dax PUD rw 0x0A
    assert set(ranges["fsdax_pte"]["snapshot"]) == {0x01}
    assert set(ranges["fsdax_pmd"]["snapshot"]) == {0x05}
    assert set(ranges["devdax_pud"]["snapshot"]) == {0x0A}
    # §3: order bits 9 for PMD leaves, 18 for PUD leaves
    assert {e["order"] for e in ranges["fsdax_pmd"]["entries"]} == {9}
    assert {e["order"] for e in ranges["devdax_pud+512M"]["entries"]} == {18}
    assert d["pgmap_refs"]["before"] == d["pgmap_refs"]["after"]   # 6.18 takes no pgmap references
