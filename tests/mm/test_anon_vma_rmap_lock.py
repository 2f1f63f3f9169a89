"""The anon_vma root rwsem between anonymous rmap walks and mm_take_all_locks() (6.18).

Kernel: an rmap walk of an anonymous folio -- reclaim's ``try_to_unmap``, migration's ``try_to_migrate`` and
``remove_migration_ptes``, memory failure's ``collect_procs_anon`` / ``try_to_unmap`` -- runs
``rmap_walk_anon()``, which holds ``anon_vma->root->rwsem`` for read across every ``*_one()`` callback and so
across each page's ``mmu_notifier_invalidate_range_start/end`` (mm/rmap.c).  ``mm_take_all_locks()`` (mm/vma.c),
called by ``__mmu_notifier_register()`` when an mm gets its first interval subscription, takes that rwsem of
every anon VMA of the mm for write (``vm_lock_anon_vma()``), after the mutex and the ``i_mmap_rwsem``s.  So an
unmap that began before the mm had an interval tree has ended before the first subscription goes in
("We can't race against any other mmu notifier method either thanks to mm_take_all_locks()").

Found by a blind 10-minute campaign of docs/simulator.md's worked example (6.18 seed 39181): the model had no
anon_vma locks, the driver registered inside reclaim's invalidation window, and the end never told it
(docs/sim-reproducers/fixed/coherence-get-pages-anon-vma-register-f7e61dc5.toml).
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.kernel import sched
from hmmirror.mm import rmap
from hmmirror.mm.mmu_notifier import (MmuIntervalNotifier, MmuIntervalNotifierOps, mm_drop_all_locks,
                                      mm_take_all_locks, mmu_interval_notifier_insert)
from hmmirror.mm.swap import model_swap_out
from hmmirror.sim.invariants import LockDiscipline
from hmmirror.sim.runner import run_tasks

PAGE = 4096
EBUSY = 16


class _Ops(MmuIntervalNotifierOps):
    def invalidate(self, sub, r, cur_seq):
        return True
        yield


class _SwitchInsideRange:
    """Scripted schedule: run the first task until the machine logs an ``invalidate_range_start``, then give
    the second task every step it can take (the first runs only while the second is blocked)."""

    name = "inside_range"

    def __init__(self, machine: Machine, first: str, second: str) -> None:
        self.m, self.first, self.second = machine, first, second
        self.since = len(machine.events)

    def pick(self, engine, runnable):
        started = any(e["what"] == "invalidate_range_start" for e in self.m.events[self.since:])
        want = self.second if started else self.first
        for t in runnable:
            if t.name == want:
                return t
        return runnable[0]


def _anon_process(m: Machine, name: str = "p", pages: int = 16):
    p = m.spawn(name)
    a = p.mmap(pages * PAGE, "rw", ("private", "anonymous"))
    p.touch(a, pages * PAGE, write=True)
    return p, a


def _race(m, p, a, walker):
    """``walker`` (an rmap walk of the page at ``a``) runs until inside its invalidation, then the first
    interval subscription of ``p``'s mm is inserted.  Returns the order of what happened and the names of the
    machine's log records from the race on (invalidations and the insert)."""
    since = len(m.events)
    order: list = []

    def kthread(run):
        order.append("walk begins")
        ret = yield from walker()
        order.append(("walk ends", ret))

    def inserter(run):
        ret = yield from mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, a, 16 * PAGE, _Ops())
        order.append(("inserted", ret))

    assert p.mm.notifier_subscriptions is None or not p.mm.notifier_subscriptions.has_itree
    f, _eng = run_tasks(m, None, p.mm, [("ev0", "kevent:walk", kthread), ("cpu0", "cpu", inserter)],
                        _SwitchInsideRange(m, "ev0", "cpu0"), invariants=[LockDiscipline()], bind=False)
    assert f is None, f.describe()
    log = [e["what"] for e in m.events[since:]
           if e["what"] in ("invalidate_range_start", "invalidate_range_end", "mmu_interval_notifier_insert")]
    return order, log


def test_first_interval_subscription_waits_for_reclaim_of_an_anonymous_page():
    m = Machine("6.18", ram=64 << 20)
    p, a = _anon_process(m)
    order, log = _race(m, p, a, lambda: model_swap_out(p.mm, a + 3 * PAGE))
    # before the fix: ["walk begins", ("inserted", 0), ("walk ends", 0)] -- registered inside the window
    assert order == ["walk begins", ("walk ends", 0), ("inserted", 0)], order
    assert log == ["invalidate_range_start", "invalidate_range_end", "mmu_interval_notifier_insert"], log
    assert p.mm.notifier_subscriptions.has_itree
    assert m.counters["pswpout"] == 1
    assert not p.mm.vma_lookup(a).anon_vma.rwsem.is_locked()


def test_first_interval_subscription_waits_for_migration_of_an_anonymous_page():
    from hmmirror.sim.kevents import migrate_page      # (after hmmirror.sim.runner: kevents <-> scenario)

    m = Machine("6.18", ram=64 << 20)
    p, a = _anon_process(m)
    order, log = _race(m, p, a, lambda: migrate_page(p.mm, a + 5 * PAGE, 2))
    # try_to_migrate()'s walk (and its invalidation) ends before the insert; the copy and the remap walk
    # (remove_migration_ptes: no invalidation, the migration entry was not present) may run after it
    assert log == ["invalidate_range_start", "invalidate_range_end", "mmu_interval_notifier_insert"], log


def test_reclaim_in_a_fork_child_holds_the_shared_root_against_the_parent_registering():
    # fork: the child's anon_vma hangs off the parent's root (anon_vma_fork), and rmap_walk_anon() locks the
    # root: the child's reclaim holds the rwsem mm_take_all_locks() of the parent needs for write
    m = Machine("6.18", ram=64 << 20)
    p, a = _anon_process(m)
    c = p.fork("c")
    pv, cv = p.mm.vma_lookup(a), c.mm.vma_lookup(a)
    assert pv.anon_vma is not None and cv.anon_vma.root is pv.anon_vma.root
    c.touch(a + 2 * PAGE, PAGE, write=True)           # the child's own COW copy: reclaimable (mapped once)
    order, log = _race(m, p, a, lambda: model_swap_out(c.mm, a + 2 * PAGE))
    assert order == ["walk begins", ("walk ends", 0), ("inserted", 0)], order
    assert log == ["invalidate_range_start", "invalidate_range_end", "mmu_interval_notifier_insert"], log


def test_mm_take_all_locks_takes_each_anon_vma_root_once_after_the_i_mmap_rwsems():
    m = Machine("6.18", ram=64 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 16 * PAGE)
    p = m.spawn("p")
    base = 0x7f0000000000
    p.mmap(16 * PAGE, "rw", ("private", "anonymous"), addr=base)
    p.mmap(16 * PAGE, "rw", ("private",), file="/mnt/e/f", addr=base + (2 << 20))
    p.mmap(16 * PAGE, "rw", ("private", "anonymous"), addr=base + (4 << 20))
    p.touch(base, 16 * PAGE, write=True)
    p.touch(base + (2 << 20), PAGE, write=True)      # a COW copy: the private file VMA gets an anon_vma too
    p.touch(base + (4 << 20), PAGE, write=True)
    assert p.mprotect(base + 4 * PAGE, 4 * PAGE, "r") == 0     # split: three VMAs, one anon_vma family
    vmas = [v for v in p.mm.vmas if v.anon_vma is not None]
    assert len(vmas) == 5
    roots = []
    for v in vmas:
        if v.anon_vma.root.rwsem not in roots:
            roots.append(v.anon_vma.root.rwsem)
    assert len(roots) == 3
    got = []

    def taker(run):
        yield from sched.down_write(p.mm.mmap_sem)
        locks = yield from mm_take_all_locks(p.mm)
        got.extend(locks)
        assert all(lk.owner is sched.current() for lk in locks)
        mm_drop_all_locks(locks)
        sched.up_write(p.mm.mmap_sem)

    f, _eng = run_tasks(m, None, p.mm, [("t", "cpu", taker)], invariants=[LockDiscipline()], bind=False)
    assert f is None, f.describe()
    f_rwsem = p.mm.vma_lookup(base + (2 << 20)).vm_file.inode.i_mapping.i_mmap_rwsem
    assert got == [m.mm_all_locks_mutex, f_rwsem] + roots
    assert not any(r.is_locked() for r in roots)


def test_reclaim_leaves_the_page_mapped_while_mm_take_all_locks_holds_its_anon_vma():
    # folio_referenced() only trylocks the anon_vma (rwc.try_lock): contended, the folio is activated, not
    # unmapped -- no invalidation at all
    m = Machine("6.18", ram=64 << 20)
    p, a = _anon_process(m)
    av = p.mm.vma_lookup(a).anon_vma
    writer = sched.Task("registrar")
    prev = sched.set_current(writer)
    try:
        sched.run(rmap.anon_vma_lock_write(av))
    finally:
        sched.set_current(prev)
    n = len(m.events)
    assert sched.run(model_swap_out(p.mm, a), sched.Task("kswapd", "kthread")) == -EBUSY
    assert not any(e["what"] == "invalidate_range_start" for e in m.events[n:])
    assert m.counters["pswpout"] == 0


def test_a_classic_notifier_registering_during_reclaim_never_sees_an_end_without_its_start():
    # __mmu_notifier_register() ([5.2] do_mmu_notifier_register, [6.x]) links the subscriber under
    # mm_take_all_locks(): the reclaim's walk (anon_vma held for read across its start/end) ends first
    from hmmirror.mm.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_register

    calls: list = []

    class Ops(MmuNotifierOps):
        def invalidate_range_start(self, mn, r):
            calls.append("start")
            return 0
            yield

        def invalidate_range_end(self, mn, r):
            calls.append("end")
            return
            yield

    for kernel in ("5.2", "6.18"):
        m = Machine(kernel, ram=64 << 20)
        p, a = _anon_process(m)
        since = len(m.events)
        order: list = []

        def kthread(run, p=p, a=a, order=order):
            order.append("walk begins")
            ret = yield from model_swap_out(p.mm, a + 3 * PAGE)
            order.append(("walk ends", ret))

        def registrar(run, p=p, order=order):
            ret = yield from mmu_notifier_register(MmuNotifier(Ops()), p.mm)
            order.append(("registered", ret))

        calls.clear()
        f, _eng = run_tasks(m, None, p.mm, [("ev0", "kevent:walk", kthread), ("cpu0", "cpu", registrar)],
                            _SwitchInsideRange(m, "ev0", "cpu0"), invariants=[LockDiscipline()], bind=False)
        assert f is None, f.describe()
        assert order == ["walk begins", ("walk ends", 0), ("registered", 0)], (kernel, order)
        assert calls == [], (kernel, calls)
        log = [e["what"] for e in m.events[since:]
               if e["what"] in ("invalidate_range_start", "invalidate_range_end", "mmu_notifier_register")]
        assert log == ["invalidate_range_start", "invalidate_range_end", "mmu_notifier_register"], (kernel, log)
