"""memory_failure() of page-cache and DAX pages (mm/memory_failure.py): what the entries and the page cache look
like afterwards, per mm/memory-failure.c (hwpoison_user_mappings, me_pagecache_clean/_dirty,
memory_failure_dev_pagemap / mf_generic_kill_procs)."""

from __future__ import annotations

import pytest

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.kernel import sched
from hmmirror.mm.page_alloc import PG
from hmmirror.sim.scenario import SimScenario  # noqa: I001 - before kevents (it imports the event tables)
from hmmirror.sim import kevents
from hmmirror.sim.runner import build_machine


def _run(kernel: str, kind: str, access: str, shared: bool = True) -> tuple:
    sc = SimScenario(machine={"kernel": kernel, "ram": "64M"})
    if kind == "ext4":
        sc.machine["fs"] = [{"mount": "/mnt/ext4", "type": "ext4"}]
        sc.files = [{"path": "/mnt/ext4/f", "size": "16K", "content": "data"}]
        op = {"op": "mmap", "as": "m0", "length": "16K", "prot": "rw", "flags": ["shared" if shared else "private"],
              "file": "/mnt/ext4/f"}
    elif kind == "shmem":
        op = {"op": "mmap", "as": "m0", "length": "16K", "prot": "rw", "flags": ["shared", "anonymous"]}
    elif kind == "fsdax":
        sc.machine["pmem"] = [{"name": "pmem0", "size": "16M", "mode": "fsdax"}]
        sc.machine["fs"] = [{"mount": "/mnt/dax", "type": "ext4", "dax": "pmem0"}]
        sc.files = [{"path": "/mnt/dax/f", "size": "2M", "content": "data"}]
        op = {"op": "mmap", "as": "m0", "length": "2M", "prot": "rw", "flags": ["shared"], "file": "/mnt/dax/f",
              "align": "2M"}
    else:
        sc.machine["pmem"] = [{"name": "pmem1", "size": "16M", "mode": "devdax", "align": "2M"}]
        op = {"op": "mmap", "as": "m0", "length": "2M", "prot": "rw", "flags": ["shared"], "file": "/dev/dax1.0",
              "align": "2M"}
    sc.setup = [op, {"op": "touch", "addr": "m0", "length": "8K", "access": access}]
    run = build_machine(sc)
    mm = run.procs["p"].mm
    base = run.names["m0"]
    pfn = x86.pte_pfn(mm.pt.lookup(base + 4096)[2]) if mm.pt.lookup(base + 4096)[0] == "pte" else None
    ret = sched.run(kevents.run_event(run, {"name": "ev0", "kind": "memory_failure", "addr": "m0+4K"}), mm.task)
    kinds = []
    for off in (0, 4096):
        level, p, e = mm.pt.lookup(base + off)
        if p is None or x86.pte_none(e):
            kinds.append("none")
        elif not e & x86._PAGE_PRESENT:
            kinds.append("hwpoison" if x86.is_hwpoison_entry(x86.pte_to_swp_entry(e)) else "swap")
        else:
            kinds.append("present")
    return run, mm, pfn, ret, kinds


@pytest.mark.parametrize("kernel", ["5.2", "6.12"])
def test_clean_page_cache_page_is_dropped_without_side_effects(kernel):
    """A clean ext4 page (read fault, no dirty/writable PTE: folio_mkclean finds nothing): try_to_unmap without
    TTU_HWPOISON clears the PTE, truncate_inode_page drops it from the page cache; the page stays poisoned."""
    run, mm, pfn, ret, kinds = _run(kernel, "ext4", "read")
    assert ret == 0 and kinds == ["present", "none"]
    inode = mm.vma_lookup(run.names["m0"]).vm_file.inode
    assert inode.i_mapping.find_page(1) == -1 and inode.i_mapping.find_page(0) >= 0
    assert run.machine.mem.flags[pfn] & PG.hwpoison


@pytest.mark.parametrize("kernel", ["5.2", "6.12"])
def test_dirty_page_cache_page_becomes_a_hwpoison_entry(kernel):
    """A page written through a shared mapping: folio_mkclean finds the dirty PTE, so try_to_unmap runs with
    TTU_HWPOISON: the PTE becomes a hwpoison entry (the neighbour stays mapped); the page leaves the cache and a
    touch of the address gets SIGBUS (do_swap_page: VM_FAULT_HWPOISON)."""
    run, mm, pfn, ret, kinds = _run(kernel, "ext4", "write")
    assert ret == 0 and kinds == ["present", "hwpoison"]
    assert run.machine.mem.flags[pfn] & PG.hwpoison
    assert any(e["what"] == "memory_failure" and e.get("result", "").startswith("dirty") for e in run.machine.events)


def test_6_18_large_ext4_folio_clean_is_split_dirty_is_ignored():
    """[6.18] the 16 KiB file is one large folio: try_to_split_thp_page splits a clean one (unmapping the whole
    folio from every mapping first), a dirty one cannot be split (filemap_release_folio): MF_MSG_UNSPLIT_THP,
    -EBUSY, the mappings stay."""
    _run_, _mm, _pfn, ret, kinds = _run("6.18", "ext4", "read")
    assert ret == 0 and kinds == ["none", "none"]
    _run_, _mm, _pfn, ret, kinds = _run("6.18", "ext4", "write")
    assert ret == -16 and kinds == ["present", "present"]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_shmem_page_is_poisoned_in_place_and_kept_in_the_cache(kernel):
    """shmem cannot write back: hwpoison entries whether dirty or not; shmem_error_remove_page returns 0, the
    poisoned page stays in the page cache."""
    run, mm, pfn, ret, kinds = _run(kernel, "shmem", "write")
    assert ret == 0 and kinds == ["present", "hwpoison"]
    inode = mm.vma_lookup(run.names["m0"]).vm_file.inode
    assert inode.i_mapping.find_page(1) == pfn
    assert run.machine.mem.flags[pfn] & PG.hwpoison


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("kind", ["fsdax", "devdax"])
def test_dax_page_failure_unmaps_the_whole_pmd_mapping(kernel, kind):
    """memory_failure_dev_pagemap / unmap_and_kill: the largest mapping of the page is unmapped whole (a PMD
    here: unmap_mapping_range of the 2 MiB block), no hwpoison entry is left; the pfn is PG_hwpoison."""
    run, mm, _pfn, ret, kinds = _run(kernel, kind, "read")
    assert ret == 0 and kinds == ["none", "none"]
    rec = [e for e in run.machine.events if e["what"] == "memory_failure"]
    assert rec and rec[-1]["kind"] == "dax" and "512 pages" in rec[-1]["result"]
    assert run.machine.mem.flags[rec[-1]["pfn"]] & PG.hwpoison


def test_two_memory_failures_of_one_anonymous_page():
    """Two reports of the same page race (campaign, 6.18): the second finds PG_hwpoison set (TestSetPageHWPoison:
    "already hardware poisoned") and leaves the page alone -- it must not clear the flag the first one set, or
    the poisoned page (kept by memory_failure's reference, mapped by nothing) looks leaked."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import run_scenario
    from hmmirror.sim.schedulers import RandomScheduler

    sc = SimScenario(machine={"kernel": "6.18", "ram": "64M"})
    sc.setup = [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw", "flags": ["private", "anonymous"]},
                {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}]
    sc.devices = [{"name": "dev0", "jobs": [{"addr": "m0", "length": "16K", "write": False}]}]
    sc.events = [{"name": f"ev{i}", "kind": "memory_failure", "addr": "m0+4K", "delay": 0} for i in range(2)]
    rets = set()
    for s in range(12):
        res = run_scenario(sc, RandomScheduler(SeededChoices(s)))
        assert not res.findings, [f.describe() for f in res.findings]
        rets |= {e["ret"] for e in res.events if e["what"] == "sim_event"}
    # -EHWPOISON: the race; -EINVAL: the second came after the PTE became a hwpoison entry (no page there)
    assert {0, -133} <= rets <= {0, -133, -22}
