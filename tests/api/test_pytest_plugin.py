"""The pytest plugin, run the way a driver team's suite runs it (pytester: an inner pytest session).

The inner session loads the plugin through its ``pytest11`` entry point (as any installed suite would), so
these tests fail if the entry point is not registered.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_entry_point_is_registered() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert eps.get("hmmirror") == "hmmirror.pytest_plugin"


def test_fixtures_run_once_per_profile(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="""
        import numpy as np

        def test_machine(hmmirror_kernel, hmmirror_machine):
            assert hmmirror_machine.profile.name == hmmirror_kernel

        def test_mirror(hmmirror_process, hmmirror_mirror):
            a = hmmirror_process.mmap(8 * 4096)
            r = hmmirror_mirror.hmm_range_fault(a, length=8 * 4096, write=True)
            assert r.valid.all() and r.write.all()
            assert r.pfn.tolist() == [s.pfn for s in hmmirror_process.inspect(a, 8 * 4096)]

        def test_dmirror(hmmirror_process, hmmirror_dmirror):
            a = hmmirror_process.mmap(2 * 4096)
            hmmirror_dmirror.write(a, b"\\x5a" * 8192)
            assert hmmirror_process.read_bytes(a, 8192) == b"\\x5a" * 8192
    """)
    res = pytester.runpytest("-q", "-p", "no:randomly", "-rs")
    # machine and mirror on every profile, dmirror on 6.12 and 6.18 (skipped on 5.2, which has no test_hmm)
    from hmmirror.profiles import PROFILES
    assert sorted(PROFILES) == ["5.2", "6.12", "6.18"]
    res.assert_outcomes(passed=8, skipped=1)
    res.stdout.fnmatch_lines(["*kernel 5.2 has no test_hmm device*"])


def test_profile_selection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sel="""
        import pytest

        def test_default(hmmirror_machine):
            pass

        @pytest.mark.hmmirror_kernel("5.2")
        def test_marked(hmmirror_machine):
            assert hmmirror_machine.profile.name == "5.2"

        @pytest.mark.parametrize("hmmirror_kernel", ["6.18"])
        def test_own(hmmirror_machine):
            assert hmmirror_machine.profile.name == "6.18"
    """)
    pytester.runpytest("-q", "-p", "no:randomly").assert_outcomes(passed=5)      # default: 3 profiles
    pytester.runpytest("-q", "-p", "no:randomly", "--hmmirror-kernel=6.18", "-k", "default").assert_outcomes(
        passed=1)
    bad = pytester.runpytest("-q", "-p", "no:randomly", "--hmmirror-kernel=4.0")
    assert bad.ret != 0
    bad.stdout.fnmatch_lines(["*4.0*"])


def test_strategies_and_the_driver_check(pytester: pytest.Pytester) -> None:
    # a driver whose device page table maps every page writable, whatever the CPU allows: the coherence
    # invariant must catch it, and the failure must carry the finding's description and a reproducer
    pytester.makepyfile(test_drv="""
        from hypothesis import HealthCheck, Phase, given, settings
        from hmmirror.sim.driver import DevicePageTable
        from hmmirror.sim.refdrivers import IntervalMirror
        from hmmirror.strategies import scenarios
        from hmmirror.testing import check_scenario

        class LyingTable(DevicePageTable):
            __slots__ = ()

            def map(self, va, pfn, write):
                super().map(va, pfn, True)

        class OverWritable(IntervalMirror):
            name = "overwritable"

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.pt = LyingTable()

        # generation only: shrinking a failure is Hypothesis's business (and costs hundreds of runs)
        S = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])

        @S
        @given(scenarios(kernel="6.18", driver=OverWritable, events=()))
        def test_overwritable(sc):
            check_scenario(sc)

        @S
        @given(scenarios(kernel="6.18", driver=IntervalMirror, events=()))
        def test_the_canonical_loop_is_clean(sc):
            check_scenario(sc)
    """)
    res = pytester.runpytest("-q", "-p", "no:randomly")
    res.assert_outcomes(failed=1, passed=1)
    res.stdout.fnmatch_lines(["*test_overwritable*", "*DriverFinding*", "*[[]coherence[]]*",
                              "*where: test_drv.LyingTable.map*", "*hmmirror replay*"])


def test_hypothesis_profile(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_prof="""
        from hypothesis import settings

        def test_profile():
            assert settings.default.deadline is None and settings.default.max_examples == 50
    """)
    pytester.runpytest("-q", "-p", "no:randomly", "--hypothesis-profile=hmmirror").assert_outcomes(passed=1)
