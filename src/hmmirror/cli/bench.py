"""``hmmirror bench [--json]``: the fast walk against the reference walk and the real kernel's walk.

For each case (2 GiB of 4 KiB pages, 2 GiB THP, 2 GiB fsdax PMDs, 1 GiB device-dax PUD, 64 GiB of holes) and
each kernel profile: the model's fast snapshot, the reference snapshot on a smaller range (scaled per page),
and -- in this process, over real mappings of the same shape -- the kernel's ``/proc/self/pagemap`` read and
``PAGEMAP_SCAN``; ns per page and the ratios model/kernel; the fault-in of 2 GiB by the fast
``hmm_range_fault``; bytes of model state per mapped page.  See :mod:`hmmirror.fast.bench`.
"""

from __future__ import annotations

import json
import sys

import click

from hmmirror.errors import InputError
from hmmirror.fast.bench import SPECS, format_table, run_bench


@click.command()
@click.option("--json", "as_json", is_flag=True, help='Print {"cases": [...], "notes": [...]} as JSON.')
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 50),
              help="Timed runs per measurement (the median is reported; one warm-up run is excluded).")
@click.option("--profile", "profiles", multiple=True, type=click.Choice(["6.18", "6.12", "5.2"]),
              help="Kernel profile(s) to measure (default: both).")
@click.option("--case", "cases", multiple=True, type=click.Choice([s.name for s in SPECS]),
              help="Only these cases (default: all).")
@click.option("--no-kernel", is_flag=True, help="Skip the real-kernel measurements.")
def command(as_json: bool, runs: int, profiles: tuple[str, ...], cases: tuple[str, ...], no_kernel: bool) -> None:
    """Benchmark the fast HMM walk against the reference walk and the host kernel's pagemap walk."""
    def progress(msg: str) -> None:
        if not as_json:
            click.echo(f"  measuring {msg} ...", err=True)

    try:
        result = run_bench(profiles or ("6.18", "5.2"), runs, kernel=not no_kernel, cases=cases or None,
                           progress=progress)
    except MemoryError:
        raise InputError("not enough memory for the benchmark ranges (2 GiB model + 2 GiB real mappings)",
                         "ENOMEM") from None
    if as_json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        click.echo(format_table(result))
