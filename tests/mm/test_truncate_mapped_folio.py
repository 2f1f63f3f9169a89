"""Truncation meets a folio that is still mapped, and faults meet a hole being punched.

Expected values from the kernel (6.12/6.18 mm/truncate.c and mm/shmem.c; 5.2 alike):

* truncate_inode_pages_range() locks every folio it removes (find_lock_entries, then folio_lock in its
  second pass) and truncate_cleanup_folio() calls unmap_mapping_folio() when folio_mapped(): the folio is
  unmapped from every mapping -- only the entries mapping that folio (``details.single_folio``), private COW
  copies kept (``even_cows`` false), one MMU_NOTIFY_CLEAR per VMA over the folio's part -- before it leaves
  the page cache.  A fault that mapped the page after truncate_pagecache()'s first unmap_mapping_range()
  (it held the folio lock, so the truncation waited for it) therefore leaves no mapping of a page the file
  no longer has.
* shmem_fallocate(FALLOC_FL_PUNCH_HOLE) publishes ``{start, next, waitq}`` in ``inode->i_private`` for the
  whole punch (unmap_mapping_range + shmem_truncate_range); shmem_fault() -> shmem_falloc_wait() puts a fault
  whose ``pgoff`` lies in ``[start, next)`` to sleep until ``wake_up_all`` and returns VM_FAULT_NOPAGE, or
  VM_FAULT_RETRY with the mmap lock released when the fault allows a retry (maybe_unlock_mmap_for_io); a
  fault outside the hole goes on.  No page is allocated in the hole by the waiting fault.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.fs.shmem import shmem_punch_hole
from hmmirror.include.mm_types import FAULT_FLAG, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.mm.memory import handle_mm_fault
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.truncate import truncate_inode_pages_range
from hmmirror.testing import invalidations as clears
from hmmirror.testing import present_pages as present

P = 4096


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_truncate_unmaps_a_folio_that_is_still_mapped(kernel: str, fstype: str) -> None:
    """Pages 4..7 are mapped shared by p and read through q's private mapping (q also has a COW copy of
    page 5); truncate_inode_pages_range over pages 4..7 without any unmap before it (as after a fault that
    mapped them behind truncate_pagecache's first unmap) unmaps each folio everywhere, keeps q's COW copy,
    leaves pages 0..3 mapped, and frees the four page-cache pages."""
    m = Machine(kernel, ram=256 << 20)
    m.mount("/mnt", fstype)
    m.create_file("/mnt/f", 8 * P, "data", cached=fstype == "tmpfs")
    inode = m.files["/mnt/f"]
    p, q = m.spawn("p"), m.spawn("q")
    a = p.mmap(8 * P, "rw", ["shared"], file="/mnt/f")
    b = q.mmap(8 * P, "rw", ["private"], file="/mnt/f")
    for k in range(8):                          # page by page: order-0 folios (no fault-around THP)
        p.touch(a + k * P)
        q.touch(b + k * P)
    q.touch(b + 5 * P, write=True, fill=7)       # q's private COW copy of page 5
    cow = q.inspect(b + 5 * P, P)[0].pfn
    cached = [inode.i_mapping.find_page(k) for k in range(8)]
    free0 = m.mem.nr_free_pages()
    ev0 = len(m.events)
    ret = sched.run(truncate_inode_pages_range(inode.i_mapping, 4 * P, 8 * P - 1), sched.Task("truncate"))
    assert ret == 4
    assert present(p, a, 8) == [0, 1, 2, 3]
    assert present(q, b, 8) == [0, 1, 2, 3, 5]
    assert q.inspect(b + 5 * P, P)[0].pfn == cow
    assert [inode.i_mapping.find_page(k) for k in range(8)] == cached[:4] + [-1] * 4
    assert m.mem.nr_free_pages() - free0 == 4
    # one CLEAR per VMA over each folio's page (unmap_mapping_folio); q's VMA also for page 5 (its COW
    # copy is no entry of the folio, but the VMA maps the folio's index)
    want = [(mm, base + k * P, base + (k + 1) * P) for k in range(4, 8) for mm, base in (("p", a), ("q", b))]
    assert sorted(clears(m, ev0)) == sorted(want)


def test_truncate_of_unmapped_folios_takes_no_step() -> None:
    """Nothing mapped, nothing locked: the folio passes take no preemption point (the schedules of saved
    reproducers that punch holes do not move)."""
    m = Machine("6.18", ram=64 << 20)
    m.mount("/mnt", "tmpfs")
    m.create_file("/mnt/f", 8 * P, "data")
    inode = m.files["/mnt/f"]
    gen = truncate_inode_pages_range(inode.i_mapping, 0, 8 * P - 1)
    points = []
    sched.set_current(sched.Task("truncate"))
    try:
        while True:
            points.append(next(gen).what)
    except StopIteration as stop:
        assert stop.value == 8
    assert points == ["truncate_inode_pages_range"]           # its might_sleep only


def _step_until(gen, task, pred, limit=10000):
    """Run ``gen`` as ``task`` until ``pred()`` holds after a step; returns the Point it stopped at."""
    prev = sched.set_current(task)
    try:
        for _ in range(limit):
            pt = next(gen)
            if pred():
                return pt
    finally:
        sched.set_current(prev)
    raise AssertionError("never reached")


def _shmem_written(kernel: str):
    """A process ``p`` with eight written pages of a shared anonymous (shmem) mapping at ``a``."""
    m = Machine(kernel, ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 8 * P, write=True)
    vma = p.mm.find_vma(a)
    return m, p, a, vma, vma.vm_file.inode


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("retry", [False, True])
def test_fault_into_a_hole_being_punched_waits_for_the_punch(kernel: str, retry: bool) -> None:
    m, p, a, vma, inode = _shmem_written(kernel)
    old = inode.i_mapping.find_page(2)
    puncher, cpu = sched.Task("punch"), sched.Task("cpu0")
    punch = shmem_punch_hole(inode, 0, 4 * P)
    # the punch has published its hole and unmapped page 2 (it is still cached)
    _step_until(punch, puncher, lambda: inode.private.get("shmem_falloc") is not None
                and not p.inspect(a + 2 * P, P)[0].present)
    hole = inode.private["shmem_falloc"]
    assert (hole.start, hole.next) == (0, 4)

    def fault(addr):
        # a write fault: do_shared_fault calls ->fault at once (a read fault would first map the still-cached
        # page through fault-around: see the test below)
        flags = FAULT_FLAG.WRITE | (FAULT_FLAG.ALLOW_RETRY if retry else 0)
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from handle_mm_fault(vma, addr, int(flags))
        if not ret & VM_FAULT.RETRY:
            sched.up_read(p.mm.mmap_sem)
        return ret

    # a fault outside the hole goes on
    assert sched.run(fault(a + 6 * P), cpu) == 0
    # a fault in it sleeps on the waitq, having dropped the mmap lock when it may retry
    f = fault(a + 2 * P)
    prev = sched.set_current(cpu)
    try:
        pt = sched.run_until_blocked(f)
    finally:
        sched.set_current(prev)
    assert pt.what == "shmem_falloc_waitq"
    assert p.mm.mmap_sem.is_locked() is (not retry)
    assert inode.i_mapping.find_page(2) == old
    assert sched.run(punch, puncher) == 0
    assert inode.private.get("shmem_falloc") is None and inode.i_mapping.find_page(2) == -1
    ret = sched.run(f, cpu)
    assert ret == (VM_FAULT.RETRY if retry else VM_FAULT.NOPAGE)
    assert not p.mm.mmap_sem.is_locked()
    assert inode.i_mapping.find_page(2) == -1 and present(p, a, 8) == [4, 5, 6, 7]
    assert m.counters["shmem_falloc_wait"] == 1
    p.touch(a + 2 * P)                                    # the retried access: a new zeroed page
    assert inode.i_mapping.find_page(2) not in (-1, old)


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_fault_around_into_a_hole_being_punched_is_unmapped_by_the_truncation(kernel: str) -> None:
    """A read fault into the hole after the punch's unmap maps the still-cached pages through fault-around
    (filemap_map_pages does not look at ``i_private``); shmem_truncate_range then finds them mapped and
    unmaps them (truncate_cleanup_folio) before they leave the cache: nothing of the hole stays mapped."""
    m, p, a, vma, inode = _shmem_written(kernel)
    free0 = m.mem.nr_free_pages()
    puncher, cpu = sched.Task("punch"), sched.Task("cpu0")
    punch = shmem_punch_hole(inode, 0, 4 * P)
    _step_until(punch, puncher, lambda: not any(s.present for s in p.inspect(a, 4 * P)))

    def fault(addr):
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from handle_mm_fault(vma, addr, 0)
        sched.up_read(p.mm.mmap_sem)
        return ret

    assert sched.run(fault(a + 2 * P), cpu) == VM_FAULT.NOPAGE      # mapped by fault-around
    assert present(p, a, 8) == list(range(8))
    ev0 = len(m.events)
    assert sched.run(punch, puncher) == 0
    assert present(p, a, 8) == [4, 5, 6, 7]
    assert [inode.i_mapping.find_page(k) for k in range(4)] == [-1] * 4
    assert m.mem.nr_free_pages() - free0 == 4
    assert {(e[1] - a) // P for e in clears(m, ev0)} == {0, 1, 2, 3}         # one CLEAR per re-mapped folio


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_truncation_waits_for_a_fault_holding_the_page_lock(kernel: str, fstype: str) -> None:
    """filemap_fault()/shmem_fault() return the page locked (VM_FAULT_LOCKED) and do_shared_fault() unlocks it
    only after finish_fault() mapped it.  A truncate(2) that runs while the fault holds it (i_size checked
    before the truncation changed it) waits for the lock in truncate_inode_pages_range, then finds the page
    mapped and unmaps it (truncate_cleanup_folio): the file's dropped page is mapped nowhere and freed."""
    from hmmirror.mm.truncate import truncate_setsize

    m = Machine(kernel, ram=64 << 20)
    m.mount("/mnt", fstype)
    m.create_file("/mnt/f", 8 * P, "data")
    inode = m.files["/mnt/f"]
    p = m.spawn("p")
    a = p.mmap(8 * P, "rw", ["shared"], file="/mnt/f")
    vma = p.mm.find_vma(a)
    page = inode.i_mapping.find_page(6)
    free0 = m.mem.nr_free_pages()
    cpu, trunc = sched.Task("cpu0"), sched.Task("truncate")

    def fault():
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from handle_mm_fault(vma, a + 6 * P, int(FAULT_FLAG.WRITE))
        sched.up_read(p.mm.mmap_sem)
        return ret

    f = fault()
    # the fault has the page referenced and locked, its PTE not yet set
    _step_until(f, cpu, lambda: bool(m.mem.flags[page] & PG.locked))
    assert not p.inspect(a + 6 * P, P)[0].present
    t = truncate_setsize(inode, 4 * P)
    prev = sched.set_current(trunc)
    try:
        pt = sched.run_until_blocked(t)
    finally:
        sched.set_current(prev)
    assert pt.what == "truncate_inode_pages_range"               # folio_lock() of the faulted page
    assert sched.run(f, cpu) == 0
    assert p.inspect(a + 6 * P, P)[0].present                    # mapped, then unlocked
    ev0 = len(m.events)
    assert sched.run(t, trunc) is None
    assert not p.inspect(a + 6 * P, P)[0].present
    # unmap_mapping_folio's CLEAR over the folio holding page 6 (a 4-page folio of the 6.18 ext4 file)
    assert any(mm == "p" and s <= a + 6 * P and a + 7 * P <= e for mm, s, e in clears(m, ev0))
    assert inode.i_mapping.find_page(6) == -1 and m.mem.refcount[page] == 0
    assert m.mem.nr_free_pages() - free0 == 4
