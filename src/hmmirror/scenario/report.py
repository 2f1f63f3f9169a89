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

#: Page fields that must be equal for pages to share one row of a page table.
ROW_FIELDS = ("present", "kind", "level", "write", "zero", "huge", "file", "exclusive", "swapped", "protnone")


def dumps(doc: Any) -> str:
    """Deterministic JSON (sorted keys)."""
    return json.dumps(doc, sort_keys=True)


def runs_json(runs: list[Run]) -> Any:
    """One run: its object; several: a list of them (``hmmirror run --json``)."""
    docs = [r.to_json() for r in runs]
    return docs[0] if len(docs) == 1 else docs


def _flag(v: bool | None) -> str:
    return "?" if v is None else ("y" if v else "n")


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


def pages_table(pages: list[PageState], title: str = "") -> Table:
    """Per-page states, one row per run of identical pages."""
    t = Table(title=title or None, title_justify="left", show_edge=False, pad_edge=False)
    for col in ("pages", "address", "n", "present", "pfn", "kind", "level", "write", "zero", "huge", "file",
                "excl", "swap", "protnone"):
        t.add_column(col, justify="right" if col == "n" else "left")
    for first, g in page_runs(pages):
        p = g[0]
        idx = f"{first}" if len(g) == 1 else f"{first}-{first + len(g) - 1}"
        t.add_row(idx, f"{p.addr:#x}", str(len(g)), _flag(p.present), _pfns(g), p.kind, p.level or "-",
                  _flag(p.write), _flag(p.zero), _flag(p.huge), _flag(p.file), _flag(p.exclusive),
                  _flag(p.swapped), _flag(p.protnone))
    return t


def _args(rec: OpResult) -> str:
    return " ".join(f"{k}={v}" for k, v in rec.args.items() if v is not None)


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
