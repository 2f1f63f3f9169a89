"""The test guest for real: the kernel's own hmm-tests against the model's ports, scenarios in the guest
checked against the kernel's documented behaviour, the cross-check, and clean-up of QEMU and temporary files.

These tests build the guest kernel when it is not cached (minutes; serialised by a file lock and kept on one
xdist worker by their group) and skip with one reason where this machine cannot build or boot it.  Set
``HMMIRROR_GUEST_TESTS=0`` to skip them on purpose.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from hmmirror.live.guest import GUEST_PROFILE, build, jobs, vm
from hmmirror.scenario import parse

pytestmark = [pytest.mark.live, pytest.mark.xdist_group("guest")]
ROOT = Path(__file__).resolve().parents[2]


def why_no_guest() -> str | None:
    """One reason this machine cannot build or boot the guest, or None."""
    if os.environ.get("HMMIRROR_GUEST_TESTS") == "0":
        return "guest tests switched off (HMMIRROR_GUEST_TESTS=0)"
    need = build.BUILD_CHECKS + build.RUN_CHECKS if build.cached() is None else build.RUN_CHECKS
    missing = build.missing_packages(need)
    if missing and not build.can_install():
        pkgs = " ".join(sorted({p for _w, p in missing}))
        if not build.shutil.which("apt-get"):
            return f"the guest needs Debian packages ({pkgs}) and this machine has no apt-get"
        return f"the guest needs packages that only root can install: apt-get install {pkgs}"
    return None


@pytest.mark.parametrize("euid, apt, expect", [
    (1000, True, "the guest needs packages that only root can install: apt-get install flex qemu-system-x86"),
    (0, False, "the guest needs Debian packages (flex qemu-system-x86) and this machine has no apt-get"),
    (1000, False, "the guest needs Debian packages (flex qemu-system-x86) and this machine has no apt-get"),
    (0, True, None),                         # root with apt-get: the fixture installs them
])
def test_why_no_guest_gives_one_reason(monkeypatch: pytest.MonkeyPatch, euid: int, apt: bool,
                                       expect: str | None) -> None:
    """Without the packages and without the means to install them the guest tests skip with one reason."""
    monkeypatch.delenv("HMMIRROR_GUEST_TESTS", raising=False)
    monkeypatch.setattr(build, "cached", lambda: None)
    monkeypatch.setattr(build, "BUILD_CHECKS", [("flex", lambda: False, "flex"), ("gcc", lambda: True, "gcc")])
    monkeypatch.setattr(build, "RUN_CHECKS", [("qemu-system-x86_64", lambda: False, "qemu-system-x86")])
    monkeypatch.setattr(build.os, "geteuid", lambda: euid)
    monkeypatch.setattr(build, "_which", lambda name: apt and name == "apt-get")
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/apt-get" if apt and name == "apt-get" else None)
    assert why_no_guest() == expect
    monkeypatch.setenv("HMMIRROR_GUEST_TESTS", "0")
    assert why_no_guest() == "guest tests switched off (HMMIRROR_GUEST_TESTS=0)"


@pytest.fixture(scope="session")
def guest() -> build.Artifacts:
    reason = why_no_guest()
    if reason:
        pytest.skip(reason)
    try:
        return build.ensure_built(install=True)
    except build.Missing as exc:
        pytest.skip("the guest cannot be built here: " + "; ".join(exc.items))


@pytest.fixture(scope="session")
def selftest(guest: build.Artifacts) -> tuple[list[jobs.SelftestResult], vm.JobResult]:
    """One boot running hmm-tests.  The model's side of the comparison (the ports, CPU-bound Python) runs in
    a thread meanwhile: QEMU is another process, this one mostly waits for its console."""
    thread = threading.Thread(target=_compute_model_results, name="hmm-ports", daemon=True)
    thread.start()
    try:
        return jobs.run_selftest(guest)
    finally:
        thread.join()


_MODEL: dict[str, object] = {}


def _compute_model_results() -> None:
    try:
        _MODEL["results"] = _model_results(GUEST_PROFILE)
    except BaseException as exc:                  # re-raised by the comparison test
        _MODEL["error"] = exc


# --- the kernel's own tests ------------------------------------------------------------------------------------


def test_hmm_tests_pass_in_the_guest(guest: build.Artifacts,
                                     selftest: tuple[list[jobs.SelftestResult], vm.JobResult]) -> None:
    """Every test hmm-tests.c defines (both fixture variants) is reported, and passes: the guest has
    DEVICE_PRIVATE for the private variants and test_hmm's SPM chunks (vm.SPM) for the device-coherent ones."""
    results, job = selftest
    assert results, "hmm-tests printed no results:\n" + "\n".join(job.console.splitlines()[-20:])
    expected = jobs.expected_selftests(guest)
    assert len(expected) == 58   # the 6.12 file: 29 TEST_Fs, two variants each
    assert sorted(r.name for r in results) == sorted(expected)
    not_passed = [(r.name, r.status, r.reason) for r in results if r.status != "pass"]
    assert not_passed == []


#: hmm-tests fixture variants the model cannot run while the guest does (docs/hmm-tests-status.md): the
#: comparison accepts "guest pass, model skip" for exactly these and fails when that set changes either way
#: (a port for them, or a guest that stops running them).
NOT_MODELLED = {
    "hmm_device_coherent": "device-coherent memory (MEMORY_DEVICE_COHERENT, /dev/hmm_dmirror2/3) is not modelled",
    "hmm2_device_coherent": "device-coherent memory (MEMORY_DEVICE_COHERENT, /dev/hmm_dmirror2/3) is not modelled",
}


def _model_results(kernel: str) -> dict[str, tuple[str, str]]:
    """The model's side (devcore's seam): every hmm-tests name -> (status, reason), computed now by running
    the ports in tests/selftests/ on a ``kernel`` machine."""
    import importlib.util

    path = ROOT / "tests/selftests/hmm_ports.py"
    spec = importlib.util.spec_from_file_location("hmmirror_hmm_ports_for_guest", path)
    assert spec and spec.loader, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.kselftest_results(kernel)


def test_model_ports_agree_with_the_guest_test_by_test(guest: build.Artifacts,
                                                       selftest: tuple[list[jobs.SelftestResult], vm.JobResult]
                                                       ) -> None:
    """hmm-tests in the real 6.12 guest against the model's ports of the same tests, name by name: a test
    that passes on one side must pass on the other (a skip or failure on one side only is a disagreement),
    except the fixture variants in NOT_MODELLED, which the guest passes and the model skips -- exactly those."""
    results, _job = selftest
    real = {r.name: (r.status, r.reason) for r in results}
    if "error" in _MODEL:
        raise _MODEL["error"]      # type: ignore[misc]
    model = _MODEL.get("results") or _model_results(GUEST_PROFILE)
    assert isinstance(model, dict)
    expected = jobs.expected_selftests(guest)
    assert sorted(model) == sorted(expected), "the model's list must name every test of the guest's hmm-tests.c"
    disagree, gap, both_pass = [], [], []
    for name in expected:
        (g, gwhy), (m, mwhy) = real.get(name, ("missing", "never reported")), model[name]
        if g == "pass" and m == "pass":
            both_pass.append(name)
        elif (g == "pass") == (m == "pass"):
            continue            # neither passes: test_hmm_tests_pass_in_the_guest reports the guest's side
        elif name.split(".")[1] in NOT_MODELLED and g == "pass" and m == "skip":
            gap.append(name)
        else:
            disagree.append(f"{name}: guest {g} {gwhy!r}, model {m} {mwhy!r}")
    assert disagree == []
    assert sorted(gap) == sorted(n for n in expected if n.split(".")[1] in NOT_MODELLED)
    assert len(both_pass) == len(expected) - len(gap) == 29


# --- scenarios in the guest: the kernel's documented behaviour ------------------------------------------------

KERNEL_FACTS = """
title = "guest facts"
machine.thp = { enabled = "madvise" }
machine.pmem = [{ name = "pmem0", size = "64M" }]
machine.fs = [{ mount = "/mnt/d", type = "ext4", dax = "pmem0" }]
file = [{ path = "/mnt/d/f", size = "4M", content = "zero" }]
op = [
  { op = "mmap", as = "t", length = "2M", align = "2M" },
  { op = "madvise", addr = "t", length = "2M", advice = "hugepage" },
  { op = "touch", addr = "t", length = "4K", access = "write" },
  { op = "mmap", as = "z", length = "16K" },
  { op = "touch", addr = "z", length = "4K", access = "read" },
  { op = "mmap", as = "d", file = "/mnt/d/f", length = "4M", flags = ["shared"], align = "2M" },
  { op = "touch", addr = "d", length = "4K", access = "write" },
  { op = "dmirror_open" },
  { op = "dmirror_snapshot", addr = "t", length = "8K" },
  { op = "dmirror_snapshot", addr = "z" },
  { op = "dmirror_snapshot", addr = "d", length = "8K" },
  { op = "dmirror_write", addr = "z+8K", length = "8K" },
  { op = "dmirror_read", addr = "z+8K", length = "8K", fill = "index32" },
  { op = "inspect", addr = "t", length = "8K" },
  { op = "inspect", addr = "d", length = "8K" },
  { op = "touch", addr = "z+1M", length = "4K" },
]
"""


#: Every op kind of the scenario language the player knows (protocol.PLAIN_OPS + DMIRROR_OPS) and every
#: mapping kind the issue names (anon, file, shmem, fs-DAX is in KERNEL_FACTS, hugetlb, device-dax), each once,
#: with the kernel's documented outcome asserted in test_player_runs_every_op_kind_in_the_guest.
EVERY_OP = """
title = "every op kind"
machine.hugepages_2m = 2
machine.pmem = [{ name = "pmem0", size = "64M", mode = "devdax", align = "2M" }]
machine.fs = [{ mount = "/mnt/t", type = "tmpfs" }]
file = [{ path = "/mnt/t/f", size = "64K", content = "data" }]
op = [
  { op = "mmap", as = "a", length = "64K" },
  { op = "touch", addr = "a", length = "64K", access = "write", fill = "index32" },
  { op = "dmirror_open" },
  { op = "dmirror_migrate_to_dev", addr = "a", length = "16K", fill = "index32" },
  { op = "inspect", addr = "a", length = "16K" },
  { op = "dmirror_migrate_to_sys", addr = "a", length = "16K" },
  { op = "dmirror_exclusive", addr = "a", length = "16K", fill = "index32" },
  { op = "inspect", addr = "a", length = "16K" },
  { op = "dmirror_check_exclusive", addr = "a", length = "16K" },
  { op = "touch", addr = "a", length = "16K", access = "write", fill = "index32" },
  { op = "dmirror_check_exclusive", addr = "a", length = "16K" },
  { op = "check", addr = "a", length = "64K", fill = "index32" },
  { op = "dmirror_flags", flags = 1 },
  { op = "gup_test", addr = "a", length = "16K" },
  { op = "mprotect", addr = "a+48K", length = "16K", prot = "r" },
  { op = "touch", addr = "a+48K", length = "4K", access = "write" },
  { op = "fork", child = "c" },
  { op = "touch", proc = "c", addr = "a", length = "4K", access = "write" },
  { op = "inspect", addr = "a", length = "4K" },
  { op = "exit", proc = "c" },
  { op = "mmap", as = "h", length = "2M", flags = ["private", "anonymous", "hugetlb"] },
  { op = "touch", addr = "h", length = "4K", access = "write" },
  { op = "mmap", as = "f", file = "/mnt/t/f", length = "64K", flags = ["shared"] },
  { op = "touch", addr = "f", length = "64K", access = "read" },
  { op = "truncate", file = "/mnt/t/f", size = "16K" },
  { op = "touch", addr = "f+32K", length = "4K", access = "read" },
  { op = "mmap", as = "s", length = "16K", flags = ["shared", "anonymous"] },
  { op = "touch", addr = "s", length = "16K", access = "write" },
  { op = "madvise", addr = "s", length = "8K", advice = "dontneed" },
  { op = "mmap", as = "d", file = "/dev/dax0.0", length = "2M", flags = ["shared"], align = "2M" },
  { op = "touch", addr = "d", length = "4K", access = "write" },
  { op = "inspect", addr = "h", length = "4K" },
  { op = "inspect", addr = "f", length = "32K" },
  { op = "inspect", addr = "s", length = "16K" },
  { op = "inspect", addr = "d", length = "4K" },
  { op = "dmirror_migrate_to_dev", addr = "a", length = "4K" },
  { op = "dmirror_release" },
  { op = "inspect", addr = "a", length = "4K" },
  { op = "dmirror_snapshot", addr = "d", length = "8K" },
  { op = "dmirror_write", addr = "a", length = "8K" },
  { op = "dmirror_read", addr = "a", length = "8K", fill = "index32" },
  { op = "dmirror_close" },
  { op = "munmap", addr = "a", length = "64K" },
  { op = "touch", addr = "a", length = "4K", access = "read" },
]
"""


#: A 1 GiB-aligned device-dax mapping (/dev/dax4.0 in the guest): PUD faults, and what a pagemap read does to them.
DEVDAX_1G = """
title = "device-dax, 1 GiB alignment"
machine = { pmem = [{ name = "pmem0", size = "1G", mode = "devdax", align = "1G" }] }
op = [
  { op = "mmap", as = "d", file = "/dev/dax0.0", length = "1G", flags = ["shared"], align = "1G" },
  { op = "dmirror_open" },
  { op = "touch", addr = "d+4K", length = "4K", access = "write" },
  { op = "dmirror_snapshot", addr = "d", length = "8K" },
  { op = "inspect", addr = "d", length = "8K" },
  { op = "dmirror_snapshot", addr = "d", length = "8K" },
  { op = "dmirror_write", addr = "d+512M", length = "8K" },
  { op = "dmirror_read", addr = "d+512M", length = "8K", fill = "index32" },
  { op = "dmirror_snapshot", addr = "d+1023M", length = "8K" },
]
"""


@pytest.fixture(scope="session")
def facts(guest: build.Artifacts) -> jobs.ScenarioRun:
    """KERNEL_FACTS and EVERY_OP played in the guest once (one boot for the tests below)."""
    return jobs.run_scenarios(guest, [("facts", parse(KERNEL_FACTS, "facts.toml")),
                                      ("every_op", parse(EVERY_OP, "every_op.toml")),
                                      ("devdax_1g", parse(DEVDAX_1G, "devdax_1g.toml"))])


def test_devdax_1g_pud_and_pagemap_read_unmaps_it(facts: jobs.ScenarioRun) -> None:
    """6.12 device-dax with 1 GiB alignment: a CPU write maps the whole GiB by one PUD (SNAPSHOT PUD|WRITE
    0x0A for the head and a tail page).  Reading /proc/PID/pagemap over it UNMAPS it: pagemap_ops has no
    pud_entry, so walk_pud_range() (mm/pagewalk.c) calls split_huge_pud() on the leaf, and splitting a DAX PUD
    only clears it; pagemap then reports a hole and the next SNAPSHOT sees nothing.  A dmirror WRITE faults
    the PUD back (hmm_range_fault), and a SNAPSHOT of the last pages of the GiB reads PUD|WRITE too.
    (The model's pagemap read does not split: docs/fidelity.md.)"""
    plan = facts.plans["devdax_1g"]
    assert plan.skip is None and plan.needs_devdax_1g and facts.devdax is True
    res = facts.results["devdax_1g"]
    assert res.complete and not res.errors, res.errors
    rec = {r.index: r for r in res.records}
    assert all(r.ok for r in res.records), [(r.index, r.op, r.errno, r.note) for r in res.records if not r.ok]
    assert rec[3].extra["snapshot"] == [0x0A, 0x0A]
    assert [(p.present, p.kind) for p in rec[4].pages] == [(False, "none")] * 2
    assert rec[5].extra["snapshot"] == [0x00, 0x00]
    assert (rec[7].extra["cpages"], rec[7].extra["bad_pages"]) == (2, 0)
    assert rec[8].extra["snapshot"] == [0x0A, 0x0A]


def test_player_runs_every_op_kind_in_the_guest(facts: jobs.ScenarioRun) -> None:
    """Each op kind once, with what the 6.12 kernel documents: migration to device-private memory and back
    (cpages, swap-format device entries), device-exclusive entries and their restore by a CPU write
    (CHECK_EXCLUSIVE -EPERM, then 0), no FLAGS ioctl in 6.12 (-EINVAL), a write to a read-only range
    (SIGSEGV), a read past EOF after truncate (SIGBUS), hugetlb/device-dax PMD leaves, RELEASE evicting
    device memory back to anonymous pages, and a read after munmap (SIGSEGV)."""
    from hmmirror.live.guest.protocol import DMIRROR_OPS, PLAIN_OPS

    plan = facts.plans["every_op"]
    assert plan.skip is None and not plan.unsupported, (plan.skip, plan.unsupported)
    assert facts.devdax is True
    res = facts.results["every_op"]
    assert res.complete and not res.errors, res.errors
    played = {r.op for r in res.records} | {r.op for r in facts.results["facts"].records}
    assert played >= set(PLAIN_OPS) | set(DMIRROR_OPS)
    rec = {r.index: r for r in res.records}
    out = {i: (r.ok, r.errno, r.signal) for i, r in rec.items()}
    fails = {i: o for i, o in out.items() if not o[0]}
    assert fails == {8: (False, "EPERM", None), 12: (False, "EINVAL", None), 15: (False, "EFAULT", "SIGSEGV"),
                     25: (False, "EFAULT", "SIGBUS"), 43: (False, "EFAULT", "SIGSEGV")}, \
        [(r.index, r.op, r.errno, r.note) for r in res.records if not r.ok]
    assert rec[1].ret == 16 and rec[11].ret == 0                      # touched 16 pages; data intact
    assert (rec[3].extra["cpages"], rec[3].extra["bad_pages"]) == (4, 0)
    assert [p.kind for p in rec[4].pages] == ["device_private"] * 4
    assert rec[5].extra["cpages"] == 4
    assert (rec[6].extra["cpages"], rec[6].extra["bad_pages"]) == (4, 0)
    assert [p.kind for p in rec[7].pages] == ["device_exclusive"] * 4
    assert (rec[10].ok, rec[10].ret) == (True, 0)
    assert [(p.kind, p.present) for p in rec[18].pages] == [("anon", True)]    # the parent's page after fork
    assert [(p.kind, p.level, p.huge) for p in rec[31].pages] == [("hugetlb", "pmd", True)]
    f = rec[32].pages                                                 # truncated to 16K: pages 4-7 gone
    assert [p.present for p in f[:4]] == [True] * 4 and [p.present for p in f[4:]] == [False] * 4
    assert [(p.kind, p.present) for p in rec[33].pages] == [("none", False)] * 2 + [("shmem", True)] * 2
    assert [(p.kind, p.level, p.huge) for p in rec[34].pages] == [("devmap", "pmd", True)]
    assert rec[35].extra["cpages"] == 1
    assert [(p.kind, p.present) for p in rec[37].pages] == [("anon", True)]   # RELEASE evicted it
    # device-dax PMD, written: PMD|WRITE; the tail page reads 0x56 in 6.12 (docs/fidelity.md: page->pgmap
    # of a tail page aliases compound_head, so dmirror_mkentry() sees a DEVICE_COHERENT pgmap type)
    assert rec[38].extra["snapshot"] == [0x06, 0x56]
    assert (rec[40].extra["cpages"], rec[40].extra["bad_pages"]) == (2, 0)


def test_scenario_in_the_guest_shows_the_kernels_behaviour(facts: jobs.ScenarioRun) -> None:
    """Values from the kernel's documented behaviour (hmm-modern.md §7 snapshot bytes, pagemap.rst), not
    from the model: a THP write (PMD|WRITE 0x06), a zero-page read (ZERO|READ 0x11), an unpopulated page
    (NONE 0x00), a 2 MiB fs-DAX write fault (PMD|WRITE), dmirror WRITE then READ of the index pattern."""
    res = facts.results["facts"]
    assert res.complete and not res.errors, res.errors
    rec = res.records
    assert [r.ok for r in rec[:14]] == [True] * 14, [(r.op, r.errno, r.note) for r in rec]
    assert rec[8].extra["snapshot"] == [0x06, 0x06]
    assert rec[9].extra["snapshot"] == [0x11, 0x00, 0x00, 0x00]
    assert rec[10].extra["snapshot"] == [0x06, 0x06]
    assert rec[11].extra["cpages"] == 2
    assert rec[12].extra["cpages"] == 2 and rec[12].extra["bad_pages"] == 0
    thp, dax = rec[13].pages, rec[14].pages
    assert thp is not None and dax is not None
    assert [(p.kind, p.level, p.huge, p.exclusive) for p in thp] == [("anon", "pmd", True, True)] * 2
    assert [(p.kind, p.level, p.huge) for p in dax] == [("devmap", "pmd", True)] * 2
    assert (rec[15].ok, rec[15].errno, rec[15].signal) == (False, "EFAULT", "SIGSEGV")


def test_crosscheck_against_the_guest(facts: jobs.ScenarioRun) -> None:
    """The same scenario in the guest and the model: pages and snapshot bytes are compared, and agree."""
    from hmmirror.live.crosscheck import Report
    from hmmirror.live.guest import model_profile
    from hmmirror.live.guest.crosscheck import compare_scenario

    report = Report()
    info = {"profile": model_profile()}
    compare_scenario(parse(KERNEL_FACTS, "facts.toml"), facts.plans["facts"], facts.results["facts"], report,
                     info["profile"])
    assert report.scenarios == 1, report.skipped
    assert report.by_field["snapshot"] == [8, 8] and report.by_field["dmirror"][1] >= 7
    assert report.pages == 4 and not report.crashes
    found = [(d.op_index, d.page, d.field, d.model, d.real) for d in report.disagreements]
    assert found == []
    # every op kind: device migration, exclusive entries, RELEASE, hugetlb, truncate, device-dax
    report = Report()
    compare_scenario(parse(EVERY_OP, "every_op.toml"), facts.plans["every_op"], facts.results["every_op"],
                     report, info["profile"])
    assert report.scenarios == 1 and not report.crashes, report.skipped
    assert report.by_field["errno"] == [44, 44] and report.by_field["dmirror"][1] >= 10
    assert report.pages == 24 and report.by_field["snapshot"] == [2, 2]
    assert [(d.op_index, d.page, d.field, d.model, d.real) for d in report.disagreements] == []


# --- clean-up -------------------------------------------------------------------------------------------------


def _our_qemus(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and marker in cmd:
            out.append(int(pid))
    return out


def test_timeout_kills_qemu_and_removes_temporary_files(guest: build.Artifacts, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(vm.GuestError, match="did not finish in time"):
        vm.run_job(guest, {"/job/run.sh": "#!/bin/sh\nsleep 600\n"}, timeout=3)
    assert _our_qemus(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_interrupt_kills_qemu_and_removes_temporary_files(guest: build.Artifacts, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    seen: list[str] = []

    def interrupt(line: str) -> None:
        seen.append(line)
        if "HMMG: init" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vm.run_job(guest, {"/job/run.sh": "#!/bin/sh\nsleep 600\n"}, timeout=300, on_console=interrupt)
    assert any("HMMG: init" in s for s in seen)
    assert _our_qemus(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
