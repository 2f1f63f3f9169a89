"""Transparent huge pages and huge (PMD/PUD) leaf handling (mm/huge_memory.c).

Covers anonymous THP faults (huge zero page on read, a 2 MiB folio on write), write faults on huge PMDs
(reuse, copy or split per the profile), PMD splits and zaps, PUD leaves (device-dax, 1 GiB hugetlb) and
``vmf_insert_pfn_pmd/pud`` used by DAX fault handlers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_DEVMAP,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    HPAGE_PMD_NR,
    HPAGE_PUD_NR,
    PMD_SIZE,
    PUD_SIZE,
    pfn_pte,
    pmd_leaf,
    pte_none,
    pte_pfn,
    pud_leaf,
)
from hmmirror.include.mm_types import MMU_NOTIFY, VM, VM_FAULT
from hmmirror.include.oom import check_stable_address_space
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.memory import VmFault, maybe_mkwrite, pmd_lockptr
from hmmirror.mm.mm_struct import VMA, vma_is_anonymous
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import LVL_PTE, Ptr

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct


def mk_huge_pmd(pfn: int, prot: int) -> int:
    """mk_huge_pmd(): a PSE leaf mapping the 2 MiB block at ``pfn``."""
    return pfn_pte(pfn, prot) | _PAGE_PSE


def is_huge_zero_pmd(mm: "MMStruct", pmd: int) -> bool:
    """is_huge_zero_pmd()."""
    return pmd_leaf(pmd) and mm.machine.mem.is_huge_zero_pfn(pte_pfn(pmd))


def _account_leaf(mm: "MMStruct", pfn: int, nr: int, delta: int) -> None:
    """Add/remove one mapping of a huge leaf of ``nr`` frames from the counts (if counted)."""
    mem = mm.machine.mem
    if not rmap.counted(mem, pfn, mm.machine.profile.dax_refcounted):
        return
    mem.mapcount[pfn: pfn + nr] += delta
    head = mem.compound_head(pfn)
    if delta > 0:
        mem.refcount[head] += delta
    else:
        mem.put_page(head)


# --- anonymous THP faults --------------------------------------------------------------------------------
def do_huge_pmd_anonymous_page(vmf: VmFault) -> Gen[int]:
    """do_huge_pmd_anonymous_page(): huge zero page on read (``use_zero_page``), a new THP on write."""
    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    haddr = vmf.address & ~(PMD_SIZE - 1)
    if haddr < vma.vm_start or haddr + PMD_SIZE > vma.vm_end:
        return int(VM_FAULT.FALLBACK)
    assert vmf.pmdp is not None
    rmap.anon_vma_prepare(vma)
    ptl = pmd_lockptr(mm, vmf.pmdp)
    if not vmf.write and machine.thp.use_zero_page:
        zpfn = mem.huge_zero_pfn()
        if zpfn < 0:
            return int(VM_FAULT.FALLBACK)
        yield from sched.spin_lock(ptl)
        ret = 0
        if pte_none(pool.get(vmf.pmdp)):
            ret = check_stable_address_space(mm)
            if not ret:
                pool.set(vmf.pmdp, x86.pte_wrprotect(mk_huge_pmd(zpfn, vma.vm_page_prot)))
                if machine.profile.huge_zero_per_mm:
                    mm.huge_zero_ref = True
        sched.spin_unlock(ptl)
        return ret
    yield from sched.might_sleep("vma_alloc_folio(HPAGE_PMD_ORDER)")
    head = mem.alloc_folio(9)
    if head < 0:
        machine.counters["thp_fault_fallback"] += 1
        return int(VM_FAULT.FALLBACK)
    entry = maybe_mkwrite(x86.pte_mkdirty(mk_huge_pmd(head, vma.vm_page_prot)), vma)
    yield from sched.spin_lock(ptl)
    if not pte_none(pool.get(vmf.pmdp)):
        sched.spin_unlock(ptl)
        mem.put_page(head)
        return 0
    ret = check_stable_address_space(mm)                 # __do_huge_pmd_anonymous_page()
    if ret:
        sched.spin_unlock(ptl)
        mem.put_page(head)
        return ret
    rmap.page_add_new_anon_rmap(mem, head, HPAGE_PMD_NR)
    pool.set(vmf.pmdp, x86.pte_mkyoung(entry))
    sched.spin_unlock(ptl)
    machine.counters["thp_fault_alloc"] += 1
    return 0


def huge_pmd_set_accessed(vmf: VmFault, pmd: int) -> Gen[None]:
    """huge_pmd_set_accessed()."""
    mm = vmf.mm
    assert vmf.pmdp is not None
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if mm.machine.pool.get(vmf.pmdp) == pmd:
        new = x86.pte_mkyoung(pmd)
        if vmf.write:
            new = x86.pte_mkdirty(new)
        mm.machine.pool.set(vmf.pmdp, new)
    sched.spin_unlock(ptl)


def huge_pud_set_accessed(vmf: VmFault, pud: int) -> Gen[None]:
    """huge_pud_set_accessed(): under the PUD lock (``mm.page_table_lock``)."""
    mm = vmf.mm
    assert vmf.pudp is not None
    yield from sched.spin_lock(mm.page_table_lock)
    if mm.machine.pool.get(vmf.pudp) == pud:
        mm.machine.pool.set(vmf.pudp, x86.pte_mkyoung(pud))
    sched.spin_unlock(mm.page_table_lock)


def wp_huge_pmd(vmf: VmFault, pmd: int) -> Gen[int]:
    """wp_huge_pmd(): anonymous -> do_huge_pmd_wp_page; file -> ``huge_fault`` or split + FALLBACK.

    [5.2] a file VMA with ``huge_fault`` gets its result as is (DAX splits on fallback itself); [5.8+]
    (``profile.wp_huge_split_on_fallback``) only shared VMAs try ``huge_fault`` and a FALLBACK splits here.
    """
    vma = vmf.vma
    if vma_is_anonymous(vma):
        return (yield from do_huge_pmd_wp_page(vmf, pmd))
    ops = vma.vm_ops
    if not vma.vm_mm.machine.profile.wp_huge_split_on_fallback:
        if ops is not None and ops.huge_fault is not None:
            return (yield from ops.huge_fault(vmf, "pmd"))
    elif ops is not None and ops.huge_fault is not None and vma.vm_flags & (VM.SHARED | VM.MAYSHARE):
        ret = yield from ops.huge_fault(vmf, "pmd")
        if not ret & VM_FAULT.FALLBACK:
            return ret
    assert vmf.pmdp is not None
    yield from __split_huge_pmd(vma, vmf.pmdp, vmf.address)
    return int(VM_FAULT.FALLBACK)


def do_huge_pmd_wp_page(vmf: VmFault, orig_pmd: int) -> Gen[int]:
    """do_huge_pmd_wp_page(): huge zero -> new THP; exclusive -> reuse; shared -> copy [5.2] or split [6.18].

    [5.2] (``not profile.thp_cow_split``): the new THP is allocated only while THP is enabled for the VMA; for
    a shared THP without one, do_huge_pmd_wp_page_fallback() copies it into 512 small pages, and only if that
    fails too the PMD is split (FALLBACK).  [6.18] the huge zero page is always replaced by a new THP when one
    can be allocated (do_huge_zero_wp_pmd); [6.12] never: the huge zero PMD is split and the write falls back
    to the PTE (profile ``huge_zero_wp_new_thp``).  Reuse marks the page anon-exclusive again [6.x].
    """
    from hmmirror.mm.memory import transparent_hugepage_enabled

    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    haddr = vmf.address & ~(PMD_SIZE - 1)
    pfn = pte_pfn(orig_pmd)
    ptl = pmd_lockptr(mm, vmf.pmdp)
    huge_zero = is_huge_zero_pmd(mm, orig_pmd)
    if huge_zero and not machine.profile.huge_zero_wp_new_thp:
        # [6.12] `if (is_huge_zero_pmd(orig_pmd)) goto fallback`: split into zero-page PTEs, and the PTE
        # fault that follows (do_wp_page -> wp_page_copy) copies the written page only
        yield from __split_huge_pmd(vma, vmf.pmdp, vmf.address)
        return int(VM_FAULT.FALLBACK)
    if not huge_zero:
        yield from sched.spin_lock(ptl)
        if pool.get(vmf.pmdp) != orig_pmd:
            sched.spin_unlock(ptl)
            return 0
        if mem.mapcount[pfn] == 1 and int(mem.refcount[mem.compound_head(pfn)]) == 1:
            mem.flags[pfn: pfn + HPAGE_PMD_NR] |= PG.anon_exclusive      # SetPageAnonExclusive() [6.x]
            pool.set(vmf.pmdp, maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(orig_pmd)), vma))
            sched.spin_unlock(ptl)
            return int(VM_FAULT.WRITE)
        sched.spin_unlock(ptl)
        if machine.profile.thp_cow_split:
            yield from __split_huge_pmd(vma, vmf.pmdp, vmf.address)
            return int(VM_FAULT.FALLBACK)
    # [5.2] copy of a shared THP, and (both) the huge zero page: a new THP replaces the PMD
    new = -1
    if machine.profile.thp_cow_split or transparent_hugepage_enabled(vma):
        yield from sched.might_sleep("vma_alloc_folio(HPAGE_PMD_ORDER)")
        new = mem.alloc_folio(9)
    if new < 0:
        machine.counters["thp_fault_fallback"] += 1
        if not huge_zero:
            ret = yield from do_huge_pmd_wp_page_fallback(vmf, orig_pmd, pfn)
            if not ret & VM_FAULT.OOM:
                return ret
        yield from __split_huge_pmd(vma, vmf.pmdp, vmf.address)
        return int(VM_FAULT.FALLBACK)
    if not huge_zero:
        for k in range(HPAGE_PMD_NR):
            if pfn + k in mem.contents:
                mem.copy(new + k, pfn + k)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PMD_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    yield from sched.spin_lock(ptl)
    if pool.get(vmf.pmdp) == orig_pmd:
        entry = maybe_mkwrite(x86.pte_mkdirty(mk_huge_pmd(new, vma.vm_page_prot)), vma)
        rmap.page_add_new_anon_rmap(mem, new, HPAGE_PMD_NR)
        pool.set(vmf.pmdp, x86.pte_mkyoung(entry))
        _account_leaf(mm, pfn, HPAGE_PMD_NR, -1)
        new = -1
    sched.spin_unlock(ptl)
    if new >= 0:
        mem.put_page(new)
    yield from mmu_notifier_invalidate_range_end(r)
    return int(VM_FAULT.WRITE)


def do_huge_pmd_wp_page_fallback(vmf: VmFault, orig_pmd: int, pfn: int) -> Gen[int]:
    """do_huge_pmd_wp_page_fallback() [5.2]: copy a shared THP into 512 new small pages (all writable if
    ``VM_WRITE``) under CLEAR [2M); VM_FAULT_OOM when the small pages cannot be allocated."""
    import numpy as np

    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem = mm.machine, mm.machine.pool, mm.machine.mem
    assert vmf.pmdp is not None
    haddr = vmf.address & ~(PMD_SIZE - 1)
    yield from sched.might_sleep("alloc_page_vma_node")
    pages = mem.alloc_pages_bulk(HPAGE_PMD_NR)
    if pages.size < HPAGE_PMD_NR:
        for p in pages.tolist():
            mem.put_page(p)
        return int(VM_FAULT.OOM)
    for k, p in enumerate(pages.tolist()):
        if pfn + k in mem.contents:
            mem.copy(p, pfn + k)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PMD_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if pool.get(vmf.pmdp) != orig_pmd:
        sched.spin_unlock(ptl)
        for p in pages.tolist():
            mem.put_page(p)
        yield from mmu_notifier_invalidate_range_end(r)
        return 0
    pool.set(vmf.pmdp, 0)                                  # pmdp_huge_clear_flush_notify()
    tid = pool.alloc(LVL_PTE)
    entry = maybe_mkwrite(x86.pte_mkdirty(pfn_pte(0, vma.vm_page_prot)), vma)
    pool.tables[tid, :] = (pages.astype(np.uint64) << np.uint64(12)) | np.uint64(entry)
    mem.mapcount[pages] = 1                                # page_add_new_anon_rmap() for each page
    mem.flags[pages] |= PG.anon | PG.anon_exclusive
    pool.set(vmf.pmdp, x86.mk_table_entry(tid))
    _account_leaf(mm, pfn, HPAGE_PMD_NR, -1)               # page_remove_rmap(page, true) + put_page()
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    machine.counters["cow_copies"] += HPAGE_PMD_NR
    return int(VM_FAULT.WRITE)


def do_huge_pmd_numa_page(vmf: VmFault, pmd: int) -> Gen[int]:
    """do_huge_pmd_numa_page(): restore the VMA protection on a protnone PMD leaf."""
    mm = vmf.mm
    assert vmf.pmdp is not None
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if mm.machine.pool.get(vmf.pmdp) == pmd:
        mm.machine.pool.set(vmf.pmdp, x86.pte_mkyoung(x86.pte_modify(pmd, vmf.vma.vm_page_prot)))
    sched.spin_unlock(ptl)
    return 0


# --- split and zap ---------------------------------------------------------------------------------------
def __split_huge_pmd(vma: VMA, pmdp: Ptr, address: int) -> Gen[None]:
    """__split_huge_pmd(): notifier CLEAR over the 2 MiB block, then split under the PMD lock."""
    mm = vma.vm_mm
    haddr = address & ~(PMD_SIZE - 1)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PMD_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    ptl = pmd_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    pmd = mm.machine.pool.get(pmdp)
    if pmd_leaf(pmd) or (not pte_none(pmd) and not pmd & x86._PAGE_PRESENT):
        __split_huge_pmd_locked(vma, pmdp, haddr, pmd)
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    mm.machine.counters["thp_split_pmd"] += 1


def __split_huge_pmd_locked(vma: VMA, pmdp: Ptr, haddr: int, pmd: int) -> None:
    """__split_huge_pmd_locked(): file/DAX leaves (huge zero PMDs included) are cleared; anon leaves become
    512 PTEs with the same pfns and permissions; an anon huge zero PMD becomes 512 zero-page PTEs; migration
    entries 512 PTE ones."""
    mm = vma.vm_mm
    pool, mem = mm.machine.pool, mm.machine.mem
    import numpy as np

    if not vma_is_anonymous(vma):                  # file/DAX VMAs: a huge zero PMD is cleared too (obs-6.1)
        pool.set(pmdp, 0)
        if pmd & x86._PAGE_PRESENT or pmd & x86._PAGE_PROTNONE:
            _account_leaf(mm, pte_pfn(pmd), HPAGE_PMD_NR, -1)
        return
    tid = pool.alloc(LVL_PTE)
    k = np.arange(HPAGE_PMD_NR, dtype=np.uint64)
    if is_huge_zero_pmd(mm, pmd):
        zero = pfn_pte(mem.zero_pfn, vma.vm_page_prot) | _PAGE_SPECIAL
        pool.tables[tid, :] = np.uint64(x86.pte_wrprotect(zero))
    elif pmd & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE):
        flags = pmd & x86.PTE_FLAGS_MASK & ~_PAGE_PSE
        base = pte_pfn(pmd)
        pool.tables[tid, :] = ((np.uint64(base) + k) << np.uint64(12)) | np.uint64(flags)
        head = mem.compound_head(base)
        mem.refcount[head] += HPAGE_PMD_NR - 1     # one reference per PTE mapping from now on
    else:                                          # PMD migration entry -> PTE migration entries
        e = x86.pte_to_swp_entry(pmd)
        vals = [x86.swp_entry_to_pte(x86.SwpEntry(e.type, e.offset + i)) for i in range(HPAGE_PMD_NR)]
        pool.tables[tid, :] = np.array(vals, dtype=np.uint64)
    pool.set(pmdp, x86.mk_table_entry(tid))


def split_huge_pmd_address(vma: VMA, address: int) -> Gen[None]:
    """split_huge_pmd_address(): split the huge PMD mapping ``address``, if any (VMA boundary changes)."""
    mm = vma.vm_mm
    level, p, e = mm.pt.lookup(address)
    if level == "pmd" and p is not None and not pte_none(e) and (pmd_leaf(e) or not e & x86._PAGE_PRESENT):
        yield from __split_huge_pmd(vma, p, address)


def zap_huge_pmd(vma: VMA, pmdp: Ptr, addr: int) -> Gen[bool]:
    """zap_huge_pmd(): clear a whole PMD leaf (THP, huge zero page, DAX, hugetlb 2 MiB).

    As __pmd_trans_huge_lock(), the entry is re-checked under the PMD lock: if it is no longer a huge (or
    migration) entry (split meanwhile), nothing is done and False is returned, so the caller zaps the PTEs.
    """
    mm = vma.vm_mm
    ptl = pmd_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    pmd = mm.machine.pool.get(pmdp)
    if pte_none(pmd) or not (pmd_leaf(pmd) or not pmd & x86._PAGE_PRESENT):
        sched.spin_unlock(ptl)
        return False
    mm.machine.pool.set(pmdp, 0)
    sched.spin_unlock(ptl)
    if pmd & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE):
        _account_leaf(mm, pte_pfn(pmd), HPAGE_PMD_NR, -1)
    return True


def zap_huge_pud(vma: VMA, pudp: Ptr, addr: int) -> Gen[None]:
    """zap_huge_pud(): clear a whole PUD leaf (device-dax 1 GiB, hugetlb 1 GiB)."""
    mm = vma.vm_mm
    yield from sched.spin_lock(mm.page_table_lock)
    pud = mm.machine.pool.get(pudp)
    mm.machine.pool.set(pudp, 0)
    sched.spin_unlock(mm.page_table_lock)
    if pud & x86._PAGE_PRESENT:
        _account_leaf(mm, pte_pfn(pud), HPAGE_PUD_NR, -1)


def __split_huge_pud(vma: VMA, pudp: Ptr, address: int) -> Gen[None]:
    """__split_huge_pud(): DAX PUD leaves are simply cleared (refaulted later); notifier CLEAR [1G)."""
    mm = vma.vm_mm
    haddr = address & ~(PUD_SIZE - 1)
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PUD_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    yield from zap_huge_pud(vma, pudp, address)
    yield from mmu_notifier_invalidate_range_end(r)


# --- pfn insertion for DAX -------------------------------------------------------------------------------
def _devmap_leaf(mm: "MMStruct", pfn: int, prot: int) -> int:
    entry = pfn_pte(pfn, prot) | _PAGE_PSE
    if mm.machine.profile.devmap_bits:
        entry |= _PAGE_DEVMAP
    return entry


def vmf_insert_pfn_pmd(vmf: VmFault, pfn: int, write: bool) -> Gen[int]:
    """vmf_insert_pfn_pmd(): map a 2 MiB device block (devmap PMD [5.2..6.16]) under the PMD lock."""
    vma, mm = vmf.vma, vmf.mm
    pool = mm.machine.pool
    assert vmf.pmdp is not None
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    cur = pool.get(vmf.pmdp)
    if not pte_none(cur):
        if write and pte_pfn(cur) == pfn and pmd_leaf(cur):
            pool.set(vmf.pmdp, maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(cur)), vma))
        sched.spin_unlock(ptl)
        return int(VM_FAULT.NOPAGE)
    entry = _devmap_leaf(mm, pfn, vma.vm_page_prot)
    if write:
        entry = maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(entry)), vma)
    pool.set(vmf.pmdp, entry)
    _account_leaf(mm, pfn, HPAGE_PMD_NR, +1)
    sched.spin_unlock(ptl)
    return int(VM_FAULT.NOPAGE)


def vmf_insert_pfn_pud(vmf: VmFault, pfn: int, write: bool) -> Gen[int]:
    """vmf_insert_pfn_pud(): map a 1 GiB device block (devmap PUD [5.2..6.16]) under the PUD lock."""
    vma, mm = vmf.vma, vmf.mm
    pool = mm.machine.pool
    assert vmf.pudp is not None
    yield from sched.spin_lock(mm.page_table_lock)
    cur = pool.get(vmf.pudp)
    if not pte_none(cur):
        if write and pte_pfn(cur) == pfn and pud_leaf(cur):
            pool.set(vmf.pudp, maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(cur)), vma))
        sched.spin_unlock(mm.page_table_lock)
        return int(VM_FAULT.NOPAGE)
    entry = _devmap_leaf(mm, pfn, vma.vm_page_prot)
    if write:
        entry = maybe_mkwrite(x86.pte_mkyoung(x86.pte_mkdirty(entry)), vma)
    pool.set(vmf.pudp, entry)
    _account_leaf(mm, pfn, HPAGE_PUD_NR, +1)
    sched.spin_unlock(mm.page_table_lock)
    return int(VM_FAULT.NOPAGE)


def set_huge_zero_pmd(vmf: VmFault) -> Gen[int]:
    """dax_pmd_load_hole() / set_huge_zero_page(): map the huge zero folio read-only."""
    mm, vma = vmf.mm, vmf.vma
    zpfn = mm.machine.mem.huge_zero_pfn()
    if zpfn < 0:
        return int(VM_FAULT.FALLBACK)
    assert vmf.pmdp is not None
    ptl = pmd_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if pte_none(mm.machine.pool.get(vmf.pmdp)):
        mm.machine.pool.set(vmf.pmdp, x86.pte_wrprotect(mk_huge_pmd(zpfn, vma.vm_page_prot)))
        if mm.machine.profile.huge_zero_per_mm:
            mm.huge_zero_ref = True
    sched.spin_unlock(ptl)
    return int(VM_FAULT.NOPAGE)


_ = (VM, PG)


# --- folio split (mm/huge_memory.c split_huge_page_to_list_to_order) --------------------------------------------
def _folio_pmd_maps(machine: "Any", folio: int) -> list:
    """The ``(mm, addr)`` of every PMD leaf that maps ``folio``."""
    import numpy as np

    from hmmirror.mm.debug import LEVEL_PMD, leaf_entries

    mem = machine.mem
    pmd_maps = []
    for mm in list(machine.mms.values()):
        if mm.exited:
            continue
        addrs, vals, lvls = leaf_entries(mm)
        big = (lvls == LEVEL_PMD) & ((vals & np.uint64(x86._PAGE_PSE)) != 0)
        for a, v in zip(addrs[big].tolist(), vals[big].tolist()):
            if mem.compound_head(pte_pfn(int(v))) == folio:
                pmd_maps.append((mm, int(a)))
    return pmd_maps


def _folio_refs_are_mappings(machine: "Any", folio: int, n: int, pmd_maps: list, caller_refs: int) -> bool:
    """can_split_folio() / folio_ref_freeze(folio, 1 + extra_pins): the folio's references are exactly one per
    leaf entry mapping it and the caller's (a PMD leaf holds one reference, a PTE one per page)."""
    mem = machine.mem
    ptes = int(mem.mapcount[folio: folio + n].sum()) - len(pmd_maps) * n
    return int(mem.refcount[folio]) == ptes + len(pmd_maps) + caller_refs


def _unmap_folio_ptes(machine: "Any", folio: int, n: int, pmd_mms: set) -> Gen[None]:
    """unmap_folio() -> try_to_migrate_one() [6.15+] for the PTE mappings of ``folio`` (a PMD mapping is split
    under its own invalidation): each VMA's span of the folio is invalidated (``MMU_NOTIFY_CLEAR``), and its
    entries go through migration entries and back (``remap_page()``).  A present PTE comes back as it was; a
    device-exclusive entry (which keeps its rmap since 6.15) is not a writable device-private entry, so it
    becomes a readable (exclusive) migration entry and comes back as a read-only present PTE -- the device
    loses its exclusive access.  The model keeps references and mapcounts (the same before and after)."""
    import numpy as np

    spans: dict[tuple[int, int], list] = {}
    for mm, addr, _e in rmap.rmap_find(machine, np.arange(folio, folio + n), kinds=("present", "device")):
        if id(mm) in pmd_mms:
            continue
        vma = mm.vma_lookup(addr)
        if vma is None:
            continue
        sp = spans.setdefault((id(mm), id(vma)), [mm, vma, addr, addr + x86.PAGE_SIZE])
        sp[2], sp[3] = min(sp[2], addr), max(sp[3], addr + x86.PAGE_SIZE)
    for mm, vma, lo, hi in spans.values():
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, lo, hi)
        yield from mmu_notifier_invalidate_range_start(r)
        for a in range(lo, hi, x86.PAGE_SIZE):
            level, ptep, pte = mm.pt.lookup(a)
            if level != "pte" or ptep is None or pte_none(pte) or x86.pte_present(pte):
                continue
            e = x86.pte_to_swp_entry(pte)
            if e.type == x86.SwpType.SWP_DEVICE_EXCLUSIVE and folio <= e.offset < folio + n:
                machine.pool.set(ptep, pfn_pte(e.offset, vma.vm_page_prot))
        yield from mmu_notifier_invalidate_range_end(r)


def split_folio(machine: "Any", folio: int, caller_refs: int = 1) -> Gen[int]:
    """split_folio() (mm/huge_memory.c __folio_split, 6.x): split an anonymous THP into 512 order-0 pages.

    Refused with -EAGAIN when the folio has references beyond its mappings and the caller's: first the racy
    ``can_split_folio()`` check, then, after the mappings were unmapped (``unmap_folio``; the PMD splits can
    sleep in notifiers, so another task may take a reference -- GUP -- in between), ``folio_ref_freeze()``
    again; when that fails the folio stays whole and ``remap_page()`` maps it back with PTEs (the PMD stays
    split).  -EBUSY for a non-anonymous or non-THP folio.  PMD mappings of the folio in every mm are split
    first (model: ``__split_huge_pmd``), then every subpage becomes its own folio: its references are its
    mappings (the head keeps the caller's).  The caller holds the folio lock; the split holds the folio's
    anon_vma root rwsem for write.
    """
    mem = machine.mem
    if folio >= mem.nr_ram or not mem.flags[folio] & PG.thp or not mem.flags[folio] & PG.head:
        return -16
    if not mem.flags[folio] & PG.anon:
        return -16
    # folio_get_anon_vma() + anon_vma_lock_write(): the split (unmap_folio with TTU_RMAP_LOCKED, the PMD
    # splits and their invalidations, remap_page) runs with the anon_vma root rwsem held for write
    anon_vma = rmap.folio_anon_vma(machine, folio)
    if anon_vma is not None:
        yield from rmap.anon_vma_lock_write(anon_vma)
    try:
        return (yield from _split_anon_folio(machine, folio, caller_refs))
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_write(anon_vma)


def _split_anon_folio(machine: "Any", folio: int, caller_refs: int) -> Gen[int]:
    """__folio_split() (mm/huge_memory.c, 6.x) of the anonymous THP ``folio`` once its anon_vma is locked:
    can_split_folio(), unmap_folio(), folio_ref_freeze(), the split itself (see :func:`split_folio`)."""
    mem = machine.mem
    n = 1 << int(mem.order[folio])
    pmd_maps = _folio_pmd_maps(machine, folio)
    if not _folio_refs_are_mappings(machine, folio, n, pmd_maps, caller_refs):     # can_split_folio()
        return -11
    if machine.profile.make_device_exclusive_single:
        yield from _unmap_folio_ptes(machine, folio, n, {id(mm) for mm, _ in pmd_maps})
    for mm, a in pmd_maps:
        vma = mm.vma_lookup(a)
        if vma is None:
            continue
        level, p, _ = mm.pt.lookup(a)
        if level == "pmd" and p is not None:
            yield from __split_huge_pmd(vma, p, a)
    # folio_ref_freeze(folio, 1 + extra_pins) after unmap_folio(): a reference taken while the PMD splits
    # slept (GUP of one of its pages) makes it fail; remap_page() leaves the folio PTE-mapped, whole
    if not _folio_refs_are_mappings(machine, folio, n, _folio_pmd_maps(machine, folio), caller_refs):
        return -11
    # every mapping is a PTE now; give each subpage its own references
    fl = int(mem.flags[folio])
    keep = fl & (PG.anon | PG.dirty | PG.uptodate | PG.swapbacked)
    mem.flags[folio: folio + n] = (mem.flags[folio: folio + n] & PG.anon_exclusive) | keep
    mem.flags[folio] |= fl & PG.locked
    mem.order[folio: folio + n] = 0
    mem.refcount[folio: folio + n] = mem.mapcount[folio: folio + n]
    mem.refcount[folio] += caller_refs
    machine.counters["thp_split_page"] += 1
    return 0
