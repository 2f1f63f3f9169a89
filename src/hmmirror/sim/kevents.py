"""Kernel background events: what the kernel does to an address space behind the mirror's back.

Each event is a generator run as its own simulator task (a kernel thread: kswapd, khugepaged, kcompactd,
the NUMA scanner, memory-failure handling, the OOM reaper, a driver unbind, ...).  Where the model has the
kernel function (``mm/swap.py``'s reclaim, ``huge_memory.__split_huge_pmd``, ``drivers/dax`` unbind,
``mm/oom_kill.py``, ``kernel/fork.py``) the event calls it; the others are modelled here, following the
kernel's order of steps (locks, notifier range, entry changes) and named after the kernel functions:

* ``migrate``: ``migrate_pages`` of one anonymous 4 KiB page -- ``try_to_migrate_one`` (notifier CLEAR
  ``[4K)``, the PTE becomes a migration entry under the PTE lock), the copy (``hold`` preemption points: the
  migration entry is present "for a while", faults and HMM walks wait on it), ``remove_migration_ptes`` (the
  new page is mapped; no notifier, the entry was not present); both rmap walks hold the anon_vma for read.
* ``khugepaged``: ``collapse_huge_page`` of one 2 MiB anonymous range (mmap lock for write, the anon_vma for
  write, notifier CLEAR ``[2M)``, ``pmdp_collapse_flush`` under the PMD lock, copy, ``set_pmd_at`` of the new
  THP).
* ``numa``: ``change_prot_numa`` (mmap lock for read, notifier PROTECTION_VMA, present anonymous PTEs and
  THP PMDs become PROT_NONE hinting entries; the hint fault restores them).
* ``memory_failure``: ``memory_failure`` of the page mapped at an address -- ``PG_hwpoison``, then
  ``try_to_unmap_one`` with TTU_HWPOISON (notifier CLEAR ``[4K)``, the PTE becomes a hwpoison entry); the
  poisoned page keeps the reference memory_failure took (it is never reused).
* ``notifier_churn``: a second mirror (and a plain notifier) registered and unregistered concurrently.
* ``exit``: the process exits when its last thread does -- the event waits until the scenario's CPU threads of
  that process finished, then drops the process's ``mm_users`` reference (``mmput``; ``exit_mmap`` at zero).
* ``compact``: kcompactd migrating the anonymous page at an address (``migrate`` above), reached through the
  page's rmap as compaction does: it holds **no** ``mm_users`` reference, so the process may exit meanwhile
  and a notifier callback may see the last reference go.
* ``clear_refs``: ``clear_refs_write(CLEAR_REFS_SOFT_DIRTY)`` repeated ``rounds`` times -- a dirty-page tracker
  polling ``/proc/PID/clear_refs`` keeps the whole address space busy with ``MMU_NOTIFY_SOFT_DIRTY``
  invalidations (sustained invalidation: a driver's retry loop must give up, not spin).
* ``evict``: device memory pressure -- the driver evicts its device-private pages to system memory
  (``migrate_device_range`` / ``migrate_device_pfns``), racing CPU faults on those pages and device jobs.
* ``close``: the driver's last reference goes away (``release`` of its file, ``drm_gpusvm_fini`` of a GPU VM):
  ``unbind()`` runs -- after the device jobs ended, or while they run when the driver says a close races its
  faults (``unbind_races_faults``).

Events hold an ``mm_users`` reference while they work, as kernel threads that start from an mm do
(``mmget_not_zero``); ``compact`` (rmap-based, as kcompactd and kswapd are), ``exit``, ``gc``, ``close`` and
``pmem_unbind`` do not.

An event that finds nothing suitable at its address does nothing (returns a negative errno, as the kernel's
helpers skip such pages); that is not a finding.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

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
from hmmirror.sim.scenario import parse_size, resolve_addr

EINVAL, EBUSY, EAGAIN, ENOENT = 22, 16, 11, 2
_NOT_HWPOISON = 0xFFFF_FFFF & ~PG.hwpoison            # flags are a uint32 array


def _has(mod: str, attr: str | None = None) -> bool:
    try:
        if importlib.util.find_spec(mod) is None:
            return False
    except ModuleNotFoundError:
        return False
    if attr is None:
        return True
    try:
        return hasattr(importlib.import_module(mod), attr)
    except Exception:                 # noqa: BLE001 - a module mid-edit by its owner
        return False


#: more event kinds: ``kind -> (fn(run, ev, mm, addr) -> Gen[int], pin)``; ``pin``: run it holding an
#: ``mm_users`` reference (a kernel thread working on the mm).  Other modules register here (sim/kevents_more.py).
HANDLERS: dict[str, tuple[Any, bool]] = {}


def supported(kind: str) -> bool:
    """Does the model have what the event ``kind`` needs?"""
    if kind in HANDLERS:
        return True
    if kind == "reclaim":
        return _has("hmmirror.mm.swap", "model_swap_out")
    if kind == "pmem_unbind":
        return _has("hmmirror.drivers.dax.device", "dev_dax_unbind")
    if kind == "oom_reap":
        return _has("hmmirror.mm.oom_kill", "__oom_reap_task_mm")
    if kind == "exit":
        return _has("hmmirror.kernel.fork", "mmput")
    return kind in ("thp_split", "khugepaged", "migrate", "numa", "memory_failure", "notifier_churn", "gc",
                    "compact", "clear_refs", "close", "evict")


#: events that run without taking an mm_users reference of their own
NO_MM_REF = ("pmem_unbind", "gc", "exit", "close", "compact", "evict")


def run_event(run: Any, ev: dict[str, Any]) -> Gen[int]:
    """Run one event of a scenario (the body of a ``kevent`` task)."""
    kind = ev["kind"]
    proc = run.procs.get(ev.get("proc", run.scenario.mirror))
    mm = proc.mm if proc is not None else None
    addr = resolve_addr(ev["addr"], run.names) if "addr" in ev else None
    if "addr" in ev and addr is None:
        return -ENOENT
    if mm is None or (mm.exited and kind not in ("pmem_unbind", "gc", "close")):
        return -ENOENT
    if kind in HANDLERS and not HANDLERS[kind][1]:
        return (yield from HANDLERS[kind][0](run, ev, mm, addr))
    if kind in NO_MM_REF:
        return (yield from _run_event(run, ev, kind, mm, addr))
    # the kernel thread holds a user reference on the mm while it works on it (mmget_not_zero / mmput)
    if mm.mm_users <= 0:
        return -ENOENT
    mm.mm_users += 1
    ret = yield from _run_event(run, ev, kind, mm, addr)      # a crash propagates: it is the finding
    yield from _mmput(mm)
    return ret


def _mmput(mm: Any) -> Gen[None]:
    try:
        from hmmirror.kernel.fork import mmput
    except ImportError:
        mm.mm_users -= 1
        return
    yield from mmput(mm)


def _run_event(run: Any, ev: dict[str, Any], kind: str, mm: Any, addr: Any) -> Gen[int]:
    if kind in HANDLERS:
        return (yield from HANDLERS[kind][0](run, ev, mm, addr))
    if kind == "reclaim":
        from hmmirror.mm.swap import model_swap_out
        return (yield from model_swap_out(mm, addr))
    if kind == "thp_split":
        return (yield from thp_split(mm, addr))
    if kind == "khugepaged":
        return (yield from collapse_huge_page(mm, addr))
    if kind == "migrate":
        return (yield from migrate_page(mm, addr, int(ev.get("hold", 4))))
    if kind == "numa":
        return (yield from change_prot_numa(mm, addr, addr + parse_size(ev.get("length", PAGE_SIZE))))
    if kind == "memory_failure":
        return (yield from memory_failure(mm, addr))
    if kind == "pmem_unbind":
        from hmmirror.drivers.dax.device import dev_dax_unbind
        dev = run.machine.devices.get(ev.get("device", "/dev/dax1.0"))
        if dev is None or not hasattr(dev, "pgmap"):
            return -ENOENT
        return (yield from dev_dax_unbind(dev))
    if kind == "oom_reap":
        return (yield from oom_reap(mm))
    if kind == "exit":
        from hmmirror.kernel.fork import mmput
        gone = run.__dict__.setdefault("exited", set())
        if mm.exited or mm.name in gone:
            return -ENOENT                               # a process exits once
        gone.add(mm.name)
        # the process exits when its last thread does: its CPU threads finish first (do_exit of each)
        threads = run.threads_of.get(mm.name, [])
        yield from sched.wait_event(lambda: all(t.done for t in threads), "exit: wait for the other threads")
        if mm.exited:
            return -ENOENT
        yield from mmput(mm)
        return 0
    if kind == "notifier_churn":
        return (yield from notifier_churn(run, mm))
    if kind == "compact":
        # kcompactd finds the page through its rmap: no reference on the mm (only one it had when it began)
        if mm.mm_users <= 0:
            return -ENOENT
        return (yield from migrate_page(mm, addr, int(ev.get("hold", 4))))
    if kind == "clear_refs":
        return (yield from clear_refs_write(mm, int(ev.get("rounds", 8))))
    if kind == "close":
        return (yield from driver_close(run))
    if kind == "evict":
        # device memory pressure: the driver moves its device-private pages back (migrate_device_range /
        # _pfns: it does not know where they are mapped, so it takes no mm reference)
        ev_fn = getattr(run.driver, "evict", None)
        if ev_fn is None or getattr(run.driver, "closed", False):
            return -ENOENT
        ret = yield from ev_fn()
        return ret if isinstance(ret, int) else 0
    if kind == "gc":
        if getattr(run.driver, "closed", False):
            return -ENOENT                               # a closed driver runs no background work
        gc = getattr(run.driver, "gc", None)
        if gc is None:
            return 0
        ret = yield from gc()
        return ret if isinstance(ret, int) else 0
    return -EINVAL


# --- events ----------------------------------------------------------------------------------------------
def thp_split(mm: Any, addr: int) -> Gen[int]:
    """split_huge_pmd() of the PMD leaf mapping ``addr``, under the mmap lock for read as its VMA-operation
    callers hold it (madvise, mprotect, debugfs split_huge_pages_pid): a first mmu_interval_notifier_insert
    (mm_take_all_locks, mmap lock for write) cannot start inside the split's invalidation."""
    from hmmirror.mm.huge_memory import __split_huge_pmd

    yield from sched.down_read(mm.mmap_sem)
    try:
        vma = mm.vma_lookup(addr)
        if vma is None:
            return -ENOENT
        level, p, e = mm.pt.lookup(addr)
        if level != "pmd" or p is None or not x86.pmd_leaf(e):
            return -EINVAL
        yield from __split_huge_pmd(vma, p, addr)
        return 0
    finally:
        sched.up_read(mm.mmap_sem)


def _anon_pte(mm: Any, addr: int) -> tuple[Any, Any, int, int] | None:
    """(vma, ptep, pte, pfn) of a present, normal, exclusive 4 KiB anonymous page at ``addr``."""
    vma = mm.vma_lookup(addr)
    if vma is None or not (vma_is_anonymous(vma) or vma.anon_vma) or vma.vm_flags & VM.HUGETLB:
        return None
    level, ptep, pte = mm.pt.lookup(addr)
    if level != "pte" or ptep is None or not pte & x86._PAGE_PRESENT or x86.pte_special(pte):
        return None
    mem = mm.machine.mem
    pfn = x86.pte_pfn(pte)
    if pfn >= mem.nr_ram or not mem.flags[pfn] & PG.anon or mem.order[pfn] != 0:
        return None
    if int(mem.mapcount[pfn]) != 1 or int(mem.refcount[pfn]) != 1:
        return None
    return vma, ptep, pte, pfn


def migrate_page(mm: Any, addr: int, hold: int) -> Gen[int]:
    """migrate_pages() of the anonymous page at ``addr``: unmap to a migration entry, copy, remap."""
    addr &= ~(PAGE_SIZE - 1)
    got = _anon_pte(mm, addr)
    if got is None:
        from hmmirror.mm.migrate import migrate_thp       # a PMD-mapped THP is migrated whole
        return (yield from migrate_thp(mm, addr, hold))
    vma, ptep, pte, pfn = got
    yield from sched.might_sleep("migrate_pages")
    anon_vma = vma.anon_vma
    if anon_vma is not None:                             # try_to_migrate() -> rmap_walk_anon(): read-locked
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        ret = yield from _try_to_migrate_one(mm, vma, addr, ptep, pte, pfn)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    if ret < 0:
        return ret
    return (yield from _migrate_copy_remap(mm, addr, pfn, hold, anon_vma))


def _try_to_migrate_one(mm: Any, vma: Any, addr: int, ptep: Any, pte: int, pfn: int) -> Gen[int]:
    """try_to_migrate_one() (mm/rmap.c [5.2] / [6.x]) of the exclusive anonymous page ``pfn`` mapped by
    ``pte`` at ``addr``: the PTE becomes a migration entry under MMU_NOTIFY_CLEAR of the page.  0 or -EAGAIN."""
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    # try_to_migrate_one(): notifier around the replacement of the PTE by a migration entry
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + PAGE_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    level, ptep, cur = mm.pt.lookup(addr)
    if level != "pte" or ptep is None:
        yield from mmu_notifier_invalidate_range_end(r)
        return -EAGAIN
    pmdp = _pmdp_of(mm, addr)
    ptl = pte_lockptr(mm, pmdp)
    yield from sched.spin_lock(ptl)
    cur = pool.get(ptep)
    if cur != pte and not (x86.pte_pfn(cur) == pfn and cur & x86._PAGE_PRESENT):
        sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
        return -EAGAIN
    writable = x86.pte_write(cur)
    pool.set(ptep, x86.make_migration_entry(pfn, writable))
    rmap.page_remove_rmap(mem, pfn)                      # the isolation reference keeps the page
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    machine.log("migrate_unmap", mm=mm.name, addr=addr, pfn=pfn)
    return 0


def _migrate_copy_remap(mm: Any, addr: int, pfn: int, hold: int, anon_vma: Any) -> Gen[int]:
    """migrate_folio_move() (mm/migrate.c [6.x], __unmap_and_move [5.2]) of the unmapped page ``pfn``: copy it
    to a new page, then remove_migration_ptes() -- an rmap walk of the new folio, under the anon_vma root
    rwsem for read (rmap_walk_anon; ``anon_vma``, the old folio's, which the new one takes)."""
    machine = mm.machine
    mem = machine.mem
    # the copy: the migration entry stays present for a while
    for _ in range(hold):
        yield from sched.preempt_point("migrate_page_copy")
    new = mem.alloc_page()
    if new >= 0:
        mem.copy(new, pfn)
        mem.flags[new] |= PG.anon | PG.anon_exclusive
    if anon_vma is not None:
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        mapped = yield from _remove_migration_ptes(mm, addr, pfn, new)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    target = new if new >= 0 else pfn
    if new >= 0:
        # migrate_folio_move(): the new folio's own reference is dropped only after the whole walk, so an
        # exit_mmap zapping one remapped entry while the walk waits for another PTE lock cannot free it
        mem.put_page(new)
    mem.put_page(pfn)                                    # the migration's reference on the old page
    still = mapped > 0
    machine.log("migrate_remap", mm=mm.name, addr=addr, old=pfn, new=target, mapped=still)
    return 0


def _remove_migration_ptes(mm: Any, addr: int, pfn: int, new: int) -> Gen[int]:
    """remove_migration_ptes() (mm/migrate.c [5.2] / [6.x]) of the migration entries of ``pfn`` at ``addr``:
    each becomes a mapping of ``new`` (``pfn`` when the allocation failed).  Returns how many it mapped."""
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    # remove_migration_ptes(): every migration entry of the old page -- in this mm and in any child that
    # fork gave a copy of it (read-only after fork) -- is replaced by the new page (or the old one when the
    # allocation failed); the rmap walk finds them all
    target = new if new >= 0 else pfn
    mapped = 0
    for omm in list(machine.mms.values()):
        if omm.exited:
            continue
        ovma = omm.vma_lookup(addr)
        level, p2, cur = omm.pt.lookup(addr)
        if ovma is None or level != "pte" or p2 is None or not _is_migration_of(cur, pfn):
            continue
        optl = pte_lockptr(omm, _pmdp_of(omm, addr))
        yield from sched.spin_lock(optl)
        level, p2, cur = omm.pt.lookup(addr)
        if level == "pte" and p2 is not None and _is_migration_of(cur, pfn):
            wr = x86.is_writable_migration_entry(x86.pte_to_swp_entry(cur))
            entry = x86.pte_mkyoung(x86.pfn_pte(target, ovma.vm_page_prot))
            if wr:
                entry = x86.pte_mkwrite(x86.pte_mkdirty(entry))
            pool.set(p2, entry)
            rmap.page_add_rmap(mem, target)
            mem.get_page(target)                # remove_migration_pte(): folio_get() for every entry installed
            mapped += 1
        sched.spin_unlock(optl)
    return mapped


def _is_migration_of(pte: int, pfn: int) -> bool:
    if x86.pte_none(pte) or x86.pte_present(pte):
        return False
    e = x86.pte_to_swp_entry(pte)
    return x86.is_migration_entry(e) and e.offset == pfn


def _pmdp_of(mm: Any, addr: int) -> Any:
    pudp = mm.pt.walk_to_pud(addr)
    return mm.pt.pmd_offset(pudp, addr)


def collapse_huge_page(mm: Any, addr: int) -> Gen[int]:
    """khugepaged's collapse_huge_page() of the 2 MiB range holding ``addr`` (anonymous THP-able VMA)."""
    import numpy as np

    from hmmirror.mm.huge_memory import mk_huge_pmd
    from hmmirror.mm.memory import maybe_mkwrite, transparent_hugepage_enabled

    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    haddr = addr & ~(PMD_SIZE - 1)
    yield from sched.might_sleep("khugepaged_alloc_page")
    new = mem.alloc_folio(9)
    if new < 0:
        return -EAGAIN
    yield from sched.down_write(mm.mmap_sem)
    try:
        vma = mm.vma_lookup(haddr)
        ok = vma is not None and vma_is_anonymous(vma) and vma.vm_start <= haddr and \
            haddr + PMD_SIZE <= vma.vm_end and transparent_hugepage_enabled(vma)
        level, pmdp, pmd = mm.pt.lookup(haddr)
        if not ok or level != "pte":
            mem.put_page(new)
            return -EINVAL
        pmdp = _pmdp_of(mm, haddr)
        tid = x86.table_id_of(pool.get(pmdp))
        ents = pool.tables[tid].copy()
        present = (ents & np.uint64(x86._PAGE_PRESENT)) != 0
        if not present.any() or ((ents != 0) & ~present).any():
            mem.put_page(new)                             # swap/migration/protnone entries: skip
            return -EINVAL
        pfns = ((ents & np.uint64(x86.PTE_PFN_MASK)) >> np.uint64(12)).astype(np.int64)
        for k in np.flatnonzero(present).tolist():
            p = int(pfns[k])
            if ents[k] & np.uint64(x86._PAGE_SPECIAL) or p >= mem.nr_ram or not mem.flags[p] & PG.anon \
                    or mem.order[p] != 0 or mem.mapcount[p] != 1 or mem.refcount[p] != 1:
                mem.put_page(new)                         # shared / pinned / zero pages: skip
                return -EBUSY
        writable = bool(((ents[present] & np.uint64(x86._PAGE_RW)) != 0).any())
        anon_vma = vma.anon_vma
        if anon_vma is not None:                          # anon_vma_lock_write(): no rmap walk of the pages
            yield from rmap.anon_vma_lock_write(anon_vma)   # while the PMD is collapsed and they are isolated
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, haddr, haddr + PMD_SIZE)
        yield from mmu_notifier_invalidate_range_start(r)
        pmd_ptl = pmd_lockptr(mm, pmdp)
        yield from sched.spin_lock(pmd_ptl)
        old_table = pool.get(pmdp)
        pool.set(pmdp, 0)                                 # pmdp_collapse_flush()
        sched.spin_unlock(pmd_ptl)
        yield from mmu_notifier_invalidate_range_end(r)
        if anon_vma is not None:
            rmap.anon_vma_unlock_write(anon_vma)          # "All pages are isolated and locked"
        # __collapse_huge_page_copy(): copy and release the old pages
        ents = pool.tables[x86.table_id_of(old_table)].copy()
        for k in range(HPAGE_PMD_NR):
            e = int(ents[k])
            if e & x86._PAGE_PRESENT:
                p = x86.pte_pfn(e)
                mem.copy(new + k, p)
                rmap.page_remove_rmap(mem, p)
                mem.put_page(p)
        pool.free(x86.table_id_of(old_table))
        entry = mk_huge_pmd(new, vma.vm_page_prot)
        entry = x86.pte_mkyoung(x86.pte_mkdirty(entry))
        if writable:
            entry = maybe_mkwrite(entry, vma)
        yield from sched.spin_lock(pmd_ptl)
        rmap.page_add_new_anon_rmap(mem, new, HPAGE_PMD_NR)
        pool.set(pmdp, entry)
        sched.spin_unlock(pmd_ptl)
        machine.counters["thp_collapse_alloc"] += 1
        machine.log("khugepaged_collapse", mm=mm.name, addr=haddr, new=new)
        return 0
    finally:
        sched.up_write(mm.mmap_sem)


def change_prot_numa(mm: Any, start: int, end: int) -> Gen[int]:
    """change_prot_numa() from task_numa_work(): anonymous entries become PROT_NONE hinting entries."""
    start &= ~(PAGE_SIZE - 1)
    end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    yield from sched.down_read(mm.mmap_sem)
    try:
        vma = mm.vma_lookup(start)
        if vma is None or not vma_is_anonymous(vma) or vma.vm_flags & (VM.HUGETLB | VM.PFNMAP):
            return -EINVAL
        end = min(end, vma.vm_end)
        pool, mem = mm.machine.pool, mm.machine.mem
        r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_VMA, vma, mm, start, end)
        yield from mmu_notifier_invalidate_range_start(r)
        n = 0
        addr = start
        while addr < end:
            level, p, e = mm.pt.lookup(addr)
            nxt = (addr & ~(PMD_SIZE - 1)) + PMD_SIZE
            if p is None or x86.pte_none(e):
                addr = min(nxt, end) if level != "pte" else addr + PAGE_SIZE
                continue
            if level == "pmd" and x86.pmd_leaf(e):
                if e & x86._PAGE_PRESENT and not mem.is_huge_zero_pfn(x86.pte_pfn(e)) and \
                        addr & ~(PMD_SIZE - 1) >= vma.vm_start and nxt <= vma.vm_end:
                    ptl = pmd_lockptr(mm, p)
                    yield from sched.spin_lock(ptl)
                    if pool.get(p) == e:
                        pool.set(p, x86.pte_modify(e, x86.PAGE_NONE) | x86._PAGE_PSE)
                        n += 1
                    sched.spin_unlock(ptl)
                addr = min(nxt, end)
                continue
            if level == "pte" and e & x86._PAGE_PRESENT and not x86.pte_special(e):
                pfn = x86.pte_pfn(e)
                if pfn < mem.nr_ram and mem.flags[pfn] & PG.anon:
                    ptl = pte_lockptr(mm, _pmdp_of(mm, addr))
                    yield from sched.spin_lock(ptl)
                    if pool.get(p) == e:
                        pool.set(p, x86.pte_modify(e, x86.PAGE_NONE))
                        n += 1
                    sched.spin_unlock(ptl)
            addr += PAGE_SIZE
        yield from mmu_notifier_invalidate_range_end(r)
        mm.machine.log("numa_protect", mm=mm.name, start=start, end=end, entries=n)
        return n
    finally:
        sched.up_read(mm.mmap_sem)


def memory_failure(mm: Any, addr: int) -> Gen[int]:
    """memory_failure() of the anonymous page mapped at ``addr``: poison it and unmap it everywhere
    (hwpoison_user_mappings(): collect_procs_anon() and try_to_unmap() each under the anon_vma root rwsem,
    read)."""
    addr &= ~(PAGE_SIZE - 1)
    machine = mm.machine
    mem = machine.mem
    level, ptep, pte = mm.pt.lookup(addr)
    if mm.vma_lookup(addr) is not None and level == "pte" and ptep is not None and pte & x86._PAGE_PRESENT \
            and x86.pte_pfn(pte) < mem.nr_ram and mem.flags[x86.pte_pfn(pte)] & PG.hwpoison:
        # TestSetPageHWPoison: set already (another memory_failure is handling it, holding its reference)
        machine.log("memory_failure", mm=mm.name, addr=addr, pfn=x86.pte_pfn(pte), unmapped=False)
        return -133                                   # -EHWPOISON "already hardware poisoned" (not unpoisoned)
    got = _anon_pte(mm, addr)
    if got is None:
        return (yield from _memory_failure_other(mm, addr))
    vma, ptep, pte, pfn = got
    mem.flags[pfn] |= PG.hwpoison                     # TestSetPageHWPoison
    mem.get_page(pfn)                                 # get_hwpoison_page(): memory_failure's own reference
    yield from sched.might_sleep("hwpoison_user_mappings")
    anon_vma = vma.anon_vma
    if anon_vma is not None:
        # collect_procs() -> collect_procs_anon(): folio_lock_anon_vma_read() around the scan of the tasks
        # (which kills nobody: vm.memory_failure_early_kill = 0), released before the unmap
        yield from rmap.anon_vma_lock_read(anon_vma)
        rmap.anon_vma_unlock_read(anon_vma)
        # try_to_unmap(TTU_HWPOISON) -> rmap_walk_anon(): the root rwsem held for read across the unmap
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        done = yield from _try_to_unmap_hwpoison_one(mm, vma, addr, ptep, pfn)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    machine.log("memory_failure", mm=mm.name, addr=addr, pfn=pfn, unmapped=bool(done))
    if not done:
        mem.flags[pfn] &= _NOT_HWPOISON
        mem.put_page(pfn)                             # put_page() of get_hwpoison_page's reference
    return 0 if done else -EAGAIN


def _try_to_unmap_hwpoison_one(mm: Any, vma: Any, addr: int, ptep: Any, pfn: int) -> Gen[bool]:
    """try_to_unmap_one() with TTU_HWPOISON (mm/rmap.c [5.2] / [6.x]) of the exclusive anonymous page ``pfn``
    at ``addr``: the PTE becomes a hwpoison entry under MMU_NOTIFY_CLEAR of the page.  Whether it did."""
    machine = mm.machine
    pool, mem = machine.pool, machine.mem
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + PAGE_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    ptl = pte_lockptr(mm, _pmdp_of(mm, addr))
    yield from sched.spin_lock(ptl)
    level, ptep2, cur = mm.pt.lookup(addr)
    done = ptep2 == ptep and cur & x86._PAGE_PRESENT and x86.pte_pfn(cur) == pfn
    if done and int(mem.mapcount[pfn]) != 1:
        # mapped elsewhere meanwhile (fork): the kernel's rmap walk would unmap every mapping; this model of
        # memory_failure handles exclusively mapped pages only, so it gives up (and unpoisons)
        done = False
        mem.flags[pfn] &= _NOT_HWPOISON
    if done:
        pool.set(ptep, x86.make_hwpoison_entry(pfn))
        rmap.page_remove_rmap(mem, pfn)
        mem.put_page(pfn)                              # the mapping's reference; get_hwpoison_page's stays
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    return bool(done)


def _memory_failure_other(mm: Any, addr: int) -> Gen[int]:
    """memory_failure() of a page-cache or DAX page mapped at ``addr`` (mm/memory_failure.py)."""
    from hmmirror.mm import memory_failure as mf

    vma = mm.vma_lookup(addr)
    if vma is None or vma.vm_flags & (VM.HUGETLB | VM.PFNMAP | VM.MIXEDMAP):
        return -EINVAL
    level, p, e = mm.pt.lookup(addr)
    if p is None or not e & x86._PAGE_PRESENT:
        return -EINVAL
    mem = mm.machine.mem
    pfn = x86.pte_pfn(e)
    if level in ("pmd", "pud"):
        pfn += (addr & ((PMD_SIZE if level == "pmd" else 1 << 30) - 1)) >> 12
    if mem.is_huge_zero_pfn(pfn) or pfn == mem.zero_pfn:
        return -EINVAL
    if pfn >= mem.nr_ram:
        if vma.kind not in ("fsdax", "devdax"):
            return -EINVAL
        return (yield from mf.memory_failure_dev_pagemap(mm, vma, addr, pfn))
    if level == "pud" or mem.flags[pfn] & PG.anon or not mem.flags[mem.compound_head(pfn)] & (PG.file |
                                                                                           PG.swapbacked):
        return -EINVAL
    return (yield from mf.memory_failure_pagecache(mm, vma, addr, pfn))


def oom_reap(mm: Any) -> Gen[int]:
    """oom_reap_task_mm(): mmap read trylock, then __oom_reap_task_mm (non-blockable invalidations)."""
    from hmmirror.mm import oom_kill

    if not sched.down_read_trylock(mm.mmap_sem):
        return -EAGAIN
    try:
        ret = oom_kill.__oom_reap_task_mm(mm)
        if hasattr(ret, "send"):
            ret = yield from ret
        return 0 if ret in (None, True) else (ret if isinstance(ret, int) else -EAGAIN)
    finally:
        sched.up_read(mm.mmap_sem)


def notifier_churn(run: Any, mm: Any) -> Gen[int]:
    """A second mirror of ``mm`` registered then unregistered, and a plain notifier likewise."""
    from hmmirror.mm.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_register, \
        mmu_notifier_unregister

    class _Ops(MmuNotifierOps):
        def invalidate_range_start(self, mn: Any, r: Any) -> Gen[int]:
            yield from sched.preempt_point("churn_invalidate")
            return 0

    mn = MmuNotifier(_Ops())
    ret = yield from mmu_notifier_register(mn, mm)
    if ret:
        return ret
    from hmmirror.sim.driver import builtin_driver
    other = builtin_driver(mm.machine.profile)
    ret = yield from other.bind(mm)
    yield from sched.preempt_point("churn")
    if ret == 0:
        yield from other.unbind()
    yield from mmu_notifier_unregister(mn, mm)
    return 0


def driver_close(run: Any) -> Gen[int]:
    """The driver's last reference is dropped: ``unbind()`` (file ``release`` / ``drm_gpusvm_fini``).

    A file's ``release`` runs only when no ioctl holds the file any more, so by default the close waits
    for the device jobs; a driver whose close races its fault handling (``unbind_races_faults``, e.g. a GPU
    VM closed while its page-fault worker runs) is unbound at once.
    """
    drv = run.driver
    if getattr(drv, "closed", False) or getattr(run, "unbound", False):
        return -ENOENT
    if not getattr(drv, "unbind_races_faults", False):
        devs = [t for t in run.engine.tasks if t.kind == "device"]
        yield from sched.wait_event(lambda: all(t.done for t in devs), "close: the device jobs hold the file")
    if getattr(drv, "closed", False) or getattr(run, "unbound", False):
        return -ENOENT                                   # somebody else is unbinding it meanwhile
    run.unbound = True                                   # the harness starts no new device fault
    yield from drv.unbind()
    if not getattr(drv, "closed_logged", False):         # a driver with an unbind of its own
        drv.closed_logged = True
        run.machine.log("sim_driver_closed", driver=getattr(drv, "name", "?"))
    return 0


def clear_refs_write(mm: Any, rounds: int) -> Gen[int]:
    """clear_refs_write(CLEAR_REFS_SOFT_DIRTY) (fs/proc/task_mmu.c), ``rounds`` times in a row.

    Each round: mmap lock for read, one ``MMU_NOTIFY_SOFT_DIRTY`` invalidation of ``[0, ULONG_MAX)``, and
    ``clear_soft_dirty()`` of every present entry, which write-protects it.  The model has no soft-dirty bit:
    a writable entry of an anonymous VMA counts as dirtied since the last round (a write after the previous
    round faulted it writable again) and is write-protected; other entries are left alone (file and DAX
    entries keep their permission -- a simplification).  Returns the number of entries write-protected.
    """
    from hmmirror.mm.mmu_notifier import ULONG_MAX

    total = 0
    for k in range(max(rounds, 1)):
        if mm.exited or mm.mm_users <= 0:
            break
        yield from sched.down_read(mm.mmap_sem)
        try:
            vma0 = mm.vmas[0] if mm.vmas else None
            r = mmu_notifier_range_init(MMU_NOTIFY.SOFT_DIRTY, vma0, mm, 0, ULONG_MAX)
            yield from mmu_notifier_invalidate_range_start(r)
            n = 0
            for vma in list(mm.vmas):
                if vma_is_anonymous(vma) and not vma.vm_flags & (VM.HUGETLB | VM.PFNMAP):
                    n += yield from _clear_soft_dirty_vma(mm, vma)
            yield from mmu_notifier_invalidate_range_end(r)
            total += n
        finally:
            sched.up_read(mm.mmap_sem)
        mm.machine.log("clear_refs", mm=mm.name, round=k, wrprotected=n)
        yield from sched.preempt_point("clear_refs")
    return total


def _clear_soft_dirty_vma(mm: Any, vma: Any) -> Gen[int]:
    """clear_refs_pte_range() of one anonymous VMA: write-protect its writable PTEs and THP PMDs."""
    import numpy as np

    pool = mm.machine.pool
    n = 0
    addr = vma.vm_start
    rw = np.uint64(x86._PAGE_RW)
    pres = np.uint64(x86._PAGE_PRESENT)
    while addr < vma.vm_end:
        nxt = min((addr & ~(PMD_SIZE - 1)) + PMD_SIZE, vma.vm_end)
        pudp = mm.pt.walk_to_pud(addr)
        if pudp is None:
            addr = nxt
            continue
        pmdp = mm.pt.pmd_offset(pudp, addr)
        pmd = pool.get(pmdp)
        if x86.pte_none(pmd) or not pmd & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE):
            # none, or a PMD migration entry (clear_soft_dirty_pmd only clears its soft-dirty bit)
            addr = nxt
            continue
        if x86.pmd_leaf(pmd):
            if pmd & x86._PAGE_PRESENT and pmd & x86._PAGE_RW:
                ptl = pmd_lockptr(mm, pmdp)
                yield from sched.spin_lock(ptl)
                cur = pool.get(pmdp)
                if cur == pmd:
                    pool.set(pmdp, cur & ~x86._PAGE_RW)
                    n += 1
                sched.spin_unlock(ptl)
            addr = nxt
            continue
        tid = x86.table_id_of(pmd)
        i0 = (addr >> 12) & 511
        i1 = i0 + ((nxt - addr) >> 12)
        ents = pool.tables[tid][i0:i1]
        hit = np.flatnonzero(((ents & pres) != 0) & ((ents & rw) != 0))
        if hit.size:
            ptl = pte_lockptr(mm, pmdp)
            yield from sched.spin_lock(ptl)
            if pool.get(pmdp) == pmd:                    # the table is still there
                tab = pool.tables[tid]
                for k in hit.tolist():
                    e = int(tab[i0 + k])
                    if e & x86._PAGE_PRESENT and e & x86._PAGE_RW and not x86.pte_special(e):
                        tab[i0 + k] = np.uint64(e & ~x86._PAGE_RW)
                        n += 1
            sched.spin_unlock(ptl)
        addr = nxt
    return n
