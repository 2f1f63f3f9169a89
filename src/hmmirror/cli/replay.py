"""``hmmirror replay``: re-execute a reproducer (or a seeded run) exactly; draw it as swim lanes."""

from __future__ import annotations

import json
import sys

import click

from hmmirror.cli.common import EXIT_FOUND, EXIT_OK, check_output_file, resolve_driver, seed_option
from hmmirror.errors import InputError


@click.command()
@click.argument("file", required=False)
@seed_option("--seed", default=None, help="replay the seeded run SEED instead of a file")
@click.option("--kernel", default="6.18", show_default=True, help="kernel profile of a --seed run")
@click.option("--driver", default="builtin", show_default=True, help="driver of a --seed run")
@click.option("--png", "png", metavar="OUT", default=None,
              help="draw the interleaving as swim lanes, with the pages' placement band, into this PNG")
@click.option("--log", "log", metavar="OUT", default=None, help="write the event log and trace to this file")
@click.option("--every-step", is_flag=True, help="run the page-count walk at every step")
@click.option("--json", "as_json", is_flag=True, help="print the outcome as JSON")
def command(file: str | None, seed: int | None, kernel: str, driver: str, png: str | None, log: str | None,
            every_step: bool, as_json: bool) -> int:
    """Replay FILE (a reproducer written by ``hmmirror fuzz``) and check that its finding happens again.

    Exit code 1 when the saved finding did not happen again (or the schedule diverged).
    """
    from hmmirror.sim.replay import replay_file, seeded_run

    if (file is None) == (seed is None):
        raise click.UsageError("give a reproducer FILE or --seed N (not both)")
    check_output_file(log, "--log")
    check_output_file(png, "--png")
    expected = None
    timeline = None
    if png:
        from hmmirror.sim.placement import PlaceTimeline
        timeline = PlaceTimeline()               # the placement band: where the pages live, step by step
    if file is not None:
        from hmmirror.scenario.schema import load_sim
        doc = load_sim(file)                        # bad input: one line naming FILE:LINE
        resolve_driver(str(doc["sim"].get("driver", "builtin")), None, f"{file}: sim.driver")
        rep = replay_file(file, every_step, placement=timeline)
        res, expected, ok = rep.result, rep.expected, rep.reproduced
    else:
        from hmmirror.profiles import get_profile
        kernel = get_profile(kernel).name
        resolve_driver(driver, kernel)
        res = seeded_run(kernel, int(seed), driver, every_step, placement=timeline)  # type: ignore[arg-type]
        ok = True
    if log:
        with open(log, "wb") as fh:
            fh.write(res.log_bytes())
    if png:
        from hmmirror.sim.lanes import draw_lanes
        draw_lanes(res, png)
    f = res.finding
    if expected is not None:                        # a run can break several invariants: show the saved one
        f = next((x for x in res.findings if x.signature == expected.get("signature")), f)
    others = [x for x in res.findings if x is not f]
    if as_json:
        sys.stdout.write(json.dumps({"reproduced": ok, "steps": res.steps, "diverged": res.diverged,
                                     "finding": f.to_json() if f else None,
                                     "also": [x.to_json() for x in others],
                                     "consequences": [x.to_json() for x in getattr(res, "consequences", [])]})
                         + "\n")
    else:
        click.echo(f"{res.steps} steps" + (f", schedule diverged: {res.diverged}" if res.diverged else ""))
        click.echo(f.describe() if f else "no finding")
        for x in others:
            click.echo(f"also: [{x.invariant}] {x.signature} (step {x.step})")
        for x in getattr(res, "consequences", []):
            click.echo(f"consequence of {x.state.get('consequence_of')}: [{x.invariant}] {x.message} (step {x.step})")
        if expected is not None:
            click.echo(("reproduced: " if ok else "NOT reproduced, expected: ") + str(expected.get("signature")))
    return EXIT_OK if ok else EXIT_FOUND
