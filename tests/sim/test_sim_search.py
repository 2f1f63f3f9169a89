"""Multi-finding runs, known-signature steering and coverage cells (hmmirror issue 10, parts 2-3)."""

from __future__ import annotations

from hmmirror.sim.coverage import Coverage, classify_pte, reachable
from hmmirror.sim.fuzz import Steering, load_known_file
from hmmirror.sim.runner import run_scenario, scheduler_for
from hmmirror.sim.scenario import SimScenario


def _scenario(kernel: str, setup: list, jobs: list, events: list | None = None, machine: dict | None = None,
              files: list | None = None) -> SimScenario:
    sc = SimScenario(machine={"kernel": kernel, "ram": "64M", **(machine or {})}, files=files or [])
    sc.setup = setup
    sc.devices = [{"name": "dev0", "jobs": jobs}]
    sc.events = events or []
    return sc


def _two_violations() -> SimScenario:
    # [5.2] a device fault starting in the gap below a VMA (handle_mm_fault with a NULL vma, hmm-5.2.md §13)
    # and the OOM reaper's non-blockable range ending in hmm_invalidate_range_end (mutex, §3.4)
    return _scenario("5.2", [{"op": "mmap", "as": "m0", "length": "32K", "prot": "rw",
                              "flags": ["private", "anonymous"]},
                             {"op": "touch", "addr": "m0", "length": "32K", "access": "write"}],
                     [{"addr": "m0-8K", "length": "16K", "write": False}],
                     [{"name": "ev0", "kind": "oom_reap", "proc": "p", "delay": 0}])


def test_a_run_goes_on_after_a_finding_and_reports_every_one():
    res = run_scenario(_two_violations(), scheduler_for(_two_violations()))
    invs = [f.invariant for f in res.findings]
    assert "report:null_deref" in invs and "sleep_in_atomic" in invs, invs
    assert res.finding is res.findings[0]


def test_without_continuation_the_first_finding_ends_the_run():
    from hmmirror.sim import engine as eng_mod
    orig = eng_mod.Engine.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.continue_after = False
    eng_mod.Engine.__init__ = init
    try:
        res = run_scenario(_two_violations(), scheduler_for(_two_violations()))
    finally:
        eng_mod.Engine.__init__ = orig
    assert len(res.findings) == 1


def test_steering_lowers_features_that_lead_to_known_signatures():
    st = Steering()
    for i in range(40):
        bad = i % 2 == 0
        feats = ["mode:fault", "cpu:touch"] + (["event:oom_reap"] if bad else ["event:migrate"])
        st.feed(feats, known_only=bad, new_cells=False)
    assert st.weights["event:oom_reap"] < 0.5 < st.weights["event:migrate"]
    assert 0.5 < st.weights["mode:fault"] < 2            # in every run: neutral


def test_steering_raises_features_that_reach_new_cells():
    st = Steering()
    for i in range(40):
        feats = ["mode:snapshot"] if i % 4 == 0 else ["mode:fault"]
        st.feed(feats, known_only=False, new_cells=i % 4 == 0)
    assert st.weights["mode:snapshot"] > st.weights["mode:fault"]


def test_known_file(tmp_path):
    p = tmp_path / "known.txt"
    p.write_text("# a comment\nliveness|mm.hmm.v5_2.hmm_range_fault|refault\n"
                 'signature = "coherence|drivers.x.commit|-"\nnot a signature\n')
    assert load_known_file(str(p)) == {"liveness|mm.hmm.v5_2.hmm_range_fault|refault", "coherence|drivers.x.commit|-"}


def _cells(sc: SimScenario) -> set:
    cov = Coverage(sc.kernel)
    res = run_scenario(sc, scheduler_for(sc), coverage=cov.run_collector())
    assert not res.findings, [f.signature for f in res.findings]
    cov.add_run(res)
    return cov.walk


def test_cells_of_a_populated_anonymous_range():
    """hmm-5.2.md §6-§7.3: a PTE table under the PMD -> hmm_vma_walk_pmd walks it, each present PTE -> 0."""
    sc = _scenario("5.2", [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw", "flags": ["private", "anonymous"]},
                           {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}],
                   [{"addr": "m0", "length": "16K", "write": False}])
    assert _cells(sc) == {("anon", "pmd", "table", "0"), ("anon", "pte", "present", "0"), ("anon", "api", "-", "0")}


def test_cells_of_an_fsdax_pmd_fault():
    """[5.2] an untouched 2 MiB-congruent fsdax mapping: the walk meets no table (hole, faulted: -EBUSY, the walk
    restarts), then a devmap PMD leaf (hmm_vma_walk_pmd -> hmm_vma_handle_pmd: 0)."""
    sc = _scenario("5.2", [{"op": "mmap", "as": "m0", "length": "2M", "prot": "rw", "flags": ["shared"],
                            "file": "/mnt/dax/f", "align": "2M"}],
                   [{"addr": "m0", "length": "64K", "write": False}],
                   machine={"pmem": [{"name": "pmem0", "size": "16M", "mode": "fsdax"}],
                            "fs": [{"mount": "/mnt/dax", "type": "ext4", "dax": "pmem0"}]},
                   files=[{"path": "/mnt/dax/f", "size": "2M", "content": "data"}])
    assert _cells(sc) == {("fsdax", "hole", "none", "-EBUSY"), ("fsdax", "pmd", "devmap", "0"),
                          ("fsdax", "api", "-", "0")}


def test_cells_of_a_modern_walk_include_the_test_and_pud_handlers():
    """[6.x] walk_page_range calls hmm_vma_walk_test for every VMA (0: walk it) and pud_entry for a PUD table
    (0, ACTION_CONTINUE); a populated anonymous range is then walked as in 5.2.  Every cell is reachable."""
    for k in ("6.12", "6.18"):
        sc = _scenario(k, [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw",
                            "flags": ["private", "anonymous"]},
                           {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}],
                       [{"addr": "m0", "length": "16K", "write": False}])
        cells = _cells(sc)
        assert cells == {("anon", "test", "-", "0"), ("anon", "pud", "table", "0"), ("anon", "pmd", "table", "0"),
                         ("anon", "pte", "present", "0"), ("anon", "api", "-", "0")}
        assert cells <= set(reachable(k)["walk"])


def test_cells_of_a_walk_over_a_poisoned_shmem_page():
    """memory_failure of a shmem page leaves a hwpoison entry (shmem cannot write back); the HMM walk that
    follows meets it in hmm_vma_handle_pte: [5.2] -EFAULT (hmm-5.2.md §7.3), [6.x] -EFAULT when a fault is
    requested there."""
    for k in ("5.2", "6.18"):
        sc = _scenario(k, [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw",
                            "flags": ["shared", "anonymous"]},
                           {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}],
                       [{"addr": "m0", "length": "16K", "write": False}],
                       [{"name": "ev0", "kind": "memory_failure", "addr": "m0+4K", "delay": 0}])
        sc.scheduler = {"kind": "switch", "switches": [[0, 1]]}      # the event first, then the device
        cov = Coverage(k)
        res = run_scenario(sc, scheduler_for(sc), coverage=cov.run_collector())
        cov.add_run(res)
        assert ("shmem", "pte", "hwpoison", "-EFAULT") in cov.walk
        assert cov.walk <= set(reachable(k)["walk"])


def test_cells_are_reachable_and_classification_is_the_spec_s():
    for k in ("5.2", "6.18"):
        r = reachable(k)
        assert r["walk"] and r["mode_ret"] and r["event_fn"]
    from hmmirror import Machine
    m = Machine("5.2", ram=16 << 20)
    assert classify_pte(0, m.mem) == "none"


def _fsdax(events: list, jobs: list) -> SimScenario:
    sc = _scenario("5.2", [{"op": "mmap", "as": "m0", "length": "64K", "prot": "rw", "flags": ["shared"],
                            "file": "/mnt/dax/f"},
                           {"op": "touch", "addr": "m0", "length": "64K", "access": "read"}], jobs, events,
                   machine={"pmem": [{"name": "pmem0", "size": "16M", "mode": "fsdax"}],
                            "fs": [{"mount": "/mnt/dax", "type": "ext4", "dax": "pmem0"}]},
                   files=[{"path": "/mnt/dax/f", "size": "64K", "content": "data"}])
    sc.scheduler = {"kind": "switch", "switches": [[0, 1]]}      # the event first, then the device
    return sc


def test_fsdax_namespace_removal_leaves_mapped_pfns_without_a_pgmap():
    """[5.2] nd_pmem_remove with a mounted, mapped DAX filesystem: the teardown completes (mappings hold no
    pgmap references), the PTEs still map the pfns, get_dev_pagemap fails on them and hmm_range_fault restarts
    the walk forever while the range stays valid (hmm-5.2.md §7.3, §9.1): the model's livelock guard."""
    sc = _fsdax([{"name": "ev0", "kind": "pmem_remove", "device": "pmem0", "delay": 0}],
                [{"addr": "m0", "length": "16K", "write": False}])
    res = run_scenario(sc, scheduler_for(sc))
    assert [f.invariant for f in res.findings] == ["liveness"]
    assert res.findings[0].location == "mm.hmm.v5_2.hmm_range_fault"
    assert any(e["what"] == "pgmap_removed" for e in res.events)


def test_mirror_unbind_waits_for_faults_and_later_faults_fail():
    sc = _fsdax([{"name": "ev0", "kind": "mirror_unbind", "delay": 2}],
                [{"addr": "m0", "length": "16K", "write": False}] * 3)
    res = run_scenario(sc, scheduler_for(sc))
    assert not res.findings
    rets = [e["ret"] for e in res.events if e["what"] == "sim_fault"]
    assert -19 in rets and rets[-1] == -19


def test_page_counts_stay_clean_after_fsdax_namespace_removal():
    """After memunmap_pages the removed range has no struct pages: the 5.2 PTEs still mapping it are not
    counted (mm/rmap.counted), so the page-count walk (every step) finds nothing."""
    sc = _fsdax([{"name": "ev0", "kind": "pmem_remove", "device": "pmem0", "delay": 0}], [])
    sc.devices = []
    res = run_scenario(sc, scheduler_for(sc), every_step=True)
    assert not res.findings, [f.signature for f in res.findings]
    assert any(e["what"] == "pgmap_removed" for e in res.events)


def test_a_recursive_lock_ends_the_run():
    """[5.2] B6: the fault under the devmap PUD lock takes page_table_lock again (recursive_lock).  The CPU
    would spin there for ever; the run ends at that step, so the tasks that would wait for the lock do not add
    deadlock / no_waker findings that are only its consequences."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "docs/known-behaviours/5.2-fault-under-pud-lock.toml"
    sc = SimScenario.load(str(path))
    res = run_scenario(sc, scheduler_for(sc))
    invs = [f.invariant for f in res.findings]
    assert "recursive_lock" in invs, invs
    assert invs[-1] == "recursive_lock" and not {"deadlock", "no_waker"} & set(invs), invs


def test_hypothesis_sessions_do_not_depend_on_the_modules_imported(tmp_path, monkeypatch):
    """Hypothesis draws some integers from constants it finds in the source of the local modules in
    sys.modules; a campaign's session pins that pool, so importing one more module (as a forked worker may
    have, a fresh Dask worker not) does not change the scenarios it draws."""
    import hashlib
    import sys

    from hmmirror.sim import fuzz as F

    def session() -> list[str]:
        seen: list[str] = []
        orig = F.run_scenario

        def spy(sc, sched, **kw):
            seen.append(hashlib.md5((sc.to_toml() + repr(sched.switches)).encode()).hexdigest())
            return orig(sc, sched, **kw)
        monkeypatch.setattr(F, "run_scenario", spy)
        cfg = F.Config(kernel="5.2", findings_dir=str(tmp_path / "f"), seed=3, kinds=("anon",), events=(),
                       examples=40, scheduler="switch")
        st = F.Stats()
        F._hypothesis_session(cfg, 3, float("inf"), st, F.Recorder(cfg, st, None, verify=False))
        monkeypatch.setattr(F, "run_scenario", orig)
        return seen

    before = session()
    mod = tmp_path / "pool_probe_constants.py"
    mod.write_text("VALUES = [3, 5, 6, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 97, 127, 255, 256, 511]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("pool_probe_constants")
    try:
        after = session()
    finally:
        sys.modules.pop("pool_probe_constants", None)
    assert len(before) == 40 and before == after


def test_two_device_tasks_reusing_a_range_keep_their_own():
    """[5.2] two device tasks each re-fault the same range with their array kept from the previous call
    (``fault_reuse``): each task keeps its own ``struct hmm_range``, so one task's ``hmm_range_unregister``
    (which clears ``range->hmm``) never runs under the other's ``hmm_range_fault`` (campaign finding
    ``report:null_deref|mm.hmm.v5_2.hmm_range_fault``: the adapter shared one range per address range)."""
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.schedulers import RandomScheduler

    job = {"addr": "m0", "length": "8K", "write": True, "mode": "fault_reuse", "pattern": 0}
    sc = _scenario("5.2", [{"op": "mmap", "as": "m0", "length": "8K", "prot": "rw",
                            "flags": ["private", "anonymous"]},
                           {"op": "touch", "addr": "m0", "length": "8K", "access": "write"}], [job, job, job])
    sc.devices.append({"name": "dev1", "jobs": [job, job, job]})
    sigs = set()
    for seed in range(40):
        res = run_scenario(sc, RandomScheduler(SeededChoices(seed)))
        sigs |= {f.signature for f in res.findings}
    assert not any(s.startswith("report:null_deref") for s in sigs), sigs
