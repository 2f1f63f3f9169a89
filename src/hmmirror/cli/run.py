"""``hmmirror run FILE... [--json] [--kernel K]``: execute scenario files on the model.

Exit code 0 when every expectation held, 1 when one failed (or a model bug stopped a run), 2 on bad input.
"""

from __future__ import annotations

import click
from rich.console import Console

from hmmirror.scenario import load, run
from hmmirror.scenario.report import dumps, print_run, runs_json


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document: records per operation")
@click.option("--kernel", metavar="VERSION", help="override [machine].kernel (5.2, 6.18 or 6.x)")
@click.option("--no-pages", is_flag=True, help="do not print the per-page tables of inspect operations")
def command(files: tuple[str, ...], as_json: bool, kernel: str | None, no_pages: bool) -> int:
    """Run scenario FILE(s) (docs/scenarios.md) and report every operation's result.

    Every file is validated before anything runs.  Exit code 1 if an expectation failed.
    """
    scenarios = [load(f) for f in files]
    runs = [run(s, kernel) for s in scenarios]
    if as_json:
        click.echo(dumps(runs_json(runs)))
    else:
        console = Console()
        for r in runs:
            print_run(r, console, pages=not no_pages)
    return 0 if all(r.ok for r in runs) else 1
