"""Campaign throughput, two commits side by side on the same machine in one run, measured in CPU time.

    nice python benchmarks/bench_campaign_throughput.py                    # baseline 8a13503 vs HEAD, 5.2
    nice python benchmarks/bench_campaign_throughput.py --seconds 60 --seeds 9101,9102,9103 --reps 2
    nice python benchmarks/bench_campaign_throughput.py --current WORKTREE   # uncommitted work of a tree

Both sides are checked out with ``git worktree add --detach`` into a temporary directory (removed at the end;
``--current`` may also name a directory, used as it is), and run from their ``src`` through ``PYTHONPATH``
(ahead of any installed hmmirror), so editing the tree while the benchmark runs does not change what it
measures.

The machine is shared (2 CPUs, other jobs): a campaign bounded by ``--seconds`` of wall time gets whatever CPU
the others leave it, so steps per wall second measure the load more than the code.  Here every run's cost is
its **CPU time**: the user + system time of the whole process tree (coordinator, worker, fresh-replay
processes), read from ``getrusage(RUSAGE_CHILDREN)`` around the run; this process is a child sub-reaper
(``PR_SET_CHILD_SUBREAPER``) and reaps every orphan before reading it, so no descendant's time is lost.
The two sides alternate run by run, the order flipping every repetition (baseline first, then current first),
so both see the same load; every (workload, seed) is repeated ``--reps`` times; the table gives the median
and the spread (min-max) of the per-pair ratios.

Workloads:

1. **campaign** -- ``hmmirror fuzz --kernel K --jobs 1 --seconds S --seed N --json`` per seed: steps per
   CPU-second of the campaign's process tree = the issue's "steps/s per worker" with the load taken out
   (``--jobs 1``: one worker).  Each tree draws its own scenarios (the generator has grown since the
   baseline): this is what a user's campaign does, shrinking and fresh-process verification included.
2. **fixed** -- the same scenarios for both: ``--scenarios`` scenarios drawn by the *baseline's* generator
   (seeded), saved as scenario files, each run by both trees under the seeded per-step random scheduler with
   every invariant; the cost is the run loop's ``time.process_time()`` (steps per CPU-second of the model,
   engine and invariants on identical input).  The two trees do not take the same steps for the same
   scenario (the baseline's 5.2 ``hmm_range_fault`` livelock refaults to the step bound, cheap steps the
   current tree cuts short), so this rate mixes speed with what a step is.

Both trees are byte-compiled (``compileall``) before anything is measured: otherwise the first process of each
tree pays for compiling it.
3. **matched** -- the like-for-like per-step figure, from the fixed runs (no extra runs): only the scenarios
   whose step counts in the two trees are within ``--match-tol`` (default 10 % of the larger; 0 = equal, the
   count of equal ones is printed too), each timed on its own (``time.process_time()`` around its
   ``run_scenario``, machine set-up included); steps per CPU-second of each tree over that set, each with its
   own steps, so the ratio is the ratio of per-step costs on (nearly) the same work.  Exact equality is rare:
   the trees have different scheduling points (e.g. ``pte_offset_map``/``pte_unmap`` pairs), so the seeded
   scheduler's choices fall differently after the first one; scenarios that livelock in one tree only are
   left out by the tolerance.

**Which figure is the issue's**: issue 10's Done-when ("5.2 campaign throughput (steps/s per worker) >= 3x")
is the **campaign** line -- what a user's campaign delivers, generation, steering, shrinking and fresh-process
verification included, each tree drawing its own scenarios.  **matched** says how much of that comes from
cheaper steps (model, engine, invariants), **fixed** is kept for comparison with earlier sessions.

The load average is printed before and after.  Output: a table, and ``--json FILE`` for every number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
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
scs = []
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        scs.append(SimScenario.from_doc(tomllib.load(fh)))
steps = runs = 0
per = []
c0, t0 = time.process_time(), time.perf_counter()
for path, sc in zip(sys.argv[1:], scs):
    r0 = time.process_time()
    res = run_scenario(sc, RandomScheduler(SeededChoices(int(sc.scheduler["seed"]))))
    per.append([path.rsplit("/", 1)[-1], res.steps, time.process_time() - r0])
    steps += res.steps
    runs += 1
print(json.dumps({"runs": runs, "steps": steps, "cpu": time.process_time() - c0,
                  "wall": time.perf_counter() - t0, "per": per}))
"""

#: a campaign on a CPU clock: ``time.monotonic``/``time.time`` advance with this process's CPU time, so the
#: campaign's deadline, its shrink budgets and everything else it times are CPU-seconds whatever the load
CAMPAIGN = r"""
import json, sys, tempfile, time
_pt, _m0, _w0 = time.process_time, time.monotonic(), time.time()
_c0 = _pt()
time.monotonic = lambda: _m0 + (_pt() - _c0)
time.time = lambda: _w0 + (_pt() - _c0)
kernel, seconds, seed, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from hmmirror.sim.fuzz import Config, campaign
cfg = Config(kernel=kernel, seconds=seconds, seed=seed, jobs=1, findings_dir=out)
st = campaign(cfg, time.monotonic() + seconds)
print(json.dumps({"runs": st.runs, "steps": st.steps, "findings": len(st.findings),
                  "own_cpu": _pt() - _c0}))
"""

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_all() -> None:
    """Wait for every descendant left to this (sub-reaper) process, so that its CPU time is counted."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sh(cmd: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
       timeout: float = 3600) -> tuple[str, float, float]:
    """Run ``cmd``; its stdout, the CPU time of its whole process tree and its wall time."""
    c0, t0 = children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    reap_all()
    cpu, wall = children_cpu() - c0, time.perf_counter() - t0
    if r.returncode not in (0, 1):            # fuzz exits 1 when it found something
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout, cpu, wall


def env_for(src: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = src
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # both trees compile once, then use their bytecode
    return env


def campaign(tree: str, kernel: str, seconds: float, seed: int, work: str, tag: str, rep: int) -> dict[str, float]:
    """One worker's campaign of ``seconds`` CPU-seconds (its own process; fresh replays counted on top)."""
    fd = os.path.join(work, f"findings-{tag}-{seed}-{rep}")
    out, cpu, wall = sh([sys.executable, "-c", CAMPAIGN, kernel, str(seconds), str(seed), fd], cwd=work,
                        env=env_for(tree))
    doc = json.loads(out.strip().splitlines()[-1])
    return {"runs": doc["runs"], "steps": doc["steps"], "cpu": cpu, "wall": wall, "own_cpu": doc["own_cpu"],
            "steps_per_cpu_s": doc["steps"] / max(cpu, 1e-9), "findings": doc["findings"]}


def cli_campaign(tree: str, kernel: str, seconds: float, seed: int, work: str, tag: str, rep: int) -> dict[str, float]:
    """``hmmirror fuzz --jobs 1 --seconds S`` (wall-clock seconds: what a user runs)."""
    fd = os.path.join(work, f"cli-findings-{tag}-{seed}-{rep}")
    out, cpu, wall = sh([sys.executable, "-m", "hmmirror.cli.main", "fuzz", "--kernel", kernel, "--jobs", "1",
                         "--seconds", str(seconds), "--seed", str(seed), "--json", "--findings", fd],
                        cwd=work, env=env_for(tree))
    doc = json.loads(out.strip().splitlines()[-1])
    return {"runs": doc["runs"], "steps": doc["steps"], "cpu": cpu, "wall": wall,
            "steps_per_cpu_s": doc["steps"] / max(cpu, 1e-9), "steps_per_s": doc["steps"] / seconds,
            "findings": len(doc.get("findings", []))}


def checkout(rev: str, work: str, name: str) -> tuple[str, str]:
    """A directory holding ``rev``'s tree (a worktree), or ``rev`` itself when it is a directory."""
    if os.path.isdir(rev):
        return os.path.abspath(rev), "worktree " + os.path.abspath(rev)
    d = os.path.join(work, name)
    sh(["git", "-C", ROOT, "worktree", "add", "--detach", d, rev])
    return d, sh(["git", "-C", d, "rev-parse", "--short", "HEAD"])[0].strip()


def summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """Median and spread of baseline/current pairs of rates, and of their ratios."""
    ratios = [c / max(b, 1e-9) for b, c in pairs]
    return {"baseline_median": statistics.median(b for b, _ in pairs),
            "current_median": statistics.median(c for _, c in pairs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "n": len(pairs)}


def matched(fixed: dict[str, list[dict]], tol: float) -> dict[str, float]:
    """The like-for-like figure: over the fixed scenarios whose step counts in the two trees differ by at most
    ``tol`` (a fraction of the larger; 0 = equal), steps per CPU-second of each tree over that set, each tree
    with its own steps (the ratio is the ratio of the per-step costs); ``exact`` = how many are equal."""
    pairs, per_sc = [], []
    out: dict[str, float] = {"n": 0, "tol": tol}
    for b, c in zip(fixed["baseline"], fixed["current"]):
        cur = {n: (st, cpu) for n, st, cpu in c.get("per", [])}
        same = [(st, cur[n][0], cpu, cur[n][1]) for n, st, cpu in b.get("per", [])
                if n in cur and abs(cur[n][0] - st) <= tol * max(cur[n][0], st)]
        if not same:
            continue
        sb, sc = sum(x[0] for x in same), sum(x[1] for x in same)
        pairs.append((sb / max(sum(x[2] for x in same), 1e-9), sc / max(sum(x[3] for x in same), 1e-9)))
        per_sc += [(st_c / max(cc, 1e-9)) / (st_b / max(cb, 1e-9)) for st_b, st_c, cb, cc in same]
        out.update(scenarios=len(same), of=len(b["per"]), exact=sum(x[0] == x[1] for x in same),
                   steps_baseline=sb, steps_current=sc, step_share=sb / max(sum(x[1] for x in b["per"]), 1))
    if pairs:
        out.update(summary(pairs))
        out["per_scenario_ratio_median"] = statistics.median(per_sc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="8a13503", help="baseline commit (default: 8a13503, main before issue 10)")
    ap.add_argument("--current", default="HEAD", help="commit (or a directory holding a tree) to compare")
    ap.add_argument("--kernel", default="5.2")
    ap.add_argument("--seconds", type=float, default=20.0, help="CPU-seconds per campaign (on a CPU clock)")
    ap.add_argument("--cli-seconds", type=float, default=0.0,
                    help="also run `hmmirror fuzz --seconds N` per seed and tree (wall clock; 0: not)")
    ap.add_argument("--seeds", default="9101,9102,9103", help="campaign seeds (one campaign per tree each)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every campaign and of the fixed workload")
    ap.add_argument("--scenarios", type=int, default=40, help="fixed workload: scenarios from the baseline generator")
    ap.add_argument("--scenario-seed", type=int, default=424242)
    ap.add_argument("--match-tol", type=float, default=0.1,
                    help="matched workload: largest step-count difference, a fraction of the larger (0: equal)")
    ap.add_argument("--json", dest="json_out", help="write the numbers to this file")
    args = ap.parse_args()

    reaper = become_subreaper()
    work = tempfile.mkdtemp(prefix="hmmirror-bench-")
    load0 = os.getloadavg()
    made: list[str] = []
    try:
        base, rev = checkout(args.baseline, work, "baseline")
        made.append(base)
        cur, crev = checkout(args.current, work, "current")
        if not os.path.isdir(args.current):
            made.append(cur)
        trees = {"baseline": os.path.join(base, "src"), "current": os.path.join(cur, "src")}
        for src in trees.values():
            # compile both trees before measuring: a fresh checkout has no bytecode, and the first process of each
            # tree (the first campaign's worker, its zygote importing every model module) paid for compiling it
            # -- 5-15 CPU-s on top of a 15 CPU-s campaign
            sh([sys.executable, "-m", "compileall", "-q", src], cwd=work, env=env_for(src))
        print(f"baseline {args.baseline} ({rev}) vs current {args.current} ({crev}); kernel {args.kernel}; "
              f"{args.reps} repetitions; CPU time of each process tree (sub-reaper: {reaper}); load average "
              f"{load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}", flush=True)

        def order(rep: int) -> tuple[str, str]:
            return ("baseline", "current") if rep % 2 == 0 else ("current", "baseline")

        # the fixed workload (scenarios from the baseline's generator)
        fixed: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        if args.scenarios > 0:
            scdir = os.path.join(work, "scenarios")
            os.makedirs(scdir)
            sh([sys.executable, "-c", GEN, args.kernel, str(args.scenario_seed), str(args.scenarios), scdir],
               cwd=work, env=env_for(trees["baseline"]))
            files = sorted(os.path.join(scdir, n) for n in os.listdir(scdir))
            for rep in range(args.reps):
                for tag in order(rep):
                    out = json.loads(sh([sys.executable, "-c", RUN, *files], cwd=work, env=env_for(trees[tag]))[0]
                                     .strip().splitlines()[-1])
                    out["steps_per_cpu_s"] = out["steps"] / max(out["cpu"], 1e-9)
                    fixed[tag].append(out)
                    print(f"  fixed    {tag:8s} rep {rep}: {out['runs']} runs {out['steps']} steps, "
                          f"{out['cpu']:.1f} CPU-s ({out['wall']:.1f} s wall) -> {out['steps_per_cpu_s']:.0f} "
                          f"steps/CPU-s", flush=True)

        # campaigns on a CPU clock, alternating; then (optional) CLI campaigns on the wall clock
        camp: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        cli: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        seeds = [int(s) for s in args.seeds.split(",") if s]
        for what, fn, secs, acc in (("campaign", campaign, args.seconds, camp),
                                    ("cli", cli_campaign, args.cli_seconds, cli)):
            if secs <= 0:
                continue
            for rep in range(args.reps):
                for seed in seeds:
                    for tag in order(rep):
                        r = fn(trees[tag], args.kernel, secs, seed, work, tag, rep)
                        r.update(seed=seed, rep=rep)
                        acc[tag].append(r)
                        print(f"  {what:8s} {tag:8s} seed {seed} rep {rep}: {r['runs']} runs {r['steps']} steps, "
                              f"{r['findings']} findings, {r['cpu']:.1f} CPU-s -> {r['steps_per_cpu_s']:.0f} "
                              f"steps/CPU-s (wall {r['wall']:.0f} s)", flush=True)
        load1 = os.getloadavg()
    finally:
        for d in made:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", d], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    res: dict[str, object] = {"baseline": args.baseline, "current": args.current, "kernel": args.kernel,
                              "seconds": args.seconds, "cli_seconds": args.cli_seconds, "reps": args.reps,
                              "load_before": load0, "load_after": load1, "campaign_runs": camp, "cli_runs": cli,
                              "fixed_runs": fixed}
    print()
    for what, acc, how in (("campaign", camp, f"{args.seconds:.0f} CPU-s campaigns, one worker"),
                           ("cli", cli, f"`hmmirror fuzz --jobs 1 --seconds {args.cli_seconds:.0f}`")):
        if not acc["current"]:
            continue
        s = summary([(b["steps_per_cpu_s"], c["steps_per_cpu_s"]) for b, c in zip(acc["baseline"], acc["current"])])
        res[what] = s
        print(f"{what} steps per CPU-second ({how}): baseline {s['baseline_median']:.0f}, current "
              f"{s['current_median']:.0f} (medians of {s['n']}); ratio median x{s['ratio_median']:.2f}, "
              f"spread x{s['ratio_min']:.2f}-x{s['ratio_max']:.2f}")
    if fixed["current"]:
        m = matched(fixed, args.match_tol)
        res["matched"] = m
        if m["n"]:
            print(f"matched (per-step cost, like for like): {m['scenarios']} of {m['of']} fixed scenarios whose step "
                  f"counts differ by <= {100 * args.match_tol:.0f} % ({m['exact']} equal): baseline "
                  f"{m['steps_baseline']} steps ({100 * m['step_share']:.0f} % of its fixed steps), current "
                  f"{m['steps_current']}; steps/CPU-s baseline {m['baseline_median']:.0f}, current "
                  f"{m['current_median']:.0f}; ratio median x{m['ratio_median']:.2f}, spread x{m['ratio_min']:.2f}-"
                  f"x{m['ratio_max']:.2f} (per-scenario ratio median x{m['per_scenario_ratio_median']:.2f})")
        else:
            print(f"matched: no fixed scenario's step counts agree within {100 * args.match_tol:.0f} %")
        f = summary([(b["steps_per_cpu_s"], c["steps_per_cpu_s"]) for b, c in zip(fixed["baseline"], fixed["current"])])
        res["fixed"] = f
        print(f"fixed workload steps per CPU-second: baseline {f['baseline_median']:.0f}, current "
              f"{f['current_median']:.0f}; ratio median x{f['ratio_median']:.2f}, spread "
              f"x{f['ratio_min']:.2f}-x{f['ratio_max']:.2f}")
    print(f"load average before {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, after {load1[0]:.1f} {load1[1]:.1f} "
          f"{load1[2]:.1f} (2 CPUs)")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
