"""mm_take_all_locks() (mm/vma.c, 6.18) as the kernel takes its locks, and what lockdep makes of them.

The kernel: ``mutex_lock(&mm_all_locks_mutex)``, then the ``i_mmap_rwsem`` of every hugetlb VMA's mapping, then
the ``i_mmap_rwsem`` of every other file VMA's mapping (VMA order, each mapping once: AS_MM_ALL_LOCKS), all
with ``down_write_nest_lock(..., &mm->mmap_lock)``.  Its comment: "We can take all locks within these types
randomly because the VM code doesn't nest them and we protected from parallel mm_take_all_locks() by
mm_all_locks_mutex."  lockdep classes: every mapping's ``i_mmap_rwsem`` is one class (the init_rwsem() of
__address_space_init_once), hugetlbfs inodes get ``hugetlbfs_i_mmap_rwsem_key`` (fs/hugetlbfs/inode.c), which
mm/rmap.c orders before ``mapping->i_mmap_rwsem``.

The worked-example campaign (seed 71329) reported ``lock_order|mm.mmu_notifier.mm_take_all_locks|-``: the model
took the locks in plain VMA order (a file below the hugetlb VMA before it) and classed each file's rwsem apart.
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.kernel import sched
from hmmirror.mm.mmu_notifier import (MmuIntervalNotifier, MmuIntervalNotifierOps, mm_drop_all_locks,
                                      mm_take_all_locks, mmu_interval_notifier_insert)
from hmmirror.sim.invariants import LockDiscipline
from hmmirror.sim.runner import run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096
MB2 = 2 << 20


class _LockSpy:
    """Records every lock acquisition point (task, lock name) of a run."""

    name = "lock_spy"

    def __init__(self) -> None:
        self.taken: list[tuple[str, str]] = []
        self.held: list[list[str]] = []            # what the task held when it asked for that lock

    def after_step(self, eng, st, point) -> None:
        if point is not None and point.kind == "lock":
            self.taken.append((st.name, point.obj.name))
            self.held.append([h.name for h in st.task.held])


class _Ops(MmuIntervalNotifierOps):
    def invalidate(self, sub, r, cur_seq):
        return True
        yield


def _machine() -> Machine:
    m = Machine("6.18", ram=64 << 20, hugepages_2m=4)
    m.mount("/mnt/e", "ext4")
    m.mount("/mnt/x", "xfs")
    m.create_file("/mnt/e/f", 16 * PAGE)
    m.create_file("/mnt/x/g", 16 * PAGE)
    return m


def _file_then_hugetlb() -> tuple[Machine, object, int]:
    """A process mapping ext4 f at ``base`` and a hugetlb VMA at ``base + 2M``."""
    m = _machine()
    p = m.spawn("p")
    base = 0x7f0000000000
    p.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/e/f", addr=base)
    p.mmap(MB2, "rw", ("private", "anonymous", "hugetlb"), addr=base + MB2)
    return m, p, base


def test_hugetlb_mappings_first_then_the_others_in_vma_order_each_once_under_the_mutex():
    # VMA order (address): ext4 f, hugetlb, xfs g, ext4 f again (a second VMA of the same file)
    m, p, base = _file_then_hugetlb()
    p.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/x/g", addr=base + 2 * MB2)
    p.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/e/f", addr=base + 3 * MB2)
    hugetlb = p.mm.vma_lookup(base + MB2).vm_file.inode.i_mapping.i_mmap_rwsem.name
    spy = _LockSpy()

    def taker(run):
        yield from sched.down_write(p.mm.mmap_sem)
        locks = yield from mm_take_all_locks(p.mm)
        mm_drop_all_locks(locks)
        sched.up_write(p.mm.mmap_sem)

    f, _eng = run_tasks(m, None, p.mm, [("t", "cpu", taker)], invariants=[spy, LockDiscipline()], bind=False)
    assert f is None, f.describe()
    assert [name for _t, name in spy.taken] == [
        "p.mmap_lock", hugetlb, "/mnt/e/f.i_mmap_rwsem", "/mnt/x/g.i_mmap_rwsem"]
    assert spy.held[1] == ["p.mmap_lock", "mm_all_locks_mutex"]      # uncontended: taken without a sleep
    assert spy.held[3] == ["p.mmap_lock", "mm_all_locks_mutex", hugetlb, "/mnt/e/f.i_mmap_rwsem"]
    assert not m.mm_all_locks_mutex.is_locked()
    assert not p.mm.vma_lookup(base).vm_file.inode.i_mapping.i_mmap_rwsem.is_locked()


def test_two_mms_registering_with_files_in_opposite_orders_is_no_lock_order_finding():
    # mm a maps ext4 f below xfs g, mm b the other way round; both insert their first interval subscription
    # (mmu_notifier_register(NULL, mm) -> mm_take_all_locks) at once.  The kernel: no deadlock (the mutex),
    # no lockdep report (one i_mmap_rwsem class, nested under the mmap lock).
    m = _machine()
    a, b = m.spawn("a"), m.spawn("b")
    base = 0x7f0000000000
    a.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/e/f", addr=base)
    a.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/x/g", addr=base + MB2)
    b.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/x/g", addr=base)
    b.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/e/f", addr=base + MB2)
    spy = _LockSpy()
    done = []

    def inserter(proc):
        def task(run):
            ret = yield from mmu_interval_notifier_insert(MmuIntervalNotifier(), proc.mm, base, 16 * PAGE, _Ops())
            done.append((proc.mm.name, ret))
        return task

    # alternate one step each: both are inside mmu_interval_notifier_insert before either is done
    f, _eng = run_tasks(m, None, a.mm, [("ta", "cpu", inserter(a)), ("tb", "cpu", inserter(b))],
                        SwitchListScheduler([(1, 1)] * 40), invariants=[spy, LockDiscipline()], bind=False)
    assert f is None, f.describe()
    assert sorted(done) == [("a", 0), ("b", 0)]
    # the mutex serialises them: all of one task's i_mmap_rwsem acquisitions come before the other's
    owners = [t for t, name in spy.taken if name.endswith("i_mmap_rwsem")]
    assert owners in (["ta", "ta", "tb", "tb"], ["tb", "tb", "ta", "ta"]), spy.taken
    assert a.mm.notifier_subscriptions.has_itree and b.mm.notifier_subscriptions.has_itree


def test_hugetlb_and_file_rwsem_in_opposite_orders_is_still_a_lock_order_finding():
    # hugetlbfs_i_mmap_rwsem_key is a class of its own: taking it under a file's i_mmap_rwsem in one task
    # and the other way round in another is lockdep's AB-BA (mm/rmap.c orders hugetlb first)
    m, p, base = _file_then_hugetlb()
    fl = p.mm.vma_lookup(base).vm_file.inode.i_mapping.i_mmap_rwsem
    hl = p.mm.vma_lookup(base + MB2).vm_file.inode.i_mapping.i_mmap_rwsem

    def nest(first, second):
        def task(run):
            yield from sched.down_write(first)
            yield from sched.down_write(second)
            sched.up_write(second)
            sched.up_write(first)
        return task

    f, _eng = run_tasks(m, None, p.mm, [("t1", "cpu", nest(hl, fl)), ("t2", "cpu", nest(fl, hl))],
                        SwitchListScheduler([(10, 10)]), invariants=[LockDiscipline()], bind=False)
    assert f is not None and f.invariant == "lock_order", f
