"""Driver-side invariants of device-memory.md that the mirror checks of :mod:`hmmirror.sim.invariants` do not
cover, each a small instrument (installed by ``default_invariants``).

| name | # | guarantee |
|---|---|---|
| ``device_reach`` | I2 | when an invalidate callback returns true, the device can no longer reach any page of the range it covers: no device PTE, no TLB entry, no DMA mapping (a driver may leave its own migration / exclusive events alone) |
| ``notifier_mmput`` | I3 | no notifier callback drops the last reference of an mm (its teardown would run inside the invalidation) |
| ``hmm_range_input`` | I4 | every input bit ``hmm_range_fault`` reads is defined: ``default_flags`` and ``pfn_flags_mask`` were set, and with a mask every entry was written as a request since the array was allocated or last returned; and a device fault does not fail where the CPU mapping allows the access |
| ``migrate_to_ram`` | I7 | a device-private page's ``migrate_to_ram(vmf)`` names the faulting page (``fault_page = vmf->page``) in the migration it starts |
| ``device_page_reuse`` | I6 | ``zone_device_page_init`` only on a free device page (refcount 0): the model's report, named here |
| ``retry_bound`` | I5 | a driver fault stops calling ``hmm_range_fault`` once it has retried for ``3 * HMM_RANGE_DEFAULT_TIMEOUT`` of virtual time, whatever keeps the range busy |
| ``teardown`` | I10 | once the driver was closed: it reaches nothing, no work item of it is pending, and afterwards no callback, work item or device commit of it runs; at the end of a run every mm reference it took was dropped |

Virtual time is ``machine.jiffies`` (one tick, 1 ms, per simulator step: :mod:`hmmirror.kernel.time`).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.mm.page_alloc import PG
from hmmirror.sim.findings import frame_stack
from hmmirror.sim.invariants import Tracker, committer_frame

HMM_RANGE_DEFAULT_TIMEOUT = 1000          # ms (include/linux/hmm.h)


def _fn_location(fn: Any) -> str:
    """``module.Class.method`` of a (bound) function, as finding locations are written."""
    f = getattr(fn, "__func__", fn)
    mod = getattr(f, "__module__", "") or ""
    if mod.startswith("hmmirror."):
        mod = mod[len("hmmirror."):]
    return f"{mod}.{getattr(f, '__qualname__', getattr(f, '__name__', '?'))}"


def _callback_args(args: tuple[Any, ...]) -> tuple[int, int, Any, Any, Any]:
    """``(start, end, event, owner, notifier)`` of a driver callback's arguments (any profile's shape)."""
    start, end, event, owner, sub = 0, 0, None, None, None
    for a in args:
        if hasattr(a, "start") and hasattr(a, "end") and not hasattr(a, "last"):
            start, end = int(a.start), int(a.end)
            event = getattr(a, "event", None)
            raw = getattr(a, "raw", None)
            owner = getattr(raw if raw is not None else a, "owner", None)
            s = getattr(a, "sub", None)
            if s is not None and hasattr(s, "last"):
                sub = s
        elif hasattr(a, "last") and hasattr(a, "start"):
            sub = a
    return start, end, event, owner, sub


# --- I2 ----------------------------------------------------------------------------------------------------
class DeviceReach:
    """``device_reach`` (I2): a callback that returned true left nothing of its range reachable by the device."""

    name = "device_reach"

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.driver: Any = None
        self.engine: Any = None
        self.where = "-"

    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.driver = run.driver
        self.where = _fn_location(getattr(self.t, "orig_invalidate", None) or run.driver.invalidate)
        self.t.callback_end.append(self.on_callback_end)

    def on_callback_end(self, st: Any, args: tuple[Any, ...], ret: Any) -> None:
        told = ret is True or (type(ret) is int and ret == 0)
        if not told or self.engine.finding is not None:
            return
        pt = getattr(self.driver, "pt", None)
        if pt is None or not hasattr(pt, "reaches"):
            return
        start, end, event, owner, sub = _callback_args(args)
        if event in (MMU_NOTIFY.MIGRATE, MMU_NOTIFY.EXCLUSIVE) and owner is not None \
                and owner is getattr(self.driver, "owner", None):
            return                     # the driver's own migration / exclusive access: it may keep its entries
        if sub is not None:
            start, end = max(start, sub.start), min(end, sub.last + 1)
        if start >= end:
            return
        left = pt.reaches(start, end)
        if left:
            how, va, pfn = left[0]
            what = {"pte": "a device PTE", "tlb": "a device TLB entry (no TLB flush)",
                    "dma": "a DMA mapping (no dma_unmap)"}[how]
            self.engine.violate(
                self.name, f"the invalidate callback of {start:#x}-{end:#x} "
                f"({getattr(event, 'name', event)}) returned true, but the device still reaches {va:#x} "
                f"(pfn {pfn:#x}) through {what}", st=st, mm=getattr(self.driver, "mm", None), addr=va,
                location=self.where, state={"left": [(h, hex(v), hex(p)) for h, v, p in left[:8]]})


# --- I3 ----------------------------------------------------------------------------------------------------
class NotifierMmput:
    """``notifier_mmput`` (I3): the last reference of an mm is never dropped inside a notifier callback."""

    name = "notifier_mmput"
    CALLBACK_FRAME = "_call_atomic_aware"      # mm/mmu_notifier.py runs every callback through it

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"invalidate_range_start"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        # exit_mmap() begins with the RELEASE invalidation of the whole address space (interval notifiers)
        # and unmaps it with one UNMAP invalidation of [0, ULONG_MAX): either is the teardown starting
        if ev["what"] != "invalidate_range_start" or ev.get("start") != 0 or \
                ev.get("event") not in ("RELEASE", "UNMAP"):
            return
        f = sys._getframe(1)
        in_mmput = inside = False
        g = f
        while g is not None:
            name = g.f_code.co_name
            if name == "__mmput":
                in_mmput = True
            elif in_mmput and name == self.CALLBACK_FRAME and g.f_code.co_filename.endswith("mmu_notifier.py"):
                inside = True
                break
            g = g.f_back
        if not inside:
            return
        stack = frame_stack(f)
        loc = None
        for i, s in enumerate(stack):
            if f".{self.CALLBACK_FRAME}:" in s:
                for s2 in stack[i + 1:]:
                    if not s2.startswith(("mm.", "kernel.")):
                        loc = s2.rsplit(":", 1)[0]
                        break
                break
        eng.violate(self.name, f"the last reference of {ev.get('mm')} was dropped inside a notifier callback: "
                    "the address space would be torn down (exit_mmap, mmu_notifier_release) inside an "
                    "invalidation of itself", stack=stack, location=loc)


# --- I4 ----------------------------------------------------------------------------------------------------
class HmmRangeInput:
    """``hmm_range_input`` (I4): the request of every ``hmm_range_fault`` is defined, and a device fault fails
    only where the CPU could not make the access either."""

    name = "hmm_range_input"
    #: bits an entry may carry as a request: REQ_FAULT, REQ_WRITE and the sticky DMA flags
    REQ_BITS = (1 << 63) | (1 << 62) | (1 << 60) | (1 << 59) | (1 << 58)
    #: the errors that say "the CPU mapping does not allow this access" (-EFAULT, -EPERM, -EACCES, -EINVAL)
    #: or "the range kept changing" (-EBUSY, -EAGAIN); others (-ENOMEM, -EIO, -ENODEV, ...) are the
    #: device's own and not judged
    CPU_REFUSALS = (-14, -1, -13, -22, -16, -11)

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.last_out: dict[int, tuple[Any, Any]] = {}     # id(array) -> (weakref, copy of its outputs)
        self.begin: dict[int, tuple[int, int, Any]] = {}   # task idx -> (step, epoch, vma layout)
        self.mm: Any = None
        self.driver: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.driver = run.driver
        self.mm = getattr(run.driver, "mm", None) or run.procs[run.scenario.mirror].mm

    # -- the request --
    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"hmm_range_fault_begin", "hmm_range_fault"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what == "hmm_range_fault_begin":
            rng = sys._getframe(2).f_locals.get("range")
            if rng is not None and hasattr(rng, "hmm_pfns"):
                self._check_request(eng, rng)
        elif what == "hmm_range_fault":
            rng = sys._getframe(2).f_locals.get("range")
            arr = getattr(rng, "hmm_pfns", None)
            if arr is not None and hasattr(arr, "copy"):
                n = max((rng.end - rng.start) >> 12, 0)
                try:
                    self.last_out[id(arr)] = (weakref.ref(arr), arr[:n].copy())
                except TypeError:
                    pass
                if len(self.last_out) > 256:
                    self.last_out = {k: v for k, v in self.last_out.items() if v[0]() is not None}

    def _check_request(self, eng: Any, rng: Any) -> None:
        from hmmirror.mm.slab import is_poison

        for field in ("default_flags", "pfn_flags_mask"):
            v = getattr(rng, field, None)
            if v is None or not isinstance(v, (int,)) and not hasattr(v, "__index__"):
                self._violate(eng, rng, f"hmm_range_fault called with {field} = {v!r} (never set)")
                return
            if is_poison(int(v)):
                self._violate(eng, rng, f"hmm_range_fault called with an uninitialised {field} "
                              f"({int(v):#x}: allocation poison)")
                return
        mask = int(rng.pfn_flags_mask)
        if not mask:
            return                                 # the per-page inputs are not read
        arr = rng.hmm_pfns
        n = max((rng.end - rng.start) >> 12, 0)
        prev = self.last_out.get(id(arr))
        old = prev[1] if prev is not None and prev[0]() is arr else None
        for i in range(min(n, len(arr))):
            e = int(arr[i])
            if is_poison(e):
                self._violate(eng, rng, f"hmm_range_fault reads the request of page {rng.start + i * PAGE_SIZE:#x} "
                              f"(pfn_flags_mask {mask:#x}) from an entry nobody wrote ({e:#x}: allocation "
                              "poison)", addr=rng.start + i * PAGE_SIZE)
                return
            if old is not None and i < len(old) and e == int(old[i]) and e & ~self.REQ_BITS:
                self._violate(eng, rng, f"hmm_range_fault reads the request of page {rng.start + i * PAGE_SIZE:#x} "
                              f"(pfn_flags_mask {mask:#x}) from the previous call's output {e:#x} (a stale pfn "
                              "array: the driver did not write its requests again)", addr=rng.start + i * PAGE_SIZE)
                return

    def _violate(self, eng: Any, rng: Any, msg: str, addr: int | None = None) -> None:
        stack = frame_stack(sys._getframe(3))
        loc = stack[-2].rsplit(":", 1)[0] if len(stack) >= 2 else None
        eng.violate(self.name, msg, stack=stack, location=loc, addr=addr if addr is not None else rng.start,
                    state={"default_flags": hex(int(rng.default_flags)) if isinstance(rng.default_flags, int)
                           else repr(rng.default_flags), "pfn_flags_mask": repr(rng.pfn_flags_mask)})

    # -- the outcome --
    def _layout(self, start: int, end: int) -> Any:
        mm = self.mm
        out = []
        for vma in mm.vmas:
            if vma.vm_end > start and vma.vm_start < end:
                out.append((vma.vm_start, vma.vm_end, int(vma.vm_flags), id(vma)))
        return tuple(out)

    def fault_begin(self, eng: Any, st: Any, start: int, end: int, write: bool) -> None:
        mmn = self.mm.name
        self.begin[st.idx] = (eng.step, self.t.epoch.get(mmn, 0) - len(self.t.inflight.get(mmn, ())),
                              self._layout(start, end))

    def cpu_allows(self, start: int, end: int, write: bool) -> bool:
        """Would the CPU's own access succeed?  Anonymous, shmem and file mappings with the permission, and
        no hwpoisoned page, neither a hwpoison entry nor a poisoned page its fault would find in the page
        cache (device-backed mappings can fail for reasons of their own: not judged); never in an
        address space the OOM reaper marked unstable (check_stable_address_space)."""
        mm = self.mm
        if getattr(mm, "unstable", False):
            return False               # MMF_UNSTABLE (OOM-reaped): the CPU's own fault gets SIGBUS too
        need = VM.READ | (VM.WRITE if write else 0)
        va = start
        while va < end:
            vma = mm.vma_lookup(va)
            if vma is None or vma.vm_start > va or (int(vma.vm_flags) & need) != need:
                return False
            if vma.vm_flags & (VM.IO | VM.PFNMAP | VM.HUGETLB) or getattr(vma, "kind", "anon") not in \
                    ("anon", "shmem", "file"):
                return False
            level, p, e = mm.pt.lookup(va)
            if p is not None and not x86.pte_none(e) and not e & x86._PAGE_PRESENT and level == "pte":
                try:
                    if x86.is_hwpoison_entry(x86.pte_to_swp_entry(e)):
                        return False
                except Exception:                       # noqa: BLE001 - an entry type without swp decoding
                    pass
            if (p is None or x86.pte_none(e)) and self._cache_page_poisoned(vma, va):
                return False
            va += PAGE_SIZE
        return True

    def _cache_page_poisoned(self, vma: Any, va: int) -> bool:
        """Is ``va`` unmapped over a page-cache page memory_failure poisoned?  The CPU's fault finds it (shmem
        keeps a poisoned page in its cache: shmem_error_remove_folio) and __do_fault() returns VM_FAULT_HWPOISON
        (mm/memory.c [6.x]): SIGBUS, as hmm_range_fault's -EFAULT."""
        inode = getattr(vma.vm_file, "inode", None) if vma.vm_file is not None else None
        mapping = getattr(inode, "i_mapping", None)
        if mapping is None or not hasattr(mapping, "find_page"):
            return False
        pfn = mapping.find_page(vma.linear_page_index(va))
        return pfn >= 0 and bool(int(self.mm.machine.mem.flags[pfn]) & int(PG.hwpoison))

    def fault_end(self, eng: Any, st: Any, start: int, end: int, write: bool, ret: int) -> None:
        if not isinstance(ret, int) or ret not in self.CPU_REFUSALS:
            return
        if not str(getattr(eng, "fault_modes", {}).get(st.idx, "fault")).startswith(("fault", "driver")):
            return                     # device-memory jobs (migrate, exclusive) may fail for device reasons
        b = self.begin.get(st.idx)
        mm, drv = self.mm, self.driver
        if b is None or mm.exited or mm.mm_users <= 0 or getattr(drv, "closed", False):
            return
        if not mm.machine.profile.interval_notifiers:
            return                     # [5.2] HMM itself refuses valid mappings (special / zero PTEs): not judged
        mmn = mm.name
        if self.t.epoch.get(mmn, 0) != b[1] or self.t.inflight.get(mmn):
            return                                     # an invalidation ran: the CPU mapping may have changed
        if self._layout(start, end) != b[2] or not self.cpu_allows(start, end, write):
            return
        eng.violate(self.name, f"device {'write' if write else 'read'} fault of {start:#x}-{end:#x} failed "
                    f"with {ret} although the CPU mapping allows the access and nothing changed it meanwhile",
                    st=st, mm=mm, addr=start, location=_fn_location(getattr(drv, "fault")),
                    state={"ret": ret})


# --- I5 ----------------------------------------------------------------------------------------------------
class RetryBound:
    """``retry_bound`` (I5): a driver fault gives up retrying after a bounded time, even under sustained
    invalidation.

    The clock runs from the fault's first ``hmm_range_fault`` call.  A driver that handles a device fault one
    address at a time (drm_gpusvm: ``xe_svm_handle_pagefault(vm, vma, gt, fault_addr)`` per GPU fault; a
    simulator job over many ranges is a series of them) logs ``device_fault_begin`` with the address: the
    first time the job reaches an address it is progress, not a retry, and the clock restarts there.  The
    same address again (the driver retrying it) keeps the clock running."""

    name = "retry_bound"
    LIMIT = 3 * HMM_RANGE_DEFAULT_TIMEOUT          # jiffies after the fault's first hmm_range_fault call

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.late: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.frames: dict[int, list[Any]] = {}      # task idx -> the driver frames of its latest late call
        self.addrs: dict[int, set[int]] = {}        # task idx -> the fault addresses its job has begun
        self.machine: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.machine = run.machine

    def fault_begin(self, eng: Any, st: Any, start: int, end: int, write: bool) -> None:
        self.first.pop(st.idx, None)
        self.late[st.idx] = 0
        self.calls[st.idx] = 0
        self.addrs[st.idx] = set()
        self.frames.pop(st.idx, None)

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"hmm_range_fault_begin", "device_fault_begin"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what == "device_fault_begin":
            st = eng.current
            if st is not None and st.kind == "device" and st.idx in self.calls:
                seen = self.addrs.setdefault(st.idx, set())
                if ev["addr"] not in seen:                  # a new address of the job: progress
                    seen.add(ev["addr"])
                    self.first.pop(st.idx, None)
                    self.late[st.idx] = 0
                    self.calls[st.idx] = 0
                    self.frames.pop(st.idx, None)
            return
        if what != "hmm_range_fault_begin":
            return
        st = eng.current
        if st is None or st.kind != "device" or st.idx not in self.calls:
            return
        now = self.machine.jiffies
        self.calls[st.idx] += 1
        first = self.first.setdefault(st.idx, now)
        if now - first <= self.LIMIT:
            return
        self.late[st.idx] += 1
        frames = _model_frames(sys._getframe(2))
        prev = self.frames.get(st.idx)
        self.frames[st.idx] = frames
        if self.late[st.idx] < 2 or prev is None:
            return                                     # one call may start late: the timeout is checked before it
        # the loop that keeps calling is the innermost frame both calls were made from (inner frames are new)
        same = [f for f in frames if any(f is g for g in prev)]
        stack = frame_stack(sys._getframe(2))
        if same:
            from hmmirror.sim.findings import describe_frame
            loc = describe_frame(same[-1]).rsplit(":", 1)[0]
        else:
            loc = stack[-2].rsplit(":", 1)[0] if len(stack) >= 2 else None
        eng.violate(self.name, f"{st.name}'s driver fault is still calling hmm_range_fault {now - first} ms after "
                    f"its first call ({self.calls[st.idx]} calls): a retry loop must give up after "
                    f"HMM_RANGE_DEFAULT_TIMEOUT ({HMM_RANGE_DEFAULT_TIMEOUT} ms)", st=st, stack=stack,
                    location=loc, state={"calls": self.calls[st.idx], "elapsed_ms": now - first})


def _model_frames(frame: Any) -> list[Any]:
    """The live frames outside the simulator, outermost first."""
    out = []
    f = frame
    while f is not None:
        fn = f.f_code.co_filename.replace("\\", "/")
        if fn.endswith("/hmmirror/sim/engine.py") and f.f_code.co_name == "_loop":
            break
        if "/hmmirror/sim/" not in fn:
            out.append(f)
        f = f.f_back
    out.reverse()
    return out


# --- I7 ----------------------------------------------------------------------------------------------------
class MigrateToRam:
    """``migrate_to_ram`` (I7): a device-private page's ``migrate_to_ram(vmf)`` migrates the faulting page:
    every ``migrate_vma_setup`` it makes over the faulting address names ``vmf->page`` as ``fault_page``."""

    name = "migrate_to_ram"
    FAULT_FRAME = "do_swap_page_device_private"   # mm/memory.py: do_swap_page's device-private branch

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"migrate_vma_setup"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        if ev["what"] != "migrate_vma_setup":
            return
        f = sys._getframe(1)
        vmf = None
        while f is not None:
            if f.f_code.co_name == self.FAULT_FRAME:
                vmf = f.f_locals.get("vmf")
                break
            f = f.f_back
        if vmf is None or not (ev.get("start", 0) <= vmf.address < ev.get("end", 0)):
            return
        page = int(getattr(vmf, "page", -1))
        if int(ev.get("fault_page", -1)) == page:
            return
        stack = frame_stack(sys._getframe(1))
        loc = None
        for i, s_ in enumerate(stack):
            if f".{self.FAULT_FRAME}:" in s_:
                # the driver routine that started the migration: its innermost frame below the fault
                drv = [x.rsplit(":", 1)[0] for x in stack[i + 1:] if not x.startswith(("mm.", "kernel."))]
                loc = drv[-1] if drv else None
                break
        eng.violate(self.name, f"migrate_to_ram of device page {page:#x} (CPU fault at {vmf.address:#x}) called "
                    f"migrate_vma_setup with fault_page {int(ev.get('fault_page', -1)):#x}: the page do_swap_page "
                    "locked is not collected, the fault cannot make progress", stack=stack, location=loc,
                    addr=vmf.address, state={"fault_page": ev.get("fault_page"), "vmf_page": page})


# --- I10 ---------------------------------------------------------------------------------------------------
class Teardown:
    """``teardown`` (I10): a closed driver reaches nothing, has no work pending, and nothing of it runs later."""

    name = "teardown"

    def __init__(self, tracker: Tracker) -> None:
        self.t = tracker
        self.driver: Any = None
        self.engine: Any = None
        self.closed_at: int | None = None
        self.mm: Any = None

    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.driver = run.driver
        self.mm = getattr(run.driver, "mm", None)
        self.t.commit_hooks.append(self.on_commit)
        self.t.callback_begin.append(self.on_callback)

    def _wqs(self) -> list[Any]:
        return list(getattr(self.driver, "workqueues", None) or ())

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"sim_driver_closed", "work_start"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        what = ev["what"]
        if what == "sim_driver_closed":            # a driver's unbind() completed (whichever event ran it)
            if not getattr(self.driver, "closed_logged", False) or self.closed_at is not None:
                return                             # another driver's (notifier_churn's second mirror)
            self.closed_at = eng.step
            pt = getattr(self.driver, "pt", None)
            if pt is not None and hasattr(pt, "reaches"):
                left = pt.reaches(0, 1 << 64)
                if left:
                    how, va, pfn = left[0]
                    eng.violate(self.name, f"the driver was closed but its device still reaches {va:#x} "
                                f"(pfn {pfn:#x}) through its {how}", addr=va, mm=self.mm,
                                location=_fn_location(getattr(self.driver, "unbind")),
                                state={"left": [(h, hex(v), hex(p)) for h, v, p in left[:8]]})
                    return
            mine = [w for w in getattr(self.driver, "works", None) or () if w.pending or w.running is not None]
            for wq in self._wqs():
                mine += list(wq.worklist) + list(wq.running)
            if mine:
                w = mine[0]
                eng.violate(self.name, f"the driver was closed with work item {w.name} still "
                            f"{'pending' if w.pending else 'running'}",
                            location=_fn_location(getattr(self.driver, "unbind")))
                return
        elif what == "work_start" and self.closed_at is not None:
            names = {wq.name for wq in self._wqs()} | {w.name for w in getattr(self.driver, "works", None) or ()}
            if ev.get("wq") in names or ev.get("work") in names:
                eng.violate(self.name, f"work item {ev.get('work')} of the driver ran after it was closed "
                            f"(step {self.closed_at}): flushed instead of disabled?",
                            location=_fn_location(getattr(self.driver, "unbind")))

    def commit_suspects(self, st: Any, b: Any) -> Any:
        """The pages of a range commit :meth:`on_commit` reports: all once the driver is closed, else none."""
        return b.idx.tolist() if self.closed_at is not None else ()

    def on_commit(self, st: Any, va: int, pfn: int, write: bool) -> None:
        if self.closed_at is not None:
            self.engine.violate(self.name, f"device entry {va:#x} -> pfn {pfn:#x} committed after the driver "
                                f"was closed (step {self.closed_at})", st=st, mm=self.mm, addr=va,
                                stack=frame_stack(committer_frame(sys._getframe(2))))

    def on_callback(self, st: Any, args: tuple[Any, ...]) -> None:
        if self.closed_at is not None and self.engine.finding is None:
            start, end, event, _o, _s = _callback_args(args)
            self.engine.violate(self.name, f"invalidate callback ({getattr(event, 'name', event)} "
                                f"{start:#x}-{end:#x}) delivered to the driver after it was closed",
                                st=st, location=_fn_location(getattr(self.driver, "unbind")))

    def run_finished(self, eng: Any) -> None:
        mm = self.mm
        if mm is None or mm.exited:
            return
        if mm.mm_users != 1:
            eng.violate(self.name, f"{mm.name}.mm_users is {mm.mm_users} when every task has finished "
                        "(the process holds 1): an mmget_not_zero() without its mmput()", mm=mm,
                        location="mm_users", stack=[])


def device_invariants(t: Tracker) -> list[Any]:
    """The instruments of this module, sharing the mirror checks' tracker."""
    return [DeviceReach(t), NotifierMmput(), HmmRangeInput(t), RetryBound(), MigrateToRam(), Teardown(t)]


INVARIANTS = ("device_reach", "notifier_mmput", "hmm_range_input", "retry_bound", "migrate_to_ram", "teardown",
              "device_page_reuse")
