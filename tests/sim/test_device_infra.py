"""What DriverBase grew for real drivers (workqueues, several notifiers, device TLB and DMA, close during a run,
virtual time) and the device invariants that judge it, each on a hand-made interleaving.

Expected behaviour is the kernel's: kernel/workqueue.c (flush_work waits for the current instance only,
cancel_work_sync does not prevent a later queue_work, disable_work_sync does), mm/mmu_notifier.c (a notifier
callback runs inside the invalidation of its mm), hmm.rst / drm_gpusvm.c (the device cannot reach the pages
once the callback returned: PTE zap, TLB flush, DMA unmap), mmput() (the last reference tears the mm down).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sim_toy_drivers as toy  # noqa: E402

from hmmirror import Machine
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.kernel import workqueue as wq
from hmmirror.mm.hmm import modern as hmm
from hmmirror.mm.mmap import vm_munmap
from hmmirror.mm.mmu_notifier import (
    mmu_interval_set_seq,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.sim.driver import Invalidation
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

N = 8
L = N * 4096
DOCS = Path(__file__).resolve().parents[2] / "docs" / "sim-reproducers"


def setup():
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    p.touch(a, L, write=True)
    return m, p, a


def fault_task(start, end, write=True):
    return lambda run: device_fault(run, start, end, write)


def go(drv, tasks, m, p, sched_=None, invariants=None):
    f, _eng = run_tasks(m, drv, p.mm, tasks, sched_ or SwitchListScheduler([]), invariants)
    return f


# --- workqueues --------------------------------------------------------------------------------------------
def test_workqueue_flush_cancel_disable_semantics_sequential():
    m = Machine("6.18", ram=16 << 20)
    q = wq.alloc_workqueue(m, "q")
    ran = []

    def body(work):
        ran.append(work.name)
        return
        yield

    w = wq.INIT_WORK(body, "w")
    assert wq.queue_work(q, w) and not wq.queue_work(q, w)          # pending: a second queue is a no-op
    assert sched.run(wq.flush_work(w)) and ran == ["w"]             # no worker: the flusher runs it
    assert wq.queue_work(q, w)
    assert sched.run(wq.cancel_work_sync(w)) and ran == ["w"]       # cancelled before it ran
    assert wq.queue_work(q, w)                                      # ... and can be queued again
    sched.run(wq.disable_work_sync(w))
    assert not wq.queue_work(q, w)                                  # disabled: refused until enabled
    assert wq.enable_work(w) and wq.queue_work(q, w)
    sched.run(wq.destroy_workqueue(q))
    assert ran == ["w", "w"] and q.destroyed


def test_work_runs_on_a_worker_task_and_the_run_ends():
    m, p, a = setup()

    class Queuer(toy.GoodMirror):
        def bind(self, mm):
            ret = yield from super().bind(mm)
            self.q = self.alloc_workqueue("gc")
            self.w = self.init_work(self.gc_body, "gc")
            self.gc_ran = 0
            return ret

        def gc_body(self, work):
            yield from sched.mutex_lock(self.lock)
            self.gc_ran += 1
            sched.mutex_unlock(self.lock)

        def invalidate(self, inv):
            ok = yield from super().invalidate(inv)
            wq.queue_work(self.q, self.w)
            return ok

    drv = Queuer()
    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", fault_task(a, a + L)),
                                      ("cpu0", "cpu", lambda run: vm_munmap(p.mm, a, 4096))],
                       SwitchListScheduler([]))
    assert f is None, f.describe()
    assert drv.gc_ran == 1
    assert any(t.name == "kworker/good.gc" and t.daemon for t in eng.tasks)
    assert m.jiffies == eng.step                                     # one jiffy per step


def test_a_work_item_in_progress_is_an_operation_for_the_page_count_check():
    """docs/sim-reproducers/fixed/gpusvm-page-counts-worker-thread-2589f0ff.toml: the gpusvm garbage collector's
    work item migrates device pages home; between allocating the locked destination pages and mapping them it
    was checked as if the kworker were idle (refcount 1, no mapping: page_counts).  A kworker running an item is
    inside an operation; the refcount check waits for it (the item here holds a locked page it allocated across
    preemption points, then frees it) -- clean, and the item really ran on the worker."""
    from hmmirror.mm.folio import folio_trylock, folio_unlock
    from hmmirror.mm.page_alloc import PG

    m, p, a = setup()
    held = []

    class Holder(toy.GoodMirror):
        def bind(self, mm):
            ret = yield from super().bind(mm)
            self.q = self.alloc_workqueue("gc")
            self.w = self.init_work(self.body, "gc")
            return ret

        def body(self, work):
            mem = self.machine.mem
            pfn = mem.alloc_page()                  # a destination page, as migrate_to_ram's: anon, locked
            mem.flags[pfn] |= PG.anon
            folio_trylock(mem, pfn)
            held.append((pfn, sched.current()))
            for _ in range(5):
                yield from sched.preempt_point("copy")
            folio_unlock(mem, pfn)
            mem.flags[pfn] ^= PG.anon                # (set above)
            mem.put_page(pfn)

        def invalidate(self, inv):
            ok = yield from super().invalidate(inv)
            wq.queue_work(self.q, self.w)
            return ok

    drv = Holder()
    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", fault_task(a, a + L)),
                                      ("cpu0", "cpu", lambda run: vm_munmap(p.mm, a, 4096))],
                       SwitchListScheduler([]), every_step=True)
    assert f is None, f.describe()
    assert held and any(t.name == "kworker/good.gc" and t.task is held[0][1] for t in eng.tasks)


def test_a_driver_reused_for_a_second_run_is_wrapped_once():
    """The tracker wraps the driver's callback for its run; a second run of the same driver object (a test that
    runs a driver twice, a pytest fixture) wraps the driver's own callback again, not the first run's wrapper:
    the first run's tracker hears nothing of the second run's invalidations."""
    from hmmirror.sim.invariants import Tracker, default_invariants

    m, p, a = setup()
    drv = toy.GoodMirror()
    runs = []
    for _ in range(2):
        invs = default_invariants()
        f, _eng = run_tasks(m, drv, p.mm, [("dev0", "device", fault_task(a, a + L)),
                                          ("cpu0", "cpu", lambda run: vm_munmap(p.mm, a + len(runs) * 4096, 4096))],
                            SwitchListScheduler([]), invs, bind=not runs)
        assert f is None, f.describe()
        t = next(i for i in invs if isinstance(i, Tracker))
        runs.append((t, len(t.delivered)))
    assert drv.invalidate.tracked_callback.__func__ is toy.GoodMirror.invalidate
    (t1, n1), (t2, n2) = runs
    assert n1 >= 1 and n2 >= 1 and len(t1.delivered) == n1        # run 2's invalidations went to run 2 only


# --- device TLB and DMA -----------------------------------------------------------------------------------
class NoFlushMirror(toy.GoodMirror):
    """zaps the device PTEs but never flushes the device TLB."""

    device_tlb = True


class DmaMirror(toy.GoodMirror):
    """DMA-maps every page it commits; ``unmap_dma`` says whether the callback unmaps them."""

    unmap_dma = True

    def commit(self, rng):
        super().commit(rng)
        self.iova = getattr(self, "iova", {})
        for k in range((rng.end - rng.start) >> 12):
            va = rng.start + k * 4096
            self.iova[va] = self.pt.dma_map_page(hmm.hmm_pfn_to_pfn(int(rng.hmm_pfns[k])), 0, va)

    def invalidate(self, inv):
        ok = yield from super().invalidate(inv)
        if ok and self.unmap_dma:
            for va in [v for v in getattr(self, "iova", {}) if inv.start <= v < inv.end]:
                self.pt.dma_unmap_page(self.iova.pop(va))
        return ok


def test_device_reach_sees_the_tlb_and_dma():
    for drv, how in ((NoFlushMirror(), "TLB"), (type("Leaky", (DmaMirror,), {"unmap_dma": False})(), "DMA")):
        m, p, a = setup()
        f = go(drv, [("dev0", "device", fault_task(a, a + L)),
                     ("cpu0", "cpu", lambda run, p=p, a=a: vm_munmap(p.mm, a, 4096))], m, p)
        assert f is not None and f.invariant == "device_reach" and how in f.message, f and f.describe()
    m, p, a = setup()
    f = go(DmaMirror(), [("dev0", "device", fault_task(a, a + L)),
                         ("cpu0", "cpu", lambda run: vm_munmap(p.mm, a, 4096))], m, p)
    assert f is None, f.describe()


# --- several notifiers per driver -------------------------------------------------------------------------
class ChunkMirror(toy.GoodMirror):
    """one interval notifier per 16 KiB chunk, inserted on the first fault of the chunk."""

    notifier_size = 16 << 10

    def fault_loop(self, start, end, write):
        self.subs = getattr(self, "subs", {})
        c0 = start & ~(self.notifier_size - 1)
        for c in range(c0, end, self.notifier_size):
            if c not in self.subs:
                ret, sub = yield from self.notifier_insert(c, self.notifier_size)
                if ret:
                    return ret
                self.subs[c] = sub
        ret = 0
        for c in range(c0, end, self.notifier_size):        # fault chunk by chunk, each under its notifier
            self.sub = self.subs[c]
            ret = yield from super().fault_loop(max(start, c), min(end, c + self.notifier_size), write)
            if ret:
                break
        return ret

    def invalidate(self, inv):
        self.seen = getattr(self, "seen", []) + [(inv.sub.start, inv.start, inv.end)]
        return (yield from super().invalidate(inv))


def test_per_chunk_notifiers_get_only_their_invalidations():
    m, p, a = setup()
    drv = ChunkMirror()
    f = go(drv, [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is None, f.describe()
    assert len(drv.notifiers) == 2 and sched.run(vm_munmap(p.mm, a + L - 4096, 4096)) == 0
    assert [s for s, _st, _e in drv.seen] == [a + (16 << 10)]      # only the second chunk's notifier
    sched.run(drv.unbind())
    assert not drv.notifiers and len(drv.pt) == 0


def test_an_invalidation_told_to_several_chunk_notifiers_ends_for_all_of_them():
    """One invalidation over two chunks is delivered once per chunk notifier; when it ends (range_end), a later
    snapshot committed in either chunk is not stale (commit_invalid must not see it as still running)."""
    m, p, a = setup()
    drv = ChunkMirror()
    mm = p.mm
    f = go(drv, [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is None, f.describe()
    done = []

    def storm(run):                 # clear_refs-style: one range over the whole mapping, ended before the fault
        def body():
            r = mmu_notifier_range_init(MMU_NOTIFY.SOFT_DIRTY, mm.vma_lookup(a), mm, a, a + L)
            yield from mmu_notifier_invalidate_range_start(r)
            yield from sched.preempt_point("storm")
            yield from mmu_notifier_invalidate_range_end(r)
            done.append(True)
            return 0
        return body()

    def later_fault(run):
        yield from sched.wait_event(lambda: bool(done), "test: after the storm")
        return (yield from device_fault(run, a, a + L, False))

    f, _eng = run_tasks(m, drv, p.mm, [("storm", "kevent:clear_refs", storm), ("dev0", "device", later_fault)],
                        SwitchListScheduler([]), bind=False)
    assert sorted(s for s, _st, _e in drv.seen) == [a, a + (16 << 10)]      # told once per chunk
    assert f is None, f.describe()


# --- I3: no last mmput inside a callback -------------------------------------------------------------------
def test_notifier_mmput_last_reference_in_callback():
    m, p, a = setup()
    state = {"inside": False, "exited": False}

    class Holder(toy.GoodMirror):
        def invalidate(self, inv):
            if not self.mmget_not_zero():
                return (yield from super().invalidate(inv))
            state["inside"] = True
            yield from sched.wait_event(lambda: state["exited"], "test: the process exits meanwhile")
            ok = yield from super().invalidate(inv)
            yield from self.mmput()                      # the last reference now
            return ok

    mm = p.mm

    def compaction(run):           # an rmap-based invalidation: holds no mm reference of its own
        def body():
            r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, mm.vma_lookup(a), mm, a, a + 4096)
            yield from mmu_notifier_invalidate_range_start(r)
            yield from mmu_notifier_invalidate_range_end(r)
            return 0
        return body()

    def exit_(run):
        def body():
            from hmmirror.kernel.fork import mmput
            yield from sched.wait_event(lambda: state["inside"], "test: wait for the callback")
            yield from mmput(mm)                         # the process's reference
            state["exited"] = True
            return 0
        return body()

    f = go(Holder(), [("kcompactd", "kevent:compact", compaction), ("exit", "kevent:exit", exit_)], m, p)
    assert f is not None and f.invariant == "notifier_mmput", f and f.describe()
    assert f.location.endswith("Holder.invalidate")


# --- I4: stale request array ---------------------------------------------------------------------------------
class StaleArrayMirror(toy.GoodMirror):
    """keeps one pfn array and a per-page mask; writes the requests only when it allocates the array."""

    def snapshot(self, start, end, write):
        n = (end - start) >> 12
        if getattr(self, "pfns", None) is None or len(self.pfns) < n:
            self.pfns = hmm.new_hmm_pfns(n)
            self.pfns[:] = hmm.HMM_PFN_REQ_FAULT
        rng = hmm.HmmRange(self.sub, start, end, self.pfns, default_flags=0, pfn_flags_mask=hmm.HMM_PFN_REQ_FAULT)
        from hmmirror.mm.mmu_notifier import mmu_interval_read_begin
        rng.notifier_seq = yield from mmu_interval_read_begin(self.sub)
        yield from sched.down_read(self.mm.mmap_sem)
        ret = yield from hmm.hmm_range_fault(rng)
        sched.up_read(self.mm.mmap_sem)
        return ret, rng


def test_hmm_range_input_stale_array():
    m, p, a = setup()
    f = go(StaleArrayMirror(), [("dev0", "device", lambda run: _two_faults(run, a))], m, p)
    assert f is not None and f.invariant == "hmm_range_input" and "stale" in f.message, f and f.describe()
    assert f.location == "test_device_infra.StaleArrayMirror.snapshot"


def _two_faults(run, a):
    yield from device_fault(run, a, a + L, False)
    yield from device_fault(run, a, a + L, False)


# --- I10: teardown ---------------------------------------------------------------------------------------------
def test_close_during_a_run_is_clean_for_a_correct_driver():
    from hmmirror.sim.kevents import driver_close
    m, p, a = setup()
    drv = toy.GoodMirror()
    drv.unbind_races_faults = True
    f = go(drv, [("dev0", "device", fault_task(a, a + L)), ("close", "kevent:close", driver_close),
                 ("cpu0", "cpu", lambda run: vm_munmap(p.mm, a, 4096))], m, p)
    assert f is None, f.describe()
    assert drv.closed and len(drv.pt) == 0 and not drv.notifiers


def test_teardown_unpaired_mm_reference():
    class Leaker(toy.GoodMirror):
        def fault(self, start, end, write):
            self.mmget_not_zero()                         # never dropped
            return (yield from self.fault_loop(start, end, write))

    m, p, a = setup()
    f = go(Leaker(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "teardown" and "mm_users is 2" in f.message, f and f.describe()


# --- result_contract: the benign downgrade -----------------------------------------------------------------
def test_read_snapshot_committed_over_a_write_fault_is_benign():
    """docs/sim-reproducers/benign/result-contract-97964739.toml: dev1's write fault commits a writable entry
    of a shared file page, dev0's read fault (a snapshot no invalidation made stale: the write fault upgraded
    the CPU PTE in place, which does not invalidate) commits read-only over it before dev1 returns.  The
    entry is coherent; the contract of a successful fault allows it (the device re-faults on its next write,
    as lib/test_hmm.c dmirror_write() does), so the run is clean -- and the downgrade really happened."""
    from hmmirror.sim.invariants import default_invariants
    from hmmirror.sim.runner import run_scenario, scheduler_for
    from hmmirror.sim.scenario import SimScenario

    seen = []

    class Probe:
        name = "probe"

        def attach(self, eng, run):
            self.drv = run.driver

        def fault_end(self, eng, st, start, end, write, ret):
            if write and ret == 0:
                seen.extend((va, e) for va in range(start, end, 4096)
                            if (e := self.drv.pt.get(va)) is not None and not e[1])

    sc = SimScenario.load(str(DOCS / "benign" / "result-contract-97964739.toml"))
    res = run_scenario(sc, scheduler_for(sc), default_invariants() + [Probe()])
    assert res.diverged is None and res.finding is None, res.finding and res.finding.describe()
    assert seen, "the write fault returned with every page writable: the scenario no longer shows the downgrade"


@pytest.mark.parametrize("kernel,runs", [("6.18", 80), ("5.2", 12)])
def test_new_events_run(kernel, runs):
    """compact, clear_refs and close run on both profiles without crashing the model (a smoke test of the
    event bodies; on 6.18 each of them also did its work at least once)."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import run_scenario
    from hmmirror.sim.scenario import generate
    from hmmirror.sim.schedulers import RandomScheduler
    kinds = {"compact": 0, "clear_refs": 0, "close": 0}
    for seed in range(runs):
        c = SeededChoices(seed)
        sc = generate(c, kernel, "builtin", ("anon",), tuple(kinds))
        sc.max_steps = 20_000
        res = run_scenario(sc, RandomScheduler(c))
        assert res.finding is None or res.finding.invariant not in ("exception", "page_counts"), \
            res.finding.describe()
        for e in res.events:
            if e["what"] == "sim_event" and e["ret"] >= 0:
                kinds[e["kind"]] += 1
    if kernel == "6.18":
        assert all(kinds.values()), kinds


_ = Invalidation, mmu_interval_set_seq
