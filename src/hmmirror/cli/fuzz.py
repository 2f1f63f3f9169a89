"""``hmmirror fuzz``: a fuzzing campaign of the interleaving simulator (see docs/simulator.md).

Every option is checked before the campaign starts (exit 2): the kernel, ``--seconds`` (finite, positive),
``--jobs``, the findings directory (created, writable), the driver (imported, constructed and type-checked
here, so a bad driver is bad input, never a finding).  Exit code 1 when the campaign found something, 0 when
not, 130 when interrupted (Ctrl-C, SIGTERM: the workers stop, the summary so far and ``--json`` are printed).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from hmmirror.cli.common import (EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, check_output_file, finite_seconds,
                                 prepare_output_dir, resolve_driver, seed_option)
from hmmirror.errors import InputError

#: Upper bound of ``--jobs``: more worker processes than this only thrash the machine.
MAX_JOBS = max(64, 4 * (os.cpu_count() or 1))


@click.command()
@click.option("--kernel", default="6.18", show_default=True, help="kernel profile: 5.2, 6.12 or 6.18")
@click.option("--seconds", default=None, type=float,
              help="campaign length in seconds [default: 60, or unbounded with --runs]")
@click.option("--runs", default=None, type=click.IntRange(1, 1 << 40),
              help="stop after N runs (exactly reproducible: the same seed gives the same runs)")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, MAX_JOBS), help="worker processes")
@click.option("--dask", "dask", metavar="ADDRESS|local:N", default=None,
              help="run on a Dask distributed cluster (a scheduler address, or local:N for N local workers) "
                   "instead of --jobs; needs the dask extra")
@click.option("--driver", default="builtin", show_default=True,
              help="the mirroring driver: builtin, gpusvm (drm_gpusvm-style, 6.18) or package.module:ClassName")
@click.option("--findings", "findings_dir", default="findings", show_default=True, help="reproducer directory")
@click.option("--scheduler", type=click.Choice(["mixed", "switch", "random", "pct"]), default="mixed",
              show_default=True, help="switch: Hypothesis-drawn bounded switch lists (shrunk by Hypothesis); "
              "random / pct: seeded per-step schedules (greedy shrinking); mixed: both, alternating")
@seed_option("--seed", default=0, show_default=True, help="campaign seed")
@click.option("--every-step", is_flag=True, help="run the page-count walk at every step (slow)")
@click.option("--kinds", default=None, help="comma-separated VMA kinds to generate (default: all available)")
@click.option("--events", default=None, help="comma-separated background events (default: all; 'none' for none)")
@click.option("--fresh", is_flag=True,
              help="start the seed sequence again, without the steering evidence saved in --findings (default: "
                   "continue where a campaign with the same options and --findings stopped, steered by it)")
@click.option("--known", "known_file", default=None,
              help="file of signatures to treat as known (one a line), or a directory of reproducers (e.g. "
                   "docs/sim-reproducers), besides the findings directory's")
@click.option("--no-steer", is_flag=True, help="do not move effort away from features that produce known findings")
@click.option("--no-target", is_flag=True,
              help="do not aim a share of the scenarios at coverage cells the campaign has not covered yet")
@click.option("--inject", is_flag=True,
              help="also draw the opt-in event that writes page-table states no syscall makes (findings marked)")
@click.option("--coverage-png", default=None, help="draw the coverage heat map to this PNG file")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
def command(kernel: str, seconds: float | None, runs: int | None, jobs: int, dask: str | None, driver: str,
            findings_dir: str,
            scheduler: str, seed: int, every_step: bool, kinds: str | None, events: str | None, fresh: bool,
            known_file: str | None, no_steer: bool, no_target: bool, inject: bool, coverage_png: str | None,
            as_json: bool) -> int:
    """Fuzz the model and a mirroring driver under random interleavings; save shrunk reproducers.

    Exit code 1 when the campaign found something (a reproducer per cause in --findings).
    """
    from hmmirror.profiles import get_profile

    kernel = get_profile(kernel).name
    seconds = finite_seconds(seconds, "--seconds")
    if seconds is None and runs is None:
        seconds = 60.0
    from hmmirror.sim.scenario import EVENT_KINDS, VMA_KINDS
    kind_t = tuple(k for k in kinds.split(",") if k) if kinds else None
    ev_t = () if events == "none" else (tuple(e for e in events.split(",") if e) if events else None)
    for k in kind_t or ():
        if k not in VMA_KINDS:
            raise InputError(f"--kinds: unknown VMA kind {k!r} (use {', '.join(VMA_KINDS)})")
    for e in ev_t or ():
        if e not in EVENT_KINDS:
            raise InputError(f"--events: unknown event {e!r} (use {', '.join(EVENT_KINDS)})")
    if kinds is not None and not kind_t:
        raise InputError("--kinds: give at least one VMA kind")
    resolve_driver(driver, kernel)
    executor = None
    if dask is not None:
        from hmmirror.sim.dask import DaskExecutor, check_address
        executor = DaskExecutor.factory(check_address(dask, MAX_JOBS))
    prepare_output_dir(findings_dir, "--findings")
    if known_file:
        from hmmirror.sim.fuzz import load_known_file
        load_known_file(known_file)                   # a bad path is bad input (exit 2), before any work
    check_output_file(coverage_png, "--coverage-png")

    from hmmirror.sim.fuzz import Config
    cfg = Config(kernel=kernel, driver=driver, seconds=seconds or 0.0, jobs=jobs, findings_dir=findings_dir,
                 scheduler=scheduler, seed=seed, every_step=every_step, kinds=kind_t, events=ev_t, fresh=fresh,
                 known_file=known_file, steer=not no_steer, target=not no_target, inject=inject)
    if runs is not None:
        cfg.runs = runs
    result = _run_with_progress(cfg, kernel, seconds, as_json, executor)
    _label_documented(result, kernel, driver)
    _summary(result, kernel)
    _search_summary(result, kernel, coverage_png)
    if as_json:
        # first_s: seconds from the start of the campaign to the first run that reached the finding
        out = {"findings": [{**{k: f[k] for k in ("invariant", "location", "signature", "hits", "reproducer", "seed")},
                             "first_s": f.get("first_s"), "documented": f.get("documented")}
                            for f in result["findings"]],
               "undocumented": sum(1 for f in result["findings"] if not f.get("documented")),
               "unconfirmed": result.get("unconfirmed", []),
               "runs": result["runs"], "generated": result["generated"], "steps": result["steps"],
               "interrupted": bool(result.get("interrupted")), "new": result.get("new", 0),
               "known_at_start": result.get("known_at_start", 0),
               "known_runs": result.get("known_runs", 0), "known_fraction": result.get("known_fraction", 0.0),
               "known_stop_fraction": result.get("known_stop_fraction", 0.0),
               "multi_finding_runs": result.get("multi_finding_runs", 0), "known_hits": result.get("known_hits", {}),
               "rejected_draws": result.get("rejected_draws", 0),
               "runs_per_s_per_worker": result.get("runs_per_s_per_worker"),
               "steps_per_s_per_worker": result.get("steps_per_s_per_worker"),
               "workers": result.get("workers", []),
               "search_seconds": result.get("search_seconds"), "finish_seconds": result.get("finish_seconds")}
        cov = result.get("coverage")
        if cov:
            out["coverage"] = {"percent": cov["percent"], "covered": cov["covered"], "total": cov["total"],
                               "axes": {k: {"covered": v["covered"], "total": v["total"],
                                            "missing": v["missing"]} for k, v in cov["axes"].items()},
                               "grids": {k: {"covered": v["covered"], "total": v["total"],
                                             "missing": v["missing"]} for k, v in cov["grids"].items()},
                               "unreachable": cov["unreachable"]}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    if result.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_FOUND if result["findings"] else EXIT_OK


def _run_with_progress(cfg: object, kernel: str, seconds: float | None, as_json: bool, executor: object) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from hmmirror.sim.fuzz import run_campaign

    err = Console(stderr=True)
    total = float(seconds) if seconds else float(getattr(cfg, "runs", 0) or 1)
    t0 = time.time()
    with Progress(TextColumn("[bold]fuzz {task.fields[kernel]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        task = progress.add_task("fuzz", total=total, kernel=kernel, info="")

        last = [0.0, 0, 0]                           # time, covered, total of the last coverage refresh

        def update(state: dict) -> None:
            now = time.time()
            done = min(now - t0, total) if seconds else min(state["runs"], total)
            col = state.get("collector")
            if col is not None and now - last[0] >= 1.0:
                last[1], last[2] = col.coverage_counts()
                last[0] = now
            rate = state["steps"] / max(now - t0, 1e-6)
            progress.update(task, completed=done, info=f"{state['runs']} runs  {rate:,.0f} steps/s  "
                                                      f"cells {last[1]}/{last[2]}  "
                                                      f"{len(state['findings'])} new findings  "
                                                      f"{state.get('known_runs', 0)} known-only runs")

        result = run_campaign(cfg, update, executor)          # type: ignore[arg-type]
        if not result.get("interrupted"):
            progress.update(task, completed=total)
    return result


def _label_documented(result: dict, kernel: str, driver: str) -> None:
    """Give every finding the id of the documented real behaviour whose signature it has (docs/known-behaviours.md,
    :mod:`hmmirror.sim.documented`), or None: a label for the report, the campaign itself stays blind."""
    from hmmirror.sim.documented import documented_as

    for f in result["findings"]:
        f["documented"] = documented_as(f["signature"], kernel, driver)


def _summary(result: dict, kernel: str) -> None:
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    head = "interrupted: " if result.get("interrupted") else ""
    table = Table(title=f"{head}hmmirror fuzz --kernel {kernel}: {result['runs']} runs, {result['steps']} steps, "
                        f"{len(result['findings'])} findings")
    for col in ("invariant", "location", "documented", "hits", "reproducer", "seed"):
        table.add_column(col)
    for f in result["findings"]:
        table.add_row(f["invariant"], f["location"], f.get("documented") or "-", str(f.get("hits", "")),
                      f["reproducer"], str(f["seed"]))
    err.print(table)
    for u in result.get("unconfirmed", []):
        err.print(f"[yellow]no reproducer for {u['signature']} ({u['hits']} runs): {u['why']}")
    err.print(f"{result.get('runs_per_s_per_worker', 0)} runs/s, {result.get('steps_per_s_per_worker', 0)} "
              f"steps/s per worker")
    for e in result["errors"]:
        err.print(f"[red]{e}")


def _search_summary(result: dict, kernel: str, coverage_png: str | None) -> None:
    """Known signatures hit, whether anything is new, the coverage table (and heat map)."""
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    if result.get("known_hits"):
        kt = Table(title=f"known signatures hit (counted, not saved again): {result['known_runs']} of "
                         f"{result['generated'] or result['runs']} runs ({100 * result['known_fraction']:.0f} %) "
                         f"found only known ones")
        kt.add_column("signature")
        kt.add_column("runs", justify="right")
        for sig, n in list(result["known_hits"].items())[:20]:
            kt.add_row(sig, str(n))
        err.print(kt)
    if result.get("rejected_draws"):
        err.print(f"{result['rejected_draws']} drawn scenarios not run: the steering expected only known "
                  f"signatures from them")
    if result["findings"]:
        doc = sorted({f["documented"] for f in result["findings"] if f.get("documented")})
        undoc = sum(1 for f in result["findings"] if not f.get("documented"))
        err.print(f"[bold red]new: {len(result['findings'])} signature(s) not known before this campaign")
        if doc:
            colour = "green" if not undoc else "red"
            err.print(f"[bold {colour}]{undoc} new outside the documented real behaviours; "
                      f"{len(result['findings']) - undoc} with the signature of a documented one "
                      f"({', '.join(doc)}: docs/known-behaviours.md)")
    elif result.get("known_hits"):
        err.print("[bold green]nothing new: every finding of this campaign was already known")
    else:
        err.print("[bold green]nothing found")
    cov = result.get("coverage")
    if not cov:
        return
    ct = Table(title=f"coverage ({cov['profile']}): {cov['covered']}/{cov['total']} reachable cells "
                     f"({cov['percent']} %)")
    for col in ("axis / grid", "covered", "total", "missing (first)"):
        ct.add_column(col)
    for name, a in cov["axes"].items():
        ct.add_row(name, str(a["covered"]), str(a["total"]), ", ".join(map(str, a["missing"][:6])))
    for name, gr in cov["grids"].items():
        ct.add_row(f"grid {name}", str(gr["covered"]), str(gr["total"]), ", ".join(gr["missing"][:4]))
    err.print(ct)
    err.print("unreachable cells: " + "; ".join(f"{u['cells']} ({u['reason']})" for u in cov["unreachable"]))
    if coverage_png:
        from hmmirror.sim.coverage import coverage_png as draw
        draw(result.get("coverage_cells") or {}, kernel, coverage_png)
        err.print(f"coverage heat map: {coverage_png}")
