"""Device memory migration (mm/migrate_device.c, include/linux/migrate.h, the remove_migration_ptes part of
mm/migrate.c; 6.18, with the 6.12 differences as profile fields).

A driver moves pages between system memory and its device-private memory in three steps:

1. ``migrate_vma_setup(args)`` collects the pages of ``[args.start, args.end)`` (one VMA) under an
   ``MMU_NOTIFY_MIGRATE`` invalidation whose ``owner`` is ``args.pgmap_owner`` (so the driver can ignore its own
   event), replaces each present PTE it can migrate by a migration entry, takes a reference and the folio lock
   of every page, and drops the pages that cannot move (pinned, locked by somebody else, not selected, file or
   shmem pages later).  ``args.src[i]`` tells the driver what it got: ``MIGRATE_PFN_MIGRATE`` (may move) with
   ``MIGRATE_PFN_VALID`` and a pfn when a page backs the address, or without one for a none / zero-page entry
   of anonymous memory (the driver may populate it).
2. The driver allocates destination pages (device pages with ``zone_device_page_init``, or system pages it
   locks), copies the data and fills ``args.dst``; then ``migrate_vma_pages(args)`` moves the struct-page state
   (refused for file/shmem pages going to device memory and for pages with unexpected references) and installs
   destination pages where there was none.
3. ``migrate_vma_finalize(args)`` replaces every migration entry by the destination (or the source when that
   page did not move), unlocks and releases both.

``migrate_device_range`` / ``migrate_device_pfns`` start the same machine from device pfns instead of a VMA
(eviction: the driver does not know where its pages are mapped); ``migrate_device_pages`` /
``migrate_device_finalize`` finish it.

Model notes:

* ``src``/``dst`` are numpy ``uint64`` arrays of migrate pfns (``pfn << MIGRATE_PFN_SHIFT | flags``), as the
  kernel's ``unsigned long`` arrays; no Python object per page.
* The reverse map (``try_to_migrate``, ``remove_migration_ptes``) is a batched scan of the page tables of every
  live mm for the entries naming the frames (:func:`hmmirror.mm.rmap.rmap_find`), where the kernel walks the
  anon_vma; the entries found and replaced are the same.
* The LRU is not modelled: ``folio_isolate_lru`` always succeeds (it takes the reference the kernel takes)
  and ``lru_add_drain*`` are no-ops.
* Page contents are not copied here: the driver copies (as in the kernel); ``migrate_vma_pages`` only moves
  the page's identity (anon mapping, flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    SwpEntry,
    SwpType,
    is_device_private_entry,
    is_migration_entry,
    is_writable_device_private_entry,
    is_writable_migration_entry,
    pte_none,
    pte_pfn,
    pte_present,
    pte_to_swp_entry,
    pte_write,
    swp_entry_to_pte,
    table_id_of,
)
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.include.oom import check_stable_address_space
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.folio import (
    folio_get,
    folio_maybe_dma_pinned,
    folio_put,
    folio_test_locked,
    folio_trylock,
    folio_unlock,
)
from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE, page_pgmap
from hmmirror.mm.mm_struct import VMA, is_vm_hugetlb_page, vma_is_anonymous, vma_is_dax
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, EAGAIN, EBUSY = 22, 11, 16

# include/linux/migrate.h
MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_SHIFT = 6

# enum migrate_vma_direction
MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2

_U = np.uint64
_VM_SPECIAL = VM.IO | VM.DONTEXPAND | VM.PFNMAP | VM.MIXEDMAP


def migrate_pfn(pfn: int) -> int:
    """migrate_pfn(): ``(pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID``."""
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def _entries(src_pfns: np.ndarray, npages: int, dst_pfns: np.ndarray | None = None) -> list[int]:
    """Ours: the indices below ``npages`` whose src (or dst) migrate pfn is not 0, ascending -- the only ones
    the per-entry loops act on (an all-zero entry names no page and is skipped by each of them), so a loop
    over these does exactly what the kernel's loop over every entry does, without visiting the empty ones
    (a dmirror chunk is 65 536 pfns, mostly free)."""
    live = src_pfns[:npages] != 0
    if dst_pfns is not None:
        live |= dst_pfns[:npages] != 0
    return np.flatnonzero(live).tolist()


def migrate_pfn_to_page(mpfn: int) -> int:
    """migrate_pfn_to_page(): the pfn of a migrate pfn, or -1 (NULL) without MIGRATE_PFN_VALID."""
    if not mpfn & MIGRATE_PFN_VALID:
        return -1
    return mpfn >> MIGRATE_PFN_SHIFT


@dataclass(eq=False)
class MigrateVma:
    """``struct migrate_vma`` (include/linux/migrate.h).

    ``src``/``dst``: uint64 arrays of at least ``(end - start) >> PAGE_SHIFT`` entries (allocated when None);
    ``fault_page``: the locked device-private page of a ``migrate_to_ram`` fault, or -1; ``owner_events``
    collects nothing: the invalidation events are in ``machine.events``.
    """

    vma: VMA | None
    start: int
    end: int
    src: Any = None
    dst: Any = None
    pgmap_owner: Any = None
    flags: int = 0
    fault_page: int = -1
    npages: int = 0
    cpages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = max(0, (self.end - self.start) >> PAGE_SHIFT)
        if self.src is None:
            self.src = np.zeros(n, dtype=np.uint64)
        if self.dst is None:
            self.dst = np.zeros(n, dtype=np.uint64)


def _machine(vma: VMA) -> "Machine":
    return vma.vm_mm.machine


def _locks_fault_page(machine: "Machine") -> bool:
    """[6.15+] the fault page arrives locked by do_swap_page(); [6.12] collect trylocks it like any page."""
    return bool(machine.profile.do_swap_page_device_lock)


def _has_mapping(mem: Any, pfn: int) -> bool:
    """``page->mapping != NULL``: anonymous (anon_vma), page-cache or shmem pages have one; a driver page
    inserted with vm_insert_page() has none."""
    return bool(mem.flags[pfn] & (PG.anon | PG.file | PG.swapbacked))


def folio_mapping(mem: Any, pfn: int) -> bool:
    """folio_mapping() != NULL: page-cache and shmem folios (an anonymous folio outside the swap cache: NULL)."""
    return bool(mem.flags[mem.compound_head(pfn)] & (PG.file | PG.swapbacked)) and \
        not mem.flags[mem.compound_head(pfn)] & PG.anon


def is_device_private_page(machine: "Machine", pfn: int) -> bool:
    """is_device_private_page()."""
    pgmap = page_pgmap(machine, pfn)
    return pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE


def folio_is_zone_device(mem: Any, pfn: int) -> bool:
    """folio_is_zone_device()."""
    return 0 <= pfn < mem.nr_pfns and bool(mem.flags[pfn] & PG.device)


# --- collection (the page-table walk) --------------------------------------------------------------------------
def migrate_vma_collect_skip(start: int, end: int, walk: Any) -> int:
    """migrate_vma_collect_skip(): the pages of ``[start, end)`` are not migrated (src = dst = 0)."""
    migrate: MigrateVma = walk.private
    n = (end - start) >> PAGE_SHIFT
    migrate.src[migrate.npages: migrate.npages + n] = 0
    migrate.dst[migrate.npages: migrate.npages + n] = 0
    migrate.npages += n
    return 0


def migrate_vma_collect_hole(start: int, end: int, depth: int, walk: Any) -> int:
    """migrate_vma_collect_hole(): only anonymous memory may be populated: MIGRATE without a page."""
    if walk.vma is None or not vma_is_anonymous(walk.vma):
        return migrate_vma_collect_skip(start, end, walk)
    migrate: MigrateVma = walk.private
    n = (end - start) >> PAGE_SHIFT
    migrate.src[migrate.npages: migrate.npages + n] = MIGRATE_PFN_MIGRATE
    migrate.dst[migrate.npages: migrate.npages + n] = 0
    migrate.npages += n
    migrate.cpages += n
    return 0


def migrate_vma_collect_pmd(pmdp: Ptr, start: int, end: int, walk: Any) -> Gen[int]:
    """migrate_vma_collect_pmd() (6.18): collect and unmap the pages of one PMD range.

    A PMD leaf is split first (the huge zero page by splitting the PMD, a THP by splitting the folio; a THP
    that cannot be locked or split is skipped).  Under the PTE lock, for every PTE: a none entry of anonymous
    memory and the zero page (with SELECT_SYSTEM) are MIGRATE without a page; a device-private entry is
    collected only with SELECT_DEVICE_PRIVATE and a matching pgmap owner; a present page only with
    SELECT_SYSTEM, and only if it has a mapping and is not compound.  A collected page is referenced,
    trylocked (the fault page is already locked [6.15+]), its PTE becomes a migration entry (writable,
    readable-exclusive or readable) and its rmap is dropped.  A page that cannot be locked is not collected.
    """
    from hmmirror.mm.huge_memory import __split_huge_pmd, is_huge_zero_pmd, split_folio
    from hmmirror.mm.memory import pmd_lockptr, pte_lockptr, vm_normal_page

    migrate: MigrateVma = walk.private
    vma = walk.vma
    mm = vma.vm_mm
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    fault_folio = mem.compound_head(migrate.fault_page) if migrate.fault_page >= 0 else -1
    locks_fault = _locks_fault_page(machine)
    addr = start
    while True:                                                    # again:
        pmd = pool.get(pmdp)
        if pte_none(pmd):
            return migrate_vma_collect_hole(start, end, -1, walk)
        if x86.pmd_trans_huge(pmd):
            ptl = pmd_lockptr(mm, pmdp)
            yield from sched.spin_lock(ptl)
            if not x86.pmd_trans_huge(pool.get(pmdp)):
                sched.spin_unlock(ptl)
                continue
            if is_huge_zero_pmd(mm, pmd):
                sched.spin_unlock(ptl)
                yield from __split_huge_pmd(vma, pmdp, addr)
            else:
                folio = mem.compound_head(pte_pfn(pmd))
                folio_get(mem, folio)
                sched.spin_unlock(ptl)
                if folio == fault_folio:                           # WARN_ON_ONCE: no THP fault folio
                    folio_put(mem, folio)
                    return migrate_vma_collect_skip(start, end, walk)
                if not folio_trylock(mem, folio):
                    folio_put(mem, folio)
                    return migrate_vma_collect_skip(start, end, walk)
                ret = yield from split_folio(machine, folio, caller_refs=1)
                folio_unlock(mem, folio)
                folio_put(mem, folio)
                if ret:
                    return migrate_vma_collect_skip(start, end, walk)
            continue
        if not pmd & x86._PAGE_PRESENT or x86.pmd_leaf(pmd):
            # A non-present PMD (migration entry) or another leaf: the kernel's pte_offset_map_lock() fails
            # and it retries until the entry changes; the model skips it instead of spinning.
            return migrate_vma_collect_skip(start, end, walk)
        break
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    tid = table_id_of(pool.get(pmdp))
    unmapped = 0
    while addr < end:
        ptep: Ptr = (tid, x86.PTE_LEVEL.index(addr))
        pte = pool.get(ptep)
        mpfn = 0
        page = -1
        if pte_none(pte):
            if vma_is_anonymous(vma):
                mpfn = MIGRATE_PFN_MIGRATE
                migrate.cpages += 1
            _store(migrate, mpfn)
            addr += PAGE_SIZE
            continue
        if not pte_present(pte):
            entry = pte_to_swp_entry(pte)
            # Only care about device-private entries; other non-present entries are not migratable.
            if not is_device_private_entry(entry):
                _store(migrate, 0)
                addr += PAGE_SIZE
                continue
            page = entry.offset
            pgmap = page_pgmap(machine, page)
            if not migrate.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE or pgmap is None \
                    or pgmap.owner is not migrate.pgmap_owner:
                _store(migrate, 0)
                addr += PAGE_SIZE
                continue
            mpfn = migrate_pfn(page) | MIGRATE_PFN_MIGRATE
            if is_writable_device_private_entry(entry):
                mpfn |= MIGRATE_PFN_WRITE
        else:
            pfn = pte_pfn(pte)
            if mem.is_zero_pfn(pfn) and migrate.flags & MIGRATE_VMA_SELECT_SYSTEM:
                migrate.cpages += 1
                _store(migrate, MIGRATE_PFN_MIGRATE)
                addr += PAGE_SIZE
                continue
            page = vm_normal_page(migrate.vma, addr, pte)
            if page >= 0 and not folio_is_zone_device(mem, page) and not migrate.flags & MIGRATE_VMA_SELECT_SYSTEM:
                _store(migrate, 0)
                addr += PAGE_SIZE
                continue
            if page >= 0 and page < mem.nr_ram and int(mem.order[mem.compound_head(page)]) > 0:
                # A PTE-mapped large folio: split it (outside the PTE lock) and look again.
                folio = mem.compound_head(page)
                sched.spin_unlock(ptl)
                ret = yield from _migrate_vma_split_folio(machine, folio, migrate.fault_page)
                if ret:
                    return migrate_vma_collect_skip(addr, end, walk)
                yield from sched.spin_lock(ptl)
                if pool.get(pmdp) != pmd:
                    sched.spin_unlock(ptl)
                    return migrate_vma_collect_skip(addr, end, walk)
                continue
            mpfn = migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE
            mpfn |= MIGRATE_PFN_WRITE if pte_write(pte) else 0
        # FIXME support THP: a page without a mapping or a compound page is not migrated.
        if page < 0 or not _has_mapping(mem, page) or \
                (page < mem.nr_ram and int(mem.order[mem.compound_head(page)]) > 0):
            _store(migrate, 0)
            addr += PAGE_SIZE
            continue
        # Pin the folio (this "freezes" the pte), then try to lock it.
        folio = mem.compound_head(page)
        folio_get(mem, folio)
        if (locks_fault and folio == fault_folio) or folio_trylock(mem, folio):
            anon_exclusive = bool(mem.flags[folio] & PG.anon) and bool(mem.flags[page] & PG.anon_exclusive)
            if anon_exclusive:
                if pte_present(pte) and folio_maybe_dma_pinned(mem, folio):
                    # folio_try_share_anon_rmap_pte() fails: a pinned exclusive page stays mapped.
                    if not (locks_fault and folio == fault_folio):
                        folio_unlock(mem, folio)
                    folio_put(mem, folio)
                    _store(migrate, 0)
                    addr += PAGE_SIZE
                    continue
                mem.flags[page] &= PG.mask(PG.anon_exclusive)
            migrate.cpages += 1
            if pte & x86._PAGE_DIRTY:
                mem.flags[folio] |= PG.dirty                         # folio_mark_dirty()
            if mpfn & MIGRATE_PFN_WRITE:
                typ = SwpType.SWP_MIGRATION_WRITE
            elif anon_exclusive:
                typ = SwpType.SWP_MIGRATION_READ_EXCLUSIVE
            else:
                typ = SwpType.SWP_MIGRATION_READ
            pool.set(ptep, swp_entry_to_pte(SwpEntry(int(typ), page)))
            rmap.page_remove_rmap(mem, page)                         # folio_remove_rmap_pte()
            folio_put(mem, folio)
            if pte_present(pte):
                unmapped += 1
        else:
            folio_put(mem, folio)
            mpfn = 0
        _store(migrate, mpfn)
        addr += PAGE_SIZE
    if unmapped:
        machine.counters["flush_tlb_range"] += 1
    sched.spin_unlock(ptl)
    return 0


def _store(migrate: MigrateVma, mpfn: int) -> None:
    migrate.dst[migrate.npages] = 0
    migrate.src[migrate.npages] = mpfn
    migrate.npages += 1


def _migrate_vma_split_folio(machine: "Machine", folio: int, fault_page: int) -> Gen[int]:
    """migrate_vma_split_folio(): lock and split a PTE-mapped large folio (the fault folio is already locked)."""
    from hmmirror.mm.huge_memory import split_folio

    mem = machine.mem
    fault_folio = mem.compound_head(fault_page) if fault_page >= 0 else -1
    if folio != fault_folio:
        folio_get(mem, folio)
        from hmmirror.mm.folio import folio_lock
        yield from folio_lock(mem, folio)
    ret = yield from split_folio(machine, folio, caller_refs=1 if folio != fault_folio else 0)
    if folio != fault_folio:
        folio_unlock(mem, folio)
        folio_put(mem, folio)
    return ret


def migrate_vma_collect(migrate: MigrateVma) -> Gen[None]:
    """migrate_vma_collect(): walk ``[start, end)`` inside an ``MMU_NOTIFY_MIGRATE`` invalidation whose owner is
    ``migrate.pgmap_owner`` (the driver can skip invalidating its own device-private mappings)."""
    from hmmirror.mm.pagewalk import MmWalkOps, walk_page_range

    vma = migrate.vma
    assert vma is not None
    mm = vma.vm_mm
    r = mmu_notifier_range_init(MMU_NOTIFY.MIGRATE, None, mm, migrate.start, migrate.end, migrate.pgmap_owner)
    yield from mmu_notifier_invalidate_range_start(r)
    ops = MmWalkOps(pmd_entry=migrate_vma_collect_pmd, pte_hole=migrate_vma_collect_hole)
    yield from walk_page_range(mm, migrate.start, migrate.end, ops, migrate)
    yield from mmu_notifier_invalidate_range_end(r)
    migrate.end = migrate.start + (migrate.npages << PAGE_SHIFT)


def migrate_vma_check_page(machine: "Machine", page: int, fault_page: int) -> bool:
    """migrate_vma_check_page(): false when the page is pinned (more references than mappings + expected).

    Expected: the caller's reference (isolation or collection) + one for the fault page + one for a
    ZONE_DEVICE page + the page cache's for a file page; a large folio is never migrated."""
    mem = machine.mem
    folio = mem.compound_head(page)
    extra = 1 + (1 if page == fault_page else 0)
    if folio < mem.nr_ram and int(mem.order[folio]) > 0:
        return False
    if folio_is_zone_device(mem, folio):
        extra += 1
    if folio_mapping(mem, folio):
        extra += 1
    return int(mem.refcount[folio]) - extra <= int(mem.mapcount[folio])


def migrate_device_unmap(machine: "Machine", src_pfns: np.ndarray, npages: int, fault_page: int,
                         elsewhere: set[int] | None = None) -> Gen[int]:
    """migrate_device_unmap(): isolate system pages, unmap what is still mapped elsewhere (try_to_migrate),
    and restore every page that is still mapped or pinned.  Returns the number of pages left to migrate.
    ``elsewhere`` (ours) collects the folios try_to_migrate() unmapped: their migration entries are not all in
    the collected range."""
    mem = machine.mem
    fault_folio = mem.compound_head(fault_page) if fault_page >= 0 else -1
    locks_fault = _locks_fault_page(machine)
    restore = 0
    unmapped = 0
    for i in _entries(src_pfns, npages):
        s = int(src_pfns[i])
        page = migrate_pfn_to_page(s)
        if page < 0:
            if s & MIGRATE_PFN_MIGRATE:
                unmapped += 1
            continue
        folio = mem.compound_head(page)
        if not folio_is_zone_device(mem, folio):
            # folio_isolate_lru() takes a reference; then the one taken in collect is dropped
            folio_get(mem, folio)
            folio_put(mem, folio)
        if mem.mapcount[folio] > 0:
            if elsewhere is not None:
                elsewhere.add(folio)
            yield from rmap.try_to_migrate(machine, folio)
        if mem.mapcount[folio] > 0 or not migrate_vma_check_page(machine, page, fault_page):
            src_pfns[i] = s & ~MIGRATE_PFN_MIGRATE
            restore += 1
            continue
        unmapped += 1
    for i in _entries(src_pfns, npages) if restore else ():
        if not restore:
            break
        s = int(src_pfns[i])
        page = migrate_pfn_to_page(s)
        if page >= 0 and not s & MIGRATE_PFN_MIGRATE:
            folio = mem.compound_head(page)
            yield from remove_migration_ptes(machine, [(folio, folio)])   # not a hot path: full rmap walk
            src_pfns[i] = 0
            if not (locks_fault and folio == fault_folio):
                folio_unlock(mem, folio)
            folio_put(mem, folio)
            restore -= 1
    return unmapped


def migrate_vma_setup(args: MigrateVma) -> Gen[int]:
    """migrate_vma_setup() (mm/migrate_device.c, 6.18): collect and unmap the pages of one VMA range.

    Returns -EINVAL for a bad request (no VMA, hugetlb / VM_SPECIAL / DAX VMA, empty range or one not inside
    the VMA, a fault page that is not a device-private page, [6.15+] a fault page that is not locked), else 0
    with ``args.src`` filled, ``args.npages`` and ``args.cpages`` (pages collected and unmapped) set.
    Locking: the caller holds the mmap lock (read).
    """
    vma = args.vma
    nr_pages = (args.end - args.start) >> PAGE_SHIFT
    args.start &= ~(PAGE_SIZE - 1)
    args.end &= ~(PAGE_SIZE - 1)
    if vma is None or is_vm_hugetlb_page(vma) or vma.vm_flags & _VM_SPECIAL or vma_is_dax(vma):
        return -EINVAL
    if nr_pages <= 0:
        return -EINVAL
    if args.start < vma.vm_start or args.start >= vma.vm_end:
        return -EINVAL
    if args.end <= vma.vm_start or args.end > vma.vm_end:
        return -EINVAL
    if args.src is None or args.dst is None or len(args.src) < nr_pages or len(args.dst) < nr_pages:
        return -EINVAL
    machine = _machine(vma)
    if args.fault_page >= 0 and not is_device_private_page(machine, args.fault_page):
        return -EINVAL
    if args.fault_page >= 0 and machine.profile.do_swap_page_device_lock \
            and not folio_test_locked(machine.mem, args.fault_page):
        return -EINVAL
    args.src[:nr_pages] = 0
    args.cpages = 0
    args.npages = 0
    yield from migrate_vma_collect(args)
    if args.cpages:
        args.cpages = yield from migrate_device_unmap(machine, args.src, args.npages, args.fault_page,
                                                      args.extra.setdefault("elsewhere", set()))
    machine.counters["migrate_vma_setup"] += 1
    machine.log("migrate_vma_setup", mm=vma.vm_mm.name, start=args.start, end=args.end, npages=args.npages,
                cpages=args.cpages, flags=args.flags, owner=_owner_name(args.pgmap_owner),
                fault_page=args.fault_page)
    return 0


def _owner_name(owner: Any) -> Any:
    if owner is None:
        return None
    return getattr(owner, "path", None) or getattr(owner, "name", None) or type(owner).__name__


# --- moving the struct-page state --------------------------------------------------------------------------------
def migrate_vma_insert_page(migrate: MigrateVma, addr: int, page: int, i: int) -> Gen[None]:
    """migrate_vma_insert_page(): map a new (device) page where the CPU had a none entry or the zero page
    (anonymous memory only), as do_anonymous_page() would; otherwise MIGRATE is cleared."""
    from hmmirror.mm.memory import pte_lockptr

    vma = migrate.vma
    assert vma is not None
    mm = vma.vm_mm
    machine = mm.machine
    pool, mem = machine.pool, machine.mem

    def abort() -> None:
        migrate.src[i] = int(migrate.src[i]) & ~MIGRATE_PFN_MIGRATE

    if not vma_is_anonymous(vma):
        return abort()
    pmdp = mm.pt.pmd_alloc(mm.pt.pud_alloc(mm.pt.p4d_alloc(mm.pt.pgd_offset(addr), addr), addr), addr)
    if x86.pmd_trans_huge(pool.get(pmdp)):
        return abort()
    mm.pt.pte_alloc(pmdp)
    rmap.anon_vma_prepare(vma)
    yield from sched.might_sleep("mem_cgroup_charge")
    if is_device_private_page(machine, page):
        entry = x86.make_device_private_entry(page, bool(vma.vm_flags & VM.WRITE))
    else:
        if folio_is_zone_device(mem, page):                      # only private and coherent device pages
            return abort()
        entry = x86.pfn_pte(page, vma.vm_page_prot)
        if vma.vm_flags & VM.WRITE:
            entry = x86.pte_mkwrite(x86.pte_mkdirty(entry))
    mem.flags[page] |= PG.uptodate                               # __folio_mark_uptodate()
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    ptep = mm.pt.pte_offset_map(pmdp, addr)
    orig = pool.get(ptep)
    if check_stable_address_space(mm):
        sched.spin_unlock(ptl)
        return abort()
    flush = False
    if pte_present(orig):
        if not mem.is_zero_pfn(pte_pfn(orig)):
            sched.spin_unlock(ptl)
            return abort()
        flush = True
    elif not pte_none(orig):
        sched.spin_unlock(ptl)
        return abort()
    rmap.page_add_new_anon_rmap(mem, page)                      # folio_add_new_anon_rmap(RMAP_EXCLUSIVE)
    folio_get(mem, page)
    if flush:
        machine.counters["flush_tlb_page"] += 1                  # ptep_clear_flush() of the zero page
    pool.set(ptep, entry)
    sched.spin_unlock(ptl)
    migrate.src[i] = MIGRATE_PFN_MIGRATE


def folio_migrate_mapping(machine: "Machine", newfolio: int, folio: int, extra_count: int) -> int:
    """folio_migrate_mapping() for a folio without a mapping (anonymous, not in the swap cache): the only
    references must be the caller's (+ ``extra_count``), else -EAGAIN; then the new folio takes the
    anonymous mapping."""
    mem = machine.mem
    expected = 1 + extra_count
    if int(mem.refcount[folio]) != expected:
        return -EAGAIN
    keep = PG.anon | PG.swapbacked | PG.file
    mem.flags[newfolio] |= mem.flags[folio] & keep
    return 0


def folio_migrate_flags(mem: Any, newfolio: int, folio: int) -> None:
    """folio_migrate_flags(): dirty and uptodate follow the page."""
    mem.flags[newfolio] |= mem.flags[folio] & (PG.dirty | PG.uptodate)


def __migrate_device_pages(machine: "Machine", src_pfns: np.ndarray, dst_pfns: np.ndarray, npages: int,
                           migrate: MigrateVma | None) -> Gen[None]:
    """__migrate_device_pages(): for every entry with a destination, move the struct-page state (or insert
    the destination where there was no page); clear MIGRATE where that is refused."""
    mem = machine.mem
    notified: Any = None
    for i in _entries(src_pfns, npages, dst_pfns):
        newpage = migrate_pfn_to_page(int(dst_pfns[i]))
        s = int(src_pfns[i])
        page = migrate_pfn_to_page(s)
        if newpage < 0:
            src_pfns[i] = s & ~MIGRATE_PFN_MIGRATE
            continue
        if page < 0:
            if not s & MIGRATE_PFN_MIGRATE:
                continue
            if migrate is None:
                sched.report("BUG_ON", "migrate_device_pages: a page to insert without a migrate_vma")
                continue
            addr = migrate.start + i * PAGE_SIZE
            if notified is None:
                assert migrate.vma is not None
                notified = mmu_notifier_range_init(MMU_NOTIFY.MIGRATE, None, migrate.vma.vm_mm, addr, migrate.end,
                                                   migrate.pgmap_owner)
                yield from mmu_notifier_invalidate_range_start(notified)
            yield from migrate_vma_insert_page(migrate, addr, newpage, i)
            continue
        folio = mem.compound_head(page)
        if is_device_private_page(machine, newpage):
            if folio_mapping(mem, folio):
                # only anonymous memory moves to device memory (file and shmem pages stay)
                src_pfns[i] = s & ~MIGRATE_PFN_MIGRATE
                continue
        elif folio_is_zone_device(mem, newpage):
            src_pfns[i] = s & ~MIGRATE_PFN_MIGRATE               # other ZONE_DEVICE types are not supported
            continue
        extra = 1 if migrate is not None and migrate.fault_page == page else 0
        if folio_migrate_mapping(machine, newpage, folio, extra):
            src_pfns[i] = s & ~MIGRATE_PFN_MIGRATE
        else:
            folio_migrate_flags(mem, newpage, folio)
    if notified is not None:
        yield from mmu_notifier_invalidate_range_end(notified)


def migrate_vma_pages(migrate: MigrateVma) -> Gen[None]:
    """migrate_vma_pages() (6.18): move the struct-page state of every collected page to its destination."""
    assert migrate.vma is not None
    machine = _machine(migrate.vma)
    yield from __migrate_device_pages(machine, migrate.src, migrate.dst, migrate.npages, migrate)


def migrate_device_pages(machine: "Machine", src_pfns: np.ndarray, dst_pfns: np.ndarray, npages: int) -> Gen[None]:
    """migrate_device_pages(): migrate_vma_pages() for pfns from migrate_device_range()/_pfns()."""
    yield from __migrate_device_pages(machine, src_pfns, dst_pfns, npages, None)


def __migrate_device_finalize(machine: "Machine", src_pfns: np.ndarray, dst_pfns: np.ndarray, npages: int,
                              fault_page: int, migrate: MigrateVma | None = None) -> Gen[None]:
    """__migrate_device_finalize(): every migration entry names the destination (or the source again when
    it did not move); the pages are unlocked and the collection / allocation references dropped."""
    mem = machine.mem
    fault_folio = mem.compound_head(fault_page) if fault_page >= 0 else -1
    locks_fault = _locks_fault_page(machine)
    pairs: list[tuple[int, int]] = []
    plan: list[tuple[int, int]] = []
    hints: list[tuple[Any, int]] = []
    for i in _entries(src_pfns, npages, dst_pfns):
        newpage = migrate_pfn_to_page(int(dst_pfns[i]))
        page = migrate_pfn_to_page(int(src_pfns[i]))
        dst = mem.compound_head(newpage) if newpage >= 0 else -1
        if page < 0:
            if dst >= 0:
                if dst == fault_folio:
                    sched.report("WARN_ON", "migrate finalize: the fault folio is a destination")
                folio_unlock(mem, dst)
                folio_put(mem, dst)
            continue
        src = mem.compound_head(page)
        if not int(src_pfns[i]) & MIGRATE_PFN_MIGRATE or dst < 0:
            if dst >= 0:
                folio_unlock(mem, dst)
                folio_put(mem, dst)
            dst = src
        pairs.append((src, dst))
        plan.append((src, dst))
        if migrate is not None and migrate.vma is not None:
            hints.append((migrate.vma.vm_mm, migrate.start + i * PAGE_SIZE))
    if migrate is not None:
        yield from remove_migration_ptes(machine, pairs, hints, migrate.extra.get("elsewhere", set()))
    else:
        yield from remove_migration_ptes(machine, pairs)
    for src, dst in plan:
        if not (locks_fault and src == fault_folio):
            folio_unlock(mem, src)
        folio_put(mem, src)
        if dst != src:
            if dst == fault_folio:
                sched.report("WARN_ON", "migrate finalize: the fault folio is a destination")
            folio_unlock(mem, dst)
            folio_put(mem, dst)


def migrate_vma_finalize(migrate: MigrateVma) -> Gen[None]:
    """migrate_vma_finalize() (6.18): restore the CPU page table to the new pages (or the old ones)."""
    assert migrate.vma is not None
    machine = _machine(migrate.vma)
    yield from __migrate_device_finalize(machine, migrate.src, migrate.dst, migrate.npages, migrate.fault_page,
                                         migrate)
    n = migrate.npages
    moved = int((((migrate.src[:n] & _U(MIGRATE_PFN_MIGRATE)) != 0) & ((migrate.dst[:n] & _U(MIGRATE_PFN_VALID)) != 0)
                 ).sum())
    machine.log("migrate_vma_finalize", mm=migrate.vma.vm_mm.name, start=migrate.start, end=migrate.end,
                migrated=moved, owner=_owner_name(migrate.pgmap_owner))


def migrate_device_finalize(machine: "Machine", src_pfns: np.ndarray, dst_pfns: np.ndarray, npages: int) -> Gen[None]:
    """migrate_device_finalize(): migrate_vma_finalize() for pfns from migrate_device_range()/_pfns()."""
    yield from __migrate_device_finalize(machine, src_pfns, dst_pfns, npages, -1)
    machine.log("migrate_device_finalize", npages=npages,
                migrated=int(((src_pfns[:npages] & _U(MIGRATE_PFN_MIGRATE)) != 0).sum()))


# --- eviction: starting from device pfns ---------------------------------------------------------------------
def migrate_device_pfn_lock(machine: "Machine", pfn: int) -> int:
    """migrate_device_pfn_lock(): reference and trylock an allocated device page; 0 if free or locked."""
    from hmmirror.mm.folio import folio_try_get

    mem = machine.mem
    if not folio_try_get(mem, pfn):
        return 0
    if not folio_trylock(mem, pfn):
        folio_put(mem, pfn)
        return 0
    return migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE


def migrate_device_range(machine: "Machine", src_pfns: np.ndarray, start: int, npages: int) -> Gen[int]:
    """migrate_device_range() (6.1+): collect ``npages`` device pfns from ``start`` for migration to system
    memory, wherever they are mapped (the caller need not know the VMAs).  Returns 0.

    Ours: migrate_device_pfn_lock() of a free page (refcount 0) takes nothing and gives 0, and taking one page
    does not free or revive another: only the pfns with a reference are visited (device pfns are their own
    heads), in pfn order as the kernel's loop."""
    mem = machine.mem
    src_pfns[:npages] = 0
    if start >= mem.nr_ram:
        todo = (start + np.flatnonzero(mem.refcount[start:start + npages] > 0)).tolist()
    else:
        todo = list(range(start, start + npages))
    for pfn in todo:
        src_pfns[pfn - start] = migrate_device_pfn_lock(machine, pfn)
    yield from migrate_device_unmap(machine, src_pfns, npages, -1)
    machine.log("migrate_device_range", start_pfn=start, npages=npages,
                collected=int(((src_pfns[:npages] & _U(MIGRATE_PFN_MIGRATE)) != 0).sum()))
    return 0


def migrate_device_pfns(machine: "Machine", src_pfns: np.ndarray, npages: int) -> Gen[int]:
    """migrate_device_pfns() [6.15+]: as migrate_device_range() for a pre-populated array of device pfns."""
    for i in range(npages):
        src_pfns[i] = migrate_device_pfn_lock(machine, int(src_pfns[i]))
    yield from migrate_device_unmap(machine, src_pfns, npages, -1)
    return 0


# --- remove_migration_ptes (mm/migrate.c) -------------------------------------------------------------------------
def remove_migration_ptes(machine: "Machine", pairs: list[tuple[int, int]],
                          hints: list[tuple[Any, int]] | None = None, elsewhere: set[int] | None = None) -> Gen[None]:
    """remove_migration_ptes(src, dst, 0) (mm/migrate.c) for several folios at once: every migration entry
    naming ``src`` becomes a mapping of ``dst`` -- a device-private entry for a device-private ``dst`` (writable
    if the migration entry was), else a present PTE (writable and dirty if the entry was writable) -- with a
    reference and an rmap (exclusive for writable and readable-exclusive entries).

    Ours: ``hints`` (``(mm, address)`` per pair: where migrate_vma_collect put the entry) are looked at first;
    the rmap is scanned for the folios in ``elsewhere``, whose hint was wrong, or without hints at all.  The
    walks of anonymous folios hold their anon_vma root rwsem for read (rmap_walk_anon): the model takes it
    once for consecutive folios of one family, where the kernel takes it per folio."""
    if not pairs:
        return
    dst_of = {s: d for s, d in pairs}
    scan: set[int] = set(dst_of) if hints is None else set(elsewhere or ())
    if hints is not None:
        held: Any = None
        try:
            for (src, _), (mm, addr) in zip(pairs, hints):
                av = rmap.vma_anon_vma(mm, addr) if _folio_test_anon(machine, src) else None
                if av is not held:                       # rmap_walk_anon(): each folio's walk read-locks
                    if held is not None:                 # its anon_vma root (one lock per run of folios
                        rmap.anon_vma_unlock_read(held)  # of the same family, ours)
                        held = None
                    if av is not None:
                        yield from rmap.anon_vma_lock_read(av)
                        held = av
                if not (yield from _remove_migration_pte(machine, mm, addr, dst_of, src)):
                    scan.add(src)
        finally:
            if held is not None:
                rmap.anon_vma_unlock_read(held)
    if not scan:
        return
    found = rmap.rmap_find(machine, np.fromiter(scan, dtype=np.int64, count=len(scan)), kinds=("migration",))
    for av, group in rmap.by_anon_vma(found):
        if av is not None:
            yield from rmap.anon_vma_lock_read(av)
        try:
            for mm, addr, _ in group:
                yield from _remove_migration_pte(machine, mm, addr, dst_of, None)
        finally:
            if av is not None:
                rmap.anon_vma_unlock_read(av)


def _folio_test_anon(machine: "Machine", folio: int) -> bool:
    """Ours: folio_test_anon() -- the folio has an anon_vma as its mapping."""
    return bool(machine.mem.flags[folio] & PG.anon)


def _remove_migration_pte(machine: "Machine", mm: "MMStruct", addr: int, dst_of: dict[int, int],
                          want: int | None) -> Gen[bool]:
    """remove_migration_pte() for the entry at ``addr`` (if it is a migration entry of a folio in ``dst_of``,
    and of ``want`` when given).  Returns whether it replaced one."""
    from hmmirror.mm.memory import pte_lockptr

    mem = machine.mem
    if True:
        vma = mm.vma_lookup(addr)
        level, ptep, pte = mm.pt.lookup(addr)
        if vma is None or level != "pte" or ptep is None or mm.exited:
            return False
        if pte_none(pte) or pte_present(pte) or not is_migration_entry(pte_to_swp_entry(pte)):
            return False                                           # (checked again under the lock)
        pmdp = _pmdp_of(mm, addr)
        ptl = pte_lockptr(mm, pmdp)
        yield from sched.spin_lock(ptl)
        pte = machine.pool.get(ptep)
        if pte_none(pte) or pte_present(pte) or not is_migration_entry(pte_to_swp_entry(pte)):
            sched.spin_unlock(ptl)
            return False
        e = pte_to_swp_entry(pte)
        src = mem.compound_head(e.offset)
        dst = dst_of.get(src)
        if dst is None or (want is not None and src != want):
            sched.spin_unlock(ptl)
            return False
        new = dst + (e.offset - src)
        writable = is_writable_migration_entry(e)
        exclusive = writable or e.type == SwpType.SWP_MIGRATION_READ_EXCLUSIVE
        if is_device_private_page(machine, new):
            val = x86.make_device_private_entry(new, writable)
        else:
            val = x86.pfn_pte(new, vma.vm_page_prot)
            if writable:
                val = x86.pte_mkwrite(x86.pte_mkdirty(val))
        folio_get(mem, dst)
        if mem.flags[dst] & PG.anon:
            rmap.page_add_rmap(mem, new)                          # folio_add_anon_rmap_pte()
            if exclusive:
                mem.flags[new] |= PG.anon_exclusive
        else:
            rmap.page_add_rmap(mem, new)                          # folio_add_file_rmap_pte()
        machine.pool.set(ptep, val)
        sched.spin_unlock(ptl)
        return True


def _pmdp_of(mm: "MMStruct", addr: int) -> Ptr:
    pudp = mm.pt.walk_to_pud(addr)
    assert pudp is not None
    return mm.pt.pmd_offset(pudp, addr)


__all__ = [
    "MIGRATE_PFN_MIGRATE", "MIGRATE_PFN_SHIFT", "MIGRATE_PFN_VALID", "MIGRATE_PFN_WRITE",
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT", "MIGRATE_VMA_SELECT_DEVICE_PRIVATE", "MIGRATE_VMA_SELECT_SYSTEM",
    "MigrateVma", "migrate_device_finalize", "migrate_device_pages", "migrate_device_pfns", "migrate_device_range",
    "migrate_pfn", "migrate_pfn_to_page", "migrate_vma_finalize", "migrate_vma_pages", "migrate_vma_setup",
    "remove_migration_ptes",
]
