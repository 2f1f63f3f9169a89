"""Reports of scenario runs: JSON documents and ``rich`` tables (our own helpers)."""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from hmmirror.include.pagestate import PageState
from hmmirror.scenario.runner import OpResult, Run
from hmmirror.viz.pagetables import TableView, collect, fmt_size, vma_json

#: Page fields that must be equal for pages to share one row of a page table.
ROW_FIELDS = ("present", "kind", "level", "write", "zero", "huge", "file", "exclusive", "swapped", "protnone")


def dumps(doc: Any) -> str:
    """Deterministic JSON (sorted keys)."""
    return json.dumps(doc, sort_keys=True)


def runs_json(runs: list[Run]) -> Any:
    """One run: its object; several: a list of them (``hmmirror run --json``)."""
    docs = [r.to_json() for r in runs]
    return docs[0] if len(docs) == 1 else docs


def _pfns(pages: list[PageState]) -> str:
    pfns = [p.pfn for p in pages]
    known = [p for p in pfns if p is not None]
    if not known:
        return "-"
    if len(set(known)) == 1:
        return f"{known[0]:#x}" + (f" (x{len(known)})" if len(known) > 1 else "")
    if len(known) == len(pfns) and all(b == a + 1 for a, b in zip(known, known[1:])):
        return f"{known[0]:#x}-{known[-1]:#x}"
    return f"{len(set(known))} distinct"


def page_runs(pages: list[PageState]) -> list[tuple[int, list[PageState]]]:
    """Consecutive pages with equal :data:`ROW_FIELDS`, as ``(first index, pages)``."""
    out, i = [], 0
    for _key, grp in groupby(pages, key=lambda p: tuple(getattr(p, f) for f in ROW_FIELDS)):
        g = list(grp)
        out.append((i, g))
        i += len(g)
    return out


#: One letter per boolean page field, in this order, for the compact ``flags`` column.
FLAG_LETTERS = (("present", "p"), ("write", "w"), ("zero", "z"), ("huge", "h"), ("file", "f"),
                ("exclusive", "x"), ("swapped", "s"), ("protnone", "n"))
FLAGS_LEGEND = "flags: p present, w write, z zero page, h huge, f file (pagemap), x exclusive, s swap, n protnone"


def flag_string(p: PageState) -> str:
    """``pw---x--``: the letter when the field is true, ``-`` when false, ``?`` when unknown."""
    return "".join("?" if getattr(p, f) is None else (c if getattr(p, f) else "-") for f, c in FLAG_LETTERS)


def pages_table(pages: list[PageState], title: str = "") -> Table:
    """Per-page states, one row per run of identical pages."""
    t = Table(title=title or None, title_justify="left", caption=FLAGS_LEGEND, caption_justify="left")
    for col in ("pages", "n", "address", "kind", "level", "flags", "pfn"):
        t.add_column(col, justify="right" if col == "n" else "left", no_wrap=col != "pfn")
    for first, g in page_runs(pages):
        p = g[0]
        idx = f"{first}" if len(g) == 1 else f"{first}-{first + len(g) - 1}"
        t.add_row(idx, str(len(g)), f"{p.addr:#x}", p.kind, p.level or "-", flag_string(p), _pfns(g))
    return t


def _args(rec: OpResult) -> str:
    out = []
    for k, v in rec.args.items():
        if k in ("length", "size", "offset", "align") and isinstance(v, int):
            v = fmt_size(v)
        elif isinstance(v, list):
            v = ",".join(map(str, v))
        out.append(f"{k}={v}")
    return " ".join(out)


def _result(rec: OpResult) -> Text:
    if rec.bug:
        return Text(f"MODEL BUG {rec.bug}", style="bold red")
    if rec.unsupported:
        return Text("unsupported", style="yellow")
    ret = hex(rec.ret) if rec.ret_kind == "addr" and isinstance(rec.ret, int) else rec.ret
    if rec.ok:
        return Text(f"{ret}" if ret is not None else "ok")
    return Text(rec.errno or "failed", style="red" if rec.expect_ok is not True else "")


def _verdict(rec: OpResult) -> Text:
    if rec.expect_ok is None:
        return Text("")
    return Text("ok", style="green") if rec.expect_ok else Text("FAIL", style="bold red")


def ops_table(run: Run) -> Table:
    """One row per operation: where, what, result and the expectation verdict."""
    scn = run.scenario
    t = Table(title=f"{scn.title or scn.file} (kernel {run.kernel})", title_justify="left")
    for col in ("#", "line", "proc", "op", "arguments", "result", "expect"):
        t.add_column(col, justify="right" if col in ("#", "line") else "left", overflow="fold")
    for rec in run.records:
        t.add_row(str(rec.index), str(rec.line or ""), rec.proc, rec.op, _args(rec), _result(rec), _verdict(rec))
    return t


def render_run(run: Run, pages: bool = True) -> Group:
    """The ops table, then the mismatches and notes, then the page tables of inspect ops."""
    parts: list[Any] = [ops_table(run)]
    for rec in run.records:
        head = f"op {rec.index} ({rec.op}, line {rec.line})"
        for m in rec.mismatches:
            parts.append(Text(f"  {head}: {m}", style="red"))
        if rec.note and (rec.bug or rec.unsupported or (not rec.ok and rec.expect_ok is None)):
            parts.append(Text(f"  {head}: {rec.note}", style="yellow"))
    if pages:
        for rec in run.records:
            if rec.op == "inspect" and rec.pages is not None:
                parts.append(pages_table(rec.pages, f"op {rec.index} (inspect, line {rec.line}), process {rec.proc}: "
                                                    f"{len(rec.pages)} pages"))
    n_exp = sum(1 for r in run.records if r.expect_ok is not None)
    n_bad = sum(1 for r in run.records if r.expect_ok is False)
    skipped = len(run.scenario.ops) - len(run.records)
    verdict = (f"{len(run.records)} ops, {n_exp} with expectations: "
               + ("all met" if not n_bad else f"{n_bad} failed")
               + (f"; stopped by a model bug, {skipped} ops not run" if skipped else ""))
    parts.append(Text(verdict, style="green" if run.ok else "bold red"))
    return Group(*parts)


def print_run(run: Run, console: Console | None = None, pages: bool = True) -> None:
    (console or Console()).print(render_run(run, pages))


# ----------------------------------------------------------------------------------------- page tables (show, demo)


def mapping_names(run: Run) -> dict[int, str]:
    """Start address -> ``as`` name of the mappings a run created (first name wins)."""
    out: dict[int, str] = {}
    for name, (addr, length) in run.ctx.names.items():
        if length is not None:
            out.setdefault(addr, name)
    return out


def vma_views(run: Run, proc: str, ranges: list[tuple[int, int]] | None = None) -> list[TableView]:
    """Page-table views of ``proc``: one per given range, or one per VMA (labelled with its ``as`` name)."""
    mm = run.ctx.procs[proc].mm
    names = mapping_names(run)
    if ranges is None:
        order = {a: k for k, a in enumerate(names)}            # named mappings in the order they were made
        vmas = sorted(mm.vmas, key=lambda v: (order.get(v.vm_start, len(order)), v.vm_start))
        ranges = [(v.vm_start, v.vm_end) for v in vmas]
    return [collect(mm, a, b, names.get(a, "")) for a, b in ranges]


def vmas_json(run: Run, proc: str) -> list[dict[str, Any]]:
    """The VMAs of ``proc`` with their ``as`` names."""
    names = mapping_names(run)
    order = {a: k for k, a in enumerate(names)}
    out = []
    for v in sorted(run.ctx.procs[proc].mm.vmas, key=lambda v: (order.get(v.vm_start, len(order)), v.vm_start)):
        d = vma_json(v)
        d["proc"], d["name"] = proc, names.get(v.vm_start)
        out.append(d)
    return out


def vmas_table(vmas: list[dict[str, Any]], title: str = "VMAs") -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("name", "start", "size", "kind", "perms", "file @ page offset"):
        t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for v in vmas:
        f = f"{v['file']} @ {v['pgoff']}" if v["file"] else ""
        t.add_row(v.get("name") or "", v["start"], fmt_size(v["size"]), v["kind"], v["perms"], f)
    return t


def pagetables_json(run: Run, proc: str, views: list[TableView], pages: bool = False) -> dict[str, Any]:
    """The ``--json`` document of ``show`` and ``demo``: kernel, vmas, page_tables and the op records."""
    records = []
    for r in run.records:
        d = r.to_json()
        if not pages:
            d.pop("pages", None)
        records.append(d)
    return {"scenario": run.scenario.file, "kernel": run.kernel, "proc": proc, "ok": run.ok,
            "vmas": vmas_json(run, proc), "page_tables": [v.to_json() for v in views], "records": records}
