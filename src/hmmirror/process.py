"""The public Python API: a process of a :class:`~hmmirror.machine.Machine` and its system calls.

Each method runs the modelled kernel code sequentially (:func:`hmmirror.kernel.sched.run`) in the
process's task, and turns a negative errno into :class:`~hmmirror.errors.KernelError`.  Bad arguments raise
:class:`~hmmirror.errors.InputError` before any state changes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from hmmirror.arch.x86.fault import cpu_access, cpu_read
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import InputError, KernelError
from hmmirror.include.mm_types import MADV, MAP, PROT
from hmmirror.include.pagestate import PageState
from hmmirror.kernel import sched
from hmmirror.machine import Machine
from hmmirror.mm.inspect import inspect_range
from hmmirror.mm.mm_struct import MMStruct

PROTS = {"none": 0, "r": 1, "w": 2, "rw": 3, "x": 4, "rx": 5, "wx": 6, "rwx": 7}
MAP_FLAGS = {
    "shared": MAP.SHARED, "private": MAP.PRIVATE, "anonymous": MAP.ANONYMOUS, "anon": MAP.ANONYMOUS,
    "fixed": MAP.FIXED, "populate": MAP.POPULATE, "hugetlb": MAP.HUGETLB, "huge_1g": MAP.HUGE_1GB,
    "huge_2m": MAP.HUGE_2MB,
}
ADVICE = {name.lower(): m for name, m in MADV.__members__.items()}


def parse_prot(prot: str | int) -> int:
    """``"rw"`` -> PROT_READ|PROT_WRITE (ints pass through)."""
    if isinstance(prot, int):
        return prot
    try:
        return PROTS[prot.lower()]
    except KeyError:
        raise InputError(f"unknown protection {prot!r} (use one of {', '.join(PROTS)})") from None


def parse_map_flags(flags: Iterable[str] | int) -> int:
    """``["private", "anonymous"]`` -> MAP_PRIVATE|MAP_ANONYMOUS (ints pass through)."""
    if isinstance(flags, int):
        return flags
    out = 0
    for f in flags:
        try:
            out |= MAP_FLAGS[f.lower()]
        except KeyError:
            raise InputError(f"unknown mmap flag {f!r} (use {', '.join(MAP_FLAGS)})") from None
    return out


def index32_page(page_index: int) -> bytes:
    """The ``index32`` fill of one page: int32 ``i`` at int slot ``i`` counted from the range start."""
    base = page_index * (PAGE_SIZE // 4)
    return struct.pack(f"<{PAGE_SIZE // 4}i", *range(base, base + PAGE_SIZE // 4))


def fill_bytes(fill: Any, page_index: int) -> bytes | None:
    """Bytes a ``touch`` stores in the page ``page_index`` of its range (None: no data)."""
    if fill is None:
        return None
    if fill == "index32":
        return index32_page(page_index)
    if isinstance(fill, int) and 0 <= fill <= 255:
        return bytes([fill]) * PAGE_SIZE
    raise InputError(f"unknown fill {fill!r} (use \"index32\" or a byte value 0..255)")


class Process:
    """A process: its mm and the system calls a scenario or a test performs."""

    def __init__(self, machine: Machine, mm: MMStruct) -> None:
        self.machine = machine
        self.mm = mm

    @property
    def name(self) -> str:
        return self.mm.name

    def _run(self, gen: Any, what: str) -> Any:
        if self.mm.exited:
            raise InputError(f"process {self.name} has exited", "ESRCH")
        ret = sched.run(gen, self.mm.task)
        if isinstance(ret, int) and ret < 0:
            raise KernelError(-ret, what)
        return ret

    def _check_range(self, addr: int, length: int, what: str) -> None:
        if self.mm.exited:
            raise InputError(f"{what}: process {self.name} has exited", "ESRCH")
        if not isinstance(addr, int) or not isinstance(length, int):
            raise InputError(f"{what}: address and length must be integers")
        if addr < 0 or length < 0 or addr + length > self.machine.geo.task_size:
            raise InputError(f"{what}: range {addr:#x}+{length:#x} is outside the user address space")

    # -- system calls --------------------------------------------------------------------------------------
    def mmap(self, length: int, prot: str | int = "rw", flags: Iterable[str] | int = ("private", "anonymous"),
             file: Any = None, offset: int = 0, addr: int = 0, align: int | None = None) -> int:
        """mmap(2); returns the address.  ``file`` is a path of the machine or a File object."""
        from hmmirror.mm.mmap import vm_mmap

        self._check_range(addr, max(length, 0), "mmap")
        if length <= 0:
            raise KernelError("EINVAL", "mmap: length must be positive")
        if offset % PAGE_SIZE:
            raise KernelError("EINVAL", "mmap: offset must be page aligned")
        if align is not None and (align <= 0 or align & (align - 1) or align % PAGE_SIZE):
            raise InputError(f"mmap: align {align} must be a power of two multiple of 4096")
        mflags = parse_map_flags(flags)
        fobj = self.machine.open_file(file, mflags) if isinstance(file, str) else file
        return self._run(vm_mmap(self.mm, addr, length, parse_prot(prot), mflags, fobj, offset // PAGE_SIZE,
                                 align or PAGE_SIZE), "mmap")

    def munmap(self, addr: int, length: int) -> int:
        """munmap(2)."""
        from hmmirror.mm.mmap import vm_munmap

        self._check_range(addr, length, "munmap")
        return self._run(vm_munmap(self.mm, addr, length), "munmap")

    def mprotect(self, addr: int, length: int, prot: str | int) -> int:
        """mprotect(2)."""
        from hmmirror.mm.mprotect import do_mprotect_pkey

        self._check_range(addr, length, "mprotect")
        return self._run(do_mprotect_pkey(self.mm, addr, length, parse_prot(prot)), "mprotect")

    def madvise(self, addr: int, length: int, advice: str | int) -> int:
        """madvise(2)."""
        from hmmirror.mm.madvise import do_madvise

        self._check_range(addr, length, "madvise")
        if isinstance(advice, str):
            if advice.lower() not in ADVICE:
                raise InputError(f"unknown madvise advice {advice!r}")
            advice = int(ADVICE[advice.lower()])
        return self._run(do_madvise(self.mm, addr, length, advice), "madvise")

    def mremap(self, addr: int, old_len: int, new_len: int, maymove: bool = True, new_addr: int = 0,
               dontunmap: bool = False) -> int:
        """mremap(2) (MREMAP_MAYMOVE, MREMAP_FIXED when ``new_addr`` is given, MREMAP_DONTUNMAP [6.x]); returns
        the new address."""
        from hmmirror.mm.mremap import do_mremap

        self._check_range(addr, old_len, "mremap")
        flags = (1 if maymove else 0) | (2 if new_addr else 0) | (4 if dontunmap else 0)
        return self._run(do_mremap(self.mm, addr, old_len, new_len, flags, new_addr), "mremap")

    def fork(self, child: str) -> "Process":
        """fork(2): a new process named ``child``."""
        from hmmirror.kernel.fork import dup_mm

        if child in self.machine.mms:
            raise InputError(f"fork: a process named {child!r} already exists")
        mm = self._run(dup_mm(self.mm, child), "fork")
        return Process(self.machine, mm)

    def exit(self) -> None:
        """exit(2): the address space is torn down (exit_mmap)."""
        from hmmirror.kernel.fork import mmput

        self._run(mmput(self.mm), "exit")

    # -- CPU accesses --------------------------------------------------------------------------------------
    def touch(self, addr: int, length: int = PAGE_SIZE, write: bool = False, fill: Any = None) -> int:
        """Access every page of the range in order (a load, or a store of ``fill``); returns pages done.

        A fault that the kernel answers with a signal raises KernelError EFAULT (SIGSEGV/SIGBUS).
        """
        self._check_range(addr, length, "touch")
        n = 0
        for i, a in enumerate(range(addr & ~(PAGE_SIZE - 1), addr + length, PAGE_SIZE)):
            data = fill_bytes(fill, i) if write else None
            sig = sched.run(cpu_access(self.mm, a, write, data), self.mm.task)
            if sig:
                raise KernelError("EFAULT", f"{'write' if write else 'read'} at {a:#x}: "
                                  f"{'SIGSEGV' if sig == 11 else 'SIGBUS'}")
            n += 1
        return n

    def write_bytes(self, addr: int, data: bytes) -> None:
        """A user store of ``data`` at ``addr`` (may span pages)."""
        self._check_range(addr, len(data), "write")
        off = 0
        while off < len(data):
            a = addr + off
            chunk = min(len(data) - off, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            sig = sched.run(cpu_access(self.mm, a, True, data[off: off + chunk]), self.mm.task)
            if sig:
                raise KernelError("EFAULT", f"write at {a:#x}: signal {sig}")
            off += chunk

    def read_bytes(self, addr: int, length: int) -> bytes:
        """A user load of ``length`` bytes at ``addr``."""
        self._check_range(addr, length, "read")
        out = bytearray()
        while len(out) < length:
            a = addr + len(out)
            chunk = min(length - len(out), PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            got = sched.run(cpu_read(self.mm, a, chunk), self.mm.task)
            if isinstance(got, int):
                raise KernelError("EFAULT", f"read at {a:#x}: signal {got}")
            out += got
        return bytes(out)

    def check(self, addr: int, length: int, fill: Any) -> int:
        """Read the range and count pages whose bytes differ from ``fill``."""
        bad = 0
        for i, a in enumerate(range(addr, addr + length, PAGE_SIZE)):
            want = fill_bytes(fill, i) or bytes(PAGE_SIZE)
            if self.read_bytes(a, PAGE_SIZE) != want:
                bad += 1
        return bad

    # -- device mirrors ------------------------------------------------------------------------------------
    def mirror(self, name: str = "mirror", **options: Any) -> Any:
        """A :class:`~hmmirror.mirror.Mirror` of this process (HMM run to completion, both profiles)."""
        from hmmirror.mirror import Mirror
        return Mirror(self, name, **options)

    def open_dmirror(self, unit: int = 0) -> Any:
        """``open("/dev/hmm_dmirror<unit>")`` [6.x]: see :func:`hmmirror.mirror.open_dmirror`."""
        from hmmirror.mirror import open_dmirror
        return open_dmirror(self, unit)

    def inspect(self, addr: int, length: int) -> list[PageState]:
        """Per-page state of ``[addr, addr+length)`` as the model's page tables describe it."""
        self._check_range(addr, length, "inspect")
        return inspect_range(self.mm, addr & ~(PAGE_SIZE - 1), addr + length)


def spawn(machine: Machine, name: str = "p") -> Process:
    """A new process on ``machine``."""
    return Process(machine, machine.new_mm(name))
