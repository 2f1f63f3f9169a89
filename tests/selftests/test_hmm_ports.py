"""hmm_ports.kselftest_results (the model's side of the test-by-test comparison with the guest): the names are
the kselftest harness's, every 6.12 test has a port, and a result is computed by running the port (a failing
or skipping body is reported as such, not looked up)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SRC_6_12 = Path("/root/.cache/hmmirror/guest/src-6.12.118-1_deb12u1/linux-source-6.12"
                "/tools/testing/selftests/mm/hmm-tests.c")


def _load():
    spec = importlib.util.spec_from_file_location("hmm_ports_under_test", HERE / "hmm_ports.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


hp = _load()


def test_names_are_the_harness_names():
    names = hp.kselftest_names()
    assert len(names) == 58 == 2 * len(hp.HMM_TESTS_6_12)
    assert names[0] == "hmm.hmm_device_private.open_close"
    assert "hmm2.hmm2_device_coherent.double_map" in names
    assert all(re.fullmatch(r"hmm2?\.hmm2?_device_(private|coherent)\.\w+", n) for n in names)


@pytest.mark.skipif(not SRC_6_12.exists(), reason="the 6.12 source tree (guest build) is not on this machine")
def test_names_match_the_6_12_source():
    """The list is the file's: the guest's parser of hmm-tests.c gives the same names in the same order."""
    from hmmirror.live.guest.jobs import selftest_names

    assert hp.kselftest_names() == selftest_names(SRC_6_12.read_text(errors="replace"))


def test_every_6_12_test_has_a_port_and_a_status_row():
    mod = hp.ports_module()
    doc = (HERE.parent.parent / "docs/hmm-tests-status.md").read_text()
    section = doc.split("## The 6.12 file")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \| (hmm2?) \| (\w+) \|", section, re.M)
    assert [(f, t) for t, f, _s in rows] == list(hp.HMM_TESTS_6_12)
    assert {s for _t, _f, s in rows} == {"ported"}
    for _fixture, test in hp.HMM_TESTS_6_12:
        assert callable(getattr(mod, f"test_{test}", None)), test


def test_results_are_computed_by_running_the_port(monkeypatch):
    res = hp.kselftest_results("6.12", names=["hmm.hmm_device_private.open_close",
                                              "hmm.hmm_device_coherent.open_close",
                                              "hmm2.hmm2_device_private.snapshot"])
    assert res == {"hmm.hmm_device_private.open_close": ("pass", ""),
                   "hmm.hmm_device_coherent.open_close": ("skip", "DEVICE_COHERENT not available"),
                   "hmm2.hmm2_device_private.snapshot": ("pass", "")}
    mod = hp.ports_module()

    def broken(proc, fd):
        assert fd.private_data is None, "the port's own assertion"

    monkeypatch.setattr(mod, "test_open_close", broken)
    status, why = hp.run_port("hmm", "hmm_device_private", "open_close", "6.12")
    assert status == "fail" and "the port's own assertion" in why


def test_a_parametrised_port_fails_when_one_parameter_set_fails(monkeypatch):
    mod = hp.ports_module()
    seen = []

    @pytest.mark.parametrize("x", [1, 2, 3])
    def port(fd, x):
        seen.append(x)
        assert x != 2, "x == 2"

    monkeypatch.setattr(mod, "test_open_close", port)
    status, why = hp.run_port("hmm", "hmm_device_private", "open_close", "6.12")
    assert (status, seen) == ("fail", [1, 2]) and why.startswith("x=2: AssertionError: x == 2")


def test_a_page_count_error_left_behind_fails_the_test(monkeypatch):
    """The teardown's derived check_counts: a body that leaves a stray page reference fails."""
    mod = hp.ports_module()

    def leaky(proc, fd):
        a = proc.mmap(4096, "rw")
        proc.write_bytes(a, b"x")
        pfn = proc.mm.pt.lookup(a)[2]
        from hmmirror.arch.x86 import pgtable as x86
        proc.machine.mem.refcount[x86.pte_pfn(pfn)] += 1

    monkeypatch.setattr(mod, "test_open_close", leaky)
    status, why = hp.run_port("hmm", "hmm_device_private", "open_close", "6.12")
    assert status == "fail" and "check_counts" in why
