"""The throughput paths give exactly what the reference paths give (issue 10.5).

* ``cpu_leaf_range`` (a range of CPU translations read from the table rows at once) equals ``cpu_leaf`` page
  by page, on every mapping kind the generator draws, before and after runs;
* a device table programmed a range at a time (``DevicePageTable.commit_range``, the checks' vectorised
  pre-checks) gives the same runs -- findings, messages, locations, stacks, steps -- as the same table
  programmed page by page;
* a reproducer's fresh replay forked from the worker's zygote judges as a new interpreter does;
* log records routed by kind (``log_kinds``) give the runs of every instrument hearing every record.
"""

from __future__ import annotations

import os
import sys

import pytest

from hmmirror.drivers.device_mmu import DevicePageTable
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.invariants import cpu_leaf, cpu_leaf_range, default_invariants
from hmmirror.sim.runner import SimRun, build_machine, run_scenario
from hmmirror.sim.scenario import generate
from hmmirror.sim.schedulers import PCTScheduler, RandomScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K = 4096


def _ranges(mm):
    """Page ranges over every VMA: its start, middle and end (up to 600 pages each) and the gap after it."""
    for vma in list(mm.vmas):
        n = (vma.vm_end - vma.vm_start) // K
        for first in {0, max(0, n // 2 - 300), max(0, n - 600)}:
            yield vma.vm_start + first * K, min(600, n - first) + 3     # 3 pages past: the next VMA or a hole


def _check_machine(machine) -> int:
    pages = 0
    for mm in machine.mms.values():
        if mm.exited:
            continue
        for start, n in _ranges(mm):
            pfn, rd, wr = cpu_leaf_range(mm, start, n)
            want = [cpu_leaf(mm, start + i * K) for i in range(n)]
            assert [(int(p), bool(r), bool(w)) for p, r, w in zip(pfn, rd, wr)] == want, (mm.name, hex(start))
            pages += n
    return pages


class _Keep:
    """An instrument that keeps the run (its machine) for the test."""

    def attach(self, eng, run):
        self.run = run


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_cpu_leaf_range_equals_cpu_leaf(kernel):
    pages = 0
    for seed in range(10):
        sc = generate(SeededChoices(seed), kernel, "builtin", inject=True)
        pages += _check_machine(build_machine(sc, run=SimRun(sc)).machine)
        keep = _Keep()
        run_scenario(sc, RandomScheduler(SeededChoices(seed)), invariants=default_invariants() + [keep])
        pages += _check_machine(keep.run.machine)
    assert pages > 10000


def _outcome(res):
    return (res.steps, res.extra_findings, [(f.signature, f.message, f.step, f.task, f.stack, f.addr)
                                            for f in res.findings])


def _page_by_page(monkeypatch):
    """The checks page by page (the reference): no range listener, no vectorised pre-checks."""
    from hmmirror.sim import invariants

    monkeypatch.setattr(invariants, "VECTORISED", False)


def _runs(cases):
    return [_outcome(run_scenario(sc, RandomScheduler(SeededChoices(s)) if s % 2 else
                                  PCTScheduler(SeededChoices(s), 3, 2000), driver=drv() if drv else None,
                                  record_trace=False)) for sc, s, drv in cases]


def test_range_commits_give_the_runs_of_page_by_page_commits(monkeypatch):
    """Generated runs of both profiles (5.2 seeds 7000141, 7000287 and 7000458 commit a wrong pfn: coherence
    findings at the commit), and a driver whose faults leave pages unmirrored (result_contract at the fault's
    end): the same outcome with the vectorised checks as page by page."""
    sys.path.insert(0, HERE)
    import sim_toy_drivers as toy

    cases = [(generate(SeededChoices(s), "5.2", "builtin"), s, None)
             for s in (7000141, 7000287, 7000458, 1, 2, 3, 4, 5, 6)]
    cases += [(generate(SeededChoices(s), "6.18", "builtin", inject=True), s, None) for s in range(8)]
    cases += [(generate(SeededChoices(s), "6.18", "builtin"), s, toy.ShortMirror) for s in range(6)]
    fast = _runs(cases)
    _page_by_page(monkeypatch)
    ref = _runs(cases)
    assert fast == ref
    invs = {f[0].split("|")[0] for o in ref for f in o[2]}
    assert {"coherence", "result_contract"} <= invs, invs


def test_range_commits_report_the_coherence_reproducer_as_page_by_page(monkeypatch):
    """The saved coherence finding (a commit from a stale snapshot): same finding, same stack, either way."""
    from hmmirror.sim.replay import replay_file

    path = os.path.join(ROOT, "docs", "sim-reproducers", "coherence-commit-194d3eea.toml")
    fast = replay_file(path)
    assert fast.reproduced
    _page_by_page(monkeypatch)
    assert _outcome(replay_file(path).result) == _outcome(fast.result)


def test_zygote_replay_judges_as_a_new_interpreter(tmp_path):
    import tomllib

    from hmmirror.sim import verify

    path = os.path.join(ROOT, "docs", "sim-reproducers", "report-null-deref-hmm-vma-do-fault-76ed78b4.toml")
    with open(path, "rb") as fh:
        sig = tomllib.load(fh)["finding"]["signature"]
    try:
        good = verify.replays_in_fresh_process(path, sig)
        z = verify._zygote
        assert z is not None and z.usable() and z.proc.pid != os.getpid()
        bad = verify.replays_in_fresh_process(path, "coherence|nowhere|-")
        assert verify._zygote is z                      # one zygote serves every replay of this process
        assert good == verify.replays_in_new_interpreter(path, sig) and good.ok
        assert bad == verify.replays_in_new_interpreter(path, "coherence|nowhere|-") and not bad.ok
        assert bad.why == f"the fresh replay gave {sig}"
        broken = tmp_path / "broken.toml"
        broken.write_text("[sim]\nnot toml = = =\n")
        v = verify.replays_in_fresh_process(str(broken), sig)
        assert not v.ok and v.why.startswith("the fresh replay failed (exit 1)"), v
        z.proc.kill()                                   # a dead zygote: the next replay starts another
        z.proc.wait()
        assert verify.replays_in_fresh_process(path, sig).ok
        assert verify._zygote is not z
    finally:
        verify.shutdown_zygote()
    _ = sys


def _roundtrip(pages, driver):
    """tests/sim/data/migrate_roundtrip.toml over ``pages`` pages: cpu0 writes them, dev0 migrates them to device
    memory and reads them there, cpu1 reads them back.  Returns the outcome and the reads D1 compared."""
    from hmmirror.sim.invariants_data import DataLost
    from hmmirror.sim.scenario import SimScenario

    with open(os.path.join(HERE, "data", "migrate_roundtrip.toml"), encoding="utf-8") as fh:
        sc = SimScenario.from_toml(fh.read().replace('"16K"', f'"{pages * 4}K"'))
    invs = default_invariants()
    res = run_scenario(sc, _InOrder(), invariants=invs, driver=driver)
    order = []
    for t in res.trace:
        if not order or order[-1] != t[1]:
            order.append(t[1])
    assert order == [0, 2, 1], order        # cpu0, dev0, cpu1
    return _outcome(res), next(i for i in invs if isinstance(i, DataLost)).checked


class _InOrder:
    """Run cpu0 to its end, then dev0, then cpu1 (task 0, 2, 1)."""

    def pick(self, engine, runnable):
        for want in (0, 2, 1):
            for st in runnable:
                if st.idx == want:
                    return st
        return runnable[0]


def test_device_data_accesses_of_a_range_equal_page_by_page(monkeypatch):
    """D1's device loads and stores of a whole range at once (``data_access_range``) give the runs, findings
    and compared reads of the page-by-page reference: generated runs of both profiles (device jobs over up to
    a GiB), a clean round trip through device memory and one whose migration skips the copy (data_lost)."""
    sys.path.insert(0, HERE)
    import device_buggy_drivers as bad

    from hmmirror.sim.adapters import DmirrorAdapter

    cases = [(generate(SeededChoices(s), "5.2", "builtin"), s, None) for s in (5004, 5017, 5026, 5037)]
    cases += [(generate(SeededChoices(s), "6.18", "builtin"), s, None) for s in range(100, 110)]
    fast = _runs(cases)
    trips = [_roundtrip(n, drv()) for n in (12, 40) for drv in (DmirrorAdapter, bad.NoCopyDmirror)]
    _page_by_page(monkeypatch)
    assert _runs(cases) == fast
    ref_trips = [_roundtrip(n, drv()) for n in (12, 40) for drv in (DmirrorAdapter, bad.NoCopyDmirror)]
    assert trips == ref_trips
    # the clean round trip: every device read in device memory and every CPU read back compared, no finding
    assert [(t[0][2], t[1]) for t in trips[::2]] == [([], 24), ([], 80)], trips
    for t in trips[1::2]:                    # no copy: the device reads what was not written there
        assert "data_lost" in {f[0].split("|")[0] for f in t[0][2]}, t


def test_commit_invalid_pre_check_is_a_superset_of_its_reports():
    """Whatever the state (invalidations delivered and ended, HMM calls of this and other tasks, the task's
    own migration step), every page ``commit_invalid`` reports at a range commit is among the pages its
    vectorised pre-check hands it (else the range path would skip a report)."""
    import random
    from types import SimpleNamespace

    from hmmirror.sim.invariants import CommitBatch, CommitInvalid, Tracker

    rnd = random.Random(5)
    reported_any = 0
    for _ in range(300):
        t = Tracker()
        t.migrating = {}
        got = []
        eng = SimpleNamespace(step=rnd.randrange(5, 40), violate=lambda inv, msg, **kw: got.append(kw["addr"]))
        ci = CommitInvalid(t)
        ci.engine = eng
        st = SimpleNamespace(idx=rnd.randrange(3))
        va0, n = 0x100000, 24
        for _k in range(rnd.randrange(4)):
            s = va0 + rnd.randrange(n) * K
            t.delivered.append([s, s + rnd.randrange(1, 8) * K, rnd.randrange(eng.step + 2),
                                rnd.choice([None, rnd.randrange(eng.step)]), rnd.choice([0, 1, -2])])
        for _k in range(rnd.randrange(5)):
            s = va0 + rnd.randrange(n) * K
            ci.calls.append((s, s + rnd.randrange(1, 10) * K, rnd.randrange(eng.step), rnd.randrange(3)))
        ci.snap[st.idx] = rnd.randrange(eng.step)
        ci.fault_at[st.idx] = rnd.randrange(eng.step)
        ci.own_at[st.idx] = rnd.choice([-1, rnd.randrange(eng.step)])
        items = [(1000 + i, bool(i % 2)) if rnd.random() < 0.8 else None for i in range(n)]
        mapped = [i for i, it in enumerate(items) if it is not None]
        if not mapped:
            continue
        sus = set(ci.commit_suspects(st, CommitBatch(va0, items, mapped)))
        for i in mapped:
            got.clear()
            ci.on_commit(st, va0 + i * K, items[i][0], items[i][1])
            if got:
                reported_any += 1
                assert i in sus, (i, sorted(sus))
    assert reported_any > 50


def test_page_latest_answers_as_a_dict_of_pages():
    """Tracker.last_commit / commit_code keep a range commit as one record: lookups equal a dict of pages."""
    import random

    import numpy as np

    from hmmirror.sim.invariants import PageLatest

    rnd = random.Random(3)
    pl, ref = PageLatest(), {}
    for step in range(400):
        if rnd.random() < 0.5:
            va = rnd.randrange(64) * K
            pl[va] = ref[va] = ("page", step)
        else:
            va0, n = rnd.randrange(64) * K, rnd.randrange(1, 20)
            mask = np.array([rnd.random() < 0.7 for _ in range(n)], dtype=bool)
            pl.set_range(va0, mask, ("range", step))
            ref.update({va0 + i * K: ("range", step) for i in range(n) if mask[i]})
        for va in range(0, 90 * K, K):
            assert pl.get(va, "none") == ref.get(va, "none"), (step, hex(va))


def _log_cases():
    cases = [(generate(SeededChoices(s), "5.2", "builtin"), s, None) for s in (7000134, 7000165, 11, 12, 13, 14)]
    cases += [(generate(SeededChoices(s), k, "builtin", inject=True), s, None)
              for k in ("6.12", "6.18") for s in range(20, 26)]
    return cases


def _runs_with_coverage(cases):
    from hmmirror.sim.coverage import RunCoverage

    out = []
    for sc, s, _ in cases:
        cov = RunCoverage(sc.kernel)
        res = run_scenario(sc, RandomScheduler(SeededChoices(s)) if s % 2 else PCTScheduler(SeededChoices(s), 3, 2000),
                           record_trace=False, coverage=cov)
        out.append((_outcome(res), {k: sorted(map(repr, v)) for k, v in vars(cov).items() if isinstance(v, set)}))
    return out


def test_log_records_routed_by_kind_give_the_runs_of_every_hook_hearing_all(monkeypatch):
    """Log records routed only to the instruments subscribed to their kind (``log_kinds``) give the same runs
    and coverage cells as every ``on_log`` hearing every record; and in the reference runs, an instrument that
    declares ``log_kinds`` changes nothing of its own state when it hears a record of another kind."""
    from hmmirror.sim import engine

    cases = _log_cases()
    fast = _runs_with_coverage(cases)
    monkeypatch.setattr(engine, "ROUTE_LOG", False)
    heard: dict[str, int] = {}
    patched = set()

    def spy(cls):
        orig = cls.on_log

        def on_log(self, eng, ev):
            if ev["what"] in self.log_kinds:
                return orig(self, eng, ev)
            before = {k: repr(v) for k, v in vars(self).items()}
            nf = len(eng.findings) + eng.extra_findings
            orig(self, eng, ev)
            assert {k: repr(v) for k, v in vars(self).items()} == before, (cls.__name__, ev["what"])
            assert len(eng.findings) + eng.extra_findings == nf, (cls.__name__, ev["what"])
            heard[cls.__name__] = heard.get(cls.__name__, 0) + 1
        monkeypatch.setattr(cls, "on_log", on_log)

    ref = _runs_with_coverage(cases)               # every on_log hears every record
    assert fast == ref
    from hmmirror.sim.coverage import RunCoverage
    for inst in default_invariants() + [RunCoverage("6.18")]:
        cls = type(inst)
        if getattr(cls, "log_kinds", None) is not None and cls not in patched:
            patched.add(cls)
            spy(cls)
    # the spied runs check the state of every instrument; their outcome is not compared: the spy is one more
    # frame between the logging model function and on_log, and Tracker reads the caller's locals by frame
    # depth (sys._getframe(2): the migrate_vma args, the notifier range), so a spied Tracker judges otherwise
    _runs_with_coverage(cases)
    assert len(patched) >= 8 and len(heard) >= 8, (patched, heard)


def _hypothesis_draws(kernel: str, seed: int, n: int) -> list[str]:
    """What a campaign's Hypothesis session body draws (scenario, then switch list), for ``n`` examples."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    from hmmirror.sim.choices import HypothesisChoices
    from hmmirror.sim.schedulers import SwitchListScheduler

    out: list[str] = []

    def body(data):
        c = HypothesisChoices(data)
        sc = generate(c, kernel, "builtin")
        sc.scheduler = {"kind": "switch", "switches": [list(x) for x in SwitchListScheduler.draw(c, 24).switches]}
        out.append(sc.to_toml("drawn"))

    test = settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))(given(st.data())(body))
    hseed(seed)(test)()
    return out


def test_hypothesis_choices_drawn_directly_give_the_scenarios_of_data_draw(monkeypatch):
    """Choices drawn from the test case's ``conjecture_data`` (the campaign's fast path) give the scenarios and
    switch lists, example by example, that ``data.draw`` gives -- Hypothesis's generation (mutations of earlier
    examples included) sees the same choices and spans."""
    from hmmirror.sim import choices

    fast = [_hypothesis_draws(k, 4242, 40) for k in ("5.2", "6.18")]
    monkeypatch.setattr(choices, "HYPOTHESIS_DIRECT", False)
    ref = [_hypothesis_draws(k, 4242, 40) for k in ("5.2", "6.18")]
    assert fast == ref
    assert all(len(set(x)) > 20 for x in ref), [len(set(x)) for x in ref]
