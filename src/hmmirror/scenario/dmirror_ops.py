"""Scenario operations of the dmirror device (lib/test_hmm.c; :mod:`hmmirror.drivers.test_hmm`).

Registered with :func:`~hmmirror.scenario.schema.register_op` when the runner loads ``*_ops`` modules:

* ``dmirror_open`` (``device``: 0 or 1, default 0; ``fd``: a name, default ``dmirror<device>``): the process
  opens ``/dev/hmm_dmirror<device>``, a mirror of its own mm;
* ``dmirror_read`` (``addr``, ``length``, ``fd``, ``fill``): HMM_DMIRROR_READ; result 0; ``cpages``,
  ``faults``; with ``fill``, ``bad_pages`` = pages whose bytes read differ from it;
* ``dmirror_write`` (``addr``, ``length``, ``fd``, ``fill``): HMM_DMIRROR_WRITE of ``fill`` (default
  ``"index32"``); ``cpages``, ``faults``;
* ``dmirror_snapshot`` (``addr``, ``length``, ``fd``): HMM_DMIRROR_SNAPSHOT; ``snapshot``: one
  HMM_DMIRROR_PROT_* byte per page (a list of ints);
* ``dmirror_pt`` (``addr``, ``length``, ``fd``): the device page table over the range; result: entries
  present; ``pt``: ``"-"``, ``"r"``, ``"w"``, ``"a"`` per page;
* ``dmirror_migrate_to_dev`` (``addr``, ``length``, ``fd``, ``fill``): HMM_DMIRROR_MIGRATE_TO_DEV; ``cpages``
  (pages read back from the device), with ``fill`` ``bad_pages``; -ENOENT when a page did not move;
* ``dmirror_migrate_to_sys`` (``addr``, ``length``, ``fd``): HMM_DMIRROR_MIGRATE_TO_SYS; ``cpages`` (pages
  migrated back);
* ``dmirror_exclusive`` (``addr``, ``length``, ``fd``, ``fill``): HMM_DMIRROR_EXCLUSIVE; ``cpages``,
  ``bad_pages`` with ``fill``;
* ``dmirror_check_exclusive`` (``addr``, ``length``, ``fd``): HMM_DMIRROR_CHECK_EXCLUSIVE; result 0, or EPERM
  while the device still holds an exclusive (atomic) entry;
* ``dmirror_release`` (``fd``; ``addr``/``length`` optional, default one page at 0x1000 -- the ioctl only checks
  them): HMM_DMIRROR_RELEASE, every chunk of the device's memory evicted and removed;
* ``dmirror_flags`` (``flags``: an integer, 1 = HMM_DMIRROR_FLAG_FAIL_ALLOC, ``fd``): HMM_DMIRROR_FLAGS
  (EINVAL on kernels whose test_hmm has no such ioctl: 6.12 and 6.18);
* ``gup_test`` (``addr``, ``length``, ``cmd``: GUP_BASIC_TEST / GUP_FAST_BENCHMARK / PIN_FAST_BENCHMARK /
  PIN_LONGTERM_BENCHMARK, ``longterm``: bool, ``write``: bool default true): the gup_test debugfs ioctl
  (mm/gup_test.c) over the range, one page per call, as hmm-tests' hmm_gup_test uses it;
* ``dmirror_close`` (``fd``): close(2);
* ``mirror_range`` (``addr``, ``length``, ``access``: none/read/write): one snapshot or fault of the range
  through the HMM API of the running profile (6.x or 5.2); ``entries`` per page in one notation.

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


def _dmirror_migrate_to_dev(ctx: RunContext, op: Op) -> Outcome:
    n = _npages(ctx)
    buf = bytearray(n * PAGE_SIZE)
    cmd = _cmd(ctx, op, "MIGRATE_TO_DEV", buf)
    return Outcome(ret=0, extra=_read_back(ctx, cmd, buf, n))


def _read_back(ctx: RunContext, cmd: Any, buf: bytearray, n: int) -> dict[str, Any]:
    extra: dict[str, Any] = {"cpages": cmd.cpages}
    fill = ctx.args.get("fill")
    if fill is not None:
        extra["bad_pages"] = sum(1 for i in range(n)
                                 if buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != (fill_bytes(fill, i) or bytes(PAGE_SIZE)))
    return extra


def _dmirror_migrate_to_sys(ctx: RunContext, op: Op) -> Outcome:
    cmd = _cmd(ctx, op, "MIGRATE_TO_SYS", None)
    return Outcome(ret=0, extra={"cpages": cmd.cpages})


def _dmirror_exclusive(ctx: RunContext, op: Op) -> Outcome:
    n = _npages(ctx)
    buf = bytearray(n * PAGE_SIZE)
    cmd = _cmd(ctx, op, "EXCLUSIVE", buf)
    return Outcome(ret=0, extra=_read_back(ctx, cmd, buf, n))


def _dmirror_check_exclusive(ctx: RunContext, op: Op) -> int:
    _cmd(ctx, op, "CHECK_EXCLUSIVE", None)
    return 0


def _dmirror_release(ctx: RunContext, op: Op) -> int:
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd

    f = _fd(ctx, op)
    addr = ctx.args.get("addr", PAGE_SIZE)
    npages = -(-ctx.args.get("length", PAGE_SIZE) // PAGE_SIZE)
    ret = f.ioctl("RELEASE", HmmDmirrorCmd(addr, None, npages), ctx.process(op.proc).mm)
    if ret:
        raise KernelError(-ret, "dmirror RELEASE")
    return 0


def _dmirror_flags(ctx: RunContext, op: Op) -> int:
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd

    f = _fd(ctx, op)
    ret = f.ioctl("FLAGS", HmmDmirrorCmd(PAGE_SIZE, None, ctx.args["flags"]), ctx.process(op.proc).mm)
    if ret:
        raise KernelError(-ret, "dmirror FLAGS")
    return 0


def _gup_test(ctx: RunContext, op: Op) -> int:
    from hmmirror.kernel import sched
    from hmmirror.mm.gup import FOLL_LONGTERM, FOLL_WRITE
    from hmmirror.mm.gup_test import COMMANDS, GupTest, gup_test_ioctl

    cmd = ctx.args.get("cmd", "GUP_BASIC_TEST")
    if cmd not in COMMANDS:
        raise InputError(f"gup_test cmd {cmd!r}: use one of {', '.join(COMMANDS)}")
    flags = (FOLL_WRITE if ctx.args.get("write", True) else 0) | (FOLL_LONGTERM if ctx.args.get("longterm") else 0)
    mm = ctx.process(op.proc).mm
    gup = GupTest(addr=ctx.args["addr"], size=_npages(ctx) * PAGE_SIZE, nr_pages_per_call=1, gup_flags=flags)
    ret = sched.run(gup_test_ioctl(mm, cmd, gup), mm.task)
    if ret:
        raise KernelError(-ret, f"gup_test {cmd} at {gup.addr:#x}")
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
register_op("dmirror_migrate_to_dev", _dmirror_migrate_to_dev, {**_RANGE, "fill": "fill"}, ("addr",), range_op=True,
            expect_keys={"cpages": "count", "bad_pages": "count"},
            doc="HMM_DMIRROR_MIGRATE_TO_DEV; cpages read back from the device (bad_pages with fill)")
register_op("dmirror_migrate_to_sys", _dmirror_migrate_to_sys, _RANGE, ("addr",), range_op=True,
            expect_keys={"cpages": "count"}, doc="HMM_DMIRROR_MIGRATE_TO_SYS; cpages migrated back")
register_op("dmirror_exclusive", _dmirror_exclusive, {**_RANGE, "fill": "fill"}, ("addr",), range_op=True,
            expect_keys={"cpages": "count", "bad_pages": "count"},
            doc="HMM_DMIRROR_EXCLUSIVE: device-exclusive access; cpages (bad_pages with fill)")
register_op("dmirror_check_exclusive", _dmirror_check_exclusive, _RANGE, ("addr",), range_op=True,
            doc="HMM_DMIRROR_CHECK_EXCLUSIVE: 0, or EPERM while an exclusive entry is held")
register_op("dmirror_release", _dmirror_release, _RANGE, (),
            doc="HMM_DMIRROR_RELEASE: evict and remove every chunk of the device's memory")
register_op("dmirror_flags", _dmirror_flags, {"flags": "count", "fd": "name"}, ("flags",),
            doc="HMM_DMIRROR_FLAGS (1 = FAIL_ALLOC); EINVAL where test_hmm has no such ioctl")
register_op("gup_test", _gup_test, {"addr": "addr", "length": "size", "cmd": "str", "longterm": "bool",
                                    "write": "bool"}, ("addr",), range_op=True,
            doc="the gup_test debugfs ioctl over the range (get/pin and release every page)")
register_op("dmirror_close", _dmirror_close, {"fd": "name"}, (), doc="close the dmirror file")


# --- one mirroring call, whatever the profile -----------------------------------------------------------------
def decode_modern(e: int) -> str:
    """A 6.x ``hmm_pfns`` output in the 5.2 ops' notation: ``"VW@0x..."``, ``"V@0x..."``, ``"NONE"``, ``"ERROR"``
    (``"RAW:0x..."`` for pfn bits without VALID: protnone entries, hugetlb none entries)."""
    from hmmirror.mm.hmm.modern import HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE, hmm_pfn_to_pfn

    if e & HMM_PFN_ERROR:
        return "ERROR"
    if not e & HMM_PFN_VALID:
        return "NONE" if not hmm_pfn_to_pfn(e) else f"RAW:{e:#x}"
    return ("VW" if e & HMM_PFN_WRITE else "V") + f"@{hmm_pfn_to_pfn(e):#x}"


def _mirror_range_modern(ctx: RunContext, op: Op, start: int, end: int, access: str) -> Outcome:
    from hmmirror.mm.hmm.modern import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, hmm_pfn_to_map_order, run_range_fault
    from hmmirror.errors import errno_name

    flags = {"none": 0, "read": HMM_PFN_REQ_FAULT, "write": HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE}[access]
    ret, out = run_range_fault(ctx.process(op.proc), start, (end - start) >> PAGE_SHIFT, flags)
    vals = [int(x) for x in out.tolist()]
    extra = {"entries": [decode_modern(e) for e in vals],
             "orders": [hmm_pfn_to_map_order(e) if e >> 63 else 0 for e in vals]}
    return Outcome(ret=ret, errno=errno_name(ret) if ret < 0 else None, extra=extra)


def _mirror_range_5_2(ctx: RunContext, op: Op, start: int, end: int, access: str) -> Outcome:
    from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52
    from hmmirror.errors import errno_name
    from hmmirror.kernel import sched
    from hmmirror.mm.hmm import v5_2 as h52
    from hmmirror.scenario.hmm_v5_2_ops import _with_mmap_read, decode_entry

    p = ctx.process(op.proc)
    drivers = ctx.state.setdefault("mirror_range_5_2", {})
    if op.proc not in drivers:
        drv = HmmMirrorDriver52(ctx.machine, f"mirror_range.{op.proc}")
        ret = sched.run(drv.register(p.mm), p.mm.task)
        if ret:
            raise KernelError(-ret, "hmm_mirror_register")
        drivers[op.proc] = drv
    r = h52.new_range(start, end, name="mirror_range")
    ret = sched.run(h52.hmm_range_register(r, p.mm, start, end, PAGE_SHIFT), p.mm.task)
    if ret:
        raise KernelError(-ret, "hmm_range_register")
    try:
        if access == "none":
            ret = _with_mmap_read(p, h52.hmm_range_snapshot(r))
        else:
            r.default_flags = r.flags[h52.HMM_PFN_VALID] | (r.flags[h52.HMM_PFN_WRITE] if access == "write" else 0)
            r.pfn_flags_mask = 0
            ret = _with_mmap_read(p, h52.hmm_range_fault(r, True))
        extra = {"entries": [decode_entry(r, int(e)) for e in r.pfns.tolist()]}
    finally:
        sched.run(h52.hmm_range_unregister(r), p.mm.task)
    return Outcome(ret=ret, errno=errno_name(ret) if ret < 0 else None, extra=extra)


def _mirror_range(ctx: RunContext, op: Op) -> Outcome:
    """``mirror_range``: one snapshot (access "none") or fault ("read"/"write") of the range through the HMM
    API of the running profile: 6.x ``hmm_range_fault`` with a temporary interval notifier; 5.2
    ``hmm_range_register`` + ``hmm_range_snapshot`` / ``hmm_range_fault(range, block)`` of a registered mirror.
    The result is the kernel's return value (6.x: 0; 5.2: a page count), an errno on failure; ``entries``
    per page in one notation for both (``VW@pfn``, ``V@pfn``, ``NONE``, ``ERROR``, 5.2 ``SPECIAL``)."""
    start, end = ctx.args["addr"], ctx.args["addr"] + _npages(ctx) * PAGE_SIZE
    access = ctx.args.get("access", "none")
    if ctx.machine.profile.hmm_module == "hmmirror.mm.hmm.v5_2":
        return _mirror_range_5_2(ctx, op, start, end, access)
    return _mirror_range_modern(ctx, op, start, end, access)


def _entries(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a list of entry strings like [\"VW@0x4000\", \"NONE\", \"ERROR\"]")
    return value


register_op("mirror_range", _mirror_range, {"addr": "addr", "length": "size",
                                            "access": ("none", "read", "write")}, ("addr",), range_op=True,
            aligned=("addr",), expect_keys={"entries": _entries},
            doc="one HMM snapshot/fault of the range with the profile's API; entries per page")


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
