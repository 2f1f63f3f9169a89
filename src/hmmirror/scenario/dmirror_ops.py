"""Scenario operations of the dmirror device (lib/test_hmm.c; :mod:`hmmirror.drivers.test_hmm`).

Registered with :func:`~hmmirror.scenario.schema.register_op` when the runner loads ``*_ops`` modules:

| op | keys | does |
|---|---|---|
| ``dmirror_open`` | ``device`` (0/1, default 0), ``fd`` (a name, default ``dmirror<device>``) | the process opens ``/dev/hmm_dmirror<device>``: a mirror of its own mm |
| ``dmirror_read`` | ``addr``, ``length``, ``fd``, ``fill`` | HMM_DMIRROR_READ; result 0; ``cpages``, ``faults``; with ``fill``, ``bad_pages`` = pages whose bytes read differ from it |
| ``dmirror_write`` | ``addr``, ``length``, ``fd``, ``fill`` | HMM_DMIRROR_WRITE of ``fill`` (default ``"index32"``); ``cpages``, ``faults`` |
| ``dmirror_snapshot`` | ``addr``, ``length``, ``fd`` | HMM_DMIRROR_SNAPSHOT; ``snapshot``: one HMM_DMIRROR_PROT_* byte per page (list of ints) |
| ``dmirror_pt`` | ``addr``, ``length``, ``fd`` | the device page table over the range; result: entries present; ``pt``: ``"-"``, ``"r"``, ``"w"`` per page |
| ``dmirror_close`` | ``fd`` | close(2) |

A failing ioctl is a result with its errno (``expect.errno``), as hmm-tests sees ``-errno``; ``cpages`` and
``faults`` are then not reported (the driver does not copy the command back on error).  ``expect`` may compare
``cpages``, ``faults``, ``bad_pages``, ``snapshot`` (a list of ints or a string of hex bytes such as
``"ff ff 11 01 02"``) and ``pt`` (a string like ``"rrw--"``).  File descriptors belong to the process that
opened them (``fd`` names are per process).  A kernel profile without interval notifiers (5.2) has no
dmirror device: ``dmirror_open`` fails with ENOENT.
"""

from __future__ import annotations

from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.errors import InputError, KernelError
from hmmirror.process import fill_bytes
from hmmirror.scenario.runner import Outcome, RunContext
from hmmirror.scenario.schema import Op, register_op


def _snapshot_bytes(value: Any, what: str) -> list[int]:
    """A snapshot expectation: a list of byte values or a string of hex bytes."""
    if isinstance(value, str):
        try:
            out = [int(tok, 16) for tok in value.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"{what} {value!r}: use hex bytes like \"ff 11 01 02\"") from None
    elif isinstance(value, list):
        out = value
    else:
        raise InputError(f"{what} must be a list of byte values or a string of hex bytes, not {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in out):
        raise InputError(f"{what} {value!r}: every byte must be 0..255")
    return list(out)


def _pt_string(value: Any, what: str) -> str:
    if not isinstance(value, str) or set(value) - set("-rwa"):
        raise InputError(f"{what} must be a string of '-', 'r', 'w', 'a' (one per page), not {value!r}")
    return value


def _device(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise InputError(f"{what} must be 0 or 1 (the device-private dmirror units), not {value!r}")
    return value


def _fds(ctx: RunContext) -> dict[tuple[str, str], Any]:
    fds: dict[tuple[str, str], Any] = ctx.state.setdefault("dmirror", {})
    return fds


def _fd(ctx: RunContext, op: Op) -> Any:
    name = ctx.args.get("fd", "dmirror0")
    f = _fds(ctx).get((op.proc, name))
    if f is None:
        raise InputError(f"process {op.proc!r} has no open dmirror file named {name!r} (use dmirror_open first)")
    return f


def _npages(ctx: RunContext) -> int:
    return -(-ctx.args["length"] // PAGE_SIZE)


def _dmirror_open(ctx: RunContext, op: Op) -> int:
    from hmmirror.drivers.test_hmm import hmm_open

    unit = ctx.args.get("device", 0)
    name = ctx.args.get("fd", f"dmirror{unit}")
    f = hmm_open(ctx.process(op.proc), unit)
    old = _fds(ctx).get((op.proc, name))
    if old is not None and old.private_data is not None:
        old.close()
    _fds(ctx)[(op.proc, name)] = f
    return 0


def _cmd(ctx: RunContext, op: Op, command: str, ptr: Any) -> Any:
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd

    f = _fd(ctx, op)
    cmd = HmmDmirrorCmd(ctx.args["addr"], ptr, _npages(ctx))
    ret = f.ioctl(command, cmd, ctx.process(op.proc).mm)
    if ret:
        raise KernelError(-ret, f"dmirror {command} at {cmd.addr:#x} ({cmd.npages} pages)")
    return cmd


def _dmirror_read(ctx: RunContext, op: Op) -> Outcome:
    n = _npages(ctx)
    buf = bytearray(n * PAGE_SIZE)
    cmd = _cmd(ctx, op, "READ", buf)
    extra: dict[str, Any] = {"cpages": cmd.cpages, "faults": cmd.faults}
    fill = ctx.args.get("fill")
    if fill is not None:
        extra["bad_pages"] = sum(1 for i in range(n)
                                 if buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != (fill_bytes(fill, i) or bytes(PAGE_SIZE)))
    return Outcome(ret=0, extra=extra)


def _dmirror_write(ctx: RunContext, op: Op) -> Outcome:
    n = _npages(ctx)
    fill = ctx.args.get("fill", "index32")
    buf = bytearray(b"".join(fill_bytes(fill, i) or bytes(PAGE_SIZE) for i in range(n)))
    cmd = _cmd(ctx, op, "WRITE", buf)
    return Outcome(ret=0, extra={"cpages": cmd.cpages, "faults": cmd.faults})


def _dmirror_snapshot(ctx: RunContext, op: Op) -> Outcome:
    buf = bytearray(_npages(ctx))
    cmd = _cmd(ctx, op, "SNAPSHOT", buf)
    return Outcome(ret=0, extra={"cpages": cmd.cpages, "snapshot": list(buf)})


def _dmirror_pt(ctx: RunContext, op: Op) -> Outcome:
    from hmmirror.drivers.test_hmm import DPT_XA_TAG_ATOMIC, DPT_XA_TAG_WRITE

    f = _fd(ctx, op)
    first = ctx.args["addr"] >> PAGE_SHIFT
    ents = f.dmirror.pt.load_range(first, _npages(ctx))
    tags = {0: "r", DPT_XA_TAG_WRITE: "w", DPT_XA_TAG_ATOMIC: "a"}
    pt = "".join("-" if e == 0 else tags.get(e & 3, "?") for e in ents.tolist())
    return Outcome(ret=sum(1 for c in pt if c != "-"), extra={"pt": pt})


def _dmirror_close(ctx: RunContext, op: Op) -> int:
    f = _fd(ctx, op)
    f.close()
    del _fds(ctx)[(op.proc, ctx.args.get("fd", "dmirror0"))]
    return 0


_RANGE = {"addr": "addr", "length": "size", "fd": "name"}
_COUNTS = {"cpages": "count", "faults": "count"}
register_op("dmirror_open", _dmirror_open, {"device": _device, "fd": "name"}, (),
            doc="open /dev/hmm_dmirror<device>: a mirror of this process's mm")
register_op("dmirror_read", _dmirror_read, {**_RANGE, "fill": "fill"}, ("addr",), range_op=True,
            expect_keys={**_COUNTS, "bad_pages": "count"},
            doc="HMM_DMIRROR_READ through the mirror; cpages, faults (bad_pages with fill)")
register_op("dmirror_write", _dmirror_write, {**_RANGE, "fill": "fill"}, ("addr",), range_op=True,
            expect_keys=_COUNTS, doc="HMM_DMIRROR_WRITE of fill (default index32); cpages, faults")
register_op("dmirror_snapshot", _dmirror_snapshot, _RANGE, ("addr",), range_op=True,
            expect_keys={"cpages": "count", "snapshot": _snapshot_bytes},
            doc="HMM_DMIRROR_SNAPSHOT; snapshot: one HMM_DMIRROR_PROT_* byte per page")
register_op("dmirror_pt", _dmirror_pt, _RANGE, ("addr",), range_op=True, expect_keys={"pt": _pt_string},
            doc="the device page table over the range; result: entries present")
register_op("dmirror_close", _dmirror_close, {"fd": "name"}, (), doc="close the dmirror file")


# --- the demo story through the device ---------------------------------------------------------------------
def dmirror_demo_story(kernel: str = "6.18") -> dict[str, Any]:
    """The ``hmmirror demo`` story (fsdax PTE, fsdax PMD, device-dax PUD) run, then mirrored through dmirror.

    After the demo scenario's CPU accesses, the process opens /dev/hmm_dmirror0 and, for each mapping:
    SNAPSHOT (no faults: the CPU mapping as one byte per page), READ of the first 16 pages (faults them in
    through hmm_range_fault and copies their bytes through the device page table), SNAPSHOT again.  Returns a
    JSON-able dict: ``kernel``, ``ok`` (the scenario's expectations), and per mapping ``addr``, ``npages``,
    ``snapshot_before`` / ``snapshot`` (lists of ints), ``snapshot_hist`` (byte -> count, hex keys),
    ``read`` (``ret``, ``cpages``, ``faults``), ``pt`` (device page-table entries), plus ``counters`` (hmm_*,
    dmirror_*) and the number of ``invalidations`` the device saw.  Under a profile without interval notifiers
    (5.2) ``device`` is ``{"errno": "ENOENT"}`` and no mirroring happens.
    """
    from collections import Counter

    from hmmirror.cli.demo import demo_text
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open
    from hmmirror.profiles import get_profile
    from hmmirror.scenario import parse, run

    prof = get_profile(kernel)
    r = run(parse(demo_text(), "demo.toml"), prof.name)
    proc = r.ctx.procs[r.scenario.processes[0]]
    out: dict[str, Any] = {"kernel": prof.name, "ok": r.ok, "process": proc.name, "mappings": {}}
    try:
        fd = hmm_open(proc, 0)
    except KernelError as exc:
        out["device"] = {"errno": exc.errno_name, "note": exc.message}
        return out
    out["device"] = {"path": fd.device.path}
    for name, (addr, length) in r.ctx.names.items():
        npages = min((length or PAGE_SIZE) >> PAGE_SHIFT, 1024)
        before = fd.snapshot(addr, npages)
        nread = min(16, npages)
        buf = bytearray(nread * PAGE_SIZE)
        cmd = HmmDmirrorCmd(addr, buf, nread)
        ret = fd.ioctl("READ", cmd)
        after = fd.snapshot(addr, npages)
        first = addr >> PAGE_SHIFT
        ents = fd.dmirror.pt.load_range(first, npages)
        out["mappings"][name] = {
            "addr": hex(addr), "npages": npages,
            "snapshot_before": list(before), "snapshot": list(after),
            "snapshot_hist": {f"{k:#04x}": v for k, v in sorted(Counter(after).items())},
            "read": {"ret": ret, "cpages": cmd.cpages, "faults": cmd.faults},
            "pt": int((ents != 0).sum()),
        }
    m = r.machine
    out["counters"] = {k: v for k, v in sorted(m.counters.items()) if k.startswith(("hmm_", "dmirror_"))}
    out["invalidations"] = sum(1 for e in m.events if e.get("what") == "dmirror_invalidate")
    fd.close()
    return out
