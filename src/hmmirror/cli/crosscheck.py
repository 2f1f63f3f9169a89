"""``hmmirror crosscheck``: run scenarios on the real kernel and on the model, compare page by page."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hmmirror.cli.common import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, prepare_output_dir, seed_option
from hmmirror.errors import InputError

#: Upper bound of ``--random``: the scenarios are generated before the first one runs (a few ms each), and
#: one takes ~0.1-2 s on the host or in the guest -- 10,000 is hours with a progress bar, not days silently.
MAX_RANDOM = 10_000


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--random", "nrandom", type=click.IntRange(1, MAX_RANDOM), default=None,
              help=f"Generate N random scenarios instead of reading files (N <= {MAX_RANDOM}).")
@seed_option("--seed", default=1, show_default=True, help="Seed of the random scenarios.")
@click.option("--save", type=click.Path(file_okay=False), default=None,
              help="Write the generated scenarios (TOML) into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--max-disagreements", type=click.IntRange(0, 1 << 20), default=20, show_default=True,
              help="How many disagreements the table lists.")
@click.option("--guest", is_flag=True,
              help="Run the real side in the test guest (Linux 6.12 with test_hmm and emulated pmem; see "
                   "`hmmirror guest`) instead of this machine; dmirror results are compared too.")
def command(files: tuple[str, ...], nrandom: int | None, seed: int, save: str | None, as_json: bool,
            max_disagreements: int, guest: bool) -> int:
    """Run scenarios in real child processes and in the model; report per-field agreement.

    Exit code 1 when the model and the kernel disagree (or the model crashed on a scenario).
    """
    from rich.console import Console
    from rich.progress import Progress

    from hmmirror.live import hostenv
    from hmmirror.live.crosscheck import Report, crosscheck_scenario
    from hmmirror.live.randscen import random_scenario
    from hmmirror.scenario import schema

    if bool(files) == bool(nrandom):
        raise click.UsageError("give scenario FILES or --random N (not both)")
    if guest:
        from hmmirror.cli.guest_crosscheck import run_guest_crosscheck

        return run_guest_crosscheck(files, nrandom, seed, save, as_json, max_disagreements, _print)
    reason = hostenv.why_not_live()
    if reason:
        raise InputError(f"crosscheck needs the live kernel: {reason}", "EPERM")
    if save:
        prepare_output_dir(save, "--save")
    if nrandom:
        texts = [(f"random-{seed}-{i}.toml", random_scenario(seed, i)) for i in range(nrandom)]
        if save:
            for name, text in texts:
                (Path(save) / name).write_text(text)
        scenarios = [schema.parse(text, file=name) for name, text in texts]
    else:
        scenarios = [schema.load(f) for f in files]
    report = Report()
    host_thp = hostenv.thp_settings()
    console = Console(stderr=True)
    interrupted = False
    with Progress(console=console, transient=True, disable=as_json and not console.is_terminal) as progress:
        task = progress.add_task("crosscheck", total=len(scenarios))
        try:
            for scn in scenarios:
                crosscheck_scenario(scn, report, host_thp)
                progress.advance(task)
        except KeyboardInterrupt:          # the summary so far, then exit code 130
            interrupted = True
    for name, reason in report.skipped:              # never silent, also with --json (on stderr)
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    if as_json:
        doc = report.to_json()
        if interrupted:
            doc["interrupted"] = True
        click.echo(json.dumps(doc, indent=1))
    else:
        _print(report, max_disagreements)
    if interrupted:
        click.echo("hmmirror: interrupted", err=True)
        return EXIT_INTERRUPTED
    return EXIT_FOUND if (report.disagreements or report.crashes) else EXIT_OK


def _print(report: "object", limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from hmmirror.live.crosscheck import Report, summary_rows, top_disagreements

    assert isinstance(report, Report)
    con = Console()
    pct = 100.0 * report.agree / report.pages if report.pages else 100.0
    skipped = f", [yellow]{len(report.skipped)} skipped[/] (see the end)" if report.skipped else ""
    crashed = f", [red]{len(report.crashes)} model crashes[/]" if report.crashes else ""
    con.print(f"{report.scenarios} scenarios compared{skipped}{crashed}; {report.pages} pages compared, "
              f"{report.agree} agree on every field ({pct:.2f}%)")
    t = Table("field", "agree", "compared", "agreement", title="agreement per field")
    for fld, ok, n, ratio in summary_rows(report):
        t.add_row(fld, str(ok), str(n), f"{100 * ratio:.2f}%")
    con.print(t)
    if report.disagreements:
        k = Table("field", "model", "kernel", "count", title="most frequent disagreements")
        for (fld, mv, rv), n in top_disagreements(report):
            k.add_row(fld, mv, rv, str(n))
        con.print(k)
        d = Table("scenario", "op", "page", "field", "model", "kernel", "after", title="disagreements")
        for x in report.disagreements[:limit]:
            d.add_row(x.scenario, str(x.op_index), "" if x.page is None else str(x.page), x.field,
                      repr(x.model), repr(x.real), x.produced_by or "")
        con.print(d)
    for name, err in report.crashes:
        con.print(f"[red]model crashed[/] {name}: {err}")
    for name, reason in report.skipped:
        con.print(f"[yellow]skipped[/] {name}: {reason}")
    if report.skipped:
        con.print(f"[yellow]{len(report.skipped)} of {report.scenarios + len(report.skipped) + len(report.crashes)} "
                  "scenarios were skipped: their pages are not in the figures above[/]")
