"""memory_failure() of a shmem page walks the page's mappings with rmap_walk_file(), which holds the mapping's
``i_mmap_rwsem`` for read (mm/rmap.c, 6.18: ``i_mmap_lock_read(mapping)`` unless the caller holds it), around
folio_mkclean()'s and try_to_unmap()'s page_vma_mapped walks and their MMU_NOTIFY invalidations.  The first
interval subscription of an mm takes every file VMA's ``i_mmap_rwsem`` for write (mm_take_all_locks(), mm/vma.c)
-- so it cannot go in while memory_failure is between its invalidate_range_start and _end: either the
unmap has ended first, or the unmap starts after the subscription and its invalidation reaches it.

Found by the docs' worked-example campaign (seed 71329): a shmem page's memory_failure began its CLEAR
invalidation before the driver's per-chunk notifier existed, the driver registered, faulted the page in and
committed it while the unmap was still running: ``coherence|mysvm.MySvm.get_pages|commit`` with the CPU
left holding a hwpoison entry and the device the poisoned page.
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.mm.memory_failure import memory_failure_pagecache
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.sim.runner import run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096


class _Ops(MmuIntervalNotifierOps):
    def __init__(self, seen):
        self.seen = seen

    def invalidate(self, sub, r, cur_seq):
        self.seen.append(("invalidate", r.event.name))
        return True
        yield


def _setup():
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(4 * PAGE, "rw", ("shared", "anonymous"))
    p.touch(a, 4 * PAGE, write=True)
    vma = p.mm.vma_lookup(a)
    level, _ptep, pte = p.mm.pt.lookup(a + PAGE)
    assert level == "pte" and pte & x86._PAGE_PRESENT
    return m, p, a, vma, x86.pte_pfn(pte)


def _run(first_steps):
    m, p, a, vma, pfn = _setup()
    order = []

    def failer(run):
        order.append("memory_failure begins")
        ret = yield from memory_failure_pagecache(p.mm, vma, a + PAGE, pfn)
        order.append(("memory_failure ends", ret))

    def inserter(run):
        ret = yield from mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, a, 4 * PAGE, _Ops(order))
        order.append(("inserted", ret))

    f, _eng = run_tasks(m, None, p.mm, [("ev0", "cpu", failer), ("cpu1", "cpu", inserter)],
                        SwitchListScheduler([(first_steps, 1)]), invariants=[], bind=False)
    assert f is None, f.describe()
    return order, p, a


def test_first_subscription_waits_for_a_shmem_memory_failure_in_its_rmap_walk():
    # memory_failure runs until it is inside try_to_unmap's invalidation (or earlier), then the insert is tried
    for first_steps in range(1, 8):
        order, p, a = _run(first_steps)
        assert order[0] == "memory_failure begins"
        done = order.index(("memory_failure ends", 0))
        ins = order.index(("inserted", 0))
        if ins < done:
            # the subscription went in first: memory_failure's invalidation (after it) reaches it
            assert ("invalidate", "CLEAR") in order[ins:done], (first_steps, order)
        # otherwise the insert waited for the whole unmap (its invalidation had no subscriber yet)
        lvl, _ptep, e = p.mm.pt.lookup(a + PAGE)
        assert x86.is_hwpoison_entry(x86.pte_to_swp_entry(e)), (first_steps, hex(e))   # shmem: poisoned entry


def test_an_invalidation_that_began_before_the_subscription_ends_before_it_is_inserted():
    # the reproducer's interleaving: memory_failure's CLEAR has begun (no subscription yet) when the insert runs
    hits = 0
    for first_steps in range(1, 8):
        order, _p, _a = _run(first_steps)
        ins = order.index(("inserted", 0))
        done = order.index(("memory_failure ends", 0))
        if ("invalidate", "CLEAR") not in order:
            assert done < ins, (first_steps, order)       # its invalidation predates the subscription
            hits += 1
    assert hits                                           # that interleaving was among the tried ones
