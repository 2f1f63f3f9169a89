"""migrate_pages() of a PMD-mapped anonymous THP (mm/migrate.py): set_pmd_migration_entry, the copy,
remove_migration_pmd -- and the HMM walks that meet the PMD migration entry meanwhile (hmm_vma_walk_pmd:
pmd_migration_entry_wait, -EBUSY, in both profiles)."""

from __future__ import annotations

import pytest

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.kernel import sched
from hmmirror.mm.page_alloc import PG
from hmmirror.sim.scenario import SimScenario  # noqa: I001 - before kevents (it imports the event tables)
from hmmirror.sim import kevents
from hmmirror.sim.runner import build_machine, run_scenario
from hmmirror.mm import migrate


def _thp(kernel: str, jobs: list | None = None) -> SimScenario:
    sc = SimScenario(machine={"kernel": kernel, "ram": "64M", "thp": {"enabled": "always"}})
    sc.setup = [{"op": "mmap", "as": "m0", "length": "2M", "prot": "rw", "flags": ["private", "anonymous"],
                 "align": "2M"},
                {"op": "touch", "addr": "m0", "length": "8K", "access": "write"}]
    sc.devices = [{"name": "dev0", "jobs": jobs or []}]
    sc.events = [{"name": "ev0", "kind": "migrate", "addr": "m0+4K", "delay": 0, "hold": 8}]
    return sc


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_a_pmd_mapped_thp_is_migrated_whole(kernel):
    run = build_machine(_thp(kernel))
    mm = run.procs["p"].mm
    base = run.names["m0"]
    mem = run.machine.mem
    level, _p, pmd = mm.pt.lookup(base)
    assert level == "pmd" and x86.pmd_leaf(pmd)
    old = x86.pte_pfn(pmd)
    data = bytes(mem.contents.get(old + 1, b""))
    ret = sched.run(kevents.run_event(run, run.scenario.events[0]), mm.task)
    assert ret == 0
    level, _p, pmd = mm.pt.lookup(base)
    new = x86.pte_pfn(pmd)
    assert level == "pmd" and x86.pmd_leaf(pmd) and x86.pte_write(pmd) and new != old
    assert int(mem.order[new]) == 9 and (mem.mapcount[new: new + 512] == 1).all() and mem.refcount[new] == 1
    assert bytes(mem.contents.get(new + 1, b"")) == data
    assert mem.flags[old] & PG.buddy                      # the old folio went back to the allocator
    assert [e["what"] for e in run.machine.events if e["what"].startswith("migrate_")] == \
        ["migrate_unmap_pmd", "migrate_remap_pmd"]


def test_a_pmd_migration_entry_split_meanwhile_is_restored_as_ptes():
    """The PMD migration entry is split (mprotect/munmap of part of it: __split_huge_pmd_locked makes 512 PTE
    migration entries) before the copy ends: remove_migration_pte maps each subpage of the new folio."""
    from hmmirror.mm.huge_memory import __split_huge_pmd

    run = build_machine(_thp("6.18"))
    mm = run.procs["p"].mm
    base = run.names["m0"]
    mem = run.machine.mem
    vma = mm.vma_lookup(base)
    _l, pmdp, pmd = mm.pt.lookup(base)
    old = x86.pte_pfn(pmd)
    assert sched.run(migrate.set_pmd_migration_entry(mm, vma, base, pmd, old), mm.task)
    _l, pmdp, pmd = mm.pt.lookup(base)
    assert not x86.pmd_present(pmd) and x86.is_migration_entry(x86.pte_to_swp_entry(pmd))
    assert (mem.mapcount[old: old + 512] == 0).all()
    sched.run(__split_huge_pmd(vma, pmdp, base), mm.task)
    new = mem.alloc_folio(9)
    assert sched.run(migrate.remove_migration_pmd(mm, base, old, new, True), mm.task) == 512
    level, _p, pte = mm.pt.lookup(base + 5 * 4096)
    assert level == "pte" and x86.pte_pfn(pte) == new + 5 and x86.pte_write(pte)


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_hmm_walks_meet_the_pmd_migration_entry(kernel):
    """A device fault that runs while the THP is being migrated meets the PMD migration entry in
    hmm_vma_walk_pmd, waits for it (pmd_migration_entry_wait) and restarts: -EBUSY -- within 40 random
    schedules of this scenario."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.coverage import Coverage, reachable
    from hmmirror.sim.schedulers import RandomScheduler

    sc = _thp(kernel, [{"addr": "m0", "length": "16K", "write": False},
                       {"addr": "m0", "length": "16K", "write": True}])
    cov = Coverage(kernel)
    for s in range(40):
        res = run_scenario(sc, RandomScheduler(SeededChoices(s)), coverage=cov.run_collector())
        cov.add_run(res)
        if ("anon", "pmd", "migration", "-EBUSY") in cov.walk:
            break
    assert ("anon", "pmd", "migration", "-EBUSY") in cov.walk
    assert cov.walk <= set(reachable(kernel)["walk"])


def test_a_pmd_split_while_the_remap_waits_for_the_pmd_lock_is_remapped_as_ptes():
    """Campaign reproducer (6.12): a munmap inside the THP splits the PMD migration entry into 512 PTE
    migration entries while remove_migration_pmd waits for the PMD lock; the remap must map the PTEs that are
    left (remove_migration_pte), not give up -- else the device fault waiting on one never wakes."""
    import pathlib

    from hmmirror.sim.runner import scheduler_for

    path = pathlib.Path(__file__).parent / "data" / "thp-migration-split-while-remapping.toml"
    sc = SimScenario.load(str(path))
    res = run_scenario(sc, scheduler_for(sc))
    assert res.diverged is None and not res.findings, [f.signature for f in res.findings]
    remap = [e for e in res.events if e["what"] == "migrate_remap_pmd"]
    assert remap and remap[0]["mapped"] == 512 - 10          # the munmap took 40 KiB of it


def test_remap_after_munmap_of_the_thps_start_restores_every_other_subpage():
    """Blind 5.2 campaign (seed 31807): while the THP's PMD migration entry waits for the copy, munmap of
    [m0-4K, m0+20K) splits it into PTE migration entries and removes the first five.  remove_migration_ptes()
    walks every VMA of the anon_vma (rmap_walk_anon), not only one at the folio's first address, so the 507
    subpages left are remapped and the fault waiting in migration_entry_wait is woken."""
    import pathlib

    from hmmirror.sim.runner import scheduler_for

    path = pathlib.Path(__file__).parent / "data" / "thp-migration-remap-after-munmap-of-its-start.toml"
    sc = SimScenario.load(str(path))
    res = run_scenario(sc, scheduler_for(sc))
    assert res.diverged is None and not res.findings, [f.signature for f in res.findings]
    remap = [e for e in res.events if e["what"] == "migrate_remap_pmd"]
    assert remap and remap[0]["mapped"] == 512 - 5
