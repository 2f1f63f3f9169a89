"""Run scenario operations in real worker processes of this machine.

Each scenario process is a real *worker*: a fork of the caller that loops on a control socket, receives one
operation at a time and performs it with libc calls through ctypes (``mmap``, ``mprotect``, ``madvise`` ...)
or CPU loads and stores (``touch``, ``check``). The caller (the *controller*) keeps everything else:

- address expressions (``"buf+8K"``) are resolved by the controller against the real addresses the
  workers' ``mmap`` calls returned (real addresses differ from the model's);
- ``inspect`` is read by the controller from ``/proc/WORKER/pagemap`` (read-only, outside the worker);
- ``fork`` makes the worker fork; the controller creates the child's control socket first and hands one end
  to the worker with ``SCM_RIGHTS``, so the child talks to the controller directly.

A failing operation (``EINVAL`` from ``mprotect``, a touch of a ``PROT_NONE`` page, a timeout) is a result,
not an exception. Bad input (an unknown operation, a name never defined) raises
:class:`~hmmirror.errors.InputError` before any process starts. Workers are always killed and reaped on exit,
also on exceptions.

Placement: the interpreter's own mappings (libraries, malloc and obmalloc arenas) have page tables, and a
scenario mapping placed by the kernel next to them would share a PTE table with them, which the model has
not (a present table changes fault-around).  So each worker reserves an *arena* of address space
(``PROT_NONE``, ``MAP_NORESERVE``, never touched, so it has no page tables) and places every scenario
``mmap`` without an address inside it, top down, with ``MAP_FIXED``.  The kernel still decides the
alignment: the same ``mmap`` is first made without an address (and without ``MAP_POPULATE``), and the
placement in the arena keeps that address's offset modulo 2 MiB (modulo the huge page size for larger
hugetlb pages), which is what THP and huge-page alignment depend on.

Safety: a worker is a copy of the caller's Python process. Operations may only change memory the scenario
mapped (or unmapped address space): an ``munmap``/``mprotect``/``madvise``/``MAP_FIXED``/``touch`` that would hit
the worker's own interpreter memory is refused (result ``ok=False``, ``note`` says why) instead of crashing it.
A touch the kernel would answer with a signal (no VMA, missing permission, beyond end of file) is found
before it happens: the pages before it are touched and the result is ``EFAULT`` with ``signal`` set.

One CPU: the controller pins itself to one CPU while it creates the files and forks the workers (they
inherit it; the controller's affinity is restored on close).  Page-cache folios wait in the *current* CPU's
folio batches (``lru_add``, ``lru_activate``...) before they reach the LRU, and ``madvise_pageout``
(mm/madvise.c, 6.12-6.18) drains only the local CPU's batches (``lru_add_drain()`` ->
``lru_add_drain_cpu(smp_processor_id())``) and skips a folio that is not on the LRU
(``!folio_test_lru(folio)``) or cannot be split because a batch holds a reference.  So on two CPUs, whether a page the
controller wrote or a worker faulted is paged out depended on where the scheduler ran each step (CI under
load kept pages mapped that an idle run unmaps); on one CPU every batch the scenario filled is the one
``madvise`` drains.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno as _errno
import faulthandler
import os
import pickle
import re
import select
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmmirror.errors import InputError, errno_name
from hmmirror.include.pagestate import PageState
from hmmirror.live.pagemap import PAGE_SIZE, read_range

# ----------------------------------------------------------------------------------------- constants

PROT = {"none": 0, "r": 1, "w": 2, "rw": 3, "x": 4, "rx": 5, "wx": 6, "rwx": 7}
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_HUGE_SHIFT = 26
MAP = {
    "shared": 0x01, "private": 0x02, "shared_validate": 0x03, "fixed": 0x10, "anonymous": 0x20,
    "anon": 0x20, "growsdown": 0x100, "locked": 0x2000, "noreserve": 0x4000, "populate": 0x8000,
    "nonblock": 0x10000, "stack": 0x20000, "hugetlb": 0x40000, "sync": 0x80000,
    "fixed_noreplace": 0x100000, "huge_2m": 21 << MAP_HUGE_SHIFT, "huge_1g": 30 << MAP_HUGE_SHIFT,
}
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = MAP["private"], MAP["fixed"], MAP["anonymous"]
MAP_NORESERVE, MAP_HUGETLB, MAP_FIXED_NOREPLACE = MAP["noreserve"], MAP["hugetlb"], MAP["fixed_noreplace"]
MADV = {
    "normal": 0, "random": 1, "sequential": 2, "willneed": 3, "dontneed": 4, "free": 8, "remove": 9,
    "dontfork": 10, "dofork": 11, "mergeable": 12, "unmergeable": 13, "hugepage": 14, "nohugepage": 15,
    "dontdump": 16, "dodump": 17, "wipeonfork": 18, "keeponfork": 19, "cold": 20, "pageout": 21,
    "populate_read": 22, "populate_write": 23, "dontneed_locked": 24, "collapse": 25,
    "guard_install": 102, "guard_remove": 103,
}
OPS = ("mmap", "munmap", "mprotect", "madvise", "touch", "check", "fork", "exit", "truncate", "inspect",
       "_sleep")
#: Values of ``file`` that cannot be reproduced on a host without the model's drivers.
UNSUPPORTED_FILES = ("pfnmap",)
#: Devices an ``mmap`` may name directly (nothing that maps host memory such as /dev/mem).
ALLOWED_DEVICES = ("/dev/dax", "/dev/zero")
_MAP_FAILED = (1 << 64) - 1
MAP_POPULATE = MAP["populate"]
#: Address space each worker reserves for the scenario's mappings (no memory, no page tables).
ARENA_SIZE = 1 << 38
_PMD = 1 << 21
_MSG_MAX = 1 << 16
_CHUNK = 1 << 16  # bytes compared/filled per step: keeps worker temporaries below malloc's mmap threshold
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_EXPR_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:([+-])\s*(.+))?$")
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
M_MMAP_THRESHOLD = -3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
for _fn in (_libc.munmap, _libc.mprotect, _libc.madvise):
    _fn.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]


# ----------------------------------------------------------------------------------------- results


@dataclass
class LiveOpResult:
    """Outcome of one operation.

    ``ret``: ``mmap`` the real start address, ``fork`` the child's PID, ``check`` the number of mismatching
    pages, ``touch`` the number of pages touched, others 0. ``errno``: name when the call failed (``EFAULT``
    for a touch that would raise ``signal``; ``ETIMEDOUT`` when the worker did not answer in time; ``ESRCH``
    for an op on an exited process). ``note``: why the op was refused or unsupported here.
    """

    index: int
    op: str
    proc: str
    ok: bool
    ret: int | None = None
    errno: str | None = None
    pages: list[PageState] | None = None
    signal: str | None = None
    note: str | None = None
    unsupported: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain dict (pages as :meth:`PageState.to_json`)."""
        d = {k: getattr(self, k) for k in ("index", "op", "proc", "ok", "ret", "errno", "signal", "note",
                                           "unsupported")}
        d["pages"] = None if self.pages is None else [p.to_json() for p in self.pages]
        return d


# ----------------------------------------------------------------------------------------- parsing


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes of an int or a ``"4K"``/``"2MiB"``/``"0x3000"`` string (InputError otherwise)."""
    if isinstance(value, bool):
        raise InputError(f"bad {what} {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise InputError(f"bad {what} {value!r}: use an integer or a size like '4K', '2M', '0x3000'")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1), 0) * mult


def _prot(value: int | str) -> int:
    """PROT_* bits of ``"rw"``-style names (or an int)."""
    if isinstance(value, int):
        return value
    if str(value).lower() not in PROT:
        raise InputError(f"unknown prot {value!r} (one of {', '.join(PROT)})")
    return PROT[str(value).lower()]


def _map_flags(value: int | str | Sequence[str] | None) -> int:
    """MAP_* bits of a list of names (or an int); no flags means MAP_PRIVATE."""
    if value is None:
        return MAP_PRIVATE
    if isinstance(value, int):
        return value
    names = [str(n).lower() for n in ([value] if isinstance(value, str) else value)]
    bad = [n for n in names if n not in MAP]
    if bad:
        raise InputError(f"unknown mmap flag {bad[0]!r} (one of {', '.join(MAP)})")
    out = 0
    for n in names:
        out |= MAP[n]
    return out


def _advice(value: int | str) -> int:
    """MADV_* value of an advice name (or an int)."""
    if isinstance(value, int):
        return value
    if str(value).lower() not in MADV:
        raise InputError(f"unknown advice {value!r} (one of {', '.join(MADV)})")
    return MADV[str(value).lower()]


# ----------------------------------------------------------------------------------------- messages


def _send(sock: socket.socket, msg: Any, fds: Sequence[int] = ()) -> None:
    """Send one pickled message (one SEQPACKET record), with file descriptors attached."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """Receive one message and its fds; ``(None, [])`` at end of file."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _MSG_MAX, 4)
    if not data:
        return None, list(fds)
    return pickle.loads(data), list(fds)


# ----------------------------------------------------------------------------------------- worker side


def _err(code: int | None = None) -> dict[str, Any]:
    """Failed reply carrying the errno name of ``code`` (default: ctypes' saved errno)."""
    code = ctypes.get_errno() if code is None else code
    return {"ok": False, "ret": None, "errno": errno_name(code)}


def _ok(ret: int = 0, **extra: Any) -> dict[str, Any]:
    """Successful reply."""
    return {"ok": True, "ret": ret, "errno": None, **extra}


def _refuse(note: str) -> dict[str, Any]:
    """Reply for an operation not performed because it would corrupt the worker itself."""
    return {"ok": False, "ret": None, "errno": None, "note": note}


def _round_up(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a``."""
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class _Map:
    """One line of ``/proc/self/maps`` (worker side)."""

    start: int
    end: int
    perms: str
    offset: int
    path: str


def _self_maps(lo: int = 0, hi: int = 1 << 64) -> list[_Map]:
    """The worker's own VMAs overlapping ``[lo, hi)`` (others are skipped before parsing)."""
    out = []
    with open("/proc/self/maps", "rb") as f:
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        dash = line.index("-")
        space = line.index(" ", dash)
        start, end = int(line[:dash], 16), int(line[dash + 1:space], 16)
        if end <= lo or start >= hi:
            continue
        parts = line.split(None, 5)
        out.append(_Map(start, end, parts[1], int(parts[2], 16), parts[5].strip() if len(parts) > 5 else ""))
    return out


def _default_hugepage_size() -> int:
    """``Hugepagesize`` of /proc/meminfo in bytes (2 MiB if unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    return 1 << 21


class _Worker:
    """The loop of one worker process: perform operations on its own address space."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.owned: list[tuple[int, int]] = []  # ranges the scenario mapped (the rest is the interpreter's)
        self.arena = _reserve_arena()            # [lo, hi) for scenario mappings, None if it could not be had

    # -- placement ------------------------------------------------------------------------------

    def place(self, eff: int, modulus: int, residue: int) -> int | None:
        """Highest address ``a`` in the arena with ``a % modulus == residue`` whose ``[a, a+eff)`` overlaps
        no scenario mapping (the arena's top 2 MiB-aligned block stays free: no PTE table is shared with
        what lies above the arena)."""
        if self.arena is None:
            return None
        lo, hi = self.arena
        top = (hi & ~(_PMD - 1)) - _PMD

        def below(limit: int) -> int:
            a = limit - eff
            return a - ((a - residue) % modulus)

        a = below(top)
        busy = sorted((r for r in self.owned if r[1] > lo and r[0] < hi), reverse=True)
        moved = True
        while moved and a >= lo:
            moved = False
            for b0, b1 in busy:
                if b0 < a + eff and b1 > a:
                    a, moved = below(b0), True
        return a if a >= lo else None

    # -- ownership ------------------------------------------------------------------------------

    def _own(self, lo: int, hi: int) -> None:
        self.owned.append((lo, hi))

    def _disown(self, lo: int, hi: int) -> None:
        out = []
        for a, b in self.owned:
            if b <= lo or a >= hi:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo))
            if b > hi:
                out.append((hi, b))
        self.owned = out

    def foreign(self, lo: int, hi: int, maps: list[_Map] | None = None) -> list[tuple[int, int]]:
        """Parts of ``[lo, hi)`` mapped by the interpreter, not by the scenario."""
        maps = _self_maps(lo, hi) if maps is None else maps
        parts = [(max(m.start, lo), min(m.end, hi)) for m in maps if m.start < hi and m.end > lo
                 and not self._is_arena(m)]
        for a, b in self.owned:
            parts = [q for p in parts for q in _subtract(p, (a, b))]
        return parts

    def _is_arena(self, m: _Map) -> bool:
        """An unused part of the arena reservation (not the interpreter's memory)."""
        return self.arena is not None and self.arena[0] <= m.start and m.end <= self.arena[1] \
            and m.perms.startswith("---") and not m.path

    def _guard(self, lo: int, length: int, maps: list[_Map] | None = None) -> dict[str, Any] | None:
        """A refusal if ``[lo, lo+length)`` touches interpreter memory, else None."""
        hit = self.foreign(lo, lo + max(length, 1), maps)
        if hit:
            return _refuse(f"refused: [{hit[0][0]:#x}, {hit[0][1]:#x}) is the worker's own memory")
        return None

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        """Perform one operation; None means "no reply" (the forked child switched sockets)."""
        fn = getattr(self, "op_" + msg["op"].lstrip("_"))
        return fn(msg, fds)

    def loop(self) -> None:
        """Serve operations until the controller closes the socket or an ``exit`` op arrives."""
        while True:
            msg, fds = _recv(self.sock)
            if msg is None:
                return
            try:
                reply = self.handle(msg, fds)
            except OSError as exc:
                reply = _err(exc.errno or _errno.EIO)
            except Exception as exc:  # noqa: BLE001 - reported as the op's result, the worker lives on
                reply = {"ok": False, "ret": None, "errno": None, "note": f"worker error: {exc!r}"}
            if reply is None:
                continue
            _send(self.sock, reply)
            if msg["op"] == "exit":
                return

    # -- operations -----------------------------------------------------------------------------

    def op_mmap(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        fd = -1
        if m.get("path"):
            try:
                fd = _open_for_mmap(m["path"])
            except OSError as exc:
                return _err(exc.errno)
        try:
            return self._mmap(m, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _mmap(self, m: dict[str, Any], fd: int) -> dict[str, Any]:
        length, flags, align = m["length"], m["flags"], m.get("align") or 0
        psize = _mapping_page_size(flags, fd)
        eff = _round_up(max(length, 1), psize)
        if align:
            return self._mmap_aligned(m, fd, eff)
        if not m["addr"] and self.arena is not None:
            return self._mmap_in_arena(m, fd, eff, max(_PMD, psize))
        if flags & MAP_FIXED and (ref := self._guard(m["addr"] or 0, eff)):
            return ref
        addr = _libc.mmap(m["addr"] or None, length, m["prot"], flags, fd, m.get("offset", 0))
        if addr in (None, _MAP_FAILED):
            return _err()
        self._own(addr, addr + eff)
        return _ok(addr, length=eff)

    def _mmap_in_arena(self, m: dict[str, Any], fd: int, eff: int, modulus: int) -> dict[str, Any]:
        """Let the kernel choose an address (then unmap it), map at the highest free arena address with the
        same offset modulo ``modulus``."""
        flags = m["flags"] & ~(MAP_POPULATE | MAP_FIXED_NOREPLACE)
        probe = _libc.mmap(None, m["length"], m["prot"], flags, fd, m.get("offset", 0))
        if probe in (None, _MAP_FAILED):
            return _err()
        _libc.munmap(probe, eff)
        start = self.place(eff, modulus, probe % modulus)
        if start is None:
            return _err(_errno.ENOMEM)
        addr = _libc.mmap(start, m["length"], m["prot"], (m["flags"] & ~MAP_FIXED_NOREPLACE) | MAP_FIXED, fd,
                          m.get("offset", 0))
        if addr in (None, _MAP_FAILED):
            err = _err()
            _libc.mmap(start, eff, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            return err
        self._own(start, start + eff)
        return _ok(start, length=eff)

    def _mmap_aligned(self, m: dict[str, Any], fd: int, eff: int) -> dict[str, Any]:
        """Reserve ``eff + align`` PROT_NONE, map at the aligned start with MAP_FIXED, trim the rest (in the
        arena: the highest free aligned address)."""
        align = m["align"]
        if self.arena is not None:
            return self._mmap_in_arena_aligned(m, fd, eff, align)
        res = _libc.mmap(None, eff + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if res in (None, _MAP_FAILED):
            return _err()
        start = _round_up(res, align)
        flags = (m["flags"] & ~MAP_FIXED_NOREPLACE) | MAP_FIXED
        addr = _libc.mmap(start, m["length"], m["prot"], flags, fd, m.get("offset", 0))
        if addr in (None, _MAP_FAILED):
            err = _err()
            _libc.munmap(res, eff + align)
            return err
        if start > res:
            _libc.munmap(res, start - res)
        if res + eff + align > start + eff:
            _libc.munmap(start + eff, res + eff + align - (start + eff))
        self._own(start, start + eff)
        return _ok(start, length=eff)

    def _mmap_in_arena_aligned(self, m: dict[str, Any], fd: int, eff: int, align: int) -> dict[str, Any]:
        start = self.place(eff, align, 0)
        if start is None:
            return _err(_errno.ENOMEM)
        flags = (m["flags"] & ~MAP_FIXED_NOREPLACE) | MAP_FIXED
        addr = _libc.mmap(start, m["length"], m["prot"], flags, fd, m.get("offset", 0))
        if addr in (None, _MAP_FAILED):
            err = _err()
            _libc.mmap(start, eff, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
            return err
        self._own(start, start + eff)
        return _ok(start, length=eff)

    def op_munmap(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        if ref := self._guard(m["addr"], m["length"]):
            return ref
        if _libc.munmap(m["addr"], m["length"]) != 0:
            return _err()
        self._disown(m["addr"], m["addr"] + _round_up(m["length"], PAGE_SIZE))
        return _ok()

    def op_mprotect(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        if ref := self._guard(m["addr"], m["length"]):
            return ref
        return _ok() if _libc.mprotect(m["addr"], m["length"], m["prot"]) == 0 else _err()

    def op_madvise(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        if ref := self._guard(m["addr"], m["length"]):
            return ref
        return _ok() if _libc.madvise(m["addr"], m["length"], m["advice"]) == 0 else _err()

    def op_touch(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        lo, length, write = m["addr"], m["length"], m["access"] == "write"
        maps = _self_maps(lo, lo + max(length, 1))
        if ref := self._guard(lo, length, maps):
            return ref
        ok_len, sig = _accessible_prefix(lo, length, write, maps)
        if ok_len:
            _touch(lo, ok_len, write, m.get("fill"))
        pages = _pages_in(lo, ok_len)
        if sig == "SIGBUS" and not write:
            _fault_beyond_eof(lo + ok_len)
        if sig:
            return {"ok": False, "ret": pages, "errno": "EFAULT", "signal": sig}
        return _ok(pages)

    def op_check(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        lo, length = m["addr"], m["length"]
        maps = _self_maps(lo, lo + max(length, 1))
        if ref := self._guard(lo, length, maps):
            return ref
        ok_len, sig = _accessible_prefix(lo, length, False, maps)
        if sig:
            return {"ok": False, "ret": None, "errno": "EFAULT", "signal": sig}
        return _ok(_mismatching_pages(lo, ok_len, m.get("fill")))

    def op_fork(self, _m: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        (child_fd,) = fds
        pid = os.fork()
        if pid == 0:  # the child: talk to the controller on the new socket from now on
            self.sock.close()
            self.sock = socket.socket(fileno=child_fd)
            return None
        os.close(child_fd)
        return _ok(pid)

    def op_exit(self, _m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        return _ok()

    def op_truncate(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        try:
            fd = os.open(m["path"], os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return _err(exc.errno)
        try:
            os.ftruncate(fd, m["size"])
        except OSError as exc:
            return _err(exc.errno)
        finally:
            os.close(fd)
        return _ok()

    def op_owned(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """Controller query before ``inspect``: interpreter mappings inside the range."""
        return _ok(0, foreign=self.foreign(m["addr"], m["addr"] + m["length"]))

    def op_sleep(self, m: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        """Test hook: stay busy for ``seconds``."""
        time.sleep(float(m.get("seconds", 0)))
        return _ok()


def _reserve_arena() -> tuple[int, int] | None:
    """Reserve ``ARENA_SIZE`` bytes of address space (PROT_NONE, MAP_NORESERVE): ``(lo, hi)`` or None."""
    a = _libc.mmap(None, ARENA_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if a in (None, _MAP_FAILED):
        return None
    return a, a + ARENA_SIZE


def _subtract(p: tuple[int, int], q: tuple[int, int]) -> list[tuple[int, int]]:
    """Interval ``p`` minus interval ``q`` (0, 1 or 2 pieces)."""
    (a, b), (c, d) = p, q
    if d <= a or c >= b:
        return [p]
    return [x for x in ((a, c), (d, b)) if x[0] < x[1]]


def _open_for_mmap(path: str) -> int:
    """Open a file or device read-write, falling back to read-only."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (_errno.EACCES, _errno.EROFS, _errno.EPERM):
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _mapping_page_size(flags: int, fd: int) -> int:
    """Page size the kernel rounds a new mapping to: hugetlb size for MAP_HUGETLB/hugetlbfs, else 4 KiB."""
    if flags & MAP_HUGETLB:
        shift = (flags >> MAP_HUGE_SHIFT) & 0x3F
        return 1 << shift if shift else _default_hugepage_size()
    if fd >= 0:
        with contextlib.suppress(OSError):
            bsize = os.fstatvfs(fd).f_bsize
            if bsize > PAGE_SIZE and bsize in (1 << 21, 1 << 30):  # hugetlbfs reports its page size
                return bsize
    return PAGE_SIZE


def _pages_in(lo: int, length: int) -> int:
    """Number of 4 KiB pages ``[lo, lo+length)`` overlaps."""
    if length <= 0:
        return 0
    return (_round_up(lo + length, PAGE_SIZE) - (lo // PAGE_SIZE * PAGE_SIZE)) // PAGE_SIZE


def _accessible_prefix(lo: int, length: int, write: bool, maps: list[_Map]) -> tuple[int, str | None]:
    """Bytes from ``lo`` the CPU can access without a signal, and the signal the next byte would raise.

    ``maps``: the worker's VMAs overlapping the range, sorted.
    """
    pos, end = lo, lo + length
    for m in maps:
        if m.end <= pos:
            continue
        if m.start > pos:
            return pos - lo, "SIGSEGV"
        if m.perms[0] != "r" or (write and m.perms[1] != "w"):
            return pos - lo, "SIGSEGV"
        limit = min(m.end, end, _file_limit(m))
        if limit <= pos:
            return pos - lo, "SIGBUS"
        if limit < min(m.end, end):
            return limit - lo, "SIGBUS"
        pos = limit
        if pos >= end:
            return length, None
    return pos - lo, "SIGSEGV"


def _file_limit(m: _Map) -> int:
    """Virtual address where a file mapping passes the end of its file (SIGBUS beyond); huge for others."""
    if not m.path.startswith("/") or m.path.endswith(" (deleted)") or m.path.startswith("/dev/"):
        return 1 << 64
    try:
        st = os.stat(m.path)
    except OSError:
        return 1 << 64
    if not os.path.isfile(m.path):
        return 1 << 64
    size = _round_up(st.st_size, PAGE_SIZE)
    return m.start + max(0, size - m.offset)


def _fault_beyond_eof(addr: int) -> None:
    """The read fault a load beyond EOF takes before its SIGBUS, without the signal: read the byte through
    /proc/self/mem (GUP takes the same fault path, fault-around included, and returns an error instead of
    the signal).  A touch the model makes faults there too."""
    with contextlib.suppress(OSError):
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(fd, 1, addr)
        except OSError:
            pass
        finally:
            os.close(fd)


def _byte_view(lo: int, length: int) -> np.ndarray:
    """A numpy uint8 view of raw memory (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(lo))


def _touch(lo: int, length: int, write: bool, fill: int | str | None) -> None:
    """CPU access to every page of the range in order (see ``touch`` in docs/scenarios.md).

    A default write stores 0 at the first byte of each page: a pure store (one write fault, no read
    fault first) that keeps zero pages and the index pattern (whose byte 0 of every page is 0) unchanged.
    """
    if write and fill == "index32":
        for off in range(0, length - length % 4, _CHUNK):
            n = min(_CHUNK, length - length % 4 - off) // 4
            np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(lo + off))[:] = \
                np.arange(off // 4, off // 4 + n, dtype=np.int64).astype(np.int32)
        return
    if write and isinstance(fill, int):
        ctypes.memset(lo, fill & 0xFF, length)
        return
    base = lo // PAGE_SIZE * PAGE_SIZE
    view = _byte_view(base, lo + length - base)[::PAGE_SIZE]
    if write:
        view[:] = 0
    else:
        int(np.add.reduce(view, dtype=np.uint64))


def _mismatching_pages(lo: int, length: int, fill: int | str | None) -> int:
    """Pages of the range whose bytes differ from ``fill`` (``index32``, a byte, or None = zero)."""
    bad: set[int] = set()
    for off in range(0, length, _CHUNK):
        n = min(_CHUNK, length - off)
        got = _byte_view(lo + off, n)
        if fill == "index32":
            want = np.arange(off // 4, (off + n + 3) // 4, dtype=np.int64).astype("<i4").view(np.uint8)[:n]
        else:
            want = np.uint8((fill or 0) & 0xFF)
        diff = np.nonzero(got != want)[0]
        bad.update(((lo + off + diff) // PAGE_SIZE).tolist())
    return len(bad)


def _worker_main(sock: socket.socket, close_fds: Iterable[int]) -> None:
    """Entry of a new top-level worker (never returns)."""
    code = 0
    try:
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ValueError):  # only possible from the main thread
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        faulthandler.disable()  # an unforeseen SIGBUS is a result, not a traceback on the caller's stderr
        _libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # keep malloc out of the scenario's address holes
        _Worker(sock).loop()
    except BaseException:  # noqa: BLE001 - a worker must never return into the caller's stack
        code = 70
    finally:
        os._exit(code)


# ----------------------------------------------------------------------------------------- controller


@dataclass
class _Proc:
    """Controller's view of one worker."""

    name: str
    pid: int
    sock: socket.socket | None
    direct: bool             # a child of the controller (else of another worker)
    state: str = "alive"     # "alive", "exited" (exit op), "dead" (killed or crashed), "reaped"


@dataclass
class _Mapping:
    """A named mapping: real start address and length."""

    addr: int
    length: int


@dataclass
class LiveExecutor:
    """Real worker processes running scenario operations; use as a context manager.

    ``processes``: names of the scenario's ``[[process]]`` entries, created in order.
    ``files``: ``[[file]]`` entries (``path``, ``size``, ``content``), created before the workers start.
    ``mounts``: scenario mount path -> real mount path (e.g. from :func:`hmmirror.live.hostenv.tmpfs`);
    file paths are resolved against it (longest prefix wins). ``timeout``: seconds per operation.
    ``drop_caches``: after creating files, write them back and drop their page cache, so every run starts
    from the same (cold) page-cache state.  ``one_cpu``: run the controller's file creation and every worker
    on one CPU (see the module docstring).
    """

    processes: Sequence[str] = ("p",)
    files: Sequence[Mapping[str, Any]] = ()
    mounts: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    drop_caches: bool = True
    one_cpu: bool = True
    procs: dict[str, _Proc] = field(default_factory=dict, init=False)
    names: dict[str, _Mapping] = field(default_factory=dict, init=False)
    _created: list[str] = field(default_factory=list, init=False)
    _subreaper: int | None = field(default=None, init=False)
    _affinity: set[int] | None = field(default=None, init=False)
    cpu: int | None = field(default=None, init=False)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> LiveExecutor:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the files and the initial workers."""
        if not self.processes:
            raise InputError("a scenario needs at least one process")
        self._become_subreaper()
        if self.one_cpu:
            self._pin_one_cpu()
        for spec in self.files:
            self._create_file(spec)
        for name in self.processes:
            self._spawn(name)

    def close(self) -> None:
        """Kill and reap every worker, remove created files, restore the subreaper setting."""
        for proc in reversed(list(self.procs.values())):
            if proc.sock is not None:
                proc.sock.close()
                proc.sock = None
            if proc.state == "alive":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        self._reap_all()
        for path in self._created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._created.clear()
        self._restore_subreaper()
        self._unpin()

    def _pin_one_cpu(self) -> None:
        """Pin the calling thread (and so every worker it forks) to the CPU it runs on now."""
        allowed = os.sched_getaffinity(0)
        cpu = _current_cpu()
        if cpu not in allowed:
            cpu = min(allowed)
        self._affinity = set(allowed)
        os.sched_setaffinity(0, {cpu})
        self.cpu = cpu

    def _unpin(self) -> None:
        if self._affinity is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._affinity)
            self._affinity = None

    def _become_subreaper(self) -> None:
        """Make orphaned grandchildren (forked workers) our children so they can be reaped."""
        cur = ctypes.c_int(0)
        if _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(cur), 0, 0, 0) == 0:
            self._subreaper = cur.value
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def _restore_subreaper(self) -> None:
        if self._subreaper is not None:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, self._subreaper, 0, 0, 0)
            self._subreaper = None

    def _reap_all(self, deadline_s: float = 5.0) -> None:
        """Wait for every known worker PID to disappear (children or orphans reparented to us)."""
        pending = {p.pid for p in self.procs.values() if p.state != "reaped"}
        deadline = time.monotonic() + deadline_s
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                if _try_reap(pid):
                    pending.discard(pid)
            if pending:
                time.sleep(0.005)
        for p in self.procs.values():
            p.state = "reaped" if p.pid not in pending else p.state

    def _spawn(self, name: str) -> None:
        """Fork a top-level worker named ``name``."""
        ctrl, work = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        others = [p.sock.fileno() for p in self.procs.values() if p.sock is not None]
        pid = os.fork()
        if pid == 0:
            ctrl.close()
            _worker_main(work, others)
        work.close()
        self.procs[name] = _Proc(name, pid, ctrl, direct=True)

    # -- files ----------------------------------------------------------------------------------

    def resolve_path(self, path: str, device_ok: bool = True) -> str:
        """Real path of a scenario file path (longest mount prefix); ``/dev/dax*`` and ``/dev/zero`` as
        they are when ``device_ok``."""
        path = os.path.normpath(path)
        best = max((m for m in self.mounts if path == m or path.startswith(m.rstrip("/") + "/")),
                   key=len, default=None)
        if best is None:
            if device_ok and path.startswith(ALLOWED_DEVICES):
                return path
            raise InputError(f"file {path!r} is under no mounted filesystem "
                             f"(known: {', '.join(self.mounts) or 'none'})")
        root = self.mounts[best]
        if not os.path.isdir(root):
            raise InputError(f"mount {best!r} maps to {root!r}, which is not a directory")
        real = os.path.join(root, path[len(best):].lstrip("/"))
        if os.path.commonpath([os.path.realpath(real), os.path.realpath(root)]) != os.path.realpath(root):
            raise InputError(f"file {path!r} leaves its mount {best!r}")
        return real

    def _create_file(self, spec: Mapping[str, Any]) -> None:
        """Create one ``[[file]]`` with its content in the real mount."""
        path = self.resolve_path(str(spec["path"]), device_ok=False)
        size = parse_size(spec.get("size", 0), "file size")
        content = spec.get("content", "data")
        if content not in ("data", "sparse", "zero"):
            raise InputError(f"file {spec['path']!r}: unknown content {content!r} (data, sparse, zero)")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._created.append(path)
        try:
            _fill_file(fd, size, content)
            with contextlib.suppress(OSError):
                os.fsync(fd)        # written back: clean page cache, as the model's files start
            if self.drop_caches or spec.get("cached") is False:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise InputError(f"cannot create {spec['path']!r} ({path}): {exc.strerror}",
                             errno=errno_name(exc.errno or _errno.EIO)) from None
        finally:
            os.close(fd)

    # -- running --------------------------------------------------------------------------------

    def run(self, ops: Sequence[Mapping[str, Any]]) -> list[LiveOpResult]:
        """Validate all operations, then execute them in order."""
        validate_ops(ops, self.processes)
        self.check_paths(ops)
        return [self.execute(i, op) for i, op in enumerate(ops)]

    def check_paths(self, ops: Sequence[Mapping[str, Any]]) -> None:
        """InputError unless every file path of the files and ops lies under a known mount."""
        for f in self.files:
            self.resolve_path(str(f.get("path")), device_ok=False)
        for op in ops:
            if op.get("file") not in (None, *UNSUPPORTED_FILES):
                self.resolve_path(str(op["file"]), device_ok=op.get("op") == "mmap")

    def execute(self, index: int, op: Mapping[str, Any]) -> LiveOpResult:
        """Execute one (validated) operation and return its result."""
        name, proc_name = op["op"], op.get("proc") or self.processes[0]
        res = LiveOpResult(index, name, proc_name, ok=False)
        proc = self.procs.get(proc_name)
        if proc is None or proc.state != "alive":
            res.errno, res.note = "ESRCH", f"process {proc_name!r} is not running"
            return res
        try:
            msg = self._message(op)
        except _Unsupported as exc:
            res.note, res.unsupported = str(exc), True
            return res
        except _Unresolved as exc:
            res.errno, res.note = "EINVAL", str(exc)
            return res
        if name == "inspect":
            return self._inspect(res, proc, msg)
        if name == "fork":
            return self._fork(res, proc, msg, op["child"])
        return self._call(res, proc, msg)

    def _call(self, res: LiveOpResult, proc: _Proc, msg: dict[str, Any], fds: Sequence[int] = ()) -> LiveOpResult:
        """Send ``msg`` to the worker and fill ``res`` from its reply (timeout and death are results)."""
        reply = self._roundtrip(proc, msg, fds)
        if reply is None:
            return self._dead(res, proc)
        if reply == "timeout":
            res.errno, res.note = "ETIMEDOUT", f"no answer within {self.timeout} s; worker killed"
            return res
        res.ok, res.ret, res.errno = reply["ok"], reply.get("ret"), reply.get("errno")
        res.signal, res.note = reply.get("signal"), reply.get("note")
        if msg["op"] == "mmap" and res.ok and msg.get("as"):
            self.names[msg["as"]] = _Mapping(res.ret, msg["length"])
        if msg["op"] == "exit" and res.ok:
            self._mark_exited(proc)
        return res

    def _roundtrip(self, proc: _Proc, msg: dict[str, Any], fds: Sequence[int]) -> dict | str | None:
        """Reply of the worker, ``"timeout"`` (worker killed) or None (worker died)."""
        assert proc.sock is not None
        try:
            _send(proc.sock, msg, fds)
            ready, _, _ = select.select([proc.sock], [], [], self.timeout)
            if not ready:
                self._kill(proc)
                return "timeout"
            reply, _ = _recv(proc.sock)
            return reply
        except (ConnectionError, OSError):
            return None

    def _kill(self, proc: _Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.state = "dead"

    def _mark_exited(self, proc: _Proc) -> None:
        """The worker ended on an ``exit`` op: reap it if it is ours."""
        proc.state = "exited"
        if proc.sock is not None:
            proc.sock.close()
            proc.sock = None
        if proc.direct:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
                proc.state = "reaped"
        else:
            _wait_zombie(proc.pid, self.timeout)


    def _dead(self, res: LiveOpResult, proc: _Proc) -> LiveOpResult:
        """Fill ``res`` for a worker that died during the op (e.g. an unforeseen SIGBUS)."""
        sig = _death_signal(proc)
        proc.state = "dead"
        res.signal = sig
        res.errno = "EFAULT" if sig in ("SIGSEGV", "SIGBUS") else None
        res.note = f"worker died ({sig or 'unknown cause'})"
        return res

    def _fork(self, res: LiveOpResult, proc: _Proc, msg: dict[str, Any], child: str) -> LiveOpResult:
        """Fork ``proc``; its child becomes the worker ``child`` on a socket made here."""
        ctrl, work = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._call(res, proc, msg, [work.fileno()])
        finally:
            work.close()
        if res.ok:
            self.procs[child] = _Proc(child, res.ret, ctrl, direct=False)
        else:
            ctrl.close()
        return res

    def _inspect(self, res: LiveOpResult, proc: _Proc, msg: dict[str, Any]) -> LiveOpResult:
        """Read the worker's pagemap from here (the worker only reports foreign mappings)."""
        lo = msg["addr"] // PAGE_SIZE * PAGE_SIZE
        hi = _round_up(msg["addr"] + msg["length"], PAGE_SIZE)
        reply = self._roundtrip(proc, {"op": "_owned", "addr": lo, "length": hi - lo}, ())
        if reply is None:
            return self._dead(res, proc)
        if reply == "timeout":
            res.errno, res.note = "ETIMEDOUT", f"no answer within {self.timeout} s; worker killed"
            return res
        try:
            res.pages = read_range(proc.pid, lo, hi)
        except InputError as exc:
            res.errno, res.note = exc.errno_name, str(exc)
            return res
        res.ok, res.ret = True, 0
        if reply.get("foreign"):
            a, b = reply["foreign"][0]
            res.note = f"the worker's own memory lies in the range at [{a:#x}, {b:#x})"
        return res

    # -- operation messages ---------------------------------------------------------------------

    def _message(self, op: Mapping[str, Any]) -> dict[str, Any]:
        """The worker message of an op: names resolved to real addresses, flags to numbers."""
        name = op["op"]
        msg: dict[str, Any] = {"op": name}
        if name == "mmap":
            msg.update(self._mmap_args(op))
        elif name in ("munmap", "mprotect", "madvise", "touch", "check", "inspect"):
            msg["addr"], msg["length"] = self._range(op)
        if name == "mprotect":
            msg["prot"] = _prot(op["prot"])
        elif name == "madvise":
            msg["advice"] = _advice(op["advice"])
        elif name == "touch":
            msg["access"], msg["fill"] = op.get("access", "read"), op.get("fill")
        elif name == "check":
            msg["fill"] = op.get("fill")
        elif name == "truncate":
            msg["path"] = self.resolve_path(str(op["file"]), device_ok=False)
            msg["size"] = parse_size(op["size"])
        elif name == "_sleep":
            msg["seconds"] = op.get("seconds", 0)
        return msg

    def _mmap_args(self, op: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments of an ``mmap`` message."""
        f = op.get("file")
        if f in UNSUPPORTED_FILES:
            raise _Unsupported(f"file {f!r} needs a model driver; not reproducible live")
        path = self.resolve_path(str(f)) if f else None
        if path and path.startswith("/dev/") and not os.path.exists(path):
            raise _Unsupported(f"device {path} does not exist on this host")
        flags = _map_flags(op.get("flags"))
        if path is None:
            flags |= MAP_ANONYMOUS
        addr = op.get("addr")
        return {"length": parse_size(op["length"], "length"), "prot": _prot(op.get("prot", "rw")),
                "flags": flags, "path": path, "offset": parse_size(op.get("offset", 0), "offset"),
                "addr": self.address(addr) if addr is not None else None,
                "align": parse_size(op["align"], "align") if op.get("align") else 0, "as": op.get("as")}

    def _range(self, op: Mapping[str, Any]) -> tuple[int, int]:
        """``(addr, length)`` of an op; a missing length on a named address runs to the mapping's end."""
        addr = self.address(op["addr"])
        if op.get("length") is not None:
            return addr, parse_size(op["length"], "length")
        base = _expr_name(op["addr"])
        if base is None or base not in self.names:
            raise _Unresolved(f"length missing and {op['addr']!r} names no mapping")
        m = self.names[base]
        return addr, m.addr + m.length - addr

    def address(self, value: int | str) -> int:
        """Real address of an int, a hex string or an expression ``NAME``/``NAME+OFF``/``NAME-OFF``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        s = str(value).strip()
        with contextlib.suppress(ValueError):
            return int(s, 0)
        m = _EXPR_RE.match(s)
        if not m:
            raise _Unresolved(f"bad address {value!r}")
        if m.group(1) not in self.names:
            raise _Unresolved(f"address {value!r}: no mapping named {m.group(1)!r} (did its mmap fail?)")
        off = parse_size(m.group(3), "offset") if m.group(3) else 0
        return self.names[m.group(1)].addr + (off if m.group(2) != "-" else -off)


class _Unsupported(Exception):
    """The operation cannot be reproduced on this host."""


class _Unresolved(Exception):
    """An address expression names nothing (its mmap failed at run time)."""


def _expr_name(value: Any) -> str | None:
    """The mapping name of an address expression, None for literals."""
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        int(value, 0)
        return None
    m = _EXPR_RE.match(value)
    return m.group(1) if m else None


def _fill_file(fd: int, size: int, content: str) -> None:
    """Give a new file its size and content (``data``: int32 index pattern; ``zero``: fallocate)."""
    if content == "sparse" or size == 0:
        os.ftruncate(fd, size)
    elif content == "zero":
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    else:
        try:
            _write_pattern(fd, size)
        except OSError as exc:
            if exc.errno != _errno.EINVAL:
                raise
            _write_pattern_mmap(fd, size)  # hugetlbfs has no write(2)


def _pattern(off: int, n: int) -> bytes:
    """Bytes ``[off, off+n)`` of the int32 index pattern (int ``i`` at slot ``i``)."""
    first, last = off // 4, (off + n + 3) // 4
    raw = np.arange(first, last, dtype=np.int64).astype("<i4").tobytes()
    return raw[off - first * 4:off - first * 4 + n]


def _write_pattern(fd: int, size: int) -> None:
    """pwrite the index pattern in 16 MiB pieces."""
    step = 16 << 20
    for off in range(0, size, step):
        os.pwrite(fd, _pattern(off, min(step, size - off)), off)


def _write_pattern_mmap(fd: int, size: int) -> None:
    """Write the index pattern through a shared mapping (for hugetlbfs)."""
    import mmap as _mmap

    os.ftruncate(fd, size)
    with _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE) as m:
        step = 16 << 20
        for off in range(0, size, step):
            n = min(step, size - off)
            m[off:off + n] = _pattern(off, n)


def _try_reap(pid: int) -> bool:
    """True once ``pid`` is gone (reaped by us now, or already gone / reaped elsewhere)."""
    try:
        got, _ = os.waitpid(pid, os.WNOHANG)
        return got == pid
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}") or _proc_state(pid) == ""


def _proc_state(pid: int) -> str:
    """State letter of ``pid`` ('' if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2:][:1]


def _death_signal(proc: _Proc) -> str | None:
    """Signal that ended a dead worker (waitpid for our children, /proc exit_code for the others)."""
    if proc.direct:
        with contextlib.suppress(ChildProcessError):
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                got, status = os.waitpid(proc.pid, os.WNOHANG)
                if got == proc.pid:
                    proc.state = "reaped"
                    return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None
                time.sleep(0.005)
        return None
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            stat = f.read()
        code = int(stat[stat.rfind(")") + 2:].split()[49])  # field 52: exit_code, as waitpid reports it
    except (OSError, ValueError, IndexError):
        return None
    return signal.Signals(code & 0x7F).name if code & 0x7F else None


# ----------------------------------------------------------------------------------------- validation


_REQUIRED = {
    "mmap": ("length",), "munmap": ("addr", "length"), "mprotect": ("addr", "prot"),
    "madvise": ("addr", "advice"), "touch": ("addr",), "check": ("addr",), "fork": ("child",),
    "exit": (), "truncate": ("file", "size"), "inspect": ("addr",), "_sleep": (),
}


def validate_ops(ops: Sequence[Mapping[str, Any]], processes: Sequence[str]) -> None:
    """Check every op before anything runs: known op and names, required keys, known processes.

    Raises :class:`InputError` naming the op (``op 3 (mprotect): unknown prot 'rwz'``).
    """
    procs, names = set(processes), set()
    default = processes[0] if processes else None
    for i, op in enumerate(ops):
        where = f"op {i} ({op.get('op', '?')})"
        try:
            _validate_one(op, procs, names, default)
        except InputError as exc:
            raise InputError(str(exc), errno=exc.errno_name, where=where) from None


def _validate_one(op: Mapping[str, Any], procs: set[str], names: set[str], default: str | None) -> None:
    """Validate one op, updating the known process and mapping names."""
    kind = op.get("op")
    if kind not in OPS:
        raise InputError(f"unknown op {kind!r} (one of {', '.join(o for o in OPS if o[0] != '_')})")
    missing = [k for k in _REQUIRED[kind] if op.get(k) is None]
    if missing:
        raise InputError(f"missing key {missing[0]!r}")
    proc = op.get("proc") or default
    if proc not in procs:
        raise InputError(f"unknown process {proc!r}")
    for key, conv in (("prot", _prot), ("flags", _map_flags), ("advice", _advice)):
        if op.get(key) is not None:
            conv(op[key])
    for key in ("length", "offset", "align", "size"):
        if op.get(key) is not None:
            parse_size(op[key], key)
    if op.get("addr") is not None and (n := _expr_name(op["addr"])) is not None and n not in names:
        raise InputError(f"address {op['addr']!r} names no earlier mapping")
    if kind == "touch" and op.get("access", "read") not in ("read", "write"):
        raise InputError(f"access must be 'read' or 'write', not {op.get('access')!r}")
    if kind == "mmap" and op.get("as"):
        names.add(str(op["as"]))
    if kind == "fork":
        if op["child"] in procs:
            raise InputError(f"process {op['child']!r} already exists")
        procs.add(op["child"])


# ----------------------------------------------------------------------------------------- entry point


def run_ops(ops: Sequence[Mapping[str, Any]], processes: Sequence[str] = ("p",),
            files: Sequence[Mapping[str, Any]] = (), mounts: Mapping[str, str] | None = None,
            timeout: float = 10.0, drop_caches: bool = True) -> list[LiveOpResult]:
    """Run ``ops`` in real worker processes and return one :class:`LiveOpResult` per op.

    ``ops``: operation dicts as in docs/scenarios.md (sizes may be ints or size strings; addresses ints,
    hex strings or ``NAME[+OFF]`` expressions resolved here). Workers are killed and reaped before
    returning, also on exceptions. Raises :class:`InputError` only for bad input, before running.
    """
    validate_ops(ops, processes)
    ex = LiveExecutor(processes, files, dict(mounts or {}), timeout, drop_caches)
    ex.check_paths(ops)
    with ex:
        return [ex.execute(i, op) for i, op in enumerate(ops)]


def _current_cpu() -> int:
    """The CPU the calling thread last ran on (field 39 of /proc/thread-self/stat), -1 if unknown."""
    try:
        with open("/proc/thread-self/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


def _wait_zombie(pid: int, timeout: float) -> None:
    """Wait until a process that is not our child has released its mm: it is a zombie (exit_mm() runs
    before exit_notify()) or gone.  Without this an inspect right after ``exit`` races with the teardown."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return
        if stat[stat.rfind(")") + 2] in "ZX":
            return
        time.sleep(0.0005)
