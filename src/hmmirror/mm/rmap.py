"""Reverse-map counting (mm/rmap.c): mapcount updates for mapped frames.

Only mapcount is touched here; references are taken and dropped by the callers exactly where the kernel
does (a new anonymous page's allocation reference becomes its mapping's reference; a page-cache page's
``->fault`` reference becomes the mapping's; fork takes one with ``get_page``).  Frames that mappings do not
count (the zero pages, special pfns, device frames under profiles where DAX is not refcounted) are skipped
by :func:`counted`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.mm.page_alloc import PG, PhysMem

if TYPE_CHECKING:
    from hmmirror.kernel.sched import Gen
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import VMA, MMStruct


# --- anon_vma (include/linux/rmap.h, mm/rmap.c) ------------------------------------------------------------
class AnonVma:
    """``struct anon_vma`` as the model keeps it: one object per family of anonymous VMAs -- made by the first
    anon_vma_prepare() of a VMA and shared by the VMAs split off it and by fork's children, as every anon_vma
    of a fork tree shares one ``root`` -- holding only the root's ``rwsem``: every rmap walk of an anonymous
    folio takes it for read (rmap_walk_anon, folio_lock_anon_vma_read), mm_take_all_locks() for write
    (vm_lock_anon_vma), a THP split and khugepaged's collapse for write.  No anon_vma_chain, no interval tree
    and no per-page pointer: the model's rmap walks scan the page tables (:func:`rmap_find`) and find a folio's
    anon_vma through the VMA of a mapping of it (:func:`folio_anon_vma`)."""

    __slots__ = ("root", "rwsem", "mm")

    def __init__(self, name: str) -> None:
        from hmmirror.kernel.sched import Lock, lockdep_set_class

        self.root = self                 # a family's first anon_vma is its root (anon_vma_alloc: root = self)
        self.mm: Any = None              # ours: the mm whose VMA made the family (reusable_anon_vma)
        self.rwsem = lockdep_set_class(Lock(f"{name}.anon_vma.rwsem", "rwsem"), "&anon_vma->rwsem")

    def __repr__(self) -> str:
        return f"<anon_vma {self.rwsem.name}>"


def anon_vma_prepare(vma: "VMA") -> "AnonVma":
    """anon_vma_prepare() (mm/rmap.c [5.2] / [6.x]): give ``vma`` its anon_vma before its first anonymous page
    -- a neighbour's when find_mergeable_anon_vma() finds one it may share (so the two VMAs can merge again
    later), else a new family."""
    av = vma.anon_vma
    if av is None:
        av = find_mergeable_anon_vma(vma)
        if av is None:
            av = AnonVma(f"{vma.vm_mm.name}[{vma.vm_start:#x}]")
            av.mm = vma.vm_mm
        vma.anon_vma = av
    return av


def find_mergeable_anon_vma(vma: "VMA") -> "AnonVma | None":
    """find_mergeable_anon_vma() (mm/vma.c [6.x], mm/mmap.c [5.2]): the anon_vma of the next, else the previous
    VMA when it is adjacent and anon_vma_compatible() (same file, flags equal but for the access bits,
    contiguous pgoff) and reusable_anon_vma() (the neighbour's anon_vma chain is singular: it is not a VMA
    that fork gave this mm -- ours: the family was made in this mm)."""
    from hmmirror.include.mm_types import VM

    mm = vma.vm_mm
    access = int(VM.READ | VM.WRITE | VM.EXEC)

    def compatible(a: "VMA", b: "VMA") -> bool:                 # anon_vma_compatible(a, b): a below b
        return (a.vm_end == b.vm_start and a.vm_file is b.vm_file
                and not ((a.vm_flags ^ b.vm_flags) & ~access)
                and b.vm_pgoff == a.vm_pgoff + ((a.vm_end - a.vm_start) >> 12))

    for other in (mm.vma_lookup(vma.vm_end), mm.vma_lookup(vma.vm_start - 1) if vma.vm_start else None):
        if other is None or other is vma or other.anon_vma is None:
            continue
        ok = compatible(vma, other) if other.vm_start >= vma.vm_end else compatible(other, vma)
        if ok and other.anon_vma.mm is mm:
            return other.anon_vma
    return None


def anon_vma_lock_read(anon_vma: AnonVma) -> "Gen[None]":
    """anon_vma_lock_read() / folio_lock_anon_vma_read() (include/linux/rmap.h, mm/rmap.c [5.2] / [6.x]): the
    root's rwsem for read.  folio_lock_anon_vma_read() (the ``anon_lock`` of try_to_unmap/try_to_migrate)
    tries down_read_trylock() before it sleeps; the model does so for every reader, so an uncontended walk
    takes no preemption point (as mm_take_all_locks()'s mutex), only a contended one sleeps in down_read()."""
    from hmmirror.kernel import sched

    rwsem = anon_vma.root.rwsem
    if not sched.down_read_trylock(rwsem):
        yield from sched.down_read(rwsem)


def anon_vma_unlock_read(anon_vma: AnonVma) -> None:
    """anon_vma_unlock_read() (include/linux/rmap.h [5.2] / [6.x])."""
    from hmmirror.kernel import sched

    sched.up_read(anon_vma.root.rwsem)


def anon_vma_lock_write(anon_vma: AnonVma) -> "Gen[None]":
    """anon_vma_lock_write() (include/linux/rmap.h [5.2] / [6.x]): the root's rwsem for write (uncontended:
    no preemption point, as :func:`anon_vma_lock_read`; contended: down_write() sleeps)."""
    from hmmirror.kernel import sched

    rwsem = anon_vma.root.rwsem
    if not sched.down_write_trylock(rwsem):
        yield from sched.down_write(rwsem)


def anon_vma_unlock_write(anon_vma: AnonVma) -> None:
    """anon_vma_unlock_write() (include/linux/rmap.h [5.2] / [6.x])."""
    from hmmirror.kernel import sched

    sched.up_write(anon_vma.root.rwsem)


def vma_anon_vma(mm: "MMStruct", addr: int) -> "AnonVma | None":
    """Ours: the anon_vma of the VMA mapping ``addr`` in ``mm`` (None: no VMA, or one without anon_vma)."""
    vma = mm.vma_lookup(addr)
    return vma.anon_vma if vma is not None else None


def folio_anon_vma(machine: "Machine", folio: int,
                   found: "list[tuple[MMStruct, int, int]] | None" = None) -> "AnonVma | None":
    """folio_anon_vma() (mm/util.c [6.x], page_anon_vma [5.2]): the anon_vma of an anonymous folio, None for
    any other.  Ours: the kernel reads ``folio->mapping``; the model takes the anon_vma of the VMA of the
    folio's first mapping (``found``: :func:`rmap_find`'s entries of the folio, scanned when not given) -- the
    same family, since a folio is only ever mapped in the VMAs of the family that faulted it in."""
    mem = machine.mem
    if folio >= mem.nr_pfns or not mem.flags[folio] & PG.anon:
        return None
    if found is None:
        n = 1 << int(mem.order[folio]) if folio < mem.nr_ram else 1
        found = rmap_find(machine, np.arange(folio, folio + n, dtype=np.int64))
    for mm, addr, _ in found:
        av = vma_anon_vma(mm, addr)
        if av is not None:
            return av
    return None


def by_anon_vma(found: "list[tuple[MMStruct, int, int]]"
                ) -> "list[tuple[AnonVma | None, list[tuple[MMStruct, int, int]]]]":
    """Ours: ``found`` (rmap entries) grouped by the anon_vma family of their VMA, in first-seen order -- one
    group per folio's family, each walked under its own read lock as rmap_walk_anon() walks one folio."""
    groups: dict[int, tuple[AnonVma | None, list[tuple[MMStruct, int, int]]]] = {}
    for ent in found:
        av = vma_anon_vma(ent[0], ent[1])
        root = av.root if av is not None else None
        g = groups.get(id(root))
        if g is None:
            g = groups[id(root)] = (root, [])
        g[1].append(ent)
    return list(groups.values())


def counted(mem: PhysMem, pfn: int, dax_refcounted: bool) -> bool:
    """Is a mapping of ``pfn`` reflected in refcount/mapcount?"""
    if pfn >= mem.nr_pfns:
        return False
    fl = int(mem.flags[pfn])
    if fl & PG.zero:
        return False
    if fl & PG.device:
        return dax_refcounted
    if pfn >= mem.nr_ram and fl & PG.reserved:
        return False            # a device range after memunmap_pages: no struct page any more
    return True


def counted_mask(mem: PhysMem, pfns: np.ndarray, dax_refcounted: bool) -> np.ndarray:
    """Vectorised :func:`counted` over an array of pfns."""
    inside = pfns < mem.nr_pfns
    fl = np.zeros(pfns.shape, dtype=np.uint32)
    fl[inside] = mem.flags[pfns[inside]]
    ok = inside & ((fl & PG.zero) == 0)
    ok &= ~((pfns >= mem.nr_ram) & ((fl & PG.reserved) != 0) & ((fl & PG.device) == 0))   # memunmap_pages done
    dev = (fl & PG.device) != 0
    if not dax_refcounted:
        ok &= ~dev
    return ok


def page_add_new_anon_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_add_new_anon_rmap() / folio_add_new_anon_rmap(): first mapping of a new anon page or THP."""
    mem.mapcount[pfn: pfn + nr] = 1
    mem.flags[pfn: pfn + nr] |= PG.anon | PG.anon_exclusive


def page_add_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_add_file_rmap() / page_dup_rmap() / page_add_anon_rmap(): one more mapping of ``nr`` frames."""
    mem.mapcount[pfn: pfn + nr] += 1


def page_remove_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_remove_rmap(): one mapping of ``nr`` frames less."""
    mem.mapcount[pfn: pfn + nr] -= 1


# --- reverse-map walks (ours: a batched scan of the page tables stands for the anon_vma / i_mmap walk) ------------
def rmap_find(machine: "Machine", pfns: np.ndarray, kinds: tuple[str, ...] = ("present", "device", "migration")
              ) -> list[tuple["MMStruct", int, int]]:
    """Ours (what rmap_walk() visits): every PTE-level entry of a live mm that names one of ``pfns``, as
    ``(mm, address, entry)``.  ``kinds``: ``"present"`` (present, non-special PTEs mapping the frame),
    ``"device"`` (device-private and device-exclusive entries), ``"migration"`` (migration entries).
    The kernel walks the folio's anon_vma or mapping; the model scans the page tables of every mm once
    (vectorised), which finds the same entries wherever they moved."""
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.mm.debug import LEVEL_PTE, leaf_entries

    out: list[tuple["MMStruct", int, int]] = []
    if not len(pfns):
        return out
    want = np.unique(np.asarray(pfns, dtype=np.int64))
    u = np.uint64
    types: list[int] = []
    if "device" in kinds:
        types += [int(x86.SwpType.SWP_DEVICE_PRIVATE_READ), int(x86.SwpType.SWP_DEVICE_PRIVATE_WRITE),
                  int(x86.SwpType.SWP_DEVICE_EXCLUSIVE)]
    if "migration" in kinds:
        types += [int(x86.SwpType.SWP_MIGRATION_READ), int(x86.SwpType.SWP_MIGRATION_WRITE),
                  int(x86.SwpType.SWP_MIGRATION_READ_EXCLUSIVE)]
    for mm in list(machine.mms.values()):
        if mm.exited:
            continue
        addrs, vals, lvls = leaf_entries(mm)
        if not addrs.size:
            continue
        pte = lvls == LEVEL_PTE
        present = (vals & u(x86._PAGE_PRESENT | x86._PAGE_PROTNONE)) != 0
        hit = np.zeros(addrs.shape, dtype=bool)
        if "present" in kinds:
            normal = pte & present & ((vals & u(x86._PAGE_SPECIAL)) == 0)
            pf = ((vals & u(x86.PTE_PFN_MASK)) >> u(12)).astype(np.int64)
            hit |= normal & np.isin(pf, want)
        if types:
            swp = pte & ~present
            typ = (vals >> u(x86.SWP_TYPE_SHIFT)).astype(np.int64)
            off = ((~(vals >> u(x86.SWP_OFFSET_SHIFT))) & u(x86.SWP_OFFSET_MASK)).astype(np.int64)
            hit |= swp & np.isin(typ, types) & np.isin(off, want)
        for a, v in zip(addrs[hit].tolist(), vals[hit].tolist()):
            out.append((mm, int(a), int(v)))
    return out


def try_to_migrate(machine: "Machine", folio: int) -> "Gen[None]":
    """try_to_migrate() / try_to_migrate_one() (mm/rmap.c): replace every remaining mapping of ``folio`` (a
    present PTE, or a device-private entry) by a migration entry -- writable if the mapping was, readable-
    exclusive for an exclusive anonymous page, else readable -- under an MMU_NOTIFY_CLEAR invalidation of the
    page, dropping the mapping's rmap and reference.  The walk of an anonymous folio holds its anon_vma root
    rwsem for read (rmap_walk_anon).  Mappings of a pinned exclusive page are left alone
    (folio_try_share_anon_rmap_pte() fails), so the caller sees the folio still mapped."""
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.include.mm_types import MMU_NOTIFY
    from hmmirror.kernel import sched
    from hmmirror.mm.folio import folio_maybe_dma_pinned
    from hmmirror.mm.mmu_notifier import (
        mmu_notifier_invalidate_range_end,
        mmu_notifier_invalidate_range_start,
        mmu_notifier_range_init,
    )

    mem = machine.mem
    n = 1 << int(mem.order[folio]) if folio < mem.nr_ram else 1
    pfns = np.arange(folio, folio + n, dtype=np.int64)
    found = rmap_find(machine, pfns, kinds=("present", "device"))
    av = folio_anon_vma(machine, folio, found)
    if av is not None:                                # rmap_walk_anon(): the walk holds the root rwsem, read
        yield from anon_vma_lock_read(av)
    try:
        for mm, addr, _ in found:
            vma = mm.vma_lookup(addr)
            if vma is None:
                continue
            r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + x86.PAGE_SIZE)
            yield from mmu_notifier_invalidate_range_start(r)
            ptep, ptl = _pte_and_ptl(mm, addr)
            if ptep is not None:
                yield from sched.spin_lock(ptl)
                pte = machine.pool.get(ptep)
                _try_to_migrate_pte(machine, ptep, pte, pfns, folio_maybe_dma_pinned(mem, folio))
                sched.spin_unlock(ptl)
            yield from mmu_notifier_invalidate_range_end(r)
    finally:
        if av is not None:
            anon_vma_unlock_read(av)


def _pte_and_ptl(mm: "MMStruct", addr: int) -> tuple[Any, Any]:
    """The PTE slot mapping ``addr`` in ``mm`` and its table's split lock, as page_vma_mapped_walk() maps and
    locks it; (None, None) where no PTE table maps ``addr`` (a hole or a huge entry)."""
    from hmmirror.mm.memory import pte_lockptr

    level, ptep, _ = mm.pt.lookup(addr)
    if level != "pte" or ptep is None:
        return None, None
    pudp = mm.pt.walk_to_pud(addr)
    assert pudp is not None
    return ptep, pte_lockptr(mm, mm.pt.pmd_offset(pudp, addr))


def _try_to_migrate_pte(machine: "Machine", ptep: "Any", pte: int, pfns: np.ndarray, pinned: bool) -> None:
    from hmmirror.arch.x86 import pgtable as x86

    mem = machine.mem
    if x86.pte_none(pte):
        return
    if x86.pte_present(pte):
        if x86.pte_special(pte):
            return
        page = x86.pte_pfn(pte)
        writable = x86.pte_write(pte)
    else:
        e = x86.pte_to_swp_entry(pte)
        if not x86.is_device_private_entry(e):
            return
        page = e.offset
        writable = x86.is_writable_device_private_entry(e)
    if page < int(pfns[0]) or page > int(pfns[-1]):
        return
    anon_exclusive = bool(mem.flags[page] & PG.anon) and bool(mem.flags[page] & PG.anon_exclusive)
    if anon_exclusive:
        if x86.pte_present(pte) and pinned:
            return                                            # folio_try_share_anon_rmap_pte() failed
        mem.flags[page] &= PG.mask(PG.anon_exclusive)
    if writable:
        t = x86.SwpType.SWP_MIGRATION_WRITE
    elif anon_exclusive:
        t = x86.SwpType.SWP_MIGRATION_READ_EXCLUSIVE
    else:
        t = x86.SwpType.SWP_MIGRATION_READ
    if x86.pte_present(pte) and pte & x86._PAGE_DIRTY:
        mem.flags[mem.compound_head(page)] |= PG.dirty
    machine.pool.set(ptep, x86.swp_entry_to_pte(x86.SwpEntry(int(t), page)))
    page_remove_rmap(mem, page)
    mem.put_page(page)


# --- device-exclusive access (mm/rmap.c) ------------------------------------------------------------------
MAKE_DEVICE_EXCLUSIVE_RETRIES = 16


def make_device_exclusive(mm: "MMStruct", addr: int, owner: Any) -> "Gen[tuple[int, int]]":
    """make_device_exclusive(mm, addr, owner, &folio) (mm/rmap.c, 6.15+): mark one page for exclusive use by a
    device.  Returns ``(page, folio)`` -- the folio locked and referenced -- or ``(-errno, -1)``.

    The page is faulted in writable (GUP with FOLL_WRITE | FOLL_SPLIT_PMD; an existing device-exclusive entry
    of another device is converted back by that fault first); only anonymous non-hugetlb folios are
    supported (-EOPNOTSUPP).  Under an ``MMU_NOTIFY_EXCLUSIVE`` invalidation carrying ``owner`` (the caller
    must filter its own event), the PTE is re-checked to still map the page writable (else the whole thing
    is retried) and is replaced by a device-exclusive entry; the entry keeps the page's rmap and the PTE's
    reference.  A CPU access restores the PTE (remove_device_exclusive_entry()).  Caller holds mmap_lock.
    """
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.include.mm_types import MMU_NOTIFY, VM
    from hmmirror.kernel import sched
    from hmmirror.mm.folio import folio_lock, folio_unlock
    from hmmirror.mm.gup import FOLL_GET, FOLL_SPLIT_PMD, FOLL_WRITE, get_user_page_vma_remote
    from hmmirror.mm.mmu_notifier import (
        mmu_notifier_invalidate_range_end,
        mmu_notifier_invalidate_range_start,
        mmu_notifier_range_init,
    )

    machine = mm.machine
    mem = machine.mem
    if not mm.mmap_sem.held_by(sched.current()):
        sched.report("lockdep", f"make_device_exclusive on {mm.name} without mmap_lock")
    addr &= ~(x86.PAGE_SIZE - 1)
    for _ in range(MAKE_DEVICE_EXCLUSIVE_RETRIES):
        page, vma = yield from get_user_page_vma_remote(mm, addr, FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD)
        if page < 0 or vma is None:
            return (page if page < 0 else -14), -1
        folio = mem.compound_head(page)
        if not mem.flags[folio] & PG.anon or mem.flags[folio] & PG.hugetlb or vma.vm_flags & VM.HUGETLB:
            mem.put_page(folio)
            return -95, -1                                      # -EOPNOTSUPP
        yield from folio_lock(mem, folio, "make_device_exclusive")
        r = mmu_notifier_range_init(MMU_NOTIFY.EXCLUSIVE, vma, mm, addr, addr + x86.PAGE_SIZE, owner)
        yield from mmu_notifier_invalidate_range_start(r)
        ptep, ptl = _pte_and_ptl(mm, addr)
        ok = ptep is not None
        if ok:
            yield from sched.spin_lock(ptl)
            pte = machine.pool.get(ptep)
            # folio_walk_start(): still the same page, mapped by a writable PTE?
            ok = bool(pte & x86._PAGE_PRESENT) and not x86.pte_special(pte) and x86.pte_pfn(pte) == page \
                and x86.pte_write(pte)
            if ok:
                if pte & x86._PAGE_DIRTY:
                    mem.flags[folio] |= PG.dirty                # folio_mark_dirty()
                machine.pool.set(ptep, x86.swp_entry_to_pte(x86.SwpEntry(int(x86.SwpType.SWP_DEVICE_EXCLUSIVE),
                                                                          page)))
            sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
        if ok:
            machine.counters["make_device_exclusive"] += 1
            return page, folio
        folio_unlock(mem, folio)
        mem.put_page(folio)
    sched.report("livelock", f"make_device_exclusive({addr:#x}) retried {MAKE_DEVICE_EXCLUSIVE_RETRIES} times")
    return -16, -1


def make_device_exclusive_range(mm: "MMStruct", start: int, end: int, owner: Any) -> "Gen[list[int] | int]":
    """make_device_exclusive_range(mm, start, end, pages, owner) (mm/rmap.c, 5.14 - 6.14): fault the range in
    writable with GUP, then for each page trylock it and convert its mappings with an rmap walk
    (folio_make_device_exclusive(): ``MMU_NOTIFY_EXCLUSIVE`` with ``owner``, the PTE becomes a device-exclusive
    entry that drops the rmap but keeps the reference).  Returns the pages (pfn, or -1 where the page could
    not be locked or made exclusive; those hold no reference), or -errno from GUP.  Marked pages are returned
    locked and referenced."""
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.mm.folio import folio_trylock, folio_unlock
    from hmmirror.mm.gup import FOLL_GET, FOLL_SPLIT_PMD, FOLL_WRITE, __get_user_pages

    machine = mm.machine
    mem = machine.mem
    npages = (end - start) >> x86.PAGE_SHIFT
    got = yield from __get_user_pages(mm, start, npages, FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD)
    if isinstance(got, int):
        return got
    pages: list[int] = list(got)
    for i, page in enumerate(pages):
        addr = start + i * x86.PAGE_SIZE
        folio = mem.compound_head(page)
        if folio != page or not folio_trylock(mem, folio):          # PageTail() or locked
            mem.put_page(folio)
            pages[i] = -1
            continue
        valid = False
        if mem.flags[folio] & PG.anon and not mem.flags[folio] & PG.hugetlb:
            found = rmap_find(machine, np.array([page]), kinds=("present",))
            av = folio_anon_vma(machine, folio, found)
            if av is not None:                     # folio_make_device_exclusive() -> rmap_walk(): read-locked
                yield from anon_vma_lock_read(av)
            try:
                valid = yield from _make_device_exclusive_walk(machine, mm, addr, page, folio, found, owner)
            finally:
                if av is not None:
                    anon_vma_unlock_read(av)
        if not (valid and mem.mapcount[page] == 0):
            folio_unlock(mem, folio)
            mem.put_page(folio)
            pages[i] = -1
    machine.counters["make_device_exclusive"] += sum(1 for p in pages if p >= 0)
    return pages


def _make_device_exclusive_walk(machine: "Machine", mm: "MMStruct", addr: int, page: int, folio: int,
                                found: list[tuple["MMStruct", int, int]], owner: Any) -> "Gen[bool]":
    """page_make_device_exclusive_one() (mm/rmap.c, 5.14 - 6.14) for every mapping ``found`` of ``page``: under
    ``MMU_NOTIFY_EXCLUSIVE`` with ``owner`` the PTE becomes a device-exclusive entry.  Whether the mapping at
    ``addr`` of ``mm`` was writable (the caller's page is valid)."""
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.include.mm_types import MMU_NOTIFY
    from hmmirror.kernel import sched
    from hmmirror.mm.mmu_notifier import (
        mmu_notifier_invalidate_range_end,
        mmu_notifier_invalidate_range_start,
        mmu_notifier_range_init,
    )

    mem = machine.mem
    valid = False
    for om, oaddr, _ in found:
        vma = om.vma_lookup(oaddr)
        if vma is None:
            continue
        r = mmu_notifier_range_init(MMU_NOTIFY.EXCLUSIVE, vma, om, oaddr, oaddr + x86.PAGE_SIZE, owner)
        yield from mmu_notifier_invalidate_range_start(r)
        ptep, ptl = _pte_and_ptl(om, oaddr)
        if ptep is not None:
            yield from sched.spin_lock(ptl)
            pte = machine.pool.get(ptep)
            if pte & x86._PAGE_PRESENT and x86.pte_pfn(pte) == page:
                if om is mm and oaddr == addr and x86.pte_write(pte):
                    valid = True
                if pte & x86._PAGE_DIRTY:
                    mem.flags[folio] |= PG.dirty
                machine.pool.set(ptep, x86.swp_entry_to_pte(
                    x86.SwpEntry(int(x86.SwpType.SWP_DEVICE_EXCLUSIVE), page)))
                page_remove_rmap(mem, page)                   # [6.12] the entry has no rmap
            sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
    return valid
