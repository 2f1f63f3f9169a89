"""``hmmirror show FILE [--proc P] [--range START:END] [--png OUT] [--json]``: a range's page tables.

Runs the scenario, then prints the page tables of the range as a tree (PGD, P4D with 5-level paging, PUD,
PMD, PTE; runs of equal leaves compressed), or draws them with ``--png``.  Without ``--range``: every VMA of
the process.  START and END are addresses: decimal, ``0x`` hex or ``NAME+OFFSET`` of the scenario; a single
``NAME`` is that mapping.
"""

from __future__ import annotations

import click
from rich.console import Console

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import InputError
from hmmirror.scenario import load, run
from hmmirror.scenario.report import dumps, pagetables_json, vma_views, vmas_json, vmas_table
from hmmirror.scenario.runner import Run, Unresolved
from hmmirror.scenario.schema import parse_addr
from hmmirror.viz.pagetables import draw_png, render_tree


def parse_range(text: str, r: Run) -> tuple[int, int]:
    """``START:END`` or ``NAME`` (a mapping of the run) -> page-aligned ``(start, end)``."""
    top = r.machine.geo.task_size
    if ":" not in text:
        a = parse_addr(text, "--range")
        if a.name is None or a.offset or r.ctx.names.get(a.name, (0, None))[1] is None:
            raise InputError(f"bad --range {text!r}: use START:END or the name of a mapping")
        start, length = r.ctx.names[a.name]
        return start, start + (length or 0)
    lo_s, hi_s = text.split(":", 1)
    try:
        lo = r.ctx.resolve(parse_addr(lo_s, "--range start"))
        hi = r.ctx.resolve(parse_addr(hi_s, "--range end"))
    except Unresolved as exc:
        raise InputError(f"--range: {exc}") from None
    except InputError as exc:
        raise InputError(f"--range {text!r}: {exc}") from None
    if hi <= lo:
        raise InputError(f"--range {text!r}: END must be above START")
    if hi > top:
        raise InputError(f"--range {text!r} is outside the user address space [0, {top:#x})")
    return lo & ~(PAGE_SIZE - 1), -(-hi // PAGE_SIZE) * PAGE_SIZE


@click.command()
@click.argument("file")
@click.option("--proc", "proc", metavar="NAME", help="process (default: the first [[process]])")
@click.option("--range", "range_", metavar="START:END", help="address range, e.g. buf:buf+4M (default: every VMA)")
@click.option("--png", "png", metavar="OUT", type=click.Path(dir_okay=False), help="draw the tables into OUT")
@click.option("--json", "as_json", is_flag=True, help="print JSON (vmas, page_tables, records)")
@click.option("--kernel", metavar="VERSION", help="override [machine].kernel (5.2, 6.18 or 6.x)")
def command(file: str, proc: str | None, range_: str | None, png: str | None, as_json: bool,
            kernel: str | None) -> None:
    """Run scenario FILE and show the page tables of a range of one process."""
    from hmmirror.cli.common import check_output_file

    check_output_file(png, "--png")
    scn = load(file)
    proc = proc or scn.processes[0]
    r = run(scn, kernel)
    if proc not in r.ctx.procs:
        raise InputError(f"--proc {proc!r}: no such process (known: {', '.join(r.ctx.procs)})")
    if r.ctx.procs[proc].mm.exited:
        raise InputError(f"--proc {proc!r}: the process has exited by the end of the scenario")
    ranges = [parse_range(range_, r)] if range_ else None
    views = vma_views(r, proc, ranges)
    if png:
        if not views:
            raise InputError(f"process {proc!r} has no VMA to draw")
        draw_png(views, png, f"{scn.title or file}: page tables of process {proc} (kernel {r.kernel})")
    if as_json:
        click.echo(dumps(pagetables_json(r, proc, views)))
        return
    console = Console()
    if not r.ok:
        console.print(f"[yellow]note: some expectations of {file} failed (hmmirror run {file} shows them)[/]")
    console.print(vmas_table(vmas_json(r, proc), f"VMAs of process {proc}"))
    for v in views:
        console.print(render_tree(v))
    if png:
        console.print(f"wrote {png}")
