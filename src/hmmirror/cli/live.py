"""``hmmirror live PID START END [--json]``: the per-page state of a real process's address range."""

from __future__ import annotations

import json
from itertools import groupby

import click
from rich.console import Console
from rich.table import Table

from hmmirror.errors import InputError
from hmmirror.include.pagestate import PageState
from hmmirror.live.pagemap import read_range

#: Fields that must be equal for pages to share one table row.
_ROW_FIELDS = ("present", "kind", "level", "write", "zero", "huge", "file", "exclusive", "swapped", "protnone")


def parse_address(text: str, what: str) -> int:
    """An address in decimal or ``0x`` hex (InputError otherwise)."""
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise InputError(f"bad {what} {text!r}: use decimal or 0x hex") from None
    if value < 0:
        raise InputError(f"bad {what} {text!r}: negative")
    return value


#: Flag letters of the ``flags`` column, in order.
_FLAG_LETTERS = (("present", "P"), ("zero", "Z"), ("huge", "H"), ("file", "F"), ("exclusive", "X"),
                 ("swapped", "S"), ("protnone", "N"), ("write", "W"))
_LEGEND = ("flags: P present, Z zero page, H huge leaf, F file (bit 61), X exclusive, S swap-format, "
           "N protnone, W writable; '-' no, '?' unknown")


def _flags(p: PageState) -> str:
    """``PZHFXSNW``-style flag string: the letter when true, ``-`` when false, ``?`` when unknown."""
    out = []
    for name, letter in _FLAG_LETTERS:
        v = getattr(p, name)
        out.append("?" if v is None else (letter if v else "-"))
    return "".join(out)


def _pfn_summary(pages: list[PageState]) -> str:
    """Pfn column of a run: ``-``, one pfn, a contiguous range or a count of distinct pfns."""
    pfns = [p.pfn for p in pages]
    if all(p is None for p in pfns):
        return "-"
    known = [p for p in pfns if p is not None]
    if len(set(known)) == 1:
        return f"{known[0]:#x}" + (f" (x{len(known)})" if len(known) > 1 else "")
    if len(known) == len(pfns) and all(b == a + 1 for a, b in zip(known, known[1:])):
        return f"{known[0]:#x}-{known[-1]:#x}"
    return f"{len(set(known))} distinct"


def runs(pages: list[PageState], per_page: bool = False) -> list[tuple[int, list[PageState]]]:
    """Consecutive pages with equal state fields, as ``(first page index, pages)``."""
    if per_page:
        return [(i, [p]) for i, p in enumerate(pages)]
    out, i = [], 0
    for _key, grp in groupby(pages, key=lambda p: tuple(getattr(p, f) for f in _ROW_FIELDS)):
        g = list(grp)
        out.append((i, g))
        i += len(g)
    return out


def render_table(pid: int, pages: list[PageState], per_page: bool = False) -> Table:
    """A rich table: one row per run of identical pages (or per page)."""
    t = Table(title=f"pid {pid}: {len(pages)} pages", caption=_LEGEND)
    for col in ("pages", "address", "n", "pfn", "kind", "level", "flags"):
        t.add_column(col, justify="right" if col == "n" else "left", no_wrap=True)
    for first, g in runs(pages, per_page):
        p = g[0]
        idx = f"{first}" if len(g) == 1 else f"{first}-{first + len(g) - 1}"
        t.add_row(idx, f"{p.addr:#x}", str(len(g)), _pfn_summary(g), p.kind, p.level or "-", _flags(p))
    return t


@click.command()
@click.argument("pid", type=int)
@click.argument("start")
@click.argument("end")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--per-page", is_flag=True, help="one table row per page (no run compression)")
def command(pid: int, start: str, end: str, as_json: bool, per_page: bool) -> None:
    """Show the per-page state of [START, END) in process PID (decimal or 0x hex addresses).

    Reads /proc/PID/pagemap, /proc/kpageflags and the PAGEMAP_SCAN ioctl; read-only on the target.
    """
    lo, hi = parse_address(start, "START"), parse_address(end, "END")
    pages = read_range(pid, lo, hi)
    if as_json:
        click.echo(json.dumps({"pid": pid, "start": hex(lo), "end": hex(hi),
                               "pages": [p.to_json() for p in pages]}))
        return
    Console().print(render_table(pid, pages, per_page))
