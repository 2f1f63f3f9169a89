"""The invariants the simulator checks, each a small named instrument.

| name | guarantee |
|---|---|
| ``sleep_in_atomic`` | no function that may sleep runs with a spinlock held or in a non-blockable callback (``sched.might_sleep``) |
| ``locks_balanced`` | a task ends every operation, device fault and its life holding no lock |
| ``double_unlock`` / ``recursive_lock`` | no lock is released by a task that does not hold it, or taken twice (``sched``) |
| ``lock_order`` | no two tasks take two lock classes in opposite orders (lockdep's AB-BA) |
| ``pte_map_balance`` | every ``pte_offset_map`` of a walk is paired with ``pte_unmap`` before the task ends an operation, a device fault or its life |
| ``pgmap_refcount`` | every ``dev_pagemap`` count returns to its baseline when no HMM call is in progress |
| ``page_counts`` | page mapcount (and refcount at quiescent points) agree with a walk of all page tables |
| ``coherence`` | after ``invalidate_range_end`` returns, and at every device commit outside an invalidation, no device entry maps a pfn the CPU no longer maps there with at least that permission |
| ``commit_invalid`` | a driver never commits a device entry from a snapshot an invalidation it was told about overlapped |
| ``result_contract`` | a successful ``hmm_range_fault`` leaves every requested page valid, writable if asked, and equal to the CPU page table; every VALID entry reported describes the real entry; a successful driver fault leaves every requested page mirrored with the CPU's pfn, writable if asked unless another fault of the device committed it read-only after this one began (a benign downgrade) |
| ``liveness`` | every driver loop completes within a bounded number of retries while no invalidation is pending; the run ends within its step bound |
| ``deadlock`` / ``no_waker`` / ``device_teardown`` | no task is left waiting with nobody able to wake it (engine) |
| ``exception`` | no Python exception escapes model code (engine) |
| ``report:KIND`` | a ``sched.report`` / ``WARN_ON`` event of the model (engine, :class:`WarnEvents`) |

Cadence.  Every invariant is checked at every step, except ``page_counts``: its mapcount walk runs every
``count_every`` steps (default 256) at a step where no task holds a spinlock (mapcount and entries change
together under the page-table lock), and its refcount part only when every task is between operations and at
the end of the run (references are legitimately in flight inside an operation).  ``every_step=True`` (CLI
``--every-step``) runs the mapcount walk at every such step.  The coherence check looks only at the device
entries touched in the step and at the range whose ``invalidate_range_end`` returned in it.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.kernel.sched import Lock
from hmmirror.sim.findings import frame_stack, function_name, gen_stack, is_kernel_name, location_of

EAGAIN = 11

#: checks of many pages at once (range commits heard as one, vectorised pre-checks that pick the pages the
#: per-page check must look at); False: page by page, the reference they are tested against
VECTORISED = True
_BRACKETS = re.compile(r"\[[^\]]*\]|\d+")


# --- helpers ---------------------------------------------------------------------------------------------
_PFN = x86.PTE_PFN_MASK
_PRESENT, _PSE, _RW = x86._PAGE_PRESENT, x86._PAGE_PSE, x86._PAGE_RW
_NOT_AD = ~(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)


def cpu_leaf(mm: Any, va: int) -> tuple[int, bool, bool]:
    """(pfn, readable, writable) of the CPU translation of ``va`` (pfn -1 when nothing present maps it).

    A device-private entry translates to its device page (the owner's device may map it: hmm_range_fault
    reports it), writable if the entry is; a device-exclusive entry to its page, read-only (the device that
    holds it exclusive maps it for atomics).

    The walk of ``PageTables.lookup`` (same stops: a none or leaf PUD, a none, leaf or non-present PMD, the
    PTE), read straight from the table rows: the coherence and contract checks call it per device page."""
    pt = mm.pt
    item = pt.pool.tables.item
    geo = pt.geo
    e = item(pt.pgd, (va >> geo.pgdir_shift) & 511)
    if not geo.p4d_folded:
        if not e & _NOT_AD:                      # pgd_none
            return -1, False, False
        e = item((e & _PFN) >> 12, (va >> 39) & 511)
    if not e & _NOT_AD:                          # p4d_none
        return -1, False, False
    e = item((e & _PFN) >> 12, (va >> 30) & 511)     # the PUD entry
    if not e & _NOT_AD or e & _PSE:
        if not e & _NOT_AD or not e & _PRESENT:
            return -1, False, False
        return ((e & _PFN) >> 12) + ((va & (PUD_SIZE - 1)) >> 12), True, bool(e & _RW)
    e = item((e & _PFN) >> 12, (va >> 21) & 511)     # the PMD entry
    if not e & _NOT_AD or e & _PSE or not e & 1:
        if not e & _NOT_AD or not e & _PRESENT or not e & _PSE:
            return -1, False, False
        return ((e & _PFN) >> 12) + ((va & (PMD_SIZE - 1)) >> 12), True, bool(e & _RW)
    e = item((e & _PFN) >> 12, (va >> 12) & 511)     # the PTE
    if not e & _NOT_AD:
        return -1, False, False
    if not e & _PRESENT:
        if e & x86._PAGE_PROTNONE:
            return -1, False, False
        se = x86.pte_to_swp_entry(e)
        if x86.is_device_private_entry(se):
            return se.offset, True, x86.is_writable_device_private_entry(se)
        if x86.is_device_exclusive_entry(se):
            return se.offset, True, False
        return -1, False, False
    return (e & _PFN) >> 12, True, bool(e & _RW)


def cpu_leaf_lookup(mm: Any, va: int) -> tuple[int, bool, bool]:
    """:func:`cpu_leaf` through ``PageTables.lookup`` (the reference the fast one is tested against)."""
    level, p, e = mm.pt.lookup(va)
    if p is None or x86.pte_none(e):
        return -1, False, False
    if not e & x86._PAGE_PRESENT:
        if level != "pte" or e & x86._PAGE_PROTNONE:
            return -1, False, False
        se = x86.pte_to_swp_entry(e)
        if x86.is_device_private_entry(se):
            return se.offset, True, x86.is_writable_device_private_entry(se)
        if x86.is_device_exclusive_entry(se):
            return se.offset, True, False
        return -1, False, False
    if level == "pmd":
        if not x86.pmd_leaf(e):
            return -1, False, False
        pfn = x86.pte_pfn(e) + ((va & (PMD_SIZE - 1)) >> 12)
    elif level == "pud":
        if not x86.pud_leaf(e):
            return -1, False, False
        pfn = x86.pte_pfn(e) + ((va & (PUD_SIZE - 1)) >> 12)
    else:
        pfn = x86.pte_pfn(e)
    return pfn, True, bool(e & x86._PAGE_RW)


_NOT_AD64 = np.uint64(_NOT_AD & ((1 << 64) - 1))
_PFN64 = np.uint64(_PFN)


def cpu_leaf_range(mm: Any, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cpu_leaf` of the ``n`` pages from ``start``, as arrays ``(pfn, readable, writable)``: the upper
    levels walked once per PMD (or PUD leaf), a PTE table's row read at once; an entry that is neither none
    nor present (swap, migration, device-private/exclusive) through :func:`cpu_leaf` itself."""
    pfn = np.full(n, -1, dtype=np.int64)
    rd = np.zeros(n, dtype=bool)
    wr = np.zeros(n, dtype=bool)
    pt = mm.pt
    tables = pt.pool.tables
    item = tables.item
    geo = pt.geo
    start &= ~(PAGE_SIZE - 1)
    end = start + n * PAGE_SIZE
    i = 0
    while i < n:
        va = start + i * PAGE_SIZE
        k = (min(((va >> 21) + 1) << 21, end) - va) >> 12       # pages to the next PMD boundary
        e = item(pt.pgd, (va >> geo.pgdir_shift) & 511)
        if not geo.p4d_folded:
            if not e & _NOT_AD:
                i += k
                continue
            e = item((e & _PFN) >> 12, (va >> 39) & 511)
        if not e & _NOT_AD:
            i += k
            continue
        e = item((e & _PFN) >> 12, (va >> 30) & 511)          # the PUD entry
        if not e & _NOT_AD or e & _PSE:
            k = (min(((va >> 30) + 1) << 30, end) - va) >> 12   # the whole PUD
            if e & _NOT_AD and e & _PRESENT:
                base = ((e & _PFN) >> 12) + ((va & (PUD_SIZE - 1)) >> 12)
                pfn[i:i + k] = np.arange(base, base + k, dtype=np.int64)
                rd[i:i + k] = True
                wr[i:i + k] = bool(e & _RW)
            i += k
            continue
        e = item((e & _PFN) >> 12, (va >> 21) & 511)          # the PMD entry
        if not e & _NOT_AD or e & _PSE or not e & 1:
            if e & _NOT_AD and e & _PRESENT and e & _PSE:
                base = ((e & _PFN) >> 12) + ((va & (PMD_SIZE - 1)) >> 12)
                pfn[i:i + k] = np.arange(base, base + k, dtype=np.int64)
                rd[i:i + k] = True
                wr[i:i + k] = bool(e & _RW)
            i += k
            continue
        j = (va >> 12) & 511
        row = tables[(e & _PFN) >> 12, j:j + k]
        present = (row & np.uint64(_PRESENT)) != 0
        pfn[i:i + k] = np.where(present, ((row & _PFN64) >> np.uint64(12)).astype(np.int64), -1)
        rd[i:i + k] = present
        wr[i:i + k] = present & ((row & np.uint64(_RW)) != 0)
        for x in np.flatnonzero(~present & ((row & _NOT_AD64) != 0)).tolist():
            pfn[i + x], rd[i + x], wr[i + x] = cpu_leaf(mm, va + x * PAGE_SIZE)
        i += k
    return pfn, rd, wr


class PageLatest:
    """``va -> value`` of the latest record covering the page at ``va``, as a dict of pages would answer: a
    page recorded alone is a dict entry, the mapped pages of a range commit are one record (a GiB committed
    at once costs one record, not 262,144 entries).  Lookups (rare: on the way to a report) look at the
    page's entry and the range records made after it, newest first."""

    __slots__ = ("pages", "ranges", "seq")

    def __init__(self) -> None:
        self.pages: dict[int, tuple[int, Any]] = {}
        self.ranges: list[tuple[int, int, np.ndarray, Any]] = []     # (seq, first va, mapped mask, value)
        self.seq = 0

    def __setitem__(self, va: int, value: Any) -> None:
        self.seq += 1
        self.pages[va] = (self.seq, value)

    def set_range(self, va0: int, mapped: np.ndarray, value: Any) -> None:
        """Record ``value`` for page ``i`` from ``va0`` wherever ``mapped[i]``."""
        self.seq += 1
        self.ranges.append((self.seq, va0, mapped, value))

    def get(self, va: int, default: Any = None) -> Any:
        seq, value = self.pages.get(va, (0, default))
        for rseq, va0, mapped, rvalue in reversed(self.ranges):
            if rseq < seq:
                break
            i = (va - va0) >> PAGE_SHIFT
            if 0 <= i < mapped.size and va >= va0 and mapped[i]:
                return rvalue
        return value


class CommitBatch:
    """The pages of one ``DevicePageTable.commit_range`` for the commit hooks' pre-checks: ``va0``, ``items``
    (``(pfn, write)`` or None per page) and, for the mapped pages, their indices ``idx``, ``pfn``, ``write``
    and ``va`` as arrays."""

    __slots__ = ("va0", "items", "idx", "pfn", "write", "va")

    def __init__(self, va0: int, items: list[tuple[int, bool] | None], mapped: list[int]) -> None:
        self.va0 = va0
        self.items = items
        self.idx = np.array(mapped, dtype=np.int64)
        # (pfn, write) rows of the mapped pages in one conversion (pfns < 2**63, write 0/1)
        rows = np.array(items if len(mapped) == len(items) else [items[i] for i in mapped],
                        dtype=np.int64).reshape(-1, 2)
        self.pfn = rows[:, 0].copy()
        self.write = rows[:, 1] != 0
        self.va = va0 + self.idx * PAGE_SIZE


def _is_migration_pte(mm: Any, va: int) -> bool:
    level, p, e = mm.pt.lookup(va)
    if p is None or level != "pte" or x86.pte_none(e) or e & x86._PAGE_PRESENT:
        return False
    return x86.is_migration_entry(x86.pte_to_swp_entry(e))


def committer_frame(frame: Any) -> Any:
    """The frame that changed the device page table: the first one outside the simulator and
    drivers/device_mmu.py (the table's own methods are not where a driver went wrong).  When the
    simulator itself committed (a built-in adapter in sim/), the innermost simulator frame below the
    engine's loop: never a frame of whatever runs the engine (a worker process, runpy, pytest), so the
    location does not depend on how the run was started."""
    f = frame
    inner_sim = None
    while f is not None:
        fn = f.f_code.co_filename.replace("\\", "/")
        if fn.endswith("/hmmirror/sim/engine.py") and f.f_code.co_name == "_loop":
            break
        if fn.endswith("/hmmirror/drivers/device_mmu.py"):
            pass
        elif "/hmmirror/sim/" not in fn:
            return f
        elif inner_sim is None:
            inner_sim = f
        f = f.f_back
    return inner_sim if inner_sim is not None else frame


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class Tracker:
    """Shared bookkeeping (not an invariant): invalidations in flight per mm, their epochs, device-table
    touches of the current step, and invalidations delivered to the driver."""

    name = "tracker"

    def __init__(self) -> None:
        self.inflight: dict[str, list[list[Any]]] = {}     # mm -> [[start, end, start_step]]
        self.epoch: dict[str, int] = {}                     # mm -> invalidations started so far
        self.ended: list[tuple[str, int, int]] = []         # (mm, start, end) ended in this step
        self.delivered: list[list[Any]] = []                # [start, end, step, end_step|None, task idx]
        # id of the kernel's range -> the records it was delivered as (one per notifier it reached: a driver
        # with a notifier per chunk is told once per chunk); they all end with that range
        self.delivered_by: dict[int, list[list[Any]]] = {}
        # the objects whose id() keys those dicts, kept alive for the run: a freed range's id reused by a
        # later one would find the earlier range's records (results then hung on memory addresses)
        self.keyed: list[Any] = []
        self.driver: Any = None
        self.mm_name = ""
        self.engine: Any = None
        self.commit_hooks: list[Any] = []                   # fn(st, va, pfn, write) at every device map
        self.last_call = {}
        self.migrating = {}                                  # id(args) -> range of the driver's own migration
        self.callback_begin: list[Any] = []                 # fn(st, args) when a driver callback starts
        self.callback_end: list[Any] = []                   # fn(st, args, ret) when it returned
        self.last_commit = PageLatest()                    # va -> (task idx, step) of its latest device map
        self.commit_code = PageLatest()                    # va -> code object of the function that mapped it
        # every invalidation of the mirrored mm, told or not (own migrations too): [start, end, step, end_step]
        self.history: list[list[Any]] = []
        self.snapshot_of: Any = None                        # fn(st, va) -> step its snapshot began (CommitInvalid)

    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.driver = run.driver
        self.alias = getattr(run.driver, "device_alias", None)
        self.mm_name = run.driver.mm.name if getattr(run.driver, "mm", None) is not None else run.scenario.mirror
        pt = getattr(run.driver, "pt", None)
        if pt is not None and hasattr(pt, "listener"):
            pt.listener = self._on_pt
            if VECTORISED and hasattr(pt, "range_listener"):
                pt.range_listener = self._on_pt_range
        orig = run.driver.invalidate
        # a driver reused for another run still carries the previous run's wrapper: wrap its callback, not that
        orig = getattr(orig, "tracked_callback", orig)
        # the subscriber's own callback (the adapters of the built-in drivers route the driver's callback
        # through their ``invalidate``): the location of a coherence finding it is responsible for
        cb = getattr(run.driver, "_orig_invalidate", None) or getattr(run.driver, "_orig_sync", None) or orig
        self.callback = function_name(cb)
        ents = getattr(pt, "entries", None)
        self.orig_invalidate = orig

        def invalidate(*args: Any, **kw: Any) -> Any:
            # the driver has been told once its callback returned (it may first wait for its own lock,
            # behind a commit that it will then undo)
            for fn in self.callback_begin:
                fn(eng.current, args)
            ret = yield from orig(*args, **kw)
            for fn in self.callback_end:
                fn(eng.current, args, ret)
            r = next((a for a in args if hasattr(a, "start") and hasattr(a, "end")), None)
            raw = getattr(r, "raw", None) or r
            if r is not None and self.own_event(r):
                r = None          # the driver's own migration / exclusive access: it commits that migration's result
            # (a [5.2] ``sync_cpu_device_pagetables`` returns 0 when it is done: ``0 in (False, ...)`` is
            # true in Python, so the test is by identity; False / -EAGAIN: not told, it could not block)
            if r is not None and ret is not False and ret != -EAGAIN:
                cur = eng.current.idx if eng.current is not None else -1
                start, end = r0, r1 = int(r.start), int(r.end)
                # told for the notifier's own interval only (a driver with a notifier per chunk)
                sub = getattr(r, "sub", None) if not hasattr(r, "last") else None
                sub = sub or next((a for a in args if hasattr(a, "last") and hasattr(a, "start")), None)
                if sub is not None and hasattr(sub, "last"):
                    start, end = max(start, int(sub.start)), min(end, int(sub.last) + 1)
                # the device entries of the range the callback returned with (model state of the device)
                kept: Any = ()
                if ents:
                    if (end - start) // PAGE_SIZE < len(ents):
                        kept = {v for v in range(start & ~(PAGE_SIZE - 1), min(end, 1 << 57), PAGE_SIZE)
                                if v in ents}
                    else:
                        kept = {v for v in ents if start <= v < end}
                rec = [start, end, eng.step, None, cur, kept, r0, r1]
                if not self.inflight_overlap(self.mm_name, r0, r1):
                    rec[3] = eng.step
                else:
                    self.delivered_by.setdefault(id(raw), []).append(rec)
                    self.keyed.append(raw)     # alive for the run: its id never names another range
                self.delivered.append(rec)
            return ret
        invalidate.tracked_callback = orig          # type: ignore[attr-defined]
        run.driver.invalidate = invalidate

    callback = "-"

    def kept_by_callback(self, va: int) -> bool:
        """Did a delivered callback return while the device still mapped ``va`` (inside its range)?"""
        for d in reversed(self.delivered):
            if d[0] <= va < d[1]:
                return va in d[5]
        return False

    migrating: dict[int, tuple[int, int, int]]

    def in_own_migration(self, va: int, task: int | None = None) -> bool:
        """Is ``va`` in a range the driver is migrating itself (between its migrate_vma_setup and
        migrate_vma_finalize: the CPU holds migration entries, the device may map the destination), by
        ``task`` if given?"""
        return any(s <= va < e and (task is None or t == task) for s, e, t in self.migrating.values())

    def own_event(self, r: Any) -> bool:
        """Is the invalidation ``r`` (a range or an Invalidation) the driver's own MIGRATE / EXCLUSIVE event
        (``owner`` = the driver's ``pgmap->owner``)?"""
        from hmmirror.include.mm_types import MMU_NOTIFY

        if getattr(r, "event", None) not in (MMU_NOTIFY.MIGRATE, MMU_NOTIFY.EXCLUSIVE):
            return False
        raw = getattr(r, "raw", None)
        owner = getattr(raw if raw is not None else r, "owner", None)
        return owner is not None and owner is getattr(self.driver, "owner", None)

    def same_page(self, devpfn: int, cpfn: int) -> bool:
        """Does a device entry naming ``devpfn`` map the CPU's page ``cpfn``?  Equal pfns, or the driver's own
        representation of one of its device-private pages (``driver.device_alias(pfn)``: dmirror maps the
        system page backing a device page, BACKING_PAGE())."""
        if devpfn == cpfn:
            return True
        if cpfn < 0 or self.alias is None:
            return False
        return bool(self.alias(cpfn) == devpfn)

    alias: Any = None

    def _on_pt(self, op: str, va: int, pfn: int, write: bool) -> None:
        if op != "map":
            return
        st = self.engine.current
        self.last_commit[va] = (st.idx if st is not None else -1, self.engine.step)
        self.commit_code[va] = committer_frame(sys._getframe(1)).f_code
        if self.engine.finding is None:
            for fn in self.commit_hooks:
                fn(st, va, pfn, write)

    def _on_pt_range(self, va0: int, items: list[tuple[int, bool] | None]) -> None:
        """A whole range committed at once (``DevicePageTable.commit_range``): the same as :meth:`_on_pt` page
        by page, in page order.  A hook whose instrument has ``commit_suspects(st, batch)`` is called only for
        the pages it returns (a superset of the pages where it can report: a vectorised pre-check); a hook
        without it, for every mapped page."""
        st = self.engine.current
        if None not in items:                 # the common whole range: no Python test per page
            mapped = list(range(len(items)))
            mask = np.ones(len(items), dtype=bool)
        else:
            mapped = [i for i, it in enumerate(items) if it is not None]
            mask = np.array([it is not None for it in items], dtype=bool)
        if not mapped:
            return
        val = (st.idx if st is not None else -1, self.engine.step)
        self.last_commit.set_range(va0, mask, val)
        self.commit_code.set_range(va0, mask, committer_frame(sys._getframe(1)).f_code)
        if self.engine.finding is not None or not self.commit_hooks:
            return
        batch = CommitBatch(va0, items, mapped)
        sus = []
        for fn in self.commit_hooks:
            pre = getattr(getattr(fn, "__self__", None), "commit_suspects", None)
            sus.append(set(pre(st, batch)) if pre is not None else set(mapped))
        for i in sorted(set().union(*sus)):
            if self.engine.finding is not None:
                break
            pfn, write = items[i]  # type: ignore[misc]
            va = va0 + i * PAGE_SIZE
            for fn, s in zip(self.commit_hooks, sus):
                if i in s:
                    fn(st, va, pfn, write)

    #: task idx -> the location (``module.function``) of the task's latest HMM call that returned
    last_call: dict[int, str]

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"hmm_range_fault", "hmm_range_snapshot", "hmm_vma_fault", "migrate_vma_setup",
                           "migrate_vma_finalize", "invalidate_range_start", "invalidate_range_end",
                           "invalidate_range_start_failed"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what in self.HMM_CALLS:
            st = eng.current
            if st is not None:
                # the HMM call logs its own return: its frame (or its tracing wrapper's, described as the
                # call) is the innermost kernel-named frame of the live stack
                self.last_call[st.idx] = location_of(frame_stack(sys._getframe(1)))
            return
        if what == "migrate_vma_setup" or what == "migrate_vma_finalize":
            args = sys._getframe(2).f_locals.get("args" if what == "migrate_vma_setup" else "migrate")
            if args is not None and args.pgmap_owner is not None and \
                    args.pgmap_owner is getattr(self.driver, "owner", None):
                if what == "migrate_vma_setup":
                    cur = eng.current.idx if eng.current is not None else -1
                    self.migrating[id(args)] = (int(args.start), int(args.end), cur)
                    self.keyed.append(args)
                else:
                    self.migrating.pop(id(args), None)
            return
        if what == "invalidate_range_start":
            mm = ev.get("mm", "")
            self.inflight.setdefault(mm, []).append([ev["start"], ev["end"], eng.step])
            if mm == self.mm_name:
                self.history.append([ev["start"], ev["end"], eng.step, None])
            self.epoch[mm] = self.epoch.get(mm, 0) + 1
        elif what in ("invalidate_range_end", "invalidate_range_start_failed"):
            mm = ev.get("mm", "")
            lst = self.inflight.get(mm, [])
            for i, r in enumerate(lst):
                if r[0] == ev["start"] and r[1] == ev["end"]:
                    del lst[i]
                    break
            if mm == self.mm_name:
                for h in reversed(self.history):
                    if h[3] is None and h[0] == ev["start"] and h[1] == ev["end"]:
                        h[3] = eng.step
                        break
            if what == "invalidate_range_end" and not self.own_event(sys._getframe(2).f_locals.get("r")):
                # (the driver's own migration / exclusive event: it may keep mapping what it migrates)
                self.ended.append((mm, ev["start"], ev["end"]))
            if mm == self.mm_name:
                raw = sys._getframe(2).f_locals.get("r")
                recs = self.delivered_by.pop(id(raw), None) if raw is not None else None
                if recs is not None and what == "invalidate_range_end":
                    for d in recs:                  # every notifier the range reached was told
                        if d[3] is None:
                            d[3] = eng.step
                else:
                    for d in self.delivered:
                        if d[3] is None and d[-2] == ev["start"] and d[-1] == ev["end"]:
                            d[3] = eng.step
                            break

    HMM_CALLS = ("hmm_range_fault", "hmm_range_snapshot", "hmm_vma_fault")

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        """Is the device task that just ran inside an HMM call (walked once per step, shared)?"""
        if st.kind == "device":
            self.in_hmm = not st.done and _in_calls(st.gen, self.HMM_CALLS)

    in_hmm = False

    def inflight_overlap(self, mm: str, start: int, end: int) -> bool:
        for r in self.inflight.get(mm, ()):
            if overlaps(r[0], r[1], start, end):
                return True
        return False

    def before_step(self, eng: Any, st: Any) -> None:
        if self.ended:
            self.ended.clear()

    _pruned = (-1, -1)                                       # the ``oldest`` each list was last pruned with

    def prune(self, oldest: int) -> None:
        """Forget delivered invalidations that ended before ``oldest`` (no snapshot can still see them).

        A list pruned with ``oldest`` keeps no record that ended before it, and a record ends at the step it
        ends at -- never before an ``oldest`` already used (snapshot steps are past steps) --: pruned again
        with the same or an earlier ``oldest`` it would stay as it is, so that is skipped."""
        pd, ph = self._pruned
        if len(self.delivered) > 64 and oldest > pd:
            self.delivered = [d for d in self.delivered if d[3] is None or d[3] >= oldest]
            pd = oldest
        if len(self.history) > 64 and oldest > ph:
            self.history = [h for h in self.history if h[3] is None or h[3] >= oldest]
            ph = oldest
        self._pruned = (pd, ph)

    def changed_since(self, st: Any, va: int) -> bool:
        """Did an invalidation of the mirrored mm covering ``va`` (told to the driver or not) run after the
        snapshot ``st`` commits at ``va`` began -- is a wrong device entry there a stale snapshot (the CPU
        changed it since), rather than one the HMM call itself reported wrong?"""
        snap = self.snapshot_of(st, va) if self.snapshot_of is not None and st is not None else 0
        step = self.engine.step
        return any(h[0] <= va < h[1] and h[2] <= step and (h[3] is None or h[3] >= snap) for h in self.history)


# --- lock discipline -------------------------------------------------------------------------------------
class LockDiscipline:
    """``locks_balanced`` and ``lock_order`` (``sleep_in_atomic``, ``double_unlock`` come from sched)."""

    name = "lock_discipline"

    def __init__(self) -> None:
        self.edges: dict[tuple[str, str], tuple[str, int]] = {}
        self.mm_names: set[str] = set()
        self._cls: dict[str, str] = {}

    def attach(self, eng: Any, run: Any) -> None:
        self.mm_names = set(run.machine.mms)

    def lock_class(self, name: str) -> str:
        c = self._cls.get(name)
        if c is None:
            head, dot, tail = name.partition(".")
            if dot and _BRACKETS.sub("", head) in {_BRACKETS.sub("", m) for m in self.mm_names} | {""}:
                name2 = tail
            else:
                name2 = name
            c = self._cls[name] = _BRACKETS.sub("", name2)
        return c

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if point is None or point.kind != "lock":
            return
        held = st.task.held
        if not held:
            return
        lock: Lock = point.obj
        b = lock.key or self.lock_class(lock.name)       # a lockdep_set_class() class, else the name's
        for h in held:
            a = h.key or self.lock_class(h.name)
            if a == b:
                continue
            rev = self.edges.get((b, a))
            if rev is not None and rev[0] != st.name:
                eng.violate("lock_order", f"{st.name} takes {lock.name} while holding {h.name}, but "
                            f"{rev[0]} took {a} while holding {b} at step {rev[1]} (AB-BA)",
                            st=st, state={"held": [x.name for x in held], "acquiring": lock.name,
                                          "other": rev[0], "other_step": rev[1]})
                return
            self.edges.setdefault((a, b), (st.name, eng.step))

    def _balanced(self, eng: Any, st: Any, when: str) -> None:
        if st.task.held:
            eng.violate("locks_balanced", f"{st.name} {when} holding {', '.join(l.name for l in st.task.held)}",
                        st=st, state={"held": [l.name for l in st.task.held]})

    def task_exited(self, eng: Any, st: Any) -> None:
        if st.error is None:
            self._balanced(eng, st, "finished")

    def op_end(self, eng: Any, st: Any) -> None:
        self._balanced(eng, st, f"ended {st.op}")

    def fault_end(self, eng: Any, st: Any, start: int, end: int, write: bool, ret: int) -> None:
        self._balanced(eng, st, f"returned from the driver fault ({ret})")


class PteMapBalance:
    """``pte_map_balance``: every ``pte_offset_map()`` a walk takes is given back with ``pte_unmap()`` by the
    same task before it ends an operation, a device fault or its life (``sched.pte_map_get``/``_put``: a
    ``kmap_local`` of the table with HIGHPTE, an RCU read section in 6.5+, whose imbalance lockdep and the
    kmap debug checks report at the return to user space).  An unmap with nothing mapped is reported by
    ``sched`` itself.  The location is the function that took the mapping it was left with."""

    name = "pte_map_balance"

    def _balanced(self, eng: Any, st: Any, when: str) -> None:
        maps = st.task.pte_maps
        if maps:
            eng.violate("pte_map_balance", f"{st.name} {when} with {len(maps)} PTE table(s) still mapped "
                        f"(pte_offset_map in {', '.join(maps)})", st=st, location=maps[-1],
                        state={"mapped": list(maps)})
            maps.clear()                    # reported once

    def task_exited(self, eng: Any, st: Any) -> None:
        if st.error is None:
            self._balanced(eng, st, "finished")

    def op_end(self, eng: Any, st: Any) -> None:
        self._balanced(eng, st, f"ended {st.op}")

    def fault_end(self, eng: Any, st: Any, start: int, end: int, write: bool, ret: int) -> None:
        self._balanced(eng, st, f"returned from the driver fault ({ret})")


# --- references ------------------------------------------------------------------------------------------
class PgmapRefs:
    """``pgmap_refcount``: HMM's ``get_dev_pagemap`` references are all dropped when no HMM call runs.

    Count changes made in a step that ran outside every HMM call move the baseline: a step of a task that is
    not a device job (teardown, unmapping), and a device job's step that began and ended outside an HMM call
    with no HMM call returning in it (its own mmput -> exit_mmap, a reference the driver keeps for itself --
    [6.x] HMM takes no pgmap reference at all, [5.2] it drops the ones it takes before returning).  Changes
    made inside HMM calls must cancel out once no device job is inside one.
    """

    name = "pgmap_refcount"
    #: the log kinds :meth:`on_log` reads: an HMM call logs its own return
    log_kinds = frozenset(Tracker.HMM_CALLS)

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.base: dict[int, int] = {}
        self.before: dict[int, int] = {}
        self.in_hmm: set[int] = set()
        self.pgmaps: list[Any] = []
        self.kept: dict[int, str] = {}                 # id(pgmap) -> signature of the finding that reported kept refs
        self.returned = False                          # an HMM call returned during the current step

    def attach(self, eng: Any, run: Any) -> None:
        from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE

        # device-private pages hold a pgmap reference for as long as they are allocated (zone_device_page_init
        # .. free_zone_device_folio): their counts follow migrations, not HMM calls (page_counts checks them)
        self.pgmaps = [p for p in run.machine.pgmaps if p.type != MEMORY_DEVICE_PRIVATE]
        self.base = {id(p): p.count for p in self.pgmaps}

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        if ev["what"] in self.log_kinds:
            self.returned = True

    def before_step(self, eng: Any, st: Any) -> None:
        if self.pgmaps:
            self.before = {id(p): p.count for p in self.pgmaps}
            self.returned = False

    def _move_baseline(self) -> None:
        for p in self.pgmaps:
            d = p.count - self.before[id(p)]
            if d:
                self.base[id(p)] += d

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if not self.pgmaps:
            return
        if st.kind != "device":
            self._move_baseline()
            return
        was_in = st.idx in self.in_hmm
        if self.t.in_hmm:
            self.in_hmm.add(st.idx)
            return
        self.in_hmm.discard(st.idx)
        if not was_in and not self.returned:
            self._move_baseline()                      # the whole step ran outside any HMM call
            return
        if self.in_hmm:
            return
        for p in self.pgmaps:
            if p.count != self.base[id(p)]:
                # a reference a walk took and did not give back: reported at the HMM call that returned
                # with it (not at the driver's next blocking point, where the task now stands)
                call = self.t.last_call.get(st.idx)
                eng.violate("pgmap_refcount", f"{p.name}: count {p.count} after the HMM calls of {st.name} "
                            f"returned, baseline {self.base[id(p)]}", st=st, location=call,
                            detail="kept" if p.count > self.base[id(p)] else "dropped",
                            state={"pgmap": p.name, "count": p.count, "baseline": self.base[id(p)],
                                   "stats": dict(p.ref.stats) if getattr(p, "ref", None) else {}})
                sig = next((f.signature for f in eng.findings if f.invariant == "pgmap_refcount"), None)
                if sig is not None and p.count > self.base[id(p)]:
                    self.kept[id(p)] = sig
                return

    def explain_wait(self, eng: Any, st: Any) -> str | None:
        """A task that waits for the references of a pgmap to drain (``pgmap_wait_idle``: the 5.2
        ``nd_pmem_remove`` teardown) where this run reported references an HMM walk kept: those are what it
        waits for -- the wait that never ends is that finding's consequence."""
        if not self.kept:
            return None
        gen = st.gen
        while gen is not None:
            f = getattr(gen, "gi_frame", None)
            if f is None:
                return None
            if f.f_code.co_name == "pgmap_wait_idle":
                pgmap = f.f_locals.get("pgmap")
                return self.kept.get(id(pgmap)) if pgmap is not None else None
            gen = getattr(gen, "gi_yieldfrom", None)
        return None


def _on_stack(names: tuple[str, ...]) -> bool:
    """One of ``names`` is running on the live stack (the running task's generators are resumed frames on it:
    a running generator's ``gi_yieldfrom`` is not set, so :func:`_in_calls` cannot see them)."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in names:
            return True
        f = f.f_back
    return False


def _in_calls(gen: Any, names: tuple[str, ...]) -> bool:
    while gen is not None:
        f = getattr(gen, "gi_frame", None)
        if f is None:
            return False
        if f.f_code.co_name in names:
            return True
        gen = getattr(gen, "gi_yieldfrom", None)
    return False


class PageCounts:
    """``page_counts``: mapcount (and, at quiescent points, refcount) agree with the page tables."""

    name = "page_counts"

    def __init__(self, every: int = 256, every_step: bool = False, from_step: int = 0) -> None:
        self.every = 1 if every_step else every
        self.next = from_step            # no check before ``from_step`` (a replay that locates a finding:
        self.machine: Any = None         # the first run's checks up to there were clean)
        self.check_counts: Any = None
        self.found = False               # reported: later checks cannot add a finding (first per invariant)
        self.last_clean = 0              # step of the last check that passed (mapcounts)
        self.last_clean_refs = 0         # ... with the refcounts (quiescent points)
        self.needs_refs = False          # the finding was a refcount disagreement (seen only when quiescent)

    def attach(self, eng: Any, run: Any) -> None:
        self.machine = run.machine
        try:
            from hmmirror.mm.debug import check_counts
            self.check_counts = check_counts
        except ImportError:
            self.check_counts = None

    pre_stack: list[str] = []

    def before_step(self, eng: Any, st: Any) -> None:
        if self.every == 1 and eng.step >= self.next and not self.found:
            # where the task resumes: the code that runs in this step (a task that finishes in the step has
            # no stack after it); only at every-step cadence, the replay that locates a finding
            self.pre_stack = gen_stack(st.gen) if st.gen is not None else []

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if eng.step < self.next or self.found:
            return
        for t in eng.tasks:
            if not t.done and t.task.holds_spinlock() is not None:
                return
        self.next = eng.step + self.every
        quiescent = all(t.done or not t.op for t in eng.tasks)
        self._check(eng, st, refs=quiescent)

    def run_finished(self, eng: Any) -> None:
        if not self.found:
            self._check(eng, None, refs=True)

    def locate_from(self) -> int:
        """Where a replay with the walk at every step must start checking to find the first bad step: after
        the last clean check that would have seen the disagreement."""
        return self.last_clean_refs if self.needs_refs else self.last_clean

    def _check(self, eng: Any, st: Any, refs: bool) -> None:
        bad = self.mismatches(refs)
        if not bad:
            self.last_clean = eng.step
            if refs:
                self.last_clean_refs = eng.step
        else:
            self.found = True
            self.needs_refs = not any(_WITHOUT_REFS(m) for m in bad)
            stack = None
            if st is None:
                stack = []
            elif self.every == 1 and self.pre_stack:
                stack = self.pre_stack
            elif not st.done:
                stack = gen_stack(st.gen)
            # a step runs from the preemption point where the task resumed to its next one, through code of
            # many functions: the counts broke inside the operation the task was doing -- its outermost
            # kernel-named function (the same for one cause wherever the step began)
            outer = next((x.rsplit(":", 1)[0] for x in (stack or []) if is_kernel_name(x.rsplit(":", 1)[0])),
                         None)
            eng.violate("page_counts", f"{len(bad)} frame(s) disagree with the page tables: {bad[0]}",
                        st=st, stack=stack, state={"mismatches": [str(b) for b in bad[:8]]},
                        location="page_counts" if st is None else outer)

    def mismatches(self, refs: bool) -> list[Any]:
        if self.check_counts is None:
            return mapcount_mismatches(self.machine)
        # memory_failure() keeps the reference of a poisoned page it unmapped (sim/kevents.py):
        # ``poisoned_refs`` = extra_refs of mm.debug.poisoned_refs_of(mem)
        out = list(self.check_counts(self.machine, poisoned_refs=True))
        if not refs:
            # inside operations only the counts that change atomically with the entries are meaningful
            out = [m for m in out if _WITHOUT_REFS(m)]
        return out


def _WITHOUT_REFS(m: str) -> bool:
    """A disagreement that is meaningful inside an operation too (mapcounts change with the entries)."""
    return "mapcount" in m or "free, but" in m or "tail frame" in m


def mapcount_mismatches(machine: Any) -> list[str]:
    """Ours (until mm/debug.py lands): expected mapcount of every counted frame from all leaf entries."""
    import numpy as np

    from hmmirror.mm import rmap
    from hmmirror.mm.page_alloc import PG

    pool, mem = machine.pool, machine.mem
    n = mem.nr_pfns
    expect = np.zeros(n, dtype=np.int64)
    pres = np.uint64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE)
    pfnmask = np.uint64(x86.PTE_PFN_MASK)
    for lvl, span in ((1, 1), (2, 512), (3, 262144)):
        rows = np.flatnonzero(pool.level == lvl)
        if rows.size == 0:
            continue
        ents = pool.tables[rows].ravel()
        m = (ents & pres) != 0
        if lvl > 1:
            m &= (ents & np.uint64(x86._PAGE_PSE)) != 0
        else:
            m &= (ents & np.uint64(x86._PAGE_SPECIAL)) == 0
        pf = ((ents[m] & pfnmask) >> np.uint64(12)).astype(np.int64)
        pf = pf[pf < n]
        if span == 1:
            np.add.at(expect, pf, 1)
        else:
            for base in pf.tolist():
                expect[base: base + span] += 1
    counted = rmap.counted_mask(mem, np.arange(n, dtype=np.int64), machine.profile.dax_refcounted)
    counted &= (mem.flags & np.uint32(PG.hwpoison)) == 0
    diff = np.flatnonzero(counted & (expect != mem.mapcount.astype(np.int64)))
    return [f"pfn {p:#x}: mapcount {int(mem.mapcount[p])}, page tables map it {int(expect[p])} time(s)"
            for p in diff[:8].tolist()]


# --- the mirror ------------------------------------------------------------------------------------------
class Coherence:
    """``coherence``: device entries never outlive or exceed the CPU mapping they mirror."""

    name = "coherence"

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.mm: Any = None
        self.entries: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.mm = getattr(run.driver, "mm", None) or run.procs[run.scenario.mirror].mm
        self.entries = run.driver.pt
        self.engine = eng
        self.t.commit_hooks.append(self.on_commit)

    def on_commit(self, st: Any, va: int, pfn: int, write: bool) -> None:
        if not self.t.inflight_overlap(self.mm.name, va, va + PAGE_SIZE):
            self._check(self.engine, st, va, pfn, write, "device commit", sys._getframe(1), committer=True)

    def commit_suspects(self, st: Any, b: CommitBatch) -> Any:
        """The pages of a range commit :meth:`on_commit` can report: outside every invalidation in flight, and
        not mapped by the CPU with that pfn and at least that permission."""
        if not b.idx.size:
            return ()
        cpfn, readable, cw = cpu_leaf_range(self.mm, b.va0, int(b.idx[-1]) + 1)
        cpfn, readable, cw = cpfn[b.idx], readable[b.idx], cw[b.idx]
        bad = ~(readable & (cw | ~b.write) & (cpfn == b.pfn))
        for r in self.t.inflight.get(self.mm.name, ()):
            bad &= ~((b.va < r[1]) & (r[0] < b.va + PAGE_SIZE))
        return b.idx[bad].tolist()

    def _check(self, eng: Any, st: Any, va: int, pfn: int, write: bool, why: str, frame: Any = None,
               committer: bool = False) -> bool:
        cpfn, readable, cw = cpu_leaf(self.mm, va)
        if readable and (cw or not write) and self.t.same_page(pfn, cpfn):
            return True
        if cpfn < 0 and self.t.migrating and self.t.in_own_migration(va) and _is_migration_pte(self.mm, va):
            return True           # a migration entry of the driver's own migration: it maps the destination
        if frame is not None and committer:
            frame = committer_frame(frame)
        stack = frame_stack(frame) if frame is not None else None
        cpu = "nothing" if cpfn < 0 else f"pfn {cpfn:#x} {'rw' if cw else 'r'}"
        eng.violate("coherence", f"{why}: device maps {va:#x} -> pfn {pfn:#x} {'rw' if write else 'r'}, "
                    f"the CPU maps {cpu}", st=st, mm=self.mm, addr=va, stack=stack,
                    location=self._location(va, why),
                    detail="after_end" if why.startswith("after") else self._commit_detail(st, va),
                    state={"device": (hex(pfn), write), "cpu": (hex(cpfn), readable, cw)})
        return False

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        t = self.t
        mmn = self.mm.name
        if t.ended and not getattr(t.driver, "closed", False) and \
                not any(f.invariant == "device_reach" for f in eng.findings):
            # (entries the device_reach check already reported at the callback's return are the same
            # mistake seen earlier: not reported again at the range's end)
            # (a driver being closed has no device user left: like dmirror's release and drm_gpusvm_fini it
            # removes its notifiers first and zaps afterwards; the teardown check judges what it leaves)
            for mm, start, end in t.ended:
                if mm != mmn or t.inflight_overlap(mm, start, end):
                    continue
                ents = self.entries.entries
                if (end - start) // PAGE_SIZE < len(ents):
                    vas = [v for v in range(start, min(end, 1 << 57), PAGE_SIZE) if v in ents]
                else:
                    vas = [v for v in ents if start <= v < end]
                for va in vas:
                    pfn, write = ents[va]
                    if not self._check(eng, st, va, pfn, write, "after invalidate_range_end"):
                        return

    def _commit_detail(self, st: Any, va: int) -> str:
        """A wrong entry at a device commit: ``commit`` when an invalidation of ``va`` ran after the committed
        snapshot began (the CPU changed the page since: a stale snapshot), ``walk`` when none did (the CPU
        never mapped what the HMM call reported there: the walk's own result was wrong)."""
        return "commit" if self.t.changed_since(st, va) else "walk"

    def _location(self, va: int, why: str) -> str | None:
        """After ``invalidate_range_end``: the subscriber whose callback returned while its device still
        mapped ``va`` (None: the entry came back later; the stack of the step decides)."""
        if why == "after invalidate_range_end" and self.t.kept_by_callback(va):
            return self.t.callback
        if why == "after invalidate_range_end":
            # the entry was mapped after the callback returned (inside the invalidation): where it was mapped
            code = self.t.commit_code.get(va)
            if code is not None:
                from hmmirror.sim.findings import module_name
                return f"{module_name(code.co_filename)}.{code.co_qualname}"
        return None


class CommitInvalid:
    """``commit_invalid``: a commit never uses a snapshot that an invalidation it was told about overlapped.

    The snapshot of a commit of ``va`` starts at the beginning of the committing task's latest successful
    HMM call that covered ``va`` in its current fault; if it made none, at the latest successful call of any
    device task that covered ``va`` (a driver that keeps the pages of a range between faults and validates
    them with its own flag, cleared by its callback -- drm_gpusvm's ``range_pages_valid`` -- commits that
    snapshot), or after the task's own migration / exclusive access if that came later; with no call covering
    ``va`` at all, at the task's
    latest HMM call (or the beginning of its driver fault).  A told invalidation overlaps it if it was
    delivered before the commit and had not ended when the snapshot began.  Checked at the commit itself
    (the stack is the committer's).
    """

    name = "commit_invalid"
    HMM_CALLS = ("hmm_range_fault", "hmm_range_snapshot")

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.snap: dict[int, int] = {}
        self.in_call: dict[int, bool] = {}
        self.engine: Any = None
        self.fault_at: dict[int, int] = {}          # task idx -> step its driver fault began
        self.own_at: dict[int, int] = {}            # task idx -> step after its own MIGRATE/EXCLUSIVE ended
        self.calls: list[tuple[int, int, int, int]] = []   # successful HMM calls: (start, end, begin step, task)

    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.t.commit_hooks.append(self.on_commit)
        self.t.snapshot_of = self.snapshot_of

    def fault_begin(self, eng: Any, st: Any, start: int, end: int, write: bool) -> None:
        self.snap[st.idx] = eng.step
        self.fault_at[st.idx] = eng.step
        self.own_at[st.idx] = -1
        self.in_call[st.idx] = False

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"hmm_range_fault", "hmm_range_snapshot", "invalidate_range_end"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        if ev["what"] in self.HMM_CALLS:
            st = eng.current
            if st is not None and st.kind == "device":
                if not self.in_call.get(st.idx):
                    self.snap[st.idx] = eng.step          # the whole call ran inside this step
                ret = ev.get("ret")
                if isinstance(ret, int) and ret >= 0 and "start" in ev and "end" in ev:
                    self.calls.append((int(ev["start"]), int(ev["end"]), self.snap[st.idx], st.idx))
                    if len(self.calls) > 256:
                        del self.calls[:128]
        elif ev["what"] == "invalidate_range_end" and ev.get("event") in ("MIGRATE", "EXCLUSIVE"):
            # a device job that migrated pages or took them exclusive itself holds them now (migration
            # entries, the locked folio): what it commits next comes from that, after its own invalidation.
            # Not a migration its own HMM call ran (hmm_vma_fault -> handle_mm_fault -> migrate_to_ram of a
            # device-private page): the call's snapshot began before it, and hmm_range_fault keeps what its
            # earlier walks read below hmm_vma_walk.last, so the snapshot start stays at the call's start
            st = eng.current
            if st is not None and st.kind == "device" and not _on_stack(self.HMM_CALLS):
                self.snap[st.idx] = eng.step + 1
                self.own_at[st.idx] = eng.step + 1

    def snapshot_of(self, st: Any, va: int) -> int:
        """The step the snapshot committed at ``va`` by ``st`` began (see the class docstring)."""
        fb = self.fault_at.get(st.idx, 0)
        other = -1
        for start, end, begin, idx in reversed(self.calls):
            if start <= va < end:
                if idx == st.idx and begin >= fb:
                    return begin
                if other < 0:
                    other = begin
        if other >= 0:
            return max(self.own_at.get(st.idx, -1), other)
        return self.snap.get(st.idx, 0)

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if st.kind == "device" and not st.done:
            inside = self.t.in_hmm
            if inside and not self.in_call.get(st.idx):
                self.snap[st.idx] = eng.step
            self.in_call[st.idx] = inside
        if len(self.t.delivered) > 64 or len(self.t.history) > 64:
            self.t.prune(min(self.snap.values()) if self.snap else 0)

    def commit_suspects(self, st: Any, b: CommitBatch) -> Any:
        """The pages of a range commit :meth:`on_commit` can report (a superset): inside an invalidation that
        overlaps the earliest snapshot any page of the range can have -- :meth:`snapshot_of` returns the
        task's latest call step or the begin step of a call covering the page (or a later step), so the
        earliest of those bounds it from below."""
        if st is None:
            return ()
        step, snap = self.engine.step, self.snap.get(st.idx, 0)
        lo, hi = int(b.va[0]), int(b.va[-1]) + PAGE_SIZE
        for start, end, begin, _idx in self.calls:
            if start < hi and lo < end and begin < snap:
                snap = begin
        bad = np.zeros(b.idx.size, dtype=bool)
        for d in self.t.delivered:
            if d[2] <= step and (d[3] is None or d[3] >= snap) and d[4] != -2:
                bad |= (d[0] <= b.va) & (b.va < d[1])
        return b.idx[bad].tolist()

    def on_commit(self, st: Any, va: int, pfn: int, write: bool) -> None:
        if st is None:
            return
        if self.t.migrating and self.t.in_own_migration(va, st.idx):
            return     # the result of the task's own migration, not an hmm_range_fault snapshot (coherence judges)
        eng = self.engine
        snap = self.snapshot_of(st, va)
        for d in self.t.delivered:
            if d[2] <= eng.step and (d[3] is None or d[3] >= snap) and d[0] <= va < d[1] and d[4] != -2:
                eng.violate("commit_invalid",
                            f"device entry {va:#x} committed from a snapshot begun at step {snap}, but an "
                            f"invalidation of {d[0]:#x}-{d[1]:#x} was delivered at step {d[2]} and "
                            f"{'is still running' if d[3] is None else f'ended at step {d[3]}'}",
                            st=st, mm=getattr(self.t.driver, "mm", None), addr=va,
                            stack=frame_stack(committer_frame(sys._getframe(1))),
                            state={"snapshot_step": snap, "invalidation": (hex(d[0]), hex(d[1]), d[2], d[3])})
                return


class ResultContract:
    """``result_contract`` on ``hmm_range_fault`` returns and on successful driver faults, and ``liveness`` of
    the driver's retry loop."""

    name = "result_contract"
    MAX_LOOP_CALLS = 48

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.begin: dict[int, tuple[int, int]] = {}      # task idx -> (step, epoch of the mm)
        self.calls: dict[int, int] = {}
        self.limit: dict[int, int] = {}                  # task idx -> HMM calls allowed in its fault
        self.mm: Any = None
        self.driver: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.driver = run.driver
        self.mm = getattr(run.driver, "mm", None) or run.procs[run.scenario.mirror].mm
        self.fault_location = driver_fault_location(run.driver)

    def fault_begin(self, eng: Any, st: Any, start: int, end: int, write: bool) -> None:
        mmn = self.mm.name
        # an invalidation already running when the fault begins counts as one during it
        self.begin[st.idx] = (eng.step, self.t.epoch.get(mmn, 0) - len(self.t.inflight.get(mmn, ())))
        self.calls[st.idx] = 0
        # a driver that mirrors a fault range by range (drm_gpusvm: a range can be one page) makes a call or
        # two per page and progresses: the bound grows with the fault's pages
        self.limit[st.idx] = self.MAX_LOOP_CALLS + 2 * max(0, (end - start) >> 12)

    def _quiet_since(self, idx: int, start: int, end: int) -> bool:
        """No invalidation of the mirrored mm ran (started, or was still running) since ``idx``'s fault
        began, and none is in flight now."""
        b = self.begin.get(idx)
        if b is None:
            return False
        mmn = self.mm.name
        return self.t.epoch.get(mmn, 0) == b[1] and not self.t.inflight.get(mmn)

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"invalidate_range_start", "hmm_range_fault", "hmm_range_snapshot"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what == "invalidate_range_start" and ev.get("mm") == self.mm.name:
            for k in self.calls:
                self.calls[k] = 0
            return
        if what not in ("hmm_range_fault", "hmm_range_snapshot"):
            return
        st = eng.current
        if st is None or st.kind != "device":
            return
        if self.t.inflight.get(self.mm.name):
            self.calls[st.idx] = 0                  # an invalidation is pending: retrying is expected
        self.calls[st.idx] = self.calls.get(st.idx, 0) + 1
        if self.calls[st.idx] > self.limit.get(st.idx, self.MAX_LOOP_CALLS):
            eng.violate("liveness", f"{st.name}'s driver loop called {what} {self.calls[st.idx]} times "
                        f"with no invalidation of {self.mm.name} pending", st=st, detail="driver_loop")
            return
        ret = ev.get("ret")
        if ret is None or ret < 0 or not self._quiet_since(st.idx, ev.get("start", 0), ev.get("end", 0)):
            return
        rng = sys._getframe(2).f_locals.get("range")
        if rng is None:
            return
        if hasattr(rng, "hmm_pfns"):
            self._check_modern(eng, st, rng, what)
        elif hasattr(rng, "pfns") and hasattr(rng, "values") and what == "hmm_range_fault":
            self._check_v5_2(eng, st, rng, int(ret))

    def _check_v5_2(self, eng: Any, st: Any, rng: Any, count: int) -> None:
        """[5.2] a non-negative return is the number of pages from ``start`` the walk completed (§9.2):
        each requested one must be VALID (WRITE if asked) and every VALID entry must match the CPU."""
        VALID, WRITE = rng.flags[0], rng.flags[1]
        special = {rng.values[0], rng.values[1], rng.values[2]}
        mm = self.mm
        shift = rng.page_shift                         # one entry per huge page with a hugetlb page_shift
        for k in range(min((count << 12) >> shift, (rng.end - rng.start) >> shift, rng.pfns.shape[0])):
            e = int(rng.pfns[k])
            va = rng.start + (k << shift)
            req = rng.default_flags                    # the request of every page (pfn_flags_mask 0 drivers)
            valid = e not in special and bool(e & VALID)
            wr = valid and bool(e & WRITE)
            if rng.pfn_flags_mask == 0 and req & VALID and (not valid or (req & WRITE and not wr)):
                eng.violate("result_contract", f"hmm_range_fault returned {count} but page {va:#x} is "
                            f"{'not valid' if not valid else 'not writable'} although requested",
                            st=st, mm=mm, addr=va, state={"entry": hex(e), "request": hex(req)})
                return
            if valid:
                pfn = e >> rng.pfn_shift
                cpfn, readable, cw = cpu_leaf(mm, va)
                if pfn != cpfn or not readable or (wr and not cw):
                    eng.violate("result_contract", f"hmm_range_fault reports {va:#x} -> pfn {pfn:#x} "
                                f"{'rw' if wr else 'r'}, the CPU maps "
                                f"{'nothing' if cpfn < 0 else hex(cpfn) + (' rw' if cw else ' r')}",
                                st=st, mm=mm, addr=va, state={"entry": hex(e), "cpu": (hex(cpfn), readable, cw)})
                    return

    @staticmethod
    def _own_private(mm: Any, rng: Any, e: int) -> bool:
        """Is ``e`` a device-private page of the caller (``pgmap->owner == dev_private_owner``)?  hmm_range_fault
        reports those as they are -- "don't fault in device private pages owned by the caller, just report the
        PFN" (mm/hmm.c hmm_vma_handle_pte) -- read-only ones too, whatever the request."""
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE

        owner = getattr(rng, "dev_private_owner", None)
        if owner is None:
            return False
        pgmap = mm.machine.pgmap_of(hmm.hmm_pfn_to_pfn(e))
        return pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE and pgmap.owner is owner

    def _check_modern(self, eng: Any, st: Any, rng: Any, what: str) -> None:
        from hmmirror.mm.hmm import modern as hmm

        mm = rng.notifier.mm if getattr(rng, "notifier", None) is not None else self.mm
        n = (rng.end - rng.start) >> 12
        for k in range(n):
            e = int(rng.hmm_pfns[k])
            va = rng.start + k * PAGE_SIZE
            req = (e & rng.pfn_flags_mask) | rng.default_flags
            valid = bool(e & hmm.HMM_PFN_VALID)
            wr = bool(e & hmm.HMM_PFN_WRITE)
            if req & hmm.HMM_PFN_REQ_FAULT and not (e & hmm.HMM_PFN_ERROR):
                if not valid or (req & hmm.HMM_PFN_REQ_WRITE and not wr and not self._own_private(mm, rng, e)):
                    eng.violate("result_contract", f"{what} returned 0 but page {va:#x} is "
                                f"{'not valid' if not valid else 'not writable'} although requested",
                                st=st, mm=mm, addr=va, state={"entry": hex(e), "request": hex(req)})
                    return
            if valid:
                pfn = hmm.hmm_pfn_to_pfn(e)
                cpfn, readable, cw = cpu_leaf(mm, va)
                if pfn != cpfn or not readable or (wr and not cw):
                    eng.violate("result_contract", f"{what} reports {va:#x} -> pfn {pfn:#x} "
                                f"{'rw' if wr else 'r'}, the CPU maps "
                                f"{'nothing' if cpfn < 0 else hex(cpfn) + (' rw' if cw else ' r')}",
                                st=st, mm=mm, addr=va, state={"entry": hex(e), "cpu": (hex(cpfn), readable, cw)})
                    return

    def fault_end(self, eng: Any, st: Any, start: int, end: int, write: bool, ret: int) -> None:
        if ret != 0 or self.mm.exited or self.mm.mm_users <= 0:
            return
        from hmmirror.sim.runner import WHOLE_RANGE_MODES
        if getattr(eng, "fault_modes", {}).get(st.idx, "fault") not in WHOLE_RANGE_MODES:
            return                                  # snapshot / per-page requests: not every page is asked for
        if not self._quiet_since(st.idx, start, end):
            return
        pt = self.driver.pt
        began = self.begin[st.idx][0]
        vas: Any = range(start, end, PAGE_SIZE)
        n = len(vas)
        ents = getattr(pt, "entries", None)
        if VECTORISED and n > 8 and isinstance(ents, dict) and not start & (PAGE_SIZE - 1):
            # a vectorised pre-check: the loop below only needs the pages that are not plainly mirrored
            # (device entry present, writable if asked, the CPU's readable pfn)
            got = [ents.get(va) for va in vas]
            have = np.array([g is not None for g in got], dtype=bool)
            dpfn = np.array([g[0] if g is not None else -2 for g in got], dtype=np.int64)
            dw = np.array([g is not None and g[1] for g in got], dtype=bool)
            cpfn, readable, _cw = cpu_leaf_range(self.mm, start, n)
            ok = have & readable & (dpfn == cpfn)
            if write:
                ok &= dw
            vas = [start + i * PAGE_SIZE for i in np.flatnonzero(~ok).tolist()]
        for va in vas:
            ent = pt.get(va)
            cpfn, readable, cw = cpu_leaf(self.mm, va)
            if write and ent is not None and not ent[1] and self.t.same_page(ent[0], cpfn) and readable:
                # A benign downgrade, not a broken contract: another fault of this device committed the
                # page after this one began, from a read snapshot that no invalidation made stale (a CPU
                # permission upgrade does not invalidate).  The device entry is coherent; the device's next
                # write faults again (lib/test_hmm.c dmirror_write() loops on -ENOENT exactly so).
                who, when = self.t.last_commit.get(va, (-1, -1))
                if who != st.idx and when >= began:
                    continue
            if ent is None or (write and not ent[1]) or not self.t.same_page(ent[0], cpfn) or not readable:
                eng.violate("result_contract", f"driver fault of {start:#x}-{end:#x} ({'write' if write else 'read'}) "
                            f"returned 0 but the device maps {va:#x} as {ent}, the CPU as "
                            f"{'nothing' if cpfn < 0 else hex(cpfn) + (' rw' if cw else ' r')}",
                            st=st, mm=self.mm, addr=va, location=self.fault_location, detail="driver_fault",
                            state={"device": ent, "cpu": (hex(cpfn), readable, cw)})
                return


def driver_fault_location(driver: Any) -> str:
    """The driver's own fault routine (``module.Class.function``): the built-in drivers' ``populate`` behind
    their adapters, else ``driver.fault``."""
    inner = getattr(driver, "dm", None) or getattr(driver, "drv", None)
    fn = getattr(inner, "populate", None) if inner is not None else None
    return function_name(fn or driver.fault)


class WarnEvents:
    """``report:WARN_ON``: WARN_ON-style events a model writes to the event log instead of reporting."""

    name = "warn_events"
    KINDS = ("WARN_ON", "WARN_ON_ONCE", "BUG_ON", "VM_BUG_ON")

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset(KINDS)

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        if ev["what"] in self.KINDS:
            eng.violate(f"report:{ev['what']}", str(ev.get("what_failed", ev)))


def default_invariants(every_step: bool = False, count_every: int = 256, counts_from: int = 0) -> list[Any]:
    """Every invariant, sharing one tracker (``counts_from``: the page-count walk starts at that step)."""
    from hmmirror.sim.invariants_data import data_invariants
    from hmmirror.sim.invariants_device import device_invariants

    t = Tracker()
    return [t, LockDiscipline(), PteMapBalance(), PgmapRefs(t), PageCounts(count_every, every_step, counts_from),
            Coherence(t), CommitInvalid(t), ResultContract(t), WarnEvents()] + device_invariants(t) + \
        data_invariants()


INVARIANTS = ("sleep_in_atomic", "locks_balanced", "double_unlock", "recursive_lock", "lock_order", "pte_map_balance",
              "pgmap_refcount", "page_counts", "coherence", "commit_invalid", "result_contract", "liveness",
              "deadlock", "no_waker", "device_teardown", "exception", "device_reach", "notifier_mmput",
              "hmm_range_input", "retry_bound", "teardown", "data_lost", "page_place")
