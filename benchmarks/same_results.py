"""Same seed, same results: two trees run the same seeded scenarios and must agree byte for byte.

    nice python benchmarks/same_results.py                          # main vs this worktree (uncommitted work too)
    nice python benchmarks/same_results.py --baseline 1471572 --current HEAD --seeds 3000-3099 --kernels 5.2,6.18

For every kernel and seed, each tree draws the scenario with its own generator (``generate(SeededChoices(seed))``)
and runs it under the seeded random scheduler with every invariant (``run_scenario``, as a campaign's seeded run
does, plus the trace); the fingerprint of a run is the scenario's TOML, the SHA-256 of its event log and trace
(``SimResult.log_bytes``), its schedule, every finding (signature, message, step, task, stack without line
numbers -- any edit of a model file moves them --, VMA kind, entry, kevent), the consequences and the count of
repeated violations.  A speed change must leave every fingerprint as it was; the script prints the runs that
differ and exits 1 if any does.  Optionally also ``--campaign-runs N``: ``hmmirror fuzz --runs N --seed S --json``
of both trees (findings, signatures, hits, coverage, the reproducers' text; timings dropped).

Each side runs from its ``src`` through ``PYTHONPATH`` in its own process (``git archive`` of a revision into a
temporary directory, or a directory used as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FINGERPRINT = r"""
import hashlib, json, re, sys
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import generate
from hmmirror.sim.schedulers import RandomScheduler
kernels, seeds = sys.argv[1].split(","), json.loads(sys.argv[2])
out = {}
for k in kernels:
    for s in seeds:
        sc = generate(SeededChoices(s), k, "builtin")
        r = run_scenario(sc, RandomScheduler(SeededChoices(s)))
        out[f"{k}/{s}"] = {
            "scenario": hashlib.sha256(sc.to_toml("x").encode()).hexdigest(), "steps": r.steps,
            "log": hashlib.sha256(r.log_bytes()).hexdigest(),
            "schedule": hashlib.sha256(json.dumps(r.schedule, default=str).encode()).hexdigest(),
            "findings": [[f.signature, f.message, f.step, f.task, [re.sub(r":[0-9]+$", "", x) for x in f.stack],
                          f.vma_kind, f.entry, f.kevent]
                         for f in r.findings],
            "consequences": [[f.signature, f.message, f.step] for f in r.consequences],
            "extra": r.extra_findings}
print(json.dumps(out))
"""

#: fields of ``fuzz --json`` that measure time (dropped before comparing)
TIMING = ("seconds", "elapsed", "runs_per_s", "steps_per_s", "runs_per_s_per_worker", "steps_per_s_per_worker",
          "first_s", "search_seconds", "finish_seconds", "workers", "load")


def tree_src(rev: str, work: str, name: str) -> str:
    if os.path.isdir(rev):
        return os.path.join(os.path.abspath(rev), "src")
    d = os.path.join(work, name)
    os.makedirs(d)
    arch = subprocess.run(["git", "-C", ROOT, "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    return os.path.join(d, "src")


def run_py(src: str, code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=src)
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"{src}: failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def strip_timing(x: object) -> object:
    if isinstance(x, dict):
        return {k: strip_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [strip_timing(v) for v in x]
    return x


def seeds_of(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="main")
    ap.add_argument("--current", default=ROOT, help="a revision or a directory holding a tree (default: this one)")
    ap.add_argument("--kernels", default="5.2,6.18,6.12")
    ap.add_argument("--seeds", default="3000-3059")
    ap.add_argument("--campaign-runs", type=int, default=0, help="also compare `fuzz --runs N --json` per kernel")
    ap.add_argument("--campaign-seed", type=int, default=777)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hmmirror-same-")
    bad = 0
    try:
        srcs = {"baseline": tree_src(args.baseline, work, "b"), "current": tree_src(args.current, work, "c")}
        seeds = json.dumps(seeds_of(args.seeds))
        fp = {side: json.loads(run_py(src, FINGERPRINT, args.kernels, seeds)) for side, src in srcs.items()}
        diff = sorted(k for k in fp["baseline"] if fp["baseline"][k] != fp["current"].get(k))
        print(f"seeded runs: {len(fp['baseline'])} (kernels {args.kernels}, seeds {args.seeds}), {len(diff)} differ")
        for k in diff[:10]:
            b, c = fp["baseline"][k], fp["current"].get(k, {})
            print(f"  {k}: " + ", ".join(f for f in b if b[f] != c.get(f)))
        bad += len(diff)
        if args.campaign_runs:
            for k in args.kernels.split(","):
                docs = {}
                for side, src in srcs.items():
                    fd = os.path.join(work, f"findings-{side}-{k}")
                    env = dict(os.environ, PYTHONPATH=src)
                    r = subprocess.run([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--kernel", k, "--jobs", "1",
                                        "--runs", str(args.campaign_runs), "--seed", str(args.campaign_seed), "--json",
                                        "--findings", fd], env=env, capture_output=True, text=True, cwd=work)
                    if r.returncode not in (0, 1) or not r.stdout.strip():
                        raise SystemExit(f"fuzz failed ({r.returncode}):\n{r.stderr[-3000:]}")
                    doc = strip_timing(json.loads(r.stdout.strip().splitlines()[-1].replace(fd, "FINDINGS")))
                    # and the reproducers written (their text, the findings directory's path neutral)
                    doc["reproducer_texts"] = sorted(
                        open(os.path.join(dp, n), encoding="utf-8").read().replace(fd, "FINDINGS")
                        for dp, _, names in os.walk(fd) for n in names if n.endswith(".toml"))
                    docs[side] = doc
                same = docs["baseline"] == docs["current"]
                print(f"campaign {k} --runs {args.campaign_runs} --seed {args.campaign_seed}: "
                      f"{'identical' if same else 'DIFFERENT'} --json (timings dropped)")
                if not same:
                    bad += 1
                    for key in docs["baseline"]:
                        if docs["baseline"][key] != docs["current"].get(key):
                            b, c = str(docs["baseline"][key])[:200], str(docs["current"].get(key))[:200]
                            print(f"  {key}: {b} vs {c}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
