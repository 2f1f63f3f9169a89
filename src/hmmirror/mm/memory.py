"""Page faults and unmapping (mm/memory.c).

``handle_mm_fault`` and everything it calls may sleep: they are generators (see
:mod:`hmmirror.kernel.sched`).  Entry changes happen under the page-table lock of their level, taken with
``yield from spin_lock(...)``; after taking it the code re-checks that the entry is still the one it
decided on (``pte_same``), as the kernel does, because another task may have run in between.

Per-kind fault hooks (page cache, shmem, fsdax, device-dax, hugetlb) live in fs/, drivers/ and mm/hugetlb.py
behind ``vma.vm_ops``; THP in mm/huge_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
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
        if not x86.pmd_present(pmd):               # PMD migration entry
            if is_migration_entry(pte_to_swp_entry(pmd)):
                yield from migration_entry_wait(mm, vmf.pmdp, address, huge=True)
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
        if pte_none(pool.get(vmf.ptep)):
            pool.set(vmf.ptep, entry)
        sched.spin_unlock(ptl)
        return 0
    yield from sched.might_sleep("alloc_zeroed_user_highpage_movable")
    vma.anon_vma = True
    pfn = mem.alloc_page()
    if pfn < 0:
        return int(VM_FAULT.OOM)
    entry = mk_pte(pfn, vma.vm_page_prot)
    if vma.vm_flags & VM.WRITE:
        entry = x86.pte_mkwrite(x86.pte_mkdirty(entry))
    yield from sched.spin_lock(ptl)
    if not pte_none(pool.get(vmf.ptep)):
        sched.spin_unlock(ptl)
        mem.put_page(pfn)
        return 0
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
        if mem.mapcount[pfn] == 1 and int(mem.refcount[head]) == _expected_anon_refs(mem, pfn):
            return wp_page_reuse(vmf)
        sched.spin_unlock(vmf.ptl)
        return (yield from wp_page_copy(vmf, pfn))
    if shared_writable:
        return (yield from wp_page_shared(vmf, pfn))
    sched.spin_unlock(vmf.ptl)
    return (yield from wp_page_copy(vmf, pfn))


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
    vma.anon_vma = True
    new = mem.alloc_page()
    if new < 0:
        return int(VM_FAULT.OOM)
    if old >= 0 and not mem.flags[old] & PG.zero:
        mem.copy(new, old)
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
    """do_fault(): read / private write (COW) / shared write."""
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
    the VMA and to the PTE table of ``addr``."""
    vma = vmf.vma
    start = max(vmf.address & ~(FAULT_AROUND_PAGES * PAGE_SIZE - 1), vma.vm_start)
    table_end = (vmf.address & ~(PMD_SIZE - 1)) + PMD_SIZE
    end = min(start + FAULT_AROUND_PAGES * PAGE_SIZE, vma.vm_end, table_end)
    return start, end


def do_fault_around(vmf: VmFault) -> Gen[int]:
    """do_fault_around(): map already-cached pages of the window under the PTE lock (``map_pages``)."""
    ops = vmf.vma.vm_ops
    assert ops is not None and vmf.pmdp is not None
    if ops.map_pages is None:
        return 0
    mm = vmf.mm
    if pte_none(mm.machine.pool.get(vmf.pmdp)):
        mm.pt.pte_alloc(vmf.pmdp)
    start, end = fault_around_window(vmf)
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    mapped = ops.map_pages(vmf, start, end)
    sched.spin_unlock(ptl)
    return mapped


def __do_fault(vmf: VmFault) -> Gen[int]:
    """__do_fault(): ``vma->vm_ops->fault``; on success ``vmf.page`` holds a referenced pfn."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    ret = yield from ops.fault(vmf)
    return ret


def do_read_fault(vmf: VmFault) -> Gen[int]:
    """do_read_fault(): fault-around first, then ``->fault`` for the page if it is still not mapped."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    if ops.map_pages is not None:
        if hasattr(ops, "readahead"):
            ret = yield from ops.readahead(vmf)
            if ret & (VM_FAULT.RETRY | VM_FAULT.SIGBUS | VM_FAULT.OOM):
                return ret
        yield from do_fault_around(vmf)
        ptep = vmf.mm.pt.pte_offset_map(vmf.pmdp, vmf.address)          # type: ignore[arg-type]
        if not pte_none(vmf.mm.machine.pool.get(ptep)):
            return 0
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        return ret
    return (yield from finish_fault(vmf))


_ERR = VM_FAULT.OOM | VM_FAULT.SIGBUS | VM_FAULT.SIGSEGV | VM_FAULT.HWPOISON | VM_FAULT.HWPOISON_LARGE
VM_FAULT_ERROR_BITS = int(_ERR)     # VM_FAULT_ERROR without FALLBACK (never returned by handle_mm_fault)


def do_cow_fault(vmf: VmFault) -> Gen[int]:
    """do_cow_fault(): private write to an unmapped file page: copy into a new anonymous page."""
    vma, mem = vmf.vma, vmf.mm.machine.mem
    yield from sched.might_sleep("alloc_page_vma")
    vma.anon_vma = True
    vmf.cow_page = mem.alloc_page()
    if vmf.cow_page < 0:
        return int(VM_FAULT.OOM)
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        mem.put_page(vmf.cow_page)
        return ret
    if vmf.page >= 0:
        mem.copy(vmf.cow_page, vmf.page)
        if rmap.counted(mem, vmf.page, vmf.mm.machine.profile.dax_refcounted):
            mem.put_page(vmf.page)
    ret |= yield from finish_fault(vmf)
    return ret


def do_shared_fault(vmf: VmFault) -> Gen[int]:
    """do_shared_fault(): ``->fault``, then ``page_mkwrite`` when the file wants it, then map writable."""
    ops = vmf.vma.vm_ops
    assert ops is not None
    ret = yield from __do_fault(vmf)
    if ret & (_ERR | VM_FAULT.RETRY | VM_FAULT.NOPAGE):
        return ret
    if ops.page_mkwrite is not None:
        r2 = yield from ops.page_mkwrite(vmf, vmf.page)
        if r2 & (_ERR | VM_FAULT.NOPAGE):
            return r2
    return (yield from finish_fault(vmf))


def finish_fault(vmf: VmFault) -> Gen[int]:
    """finish_fault() / alloc_set_pte(): install ``vmf.cow_page`` or ``vmf.page`` at the faulting address."""
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    if pmd_leaf(pool.get(vmf.pmdp)):
        return 0
    mm.pt.pte_alloc(vmf.pmdp)
    vmf.ptep = mm.pt.pte_offset_map(vmf.pmdp, vmf.address)
    ptl = pte_lockptr(mm, vmf.pmdp)
    cow = vmf.write and not vma.vm_flags & VM.SHARED
    pfn = vmf.cow_page if cow else vmf.page
    yield from sched.spin_lock(ptl)
    if not pte_none(pool.get(vmf.ptep)):
        sched.spin_unlock(ptl)
        if rmap.counted(mem, pfn, mm.machine.profile.dax_refcounted):
            mem.put_page(pfn)
        return 0
    entry = mk_pte(pfn, vma.vm_page_prot)
    if vmf.write:
        entry = maybe_mkwrite(x86.pte_mkdirty(entry), vma)
    if cow:
        rmap.page_add_new_anon_rmap(mem, pfn)
    elif rmap.counted(mem, pfn, mm.machine.profile.dax_refcounted):
        rmap.page_add_rmap(mem, pfn)
    pool.set(vmf.ptep, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    return 0


def set_pte_range_from_cache(vmf: VmFault, start: int, pfns: list[tuple[int, int]], writable: bool) -> int:
    """filemap_map_pages() body: map (addr, pfn) pairs into none PTEs of the current table (PTE lock held).

    Each mapped page takes a reference and a mapcount.  Returns the number of entries installed.
    """
    vma, mm = vmf.vma, vmf.mm
    pool, mem = mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    tid = table_id_of(pool.get(vmf.pmdp))
    n = 0
    for addr, pfn in pfns:
        idx = (addr >> 12) & (PTRS_PER_TABLE - 1)
        if not pte_none(int(pool.tables[tid, idx])):
            continue
        entry = mk_pte(pfn, vma.vm_page_prot)
        if not writable:
            entry = x86.pte_wrprotect(entry)
        mem.get_page(pfn)
        rmap.page_add_rmap(mem, pfn)
        pool.tables[tid, idx] = entry
        n += 1
    return n


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
        if is_device_private_entry(e):
            pgmap = mm.machine.pgmap_of(e.offset)
            if pgmap is None or pgmap.ops is None:
                return int(VM_FAULT.SIGBUS)
            return (yield from pgmap.ops.migrate_to_ram(vmf))
        if is_hwpoison_entry(e):
            return int(VM_FAULT.HWPOISON)
        if is_pte_marker(e):
            if e.offset & x86.PTE_MARKER_GUARD:
                return int(VM_FAULT.SIGSEGV)
            if e.offset & x86.PTE_MARKER_POISONED:
                return int(VM_FAULT.HWPOISON)
            vmf.orig_pte = 0                      # uffd-wp marker: handled as a none entry
            return (yield from do_anonymous_page(vmf)) if vma_is_anonymous(vmf.vma) else (yield from do_fault(vmf))
        return int(VM_FAULT.SIGBUS)
    return (yield from mm.machine.swap.swapin(vmf, e))


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
            np.subtract.at(mem.refcount, heads, 1)
            dead = np.unique(heads[(mem.refcount[heads] == 0) & (heads < mem.nr_ram)])
            for h in dead.tolist():
                mem.free_folio(h)
    swap = ~present & ((ents & ~np.uint64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)) != 0)
    if swap.any():
        for e in ents[swap].tolist():
            machine.swap.release_entry(pte_to_swp_entry(int(e)))


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
                    yield from huge_memory.zap_huge_pmd(vma, pmdp, addr)
                    addr = nxt
                    continue
                yield from huge_memory.__split_huge_pmd(vma, pmdp, addr)
                pmd = pool.get(pmdp)
            if not pte_none(pmd):
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
