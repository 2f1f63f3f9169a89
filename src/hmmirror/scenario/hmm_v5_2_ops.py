"""Scenario operations for the HMM 5.2 API (``[machine] kernel = "5.2"``), and the seed's story.

Registered with :func:`~hmmirror.scenario.schema.register_op` (the runner imports every ``*_ops`` module).
Operation names carry the ``hmm52_`` prefix: the 5.2 API (mirrors, ``hmm_range_register``, snapshot,
``hmm_range_fault(range, block)``) differs from today's, whose operations live elsewhere.

| op | keys | does |
|---|---|---|
| ``hmm52_mirror_register`` | ``mirror`` | a model driver (:class:`HmmMirrorDriver52`) registers a mirror on the process's mm (mmap_sem for write) |
| ``hmm52_mirror_unregister`` | ``mirror`` | ``hmm_mirror_unregister`` |
| ``hmm52_range_register`` | ``range``, ``addr``, ``length``, ``page_shift`` | a range with the model's encoding (hmm-5.2.md §1.4); result: the kernel's return |
| ``hmm52_snapshot`` | ``range`` | ``hmm_range_snapshot`` under ``mmap_sem`` (read) |
| ``hmm52_fault`` | ``range``, ``block``, ``request``, ``default_flags``, ``pfn_flags_mask`` | ``hmm_range_fault`` under ``mmap_sem`` (read) with per-page requests |
| ``hmm52_range_valid`` | ``range`` | ``hmm_range_valid``: 1 or 0 |
| ``hmm52_wait_until_valid`` | ``range``, ``timeout`` | ``hmm_range_wait_until_valid``: 1 or 0 |
| ``hmm52_range_unregister`` | ``range`` | ``hmm_range_unregister`` |
| ``hmm52_populate`` | ``mirror``, ``addr``, ``length``, ``access``, ``mode``, ``block``, ``literal`` | the hmm.rst driver loop; result 0 or the error |
| ``hmm52_device`` | ``mirror``, ``addr``, ``length`` | the device page table over the range and its coherence with the CPU |

Requests (``request``, ``default_flags``, ``pfn_flags_mask``) are flag strings over the letters ``v`` (VALID),
``w`` (WRITE, implies v), ``d`` (DEVICE_PRIVATE): ``"v"``, ``"vw"``, ``"w"``, ``"vd"``, ``""``/``"none"``.
``request`` is one string for every page, or a list of ``"i-j:flags"`` / ``"i:flags"`` items (page indices in
the range, inclusive); pages not listed request nothing.  ``pfn_flags_mask`` may also be ``"all"``.

Every snapshot/fault record carries ``entries`` (per page: ``"V"``, ``"VW"``, ``"VD"``, ``"VWD"`` followed by
``@pfn``, or ``"NONE"``, ``"ERROR"``, ``"SPECIAL"``), ``pfns`` (the raw entries, hex), ``stats`` (the call's
counters), ``pgmap_refs``, ``valid`` and ``lock_contexts`` (the task's held locks and atomic depth at every
call that may sleep during the call, ``handle_mm_fault`` included, merged with counts); ``expect.entries``
compares the per-page list.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.errors import InputError, KernelError, errno_name
from hmmirror.kernel import sched
from hmmirror.mm.hmm import v5_2 as hmm
from hmmirror.scenario.schema import register_op

U64 = (1 << 64) - 1
_REQ_RE = re.compile(r"^\s*(\d+)(?:\s*-\s*(\d+))?\s*:\s*([a-z]*)\s*$")


# --- request flag strings -----------------------------------------------------------------------------------
def _flags_word(text: str, what: str) -> int:
    """``"vw"`` -> VALID|WRITE in the model encoding (``w`` implies ``v``)."""
    t = text.strip().lower()
    if t in ("", "none", "-"):
        return 0
    if t == "all":
        return U64
    out = 0
    for ch in t:
        if ch == "v" or ch == "r":
            out |= hmm.DEFAULT_FLAGS[hmm.HMM_PFN_VALID]
        elif ch == "w":
            out |= hmm.DEFAULT_FLAGS[hmm.HMM_PFN_VALID] | hmm.DEFAULT_FLAGS[hmm.HMM_PFN_WRITE]
        elif ch == "d":
            out |= hmm.DEFAULT_FLAGS[hmm.HMM_PFN_DEVICE_PRIVATE]
        else:
            raise InputError(f"{what}: unknown request flag {ch!r} in {text!r} (use v, w, d, \"none\")")
    return out


def _flag_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a flag string like \"v\", \"vw\", \"vd\" or \"none\", not {value!r}")
    _flags_word(value, what)
    return value


def _request(value: Any, what: str) -> Any:
    if isinstance(value, str):
        _flags_word(value, what)
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a flag string or a list like [\"0-3:w\", \"7:v\"], not {value!r}")
    for v in value:
        m = _REQ_RE.match(v)
        if not m:
            raise InputError(f"{what}: bad item {v!r} (use \"i:flags\" or \"i-j:flags\")")
        _flags_word(m.group(3), what)
    return value


def _entries_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a list of entry strings like [\"V@0x40000\", \"NONE\"]")
    return value


def fill_requests(range: hmm.HmmRange, request: Any) -> None:  # noqa: A002
    """Write the per-page request words of ``request`` into ``range.pfns`` (others: 0)."""
    n = range.pfns.shape[0]
    range.pfns[:] = 0
    if request is None:
        return
    if isinstance(request, str):
        range.pfns[:] = _flags_word(request, "request")
        return
    for item in request:
        m = _REQ_RE.match(item)
        assert m is not None
        i = int(m.group(1))
        j = int(m.group(2)) if m.group(2) is not None else i
        if not 0 <= i <= j < n:
            raise InputError(f"request {item!r}: pages outside the range's {n} entries")
        range.pfns[i:j + 1] = _flags_word(m.group(3), "request")


# --- decoding -------------------------------------------------------------------------------------------
def decode_entry(range: hmm.HmmRange, e: int) -> str:  # noqa: A002
    """One output entry as a short string: ``"VW@0x40000"``, ``"NONE"``, ``"ERROR"``, ``"SPECIAL"``."""
    if e == range.values[hmm.HMM_PFN_NONE]:
        return "NONE"
    if e == range.values[hmm.HMM_PFN_ERROR]:
        return "ERROR"
    if e == range.values[hmm.HMM_PFN_SPECIAL]:
        return "SPECIAL"
    f = range.flags
    if not e & f[hmm.HMM_PFN_VALID]:
        return f"RAW:{e:#x}"
    s = "V" + ("W" if e & f[hmm.HMM_PFN_WRITE] else "") + ("D" if e & f[hmm.HMM_PFN_DEVICE_PRIVATE] else "")
    return f"{s}@{e >> range.pfn_shift:#x}"


def range_record(range: hmm.HmmRange) -> dict[str, Any]:  # noqa: A002
    """The JSON fields of a range after a call: entries, raw pfns (hex), stats, validity, pgmap refs."""
    vals = [int(x) for x in range.pfns.tolist()]
    machine = range.machine
    return {
        "entries": [decode_entry(range, e) for e in vals],
        "pfns": [f"{e:#x}" for e in vals],
        "stats": dict(range.stats),
        "valid": bool(range.valid),
        "pgmap_refs": hmm.pgmap_refs(machine) if machine is not None else {},
    }


# --- state of a run ---------------------------------------------------------------------------------------
def _state(ctx: Any) -> dict[str, Any]:
    if ctx.machine.profile.hmm_module != "hmmirror.mm.hmm.v5_2":
        raise KernelError("ENOSYS", f"the HMM 5.2 API needs kernel = \"5.2\" (this machine runs "
                                    f"{ctx.machine.profile.name})")
    return ctx.state.setdefault("hmm52", {"mirrors": {}, "ranges": {}})


def _mirror(ctx: Any, name: str) -> Any:
    st = _state(ctx)
    if name not in st["mirrors"]:
        raise InputError(f"no mirror named {name!r} (register it with hmm52_mirror_register first)")
    return st["mirrors"][name]


def _range(ctx: Any, name: str) -> hmm.HmmRange:
    st = _state(ctx)
    if name not in st["ranges"]:
        raise InputError(f"no range named {name!r} (register it with hmm52_range_register first)")
    return st["ranges"][name]


def _result(ret: int, extra: dict[str, Any] | None = None) -> Any:
    from hmmirror.scenario.runner import Outcome

    if isinstance(ret, int) and ret < 0:
        return Outcome(ret=ret, errno=errno_name(ret), extra=extra or {})
    return Outcome(ret=ret, extra=extra or {})


# --- handlers ---------------------------------------------------------------------------------------------
def op_mirror_register(ctx: Any, op: Any) -> Any:
    """hmm52_mirror_register: a model driver registers its mirror on the process's mm."""
    from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52

    st = _state(ctx)
    name = ctx.args.get("mirror", "mirror0")
    p = ctx.process(op.proc)
    drv = HmmMirrorDriver52(ctx.machine, name)
    ret = sched.run(drv.register(p.mm), p.mm.task)
    if ret == 0:
        st["mirrors"][name] = drv
    return _result(ret)


def op_mirror_unregister(ctx: Any, op: Any) -> Any:
    """hmm52_mirror_unregister."""
    drv = _mirror(ctx, ctx.args.get("mirror", "mirror0"))
    sched.run(hmm.hmm_mirror_unregister(drv.mirror), ctx.process(op.proc).mm.task)
    return 0


def op_range_register(ctx: Any, op: Any) -> Any:
    """hmm52_range_register: ``hmm_range_register(range, mm, addr, addr + length, page_shift)``."""
    st = _state(ctx)
    a = ctx.args
    name = a.get("range", "range0")
    p = ctx.process(op.proc)
    shift = a.get("page_shift", PAGE_SHIFT)
    start, end = a["addr"], a["addr"] + a["length"]
    r = hmm.new_range(start, end, shift, name=name)
    if start & ((1 << shift) - 1) or end & ((1 << shift) - 1) or end <= start:
        r.pfns = np.zeros(max(0, (end - start) >> PAGE_SHIFT), dtype=np.uint64)
    ret = sched.run(hmm.hmm_range_register(r, p.mm, start, end, shift), p.mm.task)
    st["ranges"][name] = r
    return _result(ret, {"valid": bool(r.valid)})


def _with_mmap_read(p: Any, gen: Any) -> int:
    """Run an HMM call under ``mmap_sem`` held for read; release it afterwards if HMM did not."""
    task = p.mm.task

    def body() -> Any:
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from gen
        if p.mm.mmap_sem.held_by(task):
            sched.up_read(p.mm.mmap_sem)
        return ret

    return sched.run(body(), task)


def lock_contexts(machine: Any, since: int) -> list[dict[str, Any]]:
    """The lock context of every call that may sleep logged since event ``since`` (``may_sleep`` events),
    merged: one record per distinct (call, locks, atomic) with its count, in first-seen order."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in machine.events[since:]:
        if e.get("what") != "may_sleep":
            continue
        key = (e["call"], tuple(e["locks"]), e["atomic"])
        rec = out.get(key)
        if rec is None:
            rec = out[key] = {"call": e["call"], "locks": list(e["locks"]), "atomic": e["atomic"], "count": 0}
        rec["count"] += 1
    return list(out.values())


def op_snapshot(ctx: Any, op: Any) -> Any:
    """hmm52_snapshot: ``hmm_range_snapshot(range)`` under mmap_sem (read)."""
    r = _range(ctx, ctx.args.get("range", "range0"))
    p = ctx.process(op.proc)
    since = len(ctx.machine.events)
    ret = _with_mmap_read(p, hmm.hmm_range_snapshot(r))
    return _result(ret, {**range_record(r), "lock_contexts": lock_contexts(ctx.machine, since)})


def op_fault(ctx: Any, op: Any) -> Any:
    """hmm52_fault: per-page requests, then ``hmm_range_fault(range, block)`` under mmap_sem (read)."""
    a = ctx.args
    r = _range(ctx, a.get("range", "range0"))
    p = ctx.process(op.proc)
    fill_requests(r, a.get("request"))
    r.default_flags = _flags_word(a.get("default_flags", "none"), "default_flags")
    r.pfn_flags_mask = _flags_word(a.get("pfn_flags_mask", "all"), "pfn_flags_mask")
    since = len(ctx.machine.events)
    ret = _with_mmap_read(p, hmm.hmm_range_fault(r, a.get("block", True)))
    return _result(ret, {**range_record(r), "lock_contexts": lock_contexts(ctx.machine, since)})


def op_range_valid(ctx: Any, op: Any) -> Any:
    """hmm52_range_valid: 1 or 0."""
    r = _range(ctx, ctx.args.get("range", "range0"))
    return _result(int(hmm.hmm_range_valid(r)), {"valid": bool(r.valid)})


def op_wait_until_valid(ctx: Any, op: Any) -> Any:
    """hmm52_wait_until_valid: 1 or 0."""
    r = _range(ctx, ctx.args.get("range", "range0"))
    p = ctx.process(op.proc)
    ok = sched.run(hmm.hmm_range_wait_until_valid(r, ctx.args.get("timeout", hmm.HMM_RANGE_DEFAULT_TIMEOUT)),
                   p.mm.task)
    return _result(int(ok), {"valid": bool(r.valid)})


def op_range_unregister(ctx: Any, op: Any) -> Any:
    """hmm52_range_unregister."""
    r = _range(ctx, ctx.args.get("range", "range0"))
    sched.run(hmm.hmm_range_unregister(r), ctx.process(op.proc).mm.task)
    return _result(0, {"valid": bool(r.valid)})


def op_populate(ctx: Any, op: Any) -> Any:
    """hmm52_populate: the hmm.rst 5.2 driver loop over ``[addr, addr + length)``."""
    a = ctx.args
    drv = _mirror(ctx, a.get("mirror", "mirror0"))
    p = ctx.process(op.proc)
    start, end = a["addr"], a["addr"] + a["length"]
    ret = sched.run(drv.populate(start, end, a.get("access", "read") == "write", a.get("mode", "fault"),
                                 a.get("block", True), a.get("literal", False)), p.mm.task)
    extra: dict[str, Any] = {"driver": dict(drv.stats), "pgmap_refs": hmm.pgmap_refs(ctx.machine)}
    if drv.last_range is not None:
        extra["stats"] = dict(drv.last_range.stats)
    extra["device"] = [f"{e:#x}" for e in drv.device_entries(start, end)]
    return _result(ret, extra)


def op_device(ctx: Any, op: Any) -> Any:
    """hmm52_device: the device page table over the range (hex entries) and coherence mismatches."""
    a = ctx.args
    drv = _mirror(ctx, a.get("mirror", "mirror0"))
    ents = drv.device_entries(a["addr"], a["addr"] + a["length"])
    bad = drv.check_coherent()
    return _result(sum(1 for e in ents if e), {"device": [f"{e:#x}" for e in ents], "incoherent": bad})


_RANGE = {"addr": "addr", "length": "size"}
register_op("hmm52_mirror_register", op_mirror_register, {"mirror": "name"}, (),
            doc="[5.2] register an HMM mirror (model driver) on the process's mm")
register_op("hmm52_mirror_unregister", op_mirror_unregister, {"mirror": "name"}, (),
            doc="[5.2] hmm_mirror_unregister")
register_op("hmm52_range_register", op_range_register, {"range": "name", **_RANGE, "page_shift": "int"},
            ("addr",), range_op=True, expect_keys={"valid": "bool"},
            doc="[5.2] hmm_range_register(range, mm, addr, addr+length, page_shift)")
register_op("hmm52_snapshot", op_snapshot, {"range": "name"}, (), expect_keys={"entries": _entries_list},
            doc="[5.2] hmm_range_snapshot under mmap_sem; result: the page count")
register_op("hmm52_fault", op_fault, {"range": "name", "block": "bool", "request": _request,
                                      "default_flags": _flag_string, "pfn_flags_mask": _flag_string}, (),
            expect_keys={"entries": _entries_list, "valid": "bool"},
            doc="[5.2] hmm_range_fault(range, block) with per-page requests; result: the page count")
register_op("hmm52_range_valid", op_range_valid, {"range": "name"}, (), expect_keys={"valid": "bool"},
            doc="[5.2] hmm_range_valid: 1 or 0")
register_op("hmm52_wait_until_valid", op_wait_until_valid, {"range": "name", "timeout": "count"}, (),
            expect_keys={"valid": "bool"}, doc="[5.2] hmm_range_wait_until_valid: 1 or 0")
register_op("hmm52_range_unregister", op_range_unregister, {"range": "name"}, (),
            doc="[5.2] hmm_range_unregister")
register_op("hmm52_populate", op_populate, {"mirror": "name", **_RANGE, "access": "access",
                                            "mode": ("fault", "snapshot"), "block": "bool", "literal": "bool"},
            ("addr",), range_op=True, aligned=("addr",),
            doc="[5.2] the hmm.rst driver loop (register, fault, driver lock, valid, commit)")
register_op("hmm52_device", op_device, {"mirror": "name", **_RANGE}, ("addr",), range_op=True,
            doc="[5.2] the device page table over the range; result: entries present")


# --- the seed's story -------------------------------------------------------------------------------------
SEED_STORY_TITLE = "mm/hmm: allow to mirror vma of a file on a DAX backed filesystem (Linux 5.2)"


def seed_story(pages: int = 8) -> dict[str, Any]:
    """"mm/hmm: allow to mirror vma of a file on a DAX backed filesystem" (Linux 5.2), as a story.

    A 5.2 machine with a 64 MiB fsdax pmem device under ext4 ``-o dax``; a process maps a 2 MiB file (PMD
    devmap leaves) and a 16 KiB file (PTE devmap entries) shared, reads the first and writes the second
    2 MiB file page; a device driver registers a mirror and faults both ranges in with read requests
    (``hmm_range_fault``, ``block = True``).  The mirror's entries carry the pmem pfns of the CPU entries,
    VALID and WRITE as the CPU entries have them, and every ``get_dev_pagemap`` reference taken during the
    walk is put again (``pgmap_refs`` before == after).  ``pages`` limits the pages shown per range.

    Returns a JSON-able dict: ``kernel``, ``story``, ``mirror`` (per range: start, ``pfns`` (hex entries),
    ``entries`` (decoded) beside ``cpu`` (the CPU's per-page state)), ``pgmap_refs`` (``before``/``after``),
    ``counters`` (``hmm.*``), ``ret`` per range.
    """
    from hmmirror.machine import Machine

    m = Machine("5.2", ram=256 << 20)
    m.add_pmem("pmem0", 64 << 20, "fsdax")
    m.mount("/mnt/pmem", "ext4", dax="pmem0")
    m.create_file("/mnt/pmem/big", 2 << 20)
    m.create_file("/mnt/pmem/small", 4 * PAGE_SIZE)
    p = m.spawn("app")
    big = p.mmap(2 << 20, "rw", ["shared"], file="/mnt/pmem/big", align=2 << 20)
    small = p.mmap(4 * PAGE_SIZE, "rw", ["shared"], file="/mnt/pmem/small")
    p.touch(big, PAGE_SIZE)                          # read fault: PMD devmap leaf, read-only (write-notify)
    p.touch(small, PAGE_SIZE)                        # read fault: PTE devmap entry, read-only
    p.touch(small + PAGE_SIZE, PAGE_SIZE, write=True)  # write fault: writable PTE devmap entry
    from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52

    drv = HmmMirrorDriver52(m, "gpu0")
    sched.run(drv.register(p.mm), p.mm.task)
    before = hmm.pgmap_refs(m)
    out: dict[str, Any] = {"kernel": "5.2", "story": SEED_STORY_TITLE, "mirror": [], "ret": {}}
    for name, start, n in (("pmd", big, min(pages, 512)), ("pte", small, min(pages, 4))):
        r = hmm.new_range(start, start + n * PAGE_SIZE, name=name)
        sched.run(hmm.hmm_range_register(r, p.mm, r.start, r.end, PAGE_SHIFT), p.mm.task)
        r.default_flags = hmm.DEFAULT_FLAGS[hmm.HMM_PFN_VALID]
        r.pfn_flags_mask = 0
        ret = _with_mmap_read(p, hmm.hmm_range_fault(r, True))
        rec = range_record(r)
        cpu = [{"pfn": None if s.pfn is None else hex(s.pfn), "kind": s.kind, "level": s.level, "write": s.write}
               for s in p.inspect(r.start, r.end - r.start)]
        out["mirror"].append({"range": name, "start": hex(r.start), "pfns": rec["pfns"],
                              "entries": rec["entries"], "cpu": cpu})
        out["ret"][name] = ret
        sched.run(hmm.hmm_range_unregister(r), p.mm.task)
    out["pgmap_refs"] = {"before": before, "after": hmm.pgmap_refs(m)}
    out["counters"] = hmm.hmm_counters(m)
    return out
