"""``hmmirror run FILE... [--json] [--kernel K]``: execute scenario files on the model.

Exit code 0 when every expectation held, 1 when one failed (or a model bug stopped a run), 2 on bad input.
"""

from __future__ import annotations

import click
from rich.console import Console

from hmmirror.cli.common import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK
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
    if kernel is not None:
        from hmmirror.profiles import get_profile
        get_profile(kernel)
    runs = []
    interrupted = False
    try:
        for s in scenarios:
            runs.append(run(s, kernel))
    except KeyboardInterrupt:              # report the scenarios that ran, then exit code 130
        interrupted = True
    if as_json:
        doc = runs_json(runs)
        if interrupted and isinstance(doc, dict):
            doc["interrupted"] = True
        click.echo(dumps(doc))
    else:
        console = Console()
        for r in runs:
            print_run(r, console, pages=not no_pages)
    if interrupted:
        click.echo(f"hmmirror: interrupted after {len(runs)} of {len(scenarios)} scenarios", err=True)
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.ok for r in runs) else EXIT_FOUND
