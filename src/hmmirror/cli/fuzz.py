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

from hmmirror.cli.common import (EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, finite_seconds, prepare_output_dir,
                                 resolve_driver, seed_option)
from hmmirror.errors import InputError

#: Upper bound of ``--jobs``: more worker processes than this only thrash the machine.
MAX_JOBS = max(64, 4 * (os.cpu_count() or 1))


@click.command()
@click.option("--kernel", default="6.18", show_default=True, help="kernel profile: 5.2 or 6.18")
@click.option("--seconds", default=None, type=float,
              help="campaign length in seconds [default: 60, or unbounded with --runs]")
@click.option("--runs", default=None, type=click.IntRange(1, 1 << 40),
              help="stop after N runs (exactly reproducible: the same seed gives the same runs)")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, MAX_JOBS), help="worker processes")
@click.option("--dask", "dask", metavar="ADDRESS|local:N", default=None,
              help="run on a Dask distributed cluster (a scheduler address, or local:N for N local workers) "
                   "instead of --jobs; needs the dask extra")
@click.option("--driver", default="builtin", show_default=True,
              help="the mirroring driver: builtin or package.module:ClassName")
@click.option("--findings", "findings_dir", default="findings", show_default=True, help="reproducer directory")
@click.option("--scheduler", type=click.Choice(["mixed", "switch", "random", "pct"]), default="mixed",
              show_default=True, help="switch: Hypothesis-drawn bounded switch lists (shrunk by Hypothesis); "
              "random / pct: seeded per-step schedules (greedy shrinking); mixed: both, alternating")
@seed_option("--seed", default=0, show_default=True, help="campaign seed")
@click.option("--every-step", is_flag=True, help="run the page-count walk at every step (slow)")
@click.option("--kinds", default=None, help="comma-separated VMA kinds to generate (default: all available)")
@click.option("--events", default=None, help="comma-separated background events (default: all; 'none' for none)")
@click.option("--fresh", is_flag=True,
              help="start the seed sequence again (default: continue where a campaign with the same options "
                   "and --findings stopped)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
def command(kernel: str, seconds: float | None, runs: int | None, jobs: int, dask: str | None, driver: str,
            findings_dir: str,
            scheduler: str, seed: int, every_step: bool, kinds: str | None, events: str | None, fresh: bool,
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

    from hmmirror.sim.fuzz import Config
    cfg = Config(kernel=kernel, driver=driver, seconds=seconds or 0.0, jobs=jobs, findings_dir=findings_dir,
                 scheduler=scheduler, seed=seed, every_step=every_step, kinds=kind_t, events=ev_t, fresh=fresh)
    if runs is not None:
        cfg.runs = runs
    result = _run_with_progress(cfg, kernel, seconds, as_json, executor)
    _summary(result, kernel)
    if as_json:
        out = {"findings": [{k: f[k] for k in ("invariant", "location", "reproducer", "seed")}
                            for f in result["findings"]],
               "runs": result["runs"], "generated": result["generated"], "steps": result["steps"],
               "interrupted": bool(result.get("interrupted"))}
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

        def update(state: dict) -> None:
            done = min(time.time() - t0, total) if seconds else min(state["runs"], total)
            progress.update(task, completed=done, info=f"{state['runs']} runs  {state['steps']} steps  "
                                                      f"{len(state['findings'])} findings")

        result = run_campaign(cfg, update, executor)          # type: ignore[arg-type]
        if not result.get("interrupted"):
            progress.update(task, completed=total)
    return result


def _summary(result: dict, kernel: str) -> None:
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    head = "interrupted: " if result.get("interrupted") else ""
    table = Table(title=f"{head}hmmirror fuzz --kernel {kernel}: {result['runs']} runs, {result['steps']} steps, "
                        f"{len(result['findings'])} findings")
    for col in ("invariant", "location", "reproducer", "seed"):
        table.add_column(col)
    for f in result["findings"]:
        table.add_row(f["invariant"], f["location"], f["reproducer"], str(f["seed"]))
    err.print(table)
    for e in result["errors"]:
        err.print(f"[red]{e}")
