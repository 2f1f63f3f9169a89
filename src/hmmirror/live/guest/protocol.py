"""Scenario -> player script, and player output -> per-operation records with per-page states.

:func:`plan` turns a parsed :class:`~hmmirror.scenario.schema.Scenario` into the lines of the player's command
script (set-up, processes, operations; the format is described at the top of ``player.c``) or says why the
guest cannot run it (:class:`Plan` ``.skip``).  :func:`parse_output` reads the player's output back into one
:class:`GuestScenarioResult` per scenario: an :class:`GuestOpResult` per operation (the host runner's
:class:`~hmmirror.live.executor.LiveOpResult` plus ``extra``: dmirror ``cpages``, ``faults``, ``bad_pages``,
``snapshot``) with the pages of every ``inspect`` classified by :func:`hmmirror.live.pagemap.classify`, the
same code that reads the host kernel.

What the guest offers a scenario: tmpfs and hugetlbfs anywhere; ext4 with ``-o dax`` on ``/dev/pmem0``
(one per scenario, pmem up to 512 MiB) and ext4 without DAX on ``/dev/pmem1`` (one); device-dax on
``/dev/pmem2`` (2 MiB alignment, up to 240 MiB) and on ``/dev/pmem4`` (1 GiB alignment, 1 GiB), each made
once per boot when a scenario asks; xfs on
``/dev/pmem3`` (one); hugetlb pools; THP settings as the scenario's ``[machine.thp]`` (the model's defaults
otherwise).  Not offered (the scenario is skipped with the reason): a second DAX, plain ext4 or xfs
filesystem, xfs with DAX, ``pfnmap`` mappings, device-dax alignments other than 2 MiB and 1 GiB, and operations that
read model internals (``dmirror_pt``, ``mirror_range``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmmirror.include.pagestate import PageState
from hmmirror.live import executor, pagemap
from hmmirror.live.executor import LiveOpResult

#: Guest devices (see :mod:`hmmirror.live.guest.vm`).
DAX_FS_DEVICE, PLAIN_FS_DEVICE, DEVDAX_REGION, XFS_DEVICE = "/dev/pmem0", "/dev/pmem1", "region2", "/dev/pmem3"
DAX_FS_MAX, DEVDAX_MAX = 512 << 20, 240 << 20
#: device-dax with 1 GiB alignment (PUD faults): /dev/dax4.0 on pmem4 (2 GiB: the data starts 1 GiB in).
DEVDAX_1G_DEVICE, DEVDAX_1G_MAX = "/dev/dax4.0", 1 << 30
#: Operations the player runs besides the built-in ones.
DMIRROR_OPS = ("dmirror_open", "dmirror_close", "dmirror_read", "dmirror_write", "dmirror_snapshot",
               "dmirror_migrate_to_dev", "dmirror_migrate_to_sys", "dmirror_exclusive",
               "dmirror_check_exclusive", "dmirror_release", "dmirror_flags")
#: Ops whose buffer holds the device's copy afterwards (``fill`` -> ``bad_pages``).
READ_BACK_OPS = ("dmirror_read", "dmirror_migrate_to_dev", "dmirror_exclusive")
PLAIN_OPS = ("mmap", "munmap", "mprotect", "madvise", "touch", "check", "fork", "exit", "truncate", "inspect",
             "gup_test")
#: Swap types of non-swap entries in the guest kernel (6.12, MIGRATION=y, DEVICE_PRIVATE=y, no
#: MEMORY_FAILURE: include/linux/swap.h stacks them below the PTE marker type 31).
GUEST_SWAP_KINDS = {24: "migration", 25: "migration", 26: "migration", 27: "device_private",
                    28: "device_private", 29: "device_exclusive", 30: "device_exclusive", 31: "marker"}


@dataclass
class GuestOpResult(LiveOpResult):
    """One operation's outcome in the guest; ``extra`` holds dmirror results (``cpages``, ``snapshot`` ...)."""

    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        if isinstance(self.ret, int) and self.op == "mmap" and self.ok:
            d["ret"] = hex(self.ret)
        d.update(self.extra)
        return d


@dataclass
class Plan:
    """The player lines of one scenario, or why it cannot run in the guest."""

    name: str
    lines: list[str] = field(default_factory=list)
    skip: str | None = None
    unsupported: dict[int, str] = field(default_factory=dict)    # op index -> why
    needs_devdax: bool = False
    needs_devdax_1g: bool = False
    ops: list[tuple[int, str, str]] = field(default_factory=list)  # (index, op, proc) of every op


@dataclass
class GuestScenarioResult:
    """What the guest did for one scenario."""

    name: str
    records: list[GuestOpResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)     # set-up failures (the run is not comparable)
    complete: bool = False


def _safe_name(names: dict[str, str], name: str) -> str:
    """Player-safe token for a scenario name (names may contain '-' and '.')."""
    if name not in names:
        names[name] = f"n{len(names)}"
    return names[name]


def _addr(a: Any, names: dict[str, str]) -> str:
    from hmmirror.scenario.schema import Addr

    if isinstance(a, Addr):
        if a.name is None:
            return hex(a.offset)
        base = _safe_name(names, a.name)
        return base if a.offset == 0 else f"{base}{'+' if a.offset > 0 else '-'}{abs(a.offset):#x}"
    return hex(int(a))


def _fill(v: Any) -> str:
    return "index32" if v == "index32" else str(int(v))


def plan(scn: Any, name: str | None = None) -> Plan:
    """The player script of a parsed scenario (``name``: the scenario's label in the output)."""
    from hmmirror.machine import ThpSettings

    p = Plan(name or scn.file)
    ms = scn.machine
    lines = p.lines
    lines.append(f"SCN {p.name}")
    thp = ThpSettings(**ms.thp)
    base = "/sys/kernel/mm/transparent_hugepage"
    lines += [f"SYS {base}/enabled {thp.enabled}", f"SYS {base}/defrag {thp.defrag}",
              f"SYS {base}/use_zero_page {1 if thp.use_zero_page else 0}",
              f"SYS {base}/shmem_enabled {thp.shmem_enabled}"]
    pmem = {d.name: d for d in ms.pmem}
    devices: dict[str, str] = {}
    used: set[str] = set()
    for d in ms.pmem:
        if d.mode == "devdax":
            big = d.align == 1 << 30
            limit = DEVDAX_1G_MAX if big else DEVDAX_MAX
            if d.align not in (2 << 20, 1 << 30):
                p.skip = f"device-dax {d.name}: only 2M or 1G alignment in the guest (asked {d.align >> 10}K)"
            elif d.size > limit:
                p.skip = f"device-dax {d.name}: larger than the guest's {limit >> 20} MiB"
            elif f"devdax{d.align}" in used:
                p.skip = f"more than one device-dax device with {d.align >> 20}M alignment"
            used.add(f"devdax{d.align}")
            if big:
                p.needs_devdax_1g = True
            else:
                p.needs_devdax = True
            suffix = d.name[4:] if d.name.startswith("pmem") else d.name
            devices[f"/dev/dax{suffix}.0"] = DEVDAX_1G_DEVICE if big else "/dev/dax2.0"
    for fs in ms.fs:
        if fs.type == "xfs" and fs.dax is not None:
            p.skip = f"{fs.mount}: xfs with DAX is not offered by the guest (ext4 is)"
        elif fs.type == "xfs":
            if XFS_DEVICE in used:
                p.skip = f"{fs.mount}: the guest has one xfs filesystem"
            used.add(XFS_DEVICE)
            lines += [f"MKFS xfs {XFS_DEVICE}", f"MOUNT xfs {XFS_DEVICE} {fs.mount} -"]
        elif fs.type == "ext4":
            dax = fs.dax is not None
            dev = DAX_FS_DEVICE if dax else PLAIN_FS_DEVICE
            if dev in used:
                p.skip = f"{fs.mount}: the guest has one {'DAX' if dax else 'plain'} ext4 filesystem"
            if dax and fs.dax in pmem and pmem[fs.dax].size > DAX_FS_MAX:
                p.skip = f"{fs.mount}: pmem {fs.dax} is larger than the guest's {DAX_FS_MAX >> 20} MiB"
            used.add(dev)
            lines += [f"MKFS ext4 {dev}", f"MOUNT ext4 {dev} {fs.mount} {'dax' if dax else '-'}"]
        elif fs.type == "tmpfs":
            lines.append(f"MOUNT tmpfs none {fs.mount} huge={fs.huge or 'never'}")
        elif fs.type == "hugetlbfs":
            size = "1G" if fs.pagesize == 1 << 30 else "2M"
            lines.append(f"MOUNT hugetlbfs none {fs.mount} pagesize={size}")
    if ms.hugepages_2m:
        lines.append(f"HUGE 2048 {ms.hugepages_2m}")
    if ms.hugepages_1g:
        lines.append(f"HUGE 1048576 {ms.hugepages_1g}")
    for f in scn.files:
        lines.append(f"FILE {f.path} {f.size} {f.content} {0 if f.cached is False else 1}")
    lines.append("MOUNTINFO")
    for proc in scn.processes:
        lines.append(f"PROC {proc}")
    names: dict[str, str] = {}
    hugetlbfs = {fs.mount: fs.pagesize or (2 << 20) for fs in ms.fs if fs.type == "hugetlbfs"}
    for op in scn.ops:
        p.ops.append((op.index, op.name, op.proc))
        try:
            words = _op_words(op, names, devices, hugetlbfs)
        except _NotHere as exc:
            p.unsupported[op.index] = str(exc)
            continue
        lines.append(f"OP {op.index} {op.proc} {op.name} {' '.join(words)}".rstrip())
    lines.append("END")
    return p


class _NotHere(Exception):
    """The operation cannot run in the guest."""


def _op_words(op: Any, names: dict[str, str], devices: dict[str, str], hugetlbfs: dict[str, int]) -> list[str]:
    a = op.args
    n = op.name
    if n not in PLAIN_OPS and n not in DMIRROR_OPS:
        raise _NotHere(f"operation {n!r} reads the model's internals or is not known to the guest player")
    w: list[str] = []
    if n == "mmap":
        f = a.get("file")
        if f == "pfnmap":
            raise _NotHere("pfnmap mappings need a model driver")
        flags = executor._map_flags(a.get("flags") or ["private"])
        if f is None:
            flags |= executor.MAP_ANONYMOUS
        path = devices.get(f, f) if f else None
        if path and path.startswith("/dev/dax") and f not in devices:
            raise _NotHere(f"{f}: no such device-dax device in the scenario")
        psize = executor.PAGE_SIZE
        if flags & executor.MAP_HUGETLB:
            shift = (flags >> executor.MAP_HUGE_SHIFT) & 0x3F
            psize = 1 << shift if shift else 2 << 20
        elif f:
            for mount, size in hugetlbfs.items():
                if f.startswith(mount.rstrip("/") + "/"):
                    psize = size
        w += [f"len={a['length']}", f"prot={executor._prot(a.get('prot', 'rw'))}", f"flags={flags:#x}",
              f"off={a.get('offset', 0)}", f"psize={psize}"]
        if path:
            w.append(f"path={path}")
        if a.get("addr") is not None:
            w.append(f"addr={_addr(a['addr'], names)}")
        if a.get("align"):
            w.append(f"align={a['align']}")
        if op.as_:
            w.append(f"as={_safe_name(names, op.as_)}")
        return w
    if n == "dmirror_release" and "addr" not in a:
        w.append("addr=0x1000")                       # the ioctl only checks the range (dmirror_ops.py)
    if n == "dmirror_release" and "length" not in a:
        w.append("len=4096")
    if "addr" in a:
        w.append(f"addr={_addr(a['addr'], names)}")
    if "length" in a:
        w.append(f"len={a['length']}")
    if n == "dmirror_flags":
        w.append(f"flags={a['flags']}")
    elif n == "gup_test":
        w += [f"cmd={a.get('cmd', 'GUP_BASIC_TEST')}", f"write={int(a.get('write', True))}",
              f"longterm={int(bool(a.get('longterm')))}"]
    if n == "mprotect":
        w.append(f"prot={executor._prot(a['prot'])}")
    elif n == "madvise":
        w.append(f"advice={executor._advice(a['advice'])}")
    elif n == "touch":
        w.append(f"access={a.get('access', 'read')}")
    elif n == "fork":
        w.append(f"child={a['child']}")
    elif n == "truncate":
        w += [f"path={a['file']}", f"size={a['size']}"]
    elif n == "dmirror_open":
        w.append(f"dev={a.get('device', 0)}")
    if n in DMIRROR_OPS:
        default = f"dmirror{a.get('device', 0)}" if n == "dmirror_open" else "dmirror0"
        w.append(f"fd={a.get('fd', default)}")
    if a.get("fill") is not None and n in ("touch", "check", "dmirror_write", *READ_BACK_OPS):
        w.append(f"fill={_fill(a['fill'])}")
    return w


# ----------------------------------------------------------------------------------------- output


_R_RE = re.compile(r"^R (\d+) (\d) (-?\d+) (\S+) (\S+)(?: (.*))?$")


def _extras(text: str | None) -> dict[str, str]:
    out = {}
    for tok in (text or "").split():
        k, _, v = tok.partition("=")
        out[k] = v
    return out


class _Inspect:
    """Raw lines of one inspect, classified at the end."""

    def __init__(self, start: int, n: int) -> None:
        self.start, self.n = start, n
        self.vmas: list[tuple[str, int, frozenset[str]]] = []   # (header, KernelPageSize, VmFlags)
        self.rows: list[tuple[int, int, int]] = []
        self.header: str | None = None

    def line(self, kind: str, rest: str) -> None:
        if kind == "V":
            self.header = rest
        elif kind == "VK" and self.header is not None:
            kps, _, flags = rest.partition(" ")
            self.vmas.append((self.header, int(kps) * 1024, frozenset(flags.split())))
            self.header = None
        elif kind == "P":
            e, k, c = (int(x, 16) for x in rest.split())
            self.rows.append((e, k, c))
        elif kind == "Z":
            self.rows.extend([(0, 0, 0)] * int(rest))

    def pages(self, mounts: dict[tuple[int, int], tuple[str, str]]) -> list[PageState]:
        rows = self.rows[:self.n] + [(0, 0, 0)] * max(0, self.n - len(self.rows))
        arr = np.array(rows, dtype=np.uint64).reshape(-1, 3)
        vmas = []
        for header, kps, flags in self.vmas:
            h = pagemap._parse_header(header)
            if h is None:
                continue
            lo, hi, perms, off, dev, inode, path = h
            vmas.append(pagemap.Vma(lo, hi, perms, off, dev, inode, path, flags, kps,
                                    _backing(path, dev, flags, mounts)))
        end = self.start + self.n * pagemap.PAGE_SIZE
        hits, vidx = pagemap._vma_index(vmas, self.start, end)
        raw = pagemap.RawPages(self.start, arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), hits, vidx,
                               numa_balancing=False)
        return _guest_swap_kinds(pagemap.classify(raw), arr[:, 0])


def _backing(path: str, dev: tuple[int, int], flags: frozenset[str],
             mounts: dict[tuple[int, int], tuple[str, str]]) -> str:
    """As :func:`hmmirror.live.pagemap._backing`, also for ext4's ``dax=always`` option spelling."""
    fstype, sopts = mounts.get(dev, ("", ""))
    if fstype in ("ext4", "xfs", "ext2") and any(o in ("dax", "dax=always") for o in sopts.split(",")):
        if "ht" not in flags and "pf" not in flags:
            return "fsdax"
    return pagemap._backing(path, dev, flags, mounts)


def _guest_swap_kinds(pages: list[PageState], entries: np.ndarray) -> list[PageState]:
    """Swap-format entries get their kind from the guest kernel's swap types (the host classifier knows only
    the host's configuration)."""
    from dataclasses import replace

    out = []
    for s, e in zip(pages, entries.tolist()):
        if s.swapped and not s.present:
            kind = GUEST_SWAP_KINDS.get(int(e) & ((1 << pagemap.SWP_TYPE_BITS) - 1), "swap")
            if kind != s.kind:
                s = replace(s, kind=kind)
        out.append(s)
    return out


def parse_output(text: str, plans: dict[str, Plan] | None = None) -> dict[str, GuestScenarioResult]:
    """Per scenario name, what the player printed (unsupported ops of ``plans`` become records too)."""
    results: dict[str, GuestScenarioResult] = {}
    cur: GuestScenarioResult | None = None
    mounts_text: list[str] = []
    mounts: dict[tuple[int, int], tuple[str, str]] = {}
    insp: _Inspect | None = None
    by_index: dict[int, GuestOpResult] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "S":
            cur = GuestScenarioResult(rest)
            results[rest] = cur
            mounts_text, mounts, insp, by_index = [], {}, None, {}
            continue
        if cur is None:
            continue
        if kind == "E":
            cur.complete = True
            _add_unsupported(cur, (plans or {}).get(cur.name), by_index)
            cur = None
        elif kind == "ERR":
            cur.errors.append(rest)
        elif kind == "MI":
            mounts_text.append(rest)
            mounts = pagemap._parse_mountinfo("\n".join(mounts_text))
        elif kind == "I":
            _idx, start, n = rest.split()
            insp = _Inspect(int(start, 16), int(n))
        elif kind in ("V", "VK", "P", "Z") and insp is not None:
            insp.line(kind, rest)
        elif kind == "R":
            m = _R_RE.match(line)
            if not m:
                cur.errors.append(f"unreadable result line {line!r}")
                continue
            idx = int(m.group(1))
            ok, ret = m.group(2) == "1", int(m.group(3))
            errno = None if m.group(4) == "-" else m.group(4)
            sig = None if m.group(5) == "-" else m.group(5)
            extra = _extras(m.group(6))
            note = extra.pop("note", None)
            extra.pop("addr", None)
            rec = GuestOpResult(idx, "", "", ok, ret, errno, None, sig, note.replace("_", " ") if note else None)
            rec.extra = _typed_extra(extra)
            if insp is not None:
                rec.pages = insp.pages(mounts)
                insp = None
            by_index[idx] = rec
    return results


def _typed_extra(extra: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in extra.items():
        if k == "snapshot":
            out[k] = list(bytes.fromhex(v))
        else:
            try:
                out[k] = int(v, 0)
            except ValueError:
                out[k] = v
    return out


def _add_unsupported(cur: GuestScenarioResult, p: Plan | None, by_index: dict[int, GuestOpResult]) -> None:
    """Records in op order: the player's, and one ``unsupported`` record per op the plan left out."""
    if p is None:
        cur.records = [by_index[i] for i in sorted(by_index)]
        return
    recs = []
    for idx, op, proc in p.ops:
        rec = by_index.get(idx)
        if rec is None:
            why = p.unsupported.get(idx, "no result from the guest")
            rec = GuestOpResult(idx, op, proc, False, None, None, None, None, why, unsupported=idx in p.unsupported)
        rec.op, rec.proc = op, proc
        recs.append(rec)
    cur.records = recs
