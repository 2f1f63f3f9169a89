"""The first interval subscription of an mm registers the subscriptions object through
``__mmu_notifier_register(NULL, mm)``, which calls ``mm_take_all_locks(mm)`` with the mmap lock held for write
(mm/mmu_notifier.c: "We can't race against any other mmu notifier method either thanks to
mm_take_all_locks()").  ``mm_take_all_locks`` takes the ``i_mmap_rwsem`` of every file VMA's mapping for write
(mm/vma.c), and ``unmap_mapping_pages`` holds that rwsem around its zap and the zap's invalidation
(mm/memory.c).  So an unmap of a file mapped in the mm that began before the mm had an interval tree (its
``invalidate_range_start`` counted in no ``active_invalidate_ranges``) has ended before the first subscription
is in the tree: a driver cannot map, under that subscription, pages the running zap is about to clear and then
never hear of it (found by a blind campaign of docs/simulator.md's worked example: coherence after_end under
``memory_failure`` of an fsdax page, seed 7719023).
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.kernel import sched
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
from hmmirror.mm.truncate import unmap_mapping_pages
from hmmirror.sim.runner import run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096


class _Ops(MmuIntervalNotifierOps):
    def invalidate(self, sub, r, cur_seq):
        return True
        yield


def test_first_interval_subscription_waits_for_a_running_file_unmap():
    m = Machine("6.18", ram=64 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 16 * PAGE)
    p = m.spawn("p")
    a = p.mmap(16 * PAGE, "rw", ("shared",), file="/mnt/e/f")
    p.touch(a, 16 * PAGE, write=False)
    assert p.mm.notifier_subscriptions is None or not p.mm.notifier_subscriptions.has_itree
    inode = p.mm.vma_lookup(a).vm_file.inode
    order = []

    def unmapper(run):
        order.append("unmap begins")
        yield from unmap_mapping_pages(inode, 0, 16, False)
        order.append("unmap ends")

    def inserter(run):
        sub = MmuIntervalNotifier()
        ret = yield from mmu_interval_notifier_insert(sub, p.mm, a, 16 * PAGE, _Ops())
        order.append(("inserted", ret))

    # the unmap runs first until it is inside its zap (holding i_mmap_rwsem), then the insert is tried
    f, _eng = run_tasks(m, None, p.mm, [("cpu0", "cpu", unmapper), ("cpu1", "cpu", inserter)],
                        SwitchListScheduler([(3, 1)]), invariants=[], bind=False)
    assert f is None, f.describe()
    assert order == ["unmap begins", "unmap ends", ("inserted", 0)], order
    assert p.mm.notifier_subscriptions.has_itree
