"""``struct mm_struct`` and ``struct vm_area_struct`` (include/linux/mm_types.h), with the VMA helpers of
mm/mmap.c that only read the VMA list (find_vma & co) and vm_get_page_prot()."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import (
    _PAGE_NX,
    _PAGE_RW,
    PAGE_NONE,
    PAGE_READONLY,
    PAGE_SHARED,
    PAGE_SIZE,
)
from hmmirror.include.mm_types import VM
from hmmirror.kernel.sched import Lock, Task
from hmmirror.mm.pgtable import PageTables

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.rmap import AnonVma


def vm_get_page_prot(vm_flags: int) -> int:
    """vm_get_page_prot(): protection_map[] of x86-64 (private writable -> read-only for COW)."""
    rwx = vm_flags & (VM.READ | VM.WRITE | VM.EXEC)
    if not rwx:
        return PAGE_NONE
    prot = PAGE_SHARED if (vm_flags & VM.SHARED and vm_flags & VM.WRITE) else PAGE_READONLY
    if vm_flags & VM.EXEC:
        prot &= ~_PAGE_NX
    return prot


def is_cow_mapping(vm_flags: int) -> bool:
    """is_cow_mapping(): private and may become writable."""
    return (vm_flags & (VM.SHARED | VM.MAYWRITE)) == VM.MAYWRITE


class VmOps:
    """``struct vm_operations_struct``: a VMA kind's fault hooks.  ``None`` attributes are absent hooks.

    Hooks that may sleep are generators (``fault``, ``huge_fault``, ``page_mkwrite``, ``pfn_mkwrite``);
    ``map_pages`` runs under the PTE lock and does not sleep.
    """

    name = "ops"
    fault: Any = None
    huge_fault: Any = None
    map_pages: Any = None
    page_mkwrite: Any = None
    pfn_mkwrite: Any = None
    accounts_dirty = False      # mapping_can_writeback(): write-notify for shared writable mappings
    is_dax = False
    is_shmem = False


@dataclass(eq=False)
class VMA:
    """``struct vm_area_struct``: ``[vm_start, vm_end)`` of one mm with uniform flags and backing."""

    vm_mm: "MMStruct"
    vm_start: int
    vm_end: int
    vm_flags: int
    vm_pgoff: int = 0                 # file offset in pages (anon: vm_start >> PAGE_SHIFT)
    vm_file: Any = None               # an open file (fs.File) or None for anonymous memory
    vm_ops: VmOps | None = None
    anon_vma: "AnonVma | None" = None  # anon_vma_prepare() on the first anon write fault / THP fault
    vm_page_prot: int = 0
    hstate_order: int = 0             # hugetlb: huge page order (9 or 18)
    devmap: Any = None                # model: device backing for PFNMAP / device-dax VMAs
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vm_page_prot:
            self.vm_page_prot = vm_set_page_prot(self)

    @property
    def kind(self) -> str:
        """A short name of the VMA kind: anon, shmem, file, fsdax, devdax, hugetlb, pfnmap, mixedmap."""
        if self.vm_flags & VM.HUGETLB:
            return "hugetlb"
        if self.vm_flags & VM.PFNMAP:
            return "pfnmap"
        if self.vm_ops is None:
            return "anon"
        return self.vm_ops.name

    def contains(self, addr: int) -> bool:
        return self.vm_start <= addr < self.vm_end

    def linear_page_index(self, addr: int) -> int:
        """linear_page_index(): file page index of ``addr``."""
        return ((addr - self.vm_start) >> 12) + self.vm_pgoff

    def __repr__(self) -> str:
        return f"VMA({self.vm_start:#x}-{self.vm_end:#x} {self.kind} {vma_flags_str(self.vm_flags)})"


def vma_is_anonymous(vma: VMA) -> bool:
    """vma_is_anonymous(): no vm_ops."""
    return vma.vm_ops is None


def is_vm_hugetlb_page(vma: VMA) -> bool:
    """is_vm_hugetlb_page()."""
    return bool(vma.vm_flags & VM.HUGETLB)


def vma_is_dax(vma: VMA) -> bool:
    """vma_is_dax(): the file's inode is DAX (fsdax files and device-dax character devices)."""
    return vma.vm_ops is not None and vma.vm_ops.is_dax


def vma_wants_writenotify(vma: VMA) -> bool:
    """vma_wants_writenotify(): shared writable mapping whose file wants to hear of the first write."""
    f = vma.vm_flags
    if (f & (VM.WRITE | VM.SHARED)) != (VM.WRITE | VM.SHARED):
        return False
    ops = vma.vm_ops
    if ops is None:
        return False
    return bool(ops.page_mkwrite or ops.pfn_mkwrite or ops.accounts_dirty)


def vm_set_page_prot(vma: VMA) -> int:
    """vma_set_page_prot(): vm_page_prot from vm_flags, write removed under write-notify."""
    prot = vm_get_page_prot(vma.vm_flags)
    if vma_wants_writenotify(vma):
        prot &= ~_PAGE_RW
    return prot


def vma_flags_str(flags: int) -> str:
    """rwxs/p as in /proc/PID/maps."""
    return "".join(
        (
            "r" if flags & VM.READ else "-",
            "w" if flags & VM.WRITE else "-",
            "x" if flags & VM.EXEC else "-",
            "s" if flags & VM.MAYSHARE else "p",
        )
    )


class MMStruct:
    """``struct mm_struct``: page tables, the VMA list, locks, counts and notifier subscriptions."""

    def __init__(self, machine: "Machine", name: str) -> None:
        self.machine = machine
        self.name = name
        self.pt = PageTables(machine.pool, machine.geo)
        self.vmas: list[VMA] = []
        self._starts: list[int] = []
        self.mmap_sem = Lock(f"{name}.mmap_lock", "rwsem")
        self.page_table_lock = Lock(f"{name}.page_table_lock", "spin")
        self.mm_users = 1
        self.mm_count = 1
        self.notifier_subscriptions: Any = None   # mm/mmu_notifier.py, created on first registration
        self.hmm: Any = None                      # struct hmm [5.2]
        self.task = Task(name, "cpu")
        self.exited = False
        self.unstable = False                     # MMF_UNSTABLE: set by the OOM reaper (mm/oom_kill.py)
        self.huge_zero_ref = False                # [5.2] mm_get_huge_zero_page taken

    # -- VMA list ------------------------------------------------------------------------------------------
    def find_vma(self, addr: int) -> VMA | None:
        """find_vma(): the first VMA with ``vm_end > addr``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self.vmas[i].vm_end > addr:
            return self.vmas[i]
        return self.vmas[i + 1] if i + 1 < len(self.vmas) else None

    def vma_lookup(self, addr: int) -> VMA | None:
        """vma_lookup(): the VMA containing ``addr``."""
        vma = self.find_vma(addr)
        return vma if vma is not None and vma.vm_start <= addr else None

    def vmas_in(self, start: int, end: int) -> list[VMA]:
        """VMAs intersecting ``[start, end)``, in address order."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        for vma in self.vmas[i:]:
            if vma.vm_start >= end:
                break
            if vma.vm_end > start:
                out.append(vma)
        return out

    def insert_vma(self, vma: VMA) -> None:
        """vma_link()."""
        i = bisect.bisect_left(self._starts, vma.vm_start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.vm_start)

    def remove_vma(self, vma: VMA) -> None:
        """Unlink ``vma`` from the list."""
        i = self.vmas.index(vma)
        del self.vmas[i]
        del self._starts[i]

    def reindex(self) -> None:
        """Re-sort after VMA boundaries changed (split/merge)."""
        self.vmas.sort(key=lambda v: v.vm_start)
        self._starts = [v.vm_start for v in self.vmas]

    def total_vm(self) -> int:
        return sum(v.vm_end - v.vm_start for v in self.vmas) // PAGE_SIZE

    def __repr__(self) -> str:
        return f"MM({self.name})"
