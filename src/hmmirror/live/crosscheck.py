"""The differential runner: the same scenario in a real child process and in the model, compared per page.

The model is configured like this machine: the 6.18 profile (the host kernel), the host's THP settings read
from /sys, enough RAM.  The real side runs through :mod:`hmmirror.live.executor` with filesystems and
hugetlb pools from :mod:`hmmirror.live.hostenv` (all cleaned up afterwards).

Compared, for every ``inspect`` operation and every page: ``present``, ``kind``, ``level``, ``huge``, ``zero``,
``file``, ``exclusive``, ``swapped``, and ``pfn_class`` — pfns are physical and differ between the two
sides, so each side's pfns are renamed in order of first appearance over the whole scenario (the zero page
is class ``"Z"``), which compares *which pages are the same page* (COW sharing after fork, same page after
DONTNEED of shmem, contiguity of THPs is not compared).  Fields the real kernel does not expose (the PTE
write bit) are ``None`` there and not compared.  Every operation's outcome (errno name) is compared too
(field ``errno``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hmmirror.include.pagestate import PageState

FIELDS = ("present", "kind", "level", "huge", "zero", "file", "exclusive", "swapped", "pfn_class")


@dataclass
class Disagreement:
    """One field of one page (or one operation's outcome) on which the model and the kernel differ."""

    scenario: str
    op_index: int
    field: str
    model: Any
    real: Any
    page: int | None = None
    addr_offset: int | None = None
    produced_by: str | None = None     # the last state-changing op before the inspect, "#i op proc"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("scenario", "op_index", "page", "addr_offset", "field", "model",
                                              "real", "produced_by")}


@dataclass
class Report:
    """Agreement over all scenarios: per field, pages compared and pages agreeing."""

    scenarios: int = 0
    pages: int = 0
    agree: int = 0
    by_field: dict[str, list[int]] = field(default_factory=dict)     # field -> [agree, compared]
    disagreements: list[Disagreement] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    crashes: list[tuple[str, str]] = field(default_factory=list)    # the model raised: a model bug

    def count(self, fld: str, same: bool) -> None:
        cell = self.by_field.setdefault(fld, [0, 0])
        cell[0] += same
        cell[1] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "scenarios": self.scenarios,
            "scenarios_skipped": len(self.skipped),
            "pages": self.pages,
            "agree": self.agree,
            "by_field": {k: {"agree": v[0], "compared": v[1], "ratio": round(v[0] / v[1], 6) if v[1] else None}
                         for k, v in sorted(self.by_field.items())},
            "disagreements": [d.to_json() for d in self.disagreements],
            "skipped": [{"scenario": s, "reason": r} for s, r in self.skipped],
            "model_crashes": [{"scenario": s, "error": r} for s, r in self.crashes],
        }


class _PfnClasses:
    """Name each side's pfns by where they first appeared; the zero page is ``"Z"``.

    A class is the position ``(op index, page index)`` of the page's first appearance, so a page one side
    maps and the other does not shifts no other page's name.  A frame's identity lasts while it stays in
    view: a pfn that no inspection of the previous round (the inspects after one state-changing operation)
    showed has been freed, or at least let go, and its next appearance is a new page (a freed frame the
    kernel reuses for something else must not look like the old page; the model reuses frames differently).
    Both sides apply the same rule to the same positions, so a page cache page unmapped and mapped again
    is a new class on both.
    """

    def __init__(self) -> None:
        self.ids: dict[int, tuple[int, int]] = {}
        self.seen: set[int] = set()
        self.looked = False              # the round inspected something (maybe only non-present pages)
        self.where = (0, 0)

    def begin_round(self) -> None:
        """A state-changing operation happened: forget the frames the last round did not show (a round whose
        inspects showed no page at all forgets them all; a round without any inspect forgets nothing)."""
        if self.looked:
            self.ids = {p: c for p, c in self.ids.items() if p in self.seen}
            self.seen = set()
            self.looked = False

    def __call__(self, s: PageState) -> Any:
        self.looked = True
        if not s.present or s.pfn is None:
            return None
        if s.zero and s.kind == "zero" and not s.huge:
            return "Z"
        self.seen.add(s.pfn)
        return self.ids.setdefault(s.pfn, self.where)


def _value(s: PageState, fld: str, classes: _PfnClasses) -> Any:
    if fld == "pfn_class":
        return classes(s)
    return getattr(s, fld)


def compare_pages(name: str, op_index: int, model: list[PageState], real: list[PageState], report: Report,
                  mcls: _PfnClasses, rcls: _PfnClasses, produced_by: str | None) -> None:
    """Compare one inspect's page lists field by field into ``report``."""
    base = model[0].addr if model else 0
    for i, (ms, rs) in enumerate(zip(model, real)):
        page_agree = True
        mcls.where = rcls.where = (op_index, i)
        for fld in FIELDS:
            mv, rv = _value(ms, fld, mcls), _value(rs, fld, rcls)
            if rv is None and fld not in ("pfn_class", "level"):
                continue                                  # not observable on the real side
            if fld == "level" and not rs.present:
                continue
            same = mv == rv
            report.count(fld, same)
            if not same:
                page_agree = False
                report.disagreements.append(Disagreement(name, op_index, fld, mv, rv, i, ms.addr - base,
                                                         produced_by))
        report.pages += 1
        report.agree += page_agree


def _model_side(scn: Any, host_thp: dict[str, Any], real: list[Any] | None = None, kernel: str = "6.18") -> Any:
    """Run the scenario on the model configured like this machine.

    Each ``mmap`` gets the address the real kernel chose as its hint, so both address spaces have the same
    layout: behaviour that depends on the virtual address (fault-around windows, THP alignment) is then
    compared on equal terms.
    """
    from hmmirror.scenario import runner
    from hmmirror.scenario.schema import Addr

    for op, rec in zip(scn.ops, real or []):
        if op.name == "mmap" and rec.ok and isinstance(rec.ret, int) and "addr" not in op.args:
            op.args["addr"] = Addr(rec.ret, None, hex(rec.ret))

    thp = dict(scn.machine.thp)
    for key in ("enabled", "defrag", "shmem_enabled"):
        if isinstance(host_thp.get(key), str):
            thp[key] = host_thp[key]
    if isinstance(host_thp.get("use_zero_page"), bool):
        thp["use_zero_page"] = host_thp["use_zero_page"]
    scn.machine.thp = thp
    scn.machine.kernel = kernel
    scn.machine.ram = max(scn.machine.ram, 1 << 30)
    return runner.run(scn, kernel=kernel)


def _real_side(scn: Any) -> list[Any]:
    from hmmirror.live import executor, hostenv

    with contextlib.ExitStack() as stack:
        mounts: dict[str, str] = {}
        if scn.machine.hugepages_2m:
            stack.enter_context(hostenv.reserve_hugepages("2M", scn.machine.hugepages_2m))
        if scn.machine.hugepages_1g:
            stack.enter_context(hostenv.reserve_hugepages("1G", scn.machine.hugepages_1g))
        for fs in scn.machine.fs:
            if fs.dax:
                raise hostenv.Unavailable(f"{fs.mount}: DAX filesystems exist only in the model")
            psize = "1G" if fs.pagesize == 1 << 30 else "2M"
            mounts[fs.mount] = stack.enter_context(hostenv.filesystem(fs.type, huge=fs.huge, pagesize=psize))
        if scn.machine.pmem:
            raise hostenv.Unavailable("pmem devices exist only in the model")
        # only a run the host kernel did not disturb (compaction, reclaim) is compared; see hostenv.quiet_run
        return hostenv.quiet_run(lambda: executor.run_ops(scn.raw_ops(), scn.processes, scn.raw_files(),
                                                          mounts, drop_caches=False))


def run_both(scn: Any, report: Report, host_thp: dict[str, Any] | None = None) -> tuple[Any, list[Any]] | None:
    """Run one parsed scenario on the real kernel, then on the model: ``(model result, real records)``, or
    None when it was skipped (reason in ``report.skipped``) or the model crashed (``report.crashes``)."""
    from hmmirror.live import hostenv

    name = scn.file
    try:
        real = _real_side(scn)
    except hostenv.Unavailable as exc:
        report.skipped.append((name, exc.reason))
        return None
    unsupported = [r for r in real if r.unsupported]
    if unsupported:
        report.skipped.append((name, f"op #{unsupported[0].index} not runnable here: {unsupported[0].note}"))
        return None
    try:
        model = _model_side(scn, host_thp if host_thp is not None else hostenv.thp_settings(), real)
    except Exception as exc:                      # a model crash is a finding, not the end of the run
        report.crashes.append((name, f"{type(exc).__name__}: {exc}"))
        return None
    return model, real


def crosscheck_scenario(scn: Any, report: Report, host_thp: dict[str, Any] | None = None) -> tuple[Any, list[Any]] | None:
    """Run one parsed scenario on both sides and add the comparison to ``report``; returns what
    :func:`run_both` returns."""
    both = run_both(scn, report, host_thp)
    if both is None:
        return None
    model, real = both
    compare_runs(scn.file, model.records, real, report)
    return model, real


#: Operations that only observe (they change no page table): they do not start a new round of pfn classes.
OBSERVING_OPS = ("inspect", "dmirror_snapshot")


def compare_runs(name: str, model_records: list[Any], real_records: list[Any], report: Report) -> None:
    """Compare one scenario's records op by op into ``report``: errno, the pages of every ``inspect``, and
    what device operations returned (:func:`compare_extras`).  Used by the host and the guest runner."""
    report.scenarios += 1
    mcls, rcls = _PfnClasses(), _PfnClasses()
    last_change: str | None = None
    for mrec, rrec in zip(model_records, real_records):
        same = (mrec.errno or None) == (rrec.errno or None)
        report.count("errno", same)
        if not same:
            report.disagreements.append(Disagreement(name, mrec.index, "errno", mrec.errno, rrec.errno,
                                                     produced_by=f"#{mrec.index} {mrec.op} {mrec.proc}"))
        elif not mrec.errno:
            compare_extras(name, mrec.index, mrec, rrec, report)
        if mrec.op == "inspect" and mrec.pages is not None and rrec.pages is not None:
            compare_pages(name, mrec.index, mrec.pages, rrec.pages, report, mcls, rcls, last_change)
        elif mrec.op not in OBSERVING_OPS:
            last_change = f"#{mrec.index} {mrec.op} {mrec.proc}"
            mcls.begin_round()
            rcls.begin_round()


def summary_rows(report: Report) -> list[tuple[str, int, int, float]]:
    """(field, agree, compared, ratio) rows, worst first."""
    rows = [(k, v[0], v[1], v[0] / v[1] if v[1] else 1.0) for k, v in report.by_field.items()]
    return sorted(rows, key=lambda r: r[3])


def top_disagreements(report: Report, n: int = 10) -> list[tuple[tuple[str, str, str], int]]:
    """The most frequent (field, model value, real value) disagreement kinds."""
    c = Counter((d.field, repr(d.model), repr(d.real)) for d in report.disagreements)
    return c.most_common(n)


#: Scalar dmirror results compared per operation (field ``dmirror``); ``snapshot`` bytes are compared one by
#: one (field ``snapshot``, ``page`` = the byte's page index).
DMIRROR_RESULTS = ("cpages", "faults", "bad_pages")


def compare_extras(name: str, op_index: int, mrec: Any, rrec: Any, report: Report) -> None:
    """Compare what a device operation returned besides its errno: snapshot bytes and dmirror counts.

    Only keys both sides report are compared (the host runner reports none; a failed ioctl reports none).
    """
    mx, rx = getattr(mrec, "extra", None) or {}, getattr(rrec, "extra", None) or {}
    where = f"#{op_index} {getattr(mrec, 'op', '')} {getattr(mrec, 'proc', '')}"
    ms, rs = mx.get("snapshot"), rx.get("snapshot")
    if ms is not None and rs is not None:
        for i in range(max(len(ms), len(rs))):
            mv = ms[i] if i < len(ms) else None
            rv = rs[i] if i < len(rs) else None
            report.count("snapshot", mv == rv)
            if mv != rv:
                report.disagreements.append(Disagreement(name, op_index, "snapshot",
                                                         None if mv is None else f"{mv:#04x}",
                                                         None if rv is None else f"{rv:#04x}", i, None, where))
    for key in DMIRROR_RESULTS:
        if key in mx and key in rx:
            same = mx[key] == rx[key]
            report.count("dmirror", same)
            if not same:
                report.disagreements.append(Disagreement(name, op_index, f"dmirror.{key}", mx[key], rx[key],
                                                         produced_by=where))
