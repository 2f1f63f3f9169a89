"""The page-table view (hmmirror show / demo): tree structure, run compression, picture."""

from __future__ import annotations

from pathlib import Path

from hmmirror import Machine
from hmmirror.machine import ThpSettings
from hmmirror.viz.pagetables import collect, draw, levels_of, render_tree, summary


def _leaves(view):  # type: ignore[no-untyped-def]
    return [(n.level, n.entry, n.kind, n.count) for n in view.leaves()]


def test_scenario_view_compresses_zero_page_ptes() -> None:
    # §9 A2: reading every page of anon private memory maps the zero page (one pfn) read-only.
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(2 << 20, "rw", align=2 << 20)
    p.touch(a, 64 << 10)
    v = collect(p.mm, a, a + (2 << 20), "buf")
    assert v.levels == ("pgd", "pud", "pmd", "pte")                  # 4-level: P4D folded (§1.1)
    assert _leaves(v) == [("pte", "leaf", "zero", 16), ("pte", "none", "none", 496)]
    run = v.leaves()[0]
    assert run.write is False and run.pfn == run.pfn_last                # one pfn, repeated
    assert summary(v) == {"pgd:table": 1, "pmd:table": 1, "pte:zero": 16, "pud:table": 1}
    doc = v.to_json()
    assert doc["start"] == hex(a) and doc["tree"][0]["level"] == "pgd" and doc["vmas"][0]["kind"] == "anon"


def test_scenario_view_shows_a_pmd_leaf() -> None:
    # §5.2/§5.4: THP enabled=always, write fault in an aligned 2 MiB block -> anon THP mapped by a PMD.
    m = Machine("6.18", ram=256 << 20, thp=ThpSettings(enabled="always"))
    p = m.spawn("p")
    a = p.mmap(4 << 20, "rw", align=2 << 20)
    p.touch(a, 4096, write=True)
    v = collect(p.mm, a, a + (4 << 20))
    leaves = v.leaves()
    assert [(n.level, n.entry, n.kind) for n in leaves] == [("pmd", "leaf", "anon"), ("pmd", "none", "none")]
    assert leaves[0].huge and leaves[0].write and leaves[0].end - leaves[0].start == 2 << 20
    from rich.console import Console
    con = Console(record=True, width=120)
    con.print(render_tree(v))
    text = con.export_text()
    assert "pmd[" in text and "huge" in text and "anon" in text


def test_scenario_view_five_level_paging_has_p4d() -> None:
    assert [n for n, _ in levels_of(5)] == ["pgd", "p4d", "pud", "pmd", "pte"]   # §1.1
    m = Machine("6.18", ram=256 << 20, paging=5)
    p = m.spawn("p")
    a = p.mmap(8192, "rw")
    p.touch(a, 8192, write=True)
    v = collect(p.mm, a, a + 8192)
    assert v.levels == ("pgd", "p4d", "pud", "pmd", "pte")
    assert _leaves(v) == [("pte", "leaf", "anon", 2)]
    assert [n.level for n in v.nodes] == ["pgd"] and v.nodes[0].children[0].level == "p4d"


def test_scenario_view_picture(tmp_path: Path) -> None:
    m = Machine("6.18", ram=256 << 20, thp=ThpSettings(enabled="always"))
    p = m.spawn("p")
    a = p.mmap(4 << 20, "rw", align=2 << 20)
    p.touch(a, 4096, write=True)
    p.touch(a + (2 << 20), 64 << 10)
    out = tmp_path / "t.png"
    draw([collect(p.mm, a, a + (4 << 20), "buf"), collect(p.mm, a, a + (2 << 20))], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
