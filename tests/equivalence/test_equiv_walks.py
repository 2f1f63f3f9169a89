"""Differential tests: the fast HMM walks (hmmirror.fast) against the reference walks (mm/hmm/*.py).

The reference per-entry walk is the specification (design.md, "Reference and fast side by side"); every
test here runs both walks on identical copies of one machine and demands that everything observable is
equal: the return value (or the exception), the pfns array, the per-call stats [5.2], page tables, frame
metadata and allocator state after faults, ``machine.counters``, ``machine.events``, the dev_pagemap
reference counts and operation counts, the anon_vma flags and the lock state (equiv_states.observe).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parent))
import equiv_states as E  # noqa: E402
from hmmirror import Machine  # noqa: E402
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE  # noqa: E402
from hmmirror.fast import bench as B  # noqa: E402

MiB = 1 << 20
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _same(plan: E.Plan) -> None:
    ref, fast = E.compare(plan)
    assert ref[0] == fast[0], "return value / exception"
    for key in ref[1]:
        assert ref[1][key] == fast[1][key], key


@SETTINGS
@given(E.plans("6.18"))
def test_random_states_modern(plan: E.Plan) -> None:
    _same(plan)


@SETTINGS
@given(E.plans("6.12"))
def test_random_states_6_12(plan: E.Plan) -> None:
    # 6.12: the modern walk with devmap bits and uncounted DAX frames (profile fields, same code)
    _same(plan)


@SETTINGS
@given(E.plans("5.2"))
def test_random_states_v5_2(plan: E.Plan) -> None:
    _same(plan)


# --- shapes built by the substrate itself (faults, files, devices) ---------------------------------------
def _both(build, size: int, profile: str, mode: str = "snapshot", write: bool = True):  # type: ignore[no-untyped-def]
    """Build a process with ``build``, copy the machine, run reference and fast on the copies."""
    import copy

    p, a = build(profile)
    r1 = B.ModelRange(p, a, a + size)
    p2 = copy.deepcopy(p)
    r2 = B.ModelRange(p2, a, a + size)
    out = []
    for r, reference in ((r1, True), (r2, False)):
        r.m.events.clear()
        r.m.counters.clear()
        if mode == "snapshot":
            ret = r.snapshot(reference=reference, keep_events=True)
        else:
            ret = r.fault_in(write, reference=reference, keep_events=True)
        out.append((ret, r.pfns.tobytes(), _machine_state(r.m)))
    return out


def _machine_state(m: Machine) -> dict:  # type: ignore[type-arg]
    pool, mem = m.pool, m.mem
    return {"tables": pool.tables.tobytes(), "free": list(pool._free), "locks": sorted(pool._locks),
            "ref": mem.refcount.tobytes(), "map": mem.mapcount.tobytes(), "flags": mem.flags.tobytes(),
            "order": mem.order.tobytes(), "free4k": mem._free4k[:mem._n4k].tobytes(),
            "blocks": mem._blocks[:mem._nblocks].tobytes(), "counters": dict(m.counters),
            "events": list(m.events), "pgmaps": [(p.name, p.count, dict(p.ref.stats)) for p in m.pgmaps]}


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_anon_fault_in_then_snapshot(profile: str) -> None:
    # hmm_range_fault populating anonymous memory (the vectorised fault-in) and the snapshot after it
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=32 * MiB)
        p = m.spawn("p")
        a = p.mmap(6 * MiB, align=PUD_SIZE)
        p.touch(a + 2 * MiB + 5 * PAGE_SIZE, PAGE_SIZE, write=True)     # one present page in the middle
        return p, a + PAGE_SIZE
    for write in (True, False):
        ref, fast = _both(build, 5 * MiB, profile, "fault", write)
        assert ref == fast
    ref, fast = _both(build, 5 * MiB, profile)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_anon_fault_in_runs_out_of_memory(profile: str) -> None:
    # more pages requested than RAM: the vectorised run stops where alloc_page would fail
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=8 * MiB)
        p = m.spawn("p")
        return p, p.mmap(12 * MiB)
    ref, fast = _both(build, 12 * MiB, profile, "fault", True)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_thp_and_huge_zero(profile: str) -> None:
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=64 * MiB)
        p = m.spawn("p")
        a = p.mmap(8 * MiB, align=PMD_SIZE)
        p.madvise(a, 8 * MiB, "hugepage")
        p.touch(a, 1, write=True)
        p.touch(a + 2 * MiB, 1)                                      # huge zero page
        p.touch(a + 4 * MiB + PAGE_SIZE, 1, write=True)
        return p, a + 3 * PAGE_SIZE
    ref, fast = _both(build, 7 * MiB, profile)
    assert ref == fast
    ref, fast = _both(build, 7 * MiB, profile, "fault", True)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_fsdax_pmd_and_pte(profile: str) -> None:
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=64 * MiB)
        m.add_pmem("pmem0", 64 * MiB, "fsdax")
        m.mount("/mnt/pmem", "ext4", dax="pmem0")
        m.create_file("/mnt/pmem/f", 8 * MiB, "zero")
        p = m.spawn("p")
        a = p.mmap(8 * MiB, "rw", ["shared"], file="/mnt/pmem/f", align=PMD_SIZE)
        p.touch(a, 1)
        p.touch(a + 2 * MiB + 3 * PAGE_SIZE, 1, write=True)
        return p, a
    ref, fast = _both(build, 8 * MiB, profile)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_devdax_pud_part(profile: str) -> None:
    # a window inside a device-dax PUD leaf (5.2: get_dev_pagemap per pfn, emulated by runs)
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=32 * MiB)
        m.add_pmem("pmem0", PUD_SIZE, "devdax", PUD_SIZE)
        p = m.spawn("p")
        a = p.mmap(PUD_SIZE, "rw", ["shared"], file="/dev/dax0.0")
        p.touch(a, 1)
        return p, a + 5 * MiB + PAGE_SIZE
    ref, fast = _both(build, 3 * MiB, profile)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_five_level_paging_high_addresses(profile: str) -> None:
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=32 * MiB, paging=5)
        p = m.spawn("p")
        a = p.mmap(6 * MiB, addr=(1 << 52) + (7 << 39) - 2 * MiB, flags=["private", "anonymous", "fixed"])
        p.touch(a + 2 * MiB, 4 * PAGE_SIZE, write=True)
        return p, a
    ref, fast = _both(build, 6 * MiB, profile)
    assert ref == fast
    ref, fast = _both(build, 6 * MiB, profile, "fault", True)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_hugetlb_vma_is_handed_to_the_reference(profile: str) -> None:
    # not covered by the fast path (hugetlb VMAs): the reference runs, so the results are equal
    def build(prof: str):  # type: ignore[no-untyped-def]
        m = Machine(prof, ram=64 * MiB, hugepages_2m=4)
        p = m.spawn("p")
        a = p.mmap(4 * MiB, flags=["private", "anonymous", "hugetlb"])
        p.touch(a, 1, write=True)
        return p, a
    ref, fast = _both(build, 4 * MiB, profile)
    assert ref == fast


@pytest.mark.parametrize("profile", ["6.18", "6.12", "5.2"])
def test_reference_is_one_flag_away(profile: str) -> None:
    # reference=True, or set_reference_walk(machine), runs the reference function itself; the default is fast
    import hmmirror.fast as fast
    from hmmirror.fast import hmm_modern, hmm_v5_2
    from hmmirror.kernel import sched

    m = Machine(profile, ram=32 * MiB)
    p = m.spawn("p")
    a = p.mmap(2 * MiB)
    r = B.ModelRange(p, a, a + 2 * MiB)
    mod = hmm_modern.ref if profile != "5.2" else hmm_v5_2.ref
    name = "hmm_range_fault" if profile != "5.2" else "hmm_range_snapshot"
    calls: list[object] = []
    orig = getattr(mod, name)
    setattr(mod, name, lambda rng, *x: calls.append(rng) or orig(rng, *x))

    def run(**kw: object) -> int:
        call = fast.hmm_range_fault if profile != "5.2" else fast.hmm_range_snapshot

        def go():  # type: ignore[no-untyped-def]
            yield from sched.down_read(p.mm.mmap_sem)
            ret = yield from call(r.range, **kw)
            sched.up_read(p.mm.mmap_sem)
            return ret
        return sched.run(go(), p.mm.task)  # type: ignore[no-any-return]

    try:
        run()
        assert calls == []
        run(reference=True)
        assert calls == [r.range]
        fast.set_reference_walk(m)
        run()
        assert calls == [r.range, r.range]
        fast.set_reference_walk(m, False)
        run()
        assert len(calls) == 2
    finally:
        setattr(mod, name, orig)


def test_bench_json_shape() -> None:
    # hmmirror bench --json prints {"cases": [{"name", "pages", "model_ns_per_page",
    # "kernel_pagemap_ns_per_page", "ratio", ...}]} (the format); no timing is checked here
    import json

    from click.testing import CliRunner

    from hmmirror.cli.bench import command

    res = CliRunner().invoke(command, ["--json", "--no-kernel", "--runs", "1", "--profile", "6.18",
                                       "--case", "devdax_pud_1GiB"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    (case,) = out["cases"]
    assert case["name"] == "devdax_pud_1GiB" and case["pages"] == PUD_SIZE // PAGE_SIZE
    for key in ("model_ns_per_page", "kernel_pagemap_ns_per_page", "ratio", "reference_ns_per_page"):
        assert key in case
    assert case["kernel_pagemap_ns_per_page"] is None and any("kernel side skipped" in n for n in out["notes"])
    assert case["extra"]["equal_to_reference_on_small_range"] is True
    assert case["extra"]["levels"] == {"pud": PUD_SIZE // PAGE_SIZE}


def test_fault_on_a_device_private_pmd_ends_alike():
    """A device-private PMD entry cannot arise in 6.18 (device-private THP comes with 6.19), but
    hmm_vma_handle_absent_pmd() faults one on request: __handle_mm_fault() meets a swap PMD that is not a
    migration entry, VM_BUG_ON()s and returns 0 (the entry is never taken for a PTE table), and the walk
    restarts at the same address forever.  Both walks end in the model's livelock report -- the fast walk
    used to spin."""
    plan = E.Plan(profile="6.18", paging=4, vmas=[(1, 7, "anon_rw")],
                  chunks=[E.Chunk("huge_zero"), E.Chunk("pmd_devpriv")] + [E.Chunk("hole")] * 6, pud="none",
                  start_page=992, end_page=4096, with_pud=True, default=1 << 63, mask=(1 << 64) - 1,
                  requests=[1 << 60], owner="none", kill_pgmap=False, mode="fault", block=False, thp="madvise")
    ref, fast = E.compare(plan)
    assert ref[0][0] == "raise" and ref[0][1][0] == "ModelBug" and "livelock" in ref[0][1][1], ref[0]
    assert ref[0] == fast[0]
    for key in ref[1]:
        assert ref[1][key] == fast[1][key], key
    assert any(e.get("what") == "VM_BUG_ON" for e in ref[1]["events"])
