"""Fast ``hmm_range_snapshot()`` / ``hmm_range_fault()`` of the 5.2 profile (ours), bit-for-bit
``mm/hmm/v5_2.py``.

Same signatures and observable results as :func:`hmmirror.mm.hmm.v5_2.hmm_range_snapshot` and
:func:`hmmirror.mm.hmm.v5_2.hmm_range_fault`: return value (the page count from ``last``, or the error),
``range.pfns``, ``range.stats`` and the ``hmm.*`` counters, the ``walk_page_range`` and
``get_dev_pagemap`` counters, the event log (``pte_offset_map``/``pte_unmap`` per PTE table,
``may_sleep`` per fault, the traced API event), the ``dev_pagemap`` reference counts and their operation
counts, and after faults the page tables and frames.  The reference is one keyword away:
``hmm_range_snapshot(range, reference=True)``.

How: the 5.2 walker (mm/pagewalk_v5_2.py) is replayed level by level; a PMD table is one
:class:`~hmmirror.fast.gather.PmdBatch` -- holes, PTE tables (gathered and decoded with numpy by the rules of
:data:`PTE_RULES_5_2`) and devmap/trans-huge PMDs (``arange``) -- and a device-dax PUD leaf is filled by
``arange`` too.

``get_dev_pagemap`` in 5.2 is called once per pfn with the cached pgmap: the first call of a PMD chunk or
PTE table takes a reference (``percpu_ref_tryget_live``), the others return the cached pointer and only
count, and the reference is put after the chunk.  Here the first call of every run of pfns of one pgmap is
the real :func:`~hmmirror.mm.memremap.get_dev_pagemap` and the cached calls are added to the
``get_dev_pagemap`` counter: the same counts, the same ``percpu_ref`` operations in the same order, the same
final reference count (the equivalence tests compare them).  A chunk where a lookup would fail (no pgmap, or
a killed one) goes to the reference code.

Reference code runs unchanged for: ranges with a huge ``page_shift`` and hugetlb VMAs (**not covered**);
PUD entries other than a present devmap leaf needing no fault; PMD entries that are neither none, a PTE
table nor a devmap/trans-huge leaf; the first PTE that stops a PTE table with something other than a plain
fault (special PTE, hwpoison or other non-swap entry, failing pgmap lookup); faults in pages that are not
none private anonymous memory (:mod:`hmmirror.fast.fault` covers those).  As for the modern walk, the
equivalence is for sequential runs: batches have fewer preemption points than the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SHIFT, PUD_SIZE
from hmmirror.include.mm_types import FAULT_FLAG, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import pagewalk_v5_2 as pw
from hmmirror.mm.hmm import v5_2 as ref
from hmmirror.mm.memremap import get_dev_pagemap, put_dev_pagemap
from hmmirror.mm.mm_struct import is_vm_hugetlb_page

from . import decode as dec
from .decode import Kind
from .fault import anon_fault_ok, anon_fault_run
from .gather import (
    ROW_HUGE,
    _arange_shifted,
    fill_from_pfn,
    ROW_NONE,
    ROW_OTHER,
    ROW_TABLE,
    PmdBatch,
    Workspace,
    chunk_bounds,
    entry_none,
    row_slice,
    workspace,
)

if TYPE_CHECKING:
    from hmmirror.machine import Machine

EFAULT, EBUSY, EINVAL, EAGAIN, EPERM = 14, 16, 22, 11, 1
U64 = np.uint64
_PFN_COLS = np.arange(PTRS_PER_TABLE, dtype=np.uint64)
_PLAIN_MASK = U64(x86._PAGE_PRESENT | x86._PAGE_SPECIAL | x86._PAGE_DEVMAP)

#: What each PTE kind is worth to the 5.2 ``hmm_vma_handle_pte`` (hmm-5.2.md §7.3, §13), as a table:
#: kind -> (cpu flags for the fault decision, value written when no fault is needed, result).
#: "fault" = the hole path from that PTE to the end of the PMD chunk; "reference" = the PTE table is handed
#: to the reference ``hmm_vma_walk_pmd``.
PTE_RULES_5_2: dict[Kind, tuple[str, str, str]] = {
    Kind.NONE: ("0", "NONE", "fault if requested"),
    Kind.SWAP: ("-", "NONE", "0 (never faulted)"),
    Kind.MIGRATION: ("-", "NONE", "0 (never faulted)"),
    Kind.DEVICE_PRIVATE: ("VALID|DEVICE_PRIVATE[|WRITE]", "from_pfn(offset)|cpu", "fault if requested"),
    Kind.DEVICE_EXCLUSIVE: ("-", "ERROR", "-EFAULT: reference"),
    Kind.HWPOISON: ("-", "ERROR", "-EFAULT: reference"),
    Kind.MARKER: ("-", "ERROR", "-EFAULT: reference"),
    Kind.OTHER: ("-", "ERROR", "-EFAULT: reference"),
    Kind.PRESENT: ("VALID[|WRITE] (no protnone test)", "devmap: get_dev_pagemap, from_pfn|cpu; "
                   "special: SPECIAL; else from_pfn|cpu", "fault if requested; special: -EFAULT: reference"),
}


# --- requests and the deciders -------------------------------------------------------------------------
class _Req:
    """The requests ``(pfns & pfn_flags_mask) | default_flags`` of the range as booleans on the driver's
    bits: ``v``/``w``/``dp`` (VALID, WRITE, DEVICE_PRIVATE requested), constants when the mask carries none
    of those bits, else per-page arrays.  ``never``: snapshot mode, or no page can request VALID."""

    def __init__(self, ws: ref.HmmVmaWalk) -> None:
        rng = ws.range
        self.fv, self.fw, self.fdp = (int(x) for x in rng.flags[:3])
        d, m = int(rng.default_flags), int(rng.pfn_flags_mask)
        self.never = not ws.fault or not (d | m) & self.fv
        self.per_page = not self.never and bool(m & (self.fv | self.fw | self.fdp))
        self.mask, self.default = U64(m & ref.U64), U64(d & ref.U64)
        self.cv, self.cw, self.cdp = bool(d & self.fv), bool(d & self.fw), bool(d & self.fdp)
        self.rng = rng

    def arrays(self, i: int, j: int) -> tuple[Any, Any, Any]:
        """(v, w, dp) for pages ``[i, j)`` of ``pfns`` (arrays, or the constants)."""
        if not self.per_page:
            return self.cv, self.cw, self.cdp
        req = (self.rng.pfns[i:j] & self.mask) | self.default
        return ((req & U64(self.fv)) != 0, (req & U64(self.fw)) != 0, (req & U64(self.fdp)) != 0)

    def unit(self, i: int, j: int, cpu: int) -> tuple[bool, bool]:
        """hmm_range_need_fault() over pages ``[i, j)`` sharing ``cpu`` (hmm-5.2.md §4 truth table)."""
        if self.never or j <= i:
            return False, False
        v, w, dp = self.arrays(i, j)
        if cpu & self.fdp:
            vdp = np.logical_and(v, dp)
            return bool(np.any(vdp)), bool(np.any(np.logical_and(vdp, w)))
        if np.any(np.logical_and(v, w)) and not cpu & self.fw:
            return True, True
        return (not cpu & self.fv) if bool(np.any(v)) else False, False

    def pages(self, v: Any, w: Any, dp: Any, cpu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hmm_pte_need_fault() per page from (False, False), ``cpu`` per page (uint64 driver bits)."""
        cv = (cpu & U64(self.fv)) != 0
        cw = (cpu & U64(self.fw)) != 0
        cdp = (cpu & U64(self.fdp)) != 0
        fault = np.logical_and(v, np.where(cdp, dp, ~cv | np.logical_and(w, ~cw)))
        wf = np.logical_and(v, np.where(cdp, np.logical_and(dp, w), np.logical_and(w, ~cw)))
        return fault, wf


def _entries(rng: ref.HmmRange, pfn: np.ndarray, cpu: Any) -> np.ndarray:
    """hmm_device_entry_from_pfn(range, pfn) | cpu, vectorised (uint64 shifts wrap like the C ``u64``)."""
    return (pfn << U64(rng.pfn_shift)) | U64(int(rng.flags[ref.HMM_PFN_VALID])) | cpu


# --- dev_pagemap runs ------------------------------------------------------------------------------------
#: A pfn sequence as runs of one pgmap: (first pfn of the run, number of pfns, index in machine.pgmaps).
Runs = list[tuple[int, int, int]]


def _pgmaps_disjoint(machine: "Machine") -> bool:
    spans = sorted((p.res.start, p.res.end) for p in machine.pgmaps if p.res is not None)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _live(machine: "Machine", j: int) -> bool:
    if j < 0:
        return False
    r = machine.pgmaps[j].ref
    return r is not None and not r.dead


def runs_of_array(machine: "Machine", pfns: np.ndarray) -> Runs | None:
    """The runs of an arbitrary pfn sequence, or None when a lookup would fail (no pgmap, a killed one) or
    pgmaps overlap (then only the per-pfn reference is exact)."""
    if pfns.size == 0:
        return []
    if not _pgmaps_disjoint(machine):
        return None
    idx = np.full(pfns.shape, -1, dtype=np.int64)
    for j, pgmap in enumerate(machine.pgmaps):
        res = pgmap.res
        if res is not None:
            idx[(pfns >= U64(res.start)) & (pfns < U64(res.end))] = j
    cut = [0, *(np.flatnonzero(idx[1:] != idx[:-1]) + 1).tolist(), int(pfns.size)]
    runs = [(int(pfns[s]), e - s, int(idx[s])) for s, e in zip(cut[:-1], cut[1:])]
    return runs if all(_live(machine, j) for _p, _n, j in runs) else None


def runs_of_range(machine: "Machine", pfn: int, n: int) -> Runs | None:
    """The runs of the contiguous pfns ``[pfn, pfn+n)`` (computed from the pgmap ranges, no per-pfn
    arrays), or None as :func:`runs_of_array`."""
    if n <= 0:
        return []
    if not _pgmaps_disjoint(machine):
        return None
    runs: Runs = []
    pos, end = pfn, pfn + n
    spans = sorted((p.res.start, p.res.end, j) for j, p in enumerate(machine.pgmaps) if p.res is not None)
    for s, e, j in spans:
        if e <= pos or s >= end:
            continue
        if s > pos:
            return None                                   # a pfn without pgmap: the lookup fails
        hi = min(e, end)
        runs.append((pos, hi - pos, j))
        pos = hi
        if pos >= end:
            break
    if pos < end:
        return None
    return runs if all(_live(machine, j) for _p, _n, j in runs) else None


def _pgmap_emulate(machine: "Machine", ws: ref.HmmVmaWalk, runs: Runs) -> None:
    """``ws.pgmap = get_dev_pagemap(pfn, ws.pgmap)`` for every pfn of the runs, in order (all known to
    succeed): the real call at each run start, the cached hits only counted."""
    hits = 0
    for pfn, n, _j in runs:
        ws.pgmap = get_dev_pagemap(machine, pfn, ws.pgmap)
        hits += n - 1
    if hits:
        machine.counters["get_dev_pagemap"] += hits


def _pgmap_put(ws: ref.HmmVmaWalk) -> None:
    if ws.pgmap is not None:
        put_dev_pagemap(ws.pgmap)
        ws.pgmap = None


def _pgmap_uniform(machine: "Machine", ws: ref.HmmVmaWalk, j: int, nchunks: int, npfns: int) -> bool:
    """``nchunks`` chunks (``npfns`` pfns in all), each one run of pgmap ``j``, starting uncached and put at
    their end: per chunk ``percpu_ref_tryget_live`` then ``percpu_ref_put``, so the count comes back to its
    value (it stays above zero: a live pgmap holds its initial reference) and only the operation counts and
    the ``get_dev_pagemap`` counter move; applied in one step.  False (nothing done) when that does not
    hold; the caller replays the chunks."""
    pref = machine.pgmaps[j].ref
    if ws.pgmap is not None or pref is None or pref.dead or pref.count < 1 or not hasattr(pref, "stats"):
        return False
    machine.counters["get_dev_pagemap"] += npfns
    pref.stats["tryget_live"] += nchunks                 # the first get_dev_pagemap() of each chunk
    pref.stats["put"] += nchunks                         # put_dev_pagemap() after each chunk
    return True


def _pgmap_chunks(machine: "Machine", ws: ref.HmmVmaWalk, chunks: list[Runs]) -> None:
    """The pgmap traffic of consecutive chunks (PMD leaves, PTE tables), each starting with no cached
    pgmap and putting it at its end.

    When every chunk is one run of the same live pgmap whose count stays above zero, the sequence is, per
    chunk, ``percpu_ref_tryget_live`` then ``percpu_ref_put``: the count returns to its value, the operation
    counts grow by one each, and ``get_dev_pagemap`` is counted once per pfn; that is applied in one step.
    Otherwise each chunk is replayed with the real calls.
    """
    chunks = [c for c in chunks if c]
    if not chunks:
        return
    js = {j for c in chunks for _p, _n, j in c}
    if len(js) == 1 and all(len(c) == 1 for c in chunks) and \
            _pgmap_uniform(machine, ws, next(iter(js)), len(chunks), sum(c[0][1] for c in chunks)):
        return
    for c in chunks:
        _pgmap_emulate(machine, ws, c)
        _pgmap_put(ws)


# --- the hole path --------------------------------------------------------------------------------------
def hmm_vma_walk_hole_(addr: int, end: int, fault: bool, write_fault: bool, walk: pw.MmWalk) -> Gen[int]:
    """hmm_vma_walk_hole_() [5.2], with the faults of none private anonymous pages vectorised
    (range.page_shift is PAGE_SHIFT here)."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    vma = walk.vma
    if not (fault or write_fault):
        ws.last = addr
        i, j = (addr - rng.start) >> PAGE_SHIFT, (end - rng.start) >> PAGE_SHIFT
        rng.pfns[i:j] = rng.values[ref.HMM_PFN_NONE]
        ref._count(rng, "pages_walked", j - i)
        return 0
    if vma is None or not anon_fault_ok(vma) or (end - addr) >> PAGE_SHIFT > rng.pfns.shape[0]:
        return (yield from ref.hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))
    assert walk.mm is not None
    machine = walk.mm.machine
    ws.last = addr
    flags = FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.REMOTE
    flags |= FAULT_FLAG.NONE if ws.block else FAULT_FLAG.ALLOW_RETRY
    flags |= FAULT_FLAG.WRITE if write_fault else FAULT_FLAG.NONE
    none_val = rng.values[ref.HMM_PFN_NONE]
    i = (addr - rng.start) >> PAGE_SHIFT
    a = addr
    while a < end:
        n = anon_fault_run(vma, a, end, flags)
        if n:
            rng.pfns[i:i + n] = none_val
            ref._count(rng, "pages_walked", n)
            ref._count(rng, "faults", n)
            if machine.logging:
                _may_sleep_run(machine, a, n, int(flags), write_fault, vma.vm_start)
            a += n << PAGE_SHIFT
            i += n
            continue
        rng.pfns[i] = none_val
        ref._count(rng, "pages_walked")
        ret = yield from ref.hmm_vma_do_fault(walk, a, write_fault, rng.pfns[i:i + 1])
        if ret != -EBUSY:
            return ret
        a += PAGE_SIZE
        i += 1
    return -EBUSY


def _may_sleep_run(machine: "Machine", addr: int, n: int, flags: int, write: bool, vm_start: int) -> None:
    """The ``may_sleep`` events ``hmm_vma_do_fault`` records before each of ``n`` faults from ``addr``:
    what ``ref._may_sleep(machine, "handle_mm_fault", ...)`` followed by ``machine.log`` append, built in
    one pass (the lock context is the same for the whole run; the equivalence tests compare the events)."""
    task = sched.current()
    ctx = sched.lock_context(task)
    atomic = task.atomic
    machine.events.extend(
        {"call": "handle_mm_fault", "task": ctx.task, "locks": list(ctx.locks), "atomic": atomic,
         "addr": addr + (k << PAGE_SHIFT), "flags": flags, "write": write, "vma": vm_start,
         "what": "may_sleep"}
        for k in range(n))


def _holes(starts: list[int], ends: list[int], walk: pw.MmWalk) -> Gen[int]:
    """Consecutive ``pte_hole`` calls (hmm_vma_walk_hole [5.2]): NONE, or the hole path of the first hole
    that needs a fault."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    req = _Req(ws)
    r0 = rng.start
    k, n = 0, len(starts)
    if not req.never:
        if req.per_page:
            for k in range(n):                                   # find the first hole needing a fault
                f, wf = req.unit((starts[k] - r0) >> PAGE_SHIFT, (ends[k] - r0) >> PAGE_SHIFT, 0)
                if f or wf:
                    break
            else:
                k = n
        else:
            f, wf = req.unit(0, 1, 0)
            k = 0 if (f or wf) else n
    if k:
        i, j = (starts[0] - r0) >> PAGE_SHIFT, (ends[k - 1] - r0) >> PAGE_SHIFT
        rng.pfns[i:j] = rng.values[ref.HMM_PFN_NONE]
        ref._count(rng, "pages_walked", j - i)
        ws.last = starts[k - 1]
    if k < n:
        f, wf = req.unit((starts[k] - r0) >> PAGE_SHIFT, (ends[k] - r0) >> PAGE_SHIFT, 0)
        return (yield from hmm_vma_walk_hole_(starts[k], ends[k], f, wf, walk))
    return 0


# --- PTE tables -----------------------------------------------------------------------------------------
class _PteDecode:
    """The 5.2 per-PTE outcome of a set of PTE rows (``hmm_vma_handle_pte``), see :data:`PTE_RULES_5_2`.

    ``new``: the value written; ``devmap``: entries that call ``get_dev_pagemap``; ``stop``: the entry ends
    the PTE loop (a fault or an error); ``faultable``: that stop is the plain fault path (``fault_lbl``);
    ``fault``/``write_fault``: its flags.
    """

    def __init__(self, e: np.ndarray, req: _Req, v: Any, w: Any, dp: Any, rng: ref.HmmRange,
                 wsp: Workspace) -> None:
        fv, fw, fdp = U64(req.fv), U64(req.fw), U64(req.fdp)
        self.stop: np.ndarray | None = None
        self.devmap = None
        none_val = U64(rng.values[ref.HMM_PFN_NONE] & ref.U64)
        n = e.size
        ef = e.reshape(-1)
        # the common case: every entry present (P), neither special nor devmap
        t = wsp.array("t", n)
        np.bitwise_and(ef, _PLAIN_MASK, out=t)
        flag = wsp.array("b", n, np.bool_)
        np.equal(t, dec.P, out=flag)
        if flag.all():
            new = wsp.array("pfn", n)
            np.bitwise_and(ef, dec.PFN_MASK, out=new)                # pte_pfn() << PAGE_SHIFT
            if rng.pfn_shift != PAGE_SHIFT:
                np.right_shift(new, U64(PAGE_SHIFT), out=new)
                np.left_shift(new, U64(rng.pfn_shift), out=new)       # from_pfn(): pfn << pfn_shift | VALID
            np.bitwise_or(new, fv, out=new)
            np.bitwise_and(ef, dec.RW, out=t)                        # cpu = VALID | (WRITE if pte_write)
            if int(fw) != x86._PAGE_RW:
                np.right_shift(t, U64(1), out=t)
                np.multiply(t, fw, out=t)
            np.bitwise_or(t, fv, out=t)
            if not req.never:
                f, wf = req.pages(v, w, dp, t.reshape(e.shape))
                self.stop = self.faultable = f | wf
                self.fault, self.write_fault = f, wf
            np.bitwise_or(new, t, out=new)
            self.new = new.reshape(e.shape)
            return
        pfn = dec.pfn(e)
        kinds = dec.pte_kinds(e)
        present = kinds == Kind.PRESENT
        cpu = np.where(present, fv | np.where(dec.write(e), fw, U64(0)), U64(0))
        dpk = kinds == Kind.DEVICE_PRIVATE
        if dpk.any():
            wr = dec.swp_type(e) == int(x86.SwpType.SWP_DEVICE_PRIVATE_WRITE)
            cpu = np.where(dpk, fv | fdp | np.where(wr, fw, U64(0)), cpu)
        new = np.full(e.shape, none_val, dtype=np.uint64)
        dm = present & dec.devmap(e)
        sp = present & ~dm & dec.special(e)
        ok = present & ~sp
        new[ok] = _entries(rng, pfn[ok], cpu[ok])
        if dpk.any():
            new[dpk] = _entries(rng, dec.swp_offset(e[dpk]), cpu[dpk])
        err = (kinds == Kind.HWPOISON) | (kinds == Kind.DEVICE_EXCLUSIVE) | (kinds == Kind.MARKER) | \
            (kinds == Kind.OTHER)
        new[err] = U64(rng.values[ref.HMM_PFN_ERROR] & ref.U64)
        new[sp] = U64(rng.values[ref.HMM_PFN_SPECIAL] & ref.U64)
        self.new = new
        self.devmap = dm
        self.pfn = pfn
        if req.never:
            f = wf = np.zeros(e.shape, dtype=bool)
        else:
            f, wf = req.pages(v, w, dp, cpu)
            can = (kinds == Kind.NONE) | present | dpk             # only these consult the decider
            f, wf = f & can, wf & can
        faultable = f | wf
        self.faultable = faultable
        self.fault, self.write_fault = f, wf
        self.stop = faultable | ((sp | err) & ~faultable)


def _huge_fn(rows: np.ndarray) -> np.ndarray:
    """PMDs ``hmm_vma_walk_pmd`` [5.2] hands to ``hmm_vma_handle_pmd``: present and devmap or trans-huge."""
    pres = (rows & (dec.P | dec.PROTNONE | dec.PSE)) != 0
    return pres & ((rows & (dec.DEVMAP | dec.PSE)) != 0)


def _walk_pmd_range(pudp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_pmd_range() [5.2] with HMM's callbacks, one PMD table at a time."""
    assert walk.mm is not None
    pool = walk.mm.machine.pool
    tid = x86.table_id_of(pool.get(pudp))
    cur = addr
    while True:
        batch = PmdBatch.read(pool, tid, cur, end, _huge_fn)
        with workspace() as wsp:
            err, resume = yield from _pmd_batch(pudp, batch, walk, wsp)
        if err or resume >= end:
            return err
        cur = resume
        yield from sched.preempt_point("walk_pmd_range")


def _pmd_batch(pudp: tuple[int, int], b: PmdBatch, walk: pw.MmWalk, wsp: Workspace) -> Gen[tuple[int, int]]:
    """Rows of one PMD table in order; rows before the first stopping one are written with numpy."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    assert walk.mm is not None
    machine = walk.mm.machine
    if ws.pgmap is not None:                  # a cached pgmap left by an earlier error: reference code
        return (yield from _reference_row(pudp, b.start, b.row_end(0), walk)), b.row_end(0)
    req = _Req(ws)
    i_base = (b.start - rng.start) >> PAGE_SHIFT
    kinds = b.kinds
    nrows = b.nrows
    row_page = np.minimum(np.maximum(np.arange(nrows, dtype=np.int64) * PTRS_PER_TABLE - b.off0, 0), b.npages)
    fv, fw = req.fv, req.fw

    # huge rows: cpu flags, protnone, devmap
    huge = kinds == ROW_HUGE
    cpu_rows = np.zeros(nrows, dtype=np.uint64)
    pn_rows = np.zeros(nrows, dtype=bool)
    if huge.any():
        hr = b.rows[huge]
        pn = dec.protnone(hr)
        pn_rows[huge] = pn
        cpu_rows[huge] = np.where(pn, U64(0), U64(fv) | np.where(dec.write(hr), U64(fw), U64(0)))

    # requests per page of the batch
    v, w, dp = req.arrays(i_base, i_base + b.npages) if not req.never else (False, False, False)

    # PTE rows
    table = kinds == ROW_TABLE
    pte: _PteDecode | None = None
    if table.any():
        e2 = b.pte_rows(table, wsp)
        if isinstance(v, np.ndarray):
            pads = []
            for arr in (v, w, dp):
                pad = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
                b.padded(pad)[:] = arr
                pads.append(pad[table])
            pv, pwr, pdp = pads
        else:
            pv, pwr, pdp = v, w, dp
        pte = _PteDecode(e2, req, pv, pwr, pdp, rng, wsp)

    # the first stopping row
    stop_row = nrows
    other = np.flatnonzero(kinds == ROW_OTHER)
    if other.size:
        stop_row = int(other[0])
    row_fault: dict[int, tuple[bool, bool]] = {}
    if not req.never:
        for r in np.flatnonzero((kinds == ROW_NONE) | huge).tolist():
            if r >= stop_row:
                break
            i = i_base + int(row_page[r])
            j = i_base + (int(row_page[r + 1]) if r + 1 < nrows else b.npages)
            f, wf = req.unit(i, j, int(cpu_rows[r]))
            if f or wf:
                row_fault[r] = (f, wf)
                stop_row = r
                break
    valid = None
    if pte is not None and pte.stop is not None:
        valid = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
        b.padded(valid)[:] = True
        vt = valid[table]
        stops = pte.stop.reshape(-1, PTRS_PER_TABLE) & vt
        hit = np.flatnonzero(stops.any(axis=1))
        if hit.size:
            stop_row = min(stop_row, int(np.flatnonzero(table)[hit[0]]))
    # devmap huge rows and devmap PTEs: every lookup must succeed, else the row stops (reference)
    pg_rows: dict[int, Runs] = {}
    lim = min(stop_row, nrows)
    hdev = huge[:lim] & ~pn_rows[:lim] & dec.devmap(b.rows[:lim])
    tdev = np.zeros(lim, dtype=bool)
    if pte is not None and pte.devmap is not None and table[:lim].any():
        if valid is None:
            valid = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
            b.padded(valid)[:] = True
        tdev[table[:lim]] = (pte.devmap.reshape(-1, PTRS_PER_TABLE)[: int(table[:lim].sum())]
                             & valid[table][: int(table[:lim].sum())]).any(axis=1)
    hr = np.flatnonzero(hdev)
    pg_uniform: tuple[int, int, int] | None = None          # (pgmap index, chunks, pfns)
    if hr.size and not tdev.any():
        # devmap PMD leaves only: one run per row when all of them lie in one live pgmap
        base = np.int64(b.base)
        rs = np.maximum(base + hr.astype(np.int64) * PMD_SIZE, np.int64(b.start))
        re_ = np.minimum(base + (hr.astype(np.int64) + 1) * PMD_SIZE, np.int64(b.end))
        lo = dec.pfn(b.rows[hr]) + ((rs.astype(np.uint64) >> U64(PAGE_SHIFT)) & U64(PTRS_PER_TABLE - 1))
        cnt = ((re_ - rs) >> PAGE_SHIFT).astype(np.uint64)
        one = runs_of_range(machine, int(lo.min()), int((lo + cnt).max() - lo.min()))
        if one is not None and len(one) == 1:
            pg_uniform = (one[0][2], int(hr.size), int(cnt.sum()))
            hr = hr[:0]
    for r in sorted(set(hr.tolist()) | set(np.flatnonzero(tdev).tolist())):
        if kinds[r] == ROW_HUGE:
            a = b.row_start(r)
            runs = runs_of_range(machine, x86.pmd_pfn(int(b.rows[r])) + x86.PTE_LEVEL.index(a),
                                 (b.row_end(r) - a) >> PAGE_SHIFT)
        else:
            t = int(np.count_nonzero(table[:r]))
            assert pte is not None and pte.devmap is not None and valid is not None
            sel = pte.devmap.reshape(-1, PTRS_PER_TABLE)[t] & valid[r]
            runs = runs_of_array(machine, pte.pfn.reshape(-1, PTRS_PER_TABLE)[t][sel])
        if runs is None:
            stop_row = r
            pg_rows = {q: v for q, v in pg_rows.items() if q < r}
            break
        pg_rows[r] = runs

    # rows [0, stop_row): write, count, log
    if stop_row:
        _write_rows(b, ws, i_base, stop_row, row_page, cpu_rows, pn_rows, pte, table, pg_rows, pg_uniform, walk,
                    wsp)
    if stop_row == nrows:
        return 0, b.end

    r = stop_row
    a, e = b.row_start(r), b.row_end(r)
    kind = int(kinds[r])
    if r in row_fault:
        f, wf = row_fault[r]
        return (yield from hmm_vma_walk_hole_(a, e, f, wf, walk)), e
    if kind == ROW_TABLE and pte is not None and pte.stop is not None and r not in pg_rows:
        t = int(np.count_nonzero(table[:r]))
        lo = int(row_page[r] - (r * PTRS_PER_TABLE - b.off0))
        st = pte.stop.reshape(-1, PTRS_PER_TABLE)[t]
        cols = np.flatnonzero(st[lo:]) + lo
        if cols.size and pte.faultable.reshape(-1, PTRS_PER_TABLE)[t, cols[0]]:
            c = int(cols[0])
            dm = pte.devmap.reshape(-1, PTRS_PER_TABLE)[t, lo:c] if pte.devmap is not None else None
            if dm is not None and dm.any():
                runs = runs_of_array(machine, pte.pfn.reshape(-1, PTRS_PER_TABLE)[t, lo:c][dm])
                if runs is None:
                    return (yield from _reference_row(pudp, a, e, walk)), e
                _pgmap_emulate(machine, ws, runs)
            ref._pte_offset_map(machine, walk.mm, b.pmdp(r), a, "hmm_vma_walk_pmd")
            i = i_base + int(row_page[r])
            if c > lo:
                rng.pfns[i:i + (c - lo)] = pte.new.reshape(-1, PTRS_PER_TABLE)[t, lo:c]
            ref._count(rng, "pages_walked", c - lo + 1)              # hmm_vma_handle_pte counts first
            fa = b.base + r * PMD_SIZE + (c << PAGE_SHIFT)
            rng.pfns[i + (c - lo)] = rng.values[ref.HMM_PFN_NONE]
            _pgmap_put(ws)                                           # fault_lbl:
            ref._pte_unmap(machine, fa, "hmm_vma_handle_pte")
            f = bool(pte.fault.reshape(-1, PTRS_PER_TABLE)[t, c])
            wf = bool(pte.write_fault.reshape(-1, PTRS_PER_TABLE)[t, c])
            ret = yield from hmm_vma_walk_hole_(fa, e, f, wf, walk)
            if ret:
                ws.last = fa                                         # hmm_vma_walk_pmd: last = addr
            return ret, e
    return (yield from _reference_row(pudp, a, e, walk)), e


def _reference_row(pudp: tuple[int, int], a: int, e: int, walk: pw.MmWalk) -> Gen[int]:
    """The reference walker for one PMD entry."""
    return (yield from pw.walk_pmd_range(pudp, a, e, walk))


def _write_rows(b: PmdBatch, ws: ref.HmmVmaWalk, i_base: int, nrows: int, row_page: np.ndarray,
                cpu_rows: np.ndarray, pn_rows: np.ndarray, pte: _PteDecode | None, table: np.ndarray,
                pg_rows: dict[int, Runs], pg_uniform: tuple[int, int, int] | None, walk: pw.MmWalk,
                wsp: Workspace) -> None:
    """The effects of rows ``[0, nrows)`` (none of which stops), in row order."""
    rng = ws.range
    assert walk.mm is not None
    machine = walk.mm.machine
    kinds = b.kinds[:nrows]
    npages = int(row_page[nrows]) if nrows < b.nrows else b.npages
    none_val = U64(rng.values[ref.HMM_PFN_NONE] & ref.U64)
    hole_like = (kinds == ROW_NONE) | ((kinds == ROW_HUGE) & pn_rows[:nrows])
    view = rng.pfns[i_base:i_base + npages]
    if hole_like.all():
        view[:] = none_val
    elif pte is not None and (kinds == ROW_TABLE).all():
        view[:] = pte.new.reshape(-1)[b.off0:b.off0 + npages]
    else:
        full = b.off0 == 0 and npages == nrows * PTRS_PER_TABLE
        new = view.reshape(nrows, PTRS_PER_TABLE) if full else \
            wsp.array("new", nrows * PTRS_PER_TABLE).reshape(nrows, PTRS_PER_TABLE)
        h = (kinds == ROW_HUGE) & ~pn_rows[:nrows]
        if h.all():
            shift = rng.pfn_shift
            pfn = dec.pfn(b.rows[:nrows])
            low = U64(int(rng.flags[ref.HMM_PFN_VALID])) | cpu_rows[:nrows]      # VALID | cpu, per row
            if int(low.max()) < 1 << shift and int(pfn.max()) + PTRS_PER_TABLE < 1 << (64 - shift):
                # from_pfn(pfn + c) | cpu == (c << shift) + ((pfn << shift) | VALID | cpu): one pass
                np.add(_arange_shifted(PTRS_PER_TABLE, shift)[None, :], ((pfn << U64(shift)) | low)[:, None],
                       out=new)
            else:
                np.add(pfn[:, None], _PFN_COLS[None, :], out=new)
                np.left_shift(new, U64(shift), out=new)
                np.bitwise_or(new, low[:, None], out=new)
        else:
            new[:] = none_val
        if h.any() and not h.all():  # mixed rows
            base = dec.pfn(b.rows[:nrows][h])
            new[h] = _entries(rng, base[:, None] + _PFN_COLS[None, :], cpu_rows[:nrows][h][:, None])
        t = kinds == ROW_TABLE
        if t.any():
            assert pte is not None
            new[t] = pte.new.reshape(-1, PTRS_PER_TABLE)[: int(t.sum())]
        if not full:
            view[:] = new.reshape(-1)[b.off0:b.off0 + npages]
    ref._count(rng, "pages_walked", npages)
    # per row, in order: pgmap lookups and puts (no events), pte_offset_map / pte_unmap events
    if pg_uniform is not None:
        _pgmap_uniform(machine, ws, *pg_uniform)
    else:
        _pgmap_chunks(machine, ws, [pg_rows[r] for r in sorted(pg_rows) if r < nrows])
    if machine.logging:
        # the pte_offset_map / pte_unmap events of ref._pte_offset_map / ref._pte_unmap, built in one pass
        name = walk.mm.name
        ev: list[dict[str, Any]] = []
        for r in np.flatnonzero(kinds == ROW_TABLE).tolist():
            ev.append({"mm": name, "addr": b.row_start(r), "caller": "hmm_vma_walk_pmd", "what": "pte_offset_map"})
            ev.append({"addr": b.row_end(r) - PAGE_SIZE, "caller": "hmm_vma_walk_pmd", "what": "pte_unmap"})
        machine.events.extend(ev)
    r = nrows - 1
    ws.last = b.row_start(r) if hole_like[r] else b.row_end(r)


# --- PUD level -------------------------------------------------------------------------------------------
def _pud_leaf(pudp: tuple[int, int], start: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """hmm_vma_walk_pud() [5.2] for a present devmap PUD leaf that needs no fault, vectorised; anything else
    is the reference callback.  Called with the PUD lock held, as the walker does."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    assert walk.mm is not None
    machine = walk.mm.machine
    pud = machine.pool.get(pudp)
    if not (x86.pud_huge(pud) and x86.pud_devmap(pud) and x86.pud_present(pud)):
        return (yield from ref.hmm_vma_walk_pud(pudp, start, end, walk))
    i = (start - rng.start) >> PAGE_SHIFT
    n = (end - start) >> PAGE_SHIFT
    cpu = ref.pud_to_hmm_pfn_flags(rng, pud)
    f, wf = _Req(ws).unit(i, i + n, cpu)
    if f or wf or i + n > rng.pfns.shape[0]:
        return (yield from ref.hmm_vma_walk_pud(pudp, start, end, walk))
    pfn0 = x86.pud_pfn(pud) + ((start & (PUD_SIZE - 1)) >> PAGE_SHIFT)
    runs = runs_of_range(machine, pfn0, n)
    if runs is None:
        return (yield from ref.hmm_vma_walk_pud(pudp, start, end, walk))
    _pgmap_chunks(machine, ws, [runs])
    fill_from_pfn(rng.pfns[i:i + n], pfn0, rng.pfn_shift, U64(int(rng.flags[ref.HMM_PFN_VALID]) | cpu))
    ref._count(rng, "pages_walked", n)
    ws.last = end
    return 0


def _walk_pud_range(p4dp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_pud_range() [5.2]: runs of holes (none PUDs, or every PUD in a gap) batched; huge PUDs under
    the PUD lock through :func:`_pud_leaf`; tables through :func:`_walk_pmd_range`."""
    assert walk.mm is not None
    pool = walk.mm.machine.pool
    pud_tid = x86.table_id_of(pool.get(p4dp))
    _i0, _i1, puds = row_slice(pool, pud_tid, PUD_SHIFT, addr, end)
    starts, ends = chunk_bounds(addr, end, PUD_SHIFT, puds.shape[0])
    n = puds.shape[0]
    if walk.vma is None:
        return (yield from _holes(starts, ends, walk))
    none = entry_none(puds)
    i0 = (addr >> PUD_SHIFT) & (PTRS_PER_TABLE - 1)
    k = 0
    while k < n:
        if none[k]:
            j = k
            while j < n and none[j]:
                j += 1
            err = yield from _holes(starts[k:j], ends[k:j], walk)
            if err:
                return err
            k = j
            continue
        pudp = (pud_tid, i0 + k)
        a, nxt = starts[k], ends[k]
        err = 0
        while True:                                              # again:
            if x86.pud_none(pool.get(pudp)):
                err = yield from _holes([a], [nxt], walk)
                break
            ptl = yield from pw.pud_trans_huge_lock(pudp, walk.vma)
            if ptl is not None:
                err = yield from _pud_leaf(pudp, a, nxt, walk)
                sched.spin_unlock(ptl)
                break
            yield from pw.split_huge_pud(walk.vma, pudp, a)
            if x86.pud_none(pool.get(pudp)):
                continue
            err = yield from _walk_pmd_range(pudp, a, nxt, walk)
            break
        if err:
            return err
        k += 1
    return 0


def _walk_p4d_range(pgdp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_p4d_range() [5.2]."""
    mm = walk.mm
    assert mm is not None
    geo = mm.pt.geo
    err = 0
    while True:
        nxt = geo.p4d.addr_end(addr, end)
        p4dp = mm.pt.p4d_offset(pgdp, addr)
        if pw.p4d_none_or_clear_bad(mm, p4dp):
            err = yield from _holes([addr], [nxt], walk)
        else:
            err = yield from _walk_pud_range(p4dp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def _walk_pgd_range(addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_pgd_range() [5.2]."""
    mm = walk.mm
    assert mm is not None
    geo = mm.pt.geo
    err = 0
    while True:
        nxt = geo.pgd.addr_end(addr, end)
        pgdp = mm.pt.pgd_offset(addr)
        if pw.pgd_none_or_clear_bad(mm, pgdp):
            err = yield from _holes([addr], [nxt], walk)
        else:
            err = yield from _walk_p4d_range(pgdp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_page_range(start: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_page_range(start, end, walk) (mm/pagewalk.c [5.2]) with HMM's callbacks, fast."""
    if start >= end:
        return -EINVAL
    mm = walk.mm
    if mm is None:
        return -EINVAL
    if not mm.mmap_sem.is_locked():
        sched.report("VM_BUG_ON_MM", f"walk_page_range({start:#x}, {end:#x}) on {mm.name} without mmap_sem")
    mm.machine.counters["walk_page_range"] += 1
    err = 0
    vma = mm.find_vma(start)
    while True:
        skip = False
        if vma is None:
            walk.vma = None
            nxt = end
        elif start < vma.vm_start:
            walk.vma = None
            nxt = min(end, vma.vm_start)
        else:
            walk.vma = vma
            nxt = min(end, vma.vm_end)
            vma = mm.find_vma(vma.vm_end)
            err = yield from pw.walk_page_test(start, nxt, walk)
            if err > 0:
                err = 0
                skip = True
            elif err < 0:
                break
        if not skip:
            if walk.vma is not None and is_vm_hugetlb_page(walk.vma):
                err = yield from pw.walk_hugetlb_range(start, nxt, walk)        # not covered: reference
            else:
                err = yield from _walk_pgd_range(start, nxt, walk)
            if err:
                break
        start = nxt
        if start >= end:
            break
    return err


# --- the entry points -----------------------------------------------------------------------------------
def _snapshot(range: ref.HmmRange) -> Gen[int]:   # noqa: A002 - kernel name
    """hmm_range_snapshot() [5.2] body with the fast walk (see the reference for the contract)."""
    device_vma = VM.IO | VM.PFNMAP | VM.MIXEDMAP
    start = range.start
    hmm = range.hmm
    if hmm is None or hmm.freed:
        sched.report("null_deref", f"hmm_range_snapshot({range.name}): range->hmm is NULL")
        return -EFAULT
    hmm_vma_walk = ref.HmmVmaWalk(range)
    if hmm.mm is None or hmm.dead:
        return -EFAULT
    while True:
        if not range.valid:
            return -EAGAIN
        vma = hmm.mm.find_vma(start)
        if vma is None or (vma.vm_flags & device_vma):
            return -EFAULT
        if is_vm_hugetlb_page(vma):
            if pw.huge_page_shift_of(vma) != range.page_shift and range.page_shift != PAGE_SHIFT:
                return -EINVAL
        elif range.page_shift != PAGE_SHIFT:
            return -EINVAL
        if not vma.vm_flags & VM.READ:
            ref.hmm_pfns_clear(range, range.pfns, range.start, range.end)
            return -EPERM
        range.vma = vma
        hmm_vma_walk.pgmap = None
        hmm_vma_walk.last = start
        hmm_vma_walk.fault = False
        hmm_vma_walk.range = range
        end = min(range.end, vma.vm_end)
        mm_walk = ref._new_mm_walk(vma, hmm_vma_walk)
        ref._count(range, "walks")
        ret = yield from walk_page_range(start, end, mm_walk)
        if ret == -EBUSY:
            ref._count(range, "walk_ebusy")
        start = end
        if not start < range.end:
            break
    return (hmm_vma_walk.last - range.start) >> PAGE_SHIFT


def _fault(range: ref.HmmRange, block: bool) -> Gen[int]:   # noqa: A002 - kernel name
    """hmm_range_fault() [5.2] body with the fast walk (see the reference for the contract)."""
    device_vma = VM.IO | VM.PFNMAP | VM.MIXEDMAP
    start = range.start
    hmm = range.hmm
    if hmm is None or hmm.freed:
        sched.report("null_deref", f"hmm_range_fault({range.name}): range->hmm is NULL")
        return -EFAULT
    hmm_vma_walk = ref.HmmVmaWalk(range)
    if hmm.mm is None or hmm.dead:
        return -EFAULT
    while True:
        if not range.valid:
            sched.up_read(hmm.mm.mmap_sem)
            return -EAGAIN
        vma = hmm.mm.find_vma(start)
        if vma is None or (vma.vm_flags & device_vma):
            return -EFAULT
        if is_vm_hugetlb_page(vma):
            if pw.huge_page_shift_of(vma) != range.page_shift and range.page_shift != PAGE_SHIFT:
                return -EINVAL
        elif range.page_shift != PAGE_SHIFT:
            return -EINVAL
        if not vma.vm_flags & VM.READ:
            ref.hmm_pfns_clear(range, range.pfns, range.start, range.end)
            return -EPERM
        range.vma = vma
        hmm_vma_walk.pgmap = None
        hmm_vma_walk.last = start
        hmm_vma_walk.fault = True
        hmm_vma_walk.block = block
        hmm_vma_walk.range = range
        end = min(range.end, vma.vm_end)
        mm_walk = ref._new_mm_walk(vma, hmm_vma_walk)
        stuck = alone = 0                       # model: restarts without progress (alone: nobody else ran)
        faults0 = range.stats["faults"]
        others0 = sched.others_ran()
        while True:
            ref._count(range, "walks")
            ret = yield from walk_page_range(start, end, mm_walk)
            progress = hmm_vma_walk.last != start
            start = hmm_vma_walk.last
            if ret == -EBUSY:
                ref._count(range, "walk_ebusy")
            if not (ret == -EBUSY and range.valid):
                break
            others = sched.others_ran()
            if progress:
                stuck, alone, faults0 = 0, 0, range.stats["faults"]
            else:
                stuck += 1
                alone = alone + 1 if others == others0 else 0
            others0 = others
            if stuck >= ref.LIVELOCK_RESTARTS or alone >= ref.LIVELOCK_RESTARTS_ALONE:
                sched.report("livelock", f"hmm_range_fault({range.name}): {stuck} walks restarted at "
                                         f"{start:#x} without progress", cause=ref._livelock_cause(range, faults0))
                break
            yield from sched.preempt_point("hmm_range_fault")
        if ret:
            i = (hmm_vma_walk.last - range.start) >> PAGE_SHIFT
            ref.hmm_pfns_clear(range, range.pfns[i:], hmm_vma_walk.last, range.end)
            return ret
        start = end
        if not start < range.end:
            break
    return (hmm_vma_walk.last - range.start) >> PAGE_SHIFT


_snapshot.__name__ = "hmm_range_snapshot"
_fault.__name__ = "hmm_range_fault"
_traced_snapshot = ref._traced(_snapshot)
_traced_fault = ref._traced(_fault)


def _covered(range: ref.HmmRange) -> bool:   # noqa: A002
    """The fast path covers ranges indexed by 4 KiB pages whose pfns array is as long as the range (and a
    ``pfn_shift`` below 64)."""
    return range.page_shift == PAGE_SHIFT and 0 <= range.pfn_shift < 64 and \
        range.pfns.shape[0] >= (range.end - range.start) >> PAGE_SHIFT


def hmm_range_snapshot(range: ref.HmmRange, *, reference: bool = False) -> Gen[int]:   # noqa: A002
    """hmm_range_snapshot() [5.2], fast.  Same contract as :func:`hmmirror.mm.hmm.v5_2.hmm_range_snapshot`;
    ``reference=True`` (or a range with a huge ``page_shift``) runs that function instead."""
    if reference or not _covered(range):
        return (yield from ref.hmm_range_snapshot(range))
    return (yield from _traced_snapshot(range))


def hmm_range_fault(range: ref.HmmRange, block: bool, *, reference: bool = False) -> Gen[int]:   # noqa: A002
    """hmm_range_fault() [5.2], fast.  Same contract as :func:`hmmirror.mm.hmm.v5_2.hmm_range_fault`;
    ``reference=True`` (or a range with a huge ``page_shift``) runs that function instead."""
    if reference or not _covered(range):
        return (yield from ref.hmm_range_fault(range, block))
    return (yield from _traced_fault(range, block))


__all__ = ["PTE_RULES_5_2", "hmm_range_fault", "hmm_range_snapshot", "walk_page_range"]
