"""Findings point at the right place and reproducers never lie (issues 10.4 and 13.4).

Expectations come from the kernel sources as the specs print them: hmm-5.2.md §7.3 (``hmm_vma_handle_pte``
returns -EFAULT for a non-swap, non-migration entry without ``pte_unmap``; ``hmm_vma_walk_pmd`` returns it
directly, "hmm_vma_handle_pte() did unmap pte directory"), §8 (the cached pgmap reference is not put on that
path), hmm-modern.md §4.5 (the 6.18 ``hmm_vma_handle_pte`` unmaps on every early return),
mm-substrate.md §8 (``pte_offset_map`` balanced by ``pte_unmap``), hmm-modern.md §5 (an interval
notifier's callback must stop the device using the range before it returns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "hmm"))
import sim_toy_drivers as toy  # noqa: E402

from hmmirror import Machine  # noqa: E402
from hmmirror.arch.x86.pgtable import make_hwpoison_entry  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.mmap import vm_munmap  # noqa: E402
from hmmirror.sim.adapters import Hmm52Adapter  # noqa: E402
from hmmirror.sim.fuzz import Config, Recorder, Stats, campaign  # noqa: E402
from hmmirror.sim.invariants import PgmapRefs, PteMapBalance, Tracker, default_invariants  # noqa: E402
from hmmirror.sim.runner import device_fault, run_tasks  # noqa: E402
from hmmirror.sim.schedulers import SwitchListScheduler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), HERE])}
K = 4096


def fault_task(start: int, end: int, write: bool = False):
    def factory(run):
        return device_fault(run, start, end, write)
    return factory


def machine52_with(entries):
    """A 5.2 machine, process ``p`` with one 8-page anonymous VMA at BASE whose PTEs are ``entries``."""
    from hmm52_helpers import BASE, add_vma, set_pte

    m = Machine("5.2", ram=256 << 20)
    p = m.spawn("p")
    add_vma(m, p.mm, BASE, 8 * K)
    for k, e in enumerate(entries):
        set_pte(m, p.mm, BASE + k * K, e(m) if callable(e) else e)
    return m, p, BASE


# --- the map/unmap balance ---------------------------------------------------------------------------------
def test_pte_map_balance_5_2_error_path_keeps_the_table_mapped():
    """hmm-5.2.md §7.3: a hwpoison entry ends the walk with -EFAULT and nobody calls pte_unmap."""
    from hmm52_helpers import normal_pte

    m, p, a = machine52_with([lambda m: normal_pte(m.mem.alloc_page()), make_hwpoison_entry(0x99)])
    f, eng = run_tasks(m, Hmm52Adapter(), p.mm, [("dev0", "device", fault_task(a, a + 8 * K))],
                       SwitchListScheduler([]), [Tracker(), PteMapBalance()])
    assert f is not None and f.invariant == "pte_map_balance", f and f.describe()
    assert f.location == "mm.hmm.v5_2.hmm_vma_walk_pmd"
    assert f.signature == "pte_map_balance|mm.hmm.v5_2.hmm_vma_walk_pmd|-"


def test_pte_map_balance_5_2_success_and_fault_paths_are_balanced():
    """§7.2/§7.3: the table is unmapped after the loop and before every fault (fault_lbl)."""
    from hmm52_helpers import normal_pte

    m, p, a = machine52_with([lambda m: normal_pte(m.mem.alloc_page())])   # then 7 holes: faulted
    f, eng = run_tasks(m, Hmm52Adapter(), p.mm, [("dev0", "device", fault_task(a, a + 8 * K, True))],
                       SwitchListScheduler([]), [Tracker(), PteMapBalance()])
    assert f is None, f.describe()
    assert all(not t.task.pte_maps for t in eng.tasks)


def test_pte_map_balance_6_18_walks_unmap_on_every_return():
    """hmm-modern.md §4.5: success, fault and hwpoison (-EFAULT) paths all unmap the PTE table."""
    from hmmirror.sim.adapters import DmirrorAdapter

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(16 * K)
    p.touch(a, 4 * K, write=True)
    from hmmirror.mm.pgtable import Ptr  # noqa: F401 - the table layout is the model's
    level, ptep, _e = p.mm.pt.lookup(a + 8 * K - K)      # a PTE of the same table as the pages above
    assert level == "pte"
    m.pool.set((ptep[0], ptep[1] + 1), make_hwpoison_entry(0x99))   # page 8
    f, eng = run_tasks(m, DmirrorAdapter(), p.mm, [("dev0", "device", fault_task(a, a + 4 * K)),
                                                   ("dev1", "device", fault_task(a + 4 * K, a + 8 * K, True)),
                                                   ("dev2", "device", fault_task(a + 8 * K, a + 12 * K))],
                       SwitchListScheduler([]), [Tracker(), PteMapBalance()])
    assert f is None, f.describe()
    assert m.counters["hmm_range_fault"] >= 3


def test_pte_map_balance_reports_a_walk_that_forgets_to_unmap():
    def leaky_walk(run):
        def body():
            sched.pte_map_get("mm.toy.leaky_walk_pmd")
            yield from sched.preempt_point("walk")
            return 0
        return body()

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    f, _ = run_tasks(m, toy.GoodMirror(), p.mm, [("cpu0", "cpu", leaky_walk)], SwitchListScheduler([]))
    assert f is not None and f.invariant == "pte_map_balance" and f.location == "mm.toy.leaky_walk_pmd"


def test_pte_unmap_without_a_mapping_is_reported():
    def bad(run):
        def body():
            yield from sched.preempt_point("x")
            sched.pte_map_put("mm.toy.bad_unmap")
            return 0
        return body()

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    f, _ = run_tasks(m, toy.GoodMirror(), p.mm, [("cpu0", "cpu", bad)], SwitchListScheduler([]))
    assert f is not None and f.invariant == "pte_map_balance" and f.detail == "unmap_unmapped"


# --- locations ---------------------------------------------------------------------------------------------
def test_pgmap_leak_is_located_at_the_hmm_call_that_returned_with_it():
    """§8: devmap PTE (reference cached) then hwpoison (-EFAULT, no put): the reference outlives the call."""
    from hmm52_helpers import devmap_pte, pgmap

    m, p, a = machine52_with([])
    pg = pgmap(m)
    from hmm52_helpers import set_pte
    set_pte(m, p.mm, a, devmap_pte(pg.res.start))
    set_pte(m, p.mm, a + K, make_hwpoison_entry(0x99))
    t = Tracker()
    f, _ = run_tasks(m, Hmm52Adapter(), p.mm, [("dev0", "device", fault_task(a, a + 8 * K))],
                     SwitchListScheduler([]), [t, PgmapRefs(t)])
    assert f is not None and f.invariant == "pgmap_refcount", f and f.describe()
    assert f.location == "mm.hmm.v5_2.hmm_range_fault"          # not the driver's next blocking point


def test_finding_from_an_hmm_call_log_names_the_call_not_its_tracing_wrapper():
    class OnCall:
        def on_log(self, eng, ev):
            if ev["what"] == "hmm_range_fault":
                eng.violate("probe", "seen")

    from hmm52_helpers import normal_pte
    m, p, a = machine52_with([lambda m: normal_pte(m.mem.alloc_page())])
    f, _ = run_tasks(m, Hmm52Adapter(), p.mm, [("dev0", "device", fault_task(a, a + K))],
                     SwitchListScheduler([]), [Tracker(), OnCall()])
    assert f is not None and f.location == "mm.hmm.v5_2.hmm_range_fault", f and f.describe()
    assert not any("_traced" in s for s in f.stack)


def test_stale_device_entry_is_located_at_the_subscriber_that_kept_it():
    """hmm-modern.md §5: once the callback returned the device must not use the range; NoUnmapMirror's
    callback returns with the entries still there -- it is named, not the function that ended the range."""
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * K)
    p.touch(a, 8 * K, write=True)

    def munmap(run):
        return vm_munmap(p.mm, a, 4 * K)

    # (device_reach, I2, sees the same mistake at the callback's return; without it coherence must)
    from hmmirror.sim.invariants import default_invariants
    invs = [i for i in default_invariants(every_step=True) if i.name != "device_reach"]
    f, _ = run_tasks(m, toy.NoUnmapMirror(), p.mm, [("dev0", "device", fault_task(a, a + 8 * K)),
                                                    ("cpu0", "cpu", munmap)], SwitchListScheduler([]), invs)
    assert f is not None and f.invariant == "coherence", f and f.describe()
    assert f.location == "tests.sim.sim_toy_drivers.NoUnmapMirror.invalidate" or \
        f.location.endswith("sim_toy_drivers.NoUnmapMirror.invalidate"), f.location
    assert f.signature.split("|")[2] == "after_end"


def test_signature_does_not_read_the_callers_locals():
    """The old engine looked for ``start``/``addr``/``mm`` in the callers' frames: a local here changed the
    signature of the same run.  The signature is the same whatever the caller has in scope."""
    from hmmirror.sim.replay import replay_file

    path = os.path.join(ROOT, "docs", "sim-reproducers", "report-null-deref-hmm-vma-do-fault-76ed78b4.toml")
    plain = replay_file(path).result.finding

    def with_locals():
        start = addr = 0x7F0000001000          # noqa: F841 - the point of the test
        mm = Machine("6.18", ram=64 << 20).spawn("x").mm   # noqa: F841
        return replay_file(path).result.finding

    other = with_locals()
    assert plain is not None and other is not None and plain.signature == other.signature


# --- reproducers -------------------------------------------------------------------------------------------
def test_a_run_that_does_not_replay_is_not_written(tmp_path):
    """A result whose saved signature the fresh replay does not give (here: a tampered location) is not
    written as a reproducer; the campaign says why."""
    from hmmirror.sim.replay import replay_file

    res = replay_file(os.path.join(ROOT, "docs", "sim-reproducers",
                                   "report-null-deref-hmm-vma-do-fault-76ed78b4.toml")).result
    assert res.finding is not None
    res.finding.location = "mm.nowhere.made_up"
    stats = Stats()
    rec = Recorder(Config(kernel="5.2", findings_dir=str(tmp_path)), stats)
    rec.offer(res, 1)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".toml")] == []
    assert res.finding.signature in stats.unconfirmed and not stats.findings
    assert "fresh replay gave report:null_deref|mm.hmm.v5_2.hmm_vma_do_fault|-" in \
        stats.unconfirmed[res.finding.signature]


def test_seeded_driver_bug_gives_one_reproducer_that_replays_in_a_fresh_process(tmp_path):
    """One driver mistake (the callback keeps the device entries), reached on every mapping kind and after
    every background event the generator draws, is one signature, one file; later hits are counted.

    Bounded by runs (40 generated runs of seed 0), not wall seconds: the same runs on any machine."""
    cfg = Config(kernel="6.18", driver="sim_toy_drivers:NoUnmapMirror", seconds=0, findings_dir=str(tmp_path),
                 scheduler="random", examples=40, runs=40, seed=0)
    stats = campaign(cfg, float("inf"))
    assert stats.runs == 40
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".toml"))
    # the mistake is one signature, one file; a run may also meet the toy's other limit, its fault loop
    # without a bound under a clear_refs storm (retry_bound at GoodMirror.fault_loop): another signature
    mine = {s: v for s, v in stats.findings.items() if "NoUnmapMirror" in s}
    others = {s for s in stats.findings if s not in mine}
    assert len(mine) == 1 and others <= {"retry_bound|sim_toy_drivers.GoodMirror.fault_loop|-"}, \
        (files, {s: n for s, n in stats.hits.items()})
    assert len(files) == len(stats.findings)
    (sig, saved), = mine.items()
    # device_reach (I2) sees the callback return with the entries still there, before coherence can
    assert sig.startswith("device_reach|") and "NoUnmapMirror.invalidate|" in sig, sig
    assert stats.hits[sig] >= 1 and not stats.unconfirmed
    assert stats.known_hits.get(sig, 0) >= 1          # later runs that hit it again: counted, not saved
    r = subprocess.run([sys.executable, "-m", "hmmirror.cli.main", "replay", saved.path], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "reproduced" in r.stdout, r.stdout + r.stderr


def test_fault_around_maps_no_page_truncated_while_it_waited_for_the_pte_lock():
    """docs/sim-reproducers/fixed/page-counts-fault-around-truncate-2646b73c.toml (the campaign above reached it
    at run 19022 on a fast machine): dev0's read fault on a shared anonymous (shmem) mapping runs fault-around,
    which found pages 7-12 cached, then waited for the PTE lock while madvise(MADV_REMOVE) zapped them and
    truncate_inode_pages_range freed them; the model then mapped the freed frames (page_counts: "free, but 1
    leaf entries map it").  mm/filemap.c filemap_map_pages() looks every folio up with the PTE lock held
    (next_uptodate_folio: folio_try_get fails on a freed folio, folio->mapping != mapping on a truncated one),
    so a PTE of a shmem mapping only ever maps the folio the file caches at its index.  Checked after every
    step; the run's only finding is the toy's own mistake."""
    from hmmirror.arch.x86.pgtable import _PAGE_PRESENT, PTE_PFN_MASK
    from hmmirror.mm.debug import page_values
    from hmmirror.scenario.schema import load_sim
    from hmmirror.sim.runner import run_scenario, scheduler_for
    from hmmirror.sim.scenario import SimScenario

    bad: list[str] = []
    seen = [0]

    class CachedOnly:
        name = "test_cached_only"

        def attach(self, eng, run):
            self.mm = run.procs["p"].mm

        def after_step(self, eng, st, point):
            for vma in self.mm.vmas:
                if vma.vm_file is None:
                    continue
                cache = vma.vm_file.inode.i_mapping
                for va, (v, _lvl) in page_values(self.mm, vma.vm_start, vma.vm_end).items():
                    if v & _PAGE_PRESENT:
                        seen[0] += 1
                        pfn = (v & PTE_PFN_MASK) >> 12
                        if cache.find_page(vma.linear_page_index(va)) != pfn:
                            bad.append(f"step {eng.step}: {va:#x} maps {pfn:#x}, not the cached page")

    path = os.path.join(ROOT, "docs", "sim-reproducers", "fixed", "page-counts-fault-around-truncate-2646b73c.toml")
    sc = SimScenario.from_doc(load_sim(path))
    res = run_scenario(sc, scheduler_for(sc), invariants=default_invariants(every_step=True) + [CachedOnly()])
    assert not res.diverged
    assert [f.signature for f in res.findings] == ["device_reach|sim_toy_drivers.NoUnmapMirror.invalidate|-"]
    assert not bad, bad[:4]
    assert seen[0] > 0


@pytest.mark.parametrize("kernel", ["5.2"])
def test_every_reproducer_of_a_seeded_campaign_replays_in_a_fresh_process(tmp_path, kernel):
    cfg = Config(kernel=kernel, seconds=5, findings_dir=str(tmp_path), scheduler="random", seed=11,
                 stop_after=2)
    stats = campaign(cfg, time.monotonic() + cfg.seconds)
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".toml"))
    assert files and len(files) == len(stats.findings), (files, stats.unconfirmed)
    for name in files:
        r = subprocess.run([sys.executable, "-m", "hmmirror.cli.main", "replay", str(tmp_path / name)], env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "reproduced" in r.stdout, name + r.stdout + r.stderr
    _ = default_invariants


# --- the fast paths of the checks agree with the reference lookups ----------------------------------------
@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_cpu_leaf_equals_the_lookup_walk(kernel):
    """The coherence/contract checks read translations straight from the table rows; they must agree with
    ``PageTables.lookup`` on every page of every mapping the generator draws (PTE, THP and DAX PMD/PUD
    leaves, swap, migration and hwpoison entries, holes), before and after the runs."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.invariants import cpu_leaf, cpu_leaf_lookup
    from hmmirror.sim.runner import SimRun, build_machine
    from hmmirror.sim.scenario import generate

    checked = 0
    for seed in range(12):
        sc = generate(SeededChoices(seed), kernel, "builtin")
        run = build_machine(sc, run=SimRun(sc))
        for mm in run.machine.mms.values():
            for vma in list(mm.vmas):
                step = max(4096, (vma.vm_end - vma.vm_start) // 64) & ~4095
                for va in list(range(vma.vm_start, vma.vm_end, step)) + [vma.vm_end - 4096, vma.vm_end]:
                    assert cpu_leaf(mm, va) == cpu_leaf_lookup(mm, va), (seed, hex(va))
                    checked += 1
    assert checked > 500


# --- the built-in dmirror's retry loops are bounded as lib/test_hmm.c bounds them (I5) ----------------------
def _busy_hmm_range_fault(machine, calls, tick=100):
    """An hmm_range_fault that always meets an invalidation (-EBUSY) and lets ``tick`` ms of virtual time pass."""
    def busy(range):                                     # noqa: A002 - kernel name
        calls.append(machine.jiffies)
        machine.jiffies = machine.jiffies + tick
        return -16
        yield  # pragma: no cover
    return busy


@pytest.mark.parametrize("mode", ["fault_perpage", "fault_reuse", "snapshot"])
def test_dmirror_job_modes_give_up_after_hmm_range_default_timeout(monkeypatch, mode):
    """lib/test_hmm.c dmirror_range_fault(): ``timeout = jiffies + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT)``
    once, then ``if (time_after(jiffies, timeout)) return -EBUSY`` before every pass.  With every pass taking
    100 ms and ending in -EBUSY the passes start at 0, 100, ..., 1000 ms (time_after(1000, 1000) is false) and
    the 12th check, at 1100 ms, gives up.  The per-page/snapshot modes of the built-in driver had only a pass
    count (1001 passes): blind 6.18 seed 27561 (docs/sim-reproducers/fixed/retry-bound-hmm-range-fault-9809af91
    .toml) kept a fault_perpage job calling hmm_range_fault for 3.3 s under a clear_refs storm."""
    from hmmirror.mm.hmm import modern
    from hmmirror.sim.adapters import DmirrorAdapter

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * K, "rw")
    ad = DmirrorAdapter()
    assert sched.run(ad.bind(p.mm)) == 0
    calls: list[int] = []
    monkeypatch.setattr(modern, "hmm_range_fault", _busy_hmm_range_fault(m, calls))
    assert sched.run(ad.fault_mode(a, a + 8 * K, True, mode, {"pattern": 0})) == -16
    assert calls == list(range(0, 1001, 100))
    assert m.counters["dmirror_timeouts"] == 1


def test_dmirror_snapshot_ioctl_gives_up_after_hmm_range_default_timeout(monkeypatch):
    """lib/test_hmm.c dmirror_range_snapshot() has the same ``time_after(jiffies, timeout)`` bound (per 64-page
    chunk) as dmirror_range_fault(); the model's copy had only the pass count."""
    from hmmirror.drivers import test_hmm as th

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * K, "rw")
    f = sched.run(th.dmirror_fops_open(th.hmm_dmirror_init(m)[0], p.mm))
    dm = f.private_data if getattr(f, "private_data", None) is not None else f.dmirror
    calls: list[int] = []
    monkeypatch.setattr(th, "hmm_range_fault", _busy_hmm_range_fault(m, calls))
    cmd = th.HmmDmirrorCmd(addr=a, ptr=bytearray(8), npages=8)
    assert sched.run(dm.dmirror_snapshot(cmd, p.mm)) == -16
    assert calls == list(range(0, 1001, 100)) and cmd.cpages == 0


def test_dmirror_fault_restarts_the_retry_clock_at_every_chunk(monkeypatch):
    """dmirror_fault() calls dmirror_range_fault() per 64-page chunk, each with its own timeout: a fault of
    three chunks whose every chunk needs 900 ms of retries succeeds after 2.7 s (each chunk's passes start
    at most 1000 ms after its first) and is no retry-bound violation (I5's clock restarts at each chunk's
    ``device_fault_begin``); the same job in one chunk would have given up at 1000 ms."""
    from hmmirror.drivers import test_hmm as th
    from hmmirror.sim.invariants_device import RetryBound

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    n = 3 * th.DMIRROR_CHUNK_PAGES
    a = p.mmap(n * K, "rw")
    f = sched.run(th.dmirror_fops_open(th.hmm_dmirror_init(m)[0], p.mm))
    dm = f.private_data if getattr(f, "private_data", None) is not None else f.dmirror
    orig = th.hmm_range_fault
    calls: list[tuple[int, int]] = []

    def slow(range):                                     # noqa: A002 - kernel name
        calls.append((range.start, m.jiffies))
        m.jiffies = m.jiffies + 300
        if sum(1 for s, _ in calls if s == range.start) < 4:
            return -16                                   # three busy passes (900 ms), then the real walk
        return (yield from orig(range))

    monkeypatch.setattr(th, "hmm_range_fault", slow)
    begins = []
    m.log = lambda what, **kw: begins.append(kw["addr"]) if what == "device_fault_begin" else None
    assert sched.run(dm.populate(a, a + n * K, False)) == 0
    starts = [a + k * th.DMIRROR_CHUNK_PAGES * K for k in range(3)]
    assert begins == starts
    assert [s for s, _ in calls] == [s for s in starts for _ in range(4)]
    assert calls[-1][1] - calls[0][1] > RetryBound.LIMIT    # longer than I5's bound for one retry loop
