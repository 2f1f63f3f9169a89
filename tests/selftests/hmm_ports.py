"""The model's side of "the ports agree with the guest test by test" (issue 12): the result of every test of
the 6.12 hmm-tests.c, named as the kselftest harness prints it (``fixture.variant.test``), computed now by
running the port's body (tests/selftests/test_hmm_tests.py) on a model machine -- no pytest, no stored table.

What the kselftest harness does around a ``TEST_F`` is emulated here, as in the C file:

* ``FIXTURE_SETUP(hmm)`` opens ``/dev/hmm_dmirror<device_number>`` (``hmm2``: two devices).  When the open
  fails and the device is a coherent one (numbers 2 and 3) the test SKIPs ("DEVICE_COHERENT not available");
  a failed open of a private device is an ``ASSERT_GE`` failure.  The model has device-private units 0 and 1
  only, so its coherent variants skip exactly where a kernel without SPM memory skips them.
* ``FIXTURE_TEARDOWN`` closes the files (``ASSERT_EQ(close(fd), 0)``).  After it the port's own derived check
  runs (``mm/debug.check_counts``: exact page counts), as the pytest fixture does.
* A port parametrised by pytest (``anon_write_child``'s 2026 loop, ``file_read`` on tmpfs and ext4, ...) passes
  only if every parameter set passes.

Loaded by path (``importlib``) by the guest's comparison test; ``kselftest_results`` is the seam.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

# Every TEST_F of tools/testing/selftests/mm/hmm-tests.c in Linux 6.12 (6.12.118), in the file's order.
HMM_TESTS_6_12: tuple[tuple[str, str], ...] = (
    ("hmm", "open_close"), ("hmm", "anon_read"), ("hmm", "anon_read_prot"), ("hmm", "anon_write"),
    ("hmm", "anon_write_prot"), ("hmm", "anon_write_child"), ("hmm", "anon_write_child_shared"),
    ("hmm", "anon_write_huge"), ("hmm", "anon_write_hugetlbfs"), ("hmm", "file_read"), ("hmm", "file_write"),
    ("hmm", "migrate"), ("hmm", "migrate_file_private"), ("hmm", "migrate_fault"), ("hmm", "migrate_release"),
    ("hmm", "migrate_shared"), ("hmm2", "migrate_mixed"), ("hmm", "migrate_multiple"),
    ("hmm", "anon_read_multiple"), ("hmm", "anon_teardown"), ("hmm", "mixedmap"), ("hmm2", "snapshot"),
    ("hmm", "compound"), ("hmm2", "double_map"), ("hmm", "exclusive"), ("hmm", "exclusive_mprotect"),
    ("hmm", "exclusive_cow"), ("hmm", "hmm_gup_test"), ("hmm", "hmm_cow_in_device"),
)

# FIXTURE_VARIANT_ADD(fixture, variant): the device numbers it opens (HMM_PRIVATE_DEVICE_ONE = 0, ...).
VARIANTS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    "hmm": (("hmm_device_private", (0,)), ("hmm_device_coherent", (2,))),
    "hmm2": (("hmm2_device_private", (0, 1)), ("hmm2_device_coherent", (2, 3))),
}
HMM_COHERENCE_DEVICE_ONE = 2

_PORTS: Any = None


def ports_module() -> Any:
    """tests/selftests/test_hmm_tests.py, imported once by path."""
    global _PORTS
    if _PORTS is None:
        path = Path(__file__).with_name("test_hmm_tests.py")
        spec = importlib.util.spec_from_file_location("hmmirror_hmm_tests_ports", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _PORTS = mod
    return _PORTS


def kselftest_names(tests=HMM_TESTS_6_12) -> list[str]:
    """The names the harness prints, in its order: per fixture, per variant, its tests in file order."""
    out = []
    for fixture in dict.fromkeys(f for f, _t in tests):
        for variant, _units in VARIANTS[fixture]:
            out += [f"{fixture}.{variant}.{t}" for f, t in tests if f == fixture]
    return out


def _param_sets(func: Callable) -> list[dict[str, Any]]:
    """Every combination of the port's ``pytest.mark.parametrize`` values (one empty set without marks)."""
    axes = []
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else mark.args[0]
        values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
        axes.append([dict(zip(names, v)) for v in values])
    out = []
    for combo in itertools.product(*axes):
        d: dict[str, Any] = {}
        for part in combo:
            d.update(part)
        out.append(d)
    return out


class _SetupSkip(Exception):
    pass


def _run_once(mod: Any, func: Callable, kernel: str, units: tuple[int, ...], params: dict[str, Any]) -> None:
    """FIXTURE_SETUP, the body, FIXTURE_TEARDOWN and the derived page-count check, for one parameter set."""
    from hmmirror.drivers.test_hmm import hmm_open
    from hmmirror.errors import HmmirrorError
    from hmmirror.mm.debug import check_counts

    wanted = set(inspect.signature(func).parameters)
    machine = mod.new_machine(kernel)
    proc = machine.spawn("hmm-tests")
    files = []
    for unit in units:
        try:
            files.append(hmm_open(proc, unit))
        except HmmirrorError as e:
            if unit >= HMM_COHERENCE_DEVICE_ONE and not files:
                raise _SetupSkip("DEVICE_COHERENT not available") from e
            raise AssertionError(f"ASSERT_GE(fd, 0): open /dev/hmm_dmirror{unit}: {e}") from e
    args = {"kernel": kernel, "machine": machine, "proc": proc, "fd": files[0],
            "fds": tuple(files) if len(files) > 1 else None}
    args.update(params)
    missing = wanted - set(args)
    if missing or ("fds" in wanted and len(files) < 2) or ("fd" in wanted and len(files) != 1):
        raise AssertionError(f"port {func.__name__} does not fit its fixture (arguments {sorted(wanted)})")
    func(**{k: args[k] for k in wanted})
    for f in files:
        if f.private_data is not None:
            f.close()
    bad = check_counts(machine)
    assert bad == [], f"derived check_counts: {bad[:3]}"


def run_port(fixture: str, variant: str, test: str, kernel: str = "6.12") -> tuple[str, str]:
    """One harness test on the model: ("pass"|"skip"|"fail", reason)."""
    mod = ports_module()
    func = getattr(mod, f"test_{test}", None)
    if func is None:
        return "fail", f"no port test_{test} in tests/selftests/test_hmm_tests.py"
    units = dict(VARIANTS[fixture])[variant]
    for params in _param_sets(func):
        label = ",".join(f"{k}={v}" for k, v in params.items())
        try:
            _run_once(mod, func, kernel, units, params)
        except _SetupSkip as e:
            return "skip", str(e)
        except pytest.skip.Exception as e:
            return "skip", str(e.msg) if hasattr(e, "msg") else str(e)
        except Exception as e:  # an assertion of the port or an error of the model
            msg = str(e).splitlines()[0] if str(e) else ""
            return "fail", f"{label + ': ' if label else ''}{type(e).__name__}: {msg}"[:300]
    return "pass", ""


def kselftest_results(kernel: str = "6.12", names: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """Every test of the 6.12 hmm-tests.c x both variants (or only ``names``), run now on ``kernel``:
    harness name -> ("pass"|"skip"|"fail", reason)."""
    out = {}
    for name in kselftest_names():
        if names is not None and name not in names:
            continue
        fixture, variant, test = name.split(".")
        out[name] = run_port(fixture, variant, test, kernel)
    return out


if __name__ == "__main__":  # python tests/selftests/hmm_ports.py [KERNEL]
    res = kselftest_results(sys.argv[1] if len(sys.argv) > 1 else "6.12")
    for name, (status, why) in res.items():
        print(f"{status:4} {name}{'  # ' + why if why else ''}")
    counts = {s: sum(1 for v in res.values() if v[0] == s) for s in ("pass", "skip", "fail")}
    print(counts)
    sys.exit(1 if counts["fail"] else 0)
