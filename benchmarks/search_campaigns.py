"""Blind-campaign measurements of issue 10 (search): which known 5.2 behaviours a 60 s campaign finds, the
coverage of one campaign per profile, and how a campaign started on an earlier one's findings spends its runs.

    python benchmarks/search_campaigns.py --seeds 73121,91357,40427 --seconds 60 --jobs 2 --out /tmp/search-bench
    python benchmarks/search_campaigns.py --kernel 6.18 --seeds 55001 --seconds 600 --jobs 2 --out /tmp/s618

Seeds must be ones the repository never used.  Each campaign runs ``hmmirror fuzz --fresh --json`` in its own
findings directory; the behaviours of docs/known-behaviours.md are matched by signature pattern
(:data:`BEHAVIOURS_5_2`).  With ``--again`` a second campaign (another new seed) runs on the first seed's
findings directory and the fraction of its runs that hit only known signatures is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

#: docs/known-behaviours.md, 5.2: name -> signature pattern (invariant|location|detail)
BEHAVIOURS_5_2 = {
    "B1 coherence hole: valid flag, not a sequence":
        r"^(commit_invalid\|drivers\.hmm_mirror_v5_2\.|coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|commit$)",
    "B2 write fault on a VMA without VM_WRITE restarts forever": r"^liveness\|mm\.hmm\.v5_2\.hmm_range_fault\|refault",
    "B3 handle_mm_fault with a NULL vma in a gap": r"^report:null_deref\|mm\.hmm\.v5_2\.hmm_vma_do_fault",
    "B4 mutex in a non-blockable invalidate_range_end": r"^sleep_in_atomic\|mm\.hmm\.v5_2\.hmm_invalidate_range_end",
    # (located where the count check first sees the leaked frames: exit_mmap's mmput or the driver's next step)
    "B5 device fault racing exit (no mmget_not_zero)":
        r"^page_counts\|(kernel\.fork\.mmput|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.populate)\|",
    "B6 fault under the devmap PUD lock": r"^(sleep_in_atomic\|mm\.memory\.handle_mm_fault|recursive_lock\|mm\.huge_memory)",
    "B7 hugetlb hole with huge page_shift overruns pfns[]": r"^report:pfns_overflow\|",
    "B8 dying pgmap: hmm_range_fault restarts forever": r"^liveness\|mm\.hmm\.v5_2\.hmm_range_fault\|no-fault",
    "B9 pgmap reference kept after a walk error": r"^pgmap_refcount\|",
    "B11 none hugetlb entry reported VALID (first request only)":
        r"^(result_contract\|mm\.hmm\.v5_2\.hmm_range_fault\||coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|walk$)",
    "B12 pte_offset_map without pte_unmap on -EFAULT/-EBUSY": r"^pte_map_balance\|mm\.hmm\.v5_2\.hmm_vma_walk_pmd\|",
    "B13 a mirror's -EAGAIN lost in a non-blockable invalidation":
        r"^coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|after_end$",
    "B14 hmm freed while an invalidation is in its subscriber loop":
        r"^report:VM_BUG_ON\|mm\.hmm\.v5_2\.hmm_invalidate_range_start\|",
}


def run(kernel: str, seed: int, seconds: float, jobs: int, fdir: str, fresh: bool = True) -> dict:
    cmd = [sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--kernel", kernel, "--seconds", str(seconds),
           "--jobs", str(jobs), "--seed", str(seed), "--findings", fdir, "--json"]
    if fresh:
        cmd.append("--fresh")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {"error": r.stderr[-2000:]}
    out["wall"] = round(time.time() - t0, 1)
    out["rc"] = r.returncode
    return out


def matched(sigs: list[str], findings: list[dict] | None = None) -> dict[str, list[str]]:
    """Known behaviour -> the campaign's signatures that match it (each behaviour has signatures of its own:
    B1's stale commit and B11's snapshot form differ by the coherence detail, ``commit`` / ``walk``)."""
    _ = findings
    return {name: [s for s in sigs if re.search(pat, s)] for name, pat in BEHAVIOURS_5_2.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="5.2")
    ap.add_argument("--seeds", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--again", type=int, default=None, help="seed of a second campaign on the first's findings")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    report: dict = {"kernel": a.kernel, "load": os.getloadavg(), "campaigns": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        fdir = os.path.join(a.out, f"{a.kernel}-{seed}")
        load0 = os.getloadavg()
        res = run(a.kernel, seed, a.seconds, a.jobs, fdir)
        sigs = [f["signature"] for f in res.get("findings", [])]
        entry = {"seed": seed, "load_before": load0, "load_after": os.getloadavg(),
                 "runs": res.get("runs"), "steps": res.get("steps"), "new": res.get("new"),
                 "search_seconds": res.get("search_seconds"), "runs_per_s_per_worker": res.get("runs_per_s_per_worker"),
                 "signatures": sigs, "coverage": (res.get("coverage") or {}).get("percent"),
                 "coverage_grids": (res.get("coverage") or {}).get("grids"), "wall": res["wall"], "rc": res["rc"],
                 "error": res.get("error")}
        if a.kernel == "5.2":
            m = matched(sigs, res.get("findings", []))
            first = {f["signature"]: f.get("first_s") for f in res.get("findings", [])}
            entry["behaviours"] = {k: bool(v) for k, v in m.items()}
            # seconds from the campaign's start to the first run that reached it (None: not found)
            entry["first_s"] = {k: min((first[x] for x in v if first.get(x) is not None), default=None)
                                for k, v in m.items()}
        report["campaigns"].append(entry)
        print(json.dumps(entry), flush=True)
    if a.again is not None and report["campaigns"]:
        first = report["campaigns"][0]["seed"]
        # (not --fresh: a user's next campaign on those findings, with what the first one saved there)
        res = run(a.kernel, a.again, a.seconds, a.jobs, os.path.join(a.out, f"{a.kernel}-{first}"), fresh=False)
        report["again"] = {"seed": a.again, "on": first, "runs": res.get("runs"), "generated": res.get("generated"),
                           "steps": res.get("steps"), "search_seconds": res.get("search_seconds"),
                           "runs_per_s_per_worker": res.get("runs_per_s_per_worker"),
                           "known_runs": res.get("known_runs"), "known_fraction": res.get("known_fraction"),
                           "known_stop_fraction": res.get("known_stop_fraction"),
                           "rejected_draws": res.get("rejected_draws"), "coverage": (res.get("coverage") or {}).get("percent"),
                           "new": res.get("new"), "new_signatures": [f["signature"] for f in res.get("findings", [])],
                           "known_hits": res.get("known_hits"), "error": res.get("error"),
                           "load_after": os.getloadavg(),
                           "coverage_missing": {k: v.get("missing") for k, v in
                                                ((res.get("coverage") or {}).get("grids") or {}).items()}}
        ag = report["again"]
        # the measure, said plainly: runs whose findings were ALL known (a run that also found something
        # new is not one spent on known signatures), of the runs made
        ag["summary"] = (f"{ag['known_runs']} of {ag['runs']} runs ({100 * (ag['known_fraction'] or 0):.1f} %) found "
                         f"only known signatures; new signatures: {ag['new'] or 0}"
                         if ag.get("runs") else "no runs")
        print(json.dumps(report["again"]), flush=True)
    if a.kernel == "5.2":
        found = {k: sum(c.get("behaviours", {}).get(k, False) for c in report["campaigns"]) for k in BEHAVIOURS_5_2}
        report["behaviours_found_in_seeds"] = found
        print(json.dumps(found, indent=1))
    report["load_end"] = os.getloadavg()
    with open(os.path.join(a.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
