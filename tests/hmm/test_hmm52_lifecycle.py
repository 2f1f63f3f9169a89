"""struct hmm lifetime, mirror/range registration, the notifier paths and the old-API inlines [5.2].

Expected values: hmm-5.2.md §2 (return codes), §3.1-§3.5 (lifetime, registration, the path table of
hmm_invalidate_range_start, range.valid transitions), §10 (DMA), §11 (hmm_vma_fault / hmm_vma_range_done).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import (  # noqa: E402
    BASE,
    K,
    NONE,
    VALID,
    WRITE,
    add_vma,
    ent,
    machine,
    new_registered_range,
    normal_pte,
    out,
    register_mirror,
    set_pte,
    under_read,
)
from hmmirror.include.mm_types import MMU_NOTIFIER_RANGE_BLOCKABLE, MMU_NOTIFY  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.hmm import hmm_api_version, hmm_module  # noqa: E402
from hmmirror.mm.hmm import v5_2 as hmm  # noqa: E402
from hmmirror.mm.mmu_notifier import MmuNotifierRange, mmu_notifier_release  # noqa: E402
from hmmirror.mm.page_alloc import PG  # noqa: E402


class RecOps(hmm.HmmMirrorOps):
    """Mirror ops recording the calls; ``answer`` is what sync returns."""

    def __init__(self, log: list, name: str, answer: int = 0) -> None:
        self.log, self.name, self.answer = log, name, answer

    def sync_cpu_device_pagetables(self, mirror, update):
        self.log.append(("sync", self.name, update.start, update.end, update.blockable, int(update.event)))
        return self.answer
        yield

    def release(self, mirror):
        self.log.append(("release", self.name))
        return
        yield


@pytest.fixture
def env():
    m = machine()
    p = m.spawn("p")
    add_vma(m, p.mm, BASE, 64 * K)
    return m, p.mm


def reg(mm, mirror):
    def body():
        yield from sched.down_write(mm.mmap_sem)
        ret = yield from hmm.hmm_mirror_register(mirror, mm)
        sched.up_write(mm.mmap_sem)
        return ret
    return sched.run(body(), mm.task)


def run(mm, gen):
    return sched.run(gen, mm.task)


def start_end(mm, start, end, blockable=True):
    """One hmm_invalidate_range_start call (as the notifier core makes it); returns its result."""
    r = MmuNotifierRange(mm, start, end, MMU_NOTIFY.CLEAR, MMU_NOTIFIER_RANGE_BLOCKABLE if blockable else 0)
    mn = mm.hmm.mmu_notifier
    task = mm.task
    task.atomic += not blockable
    try:
        return run(mm, hmm.hmm_invalidate_range_start(mn, r)), r
    finally:
        task.atomic -= not blockable


def end(mm, r):
    run(mm, hmm.hmm_invalidate_range_end(mm.hmm.mmu_notifier, r))


def hold(lock, write=True):
    """Make another task hold ``lock``."""
    other = sched.Task("other")
    if lock.kind == "rwsem" and not write:
        sched.run(sched.down_read(lock), other)
    else:
        sched.run(sched.down_write(lock) if lock.kind == "rwsem" else sched.mutex_lock(lock), other)
    return other


# --- module selection ------------------------------------------------------------------------------------
def test_profile_selects_the_5_2_module(env) -> None:
    m, _ = env
    assert hmm_module(m) is hmm
    assert hmm_api_version(m) == "5.2"


# --- registration -----------------------------------------------------------------------------------------
def test_mirror_register_return_codes(env) -> None:
    m, mm = env
    assert run(mm, hmm.hmm_mirror_register(None, mm)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_mirror_register(hmm.HmmMirror(None), mm)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_mirror_register(hmm.HmmMirror(RecOps([], "a")), None)) == -hmm.EINVAL
    mirror = hmm.HmmMirror(RecOps([], "a"))
    assert reg(mm, mirror) == 0
    assert mm.hmm is mirror.hmm and mirror.hmm.kref == 1
    assert mm.hmm.mmu_notifier in mm.notifier_subscriptions.list
    assert hmm.hmm_mirror_mm_is_alive(mirror)


def test_kref_lifetime_and_hmm_free(env) -> None:
    m, mm = env
    count0 = mm.mm_count
    mirror = hmm.HmmMirror(RecOps([], "a"))
    reg(mm, mirror)
    h = mm.hmm
    assert mm.mm_count == count0 + 1                          # __mmu_notifier_register: mmgrab
    r = hmm.new_range(BASE, BASE + 4 * K)
    assert run(mm, hmm.hmm_range_register(r, mm, r.start, r.end, 12)) == 0
    assert h.kref == 2 and r.valid and r in h.ranges
    run(mm, hmm.hmm_range_unregister(r))
    assert h.kref == 1 and not r.valid and r.hmm is None and r not in h.ranges
    run(mm, hmm.hmm_range_unregister(r))                      # not registered: no-op
    assert h.kref == 1
    run(mm, hmm.hmm_mirror_unregister(mirror))
    # §3.1 hmm_free: notifier unlinked (mmdrop), mm.hmm cleared, kfree
    assert h.kref == 0 and h.freed and mm.hmm is None
    assert h.mmu_notifier not in mm.notifier_subscriptions.list
    assert mm.mm_count == count0
    assert not hmm.hmm_mirror_mm_is_alive(mirror)


def test_range_register_return_codes(env) -> None:
    m, mm = env
    register_mirror(mm)
    r = hmm.new_range(BASE, BASE + 4 * K)
    assert run(mm, hmm.hmm_range_register(r, mm, BASE + 1, BASE + 4 * K, 12)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_range_register(r, mm, BASE, BASE + 4 * K + 8, 12)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_range_register(r, mm, BASE + K, BASE + K, 12)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_range_register(r, mm, BASE + K, BASE, 12)) == -hmm.EINVAL
    assert run(mm, hmm.hmm_range_register(r, mm, BASE + K, BASE + (2 << 20), 21)) == -hmm.EINVAL
    assert r.valid is False and r.hmm is None
    mm.hmm.dead = True
    kref = mm.hmm.kref
    assert run(mm, hmm.hmm_range_register(r, mm, BASE, BASE + 4 * K, 12)) == -hmm.EFAULT
    assert mm.hmm.kref == kref                                # the reference taken is put again


# --- hmm_invalidate_range_start: the path table of §3.4 ---------------------------------------------------
def two_mirrors(mm, answer_new=0):
    log: list = []
    old = hmm.HmmMirror(RecOps(log, "old"), name="old")
    new = hmm.HmmMirror(RecOps(log, "new", answer_new), name="new")
    reg(mm, old)
    reg(mm, new)
    return log


def test_blockable_path(env) -> None:
    m, mm = env
    log = two_mirrors(mm, answer_new=-hmm.EAGAIN)
    r_in = new_registered_range(mm, BASE + 4 * K, BASE + 8 * K, name="in")
    r_touch = new_registered_range(mm, BASE + 8 * K, BASE + 12 * K, name="touch")     # starts at update.end
    r_after = new_registered_range(mm, BASE + 12 * K, BASE + 16 * K, name="after")
    r_before = new_registered_range(mm, BASE, BASE + 4 * K, name="before")           # ends at update.start
    kref = mm.hmm.kref
    ret, nr = start_end(mm, BASE + 4 * K, BASE + 8 * K)
    assert ret == 0
    assert mm.hmm.notifiers == 1
    # overlap test: skip if update.end < r.start or update.start >= r.end (end == r.start overlaps)
    assert (r_in.valid, r_touch.valid, r_after.valid, r_before.valid) == (False, False, True, True)
    # all mirrors, newest first; return values not inspected when blockable
    assert [e[:2] for e in log] == [("sync", "new"), ("sync", "old")]
    assert log[0][2:] == (BASE + 4 * K, BASE + 8 * K, True, int(hmm.HMM_UPDATE_INVALIDATE))
    assert mm.hmm.kref == kref
    end(mm, nr)
    assert mm.hmm.notifiers == 0 and r_in.valid and r_touch.valid
    assert len(log) == 2                                      # mirrors are not called from range_end


def test_nonblockable_path_a_lock_busy(env) -> None:
    m, mm = env
    log = two_mirrors(mm)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    other = hold(mm.hmm.lock)
    kref = mm.hmm.kref
    ret, _ = start_end(mm, BASE, BASE + 4 * K, blockable=False)
    assert ret == -hmm.EAGAIN
    assert mm.hmm.notifiers == 0 and r.valid and log == [] and mm.hmm.kref == kref
    assert other.held == [mm.hmm.lock]


def test_nonblockable_path_b_mirrors_sem_busy(env) -> None:
    m, mm = env
    log = two_mirrors(mm)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    hold(mm.hmm.mirrors_sem, write=True)
    ret, _ = start_end(mm, BASE, BASE + 4 * K, blockable=False)
    assert ret == -hmm.EAGAIN
    # counted and invalidated, no mirror called: with -EAGAIN the core calls no range_end, so the count
    # never returns to 0 and the range stays invalid (§3.4, §3.5)
    assert mm.hmm.notifiers == 1 and not r.valid and log == []


def test_nonblockable_path_c_mirror_eagain_returns_zero(env) -> None:
    m, mm = env
    log = two_mirrors(mm, answer_new=-hmm.EAGAIN)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    ret, _ = start_end(mm, BASE, BASE + 4 * K, blockable=False)
    # the loop's block-local ret is set; the function returns its own ret = 0 (C variable shadowing)
    assert ret == 0
    assert mm.hmm.notifiers == 1 and not r.valid
    assert [e[:2] for e in log] == [("sync", "new")]          # up to and including that mirror
    assert not mm.hmm.mirrors_sem.is_locked()


def test_nonblockable_no_eagain_calls_all(env) -> None:
    m, mm = env
    log = two_mirrors(mm)
    ret, _ = start_end(mm, BASE, BASE + 4 * K, blockable=False)
    assert ret == 0 and [e[1] for e in log] == ["new", "old"] and log[0][4] is False


def test_nested_invalidations_share_the_counter(env) -> None:
    m, mm = env
    register_mirror(mm)
    r1 = new_registered_range(mm, BASE, BASE + 4 * K, name="r1")
    r2 = new_registered_range(mm, BASE + 32 * K, BASE + 36 * K, name="r2")
    _, a = start_end(mm, BASE, BASE + 4 * K)
    _, b = start_end(mm, BASE + 32 * K, BASE + 33 * K)
    assert mm.hmm.notifiers == 2 and not r1.valid and not r2.valid
    # a range registered while notifiers != 0 starts invalid
    r3 = new_registered_range(mm, BASE + 48 * K, BASE + 52 * K, name="r3")
    assert not r3.valid
    end(mm, a)
    assert mm.hmm.notifiers == 1 and not r1.valid and not r2.valid and not r3.valid
    wakeups = mm.hmm.wq_wakeups
    end(mm, b)
    # the end bringing notifiers to 0 validates every registered range and wakes the waiters
    assert mm.hmm.notifiers == 0 and r1.valid and r2.valid and r3.valid
    assert mm.hmm.wq_wakeups == wakeups + 1


def test_invalidation_through_the_substrate(env) -> None:
    m, mm = env
    from hmmirror.process import Process

    p = Process(m, mm)
    log = two_mirrors(mm)
    a = p.mmap(8 * K, "rw")
    p.touch(a, 8 * K, write=True)
    r = new_registered_range(mm, a, a + 8 * K)
    p.munmap(a + 2 * K, K)
    assert [e for e in log if e[0] == "sync"][0][2:5] == (a + 2 * K, a + 3 * K, True)
    assert r.valid                                            # range_end brought notifiers back to 0
    names = [e["what"] for e in m.events if e["what"].startswith("hmm_invalidate")]
    assert names[-2:] == ["hmm_invalidate_range_start", "hmm_invalidate_range_end"]


# --- waiting -------------------------------------------------------------------------------------------
def test_wait_until_valid(env) -> None:
    m, mm = env
    register_mirror(mm)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    assert run(mm, hmm.hmm_range_wait_until_valid(r, 10)) is True
    _, nr = start_end(mm, BASE, BASE + K)
    # nobody ends the invalidation: the timed wait expires and returns the current (false) valid
    assert run(mm, hmm.hmm_range_wait_until_valid(r, 10)) is False
    # an invalidation ending while the waiter sleeps wakes it with valid = True
    from hmm52_helpers import Stepper

    st = Stepper(hmm.hmm_range_wait_until_valid(r, 1000), mm.task)
    st.step()
    st.step()
    end(mm, nr)
    assert st.finish() is True
    # hmm dead: False and valid cleared
    mm.hmm.dead = True
    assert run(mm, hmm.hmm_range_wait_until_valid(r, 10)) is False and r.valid is False


# --- release ---------------------------------------------------------------------------------------------
def test_release_marks_dead_and_calls_mirror_release(env) -> None:
    m, mm = env
    log = two_mirrors(mm)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    h = mm.hmm
    mirrors = list(h.mirrors)
    run(mm, mmu_notifier_release(mm))
    # §3.4 hmm_release: dead, every range invalid, mirrors detached, release called newest first
    assert h.dead and not r.valid and h.mirrors == []
    assert log == [("release", "new"), ("release", "old")]
    assert not hmm.hmm_mirror_mm_is_alive(mirrors[0])
    assert under_read(mm, hmm.hmm_range_snapshot(r)) == -hmm.EFAULT
    assert under_read(mm, hmm.hmm_range_fault(r, True)) == -hmm.EFAULT
    # kref: 1 per mirror + 1 for the range, the release's own reference put again
    assert h.kref == 3
    for mirror in mirrors:
        run(mm, hmm.hmm_mirror_unregister(mirror))
    run(mm, hmm.hmm_range_unregister(r))
    assert h.freed and mm.hmm is None


def test_hmm_mm_destroy(env) -> None:
    m, mm = env
    register_mirror(mm)
    h = mm.hmm
    run(mm, hmm.hmm_mm_destroy(mm))
    assert mm.hmm is None and h.mm is None and h.dead and h.kref == 1


# --- old API inlines (§11) ---------------------------------------------------------------------------------
def test_hmm_vma_fault_and_range_done(env) -> None:
    m, mm = env
    register_mirror(mm)
    ram = m.mem.alloc_page()
    set_pte(m, mm, BASE, normal_pte(ram))
    vma = mm.find_vma(BASE)
    r = hmm.new_range(BASE, BASE + 2 * K)
    r.vma = vma
    r.pfns[:] = [VALID, 0]
    r.default_flags, r.pfn_flags_mask = VALID | WRITE, 0      # overwritten by the inline

    def body():
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from hmm.hmm_vma_fault(r, True)
        held = mm.mmap_sem.held_by(mm.task)
        if held:
            sched.up_read(mm.mmap_sem)
        return ret, held

    assert sched.run(body(), mm.task) == (0, True)
    assert r.default_flags == 0 and r.pfn_flags_mask == (1 << 64) - 1
    assert out(r) == [ent(ram, write=True), NONE] and r in mm.hmm.ranges
    assert run(mm, hmm.hmm_vma_range_done(r)) is True
    assert r not in mm.hmm.ranges and not r.valid
    # a fault result of 0 (no request on an unpopulated page: last = the hole start) -> -EBUSY, mmap_sem
    # released, range unregistered
    far = BASE + (4 << 20)                                    # another PMD chunk: no page table at all
    r2 = hmm.new_range(far, far + 4 * K)
    r2.vma = add_vma(m, mm, far, 4 * K)
    assert sched.run(_vma_fault(mm, r2), mm.task) == (-hmm.EBUSY, False)
    assert r2 not in mm.hmm.ranges


def _vma_fault(mm, r):
    yield from sched.down_read(mm.mmap_sem)
    ret = yield from hmm.hmm_vma_fault(r, True)
    held = mm.mmap_sem.held_by(mm.task)
    if held:
        sched.up_read(mm.mmap_sem)
    return ret, held


# --- DMA (§10) -------------------------------------------------------------------------------------------
def test_dma_map_and_unmap(env) -> None:
    m, mm = env
    register_mirror(mm)
    p1, p2 = m.mem.alloc_page(), m.mem.alloc_page()
    set_pte(m, mm, BASE, normal_pte(p1, write=True))
    set_pte(m, mm, BASE + 2 * K, normal_pte(p2, write=False))
    r = new_registered_range(mm, BASE, BASE + 3 * K)
    r.pfns[:] = [VALID, 0, VALID]
    r.pfn_flags_mask = (1 << 64) - 1
    dev = hmm.DmaDevice("gpu")
    daddrs = np.full(3, 7, dtype=np.uint64)
    assert under_read(mm, hmm.hmm_range_dma_map(r, dev, daddrs, True)) == 2
    assert daddrs[1] == 0 and daddrs[0] != 0 and daddrs[2] != 0
    assert dev.mappings[int(daddrs[0])] == (p1, hmm.DMA_BIDIRECTIONAL)
    assert dev.mappings[int(daddrs[2])] == (p2, hmm.DMA_TO_DEVICE)
    assert hmm.hmm_range_dma_unmap(r, None, dev, daddrs, True) == 2
    assert dev.mappings == {} and out(r) == [NONE] * 3 and not daddrs.any()
    assert m.mem.flags[p1] & PG.dirty and not m.mem.flags[p2] & PG.dirty
    assert hmm.hmm_range_dma_unmap(r, None, dev, None, True) == -hmm.EINVAL


def test_dma_map_error_unwinds(env) -> None:
    m, mm = env
    register_mirror(mm)
    for i in range(3):
        set_pte(m, mm, BASE + i * K, normal_pte(m.mem.alloc_page()))
    r = new_registered_range(mm, BASE, BASE + 3 * K)
    r.pfns[:] = VALID
    r.pfn_flags_mask = (1 << 64) - 1
    dev = hmm.DmaDevice("gpu", fail_after=2)
    daddrs = np.zeros(3, dtype=np.uint64)
    assert under_read(mm, hmm.hmm_range_dma_map(r, dev, daddrs, True)) == -hmm.EFAULT
    assert dev.mappings == {}                                 # the two mapped pages were unmapped
    # a fault count of 0 -> -EBUSY
    far = BASE + (4 << 20)                                    # no page table: count 0
    add_vma(m, mm, far, K)
    r2 = new_registered_range(mm, far, far + K, name="r2")
    assert under_read(mm, hmm.hmm_range_dma_map(r2, dev, np.zeros(1, dtype=np.uint64), True)) == -hmm.EBUSY



# --- reading side by side with the kernel files -----------------------------------------------------------
def test_every_function_names_its_kernel_function() -> None:
    import inspect

    from hmmirror.mm import pagewalk_v5_2

    for mod in (hmm, pagewalk_v5_2):
        for name, f in vars(mod).items():
            if not inspect.isfunction(f) or f.__module__ != mod.__name__ or name.startswith("_"):
                continue
            first = (f.__doc__ or "").strip().splitlines()[0]
            assert first.startswith(f.__name__) or first.startswith("Ours"), (mod.__name__, name, first)
