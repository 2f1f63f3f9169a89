"""Fast ``hmm_range_fault()`` of the modern profile (ours), bit-for-bit the reference ``mm/hmm/modern.py``.

Same signature and observable results as :func:`hmmirror.mm.hmm.modern.hmm_range_fault`: return code,
``range.hmm_pfns``, ``last`` (visible through the restart points and the ``hmm_range_fault`` event), page
tables and frame metadata after faults, ``machine.counters`` and ``machine.events``.  The reference is one
keyword away: ``hmm_range_fault(range, reference=True)``.

How: the generic walker (mm/pagewalk.py) is replayed level by level, but a PMD table is handled as one
:class:`~hmmirror.fast.gather.PmdBatch` -- its none entries (holes), PTE tables (gathered in one step and
decoded with numpy) and PMD leaves (filled by ``arange``) -- instead of one callback per entry.  The reference
callbacks run unchanged where the walk leaves the common path:

* a gap between VMAs, ``test_walk`` and every PUD entry: the reference ``pte_hole`` / ``test_walk`` /
  ``pud_entry`` callbacks (they are already vectorised and run once per GiB at most);
* hugetlb VMAs: the reference ``walk_hugetlb_range`` (**not covered** by the fast path);
* a PMD entry that is neither none, a PTE table nor a PMD leaf (migration, device-private or other
  non-present PMDs, bad PMDs), and a PTE table whose first stopping entry is not a plain fault (a PTE marker,
  a swap/migration/device-private/exclusive/hwpoison entry with a fault requested, a special PTE with a
  fault requested): the reference walker's ``walk_pmd_range`` for that one entry.

Faults (``hmm_vma_fault``) are issued here, page by page like the reference; runs of none entries in private
anonymous memory are faulted in one vectorised step (:mod:`hmmirror.fast.fault`), every other page by the
reference ``handle_mm_fault``.

Not covered beyond hugetlb: interleavings.  The reference walker has a preemption point between PMD entries
and the reference fault path several sleeping points per page; here a PMD batch and a vectorised fault run
have one.  Results are identical for sequential runs (``sched.run``); under the simulator use
``reference=True``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PTRS_PER_TABLE, PUD_SHIFT, PUD_SIZE
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT_ERROR
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import pagewalk as pw
from hmmirror.mm.hmm import modern as ref
from hmmirror.mm.memory import handle_mm_fault
from hmmirror.mm.mmu_notifier import mmu_interval_check_retry

from . import decode as dec
from .decode import Kind
from .fault import anon_fault_ok, anon_fault_run
from .gather import (
    ROW_HUGE,
    ROW_NONE,
    ROW_OTHER,
    ROW_TABLE,
    PmdBatch,
    Workspace,
    chunk_bounds,
    entry_none,
    fill_leaf,
    row_slice,
    workspace,
)

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EFAULT, EBUSY, EINVAL, EPERM = 14, 16, 22, 1
U64 = np.uint64
_VALID = ref.HMM_PFN_VALID
_WRITE = ref.HMM_PFN_WRITE
_ERROR = ref.HMM_PFN_ERROR
_REQ_FAULT = ref.HMM_PFN_REQ_FAULT
_REQ_WRITE = ref.HMM_PFN_REQ_WRITE
_NEED_FAULT = ref.HMM_NEED_FAULT
_NEED_ALL = ref.HMM_NEED_ALL_BITS
_INOUT = U64(ref.HMM_PFN_INOUT_FLAGS)
_ORDER9 = ref.hmm_pfn_flags_order(9)
_PFN_COLS = np.arange(PTRS_PER_TABLE, dtype=np.uint64)
_PLAIN_MASK = U64(x86._PAGE_PRESENT | x86._PAGE_PROTNONE | x86._PAGE_SPECIAL | x86._PAGE_DEVMAP)

#: What each PTE kind is worth to the 6.18 ``hmm_vma_handle_pte`` (hmm-modern.md §4.5, §4.6), as a table:
#: kind -> (cpu flags for the fault decision, output when no fault is needed, what a needed fault does).
#: "cpu" is computed per entry for PRESENT (0 if protnone, else VALID [| WRITE]); "normal?" means the output
#: is ``pfn | cpu`` only when ``vm_normal_page`` finds a page (or devmap [6.1-6.16], or the zero pfn),
#: else ERROR (and -EFAULT when a fault is requested).  "fault" runs ``hmm_vma_fault``; "reference" hands
#: the PMD entry to the reference walker (which waits, fails with -EFAULT, or faults a swap entry).
PTE_RULES_MODERN: dict[Kind, tuple[str, str, str]] = {
    Kind.NONE: ("0", "0", "fault"),
    Kind.MARKER: ("0", "0", "reference"),
    Kind.PRESENT: ("cpu", "pfn|cpu if normal? else ERROR", "fault (ERROR case: reference)"),
    Kind.DEVICE_PRIVATE: ("owner? never : 0", "owner? offset|VALID[|WRITE] : 0", "reference"),
    Kind.SWAP: ("0", "0", "reference"),
    Kind.MIGRATION: ("0", "0", "reference"),
    Kind.DEVICE_EXCLUSIVE: ("0", "0", "reference"),
    Kind.HWPOISON: ("0", "0", "reference"),
    Kind.OTHER: ("0", "0", "reference"),
}


def _call(fn: Callable[..., Any], *args: Any) -> Gen[Any]:
    """Run a callback that may be a generator function or a plain function (as the walker does)."""
    ret = fn(*args)
    if isinstance(ret, Generator):
        ret = yield from ret
    return ret


# --- requests --------------------------------------------------------------------------------------------
class _Req:
    """The requests of the range in the form the deciders need: ``wf`` (page asks for a fault) and ``ww``
    (asks for a write fault), either constants (``pfn_flags_mask`` carries no request bit) or per-page
    boolean arrays over a slice of ``hmm_pfns``.  ``never`` is the pure-snapshot shortcut."""

    def __init__(self, rng: ref.HmmRange) -> None:
        d, m = int(rng.default_flags), int(rng.pfn_flags_mask)
        self.never = not (d | m) & _REQ_FAULT
        self.per_page = bool(m & (_REQ_FAULT | _REQ_WRITE)) and not self.never
        self.cwf = bool(d & _REQ_FAULT)
        self.cww = self.cwf and bool(d & _REQ_WRITE)
        self.mask = U64(m)
        self.default = U64(d)

    def arrays(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-page (wf, ww) for the slice ``pfns``."""
        req = (pfns & self.mask) | self.default
        wf = (req & U64(_REQ_FAULT)) != 0
        ww = wf & ((req & U64(_REQ_WRITE)) != 0)
        return wf, ww


def _required(any_wf: bool, any_ww: bool, cpu: int) -> int:
    """hmm_range_need_fault() from the two questions (cf. the reference's vectorised form)."""
    if any_ww and not cpu & _WRITE:
        return _NEED_ALL
    if any_wf and not cpu & _VALID:
        return _NEED_FAULT
    return 0


def _unit_required(req: _Req, rng: ref.HmmRange, i: int, j: int, cpu: int) -> int:
    """hmm_range_need_fault() over ``hmm_pfns[i:j]`` with one ``cpu``."""
    if req.never or j <= i:
        return 0
    if not req.per_page:
        return _required(req.cwf, req.cww, cpu)
    wf, ww = req.arrays(rng.hmm_pfns[i:j])
    return _required(bool(wf.any()), bool(ww.any()), cpu)


def _page_required(wf: Any, ww: Any, cpu_valid: Any, cpu_write: Any) -> np.ndarray:
    """hmm_pte_need_fault() per page (arrays or scalars): NEED_ALL, NEED_FAULT or 0."""
    need_w = np.logical_and(ww, np.logical_not(cpu_write))
    need_f = np.logical_and(wf, np.logical_not(cpu_valid))
    return np.where(need_w, _NEED_ALL, np.where(need_f, _NEED_FAULT, 0))


# --- faults ----------------------------------------------------------------------------------------------
def hmm_vma_fault(addr: int, end: int, required_fault: int, walk: pw.MmWalk) -> Gen[int]:
    """hmm_vma_fault() (mm/hmm.c, 6.18), vectorised where it can be: the same prologue and result as the
    reference; runs of none entries of private anonymous memory are faulted by
    :func:`~hmmirror.fast.fault.anon_fault_run`, every other page by ``handle_mm_fault``."""
    hmm_vma_walk: ref.HmmVmaWalk = walk.private
    vma = walk.vma
    assert vma is not None
    machine = walk.mm.machine
    if not required_fault:
        machine.log("WARN_ON_ONCE", what_failed="hmm_vma_fault without a required fault", addr=addr)
    hmm_vma_walk.last = addr
    fault_flags = FAULT_FLAG.REMOTE
    if required_fault & ref.HMM_NEED_WRITE_FAULT:
        if not vma.vm_flags & VM.WRITE:
            return -EPERM
        fault_flags |= FAULT_FLAG.WRITE
    machine.log("hmm_vma_fault", mm=walk.mm.name, start=addr, end=end, write=bool(fault_flags & FAULT_FLAG.WRITE),
                locks=sched.lock_context().locks)
    fast = anon_fault_ok(vma)
    a = addr
    while a < end:
        if fast:
            n = anon_fault_run(vma, a, end, fault_flags)
            if n:
                hmm_vma_walk.faults += n
                machine.counters["hmm_faults"] += n
                a += n << PAGE_SHIFT
                continue
        hmm_vma_walk.faults += 1
        machine.counters["hmm_faults"] += 1
        if (yield from handle_mm_fault(vma, a, fault_flags)) & VM_FAULT_ERROR:
            return -EFAULT
        a += PAGE_SIZE
    return -EBUSY


# --- holes -----------------------------------------------------------------------------------------------
def _holes(starts: list[int], ends: list[int], walk: pw.MmWalk) -> Gen[int]:
    """Consecutive ``pte_hole`` calls inside a VMA (``walk.vma`` set): fill 0, or fault the first hole
    that needs it (hmm_vma_walk_hole, 6.18)."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    req = _Req(rng)
    r0 = rng.start
    first, required = len(starts), 0
    if not req.never:
        if req.per_page:
            i0 = (starts[0] - r0) >> PAGE_SHIFT
            i1 = (ends[-1] - r0) >> PAGE_SHIFT
            wf, ww = req.arrays(rng.hmm_pfns[i0:i1])
            idx = np.array([(s - starts[0]) >> PAGE_SHIFT for s in starts], dtype=np.int64)
            anyf = np.logical_or.reduceat(wf, idx)
            anyw = np.logical_or.reduceat(ww, idx)
            hit = np.flatnonzero(anyf | anyw)
            if hit.size:
                first = int(hit[0])
                required = _required(bool(anyf[first]), bool(anyw[first]), 0)
        else:
            required = _required(req.cwf, req.cww, 0)
            if required:
                first = 0
    if first:
        i = (starts[0] - r0) >> PAGE_SHIFT
        j = (ends[first - 1] - r0) >> PAGE_SHIFT
        rng.hmm_pfns[i:j] &= _INOUT
    if first < len(starts):
        if required:
            return (yield from hmm_vma_fault(starts[first], ends[first], required, walk))
    return 0


# --- PMD tables ------------------------------------------------------------------------------------------
def _huge_fn(devmap_bits: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Which non-none, non-table PMDs ``hmm_vma_walk_pmd`` hands to ``hmm_vma_handle_pmd``:
    ``pmd_trans_huge`` [6.18], or ``pmd_devmap || pmd_trans_huge`` [6.1-6.16]."""
    def fn(rows: np.ndarray) -> np.ndarray:
        pse = (rows & dec.PSE) != 0
        if devmap_bits:
            return pse
        return pse & ((rows & dec.DEVMAP) == 0)
    return fn


class _PteDecode:
    """The 6.18 per-PTE outcome of a set of PTE rows (``hmm_vma_handle_pte`` with no fault).

    ``new``: the value written when no fault is needed; ``stop``: the entry ends the PMD chunk's loop (a
    fault or an error); ``faultable``: that stop is a plain ``hmm_vma_fault`` (none entry, or present entry
    whose cpu flags do not satisfy the request); ``required``: its fault bits.
    """

    def __init__(self, e: np.ndarray, req_wf: Any, req_ww: Any, walk: pw.MmWalk, never: bool,
                 wsp: Workspace) -> None:
        machine = walk.mm.machine
        rng: ref.HmmRange = walk.private.range
        mem = machine.mem
        vma = walk.vma
        assert vma is not None
        self.stop: np.ndarray | None = None
        n = e.size
        ef = e.reshape(-1)
        # the common case: every entry present (P), not protnone/special/devmap, a pfn with a struct page
        t = wsp.array("t", n)
        np.bitwise_and(ef, _PLAIN_MASK, out=t)
        flag = wsp.array("b", n, np.bool_)
        np.equal(t, dec.P, out=flag)
        if flag.all() and not vma.vm_flags & VM.PFNMAP:
            pfn = wsp.array("pfn", n)
            np.bitwise_and(ef, dec.PFN_MASK, out=pfn)
            np.right_shift(pfn, U64(PAGE_SHIFT), out=pfn)
            if n == 0 or int(pfn.max()) < mem.nr_pfns:
                np.bitwise_and(ef, dec.RW, out=t)
                np.left_shift(t, U64(61), out=t)                  # _PAGE_RW (bit 1) -> HMM_PFN_WRITE (bit 62)
                if not never:
                    req = _page_required(req_wf, req_ww, True, (t != 0).reshape(e.shape))
                    self.required = req
                    self.stop = req != 0
                    self.faultable = self.stop
                np.bitwise_or(pfn, t, out=pfn)
                np.bitwise_or(pfn, U64(_VALID), out=pfn)
                self.new = pfn.reshape(e.shape)
                return
        pfn = dec.pfn(e)
        kinds = dec.pte_kinds(e)
        new = np.zeros(e.shape, dtype=np.uint64)
        present = kinds == Kind.PRESENT
        cpu_v = present & ~dec.protnone(e)
        cpu_w = cpu_v & dec.write(e)
        cpu = np.where(cpu_v, U64(_VALID), U64(0)) | np.where(cpu_w, U64(_WRITE), U64(0))
        # vm_normal_page() finds a page / devmap [6.1-6.16] / the zero pfn
        normal = ~dec.special(e) & (pfn < mem.nr_pfns)
        if vma.vm_flags & VM.PFNMAP:
            normal[:] = False
        if machine.profile.devmap_bits:
            normal |= dec.devmap(e)
        normal |= pfn == mem.zero_pfn
        ok = present & normal
        new[ok] = pfn[ok] | cpu[ok]
        new[present & ~normal] = U64(_ERROR)
        # device-private entries of the caller's device: reported, never faulted
        owned = np.zeros(e.shape, dtype=bool)
        dp = kinds == Kind.DEVICE_PRIVATE
        if dp.any() and rng.dev_private_owner is not None:
            off = dec.swp_offset(e)
            owner_ok = np.zeros(e.shape, dtype=bool)
            for pgmap in reversed(machine.pgmaps):               # machine.pgmap_of(): first covering
                res = pgmap.res
                if res is None:
                    continue
                cov = dp & (off >= U64(res.start)) & (off < U64(res.end))
                owner_ok[cov] = getattr(pgmap, "owner", None) is rng.dev_private_owner
            owned = dp & owner_ok
            wr = dec.swp_type(e) == int(x86.SwpType.SWP_DEVICE_PRIVATE_WRITE)
            new[owned] = off[owned] | U64(_VALID) | np.where(wr[owned], U64(_WRITE), U64(0))
        self.new = new
        if never:
            return
        # per-page fault decisions
        req_cpu = _page_required(req_wf, req_ww, cpu_v, cpu_w)          # need(req, cpu)
        req_0 = _page_required(req_wf, req_ww, False, False)            # need(req, 0)
        none = kinds == Kind.NONE
        fault_present = present & (req_cpu != 0)
        fault_none = none & (req_0 != 0)
        err_present = present & ~normal & (req_cpu == 0) & (req_0 != 0)
        other = ~present & ~none & ~owned & (req_0 != 0)                 # markers, swap, migration, ...
        self.faultable = fault_present | fault_none
        self.stop = self.faultable | err_present | other
        self.required = np.where(present, req_cpu, req_0)


def _walk_pmd_range(pudp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_pmd_range() (mm/pagewalk.c, 6.18) with HMM's ``pmd_entry``/``pte_hole``, one PMD table at a time."""
    mm = walk.mm
    pool = mm.machine.pool
    pud = pool.get(pudp)
    if not x86.pud_present(pud) or x86.pud_leaf(pud):      # the PUD is no longer a table: caller retries
        walk.action = pw.ACTION_AGAIN
        return 0
    tid = x86.table_id_of(pud)
    huge_fn = _huge_fn(mm.machine.profile.devmap_bits)
    cur = addr
    while True:
        batch = PmdBatch.read(pool, tid, cur, end, huge_fn)
        with workspace() as wsp:
            err, resume = yield from _pmd_batch(pudp, batch, walk, wsp)
        if err or resume >= end:
            return err
        cur = resume
        yield from sched.preempt_point("walk_pmd_range")


def _pmd_batch(pudp: tuple[int, int], b: PmdBatch, walk: pw.MmWalk, wsp: Workspace) -> Gen[tuple[int, int]]:
    """Rows of one PMD table, in order: all rows before the first one that stops are written with numpy;
    that row faults (here) or goes to the reference walker.  Returns (err, address to resume at)."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    machine = walk.mm.machine
    req = _Req(rng)
    i_base = (b.start - rng.start) >> PAGE_SHIFT
    kinds = b.kinds
    nrows = b.nrows
    row_page = np.minimum(np.maximum(np.arange(nrows, dtype=np.int64) * PTRS_PER_TABLE - b.off0, 0), b.npages)
    row_end_page = np.append(row_page[1:], b.npages)

    # per-page requests over the batch
    if req.never:
        wf = ww = False
    elif req.per_page:
        wf, ww = req.arrays(rng.hmm_pfns[i_base:i_base + b.npages])
    else:
        wf, ww = req.cwf, req.cww

    # cpu flags of huge rows
    huge = kinds == ROW_HUGE
    cpu_rows = np.zeros(nrows, dtype=np.uint64)
    if huge.any():
        hr = b.rows[huge]
        pn = dec.protnone(hr)
        cpu_rows[huge] = np.where(pn, U64(0), U64(_VALID | _ORDER9) | np.where(dec.write(hr), U64(_WRITE), U64(0)))

    # PTE rows
    table = kinds == ROW_TABLE
    pte: _PteDecode | None = None
    if table.any():
        e2 = b.pte_rows(table, wsp)                              # (t, 512), scratch memory
        if isinstance(wf, np.ndarray):
            # requests per page of the table rows, in the (t, 512) layout
            pad = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
            padw = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
            b.padded(pad)[:] = wf
            b.padded(padw)[:] = ww
            pwf, pww = pad[table], padw[table]
        else:
            pwf, pww = wf, ww
        pte = _PteDecode(e2, pwf, pww, walk, req.never, wsp)

    # which row stops first
    stop_row = nrows
    row_required = np.zeros(nrows, dtype=np.int64)
    if (kinds == ROW_OTHER).any():
        stop_row = int(np.flatnonzero(kinds == ROW_OTHER)[0])
    if not req.never:
        if isinstance(wf, np.ndarray):
            anyf = np.logical_or.reduceat(wf, row_page) if b.npages else np.zeros(nrows, bool)
            anyw = np.logical_or.reduceat(ww, row_page) if b.npages else np.zeros(nrows, bool)
            # reduceat on equal consecutive indices returns the element itself; rows are never empty here
        else:
            anyf = np.full(nrows, wf)
            anyw = np.full(nrows, ww)
        cpu_v = (cpu_rows & U64(_VALID)) != 0
        cpu_w = (cpu_rows & U64(_WRITE)) != 0
        need = np.where(anyw & ~cpu_w, _NEED_ALL, np.where(anyf & ~cpu_v, _NEED_FAULT, 0))
        row_required = np.where((kinds == ROW_NONE) | huge, need, 0)
        cand = np.flatnonzero(row_required != 0)
        if cand.size:
            stop_row = min(stop_row, int(cand[0]))
        if pte is not None and pte.stop is not None:
            t_idx = np.flatnonzero(table)
            stops2 = pte.stop.reshape(-1, PTRS_PER_TABLE)
            # only the pages inside the batch count (first/last rows may be partial)
            valid = np.zeros((nrows, PTRS_PER_TABLE), dtype=bool)
            b.padded(valid)[:] = True
            rows_stop = (stops2 & valid[table]).any(axis=1)
            hit = np.flatnonzero(rows_stop)
            if hit.size:
                stop_row = min(stop_row, int(t_idx[hit[0]]))

    # write rows [0, stop_row)
    if stop_row:
        _write_rows(b, rng, i_base, stop_row, row_page, cpu_rows, pte, table, wsp)
        nt = int(table[:stop_row].sum())
        if nt:
            machine.counters["hmm_pte_tables"] += nt
    if stop_row == nrows:
        return 0, b.end

    r = stop_row
    a, e = b.row_start(r), b.row_end(r)
    kind = int(kinds[r])
    if kind == ROW_NONE:
        return (yield from hmm_vma_fault(a, e, int(row_required[r]), walk)), e
    if kind == ROW_HUGE:
        return (yield from hmm_vma_fault(a, e, int(row_required[r]), walk)), e
    if kind == ROW_TABLE:
        assert pte is not None and pte.stop is not None
        t = int(np.count_nonzero(table[:r]))                     # r's place among the table rows
        lo = int(row_page[r] - (r * PTRS_PER_TABLE - b.off0))   # column of the row's first page
        cols = np.flatnonzero(pte.stop.reshape(-1, PTRS_PER_TABLE)[t, lo:]) + lo
        c = int(cols[0])
        if pte.faultable.reshape(-1, PTRS_PER_TABLE)[t, c]:
            machine.counters["hmm_pte_tables"] += 1
            # the pages before the stopping one are written by hmm_vma_handle_pte first
            if c > lo:
                i = i_base + int(row_page[r])
                view = rng.hmm_pfns[i:i + (c - lo)]
                view &= _INOUT
                view |= pte.new.reshape(-1, PTRS_PER_TABLE)[t, lo:c]
            fa = b.base + r * PMD_SIZE + (c << PAGE_SHIFT)
            req_bits = int(pte.required.reshape(-1, PTRS_PER_TABLE)[t, c])
            return (yield from hmm_vma_fault(fa, e, req_bits, walk)), e
    # anything else: the reference walker for this one PMD entry
    err = yield from pw.walk_pmd_range(pudp, a, e, walk)
    return err, e


def _write_rows(b: PmdBatch, rng: ref.HmmRange, i_base: int, nrows: int, row_page: np.ndarray,
                cpu_rows: np.ndarray, pte: _PteDecode | None, table: np.ndarray, wsp: Workspace) -> None:
    """``(entry & INOUT) | new`` for the pages of rows ``[0, nrows)`` of the batch."""
    kinds = b.kinds[:nrows]
    npages = int(row_page[nrows]) if nrows < b.nrows else b.npages
    view = rng.hmm_pfns[i_base:i_base + npages]
    if (kinds == ROW_NONE).all():
        view &= _INOUT
        return
    if (kinds == ROW_HUGE).all() and b.off0 == 0 and npages == nrows * PTRS_PER_TABLE:
        # whole PMD leaves: (entry & INOUT) | (pmd_pfn + k) | cpu, in place row block by row block
        base = dec.pfn(b.rows[:nrows]) | cpu_rows[:nrows]
        v2 = view.reshape(nrows, PTRS_PER_TABLE)
        step = 64
        for r0 in range(0, nrows, step):
            v = v2[r0:r0 + step]
            np.bitwise_and(v, _INOUT, out=v)
            np.bitwise_or(v, base[r0:r0 + step, None], out=v)
            np.add(v, _PFN_COLS[None, :], out=v)
        return
    if pte is not None and (kinds == ROW_TABLE).all():
        flat = pte.new.reshape(-1)[b.off0:b.off0 + npages]
    else:
        new = wsp.array("new", nrows * PTRS_PER_TABLE).reshape(nrows, PTRS_PER_TABLE)
        h = kinds == ROW_HUGE
        if h.all():
            base = dec.pfn(b.rows[:nrows]) | cpu_rows[:nrows]
            np.add(base[:, None], _PFN_COLS[None, :], out=new)
        else:
            new[:] = 0
        if h.any() and not h.all():
            base = dec.pfn(b.rows[:nrows][h]) | cpu_rows[:nrows][h]
            new[h] = base[:, None] + _PFN_COLS[None, :]
        t = kinds == ROW_TABLE
        if t.any():
            assert pte is not None
            new[t] = pte.new.reshape(-1, PTRS_PER_TABLE)[: int(t.sum())]
        flat = new.reshape(-1)[b.off0:b.off0 + npages]
    view &= _INOUT
    view |= flat


# --- upper levels ----------------------------------------------------------------------------------------
def _pud_entry(pudp: tuple[int, int], start: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """hmm_vma_walk_pud() (6.18): a present leaf PUD that needs no fault is filled here (in cache-sized
    pieces, under the PUD lock, action CONTINUE); every other PUD goes to the reference callback."""
    ws: ref.HmmVmaWalk = walk.private
    rng = ws.range
    machine = walk.mm.machine
    pud = machine.pool.get(pudp)
    devmap_bits = machine.profile.devmap_bits
    huge = x86.pud_trans_huge(pud) or (devmap_bits and x86.pud_devmap(pud) and x86.pud_leaf(pud))
    if not (huge and x86.pud_present(pud) and x86.pud_leaf(pud) and (not devmap_bits or x86.pud_devmap(pud))):
        return (yield from _call(walk.ops.pud_entry, pudp, start, end, walk))
    i = (start - rng.start) >> PAGE_SHIFT
    n = (end - start) >> PAGE_SHIFT
    cpu = ref.pud_to_hmm_pfn_flags(rng, pud)
    if _unit_required(_Req(rng), rng, i, i + n, cpu):
        return (yield from _call(walk.ops.pud_entry, pudp, start, end, walk))
    ptl = yield from ref.pud_trans_huge_lock(pudp, walk)
    assert ptl is not None
    walk.action = pw.ACTION_CONTINUE
    fill_leaf(rng.hmm_pfns[i:i + n], x86.pud_pfn(pud) + ((start & (PUD_SIZE - 1)) >> PAGE_SHIFT), cpu,
              ref.HMM_PFN_INOUT_FLAGS)
    sched.spin_unlock(ptl)
    return 0


def _walk_pud_range(p4dp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_pud_range() (6.18): runs of none PUDs as holes; every other PUD through the reference
    ``pud_entry`` (``hmm_vma_walk_pud``) and, for tables, :func:`_walk_pmd_range`."""
    mm = walk.mm
    pool = mm.machine.pool
    ops = walk.ops
    pud_tid = x86.table_id_of(pool.get(p4dp))
    _i0, _i1, puds = row_slice(pool, pud_tid, PUD_SHIFT, addr, end)
    starts, ends = chunk_bounds(addr, end, PUD_SHIFT, puds.shape[0])
    none = entry_none(puds)
    i0 = (addr >> PUD_SHIFT) & (PTRS_PER_TABLE - 1)
    k, n = 0, puds.shape[0]
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
        while True:                                            # the "again:" label
            if x86.pte_none(pool.get(pudp)):
                err = yield from _holes([a], [nxt], walk)
                break
            walk.action = pw.ACTION_SUBTREE
            err = yield from _pud_entry(pudp, a, nxt, walk)
            if err or walk.action == pw.ACTION_CONTINUE:
                break
            if walk.action == pw.ACTION_AGAIN:
                continue
            if x86.pud_leaf(pool.get(pudp)):
                from hmmirror.mm.huge_memory import __split_huge_pud
                yield from __split_huge_pud(walk.vma, pudp, a)
            if x86.pte_none(pool.get(pudp)):
                continue
            err = yield from _walk_pmd_range(pudp, a, nxt, walk)
            if err or walk.action != pw.ACTION_AGAIN:
                break
        if err:
            return err
        k += 1
    return 0


def _walk_p4d_range(pgdp: tuple[int, int], addr: int, end: int, walk: pw.MmWalk) -> Gen[int]:
    """walk_p4d_range() (6.18)."""
    mm = walk.mm
    geo = mm.machine.geo
    err = 0
    while True:
        nxt = geo.p4d.addr_end(addr, end)
        p4dp = mm.pt.p4d_offset(pgdp, addr)
        if mm.pt.p4d_none(p4dp):
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
    """walk_pgd_range() (6.18)."""
    mm = walk.mm
    geo = mm.machine.geo
    err = 0
    while True:
        nxt = geo.pgd.addr_end(addr, end)
        pgdp = mm.pt.pgd_offset(addr)
        if mm.pt.pgd_none(pgdp):
            err = yield from _holes([addr], [nxt], walk)
        else:
            err = yield from _walk_p4d_range(pgdp, addr, nxt, walk)
        if err:
            break
        addr = nxt
        if addr == end:
            break
    return err


def walk_page_range(mm: "MMStruct", start: int, end: int, hmm_vma_walk: ref.HmmVmaWalk) -> Gen[int]:
    """walk_page_range() (mm/pagewalk.c, 6.18) with ``hmm_walk_ops``, fast (see the module docstring)."""
    ops = ref.hmm_walk_ops
    if start >= end:
        return -EINVAL
    pw.process_mm_walk_lock(mm, ops.walk_lock)
    walk = pw.MmWalk(ops, mm, hmm_vma_walk)
    vma = mm.find_vma(start)
    err = 0
    while True:
        if vma is None or start < vma.vm_start:               # after the last VMA, or a gap
            walk.vma = None
            nxt = end if vma is None else min(end, vma.vm_start)
            err = yield from _call(ops.pte_hole, start, nxt, -1, walk)
        else:
            walk.vma = vma
            nxt = min(end, vma.vm_end)
            vma = mm.find_vma(vma.vm_end)
            err = yield from _call(ops.test_walk, start, nxt, walk)
            if err > 0:
                err = 0
                start = nxt
                if start >= end:
                    break
                continue
            if err < 0:
                break
            if walk.vma.vm_flags & VM.HUGETLB:
                err = yield from pw.walk_hugetlb_range(start, nxt, walk)      # not covered: reference
            else:
                err = yield from _walk_pgd_range(start, nxt, walk)
        if err:
            break
        start = nxt
        if start >= end:
            break
    return err


# --- the entry point -------------------------------------------------------------------------------------
def hmm_range_fault(range: ref.HmmRange, *, reference: bool = False) -> Gen[int]:   # noqa: A002 - kernel name
    """hmm_range_fault() (mm/hmm.c, 6.18), fast.  Same contract as
    :func:`hmmirror.mm.hmm.modern.hmm_range_fault`; ``reference=True`` runs that function instead."""
    if reference:
        return (yield from ref.hmm_range_fault(range))
    if range.notifier is None or range.notifier.mm is None:
        return (yield from ref.hmm_range_fault(range))          # the reference reports the NULL dereference
    mm = range.notifier.mm
    machine = mm.machine
    ref.mmap_assert_locked(mm)
    machine.counters["hmm_range_fault"] += 1
    machine.log("hmm_range_fault_begin", mm=mm.name, start=range.start, end=range.end)
    hmm_vma_walk = ref.HmmVmaWalk(range, range.start)
    stuck = 0                                   # the reference's livelock guard, identically
    faults0 = hmm_vma_walk.faults
    while True:
        if mmu_interval_check_retry(range.notifier, range.notifier_seq):
            ret = -EBUSY
            break
        machine.counters["hmm_walks"] += 1
        machine.counters["hmm_pages_walked"] += (range.end - hmm_vma_walk.last) >> PAGE_SHIFT
        hmm_vma_walk.walks += 1
        last = hmm_vma_walk.last
        ret = yield from walk_page_range(mm, hmm_vma_walk.last, range.end, hmm_vma_walk)
        if ret != -EBUSY:
            break
        if hmm_vma_walk.last == last:
            stuck += 1
        else:
            stuck, faults0 = 0, hmm_vma_walk.faults
        if stuck >= ref.HMM_MODEL_MAX_RESTARTS:
            sched.report("livelock", f"hmm_range_fault restarted {stuck} times at {hmm_vma_walk.last:#x} "
                                     "without progress", cause="refault" if hmm_vma_walk.faults > faults0
                         else "no-fault")
            break
    if ret == -EBUSY:
        machine.counters["hmm_ebusy"] += 1
    machine.log("hmm_range_fault", mm=mm.name, start=range.start, end=range.end, ret=ret,
                walks=hmm_vma_walk.walks, faults=hmm_vma_walk.faults, default_flags=range.default_flags,
                pfn_flags_mask=range.pfn_flags_mask, seq=range.notifier_seq)
    return ret


__all__ = ["PTE_RULES_MODERN", "hmm_range_fault", "hmm_vma_fault", "walk_page_range"]
