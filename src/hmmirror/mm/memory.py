"""Page faults and unmapping (mm/memory.c).

``handle_mm_fault`` and everything it calls may sleep: they are generators (see
:mod:`hmmirror.kernel.sched`).  Entry changes happen under the page-table lock of their level, taken with
``yield from spin_lock(...)``; after taking it the code re-checks that the entry is still the one it
decided on (``pte_same``), as the kernel does, because another task may have run in between.

Per-kind fault hooks (page cache, shmem, fsdax, device-dax, hugetlb) live in fs/, drivers/ and mm/hugetlb.py
behind ``vma.vm_ops``; THP in mm/huge_memory.py.
"""

from __future__ import annotations

import inspect as _pyinspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    HPAGE_PMD_NR,
    PAGE_SIZE,
    PMD_SIZE,
    PTRS_PER_TABLE,
    _PAGE_SPECIAL,
    is_migration_entry,
    is_device_private_entry,
    is_hwpoison_entry,
    is_pte_marker,
    non_swap_entry,
    pfn_pte,
    pmd_leaf,
    pte_none,
    pte_pfn,
    pte_present,
    pte_protnone,
    pte_special,
    pte_to_swp_entry,
    pte_write,
    pud_leaf,
    table_id_of,
)
from hmmirror.include.mm_types import FAULT_FLAG, MMU_NOTIFY, VM, VM_FAULT
from hmmirror.include.oom import check_stable_address_space
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.mm_struct import VMA, is_vm_hugetlb_page, vma_is_anonymous, vma_is_dax
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct


FAULT_AROUND_PAGES = 16          # fault_around_bytes = 64 KiB


@dataclass
class VmFault:
    """``struct vm_fault``: what a fault handler knows and hands down."""

    vma: VMA
    address: int                  # page aligned
    flags: int                    # FAULT_FLAG bits
    pgoff: int = 0
    pudp: Ptr | None = None
    pmdp: Ptr | None = None
    ptep: Ptr | None = None
    orig_pte: int = 0
    orig_pmd: int = 0
    page: int = -1                # pfn returned by ->fault (with a reference), or -1
    cow_page: int = -1
    ptl: Any = None

    write: bool = False           # flags & FAULT_FLAG_WRITE (set once, tested everywhere)

    def __post_init__(self) -> None:
        self.write = bool(self.flags & FAULT_FLAG.WRITE)

    @property
    def mm(self) -> "MMStruct":
        return self.vma.vm_mm


# --- small helpers (include/linux/mm.h) ------------------------------------------------------------------
def vm_normal_page(vma: VMA, addr: int, pte: int) -> int:
    """vm_normal_page(): the frame with struct-page semantics behind ``pte``, or -1 (special / no memmap)."""
    if pte_special(pte):
        return -1
    pfn = pte_pfn(pte)
    mem = vma.vm_mm.machine.mem
    if vma.vm_flags & VM.PFNMAP or pfn >= mem.nr_pfns:
        return -1
    return pfn


def maybe_mkwrite(entry: int, vma: VMA) -> int:
    """maybe_mkwrite(): set the write bit only if the VMA allows writing."""
    return x86.pte_mkwrite(entry) if vma.vm_flags & VM.WRITE else entry


def mk_pte(pfn: int, prot: int) -> int:
    """mk_pte()."""
    return pfn_pte(pfn, prot)


def dax_refcounted(vma: VMA) -> bool:
    return vma.vm_mm.machine.profile.dax_refcounted


def pte_lockptr(mm: "MMStruct", pmdp: Ptr) -> sched.Lock:
    """pte_lockptr(): the split lock of the PTE table below ``pmdp``."""
    return mm.machine.pool.ptlock(table_id_of(mm.machine.pool.get(pmdp)))


def pmd_lockptr(mm: "MMStruct", pmdp: Ptr) -> sched.Lock:
    """pmd_lockptr(): the split lock of the PMD table holding ``pmdp``."""
    return mm.machine.pool.ptlock(pmdp[0])


# --- the fault entry points ------------------------------------------------------------------------------
def handle_mm_fault(vma: VMA, address: int, flags: int) -> Gen[int]:
    """handle_mm_fault() (mm/memory.c): may sleep; caller holds the mmap lock for read; no VMA checks."""
    mm = vma.vm_mm
    machine = mm.machine
    if not vma.contains(address):
        sched.report("BUG_ON", f"handle_mm_fault({address:#x}) outside {vma}")
    machine.counters["handle_mm_fault"] += 1
    machine.fault_hook(vma, address, flags)
    yield from sched.might_sleep("handle_mm_fault")
    address &= ~(PAGE_SIZE - 1)
    if is_vm_hugetlb_page(vma):
        from hmmirror.mm.hugetlb import hugetlb_fault
        return (yield from hugetlb_fault(mm, vma, address, flags))
    return (yield from __handle_mm_fault(vma, address, flags))


def transparent_hugepage_enabled(vma: VMA) -> bool:
    """__transparent_hugepage_enabled() / thp_vma_allowable_order(): may this VMA get PMD (or PUD) leaves?"""
    if vma.vm_flags & VM.NOHUGEPAGE:
        return False
    if vma_is_dax(vma):
        return True
    thp = vma.vm_mm.machine.thp
    if vma_is_anonymous(vma):
        return thp.enabled == "always" or (thp.enabled == "madvise" and bool(vma.vm_flags & VM.HUGEPAGE))
    ops = vma.vm_ops
    assert ops is not None
    if ops.is_shmem:
        return bool(getattr(vma.vm_file, "huge", False))
    return vma.vm_mm.machine.profile.file_pmd_mappings and bool(vma.vm_flags & VM.HUGEPAGE) and \
        ops.huge_fault is not None


def __handle_mm_fault(vma: VMA, address: int, flags: int) -> Gen[int]:
    """__handle_mm_fault(): allocate the upper levels, try PUD then PMD leaves, then the PTE level."""
    mm = vma.vm_mm
    pt, pool = mm.pt, mm.machine.pool
    vmf = VmFault(vma, address, flags, vma.linear_page_index(address))
    vmf.pudp = pt.pud_alloc(pt.p4d_alloc(pt.pgd_offset(address), address), address)
    pud = pool.get(vmf.pudp)
    thp = transparent_hugepage_enabled(vma)
    if pte_none(pud) and thp:
        ret = yield from create_huge_pud(vmf)
        if not ret & VM_FAULT.FALLBACK:
            return ret
    elif pud_leaf(pud):
        if vmf.write and not x86.pud_write(pud):
            ret = yield from wp_huge_pud(vmf, pud)
            if not ret & VM_FAULT.FALLBACK:
                return ret
        else:
            from hmmirror.mm.huge_memory import huge_pud_set_accessed
            yield from huge_pud_set_accessed(vmf, pud)
            return 0
    pud = pool.get(vmf.pudp)
    if pud_leaf(pud):
        return 0                                   # raced with a PUD insertion: retry the access
    vmf.pmdp = pt.pmd_alloc(vmf.pudp, address)
    pmd = pool.get(vmf.pmdp)
    vmf.orig_pmd = pmd
    if pte_none(pmd) and thp:
        ret = yield from create_huge_pmd(vmf)
        if not ret & VM_FAULT.FALLBACK:
            return ret
    elif not pte_none(pmd):
        if not x86.pmd_present(pmd):               # is_swap_pmd(): a PMD migration entry
            if is_migration_entry(pte_to_swp_entry(pmd)):
                yield from migration_entry_wait(mm, vmf.pmdp, address, huge=True)
                return 0
            # VM_BUG_ON(thp_migration_supported() && !is_pmd_migration_entry(orig_pmd)); return 0: no other
            # swap-format PMD exists (device-private PMDs come with device-private THP, 6.19); the entry is
            # never taken for a PTE table
            mm.machine.log("VM_BUG_ON", what_failed=f"__handle_mm_fault: swap PMD {pmd:#x} is not a migration "
                                                    f"entry", addr=address)
            return 0
        elif pmd_leaf(pmd):
            from hmmirror.mm import huge_memory
            if x86.pmd_protnone(pmd):
                return (yield from huge_memory.do_huge_pmd_numa_page(vmf, pmd))
            if vmf.write and not x86.pmd_write(pmd):
                ret = yield from huge_memory.wp_huge_pmd(vmf, pmd)
                if not ret & VM_FAULT.FALLBACK:
                    return ret
            else:
                yield from huge_memory.huge_pmd_set_accessed(vmf, pmd)
                return 0
    return (yield from handle_pte_fault(vmf))


def create_huge_pud(vmf: VmFault) -> Gen[int]:
    """create_huge_pud(): anonymous memory has no PUD THP; file VMAs ask ``huge_fault(PUD)``."""
    ops = vmf.vma.vm_ops
    if ops is None or ops.huge_fault is None:
        return int(VM_FAULT.FALLBACK)
    return (yield from ops.huge_fault(vmf, "pud"))


def wp_huge_pud(vmf: VmFault, pud: int) -> Gen[int]:
    """wp_huge_pud()."""
    ops = vmf.vma.vm_ops
    if ops is None or ops.huge_fault is None:
        return int(VM_FAULT.FALLBACK)
    return (yield from ops.huge_fault(vmf, "pud"))


def create_huge_pmd(vmf: VmFault) -> Gen[int]:
    """create_huge_pmd(): anonymous THP, or the file's ``huge_fault(PMD)``."""
    if vma_is_anonymous(vmf.vma):
        from hmmirror.mm.huge_memory import do_huge_pmd_anonymous_page
        return (yield from do_huge_pmd_anonymous_page(vmf))
    ops = vmf.vma.vm_ops
    if ops is None or ops.huge_fault is None:
        return int(VM_FAULT.FALLBACK)
    return (yield from ops.huge_fault(vmf, "pmd"))


def handle_pte_fault(vmf: VmFault) -> Gen[int]:
    """handle_pte_fault()."""
    mm, pool = vmf.mm, vmf.mm.machine.pool
    assert vmf.pmdp is not None
    pmd = pool.get(vmf.pmdp)
    if pte_none(pmd):
        vmf.ptep = None
        vmf.orig_pte = 0
    elif pmd_leaf(pmd) or not (pmd & x86._PAGE_PRESENT):
        return 0                                    # a huge entry appeared meanwhile: retry the access
    else:
        vmf.ptep = mm.pt.pte_offset_map(vmf.pmdp, vmf.address)
        vmf.orig_pte = pool.get(vmf.ptep)
    if vmf.ptep is None or pte_none(vmf.orig_pte):
        if vma_is_anonymous(vmf.vma):
            return (yield from do_anonymous_page(vmf))
        return (yield from do_fault(vmf))
    if not pte_present(vmf.orig_pte):
        return (yield from do_swap_page(vmf))
    if pte_protnone(vmf.orig_pte):
        return (yield from do_numa_page(vmf))
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    entry = pool.get(vmf.ptep)
    if entry != vmf.orig_pte:
        sched.spin_unlock(ptl)
        return 0
    if vmf.write:
        if not pte_write(entry):
            vmf.ptl = ptl
            return (yield from do_wp_page(vmf))     # releases ptl
        entry = x86.pte_mkdirty(entry)
    pool.set(vmf.ptep, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    return 0


# --- anonymous memory ------------------------------------------------------------------------------------
def do_anonymous_page(vmf: VmFault) -> Gen[int]:
    """do_anonymous_page(): read -> shared zero page (special, read-only); write -> a new zeroed page."""
    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    if vma.vm_flags & VM.SHARED:
        return int(VM_FAULT.SIGBUS)
    assert vmf.pmdp is not None
    mm.pt.pte_alloc(vmf.pmdp)
    vmf.ptep = mm.pt.pte_offset_map(vmf.pmdp, vmf.address)
    ptl = pte_lockptr(mm, vmf.pmdp)
    if not vmf.write:
        entry = mk_pte(mem.zero_pfn, vma.vm_page_prot) | _PAGE_SPECIAL
        entry = x86.pte_wrprotect(entry)
        yield from sched.spin_lock(ptl)
        ret = 0
        if not vmf_pte_changed(vmf, pool.get(vmf.ptep)):
            ret = check_stable_address_space(mm)
            if not ret:
                pool.set(vmf.ptep, entry)
        sched.spin_unlock(ptl)
        return ret
    yield from sched.might_sleep("alloc_zeroed_user_highpage_movable")
    rmap.anon_vma_prepare(vma)
    pfn = mem.alloc_page()
    if pfn < 0:
        return int(VM_FAULT.OOM)
    entry = mk_pte(pfn, vma.vm_page_prot)
    if vma.vm_flags & VM.WRITE:
        entry = x86.pte_mkwrite(x86.pte_mkdirty(entry))
    yield from sched.spin_lock(ptl)
    if vmf_pte_changed(vmf, pool.get(vmf.ptep)):
        sched.spin_unlock(ptl)
        mem.put_page(pfn)
        return 0
    ret = check_stable_address_space(mm)
    if ret:
        sched.spin_unlock(ptl)
        mem.put_page(pfn)
        return ret
    rmap.page_add_new_anon_rmap(mem, pfn)
    pool.set(vmf.ptep, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    machine.counters["anon_pages_allocated"] += 1
    return 0


def do_wp_page(vmf: VmFault) -> Gen[int]:
    """do_wp_page(): write to a present read-only PTE; entered with the PTE lock held, releases it."""
    vma, mem = vmf.vma, vmf.mm.machine.mem
    pfn = vm_normal_page(vma, vmf.address, vmf.orig_pte)
    shared_writable = (vma.vm_flags & (VM.WRITE | VM.SHARED)) == (VM.WRITE | VM.SHARED)
    if pfn < 0:
        if shared_writable:
            return (yield from wp_pfn_shared(vmf))
        sched.spin_unlock(vmf.ptl)
        return (yield from wp_page_copy(vmf, -1))
    if mem.flags[pfn] & PG.device and not dax_refcounted(vma) and not shared_writable:
        sched.spin_unlock(vmf.ptl)
        return (yield from wp_page_copy(vmf, pfn))
    if mem.flags[pfn] & PG.anon and not shared_writable:
        head = mem.compound_head(pfn)
        rule = vmf.mm.machine.profile.wp_reuse_large_anon
        if rule != "page" and int(mem.order[head]) > 0 and not mem.flags[pfn] & PG.anon_exclusive:
            if rule == "exclusive_folio" and __wp_can_reuse_large_anon_folio(vmf, pfn, head):
                mem.flags[pfn] |= PG.anon_exclusive
                return wp_page_reuse(vmf)
            sched.spin_unlock(vmf.ptl)
            return (yield from wp_page_copy(vmf, pfn))
        if mem.mapcount[pfn] == 1 and int(mem.refcount[head]) == _expected_anon_refs(mem, pfn):
            mem.flags[pfn] |= PG.anon_exclusive      # "if (!PageAnonExclusive(vmf->page)) SetPageAnonExclusive" [6.x]
            return wp_page_reuse(vmf)
        sched.spin_unlock(vmf.ptl)
        return (yield from wp_page_copy(vmf, pfn))
    if shared_writable:
        return (yield from wp_page_shared(vmf, pfn))
    sched.spin_unlock(vmf.ptl)
    return (yield from wp_page_copy(vmf, pfn))


def __wp_can_reuse_large_anon_folio(vmf: VmFault, pfn: int, head: int) -> bool:
    """__wp_can_reuse_large_anon_folio() [6.15+]: more than one page of the folio is mapped and every mapping
    is this mm's (the folio is not maybe-mapped-shared); model: no pins, so the refcount check holds."""
    from hmmirror.mm.inspect import _folio_mapped_only_here

    mem = vmf.mm.machine.mem
    order = int(mem.order[head])
    if int(mem.mapcount[head: head + (1 << order)].sum()) <= 1:
        return False                                      # free up the large folio instead
    return _folio_mapped_only_here(vmf.mm, vmf.address & ~(PAGE_SIZE - 1), pfn, head, order)


def _expected_anon_refs(mem: Any, pfn: int) -> int:
    """References of a folio that are all mapping references (no extra pins): reuse is then safe."""
    head = mem.compound_head(pfn)
    order = int(mem.order[head])
    if order == 0:
        return int(mem.mapcount[pfn])
    # PTE-mapped THP: one reference per mapped subpage entry (PMD mappings count in every subpage)
    return int(mem.refcount[head])


def wp_page_reuse(vmf: VmFault) -> int:
    """wp_page_reuse(): set the write bit in place (same pfn, no notifier); releases the PTE lock."""
    pool = vmf.mm.machine.pool
    assert vmf.ptep is not None
    entry = x86.pte_mkyoung(x86.pte_mkdirty(vmf.orig_pte))
    pool.set(vmf.ptep, maybe_mkwrite(entry, vmf.vma))
    sched.spin_unlock(vmf.ptl)
    return int(VM_FAULT.WRITE)


def wp_pfn_shared(vmf: VmFault) -> Gen[int]:
    """wp_pfn_shared(): ``pfn_mkwrite`` then reuse (special or devmap entries in shared mappings)."""
    ops = vmf.vma.vm_ops
    if ops is not None and ops.pfn_mkwrite is not None:
        sched.spin_unlock(vmf.ptl)
        ret = yield from ops.pfn_mkwrite(vmf)
        if ret & (VM_FAULT.SIGBUS | VM_FAULT.OOM | VM_FAULT.NOPAGE):
            return ret
        yield from sched.spin_lock(vmf.ptl)
        assert vmf.ptep is not None
        if vmf.mm.machine.pool.get(vmf.ptep) != vmf.orig_pte:
            sched.spin_unlock(vmf.ptl)
            return 0
    return wp_page_reuse(vmf)


def wp_page_shared(vmf: VmFault, pfn: int) -> Gen[int]:
    """wp_page_shared(): ``page_mkwrite`` (ext4/xfs) then reuse; shmem has no hook and just reuses."""
    ops = vmf.vma.vm_ops
    if ops is not None and ops.page_mkwrite is not None:
        sched.spin_unlock(vmf.ptl)
        ret = yield from ops.page_mkwrite(vmf, pfn)
        if ret & (VM_FAULT.SIGBUS | VM_FAULT.OOM | VM_FAULT.NOPAGE):
            return ret
        yield from sched.spin_lock(vmf.ptl)
        assert vmf.ptep is not None
        if vmf.mm.machine.pool.get(vmf.ptep) != vmf.orig_pte:
            sched.spin_unlock(vmf.ptl)
            return 0
    return wp_page_reuse(vmf)


def wp_page_copy(vmf: VmFault, old: int) -> Gen[int]:
    """wp_page_copy(): a private copy replaces the entry; notifier CLEAR over the page."""
    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    yield from sched.might_sleep("alloc_page_vma")
    rmap.anon_vma_prepare(vma)
    new = mem.alloc_page()
    if new < 0:
        return int(VM_FAULT.OOM)
    src = old if old >= 0 else pte_pfn(vmf.orig_pte)   # cow_user_page(): a special pfn is copied via the user VA
    if not (src < mem.nr_pfns and mem.flags[src] & PG.zero):
        mem.copy(new, src)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, vmf.address, vmf.address + PAGE_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    assert vmf.pmdp is not None and vmf.ptep is not None
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    cur = pool.get(vmf.ptep)
    if cur == vmf.orig_pte:
        entry = maybe_mkwrite(x86.pte_mkdirty(mk_pte(new, vma.vm_page_prot)), vma)
        rmap.page_add_new_anon_rmap(mem, new)
        pool.set(vmf.ptep, x86.pte_mkyoung(entry))
        old_pfn = pte_pfn(cur)
        if rmap.counted(mem, old_pfn, machine.profile.dax_refcounted) and not pte_special(cur):
            rmap.page_remove_rmap(mem, old_pfn)
            mem.put_page(old_pfn)
        new = -1
    sched.spin_unlock(ptl)
    if new >= 0:
        mem.put_page(new)
    yield from mmu_notifier_invalidate_range_end(r)
    machine.counters["cow_copies"] += 1
    return int(VM_FAULT.WRITE)


# --- file-backed memory ----------------------------------------------------------------------------------
def do_fault(vmf: VmFault) -> Gen[int]:
    """do_fault() (mm/memory.c): no ``->fault`` -> SIGBUS; else read / private write (COW) / shared write."""
    ops = vmf.vma.vm_ops
    if ops is None or ops.fault is None:
        return int(VM_FAULT.SIGBUS)
    if not vmf.write:
        return (yield from do_read_fault(vmf))
    if not vmf.vma.vm_flags & VM.SHARED:
        return (yield from do_cow_fault(vmf))
    return (yield from do_shared_fault(vmf))


def fault_around_window(vmf: VmFault) -> tuple[int, int]:
    """do_fault_around(): ``[S, S+16 pages)`` with ``S = max(align_down(addr, 64K), vm_start)``, clipped to
    the VMA and to the PTE table of ``addr`` (mm-substrate.md §5.5; it follows the VA, not the file offset)."""
    vma = vmf.vma
    start = max(vmf.address & ~(FAULT_AROUND_PAGES * PAGE_SIZE - 1), vma.vm_start)
    table_end = (vmf.address & ~(PMD_SIZE - 1)) + PMD_SIZE
    end = min(start + FAULT_AROUND_PAGES * PAGE_SIZE, vma.vm_end, table_end)
    return start, end


def do_fault_around(vmf: VmFault) -> Gen[int]:
    """do_fault_around() (mm/memory.c): ``->map_pages`` over the window; VM_FAULT_NOPAGE if that mapped the
    faulting address (by a PTE or a PMD), else 0.

    ``map_pages(vmf, start, end)`` is either a generator that takes the PTE lock itself (the 6.x
    filemap_map_pages shape, used by the page cache and shmem: it may also install a PMD for a PMD-sized
    folio, or install no PTE table when nothing is cached) or a plain function, which is called with the
    PTE table allocated and its lock held.
    """
    ops = vmf.vma.vm_ops
    assert ops is not None and vmf.pmdp is not None
    mm = vmf.mm
    pool = mm.machine.pool
    start, end = fault_around_window(vmf)
    if _pyinspect.isgeneratorfunction(ops.map_pages):
        yield from ops.map_pages(vmf, start, end)
    else:
        if pte_none(pool.get(vmf.pmdp)):
            mm.pt.pte_alloc(vmf.pmdp)
        ptl = pte_lockptr(mm, vmf.pmdp)
        yield from sched.spin_lock(ptl)
        ops.map_pages(vmf, start, end)
        sched.spin_unlock(ptl)
    pmd = pool.get(vmf.pmdp)
    if pmd_leaf(pmd):
        return int(VM_FAULT.NOPAGE)                  # huge page is mapped: the fault is solved
    if pte_none(pmd) or not pmd & x86._PAGE_PRESENT:
        return 0                                     # ->map_pages did nothing useful (cold cache)
    if vmf_pte_changed(vmf, pool.get(mm.pt.pte_offset_map(vmf.pmdp, vmf.address))):
        return int(VM_FAULT.NOPAGE)
    return 0


def vmf_pte_changed(vmf: VmFault, cur: int) -> bool:
    """vmf_pte_changed() (mm/memory.c [6.x]): has the faulting PTE changed since the fault looked at it?
    A fault entered on a PTE marker (``vmf.orig_pte`` holds it: FAULT_FLAG_ORIG_PTE_VALID) compares with
    the marker, which is then replaced; otherwise the entry must still be none."""
    orig = vmf.orig_pte
    if not pte_none(orig) and not pte_present(orig) and is_pte_marker(pte_to_swp_entry(orig)):
        return cur != orig
    return not pte_none(cur)


def __do_fault(vmf: VmFault) -> Gen[int]:
    """__do_fault() (mm/memory.c): ``vma->vm_ops->fault``; on success ``vmf.page`` holds a referenced pfn
    (unless the handler installed the entry itself: NOPAGE, or DONE_COW for a DAX copy).  The page-cache
    handlers (filemap_fault, shmem_fault) return it locked (VM_FAULT_LOCKED): the caller unlocks it once it is
    mapped (:func:`fault_unlock_page`), so a truncation, which locks every folio it drops, cannot drop it in
    between.  Model: the other handlers' pages are not locked (the kernel locks them here)."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    vmf.page = -1
    ret = yield from ops.fault(vmf)
    if ret & (_ERR | VM_FAULT.NOPAGE | VM_FAULT.RETRY | VM_FAULT.DONE_COW):
        return ret
    mem = vmf.mm.machine.mem
    if vmf.page >= 0 and vmf.page < mem.nr_pfns and mem.flags[vmf.page] & PG.hwpoison:
        fault_unlock_page(vmf, ret)
        _put_fault_page(vmf)
        return int(VM_FAULT.HWPOISON)
    return ret


def fault_unlock_page(vmf: VmFault, ret: int, page: int = -2) -> None:
    """folio_unlock(page_folio(vmf->page)) of a page ``->fault`` returned locked (``ret & VM_FAULT_LOCKED``);
    ``page``: the pfn when ``vmf.page`` was already handed to a mapping."""
    if ret & VM_FAULT.LOCKED:
        pfn = vmf.page if page == -2 else page
        if pfn >= 0:
            from hmmirror.mm.folio import folio_unlock
            folio_unlock(vmf.mm.machine.mem, pfn)


def _put_fault_page(vmf: VmFault) -> None:
    """put_page(vmf->page): drop the reference ``->fault`` returned (if that frame is refcounted)."""
    mem = vmf.mm.machine.mem
    if vmf.page >= 0 and rmap.counted(mem, vmf.page, vmf.mm.machine.profile.dax_refcounted):
        mem.put_page(vmf.page)
    vmf.page = -1


def do_read_fault(vmf: VmFault) -> Gen[int]:
    """do_read_fault() (mm/memory.c): fault-around first when the VMA has ``->map_pages``, then ``->fault``
    for the faulting page and finish_fault()."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    if ops.map_pages is not None and FAULT_AROUND_PAGES > 1:
        ret = yield from do_fault_around(vmf)
        if ret:
            return ret
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        return ret
    page = vmf.page
    ret |= yield from finish_fault(vmf)
    fault_unlock_page(vmf, ret, page)
    return ret & ~VM_FAULT.LOCKED


_ERR = VM_FAULT.OOM | VM_FAULT.SIGBUS | VM_FAULT.SIGSEGV | VM_FAULT.HWPOISON | VM_FAULT.HWPOISON_LARGE
VM_FAULT_ERROR_BITS = int(_ERR)     # VM_FAULT_ERROR without FALLBACK (never returned by handle_mm_fault)


def do_cow_fault(vmf: VmFault) -> Gen[int]:
    """do_cow_fault() (mm/memory.c): private write to an unmapped file page: copy it into a new anonymous
    page and map that (no notifier: the entry was none)."""
    vma, mem = vmf.vma, vmf.mm.machine.mem
    yield from sched.might_sleep("alloc_page_vma")
    rmap.anon_vma_prepare(vma)
    vmf.cow_page = mem.alloc_page()
    if vmf.cow_page < 0:
        return int(VM_FAULT.OOM)
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        mem.put_page(vmf.cow_page)
        vmf.cow_page = -1
        return ret
    if ret & VM_FAULT.DONE_COW:                       # the (DAX) handler copied and mapped it itself
        return ret
    if vmf.page >= 0:
        mem.copy(vmf.cow_page, vmf.page)              # copy_user_highpage()
    ret |= yield from finish_fault(vmf)
    fault_unlock_page(vmf, ret)                       # unlock_page(vmf->page); put_page(vmf->page)
    _put_fault_page(vmf)
    return ret & ~VM_FAULT.LOCKED


def do_shared_fault(vmf: VmFault) -> Gen[int]:
    """do_shared_fault() (mm/memory.c): ``->fault``, then ``->page_mkwrite`` when the file has one (ext4, xfs;
    not shmem), then map the page writable; the page is marked dirty (fault_dirty_shared_page)."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        return ret
    page = vmf.page
    mem = vmf.mm.machine.mem
    if ops.page_mkwrite is not None:
        locked = ret & VM_FAULT.LOCKED
        fault_unlock_page(vmf, ret)                   # folio_unlock() before do_page_mkwrite()
        tmp = yield from ops.page_mkwrite(vmf, page)
        if tmp & (_ERR | VM_FAULT.NOPAGE):
            _put_fault_page(vmf)
            return tmp
        if locked:                                    # ->page_mkwrite returns it locked (VM_FAULT_LOCKED)
            from hmmirror.mm.folio import folio_lock, folio_trylock, folio_unlock
            if not folio_trylock(mem, page):
                yield from folio_lock(mem, page, "do_page_mkwrite")
            inode = vmf.vma.vm_file.inode
            if inode.i_mapping.find_page(vmf.pgoff) != page:
                folio_unlock(mem, page)               # truncated meanwhile: the access faults again
                _put_fault_page(vmf)
                return int(VM_FAULT.NOPAGE)
    ret |= yield from finish_fault(vmf)
    fault_unlock_page(vmf, ret, page)                 # fault_dirty_shared_page() unlocks it
    if page >= 0 and page < mem.nr_ram and not ret & (_ERR | VM_FAULT.NOPAGE):
        mem.flags[page] |= PG.dirty                   # fault_dirty_shared_page()
    return ret & ~VM_FAULT.LOCKED


def transhuge_vma_suitable(vma: VMA, haddr: int) -> bool:
    """transhuge_vma_suitable(): the 2 MiB block at ``haddr`` lies in the VMA and, for file VMAs, the VA
    and the file offset are congruent modulo 2 MiB."""
    if not vma_is_anonymous(vma) and ((vma.vm_start >> 12) - vma.vm_pgoff) % HPAGE_PMD_NR:
        return False
    return haddr >= vma.vm_start and haddr + PMD_SIZE <= vma.vm_end


def do_set_pmd(vmf: VmFault, page: int) -> Gen[int]:
    """do_set_pmd() (mm/memory.c): map the PMD-sized page-cache folio holding ``page`` (the frame for
    ``vmf.address``) with one PMD leaf; VM_FAULT_FALLBACK when the VMA or the folio does not allow it or the
    PMD is no longer none.  On success the caller's reference on the folio becomes the mapping's."""
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    haddr = vmf.address & ~(PMD_SIZE - 1)
    if not transhuge_vma_suitable(vma, haddr) or vma.vm_flags & VM.NOHUGEPAGE:
        return int(VM_FAULT.FALLBACK)
    head = mem.compound_head(page)
    if page >= mem.nr_ram or int(mem.order[head]) != 9 or head != page - ((vmf.address - haddr) >> 12):
        return int(VM_FAULT.FALLBACK)
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if not pte_none(pool.get(vmf.pmdp)):
        sched.spin_unlock(ptl)
        return int(VM_FAULT.FALLBACK)
    entry = pfn_pte(head, vma.vm_page_prot) | x86._PAGE_PSE
    if vmf.write:
        entry = maybe_mkwrite(x86.pte_mkdirty(entry), vma)
    rmap.page_add_rmap(mem, head, HPAGE_PMD_NR)       # page_add_file_rmap(page, compound=true)
    pool.set(vmf.pmdp, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    mm.machine.counters["thp_file_mapped"] += 1
    return 0


def folio_extent(mem: Any, mapping: Any, index: int) -> tuple[int, int]:
    """Our helper: the page-cache slots ``[first, end)`` of the folio holding ``index``: a compound frame's
    order (a PMD-sized folio), else the mapping's recorded large-folio orders [6.x], else the page alone."""
    pfn = mapping.find_page(index)
    if 0 <= pfn < mem.nr_ram and not mem.flags[pfn] & PG.hugetlb:
        head = mem.compound_head(pfn)
        order = int(mem.order[head])
        if order:
            first = index - (pfn - head)
            return first, first + (1 << order)
    if getattr(mapping, "folio_order", None) is not None:
        return mapping.folio_span(index)
    return index, index + 1


def vma_is_anon_shmem(vma: VMA) -> bool:
    """vma_is_anon_shmem(): a shared anonymous mapping (its shmem file exists only for the VMA)."""
    return vma.vm_ops is not None and vma.vm_ops.is_shmem and vma.vm_file is not None \
        and vma.vm_file.inode.release_on_last_unmap


def finish_fault_needs_fallback(vmf: VmFault, folio_end: int) -> bool:
    """finish_fault() [74207de2ba10, 6.18 and 6.12.y]: a folio reaching past EOF (``DIV_ROUND_UP(i_size) <
    folio_next_index``) of a non-shmem file is mapped by one PTE only, never by a PMD or whole."""
    vma = vmf.vma
    if not vma.vm_mm.machine.profile.map_large_below_eof or vma.vm_file is None or vma.vm_ops is None \
            or vma.vm_ops.is_shmem:
        return False
    return vma.vm_file.inode.nr_pages < folio_end


def finish_fault(vmf: VmFault) -> Gen[int]:
    """finish_fault() / alloc_set_pte() (mm/memory.c): install ``vmf.cow_page`` (private write) or
    ``vmf.page`` at the faulting address.  A page of a PMD-sized folio goes through do_set_pmd() first when
    the PMD is none (not for a folio reaching past EOF [6.x]).  [6.12 anon shmem, 6.18 every file] a page of
    a large folio maps the whole folio when it lies inside the VMA and this PTE table and all its PTEs are
    none; otherwise one page.  The reference taken by ``->fault`` (or the cow page's allocation) becomes the
    mapping's; it is dropped when the entry turned out to be populated meanwhile."""
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    cow = vmf.write and not vma.vm_flags & VM.SHARED
    pfn = vmf.cow_page if cow else vmf.page
    counted = rmap.counted(mem, pfn, mm.machine.profile.dax_refcounted)
    if not vma.vm_flags & VM.SHARED:                   # "check even for read faults because we might have
        ret = check_stable_address_space(mm)           # lost our CoWed page"
        if ret:
            if counted:
                mem.put_page(pfn)
            if not cow:
                vmf.page = -1
            return ret
    mapping = None if cow or vma.vm_file is None else vma.vm_file.inode.i_mapping
    extent = folio_extent(mem, mapping, vmf.pgoff) if mapping is not None and 0 <= pfn < mem.nr_ram \
        else (vmf.pgoff, vmf.pgoff + 1)
    needs_fallback = mapping is not None and finish_fault_needs_fallback(vmf, extent[1])
    if not cow and not needs_fallback and pte_none(pool.get(vmf.pmdp)) and 0 <= pfn < mem.nr_ram \
            and int(mem.order[mem.compound_head(pfn)]) == 9 and not mem.flags[pfn] & PG.hugetlb:
        ret = yield from do_set_pmd(vmf, pfn)
        if ret != VM_FAULT.FALLBACK:
            vmf.page = -1                              # the reference is the PMD mapping's now
            return ret
    pmd = pool.get(vmf.pmdp)
    if not pte_none(pmd) and (pmd_leaf(pmd) or not pmd & x86._PAGE_PRESENT):
        if counted:                                    # pmd_devmap_trans_unstable(): a huge entry raced in
            mem.put_page(pfn)
        if not cow:
            vmf.page = -1
        return int(VM_FAULT.NOPAGE)
    mm.pt.pte_alloc(vmf.pmdp)
    vmf.ptep = mm.pt.pte_offset_map(vmf.pmdp, vmf.address)
    whole = None if cow or needs_fallback else _whole_folio_range(vmf, extent)
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if whole is not None:
        addr0, slots = whole
        tid = table_id_of(pool.get(vmf.pmdp))
        i0 = (addr0 >> 12) & (PTRS_PER_TABLE - 1)
        cur = pool.tables[tid, i0: i0 + slots.shape[0]] & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
        if not cur.any():                                                  # pte_range_none()
            set_pte_range_from_cache(vmf, addr0, slots, write=vmf.write)
            sched.spin_unlock(ptl)
            if counted:
                mem.put_page(pfn)                      # set_pte_range took the mapping's references
            vmf.page = -1
            return 0
    if vmf_pte_changed(vmf, pool.get(vmf.ptep)):
        sched.spin_unlock(ptl)
        if counted:
            mem.put_page(pfn)
        if not cow:
            vmf.page = -1
        return int(VM_FAULT.NOPAGE)
    entry = mk_pte(pfn, vma.vm_page_prot)
    if vmf.write:
        entry = maybe_mkwrite(x86.pte_mkdirty(entry), vma)
    if cow:
        rmap.page_add_new_anon_rmap(mem, pfn)
    elif counted:
        rmap.page_add_rmap(mem, pfn)
    pool.set(vmf.ptep, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    if cow:
        vmf.cow_page = -1
    else:
        vmf.page = -1                                  # the reference is the PTE mapping's now
    return 0


def _whole_folio_range(vmf: VmFault, extent: tuple[int, int]) -> tuple[int, Any] | None:
    """finish_fault(): ``(start address, page-cache slots)`` of the whole large folio holding the faulting
    page when the profile maps whole folios for this VMA and the folio lies inside the VMA and this PTE
    table (``vma_off >= idx``, ``pte_off >= idx`` and the rest fits); else None (one page)."""
    vma = vmf.vma
    rule = vma.vm_mm.machine.profile.finish_fault_folio
    if rule == "none" or (rule == "anon_shmem" and not vma_is_anon_shmem(vma)):
        return None
    first, end = extent
    nr = end - first
    if nr < 2:
        return None
    idx = vmf.pgoff - first
    vma_off = vmf.pgoff - vma.vm_pgoff
    pte_off = (vmf.address >> 12) & (PTRS_PER_TABLE - 1)
    pages = (vma.vm_end - vma.vm_start) >> 12
    if vma_off < idx or vma_off + (nr - idx) > pages or pte_off < idx or pte_off + (nr - idx) > PTRS_PER_TABLE:
        return None
    slots = vma.vm_file.inode.i_mapping.lookup_range(first, end)
    if (slots < 0).any():
        return None
    return vmf.address - idx * PAGE_SIZE, slots


def set_pte_range_from_cache(vmf: VmFault, start: int, pfns: Any, write: bool = False) -> int:
    """set_pte_range() / the PTE loop of filemap_map_pages() (mm/memory.c, mm/filemap.c): map ``pfns[i]``
    at ``start + i * 4K`` into the none PTEs of the table below ``vmf.pmdp`` (``-1``: skip that page).

    The caller holds that table's PTE lock and has checked the pages (uptodate, not locked, below EOF).
    Entries take ``vm_page_prot`` (read-only under write-notify or COW), young; ``write`` makes them dirty
    and writable if ``VM_WRITE``.  Each mapped frame gets a mapcount and its folio a reference.
    Vectorised over the window.  ``pfns`` may also be a list of ``(addr, pfn)`` pairs.  Returns the number
    of PTEs installed.
    """
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    tid = table_id_of(pool.get(vmf.pmdp))
    if isinstance(pfns, list) and pfns and isinstance(pfns[0], tuple):
        idx = np.array([(a >> 12) & (PTRS_PER_TABLE - 1) for a, _ in pfns], dtype=np.int64)
        arr = np.array([p for _, p in pfns], dtype=np.int64)
    else:
        arr = np.asarray(pfns, dtype=np.int64)
        idx = ((start >> 12) & (PTRS_PER_TABLE - 1)) + np.arange(arr.shape[0], dtype=np.int64)
    if not arr.size:
        return 0
    cur = pool.tables[tid, idx]
    ok = (arr >= 0) & ((cur & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)) == 0)
    if not ok.any():
        return 0
    p, i = arr[ok], idx[ok]
    bits = mk_pte(0, vma.vm_page_prot) | x86._PAGE_ACCESSED
    if write:
        bits = maybe_mkwrite(x86.pte_mkdirty(bits), vma)
    pool.tables[tid, i] = (p.astype(np.uint64) << np.uint64(12)) | np.uint64(bits)
    c = p[rmap.counted_mask(mem, p, mm.machine.profile.dax_refcounted)]
    if c.size:
        np.add.at(mem.mapcount, c, 1)
        heads = c & ~((np.int64(1) << mem.order[c].astype(np.int64)) - 1)
        np.add.at(mem.refcount, heads, 1)
    return int(p.size)


# --- swap, migration, NUMA -------------------------------------------------------------------------------
def do_swap_page(vmf: VmFault) -> Gen[int]:
    """do_swap_page(): swap-in, migration wait, device-private migrate_to_ram, hwpoison, markers."""
    e = pte_to_swp_entry(vmf.orig_pte)
    mm = vmf.mm
    if non_swap_entry(e):
        if is_migration_entry(e):
            assert vmf.pmdp is not None
            yield from migration_entry_wait(mm, vmf.pmdp, vmf.address)
            return 0
        if x86.is_device_exclusive_entry(e):
            vmf.page = e.offset
            return (yield from remove_device_exclusive_entry(vmf))
        if is_device_private_entry(e):
            return (yield from do_swap_page_device_private(vmf, e))
        if is_hwpoison_entry(e):
            return int(VM_FAULT.HWPOISON)
        if is_pte_marker(e):
            if e.offset & x86.PTE_MARKER_GUARD:
                return int(VM_FAULT.SIGSEGV)
            if e.offset & x86.PTE_MARKER_POISONED:
                return int(VM_FAULT.HWPOISON)
            # uffd-wp marker: handled as a none entry; orig_pte keeps the marker (FAULT_FLAG_ORIG_PTE_VALID)
            return (yield from do_anonymous_page(vmf)) if vma_is_anonymous(vmf.vma) else (yield from do_fault(vmf))
        return int(VM_FAULT.SIGBUS)
    return (yield from mm.machine.swap.swapin(vmf, e))


def do_swap_page_device_private(vmf: VmFault, e: x86.SwpEntry) -> Gen[int]:
    """do_swap_page() (mm/memory.c), the device-private branch: the CPU touched a page that lives in device
    memory; its pgmap's ``migrate_to_ram(vmf)`` brings it back with ``vmf.page`` = the device page.

    Under the PTE lock the entry is re-checked (``pte_same``); a reference is taken while the page cannot be
    freed.  [6.15+, ``profile.do_swap_page_device_lock``] the page is trylocked first and stays locked across
    ``migrate_to_ram`` (``migrate_vma_setup`` requires the fault page locked); if somebody else holds the lock
    (a migration of that page), the fault waits for the unlock and returns 0 (the access retries).  [6.12] only
    the reference is taken.
    """
    from hmmirror.mm.folio import folio_trylock, folio_unlock, folio_wait_locked

    mm = vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    pgmap = machine.pgmap_of(e.offset)
    if pgmap is None or pgmap.ops is None or pgmap.ops.migrate_to_ram is None:
        return int(VM_FAULT.SIGBUS)
    page = e.offset
    vmf.page = page
    assert vmf.pmdp is not None and vmf.ptep is not None
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if pool.get(vmf.ptep) != vmf.orig_pte:
        sched.spin_unlock(ptl)
        return 0
    machine.counters["do_swap_page_device_private"] += 1
    if machine.profile.do_swap_page_device_lock:
        if not folio_trylock(mem, page):
            sched.spin_unlock(ptl)
            machine.counters["do_swap_page_device_locked"] += 1
            yield from folio_wait_locked(mem, page, "migration_entry_wait_on_locked")
            return 0
        mem.get_page(page)
        sched.spin_unlock(ptl)
        ret = yield from _migrate_to_ram_holding(machine, pgmap, vmf, page)
        folio_unlock(mem, page)
        mem.put_page(page)
        return ret
    mem.get_page(page)
    sched.spin_unlock(ptl)
    ret = yield from _migrate_to_ram_holding(machine, pgmap, vmf, page)
    mem.put_page(page)
    return ret


def _migrate_to_ram_holding(machine: Any, pgmap: Any, vmf: VmFault, page: int) -> Gen[int]:
    """``pgmap->ops->migrate_to_ram(vmf)`` while do_swap_page holds its reference on ``page``: the fault's
    reference is listed in ``machine.swap_fault_pages`` meanwhile (checks judge the page as it will be
    once the fault has put it)."""
    held = machine.swap_fault_pages
    held[page] += 1
    try:
        return (yield from pgmap.ops.migrate_to_ram(vmf))
    finally:
        held[page] -= 1
        if not held[page]:
            del held[page]


def remove_device_exclusive_entry(vmf: VmFault) -> Gen[int]:
    """remove_device_exclusive_entry() (mm/memory.c): a CPU access to a device-exclusive entry restores the
    original PTE under the folio lock, after an ``MMU_NOTIFY_EXCLUSIVE`` invalidation (owner NULL) that tells
    the device it lost exclusive access.  Returns 0 (the access retries)."""
    from hmmirror.mm.folio import folio_lock, folio_try_get, folio_unlock

    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    page = vmf.page
    folio = mem.compound_head(page)
    # A reference is needed to lock the folio: without the PTE lock a racing thread may unmap it.
    if not folio_try_get(mem, folio):
        return 0
    yield from folio_lock(mem, folio, "remove_device_exclusive_entry")
    addr = vmf.address & ~(PAGE_SIZE - 1)
    r = mmu_notifier_range_init(MMU_NOTIFY.EXCLUSIVE, vma, mm, addr, addr + PAGE_SIZE, None)
    yield from mmu_notifier_invalidate_range_start(r)
    assert vmf.pmdp is not None and vmf.ptep is not None
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if pool.get(vmf.ptep) == vmf.orig_pte:
        restore_exclusive_pte(vma, page, vmf.ptep)
        machine.counters["device_exclusive_restored"] += 1
    sched.spin_unlock(ptl)
    folio_unlock(mem, folio)
    mem.put_page(folio)
    yield from mmu_notifier_invalidate_range_end(r)
    return 0


def restore_exclusive_pte(vma: VMA, page: int, ptep: Ptr) -> None:
    """restore_exclusive_pte() (mm/memory.c): the page is mapped again, old; writable (and dirty if the folio
    is) when the VMA allows writing and the anonymous page is exclusive (``can_change_pte_writable``).  [6.12,
    not ``make_device_exclusive_single``] the entry had dropped the rmap, which is added back here."""
    mm = vma.vm_mm
    machine, mem = mm.machine, mm.machine.mem
    pte = x86.pfn_pte(page, vma.vm_page_prot) & ~x86._PAGE_ACCESSED
    if vma.vm_flags & VM.WRITE and mem.flags[page] & PG.anon_exclusive:
        if mem.flags[mem.compound_head(page)] & PG.dirty:
            pte = x86.pte_mkdirty(pte)
        pte = x86.pte_mkwrite(pte)
    if not machine.profile.make_device_exclusive_single:
        rmap.page_add_rmap(mem, page)                # folio_add_anon_rmap_pte(RMAP_NONE)
    machine.pool.set(ptep, pte)


def migration_entry_wait(mm: "MMStruct", pmdp: Ptr, address: int, huge: bool = False) -> Gen[None]:
    """migration_entry_wait() / pmd_migration_entry_wait(): sleep until the migration finishes."""
    pool = mm.machine.pool
    if huge:
        p: Ptr = pmdp
    else:
        p = mm.pt.pte_offset_map(pmdp, address)
    orig = pool.get(p)

    def done() -> bool:
        cur = pool.get(p)
        return cur != orig or not is_migration_entry(pte_to_swp_entry(cur))

    yield from sched.wait_event(done, "migration_entry_wait")


def do_numa_page(vmf: VmFault) -> Gen[int]:
    """do_numa_page(): a NUMA-hinting (protnone) fault restores the VMA's protection in place."""
    mm, pool = vmf.mm, vmf.mm.machine.pool
    assert vmf.pmdp is not None and vmf.ptep is not None
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    cur = pool.get(vmf.ptep)
    if cur == vmf.orig_pte:
        pool.set(vmf.ptep, x86.pte_mkyoung(x86.pte_modify(cur, vmf.vma.vm_page_prot)))
    sched.spin_unlock(ptl)
    return 0


# --- unmapping (zap) -------------------------------------------------------------------------------------
def zap_pte_range(vma: VMA, pmdp: Ptr, addr: int, end: int) -> Gen[None]:
    """zap_pte_range(): clear the PTEs of ``[addr, end)`` in one table, dropping mappings (vectorised)."""
    mm = vma.vm_mm
    machine = mm.machine
    pool = machine.pool
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    tid = table_id_of(pool.get(pmdp))
    lo = (addr >> 12) & (PTRS_PER_TABLE - 1)
    hi = lo + ((end - addr) >> 12)
    ents = pool.tables[tid, lo:hi].copy()
    pool.tables[tid, lo:hi] = 0
    sched.spin_unlock(ptl)
    release_entries(machine, ents, pte_level=True)


def release_entries(machine: Any, ents: Any, pte_level: bool) -> None:
    """Drop the mappings held by cleared PTE entries (``ents``: the old values, a uint64 array).

    Present, non-special entries of counted frames lose a mapcount and a reference; swap entries free their
    slot.  (The kernel does this per entry inside zap_pte_range; the effect is the same.)
    """
    import numpy as np

    mem = machine.mem
    present = (ents & np.uint64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE)) != 0
    normal = present & ((ents & np.uint64(_PAGE_SPECIAL)) == 0)
    if normal.any():
        pfns = ((ents[normal] & np.uint64(x86.PTE_PFN_MASK)) >> np.uint64(12)).astype(np.int64)
        pfns = pfns[rmap.counted_mask(mem, pfns, machine.profile.dax_refcounted)]
        if pfns.size:
            np.subtract.at(mem.mapcount, pfns, 1)
            heads = pfns & ~((1 << mem.order[pfns].astype(np.int64)) - 1)
            dev = heads >= mem.nr_ram
            if dev.any():
                # ZONE_DEVICE pages (DAX under dax_refcounted, device-coherent): put_page() one reference at a
                # time, so its device path runs (memremap.put_device_page: page_free when idle again, the
                # page's pgmap reference at zero) -- as the huge leaves' zap (_account_leaf) does
                for h in heads[dev].tolist():
                    mem.put_page(h)
                heads = heads[~dev]
            np.subtract.at(mem.refcount, heads, 1)
            dead = np.unique(heads[mem.refcount[heads] == 0])
            for h in dead.tolist():
                mem.free_folio(h)
    swap = ~present & ((ents & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)) != 0)
    if swap.any():
        keeps_rmap = machine.profile.make_device_exclusive_single
        for e in ents[swap].tolist():
            s = pte_to_swp_entry(int(e))
            if is_device_private_entry(s) or x86.is_device_exclusive_entry(s):
                # zap_nonpresent_ptes(): the entry's rmap and reference go ([6.12] an exclusive entry
                # had no rmap, only the reference)
                if s.offset < mem.nr_pfns:
                    if is_device_private_entry(s) or keeps_rmap:
                        rmap.page_remove_rmap(mem, s.offset)
                    mem.put_page(s.offset)
                continue
            machine.swap.release_entry(s)


def zap_pmd_range(vma: VMA, pudp: Ptr, addr: int, end: int) -> Gen[None]:
    """zap_pmd_range(): whole huge PMDs are zapped, partly covered ones split first (CLEAR [2M))."""
    from hmmirror.mm import huge_memory

    mm = vma.vm_mm
    pool = mm.machine.pool
    while addr < end:
        nxt = x86.PMD_LEVEL.addr_end(addr, end)
        pmdp = mm.pt.pmd_offset(pudp, addr)
        pmd = pool.get(pmdp)
        if not pte_none(pmd):
            if pmd_leaf(pmd) or not pmd & x86._PAGE_PRESENT:
                if nxt - addr == PMD_SIZE:
                    if (yield from huge_memory.zap_huge_pmd(vma, pmdp, addr)):
                        addr = nxt
                        continue
                else:
                    yield from huge_memory.__split_huge_pmd(vma, pmdp, addr)
                pmd = pool.get(pmdp)
            # pmd_none_or_trans_huge_or_clear_bad(): a huge entry that raced in again is left alone
            if not pte_none(pmd) and not pmd_leaf(pmd) and pmd & x86._PAGE_PRESENT:
                yield from zap_pte_range(vma, pmdp, addr, nxt)
        yield from sched.preempt_point("zap_pmd_range")
        addr = nxt


def zap_pud_range(vma: VMA, p4dp: Ptr, addr: int, end: int) -> Gen[None]:
    """zap_pud_range(): PUD leaves (device-dax, 1 GiB hugetlb) are zapped whole, or split (cleared) when
    partly covered."""
    from hmmirror.mm import huge_memory

    mm = vma.vm_mm
    pool = mm.machine.pool
    while addr < end:
        nxt = x86.PUD_LEVEL.addr_end(addr, end)
        pudp = mm.pt.pud_offset(p4dp, addr)
        pud = pool.get(pudp)
        if not pte_none(pud):
            if pud_leaf(pud):
                if nxt - addr == x86.PUD_SIZE:
                    yield from huge_memory.zap_huge_pud(vma, pudp, addr)
                else:
                    yield from huge_memory.__split_huge_pud(vma, pudp, addr)
            else:
                yield from zap_pmd_range(vma, pudp, addr, nxt)
        addr = nxt


def unmap_page_range(vma: VMA, addr: int, end: int) -> Gen[None]:
    """unmap_page_range(): zap every entry of ``[addr, end)`` (within one VMA)."""
    for p4dp, a, nxt in vma.vm_mm.pt.p4d_range(addr, end):
        yield from zap_pud_range(vma, p4dp, a, nxt)


def zap_page_range(vma: VMA, start: int, end: int, event: MMU_NOTIFY = MMU_NOTIFY.CLEAR) -> Gen[None]:
    """zap_page_range_single(): one notifier range around the zap (MADV_DONTNEED, truncate)."""
    r = mmu_notifier_range_init(event, vma, vma.vm_mm, start, end)
    yield from mmu_notifier_invalidate_range_start(r)
    yield from unmap_page_range(vma, start, end)
    yield from mmu_notifier_invalidate_range_end(r)


def free_pgtables(mm: "MMStruct", start: int, end: int) -> None:
    """free_pgtables(): free tables whose whole span no longer intersects any VMA."""
    pt, pool = mm.pt, mm.machine.pool

    def span_free(lo: int, size: int) -> bool:
        return not mm.vmas_in(lo, lo + size)

    def free_level(tid: int, base: int, shift: int, lo: int, hi: int) -> bool:
        """Free children of table ``tid`` (entries map ``1 << shift``) in [lo, hi); True if ``tid`` is empty."""
        if shift == 12:
            return not pool.tables[tid].any()
        size = 1 << shift
        first = max(0, (lo - base) >> shift)
        last = min(PTRS_PER_TABLE, -(-(hi - base) // size))
        for idx in range(first, last):
            a = base + idx * size
            e = int(pool.tables[tid, idx])
            if pte_none(e) or (e & x86._PAGE_PSE) or not e & x86._PAGE_PRESENT:
                continue
            child = table_id_of(e)
            if free_level(child, a, shift - 9, lo, hi) and span_free(a, size):
                pool.free(child)
                pool.tables[tid, idx] = 0
        return not pool.tables[tid].any()

    geo = mm.machine.geo
    lo = start & ~((1 << 21) - 1)
    hi = (end + (1 << 21) - 1) & ~((1 << 21) - 1)
    top_shift = geo.pgdir_shift
    free_level(pt.pgd, 0, top_shift, lo, hi)


# --- pfn and page insertion for drivers and DAX (mm/memory.c) --------------------------------------------
def _get_locked_pte(vma: VMA, addr: int) -> tuple[Ptr | None, sched.Lock | None]:
    """get_locked_pte() without the lock: allocate the levels down to the PTE table of ``addr``.

    Returns (pte pointer, its PTE lock), or (None, None) when a huge leaf maps ``addr`` (callers retry).
    """
    mm = vma.vm_mm
    pt, pool = mm.pt, mm.machine.pool
    pudp = pt.walk_to_pud(addr, alloc=True)
    assert pudp is not None
    if pud_leaf(pool.get(pudp)):
        return None, None
    pmdp = pt.pmd_alloc(pudp, addr)
    pmd = pool.get(pmdp)
    if pmd_leaf(pmd) or (not pte_none(pmd) and not pmd & x86._PAGE_PRESENT):
        return None, None
    pt.pte_alloc(pmdp)
    return pt.pte_offset_map(pmdp, addr), pte_lockptr(mm, pmdp)


def insert_pfn(vma: VMA, addr: int, pfn: int, prot: int, mkwrite: bool, devmap: bool = False) -> Gen[int]:
    """insert_pfn() (mm/memory.c [5.2]): a special PTE (``pte_mkdevmap``: SPECIAL|DEVMAP for a devmap pfn_t).

    An existing entry is left alone, except that ``mkwrite`` on the same pfn sets young/dirty/write in place.
    Takes no page reference.  Returns VM_FAULT_NOPAGE.
    """
    mm = vma.vm_mm
    pool = mm.machine.pool
    ptep, ptl = _get_locked_pte(vma, addr)
    if ptep is None or ptl is None:
        return int(VM_FAULT.NOPAGE)
    yield from sched.spin_lock(ptl)
    cur = pool.get(ptep)
    if not pte_none(cur):
        if mkwrite and pte_pfn(cur) == pfn:
            pool.set(ptep, maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(cur)), vma))
        sched.spin_unlock(ptl)
        return int(VM_FAULT.NOPAGE)
    entry = mk_pte(pfn, prot) | _PAGE_SPECIAL
    if devmap:
        entry |= x86._PAGE_DEVMAP
    if mkwrite:
        entry = maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(entry)), vma)
    pool.set(ptep, entry)
    sched.spin_unlock(ptl)
    return int(VM_FAULT.NOPAGE)


def insert_page(vma: VMA, addr: int, pfn: int, prot: int, mkwrite: bool = False) -> Gen[int]:
    """insert_page() (mm/memory.c; insert_page_into_pte_locked [6.x]): a normal PTE of a refcounted page.

    Takes a page reference and a mapcount (``get_page`` + ``page_add_file_rmap``).  An existing entry gives
    -EBUSY, except ``mkwrite`` on the same pfn, which sets young/dirty/write in place (0).  0 or -errno.
    """
    mm = vma.vm_mm
    pool, mem = mm.machine.pool, mm.machine.mem
    ptep, ptl = _get_locked_pte(vma, addr)
    if ptep is None or ptl is None:
        return -16
    yield from sched.spin_lock(ptl)
    cur = pool.get(ptep)
    if not pte_none(cur):
        ret = -16                                      # -EBUSY
        if mkwrite:
            if pte_pfn(cur) == pfn:
                pool.set(ptep, maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(cur)), vma))
                ret = 0
            else:
                ret = -14                              # WARN_ON_ONCE + -EFAULT
        sched.spin_unlock(ptl)
        return ret
    entry = mk_pte(pfn, prot)
    if mkwrite:
        entry = maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(entry)), vma)
    mem.get_page(pfn)
    rmap.page_add_rmap(mem, pfn)
    pool.set(ptep, entry)
    sched.spin_unlock(ptl)
    return 0


def vmf_insert_pfn(vma: VMA, addr: int, pfn: int) -> Gen[int]:
    """vmf_insert_pfn() (mm/memory.c): a special PTE with ``vm_page_prot``; VM_FAULT_NOPAGE."""
    return (yield from insert_pfn(vma, addr, pfn, vma.vm_page_prot, False))


def _is_devmap_pfn(vma: VMA, pfn: int) -> bool:
    mem = vma.vm_mm.machine.mem
    return pfn < mem.nr_pfns and bool(mem.flags[pfn] & PG.device)


def __vm_insert_mixed(vma: VMA, addr: int, pfn: int, mkwrite: bool) -> Gen[int]:
    """__vm_insert_mixed(): a devmap pfn (pmem page) as a devmap PTE [5.2 .. 6.16] or, where DAX pages are
    refcounted [6.18], as a normal page (``vmf_insert_page_mkwrite``); anything else as a special PTE."""
    machine = vma.vm_mm.machine
    if _is_devmap_pfn(vma, pfn):
        if machine.profile.dax_refcounted:
            ret = yield from insert_page(vma, addr, pfn, vma.vm_page_prot, mkwrite)
            return int(VM_FAULT.NOPAGE) if ret in (0, -16) else int(VM_FAULT.SIGBUS)
        return (yield from insert_pfn(vma, addr, pfn, vma.vm_page_prot, mkwrite,
                                      devmap=machine.profile.devmap_bits))
    return (yield from insert_pfn(vma, addr, pfn, vma.vm_page_prot, mkwrite))


def vmf_insert_mixed(vma: VMA, addr: int, pfn: int) -> Gen[int]:
    """vmf_insert_mixed() (mm/memory.c): see :func:`__vm_insert_mixed`; VM_FAULT_NOPAGE."""
    return (yield from __vm_insert_mixed(vma, addr, pfn, False))


def vmf_insert_mixed_mkwrite(vma: VMA, addr: int, pfn: int) -> Gen[int]:
    """vmf_insert_mixed_mkwrite() (mm/memory.c): as vmf_insert_mixed, writable and dirty if VM_WRITE."""
    return (yield from __vm_insert_mixed(vma, addr, pfn, True))


def vm_insert_page(vma: VMA, addr: int, pfn: int) -> Gen[int]:
    """vm_insert_page() (mm/memory.c): sets VM_MIXEDMAP on first use (mmap lock held for write) and maps a
    refcounted page with ``vm_page_prot`` (read-only for MAP_PRIVATE).  0, -EFAULT outside the VMA, -EINVAL
    for a frame without struct page or a zero page, -EBUSY if an entry exists."""
    if addr < vma.vm_start or addr >= vma.vm_end:
        return -14
    mem = vma.vm_mm.machine.mem
    if pfn >= mem.nr_pfns or mem.flags[pfn] & PG.zero:
        return -22
    if not vma.vm_flags & VM.MIXEDMAP:
        if vma.vm_flags & VM.PFNMAP:
            sched.report("BUG_ON", f"vm_insert_page on a VM_PFNMAP VMA {vma}")
        vma.vm_flags |= VM.MIXEDMAP
    return (yield from insert_page(vma, addr, pfn, vma.vm_page_prot))


def remap_pfn_range(vma: VMA, addr: int, pfn: int, size: int, prot: int) -> int:
    """remap_pfn_range() (mm/memory.c): special PTEs for ``[addr, addr+size)`` -> ``pfn..``, at mmap time.

    Sets VM_IO|VM_PFNMAP|VM_DONTEXPAND|VM_DONTDUMP.  A COW mapping must be remapped whole (``vm_pgoff`` becomes
    ``pfn``), else -EINVAL.  Runs inside ``f_op->mmap`` with the mmap lock held for write, before the VMA is
    visible, so the model writes the tables directly (no PTE lock, no preemption point).  0 or -errno.
    """
    import numpy as np

    from hmmirror.mm.mm_struct import is_cow_mapping

    end = addr + size
    if addr & (PAGE_SIZE - 1) or size <= 0 or size & (PAGE_SIZE - 1):
        return -22
    if is_cow_mapping(vma.vm_flags):
        if addr != vma.vm_start or end != vma.vm_end:
            return -22
        vma.vm_pgoff = pfn
    vma.vm_flags |= VM.IO | VM.PFNMAP | VM.DONTEXPAND | VM.DONTDUMP
    mm = vma.vm_mm
    pt, pool = mm.pt, mm.machine.pool
    flags = (mk_pte(0, prot) | _PAGE_SPECIAL) & x86.PTE_FLAGS_MASK
    a = addr
    while a < end:
        nxt = min((a & ~(PMD_SIZE - 1)) + PMD_SIZE, end)
        pudp = pt.walk_to_pud(a, alloc=True)
        assert pudp is not None
        pmdp = pt.pmd_alloc(pudp, a)
        tid = pt.pte_alloc(pmdp)
        lo = (a >> 12) & (PTRS_PER_TABLE - 1)
        n = (nxt - a) >> 12
        first = pfn + ((a - addr) >> 12)
        if pool.tables[tid, lo: lo + n].any():
            return -17                                 # BUG_ON(!pte_none(*pte)) -> -EEXIST [6.x]
        pfns = np.arange(first, first + n, dtype=np.uint64)
        pool.tables[tid, lo: lo + n] = (pfns << np.uint64(12)) | np.uint64(flags)
        a = nxt
    return 0
