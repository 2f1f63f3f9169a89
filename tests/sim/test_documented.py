"""hmmirror.sim.documented follows docs/known-behaviours.md; ``--known DIR`` reads a directory of reproducers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from hmmirror.cli.fuzz import _label_documented
from hmmirror.sim.documented import DOCUMENTED, documented_as
from hmmirror.sim.fuzz import load_known_file

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| (B\d+|M\d+|G\d+) \|.*\| `([^`]+)`")
LINK = re.compile(r"\]\(([^)]+\.toml)\)")
FIXED_BUG = "page_counts|drivers.test_hmm.Dmirror.dmirror_exclusive|-"


def _rows() -> list[tuple[str, str, str | None]]:
    """(id, the reported-as pattern of the row with ``...`` for the rest, the row's reproducer or None)."""
    out = []
    for line in (DOCS / "known-behaviours.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            link = LINK.search(line)
            out.append((m.group(1), m.group(2).replace("\\|", "|"), link.group(1) if link else None))
    return out


def _kernel_of(bid: str) -> str:
    return "5.2" if bid.startswith("B") else "6.18"


def _driver_of(bid: str) -> str:
    return "gpusvm" if bid.startswith("G") else "builtin"


def test_every_reported_row_is_in_the_table_with_its_pattern() -> None:
    rows = _rows()
    ids = {r[0] for r in rows}
    assert {f"B{i}" for i in range(1, 10)} | {f"M{i}" for i in range(2, 8)} <= ids
    for bid, pattern, _ in rows:
        if bid == "B10":                                 # reachable only with --inject: reported as injected
            continue
        sample = pattern.replace("...", "x")
        assert documented_as(sample, _kernel_of(bid), _driver_of(bid)) == bid, (bid, sample)
    assert {d.id for d in DOCUMENTED} == ids - {"B10"}


def test_the_documented_reproducers_are_labelled_with_their_row() -> None:
    """A saved reproducer's finding gets the id of a row that links that file (B9/B12 share one walk)."""
    rows = _rows()
    seen = 0
    for bid, _pattern, link in rows:
        if link is None:
            continue
        doc = tomllib.loads((DOCS / link).read_text())
        if "finding" not in doc:                          # a hand-written scenario without a saved finding
            continue
        got = documented_as(doc["finding"]["signature"], str(doc["machine"]["kernel"]),
                            str(doc.get("sim", {}).get("driver", "builtin")))
        assert got in {r[0] for r in rows if r[2] == link}, (link, got)
        seen += 1
    assert seen >= 10


def test_not_labelled_elsewhere() -> None:
    m2 = "coherence|drivers.test_hmm.DmirrorPageTable.store|commit"
    assert documented_as(m2, "6.18") == "M2" and documented_as(m2, "6.12") == "M2"
    assert documented_as(m2, "5.2") is None              # 5.2 coherence: B1, B11, B13 each have their own
    commit = "coherence|drivers.hmm_mirror_v5_2.HmmMirrorDriver52.commit|"
    assert [documented_as(commit + d, "5.2") for d in ("commit", "walk", "after_end")] == ["B1", "B11", "B13"]
    assert documented_as(m2, "6.18", driver="gpusvm") is None
    assert documented_as(FIXED_BUG, "6.18") is None       # a fixed model bug is never documented behaviour
    assert documented_as("page_counts|kernel.workqueue.worker_thread|-", "6.18") is None


def test_report_labels_findings() -> None:
    result = {"findings": [{"signature": "commit_invalid|drivers.test_hmm.DmirrorPageTable.store|-"},
                           {"signature": FIXED_BUG}]}
    _label_documented(result, "6.18", "builtin")
    assert [f["documented"] for f in result["findings"]] == ["M6", None]


def test_known_directory_reads_the_kept_reproducers_only() -> None:
    known = load_known_file(str(DOCS / "sim-reproducers"))
    kept = {tomllib.loads(p.read_text())["finding"]["signature"] for p in (DOCS / "sim-reproducers").glob("*.toml")}
    assert known == kept and "commit_invalid|drivers.test_hmm.DmirrorPageTable.store|-" in known
    assert FIXED_BUG not in known                        # fixed/ is not read


def test_m2_walk_form() -> None:
    """The OOM reaper's zap of freshly inserted device-private entries (holes migrated to the device), then
    dmirror_migrate_finalize_and_map: M2 with the ``walk`` detail (6.18 campaign seed 5120349)."""
    assert documented_as("coherence|drivers.test_hmm.DmirrorPageTable.store|walk", "6.18") == "M2"
    assert documented_as("coherence|drivers.test_hmm.DmirrorPageTable.store|walk", "6.18", "gpusvm") is None


def test_m4_fault_return_form() -> None:
    """M4's -EFAULT seen by I4 at the fault's return (6.18 campaign seed 5120353: fork, then a dmirror write
    fault over its own read-only device-private pages)."""
    assert documented_as("hmm_range_input|sim.adapters.DmirrorAdapter.fault|-", "6.18") == "M4"
    assert documented_as("hmm_range_input|sim.adapters.DmirrorAdapter.fault|-", "5.2") is None


def test_b5_is_only_its_own_locations() -> None:
    """B5 (a device fault racing exit) is reported where the count check first sees the leaked frames --
    exit_mmap's mmput or the 5.2 driver's next step -- and nowhere else: other page_counts findings (the
    double memory_failure of session 4 at do_mprotect_pkey, the fault-around/truncate race at a driver's
    fault, a kworker) are new, not B5.  benchmarks/search_campaigns.py labels the same signatures B5."""
    import importlib.util

    path = DOCS.parent / "benchmarks" / "search_campaigns.py"
    spec = importlib.util.spec_from_file_location("search_campaigns", path)
    assert spec is not None and spec.loader is not None
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    b5 = next(p for name, p in sc.BEHAVIOURS_5_2.items() if name.startswith("B5 "))
    cases = {"page_counts|kernel.fork.mmput|-": "B5",
             "page_counts|drivers.hmm_mirror_v5_2.HmmMirrorDriver52.populate|-": "B5",
             "page_counts|mm.mprotect.do_mprotect_pkey|-": None,
             "page_counts|sim_toy_drivers.GoodMirror.fault|-": None,
             "page_counts|kernel.workqueue.worker_thread|-": None,
             "page_counts|page_counts|-": None}
    for sig, want in cases.items():
        assert documented_as(sig, "5.2") == want, sig
        assert bool(re.search(b5, sig)) == (want == "B5"), sig
    assert documented_as("page_counts|kernel.fork.mmput|-", "6.18") is None


def test_gpusvm_rows_label_only_gpusvm_findings() -> None:
    """G1/G2 are drm_gpusvm behaviour: the same signature from another driver is not theirs (its location names
    the gpusvm driver anyway, but a user's driver class of that name must not be labelled)."""
    g2 = "hmm_range_input|drivers.drm_gpusvm.DrmGpusvm.fault|-"
    assert documented_as(g2, "6.18", "gpusvm") == "G2"
    assert documented_as(g2, "6.18") is None and documented_as(g2, "6.12", "gpusvm") is None
    assert documented_as("hmm_range_input|mypkg.mysvm.MySvm.fault|-", "6.18", "gpusvm") is None
    g1 = "result_contract|drivers.drm_gpusvm.DrmGpusvm.fault|driver_fault"
    assert documented_as(g1, "6.18", "gpusvm") == "G1"
