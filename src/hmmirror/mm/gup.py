"""Faulting pages in on behalf of a range (mm/gup.c): follow_page_mask() and populate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, pte_none
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import VM_FAULT_ERROR_BITS, handle_mm_fault
from hmmirror.mm.page_alloc import PG

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
    """faultin_page(): fault until the leaf allows the access; returns the last vm_fault_t (0 on success).

    The populate callers pass ``locked``, so the kernel faults with FAULT_FLAG_ALLOW_RETRY: a fault that had
    to read a file page returns VM_FAULT_RETRY and the retried fault maps what the read brought in
    (fault-around); the retry (FAULT_FLAG_TRIED) may not retry again.  Model: RETRY_NOWAIT as well, so
    mmap_lock stays held and the VMA stays valid.
    """
    flags = FAULT_FLAG.REMOTE | FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.RETRY_NOWAIT \
        | (FAULT_FLAG.WRITE if write else FAULT_FLAG.NONE)
    for _ in range(MAX_FAULT_TRIES):
        if leaf_allows(vma.vm_mm, addr, write):
            return 0
        ret = yield from handle_mm_fault(vma, addr, flags)
        if ret & VM_FAULT_ERROR_BITS:
            return ret
        if ret & VM_FAULT.RETRY:
            # FAULT_FLAG_TRIED: the retried fault may not ask for another retry (it waits for a locked page)
            flags &= ~(FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.RETRY_NOWAIT)
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


# --- get_user_pages (mm/gup.c) -------------------------------------------------------------------------------
# gup_flags (include/linux/mm_types.h enum FOLL_* [6.x]; FOLL_PIN is mm/internal.h's)
FOLL_WRITE = 1 << 0
FOLL_GET = 1 << 1
FOLL_FORCE = 1 << 3
FOLL_LONGTERM = 1 << 8
FOLL_SPLIT_PMD = 1 << 9
FOLL_PIN = 1 << 17
EFAULT, ENOMEM, EBUSY, EOPNOTSUPP = 14, 12, 16, 95


def follow_page_pte(mm: "MMStruct", vma: "VMA", addr: int, gup_flags: int) -> Gen[int]:
    """follow_page_mask() / follow_page_pte(): the frame mapped at ``addr`` if the entry allows the access,
    else -1 (the caller faults).  A THP PMD is split first with FOLL_SPLIT_PMD.  Non-present entries
    (swap, migration, device-private, device-exclusive) are not followed: the caller faults them in."""
    from hmmirror.mm.huge_memory import split_huge_pmd_address

    level, p, e = mm.pt.lookup(addr)
    if level == "pmd" and p is not None and x86.pmd_leaf(e) and gup_flags & FOLL_SPLIT_PMD and \
            not (mm.machine.profile.devmap_bits and x86.pte_devmap(e)):
        # follow_pmd_mask(): a pmd_trans_huge() leaf is split ([<= 6.16] a devmap PMD is not trans-huge);
        # "if pmd was left empty, stuff a page table in there quickly" -- a file/DAX PMD split is a zap, and
        # without the table the refault would map the PMD again, forever
        yield from split_huge_pmd_address(vma, addr)
        level, p, e = mm.pt.lookup(addr)
        if level == "pmd" and p is not None and pte_none(e):
            mm.pt.pte_alloc(p)
            level, p, e = mm.pt.lookup(addr)
    if not leaf_allows(mm, addr, bool(gup_flags & FOLL_WRITE)):
        return -1
    from hmmirror.arch.x86.fault import leaf_pfn
    return leaf_pfn(mm, addr)


def __get_user_pages(mm: "MMStruct", start: int, nr_pages: int, gup_flags: int) -> Gen[list[int] | int]:
    """__get_user_pages() (mm/gup.c): fault in and take a reference (FOLL_GET) or a pin (FOLL_PIN:
    +GUP_PIN_COUNTING_BIAS) on ``nr_pages`` pages from ``start``.  Returns the pfns, or -EFAULT / -ENOMEM
    for the first page that cannot be had (no VMA, VM_IO/VM_PFNMAP, a write to a VMA without VM_WRITE, a fault
    error).  Caller holds the mmap lock for read.  FOLL_LONGTERM has nothing to migrate here (no movable zone
    and no device-coherent memory in the model; device-private pages were faulted back by the fault path)."""
    from hmmirror.mm.folio import GUP_PIN_COUNTING_BIAS

    machine = mm.machine
    mem = machine.mem
    write = bool(gup_flags & FOLL_WRITE)
    out: list[int] = []
    for i in range(nr_pages):
        addr = start + i * PAGE_SIZE
        vma = mm.vma_lookup(addr)
        if vma is None or vma.vm_flags & (VM.IO | VM.PFNMAP):
            return -EFAULT if not out else out
        if write and not vma.vm_flags & VM.WRITE and not gup_flags & FOLL_FORCE:
            return -EFAULT if not out else out
        if gup_flags & FOLL_SPLIT_PMD and vma.vm_flags & VM.HUGETLB:
            return -EOPNOTSUPP if not out else out      # check_vma_flags(): hugetlb PMDs cannot be split
        tries = 0
        seen = machine.counters["mmu_notifier_invalidations"]
        while True:
            pfn = yield from follow_page_pte(mm, vma, addr, gup_flags)
            if pfn >= 0:
                break
            ret = yield from handle_mm_fault(vma, addr, FAULT_FLAG.REMOTE | (FAULT_FLAG.WRITE if write else 0))
            if ret & VM_FAULT.OOM:
                return -ENOMEM if not out else out
            if ret & VM_FAULT_ERROR_BITS:
                return -EFAULT if not out else out
            # the kernel retries for as long as it takes; the model's guard counts only retries with no
            # invalidation in between (one that undid the fault -- sustained invalidation -- is progress)
            now = machine.counters["mmu_notifier_invalidations"]
            tries = 0 if now != seen else tries + 1
            seen = now
            if tries >= MAX_FAULT_TRIES:
                sched.report("livelock", f"__get_user_pages({addr:#x}) made no progress in {MAX_FAULT_TRIES} faults")
                return -EFAULT
        if not mem.flags[pfn] & PG.zero:                   # the zero pages are not refcounted
            head = mem.compound_head(pfn)
            mem.refcount[head] += GUP_PIN_COUNTING_BIAS if gup_flags & FOLL_PIN else 1
        out.append(pfn)
    machine.counters["gup_pages"] += len(out)
    return out


def unpin_user_page(mm: "MMStruct", pfn: int) -> None:
    """unpin_user_page(): drop a FOLL_PIN pin."""
    from hmmirror.mm.folio import GUP_PIN_COUNTING_BIAS

    mem = mm.machine.mem
    if mem.flags[pfn] & PG.zero:
        return
    head = mem.compound_head(pfn)
    mem.refcount[head] -= GUP_PIN_COUNTING_BIAS - 1
    mem.put_page(head)


def put_user_page(mm: "MMStruct", pfn: int) -> None:
    """put_page() of a FOLL_GET reference."""
    mem = mm.machine.mem
    if mem.flags[pfn] & PG.zero:
        return
    mem.put_page(pfn)


def get_user_page_vma_remote(mm: "MMStruct", addr: int, gup_flags: int) -> Gen[tuple[int, "VMA | None"]]:
    """get_user_page_vma_remote(): one page with a reference (FOLL_GET) and its VMA; (-errno, None) on error."""
    got = yield from __get_user_pages(mm, addr, 1, gup_flags | FOLL_GET)
    if isinstance(got, int):
        return got, None
    if not got:
        return -EFAULT, None
    return got[0], mm.vma_lookup(addr)
