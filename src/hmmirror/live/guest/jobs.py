"""Jobs for one guest boot: many scenarios through the player, or the kernel's hmm-tests.

A boot costs seconds under TCG, so :func:`run_scenarios` plays every scenario it is given in one boot (in
order, each with fresh processes, filesystems and pools; the player's ``END`` tears a scenario down).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hmmirror.live.guest import vm
from hmmirror.live.guest.build import Artifacts
from hmmirror.live.guest.protocol import GuestScenarioResult, Plan, parse_output, plan

#: Seconds allowed per boot, plus per scenario and per operation (TCG on a loaded 2-core machine).
BOOT_SECONDS, SCENARIO_SECONDS, OP_SECONDS = 120.0, 10.0, 2.0

def devdax_sh(region: int, align: int) -> str:
    """Shell lines turning pmem ``region`` (a raw e820 namespace) into device-dax ``dax<region>.0`` with
    ``align`` through sysfs (no ndctl in the guest): unbind the pmem namespace, claim it with the region's dax
    seed in "ram" mode (struct pages in RAM), bind dax_pmem; prints ``HMMG: devdax<region> ok|failed``."""
    return rf"""
nd=/sys/bus/nd
if [ -e $nd/devices/namespace{region}.0 ]; then
    echo namespace{region}.0 > $nd/drivers/nd_pmem/unbind 2>/dev/null
    dax=$(cat $nd/devices/region{region}/dax_seed)
    echo ram > $nd/devices/$dax/mode
    echo {align} > $nd/devices/$dax/align
    cat /proc/sys/kernel/random/uuid > $nd/devices/$dax/uuid
    echo namespace{region}.0 > $nd/devices/$dax/namespace
    echo $dax > $nd/drivers/dax_pmem/bind
fi
i=0
while [ ! -c /dev/dax{region}.0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -c /dev/dax{region}.0 ]; then echo "HMMG: devdax{region} ok"; else echo "HMMG: devdax{region} failed"; fi
"""


#: pmem2 as device-dax dax2.0 (2 MiB alignment) and pmem4 as dax4.0 (1 GiB alignment: PUD faults).
DEVDAX_SH, DEVDAX_1G_SH = devdax_sh(2, 2 << 20), devdax_sh(4, 1 << 30)

#: Written before the scenarios: khugepaged sleeps an hour after its first pass (over the player's anchor).
PRELUDE = ["SYS /sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs 3600000",
           "SYS /sys/kernel/mm/transparent_hugepage/khugepaged/alloc_sleep_millisecs 3600000"]


@dataclass
class ScenarioRun:
    """Results of :func:`run_scenarios`: per scenario name, its plan and what the guest did."""

    plans: dict[str, Plan]
    results: dict[str, GuestScenarioResult]
    seconds: float = 0.0
    accel: str = ""
    console: str = ""
    devdax: bool | None = None
    notes: list[str] = field(default_factory=list)


def run_scenarios(art: Artifacts, scenarios: Sequence[tuple[str, Any]],
                  on_scenario: Callable[[str], None] | None = None, timeout: float | None = None) -> ScenarioRun:
    """Play ``(name, parsed scenario)`` pairs in one boot.  Scenarios the guest cannot run are planned but
    not played (their :class:`Plan` says why)."""
    plans = {name: plan(scn, name) for name, scn in scenarios}
    script = list(PRELUDE)
    nops = 0
    for p in plans.values():
        if p.skip is None:
            script += p.lines
            nops += len(p.ops)
    needs_devdax = any(p.needs_devdax and p.skip is None for p in plans.values())
    needs_1g = any(p.needs_devdax_1g and p.skip is None for p in plans.values())
    run_sh = "#!/bin/sh\n" + (DEVDAX_SH if needs_devdax else "") + (DEVDAX_1G_SH if needs_1g else "") + \
        "/bin/player /job/script /tmp/results\necho \"HMMG: player rc=$?\"\n"
    if timeout is None:
        timeout = BOOT_SECONDS + SCENARIO_SECONDS * len(plans) + OP_SECONDS * nops

    def console(line: str) -> None:
        m = re.match(r"^HMMG: scenario (\S+)", line)
        if m and on_scenario:
            on_scenario(m.group(1))

    job = vm.run_job(art, {"/job/run.sh": run_sh, "/job/script": "\n".join(script) + "\n"}, timeout, console)
    results = parse_output(job.results, plans)
    devdax = None
    if needs_devdax or needs_1g:
        devdax = ("HMMG: devdax2 ok" in job.console or not needs_devdax) and \
            ("HMMG: devdax4 ok" in job.console or not needs_1g)
    return ScenarioRun(plans, results, job.seconds, job.accel, job.console, devdax)


# ----------------------------------------------------------------------------------------- hmm-tests


@dataclass
class SelftestResult:
    """One test of hmm-tests: ``name`` as the harness prints it (``hmm.hmm_device_private.open_close``)."""

    number: int
    name: str
    status: str            # "pass", "skip", "fail"
    reason: str = ""

    @property
    def fixture(self) -> str:
        return self.name.split(".")[0]

    @property
    def variant(self) -> str:
        parts = self.name.split(".")
        return parts[1] if len(parts) == 3 else ""

    @property
    def test(self) -> str:
        return self.name.split(".")[-1]

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "fixture": self.fixture, "variant": self.variant,
                "test": self.test, "status": self.status, "reason": self.reason}


_TAP_RE = re.compile(r"^(not ok|ok) (\d+) (\S+)(?:\s+#\s*(SKIP|XFAIL|TODO)\b\s*(.*))?$")


def parse_tap(text: str) -> list[SelftestResult]:
    """Results of the kselftest harness's TAP lines (``ok N name [# SKIP why]``, ``not ok N name``)."""
    out = []
    for line in text.splitlines():
        m = _TAP_RE.match(line.strip())
        if not m:
            continue
        ok, num, name, directive, why = m.groups()
        if directive == "SKIP":
            status = "skip"
        elif ok == "ok":
            status = "pass"
        else:
            status = "fail"
        out.append(SelftestResult(int(num), name, status, (why or "").strip()))
    return out


def run_selftest(art: Artifacts, timeout: float = 900.0,
                 on_line: Callable[[str], None] | None = None) -> tuple[list[SelftestResult], vm.JobResult]:
    """Boot once and run the kernel's own hmm-tests (built from the same source tree as the kernel)."""
    # anon_write_hugetlbfs needs free default-size (2 MiB) huge pages
    run_sh = ("#!/bin/sh\ncd /tmp\necho 16 > /proc/sys/vm/nr_hugepages\n"
              "/bin/hmm-tests 2>&1 | tee /tmp/results\necho \"HMMG: hmm-tests rc=$?\"\n")
    job = vm.run_job(art, {"/job/run.sh": run_sh}, timeout, on_line)
    return parse_tap(job.results), job


_VARIANT_RE = re.compile(r"^FIXTURE_VARIANT_ADD\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.M)
_TEST_F_RE = re.compile(r"^TEST_F(?:_TIMEOUT)?\(\s*(\w+)\s*,\s*(\w+)\s*[,)]", re.M)


def selftest_names(source: str) -> list[str]:
    """Every test name the kselftest harness prints for hmm-tests.c ``source``: ``fixture.variant.test`` for
    each ``TEST_F`` of a fixture with variants (``fixture.test`` without), in the file's order per variant."""
    variants: dict[str, list[str]] = {}
    for fixture, variant in _VARIANT_RE.findall(source):
        variants.setdefault(fixture, []).append(variant)
    out = []
    tests = _TEST_F_RE.findall(source)
    for fixture in dict.fromkeys(f for f, _t in tests):
        for variant in variants.get(fixture, [None]):
            out += [f"{fixture}.{variant}.{t}" if variant else f"{fixture}.{t}" for f, t in tests if f == fixture]
    return out


def expected_selftests(art: Artifacts) -> list[str]:
    """:func:`selftest_names` of the hmm-tests.c the guest's ``hmm-tests`` was built from."""
    path = art.source_dir / "tools/testing/selftests/mm/hmm-tests.c"
    return selftest_names(path.read_text(errors="replace"))
