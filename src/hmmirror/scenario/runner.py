"""Run a :class:`~hmmirror.scenario.schema.Scenario` on the model.

:func:`run` builds the :class:`~hmmirror.machine.Machine` (RAM, pmem devices, filesystems, files), spawns the
processes and executes the operations in order through :class:`hmmirror.process.Process`.  Each operation
yields one :class:`OpResult`.  A call the model answers with an errno (``KernelError``) is a *result*, compared
with the op's ``expect``; bad input found only at run time (a range outside the address space, a page range
of ``expect.pages`` beyond the inspected range) raises :class:`~hmmirror.errors.InputError` with FILE:LINE.

Operations are :class:`~hmmirror.scenario.schema.OpDef` records.  The built-in ones are registered at the end
of this module; another module adds its own with :func:`~hmmirror.scenario.schema.register_op`.  Modules of
this package whose name ends in ``_ops`` (e.g. ``hmm_ops.py``) are imported automatically before a scenario
is validated, so dropping such a file in is enough.  A handler is ``handler(ctx, op)``: it reads its resolved
arguments from ``ctx.args`` (addresses as ints; a left-out ``length`` of a range op already filled in), calls
the model through ``ctx.process(op.proc)`` / ``ctx.machine``, and returns an int (the result), ``None``, or an
:class:`Outcome`; it raises ``KernelError`` for a failed call.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import InputError, KernelError, ModelBug
from hmmirror.include.pagestate import PageState
from hmmirror.kernel import sched
from hmmirror.machine import Machine, ThpSettings
from hmmirror.process import Process, fill_bytes
from hmmirror.scenario.schema import OPS, Addr, Expect, Op, OpDef, PageRow, Scenario, register_op


@dataclass
class Outcome:
    """What a handler may return besides a plain int.

    ``mapping``: ``(start, length)`` an ``as`` name refers to (``mmap``); ``pages``: a per-page state list
    (``inspect``); ``errno``: a partial failure (``touch`` that faulted after ``ret`` pages); ``extra``:
    more fields for the JSON record (compared with the op's ``expect_keys``).
    """

    ret: Any = None
    pages: list[PageState] | None = None
    mapping: tuple[int, int] | None = None
    errno: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpResult:
    """The record of one executed operation (``to_json`` gives the ``hmmirror run --json`` record)."""

    index: int
    op: str
    proc: str
    line: int | None = None
    ok: bool = False
    ret: Any = None
    errno: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    pages: list[PageState] | None = None
    note: str | None = None
    unsupported: bool = False
    bug: str | None = None
    expect_ok: bool | None = None            # None: the op has no applicable expectation
    mismatches: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    ret_kind: str = "int"

    def to_json(self) -> dict[str, Any]:
        """A plain dict: addresses and pfns as hex strings; optional keys only when they carry something."""
        ret = self.ret
        if self.ret_kind == "addr" and isinstance(ret, int):
            ret = hex(ret)
        d: dict[str, Any] = {"index": self.index, "op": self.op, "proc": self.proc, "line": self.line,
                             "ok": self.ok, "ret": ret, "errno": self.errno, "args": self.args}
        if self.pages is not None:
            d["pages"] = [p.to_json() for p in self.pages]
        if self.expect_ok is not None:
            d["expect_ok"] = self.expect_ok
        if self.mismatches:
            d["mismatches"] = self.mismatches
        for k in ("note", "bug"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.unsupported:
            d["unsupported"] = True
        d.update(self.extra)
        return d


class Unresolved(Exception):
    """An address names a result that does not exist at run time (its op failed)."""


@dataclass
class RunContext:
    """What handlers see: the machine, the processes, the named results and the current op's arguments.

    ``state`` is free for extensions (e.g. mirror devices by name).
    """

    scenario: Scenario
    machine: Machine
    procs: dict[str, Process] = field(default_factory=dict)
    names: dict[str, tuple[int, int | None]] = field(default_factory=dict)   # `as` -> (address, length)
    inspections: dict[str, list[PageState]] = field(default_factory=dict)     # `as` of inspect ops
    state: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)

    def process(self, name: str) -> Process:
        """The live process ``name`` (KernelError ESRCH once it has exited)."""
        p = self.procs.get(name)
        if p is None:
            raise KernelError("ESRCH", f"process {name!r} does not exist (its fork failed)")
        if p.mm.exited:
            raise KernelError("ESRCH", f"process {name!r} has exited")
        return p

    def resolve(self, value: Addr) -> int:
        """The address of an :class:`Addr` now."""
        if value.name is None:
            return value.offset
        if value.name not in self.names:
            raise Unresolved(f"address {value.text!r}: {value.name!r} has no value (its op failed)")
        return self.names[value.name][0] + value.offset

    def define(self, name: str, addr: int, length: int | None = None) -> None:
        """Make ``name`` usable in address expressions (``length``: for range ops that leave it out)."""
        self.names[name] = (addr, length)


@dataclass
class Run:
    """A finished run: the machine (for inspection afterwards), the records and the verdict."""

    scenario: Scenario
    machine: Machine
    ctx: RunContext
    records: list[OpResult]

    @property
    def kernel(self) -> str:
        return self.machine.profile.name

    @property
    def ok(self) -> bool:
        """Every applicable expectation held and no model bug stopped the run."""
        return all(r.expect_ok is not False and r.bug is None for r in self.records)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario.file, "title": self.scenario.title, "kernel": self.kernel,
                "ok": self.ok, "records": [r.to_json() for r in self.records]}


# ----------------------------------------------------------------------------------------- extensions

_loaded = False


def load_extensions() -> None:
    """Import every ``hmmirror.scenario.*_ops`` module once (they call ``register_op``)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import hmmirror.scenario as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.endswith("_ops"):
            try:
                importlib.import_module(f"hmmirror.scenario.{mod.name}")
            except ModuleNotFoundError as exc:   # it needs a model piece not in this build: its ops stay unknown
                if not _missing(exc):
                    raise


# ----------------------------------------------------------------------------------------- building the machine


def _missing(exc: ModuleNotFoundError) -> bool:
    return bool(exc.name and exc.name.startswith("hmmirror."))


def build(scn: Scenario, kernel: str | None = None) -> RunContext:
    """The machine, devices, mounts, files and processes of ``scn`` (``kernel`` overrides [machine].kernel)."""
    ms = scn.machine
    where = f"{scn.file}:{ms.line}" if ms.line else scn.file
    try:
        machine = Machine(kernel or ms.kernel, ram=ms.ram, paging=ms.paging, hugepages_2m=ms.hugepages_2m,
                          hugepages_1g=ms.hugepages_1g, thp=ThpSettings(**ms.thp))
    except KernelError as exc:
        raise InputError(str(exc), exc.errno_name, where=where) from None

    def setup(line: int | None, what: str, fn: Callable[[], Any]) -> None:
        w = f"{scn.file}:{line}" if line else scn.file
        try:
            fn()
        except ModuleNotFoundError as exc:
            if not _missing(exc):
                raise
            raise InputError(f"{what}: not available in this build of the model yet ({exc.name} is missing)",
                             "ENOSYS", where=w) from None
        except KernelError as exc:
            raise InputError(f"{what}: {exc}", exc.errno_name, where=w) from None

    for p in ms.pmem:
        setup(p.line, f"pmem device {p.name}", lambda p=p: machine.add_pmem(p.name, p.size, p.mode, p.align))
    for f in ms.fs:
        setup(f.line, f"mount {f.mount}",
              lambda f=f: machine.mount(f.mount, f.type, dax=f.dax, huge=f.huge, pagesize=f.pagesize))
    for fl in scn.files:
        setup(fl.line, f"file {fl.path}", lambda fl=fl: machine.create_file(fl.path, fl.size, fl.content, fl.cached))
    ctx = RunContext(scn, machine)
    for name in scn.processes:
        ctx.procs[name] = machine.spawn(name)
    return ctx


# ----------------------------------------------------------------------------------------- running


def run(scn: Scenario, kernel: str | None = None) -> Run:
    """Execute every op of ``scn``; a model bug (``ModelBug``) is recorded and stops the run."""
    ctx = build(scn, kernel)
    records = []
    for op in scn.ops:
        rec = execute(ctx, op)
        records.append(rec)
        if rec.bug:
            break
    return Run(scn, ctx.machine, ctx, records)


def execute(ctx: RunContext, op: Op) -> OpResult:
    """Run one op and check its expectations."""
    d = OPS[op.name]
    rec = OpResult(op.index, op.name, op.proc, op.line, ret_kind=d.ret_kind)
    where = ctx.scenario.where(op.path)
    outcome: Outcome | None = None
    try:
        ctx.args = _resolve_args(ctx, op, d)
        rec.args = _json_args(ctx.args, op)
        result = d.handler(ctx, op)
        outcome = result if isinstance(result, Outcome) else Outcome(ret=result)
        rec.ok, rec.ret, rec.pages, rec.note = outcome.errno is None, outcome.ret, outcome.pages, outcome.note
        rec.errno, rec.extra = outcome.errno, dict(outcome.extra)
    except InputError as exc:
        raise InputError(f"op {op.index} ({op.name}): {exc}", exc.errno_name, where=where) from None
    except KernelError as exc:
        rec.errno, rec.note = exc.errno_name, exc.message or None
    except Unresolved as exc:
        rec.errno, rec.note = "EINVAL", str(exc)
    except ModelBug as exc:
        rec.bug, rec.note = exc.kind, str(exc)
    except ModuleNotFoundError as exc:
        if not _missing(exc):
            raise
        rec.unsupported, rec.note = True, f"not available in this build of the model yet ({exc.name} is missing)"
    except NotImplementedError as exc:
        rec.unsupported, rec.note = True, f"not implemented in the model: {exc}"
    if rec.ok and op.as_ and outcome is not None:
        if d.as_kind == "pages" and outcome.pages is not None:
            ctx.inspections[op.as_] = outcome.pages
        elif outcome.mapping is not None:
            ctx.define(op.as_, *outcome.mapping)
        elif isinstance(outcome.ret, int):
            ctx.define(op.as_, outcome.ret)
    if rec.bug is None and not rec.unsupported:
        try:
            check_expectations(ctx, op, d, rec, outcome)
        except InputError as exc:
            raise InputError(f"op {op.index} ({op.name}): {exc}", exc.errno_name, where=where) from None
    elif op.expect:
        rec.expect_ok = False
        rec.mismatches.append(f"not checked: {rec.note}")
    return rec


def _resolve_args(ctx: RunContext, op: Op, d: OpDef) -> dict[str, Any]:
    """Arguments with addresses resolved; a range op's left-out length runs to the end of the named mapping."""
    args = {k: ctx.resolve(v) if isinstance(v, Addr) else v for k, v in op.args.items()}
    addr = op.args.get("addr")
    if d.range_op and "length" not in args and isinstance(addr, Addr) and addr.name is not None:
        start, length = ctx.names[addr.name]
        if length is None:
            raise Unresolved(f"length left out and {addr.name!r} is not a mapping")
        args["length"] = max(start + length - args["addr"], 0)
    for k in d.aligned:
        v = args.get(k)
        if isinstance(v, int) and v % PAGE_SIZE and not op.expects_errno:
            raise InputError(f"{k} {v:#x} is not page aligned (4K); add expect.errno to test the kernel's answer")
    return args


def _json_args(args: dict[str, Any], op: Op) -> dict[str, Any]:
    """Arguments for the record: addresses as hex strings."""
    out = {}
    for k, v in args.items():
        out[k] = hex(v) if isinstance(op.args.get(k), Addr) or k == "addr" else v
    return out


# ----------------------------------------------------------------------------------------- expectations


def applicable(ctx: RunContext, op: Op) -> list[Expect]:
    """The op's expectations that apply to the running kernel profile."""
    name = ctx.machine.profile.name
    return [e for e in op.expect if e.kernels is None or name in e.kernels]


def check_expectations(ctx: RunContext, op: Op, d: OpDef, rec: OpResult, outcome: Outcome | None) -> None:
    """Fill ``rec.expect_ok`` and ``rec.mismatches`` from the op's applicable ``expect`` tables."""
    exps = applicable(ctx, op)
    if not exps:
        return
    out: list[str] = []
    for e in exps:
        if e.errno is not None:
            if rec.ok:
                out.append(f"errno: expected {e.errno}, but the call succeeded")
            elif rec.errno != e.errno:
                out.append(f"errno: expected {e.errno}, got {rec.errno}")
            continue
        if not rec.ok:
            out.append(f"expected success, failed with {rec.errno}" + (f" ({rec.note})" if rec.note else ""))
            continue
        if e.ret is not None:
            want = e.ret.offset if isinstance(e.ret, Addr) else e.ret
            if rec.ret != want:
                fmt = hex if d.ret_kind == "addr" else str
                got = fmt(rec.ret) if isinstance(rec.ret, int) else repr(rec.ret)
                out.append(f"ret: expected {fmt(want)}, got {got}")
        if e.pages is not None:
            pages = rec.pages if rec.pages is not None else _pages_after(ctx, op, d, outcome)
            if rec.pages is None:
                rec.pages = pages
            out += check_pages(ctx, pages, e.pages)
        for k, want in e.extra.items():
            got = rec.extra.get(k, (outcome.extra if outcome else {}).get(k))
            if got != want:
                out.append(f"{k}: expected {want!r}, got {got!r}")
    rec.mismatches += out
    rec.expect_ok = not out


def _pages_after(ctx: RunContext, op: Op, d: OpDef, outcome: Outcome | None) -> list[PageState]:
    """The per-page state of the op's range after it ran (``mmap``: the new mapping)."""
    proc = ctx.procs[op.proc]
    if d.name == "mmap" and outcome is not None and outcome.mapping is not None:
        start, length = outcome.mapping
    else:
        start, length = ctx.args["addr"], ctx.args["length"]
    return proc.inspect(start, length)


def _fmt(field_: str, v: Any) -> str:
    if field_ == "pfn" and isinstance(v, int):
        return hex(v)
    return "none" if v is None and field_ == "level" else repr(v)


def check_pages(ctx: RunContext, pages: list[PageState], rows: list[PageRow]) -> list[str]:
    """Compare per-page states with ``expect.pages`` rows; mismatches of consecutive pages are merged."""
    n = len(pages)
    found: list[tuple[int, str, str]] = []      # (page index, message for a run, message for one page)
    for row in rows:
        last = n - 1 if row.last is None else row.last
        if row.first >= n or last >= n:
            raise InputError(f"expect.pages range {row.text!r} lies beyond the {n} pages of the range")
        for i in range(row.first, last + 1):
            p = pages[i]
            for f, want in row.fields.items():
                got = getattr(p, f)
                if got != want:
                    msg = f"{f} expected {_fmt(f, want)}, got {_fmt(f, got)}"
                    found.append((i, msg, msg))
            for ref, same in ((row.pfn_same_as, True), (row.pfn_differs_from, False)):
                if ref is None:
                    continue
                other = ctx.inspections.get(ref)
                if other is None:
                    msg = f"no inspection named {ref!r} (its op failed)"
                    found.append((i, msg, msg))
                elif i >= len(other):
                    msg = f"inspection {ref!r} has only {len(other)} pages"
                    found.append((i, msg, msg))
                elif p.pfn is None or (p.pfn == other[i].pfn) != same:
                    msg = f"pfn {'not the same as' if same else 'the same as'} in {ref!r}"
                    found.append((i, msg, f"{msg} ({_fmt('pfn', p.pfn)} vs {_fmt('pfn', other[i].pfn)})"))
        if row.contiguous is not None:
            pfns = [pages[i].pfn for i in range(row.first, last + 1)]
            contig = None not in pfns and all(b == a + 1 for a, b in zip(pfns, pfns[1:]))  # type: ignore[operator]
            if contig != row.contiguous:
                msg = f"pfns of pages {row.first}-{last} {'not ' if row.contiguous else ''}contiguous"
                found.append((-1, msg, msg))
    return _merge(found)


def _merge(found: list[tuple[int, str, str]]) -> list[str]:
    """Messages of consecutive pages with the same text become one ``pages a-b: ...`` line (ordered by first
    page; index -1 marks a message about a whole row)."""
    by_key: dict[str, list[tuple[int, str]]] = {}
    for i, key, full in found:
        by_key.setdefault(key, []).append((i, full))
    lines: list[tuple[int, str]] = []
    for key, hits in by_key.items():
        hits.sort()
        j = 0
        while j < len(hits):
            k = j
            while k + 1 < len(hits) and hits[k + 1][0] == hits[k][0] + 1 and hits[j][0] >= 0:
                k += 1
            a, b = hits[j][0], hits[k][0]
            if a < 0:
                lines.append((a, hits[j][1]))
            elif a == b:
                lines.append((a, f"page {a}: {hits[j][1]}"))
            else:
                lines.append((a, f"pages {a}-{b}: {key}"))
            j = k + 1
    return [text for _i, text in sorted(lines, key=lambda t: t[0])]


# ----------------------------------------------------------------------------------------- built-in operations


def _mmap(ctx: RunContext, op: Op) -> Outcome:
    a = ctx.args
    p = ctx.process(op.proc)
    flags = list(a.get("flags") or ["private"])
    if a.get("file") is None and "anonymous" not in flags and "anon" not in flags:
        flags.append("anonymous")
    length = a["length"]
    addr = p.mmap(length, a.get("prot", "rw"), flags, a.get("file"), a.get("offset", 0), a.get("addr", 0),
                  a.get("align"))
    return Outcome(ret=addr, mapping=(addr, -(-length // PAGE_SIZE) * PAGE_SIZE))


def _munmap(ctx: RunContext, op: Op) -> int:
    return ctx.process(op.proc).munmap(ctx.args["addr"], ctx.args["length"])


def _mprotect(ctx: RunContext, op: Op) -> int:
    return ctx.process(op.proc).mprotect(ctx.args["addr"], ctx.args["length"], ctx.args["prot"])


def _madvise(ctx: RunContext, op: Op) -> int:
    return ctx.process(op.proc).madvise(ctx.args["addr"], ctx.args["length"], ctx.args["advice"])


def _touch(ctx: RunContext, op: Op) -> Outcome:
    """Page by page, like Process.touch, but a signal leaves the count of pages done in ``ret``."""
    from hmmirror.arch.x86.fault import cpu_access

    a = ctx.args
    p = ctx.process(op.proc)
    addr, length, write, fill = a["addr"], a["length"], a.get("access", "read") == "write", a.get("fill")
    p._check_range(addr, length, "touch")
    n = 0
    for i, va in enumerate(range(addr & ~(PAGE_SIZE - 1), addr + length, PAGE_SIZE)):
        data = fill_bytes(fill, i) if write else None
        sig = sched.run(cpu_access(p.mm, va, write, data), p.mm.task)
        if sig:
            name = "SIGSEGV" if sig == 11 else "SIGBUS" if sig == 7 else f"signal {sig}"
            return Outcome(ret=n, errno="EFAULT", note=f"{'write' if write else 'read'} at {va:#x}: {name}",
                           extra={"signal": name})
        n += 1
    return Outcome(ret=n)


def _check(ctx: RunContext, op: Op) -> int:
    return ctx.process(op.proc).check(ctx.args["addr"], ctx.args["length"], ctx.args.get("fill"))


def _fork(ctx: RunContext, op: Op) -> int:
    child = ctx.args["child"]
    ctx.procs[child] = ctx.process(op.proc).fork(child)
    return 0


def _exit(ctx: RunContext, op: Op) -> int:
    ctx.process(op.proc).exit()
    return 0


def _truncate(ctx: RunContext, op: Op) -> int:
    ctx.process(op.proc)
    ret = ctx.machine.truncate(ctx.args["file"], ctx.args["size"])
    if isinstance(ret, int) and ret < 0:
        raise KernelError(-ret, f"truncate {ctx.args['file']}")
    return 0


def _inspect(ctx: RunContext, op: Op) -> Outcome:
    pages = ctx.process(op.proc).inspect(ctx.args["addr"], ctx.args["length"])
    return Outcome(ret=sum(1 for p in pages if p.present), pages=pages)


_RANGE = {"addr": "addr", "length": "size"}
register_op("mmap", _mmap, {"length": "size", "prot": "prot", "flags": "flags", "file": "path", "offset": "size",
                            "addr": "addr", "align": "align"}, ("length",), aligned=("addr", "offset"),
            as_kind="mapping", ret_kind="addr", doc="mmap(2); result: the start address")
register_op("munmap", _munmap, _RANGE, ("addr", "length"), range_op=True, aligned=("addr",), doc="munmap(2)")
register_op("mprotect", _mprotect, {**_RANGE, "prot": "prot"}, ("addr", "prot"), range_op=True,
            aligned=("addr",), doc="mprotect(2)")
register_op("madvise", _madvise, {**_RANGE, "advice": "advice"}, ("addr", "advice"), range_op=True,
            aligned=("addr",), doc="madvise(2)")
register_op("touch", _touch, {**_RANGE, "access": "access", "fill": "fill"}, ("addr",), range_op=True,
            doc="CPU access to every page; result: pages touched")
register_op("check", _check, {**_RANGE, "fill": "fill"}, ("addr",), range_op=True,
            doc="CPU read compared with fill; result: mismatching pages")
register_op("fork", _fork, {"child": "name"}, ("child",), doc="fork(2); the child is named `child`")
register_op("exit", _exit, {}, (), doc="exit(2)")
register_op("truncate", _truncate, {"file": "path", "size": "size"}, ("file", "size"), doc="truncate(2)")
register_op("inspect", _inspect, _RANGE, ("addr",), range_op=True, as_kind="pages",
            doc="per-page state; result: number of present pages")
