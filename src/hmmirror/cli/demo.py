"""``hmmirror demo [--json] [--kernel 5.2|6.x] [--png OUT]``: the seed's setting on an embedded scenario.

A machine with a 4 GiB fsdax pmem0 (ext4 ``-o dax``) and a 2 GiB device-dax pmem1 (align 1G); one process maps
a DAX file twice (misaligned -> PTEs, 2 MiB aligned -> PMD leaves) and the device-dax device once (-> one PUD
leaf), touches them, and the demo shows the VMAs and the resulting page tables.  The scenario is
``hmmirror/data/demo.toml`` (``hmmirror run`` accepts a copy of it).
"""

from __future__ import annotations

from importlib import resources

import click
from rich.console import Console
from rich.text import Text

from hmmirror.errors import InputError
from hmmirror.profiles import get_profile
from hmmirror.scenario import parse, run
from hmmirror.scenario.report import dumps, ops_table, pagetables_json, vma_views, vmas_json, vmas_table
from hmmirror.viz.pagetables import draw_png, render_tree

DEMO = "demo.toml"


def demo_text() -> str:
    """The embedded demo scenario (TOML text)."""
    return resources.files("hmmirror").joinpath("data").joinpath(DEMO).read_text(encoding="utf-8")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON with the keys kernel, vmas, page_tables, records")
@click.option("--kernel", type=click.Choice(["5.2", "6.12", "6.18", "6.x"]), default="6.18", show_default=True,
              help="kernel profile")
@click.option("--png", "png", metavar="OUT", type=click.Path(dir_okay=False), help="draw the page tables into OUT")
def command(as_json: bool, kernel: str, png: str | None) -> int:
    """Map pmem through fsdax (PTE and PMD) and device-dax (PUD) and show the resulting page tables."""
    from hmmirror.cli.common import check_output_file

    check_output_file(png, "--png")
    scn = parse(demo_text(), DEMO)
    try:
        r = run(scn, get_profile(kernel).name)
    except InputError as exc:
        if exc.errno_name == "ENOSYS":   # a DAX piece of the model is missing from this build
            raise InputError(f"demo cannot run yet: {exc}") from None
        raise
    proc = scn.processes[0]
    views = vma_views(r, proc)
    if png:
        draw_png(views, png, f"hmmirror demo: DAX page tables of process {proc} (kernel {r.kernel})")
    from hmmirror.cli.demo_mirror import mirror_story

    story = mirror_story(r, proc)
    if as_json:
        doc = pagetables_json(r, proc, views)
        doc.update(story)
        click.echo(dumps(doc))
        return 0 if r.ok else 1
    console = Console()
    console.print(Text(scn.title, style="bold"))
    console.print(Text(scn.description, style="dim"))
    console.print(ops_table(r))
    for rec in r.records:
        for m in rec.mismatches:
            console.print(Text(f"  op {rec.index} ({rec.op}, line {rec.line}): {m}", style="red"))
    console.print(vmas_table(vmas_json(r, proc), f"VMAs of process {proc}"))
    for v in views:
        console.print(render_tree(v))
    console.print(_mirror_table(story))
    n_exp = sum(1 for x in r.records if x.expect_ok is not None)
    console.print(Text(f"{n_exp} expectations from mm-substrate.md §5.7/§5.8: "
                       + ("all met" if r.ok else "some FAILED"), style="green" if r.ok else "bold red"))
    if png:
        console.print(f"wrote {png}")
    return 0 if r.ok else 1


def _mirror_table(story: dict) -> "Table":  # type: ignore[type-arg]
    """The device's entries beside the CPU's, per mirrored range, and the pgmap references."""
    from rich.table import Table

    t = Table("range", "page", "CPU entry", "device entry (pfns[])", "snapshot",
              title=f"mirrored through {story['api']}; pgmap refs before {story['pgmap_refs']['before']} "
                    f"after {story['pgmap_refs']['after']}")
    for m in story["mirror"]:
        snap = m.get("snapshot") or []
        for i, (cpu, raw) in enumerate(zip(m["cpu"], m["pfns"])):
            if i >= 2:
                break
            c = f"{cpu['kind']} {cpu['level']} pfn {cpu['pfn']} {'rw' if cpu['write'] else 'ro'}"
            t.add_row(m["range"] if i == 0 else "", str(i), c, raw, f"{snap[i]:#04x}" if i < len(snap) else "")
    return t
