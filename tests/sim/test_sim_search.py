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


KNOWN = "liveness|mm.hmm.v5_2.hmm_range_fault|refault"


def test_steering_lowers_features_that_lead_to_known_signatures():
    st = Steering()
    for i in range(40):
        bad = i % 2 == 0
        feats = ["mode:fault", "cpu:touch"] + (["event:oom_reap"] if bad else ["event:migrate"])
        st.feed(feats, [KNOWN] if bad else [], new_cells=False, key=(0, i))
    w = st.fit({KNOWN})
    assert w["event:oom_reap"] < 0.5 < w["event:migrate"]
    assert "mode:fault" not in w                          # drawn once in every run: tells nothing (weight 1)
    # the rows keep their signatures: before that signature was known, nothing is steered away from
    assert st.fit(set()).get("event:oom_reap", 1.0) >= 0.9


def test_steering_credits_the_feature_drawn_where_the_known_signature_follows():
    """Runs draw several features each; the known signature follows the draws of one of them (a
    logistic model of draw counts, not a marginal rate per feature, which every busy run dilutes)."""
    st = Steering()
    for i in range(120):
        n_bad = i % 3                                      # 0, 1 or 2 draws of the culprit
        feats = ["cpu:touch"] * (1 + i % 2) + ["job:read"] * (1 + i % 4) + ["range:below"] * n_bad
        st.feed(feats, [KNOWN] if n_bad and i % 5 else ["x|y|new"] if i % 7 == 0 else [], False, (0, i))
    w = st.fit({KNOWN})
    assert w["range:below"] < 0.3
    assert 0.5 < w["job:read"] < 2 and 0.5 < w["cpu:touch"] < 2


def test_steering_raises_features_that_reach_new_cells():
    st = Steering()
    for i in range(40):
        feats = ["mode:snapshot"] if i % 4 == 0 else ["mode:fault"]
        st.feed(feats, [], new_cells=i % 4 == 0, key=(0, i))
    w = st.fit(set())
    assert w["mode:snapshot"] > 1 >= w["mode:fault"]


def test_steering_rows_persist_in_the_findings_directory(tmp_path):
    st = Steering()
    for i in range(40):
        st.feed(["event:oom_reap"] if i % 2 else ["event:migrate"], [KNOWN] if i % 2 else [], False, (3, i))
    st.save(str(tmp_path / ".steering.json"))
    again = Steering()
    again.load(str(tmp_path / ".steering.json"))
    assert again.fit({KNOWN}) == st.fit({KNOWN}) and again.fit({KNOWN})["event:oom_reap"] < 0.5
    Steering().load(str(tmp_path / "missing.json"))        # no file: nothing to load


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


def test_a_5_2_write_fault_over_a_swap_entry_is_reported_not_faulted():
    """hmm-5.2.md §7.3/§13: [5.2] hmm_vma_handle_pte tests a real swap entry before hmm_pte_need_fault ran, so
    even a write fault leaves it NONE and returns 0 (the swap cells' -EBUSY/-EFAULT are unreachable); [6.x] the
    same walk faults it in (hmm_vma_fault: -EBUSY, the walk restarts)."""
    for k, ret in (("5.2", "0"), ("6.18", "-EBUSY")):
        sc = _scenario(k, [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw",
                            "flags": ["private", "anonymous"]},
                           {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}],
                       [{"addr": "m0", "length": "16K", "write": True, "delay": 40}],
                       [{"name": "ev0", "kind": "reclaim", "addr": "m0", "delay": 0}])
        sc.scheduler = {"kind": "switch", "switches": [[0, 1]]}      # the event first, then the device
        cov = Coverage(k)
        cov.add_run(run_scenario(sc, scheduler_for(sc), coverage=cov.run_collector()))
        swap = {c[3] for c in cov.walk if c[:3] == ("anon", "pte", "swap")}
        assert swap == {ret}
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
    assert invs == ["sleep_in_atomic"], invs
    # the recursive acquisition of the page_table_lock the fault slept under is that finding's consequence
    # (the same task, the same lock hold): reported with it, not a finding, a signature or a reproducer of
    # its own -- and still the end of the run
    cons = [(c.invariant, c.location, c.state["consequence_of"]) for c in res.consequences]
    assert cons == [("recursive_lock", "mm.huge_memory.vmf_insert_pfn_pud", res.findings[0].signature)], cons
    assert res.steps == res.consequences[0].step + 1


def test_a_teardown_waiting_for_a_kept_pgmap_reference_is_that_findings_consequence():
    """[5.2] B9 (a walk keeps a pgmap reference after -EFAULT), then nd_pmem_remove of that namespace: the
    teardown waits for ever for the reference drain.  The model's state shows the kept reference is what it
    waits for: the wait is reported as the pgmap_refcount finding's consequence, not as no_waker."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "docs/known-behaviours/5.2-pgmap-ref-kept-after-efault.toml"
    sc = SimScenario.load(str(path))
    sc.events = [{"name": "ev0", "kind": "pmem_remove", "device": "pmem0", "delay": 0}]
    sc.scheduler = {"kind": "switch", "switches": []}      # the device job runs to its end, then the removal
    res = run_scenario(sc, scheduler_for(sc))
    kept = [f for f in res.findings if f.invariant == "pgmap_refcount"]
    assert kept and kept[0].detail == "kept", [f.signature for f in res.findings]
    assert not {"no_waker", "device_teardown"} & {f.invariant for f in res.findings}
    assert [(c.invariant, c.state["consequence_of"]) for c in res.consequences] == [("no_waker", kept[0].signature)]


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


def test_scenarios_expected_to_hit_only_known_signatures_are_drawn_again(tmp_path):
    from hmmirror.sim.fuzz import (ACCEPT_MIN, MAX_DRAWS, Config, Recorder, Stats, UnitSearch, _seeded_run,
                                   accept_probability, candidate_seed)

    model = {"b0": -4.0, "beta": {"range:below": 1.5}}
    assert accept_probability({}, ["range:below"]) == 1.0                     # no model yet: every draw runs
    a = [accept_probability(model, ["range:below"] * n) for n in range(7)]
    assert a == sorted(a, reverse=True) and a[0] > 0.8 and a[-1] == ACCEPT_MIN
    assert candidate_seed(1234, 0) == 1234 and candidate_seed(1234, 1) != 1234

    cfg = Config(kernel="5.2", findings_dir=str(tmp_path))
    stats = Stats()
    search = UnitSearch(cfg, {"model": {"b0": 50.0, "beta": {}}})           # every scenario: known only
    _seeded_run(cfg, 777, float("inf"), stats, Recorder(cfg, stats, verify=False), "random", search)
    assert stats.runs == 1 and stats.rejected == search.rejected == MAX_DRAWS - 1   # one of them runs
    stats2 = Stats()
    _seeded_run(cfg, 777, float("inf"), stats2, Recorder(cfg, stats2, verify=False), "random",
                UnitSearch(cfg, {"model": {"b0": -50.0, "beta": {}}}))        # none: the first one runs
    assert stats2.runs == 1 and stats2.rejected == 0


def test_a_second_memory_failure_of_a_page_being_poisoned_leaves_it_poisoned():
    """memory_failure: TestSetPageHWPoison already set -> "already hardware poisoned", -EHWPOISON; it must not
    unpoison the page the first one is unmapping (found by a campaign: two memory_failure events of one anon
    page interleaved left memory_failure's reference on an unpoisoned page nothing maps -- page_counts)."""
    sc = _scenario("6.18", [{"op": "mmap", "as": "m0", "length": "16K", "prot": "rw", "flags": ["private", "anonymous"]},
                            {"op": "touch", "addr": "m0", "length": "16K", "access": "write"}], [],
                   [{"name": "ev0", "kind": "memory_failure", "addr": "m0+4K", "delay": 0},
                    {"name": "ev1", "kind": "memory_failure", "addr": "m0+4K", "delay": 0}])
    sc.devices = []
    sc.scheduler = {"kind": "switch", "switches": [[0, 0], [1, 1]]}   # ev0 poisons and sleeps; ev1 runs; ev0
    res = run_scenario(sc, scheduler_for(sc), every_step=True)
    assert not res.findings, [f.signature for f in res.findings]
    mf = [e["unmapped"] for e in res.events if e.get("what") == "memory_failure"]
    assert sorted(mf) == [False, True], mf
