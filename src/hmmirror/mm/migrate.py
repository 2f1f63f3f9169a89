"""migrate_pages() of a PMD-mapped anonymous THP (mm/migrate.c, mm/huge_memory.c; 5.2 and 6.x with
CONFIG_ARCH_ENABLE_THP_MIGRATION, as x86-64 has it).

The 4 KiB case is ``hmmirror.sim.kevents.migrate_page``.  A THP mapped by a PMD is migrated whole:

* ``try_to_migrate_one`` -> ``set_pmd_migration_entry`` (mm/huge_memory.c): notifier CLEAR over the folio's
  2 MiB, then under the PMD lock ``pmdp_invalidate`` and a PMD *migration entry* (writable if the PMD was,
  readable-exclusive for an exclusive anonymous folio [6.x], else readable); the folio loses the PMD's
  mapcount, the migration keeps its reference (the isolation reference).
* the copy: the migration entry stays for ``hold`` preemption points -- faults wait on it
  (``pmd_migration_entry_wait``), HMM walks wait or report it (``hmm_vma_walk_pmd``), mprotect/fork/munmap/split
  handle it (change_huge_pmd, copy_huge_pmd, zap_huge_pmd, __split_huge_pmd_locked: 512 PTE migration entries).
* ``remove_migration_ptes`` -> ``remove_migration_pmd``: every migration entry of the old folio, in every mm,
  is replaced by the new THP (a PMD, or the PTEs of the new subpages where the PMD was split meanwhile); no
  notifier (the entries were not present).  If no new THP can be allocated the old one is mapped back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.memory import pmd_lockptr, pte_lockptr
from hmmirror.mm.mm_struct import vma_is_anonymous
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, EBUSY, EAGAIN = 22, 16, 11


def anon_thp_pmd(mm: "MMStruct", addr: int) -> tuple[Any, Any, int, int] | None:
    """(vma, pmdp, pmd, head) of a present PMD-mapped anonymous THP at ``addr`` that only that PMD maps and
    only it references (migrate_pages skips shared and pinned folios), else None."""
    vma = mm.vma_lookup(addr)
    if vma is None or not vma_is_anonymous(vma) or vma.vm_flags & VM.HUGETLB:
        return None
    level, pmdp, pmd = mm.pt.lookup(addr)
    if level != "pmd" or pmdp is None or not pmd & x86._PAGE_PRESENT or not x86.pmd_leaf(pmd):
        return None
    mem = mm.machine.mem
    head = x86.pte_pfn(pmd)
    if head >= mem.nr_ram or mem.is_huge_zero_pfn(head) or not mem.flags[head] & PG.anon:
        return None
    if int(mem.order[head]) != 9 or int(mem.refcount[head]) != 1 or (mem.mapcount[head: head + HPAGE_PMD_NR] != 1).any():
        return None
    return vma, pmdp, pmd, head


def _migration_type(pmd: int) -> int:
    """make_migration_entry(page, pmd_write(pmd)) [5.2] (the model's 4 KiB migration uses the same two kinds;
    6.x's readable-exclusive kind is kept as the folio's PG_anon_exclusive instead)."""
    return int(x86.SwpType.SWP_MIGRATION_WRITE if x86.pte_write(pmd) else x86.SwpType.SWP_MIGRATION_READ)


def set_pmd_migration_entry(mm: "MMStruct", vma: Any, haddr: int, pmd: int, head: int) -> Gen[bool]:
    """set_pmd_migration_entry() under try_to_migrate_one() (mm/huge_memory.c): notifier CLEAR over the
    folio's 2 MiB, then under the PMD lock the PMD becomes a migration entry (pmdp_invalidate + set_pmd_at);
    the folio loses the PMD's mapcount (the migration keeps its reference).  False if the PMD changed."""
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PMD_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    ok = False
    level, pmdp, cur = mm.pt.lookup(haddr)
    if level == "pmd" and pmdp is not None:
        ptl = pmd_lockptr(mm, pmdp)
        yield from sched.spin_lock(ptl)
        if pool.get(pmdp) == pmd:
            t = _migration_type(pmd)
            if pmd & x86._PAGE_DIRTY:
                mem.flags[head] |= PG.dirty
            pool.set(pmdp, x86.swp_entry_to_pte(x86.SwpEntry(t, head)))
            rmap.page_remove_rmap(mem, head, HPAGE_PMD_NR)      # page_remove_rmap(page, vma, true)
            ok = True
        sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    return ok


def _is_migration_of(e: int, lo: int, hi: int) -> bool:
    if x86.pte_none(e) or e & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE):
        return False
    s = x86.pte_to_swp_entry(e)
    return x86.is_migration_entry(s) and lo <= s.offset < hi


def remove_migration_pmd(mm: "MMStruct", haddr: int, old: int, new: int, exclusive: bool) -> Gen[int]:
    """remove_migration_ptes() for one mm: remove_migration_pmd() where the PMD still holds the migration
    entry of ``old`` (the THP ``new`` mapped by a PMD), else the PTE migration entries of its subpages (the
    PMD was split meanwhile: each becomes a PTE of the matching subpage of ``new``).  Returns the mappings
    made."""
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    if mm.exited:
        return 0
    from hmmirror.mm.huge_memory import mk_huge_pmd
    from hmmirror.mm.memory import maybe_mkwrite

    # rmap_walk visits every VMA that maps the folio: after a split (munmap/mprotect of part of the 2 MiB)
    # haddr itself may lie in no VMA while the rest of the range still holds PTE migration entries
    vma = mm.vma_lookup(haddr)
    level, pmdp, pmd = mm.pt.lookup(haddr)
    mapped = 0
    if vma is not None and level == "pmd" and pmdp is not None and _is_migration_of(pmd, old, old + 1):
        ptl = pmd_lockptr(mm, pmdp)
        yield from sched.spin_lock(ptl)
        pmd = pool.get(pmdp)
        if _is_migration_of(pmd, old, old + 1):
            s = x86.pte_to_swp_entry(pmd)
            entry = x86.pte_mkyoung(mk_huge_pmd(new, vma.vm_page_prot))
            if x86.is_writable_migration_entry(s):
                entry = maybe_mkwrite(x86.pte_mkdirty(entry), vma)
            rmap.page_add_rmap(mem, new, HPAGE_PMD_NR)             # page_add_anon_rmap(RMAP_COMPOUND)
            if exclusive:                                            # RMAP_EXCLUSIVE
                mem.flags[new: new + HPAGE_PMD_NR] |= PG.anon_exclusive
            pool.set(pmdp, entry)
            mem.refcount[new] += 1                                  # folio_get(folio)
            mapped += 1
        sched.spin_unlock(ptl)
        if mapped:
            return mapped
        level, _p, _e = mm.pt.lookup(haddr)               # split while we waited for the PMD lock
    if level != "pte":
        return 0
    # the PMD was split meanwhile: remove_migration_pte() for each PTE migration entry of a subpage
    pudp = mm.pt.walk_to_pud(haddr)
    pmdp = mm.pt.pmd_offset(pudp, haddr)
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    for i in range(HPAGE_PMD_NR):
        a = haddr + i * PAGE_SIZE
        lv, ptep, e = mm.pt.lookup(a)
        if lv != "pte" or ptep is None or not _is_migration_of(e, old, old + HPAGE_PMD_NR):
            continue
        avma = mm.vma_lookup(a)                   # the VMA of this subpage (the range may be split)
        if avma is None:
            continue
        s = x86.pte_to_swp_entry(e)
        sub = new + (s.offset - old)
        pte = x86.pte_mkyoung(x86.pfn_pte(sub, avma.vm_page_prot))
        if x86.is_writable_migration_entry(s):
            pte = maybe_mkwrite(x86.pte_mkdirty(pte), avma)
        pool.set(ptep, pte)
        rmap.page_add_rmap(mem, sub)
        if exclusive:
            mem.flags[sub] |= PG.anon_exclusive
        mem.refcount[new] += 1                    # remove_migration_pte(): folio_get(folio) per entry
        mapped += 1
    sched.spin_unlock(ptl)
    return mapped


def migrate_thp(mm: "MMStruct", addr: int, hold: int) -> Gen[int]:
    """migrate_pages() of the PMD-mapped anonymous THP at ``addr``: PMD migration entry, copy (the entry stays
    ``hold`` preemption points), remove_migration_pmd with a new THP (the old one if none can be allocated);
    the unmap and the remap walks each hold the anon_vma root rwsem for read (rmap_walk_anon).
    0, or -EINVAL (no such THP), -EAGAIN (the PMD changed before it was replaced)."""
    got = anon_thp_pmd(mm, addr)
    if got is None:
        return -EINVAL
    vma, _pmdp, pmd, old = got
    machine = mm.machine
    mem = machine.mem
    exclusive = bool(mem.flags[old] & PG.anon_exclusive)
    haddr = addr & ~(PMD_SIZE - 1)
    yield from sched.might_sleep("migrate_pages")
    anon_vma = vma.anon_vma                         # try_to_migrate() -> rmap_walk_anon(): root rwsem, read
    if anon_vma is not None:
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        ok = yield from set_pmd_migration_entry(mm, vma, haddr, pmd, old)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    if not ok:
        return -EAGAIN
    machine.log("migrate_unmap_pmd", mm=mm.name, addr=haddr, pfn=old)
    for _ in range(hold):
        yield from sched.preempt_point("migrate_folio_copy")
    new = mem.alloc_folio(9)
    if new >= 0:
        for i in range(HPAGE_PMD_NR):
            if old + i in mem.contents:
                mem.copy(new + i, old + i)
        mem.flags[new: new + HPAGE_PMD_NR] |= PG.anon
        mem.flags[new] |= mem.flags[old] & PG.dirty
    target = new if new >= 0 else old
    mapped = 0
    if anon_vma is not None:                        # remove_migration_ptes() -> rmap_walk_anon(): read
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        for omm in list(machine.mms.values()):      # the rmap walk finds every copy (fork) of the entry
            if omm.exited:
                continue
            mapped += yield from remove_migration_pmd(omm, haddr, old, target, exclusive and omm is mm)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    # references: remove_migration_pmd took one per mapping as it made it; the new folio's own reference goes
    # only after the whole walk (migrate_folio_move), so an unmap racing the walk cannot free it
    if new >= 0:
        mem.put_page(new)
    mem.put_page(old)                               # the migration's reference on the old folio
    machine.log("migrate_remap_pmd", mm=mm.name, addr=haddr, old=old, new=target, mapped=mapped)
    return 0
