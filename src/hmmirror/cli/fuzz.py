"""``hmmirror fuzz``: a fuzzing campaign of the interleaving simulator (see docs/simulator.md)."""

from __future__ import annotations

import json
import sys
import time

import click

from hmmirror.errors import InputError


@click.command()
@click.option("--kernel", default="6.18", show_default=True, help="kernel profile: 5.2 or 6.18")
@click.option("--seconds", default=60.0, show_default=True, type=float, help="campaign length")
@click.option("--jobs", default=1, show_default=True, type=int, help="worker processes")
@click.option("--driver", default="builtin", show_default=True,
              help="the mirroring driver: builtin or package.module:ClassName")
@click.option("--findings", "findings_dir", default="findings", show_default=True, help="reproducer directory")
@click.option("--scheduler", type=click.Choice(["mixed", "switch", "random", "pct"]), default="mixed",
              show_default=True, help="switch: Hypothesis-drawn bounded switch lists (shrunk by Hypothesis); "
              "random / pct: seeded per-step schedules (greedy shrinking); mixed: both, alternating")
@click.option("--seed", default=0, show_default=True, type=int, help="campaign seed")
@click.option("--every-step", is_flag=True, help="run the page-count walk at every step (slow)")
@click.option("--kinds", default=None, help="comma-separated VMA kinds to generate (default: all available)")
@click.option("--events", default=None, help="comma-separated background events (default: all; 'none' for none)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
def command(kernel: str, seconds: float, jobs: int, driver: str, findings_dir: str, scheduler: str, seed: int,
            every_step: bool, kinds: str | None, events: str | None, as_json: bool) -> None:
    """Fuzz the model and a mirroring driver under random interleavings; save shrunk reproducers."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from hmmirror.profiles import get_profile
    from hmmirror.sim.driver import check_driver, load_driver
    from hmmirror.sim.fuzz import Config, run_campaign

    get_profile(kernel)
    if seconds <= 0 or jobs <= 0:
        raise InputError("--seconds and --jobs must be positive")
    if driver != "builtin":
        check_driver(load_driver(driver)())
    from hmmirror.sim.scenario import EVENT_KINDS, VMA_KINDS
    kind_t = tuple(k for k in kinds.split(",") if k) if kinds else None
    ev_t = () if events == "none" else (tuple(e for e in events.split(",") if e) if events else None)
    for k in kind_t or ():
        if k not in VMA_KINDS:
            raise InputError(f"--kinds: unknown VMA kind {k!r} (use {', '.join(VMA_KINDS)})")
    for e in ev_t or ():
        if e not in EVENT_KINDS:
            raise InputError(f"--events: unknown event {e!r} (use {', '.join(EVENT_KINDS)})")
    cfg = Config(kernel=kernel, driver=driver, seconds=seconds, jobs=jobs, findings_dir=findings_dir,
                 scheduler=scheduler, seed=seed, every_step=every_step, kinds=kind_t, events=ev_t)
    err = Console(stderr=True)
    t0 = time.time()
    with Progress(TextColumn("[bold]fuzz {task.fields[kernel]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        task = progress.add_task("fuzz", total=seconds, kernel=kernel, info="")

        def update(state: dict) -> None:
            el = min(time.time() - t0, seconds)
            progress.update(task, completed=el, info=f"{state['runs']} runs  {state['steps']} steps  "
                                                     f"{len(state['findings'])} findings")

        result = run_campaign(cfg, update)
        progress.update(task, completed=seconds)
    table = Table(title=f"hmmirror fuzz --kernel {kernel}: {result['runs']} runs, {result['steps']} steps, "
                        f"{len(result['findings'])} findings")
    for col in ("invariant", "location", "reproducer", "seed"):
        table.add_column(col)
    for f in result["findings"]:
        table.add_row(f["invariant"], f["location"], f["reproducer"], str(f["seed"]))
    err.print(table)
    for e in result["errors"]:
        err.print(f"[red]{e}")
    if as_json:
        out = {"findings": [{k: f[k] for k in ("invariant", "location", "reproducer", "seed")}
                            for f in result["findings"]],
               "runs": result["runs"], "steps": result["steps"]}
        sys.stdout.write(json.dumps(out) + "\n")
