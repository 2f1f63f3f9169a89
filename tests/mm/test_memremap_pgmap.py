"""dev_pagemap lifecycle: percpu_ref, devm_memremap_pages, get/put_dev_pagemap, teardown.

Expected values come from mm-substrate.md §3 (the percpu_ref model, the registration and lookup
pseudo-code and the teardown order) and hmm-5.2.md §8 (the ``cached`` argument of get_dev_pagemap).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.errors import Deadlock, ModelBug
from hmmirror.kernel import sched
from hmmirror.kernel.sched import run_until_blocked
from hmmirror.mm.memremap import (
    MEMORY_DEVICE_FS_DAX,
    MEMORY_DEVICE_GENERIC,
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    PercpuRef,
    PfnRange,
    devm_memremap_pages,
    devm_memremap_pages_release,
    get_dev_pagemap,
    new_dev_pagemap,
    percpu_ref_get,
    percpu_ref_init,
    percpu_ref_kill,
    percpu_ref_put,
    percpu_ref_tryget_live,
    put_dev_pagemap,
    run_memunmap_pages,
)
from hmmirror.mm.page_alloc import PG

NPAGES = 1024                     # a 4 MiB device range


def _registered(machine: Machine, name: str = "dev0", type=MEMORY_DEVICE_GENERIC, n: int = NPAGES) -> DevPagemap:
    pgmap = new_dev_pagemap(name, type, n)
    assert devm_memremap_pages(machine, pgmap) == 0
    return pgmap




# --- percpu_ref (§3: {count, dead}) ----------------------------------------------------------------------
def test_percpu_ref_model() -> None:
    released = []
    ref = PercpuRef("r")
    percpu_ref_init(ref, released.append)
    assert (ref.count, ref.dead) == (1, False)                # init -> count = 1, live
    percpu_ref_get(ref)
    assert ref.count == 2                                     # get: unconditional += 1
    assert percpu_ref_tryget_live(ref) and ref.count == 3
    percpu_ref_kill(ref)                                      # kill: dead, then put of the initial ref
    assert (ref.count, ref.dead) == (2, True)
    assert not percpu_ref_tryget_live(ref) and ref.count == 2  # tryget_live fails once dead
    percpu_ref_get(ref)                                       # get stays unconditional
    assert ref.count == 3
    for _ in range(3):
        percpu_ref_put(ref)                                   # a killed ref keeps counting down
    assert ref.count == 0 and released == [ref]               # at 0 the release callback runs
    assert ref.stats["tryget_live_failed"] == 1


def test_percpu_ref_double_kill_and_underflow_are_reported() -> None:
    ref = PercpuRef("r")
    percpu_ref_init(ref)
    percpu_ref_kill(ref)
    with pytest.raises(ModelBug):
        percpu_ref_kill(ref)
    with pytest.raises(ModelBug):
        percpu_ref_put(ref)


# --- registration (§3 devm_memremap_pages) ---------------------------------------------------------------
def test_devm_memremap_pages_registers_range_and_takes_one_ref_per_page(m52: Machine) -> None:
    pgmap = _registered(m52)
    r = pgmap.res
    assert r is not None and r.npages == NPAGES
    assert r.start >= m52.mem.nr_ram                          # above RAM
    assert pgmap.count == 1 + NPAGES                          # initial ref + percpu_ref_get_many(npages)
    assert m52.pgmap_of(r.start) is pgmap and m52.pgmap_of(r.end - 1) is pgmap
    assert m52.pgmap_of(r.end) is None and m52.pgmap_of(r.start - 1) is None
    assert (m52.mem.refcount[r.start: r.end] == 1).all()      # every device page initialised: refcount 1
    assert (m52.mem.flags[r.start: r.end] & PG.device).all()
    assert pgmap.state == "live"


def test_devm_memremap_pages_requires_ref_kill_cleanup(m52: Machine) -> None:
    pgmap = DevPagemap("bare", MEMORY_DEVICE_FS_DAX, NPAGES)
    assert devm_memremap_pages(m52, pgmap) == -22             # -EINVAL
    pgmap = new_dev_pagemap("nokill", MEMORY_DEVICE_FS_DAX, NPAGES)
    pgmap.kill = None
    assert devm_memremap_pages(m52, pgmap) == -22


def test_device_private_pgmap_needs_its_ops(m618: Machine) -> None:
    pgmap = new_dev_pagemap("priv", MEMORY_DEVICE_PRIVATE, NPAGES, owner=object())
    assert devm_memremap_pages(m618, pgmap) == -22            # no page_free / migrate_to_ram


def test_overlap_with_ram_and_same_section(m52: Machine) -> None:
    first = _registered(m52)
    assert first.res is not None
    ram = new_dev_pagemap("ram", MEMORY_DEVICE_FS_DAX, 16)
    ram.res = PfnRange(16, 32)
    assert devm_memremap_pages(m52, ram) == -6                # System RAM -> -ENXIO
    clash = new_dev_pagemap("clash", MEMORY_DEVICE_FS_DAX, 16)
    clash.res = PfnRange(first.res.end - 16, first.res.end)
    assert devm_memremap_pages(m52, clash) == -12             # same memory section -> -ENOMEM


# --- lookups (§3 get_dev_pagemap / put_dev_pagemap; hmm-5.2.md §8) --------------------------------------
def test_get_dev_pagemap_cached_semantics(m52: Machine) -> None:
    a = _registered(m52, "a")
    b = _registered(m52, "b")
    assert a.res is not None and b.res is not None
    base_a, base_b = a.count, b.count
    p = get_dev_pagemap(m52, a.res.start, None)               # new lookup: tryget_live
    assert p is a and a.count == base_a + 1
    p = get_dev_pagemap(m52, a.res.start + 5, p)              # cached covers pfn: returned, no new ref
    assert p is a and a.count == base_a + 1
    p = get_dev_pagemap(m52, b.res.start, p)                  # cached does not cover: put it, look up anew
    assert p is b and a.count == base_a and b.count == base_b + 1
    p = get_dev_pagemap(m52, 100, p)                          # a RAM pfn: cached put, nothing found
    assert p is None and b.count == base_b
    put_dev_pagemap(None)                                     # no-op
    assert m52.counters["get_dev_pagemap"] == 4


def test_kill_fails_new_lookups_while_holders_keep_their_reference(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None and pgmap.kill is not None and pgmap.ref is not None
    held = get_dev_pagemap(m52, pgmap.res.start, None)
    before = pgmap.count
    pgmap.kill(pgmap.ref)
    assert pgmap.count == before - 1                          # only the initial reference went
    assert get_dev_pagemap(m52, pgmap.res.start, None) is None
    again = get_dev_pagemap(m52, pgmap.res.start + 1, held)   # the holder's cached pointer still works
    assert again is held and pgmap.count == before - 1
    put_dev_pagemap(held)
    assert pgmap.count == before - 2


# --- teardown (§3 devm_memremap_pages_release) -----------------------------------------------------------
def test_teardown_in_order_without_holders(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None
    r = pgmap.res
    assert run_memunmap_pages(m52, pgmap) == 0
    assert pgmap.state == "removed" and pgmap.count == 0 and pgmap.ref is not None and pgmap.ref.dead
    assert pgmap.history == ["memremap", "kill", f"put_pages:{NPAGES}", "removed"]
    assert m52.pgmap_of(r.start) is None                      # lookups now find nothing
    assert get_dev_pagemap(m52, r.start, None) is None
    assert (m52.mem.refcount[r.start: r.end] == 0).all()      # idle pages went 1 -> 0


def test_teardown_waits_for_a_holder_and_completes_after_its_put(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None
    held = get_dev_pagemap(m52, pgmap.res.start + 3, None)
    gen = devm_memremap_pages_release(m52, pgmap)
    point = run_until_blocked(gen)
    assert point is not None and point != ("done", 0)         # cleanup sleeps: the count is not zero
    assert pgmap.state == "draining" and pgmap.waiting_for == 1 and pgmap.count == 1
    assert get_dev_pagemap(m52, pgmap.res.start, None) is None  # killed: lookups fail meanwhile
    assert m52.pgmap_of(pgmap.res.start) is pgmap             # ... but the range is not removed yet
    put_dev_pagemap(held)
    assert run_until_blocked(gen) == ("done", 0)
    assert pgmap.state == "removed" and m52.pgmap_of(pgmap.res.start) is None


def test_teardown_waits_for_a_pinned_page(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None
    pfn = pgmap.res.start + 7
    m52.mem.get_page(pfn)                                     # a GUP pin: refcount 2
    gen = devm_memremap_pages_release(m52, pgmap)
    point = run_until_blocked(gen)
    assert point is not None and pgmap.count == 1             # the pinned page kept its pgmap reference
    assert int(m52.mem.refcount[pfn]) == 1
    m52.mem.put_page(pfn)                                     # unpin: 1 -> 0 drops the pgmap reference
    assert pgmap.count == 0
    assert run_until_blocked(gen) == ("done", 0)
    assert pgmap.state == "removed"


def test_leaked_reference_is_a_stuck_state_not_a_hang(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None
    get_dev_pagemap(m52, pgmap.res.start, None)               # never put
    with pytest.raises(Deadlock, match="1 reference"):
        run_memunmap_pages(m52, pgmap, task=sched.Task("unbind", "kthread"))
    assert pgmap.state == "stuck" and pgmap.stuck_count == 1
    assert pgmap.stats()["state"] == "stuck"
    assert any(e["what"] == "pgmap_stuck" and e["count"] == 1 for e in m52.events)


def test_stats_counts_gets_and_puts(m52: Machine) -> None:
    pgmap = _registered(m52)
    assert pgmap.res is not None
    p = get_dev_pagemap(m52, pgmap.res.start, None)
    put_dev_pagemap(p)
    st = pgmap.stats()
    assert st["count"] == 1 + NPAGES
    assert st["ops"]["get_many"] == NPAGES and st["ops"]["tryget_live"] == 1 and st["ops"]["put"] == 1
    assert st["dead"] is False and st["state"] == "live"
