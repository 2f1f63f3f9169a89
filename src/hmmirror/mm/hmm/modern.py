"""HMM as of Linux 6.18: ``hmm_range_fault()`` over the generic page walker (mm/hmm.c, include/linux/hmm.h).

Reference: mainline mm/hmm.c of the 6.18 era (no devmap page-table bits, HMM_PFN_DMA_MAPPED / P2PDMA sticky
flags, ``hmm_vma_handle_absent_pmd``, faults issued from inside the walk callbacks).  The 2026 linux-mm
series that records the fault and issues it after ``walk_page_range`` returns is *not* this file
(hmm-modern.md §8.1).  Where a 6.1-6.16 kernel differs (devmap PTE/PMD/PUD bits, §4.9) the difference is read
from ``profile.devmap_bits``.

Shape, as in the kernel: a handful of pure deciders returning bitmasks (:func:`hmm_pte_need_fault`,
:func:`hmm_range_need_fault`, :func:`pte_to_hmm_pfn_flags`, ...), a few effects named for what they write
(:func:`hmm_pfns_fill`, :func:`hmm_vma_fault`), the walk callbacks collected in :data:`hmm_walk_ops`, and the
entry point :func:`hmm_range_fault`.  The walk callbacks may fault (``handle_mm_fault`` sleeps), so they are
generators.

``range.hmm_pfns`` is a numpy ``uint64`` array (the kernel's ``unsigned long[]``): on input every entry is a
request (``HMM_PFN_REQ_FAULT`` / ``HMM_PFN_REQ_WRITE``, filtered by ``pfn_flags_mask`` and OR-ed with
``default_flags``), on output an entry (pfn | flags | map order).  The sticky input bits
(``HMM_PFN_INOUT_FLAGS``) survive every output write.

Observability: ``machine.counters`` ``hmm_range_fault`` (calls), ``hmm_walks`` (walk_page_range passes),
``hmm_pages_walked`` (pages handed to those passes), ``hmm_faults`` (handle_mm_fault calls),
``hmm_ebusy`` (-EBUSY returns); ``machine.log`` events ``hmm_range_fault`` (one per call) and
``hmm_vma_fault`` (one per fault batch, with the lock context at the ``handle_mm_fault`` calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PUD_SHIFT,
    PUD_SIZE,
    PTE_LEVEL,
    is_device_exclusive_entry,
    is_device_private_entry,
    is_migration_entry,
    is_pte_marker,
    is_writable_device_private_entry,
    non_swap_entry,
    pmd_bad,
    pmd_present,
    pte_none,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_to_swp_entry,
    pte_write,
    pud_present,
    table_id_of,
)
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT_ERROR, Flags
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.memory import handle_mm_fault, migration_entry_wait, vm_normal_page
from hmmirror.mm.mmu_notifier import (
    MmuIntervalNotifier,
    MmuIntervalNotifierOps,
    mmu_interval_check_retry,
    mmu_interval_set_seq,
)
from hmmirror.mm.pagewalk import (
    ACTION_CONTINUE,
    ACTION_SUBTREE,
    PGWALK_RDLOCK,
    MmWalk,
    MmWalkOps,
    hstate_order,
    hugetlb_vma_lock_read,
    hugetlb_vma_unlock_read,
    walk_page_range,
)
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EPERM, EFAULT, EBUSY, EINVAL = 1, 14, 16, 22
U64 = (1 << 64) - 1


# --- include/linux/hmm.h ---------------------------------------------------------------------------------
class HMM_PFN(Flags):
    """``enum hmm_pfn_flags`` (output names).  On output: VALID (pfn valid, at least readable), WRITE
    (writable, requires VALID), ERROR (access impossible); DMA_MAPPED / P2PDMA / P2PDMA_BUS are sticky (kept
    from input to output).  On input VALID is read as ``HMM_PFN_REQ_FAULT`` and WRITE as
    ``HMM_PFN_REQ_WRITE`` (which must come with REQ_FAULT).  Bits 53-57 hold the map order on output."""

    VALID = 1 << 63
    WRITE = 1 << 62
    ERROR = 1 << 61
    DMA_MAPPED = 1 << 60
    P2PDMA = 1 << 59
    P2PDMA_BUS = 1 << 58


HMM_PFN_VALID = HMM_PFN.VALID
HMM_PFN_WRITE = HMM_PFN.WRITE
HMM_PFN_ERROR = HMM_PFN.ERROR
HMM_PFN_DMA_MAPPED = HMM_PFN.DMA_MAPPED
HMM_PFN_P2PDMA = HMM_PFN.P2PDMA
HMM_PFN_P2PDMA_BUS = HMM_PFN.P2PDMA_BUS
HMM_PFN_ORDER_SHIFT = 53
HMM_PFN_REQ_FAULT = HMM_PFN_VALID            # input: fault the page in (at least readable)
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE            # input: fault it writable (with REQ_FAULT)
HMM_PFN_FLAGS = U64 & ~((1 << HMM_PFN_ORDER_SHIFT) - 1)      # bits 53..63
HMM_PFN_INOUT_FLAGS = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS   # carried input -> output
HMM_RANGE_DEFAULT_TIMEOUT = 1000             # ms; drivers bound their retry loops with it
HMM_MODEL_MAX_RESTARTS = 64                  # ours: restarts at one address before a "livelock" report

# mm/hmm.c: what a decider asks for
HMM_NEED_FAULT = 1 << 0
HMM_NEED_WRITE_FAULT = 1 << 1
HMM_NEED_ALL_BITS = HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT

_U_INOUT = np.uint64(HMM_PFN_INOUT_FLAGS)


def hmm_pfn_to_pfn(hmm_pfn: int) -> int:
    """hmm_pfn_to_page() as a pfn: the entry without its flag bits (meaningful only with VALID)."""
    return int(hmm_pfn) & ~HMM_PFN_FLAGS & U64


def hmm_pfn_to_map_order(hmm_pfn: int) -> int:
    """hmm_pfn_to_map_order(): the CPU mapping is ``2^order`` pages (meaningful only with VALID)."""
    return (int(hmm_pfn) >> HMM_PFN_ORDER_SHIFT) & 0x1F


def hmm_pfn_flags_order(order: int) -> int:
    """hmm_pfn_flags_order()."""
    return order << HMM_PFN_ORDER_SHIFT


@dataclass(eq=False)
class HmmRange:
    """``struct hmm_range``: ``[start, end)`` of ``notifier.mm``, requests in and entries out of ``hmm_pfns``."""

    notifier: MmuIntervalNotifier
    start: int
    end: int
    hmm_pfns: np.ndarray
    notifier_seq: int = 0
    default_flags: int = 0
    pfn_flags_mask: int = 0
    dev_private_owner: Any = None


class HmmVmaWalk:
    """``struct hmm_vma_walk``: the range and ``last``, where a restarted walk resumes."""

    __slots__ = ("range", "last", "faults", "walks")

    def __init__(self, range: HmmRange, last: int) -> None:   # noqa: A002 - kernel name
        self.range = range
        self.last = last
        self.faults = 0          # model: handle_mm_fault calls during this hmm_range_fault
        self.walks = 0           # model: walk_page_range passes


# --- pure deciders ---------------------------------------------------------------------------------------
def hmm_pte_need_fault(hmm_vma_walk: HmmVmaWalk, pfn_req_flags: int, cpu_flags: int) -> int:
    """hmm_pte_need_fault() (mm/hmm.c, 6.18): 0, NEED_FAULT or NEED_FAULT|NEED_WRITE_FAULT for one page.

    The request is the per-page input filtered by ``pfn_flags_mask``, OR-ed with ``default_flags``.
    """
    r = hmm_vma_walk.range
    pfn_req_flags = (int(pfn_req_flags) & r.pfn_flags_mask) | r.default_flags
    if not pfn_req_flags & HMM_PFN_REQ_FAULT:
        return 0
    if pfn_req_flags & HMM_PFN_REQ_WRITE and not cpu_flags & HMM_PFN_WRITE:
        return HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT
    if not cpu_flags & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


def hmm_range_need_fault(hmm_vma_walk: HmmVmaWalk, hmm_pfns: np.ndarray, npages: int, cpu_flags: int) -> int:
    """hmm_range_need_fault() (mm/hmm.c, 6.18): the OR of :func:`hmm_pte_need_fault` over ``npages`` entries.

    Vectorised: with one ``cpu_flags`` for all pages the OR is decided by two questions — does any page
    request a fault, does any request a write fault — so the result equals the kernel's loop (tested
    exhaustively against it).  Pure snapshot shortcut: no fault possible when neither ``default_flags``
    nor ``pfn_flags_mask`` carries REQ_FAULT.
    """
    r = hmm_vma_walk.range
    d, m = r.default_flags, r.pfn_flags_mask
    if not (d | m) & HMM_PFN_REQ_FAULT or npages <= 0:
        return 0
    if m & (HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE):
        req = (hmm_pfns[:npages] & np.uint64(m)) | np.uint64(d)
        want = (req & np.uint64(HMM_PFN_REQ_FAULT)) != 0
        any_fault = bool(want.any())
        any_write = any_fault and bool((want & ((req & np.uint64(HMM_PFN_REQ_WRITE)) != 0)).any())
    else:
        any_fault = bool(d & HMM_PFN_REQ_FAULT)
        any_write = any_fault and bool(d & HMM_PFN_REQ_WRITE)
    if any_write and not cpu_flags & HMM_PFN_WRITE:
        return HMM_NEED_ALL_BITS
    if any_fault and not cpu_flags & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


def pte_to_hmm_pfn_flags(range: HmmRange, pte: int) -> int:   # noqa: A002 - kernel name
    """pte_to_hmm_pfn_flags(): 0 if none, not present or protnone; else VALID [| WRITE]."""
    if pte_none(pte) or not pte_present(pte) or pte_protnone(pte):
        return 0
    return HMM_PFN_VALID | HMM_PFN_WRITE if pte_write(pte) else HMM_PFN_VALID


def pmd_to_hmm_pfn_flags(range: HmmRange, pmd: int) -> int:   # noqa: A002 - kernel name
    """pmd_to_hmm_pfn_flags(): 0 if protnone; else VALID [| WRITE] | order(9)."""
    if x86.pmd_protnone(pmd):
        return 0
    return ((HMM_PFN_VALID | HMM_PFN_WRITE) if x86.pmd_write(pmd) else HMM_PFN_VALID) | \
        hmm_pfn_flags_order(PMD_SHIFT - PAGE_SHIFT)


def pud_to_hmm_pfn_flags(range: HmmRange, pud: int) -> int:   # noqa: A002 - kernel name
    """pud_to_hmm_pfn_flags(): 0 if not present; else VALID [| WRITE] | order(18)."""
    if not pud_present(pud):
        return 0
    return ((HMM_PFN_VALID | HMM_PFN_WRITE) if x86.pud_write(pud) else HMM_PFN_VALID) | \
        hmm_pfn_flags_order(PUD_SHIFT - PAGE_SHIFT)


# --- effects ---------------------------------------------------------------------------------------------
def hmm_pfns_fill(addr: int, end: int, range: HmmRange, cpu_flags: int) -> int:   # noqa: A002
    """hmm_pfns_fill(): every entry of ``[addr, end)`` becomes ``(entry & INOUT) | cpu_flags``."""
    i = (addr - range.start) >> PAGE_SHIFT
    j = (end - range.start) >> PAGE_SHIFT
    view = range.hmm_pfns[i:j]
    view &= _U_INOUT
    view |= np.uint64(cpu_flags)
    return 0


def _store_pfns(range: HmmRange, i: int, npages: int, pfn: int, cpu_flags: int) -> None:   # noqa: A002
    """Ours: entries ``i .. i+npages`` become ``(entry & INOUT) | (pfn + k) | cpu_flags`` (the per-page
    loops of hmm_vma_handle_pmd / _pud / _hugetlb_entry / _absent_pmd, vectorised)."""
    view = range.hmm_pfns[i:i + npages]
    view &= _U_INOUT
    view |= np.arange(pfn, pfn + npages, dtype=np.uint64) | np.uint64(cpu_flags)


def mmap_assert_locked(mm: "MMStruct") -> None:
    """mmap_assert_locked(): lockdep check that the caller holds the mmap lock (read or write)."""
    if not mm.mmap_sem.held_by(sched.current()):
        sched.report("lockdep", f"hmm_range_fault on {mm.name} without {mm.mmap_sem.name} held")


def hmm_vma_fault(addr: int, end: int, required_fault: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_fault() (mm/hmm.c, 6.18): fault every page of ``[addr, end)`` with the same flags.

    Return: -EBUSY after the faults (the walk restarts at ``addr``), -EPERM for a write fault in a VMA
    without VM_WRITE, -EFAULT when ``handle_mm_fault`` returns any VM_FAULT_ERROR bit.  The mmap lock stays
    held (no FAULT_FLAG_ALLOW_RETRY).
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    vma = walk.vma
    assert vma is not None
    machine = walk.mm.machine
    if not required_fault:
        machine.log("WARN_ON_ONCE", what_failed="hmm_vma_fault without a required fault", addr=addr)
    hmm_vma_walk.last = addr
    fault_flags = FAULT_FLAG.REMOTE
    if required_fault & HMM_NEED_WRITE_FAULT:
        if not vma.vm_flags & VM.WRITE:
            return -EPERM
        fault_flags |= FAULT_FLAG.WRITE
    machine.log("hmm_vma_fault", mm=walk.mm.name, start=addr, end=end, write=bool(fault_flags & FAULT_FLAG.WRITE),
                locks=sched.lock_context().locks)
    for a in range(addr, end, PAGE_SIZE):
        hmm_vma_walk.faults += 1
        machine.counters["hmm_faults"] += 1
        if (yield from handle_mm_fault(vma, a, fault_flags)) & VM_FAULT_ERROR:
            return -EFAULT
    return -EBUSY


# --- walk callbacks --------------------------------------------------------------------------------------
def hmm_vma_walk_hole(addr: int, end: int, depth: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_hole(): no VMA -> ERROR (or -EFAULT if a fault is wanted); a none entry in a VMA -> 0
    (or fault)."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001 - kernel name
    i = (addr - range.start) >> PAGE_SHIFT
    npages = (end - addr) >> PAGE_SHIFT
    required_fault = hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, 0)
    if walk.vma is None:
        if required_fault:
            return -EFAULT
        return hmm_pfns_fill(addr, end, range, HMM_PFN_ERROR)
    if required_fault:
        return (yield from hmm_vma_fault(addr, end, required_fault, walk))
    return hmm_pfns_fill(addr, end, range, 0)


def hmm_vma_handle_pmd(walk: MmWalk, addr: int, end: int, i: int, pmd: int) -> Gen[int]:
    """hmm_vma_handle_pmd(): a leaf PMD (THP, huge zero page, file or DAX PMD): every page gets
    ``pfn | VALID [| WRITE] | order(9)`` unless a fault is needed.  ``i`` indexes ``range.hmm_pfns``."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    npages = (end - addr) >> PAGE_SHIFT
    cpu_flags = pmd_to_hmm_pfn_flags(range, pmd)
    required_fault = hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, cpu_flags)
    if required_fault:
        return (yield from hmm_vma_fault(addr, end, required_fault, walk))
    pfn = x86.pmd_pfn(pmd) + ((addr & (PMD_SIZE - 1)) >> PAGE_SHIFT)
    _store_pfns(range, i, npages, pfn, cpu_flags)
    return 0


def hmm_vma_handle_pte(walk: MmWalk, addr: int, end: int, pmdp: Ptr, ptep: Ptr, i: int) -> Gen[int]:
    """hmm_vma_handle_pte() (mm/hmm.c, 6.18): one PTE; on a needed fault, fault ``[addr, end)``."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    machine = walk.mm.machine
    pte = machine.pool.get(ptep)
    pfn_req_flags = int(range.hmm_pfns[i])
    new_pfn_flags = 0
    if pte_none(pte) or (not pte_present(pte) and is_pte_marker(pte_to_swp_entry(pte))):   # pte_none_mostly
        required_fault = hmm_pte_need_fault(hmm_vma_walk, pfn_req_flags, 0)
        if required_fault:
            sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")   # fault: pte_unmap
            return (yield from hmm_vma_fault(addr, end, required_fault, walk))
    elif not pte_present(pte):
        entry = pte_to_swp_entry(pte)
        # Don't fault in device private pages owned by the caller, just report the PFN.
        if is_device_private_entry(entry) and _pgmap_owner(machine, entry.offset) is range.dev_private_owner \
                and range.dev_private_owner is not None:
            cpu_flags = HMM_PFN_VALID | (HMM_PFN_WRITE if is_writable_device_private_entry(entry) else 0)
            new_pfn_flags = entry.offset | cpu_flags
        else:
            required_fault = hmm_pte_need_fault(hmm_vma_walk, pfn_req_flags, 0)
            if required_fault:
                if not non_swap_entry(entry) or is_device_private_entry(entry) or is_device_exclusive_entry(entry):
                    sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")   # fault: pte_unmap
                    return (yield from hmm_vma_fault(addr, end, required_fault, walk))
                if is_migration_entry(entry):
                    sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")
                    hmm_vma_walk.last = addr
                    yield from migration_entry_wait(walk.mm, pmdp, addr)
                    return -EBUSY
                sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")
                return -EFAULT                     # hwpoison and everything else
    else:
        cpu_flags = pte_to_hmm_pfn_flags(range, pte)
        required_fault = hmm_pte_need_fault(hmm_vma_walk, pfn_req_flags, cpu_flags)
        if required_fault:
            sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")   # fault: pte_unmap
            return (yield from hmm_vma_fault(addr, end, required_fault, walk))
        # Each architecture has a struct page for the zero page: treat it as a normal page.
        if vm_normal_page(walk.vma, addr, pte) < 0 \
                and not (machine.profile.devmap_bits and x86.pte_devmap(pte)) \
                and not machine.mem.is_zero_pfn(pte_pfn(pte)):
            if hmm_pte_need_fault(hmm_vma_walk, pfn_req_flags, 0):
                sched.pte_map_put("mm.hmm.modern.hmm_vma_handle_pte")
                return -EFAULT
            new_pfn_flags = HMM_PFN_ERROR
        else:
            new_pfn_flags = pte_pfn(pte) | cpu_flags
    range.hmm_pfns[i] = (pfn_req_flags & HMM_PFN_INOUT_FLAGS) | new_pfn_flags
    return 0


def _pgmap_owner(machine: Any, pfn: int) -> Any:
    pgmap = machine.pgmap_of(pfn)
    return None if pgmap is None else getattr(pgmap, "owner", None)


def hmm_vma_handle_absent_pmd(walk: MmWalk, start: int, end: int, i: int, pmd: int) -> Gen[int]:
    """hmm_vma_handle_absent_pmd() [6.18, THP migration]: a non-present, non-migration PMD."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    npages = (end - start) >> PAGE_SHIFT
    entry = pte_to_swp_entry(pmd)
    machine = walk.mm.machine
    if is_device_private_entry(entry) and range.dev_private_owner is not None \
            and _pgmap_owner(machine, entry.offset) is range.dev_private_owner:
        cpu_flags = HMM_PFN_VALID | hmm_pfn_flags_order(PMD_SHIFT - PAGE_SHIFT)
        if is_writable_device_private_entry(entry):
            cpu_flags |= HMM_PFN_WRITE
        # Fully populate the PFN list: drivers may not support sparsely populated lists.
        _store_pfns(range, i, npages, entry.offset + ((start & (PMD_SIZE - 1)) >> PAGE_SHIFT), cpu_flags)
        return 0
    required_fault = hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, 0)
    if required_fault:
        if is_device_private_entry(entry):
            return (yield from hmm_vma_fault(start, end, required_fault, walk))
        return -EFAULT
    return hmm_pfns_fill(start, end, range, HMM_PFN_ERROR)


def _pmd_is_leaf(machine: Any, pmd: int) -> bool:
    """pmd_trans_huge() [6.18]; ``pmd_devmap() || pmd_trans_huge()`` where the profile has devmap bits."""
    if x86.pmd_trans_huge(pmd):
        return True
    return bool(machine.profile.devmap_bits and x86.pmd_devmap(pmd) and x86.pmd_leaf(pmd))


def hmm_vma_walk_pmd(pmdp: Ptr, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_pmd() (mm/hmm.c, 6.18): the PMD callback; handles leaf PMDs itself and walks the PTE
    table below (HMM has no ``pte_entry``)."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    machine = walk.mm.machine
    pool = machine.pool
    i = (start - range.start) >> PAGE_SHIFT
    npages = (end - start) >> PAGE_SHIFT
    addr = start
    while True:                                               # "again:"
        pmd = pool.get(pmdp)                                  # pmdp_get_lockless()
        if pte_none(pmd):
            return (yield from hmm_vma_walk_hole(start, end, -1, walk))
        if not pmd_present(pmd) and is_migration_entry(pte_to_swp_entry(pmd)):   # is_pmd_migration_entry
            if hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, 0):
                hmm_vma_walk.last = addr
                yield from migration_entry_wait(walk.mm, pmdp, addr, huge=True)   # pmd_migration_entry_wait
                return -EBUSY
            return hmm_pfns_fill(start, end, range, 0)
        if not pmd_present(pmd):
            return (yield from hmm_vma_handle_absent_pmd(walk, start, end, i, pmd))
        if _pmd_is_leaf(machine, pmd):
            # No pmd_lock: a concurrent split reaches us through the mmu notifier.  Re-read and re-check.
            pmd = pool.get(pmdp)
            if not _pmd_is_leaf(machine, pmd):
                continue
            return (yield from hmm_vma_handle_pmd(walk, addr, end, i, pmd))
        # Everything else (none, migration, huge) is handled: a table or a bad PMD that will not recover.
        if pmd_bad(pmd):
            if hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, 0):
                return -EFAULT
            return hmm_pfns_fill(start, end, range, HMM_PFN_ERROR)
        if pte_none(pool.get(pmdp)) or x86.pmd_leaf(pool.get(pmdp)):   # pte_offset_map() failed
            continue
        tid = table_id_of(pmd)
        idx = PTE_LEVEL.index(addr)
        machine.counters["hmm_pte_tables"] += 1
        sched.pte_map_get("mm.hmm.modern.hmm_vma_walk_pmd")   # pte_offset_map()
        while addr < end:
            r = yield from hmm_vma_handle_pte(walk, addr, end, pmdp, (tid, idx), i)
            if r:
                return r                                      # hmm_vma_handle_pte() did pte_unmap()
            addr += PAGE_SIZE
            idx += 1
            i += 1
        sched.pte_map_put("mm.hmm.modern.hmm_vma_walk_pmd")   # pte_unmap(ptep - 1)
        return 0


def pud_trans_huge_lock(pudp: Ptr, walk: MmWalk) -> Gen[Lock | None]:
    """pud_trans_huge_lock(): the PUD lock, taken, iff the entry is a leaf (rechecked under the lock).

    [6.18] the test is ``pud_trans_huge``; where the profile has devmap bits, ``pud_trans_huge || pud_devmap``.
    """
    mm = walk.mm
    pool = mm.machine.pool
    devmap = mm.machine.profile.devmap_bits

    def huge(pud: int) -> bool:
        return x86.pud_trans_huge(pud) or bool(devmap and x86.pud_devmap(pud) and x86.pud_leaf(pud))

    if not huge(pool.get(pudp)):
        return None
    ptl = mm.page_table_lock
    yield from sched.spin_lock(ptl)
    if huge(pool.get(pudp)):
        return ptl
    sched.spin_unlock(ptl)
    return None


def hmm_vma_walk_pud(pudp: Ptr, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_pud() (mm/hmm.c, 6.18): a leaf PUD (device-dax 1 GiB) is reported here and not split;
    anything else is walked further (ACTION_SUBTREE)."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    machine = walk.mm.machine
    ptl = yield from pud_trans_huge_lock(pudp, walk)
    if ptl is None:
        return 0
    walk.action = ACTION_CONTINUE                             # normally we don't want to split the huge page
    pud = machine.pool.get(pudp)
    if not pud_present(pud):
        sched.spin_unlock(ptl)
        return (yield from hmm_vma_walk_hole(start, end, -1, walk))
    if x86.pud_leaf(pud) and (not machine.profile.devmap_bits or x86.pud_devmap(pud)):
        i = (start - range.start) >> PAGE_SHIFT
        npages = (end - start) >> PAGE_SHIFT
        cpu_flags = pud_to_hmm_pfn_flags(range, pud)
        required_fault = hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], npages, cpu_flags)
        if required_fault:
            sched.spin_unlock(ptl)                            # the PUD lock is dropped before faulting
            return (yield from hmm_vma_fault(start, end, required_fault, walk))
        pfn = x86.pud_pfn(pud) + ((start & (PUD_SIZE - 1)) >> PAGE_SHIFT)
        _store_pfns(range, i, npages, pfn, cpu_flags)
        sched.spin_unlock(ptl)
        return 0
    walk.action = ACTION_SUBTREE                              # ask for the PUD to be split
    sched.spin_unlock(ptl)
    return 0


def huge_pte_lockptr(walk: MmWalk, ptep: Ptr) -> Lock:
    """huge_pte_lockptr(): PMD-sized hugetlb entries use the PMD table lock, PUD-sized the PUD lock."""
    assert walk.vma is not None
    if hstate_order(walk.vma) == PUD_SHIFT - PAGE_SHIFT:
        return walk.mm.page_table_lock
    return walk.mm.machine.pool.ptlock(ptep[0])


def hmm_vma_walk_hugetlb_entry(ptep: Ptr, hmask: int, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_hugetlb_entry() (mm/hmm.c, 6.18): one huge page; only the first page's request is read."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    vma = walk.vma
    assert vma is not None
    pool = walk.mm.machine.pool
    ptl = huge_pte_lockptr(walk, ptep)
    yield from sched.spin_lock(ptl)
    entry = pool.get(ptep)                                    # huge_ptep_get()
    i = (start - range.start) >> PAGE_SHIFT
    pfn_req_flags = int(range.hmm_pfns[i])
    cpu_flags = pte_to_hmm_pfn_flags(range, entry) | hmm_pfn_flags_order(hstate_order(vma))
    required_fault = hmm_pte_need_fault(hmm_vma_walk, pfn_req_flags, cpu_flags)
    if required_fault:
        sched.spin_unlock(ptl)
        # Drop the VMA lock before faulting: hugetlb_fault() takes it itself.
        hugetlb_vma_unlock_read(vma)
        ret = yield from hmm_vma_fault(start, end, required_fault, walk)
        yield from hugetlb_vma_lock_read(vma)
        return ret
    pfn = pte_pfn(entry) + ((start & ~hmask) >> PAGE_SHIFT)
    _store_pfns(range, i, (end - start) >> PAGE_SHIFT, pfn, cpu_flags)
    sched.spin_unlock(ptl)
    return 0


def hmm_vma_walk_test(start: int, end: int, walk: MmWalk) -> int:
    """hmm_vma_walk_test(): VM_IO / VM_PFNMAP VMAs and VMAs without VM_READ cannot be mirrored: ERROR
    for their part (skip, return 1), or -EFAULT when a fault is requested there."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range   # noqa: A001
    vma = walk.vma
    assert vma is not None
    if not vma.vm_flags & (VM.IO | VM.PFNMAP) and vma.vm_flags & VM.READ:
        return 0
    i = (start - range.start) >> PAGE_SHIFT
    if hmm_range_need_fault(hmm_vma_walk, range.hmm_pfns[i:], (end - start) >> PAGE_SHIFT, 0):
        return -EFAULT
    hmm_pfns_fill(start, end, range, HMM_PFN_ERROR)
    return 1                                                  # skip this VMA, continue with the next


hmm_walk_ops = MmWalkOps(
    pud_entry=hmm_vma_walk_pud,
    pmd_entry=hmm_vma_walk_pmd,
    pte_hole=hmm_vma_walk_hole,
    hugetlb_entry=hmm_vma_walk_hugetlb_entry,
    test_walk=hmm_vma_walk_test,
    walk_lock=PGWALK_RDLOCK,
)


# --- the entry point -------------------------------------------------------------------------------------
def hmm_range_fault(range: HmmRange) -> Gen[int]:   # noqa: A002 - kernel name
    """hmm_range_fault() (mm/hmm.c, 6.18): fill ``range.hmm_pfns`` for ``[range.start, range.end)``,
    faulting pages in as the requests say.

    Return: 0 (every entry written, sticky bits kept); -EBUSY (``mmu_interval_check_retry()`` true at a
    loop start: the range was invalidated, the caller waits and retries); -EFAULT (a requested page
    cannot be made valid: no VMA, unsupported VMA, special PTE, bad PMD, VM_FAULT_ERROR); -EPERM (a write
    fault is needed in a VMA without VM_WRITE); -EINVAL (``start >= end``).  On error the array holds a
    mix of outputs and inputs.

    Locking: the caller holds the mmap lock of ``range.notifier.mm`` (read or write); it is never dropped.
    An invalidation during the walk is not reported here unless seen at a loop start; the driver detects
    it with ``mmu_interval_read_retry()`` under its own lock.

    A range whose ``notifier`` is NULL or was never inserted (no ``mm``) is the kernel's NULL dereference of
    ``range->notifier->mm``: reported as ``null_deref``; when a simulator records instead of raising, -EFAULT.
    """
    if range.notifier is None or range.notifier.mm is None:
        sched.report("null_deref", "hmm_range_fault: range->notifier"
                     + (" is NULL" if range.notifier is None else "->mm is NULL (notifier never inserted)"))
        return -EFAULT
    mm = range.notifier.mm
    machine = mm.machine
    mmap_assert_locked(mm)
    machine.counters["hmm_range_fault"] += 1
    # the inputs as the walk will read them (checks of the request: every input bit defined)
    machine.log("hmm_range_fault_begin", mm=mm.name, start=range.start, end=range.end)
    hmm_vma_walk = HmmVmaWalk(range, range.start)
    stuck = 0                                   # model: restarts at the same `last` in a row
    faults0 = hmm_vma_walk.faults
    while True:
        # If the range is no longer valid force a retry.
        if mmu_interval_check_retry(range.notifier, range.notifier_seq):
            ret = -EBUSY
            break
        machine.counters["hmm_walks"] += 1
        machine.counters["hmm_pages_walked"] += (range.end - hmm_vma_walk.last) >> PAGE_SHIFT
        hmm_vma_walk.walks += 1
        last = hmm_vma_walk.last
        ret = yield from walk_page_range(mm, hmm_vma_walk.last, range.end, hmm_walk_ops, hmm_vma_walk)
        # After -EBUSY the loop restarts at `last`: entries below it hold outputs, the rest their inputs.
        if ret != -EBUSY:
            break
        if hmm_vma_walk.last == last:
            stuck += 1
        else:
            stuck, faults0 = 0, hmm_vma_walk.faults
        if stuck >= HMM_MODEL_MAX_RESTARTS:
            # The kernel would loop forever: a fault that leaves the entry as it was is a substrate bug.
            sched.report("livelock", f"hmm_range_fault restarted {stuck} times at {hmm_vma_walk.last:#x} "
                                     "without progress", cause="refault" if hmm_vma_walk.faults > faults0
                         else "no-fault")
            break
    if ret == -EBUSY:
        machine.counters["hmm_ebusy"] += 1
    machine.log("hmm_range_fault", mm=mm.name, start=range.start, end=range.end, ret=ret,
                walks=hmm_vma_walk.walks, faults=hmm_vma_walk.faults, default_flags=range.default_flags,
                pfn_flags_mask=range.pfn_flags_mask, seq=range.notifier_seq)
    return ret


def new_hmm_pfns(npages: int) -> np.ndarray:
    """Ours: a zeroed request/result array for ``npages`` pages (the driver's ``unsigned long pfns[]``)."""
    return np.zeros(npages, dtype=np.uint64)


class _SeqOnlyOps(MmuIntervalNotifierOps):
    """Ours: an interval notifier that only records the invalidation (like dmirror's snapshot notifier)."""

    def invalidate(self, sub: MmuIntervalNotifier, r: Any, cur_seq: int) -> Gen[bool]:
        mmu_interval_set_seq(sub, cur_seq)
        return True
        yield  # pragma: no cover


def model_range_fault(mm: "MMStruct", start: int, end: int, default_flags: int = 0, pfn_flags_mask: int = 0,
                      hmm_pfns: np.ndarray | None = None, dev_private_owner: Any = None,
                      max_retries: int = 1000) -> Gen[tuple[int, np.ndarray]]:
    """Ours: one mirroring of ``[start, end)`` the way a driver does it (hmm-modern.md §5) with a temporary
    interval notifier and no device page table: ``read_begin``; ``hmm_range_fault`` under the mmap read lock;
    retry on -EBUSY or when an invalidation intervened (at most ``max_retries`` passes, then -EBUSY).

    Returns ``(ret, hmm_pfns)``; ``hmm_pfns`` (the inputs, default zeros) holds the outputs when ``ret == 0``.
    """
    from hmmirror.mm.mmu_notifier import mmu_interval_notifier_insert, mmu_interval_notifier_remove, \
        mmu_interval_read_begin, mmu_interval_read_retry

    npages = max((end - start) >> PAGE_SHIFT, 0)
    pfns = new_hmm_pfns(npages) if hmm_pfns is None else hmm_pfns
    sub = MmuIntervalNotifier()
    ret = yield from mmu_interval_notifier_insert(sub, mm, start, max(end - start, 1), _SeqOnlyOps())
    if ret:
        return ret, pfns
    rng = HmmRange(sub, start, end, pfns, default_flags=default_flags, pfn_flags_mask=pfn_flags_mask,
                   dev_private_owner=dev_private_owner)
    inputs = pfns.copy()
    try:
        for _ in range(max_retries + 1):
            pfns[:] = inputs
            rng.notifier_seq = yield from mmu_interval_read_begin(sub)
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from hmm_range_fault(rng)
            sched.up_read(mm.mmap_sem)
            if ret == -EBUSY or (ret == 0 and mmu_interval_read_retry(sub, rng.notifier_seq)):
                continue
            return ret, pfns
        return -EBUSY, pfns
    finally:
        yield from mmu_interval_notifier_remove(sub)


def run_range_fault(proc: Any, start: int, npages: int, default_flags: int = 0, pfn_flags_mask: int = 0,
                    hmm_pfns: np.ndarray | None = None, dev_private_owner: Any = None) -> tuple[int, np.ndarray]:
    """Ours: :func:`model_range_fault` run sequentially in the task of ``proc`` (a Process or an mm)."""
    mm = getattr(proc, "mm", proc)
    result: tuple[int, np.ndarray] = sched.run(
        model_range_fault(mm, start, start + (npages << PAGE_SHIFT), default_flags, pfn_flags_mask, hmm_pfns,
                          dev_private_owner), mm.task)
    return result


__all__ = [
    "HMM_NEED_ALL_BITS", "HMM_NEED_FAULT", "HMM_NEED_WRITE_FAULT", "HMM_PFN", "HMM_PFN_DMA_MAPPED",
    "HMM_PFN_ERROR", "HMM_PFN_FLAGS", "HMM_PFN_INOUT_FLAGS", "HMM_PFN_ORDER_SHIFT", "HMM_PFN_P2PDMA",
    "HMM_PFN_P2PDMA_BUS", "HMM_PFN_REQ_FAULT", "HMM_PFN_REQ_WRITE", "HMM_PFN_VALID", "HMM_PFN_WRITE",
    "HMM_RANGE_DEFAULT_TIMEOUT", "HmmRange", "HmmVmaWalk", "hmm_pfn_flags_order", "hmm_pfn_to_map_order",
    "hmm_pfn_to_pfn", "hmm_pfns_fill", "hmm_pte_need_fault", "hmm_range_fault", "hmm_range_need_fault",
    "hmm_vma_fault", "hmm_vma_handle_absent_pmd", "hmm_vma_handle_pmd", "hmm_vma_handle_pte",
    "hmm_vma_walk_hole", "hmm_vma_walk_hugetlb_entry", "hmm_vma_walk_pmd", "hmm_vma_walk_pud",
    "hmm_vma_walk_test", "hmm_walk_ops", "model_range_fault", "new_hmm_pfns", "pmd_to_hmm_pfn_flags",
    "pte_to_hmm_pfn_flags", "pud_to_hmm_pfn_flags", "run_range_fault",
]
