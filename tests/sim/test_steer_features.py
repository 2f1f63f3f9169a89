"""Steering of a campaign started on known findings: per-job scenario features, the noisy-OR known-only model and
the choice of the scenario a seeded run runs (hmmirror issue 10, part 2)."""

import random

import pytest

from hmmirror.sim import fuzz
from hmmirror.sim.fuzz import Config, Steering, UnitSearch, draw_steered, known_only_estimate
from hmmirror.sim.scenario import SimScenario
from hmmirror.sim.steer_features import bag, fit_noisy_or, job_features, noisy_or


def _scenario() -> SimScenario:
    return SimScenario.from_doc({
        "machine": {"kernel": "5.2", "ram": "64M"},
        "process": [{"name": "p"}],
        "op": [{"op": "mmap", "as": "m0", "length": "64K", "prot": "rw", "flags": ["private", "anonymous"]},
               {"op": "touch", "addr": "m0", "length": "16K", "access": "read"},     # zero-page PTEs, pages 0-3
               {"op": "munmap", "addr": "m0+40K", "length": "8K"},                   # a gap: pages 10-11
               {"op": "mmap", "as": "m1", "length": "16K", "prot": "r", "flags": ["shared", "anonymous"]}],
        "sim": {"driver": "builtin", "mirror": "p",
                "thread": [{"name": "cpu0", "proc": "p",
                            "ops": [{"op": "munmap", "addr": "m0+8K", "length": "4K"},
                                    {"op": "touch", "addr": "m0+48K", "length": "4K", "access": "read"}]}],
                "device": [{"name": "dev0", "jobs": [
                    {"addr": "m0", "length": "16K", "write": False},                   # reads the zero pages
                    {"addr": "m0-8K", "length": "24K", "write": True, "mode": "fault_nonblock"},   # from below
                    {"addr": "m0+32K", "length": "36K", "write": False, "mode": "snapshot"}]},     # gap, end
                    {"name": "dev1", "jobs": [{"addr": "m1+4K", "length": "4K", "write": True}]}],
                "event": [{"name": "ev0", "kind": "memory_failure", "addr": "m0+4K", "delay": 2},
                          {"name": "ev1", "kind": "oom_reap", "proc": "p", "delay": 0}]}})


def test_job_features_name_the_pages_each_job_walks():
    jobs = job_features(_scenario())
    assert len(jobs) == 5                                       # four jobs, then the events
    read, below, snap, shm, events = (set(j) for j in jobs)
    assert {"x:fault:r", "x:r:anon", "x:r:anon:r", "x:r:in", "x:r:cpu:munmap", "x:r:ev:memory_failure"} <= read
    assert not any(f.endswith(":gap") for f in read)            # pages 0-3: the gap is at 10-11
    assert {"x:fault_nonblock:w", "x:w:below", "x:w:anon:r"} <= below
    assert {"x:snapshot:s", "x:s:gap", "x:s:past", "x:s:anon:n", "x:s:cpu:touch_r"} <= snap
    assert "x:s:cpu:munmap" not in snap and "x:s:ev:memory_failure" not in snap     # pages 2 and 1: not 8-16
    assert {"x:w:shmem", "x:w:shmem:n", "x:w:shmem:prot", "x:w:in"} <= shm   # a read-only mapping written
    assert events == {"x:ev:memory_failure:anon", "x:ev:oom_reap:-"}


def _runs(n: int, seed: int = 1) -> tuple[list[list[list[str]]], list[float]]:
    """Runs of 1-3 jobs; a job that starts below its mapping hits a known signature 9 times in 10 whatever the
    other jobs do, a run without one 1 time in 10."""
    rng = random.Random(seed)
    benign = (["x:w:anon", "x:w:in"], ["x:s:file", "x:s:in"], ["x:w:shmem", "x:w:in"], ["x:r:devdax", "x:r:in"])
    bags, ys = [], []
    for _ in range(n):
        jobs = [list(rng.choice(benign)) for _ in range(rng.randint(1, 3))]
        culprit = rng.random() < 0.3
        if culprit:
            jobs[rng.randrange(len(jobs))] = ["x:r:anon", "x:r:below"]
        bags.append(bag(["mode:fault"] * len(jobs), jobs + [[]]))
        ys.append(float(rng.random() < (0.9 if culprit else 0.1)))
    return bags, ys


def test_noisy_or_model_blames_the_job_whatever_the_others_do():
    bags, ys = _runs(600)
    w = fit_noisy_or(bags, ys)
    alone = noisy_or(w, bag(["mode:fault"], [["x:r:anon", "x:r:below"], []]))
    crowded = noisy_or(w, bag(["mode:fault"] * 4, [["x:r:anon", "x:r:below"], ["x:w:anon", "x:w:in"],
                                                  ["x:s:file", "x:s:in"], ["x:w:shmem", "x:w:in"], []]))
    harmless = noisy_or(w, bag(["mode:fault"] * 3, [["x:w:anon", "x:w:in"], ["x:s:file", "x:s:in"],
                                                   ["x:w:shmem", "x:w:in"], []]))
    assert alone > 0.7 and crowded >= alone - 0.05            # three harmless jobs do not hide the culprit
    assert harmless < 0.35
    assert fit_noisy_or(bags, [0.0] * len(bags)) == {}          # nothing known-only: no model


def test_job_features_persist_and_drive_the_known_only_model(tmp_path):
    bags, ys = _runs(300, seed=2)
    st = Steering()
    known = "report:null_deref|mm.hmm.v5_2.hmm_vma_do_fault|-"
    for i, (b, y) in enumerate(zip(bags, ys)):
        jobs = [inst[1:] for inst in b[:-1]] + [[]]
        st.feed(["mode:fault"] * (len(b) - 1), [known] if y else [], False, (0, i), jobs)
    st.fit({known})
    assert st.model.get("mil")
    st.save(str(tmp_path / ".steering.json"))
    again = Steering()
    again.load(str(tmp_path / ".steering.json"))
    again.fit({known})
    assert again.model["mil"] == st.model["mil"]
    culprit, harmless = [["x:r:anon", "x:r:below"], []], [["x:w:anon", "x:w:in"], []]
    assert noisy_or(again.model["mil"], bag(["mode:fault"], culprit)) > 0.7
    assert noisy_or(again.model["mil"], bag(["mode:fault"], harmless)) < 0.35
    # the estimate a scenario is judged by: the mean of that and the logistic model of the draw counts (which
    # cannot tell the two apart here: the same draws)
    assert known_only_estimate(again.model, ["mode:fault"], culprit) > \
        known_only_estimate(again.model, ["mode:fault"], harmless) + 0.2
    again.fit(set())                                            # before that signature was known: no model
    assert "mil" not in again.model


def _estimates(cfg: Config, seed: int, model: dict) -> list[float]:
    out = []
    for j in range(fuzz.MAX_DRAWS):
        _s, _c, sc, feats, jobs = draw_steered(cfg, fuzz.candidate_seed(seed, j), None, None)
        out.append(known_only_estimate(model, feats, jobs))
    return out


def test_a_seeded_run_accepting_no_candidate_runs_the_least_likely_known_only(monkeypatch):
    monkeypatch.setattr(fuzz, "ACCEPT_MIN", 0.0)
    # no coverage targets: _estimates draws the candidates without a unit's search state
    cfg = Config(kernel="5.2", target=False)
    model = {"mil": {"bias:bg": 3.0, "x:r:anon": 2.0, "x:w:anon": 1.0, "x:s:below": -1.0, "x:fault:r": 1.5}}
    for seed in (11, 12, 13):
        search = UnitSearch(cfg, {"model": model})
        seed_j, _c, sc, feats, jobs = draw_steered(cfg, seed, None, search)
        est = _estimates(cfg, seed, model)
        assert search.rejected == fuzz.MAX_DRAWS - 1
        assert seed_j == fuzz.candidate_seed(seed, est.index(min(est)))
        assert known_only_estimate(model, feats, jobs) == min(est)


def test_steered_seeded_runs_draw_less_of_what_the_model_expects_known_only():
    """A model that expects a known signature from every job that reads an anonymous mapping: the steered
    draws have far fewer such jobs than the unsteered stream of the same seeds."""
    cfg = Config(kernel="5.2")
    model = {"mil": {"bias:bg": -4.0, "bias:job": -4.0, "x:r:anon": 6.0}}

    def reads_anon(jobs: list[list[str]]) -> bool:
        return any("x:r:anon" in j for j in jobs)

    plain = sum(reads_anon(draw_steered(cfg, s, None, None)[4]) for s in range(200, 320))
    steered = sum(reads_anon(draw_steered(cfg, s, None, UnitSearch(cfg, {"model": model}))[4])
                  for s in range(200, 320))
    assert plain >= 15
    assert steered <= plain / 4


@pytest.mark.parametrize("expr,where", [("m0", ("m0", 0)), ("m12+8K", ("m12", 2)), ("t1m77-4K", ("t1m77", -1)),
                                        ("m3+2M", ("m3", 512))])
def test_addresses_are_read_as_pages_from_the_mapping(expr, where):
    from hmmirror.sim.steer_features import _where
    assert _where(expr) == where


def test_with_nothing_known_at_start_a_seeded_run_runs_its_first_candidate():
    """Blind campaigns: the model fitted on runs none of which hit a known signature leaves every draw as it was
    (same scenario stream as without steering)."""
    st = Steering()
    bags, _ys = _runs(60, seed=3)
    for i, b in enumerate(bags):
        st.feed(["mode:fault"], ["report:null_deref|mm.hmm.v5_2.hmm_vma_do_fault|-"] if i % 2 else [], True, (0, i),
                [inst[1:] for inst in b[:-1]] + [[]])
    st.fit(set())
    cfg = Config(kernel="5.2")
    for seed in (5, 6, 7):
        search = UnitSearch(cfg, {"weights": {}, "model": st.model})
        assert draw_steered(cfg, seed, None, search)[0] == seed and search.rejected == 0


def test_a_hypothesis_example_the_steering_rejects_becomes_a_steered_seeded_run(tmp_path):
    from hmmirror.sim.fuzz import Recorder, Stats, _hypothesis_session

    cfg = Config(kernel="5.2", findings_dir=str(tmp_path), examples=4)
    stats = Stats()
    search = UnitSearch(cfg, {"model": {"b0": 50.0, "beta": {}}})         # every scenario: known only
    _hypothesis_session(cfg, 99, float("inf"), stats, Recorder(cfg, stats, verify=False), None, search)
    # each example is rejected and replaced by a seeded run, which draws up to MAX_DRAWS candidates (each
    # accepted with probability ACCEPT_MIN only)
    assert stats.runs == 4
    assert stats.rejected == search.rejected and 4 + 4 < search.rejected <= 4 * fuzz.MAX_DRAWS
    assert len(search.steer.rows) == 4
