"""The HMM test device "dmirror" (lib/test_hmm.c, about v6.15 with the mainline 64-entry chunks).

``/dev/hmm_dmirror0`` and ``/dev/hmm_dmirror1`` are two devices, each a distinct owner (``mdevice``, the
``dev_private_owner`` of its ranges).  Opening one creates a :class:`Dmirror` — a private device page table
(``pt``) mirroring the opener's mm through an interval notifier over ``[0, ULONG_MAX & PAGE_MASK)``.  The
ioctls READ / WRITE / SNAPSHOT move data between the process's pages and a caller buffer *through* that
mirror: READ and WRITE fault the missing part of the range with ``hmm_range_fault`` (the canonical retry loop
of hmm-modern.md §5 under ``dmirror.mutex``), then copy page contents from / to the frames the device page
table points to; SNAPSHOT reports the CPU mapping of every page as one ``HMM_DMIRROR_PROT_*`` byte without
faulting.

The driver is a class with the three routines a real mirroring driver has (:class:`IntervalNotifierDriver`):

* ``populate(start, end, write)`` — fault the range in and program the device page table (``dmirror_fault``);
* ``invalidate(sub, range, cur_seq)`` — the interval-notifier callback (``dmirror_interval_invalidate``);
* ``gc()`` — optional background clean-up (nothing for dmirror).

The simulator drives these; a user plugs a driver of their own by subclassing :class:`IntervalNotifierDriver`.

Model choices (documented differences):

* **The 1000 ms retry bound** (``HMM_RANGE_DEFAULT_TIMEOUT``) is ``time_after(jiffies, timeout)`` on the
  machine's virtual clock (:mod:`hmmirror.kernel.time`: one jiffy per simulator step), as in the kernel; run
  sequentially the clock stands still, so :data:`DMIRROR_RANGE_FAULT_RETRIES` (1000) passes bound the loop
  there.  Either can only trigger under sustained invalidation (simulator).
* **The device page table** is an xarray of tagged page pointers in the kernel; here it is
  :class:`DmirrorPageTable`: sparse numpy chunks of 512 ``uint64`` entries ``pfn << 2 | tag`` (0 = empty), no
  Python object per page.  Tags: 0 read-only, ``DPT_XA_TAG_WRITE`` (3) writable, ``DPT_XA_TAG_ATOMIC`` (1)
  device-exclusive.
* **Caller buffers** (``cmd.ptr`` and the ioctl argument) are either Python buffers (``bytearray``,
  writable ``memoryview`` or a ``uint8`` numpy array; the command as a :class:`HmmDmirrorCmd` object) or user
  addresses of the calling process (then ``copy_to_user`` / ``copy_from_user`` are CPU accesses that may
  fault).  ``None`` is a bad user pointer (-EFAULT).
* The bounce buffer is allocated only when ``npages`` pages fit in the machine's RAM (vmalloc), else -ENOMEM;
  it is sparse (zero pages cost nothing).
* ``mmap`` of the file maps one zeroed page per address with ``vm_insert_page`` (normal PTEs in a
  ``VM_MIXEDMAP`` VMA), as the driver does.
* **Device memory** (MIGRATE_TO_DEV / MIGRATE_TO_SYS / EXCLUSIVE / CHECK_EXCLUSIVE / RELEASE): each device
  owns 256 MiB chunks of device-private pages (``dmirror_allocate_chunk``: one ``MEMORY_DEVICE_PRIVATE``
  pgmap per chunk, ``owner`` = the device, the first chunk at module load); free pages are a LIFO stack of
  pfns (the kernel's ``free_pages`` list threaded through ``zone_device_data``), a numpy array per device.
  Every device page is backed by a system page holding its bytes (``BACKING_PAGE``): its pfn is the page's
  ``zone_device_data`` (``pgmap.zone_device_data``), and the mirror that migrated it (``rpage->
  zone_device_data``) is an index per device page (``DmirrorChunk.mirror_idx``).  Migration uses
  :mod:`hmmirror.mm.migrate_device` in 64-page windows; ``migrate_to_ram`` is :meth:`Dmirror.dmirror_devmem_fault`.
* Reading a device-private page through ``pt`` (an entry installed by a device fault on the device's own
  page, which hmm_range_fault reports without faulting) reads its backing page: the kernel module would
  ``kmap`` the device page itself, which has no CPU mapping.
* HMM_DMIRROR_FLAGS (``HMM_DMIRROR_FLAG_FAIL_ALLOC``, the 2026 driver) exists where
  ``profile.dmirror_flags_ioctl``; with 4 KiB pages only, a failed allocation leaves that page in system
  memory (the 6.18 driver's ``if (!dpage) continue``).
* Exclusive access follows the profile: ``make_device_exclusive`` one page at a time [6.15+] or
  ``make_device_exclusive_range`` per 64 pages [6.12]; ``fops_release`` evicts the device's pages where
  ``profile.dmirror_release_evicts``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PUD_SHIFT
from hmmirror.errors import InputError, KernelError
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.hmm.modern import (
    HMM_PFN_ERROR,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_to_map_order,
    hmm_pfn_to_pfn,
    hmm_range_fault,
)
from hmmirror.mm.mm_struct import VmOps
from hmmirror.mm.mmu_notifier import (
    ULONG_MAX,
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    MmuNotifierRange,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_range_blockable,
)

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import VMA, MMStruct

EPERM, ENOENT, ENOMEM, EFAULT, EBUSY, EINVAL, EOPNOTSUPP = 1, 2, 12, 14, 16, 22, 95
U64 = (1 << 64) - 1
PAGE_MASK = U64 & ~(PAGE_SIZE - 1)

DMIRROR_NDEVICES = 2                      # device-private devices (2 and 3, device-coherent, need spm_addr_*)
DMIRROR_RANGE_FAULT_TIMEOUT = 1000        # ms (the driver's retry bound, HMM_RANGE_DEFAULT_TIMEOUT)
DMIRROR_RANGE_FAULT_RETRIES = 1000        # model: passes of the retry loop before -EBUSY (>= 1 ms per pass)
DMIRROR_CHUNK_PAGES = 64                  # unsigned long pfns[64] in dmirror_fault / dmirror_snapshot
DEVMEM_CHUNK_SIZE = 256 << 20             # device-private memory is added in 256 MiB chunks
DEVMEM_CHUNK_PAGES = DEVMEM_CHUNK_SIZE >> PAGE_SHIFT
HMM_DMIRROR_FLAG_FAIL_ALLOC = 1 << 0

DPT_XA_TAG_ATOMIC = 1
DPT_XA_TAG_WRITE = 3

# include/uapi test_hmm_uapi.h: enum { HMM_DMIRROR_PROT_* }
HMM_DMIRROR_PROT_ERROR = 0xFF
HMM_DMIRROR_PROT_NONE = 0x00
HMM_DMIRROR_PROT_READ = 0x01
HMM_DMIRROR_PROT_WRITE = 0x02
HMM_DMIRROR_PROT_PMD = 0x04
HMM_DMIRROR_PROT_PUD = 0x08
HMM_DMIRROR_PROT_ZERO = 0x10
HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL = 0x20
HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE = 0x30
HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL = 0x40
HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE = 0x50

HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 0
HMM_DMIRROR_MEMORY_DEVICE_COHERENT = 1

CMD_STRUCT = struct.Struct("<5Q")         # struct hmm_dmirror_cmd {addr, ptr, npages, cpages, faults}


def _IOWR(typ: str, nr: int, size: int) -> int:
    """_IOWR(): direction read|write (3), size, type, number."""
    return (3 << 30) | (size << 16) | (ord(typ) << 8) | nr


HMM_DMIRROR_READ = _IOWR("H", 0x00, CMD_STRUCT.size)
HMM_DMIRROR_WRITE = _IOWR("H", 0x01, CMD_STRUCT.size)
HMM_DMIRROR_MIGRATE_TO_DEV = _IOWR("H", 0x02, CMD_STRUCT.size)
HMM_DMIRROR_MIGRATE_TO_SYS = _IOWR("H", 0x03, CMD_STRUCT.size)
HMM_DMIRROR_SNAPSHOT = _IOWR("H", 0x04, CMD_STRUCT.size)
HMM_DMIRROR_EXCLUSIVE = _IOWR("H", 0x05, CMD_STRUCT.size)
HMM_DMIRROR_CHECK_EXCLUSIVE = _IOWR("H", 0x06, CMD_STRUCT.size)
HMM_DMIRROR_RELEASE = _IOWR("H", 0x07, CMD_STRUCT.size)
HMM_DMIRROR_FLAGS = _IOWR("H", 0x08, CMD_STRUCT.size)

COMMAND_NAMES = {
    HMM_DMIRROR_READ: "READ", HMM_DMIRROR_WRITE: "WRITE", HMM_DMIRROR_MIGRATE_TO_DEV: "MIGRATE_TO_DEV",
    HMM_DMIRROR_MIGRATE_TO_SYS: "MIGRATE_TO_SYS", HMM_DMIRROR_SNAPSHOT: "SNAPSHOT",
    HMM_DMIRROR_EXCLUSIVE: "EXCLUSIVE", HMM_DMIRROR_CHECK_EXCLUSIVE: "CHECK_EXCLUSIVE",
    HMM_DMIRROR_RELEASE: "RELEASE", HMM_DMIRROR_FLAGS: "FLAGS",
}
COMMANDS = {v: k for k, v in COMMAND_NAMES.items()}


@dataclass
class HmmDmirrorCmd:
    """``struct hmm_dmirror_cmd`` (five u64): the ioctl argument as the caller's memory holds it."""

    addr: int = 0
    ptr: Any = None          # user pointer: a Python buffer, a user address, or None (bad pointer)
    npages: int = 0
    cpages: int = 0
    faults: int = 0

    def __repr__(self) -> str:
        if isinstance(self.ptr, int):
            ptr = hex(self.ptr)
        elif self.ptr is None:
            ptr = "None"
        else:
            ptr = f"<{type(self.ptr).__name__} of {memoryview(self.ptr).nbytes} bytes>"
        return (f"HmmDmirrorCmd(addr={self.addr:#x}, ptr={ptr}, npages={self.npages}, cpages={self.cpages}, "
                f"faults={self.faults})")


# --- the device page table -------------------------------------------------------------------------------
class DmirrorPageTable:
    """The device page table (``dmirror->pt``, an xarray of tagged page pointers indexed by VA >> 12).

    Sparse: a dict of numpy chunks of 512 entries; an entry is ``pfn << 2 | tag`` (0: no entry).
    """

    CHUNK_SHIFT = 9
    CHUNK = 1 << CHUNK_SHIFT

    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def load(self, index: int) -> int:
        """xa_load(): the tagged entry at ``index`` (0 when absent)."""
        c = self.chunks.get(index >> self.CHUNK_SHIFT)
        return 0 if c is None else int(c[index & (self.CHUNK - 1)])

    def load_range(self, first: int, n: int) -> np.ndarray:
        """Entries ``first .. first+n`` as a uint64 array (0 where absent)."""
        out = np.zeros(n, dtype=np.uint64)
        i = 0
        while i < n:
            idx = first + i
            k = min(n - i, self.CHUNK - (idx & (self.CHUNK - 1)))
            c = self.chunks.get(idx >> self.CHUNK_SHIFT)
            if c is not None:
                lo = idx & (self.CHUNK - 1)
                out[i:i + k] = c[lo:lo + k]
            i += k
        return out

    def store_range(self, first: int, entries: np.ndarray) -> None:
        """xa_store() of consecutive entries (tagged values, non-zero)."""
        n = len(entries)
        i = 0
        while i < n:
            idx = first + i
            k = min(n - i, self.CHUNK - (idx & (self.CHUNK - 1)))
            key = idx >> self.CHUNK_SHIFT
            c = self.chunks.get(key)
            if c is None:
                c = self.chunks[key] = np.zeros(self.CHUNK, dtype=np.uint64)
            lo = idx & (self.CHUNK - 1)
            c[lo:lo + k] = entries[i:i + k]
            i += k

    def store(self, index: int, pfn: int, tag: int) -> None:
        """xa_store(xa_tag_pointer(page, tag))."""
        self.store_range(index, np.array([(pfn << 2) | tag], dtype=np.uint64))

    def erase_range(self, first: int, last: int) -> int:
        """xa_for_each_range() + xa_erase() over ``[first, last]`` (inclusive); returns entries erased."""
        erased = 0
        lo_key, hi_key = first >> self.CHUNK_SHIFT, last >> self.CHUNK_SHIFT
        for key in [k for k in self.chunks if lo_key <= k <= hi_key]:
            c = self.chunks[key]
            base = key << self.CHUNK_SHIFT
            lo = max(first - base, 0)
            hi = min(last - base, self.CHUNK - 1)
            erased += int(np.count_nonzero(c[lo:hi + 1]))
            c[lo:hi + 1] = 0
            if not c.any():
                del self.chunks[key]
        return erased

    def destroy(self) -> None:
        """xa_destroy()."""
        self.chunks.clear()

    def __len__(self) -> int:
        return sum(int(np.count_nonzero(c)) for c in self.chunks.values())

    def items(self) -> Iterator[tuple[int, int, int]]:
        """(index, pfn, tag) of every entry, in index order (inspection)."""
        for key in sorted(self.chunks):
            c = self.chunks[key]
            for lo in np.flatnonzero(c).tolist():
                e = int(c[lo])
                yield (key << self.CHUNK_SHIFT) + lo, e >> 2, e & 3

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks.values())


def xa_untag_pointer(entry: int) -> int:
    """xa_untag_pointer(): the page (pfn) of a tagged entry."""
    return entry >> 2


def xa_pointer_tag(entry: int) -> int:
    """xa_pointer_tag()."""
    return entry & 3


# --- the generic driver shape ----------------------------------------------------------------------------
class _DriverNotifierOps(MmuIntervalNotifierOps):
    """``struct mmu_interval_notifier_ops`` whose ``invalidate`` is the driver's routine."""

    def __init__(self, driver: "IntervalNotifierDriver") -> None:
        self.driver = driver

    def invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> Gen[bool]:
        return (yield from self.driver.invalidate(sub, r, cur_seq))


class IntervalNotifierDriver:
    """A device driver mirroring one mm (Documentation/mm/hmm.rst): ours, the shape every HMM driver has.

    Subclasses provide the three routines:

    * :meth:`populate` ``(start, end, write) -> Gen[int]``: fault ``[start, end)`` in through
      :meth:`range_fault` and program the device page table;
    * :meth:`invalidate` ``(sub, range, cur_seq) -> Gen[bool]``: the interval-notifier callback; under the
      driver lock it calls ``mmu_interval_set_seq`` and removes device mappings;
    * :meth:`gc` ``() -> Gen[int]``: optional background work (default: nothing).

    :meth:`range_fault` is the canonical retry loop of hmm-modern.md §5; it calls :meth:`program` (plain:
    it runs under the driver lock) once a snapshot is known to be consistent.
    """

    name = "mirror"
    max_retries = DMIRROR_RANGE_FAULT_RETRIES

    def __init__(self, mm: "MMStruct", lock_name: str) -> None:
        self.mm = mm
        self.notifier = MmuIntervalNotifier()
        self.notifier_ops = _DriverNotifierOps(self)
        self.mutex = Lock(lock_name, "mutex")          # driver->update: taken by invalidate() too

    @property
    def machine(self) -> "Machine":
        return self.mm.machine

    # -- the three routines ---------------------------------------------------------------------------
    def populate(self, start: int, end: int, write: bool) -> Gen[int]:
        raise NotImplementedError

    def invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> Gen[bool]:
        raise NotImplementedError

    def gc(self) -> Gen[int]:
        """Optional background clean-up; dmirror has none."""
        return 0
        yield  # pragma: no cover

    def program(self, range: HmmRange) -> int:   # noqa: A002 - kernel name
        """Write the device page table from ``range.hmm_pfns`` (runs under :attr:`mutex`)."""
        raise NotImplementedError

    # -- the canonical loop ---------------------------------------------------------------------------
    def range_fault(self, range: HmmRange) -> Gen[int]:   # noqa: A002
        """dmirror_range_fault() / hmm.rst ``driver_populate_range``: read_begin, hmm_range_fault under the
        mmap read lock, then ``read_retry`` under the driver lock; program the device only when no
        invalidation intervened.  -EBUSY after :attr:`max_retries` passes (the 1000 ms timeout)."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after

        mm = self.mm
        passes = 0
        timeout = jiffies(self.machine) + msecs_to_jiffies(DMIRROR_RANGE_FAULT_TIMEOUT)
        while True:
            if time_after(jiffies(self.machine), timeout) or passes > self.max_retries:
                self.machine.counters["dmirror_timeouts"] += 1
                return -EBUSY
            passes += 1
            range.notifier_seq = yield from mmu_interval_read_begin(range.notifier)
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from hmm_range_fault(range)
            sched.up_read(mm.mmap_sem)
            if ret:
                if ret == -EBUSY:
                    self.machine.counters["dmirror_retries"] += 1
                    continue
                return ret
            yield from sched.mutex_lock(self.mutex)
            # Loop invariant: a snapshot is used only if no invalidation ran since read_begin; the
            # invalidate callback sets the sequence under this same lock.
            if mmu_interval_read_retry(range.notifier, range.notifier_seq):
                sched.mutex_unlock(self.mutex)
                self.machine.counters["dmirror_retries"] += 1
                continue
            break
        ret = self.program(range)
        sched.mutex_unlock(self.mutex)
        return ret


# --- devices ---------------------------------------------------------------------------------------------
class DmirrorDevice:
    """``struct dmirror_device``: one /dev/hmm_dmirrorN; the object is the ``pgmap.owner`` of its memory."""

    def __init__(self, machine: "Machine", id: int, zone_device_type: int) -> None:   # noqa: A002
        self.machine = machine
        self.id = id
        self.path = f"/dev/hmm_dmirror{id}"
        self.zone_device_type = zone_device_type
        self.devmem_chunks: list[DmirrorChunk] = []   # devmem_chunks[devmem_count]
        self.devmem_lock = Lock(f"dmirror{id}.devmem_lock", "mutex")
        self.calloc = 0
        self.cfree = 0
        # The free list (``free_pages``, threaded through zone_device_data): freed pages on a numpy stack
        # (``free_pages[nfree - 1]`` is the head) above the untouched part of the newest chunks, kept as
        # ``[lo, hi)`` ranges handed out from ``hi - 1`` down -- the kernel's order (a chunk is only added when
        # the list is empty, its last pfn on top), without a Python object or array slot per page.
        self.free_pages = np.zeros(64, dtype=np.int64)
        self.nfree = 0
        self.free_ranges: list[list[int]] = []
        self.lock = Lock(f"dmirror{id}.lock", "spin")
        self.open_files: list["DmirrorFile"] = []
        self.mirrors: list["Dmirror"] = []            # index -> dmirror, for rpage->zone_device_data

    def __repr__(self) -> str:
        return f"DmirrorDevice({self.path})"

    # -- device memory -----------------------------------------------------------------------------------------
    def chunk_of(self, pfn: int) -> "DmirrorChunk | None":
        """dmirror_page_to_chunk(): the chunk whose pgmap holds ``pfn``."""
        for c in self.devmem_chunks:
            if c.pgmap.covers(pfn):
                return c
        return None

    def _push_free(self, pfns: np.ndarray) -> None:
        need = self.nfree + len(pfns)
        if need > len(self.free_pages):
            grown = np.zeros(max(need, 2 * len(self.free_pages)), dtype=np.int64)
            grown[:self.nfree] = self.free_pages[:self.nfree]
            self.free_pages = grown
        self.free_pages[self.nfree:need] = pfns
        self.nfree = need

    def _pop_free(self) -> int:
        if self.nfree:
            self.nfree -= 1
            return int(self.free_pages[self.nfree])
        while self.free_ranges:
            r = self.free_ranges[-1]
            if r[1] > r[0]:
                r[1] -= 1
                return r[1]
            self.free_ranges.pop()
        return -1

    def free_count(self) -> int:
        """Pages on the free list."""
        return self.nfree + sum(hi - lo for lo, hi in self.free_ranges)

    def _remove_free_pages(self, lo: int, hi: int) -> None:
        """dmirror_remove_free_pages(): drop the free pages of ``[lo, hi)`` from the list."""
        keep = self.free_pages[:self.nfree]
        keep = keep[~((keep >= lo) & (keep < hi))]
        self.nfree = len(keep)
        self.free_pages[:self.nfree] = keep
        out = []
        for r in self.free_ranges:
            if r[1] <= lo or r[0] >= hi:
                out.append(r)
            else:
                if r[0] < lo:
                    out.append([r[0], lo])
                if r[1] > hi:
                    out.append([hi, r[1]])
        self.free_ranges = out

    def dmirror_allocate_chunk(self, want_page: bool) -> int:
        """dmirror_allocate_chunk(): a new 256 MiB chunk of device-private memory (``memremap_pages`` with
        owner = this device); its pages go on the free list.  With ``want_page`` the first page is taken
        (``*ppage``).  Returns the page (or 0 without ``want_page``), or -errno."""
        from hmmirror.mm.memremap import (
            MEMORY_DEVICE_PRIVATE,
            PAGES_PER_SECTION,
            devm_memremap_pages,
            new_dev_pagemap,
        )

        machine = self.machine
        n = len(self.devmem_chunks)
        pgmap = new_dev_pagemap(f"hmm_dmirror{self.id}.{n}", MEMORY_DEVICE_PRIVATE, DEVMEM_CHUNK_PAGES,
                                dev=self, ops=DmirrorDevmemOps(self), owner=self, align_pages=PAGES_PER_SECTION)
        ret = devm_memremap_pages(machine, pgmap)                 # request_free_mem_region + memremap_pages
        if ret:
            return ret
        chunk = DmirrorChunk(pgmap, self)
        self.devmem_chunks.append(chunk)
        assert pgmap.res is not None
        first, last = pgmap.res.start, pgmap.res.end
        # for each pfn: page->zone_device_data = free_pages; free_pages = page  (the last pfn ends on top)
        self.free_ranges.append([first, last])
        machine.log("dmirror_chunk", dev=self.id, chunk=n, start_pfn=first, end_pfn=last)
        if want_page:
            self.calloc += 1
            return self._pop_free()
        return 0

    def dmirror_devmem_alloc_page(self, dmirror: "Dmirror") -> int:
        """dmirror_devmem_alloc_page(): a system page to hold the data (BACKING_PAGE) and a free device page
        (a new chunk when none is left), initialised with ``zone_device_page_init`` (refcount 1, locked).
        Returns the device pfn, or -1."""
        from hmmirror.mm.memremap import zone_device_page_init

        machine = self.machine
        mem = machine.mem
        rpage = mem.alloc_page()                                  # alloc_page(GFP_HIGHUSER)
        if rpage < 0:
            return -1
        dpage = self._pop_free()
        if dpage >= 0:
            self.calloc += 1
        else:
            dpage = self.dmirror_allocate_chunk(True)
            if dpage <= 0:
                mem.put_page(rpage)                               # __free_page(rpage)
                return -1
        zone_device_page_init(machine, dpage)
        chunk = self.chunk_of(dpage)
        assert chunk is not None
        off = dpage - chunk.start
        chunk.pgmap.zone_device_data[off] = rpage                 # dpage->zone_device_data = rpage
        chunk.mirror_idx[off] = dmirror.index                     # rpage->zone_device_data = dmirror
        return dpage

    def backing_page(self, dpage: int) -> int:
        """BACKING_PAGE(): the system page holding a device-private page's bytes."""
        chunk = self.chunk_of(dpage)
        return -1 if chunk is None else int(chunk.pgmap.zone_device_data[dpage - chunk.start])

    def mirror_of(self, dpage: int) -> "Dmirror | None":
        """``rpage->zone_device_data``: the mirror that migrated the page."""
        chunk = self.chunk_of(dpage)
        if chunk is None:
            return None
        idx = int(chunk.mirror_idx[dpage - chunk.start])
        return self.mirrors[idx] if 0 <= idx < len(self.mirrors) else None

    def dmirror_devmem_free(self, pgmap: Any, page: int) -> None:
        """dmirror_devmem_free() (``page_free``): free the backing page; the device page goes back on the free
        list unless its chunk is being removed."""
        machine = self.machine
        chunk = self.chunk_of(page)
        assert chunk is not None
        off = page - chunk.start
        rpage = int(chunk.pgmap.zone_device_data[off])
        if rpage >= 0:
            machine.mem.put_page(rpage)                           # __free_page(rpage)
        chunk.pgmap.zone_device_data[off] = -1
        chunk.mirror_idx[off] = -1
        if not chunk.remove:
            self.cfree += 1
            self._push_free(np.array([page], dtype=np.int64))

    def dmirror_device_evict_chunk(self, chunk: "DmirrorChunk") -> Gen[None]:
        """dmirror_device_evict_chunk(): migrate every allocated page of the chunk back to system memory
        (``migrate_device_range``: the driver does not know where they are mapped)."""
        from hmmirror.mm import migrate_device as md
        from hmmirror.mm.folio import folio_lock

        machine = self.machine
        mem = machine.mem
        start, npages = chunk.start, chunk.npages
        src = np.zeros(npages, dtype=np.uint64)
        dst = np.zeros(npages, dtype=np.uint64)
        # only pages somebody references can be collected: skip the scan of free pages (refcount 0)
        yield from md.migrate_device_range(machine, src, start, npages)
        for i in np.flatnonzero(src & np.uint64(md.MIGRATE_PFN_MIGRATE)).tolist():
            spage = md.migrate_pfn_to_page(int(src[i]))
            if spage < 0:
                continue
            rpage = self.backing_page(spage)
            dpage = mem.alloc_page()                              # GFP_HIGHUSER_MOVABLE | __GFP_NOFAIL
            if dpage < 0:
                sched.report("oom", "dmirror_device_evict_chunk: __GFP_NOFAIL allocation failed")
                continue
            yield from folio_lock(mem, dpage)
            mem.copy(dpage, rpage)                                # copy_highpage(dpage, spage)
            dst[i] = md.migrate_pfn(dpage) | (int(src[i]) & md.MIGRATE_PFN_WRITE)
        yield from md.migrate_device_pages(machine, src, dst, npages)
        yield from md.migrate_device_finalize(machine, src, dst, npages)
        machine.log("dmirror_evict_chunk", dev=self.id, pgmap=chunk.pgmap.name,
                    migrated=int(((dst & np.uint64(md.MIGRATE_PFN_VALID)) != 0).sum()))

    def dmirror_device_remove_chunks(self) -> Gen[None]:
        """dmirror_device_remove_chunks() (HMM_DMIRROR_RELEASE): for every chunk, take its free pages off the
        free list, evict it, tear its pgmap down (``memunmap_pages`` waits for the last page reference)."""
        from hmmirror.mm.memremap import memunmap_pages

        yield from sched.mutex_lock(self.devmem_lock)
        try:
            for chunk in list(self.devmem_chunks):
                yield from sched.spin_lock(self.lock)
                chunk.remove = True
                self._remove_free_pages(chunk.start, chunk.start + chunk.npages)
                sched.spin_unlock(self.lock)
                yield from self.dmirror_device_evict_chunk(chunk)
                yield from memunmap_pages(self.machine, chunk.pgmap)
            self.devmem_chunks = []
            self.nfree = 0
            self.free_ranges = []
        finally:
            sched.mutex_unlock(self.devmem_lock)

    def open(self, map_flags: int = 0, writable: bool = True) -> Any:
        """``machine.open_file(path)``: not enough here — opening mirrors the *opener's* mm."""
        raise InputError(f"open {self.path}: use hmmirror.drivers.test_hmm.hmm_open(process, {self.id}) "
                         "(the device mirrors the mm of the process that opens it)")


class DmirrorChunk:
    """``struct dmirror_chunk``: a device-private pgmap of DEVMEM_CHUNK_SIZE, its device and ``remove``."""

    def __init__(self, pgmap: Any, mdevice: DmirrorDevice) -> None:
        self.pgmap = pgmap
        self.mdevice = mdevice
        self.remove = False
        self.start = pgmap.res.start
        self.npages = pgmap.res.npages
        self.mirror_idx = np.full(self.npages, -1, dtype=np.int32)

    def __repr__(self) -> str:
        return f"DmirrorChunk({self.pgmap.name} {self.pgmap.res}{' remove' if self.remove else ''})"


class DmirrorDevmemOps:
    """``dmirror_devmem_ops``: ``page_free`` = dmirror_devmem_free, ``migrate_to_ram`` = dmirror_devmem_fault."""

    def __init__(self, mdevice: DmirrorDevice) -> None:
        self.mdevice = mdevice

    def page_free(self, pgmap: Any, page: int) -> None:
        self.mdevice.dmirror_devmem_free(pgmap, page)

    def migrate_to_ram(self, vmf: Any) -> Gen[int]:
        dmirror = self.mdevice.mirror_of(vmf.page)
        if dmirror is None:
            sched.report("BUG_ON", f"migrate_to_ram: device page {vmf.page:#x} has no mirror")
            from hmmirror.include.mm_types import VM_FAULT
            return int(VM_FAULT.SIGBUS)
        return (yield from dmirror.dmirror_devmem_fault(vmf))


def hmm_dmirror_init(machine: "Machine") -> list[DmirrorDevice]:
    """hmm_dmirror_init(): load the module — devices 0 and 1 (device-private), registered under
    ``machine.devices["/dev/hmm_dmirrorN"]``; ``dmirror_device_init`` gives each its first chunk of
    device-private memory.  Idempotent.  Returns the devices."""
    devs = []
    for i in range(DMIRROR_NDEVICES):
        path = f"/dev/hmm_dmirror{i}"
        dev = machine.devices.get(path)
        if dev is None:
            dev = machine.devices[path] = DmirrorDevice(machine, i, HMM_DMIRROR_MEMORY_DEVICE_PRIVATE)
            dev.dmirror_allocate_chunk(False)                     # "Build a list of free ZONE_DEVICE pages"
        devs.append(dev)
    return devs


# --- the per-open mirror ---------------------------------------------------------------------------------
class Dmirror(IntervalNotifierDriver):
    """``struct dmirror``: the data attached to an open dmirror file (device, page table, notifier, mutex)."""

    name = "dmirror"

    def __init__(self, mdevice: DmirrorDevice, mm: "MMStruct") -> None:
        super().__init__(mm, f"dmirror{mdevice.id}[{mm.name}].mutex")
        self.mdevice = mdevice
        self.pt = DmirrorPageTable()
        self.index = len(mdevice.mirrors)
        mdevice.mirrors.append(self)
        self.flags = 0                                  # dmirror->flags (2026 driver, HMM_DMIRROR_FLAGS)

    # -- invalidate (the notifier callback) ---------------------------------------------------------------
    def invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> Gen[bool]:
        """dmirror_interval_invalidate(): drop the device entries of ``[start >> 12, end >> 12]``.

        The upper bound is inclusive (``xa_for_each_range(..., start >> PAGE_SHIFT, end >> PAGE_SHIFT)``), so
        the page at ``range.end`` is dropped too (hmm-modern.md §6.1).
        """
        # Device-private pages of this device: the migration handles its own invalidation.
        if r.event == MMU_NOTIFY.MIGRATE and r.owner is self.mdevice:
            self.machine.log("dmirror_invalidate", dev=self.mdevice.id, mm=self.mm.name, start=r.start, end=r.end,
                             event=r.event.name, owner=self.mdevice.path, skipped=True, ret=True)
            return True
        if mmu_notifier_range_blockable(r):
            yield from sched.mutex_lock(self.mutex)
        elif not sched.mutex_trylock(self.mutex):
            self.machine.log("dmirror_invalidate", dev=self.mdevice.id, mm=self.mm.name, start=r.start, end=r.end,
                             event=r.event.name, ret=False)
            return False
        mmu_interval_set_seq(sub, cur_seq)
        erased = self.dmirror_do_update(r.start, r.end)
        sched.mutex_unlock(self.mutex)
        self.machine.counters["dmirror_invalidate"] += 1
        self.machine.log("dmirror_invalidate", dev=self.mdevice.id, mm=self.mm.name, start=r.start, end=r.end,
                         event=r.event.name, erased=erased, ret=True)
        return True

    def dmirror_do_update(self, start: int, end: int) -> int:
        """dmirror_do_update(): the page table holds no page references, so clearing is enough."""
        return self.pt.erase_range(start >> PAGE_SHIFT, min(end >> PAGE_SHIFT, U64 >> PAGE_SHIFT))

    # -- populate (fault) -----------------------------------------------------------------------------------
    def program(self, range: HmmRange) -> int:   # noqa: A002 - kernel name
        """dmirror_do_fault(): store every page of the range, tagged WRITE when HMM_PFN_WRITE."""
        n = (range.end - range.start) >> PAGE_SHIFT
        pfns = range.hmm_pfns[:n]
        if ((pfns & np.uint64(HMM_PFN_ERROR)) != 0).any() or ((pfns & np.uint64(HMM_PFN_VALID)) == 0).any():
            # "Since we asked hmm_range_fault() to populate pages, it shouldn't return an error entry."
            self.machine.log("WARN_ON", what_failed="dmirror_do_fault: ERROR or !VALID entry after success",
                             start=range.start)
        writable = (pfns & np.uint64(HMM_PFN_WRITE)) != 0
        entries = ((pfns & np.uint64(~_HMM_FLAGS & U64)) << np.uint64(2)) | \
            np.where(writable, np.uint64(DPT_XA_TAG_WRITE), np.uint64(0))
        count = n
        ret = 0
        if range.default_flags & HMM_PFN_WRITE:
            bad = np.flatnonzero(~writable)
            if bad.size:                                 # WARN_ON(range->default_flags & HMM_PFN_WRITE)
                count = int(bad[0])
                self.machine.log("WARN_ON", what_failed="dmirror_do_fault: read-only entry for a write fault",
                                 addr=range.start + count * PAGE_SIZE)
                ret = -EFAULT
        if count:
            self.pt.store_range(range.start >> PAGE_SHIFT, entries[:count])
        return ret

    def populate(self, start: int, end: int, write: bool) -> Gen[int]:
        """dmirror_fault(): fault ``[start, end)`` in 64-page chunks; 0 if the mm is already gone.  Each chunk is
        one dmirror_range_fault() with its own timeout: the chunk's start is logged as ``device_fault_begin``
        (a new address of the fault is progress for the retry-bound check, I5)."""
        mm = self.mm
        if not mmget_not_zero(mm):
            return 0
        pfns = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        rng = HmmRange(self.notifier, start, start, pfns, pfn_flags_mask=0,
                       default_flags=HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0),
                       dev_private_owner=self.mdevice)
        ret = 0
        try:
            addr = start
            while addr < end:
                rng.start = addr
                rng.end = min(addr + (DMIRROR_CHUNK_PAGES << PAGE_SHIFT), end)
                self.machine.log("device_fault_begin", addr=addr)
                ret = yield from self.range_fault(rng)
                if ret:
                    break
                addr = rng.end
        finally:
            yield from mmput(mm)
        return ret

    dmirror_fault = populate

    # -- data movement ----------------------------------------------------------------------------------
    def _backing_pfn(self, pfn: int) -> int:
        """BACKING_PAGE(): a device-private page of a dmirror device is backed by a system page; every other
        page is itself."""
        mem = self.machine.mem
        if pfn < mem.nr_ram:
            return pfn
        for dev in self.machine.devices.values():
            if isinstance(dev, DmirrorDevice):
                b = dev.backing_page(pfn)
                if b >= 0:
                    return b
        return pfn

    def dmirror_do_read(self, start: int, end: int, bounce: "Bounce") -> int:
        """dmirror_do_read(): copy pages from the frames in ``pt``; -ENOENT at the first missing entry."""
        first = start >> PAGE_SHIFT
        n = (end >> PAGE_SHIFT) - first
        ents = self.pt.load_range(first, n)
        missing = np.flatnonzero(ents == 0)
        count = int(missing[0]) if missing.size else n
        mem = self.machine.mem
        page0 = (start - bounce.addr) >> PAGE_SHIFT
        for k in range(count):
            pfn = self._backing_pfn(int(ents[k]) >> 2)
            data = mem.contents.get(pfn)
            if data is not None:
                bounce.pages[page0 + k] = bytes(data)
            else:
                bounce.pages.pop(page0 + k, None)
        bounce.cpages += count
        return -ENOENT if missing.size else 0

    def dmirror_do_write(self, start: int, end: int, bounce: "Bounce") -> int:
        """dmirror_do_write(): copy pages into the frames of WRITE-tagged entries; read-only and ATOMIC
        entries count as missing (-ENOENT)."""
        first = start >> PAGE_SHIFT
        n = (end >> PAGE_SHIFT) - first
        ents = self.pt.load_range(first, n)
        bad = np.flatnonzero((ents == 0) | ((ents & np.uint64(3)) != np.uint64(DPT_XA_TAG_WRITE)))
        count = int(bad[0]) if bad.size else n
        mem = self.machine.mem
        page0 = (start - bounce.addr) >> PAGE_SHIFT
        for k in range(count):
            pfn = self._backing_pfn(int(ents[k]) >> 2)
            data = bounce.pages.get(page0 + k)
            if data is None:
                mem.clear(pfn)
            else:
                mem.write(pfn, 0, data)
        bounce.cpages += count
        return -ENOENT if bad.size else 0

    def dmirror_read(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_read(): read through the mirror, faulting the remainder until every page is present."""
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        bounce = bounce_init(self.machine, start, size)
        if bounce is None:
            return -ENOMEM
        while True:
            yield from sched.mutex_lock(self.mutex)
            ret = self.dmirror_do_read(start, end, bounce)
            sched.mutex_unlock(self.mutex)
            if ret != -ENOENT:
                break
            start = cmd.addr + (bounce.cpages << PAGE_SHIFT)
            ret = yield from self.populate(start, end, False)
            if ret:
                break
            cmd.faults += 1
        if ret == 0:
            if (yield from copy_to_user(caller, cmd.ptr, bounce.iter_bytes())):
                ret = -EFAULT
        cmd.cpages = bounce.cpages
        return ret

    def dmirror_write(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_write(): copy the caller's buffer in, then write through the mirror, faulting writable."""
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        bounce = bounce_init(self.machine, start, size)
        if bounce is None:
            return -ENOMEM
        data = yield from copy_from_user(caller, cmd.ptr, size)
        if data is None:
            ret = -EFAULT
        else:
            bounce.load(data)
            while True:
                yield from sched.mutex_lock(self.mutex)
                ret = self.dmirror_do_write(start, end, bounce)
                sched.mutex_unlock(self.mutex)
                if ret != -ENOENT:
                    break
                start = cmd.addr + (bounce.cpages << PAGE_SHIFT)
                ret = yield from self.populate(start, end, True)
                if ret:
                    break
                cmd.faults += 1
        cmd.cpages = bounce.cpages
        return ret

    # -- snapshot ---------------------------------------------------------------------------------------
    def dmirror_mkentry(self, entry: int) -> int:
        """dmirror_mkentry(): one HMM_DMIRROR_PROT_* byte for an hmm_range_fault output."""
        if entry & HMM_PFN_ERROR:
            return HMM_DMIRROR_PROT_ERROR
        if not entry & HMM_PFN_VALID:
            return HMM_DMIRROR_PROT_NONE
        pfn = hmm_pfn_to_pfn(entry)
        machine = self.machine
        pgmap = machine.pgmap_of(pfn) if pfn >= machine.mem.nr_ram else None
        ptype = getattr(getattr(pgmap, "type", None), "name", "")
        aliased = machine.profile.dmirror_tail_pgmap_aliases_head and ptype == "MEMORY_DEVICE_GENERIC" \
            and tail_pgmap_type(pgmap, pfn)
        if aliased:
            # the type read through the aliased pgmap; dmirror_page_to_device() of it is not this device
            perm = HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE if aliased == "MEMORY_DEVICE_PRIVATE" else \
                HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE if aliased == "MEMORY_DEVICE_COHERENT" else HMM_DMIRROR_PROT_NONE
        elif ptype == "MEMORY_DEVICE_PRIVATE":
            local = getattr(pgmap, "owner", None) is self.mdevice
            perm = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL if local else HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE
        elif ptype == "MEMORY_DEVICE_COHERENT":
            local = getattr(pgmap, "owner", None) is self.mdevice
            perm = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL if local else HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE
        elif machine.mem.is_zero_pfn(pfn):
            perm = HMM_DMIRROR_PROT_ZERO
        else:
            perm = HMM_DMIRROR_PROT_NONE
        perm |= HMM_DMIRROR_PROT_WRITE if entry & HMM_PFN_WRITE else HMM_DMIRROR_PROT_READ
        order = hmm_pfn_to_map_order(entry)
        if order + PAGE_SHIFT == PMD_SHIFT:
            perm |= HMM_DMIRROR_PROT_PMD
        elif order + PAGE_SHIFT == PUD_SHIFT:
            perm |= HMM_DMIRROR_PROT_PUD
        return perm

    def dmirror_range_snapshot(self, range: HmmRange, perm: bytearray) -> Gen[int]:   # noqa: A002
        """dmirror_range_snapshot(): a temporary notifier over the chunk, the §5 loop (-EBUSY after
        HMM_RANGE_DEFAULT_TIMEOUT, as dmirror_range_fault), then mkentry."""
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after

        mm = self.mm
        sub = MmuIntervalNotifier()
        range.notifier = sub
        timeout = jiffies(self.machine) + msecs_to_jiffies(DMIRROR_RANGE_FAULT_TIMEOUT)
        ret = yield from mmu_interval_notifier_insert(sub, mm, range.start, range.end - range.start,
                                                      _SnapshotOps(self))
        if ret:
            return ret
        passes = 0
        try:
            while True:
                if time_after(jiffies(self.machine), timeout) or passes > self.max_retries:
                    self.machine.counters["dmirror_timeouts"] += 1
                    return -EBUSY
                passes += 1
                range.notifier_seq = yield from mmu_interval_read_begin(sub)
                yield from sched.down_read(mm.mmap_sem)
                ret = yield from hmm_range_fault(range)
                sched.up_read(mm.mmap_sem)
                if ret:
                    if ret == -EBUSY:
                        continue
                    return ret
                yield from sched.mutex_lock(self.mutex)
                if mmu_interval_read_retry(sub, range.notifier_seq):
                    sched.mutex_unlock(self.mutex)
                    continue
                break
            n = (range.end - range.start) >> PAGE_SHIFT
            for i, e in enumerate(range.hmm_pfns[:n].tolist()):
                perm[i] = self.dmirror_mkentry(e)
            sched.mutex_unlock(self.mutex)
            return 0
        finally:
            yield from mmu_interval_notifier_remove(sub)

    def dmirror_snapshot(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_snapshot(): one protection byte per page, in 64-page chunks, copied to ``cmd.ptr``."""
        mm = self.mm
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        if not mmget_not_zero(mm):
            return -EINVAL
        pfns = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        perm = bytearray(DMIRROR_CHUNK_PAGES)
        rng = HmmRange(self.notifier, start, start, pfns, dev_private_owner=self.mdevice)
        uptr = cmd.ptr
        uoff = 0
        ret = 0
        try:
            addr = start
            while addr < end:
                nxt = min(addr + (DMIRROR_CHUNK_PAGES << PAGE_SHIFT), end)
                rng.start, rng.end = addr, nxt
                ret = yield from self.dmirror_range_snapshot(rng, perm)
                if ret:
                    break
                n = (nxt - addr) >> PAGE_SHIFT
                if (yield from copy_to_user(caller, _offset_ptr(uptr, uoff), [bytes(perm[:n])])):
                    ret = -EFAULT
                    break
                cmd.cpages += n
                uoff += n
                addr = nxt
        finally:
            yield from mmput(mm)
        return ret


    # -- migration (device-private memory) --------------------------------------------------------------------
    def _vma_windows(self, start: int, end: int) -> Iterator[tuple[Any, int, int]]:
        """The 64-page windows of dmirror_migrate_to_*(): each inside one VMA (``next = min(end, addr + 64
        pages, vma->vm_end)``); a window without a readable VMA yields ``(None, addr, addr)``."""
        mm = self.mm
        addr = start
        while addr < end:
            vma = mm.vma_lookup(addr)
            if vma is None or not vma.vm_flags & 0x1:          # VM_READ
                yield None, addr, addr
                return
            nxt = min(end, addr + (DMIRROR_CHUNK_PAGES << PAGE_SHIFT), vma.vm_end)
            yield vma, addr, nxt
            addr = nxt

    def dmirror_migrate_alloc_and_copy(self, args: Any) -> None:
        """dmirror_migrate_alloc_and_copy(): a device page for every page to migrate (device pages already
        are skipped, with a WARN), the data copied into its backing page (or cleared for an empty page); the
        destination is writable if the source was, or, for an empty page, if the VMA is."""
        from hmmirror.mm import migrate_device as md

        mdevice = self.mdevice
        mem = self.machine.mem
        for i in range((args.end - args.start) >> PAGE_SHIFT):
            s = int(args.src[i])
            if not s & md.MIGRATE_PFN_MIGRATE:
                continue
            spage = md.migrate_pfn_to_page(s)
            if spage >= 0 and md.folio_is_zone_device(mem, spage):
                self.machine.log("WARN_ON", what_failed=f"page already in device spage pfn: {spage:#x}")
                continue
            if self.flags & HMM_DMIRROR_FLAG_FAIL_ALLOC:
                self.flags &= ~HMM_DMIRROR_FLAG_FAIL_ALLOC      # the 2026 driver: one allocation fails
                dpage = -1
            else:
                dpage = mdevice.dmirror_devmem_alloc_page(self)
            if dpage < 0:
                continue
            rpage = mdevice.backing_page(dpage)
            if spage >= 0:
                mem.copy(rpage, spage)                              # copy_highpage(rpage, spage)
            else:
                mem.clear(rpage)                                    # clear_highpage(rpage)
            d = md.migrate_pfn(dpage)
            if s & md.MIGRATE_PFN_WRITE or (spage < 0 and args.vma.vm_flags & 0x2):   # VM_WRITE
                d |= md.MIGRATE_PFN_WRITE
            args.dst[i] = d

    def dmirror_migrate_finalize_and_map(self, args: Any) -> Gen[int]:
        """dmirror_migrate_finalize_and_map(): map every migrated page into the device page table (its
        backing page, tagged WRITE when the destination is writable), under the mirror's mutex."""
        from hmmirror.mm import migrate_device as md

        yield from sched.mutex_lock(self.mutex)
        first = args.start >> PAGE_SHIFT
        for i in range((args.end - args.start) >> PAGE_SHIFT):
            if not int(args.src[i]) & md.MIGRATE_PFN_MIGRATE:
                continue
            dpage = md.migrate_pfn_to_page(int(args.dst[i]))
            if dpage < 0:
                continue
            tag = DPT_XA_TAG_WRITE if int(args.dst[i]) & md.MIGRATE_PFN_WRITE else 0
            self.pt.store(first + i, self.mdevice.backing_page(dpage), tag)
        sched.mutex_unlock(self.mutex)
        return 0

    def dmirror_migrate_to_device(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_migrate_to_device() (HMM_DMIRROR_MIGRATE_TO_DEV): migrate the range in 64-page windows with
        MIGRATE_VMA_SELECT_SYSTEM, map the device pages, then read the range back through the device page
        table: ``cpages`` = pages read, -ENOENT at the first page not on the device.  -EINVAL where a window
        has no readable VMA."""
        from hmmirror.mm import migrate_device as md

        mm = self.mm
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        if not mmget_not_zero(mm):
            return -EINVAL
        src = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        dst = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        yield from sched.down_read(mm.mmap_sem)
        ret = 0
        try:
            for vma, addr, nxt in self._vma_windows(start, end):
                if vma is None:
                    ret = -EINVAL
                    break
                dst[:] = 0
                args = md.MigrateVma(vma, addr, nxt, src, dst, pgmap_owner=self.mdevice,
                                     flags=md.MIGRATE_VMA_SELECT_SYSTEM)
                ret = yield from md.migrate_vma_setup(args)
                if ret:
                    break
                self.dmirror_migrate_alloc_and_copy(args)
                yield from md.migrate_vma_pages(args)
                yield from self.dmirror_migrate_finalize_and_map(args)
                yield from md.migrate_vma_finalize(args)
        finally:
            sched.up_read(mm.mmap_sem)
            yield from mmput(mm)
        if ret:
            return ret
        # Return the migrated data for verification (only for pages in device memory).
        bounce = bounce_init(self.machine, start, size)
        if bounce is None:
            return -ENOMEM
        yield from sched.mutex_lock(self.mutex)
        ret = self.dmirror_do_read(start, end, bounce)
        sched.mutex_unlock(self.mutex)
        if ret == 0 and (yield from copy_to_user(caller, cmd.ptr, bounce.iter_bytes())):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
        return ret

    def dmirror_devmem_fault_alloc_and_copy(self, args: Any) -> int:
        """dmirror_devmem_fault_alloc_and_copy(): a system page for every device page to bring back; the device
        page table entry goes (``xa_erase``, without the mutex, as in the driver) and the backing page's bytes
        are copied.  Returns 0 (a failed allocation leaves the page on the device)."""
        from hmmirror.mm import migrate_device as md
        from hmmirror.mm.folio import folio_trylock

        mem = self.machine.mem
        for i in range((args.end - args.start) >> PAGE_SHIFT):
            s = int(args.src[i])
            spage = md.migrate_pfn_to_page(s)
            if spage < 0 or not s & md.MIGRATE_PFN_MIGRATE:
                continue
            if not md.is_device_private_page(self.machine, spage):
                self.machine.log("WARN_ON", what_failed=f"dmirror fault: {spage:#x} is not a device page")
                continue
            rpage = self.mdevice.backing_page(spage)
            dpage = mem.alloc_page()                                # alloc_page_vma(GFP_HIGHUSER_MOVABLE)
            if dpage < 0:
                continue
            folio_trylock(mem, dpage)                               # lock_page() of a page nobody else has
            addr = args.start + i * PAGE_SIZE
            self.pt.erase_range(addr >> PAGE_SHIFT, addr >> PAGE_SHIFT)
            mem.copy(dpage, rpage)                                  # copy_highpage(dpage, BACKING_PAGE(spage))
            args.dst[i] = md.migrate_pfn(dpage) | (s & md.MIGRATE_PFN_WRITE)
        return 0

    def dmirror_devmem_fault(self, vmf: Any) -> Gen[int]:
        """dmirror_devmem_fault() (``migrate_to_ram``): migrate the faulting page (``args.fault_page =
        vmf->page``) back to system memory; VM_FAULT_SIGBUS if migrate_vma_setup refuses."""
        from hmmirror.include.mm_types import VM_FAULT
        from hmmirror.mm import migrate_device as md

        self.machine.counters["dmirror_devmem_fault"] += 1
        args = md.MigrateVma(vmf.vma, vmf.address, vmf.address + PAGE_SIZE,
                             np.zeros(1, dtype=np.uint64), np.zeros(1, dtype=np.uint64),
                             pgmap_owner=self.mdevice, flags=md.MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                             fault_page=vmf.page)
        if (yield from md.migrate_vma_setup(args)):
            return int(VM_FAULT.SIGBUS)
        ret = self.dmirror_devmem_fault_alloc_and_copy(args)
        if ret:
            return ret
        yield from md.migrate_vma_pages(args)
        # No device finalize step: dmirror_devmem_fault_alloc_and_copy() already cleared the device entry.
        yield from md.migrate_vma_finalize(args)
        return 0

    def dmirror_migrate_to_system(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_migrate_to_system() (HMM_DMIRROR_MIGRATE_TO_SYS): migrate this device's pages of the range
        back, in 64-page windows; ``cpages`` = pages migrated.  -EINVAL where a window has no readable VMA."""
        from hmmirror.mm import migrate_device as md

        mm = self.mm
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        if not mmget_not_zero(mm):
            return -EINVAL
        cmd.cpages = 0
        src = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        dst = np.zeros(DMIRROR_CHUNK_PAGES, dtype=np.uint64)
        yield from sched.down_read(mm.mmap_sem)
        ret = 0
        try:
            for vma, addr, nxt in self._vma_windows(start, end):
                if vma is None:
                    ret = -EINVAL
                    break
                dst[:] = 0
                args = md.MigrateVma(vma, addr, nxt, src, dst, pgmap_owner=self.mdevice,
                                     flags=md.MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
                ret = yield from md.migrate_vma_setup(args)
                if ret:
                    break
                self.dmirror_devmem_fault_alloc_and_copy(args)
                yield from md.migrate_vma_pages(args)
                n = args.npages
                ok = (args.src[:n] & np.uint64(md.MIGRATE_PFN_VALID | md.MIGRATE_PFN_MIGRATE)) ==                     np.uint64(md.MIGRATE_PFN_VALID | md.MIGRATE_PFN_MIGRATE)
                cmd.cpages += int(ok.sum())                         # dmirror_successful_migrated_pages()
                yield from md.migrate_vma_finalize(args)
        finally:
            sched.up_read(mm.mmap_sem)
            yield from mmput(mm)
        return ret

    # -- device-exclusive access ------------------------------------------------------------------------------
    def dmirror_check_atomic(self, start: int, end: int) -> int:
        """dmirror_check_atomic() (HMM_DMIRROR_CHECK_EXCLUSIVE): -EPERM if the device still holds an ATOMIC
        (exclusive) entry in ``[start, end)``."""
        ents = self.pt.load_range(start >> PAGE_SHIFT, (end >> PAGE_SHIFT) - (start >> PAGE_SHIFT))
        atomic = (ents != 0) & ((ents & np.uint64(3)) == np.uint64(DPT_XA_TAG_ATOMIC))
        return -EPERM if atomic.any() else 0

    def dmirror_atomic_map(self, addr: int, page: int) -> Gen[int]:
        """dmirror_atomic_map() [6.15+]: store one page tagged ATOMIC, under the mutex.  Returns 0."""
        yield from sched.mutex_lock(self.mutex)
        self.pt.store(addr >> PAGE_SHIFT, page, DPT_XA_TAG_ATOMIC)
        sched.mutex_unlock(self.mutex)
        return 0

    def dmirror_exclusive(self, cmd: HmmDmirrorCmd, caller: "MMStruct") -> Gen[int]:
        """dmirror_exclusive() (HMM_DMIRROR_EXCLUSIVE): take every page of the range exclusive for the device
        and map it ATOMIC; then read the range back through the device page table (``cpages``).

        [6.15+] one ``make_device_exclusive(mm, addr, NULL, &folio)`` per page, stopping at the first error
        (returned); [6.12] ``make_device_exclusive_range`` per 64 pages, -EBUSY unless every page was marked.
        """
        from hmmirror.mm.folio import folio_unlock
        from hmmirror.mm.rmap import make_device_exclusive, make_device_exclusive_range

        mm = self.mm
        mem = self.machine.mem
        size = (cmd.npages << PAGE_SHIFT) & U64
        start = cmd.addr
        end = start + size
        if end > U64:
            return -EINVAL
        if not mmget_not_zero(mm):
            return -EINVAL
        yield from sched.down_read(mm.mmap_sem)
        ret = 0
        try:
            if self.machine.profile.make_device_exclusive_single:
                addr = start
                while not ret and addr < end:
                    page, folio = yield from make_device_exclusive(mm, addr, None)
                    if page < 0:
                        ret = page
                        break
                    ret = yield from self.dmirror_atomic_map(addr, page)
                    folio_unlock(mem, folio)
                    mem.put_page(folio)
                    addr += PAGE_SIZE
            else:
                addr = start
                while addr < end:
                    nxt = min(end, addr + (DMIRROR_CHUNK_PAGES << PAGE_SHIFT))
                    pages = yield from make_device_exclusive_range(mm, addr, nxt, None)
                    mapped = 0
                    if not isinstance(pages, int) and len(pages) == (nxt - addr) >> PAGE_SHIFT:
                        yield from sched.mutex_lock(self.mutex)
                        for i, pg in enumerate(pages):
                            if pg >= 0:
                                self.pt.store((addr >> PAGE_SHIFT) + i, pg, DPT_XA_TAG_ATOMIC)
                                mapped += 1
                        sched.mutex_unlock(self.mutex)
                    if not isinstance(pages, int):
                        for pg in pages:
                            if pg >= 0:
                                folio_unlock(mem, pg)
                                mem.put_page(pg)
                    if addr + (mapped << PAGE_SHIFT) < nxt:
                        ret = -EBUSY
                        break
                    addr = nxt
        finally:
            sched.up_read(mm.mmap_sem)
            yield from mmput(mm)
        if ret:
            return ret
        bounce = bounce_init(self.machine, start, size)
        if bounce is None:
            return -ENOMEM
        yield from sched.mutex_lock(self.mutex)
        ret = self.dmirror_do_read(start, end, bounce)
        sched.mutex_unlock(self.mutex)
        if ret == 0 and (yield from copy_to_user(caller, cmd.ptr, bounce.iter_bytes())):
            ret = -EFAULT
        cmd.cpages = bounce.cpages
        return ret


def tail_pgmap_type(pgmap: Any, pfn: int) -> str | None:
    """The memory type a 6.12 ``is_device_*_page()`` reads for a tail page of a compound device-dax folio (ours).

    ``page->pgmap`` shares its word with ``compound_head`` (head | 1), so ``pgmap->type`` (byte 96 of
    ``struct dev_pagemap``) is read at byte 97 of the head page, i.e. bytes 33..36 of the first tail page:
    ``_folio_nr_pages >> 8`` (device-dax folios have ``vmemmap_shift = order_base_2(align >> PAGE_SHIFT)``,
    drivers/dax/device.c).  None for a head page or a device without compound folios; the name of the
    ``enum memory_type`` value otherwise ("" when it names no device type dmirror tests for).
    """
    align = getattr(getattr(pgmap, "dev", None), "align", PAGE_SIZE)
    shift = (align >> PAGE_SHIFT).bit_length() - 1 if align > PAGE_SIZE else 0
    res = getattr(pgmap, "res", None)
    if not shift or res is None or (pfn - res.start) % (1 << shift) == 0:
        return None
    value = (1 << shift) >> 8
    return {1: "MEMORY_DEVICE_PRIVATE", 2: "MEMORY_DEVICE_COHERENT"}.get(value, "")


class _SnapshotOps(MmuIntervalNotifierOps):
    """dmirror_mrn_ops: the temporary snapshot notifier only bumps the sequence (under the mutex)."""

    def __init__(self, dmirror: Dmirror) -> None:
        self.dmirror = dmirror

    def invalidate(self, sub: MmuIntervalNotifier, r: MmuNotifierRange, cur_seq: int) -> Gen[bool]:
        """dmirror_snapshot_invalidate()."""
        d = self.dmirror
        if mmu_notifier_range_blockable(r):
            yield from sched.mutex_lock(d.mutex)
        elif not sched.mutex_trylock(d.mutex):
            return False
        mmu_interval_set_seq(sub, cur_seq)
        sched.mutex_unlock(d.mutex)
        return True


_HMM_FLAGS = U64 & ~((1 << 53) - 1)


# --- user memory, bounce buffers, mm references ------------------------------------------------------------
class Bounce:
    """``struct dmirror_bounce``: ``addr``, ``size``, ``cpages`` and the data, sparse by page."""

    __slots__ = ("addr", "size", "cpages", "pages")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.cpages = 0
        self.pages: dict[int, bytes] = {}

    def load(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        zero = bytes(PAGE_SIZE)
        for k in range(self.size >> PAGE_SHIFT):
            chunk = bytes(mv[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
            if chunk != zero:
                self.pages[k] = chunk

    def iter_bytes(self) -> Iterator[bytes]:
        zero = bytes(PAGE_SIZE)
        for k in range(self.size >> PAGE_SHIFT):
            yield self.pages.get(k, zero)


def bounce_init(machine: "Machine", addr: int, size: int) -> Bounce | None:
    """dmirror_bounce_init(): vmalloc(size) — None (-ENOMEM) when it exceeds the machine's RAM."""
    if size > machine.mem.nr_ram * PAGE_SIZE:
        return None
    return Bounce(addr, size)


def _offset_ptr(ptr: Any, off: int) -> Any:
    if ptr is None:
        return None
    if isinstance(ptr, int):
        return ptr + off
    return memoryview(ptr).cast("B")[off:] if off else ptr


def copy_to_user(caller: "MMStruct", dst: Any, chunks: Any) -> Gen[int]:
    """copy_to_user(): 0 on success, else the number of bytes not copied.

    ``dst`` is a Python buffer (written in place), a user address of ``caller`` (CPU stores that may
    fault), or None (a bad pointer).
    """
    data = b"".join(chunks) if not isinstance(chunks, (bytes, bytearray)) else bytes(chunks)
    if dst is None:
        return len(data)
    if isinstance(dst, int):
        from hmmirror.arch.x86.fault import cpu_access
        off = 0
        while off < len(data):
            a = dst + off
            n = min(len(data) - off, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            if a < 0 or a + n > caller.machine.geo.task_size:
                return len(data) - off
            sig = yield from cpu_access(caller, a, True, data[off:off + n])
            if sig:
                return len(data) - off
            off += n
        return 0
    mv = memoryview(dst).cast("B") if not isinstance(dst, np.ndarray) else memoryview(dst.view(np.uint8).reshape(-1))
    if mv.readonly:
        return len(data)
    n = min(len(mv), len(data))
    mv[:n] = data[:n]
    return len(data) - n


def copy_from_user(caller: "MMStruct", src: Any, size: int) -> Gen[bytes | None]:
    """copy_from_user(): the bytes, or None when any part cannot be read (a bad pointer or a fault)."""
    if src is None:
        return None
    if isinstance(src, int):
        from hmmirror.arch.x86.fault import cpu_read
        out = bytearray()
        while len(out) < size:
            a = src + len(out)
            n = min(size - len(out), PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            if a < 0 or a + n > caller.machine.geo.task_size:
                return None
            got = yield from cpu_read(caller, a, n)
            if isinstance(got, int):
                return None
            out += got
        return bytes(out)
    mv = memoryview(src).cast("B") if not isinstance(src, np.ndarray) else memoryview(src.view(np.uint8).reshape(-1))
    if len(mv) < size:
        return None
    return bytes(mv[:size])


def mmget_not_zero(mm: "MMStruct") -> bool:
    """mmget_not_zero(): take an mm_users reference unless the address space is already gone."""
    if mm.mm_users <= 0 or mm.exited:
        return False
    mm.mm_users += 1
    return True


def mmput(mm: "MMStruct") -> Gen[None]:
    """mmput(): drop an mm_users reference (kernel/fork.py's, which tears the mm down at zero, when present)."""
    try:
        from hmmirror.kernel.fork import mmput as _mmput
    except ImportError:
        _mmput = None
    if _mmput is not None:
        yield from _mmput(mm)
        return
    mm.mm_users -= 1


# --- the file: open, ioctl, mmap, release ----------------------------------------------------------------
class DmirrorVmOps(VmOps):
    """The VMA of an mmap'ed dmirror file: no fault handler (every page is inserted at mmap time)."""

    name = "dmirror"


DMIRROR_VM_OPS = DmirrorVmOps()


class DmirrorFile:
    """An open ``/dev/hmm_dmirrorN`` (``struct file`` with ``private_data`` = :class:`Dmirror`).

    Model entry points are generators (``fops_unlocked_ioctl``, ``fops_release``); the Python face runs them
    sequentially in the opener's task: :meth:`ioctl` (kernel-style int result), :meth:`read`,
    :meth:`write`, :meth:`snapshot` (raise :class:`~hmmirror.errors.KernelError`), :meth:`close`.
    """

    readable = True
    writable = True
    mmap_align = PAGE_SIZE

    def __init__(self, device: DmirrorDevice, dmirror: Dmirror) -> None:
        self.device = device
        self.private_data: Dmirror | None = dmirror
        self.opener = dmirror.mm

    @property
    def dmirror(self) -> Dmirror:
        if self.private_data is None:
            raise InputError(f"{self.device.path}: file is closed", "EBADF")
        return self.private_data

    def __repr__(self) -> str:
        return f"DmirrorFile({self.device.path}, mm={self.opener.name})"

    # -- file_operations --------------------------------------------------------------------------------
    def fops_unlocked_ioctl(self, command: int, arg: Any, caller: "MMStruct | None" = None) -> Gen[int]:
        """dmirror_fops_unlocked_ioctl(): entry checks, dispatch, copy the command back on success only."""
        dmirror = self.private_data
        caller = caller or self.opener
        if dmirror is None:
            return -EINVAL
        cmd = yield from _read_cmd(caller, arg)
        if cmd is None:
            return -EFAULT
        if cmd.addr & ~PAGE_MASK & U64:
            return -EINVAL
        if cmd.addr >= (cmd.addr + (cmd.npages << PAGE_SHIFT)) & U64:
            return -EINVAL
        cmd.cpages = 0
        cmd.faults = 0
        machine = dmirror.machine
        name = COMMAND_NAMES.get(command)
        if command == HMM_DMIRROR_READ:
            ret = yield from dmirror.dmirror_read(cmd, caller)
        elif command == HMM_DMIRROR_WRITE:
            ret = yield from dmirror.dmirror_write(cmd, caller)
        elif command == HMM_DMIRROR_SNAPSHOT:
            ret = yield from dmirror.dmirror_snapshot(cmd, caller)
        elif command == HMM_DMIRROR_MIGRATE_TO_DEV:
            ret = yield from dmirror.dmirror_migrate_to_device(cmd, caller)
        elif command == HMM_DMIRROR_MIGRATE_TO_SYS:
            ret = yield from dmirror.dmirror_migrate_to_system(cmd, caller)
        elif command == HMM_DMIRROR_EXCLUSIVE:
            ret = yield from dmirror.dmirror_exclusive(cmd, caller)
        elif command == HMM_DMIRROR_CHECK_EXCLUSIVE:
            ret = dmirror.dmirror_check_atomic(cmd.addr, cmd.addr + (cmd.npages << PAGE_SHIFT))
        elif command == HMM_DMIRROR_RELEASE:
            yield from dmirror.mdevice.dmirror_device_remove_chunks()
            ret = 0
        elif command == HMM_DMIRROR_FLAGS and machine.profile.dmirror_flags_ioctl:
            dmirror.flags = cmd.npages                           # dmirror->flags = cmd.npages
            ret = 0
        else:
            return -EINVAL
        machine.counters[f"dmirror_{(name or 'unknown').lower()}"] += 1
        machine.log("dmirror_ioctl", dev=self.device.id, mm=dmirror.mm.name, cmd=name, addr=cmd.addr,
                    npages=cmd.npages, ret=ret, cpages=cmd.cpages, faults=cmd.faults)
        if ret:
            return ret
        if (yield from _write_cmd(caller, arg, cmd)):
            return -EFAULT
        return 0

    def mmap(self, vma: "VMA") -> int:
        """dmirror_fops_mmap(): a zeroed page per address, inserted with vm_insert_page (VM_MIXEDMAP).

        ``f_op->mmap`` is a plain call in the model (the VMA is not visible yet, nobody can race), so the
        ``vm_insert_page`` generator is driven to completion here.
        """
        from hmmirror.mm.memory import vm_insert_page

        machine = vma.vm_mm.machine
        vma.vm_ops = DMIRROR_VM_OPS
        for addr in range(vma.vm_start, vma.vm_end, PAGE_SIZE):
            pfn = machine.mem.alloc_page()
            if pfn < 0:
                return -ENOMEM
            ret = sched.run(vm_insert_page(vma, addr, pfn))
            machine.mem.put_page(pfn)
            if ret:
                return int(ret)
        return 0

    def fops_release(self) -> Gen[int]:
        """dmirror_fops_release(): remove the notifier, destroy the page table."""
        dmirror = self.private_data
        if dmirror is None:
            return 0
        yield from mmu_interval_notifier_remove(dmirror.notifier)
        if dmirror.machine.profile.dmirror_release_evicts:
            mdevice = dmirror.mdevice
            for chunk in list(mdevice.devmem_chunks):
                yield from mdevice.dmirror_device_evict_chunk(chunk)
        dmirror.pt.destroy()
        self.private_data = None
        if self in self.device.open_files:
            self.device.open_files.remove(self)
        dmirror.machine.log("dmirror_release", dev=self.device.id, mm=dmirror.mm.name)
        return 0

    # -- the Python face ------------------------------------------------------------------------------
    def _task(self, caller: "MMStruct | None") -> sched.Task:
        return (caller or self.opener).task

    def ioctl(self, command: int | str, arg: Any, caller: "MMStruct | None" = None) -> int:
        """ioctl(2), run sequentially: 0 or a negative errno (the kernel convention, as hmm-tests sees it)."""
        if isinstance(command, str):
            try:
                command = COMMANDS[command.upper()]
            except KeyError:
                raise InputError(f"unknown dmirror command {command!r} (use {', '.join(COMMANDS)})") from None
        ret: int = sched.run(self.fops_unlocked_ioctl(command, arg, caller), self._task(caller))
        return ret

    def _checked(self, command: str, cmd: HmmDmirrorCmd, caller: "MMStruct | None") -> HmmDmirrorCmd:
        ret = self.ioctl(command, cmd, caller)
        if ret:
            raise KernelError(-ret, f"dmirror {command} at {cmd.addr:#x} ({cmd.npages} pages)")
        return cmd

    def read(self, addr: int, npages: int, caller: "MMStruct | None" = None) -> tuple[HmmDmirrorCmd, bytes]:
        """HMM_DMIRROR_READ into a new buffer: (the command with cpages/faults, the bytes read)."""
        buf = bytearray(npages * PAGE_SIZE)
        cmd = self._checked("READ", HmmDmirrorCmd(addr, buf, npages), caller)
        return cmd, bytes(buf)

    def write(self, addr: int, data: bytes, caller: "MMStruct | None" = None) -> HmmDmirrorCmd:
        """HMM_DMIRROR_WRITE of ``data`` (a whole number of pages)."""
        if len(data) % PAGE_SIZE:
            raise InputError("dmirror write: data must be a whole number of pages")
        return self._checked("WRITE", HmmDmirrorCmd(addr, bytearray(data), len(data) // PAGE_SIZE), caller)

    def snapshot(self, addr: int, npages: int, caller: "MMStruct | None" = None) -> bytes:
        """HMM_DMIRROR_SNAPSHOT: one HMM_DMIRROR_PROT_* byte per page."""
        buf = bytearray(npages)
        self._checked("SNAPSHOT", HmmDmirrorCmd(addr, buf, npages), caller)
        return bytes(buf)

    def close(self) -> None:
        """close(2): the last reference to the file goes (release)."""
        sched.run(self.fops_release(), self.opener.task)

    def pt_entries(self) -> list[tuple[int, int, str]]:
        """The device page table as (virtual address, pfn, "r"/"w"/"atomic") triples (inspection)."""
        tags = {0: "r", DPT_XA_TAG_WRITE: "w", DPT_XA_TAG_ATOMIC: "atomic"}
        return [(i << PAGE_SHIFT, pfn, tags.get(tag, str(tag))) for i, pfn, tag in self.dmirror.pt.items()]


def _read_cmd(caller: "MMStruct", arg: Any) -> Gen[HmmDmirrorCmd | None]:
    """copy_from_user(&cmd, uarg, sizeof(cmd))."""
    if isinstance(arg, HmmDmirrorCmd):
        return HmmDmirrorCmd(arg.addr & U64, arg.ptr, arg.npages & U64, arg.cpages, arg.faults)
    if isinstance(arg, int):
        raw = yield from copy_from_user(caller, arg, CMD_STRUCT.size)
        if raw is None:
            return None
        addr, ptr, npages, cpages, faults = CMD_STRUCT.unpack(raw)
        return HmmDmirrorCmd(addr, ptr, npages, cpages, faults)
    return None


def _write_cmd(caller: "MMStruct", arg: Any, cmd: HmmDmirrorCmd) -> Gen[int]:
    """copy_to_user(uarg, &cmd, sizeof(cmd)): nonzero on failure."""
    if isinstance(arg, HmmDmirrorCmd):
        arg.cpages, arg.faults = cmd.cpages, cmd.faults
        return 0
    ptr = cmd.ptr if isinstance(cmd.ptr, int) else 0
    raw = CMD_STRUCT.pack(cmd.addr, ptr & U64, cmd.npages, cmd.cpages & U64, cmd.faults & U64)
    return (yield from copy_to_user(caller, arg, raw))


def dmirror_fops_open(device: DmirrorDevice, mm: "MMStruct") -> Gen[DmirrorFile | int]:
    """dmirror_fops_open(): a new mirror of the opener's mm (interval notifier over all of it)."""
    if not mm.machine.profile.interval_notifiers:
        return -ENOENT                     # no test_hmm module in a kernel without interval notifiers
    dmirror = Dmirror(device, mm)
    ret = yield from mmu_interval_notifier_insert(dmirror.notifier, mm, 0, ULONG_MAX & PAGE_MASK,
                                                  dmirror.notifier_ops)
    if ret:
        return ret
    f = DmirrorFile(device, dmirror)
    device.open_files.append(f)
    mm.machine.log("dmirror_open", dev=device.id, mm=mm.name)
    return f


def hmm_open(proc: Any, unit: int = 0) -> DmirrorFile:
    """open("/dev/hmm_dmirror<unit>", O_RDWR) by a process (or an mm): the Python face of the device.

    Raises :class:`~hmmirror.errors.KernelError` (ENOENT when the profile has no interval notifiers).
    """
    mm = getattr(proc, "mm", proc)
    machine = mm.machine
    if unit not in range(DMIRROR_NDEVICES):
        raise InputError(f"no device /dev/hmm_dmirror{unit} (device-private units are 0 and 1)", "ENOENT")
    if mm.exited:
        raise InputError(f"process {mm.name} has exited", "ESRCH")
    devs = hmm_dmirror_init(machine) if machine.profile.interval_notifiers else None
    if devs is None:
        raise KernelError("ENOENT", f"/dev/hmm_dmirror{unit}: kernel {machine.profile.name} has no test_hmm "
                                    "(mmu_interval_notifier appeared in 5.5)")
    ret = sched.run(dmirror_fops_open(devs[unit], mm), mm.task)
    if isinstance(ret, int):
        raise KernelError(-ret, f"open /dev/hmm_dmirror{unit}")
    return ret


__all__ = [
    "COMMANDS", "DMIRROR_RANGE_FAULT_RETRIES", "DPT_XA_TAG_ATOMIC", "DPT_XA_TAG_WRITE", "DmirrorPageTable",
    "Dmirror", "DmirrorDevice", "DmirrorFile", "HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL",
    "HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE", "HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL",
    "HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE", "HMM_DMIRROR_PROT_ERROR", "HMM_DMIRROR_PROT_NONE",
    "HMM_DMIRROR_PROT_PMD", "HMM_DMIRROR_PROT_PUD", "HMM_DMIRROR_PROT_READ", "HMM_DMIRROR_PROT_WRITE",
    "HMM_DMIRROR_PROT_ZERO", "HMM_DMIRROR_READ", "HMM_DMIRROR_SNAPSHOT", "HMM_DMIRROR_WRITE", "HmmDmirrorCmd",
    "IntervalNotifierDriver", "dmirror_fops_open", "hmm_dmirror_init", "hmm_open",
]
