"""Vectorised fault-in of anonymous memory (ours): the effect of many sequential ``handle_mm_fault`` calls.

HMM faults every page of a hole one by one (``hmm_vma_fault`` [6.18], ``hmm_vma_walk_hole_`` [5.2]).  For the
common case -- private anonymous memory without THP, every entry none -- each of those calls ends in
``do_anonymous_page`` (mm/memory.c) and does the same thing: allocate the missing upper tables and the PTE
table, then either map a new zeroed page (write fault: ``alloc_page``, ``page_add_new_anon_rmap``, a
writable dirty young PTE) or the shared zero page (read fault: a special, read-only PTE).
:func:`anon_fault_run` does that for a whole run of pages at once and leaves *exactly* the state the
sequential calls leave:

* the same pfns in the same order (``PhysMem.alloc_pages_bulk`` hands them out in ``alloc_page`` order),
  the same entries, ``mapcount``/``refcount``/``flags`` of the new frames;
* the same table ids (tables are allocated in page order: PUD/PMD tables at the first page needing them,
  one PTE table at the first page of each 2 MiB chunk) and the same split PTE-lock objects;
* the same counters (``handle_mm_fault``, ``anon_pages_allocated``) and ``vma.anon_vma``.

What it does not cover (the caller then runs the reference ``handle_mm_fault`` for that page): any VMA that is
not private anonymous memory, a VMA where THP may be used, a page whose entry is not none at every level,
a machine with ``fault_hooks`` installed, a calling task holding a spinlock or in atomic context (the
reference reports ``sleep_in_atomic`` there), an address space the OOM reaper marked unstable (the reference
returns VM_FAULT_SIGBUS: check_stable_address_space), and the page where memory runs out (the reference call
returns VM_FAULT_OOM for it).  It has no preemption points: between two of the reference's
``might_sleep`` points no other task can run in a sequential run, so this equivalence holds for sequential
use (``sched.run``); under the simulator use the reference walk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PMD_SHIFT,
    PMD_SIZE,
    PTRS_PER_TABLE,
    PUD_SHIFT,
    PUD_SIZE,
)
from hmmirror.include.mm_types import FAULT_FLAG, VM
from hmmirror.kernel import sched
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.rmap import anon_vma_prepare
from hmmirror.mm.pgtable import LVL_PTE

from .gather import entry_is_table, entry_none, row_slice

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

U64 = np.uint64
_ANON_BITS = np.uint32(PG.anon | PG.anon_exclusive)


def anon_fault_ok(vma: "VMA") -> bool:
    """May :func:`anon_fault_run` stand for ``handle_mm_fault`` in this VMA, for the current task?"""
    from hmmirror.mm.memory import transparent_hugepage_enabled

    if vma.vm_ops is not None or vma.vm_flags & (VM.SHARED | VM.HUGETLB | VM.PFNMAP):
        return False
    machine = vma.vm_mm.machine
    if machine.fault_hooks or vma.vm_mm.unstable:          # MMF_UNSTABLE: the reference call gets SIGBUS
        return False
    task = sched.current()
    if task.atomic or task.holds_spinlock() is not None:
        return False
    return not transparent_hugepage_enabled(vma)


def first_populated(mm: "MMStruct", addr: int, end: int) -> int:
    """The first page of ``[addr, end)`` whose entry is not none at the level mapping it (a PTE, a PMD or
    PUD that is neither none nor a table), or ``end``: ``[addr, result)`` is all holes and none PTEs."""
    pool = mm.machine.pool
    geo = mm.machine.geo
    pt = mm.pt
    a = addr
    while a < end:
        nxt = geo.pgd.addr_end(a, end)
        pgdp = pt.pgd_offset(a)
        if not pt.pgd_none(pgdp):
            b = a
            while b < nxt:
                n4 = geo.p4d.addr_end(b, nxt)
                p4dp = pt.p4d_offset(pgdp, b)
                if not pt.p4d_none(p4dp):
                    hit = _first_in_pud(pool, x86.table_id_of(pool.get(p4dp)), b, n4)
                    if hit < n4:
                        return hit
                b = n4
        a = nxt
    return end


def _first_in_pud(pool: object, tid: int, addr: int, end: int) -> int:
    i0, _i1, e = row_slice(pool, tid, PUD_SHIFT, addr, end)      # type: ignore[arg-type]
    busy = np.flatnonzero(~entry_none(e))
    for k in busy.tolist():
        a = addr if k == 0 else (addr & ~((1 << PUD_SHIFT) - 1)) + (k << PUD_SHIFT)
        b = min((addr & ~((1 << PUD_SHIFT) - 1)) + ((k + 1) << PUD_SHIFT), end)
        if not entry_is_table(e[k:k + 1])[0]:
            return a
        hit = _first_in_pmd(pool, x86.table_id_of(int(e[k])), a, b)
        if hit < b:
            return hit
    return end


def _first_in_pmd(pool: object, tid: int, addr: int, end: int) -> int:
    i0, _i1, e = row_slice(pool, tid, PMD_SHIFT, addr, end)      # type: ignore[arg-type]
    busy = np.flatnonzero(~entry_none(e))
    base = addr & ~(PMD_SIZE - 1)
    for k in busy.tolist():
        a = addr if k == 0 else base + (k << PMD_SHIFT)
        b = min(base + ((k + 1) << PMD_SHIFT), end)
        if not entry_is_table(e[k:k + 1])[0]:
            return a
        _j0, _j1, ptes = row_slice(pool, x86.table_id_of(int(e[k])), PAGE_SHIFT, a, b)   # type: ignore[arg-type]
        nz = np.flatnonzero(~entry_none(ptes))
        if nz.size:
            return a + (int(nz[0]) << PAGE_SHIFT)
    return end


def anon_fault_run(vma: "VMA", addr: int, end: int, flags: int) -> int:
    """``handle_mm_fault(vma, a, flags)`` for every page ``a`` of ``[addr, end)`` up to the first page that is
    not a hole/none entry, vectorised (see the module docstring).  Returns the number of pages done: 0 when
    the page at ``addr`` is not covered (caller: run the reference for it), fewer than the run when memory
    runs out (the next page's reference call returns VM_FAULT_OOM).

    The caller has checked :func:`anon_fault_ok`.
    """
    mm = vma.vm_mm
    machine = mm.machine
    mem, pool, pt = machine.mem, machine.pool, mm.pt
    stop = first_populated(mm, addr, min(end, vma.vm_end))
    n = (stop - addr) >> PAGE_SHIFT
    if n <= 0:
        return 0
    write = bool(flags & FAULT_FLAG.WRITE)
    prot = vma.vm_page_prot & x86.PTE_FLAGS_MASK
    if write:
        anon_vma_prepare(vma)
        pfns = mem.alloc_pages_bulk(n)
        n = int(pfns.shape[0])
        if n == 0:
            return 0
        bits = prot
        if vma.vm_flags & VM.WRITE:
            bits |= x86._PAGE_RW | x86._PAGE_DIRTY
        bits |= x86._PAGE_ACCESSED
        p0 = int(pfns[0])
        if int(pfns[-1]) - p0 == n - 1 and (n < 2 or bool(np.all(np.diff(pfns) == 1))):
            mem.mapcount[p0:p0 + n] = 1                     # page_add_new_anon_rmap(), contiguous frames
            mem.flags[p0:p0 + n] |= _ANON_BITS
        else:
            mem.mapcount[pfns] = 1                          # page_add_new_anon_rmap()
            mem.flags[pfns] |= _ANON_BITS
        entries = pfns.view(np.uint64)                      # pfns are non-negative: reuse the buffer
        np.left_shift(entries, U64(PAGE_SHIFT), out=entries)
        np.bitwise_or(entries, U64(bits), out=entries)
        machine.counters["anon_pages_allocated"] += n
        zero_entry = 0
    else:
        zero_entry = ((mem.zero_pfn << PAGE_SHIFT) & x86.PTE_PFN_MASK) | \
            ((prot | x86._PAGE_SPECIAL) & ~x86._PAGE_RW)
        entries = None
    machine.counters["handle_mm_fault"] += n
    stop = addr + (n << PAGE_SHIFT)
    done = 0
    a = addr
    while a < stop:                                         # one PUD entry (1 GiB) at a time
        b = min((a & ~(PUD_SIZE - 1)) + PUD_SIZE, stop)
        # tables in page order: the first page needing a level allocates it (PUD/PMD tables, then one PTE
        # table at the first page of each 2 MiB chunk whose PMD is none)
        pudp = pt.pud_alloc(pt.p4d_alloc(pt.pgd_offset(a), a), a)
        pmdp = pt.pmd_alloc(pudp, a)
        pmd_tid = pmdp[0]
        i0 = pmdp[1]
        k = ((b - 1) >> PMD_SHIFT) - (a >> PMD_SHIFT) + 1   # 2 MiB chunks in [a, b)
        rows = pool.tables[pmd_tid, i0:i0 + k].copy()
        missing = np.flatnonzero(entry_none(rows))
        for j in missing.tolist():
            rows[j] = x86.mk_table_entry(pool.alloc(LVL_PTE))  # pte_alloc()
        if missing.size:
            pool.tables[pmd_tid, i0:i0 + k] = rows
        tids = ((rows & x86.PTE_PFN_MASK) >> PAGE_SHIFT).astype(np.int64)
        for tid in tids.tolist():
            pool.ptlock(tid)                                # pte_lockptr(): the split lock exists from now on
        # the entries
        first = (a >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1)
        cnt = (b - a) >> PAGE_SHIFT
        _write_ptes(pool, tids, first, cnt, entries, done, zero_entry)
        done += cnt
        a = b
    return n


def _write_ptes(pool: object, tids: np.ndarray, first: int, cnt: int, entries: np.ndarray | None, done: int,
                zero_entry: int) -> None:
    """Write ``cnt`` PTEs from index ``first`` of the first table of ``tids`` on (one 1 GiB region)."""
    tables = pool.tables                                    # type: ignore[attr-defined]
    flat_ok = tids.size > 0 and bool(np.all(np.diff(tids) == 1)) if tids.size > 1 else True
    if flat_ok:
        t0 = int(tids[0])
        view = tables[t0:t0 + tids.size].reshape(-1)[first:first + cnt]
        if entries is None:
            view[:] = zero_entry
        else:
            view[:] = entries[done:done + cnt]
        return
    pos = 0
    for j, tid in enumerate(tids.tolist()):
        lo = first if j == 0 else 0
        k = min(PTRS_PER_TABLE - lo, cnt - pos)
        if entries is None:
            tables[tid, lo:lo + k] = zero_entry
        else:
            tables[tid, lo:lo + k] = entries[done + pos:done + pos + k]
        pos += k


__all__ = ["anon_fault_ok", "anon_fault_run", "first_populated"]
