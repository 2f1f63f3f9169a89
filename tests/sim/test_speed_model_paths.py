"""Fast paths of the model/engine hot loop against their references (same results, entry by entry)."""

from __future__ import annotations

import numpy as np

from hmmirror.drivers.device_mmu import range_items, range_items_ref
from hmmirror.mm.page_alloc import PG, PhysMem
from hmmirror.sim.invariants import CommitBatch


def test_range_items_is_its_page_by_page_reference() -> None:
    rng = np.random.default_rng(7)
    for n in (0, 1, 5, 512, 4099):
        pfn = rng.integers(0, 1 << 40, n, dtype=np.uint64)
        write = rng.integers(0, 2, n).astype(bool)
        for valid in (np.ones(n, dtype=bool), rng.integers(0, 2, n).astype(bool), np.zeros(n, dtype=bool)):
            got, ref = range_items(pfn, write, valid), range_items_ref(pfn, write, valid)
            assert got == ref
            # the same Python types as the reference (the device table stores them, the Tracker reads them)
            assert [type(x) for it in got if it is not None for x in it] == \
                [type(x) for it in ref if it is not None for x in it]


def test_commit_batch_rows_match_the_items() -> None:
    items = [(5, True), None, (7, False), (1 << 40, True), None]
    mapped = [i for i, it in enumerate(items) if it is not None]
    b = CommitBatch(0x1000, items, mapped)
    assert b.idx.tolist() == mapped
    assert b.pfn.tolist() == [items[i][0] for i in mapped]          # type: ignore[index]
    assert b.write.tolist() == [items[i][1] for i in mapped]        # type: ignore[index]
    assert b.va.tolist() == [0x1000 + i * 4096 for i in mapped]
    full = [(3, False), (4, True)]
    b = CommitBatch(0, full, [0, 1])
    assert b.pfn.tolist() == [3, 4] and b.write.tolist() == [False, True] and b.write.dtype == bool


def test_add_device_range_keeps_ram_and_zeroes_the_gap() -> None:
    mem = PhysMem(64 << 20)
    before = {n: getattr(mem, n).copy() for n in ("refcount", "mapcount", "flags", "order")}
    nram = mem.nr_pfns
    start = mem.add_device_range(1000, align_pages=1 << 18, idle_refcount=1)
    assert start == 1 << 18 and mem.nr_pfns == start + 1000
    for n, arr in before.items():
        grown = getattr(mem, n)
        assert grown.dtype == arr.dtype
        assert np.array_equal(grown[:nram], arr)
        assert not grown[nram:start].any()                   # the alignment gap: no frame, all zero
    assert (mem.flags[start:] == PG.device).all() and (mem.refcount[start:] == 1).all()
    assert not mem.mapcount[start:].any() and not mem.order[start:].any()


def test_a_second_device_range_keeps_the_first() -> None:
    mem = PhysMem(64 << 20)
    mem.refcount[100] = 3
    a = mem.add_device_range(512, align_pages=1 << 18, idle_refcount=1)
    mem.refcount[a + 7] = 5
    mem.mapcount[a + 7] = 2
    mem.order[a: a + 512] = 9
    b = mem.add_device_range(64, align_pages=1 << 18, idle_refcount=0)
    assert b == 2 << 18
    assert mem.refcount[100] == 3 and mem.refcount[a + 7] == 5 and mem.mapcount[a + 7] == 2
    assert (mem.order[a: a + 512] == 9).all() and (mem.flags[a: a + 512] == PG.device).all()
    assert not mem.refcount[a + 512: b].any() and not mem.flags[a + 512: b].any()
    assert (mem.flags[b:] == PG.device).all() and not mem.refcount[b:].any()


def test_encode_schedule_is_its_reference() -> None:
    from hmmirror.sim.schedulers import encode_schedule, encode_schedule_ref

    class T:
        def __init__(self, name: str) -> None:
            self.name = name

    class E:
        pass

    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 50, 3000):
        e = E()
        e.tasks = [T("a"), T("b"), T("a"), T("kworker/x")]     # two tasks may share a name: runs go by name
        e.picks = rng.integers(0, 4, n).tolist() if n != 50 else [0] * 20 + [2] * 10 + [1] * 20
        assert encode_schedule(e) == encode_schedule_ref(e)


def test_fused_log_records_and_routes_as_the_plain_wrapper() -> None:
    from hmmirror.machine import Machine
    from hmmirror.sim.engine import Engine

    heard: list[tuple[str, dict]] = []

    class Inst:
        log_kinds = frozenset({"x"})

        def on_log(self, eng: object, ev: dict) -> None:
            heard.append((ev["what"], dict(ev)))

    def run(fuse: bool, logging: bool) -> tuple[list, list]:
        heard.clear()
        m = Machine(ram=64 << 20)
        m.logging = logging
        eng = Engine(m, None, [Inst()])
        orig = m.log if fuse else (lambda what, **f: Machine.log(m, what, **f))
        log = eng._on_log(orig)
        log("x", a=1)
        log("y", b=2)
        log("x", c=[3])
        return list(m.events), list(heard)

    for logging in (True, False):
        assert run(True, logging) == run(False, logging)


def test_may_sleep_record_has_the_lock_context_fields() -> None:
    from hmmirror.kernel import sched
    from hmmirror.mm.hmm.v5_2 import _may_sleep

    class M:
        logging = True

        def __init__(self) -> None:
            self.recs: list[tuple[str, dict]] = []

        def log(self, what: str, **fields: object) -> None:
            self.recs.append((what, fields))

    t = sched.Task("cpu0", "cpu")
    a, b = sched.Lock("mmap_sem", "rwsem"), sched.Lock("ptl", "spin")
    t.held += [a, b]
    t.atomic = 1
    prev = sched.set_current(t)
    try:
        m = M()
        _may_sleep(m, "handle_mm_fault", addr=0x1000)
        ctx = sched.lock_context(t)
    finally:
        sched.set_current(prev)
    assert m.recs == [("may_sleep", {"call": "handle_mm_fault", "task": ctx.task, "locks": ctx.locks, "atomic": 1,
                                     "addr": 0x1000})]
    assert ctx.locks == ["rwsem:mmap_sem", "spin:ptl"]
