"""A driver that maps device memory the two classic ways (mm-substrate.md §4.1, §4.3, §5.10).

* ``kind="pfnmap"`` (``/dev/pfnmap``): ``mmap`` calls ``remap_pfn_range`` over the whole VMA: the VMA gets
  ``VM_IO|VM_PFNMAP|VM_DONTEXPAND|VM_DONTDUMP`` and special PTEs for every page at mmap time, writable per
  ``vm_page_prot``.  The pfns are those of an MMIO range (a BAR) above all memory: no ``struct page``, never
  refcounted.  There is no ``fault`` hook: a later fault on a zapped entry is SIGBUS.  A private (COW) mapping
  must cover the VMA exactly; its ``vm_pgoff`` becomes the first pfn.
* ``kind="mixedmap"`` (``/dev/mixedmap``): a buffer of ordinary RAM pages owned by the driver (one reference
  each, allocated on first use and shared by every mapping); ``mmap`` sets ``VM_MIXEDMAP`` (what
  ``vm_insert_page`` does on first use, with the mmap lock held for write) and the ``fault`` hook maps the
  buffer page with ``vm_insert_page``: a normal PTE with a page reference and a mapcount, read-only for
  ``MAP_PRIVATE`` (``vm_page_prot``), so a private write copies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT
from hmmirror.errors import InputError
from hmmirror.include.mm_types import VM, VM_FAULT
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import VmFault, remap_pfn_range, vm_insert_page
from hmmirror.mm.mm_struct import VMA, VmOps

if TYPE_CHECKING:
    from hmmirror.machine import Machine

EINVAL, ENOMEM = 22, 12
#: first pfn of the modelled MMIO space: 1 PiB, far above any RAM or pmem range the model can hold
MMIO_BASE_PFN = 1 << 38
BAR_SIZE = 256 << 20
KINDS = ("pfnmap", "mixedmap")


@dataclass(eq=False)
class PfnmapInode:
    """The device inode (``i_mmap``: VMAs mapping it)."""

    name: str
    i_size: int
    i_mmap: list[VMA] = field(default_factory=list, repr=False)


class PfnmapVmOps(VmOps):
    """vm_ops of a ``remap_pfn_range`` mapping: nothing (no ``fault``: a fault is SIGBUS)."""

    name = "pfnmap"


class MixedmapVmOps(VmOps):
    """vm_ops of the ``vm_insert_page`` driver: ``fault`` maps the buffer page of the faulting offset."""

    name = "mixedmap"

    def __init__(self, dev: "PfnmapDevice") -> None:
        self.dev = dev

    def fault(self, vmf: VmFault) -> Gen[int]:
        """The driver's ``.fault``: ``vm_insert_page(vma, address, buffer page)``; NOPAGE when mapped
        (or already mapped: -EBUSY), SIGBUS beyond the buffer, OOM when no page can be allocated."""
        pfn = self.dev.buffer_page(vmf.pgoff)
        if pfn == -ENOMEM:
            return int(VM_FAULT.OOM)
        if pfn < 0:
            return int(VM_FAULT.SIGBUS)
        err = yield from vm_insert_page(vmf.vma, vmf.address, pfn)
        if err in (0, -16):
            return int(VM_FAULT.NOPAGE)
        return int(VM_FAULT.SIGBUS)


@dataclass(eq=False)
class PfnmapFile:
    """An open ``/dev/pfnmap`` or ``/dev/mixedmap``."""

    dev: "PfnmapDevice" = field(repr=False)
    inode: PfnmapInode = field(repr=False)
    readable: bool = True
    writable: bool = True
    map_flags: int = 0

    def mmap(self, vma: VMA) -> int:
        """The driver's ``f_op->mmap``; 0 or -errno."""
        return self.dev.mmap(vma)


@dataclass(eq=False)
class PfnmapDevice:
    """The device: an MMIO BAR (pfnmap) or a driver-owned RAM buffer (mixedmap) of ``BAR_SIZE`` bytes."""

    machine: "Machine" = field(repr=False)
    kind: str = "pfnmap"
    base_pfn: int = MMIO_BASE_PFN
    size: int = BAR_SIZE
    inode: PfnmapInode | None = field(default=None, repr=False)
    vm_ops: VmOps | None = field(default=None, repr=False)
    buffer: np.ndarray | None = field(default=None, repr=False)    # mixedmap: pgoff -> pfn (-1: none yet)

    @property
    def path(self) -> str:
        return f"/dev/{self.kind}"

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def open(self, map_flags: int = 0, writable: bool = True) -> PfnmapFile:
        assert self.inode is not None
        return PfnmapFile(self, self.inode, True, writable, map_flags)

    def buffer_page(self, pgoff: int) -> int:
        """mixedmap: the driver's page for ``pgoff`` (allocated on first use); -EINVAL beyond the buffer,
        -ENOMEM when RAM is exhausted."""
        assert self.buffer is not None
        if not 0 <= pgoff < self.npages:
            return -EINVAL
        pfn = int(self.buffer[pgoff])
        if pfn < 0:
            pfn = self.machine.mem.alloc_page()          # the driver's reference: refcount 1
            if pfn < 0:
                return -ENOMEM
            self.buffer[pgoff] = pfn
        return pfn

    def mmap(self, vma: VMA) -> int:
        """pfnmap: ``remap_pfn_range(vma, vm_start, base + vm_pgoff, len, vm_page_prot)``; mixedmap: set
        ``VM_MIXEDMAP`` and the fault hook.  -EINVAL when the range goes beyond the device."""
        npages = (vma.vm_end - vma.vm_start) >> PAGE_SHIFT
        if vma.vm_pgoff < 0 or vma.vm_pgoff + npages > self.npages:
            return -EINVAL
        vma.vm_ops = self.vm_ops
        vma.devmap = self
        if self.kind == "pfnmap":
            return remap_pfn_range(vma, vma.vm_start, self.base_pfn + vma.vm_pgoff, vma.vm_end - vma.vm_start,
                                   vma.vm_page_prot)
        vma.vm_flags |= VM.MIXEDMAP
        return 0


def open_pfnmap(machine: "Machine", kind: str = "pfnmap", map_flags: int = 0, writable: bool = True) -> PfnmapFile:
    """Open the ``kind`` device ("pfnmap" or "mixedmap"), creating it on first use as
    ``machine.devices["/dev/<kind>"]``.  InputError for an unknown kind."""
    if kind not in KINDS:
        raise InputError(f"unknown pfnmap device kind {kind!r} (use {' or '.join(KINDS)})")
    path = f"/dev/{kind}"
    dev = machine.devices.get(path)
    if not isinstance(dev, PfnmapDevice):
        dev = PfnmapDevice(machine, kind)
        dev.inode = PfnmapInode(kind, dev.size)
        if kind == "pfnmap":
            dev.vm_ops = PfnmapVmOps()
        else:
            dev.vm_ops = MixedmapVmOps(dev)
            dev.buffer = np.full(dev.npages, -1, dtype=np.int64)
        machine.devices[path] = dev
    return dev.open(map_flags, writable)
