"""fsdax: ext4/xfs mounted ``-o dax`` on an fsdax pmem device (fs/dax.c, fs/ext4/file.c [5.2];
mm-substrate.md §5.7, obs-6.1).

A file's blocks are pages of the pmem device; faults map them directly (no page cache):

* **Blocks.**  ``inode.blocks`` holds the per-page state (``HOLE``, ``DATA``, ``UNWRITTEN``) and
  ``inode.private["dax_pblk"]`` the device page of every allocated page (-1: hole).  Creating a file
  allocates each 2 MiB file chunk as one 2 MiB-aligned device chunk when one is free (so PMD faults work),
  the rest as 4 KiB blocks; a write fault allocates what it asks for (a 2 MiB aligned chunk for a PMD fault,
  one block for a PTE fault) and converts unwritten extents to written ones (zeroed).
* **DAX entries** (the ``i_pages`` xarray): ``inode.private["dax_entries"]`` records, per file index, which
  entry a fault installed: a zero-page entry or a pfn entry, PTE-sized or PMD-sized.  They decide the PMD
  fallback "a 4 KiB entry already exists for that 2 MiB", the downgrade of a huge zero entry by a PTE fault,
  and the replacement of zero-page mappings when blocks are allocated (``unmap_mapping_pages``: CLEAR on
  every VMA mapping that file range, before the new entry is installed).
* **PMD fault** (``dax_iomap_pmd_fault``), checks in the [5.2] order: FALLBACK if VA and file offset are not
  congruent mod 2 MiB, if the fault is a write on a private mapping, or if the 2 MiB block does not fit in
  the VMA; offset >= EOF -> SIGBUS; FALLBACK if the block extends past EOF or a PTE entry exists in that
  2 MiB of the file; a PTE table already present -> 0 (retry); FALLBACK if the extent is shorter than 2 MiB
  or not 2 MiB aligned.  Hole/unwritten on read -> huge zero PMD; else ``vmf_insert_pfn_pmd``.  A FALLBACK
  splits (clears) the PMD.  fsdax never maps PUDs.
* **PTE fault** (``dax_iomap_pte_fault``): beyond EOF -> SIGBUS; a PMD mapped there -> NOPAGE (retry);
  private write -> copy into ``vmf.cow_page`` and map it (``VM_FAULT_DONE_COW``); hole/unwritten on read ->
  the zero page as a special PTE (``vmf_insert_mixed``, not devmap); else the pmem pfn
  (``vmf_insert_mixed[_mkwrite]``: [5.2] SPECIAL|DEVMAP, no reference; [6.18] a normal refcounted PTE).
* **Write-notify.**  The VMA has ``page_mkwrite``/``pfn_mkwrite`` (both ``ext4_dax_fault``), so shared
  writable mappings are read-only after a read fault; the write fault runs the PTE fault again with
  ``mkwrite``, which sets the write bit in place (same pfn, no notifier).
* ``VM_HUGEPAGE`` is set on DAX VMAs; ``VmOps.is_dax`` is true.

Mount through :func:`hmmirror.fs.super.mount` with ``dax="pmemN"`` (``dax_fs_ops`` is the backend hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE, pmd_leaf, pte_none
from hmmirror.errors import InputError
from hmmirror.fs.file import DATA, HOLE, UNWRITTEN, File, Inode, pages_of
from hmmirror.fs.super import CONTENTS, FileSystemType, SuperBlock
from hmmirror.include.mm_types import VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.huge_memory import __split_huge_pmd, set_huge_zero_pmd, vmf_insert_pfn_pmd
from hmmirror.mm.memory import VmFault, finish_fault, vmf_insert_mixed, vmf_insert_mixed_mkwrite
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.truncate import truncate_pagecache, unmap_mapping_pages

if TYPE_CHECKING:
    from hmmirror.drivers.nvdimm.pmem import PmemDevice
    from hmmirror.machine import Machine

ENOSPC, EIO = 28, 5
PG_PMD_COLOUR = HPAGE_PMD_NR - 1

# iomap types (include/linux/iomap.h)
IOMAP_HOLE, IOMAP_MAPPED, IOMAP_UNWRITTEN = "hole", "mapped", "unwritten"


# --- the block allocator of the pmem device --------------------------------------------------------------
class PmemBlocks:
    """Free-space map of the pmem device (one bool per 4 KiB block), ext4's mballoc reduced to two rules:
    a 2 MiB request takes a free, 2 MiB-aligned chunk; a single block comes from a partly used chunk
    first, so free aligned chunks stay whole."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.free = np.ones(npages, dtype=bool)

    def nr_free(self) -> int:
        return int(self.free.sum())

    def alloc_chunk(self) -> int:
        """A free 2 MiB-aligned chunk (its first block), or -1."""
        n = self.npages // HPAGE_PMD_NR
        if n == 0:
            return -1
        whole = self.free[: n * HPAGE_PMD_NR].reshape(n, HPAGE_PMD_NR).all(axis=1)
        i = int(np.argmax(whole))
        if not whole[i]:
            return -1
        b = i * HPAGE_PMD_NR
        self.free[b: b + HPAGE_PMD_NR] = False
        return b

    def alloc_blocks(self, n: int) -> np.ndarray:
        """``n`` free blocks (all or none: an empty array when fewer are free), taken first from chunks that
        are already partly used, then from the tail beyond the last whole chunk, then from free chunks."""
        idx = np.flatnonzero(self.free)
        if idx.size < n:
            return idx[:0]
        nchunks = self.npages // HPAGE_PMD_NR
        counts = np.bincount(idx // HPAGE_PMD_NR, minlength=nchunks + 1)
        chunk = idx // HPAGE_PMD_NR
        key = np.where(chunk >= nchunks, 1, np.where(counts[chunk] < HPAGE_PMD_NR, 0, 2))
        got = idx[np.argsort(key, kind="stable")[:n]]
        self.free[got] = False
        return got

    def alloc_block(self) -> int:
        """One free block (see :meth:`alloc_blocks`), or -1 when the device is full."""
        got = self.alloc_blocks(1)
        return int(got[0]) if got.size else -1

    def release(self, blocks: np.ndarray) -> None:
        """Free blocks (truncate)."""
        blocks = blocks[blocks >= 0]
        self.free[blocks] = True


# --- per-inode DAX state ---------------------------------------------------------------------------------
class DaxEntries:
    """The DAX entries of a file's ``i_pages``: index -> "zero" | "pfn", PTE-sized or PMD-sized (keyed by the
    2 MiB chunk number).  ``pte_per_chunk`` counts PTE entries per chunk (grab_mapping_entry's PMD test)."""

    def __init__(self) -> None:
        self.pte: dict[int, str] = {}
        self.pmd: dict[int, str] = {}
        self.pte_per_chunk: dict[int, int] = {}

    def lookup(self, index: int) -> tuple[str, bool] | None:
        """(kind, is_pmd) of the entry covering ``index``, or None."""
        k = self.pmd.get(index >> 9)
        if k is not None:
            return k, True
        k = self.pte.get(index)
        return (k, False) if k is not None else None

    def set_pte(self, index: int, kind: str) -> None:
        if index not in self.pte:
            self.pte_per_chunk[index >> 9] = self.pte_per_chunk.get(index >> 9, 0) + 1
        self.pte[index] = kind

    def set_pmd(self, chunk: int, kind: str) -> None:
        self.pmd[chunk] = kind

    def has_pte_in_chunk(self, chunk: int) -> bool:
        return self.pte_per_chunk.get(chunk, 0) > 0

    def delete_from(self, first: int) -> None:
        """Drop every entry at or beyond index ``first`` (truncate: dax_delete_mapping_entry)."""
        for i in [i for i in self.pte if i >= first]:
            del self.pte[i]
            c = i >> 9
            self.pte_per_chunk[c] -= 1
            if not self.pte_per_chunk[c]:
                del self.pte_per_chunk[c]
        for c in [c for c in self.pmd if (c << 9) + PG_PMD_COLOUR >= first]:
            del self.pmd[c]

    def __repr__(self) -> str:
        return f"DaxEntries(pte={self.pte}, pmd={self.pmd})"


def dax_pblk(inode: Inode) -> np.ndarray:
    """The device block of every file page (-1: hole), grown to the inode's blocks array."""
    pblk: np.ndarray = inode.private["dax_pblk"]
    n = inode.blocks.shape[0]
    if pblk.shape[0] < n:
        grown = np.full(n, -1, dtype=np.int64)
        grown[: pblk.shape[0]] = pblk
        inode.private["dax_pblk"] = pblk = grown
    return pblk


def dax_entries(inode: Inode) -> DaxEntries:
    entries: DaxEntries = inode.private["dax_entries"]
    return entries


# --- iomap -----------------------------------------------------------------------------------------------
@dataclass
class Iomap:
    """``struct iomap`` in pages: the extent at ``offset`` of ``length`` pages; ``addr`` the first device
    block (-1 for holes); ``new`` (IOMAP_F_NEW) when this call allocated blocks."""

    type: str
    offset: int
    length: int
    addr: int = -1
    new: bool = False


def ext4_iomap_begin(fs: "DaxFs", inode: Inode, index: int, npages: int, write: bool) -> Iomap | int:
    """ext4_iomap_begin() (fs/ext4/inode.c [5.2]) for DAX faults: the extent at ``index`` (at most ``npages``).

    A write allocates the holes of ``[index, index+npages)`` (a whole 2 MiB request first tries one aligned
    chunk) and converts unwritten blocks to written (zeroed, EXT4_GET_BLOCKS_CREATE_ZERO).  -ENOSPC when
    the device is full.
    """
    mem = fs.machine.mem
    pblk = dax_pblk(inode)
    end = min(index + npages, inode.blocks.shape[0])
    new = False
    if write and end > index:
        st = inode.blocks[index:end]
        holes = np.flatnonzero(st == HOLE) + index
        if holes.size:
            new = True
            if holes.size == HPAGE_PMD_NR and npages == HPAGE_PMD_NR and not index & PG_PMD_COLOUR:
                b = fs.blocks.alloc_chunk()
                if b >= 0:
                    pblk[index: index + HPAGE_PMD_NR] = np.arange(b, b + HPAGE_PMD_NR)
                    holes = holes[:0]
            if holes.size:
                got = fs.blocks.alloc_blocks(int(holes.size))
                if got.size < holes.size:
                    return -ENOSPC
                pblk[holes] = got
        fresh = np.flatnonzero(st != DATA) + index
        for i in fresh.tolist():                       # zero the new / unwritten blocks
            mem.clear(fs.pmem.start_pfn + int(pblk[i]))
        inode.blocks[index:end] = DATA
    if index >= inode.blocks.shape[0]:
        return Iomap(IOMAP_HOLE, index, npages)
    st0 = int(inode.blocks[index])
    kind = {HOLE: IOMAP_HOLE, DATA: IOMAP_MAPPED, UNWRITTEN: IOMAP_UNWRITTEN}[st0]
    same = inode.blocks[index:end] == st0
    if kind != IOMAP_HOLE:
        same &= pblk[index:end] == pblk[index] + np.arange(end - index)
    run = int(np.argmin(same)) if not same.all() else end - index
    addr = int(pblk[index]) if kind != IOMAP_HOLE else -1
    return Iomap(kind, index, run, addr, new)


# --- the DAX entry protocol ------------------------------------------------------------------------------
FALLBACK_ENTRY = ("fallback", False)


def grab_mapping_entry(inode: Inode, index: int, pmd: bool) -> Gen[tuple[str, bool] | None]:
    """grab_mapping_entry() (fs/dax.c [5.2]): the entry the fault will work on.

    A PMD fault over a chunk holding PTE entries gets ``FALLBACK_ENTRY``.  A PTE fault over a huge zero
    entry downgrades it: every mapping of the 2 MiB is unmapped (CLEAR per VMA) and the entry removed.
    """
    entries = dax_entries(inode)
    entry = entries.lookup(index)
    if pmd:
        if entries.has_pte_in_chunk(index >> 9):
            return FALLBACK_ENTRY
        return entry
    if entry is not None and entry[1] and entry[0] == "zero":
        yield from unmap_mapping_pages(inode, index & ~PG_PMD_COLOUR, HPAGE_PMD_NR, False)
        entries.pmd.pop(index >> 9, None)
        inode.machine.counters["dax_pmd_downgrade"] += 1
        return None
    return entry


def dax_insert_entry(inode: Inode, entry: tuple[str, bool] | None, index: int, kind: str, pmd: bool) -> Gen[None]:
    """dax_insert_entry() (fs/dax.c [5.2]): replacing a zero-page entry by a block mapping first unmaps the
    zero page from every mapping of that range (PTE entry: 1 page; PMD entry: its 2 MiB); a zero or absent
    entry is replaced, a pfn entry already there (PTE or PMD) is left alone."""
    entries = dax_entries(inode)
    if entry is not None and entry[0] == "zero" and kind == "pfn":
        if entry[1]:
            yield from unmap_mapping_pages(inode, index & ~PG_PMD_COLOUR, HPAGE_PMD_NR, False)
        else:
            yield from unmap_mapping_pages(inode, index, 1, False)
        inode.machine.counters["dax_zero_replaced"] += 1
    if entry is None or entry[0] == "zero":
        if entry is not None and entry[1] and not pmd:
            entries.pmd.pop(index >> 9, None)
        if pmd:
            entries.set_pmd(index >> 9, kind)
        else:
            entries.set_pte(index, kind)


# --- faults ----------------------------------------------------------------------------------------------
def _inode_of(vma: VMA) -> Inode:
    f = vma.vm_file
    assert f is not None
    inode: Inode = f.inode
    return inode


def dax_iomap_pte_fault(fs: "DaxFs", vmf: VmFault) -> Gen[int]:
    """dax_iomap_pte_fault() (fs/dax.c [5.2])."""
    vma, mm = vmf.vma, vmf.mm
    machine = mm.machine
    inode = _inode_of(vma)
    index = vmf.pgoff
    if index >= pages_of(inode.i_size):
        return int(VM_FAULT.SIGBUS)
    cow = vmf.cow_page >= 0
    write = vmf.write and not cow
    machine.counters["dax_pte_fault"] += 1
    entry = yield from grab_mapping_entry(inode, index, False)
    assert vmf.pmdp is not None
    pmd = machine.pool.get(vmf.pmdp)
    if pmd_leaf(pmd):
        return int(VM_FAULT.NOPAGE)                    # raced with a PMD fault: retry
    iomap = ext4_iomap_begin(fs, inode, index, 1, write)
    if isinstance(iomap, int):
        return int(VM_FAULT.SIGBUS)                    # dax_fault_return(-ENOSPC / -EIO)
    if iomap.type == IOMAP_MAPPED and not dax_alive(fs.pmem):
        return int(VM_FAULT.SIGBUS)                    # dax_direct_access() on a killed dax_device: -ENXIO
    if cow:
        if iomap.type == IOMAP_MAPPED:
            machine.mem.copy(vmf.cow_page, fs.pmem.start_pfn + iomap.addr)     # copy_user_dax()
        else:
            machine.mem.clear(vmf.cow_page)                                    # clear_user_highpage()
        ret = yield from finish_fault(vmf)
        return ret if ret else int(VM_FAULT.DONE_COW)
    if iomap.type == IOMAP_MAPPED:
        pfn = fs.pmem.start_pfn + iomap.addr
        yield from dax_insert_entry(inode, entry, index, "pfn", False)
        ret = yield from (vmf_insert_mixed_mkwrite if write else vmf_insert_mixed)(vma, vmf.address, pfn)
        return ret | (int(VM_FAULT.MAJOR) if iomap.new else 0)
    if not write:                                      # dax_load_hole()
        yield from dax_insert_entry(inode, entry, index, "zero", False)
        return (yield from vmf_insert_mixed(vma, vmf.address, machine.mem.zero_pfn))
    sched.report("WARN_ON", f"dax_iomap_pte_fault: write over an unallocated extent of {inode.path}")
    return int(VM_FAULT.SIGBUS)


def dax_alive(pmem: Any) -> bool:
    """dax_alive() (drivers/dax/super.c): false once ``kill_dax`` ran on the namespace's dax_device."""
    return not getattr(pmem, "dax_dead", False)


def split_huge_pmd(vma: VMA, pmdp: Any, address: int) -> Gen[None]:
    """split_huge_pmd(): ``__split_huge_pmd`` only when the PMD is a (huge or devmap) leaf."""
    if pmd_leaf(vma.vm_mm.machine.pool.get(pmdp)):
        yield from __split_huge_pmd(vma, pmdp, address)


def dax_iomap_pmd_fault(fs: "DaxFs", vmf: VmFault) -> Gen[int]:
    """dax_iomap_pmd_fault() (fs/dax.c [5.2]); checks in the 5.2 order (module docstring)."""
    vma, mm = vmf.vma, vmf.mm
    machine = mm.machine
    inode = _inode_of(vma)
    write = vmf.write
    haddr = vmf.address & ~(PMD_SIZE - 1)
    index = vmf.pgoff & ~PG_PMD_COLOUR
    max_pgoff = pages_of(inode.i_size)
    result = int(VM_FAULT.FALLBACK)
    machine.counters["dax_pmd_fault"] += 1
    assert vmf.pmdp is not None
    while True:                                        # "goto fallback" structure, exited by break
        if (vmf.pgoff & PG_PMD_COLOUR) != ((vmf.address >> 12) & PG_PMD_COLOUR):
            break
        if write and not vma.vm_flags & VM.SHARED:     # fall back to PTEs if we're going to COW
            break
        if haddr < vma.vm_start or haddr + PMD_SIZE > vma.vm_end:
            break
        if index >= max_pgoff:
            return int(VM_FAULT.SIGBUS)
        if (index | PG_PMD_COLOUR) >= max_pgoff:
            break
        entry = yield from grab_mapping_entry(inode, index, True)
        if entry == FALLBACK_ENTRY:
            break
        pmd = machine.pool.get(vmf.pmdp)
        if not pte_none(pmd) and not pmd_leaf(pmd):
            return 0                                   # a PTE table raced in: retry on the PTE path
        iomap = ext4_iomap_begin(fs, inode, index, HPAGE_PMD_NR, write)
        if isinstance(iomap, int) or iomap.length < HPAGE_PMD_NR:
            break
        if iomap.type == IOMAP_MAPPED:
            if not dax_alive(fs.pmem):
                break                                  # dax_iomap_pfn(): -ENXIO (killed dax_device): fallback
            if iomap.addr & PG_PMD_COLOUR or (fs.pmem.start_pfn + iomap.addr) & PG_PMD_COLOUR:
                break                                  # dax_iomap_pfn(): -EINVAL, not 2 MiB aligned
            pfn = fs.pmem.start_pfn + iomap.addr
            yield from dax_insert_entry(inode, entry, index, "pfn", True)
            result = yield from vmf_insert_pfn_pmd(vmf, pfn, write)
        elif not write:                                # dax_pmd_load_hole()
            yield from dax_insert_entry(inode, entry, index, "zero", True)
            result = yield from set_huge_zero_pmd(vmf)
        else:
            sched.report("WARN_ON", f"dax_iomap_pmd_fault: write over an unallocated extent of {inode.path}")
        break
    if result == VM_FAULT.FALLBACK:
        yield from split_huge_pmd(vma, vmf.pmdp, vmf.address)
        machine.counters["thp_fault_fallback"] += 1
    return result


def ext4_dax_huge_fault(fs: "DaxFs", vmf: VmFault, pe_size: str) -> Gen[int]:
    """ext4_dax_huge_fault() (fs/ext4/file.c [5.2]): ``i_mmap_sem`` for read around ``dax_iomap_fault``
    (PTE or PMD; PUD faults fall back)."""
    inode = _inode_of(vmf.vma)
    sem: Lock = inode.private["i_mmap_sem"]
    yield from sched.down_read(sem)
    try:
        if pe_size == "pte":
            return (yield from dax_iomap_pte_fault(fs, vmf))
        if pe_size == "pmd":
            return (yield from dax_iomap_pmd_fault(fs, vmf))
        return int(VM_FAULT.FALLBACK)
    finally:
        sched.up_read(sem)


class DaxVmOps(VmOps):
    """``ext4_dax_vm_ops`` / ``xfs_file_vm_ops`` with DAX: ``fault``, ``huge_fault``, ``page_mkwrite`` and
    ``pfn_mkwrite`` all run the DAX fault (so shared writable mappings get write-notify)."""

    name = "fsdax"
    is_dax = True

    def __init__(self, fs: "DaxFs") -> None:
        self.fs = fs

    def fault(self, vmf: VmFault) -> Gen[int]:
        """ext4_dax_fault()."""
        return (yield from ext4_dax_huge_fault(self.fs, vmf, "pte"))

    def huge_fault(self, vmf: VmFault, pe_size: str) -> Gen[int]:  # type: ignore[override]
        """ext4_dax_huge_fault()."""
        return (yield from ext4_dax_huge_fault(self.fs, vmf, pe_size))

    def page_mkwrite(self, vmf: VmFault, page: int) -> Gen[int]:  # type: ignore[override]
        """``.page_mkwrite = ext4_dax_fault`` ([6.18]: DAX PTEs are normal pages and come here)."""
        return (yield from ext4_dax_huge_fault(self.fs, vmf, "pte"))

    def pfn_mkwrite(self, vmf: VmFault) -> Gen[int]:  # type: ignore[override]
        """``.pfn_mkwrite = ext4_dax_fault`` ([5.2]: devmap PTEs and zero-page PTEs are special)."""
        return (yield from ext4_dax_huge_fault(self.fs, vmf, "pte"))


# --- the filesystem --------------------------------------------------------------------------------------
class DaxFs(FileSystemType):
    """An ext4/xfs filesystem mounted ``-o dax`` on an fsdax pmem device."""

    name = "fsdax"

    def __init__(self, machine: "Machine", sb: SuperBlock) -> None:
        super().__init__(machine)
        dev = machine.devices.get(sb.dax) if sb.dax else None
        from hmmirror.drivers.nvdimm.pmem import PmemDevice

        if not isinstance(dev, PmemDevice):
            raise InputError(f"mount: {sb.dax!r} is not a pmem device", "ENODEV")
        if dev.mode != "fsdax":
            raise InputError(f"mount: {sb.dax} is in {dev.mode} mode, -o dax needs an fsdax namespace")
        if dev.removed:
            raise InputError(f"mount: {sb.dax} was removed", "ENODEV")
        if dev.fs is not None:
            raise InputError(f"mount: {sb.dax} is already mounted", "EBUSY")
        self.sb = sb
        self.pmem: PmemDevice = dev
        self.blocks = PmemBlocks(dev.npages)
        self.vm_ops = DaxVmOps(self)
        dev.fs = self

    # -- files --
    def new_inode(self, sb: SuperBlock, path: str, size: int, content: str) -> Inode:
        """Create a file: "data" (written blocks), "zero" (fallocated: unwritten) or "sparse" (holes).

        Each whole 2 MiB file chunk gets a 2 MiB-aligned device chunk when one is free; the rest 4 KiB
        blocks.  InputError ENOSPC when the device is too small.
        """
        inode = Inode(sb, path, size)
        n = pages_of(size)
        inode.private["dax_pblk"] = np.full(n, -1, dtype=np.int64)
        inode.private["dax_entries"] = DaxEntries()
        inode.private["i_mmap_sem"] = Lock(f"{path}.i_mmap_sem", "rwsem")
        state = CONTENTS[content]
        inode.set_blocks(0, n, HOLE)
        if state != HOLE:
            if n > self.blocks.nr_free():
                raise InputError(f"create_file: {path}: no space left on {self.pmem.name}", "ENOSPC")
            pblk = dax_pblk(inode)
            for c in range(0, n, HPAGE_PMD_NR):
                b = self.blocks.alloc_chunk() if c + HPAGE_PMD_NR <= n else -1
                if b >= 0:
                    pblk[c: c + HPAGE_PMD_NR] = np.arange(b, b + HPAGE_PMD_NR)
                    continue
                hi = min(c + HPAGE_PMD_NR, n)
                got = self.blocks.alloc_blocks(hi - c)
                if got.size < hi - c:
                    raise InputError(f"create_file: {path}: no space left on {self.pmem.name}", "ENOSPC")
                pblk[c:hi] = got
            inode.set_blocks(0, n, state)
            mem = self.machine.mem
            for p in (self.pmem.start_pfn + pblk[:n]).tolist():
                mem.clear(p)                          # fresh blocks read as zeroes
        return inode

    def mmap(self, file: File, vma: VMA) -> int:
        """ext4_file_mmap() on a DAX inode: ``ext4_dax_vm_ops`` and ``VM_HUGEPAGE``."""
        vma.vm_ops = self.vm_ops
        vma.vm_flags |= VM.HUGEPAGE
        return 0

    def mmap_align(self, inode: Inode) -> int:
        """thp_get_unmapped_area() for DAX files: 2 MiB-aligned addresses."""
        return PMD_SIZE

    def setattr_size(self, inode: Inode, size: int) -> Gen[int]:
        """ext4_setattr(ATTR_SIZE) on a DAX inode [5.2]: ``i_mmap_sem`` for write; shrinking zeroes the tail of
        the last partial block, runs ``truncate_pagecache`` (the tail is unmapped from every mapping, COW
        copies included, twice), drops its DAX entries and frees its blocks (ext4_truncate)."""
        sem: Lock = inode.private["i_mmap_sem"]
        yield from sched.down_write(sem)
        try:
            old = inode.i_size
            n_old, n_new = pages_of(old), pages_of(size)
            if n_new > inode.blocks.shape[0]:
                inode.set_blocks(inode.blocks.shape[0], n_new, HOLE)
                dax_pblk(inode)
            if size < old:
                tail = self.block_pfn(inode, size >> 12) if size & (PAGE_SIZE - 1) else -1
                if tail >= 0:                          # ext4_block_truncate_page(): zero the partial block
                    self.machine.mem.zero(tail, size & (PAGE_SIZE - 1), PAGE_SIZE)
                inode.i_size = size
                yield from truncate_pagecache(inode, size)
                dax_entries(inode).delete_from(n_new)
                pblk = dax_pblk(inode)
                self.blocks.release(pblk[n_new:n_old].copy())
                pblk[n_new:] = -1
                inode.blocks[n_new:] = HOLE
            inode.i_size = size
        finally:
            sched.up_write(sem)
        return 0

    def block_pfn(self, inode: Inode, index: int) -> int:
        """Ours: the pmem pfn backing file page ``index`` (-1 for a hole)."""
        pblk = dax_pblk(inode)
        if not 0 <= index < pblk.shape[0] or pblk[index] < 0:
            return -1
        return self.pmem.start_pfn + int(pblk[index])


def dax_fs_ops(machine: "Machine", sb: SuperBlock) -> DaxFs:
    """The fsdax backend hook of :func:`hmmirror.fs.super.mount` (``dax="pmemN"``)."""
    return DaxFs(machine, sb)


_ = (UNWRITTEN, PAGE_SIZE)
