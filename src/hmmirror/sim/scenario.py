"""Simulator scenarios: what runs concurrently on which machine, as data (and as a TOML file).

A :class:`SimScenario` extends the scenario format of docs/scenarios.md (``[machine]``, ``[[file]]``,
``[[process]]``, ``[[op]]`` -- here the *setup*, run sequentially before the interleaving starts) with a
``[sim]`` table: the driver, the mirrored process, and the concurrent parts -- ``[[sim.thread]]`` (CPU
threads, each a list of operations), ``[[sim.device]]`` (device jobs, each a list of device faults handled
by the driver) and ``[[sim.event]]`` (kernel background events).  A reproducer adds ``[sim.schedule]``:
the recorded interleaving, run-length encoded task names.

:func:`generate` draws a scenario from a :class:`~hmmirror.sim.choices.Choices` stream over every VMA kind
the model currently supports (:func:`available_kinds` probes them once per profile and process).
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from hmmirror.errors import InputError
from hmmirror.sim.choices import Choices
from hmmirror.sim.tomlw import dumps

K, M, G = 1 << 10, 1 << 20, 1 << 30
_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)\s*([KMG]?)(?:i?B)?$", re.I)
_ADDR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:([+-])\s*(.+))?$")

VMA_KINDS = ("anon", "file", "shmem", "fsdax", "devdax", "hugetlb", "pfnmap")
EVENT_KINDS = ("reclaim", "thp_split", "khugepaged", "migrate", "numa", "memory_failure", "pmem_unbind",
               "oom_reap", "notifier_churn", "exit", "gc")


def parse_size(v: Any) -> int:
    """``"8K"`` -> 8192 (ints pass through)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SIZE.match(str(v).strip())
    if not m:
        raise InputError(f"bad size {v!r} (use an integer or \"4K\", \"2M\", \"1G\")")
    return int(m.group(1), 0) * {"": 1, "k": K, "m": M, "g": G}[m.group(2).lower()]


def fmt_size(n: int) -> str:
    for suf, unit in (("G", G), ("M", M), ("K", K)):
        if n and n % unit == 0:
            return f"{n // unit}{suf}"
    return str(n)


def resolve_addr(expr: Any, names: dict[str, int]) -> int | None:
    """``"m0+8K"`` -> address (None if ``m0`` is not known yet)."""
    if isinstance(expr, int):
        return expr
    text = str(expr).strip()
    if text[:1].isdigit():
        return int(text, 0)
    m = _ADDR.match(text)
    if not m:
        raise InputError(f"bad address {expr!r} (use an integer or \"NAME+OFFSET\")")
    base = names.get(m.group(1))
    if base is None:
        return None
    off = parse_size(m.group(3)) if m.group(3) else 0
    return base - off if m.group(2) == "-" else base + off


@dataclass
class SimScenario:
    """A machine, its setup, and the tasks that run concurrently."""

    machine: dict[str, Any] = field(default_factory=lambda: {"kernel": "6.18", "ram": "64M"})
    files: list[dict[str, Any]] = field(default_factory=list)
    processes: list[str] = field(default_factory=lambda: ["p"])
    setup: list[dict[str, Any]] = field(default_factory=list)
    driver: str = "builtin"
    mirror: str = "p"
    threads: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    max_steps: int = 100_000
    scheduler: dict[str, Any] = field(default_factory=lambda: {"kind": "switch", "switches": []})
    schedule: list[list[Any]] | None = None     # recorded picks [[task, n], ...] (a reproducer)

    @property
    def kernel(self) -> str:
        return str(self.machine.get("kernel", "6.18"))

    def copy(self) -> "SimScenario":
        return copy.deepcopy(self)

    def size(self) -> int:
        """A measure for "smaller reproducer": operations + jobs + events + setup steps."""
        return (sum(len(t["ops"]) for t in self.threads) + sum(len(d["jobs"]) for d in self.devices)
                + len(self.events) + len(self.setup))

    # -- TOML ----------------------------------------------------------------------------------------------
    def to_doc(self) -> dict[str, Any]:
        sim: dict[str, Any] = {"driver": self.driver, "mirror": self.mirror, "max_steps": self.max_steps,
                               "thread": self.threads or None, "device": self.devices or None,
                               "event": self.events or None, "scheduler": self.scheduler}
        if self.schedule is not None:
            sim["schedule"] = {"runs": self.schedule}
        doc: dict[str, Any] = {"machine": self.machine}
        if self.files:
            doc["file"] = self.files
        doc["process"] = [{"name": p} for p in self.processes]
        if self.setup:
            doc["op"] = self.setup
        doc["sim"] = sim
        return doc

    def to_toml(self, header: str = "") -> str:
        return dumps(self.to_doc(), header, {"sim.thread.ops", "sim.device.jobs", "sim.scheduler.switches"})

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "SimScenario":
        sim = doc.get("sim")
        if not isinstance(sim, dict):
            raise InputError("not a simulator scenario: no [sim] table")
        sc = cls()
        sc.machine = dict(doc.get("machine", {}))
        sc.files = list(doc.get("file", []))
        sc.processes = [p.get("name", "p") for p in doc.get("process", [{"name": "p"}])]
        sc.setup = list(doc.get("op", []))
        sc.driver = str(sim.get("driver", "builtin"))
        sc.mirror = str(sim.get("mirror", sc.processes[0]))
        sc.threads = list(sim.get("thread", []))
        sc.devices = list(sim.get("device", []))
        sc.events = list(sim.get("event", []))
        sc.max_steps = int(sim.get("max_steps", 100_000))
        sc.scheduler = dict(sim.get("scheduler", {"kind": "switch", "switches": []}))
        sched = sim.get("schedule")
        sc.schedule = [list(r) for r in sched.get("runs", [])] if isinstance(sched, dict) else None
        for t in sc.threads:
            t.setdefault("ops", [])
        for d in sc.devices:
            d.setdefault("jobs", [])
        return sc

    @classmethod
    def from_toml(cls, text: str, where: str = "scenario") -> "SimScenario":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{where}: not valid TOML: {exc}") from None
        return cls.from_doc(doc)

    @classmethod
    def load(cls, path: str) -> "SimScenario":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_toml(text, path)


# --- feature probing -------------------------------------------------------------------------------------
_KINDS_CACHE: dict[str, tuple[str, ...]] = {}
_EVENTS_CACHE: dict[str, tuple[str, ...]] = {}


def _mapping_setup(kind: str, name: str, pages: int, write: bool, huge: bool) -> tuple[dict[str, Any], list[
        dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(machine additions, files, mmap op, extra ops) for one mapping of ``kind``."""
    length = pages * 4096
    mach: dict[str, Any] = {}
    files: list[dict[str, Any]] = []
    prot = "rw" if write else "r"
    extra: list[dict[str, Any]] = []
    if kind == "anon":
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot,
              "flags": ["private", "anonymous"]}
        if huge:
            op["align"] = "2M"
            extra.append({"op": "madvise", "addr": name, "length": fmt_size(length), "advice": "hugepage"})
    elif kind == "shmem":
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot,
              "flags": ["shared", "anonymous"]}
    elif kind == "file":
        mach["fs"] = [{"mount": "/mnt/ext4", "type": "ext4"}]
        files.append({"path": f"/mnt/ext4/{name}", "size": fmt_size(length), "content": "data"})
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot, "flags": ["shared"],
              "file": f"/mnt/ext4/{name}"}
    elif kind == "fsdax":
        mach["pmem"] = [{"name": "pmem0", "size": "16M", "mode": "fsdax"}]
        mach["fs"] = [{"mount": "/mnt/dax", "type": "ext4", "dax": "pmem0"}]
        files.append({"path": f"/mnt/dax/{name}", "size": fmt_size(length), "content": "data"})
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot, "flags": ["shared"],
              "file": f"/mnt/dax/{name}"}
        if huge:
            op["align"] = "2M"
    elif kind == "devdax":
        mach["pmem"] = [{"name": "pmem1", "size": "16M", "mode": "devdax", "align": "2M" if huge else "4K"}]
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot, "flags": ["shared"],
              "file": "/dev/dax1.0", "align": "2M"}
    elif kind == "hugetlb":
        mach["hugepages_2m"] = 4
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot,
              "flags": ["private", "anonymous", "hugetlb"]}
    elif kind == "pfnmap":
        op = {"op": "mmap", "as": name, "length": fmt_size(length), "prot": prot, "flags": ["shared"],
              "file": "pfnmap"}
    else:
        raise InputError(f"unknown VMA kind {kind!r}")
    return mach, files, [op], extra


def _merge_machine(dst: dict[str, Any], add: dict[str, Any]) -> None:
    for k, v in add.items():
        if isinstance(v, list):
            have = dst.setdefault(k, [])
            for item in v:
                if item not in have:
                    have.append(item)
        elif k == "hugepages_2m":
            dst[k] = max(int(dst.get(k, 0)), int(v))
        else:
            dst[k] = v


def available_kinds(kernel: str) -> tuple[str, ...]:
    """The VMA kinds whose set-up and first touch work in the model as it stands (probed once)."""
    if kernel in _KINDS_CACHE:
        return _KINDS_CACHE[kernel]
    from hmmirror.sim.runner import build_machine
    out = []
    for kind in VMA_KINDS:
        huge = kind in ("devdax", "hugetlb")
        pages = 512 if huge else 16
        sc = SimScenario(machine={"kernel": kernel, "ram": "64M"})
        mach, files, ops, extra = _mapping_setup(kind, "m0", pages, True, huge)
        _merge_machine(sc.machine, mach)
        sc.files = files
        sc.setup = ops + extra + [{"op": "touch", "addr": "m0", "length": "4K", "access": "read"}]
        try:
            build_machine(sc, strict=True)
        except Exception:            # noqa: BLE001 - a kind the model does not support yet
            continue
        out.append(kind)
    _KINDS_CACHE[kernel] = tuple(out)
    return _KINDS_CACHE[kernel]


def available_events(kernel: str) -> tuple[str, ...]:
    """Background events whose model code exists."""
    if kernel in _EVENTS_CACHE:
        return _EVENTS_CACHE[kernel]
    from hmmirror.sim import kevents
    out = tuple(k for k in EVENT_KINDS if kevents.supported(k))
    _EVENTS_CACHE[kernel] = out
    return out


def available_ops() -> tuple[str, ...]:
    import importlib.util as u
    ops = ["touch", "munmap", "mmap"]
    if u.find_spec("hmmirror.mm.mprotect"):
        ops.append("mprotect")
    if u.find_spec("hmmirror.mm.madvise"):
        ops.append("madvise")
    if u.find_spec("hmmirror.kernel.fork"):
        ops += ["fork"]
    return tuple(ops)


# --- generation ------------------------------------------------------------------------------------------
def generate(c: Choices, kernel: str, driver: str = "builtin", kinds: tuple[str, ...] | None = None,
             events: tuple[str, ...] | None = None) -> SimScenario:
    """Draw a small scenario: 1-3 mappings, 1-2 CPU threads, 1-2 device jobs, 0-3 background events."""
    kinds = kinds or available_kinds(kernel)
    events = available_events(kernel) if events is None else events
    ops_avail = available_ops()
    sc = SimScenario(machine={"kernel": kernel, "ram": "64M",
                              "thp": {"enabled": c.pick(("madvise", "always", "never"))}}, driver=driver)
    nmaps = 1 + c.below(3)
    maps: list[tuple[str, str, int, bool]] = []
    for i in range(nmaps):
        kind = c.pick(kinds)
        huge = kind in ("devdax", "hugetlb") or (kind in ("anon", "fsdax") and c.flip(1, 3))
        pages = 512 * (1 + c.below(2)) if huge else 1 + c.below(32)
        write = kind == "devdax" or c.flip(3, 4)
        name = f"m{i}"
        mach, files, ops, extra = _mapping_setup(kind, name, pages, write, huge)
        _merge_machine(sc.machine, mach)
        sc.files += files
        sc.setup += ops + extra
        if kind != "pfnmap" and c.flip(2, 3):     # populate part of it
            n = 1 + c.below(min(pages, 32))
            sc.setup.append({"op": "touch", "addr": name, "length": fmt_size(n * 4096),
                             "access": "write" if write and c.flip() else "read"})
        maps.append((name, kind, pages, write))

    def rng(maxpages: int = 64) -> tuple[str, str, int]:
        name, kind, pages, _w = c.pick(maps)
        first = c.below(pages)
        n = 1 + c.below(min(pages - first, maxpages))
        return name, f"{name}+{fmt_size(first * 4096)}" if first else name, n

    nthreads = 1 + c.below(2)
    for t in range(nthreads):
        ops = []
        for _ in range(1 + c.below(4)):
            kind = c.pick(ops_avail)
            name, addr, n = rng(16)
            if kind == "touch":
                ops.append({"op": "touch", "addr": addr, "length": fmt_size(n * 4096),
                            "access": c.pick(("read", "write"))})
            elif kind == "munmap":
                ops.append({"op": "munmap", "addr": addr, "length": fmt_size(n * 4096)})
            elif kind == "mprotect":
                ops.append({"op": "mprotect", "addr": addr, "length": fmt_size(n * 4096),
                            "prot": c.pick(("r", "rw", "none"))})
            elif kind == "madvise":
                ops.append({"op": "madvise", "addr": addr, "length": fmt_size(n * 4096),
                            "advice": c.pick(("dontneed", "dontneed", "hugepage"))})
            elif kind == "mmap":
                ops.append({"op": "mmap", "as": f"t{t}m{len(ops)}", "length": fmt_size(n * 4096), "prot": "rw",
                            "flags": ["private", "anonymous", "fixed"], "addr": addr})
            elif kind == "fork":
                ops.append({"op": "fork", "child": f"c{t}"})
        sc.threads.append({"name": f"cpu{t}", "proc": "p", "ops": ops})
    ndev = 1 + c.below(2)
    for d in range(ndev):
        jobs = []
        for _ in range(1 + c.below(3)):
            _name, addr, n = rng(64)
            jobs.append({"addr": addr, "length": fmt_size(n * 4096), "write": c.flip()})
        sc.devices.append({"name": f"dev{d}", "jobs": jobs})
    used = {k for _n, k, _p, _w in maps}
    events = tuple(e for e in events if e != "pmem_unbind" or "devdax" in used)
    if events:
        for e in range(c.below(4)):
            kind = c.pick(events)
            if kind == "exit" and any(x["kind"] == "exit" for x in sc.events):
                continue
            ev: dict[str, Any] = {"name": f"ev{e}", "kind": kind}
            if kind in ("reclaim", "thp_split", "khugepaged", "migrate", "memory_failure", "numa"):
                _name, addr, n = rng(8)
                ev["addr"] = addr
                if kind == "numa":
                    ev["length"] = fmt_size(n * 4096)
                if kind == "migrate":
                    ev["hold"] = 1 + c.below(8)
            if kind == "pmem_unbind":
                ev["device"] = "/dev/dax1.0"
            if kind in ("oom_reap", "exit", "notifier_churn"):
                ev["proc"] = "p"
            ev["delay"] = c.below(16)
            sc.events.append(ev)
    return sc
