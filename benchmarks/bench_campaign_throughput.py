"""Campaign throughput, this tree against a baseline commit, side by side on the same machine in one run.

    python benchmarks/bench_campaign_throughput.py                       # baseline 8a13503, 5.2, 3 x 60 s
    python benchmarks/bench_campaign_throughput.py --seconds 30 --seeds 5,6 --baseline main

The baseline commit is checked out with ``git worktree add --detach`` into a temporary directory (removed at the
end); both trees run from their ``src`` through ``PYTHONPATH`` (ahead of any installed hmmirror).  Two
workloads, each run for both trees in alternation (baseline, current, baseline, current, ...) so that both
see the same machine load:

1. **campaign** -- ``hmmirror fuzz --kernel K --jobs 1 --seconds S --seed N --json`` per seed: steps/s per
   worker = the steps the campaign reports over its ``--seconds`` (the issue's measure).  Each tree's own
   campaign draws its own scenarios (the generator has grown since the baseline), so this is what a user sees.
2. **fixed** -- the same scenarios for both: ``--scenarios`` scenarios drawn by the *baseline's* generator
   (seeded), saved as scenario files, each run by both trees under the seeded per-step random scheduler with
   every invariant: steps/s of the model, engine and invariants on identical input.

The machine's load average is printed before and after (the machine is shared: only the ratio measured in
one run means anything).  Output: a table, and ``--json FILE`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GEN = r"""
import sys
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.scenario import generate
kernel, first, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for s in range(first, first + n):
    sc = generate(SeededChoices(s), kernel, "builtin")
    sc.scheduler = {"kind": "random", "seed": s}
    with open(f"{out}/sc-{s}.toml", "w") as fh:
        fh.write(sc.to_toml("bench scenario"))
"""

RUN = r"""
import json, sys, time, tomllib
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import SimScenario
from hmmirror.sim.schedulers import RandomScheduler
steps = runs = 0
t0 = time.perf_counter()
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        sc = SimScenario.from_doc(tomllib.load(fh))
    seed = int(sc.scheduler["seed"])
    res = run_scenario(sc, RandomScheduler(SeededChoices(seed)))
    steps += res.steps
    runs += 1
print(json.dumps({"runs": runs, "steps": steps, "seconds": time.perf_counter() - t0}))
"""


def sh(cmd: list[str], cwd: str | None = None, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode not in (0, 1):            # fuzz exits 1 when it found something
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def env_for(src: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = src
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # both trees compile once, then use their bytecode
    return env


def campaign(tree: str, kernel: str, seconds: float, seed: int, work: str, tag: str) -> dict[str, float]:
    fd = os.path.join(work, f"findings-{tag}-{seed}")
    t0 = time.time()
    out = sh([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--kernel", kernel, "--jobs", "1", "--seconds",
              str(seconds), "--seed", str(seed), "--json", "--findings", fd], cwd=work, env=env_for(tree))
    wall = time.time() - t0
    doc = json.loads(out.strip().splitlines()[-1])
    return {"runs": doc["runs"], "steps": doc["steps"], "wall": wall, "steps_per_s": doc["steps"] / seconds,
            "runs_per_s": doc["runs"] / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="8a13503", help="baseline commit (default: 8a13503, main before issue 10)")
    ap.add_argument("--kernel", default="5.2")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds per campaign")
    ap.add_argument("--seeds", default="9101,9102,9103", help="campaign seeds (one campaign per tree each)")
    ap.add_argument("--scenarios", type=int, default=40, help="fixed workload: scenarios from the baseline generator")
    ap.add_argument("--scenario-seed", type=int, default=424242)
    ap.add_argument("--json", dest="json_out", help="write the numbers to this file")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="hmmirror-bench-")
    base = os.path.join(work, "baseline")
    load0 = os.getloadavg()
    try:
        sh(["git", "-C", ROOT, "worktree", "add", "--detach", base, args.baseline])
        rev = sh(["git", "-C", base, "rev-parse", "--short", "HEAD"]).strip()
        cur = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
        trees = {"baseline": os.path.join(base, "src"), "current": os.path.join(ROOT, "src")}
        print(f"baseline {args.baseline} ({rev}) vs current {cur}; kernel {args.kernel}; load average "
              f"{load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}", flush=True)

        # 2. the fixed workload (scenarios from the baseline's generator)
        scdir = os.path.join(work, "scenarios")
        os.makedirs(scdir)
        fixed: dict[str, dict[str, float]] = {}
        if args.scenarios > 0:
            sh([sys.executable, "-c", GEN, args.kernel, str(args.scenario_seed), str(args.scenarios), scdir],
               cwd=work, env=env_for(trees["baseline"]))
            files = sorted(os.path.join(scdir, n) for n in os.listdir(scdir))
            for tag in ("baseline", "current", "baseline", "current"):
                out = json.loads(sh([sys.executable, "-c", RUN, *files], cwd=work, env=env_for(trees[tag]))
                                 .strip().splitlines()[-1])
                acc = fixed.setdefault(tag, {"runs": 0, "steps": 0, "seconds": 0.0})
                for k in acc:
                    acc[k] += out[k]
                print(f"  fixed  {tag:8s} {out['runs']} runs {out['steps']} steps {out['seconds']:.1f} s "
                      f"-> {out['steps'] / out['seconds']:.0f} steps/s", flush=True)

        # 1. campaigns, alternating
        camp: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            for tag in ("baseline", "current"):
                r = campaign(trees[tag], args.kernel, args.seconds, seed, work, tag)
                camp[tag].append(r)
                print(f"  campaign {tag:8s} seed {seed}: {r['runs']} runs {r['steps']} steps in {args.seconds:.0f} s "
                      f"-> {r['steps_per_s']:.0f} steps/s, {r['runs_per_s']:.2f} runs/s (wall {r['wall']:.0f} s)",
                      flush=True)
        load1 = os.getloadavg()
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    def rate(rs: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rs) / max(len(rs), 1)

    res = {"baseline": args.baseline, "kernel": args.kernel, "load_before": load0, "load_after": load1,
           "campaign": {t: {"steps_per_s": rate(v, "steps_per_s"), "runs_per_s": rate(v, "runs_per_s"), "runs": v}
                        for t, v in camp.items()},
           "fixed": {t: dict(v, steps_per_s=v["steps"] / max(v["seconds"], 1e-9)) for t, v in fixed.items()}}
    cb, cc = res["campaign"]["baseline"]["steps_per_s"], res["campaign"]["current"]["steps_per_s"]
    print(f"\ncampaign steps/s per worker: baseline {cb:.0f}, current {cc:.0f}: x{cc / max(cb, 1e-9):.2f}")
    print(f"campaign runs/s per worker:  baseline {res['campaign']['baseline']['runs_per_s']:.2f}, "
          f"current {res['campaign']['current']['runs_per_s']:.2f}")
    if fixed:
        fb, fc = res["fixed"]["baseline"]["steps_per_s"], res["fixed"]["current"]["steps_per_s"]
        print(f"fixed workload steps/s:      baseline {fb:.0f}, current {fc:.0f}: x{fc / max(fb, 1e-9):.2f}")
    print(f"load average before {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, after {load1[0]:.1f} {load1[1]:.1f} "
          f"{load1[2]:.1f} (2 CPUs)")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
