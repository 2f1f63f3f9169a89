"""The machine: RAM, page-table storage, devices, filesystems, processes and the event log.

``Machine`` is the root of the model; every kernel object reaches it through ``mm.machine``.  The kernel
profile (:mod:`hmmirror.profiles`) is chosen here, once, and all per-version behaviour is read from it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from hmmirror.arch.x86.pgtable import Geometry, SwpEntry
from hmmirror.errors import InputError
from hmmirror.include.mm_types import FAULT_FLAG, VM_FAULT
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.mm_struct import MMStruct
from hmmirror.mm.page_alloc import PhysMem
from hmmirror.mm.pgtable import TablePool
from hmmirror.profiles import KernelProfile, get_profile

THP_MODES = ("always", "madvise", "never")


@dataclass
class ThpSettings:
    """/sys/kernel/mm/transparent_hugepage (defaults: the probe machine's)."""

    enabled: str = "madvise"
    defrag: str = "madvise"
    use_zero_page: bool = True
    shmem_enabled: str = "never"

    def __post_init__(self) -> None:
        if self.enabled not in THP_MODES:
            raise InputError(f"thp.enabled must be one of {', '.join(THP_MODES)}, not {self.enabled!r}")


@dataclass
class Swap:
    """A swap device (optional; the probe machine has none): slot -> page contents."""

    slots: dict[int, bytes | None] = field(default_factory=dict)
    next_slot: int = 1
    swap_map: dict[int, int] = field(default_factory=dict)   # slot -> entries referring to it (swap_map[])

    def release_entry(self, e: SwpEntry) -> None:
        """free_swap_and_cache() for a zapped swap entry (non-swap entries hold no slot)."""
        from hmmirror.arch.x86.pgtable import non_swap_entry

        if not non_swap_entry(e):
            left = self.swap_map.get(e.offset, 1) - 1
            if left > 0:
                self.swap_map[e.offset] = left
            else:
                self.swap_map.pop(e.offset, None)
                self.slots.pop(e.offset, None)

    def swap_duplicate(self, e: SwpEntry) -> None:
        """swap_duplicate(): one more entry (a forked PTE) refers to the slot."""
        self.swap_map[e.offset] = self.swap_map.get(e.offset, 1) + 1

    def swapin(self, vmf: Any, e: SwpEntry) -> Gen[int]:
        """do_swap_page() body: read the slot into a new anonymous page."""
        from hmmirror.mm.swap import swapin
        return (yield from swapin(vmf, e))


class Machine:
    """A modelled x86-64 machine running one kernel profile."""

    def __init__(
        self,
        kernel: str | KernelProfile = "6.18",
        ram: int = 1 << 30,
        paging: int = 4,
        hugepages_2m: int = 0,
        hugepages_1g: int = 0,
        thp: ThpSettings | None = None,
    ) -> None:
        if paging not in (4, 5):
            raise InputError(f"paging must be 4 or 5 levels, not {paging}")
        self.profile = kernel if isinstance(kernel, KernelProfile) else get_profile(kernel)
        self.geo = Geometry(paging)
        try:
            self.mem = PhysMem(ram, hugepages_2m, hugepages_1g)
        except ValueError as exc:
            raise InputError(str(exc), "ENOMEM") from None
        self.pool = TablePool()
        self.thp = thp or ThpSettings()
        self.swap = Swap()
        self.events: list[dict[str, Any]] = []
        self.logging = True
        self.counters: Counter[str] = Counter()
        #: device pages on which a CPU fault (do_swap_page) holds a reference across migrate_to_ram: page -> faults
        self.swap_fault_pages: Counter[int] = Counter()
        self.mms: dict[str, MMStruct] = {}
        self.devices: dict[str, Any] = {}      # pmem devices by name, device-dax by /dev path
        self.mounts: dict[str, Any] = {}       # mount point -> filesystem
        self.files: dict[str, Any] = {}        # path -> inode
        self.pgmaps: list[Any] = []            # dev_pagemap objects (memremap.py)
        self.fault_hooks: list[Callable[[Any, int, FAULT_FLAG], None]] = []
        self.jiffies = 0                       # virtual time (kernel/time.py): one tick per simulator step
        self.workqueues: list[Any] = []        # kernel/workqueue.py: every workqueue allocated on the machine
        self.wq_hooks: list[Callable[[Any], None]] = []   # called with a workqueue when work is queued on it
        # mm/vma.c's global mm_all_locks_mutex: one mm_take_all_locks() at a time (mm/mmu_notifier.py)
        self.mm_all_locks_mutex = Lock("mm_all_locks_mutex", "mutex")

    # -- processes -----------------------------------------------------------------------------------------
    def new_mm(self, name: str) -> MMStruct:
        """A new process address space (mm_alloc)."""
        if name in self.mms:
            raise InputError(f"a process named {name!r} already exists")
        mm = MMStruct(self, name)
        self.mms[name] = mm
        return mm

    # -- devices and filesystems (implemented in drivers/ and fs/) -------------------------------------------
    def add_pmem(self, name: str, size: int, mode: str = "fsdax", align: int = 2 << 20) -> Any:
        """Add a pmem device (``mode`` "fsdax" or "devdax"; device-dax appears as /dev/daxN.0)."""
        from hmmirror.drivers.nvdimm.pmem import add_pmem
        return add_pmem(self, name, size, mode, align)

    def mount(self, path: str, fstype: str, dax: str | None = None, huge: str = "never",
              pagesize: int | None = None) -> Any:
        """Mount a filesystem (ext4, xfs, tmpfs, hugetlbfs; ``dax`` names an fsdax pmem device)."""
        from hmmirror.fs.super import mount
        return mount(self, path, fstype, dax=dax, huge=huge, pagesize=pagesize)

    def create_file(self, path: str, size: int, content: str = "data", cached: bool = True) -> Any:
        """Create a file under a mount ("data": every page written; "sparse": a hole; "zero": fallocated)."""
        from hmmirror.fs.super import create_file
        return create_file(self, path, size, content, cached)

    def open_file(self, path: str, map_flags: int = 0, writable: bool = True) -> Any:
        """open(2) of a file or device path; returns a File whose ``mmap(vma)`` sets the VMA up."""
        from hmmirror.fs.super import open_file
        return open_file(self, path, map_flags, writable)

    def truncate(self, path: str, size: int) -> int:
        """truncate(2): change a file's size (shrinking unmaps the tail from every mapping)."""
        from hmmirror.fs.super import truncate
        return truncate(self, path, size)

    # -- observability -------------------------------------------------------------------------------------
    def log(self, what: str, **fields: Any) -> None:
        """Append an event (HMM calls, notifier callbacks, operations) to the machine's log."""
        if self.logging:
            fields["what"] = what
            self.events.append(fields)

    def fault_hook(self, vma: Any, address: int, flags: FAULT_FLAG) -> None:
        """Called at every handle_mm_fault entry (observers: lock context checks, counters)."""
        for hook in self.fault_hooks:
            hook(vma, address, flags)

    def pgmap_of(self, pfn: int) -> Any:
        """The dev_pagemap covering ``pfn`` (the pgmap_array lookup), or None."""
        for pgmap in self.pgmaps:
            if pgmap.covers(pfn):
                return pgmap
        return None

    def model_bytes(self) -> dict[str, int]:
        """Bytes of model state: page tables, per-page metadata, stored page contents."""
        contents = self.mem.contents.nbytes()
        return {
            "page_tables": self.pool.tables.nbytes + self.pool.level.nbytes,
            "page_tables_live": self.pool.nbytes(),
            "page_metadata": self.mem.nbytes(),
            "page_contents": contents,
        }


_ = VM_FAULT


def _spawn(self: Machine, name: str = "p") -> Any:
    """A new process on this machine (:class:`hmmirror.process.Process`)."""
    from hmmirror.process import spawn
    return spawn(self, name)


Machine.spawn = _spawn  # type: ignore[attr-defined]
