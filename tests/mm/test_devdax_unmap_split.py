"""A device-dax unbind's rmap walk of the device inode against a munmap that splits a mapping VMA.

Kernel (6.18): kill_dev_dax() (drivers/dax/bus.c) calls unmap_mapping_range(inode->i_mapping, 0, 0, 1), whose
unmap_mapping_pages() (mm/memory.c) holds i_mmap_lock_read(mapping) across the whole vma_interval_tree walk;
__split_vma() (mm/vma.c) takes i_mmap_lock_write(mapping) in vma_prepare() before it changes the VMA's bounds
and inserts the new part into the tree (vma_complete()).  So the split waits for the walk, and the walk zaps
every page the file's VMAs map when it began -- including those the split would have moved into a new VMA.
(5.2: the same, with i_mmap_lock_write in unmap_mapping_pages and __vma_adjust.)  The test holds the walk
in the invalidation of the first VMA it zaps (an interval notifier that sleeps there: a blockable CLEAR) while
a munmap splits a second VMA of the device.

Found by a blind 10-minute 6.18 dmirror campaign (seed 55819, ``pgmap_refcount|mm.hmm.modern.hmm_range_fault|
dropped``): the model's device inode had no i_mmap_rwsem and its split took none, so the walk zapped the lower
part and missed a page mapped in the upper part.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.mm.debug import page_values
from hmmirror.kernel import sched
from hmmirror.mm.mmap import vm_munmap
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
from hmmirror.mm.truncate import unmap_mapping_range
from hmmirror.sim.runner import run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

MiB = 1 << 20


def _mapped(p, addr: int) -> bool:
    return any(v & 1 for v, _ in page_values(p.mm, addr, addr + PAGE_SIZE).values())


class _HoldFirst(MmuIntervalNotifierOps):
    """Sleeps in the first invalidation it gets (the walk's CLEAR) until ``go`` is set; the others pass."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.go = False

    def invalidate(self, sub, r, cur_seq):
        self.calls.append(r.event.name)
        if len(self.calls) == 1:
            yield from sched.wait_event(lambda: self.go, "test: hold the walk inside its zap")
        return True


@pytest.mark.parametrize("kernel", ["6.12", "6.18"])
def test_unbind_walk_zaps_a_page_a_concurrent_split_moves_to_a_new_vma(kernel: str) -> None:
    m = Machine(kernel, ram=256 * MiB)
    m.add_pmem("pmem0", 16 * MiB, "devdax", PAGE_SIZE)
    p = m.spawn("p")
    first = p.mmap(16 * PAGE_SIZE, "r", ["shared"], file="/dev/dax0.0")    # walked first (i_mmap order)
    b = p.mmap(64 * PAGE_SIZE, "r", ["shared"], file="/dev/dax0.0")        # the VMA munmap splits
    low, high = b + 2 * PAGE_SIZE, b + 40 * PAGE_SIZE
    for addr in (first, low, high):
        p.touch(addr, PAGE_SIZE, write=False)
    assert _mapped(p, first) and _mapped(p, low) and _mapped(p, high)
    ops = _HoldFirst()
    lo, hi = min(first, b), max(first + 16 * PAGE_SIZE, b + 64 * PAGE_SIZE)
    assert sched.run(mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, lo, hi - lo, ops), p.mm.task) == 0
    inode = p.mm.vma_lookup(b).vm_file.inode
    lock = getattr(inode, "i_mmap_rwsem", None)
    seen = []

    def unbind(run):
        yield from unmap_mapping_range(inode, 0, 0, True)       # kill_dev_dax()'s walk
        seen.append("walk done")

    def munmap(run):
        seen.append(("walk holds i_mmap_rwsem", lock is not None and (bool(lock.readers) or lock.owner is not None)))
        ops.go = True
        ret = yield from vm_munmap(p.mm, b + 16 * PAGE_SIZE, 8 * PAGE_SIZE)   # split at 16 and 24 pages
        seen.append(("munmap", ret))

    # the walk runs first and sleeps in the invalidation of its first VMA; the munmap runs while it sleeps
    f, _eng = run_tasks(m, None, p.mm, [("cpu0", "cpu", unbind), ("cpu1", "cpu", munmap)],
                        SwitchListScheduler([]), invariants=[], bind=False)
    assert f is None, f.describe()
    assert ops.calls[0] == "CLEAR", ops.calls
    assert not _mapped(p, first) and not _mapped(p, low), seen
    assert not _mapped(p, high), seen                          # the page the split moved to the new VMA
    assert seen == [("walk holds i_mmap_rwsem", True), "walk done", ("munmap", 0)], seen  # the split waited
    assert sorted((v.vm_start, v.vm_end) for v in inode.i_mmap) == sorted(
        [(first, first + 16 * PAGE_SIZE), (b, b + 16 * PAGE_SIZE), (b + 24 * PAGE_SIZE, b + 64 * PAGE_SIZE)])


def _unbind_walk_against(kernel: str, other) -> tuple[list, object, int]:
    """kill_dev_dax()'s walk of a mapped device held in the first invalidation it sends, while the generator
    ``other(p, file, seen)`` runs on a second CPU: what both recorded in ``seen``, in order; the process and
    its mapping's address."""
    m = Machine(kernel, ram=256 * MiB)
    m.add_pmem("pmem0", 16 * MiB, "devdax", PAGE_SIZE)
    p = m.spawn("p")
    a = p.mmap(16 * PAGE_SIZE, "r", ["shared"], file="/dev/dax0.0")
    p.touch(a, PAGE_SIZE, write=False)
    ops = _HoldFirst()
    assert sched.run(mmu_interval_notifier_insert(MmuIntervalNotifier(), p.mm, a, 16 * PAGE_SIZE, ops),
                     p.mm.task) == 0
    file = p.mm.vma_lookup(a).vm_file
    seen: list = []

    def unbind(run):
        yield from unmap_mapping_range(file.inode, 0, 0, True)
        seen.append(("walk done", len(file.inode.i_mmap)))

    def second(run):
        ops.go = True
        yield from other(p, file, seen)

    f, _eng = run_tasks(m, None, p.mm, [("cpu0", "cpu", unbind), ("cpu1", "cpu", second)],
                        SwitchListScheduler([]), invariants=[], bind=False)
    assert f is None, f.describe()
    return seen, p, a


def test_a_new_mapping_of_the_device_enters_i_mmap_after_the_walk():
    # vma_link_file() (mm/vma.c, 6.18): i_mmap_lock_write around the insert -- it waits for the walk
    from hmmirror.include.mm_types import MAP, PROT
    from hmmirror.mm.mmap import vm_mmap

    def mapper(p, file, seen):
        addr = yield from vm_mmap(p.mm, 0, 16 * PAGE_SIZE, PROT.READ, MAP.SHARED, file)
        seen.append(("mapped", addr > 0, len(file.inode.i_mmap)))

    seen, _p, _a = _unbind_walk_against("6.18", mapper)
    assert seen == [("walk done", 1), ("mapped", True, 2)], seen


@pytest.mark.parametrize("kernel", ["6.12", "6.18"])
def test_exit_mmap_unlinks_a_device_vma_only_after_the_walk(kernel: str):
    # free_pgtables() -> unlink_file_vma_batch_process() (mm/vma.c, 6.18): i_mmap_lock_write before the page
    # tables go, so a walk that holds the VMA in its list is done with it first
    from hmmirror.kernel.fork import mmput

    def exiter(p, file, seen):
        yield from mmput(p.mm)                                 # the last user: exit_mmap
        seen.append(("exit done", len(file.inode.i_mmap)))

    seen, _p, _a = _unbind_walk_against(kernel, exiter)
    assert seen == [("walk done", 1), ("exit done", 0)], seen


def test_fork_links_the_child_device_vma_only_after_the_walk():
    # dup_mmap() (kernel/fork.c, 6.18): i_mmap_lock_write around vma_interval_tree_insert_after(tmp, mpnt)
    from hmmirror.kernel.fork import dup_mm

    def forker(p, file, seen):
        child = yield from dup_mm(p.mm, "c")
        seen.append(("forked", not isinstance(child, int), len(file.inode.i_mmap)))

    seen, p, a = _unbind_walk_against("6.18", forker)
    assert seen == [("walk done", 1), ("forked", True, 2)], seen
    assert not _mapped(p, a)
