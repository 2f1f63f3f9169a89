"""A model mirroring driver for the HMM 5.2 API, following Documentation/vm/hmm.rst [5.2] (hmm-5.2.md §12).

No in-tree 5.2 driver used ``hmm_range_*`` (hmm-5.2.md §14.5); this driver is the documented usage pattern
made executable.  It is a class with the three routines a real mirroring driver has, so the simulator can
drive it and a user can plug their own by subclassing :class:`HmmMirrorDriver52`:

* :meth:`~HmmMirrorDriver52.populate` ``(start, end, write)`` — the documented ``driver_populate_range``
  loop: register a range, wait until valid, snapshot or fault under ``mmap_sem``, take ``driver.update``,
  check ``hmm_range_valid``, commit ``pfns[]`` to the device page table, unregister; retry on invalidation;
* :meth:`~HmmMirrorDriver52.sync_cpu_device_pagetables` ``(mirror, update)`` — the mirror callback: takes
  ``driver.update`` (``mutex_trylock`` and -EAGAIN when ``update.blockable`` is false) and removes the device
  entries of ``[update.start, update.end)``;
* :meth:`~HmmMirrorDriver52.gc` — optional clean-up (drops empty page-table chunks).

"That lock [driver->update] is the same lock that the driver takes inside its sync_cpu_device_pagetables()
callback. That lock must be held before calling hmm_range_valid()" (hmm.rst).

The device page table is sparse: one numpy ``uint64`` array of 512 entries per 2 MiB of virtual address
space that holds any entry (no Python object per page); an entry is the HMM device entry the walk produced
(``pfn << pfn_shift | VALID [| WRITE]``), 0 when empty.

``literal=True`` runs the loop exactly as the document prints it: ``if (ret)`` treats any non-zero value,
including a positive page count, as a failure (unregister and return it); after ``hmm_range_fault`` returned
-EAGAIN (mmap_sem already released by HMM) it still calls ``up_read``.  The default mode handles the
documented return values (negative errors; -EAGAIN from fault leaves mmap_sem released).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PMD_SHIFT
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.hmm.v5_2 import (
    DEFAULT_FLAGS,
    DEFAULT_PFN_SHIFT,
    DEFAULT_VALUES,
    EAGAIN,
    HMM_PFN_ERROR,
    HMM_PFN_NONE,
    HMM_PFN_SPECIAL,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmMirror,
    HmmMirrorOps,
    HmmRange,
    HmmUpdate,
    hmm_mirror_register,
    hmm_mirror_unregister,
    hmm_range_fault,
    hmm_range_register,
    hmm_range_snapshot,
    hmm_range_unregister,
    hmm_range_valid,
    hmm_range_wait_until_valid,
    new_range,
)

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import MMStruct

#: the driver's TIMEOUT_IN_MSEC of hmm.rst (the document leaves it to the driver)
TIMEOUT_IN_MSEC = 1000
#: model guard: a populate that retried this often without success is a livelock finding
MAX_POPULATE_RETRIES = 1000


class DevicePageTable52:
    """The device's page table: sparse numpy chunks of 512 ``uint64`` entries per 2 MiB of VA (ours).

    Entries are HMM device entries as produced by the walk (0 = no entry).
    """

    CHUNK_SHIFT = PMD_SHIFT - PAGE_SHIFT      # 512 entries
    CHUNK = 1 << CHUNK_SHIFT

    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def _spans(self, first: int, n: int) -> Any:
        i = 0
        while i < n:
            idx = first + i
            k = min(n - i, self.CHUNK - (idx & (self.CHUNK - 1)))
            yield i, idx >> self.CHUNK_SHIFT, idx & (self.CHUNK - 1), k
            i += k

    def store(self, addr: int, entries: np.ndarray) -> None:
        """Write ``entries`` (one per 4 KiB page) from ``addr``; 0 entries clear."""
        for i, key, lo, k in self._spans(addr >> PAGE_SHIFT, len(entries)):
            c = self.chunks.get(key)
            if c is None:
                if not entries[i:i + k].any():
                    continue
                c = self.chunks[key] = np.zeros(self.CHUNK, dtype=np.uint64)
            c[lo:lo + k] = entries[i:i + k]

    def load(self, start: int, end: int) -> np.ndarray:
        """Entries of ``[start, end)`` (0 where empty)."""
        n = (end - start) >> PAGE_SHIFT
        out = np.zeros(n, dtype=np.uint64)
        for i, key, lo, k in self._spans(start >> PAGE_SHIFT, n):
            c = self.chunks.get(key)
            if c is not None:
                out[i:i + k] = c[lo:lo + k]
        return out

    def lookup(self, addr: int) -> int:
        """The entry of the page at ``addr`` (0 when empty)."""
        c = self.chunks.get(addr >> PMD_SHIFT)
        return 0 if c is None else int(c[(addr >> PAGE_SHIFT) & (self.CHUNK - 1)])

    def clear(self, start: int, end: int) -> int:
        """Remove the entries of ``[start, end)``; returns how many there were."""
        first, last = start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        if end <= start:
            return 0
        cleared = 0
        lo_key, hi_key = first >> self.CHUNK_SHIFT, last >> self.CHUNK_SHIFT
        for key in [k for k in self.chunks if lo_key <= k <= hi_key]:
            c = self.chunks[key]
            base = key << self.CHUNK_SHIFT
            lo, hi = max(first - base, 0), min(last - base, self.CHUNK - 1)
            cleared += int(np.count_nonzero(c[lo:hi + 1]))
            c[lo:hi + 1] = 0
        return cleared

    def items(self) -> list[tuple[int, int]]:
        """(address, entry) of every entry in address order (inspection)."""
        out = []
        for key in sorted(self.chunks):
            c = self.chunks[key]
            for lo in np.flatnonzero(c).tolist():
                out.append((((key << self.CHUNK_SHIFT) + lo) << PAGE_SHIFT, int(c[lo])))
        return out

    def __len__(self) -> int:
        return sum(int(np.count_nonzero(c)) for c in self.chunks.values())

    def gc(self) -> int:
        """Drop chunks with no entry; returns the number dropped."""
        empty = [k for k, c in self.chunks.items() if not c.any()]
        for k in empty:
            del self.chunks[k]
        return len(empty)


class HmmMirrorDriver52(HmmMirrorOps):
    """A device driver mirroring one mm with the HMM 5.2 API (ours; the hmm.rst 5.2 pattern).

    ``flags``/``values``/``pfn_shift`` are the driver's encoding of device entries (default: the model's
    suggested encoding, hmm-5.2.md §1.4).  ``update`` is the driver lock of hmm.rst (a mutex).
    ``stats`` counts populate calls, retries (-EAGAIN, invalid after commit check), commits, invalidations
    (and -EAGAIN answers), entries cleared.
    """

    def __init__(self, machine: "Machine", name: str = "mirror52", flags: tuple[int, int, int] = DEFAULT_FLAGS,
                 values: tuple[int, int, int] = DEFAULT_VALUES, pfn_shift: int = DEFAULT_PFN_SHIFT) -> None:
        self.machine = machine
        self.name = name
        self.flags = tuple(flags)
        self.values = tuple(values)
        self.pfn_shift = pfn_shift
        self.update = Lock(f"{name}.update", "mutex")
        self.pt = DevicePageTable52()
        self.mirror = HmmMirror(self, name=name)
        self.mm: MMStruct | None = None
        self.released = False
        self.stats: Counter[str] = Counter()
        self.last_range: HmmRange | None = None

    # -- registration ---------------------------------------------------------------------------------
    def register(self, mm: "MMStruct") -> Gen[int]:
        """hmm_mirror_register() with ``mm.mmap_sem`` held for write, as the 5.2 API requires."""
        yield from sched.down_write(mm.mmap_sem)
        ret = yield from hmm_mirror_register(self.mirror, mm)
        sched.up_write(mm.mmap_sem)
        if ret == 0:
            self.mm = mm
        return ret

    def unregister(self) -> Gen[None]:
        """hmm_mirror_unregister(), then drop every device entry."""
        yield from hmm_mirror_unregister(self.mirror)
        yield from sched.mutex_lock(self.update)
        self.pt.clear(0, 1 << 64)
        sched.mutex_unlock(self.update)

    # -- routine 1: fault / populate ------------------------------------------------------------------
    def make_range(self, start: int, end: int, write: bool) -> HmmRange:
        """Fill ``range.start/end/pfns/flags/values/pfn_shift`` and the request defaults (hmm.rst
        ``default_flags`` section: ``default_flags = VALID [| WRITE]``, ``pfn_flags_mask = 0``)."""
        r = new_range(start, end, PAGE_SHIFT, name=f"{self.name}:{start:#x}", flags=self.flags,  # type: ignore[arg-type]
                      values=self.values, pfn_shift=self.pfn_shift)                          # type: ignore[arg-type]
        r.default_flags = self.flags[HMM_PFN_VALID] | (self.flags[HMM_PFN_WRITE] if write else 0)
        r.pfn_flags_mask = 0
        return r

    def populate(self, start: int, end: int, write: bool = False, mode: str = "fault", block: bool = True,
                 literal: bool = False, range: HmmRange | None = None) -> Gen[int]:  # noqa: A002
        """driver_populate_range() of hmm.rst [5.2]: returns 0 once ``pfns[]`` was committed to the device page
        table under ``driver.update`` with the range valid, else the error (see the module docstring for
        ``literal``).  ``mode``: ``"fault"`` (``hmm_range_fault(range, block)``) or ``"snapshot"``.

        Loop invariant: the device page table is written only while ``update`` is held and the range is
        valid, so no invalidation can have run between the walk and the commit.
        """
        mm = self.mm
        if mm is None:
            return -22
        self.stats["populate"] += 1
        if range is None:
            range = self.make_range(start, end, write)
        self.last_range = range
        ret = yield from hmm_range_register(range, mm, start, end, range.page_shift)
        if ret:
            return ret
        yield from hmm_range_wait_until_valid(range, TIMEOUT_IN_MSEC)      # return value ignored (hmm.rst)
        tries = 0
        while True:                                                         # again:
            tries += 1
            if tries > MAX_POPULATE_RETRIES:
                sched.report("livelock", f"{self.name}: populate({start:#x}) retried {tries - 1} times")
                yield from hmm_range_unregister(range)
                return -16
            yield from sched.down_read(mm.mmap_sem)
            if mode == "snapshot":
                ret = yield from hmm_range_snapshot(range)
            else:
                ret = yield from hmm_range_fault(range, block)
            if (ret != 0) if literal else (ret < 0):
                if literal or mm.mmap_sem.held_by(sched.current()):
                    sched.up_read(mm.mmap_sem)
                if ret == -EAGAIN:
                    # No need to check hmm_range_wait_until_valid() return value on retry we will get proper
                    # error with hmm_range_snapshot()
                    self.stats["retry_eagain"] += 1
                    yield from hmm_range_wait_until_valid(range, TIMEOUT_IN_MSEC)
                    continue                                                # goto again
                yield from hmm_range_unregister(range)
                return ret
            yield from sched.mutex_lock(self.update)
            if not hmm_range_valid(range):
                sched.mutex_unlock(self.update)
                sched.up_read(mm.mmap_sem)
                self.stats["retry_invalid"] += 1
                continue                                                    # goto again
            # Use pfns array content to update device page table
            self.commit(range)
            yield from hmm_range_unregister(range)
            sched.mutex_unlock(self.update)
            sched.up_read(mm.mmap_sem)
            return 0

    def commit(self, range: HmmRange) -> int:  # noqa: A002
        """Write the device page table from ``range.pfns`` (caller holds ``update``): entries with a valid page
        are stored, every other page of the range is cleared.  Returns the number of entries stored."""
        if not self.update.held_by(sched.current()):
            sched.report("driver_lock", f"{self.name}: device page table written without driver.update")
        pfns = range.pfns
        if range.page_shift != PAGE_SHIFT:          # one entry per huge page: expand to 4 KiB pages
            rep = 1 << (range.page_shift - PAGE_SHIFT)
            step = np.arange(rep, dtype=np.uint64) << np.uint64(range.pfn_shift)
            ok = self._valid_mask(range, pfns)
            pfns = np.where(ok[:, None], pfns[:, None] + step[None, :], 0).reshape(-1).astype(np.uint64)
        ok = self._valid_mask(range, pfns)
        entries = np.where(ok, pfns, np.uint64(0)).astype(np.uint64)
        self.pt.store(range.start, entries)
        n = int(ok.sum())
        self.stats["commits"] += 1
        self.stats["entries_committed"] += n
        self.machine.log("hmm52_driver_commit", driver=self.name, start=range.start, end=range.end, entries=n)
        return n

    def _valid_mask(self, range: HmmRange, pfns: np.ndarray) -> np.ndarray:  # noqa: A002
        """hmm_device_entry_to_pfn() != -1, vectorised."""
        ok = (pfns & np.uint64(range.flags[HMM_PFN_VALID])) != 0
        for v in (range.values[HMM_PFN_NONE], range.values[HMM_PFN_ERROR], range.values[HMM_PFN_SPECIAL]):
            ok &= pfns != np.uint64(v)
        return ok

    # -- routine 2: the invalidation callback ---------------------------------------------------------
    def sync_cpu_device_pagetables(self, mirror: HmmMirror, update: HmmUpdate) -> Gen[int]:
        """sync_cpu_device_pagetables(): take ``update`` (trylock and -EAGAIN when not blockable), remove the
        device entries of ``[update.start, update.end)``; 0 once the device no longer maps the range."""
        self.stats["invalidations"] += 1
        if update.blockable:
            yield from sched.mutex_lock(self.update)
        elif not sched.mutex_trylock(self.update):
            self.stats["invalidate_eagain"] += 1
            return -EAGAIN
        n = self.pt.clear(update.start, update.end)
        self.stats["entries_cleared"] += n
        sched.mutex_unlock(self.update)
        self.machine.log("hmm52_driver_invalidate", driver=self.name, start=update.start, end=update.end,
                         blockable=update.blockable, cleared=n)
        return 0

    def release(self, mirror: HmmMirror) -> Gen[None]:
        """release(): the mm is going away; stop mirroring (drop every device entry)."""
        yield from sched.mutex_lock(self.update)
        n = self.pt.clear(0, 1 << 64)
        sched.mutex_unlock(self.update)
        self.released = True
        self.machine.log("hmm52_driver_release", driver=self.name, cleared=n)

    # -- routine 3: optional gc -----------------------------------------------------------------------
    def gc(self) -> Gen[int]:
        """Drop empty device page-table chunks under ``update``; returns how many."""
        yield from sched.mutex_lock(self.update)
        n = self.pt.gc()
        sched.mutex_unlock(self.update)
        return n

    # -- inspection -----------------------------------------------------------------------------------
    def device_pfn(self, addr: int) -> int:
        """The pfn the device maps at ``addr`` (-1 when none)."""
        e = self.pt.lookup(addr)
        return -1 if e == 0 else e >> self.pfn_shift

    def device_entries(self, start: int, end: int) -> list[int]:
        """The device entries of ``[start, end)`` (0 = none), as Python ints."""
        return [int(x) for x in self.pt.load(start, end).tolist()]

    def check_coherent(self) -> list[str]:
        """Ours: every device entry must match the CPU mapping of its address now (same pfn; WRITE only if
        the CPU entry is writable).  Returns the mismatches (empty when coherent)."""
        from hmmirror.arch.x86.fault import leaf_pfn

        bad: list[str] = []
        if self.mm is None:
            return bad
        for addr, e in self.pt.items():
            cpu_pfn = leaf_pfn(self.mm, addr)
            dev_pfn = e >> self.pfn_shift
            if cpu_pfn != dev_pfn:
                bad.append(f"{addr:#x}: device pfn {dev_pfn:#x}, CPU {'none' if cpu_pfn < 0 else hex(cpu_pfn)}")
                continue
            if e & self.flags[HMM_PFN_WRITE]:
                _, _, cpu = self.mm.pt.lookup(addr)
                if not x86.pte_write(cpu):
                    bad.append(f"{addr:#x}: device writable, CPU read-only")
        return bad

