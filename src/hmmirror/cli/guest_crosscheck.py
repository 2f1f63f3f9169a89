"""``hmmirror crosscheck --guest``: the cross-check against the test guest (see :mod:`hmmirror.cli.guest`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def run_guest_crosscheck(files: tuple[str, ...], nrandom: int | None, seed: int, save: str | None, as_json: bool,
                         max_disagreements: int, print_report: Callable[[Any, int], None]) -> None:
    """Scenario files or ``--random N`` guest scenarios, in the guest and the model; exit 0 when every
    compared field agrees, 1 on disagreements (or a model crash), 2 on bad input or missing prerequisites."""
    from rich.console import Console
    from rich.progress import Progress

    from hmmirror.cli.guest import _guarded, _interruptible, _need_qemu, ensure_guest
    from hmmirror.live.crosscheck import Report
    from hmmirror.live.guest.crosscheck import crosscheck_guest
    from hmmirror.live.randscen import random_scenario
    from hmmirror.scenario import schema

    if nrandom:
        texts = [(f"random-guest-{seed}-{i}.toml", random_scenario(seed, i, guest=True)) for i in range(nrandom)]
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            for name, text in texts:
                (Path(save) / name).write_text(text)
        scenarios = [schema.parse(text, file=name) for name, text in texts]
    else:
        scenarios = [schema.load(f) for f in files]

    @_guarded
    def go() -> tuple[Report, dict[str, Any]]:
        _need_qemu()
        art = ensure_guest(quiet=as_json)
        report = Report()
        console = Console(stderr=True)
        with Progress(console=console, transient=True, disable=as_json and not console.is_terminal) as progress:
            task = progress.add_task("crosscheck (guest)", total=len(scenarios))
            info = _interruptible(lambda: crosscheck_guest(art, scenarios, report,
                                                           lambda _n: progress.advance(task)))
        return report, info

    report, info = go()
    if as_json:
        doc = report.to_json()
        doc["guest"] = info
        click.echo(json.dumps(doc, indent=1))
    else:
        Console().print(f"guest: {info['boots']} boot(s), {info['guest_seconds']:.1f} s in the guest "
                        f"({info['accel']}); model profile {info['profile']}")
        print_report(report, max_disagreements)
    sys.exit(1 if report.disagreements or report.crashes else 0)
