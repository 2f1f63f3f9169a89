"""The CPU side of a memory access: the x86 page-fault handler (arch/x86/mm/fault.c) and the access itself.

``cpu_access`` is what a user-space load or store does: if the leaf entry already allows the access it
completes; otherwise the CPU faults and ``do_user_addr_fault`` runs (VMA lookup, ``access_error``,
``handle_mm_fault`` with ALLOW_RETRY, retry after VM_FAULT_RETRY).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.gup import MAX_FAULT_TRIES, leaf_allows
from hmmirror.mm.memory import VM_FAULT_ERROR_BITS, handle_mm_fault

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

SIGSEGV, SIGBUS = 11, 7


def access_error(write: bool, vm_flags: int) -> bool:
    """access_error(): a write needs VM_WRITE; any access needs the VMA to be accessible."""
    if write:
        return not vm_flags & VM.WRITE
    return not vm_flags & (VM.READ | VM.WRITE | VM.EXEC)


def do_user_addr_fault(mm: "MMStruct", addr: int, write: bool) -> Gen[int]:
    """do_user_addr_fault(): 0 when the access can complete, else the signal (SIGSEGV / SIGBUS)."""
    flags = FAULT_FLAG.USER | FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.KILLABLE
    if write:
        flags |= FAULT_FLAG.WRITE
    yield from sched.down_read(mm.mmap_sem)
    for _ in range(MAX_FAULT_TRIES):
        vma = mm.vma_lookup(addr)
        if vma is None or access_error(write, vma.vm_flags):
            sched.up_read(mm.mmap_sem)
            return SIGSEGV
        if leaf_allows(mm, addr, write):
            sched.up_read(mm.mmap_sem)
            return 0
        ret = yield from handle_mm_fault(vma, addr, flags)
        if ret & VM_FAULT.RETRY:
            flags |= FAULT_FLAG.TRIED
            yield from sched.down_read(mm.mmap_sem)     # the fault path released it
            continue
        if ret & VM_FAULT_ERROR_BITS:
            sched.up_read(mm.mmap_sem)
            return SIGSEGV if ret & VM_FAULT.SIGSEGV else SIGBUS
    sched.up_read(mm.mmap_sem)
    sched.report("livelock", f"CPU access to {addr:#x} still faulting after {MAX_FAULT_TRIES} faults")
    return SIGBUS


def leaf_pfn(mm: "MMStruct", addr: int) -> int:
    """The 4 KiB frame that ``addr`` translates to (-1 if nothing present maps it)."""
    level, p, e = mm.pt.lookup(addr)
    if p is None or x86.pte_none(e) or not e & x86._PAGE_PRESENT:
        return -1
    if level == "pmd":
        if not x86.pmd_leaf(e):
            return -1
        return x86.pte_pfn(e) + ((addr & (PMD_SIZE - 1)) >> 12)
    if level == "pud":
        if not x86.pud_leaf(e):
            return -1
        return x86.pte_pfn(e) + ((addr & (PUD_SIZE - 1)) >> 12)
    return x86.pte_pfn(e)


def cpu_access(mm: "MMStruct", addr: int, write: bool, data: bytes | None = None) -> Gen[int]:
    """A user load/store of ``data`` (or one byte) at ``addr``: fault as needed, then access the frame.

    Returns 0, or the signal number the access raised.
    """
    sig = yield from do_user_addr_fault(mm, addr, write)
    if sig:
        return sig
    if write and data is not None:
        pfn = leaf_pfn(mm, addr)
        mm.machine.mem.write(pfn, addr & (PAGE_SIZE - 1), data)
    return 0


def cpu_read(mm: "MMStruct", addr: int, length: int) -> Gen[bytes | int]:
    """A user load of ``length`` bytes inside one page: the bytes, or the signal number."""
    sig = yield from do_user_addr_fault(mm, addr, False)
    if sig:
        return sig
    pfn = leaf_pfn(mm, addr)
    return mm.machine.mem.read(pfn, addr & (PAGE_SIZE - 1), length)
