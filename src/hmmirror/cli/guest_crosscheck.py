"""``hmmirror crosscheck --guest``: the cross-check against the test guest (see :mod:`hmmirror.cli.guest`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hmmirror.cli.common import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, prepare_output_dir


def run_guest_crosscheck(files: tuple[str, ...], nrandom: int | None, seed: int, save: str | None, as_json: bool,
                         max_disagreements: int, print_report: Callable[[Any, int], None]) -> int:
    """Scenario files or ``--random N`` guest scenarios, in the guest and the model.  Exit code 0 when every
    compared field agrees, 1 on disagreements, a model crash or a guest that did not finish, 2 on bad input or
    missing prerequisites, 130 when interrupted (the summary so far is printed)."""
    from rich.console import Console
    from rich.progress import Progress

    from hmmirror.cli.guest import _fail, _need_qemu, ensure_guest
    from hmmirror.live.crosscheck import Report
    from hmmirror.live.guest import vm
    from hmmirror.live.guest.crosscheck import crosscheck_guest, new_info
    from hmmirror.live.randscen import random_scenario
    from hmmirror.scenario import schema

    if save:
        prepare_output_dir(save, "--save")
    if nrandom:
        texts = [(f"random-guest-{seed}-{i}.toml", random_scenario(seed, i, guest=True)) for i in range(nrandom)]
        if save:
            for name, text in texts:
                (Path(save) / name).write_text(text)
        scenarios = [schema.parse(text, file=name) for name, text in texts]
    else:
        scenarios = [schema.load(f) for f in files]
    _need_qemu()
    art = ensure_guest(quiet=as_json)
    report = Report()
    info = new_info()
    console = Console(stderr=True)
    interrupted = False
    with Progress(console=console, transient=True, disable=as_json and not console.is_terminal) as progress:
        task = progress.add_task("crosscheck (guest)", total=len(scenarios))
        try:
            crosscheck_guest(art, scenarios, report, lambda _n: progress.advance(task), info=info)
        except KeyboardInterrupt:          # the summary so far, then exit code 130
            interrupted = True
        except vm.GuestError as exc:
            _fail(EXIT_FOUND, f"the guest did not finish: {exc}; last console lines: {exc.tail(5)!r}")
    for name, reason in report.skipped:              # never silent, also with --json (on stderr)
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    if as_json:
        doc = report.to_json()
        doc["guest"] = info
        if interrupted:
            doc["interrupted"] = True
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(f"guest: {info['boots']} boot(s), {info['guest_seconds']:.1f} s in the guest ({info['accel']}); "
                   f"model profile {info['profile']}")
        print_report(report, max_disagreements)
    if interrupted:
        click.echo("hmmirror: interrupted", err=True)
        return EXIT_INTERRUPTED
    return EXIT_FOUND if (report.disagreements or report.crashes) else EXIT_OK
