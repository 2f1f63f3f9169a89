"""split_folio() against a reference taken while it runs (campaign finding page-counts-dmirror-exclusive-9300ac80).

mm/huge_memory.c __folio_split(): ``can_split_folio()`` is only a racy first check; the folio is then unmapped
(``unmap_folio()``: the PMD split sleeps in its ``MMU_NOTIFY_CLEAR`` invalidation) and only
``folio_ref_freeze(folio, 1 + extra_pins)`` decides.  A reference another task took in between (a GUP of one
of its pages: ``make_device_exclusive``'s FOLL_GET, before it waits for the folio lock the splitter holds)
makes the freeze fail: ``remap_page()`` maps the folio back with PTEs and the split returns -EAGAIN, the
folio stays whole and keeps every reference.  The model used to check the references only before the PMD
split and then overwrote the refcounts, losing the GUP reference: the page was freed while the exclusive
entry still mapped it.
"""

from __future__ import annotations

from pathlib import Path

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.mm.debug import check_counts
from hmmirror.mm.folio import folio_trylock, folio_unlock
from hmmirror.mm.huge_memory import split_folio
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
from hmmirror.mm.page_alloc import PG

PAGE = 4096
EAGAIN = 11
REPRODUCER = Path(__file__).resolve().parents[2] / "docs" / "sim-reproducers" / "fixed" / \
    "page-counts-dmirror-exclusive-9300ac80.toml"


class GrabDuringClear(MmuIntervalNotifierOps):
    """Takes one reference on ``page`` from inside the first CLEAR invalidation (the PMD split's), as a
    concurrent GUP does while the splitter sleeps there."""

    def __init__(self, mem, page: int, grab: bool) -> None:  # type: ignore[no-untyped-def]
        self.mem, self.page, self.grab, self.done = mem, page, grab, False

    def invalidate(self, sub, r, cur_seq):  # type: ignore[no-untyped-def]
        if self.grab and not self.done and r.event == MMU_NOTIFY.CLEAR:
            self.mem.get_page(self.page)
            self.done = True
        return True
        yield


def _thp(grab: bool):  # type: ignore[no-untyped-def]
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, 2 * PMD_SIZE, "hugepage")
    p.touch(a, 1, write=True)
    level, _, e = p.mm.pt.lookup(a)
    assert level == "pmd"
    head = x86.pte_pfn(e)
    ops = GrabDuringClear(m.mem, head + 3, grab)
    sub = MmuIntervalNotifier()
    assert sched.run(mmu_interval_notifier_insert(sub, p.mm, a, PMD_SIZE, ops), p.mm.task) == 0
    return m, p, a, head, ops


def _split(m, p, head):  # type: ignore[no-untyped-def]
    mem = m.mem
    mem.get_page(head)                                   # the caller's reference (folio_get)
    assert folio_trylock(mem, head)

    def body():  # type: ignore[no-untyped-def]
        yield from sched.down_read(p.mm.mmap_sem)
        try:
            return (yield from split_folio(m, head, caller_refs=1))
        finally:
            sched.up_read(p.mm.mmap_sem)

    ret = sched.run(body(), p.mm.task)
    folio_unlock(mem, head)
    mem.put_page(head)
    return ret


def test_reference_taken_during_the_pmd_split_fails_the_freeze() -> None:
    m, p, a, head, ops = _thp(grab=True)
    mem = m.mem
    assert _split(m, p, head) == -EAGAIN and ops.done
    # the folio stays one order-9 folio, mapped by 512 PTEs (remap_page) with one reference each, plus the
    # reference taken during the split
    assert int(mem.order[head]) == 9 and mem.flags[head] & PG.head
    assert int(m.counters["thp_split_page"]) == 0
    for i in range(512):
        level, _, e = p.mm.pt.lookup(a + i * PAGE)
        assert level == "pte" and x86.pte_present(e) and x86.pte_pfn(e) == head + i
    assert int(mem.mapcount[head: head + 512].sum()) == 512
    assert int(mem.refcount[head]) == 512 + 1
    assert check_counts(m) == ["pfn 0x%x: anon folio refcount 513, but 512 leaf entries map it" % head]
    mem.put_page(head + 3)                               # the holder lets go: the folio is only mapped
    assert int(mem.refcount[head]) == 512
    assert check_counts(m) == []


def test_without_the_reference_the_split_succeeds() -> None:
    m, p, a, head, ops = _thp(grab=False)
    mem = m.mem
    assert _split(m, p, head) == 0
    assert int(m.counters["thp_split_page"]) == 1
    for i in range(512):
        assert int(mem.order[head + i]) == 0
        assert (int(mem.refcount[head + i]), int(mem.mapcount[head + i])) == (1, 1)
    assert check_counts(m) == []


def test_campaign_interleaving_runs_clean() -> None:
    """The campaign's interleaving up to the race (cpu1 faults the THP, dev1's migrate_sys collection starts
    splitting it and sleeps in the PMD split's CLEAR callback, dev0's ``exclusive`` GUPs page 0 and waits for
    the folio lock), then in order.  Kernel: the split fails (-EAGAIN), the collection skips the PMD range
    (``migrate_vma_collect_skip``: nothing collected), ``make_device_exclusive`` then marks the five pages."""
    from hmmirror.scenario.schema import load_sim
    from hmmirror.sim.runner import run_scenario
    from hmmirror.sim.schedulers import ReplayScheduler
    from hmmirror.sim.scenario import SimScenario

    sc = SimScenario.from_doc(load_sim(str(REPRODUCER)))
    res = run_scenario(sc, ReplayScheduler([("cpu1", 11), ("dev1", 6), ("dev0", 9), ("cpu1", 3)]),
                       every_step=True)
    assert res.findings == [] and res.diverged is None
    setup = [e for e in res.events if e.get("what") == "migrate_vma_setup"]
    assert [(e["npages"], e["cpages"]) for e in setup] == [(60, 0)]
    jobs = {e["task"]: e["ret"] for e in res.events if e.get("what") == "sim_fault"}
    assert jobs == {"dev0": 0, "dev1": 0}
    excl = [e["start"] for e in res.events if e.get("what") == "invalidate_range_start"
            and e.get("event") == "EXCLUSIVE"]
    assert len(excl) == 5 and excl == sorted(excl)


def test_split_turns_a_device_exclusive_entry_back_into_a_read_only_pte() -> None:
    """[6.15+] A device-exclusive entry keeps its rmap, so the split goes ahead; unmap_folio() ->
    try_to_migrate_one() invalidates the folio's span (MMU_NOTIFY_CLEAR) and, the entry not being a writable
    device-private one, makes it a readable-exclusive migration entry that remap_page() maps back read-only
    (the page stays AnonExclusive): the device's exclusive access ends.  Present PTEs come back as they were."""
    from hmmirror.mm.rmap import make_device_exclusive

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, 2 * PMD_SIZE, "hugepage")
    p.touch(a, PMD_SIZE, write=True)
    head = x86.pte_pfn(p.mm.pt.lookup(a)[2])
    mem = m.mem

    def excl():  # type: ignore[no-untyped-def]
        yield from sched.down_read(p.mm.mmap_sem)
        r = yield from make_device_exclusive(p.mm, a + 3 * PAGE, None)
        sched.up_read(p.mm.mmap_sem)
        return r

    page, folio = sched.run(excl(), p.mm.task)          # FOLL_SPLIT_PMD: the folio is PTE-mapped now
    assert (page, folio) == (head + 3, head) and int(mem.order[head]) == 9
    folio_unlock(mem, folio)
    mem.put_page(folio)
    mark = len(m.events)
    assert _split(m, p, head) == 0
    inv = [e for e in m.events[mark:] if e.get("what") == "invalidate_range_start"]
    assert [(e["event"], e["start"], e["end"]) for e in inv] == [("CLEAR", a, a + PMD_SIZE)]
    level, _, e = p.mm.pt.lookup(a + 3 * PAGE)
    assert level == "pte" and x86.pte_present(e) and x86.pte_pfn(e) == head + 3 and not x86.pte_write(e)
    assert mem.flags[head + 3] & PG.anon_exclusive
    other = p.mm.pt.lookup(a + 4 * PAGE)[2]
    assert x86.pte_present(other) and x86.pte_write(other)
    assert all(int(mem.order[head + i]) == 0 for i in range(512))
    assert (int(mem.refcount[head + 3]), int(mem.mapcount[head + 3])) == (1, 1)
    assert check_counts(m) == []
    assert p.read_bytes(a + 3 * PAGE, 1) is not None                      # the CPU reads it without a fault
