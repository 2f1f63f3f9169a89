"""Device-memory invariants D1 and D2 of device-memory.md, each a small instrument (``default_invariants``).

| name | # | guarantee |
|---|---|---|
| ``data_lost`` | D1 | every byte the CPU or the device wrote to anonymous memory is read back by either, whatever migrations happened in between |
| ``page_place`` | D2 | a device-private page is in exactly one place: allocated pages are mapped by the CPU (or held locked by a migration or a fault), free pages by nobody |

How data moves in a run (:func:`sim_access`): every CPU ``touch`` of a page and every page a successful device
job can reach through its device page table is an access of the first 8 bytes of the page -- a write stores a
fresh tag (``0xD1`` in the top byte, a sequence number below), a read loads them.  Both happen in one step,
through the entry the CPU (or the device) maps at that moment, as a load or store would.  The expectation of a
page is the latest of a few range records (numpy rows: mm, first page, pages, kind, tag or migration):
writes, discards (``munmap``, ``mmap`` over a range, ``MADV_DONTNEED``/``REMOVE``/``FREE``, the OOM reaper,
exit -- the data is meant to go) and migrations; nothing per page.  Only private anonymous memory is judged
(the memory device migration moves; file pages keep their data in the page cache, outside these rules).
"""

from __future__ import annotations

import bisect
import struct
import sys
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.include.mm_types import VM
from hmmirror.sim.findings import frame_stack

TAG_MAGIC = 0xD1 << 56
#: record kinds
WRITE, DISCARD, MIGRATION = 0, 1, 2
#: CPU operations whose range loses its data on purpose (madvise advice names as the scenario writes them)
DISCARD_ADVICE = ("dontneed", "remove", "free", "dontneed_locked")


def make_tag(seq: int) -> bytes:
    """The 8 bytes a sim write stores: ``0xD1`` in the top byte, ``seq`` below (little endian)."""
    return struct.pack("<Q", TAG_MAGIC | (seq & ((1 << 56) - 1)))


def sim_access(run: Any, st: Any, mm: Any, va: int, write: bool, who: str) -> Any:
    """One user access of the page at ``va`` by task ``st`` (``who``: ``cpu``), as a load/store does it: fault
    until the leaf allows the access, then -- in the same step -- store a new tag or load the first 8 bytes,
    and tell the instruments (``data_access``).  Returns 0 or the signal the fault raised."""
    from hmmirror.arch.x86.fault import do_user_addr_fault, leaf_pfn
    from hmmirror.mm.gup import leaf_allows

    for _ in range(8):
        sig = yield from do_user_addr_fault(mm, va, write)
        if sig:
            return sig
        if leaf_allows(mm, va, write):
            _touch_page(run, st, mm, va, leaf_pfn(mm, va), write, who)
            return 0
    return 0                                       # the entry kept changing under us: no access this time


def _touch_page(run: Any, st: Any, mm: Any, va: int, pfn: int, write: bool, who: str) -> None:
    mem = run.machine.mem
    va &= ~(PAGE_SIZE - 1)
    if write:
        run.data_seq = getattr(run, "data_seq", 0) + 1
        tag = make_tag(run.data_seq)
        mem.write(pfn, 0, tag)
        data = tag
    else:
        data = mem.read(pfn, 0, 8)
    eng = run.engine
    if eng is not None:
        eng.emit("data_access", st, mm, va, pfn, write, data, who)


def device_access(run: Any, st: Any, start: int, end: int, write: bool) -> None:
    """The device uses what a successful job mapped, in one step: a write job stores a tag in every page of
    ``[start, end)`` its page table maps writable, any job loads the others it maps.  Entries that do not map
    the CPU's page are left alone (``coherence`` judges them; storing through them is that bug again)."""
    drv = run.driver
    pt = getattr(drv, "pt", None)
    mm = getattr(drv, "mm", None)
    t = getattr(run, "tracker", None)
    if t is None and run.engine is not None:
        t = run.tracker = next((i for i in run.engine.instruments if getattr(i, "name", "") == "tracker"), None)
    if pt is None or mm is None or mm.exited or not pt.entries or t is None:
        return
    from hmmirror.sim.invariants import VECTORISED, cpu_leaf

    ents = pt.entries
    alias = getattr(drv, "device_alias", None)
    n = (end - start) >> PAGE_SHIFT
    if VECTORISED and n > 8 and not start & (PAGE_SIZE - 1) and run.engine is not None:
        _device_access_range(run, st, mm, pt, t, alias, start, end, write)
        return
    vas = range(start, end, PAGE_SIZE) if n <= len(ents) else sorted(v for v in ents if start <= v < end)
    for va in vas:
        e = ents.get(va)
        if e is None:
            continue
        pfn, w = e
        cpfn, readable, cw = cpu_leaf(mm, va)
        if not readable or not t.same_page(pfn, cpfn) or (w and not cw):
            continue
        if alias is not None:
            a = alias(pfn)                         # the driver keeps the bytes of its device page elsewhere
            pfn = a if a >= 0 else pfn             # (dmirror: the system page backing it, BACKING_PAGE())
        _touch_page(run, st, mm, va, pfn, write and w, "device")


def _device_access_range(run: Any, st: Any, mm: Any, pt: Any, t: Any, alias: Any, start: int, end: int,
                         write: bool) -> None:
    """:func:`device_access` for many pages at once, the same accesses in the same order: the pages the device
    maps and may use picked with arrays (CPU translations read a table row at a time), the tags stored and
    loaded in one pass, the instruments told once (``data_access_range``; one that only has ``data_access``
    hears every page)."""
    from hmmirror.sim.invariants import cpu_leaf, cpu_leaf_range

    ents = pt.entries
    n = (end - start) >> PAGE_SHIFT
    if n <= len(ents):
        got = list(map(ents.get, range(start, end, PAGE_SIZE)))
        idx = [i for i, g in enumerate(got) if g is not None]
        items = [got[i] for i in idx]
    else:
        vs = sorted(v for v in ents if start <= v < end)
        idx = [(v - start) >> PAGE_SHIFT for v in vs]
        items = [ents[v] for v in vs]
    if not idx:
        return
    ix = np.array(idx, dtype=np.int64)
    dpfn = np.array([e[0] for e in items], dtype=np.int64)
    dw = np.array([bool(e[1]) for e in items], dtype=bool)
    span = int(ix[-1]) + 1
    if span <= 4 * ix.size + 1024:
        cpfn, rd, cw = cpu_leaf_range(mm, start, span)
        cpfn, rd, cw = cpfn[ix], rd[ix], cw[ix]
    else:                                          # a few entries spread over a huge range
        leaves = [cpu_leaf(mm, start + int(i) * PAGE_SIZE) for i in idx]
        cpfn = np.array([x[0] for x in leaves], dtype=np.int64)
        rd = np.array([x[1] for x in leaves], dtype=bool)
        cw = np.array([x[2] for x in leaves], dtype=bool)
    same = cpfn == dpfn
    for k in np.flatnonzero(rd & ~same).tolist():  # the driver's own representation of the CPU's page
        same[k] = t.same_page(int(dpfn[k]), int(cpfn[k]))
    use = rd & same & (cw | ~dw)
    sel = np.flatnonzero(use)
    if not sel.size:
        return
    vas = (start + ix[sel] * PAGE_SIZE).tolist()
    pfns = dpfn[sel].tolist()
    if alias is not None:                          # the driver keeps the bytes of its device page elsewhere
        pfns = [a if a >= 0 else p for p, a in ((p, alias(p)) for p in pfns)]
    wr = dw[sel] & write
    writes = wr.tolist()
    contents = run.machine.mem.contents
    seq = getattr(run, "data_seq", 0)
    values = _store_load_tags(contents, np.array(pfns, dtype=np.int64), wr, seq)
    seq += int(np.count_nonzero(wr))
    if seq:
        run.data_seq = seq
    eng = run.engine
    hooks = [i for i in eng.instruments if getattr(i, "data_access", None) is not None]
    if all(getattr(i, "data_access_range", None) is not None for i in hooks):
        for inst in hooks:
            inst.data_access_range(eng, st, mm, vas, pfns, writes, values, "device")
    else:                                          # an instrument that hears page by page: all of them do
        for va, pfn, w, v in zip(vas, pfns, writes, values):
            eng.emit("data_access", st, mm, va, pfn, w, v.to_bytes(8, "little"), "device")


def _store_load_tags(contents: Any, pfns: np.ndarray, writes: np.ndarray, seq: int) -> list[int]:
    """Page ``i`` in order: a write stores the next tag (``seq + 1``, ``seq + 2``, ... in the top-byte-``0xD1``
    form), a read loads the page's first 8 bytes; returns the values stored or loaded (integers).  One pass of
    arrays when the pages are distinct; in order page by page when one repeats (a read after a write of the same
    page sees it)."""
    tags = (np.cumsum(writes, dtype=np.uint64) + np.uint64(seq)) & np.uint64((1 << 56) - 1)
    tags |= np.uint64(TAG_MAGIC)
    srt = np.sort(pfns)
    if not (srt[1:] == srt[:-1]).any():
        out = tags.copy()
        rd = ~writes
        if rd.any():
            out[rd] = contents.load_tags(pfns[rd])
        if writes.any():
            contents.store_tags(pfns[writes], tags[writes])
        return out.tolist()
    values: list[int] = []
    for pfn, w, tag in zip(pfns.tolist(), writes.tolist(), tags.tolist()):
        if w:
            contents.set_tag(pfn, tag)
            values.append(tag)
        else:
            values.append(contents.get_tag(pfn))
    return values


class _Records:
    """Range records ``(mm id, first page, pages, kind, value, step)`` in growing numpy arrays."""

    def __init__(self) -> None:
        self.a = np.zeros((64, 6), dtype=np.int64)
        self.n = 0
        self.where: list[str] = []                 # MIGRATION records: value indexes this list

    def add(self, mm: int, first: int, npages: int, kind: int, value: int, step: int) -> None:
        if self.n == len(self.a):
            self.a = np.concatenate([self.a, np.zeros_like(self.a)])
        self.a[self.n] = (mm, first, npages, kind, value, step)
        self.n += 1

    def latest(self, mm: int, page: int, kinds: tuple[int, ...]) -> int:
        """Index of the latest record of one of ``kinds`` covering ``page`` of ``mm`` (``-1`` for mm: any), or -1."""
        a = self.a[:self.n]
        if not self.n:
            return -1
        m = ((a[:, 0] == mm) | (a[:, 0] == -1)) & (a[:, 1] <= page) & (page < a[:, 1] + a[:, 2])
        m &= np.isin(a[:, 3], kinds)
        idx = np.flatnonzero(m)
        return int(idx[-1]) if idx.size else -1


# --- D1 ----------------------------------------------------------------------------------------------------
class DataLost:
    """``data_lost`` (D1): a read of anonymous memory returns the latest write, whatever migrated in between."""

    name = "data_lost"
    ALL = 1 << 52                                  # pages: "the whole address space"

    def __init__(self) -> None:
        self.rec = _Records()
        self.mm_ids: dict[str, int] = {}
        self.ops: dict[int, tuple[int, int, int]] = {}     # task idx -> discard range of the op in progress
        self.checked = 0                                     # reads compared with a write

    def _mm(self, mm: Any) -> int:
        return self.mm_ids.setdefault(mm.name, len(self.mm_ids))

    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.run = run

    # -- what happens to the data --
    def data_access(self, eng: Any, st: Any, mm: Any, va: int, pfn: int, write: bool, data: bytes, who: str) -> None:
        vma = mm.vma_lookup(va)
        if vma is None or not _private_anon(vma):
            return
        page = va >> PAGE_SHIFT
        mid = self._mm(mm)
        if write:
            self.rec.add(mid, page, 1, WRITE, int.from_bytes(data, "little", signed=True), eng.step)
            return
        i = self.rec.latest(mid, page, (WRITE, DISCARD))
        if i < 0 or self.rec.a[i, 3] != WRITE:
            return
        self.checked += 1
        # a record of consecutive writes holds the first page's tag; the next pages' tags follow it
        want = (int(self.rec.a[i, 4]) + page - int(self.rec.a[i, 1])) & ((1 << 64) - 1)
        got = int.from_bytes(bytes(data).ljust(8, b"\0")[:8], "little")
        if got == want:
            return
        self._mismatch(eng, st, mm, mid, va, pfn, i, got, want, who)

    def data_access_range(self, eng: Any, st: Any, mm: Any, vas: list[int], pfns: list[int], writes: list[bool],
                          values: list[int], who: str) -> None:
        """:meth:`data_access` of many pages of one step (ascending, distinct ``vas``; ``values``: the 8 bytes
        stored or loaded, as integers): the same records and reports.  Reads are judged against the records
        before this step (the writes of the step are to other pages); consecutive writes become one record."""
        n = len(vas)
        anon = np.zeros(n, dtype=bool)
        i = 0
        while i < n:                               # one VMA lookup per VMA the pages fall in
            vma = mm.vma_lookup(vas[i])
            if vma is None:
                i += 1
                continue
            j = bisect.bisect_left(vas, vma.vm_end, i)
            if _private_anon(vma):
                anon[i:j] = True
            i = j
        if not anon.any():
            return
        mid = self._mm(mm)
        pages = np.array(vas, dtype=np.int64) >> PAGE_SHIFT
        w = np.array(writes, dtype=bool)
        rd = np.flatnonzero(anon & ~w)
        if rd.size:
            self._reads(eng, st, mm, mid, pages[rd], [pfns[k] for k in rd.tolist()],
                        [values[k] for k in rd.tolist()], who)
        wr = np.flatnonzero(anon & w).tolist()
        k = 0
        while k < len(wr):                         # runs of consecutive pages with consecutive tags
            e = k + 1
            while e < len(wr) and pages[wr[e]] == pages[wr[e - 1]] + 1 and values[wr[e]] == values[wr[e - 1]] + 1:
                e += 1
            v = values[wr[k]]
            self.rec.add(mid, int(pages[wr[k]]), e - k, WRITE, v - (1 << 64) if v >= 1 << 63 else v, eng.step)
            k = e

    def _reads(self, eng: Any, st: Any, mm: Any, mid: int, pages: np.ndarray, pfns: list[int], values: list[int],
               who: str) -> None:
        a = self.rec.a[:self.rec.n]
        if not len(a):
            return
        lo, hi = int(pages[0]), int(pages[-1]) + 1
        cand = np.flatnonzero(((a[:, 0] == mid) | (a[:, 0] == -1)) & (a[:, 1] < hi) & (lo < a[:, 1] + a[:, 2])
                              & ((a[:, 3] == WRITE) | (a[:, 3] == DISCARD)))
        if not cand.size:
            return
        latest = np.full(pages.size, -1, dtype=np.int64)
        for r in cand.tolist():                    # oldest first: the latest covering record wins
            first, cnt = int(a[r, 1]), int(a[r, 2])
            latest[np.searchsorted(pages, first):np.searchsorted(pages, first + cnt)] = r
        judged = np.flatnonzero(latest >= 0)
        judged = judged[a[latest[judged], 3] == WRITE]
        if not judged.size:
            return
        self.checked += int(judged.size)
        recs = latest[judged]
        want = (a[recs, 4].astype(np.uint64) + (pages[judged] - a[recs, 1]).astype(np.uint64))
        got = np.array([values[k] for k in judged.tolist()], dtype=np.uint64)
        for k in np.flatnonzero(got != want).tolist():
            page = int(pages[judged[k]])
            self._mismatch(eng, st, mm, mid, page << PAGE_SHIFT, pfns[int(judged[k])], int(recs[k]), int(got[k]),
                           int(want[k]), who)

    def _mismatch(self, eng: Any, st: Any, mm: Any, mid: int, va: int, pfn: int, i: int, got: int, want: int,
                  who: str) -> None:
        wstep = int(self.rec.a[i, 5])
        j = self.rec.latest(mid, va >> PAGE_SHIFT, (MIGRATION,))
        moved = j > i
        loc = self.rec.where[int(self.rec.a[j, 4])] if moved else None
        stack = frame_stack(sys._getframe(2)) if not moved else None
        eng.violate(self.name, f"{who} read of {va:#x} (pfn {pfn:#x}) returned {got:#x}, but {want:#x} was written "
                    f"there at step {wstep}" + (f" and the page migrated since ({loc})" if moved else ""),
                    st=st, mm=mm, addr=va, location=loc, stack=stack, detail="-" if moved else "no-migration",
                    state={"read": hex(got), "written": hex(want), "written_at": wstep})

    def op_begin(self, eng: Any, st: Any, mm: Any, start: int, length: int) -> None:
        """A CPU operation that discards ``[start, start + length)`` starts (and again when it ends: writes
        made while it ran may or may not survive it)."""
        first = start >> PAGE_SHIFT
        n = max(1, (length + PAGE_SIZE - 1) >> PAGE_SHIFT)
        self.rec.add(self._mm(mm), first, n, DISCARD, 0, eng.step)
        self.ops[st.idx] = (self._mm(mm), first, n)

    def op_end(self, eng: Any, st: Any) -> None:
        r = self.ops.pop(st.idx, None)
        if r is not None:
            self.rec.add(r[0], r[1], r[2], DISCARD, 0, eng.step)

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"migrate_vma_finalize", "migrate_device_finalize", "oom_reap", "exit_mmap"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what == "migrate_vma_finalize":
            mm = ev.get("mm")
            if mm not in self.mm_ids:
                return
            self._migration(eng, self.mm_ids[mm], ev["start"] >> PAGE_SHIFT,
                            (ev["end"] - ev["start"]) >> PAGE_SHIFT)
        elif what == "migrate_device_finalize":
            self._migration(eng, -1, 0, self.ALL)            # eviction: wherever the pages are mapped
        elif what in ("oom_reap", "exit_mmap"):
            mm = ev.get("mm")
            if mm in self.mm_ids:
                self.rec.add(self.mm_ids[mm], 0, self.ALL, DISCARD, 0, eng.step)

    def _migration(self, eng: Any, mid: int, first: int, n: int) -> None:
        stack = frame_stack(sys._getframe(1))
        loc = _caller_of_mm(stack)
        self.rec.where.append(loc)
        self.rec.add(mid, first, n, MIGRATION, len(self.rec.where) - 1, eng.step)


def _private_anon(vma: Any) -> bool:
    # vma_is_anonymous() (no vm_ops) and not VM_SHARED (imports at module level: this runs per page accessed)
    return vma.vm_ops is None and not vma.vm_flags & VM.SHARED


def _caller_of_mm(stack: list[str]) -> str:
    """The innermost frame outside the kernel's mm/ and kernel/ code: the driver routine that migrated."""
    for s in reversed(stack):
        name = s.rsplit(":", 1)[0]
        if not name.startswith(("mm.", "kernel.")):
            return name
    return stack[-1].rsplit(":", 1)[0] if stack else "-"


# --- D2 ----------------------------------------------------------------------------------------------------
class PagePlace:
    """``page_place`` (D2): every allocated device-private page is mapped by the CPU (or held locked by a
    migration or fault); no CPU entry names a free one."""

    name = "page_place"

    def __init__(self) -> None:
        self.machine: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.machine = run.machine

    def _ranges(self) -> list[tuple[int, int]]:
        from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE

        out = []
        for pg in getattr(self.machine, "pgmaps", None) or ():
            if getattr(pg, "type", None) == MEMORY_DEVICE_PRIVATE and pg.res is not None:
                out.append((int(pg.res.start), int(pg.res.end)))
        return out

    def _bad(self, pfns: np.ndarray, fault_page: int = -1) -> tuple[str, int] | None:
        """``(neither|both, pfn)`` of the first page of ``pfns`` out of place.  ``fault_page``: the page a CPU
        fault is migrating back (do_swap_page holds it locked, with one reference, until migrate_to_ram
        returned: judged as it will be then); the references of other CPU faults still in migrate_to_ram
        (``machine.swap_fault_pages``) are discounted the same way."""
        from hmmirror.mm.page_alloc import PG

        mem = self.machine.mem
        if not pfns.size:
            return None
        ref = mem.refcount[pfns].astype(np.int64)
        mc = mem.mapcount[pfns]
        locked = (mem.flags[pfns] & np.uint32(PG.locked)) != 0
        if fault_page >= 0:
            fp = pfns == fault_page
            ref = ref - fp
            locked &= ~fp
        for p, n in getattr(self.machine, "swap_fault_pages", {}).items():
            # the reference of a CPU fault in another task's migrate_to_ram on ``p`` (6.12's do_swap_page takes
            # it without the page lock): judged as the page will be once that fault has put it
            k = n - (p == fault_page)
            if k > 0:
                ref = ref - (pfns == p) * k
        neither = np.flatnonzero((ref <= 0) & (mc > 0))
        if neither.size:
            return "neither", int(pfns[neither[0]])
        both = np.flatnonzero((ref > 0) & (mc <= 0) & ~locked)
        if both.size:
            return "both", int(pfns[both[0]])
        return None

    def _report(self, eng: Any, kind: str, pfn: int, location: str | None, stack: list[str] | None) -> None:
        mem = self.machine.mem
        if kind == "neither":
            msg = (f"device page {pfn:#x} is free (refcount {int(mem.refcount[pfn])}) but the CPU still maps it "
                   f"{int(mem.mapcount[pfn])} time(s): the data is in no place")
        else:
            msg = (f"device page {pfn:#x} is allocated (refcount {int(mem.refcount[pfn])}) but no CPU entry maps it "
                   "and no migration holds it: the page is kept beside the copy the CPU maps (or nobody can reach "
                   "it)")
        eng.violate(self.name, msg, location=location, stack=stack, detail=kind,
                    state={"pfn": hex(pfn), "refcount": int(mem.refcount[pfn]), "mapcount": int(mem.mapcount[pfn])})

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"migrate_vma_finalize", "migrate_device_finalize"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what not in ("migrate_vma_finalize", "migrate_device_finalize") or eng.finding is not None and \
                any(f.invariant == self.name for f in eng.findings):
            return
        f = sys._getframe(1)
        args = None
        fault_page = -1
        while f is not None and args is None:
            loc = f.f_locals
            if "src_pfns" in loc and "dst_pfns" in loc:
                args = (loc["src_pfns"], loc["dst_pfns"], int(loc.get("npages", 0)))
            elif "migrate" in loc and hasattr(loc["migrate"], "src"):
                m = loc["migrate"]
                args = (m.src, m.dst, int(m.npages))
                fault_page = int(m.fault_page)
            f = f.f_back
        if args is None:
            return
        from hmmirror.mm.migrate_device import MIGRATE_PFN_SHIFT, MIGRATE_PFN_VALID

        src, dst, n = args
        both = np.concatenate([np.asarray(src[:n], dtype=np.uint64), np.asarray(dst[:n], dtype=np.uint64)])
        pf = (both[(both & np.uint64(MIGRATE_PFN_VALID)) != 0] >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64)
        pf = self._device_private(pf)
        bad = self._bad(pf, fault_page)
        if bad is not None:
            stack = frame_stack(sys._getframe(1))
            self._report(eng, bad[0], bad[1], _caller_of_mm(stack), stack)

    def _device_private(self, pf: np.ndarray) -> np.ndarray:
        keep = np.zeros(pf.shape, dtype=bool)
        for lo, hi in self._ranges():
            keep |= (pf >= lo) & (pf < hi)
        return pf[keep]

    def _sweep(self, eng: Any, st: Any) -> None:
        if any(f.invariant == self.name for f in eng.findings):
            return
        mem = self.machine.mem
        for lo, hi in self._ranges():
            # out of place = referenced XOR mapped (:meth:`_bad`'s two cases; a page with neither is in its
            # place): one pass over the range finds whether any is, :meth:`_bad` says which and where
            odd = (mem.refcount[lo:hi] > 0) != (mem.mapcount[lo:hi] > 0)
            if not odd.any():
                continue
            pf = lo + np.flatnonzero((mem.refcount[lo:hi] != 0) | (mem.mapcount[lo:hi] != 0))
            bad = self._bad(pf.astype(np.int64))
            if bad is not None:
                self._report(eng, bad[0], bad[1], None, None)
                return

    def op_end(self, eng: Any, st: Any) -> None:
        self._sweep(eng, st)

    def fault_end(self, eng: Any, st: Any, start: int, end: int, write: bool, ret: int) -> None:
        self._sweep(eng, st)

    def run_finished(self, eng: Any) -> None:
        self._sweep(eng, None)


def data_invariants() -> list[Any]:
    return [DataLost(), PagePlace()]


INVARIANTS = ("data_lost", "page_place")
