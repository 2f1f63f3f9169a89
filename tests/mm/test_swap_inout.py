"""Swap-out (model reclaim of one anonymous page) and swap-in faults.

Expected values: mm-substrate.md §5.10 ("reclaim replaces an anon PTE with a swap entry (notifier CLEAR
[4K)); a fault swaps it in"), §1.3 (swap-format entries) and the kernel's do_swap_page(): a write fault maps
the page writable and dirty; a read fault maps it read-only in 5.2 (reuse_swap_page only on writes) and, the
page being exclusive, writable if VM_WRITE in 6.x.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import pte_to_swp_entry
from hmmirror.kernel import sched
from hmmirror.mm.swap import model_swap_out

P = 4096


def swap_out(p, addr: int) -> int:
    return sched.run(model_swap_out(p.mm, addr), p.mm.task)


def clears(m: Machine, since: int) -> list[tuple[int, int]]:
    return [(e["start"], e["end"]) for e in m.events[since:]
            if e["what"] == "invalidate_range_start" and e["event"] == "CLEAR"]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_swap_out_then_read_fault_swaps_in(kernel: str) -> None:
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(4 * P, "rw")
    p.touch(a, 4 * P, write=True, fill="index32")
    old = p.inspect(a + P, P)[0].pfn
    free0, ev0 = m.mem.nr_free_pages(), len(m.events)
    assert swap_out(p, a + P) == 0
    s = p.inspect(a + P, P)[0]
    assert not s.present and s.kind == "swap" and s.swapped
    assert clears(m, ev0) == [(a + P, a + 2 * P)]
    assert m.mem.nr_free_pages() == free0 + 1 and m.mem.refcount[old] == 0
    _, ptr, entry = p.mm.pt.lookup(a + P)
    slot = pte_to_swp_entry(entry).offset
    assert slot in m.swap.slots
    # swap-in on a read fault
    ev1 = len(m.events)
    assert p.check(a, 4 * P, "index32") == 0
    s2 = p.inspect(a + P, P)[0]
    assert s2.present and s2.kind == "anon" and s2.exclusive
    assert s2.write is m.profile.swapin_exclusive_writable
    assert slot not in m.swap.slots                                  # swap_free()
    assert clears(m, ev1) == []                                      # the entry was not present
    assert m.counters["pswpin"] == 1


def test_swap_in_on_a_write_fault_maps_writable() -> None:
    m = Machine("5.2", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(P, "rw")
    p.touch(a, write=True, fill=9)
    assert swap_out(p, a) == 0
    n0 = m.counters["handle_mm_fault"]
    p.write_bytes(a + 8, b"\x01")
    assert m.counters["handle_mm_fault"] - n0 == 1
    s = p.inspect(a, P)[0]
    assert s.write and s.kind == "anon"
    assert p.read_bytes(a, 9) == bytes([9] * 8 + [1])


def test_swap_out_refuses_what_reclaim_would_not_take() -> None:
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(4 * P, "rw")
    p.touch(a)                                                       # zero page
    assert swap_out(p, a) == -22
    assert swap_out(p, a + P) == -22                                 # nothing mapped
    m.mount("/t", "tmpfs")
    m.create_file("/t/f", P, "data")
    b = p.mmap(P, "rw", ["shared"], file="/t/f")
    p.touch(b)
    assert swap_out(p, b) == -22                                     # not anonymous


def test_munmap_of_a_swap_entry_frees_its_slot() -> None:
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(2 * P, "rw")
    p.touch(a, 2 * P, write=True, fill=1)
    swap_out(p, a)
    assert len(m.swap.slots) == 1
    p.munmap(a, 2 * P)
    assert m.swap.slots == {}


def test_swapped_page_shared_by_fork_is_read_by_both() -> None:
    pytest.importorskip("hmmirror.kernel.fork")
    # swap_duplicate() at fork: the slot holds two references; each swap-in drops one (swap_free)
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(P, "rw")
    p.touch(a, write=True, fill=4)
    swap_out(p, a)
    c = p.fork("c")
    assert c.check(a, P, 4) == 0 and p.check(a, P, 4) == 0
    assert m.swap.slots == {}


def test_swap_out_drops_the_mapcount_under_the_pte_lock() -> None:
    """Blind 5.2 campaign (seed 52919): try_to_unmap_one() calls page_remove_rmap() at ``discard:`` with the
    PTE lock still held, before mmu_notifier_invalidate_range_end() (which sleeps on the mirror's locks); no
    moment exists where the PTE is a swap entry while the page still counts that mapping."""
    import pathlib

    from hmmirror.sim.runner import run_scenario, scheduler_for
    from hmmirror.sim.scenario import SimScenario

    path = pathlib.Path(__file__).parent / "data" / "swap-out-rmap-under-ptl.toml"
    sc = SimScenario.load(str(path))
    res = run_scenario(sc, scheduler_for(sc))
    assert res.diverged is None
    assert not [f for f in res.findings if f.invariant == "page_counts"], [f.signature for f in res.findings]


@pytest.mark.parametrize("kernel", ["5.2", "6.12"])
def test_a_store_between_add_to_swap_and_the_unmap_reaches_the_slot(kernel: str) -> None:
    """shrink_folio_list() (mm/vmscan.c) does add_to_swap, then try_to_unmap, then pageout: the slot holds
    the bytes as they are after the unmap, so a store made through the still-present PTE while reclaim sleeps
    between add_to_swap and the unmap (blind 6.12 campaign seed 41263: a device store through its mirror
    before its invalidate callback ran) is read back after swap-in."""
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(P, "rw")
    p.touch(a, P, write=True, fill=0x11)
    gen = model_swap_out(p.mm, a)
    prev = sched.set_current(p.mm.task)
    try:
        points = [next(gen).what, next(gen).what]                    # add_to_swap done, the unmap starts
    finally:
        sched.set_current(prev)
    assert points == ["add_to_swap", "mmu_notifier_invalidate_range_start"]
    p.touch(a, P, write=True, fill=0x5a)                             # the PTE still maps it writable
    assert sched.run(gen, p.mm.task) == 0
    assert p.inspect(a, P)[0].kind == "swap"
    assert p.check(a, P, 0x5a) == 0                                  # swap-in reads the later bytes


def test_the_6_12_campaign_reproducer_of_a_device_store_during_reclaim_is_clean() -> None:
    """The same window in the simulator (tests/sim/data/swap_out_during_device_write.toml, the blind 6.12
    campaign's data_lost reproducer): dev0's store through its mirror, made while reclaim sleeps between
    add_to_swap and the unmap, is what dev1 reads after the swap-in."""
    import os

    from hmmirror.sim.replay import replay_file

    path = os.path.join(os.path.dirname(__file__), "..", "sim", "data", "swap_out_during_device_write.toml")
    res = replay_file(path).result
    assert not res.diverged and res.findings == [], [f.describe() for f in res.findings]
    whats = [e["what"] for e in res.events]
    assert "swap_out" in whats                                       # the page did go to swap ...
    reads = [e for e in res.events if e["what"] == "sim_fault" and e["task"] == "dev1"]
    assert [(e["write"], e["ret"]) for e in reads] == [(False, 0)]   # ... and dev1 read it back (D1 compared)
    assert whats.index("swap_out") < res.events.index(reads[0])
