"""Faulting pages in on behalf of a range (mm/gup.c): follow_page_mask() and populate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, pte_none
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import VM_FAULT_ERROR_BITS, handle_mm_fault

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

MAX_FAULT_TRIES = 16


def leaf_allows(mm: "MMStruct", addr: int, write: bool) -> bool:
    """follow_page_mask() success test: a present, accessible leaf (writable if ``write``) maps ``addr``."""
    level, p, e = mm.pt.lookup(addr)
    if p is None or pte_none(e) or not e & x86._PAGE_PRESENT:
        return False
    if level == "pmd" and not x86.pmd_leaf(e):
        return False
    if level == "pud" and not x86.pud_leaf(e):
        return False
    return not write or x86.pte_write(e)


def faultin_page(vma: "VMA", addr: int, write: bool) -> Gen[int]:
    """faultin_page(): fault until the leaf allows the access; returns the last vm_fault_t (0 on success)."""
    flags = FAULT_FLAG.REMOTE | (FAULT_FLAG.WRITE if write else FAULT_FLAG.NONE)
    for _ in range(MAX_FAULT_TRIES):
        if leaf_allows(vma.vm_mm, addr, write):
            return 0
        ret = yield from handle_mm_fault(vma, addr, flags)
        if ret & VM_FAULT_ERROR_BITS:
            return ret
    sched.report("livelock", f"faultin_page({addr:#x}) made no progress in {MAX_FAULT_TRIES} faults")
    return int(VM_FAULT.SIGBUS)


def populate_vma_page_range(vma: "VMA", start: int, end: int, write: bool | None = None) -> Gen[int]:
    """populate_vma_page_range(): write-populate only private writable VMAs (unless ``write`` is given).

    Returns the number of pages populated, or -EFAULT/-ENOMEM at the first failing page.
    """
    if write is None:
        write = (vma.vm_flags & (VM.WRITE | VM.SHARED)) == VM.WRITE
    n = 0
    for addr in range(start, end, PAGE_SIZE):
        ret = yield from faultin_page(vma, addr, write)
        if ret & VM_FAULT.OOM:
            return -12
        if ret & VM_FAULT_ERROR_BITS:
            return -14
        n += 1
    return n


def mm_populate(mm: "MMStruct", start: int, length: int) -> Gen[int]:
    """__mm_populate(): populate every VMA part of the range (errors ignored, as for MAP_POPULATE)."""
    end = start + length
    for vma in mm.vmas_in(start, end):
        if vma.vm_flags & (VM.IO | VM.PFNMAP) or not vma.vm_flags & (VM.READ | VM.WRITE | VM.EXEC):
            continue
        yield from populate_vma_page_range(vma, max(start, vma.vm_start), min(end, vma.vm_end))
    return 0
