"""Helpers of the HMM 5.2 tests: page-table states built directly, the spec's entry encoding, a stepper.

Entry encoding expected by the tests is the model's suggested one (hmm-5.2.md §1.4):
flags = [VALID 1<<0, WRITE 1<<1, DEVICE_PRIVATE 1<<2], pfn_shift = 12,
values = [ERROR 0xFFFF_FFFF_FFFF_FFFE, NONE 0, SPECIAL 0xFFFF_FFFF_FFFF_FFFC].
"""

from __future__ import annotations

from typing import Any

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import (
    _PAGE_DEVMAP,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    PAGE_READONLY,
    PAGE_SHARED,
    pfn_pte,
)
from hmmirror.include.mm_types import VM
from hmmirror.kernel import sched
from hmmirror.mm.hmm import v5_2 as hmm
from hmmirror.mm.memremap import MEMORY_DEVICE_FS_DAX, devm_memremap_pages, new_dev_pagemap
from hmmirror.mm.mm_struct import VMA, VmOps

# --- the spec's encoding (hmm-5.2.md §1.4) -------------------------------------------------------------
VALID, WRITE, DP = 1 << 0, 1 << 1, 1 << 2
ERROR, NONE, SPECIAL = 0xFFFF_FFFF_FFFF_FFFE, 0, 0xFFFF_FFFF_FFFF_FFFC
K = 4096
M2 = 2 << 20
G1 = 1 << 30
BASE = 0x7F00_0000_0000          # 1 GiB aligned test VA


def ent(pfn: int, write: bool = False, dp: bool = False) -> int:
    """device_entry_from_pfn(pfn) | cpu flags (hmm-5.2.md §1.4)."""
    return (pfn << 12) | VALID | (WRITE if write else 0) | (DP if dp else 0)


RW_FLAGS = VM.READ | VM.WRITE | VM.MAYREAD | VM.MAYWRITE | VM.MAYEXEC


class FakeDaxOps(VmOps):
    """A VMA kind that is DAX for the walk (no VM_PFNMAP/VM_MIXEDMAP) and has no fault hooks."""

    name = "fakedax"
    is_dax = True


# --- machine, VMAs and entries built directly -----------------------------------------------------------
def machine() -> Machine:
    return Machine("5.2", ram=256 << 20)


def add_vma(m: Machine, mm: Any, start: int, size: int, flags: int = RW_FLAGS, ops: VmOps | None = None,
            hstate_order: int = 0) -> VMA:
    vma = VMA(mm, start, start + size, flags, start >> 12, None, ops, hstate_order=hstate_order)
    mm.insert_vma(vma)
    return vma


def pud_ptr(mm: Any, addr: int) -> tuple[int, int]:
    pt = mm.pt
    return pt.pud_alloc(pt.p4d_alloc(pt.pgd_offset(addr), addr), addr)


def pmd_ptr(mm: Any, addr: int) -> tuple[int, int]:
    return mm.pt.pmd_alloc(pud_ptr(mm, addr), addr)


def pte_ptr(mm: Any, addr: int) -> tuple[int, int]:
    pmdp = pmd_ptr(mm, addr)
    mm.pt.pte_alloc(pmdp)
    return mm.pt.pte_offset_map(pmdp, addr)


def set_pte(m: Machine, mm: Any, addr: int, val: int) -> None:
    m.pool.set(pte_ptr(mm, addr), val)


def set_pmd(m: Machine, mm: Any, addr: int, val: int) -> None:
    m.pool.set(pmd_ptr(mm, addr), val)


def set_pud(m: Machine, mm: Any, addr: int, val: int) -> None:
    m.pool.set(pud_ptr(mm, addr), val)


def devmap_pte(pfn: int, write: bool = True) -> int:
    """A [5.2] DAX PTE: P, SPECIAL, DEVMAP (mm-substrate.md §1.2)."""
    return pfn_pte(pfn, PAGE_SHARED if write else PAGE_READONLY) | _PAGE_SPECIAL | _PAGE_DEVMAP


def devmap_huge(pfn: int, write: bool = True) -> int:
    """A [5.2] DAX PMD/PUD leaf: P, PSE, DEVMAP."""
    return pfn_pte(pfn, PAGE_SHARED if write else PAGE_READONLY) | _PAGE_PSE | _PAGE_DEVMAP


def thp_pmd(pfn: int, write: bool = True) -> int:
    """A trans-huge PMD: P, PSE, not devmap."""
    return pfn_pte(pfn, PAGE_SHARED if write else PAGE_READONLY) | _PAGE_PSE


def normal_pte(pfn: int, write: bool = True) -> int:
    return pfn_pte(pfn, PAGE_SHARED if write else PAGE_READONLY)


def special_pte(pfn: int) -> int:
    """A special, non-devmap PTE (the zero page, a vmf_insert_pfn pfn)."""
    return pfn_pte(pfn, PAGE_READONLY) | _PAGE_SPECIAL


def pgmap(m: Machine, name: str = "pm0", npages: int = 1 << 18) -> Any:
    """A registered fsdax-type dev_pagemap of ``npages`` device pfns (1 GiB aligned)."""
    p = new_dev_pagemap(name, MEMORY_DEVICE_FS_DAX, npages)
    assert devm_memremap_pages(m, p) == 0
    return p


# --- running HMM calls ----------------------------------------------------------------------------------
def register_mirror(mm: Any) -> hmm.HmmMirror:
    """A mirror with no-op ops, registered with mmap_sem held for write (the 5.2 rule)."""

    class Ops(hmm.HmmMirrorOps):
        def sync_cpu_device_pagetables(self, mirror: Any, update: Any) -> Any:
            return 0
            yield

    mirror = hmm.HmmMirror(Ops(), name="t")

    def body() -> Any:
        yield from sched.down_write(mm.mmap_sem)
        ret = yield from hmm.hmm_mirror_register(mirror, mm)
        sched.up_write(mm.mmap_sem)
        return ret

    assert sched.run(body(), mm.task) == 0
    return mirror


def new_registered_range(mm: Any, start: int, end: int, shift: int = 12, name: str = "r") -> hmm.HmmRange:
    if mm.hmm is None:
        register_mirror(mm)
    r = hmm.new_range(start, end, shift, name=name)
    assert sched.run(hmm.hmm_range_register(r, mm, start, end, shift), mm.task) == 0
    return r


def under_read(mm: Any, gen: Any) -> int:
    """Run an HMM call with mmap_sem held for read (released afterwards if HMM did not)."""

    def body() -> Any:
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from gen
        if mm.mmap_sem.held_by(mm.task):
            sched.up_read(mm.mmap_sem)
        return ret

    return sched.run(body(), mm.task)


def snapshot(mm: Any, r: hmm.HmmRange) -> int:
    return under_read(mm, hmm.hmm_range_snapshot(r))


def fault(mm: Any, r: hmm.HmmRange, block: bool = True, request: int | list[int] | None = None,
          default_flags: int = 0, mask: int = (1 << 64) - 1) -> int:
    if request is not None:
        r.pfns[:] = request
    r.default_flags = default_flags
    r.pfn_flags_mask = mask
    return under_read(mm, hmm.hmm_range_fault(r, block))


def out(r: hmm.HmmRange) -> list[int]:
    return [int(x) for x in r.pfns.tolist()]


class Recorder:
    """Install a sched.report handler that records (kind, message) instead of raising."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []
        self.prev: Any = None

    def __enter__(self) -> "Recorder":
        self.prev = sched.set_report_handler(lambda k, msg: self.found.append((k, msg)))
        return self

    def __exit__(self, *exc: Any) -> None:
        sched.set_report_handler(self.prev)

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self.found]


class Stepper:
    """Drive one generator point by point in its task (a tiny manual scheduler for interleavings)."""

    def __init__(self, gen: Any, task: sched.Task) -> None:
        self.gen = gen
        self.task = task
        self.done = False
        self.result: Any = None
        self.last: Any = None

    def step(self) -> Any:
        prev = sched.set_current(self.task)
        try:
            self.last = next(self.gen)
            return self.last
        except StopIteration as stop:
            self.done = True
            self.result = stop.value
            return None
        finally:
            sched.set_current(prev)

    def run_until(self, pred: Any, limit: int = 100000) -> Any:
        for _ in range(limit):
            p = self.step()
            if p is None or pred(p):
                return p
        raise AssertionError("condition never reached")

    def finish(self, limit: int = 1000000) -> Any:
        for _ in range(limit):
            if self.step() is None:
                return self.result
        raise AssertionError("generator did not finish")

