"""Thin adapters: the HMM engineers' drivers behind the simulator's driver interface.

* ``drivers/test_hmm.py`` :class:`Dmirror` ([6.x]): ``populate(start, end, write)``,
  ``invalidate(sub, range, cur_seq)``, ``gc()``, its own numpy device page table (``pfn << 2 | tag``).
* ``drivers/hmm_mirror_v5_2.py`` :class:`HmmMirrorDriver52` ([5.2]): ``register(mm)``, ``populate``,
  ``sync_cpu_device_pagetables(mirror, update)``, ``gc()``, a device page table of 5.2 device entries.

Each adapter keeps a :class:`~hmmirror.sim.driver.DevicePageTable` in step with the driver's own table (its
``store``/``erase`` methods are wrapped on the instance), and routes the driver's notifier callback through
``adapter.invalidate`` so that the simulator sees every delivery.  The drivers themselves are untouched.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.drivers.device_mmu import range_items
from hmmirror.sim.driver import DevicePageTable


def _have(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except ImportError:
        return False


class DmirrorAdapter:
    """lib/test_hmm.c's dmirror (``hmmirror.drivers.test_hmm.Dmirror``) as a simulator driver."""

    name = "dmirror"

    def __init__(self, unit: int = 0) -> None:
        self.unit = unit
        self.closed = False
        self.pt = DevicePageTable()
        self.mm: Any = None
        self.file: Any = None
        self.dm: Any = None
        self._arrays: dict[tuple[int, int], np.ndarray] = {}

    def bind(self, mm: Any) -> Gen[int]:
        from hmmirror.drivers import test_hmm as th

        self.mm = mm
        devs = th.hmm_dmirror_init(mm.machine)
        f = yield from th.dmirror_fops_open(devs[self.unit], mm)
        if isinstance(f, int):
            return f
        self.file = f
        dm = self.dm = f.private_data if getattr(f, "private_data", None) is not None else f.dmirror
        orig_inv = dm.invalidate
        self._orig_invalidate = orig_inv
        dm.invalidate = lambda sub, r, cur_seq: self.invalidate(sub, r, cur_seq)
        pt = dm.pt
        store_range, erase_range, destroy = pt.store_range, pt.erase_range, pt.destroy
        mine = self.pt

        def _store_range(first: int, entries: np.ndarray) -> None:
            store_range(first, entries)
            e = np.asarray(entries, dtype=np.uint64).reshape(-1)
            # one range for the device table (page by page: an entry per page, none for a zero)
            mine.commit_range(first << PAGE_SHIFT, range_items(e >> np.uint64(2),
                                                               (e & np.uint64(3)) == np.uint64(th.DPT_XA_TAG_WRITE),
                                                               e != 0))

        def _erase_range(first: int, last: int) -> int:
            n = erase_range(first, last)
            mine.unmap(first << PAGE_SHIFT, (last + 1) << PAGE_SHIFT)
            return n

        def _destroy() -> None:
            destroy()
            mine.clear()

        pt.store_range, pt.erase_range, pt.destroy = _store_range, _erase_range, _destroy
        return 0

    def invalidate(self, sub: Any, r: Any, cur_seq: int) -> Gen[bool]:
        return (yield from self._orig_invalidate(sub, r, cur_seq))

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        return (yield from self.dm.populate(start, end, write))

    def fault_mode(self, start: int, end: int, write: bool, mode: str, job: dict[str, Any]) -> Gen[int]:
        """The other [6.x] API modes, each the hmm.rst loop (``mmu_interval_read_begin`` -> ``hmm_range_fault``
        under the mmap read lock -> driver lock + ``mmu_interval_read_retry``) around a different request:

        * ``snapshot``: no request (``default_flags = 0``): what is mapped now, nothing faulted; the valid
          entries are programmed (a driver prefetching what the CPU has);
        * ``fault_perpage``: ``pfn_flags_mask = REQ_FAULT|REQ_WRITE``, per-page requests (some pages read,
          some write, some nothing: :func:`request_pattern`); valid entries are programmed;
        * ``fault_reuse``: the same, the ``hmm_pfns`` array of the previous call on that range reused (a
          driver keeping its array), its requests written again before every pass -- an entry left as the
          previous call's output would be read as a request (``hmm_range_input``, I4: a stale pfn array);
        * ``fault_noowner``: dmirror's whole-range fault with ``dev_private_owner = NULL``.
        """
        from hmmirror.drivers import test_hmm as th
        from hmmirror.mm.hmm import modern as hmm

        dm = self.dm
        mm = dm.mm
        if mode in ("migrate_dev", "migrate_sys", "exclusive"):
            return (yield from self._device_memory(start, end, mode))
        if not th.mmget_not_zero(mm):
            return 0
        try:
            npages = (end - start) >> PAGE_SHIFT
            owner: Any = dm.mdevice
            req = None
            if mode == "snapshot":
                pfns, dflt, mask = np.zeros(npages, dtype=np.uint64), 0, 0
            elif mode == "fault_noowner":
                pfns = np.zeros(npages, dtype=np.uint64)
                dflt, mask, owner = hmm.HMM_PFN_REQ_FAULT | (hmm.HMM_PFN_REQ_WRITE if write else 0), 0, None
            else:
                key = _reuse_key(start, end)
                old = self._arrays.get(key) if mode == "fault_reuse" else None
                req = request_pattern(npages, write, int(job.get("pattern", 0)), hmm.HMM_PFN_REQ_FAULT,
                                      hmm.HMM_PFN_REQ_WRITE)
                pfns = old if old is not None and len(old) == npages else req.copy()
                dflt, mask = 0, hmm.HMM_PFN_REQ_FAULT | hmm.HMM_PFN_REQ_WRITE
                self._arrays[key] = pfns
            rng = hmm.HmmRange(dm.notifier, start, end, pfns, pfn_flags_mask=mask, default_flags=dflt,
                               dev_private_owner=owner)
            if mode == "fault_noowner":
                return (yield from dm.range_fault(rng))
            return (yield from self._loop(rng, req))
        finally:
            yield from th.mmput(mm)

    def _device_memory(self, start: int, end: int, mode: str) -> Gen[int]:
        """The device-memory jobs, as hmm-tests.c issues them: HMM_DMIRROR_MIGRATE_TO_DEV (``migrate_dev``),
        HMM_DMIRROR_MIGRATE_TO_SYS (``migrate_sys``), HMM_DMIRROR_EXCLUSIVE (``exclusive``) of ``[start, end)``;
        the read-back goes to a buffer of the job's own."""
        from hmmirror.drivers import test_hmm as th

        dm = self.dm
        n = (end - start) >> PAGE_SHIFT
        cmd = th.HmmDmirrorCmd(addr=start, ptr=bytearray(n << PAGE_SHIFT), npages=n)
        if mode == "migrate_dev":
            return (yield from dm.dmirror_migrate_to_device(cmd, dm.mm))
        if mode == "migrate_sys":
            return (yield from dm.dmirror_migrate_to_system(cmd, dm.mm))
        return (yield from dm.dmirror_exclusive(cmd, dm.mm))

    def evict(self) -> Gen[int]:
        """Device memory pressure: every chunk of the device evicted to system memory
        (dmirror_device_evict_chunk: migrate_device_range, the driver not knowing where pages are mapped)."""
        dev = self.dm.mdevice if self.dm is not None else None
        if dev is None:
            return -2
        for chunk in list(dev.devmem_chunks):
            yield from dev.dmirror_device_evict_chunk(chunk)
        return 0

    def _loop(self, rng: Any, req: Any = None) -> Gen[int]:
        """IntervalNotifierDriver.range_fault with a commit of the valid entries only (requests may leave pages out);
        the per-page requests ``req`` are written into the array before every pass (after a failed pass the
        array holds outputs, which must not be read as requests).  Bounded as dmirror_range_fault() is: -EBUSY
        once ``time_after(jiffies, timeout)`` with ``timeout`` = the first pass + HMM_RANGE_DEFAULT_TIMEOUT
        (or after ``max_retries`` passes when the clock stands still)."""
        from hmmirror.drivers.test_hmm import DMIRROR_RANGE_FAULT_TIMEOUT, DPT_XA_TAG_WRITE
        from hmmirror.kernel.time import jiffies, msecs_to_jiffies, time_after
        from hmmirror.mm.hmm import modern as hmm
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin, mmu_interval_read_retry

        dm = self.dm
        mm = dm.mm
        machine = mm.machine
        timeout = jiffies(machine) + msecs_to_jiffies(DMIRROR_RANGE_FAULT_TIMEOUT)
        for _ in range(dm.max_retries + 1):
            if time_after(jiffies(machine), timeout):
                break
            if req is not None:
                rng.hmm_pfns[:len(req)] = req
            rng.notifier_seq = yield from mmu_interval_read_begin(rng.notifier)
            yield from sched.down_read(mm.mmap_sem)
            ret = yield from hmm.hmm_range_fault(rng)
            sched.up_read(mm.mmap_sem)
            if ret:
                if ret == -EBUSY:
                    continue
                return ret
            yield from sched.mutex_lock(dm.mutex)
            if mmu_interval_read_retry(rng.notifier, rng.notifier_seq):
                sched.mutex_unlock(dm.mutex)
                continue
            first = rng.start >> PAGE_SHIFT
            for k, e in enumerate(rng.hmm_pfns.tolist()):
                if e & hmm.HMM_PFN_VALID and not e & hmm.HMM_PFN_ERROR:
                    tag = DPT_XA_TAG_WRITE if e & hmm.HMM_PFN_WRITE else 0
                    dm.pt.store_range(first + k, np.array([(hmm.hmm_pfn_to_pfn(e) << 2) | tag], dtype=np.uint64))
            sched.mutex_unlock(dm.mutex)
            return 0
        machine.counters["dmirror_timeouts"] += 1
        return -EBUSY

    def gc(self) -> Gen[Any]:
        return (yield from self.dm.gc())

    @property
    def owner(self) -> Any:
        """dmirror's ``pgmap->owner`` / ``dev_private_owner``: its device."""
        return self.dm.mdevice if self.dm is not None else None

    def device_alias(self, pfn: int) -> int:
        """What dmirror's page table holds for one of its device-private pages: the backing system page
        (BACKING_PAGE); -1 for any other pfn."""
        dev = self.dm.mdevice if self.dm is not None else None
        if dev is None or dev.chunk_of(pfn) is None:
            return -1
        return int(dev.backing_page(pfn))

    def unbind(self) -> Gen[None]:
        if self.closed:                      # released once (a close and an unbind event may both come)
            return
        self.closed = True
        if self.file is not None:
            yield from self.file.fops_release()
            self.file = None
        self.closed_logged = True
        self.mm.machine.log("sim_driver_closed", driver=self.name)


class Hmm52Adapter:
    """The hmm.rst [5.2] driver (``hmmirror.drivers.hmm_mirror_v5_2.HmmMirrorDriver52``) as a simulator driver."""

    name = "mirror52"

    def __init__(self, literal: bool = False) -> None:
        self.literal = literal
        self.closed = False
        self.pt = DevicePageTable()
        self._ranges: dict[tuple[int, int], Any] = {}
        self.mm: Any = None
        self.drv: Any = None

    def bind(self, mm: Any) -> Gen[int]:
        from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52
        from hmmirror.mm.hmm.v5_2 import HMM_PFN_VALID, HMM_PFN_WRITE

        self.mm = mm
        drv = self.drv = HmmMirrorDriver52(mm.machine)
        self._orig_sync = drv.sync_cpu_device_pagetables
        drv.sync_cpu_device_pagetables = lambda mirror, update: self.invalidate(mirror, update)
        pt, mine = drv.pt, self.pt
        store, clear = pt.store, pt.clear
        shift, fvalid, fwrite = drv.pfn_shift, drv.flags[HMM_PFN_VALID], drv.flags[HMM_PFN_WRITE]

        def _store(addr: int, entries: np.ndarray) -> None:
            store(addr, entries)
            e = np.asarray(entries, dtype=np.uint64).reshape(-1)
            # one range for the device table (page by page: a valid entry is mapped, any other cleared)
            mine.commit_range(addr, range_items(e >> np.uint64(shift), (e & np.uint64(fwrite)) != 0,
                                                (e & np.uint64(fvalid)) != 0))

        def _clear(start: int, end: int) -> int:
            n = clear(start, end)
            mine.unmap(start, end)
            return n

        pt.store, pt.clear = _store, _clear
        return (yield from drv.register(mm))

    def invalidate(self, mirror: Any, update: Any) -> Gen[int]:
        return (yield from self._orig_sync(mirror, update))

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        return (yield from self.drv.populate(start, end, write, literal=self.literal))

    def fault_mode(self, start: int, end: int, write: bool, mode: str, job: dict[str, Any]) -> Gen[int]:
        """The other [5.2] API modes through the hmm.rst loop (``hmm_range_register``,
        ``hmm_range_wait_until_valid``, snapshot/fault under ``mmap_sem``, ``driver.update`` +
        ``hmm_range_valid``, commit):

        * ``fault_nonblock``: ``hmm_range_fault(range, block=false)``;
        * ``snapshot``: ``hmm_range_snapshot`` (no fault; whatever it wrote is committed);
        * ``fault_perpage``: ``default_flags = 0``, ``pfn_flags_mask = VALID|WRITE`` and per-page requests in
          ``pfns`` (:func:`request_pattern`);
        * ``fault_reuse``: the same, with the ``pfns`` array of the previous call on that range reused without
          re-initialisation (its output entries are read as requests, as a driver keeping its array does);
        * ``fault_huge`` / ``snapshot_huge``: ``page_shift`` = the hugetlb page shift of the VMA at ``start``
          (one ``pfns`` entry per huge page).
        """
        from hmmirror.mm.hmm.v5_2 import HMM_PFN_VALID, HMM_PFN_WRITE, new_range

        drv = self.drv
        if mode == "fault_nonblock":
            return (yield from drv.populate(start, end, write, block=False, literal=self.literal))
        if mode == "snapshot":
            return (yield from drv.populate(start, end, write, mode="snapshot", literal=self.literal))
        if mode in ("fault_huge", "snapshot_huge"):
            vma = self.mm.find_vma(start) if self.mm is not None else None
            shift = PAGE_SHIFT
            if vma is not None and vma.vm_start <= start:
                from hmmirror.include.mm_types import VM
                from hmmirror.mm.pagewalk_v5_2 import huge_page_shift_of
                if vma.vm_flags & VM.HUGETLB:
                    shift = huge_page_shift_of(vma)
            r = new_range(start, end, shift, name=f"{drv.name}:{start:#x}", flags=drv.flags,  # type: ignore[arg-type]
                          values=drv.values, pfn_shift=drv.pfn_shift)                        # type: ignore[arg-type]
            r.default_flags = drv.flags[HMM_PFN_VALID] | (drv.flags[HMM_PFN_WRITE] if write else 0)
            return (yield from drv.populate(start, end, write, mode="snapshot" if mode == "snapshot_huge"
                                            else "fault", literal=self.literal, range=r))
        if mode in ("fault_perpage", "fault_reuse"):
            key = _reuse_key(start, end)
            r = self._ranges.get(key) if mode == "fault_reuse" else None
            if r is None:
                r = drv.make_range(start, end, write)
                r.pfns[:] = request_pattern(r.pfns.shape[0], write, int(job.get("pattern", 0)),
                                            drv.flags[HMM_PFN_VALID], drv.flags[HMM_PFN_WRITE])
            r.default_flags = 0
            r.pfn_flags_mask = drv.flags[HMM_PFN_VALID] | drv.flags[HMM_PFN_WRITE]
            self._ranges[key] = r
            return (yield from drv.populate(start, end, write, literal=self.literal, range=r))
        return (yield from drv.populate(start, end, write, literal=self.literal))

    def gc(self) -> Gen[Any]:
        return (yield from self.drv.gc())

    def unbind(self) -> Gen[None]:
        if self.closed:
            return
        self.closed = True
        yield from self.drv.unregister()
        self.closed_logged = True
        self.mm.machine.log("sim_driver_closed", driver=self.name)


class Hmm52LiteralAdapter(Hmm52Adapter):
    """The [5.2] driver run exactly as Documentation/vm/hmm.rst prints the loop (``literal=True``)."""

    name = "mirror52-literal"

    def __init__(self) -> None:
        super().__init__(literal=True)


def _reuse_key(start: int, end: int) -> tuple[str, int, int]:
    """What a reused request array (6.x ``hmm_pfns``) or range (5.2 ``struct hmm_range`` with its ``pfns``)
    belongs to: the device task that made it and the range.  A driver keeps its array per device context; two
    device tasks faulting the same range at the same time each have their own (sharing one 5.2 range would let
    one task's ``hmm_range_unregister`` clear ``range->hmm`` under the other's ``hmm_range_fault``)."""
    cur = sched.current()
    return (getattr(cur, "name", ""), start, end)


def request_pattern(npages: int, write: bool, pattern: int, valid: int, wbit: int) -> np.ndarray:
    """Per-page requests of a job (ours): every page asks for VALID; with ``pattern & 1`` every third page
    asks for nothing; a write job asks for WRITE on every page, or (``pattern & 2``) on even pages only;
    ``pattern & 4`` reverses which pages are skipped."""
    k = np.arange(npages)
    skip = (k % 3 == (0 if pattern & 4 else 2)) if pattern & 1 else np.zeros(npages, dtype=bool)
    wr = np.full(npages, bool(write)) & ((k % 2 == 0) if pattern & 2 else True)
    out = np.where(wr, np.uint64(valid | wbit), np.uint64(valid))
    out[skip] = 0
    return out.astype(np.uint64)


EBUSY = 16


def dmirror_driver(probe: bool = False) -> Any:
    if probe:
        return _have("hmmirror.drivers.test_hmm")
    return DmirrorAdapter()


def hmm52_driver(probe: bool = False) -> Any:
    if probe:
        return _have("hmmirror.drivers.hmm_mirror_v5_2")
    return Hmm52Adapter()
