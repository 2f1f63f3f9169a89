"""The built-in drm_gpusvm-style driver (``--driver gpusvm``, src/hmmirror/drivers/drm_gpusvm.py), each
behaviour on a scripted run, then a short seeded campaign.

Expected values come from drm_gpusvm.c / drm_pagemap.c / xe_svm.c of 6.18 and device-memory.md: a notifier of
512 MiB aligned around the fault, ranges of the largest chunk (2M, 64K, 4K) that fits the VMA and -- up to
64K -- only pages the CPU has faulted in; system pages are DMA-mapped, the device's own private pages are
not; ``drm_gpusvm_notifier_invalidate`` zaps, flushes and unmaps every range the event touches and hands an
UNMAPPED range to the garbage collector, which removes it (and the notifier with its last range);
``hmm_range_fault`` -EBUSY is retried until ``HMM_RANGE_DEFAULT_TIMEOUT`` (1000 ms = 1000 jiffies); a
migration to device memory leaves device-private entries in the CPU page table and the bytes in device
pages; a CPU access brings the page home through ``migrate_to_ram`` with ``fault_page`` set; eviction
(``drm_pagemap_evict_to_ram``) empties device memory.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.drivers.drm_gpusvm import SZ_512M, DrmGpusvm
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.mm.mmap import vm_munmap
from hmmirror.sim.driver import Invalidation
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096
N = 16
L = N * PAGE            # 64 KiB: one 64K chunk when the mapping is 64K-aligned and faulted in


def setup(touch: bool = True, fill: int = 0x5A):
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    assert a % L == 0                               # the model places it 64K-aligned (top-down, 64K size)
    if touch:
        p.touch(a, L, write=True, fill=fill)
    return m, p, a


def fault(start, end, write=False, mode="fault"):
    return lambda run: device_fault(run, start, end, write, mode, {})


def go(m, p, drv, tasks, scheduler=None, invariants=None):
    f, eng = run_tasks(m, drv, p.mm, tasks, scheduler or SwitchListScheduler([]), invariants)
    assert f is None, f.describe()
    return eng


def ranges(drv):
    return [(r.start, r.end) for n in drv.gpusvm_notifiers for r in n.ranges]


def test_fault_inserts_a_notifier_and_a_64k_range_and_dma_maps_system_pages():
    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    [n] = drv.gpusvm_notifiers
    assert (n.start, n.last + 1) == (a & ~(SZ_512M - 1), (a & ~(SZ_512M - 1)) + SZ_512M)
    assert [(s.start, s.last) for s in drv.notifiers] == [(n.start, n.last)]   # one interval notifier
    assert ranges(drv) == [(a, a + L)]
    cpu = [s.pfn for s in p.inspect(a, L)]
    for i in range(N):
        assert drv.pt.get(a + i * PAGE) == (cpu[i], True)          # the CPU PTEs are writable: so is the GPU's
    assert sorted(pfn for pfn, _n, _va in drv.pt.dma.values()) == sorted(cpu)


def test_untouched_pages_get_4k_ranges():
    """drm_gpusvm_check_pages: a chunk up to the threshold (64K) only over pages the CPU faulted in."""
    m, p, a = setup(touch=False)
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + 2 * PAGE, write=True))])
    assert ranges(drv) == [(a, a + PAGE), (a + PAGE, a + 2 * PAGE)]
    assert all(drv.pt.get(a + i * PAGE)[1] for i in range(2))


def test_invalidate_not_blockable_returns_false_and_zaps_nothing():
    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    sub = drv.notifiers[0]
    inv = Invalidation(a, a + PAGE, MMU_NOTIFY.CLEAR, False, seq=sub.invalidate_seq, sub=sub)
    assert sched.run(drv.invalidate(inv)) is False
    assert len(drv.pt) == N and drv.pt.dma


def test_partial_munmap_zaps_the_range_and_the_gc_work_removes_it_and_the_notifier():
    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    eng = go(m, p, drv, [("cpu0", "cpu", lambda run: vm_munmap(p.mm, a + 3 * PAGE, PAGE))])
    assert any(t.name == "kworker/gpusvm.gc" for t in eng.tasks)   # the work item ran on its worker
    assert drv.gc_list == [] and ranges(drv) == [] and drv.gpusvm_notifiers == []
    assert drv.notifiers == []                                      # removed with its last range
    assert drv.pt.empty()                                           # no PTE, TLB entry or DMA mapping
    # the next fault inserts a fresh notifier and ranges around the hole (4K: the 64K chunk has a hole)
    go(m, p, drv, [("dev0", "device", fault(a, a + 2 * PAGE))])
    assert ranges(drv) == [(a, a + PAGE), (a + PAGE, a + 2 * PAGE)]


def test_migrate_to_device_then_cpu_fault_brings_the_page_home_with_fault_page():
    m, p, a = setup(fill=0x5A)
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L, write=False, mode="migrate_dev"))])
    assert {s.kind for s in p.inspect(a, L)} == {"device_private"}
    [alloc] = drv.allocations.values()
    dpfns = [int(x) for x in alloc.pfns]
    assert all(drv.pgmap.covers(x) for x in dpfns)
    assert [drv.pt.get(a + i * PAGE)[0] for i in range(N)] == dpfns   # the GPU maps its own pages
    assert not drv.pt.dma                                           # ... by device address, no DMA mapping
    assert all(bytes(m.mem.contents[x]) == b"\x5a" * PAGE for x in dpfns)   # the bytes moved
    assert len(drv.free_pfns) == drv.pgmap.res.end - drv.pgmap.res.start - N

    seen = []
    from hmmirror.mm import migrate_device as md
    real = md.migrate_vma_setup

    def spy(args):
        seen.append(args.fault_page)
        return (yield from real(args))

    md.migrate_vma_setup = spy
    try:
        assert p.read_bytes(a + 5 * PAGE, 8) == b"\x5a" * 8       # do_swap_page -> migrate_to_ram
    finally:
        md.migrate_vma_setup = real
    assert seen == [dpfns[5]]                                      # fault_page = vmf->page
    # the whole allocation came back (the allocation-sized window), device memory is free again
    assert {s.kind for s in p.inspect(a, L)} == {"anon"}
    assert drv.allocations == {} and len(drv.free_pfns) == drv.pgmap.res.end - drv.pgmap.res.start
    assert p.check(a, L, 0x5A) == 0
    assert len(drv.pt) == 0                                         # the MIGRATE invalidation zapped the GPU


def test_eviction_moves_every_allocation_back_to_ram():
    m, p, a = setup(fill=0x33)
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L, mode="migrate_dev"))])
    assert {s.kind for s in p.inspect(a, L)} == {"device_private"}
    assert sched.run(drv.evict()) == 0                               # drm_pagemap_evict_to_ram
    assert {s.kind for s in p.inspect(a, L)} == {"anon"}
    assert drv.allocations == {} and len(drv.pt) == 0
    assert p.check(a, L, 0x33) == 0


def test_migrate_sys_job_evicts_the_ranges_through_hmm_range_fault_without_owner():
    m, p, a = setup(fill=0x44)
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L, mode="migrate_dev")),
                   ("dev1", "device", fault(a, a + L, mode="migrate_sys"))])
    assert {s.kind for s in p.inspect(a, L)} == {"anon"} and drv.allocations == {}
    assert p.check(a, L, 0x44) == 0


def test_get_pages_gives_up_after_the_one_second_timeout():
    """Every hmm_range_fault answers -EBUSY (a range kept busy): get_pages retries with a new sequence until
    HMM_RANGE_DEFAULT_TIMEOUT of virtual time, then the fault fails with -EBUSY -- 1000 jiffies, no more.
    The range exists already (its pages invalidated by a CLEAR), so drm_gpusvm_check_pages -- which has a
    timeout of its own -- does not run."""
    from hmmirror.mm.mmu_notifier import (
        mmu_notifier_invalidate_range_end,
        mmu_notifier_invalidate_range_start,
        mmu_notifier_range_init,
    )

    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, p.mm.vma_lookup(a), p.mm, a, a + PAGE)
    sched.run(mmu_notifier_invalidate_range_start(r))
    sched.run(mmu_notifier_invalidate_range_end(r))
    assert ranges(drv) == [(a, a + L)] and len(drv.pt) == 0
    from hmmirror.mm.hmm import modern as hmm
    real = hmm.hmm_range_fault
    calls = []

    def busy(rng):
        calls.append(m.jiffies)
        yield from sched.preempt_point("busy")
        return -16

    out = {}

    def task(run):
        t0 = m.jiffies
        out["ret"] = yield from device_fault(run, a, a + PAGE, False)
        out["took"] = m.jiffies - t0

    hmm.hmm_range_fault = busy
    try:
        run_tasks(m, drv, p.mm, [("dev0", "device", task)], SwitchListScheduler([]), invariants=[], bind=False)
    finally:
        hmm.hmm_range_fault = real
    assert out["ret"] == -16
    assert 1000 <= out["took"] <= 1100, out
    assert len(calls) > 100


def test_gpu_fault_racing_munmap_and_a_cpu_write_is_clean_under_many_interleavings():
    """A migrating GPU fault, a CPU write to one page (migrate_to_ram if it is on the device) and a partial
    munmap, under 8 seeded random schedules: every invariant holds; afterwards nothing of the unmapped page
    is reachable by the device."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.schedulers import RandomScheduler

    for seed in range(8):
        m, p, a = setup(fill=0x11)
        drv = DrmGpusvm()
        tasks = [("dev0", "device", fault(a, a + L, write=True, mode="migrate_dev")),
                 ("cpu0", "cpu", lambda run, p=p, a=a: _write(p, a + 2 * PAGE)),
                 ("cpu1", "cpu", lambda run, p=p, a=a: vm_munmap(p.mm, a + 9 * PAGE, PAGE))]
        f, _eng = run_tasks(m, drv, p.mm, tasks, RandomScheduler(SeededChoices(seed)))
        assert f is None, (seed, f.describe())
        assert not drv.pt.reaches(a + 9 * PAGE, a + 10 * PAGE), seed


def _write(p, va):
    from hmmirror.arch.x86.fault import cpu_access
    sig = yield from cpu_access(p.mm, va, True, b"\x22" * PAGE)
    return sig


def test_driver_is_registered_for_the_cli_and_scenarios():
    from hmmirror.cli.common import resolve_driver
    from hmmirror.errors import InputError
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import run_scenario, scheduler_for
    from hmmirror.sim.scenario import SimScenario, generate

    assert resolve_driver("gpusvm", "6.18") is DrmGpusvm
    with pytest.raises(InputError, match="6.18"):
        resolve_driver("gpusvm", "5.2")
    text = generate(SeededChoices(7), "6.18", "gpusvm").to_toml()
    assert 'driver = "gpusvm"' in text
    sc = SimScenario.from_toml(text)                 # the reproducer schema accepts the name
    res = run_scenario(sc, scheduler_for(sc))
    assert res.diverged is None and res.findings == [], [f.describe() for f in res.findings]


@pytest.mark.parametrize("seed0", [0])
def test_short_seeded_campaign_is_clean(seed0):
    """The fuzzer's generator and per-step random scheduler, every event and device job of 6.18 drawn."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import run_scenario
    from hmmirror.sim.scenario import generate
    from hmmirror.sim.schedulers import RandomScheduler

    steps = 0
    for seed in range(seed0, seed0 + 15):
        c = SeededChoices(seed)
        sc = generate(c, "6.18", "gpusvm")
        res = run_scenario(sc, RandomScheduler(c))
        assert res.findings == [], (seed, [f.describe() for f in res.findings])
        steps += res.steps
    assert steps > 1000


def test_a_range_made_by_a_plain_fault_migrates_on_a_later_devmem_fault():
    """migrate_devmem is the device's property (Xe: ctx.devmem_possible), set when the range is inserted
    whatever the fault; a later fault preferring device memory moves the existing range."""
    m, p, a = setup(fill=0x66)
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    assert ranges(drv) == [(a, a + L)] and {s.kind for s in p.inspect(a, L)} == {"anon"}
    go(m, p, drv, [("dev0", "device", fault(a, a + L, mode="migrate_dev"))])
    assert ranges(drv) == [(a, a + L)] and {s.kind for s in p.inspect(a, L)} == {"device_private"}
    assert p.check(a, L, 0x66) == 0


def test_a_range_straddling_a_vma_made_prot_none_is_resized():
    """A 64K range sized when the VMA was whole; mprotect(PROT_NONE) of its last pages splits the VMA (a
    PROTECTION_VMA invalidation: the range stays).  A later read fault in the readable part must succeed:
    hmm_range_fault over the whole range fails (-EFAULT: the PROT_NONE part), so the range is removed and a
    new one sized for the current VMAs (campaign seed 7340216 found the -EFAULT as hmm_range_input)."""
    from hmmirror.mm.mprotect import do_mprotect_pkey

    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    assert ranges(drv) == [(a, a + L)]
    assert sched.run(do_mprotect_pkey(p.mm, a + 12 * PAGE, 4 * PAGE, 0), p.mm.task) == 0
    go(m, p, drv, [("dev0", "device", fault(a, a + 2 * PAGE))])
    assert all(s < a + 12 * PAGE for s, _e in ranges(drv)), ranges(drv)
    assert drv.pt.get(a) is not None and drv.pt.get(a + 12 * PAGE) is None


def test_a_fault_on_a_prot_none_vma_fails_at_once():
    """The whole range lies in one PROT_NONE VMA: the -EFAULT stands (the CPU refuses too), no retry loop
    (campaign seed 7340217: the first version of the resize retried it until liveness reported it)."""
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L, prot=0)
    drv = DrmGpusvm()
    out = {}

    def task(run):
        out["ret"] = yield from device_fault(run, a + 4 * PAGE, a + 7 * PAGE, False, "migrate_dev", {})

    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", task)], SwitchListScheduler([]))
    assert f is None, f.describe()
    assert out["ret"] == -14 and eng.step < 100


def test_a_write_fault_on_a_range_straddling_a_read_only_vma_is_resized():
    """As above with mprotect(PROT_READ) of the range's last pages: hmm_range_fault of a write over the whole
    range fails with -EPERM; the range is resized instead of retried as it is (campaign seed 7340219: the
    retry loop, liveness)."""
    from hmmirror.mm.mprotect import do_mprotect_pkey

    m, p, a = setup()
    drv = DrmGpusvm()
    go(m, p, drv, [("dev0", "device", fault(a, a + L))])
    assert sched.run(do_mprotect_pkey(p.mm, a + 12 * PAGE, 4 * PAGE, 1), p.mm.task) == 0   # PROT_READ
    go(m, p, drv, [("dev0", "device", fault(a + PAGE, a + 2 * PAGE, write=True))])
    assert all(e <= a + 12 * PAGE for _s, e in ranges(drv)), ranges(drv)
    assert drv.pt.get(a + PAGE) == (drv.pt.get(a + PAGE)[0], True)


# --- retry_bound (I5) per GPU fault: a job over many ranges is a series of faults ---------------------------
def _slow_or_busy_hmm(m, mode, calls):
    """A stand-in for hmm_range_fault: ``slow`` takes 300 jiffies per call, then does the real walk; ``busy``
    answers -EBUSY every time (the range kept invalidated)."""
    from hmmirror.mm.hmm import modern as hmm
    real = hmm.hmm_range_fault

    def fake(rng):
        m.log("hmm_range_fault_begin", mm=rng.notifier.mm.name, start=rng.start, end=rng.end)
        calls.append((rng.start, m.jiffies))
        for _ in range(300 if mode == "slow" else 1):
            yield from sched.preempt_point(mode)
        if mode == "busy":
            return -16
        return (yield from real(rng))
    return real, fake


def _run_with_hmm(m, p, drv, mode, task, invariants):
    from hmmirror.mm.hmm import modern as hmm
    calls = []
    real, fake = _slow_or_busy_hmm(m, mode, calls)
    hmm.hmm_range_fault = fake
    try:
        f, _eng = run_tasks(m, drv, p.mm, [("dev0", "device", task)], SwitchListScheduler([]),
                            invariants=invariants)
    finally:
        hmm.hmm_range_fault = real
    return f, calls


def test_a_job_over_many_ranges_that_makes_progress_is_not_a_retry_loop():
    """docs/sim-reproducers/fixed/retry-bound-gpu-fault-73c8d1b9.toml: a 46-page write job over 4K ranges
    with no invalidation at all took 3 s of virtual time (each range's hmm_range_fault is slow), and I5 timed
    the whole job as one fault.  Xe handles a GPU fault per address (xe_svm_handle_pagefault(..., fault_addr)),
    each bounded by its own HMM_RANGE_DEFAULT_TIMEOUT: 16 ranges x 300 jiffies, no call repeated, is clean."""
    from hmmirror.sim.invariants_device import RetryBound

    m, p, a = setup(touch=False)
    drv = DrmGpusvm()
    f, calls = _run_with_hmm(m, p, drv, "slow", fault(a, a + L, write=True), [RetryBound()])
    assert f is None, f.describe()
    assert len(ranges(drv)) == N and calls[-1][1] - calls[0][1] > 3 * 1000     # longer than the bound


def test_a_driver_that_retries_one_address_forever_is_still_caught():
    """The same bound with a driver that calls its per-address handler again for the SAME address whenever it
    fails with -EBUSY (no deadline of its own): the address does not change, the clock keeps running, and
    retry_bound reports it after 3 x HMM_RANGE_DEFAULT_TIMEOUT."""
    from hmmirror.sim.invariants_device import RetryBound

    class RetryForever(DrmGpusvm):
        def xe_svm_handle_pagefault(self, addr, write, devmem):
            while True:                               # BUG: -EBUSY is retried without end
                ret, nxt = yield from DrmGpusvm.xe_svm_handle_pagefault(self, addr, write, devmem)
                if ret != -16:
                    return ret, nxt

    m, p, a = setup()
    drv = RetryForever()
    f, calls = _run_with_hmm(m, p, drv, "busy", fault(a, a + PAGE), [RetryBound()])
    assert f is not None and f.invariant == "retry_bound", f and f.describe()
    assert f.state["elapsed_ms"] > 3 * 1000 and f.location.startswith("drivers.drm_gpusvm."), f.describe()
    assert {s for s, _j in calls} == {a}                                   # one range, retried
    # the real driver gives up: one address, -EBUSY after its one-second timeout, no finding
    m, p, a = setup()
    drv = DrmGpusvm()
    f, _calls = _run_with_hmm(m, p, drv, "busy", fault(a, a + PAGE), [RetryBound()])
    assert f is None, f.describe()
