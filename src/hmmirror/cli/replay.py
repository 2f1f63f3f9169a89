"""``hmmirror replay``: re-execute a reproducer (or a seeded run) exactly; draw it as swim lanes."""

from __future__ import annotations

import json
import sys

import click

from hmmirror.errors import InputError


@click.command()
@click.argument("file", required=False)
@click.option("--seed", type=int, default=None, help="replay the seeded run SEED instead of a file")
@click.option("--kernel", default="6.18", show_default=True, help="kernel profile of a --seed run")
@click.option("--driver", default="builtin", show_default=True, help="driver of a --seed run")
@click.option("--png", "png", default=None, help="draw the interleaving as swim lanes into this PNG")
@click.option("--log", "log", default=None, help="write the event log and trace to this file")
@click.option("--every-step", is_flag=True, help="run the page-count walk at every step")
@click.option("--json", "as_json", is_flag=True, help="print the outcome as JSON")
def command(file: str | None, seed: int | None, kernel: str, driver: str, png: str | None, log: str | None,
            every_step: bool, as_json: bool) -> None:
    """Replay FILE (a reproducer written by ``hmmirror fuzz``) and check that its finding happens again."""
    from hmmirror.sim.replay import replay_file, seeded_run

    if (file is None) == (seed is None):
        raise InputError("give a reproducer FILE or --seed N")
    expected = None
    if file is not None:
        rep = replay_file(file, every_step)
        res, expected, ok = rep.result, rep.expected, rep.reproduced
    else:
        from hmmirror.profiles import get_profile
        get_profile(kernel)
        res = seeded_run(kernel, int(seed), driver, every_step)      # type: ignore[arg-type]
        ok = True
    if log:
        with open(log, "wb") as fh:
            fh.write(res.log_bytes())
    if png:
        from hmmirror.sim.lanes import draw_lanes
        draw_lanes(res, png)
    f = res.finding
    if as_json:
        sys.stdout.write(json.dumps({"reproduced": ok, "steps": res.steps, "diverged": res.diverged,
                                     "finding": f.to_json() if f else None}) + "\n")
    else:
        click.echo(f"{res.steps} steps" + (f", schedule diverged: {res.diverged}" if res.diverged else ""))
        click.echo(f.describe() if f else "no finding")
        if expected is not None:
            click.echo(("reproduced: " if ok else "NOT reproduced, expected: ") + str(expected.get("signature")))
    if not ok:
        sys.exit(1)
