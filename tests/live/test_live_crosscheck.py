"""The differential runner: pfn-class comparison, random scenario determinism, and a real end-to-end run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hmmirror.include.pagestate import PageState
from hmmirror.live import hostenv
from hmmirror.live.crosscheck import Report, _PfnClasses, compare_pages
from hmmirror.live.randscen import random_scenario

sys.path.insert(0, str(Path(__file__).parent))
from livecheck import both, quiet  # noqa: E402


def _page(addr: int, pfn: int | None, kind: str = "anon", zero: bool = False) -> PageState:
    present = pfn is not None
    return PageState(addr, present, pfn, kind if present else "none", "pte" if present else None, None,
                     zero, False, False, present and not zero, False, False)


def test_pfn_classes_compare_sharing_not_numbers() -> None:
    # two pages sharing one frame on one side must share one on the other; numbers themselves differ
    model = [_page(0, 10), _page(4096, 10), _page(8192, 11)]
    real = [_page(0, 900), _page(4096, 900), _page(8192, 901)]
    rep = Report()
    compare_pages("s", 0, model, real, rep, _PfnClasses(), _PfnClasses(), None)
    assert rep.agree == 3 and rep.disagreements == []
    bad = [_page(0, 900), _page(4096, 901), _page(8192, 902)]
    rep2 = Report()
    compare_pages("s", 0, model, bad, rep2, _PfnClasses(), _PfnClasses(), None)
    # only page 1 differs (shared on one side, not on the other); page 2 is a page of its own on both
    assert [d.page for d in rep2.disagreements] == [1]
    assert {d.field for d in rep2.disagreements} == {"pfn_class"}


def test_unknown_real_fields_are_not_compared() -> None:
    m = [_page(0, 5)]
    r = [PageState(0, True, 77, "anon", "pte", None, False, False, False, None, False, None)]
    rep = Report()
    compare_pages("s", 0, m, r, rep, _PfnClasses(), _PfnClasses(), None)
    assert "exclusive" not in rep.by_field and "write" not in rep.by_field


def test_random_scenarios_are_deterministic() -> None:
    assert random_scenario(1, 3) == random_scenario(1, 3)
    assert random_scenario(1, 3) != random_scenario(2, 3)


@pytest.mark.live
@pytest.mark.xdist_group("host")
@pytest.mark.skipif(hostenv.why_not_live() is not None or not hostenv.is_root(),
                    reason="needs root and a readable /proc/self/pagemap")
def test_anon_write_read_agrees_with_kernel() -> None:
    # A2/A3 (mm-substrate.md §9): the model and this kernel agree on every page of this scenario
    text = """
[machine]
kernel = "6.18"
[[op]]
op = "mmap"
as = "b"
length = "64K"
prot = "rw"
flags = ["private", "anonymous"]
[[op]]
op = "touch"
addr = "b"
length = "32K"
access = "read"
[[op]]
op = "touch"
addr = "b+32K"
length = "16K"
access = "write"
[[op]]
op = "inspect"
addr = "b"
length = "64K"
"""
    _model, _real, rep = both(text, "anon.toml")
    assert rep.pages == 16
    assert rep.disagreements == [], rep.disagreements


@pytest.mark.live
@pytest.mark.xdist_group("host")
@pytest.mark.skipif(hostenv.why_not_live() is not None or not hostenv.is_root(),
                    reason="needs root and a readable /proc/self/pagemap")
def test_hmmirror_live_reads_what_crosscheck_reads(capsys: pytest.CaptureFixture[str]) -> None:
    # `hmmirror live PID START END` and the differential runner's inspection read the same process alike
    import json

    from hmmirror.cli.main import main
    from hmmirror.live.executor import LiveExecutor

    ops = [{"op": "mmap", "as": "b", "length": "2M", "prot": "rw", "flags": ["private", "anonymous"]},
           {"op": "touch", "addr": "b", "length": "64K", "access": "read"},
           {"op": "touch", "addr": "b+64K", "length": "64K", "access": "write"},
           {"op": "inspect", "addr": "b", "length": "256K"}]

    def run() -> tuple[list, list]:
        with LiveExecutor(("p",)) as ex:
            inspected = ex.run(ops)[-1].pages
            start = ex.names["b"].addr
            with pytest.raises(SystemExit) as exit_:
                main(["live", str(ex.procs["p"].pid), hex(start), hex(start + (256 << 10)), "--json"])
            assert exit_.value.code == 0
        return inspected, json.loads(capsys.readouterr().out)["pages"]

    inspected, live = quiet(run)               # a page migrated between the two reads changes its pfn
    assert [p.to_json() for p in inspected] == live
    assert [p["kind"] for p in live[:16]] == ["zero"] * 16 and [p["kind"] for p in live[16:32]] == ["anon"] * 16


def test_a_freed_and_reused_frame_is_a_new_page() -> None:
    # runner error: the real kernel reuses a frame freed by an earlier op for another page; the model
    # does not.  A pfn no inspect of the previous round showed is a new page on both sides.
    rep = Report()
    mcls, rcls = _PfnClasses(), _PfnClasses()
    compare_pages("s", 0, [_page(0, 10), _page(4096, 11)], [_page(0, 900), _page(4096, 901)], rep, mcls, rcls, None)
    for c in (mcls, rcls):
        c.begin_round()                                    # op 1: DONTNEED of page 0
    compare_pages("s", 2, [_page(0, None), _page(4096, 11)], [_page(0, None), _page(4096, 901)], rep, mcls,
                  rcls, None)
    for c in (mcls, rcls):
        c.begin_round()                                    # op 3: touch page 0 again: the kernel reuses 900
    compare_pages("s", 4, [_page(0, 12), _page(4096, 11)], [_page(0, 900), _page(4096, 901)], rep, mcls, rcls,
                  None)
    assert rep.disagreements == []
    # a page still in view keeps its identity: the same frame at another place is the same page
    for c in (mcls, rcls):
        c.begin_round()
    compare_pages("s", 6, [_page(0, 11), _page(4096, 11)], [_page(0, 901), _page(4096, 900)], rep, mcls, rcls,
                  None)
    assert [(d.page, d.field) for d in rep.disagreements] == [(1, "pfn_class")]


def test_one_page_missing_on_one_side_shifts_no_other_class() -> None:
    # classes are named by first position, so a page only one side maps does not rename later pages
    rep = Report()
    compare_pages("s", 0, [_page(0, 10), _page(4096, 11)], [_page(0, None), _page(4096, 901)], rep,
                  _PfnClasses(), _PfnClasses(), None)
    assert {d.field for d in rep.disagreements if d.page == 1} == set()


def test_a_round_that_shows_no_page_forgets_every_frame() -> None:
    # runner error (--random 200 --seed 31337 scenario 133, --seed 20261205 scenario 26): DONTNEED (or a
    # truncate) unmapped every page, the next inspects showed nothing, and the model's allocator handed the
    # freed frames back for new pages (LIFO) while the kernel took other frames: both are new pages
    rep = Report()
    mcls, rcls = _PfnClasses(), _PfnClasses()
    compare_pages("s", 0, [_page(0, 10), _page(4096, 11)], [_page(0, 900), _page(4096, 901)], rep, mcls, rcls, None)
    for c in (mcls, rcls):
        c.begin_round()                                    # op 1: DONTNEED of both pages
    compare_pages("s", 2, [_page(0, None), _page(4096, None)], [_page(0, None), _page(4096, None)], rep, mcls,
                  rcls, None)
    for c in (mcls, rcls):
        c.begin_round()                                    # op 3: write both pages again
    compare_pages("s", 4, [_page(0, 11), _page(4096, 10)], [_page(0, 950), _page(4096, 951)], rep, mcls, rcls,
                  None)
    assert rep.disagreements == []
    # a round without any inspect forgets nothing: the frames keep their names
    for c in (mcls, rcls):
        c.begin_round()
        c.begin_round()
    compare_pages("s", 6, [_page(0, 11), _page(4096, 10)], [_page(0, 950), _page(4096, 951)], rep, mcls, rcls,
                  None)
    assert rep.disagreements == []


def test_quiet_run_repeats_a_disturbed_run_and_gives_up_saying_host_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    # a live run during which the kernel migrated or reclaimed pages on its own is not evidence: run again
    readings = iter([{"pgmigrate_success": 1}, {"pgmigrate_success": 4},     # run 1: compaction moved pages
                     {"pgmigrate_success": 4}, {"pgmigrate_success": 4}])    # run 2: quiet
    monkeypatch.setattr(hostenv, "host_activity", lambda: next(readings))
    runs: list[int] = []
    assert hostenv.quiet_run(lambda: runs.append(len(runs)) or len(runs)) == 2
    ticks = iter(range(100))
    monkeypatch.setattr(hostenv, "host_activity", lambda: {"compact_isolated": next(ticks)})
    with pytest.raises(hostenv.Unavailable) as ei:
        hostenv.quiet_run(lambda: None, attempts=3)
    assert ei.value.reason.startswith(hostenv.HOST_BUSY) and "compact_isolated +1" in ei.value.reason


@pytest.mark.skipif(hostenv.why_not_live() is not None, reason="needs /proc/vmstat of a Linux host")
def test_host_activity_reads_the_kernels_counters() -> None:
    seen = hostenv.host_activity()
    assert {"pgmigrate_success", "compact_isolated", "pgscan_kswapd"} <= set(seen)
    assert set(seen) <= set(hostenv.ACTIVITY_COUNTERS) | {"khugepaged_pages_collapsed"}
    assert hostenv.activity_between(seen, dict(seen)) == {}
