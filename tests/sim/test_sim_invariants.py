"""Each invariant of the simulator: a deliberately broken toy driver (tests/sim/sim_toy_drivers.py) breaks it,
and the correct toy driver breaks none.

The expectations are the kernel's rules, not captured output: mm-substrate.md §8 (sleeping with a spinlock
held or in a non-blockable callback, balanced locks, lock order), hmm-modern.md §2.1/§5 (the driver lock
serialises the callback and the commit; "Upon return the caller must stop using any SPTEs within this
range"), §4.7 (a successful hmm_range_fault leaves every requested entry valid), mm-substrate.md §3 (pgmap
references), docs/design.md "Data layout" (page counts).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sim_toy_drivers as toy  # noqa: E402

from hmmirror import Machine
from hmmirror.arch.x86.fault import cpu_access
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.mm.mmap import vm_munmap
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.sim.engine import Engine
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

N = 8
L = N * 4096


def setup(kernel: str = "6.18") -> tuple[Machine, object, int]:
    m = Machine(kernel, ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    p.touch(a, L, write=True)
    return m, p, a


def fault_task(start: int, end: int, write: bool = True):
    def factory(run):
        return device_fault(run, start, end, write)
    return factory


def munmap_task(mm, a, n):
    def factory(run):
        return vm_munmap(mm, a, n)
    return factory


def touch_task(mm, a, n, write=True):
    def factory(run):
        def body():
            for x in range(a, a + n, 4096):
                yield from cpu_access(mm, x, write)
            return 0
        return body()
    return factory


def go(drv, tasks, m, p, sched_=None, invariants=None):
    f, eng = run_tasks(m, drv, p.mm, tasks, sched_ or SwitchListScheduler([]), invariants)
    return f


# --- the correct driver ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_good_driver_breaks_nothing(seed):
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.schedulers import RandomScheduler
    m, p, a = setup()
    tasks = [("dev0", "device", fault_task(a, a + L)), ("dev1", "device", fault_task(a, a + L // 2, False)),
             ("cpu0", "cpu", touch_task(p.mm, a, L)), ("cpu1", "cpu", munmap_task(p.mm, a + L // 2, 4096)),
             ("cpu2", "cpu", touch_task(p.mm, a + L // 2, 8192))]
    f = go(toy.GoodMirror(), tasks, m, p, RandomScheduler(SeededChoices(seed)))
    assert f is None, f.describe()


# --- one broken driver per invariant ---------------------------------------------------------------------
def test_coherence():
    # device_reach (I2, at the callback's return) sees this driver first; without it coherence must
    from hmmirror.sim.invariants import default_invariants
    m, p, a = setup()
    invs = [i for i in default_invariants(every_step=True) if i.name != "device_reach"]
    f = go(toy.NoUnmapMirror(), [("dev0", "device", fault_task(a, a + L)),
                                ("cpu0", "cpu", munmap_task(p.mm, a, 4096))], m, p, invariants=invs)
    assert f is not None and f.invariant == "coherence", f and f.describe()
    assert f.addr == a and "after invalidate_range_end" in f.message


def test_device_reach_sees_it_at_the_callback_return():
    m, p, a = setup()
    f = go(toy.NoUnmapMirror(), [("dev0", "device", fault_task(a, a + L)),
                                ("cpu0", "cpu", munmap_task(p.mm, a, 4096))], m, p)
    assert f is not None and f.invariant == "device_reach", f and f.describe()
    assert f.addr == a and f.location.endswith("NoUnmapMirror.invalidate")


def test_commit_invalid():
    m, p, a = setup()
    drv = toy.StaleCommitMirror()
    mm = p.mm

    def tell(run):
        def body():
            vma = mm.vma_lookup(a)
            r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, a, a + 4096)
            yield from mmu_notifier_invalidate_range_start(r)
            drv.go = True                                     # the device commits while it is in flight
            yield from sched.preempt_point("test")
            yield from sched.preempt_point("test")
            yield from mmu_notifier_invalidate_range_end(r)
            return 0
        return body()

    f = go(drv, [("dev0", "device", fault_task(a, a + L)), ("cpu0", "cpu", tell)], m, p)
    assert f is not None and f.invariant == "commit_invalid", f and f.describe()
    assert f.location.endswith("StaleCommitMirror.commit") or "commit" in f.location


def test_result_contract():
    m, p, a = setup()
    f = go(toy.ShortMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "result_contract", f and f.describe()
    assert f.addr == a + L - 4096


def test_sleep_in_atomic_spinlock():
    m, p, a = setup()
    f = go(toy.SpinSleepMirror(), [("dev0", "device", fault_task(a, a + L)),
                                  ("cpu0", "cpu", munmap_task(p.mm, a, 4096))], m, p)
    assert f is not None and f.invariant == "sleep_in_atomic", f and f.describe()


def test_sleep_in_atomic_nonblockable():
    from hmmirror.mm.oom_kill import __oom_reap_task_mm
    m, p, a = setup()

    def reap(run):
        def body():
            yield from sched.down_read(p.mm.mmap_sem)
            yield from __oom_reap_task_mm(p.mm)
            sched.up_read(p.mm.mmap_sem)
            return 0
        return body()

    f = go(toy.BlockingInvalidateMirror(), [("dev0", "device", fault_task(a, a + L)),
                                           ("oom", "kevent:oom_reap", reap)], m, p)
    assert f is not None and f.invariant == "sleep_in_atomic", f and f.describe()
    assert "non-blockable" in f.message and f.kevent == "oom_reap"


def test_locks_balanced():
    m, p, a = setup()
    f = go(toy.LeakLockMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "locks_balanced", f and f.describe()


def test_double_unlock():
    m, p, a = setup()
    f = go(toy.DoubleUnlockMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "double_unlock", f and f.describe()


def test_lock_order():
    m, p, a = setup()
    f = go(toy.InvertedMirror(), [("cpu0", "cpu", munmap_task(p.mm, a, 4096)),
                                 ("dev0", "device", fault_task(a + 4096, a + L))], m, p)
    assert f is not None and f.invariant == "lock_order", f and f.describe()


def test_liveness():
    m, p, a = setup()
    f = go(toy.LivelockMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "liveness", f and f.describe()


def test_no_waker():
    m, p, a = setup()
    f = go(toy.WaitForeverMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "no_waker", f and f.describe()


def test_exception():
    m, p, a = setup()
    f = go(toy.CrashMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "exception", f and f.describe()
    assert "ValueError" in f.message and "CrashMirror.fault" in f.location


def test_page_counts():
    m, p, a = setup()
    f = go(toy.CountCorruptMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "page_counts", f and f.describe()


def test_pgmap_refcount():
    m = Machine("6.18", ram=64 << 20)
    m.add_pmem("pmem1", 16 << 20, "devdax", 2 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    f = go(toy.PgmapLeakMirror(), [("dev0", "device", fault_task(a, a + L))], m, p)
    assert f is not None and f.invariant == "pgmap_refcount", f and f.describe()


def test_device_teardown():
    from hmmirror.drivers.dax.device import dev_dax_unbind
    from hmmirror.mm.memremap import get_dev_pagemap
    m = Machine("6.18", ram=64 << 20)
    m.add_pmem("pmem1", 16 << 20, "devdax", 2 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    dev = m.devices["/dev/dax1.0"]

    def leak(run):                           # a CPU path that pins the pgmap and never lets go
        def body():
            get_dev_pagemap(m, m.pgmaps[0].res.start, None)
            yield from sched.preempt_point("leak")
            return 0
        return body()

    def unbind(run):
        return dev_dax_unbind(dev)

    f = go(toy.GoodMirror(), [("cpu0", "cpu", leak), ("unbind", "kevent:pmem_unbind", unbind)], m, p)
    assert f is not None and f.invariant == "device_teardown", f and f.describe()


def test_deadlock_is_reported_by_the_engine():
    m = Machine("6.18", ram=64 << 20)
    A, B = sched.Lock("A", "mutex"), sched.Lock("B", "mutex")

    def t(first, second):
        yield from sched.mutex_lock(first)
        yield from sched.preempt_point("between")
        yield from sched.mutex_lock(second)
        sched.mutex_unlock(second)
        sched.mutex_unlock(first)

    class RoundRobin:
        def pick(self, engine, runnable):
            return runnable[engine.step % len(runnable)]

    eng = Engine(m, RoundRobin(), [])
    eng.spawn("t0", "cpu", t(A, B))
    eng.spawn("t1", "cpu", t(B, A))
    f = eng.run()
    assert f is not None and f.invariant == "deadlock", f and f.describe()


def test_signature_is_the_cause_not_the_incidentals():
    """One driver mistake reached on different mappings, entries or after different background events is one
    signature; a different function or a different cause named by the model is another."""
    from hmmirror.sim.findings import Finding
    a = Finding("coherence", "m", 1, "dev0", location="drivers.x.invalidate", vma_kind="anon", entry="pte/anon")
    b = Finding("coherence", "m", 1, "dev0", location="drivers.x.invalidate", vma_kind="devdax", entry="pmd/devmap")
    c = Finding("coherence", "m", 1, "dev0", location="drivers.x.invalidate", vma_kind="anon", entry="pte/anon",
                kevent="migrate")
    assert len({a.signature, b.signature, c.signature}) == 1
    d = Finding("coherence", "m", 1, "dev0", location="drivers.x.commit")
    e = Finding("liveness", "m", 1, "dev0", location="mm.hmm.v5_2.hmm_range_fault", detail="refault")
    f = Finding("liveness", "m", 1, "dev0", location="mm.hmm.v5_2.hmm_range_fault", detail="no-fault")
    assert len({a.signature, d.signature, e.signature, f.signature}) == 4
    assert len({a.sig_id, d.sig_id, e.sig_id, f.sig_id}) == 4


def test_driverbase_registers_on_5_2():
    """[5.2] DriverBase binds through hmm_mirror_register; an munmap reaches ``invalidate`` (hmm-5.2.md §3.4)."""
    from hmmirror.sim.driver import DriverBase

    class Counting(DriverBase):
        seen: list = []

        def fault(self, start, end, write):
            return -5
            yield

        def invalidate(self, inv):
            self.seen.append((inv.start, inv.end, inv.blockable))
            self.pt.unmap(inv.start, inv.end)
            return True
            yield

    m, p, a = setup("5.2")
    drv = Counting()
    f = go(drv, [("cpu0", "cpu", munmap_task(p.mm, a, 4096))], m, p)
    assert f is None, f.describe()
    assert drv.mirror is not None and (a, a + 4096, True) in drv.seen
