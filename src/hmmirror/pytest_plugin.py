"""The hmmirror pytest plugin (registered through the ``pytest11`` entry point; ours).

Installed with hmmirror, it gives every test suite these fixtures:

| fixture | is |
|---|---|
| ``hmmirror_kernel`` | the kernel profile name; tests using any fixture below run once per profile (``5.2``, ``6.12``, ``6.18``) |
| ``hmmirror_machine`` | a fresh 256 MiB :class:`~hmmirror.machine.Machine` of that profile |
| ``hmmirror_process`` | a process ``app`` on it (:class:`~hmmirror.process.Process`) |
| ``hmmirror_mirror`` | a :class:`~hmmirror.mirror.Mirror` of that process, closed after the test |
| ``hmmirror_dmirror`` | ``/dev/hmm_dmirror0`` opened by that process (lib/test_hmm.c), closed after the test; skipped on a profile without it (5.2) |

Choose profiles with ``--hmmirror-kernel=6.18`` (repeatable), per test with
``@pytest.mark.hmmirror_kernel("6.18")``, or by parametrizing ``hmmirror_kernel`` yourself.  Strategies and
the driver check are in :mod:`hmmirror.strategies` and :mod:`hmmirror.testing`; the Hypothesis profile
``hmmirror`` (``--hypothesis-profile=hmmirror``: no deadline, 50 examples) suits tests that run scenarios.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hmmirror.profiles import PROFILES

#: The profiles the fixtures run on by default: every profile of the model.
KERNELS = tuple(sorted(PROFILES, key=lambda v: tuple(int(x) for x in v.split("."))))
RAM = 256 << 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hmmirror", "hmmirror fixtures")
    group.addoption("--hmmirror-kernel", action="append", dest="hmmirror_kernels", metavar="VERSION",
                    default=None, help="kernel profile the hmmirror fixtures run on (repeatable; default: "
                                       + " and ".join(KERNELS) + ")")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hmmirror_kernel(*versions): run this test's hmmirror fixtures only "
                                       "on these kernel profiles")
    _register_hypothesis_profile()


#: Hypothesis settings for tests that run simulator scenarios (``--hypothesis-profile=hmmirror``): one run
#: takes tens to hundreds of milliseconds, more than Hypothesis's default 200 ms deadline allows for.
HYPOTHESIS_PROFILE = {"deadline": None, "max_examples": 50}


def _register_hypothesis_profile() -> None:
    """Register the ``hmmirror`` Hypothesis profile (before Hypothesis's own plugin loads a profile)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:                                  # pragma: no cover - hypothesis is a dependency
        return
    settings.register_profile("hmmirror", suppress_health_check=[HealthCheck.too_slow], **HYPOTHESIS_PROFILE)


def _kernels(metafunc: pytest.Metafunc) -> list[str]:
    from hmmirror.profiles import get_profile

    marker = metafunc.definition.get_closest_marker("hmmirror_kernel")
    if marker is not None:
        names = [str(a) for a in marker.args]
    else:
        names = metafunc.config.getoption("hmmirror_kernels") or list(KERNELS)
    for n in names:
        get_profile(n)                                  # an unknown profile fails collection with its message
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hmmirror_kernel" not in metafunc.fixturenames:
        return
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else m.kwargs.get("argnames", "")
        if "hmmirror_kernel" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return                                      # the test chose its profiles itself
    metafunc.parametrize("hmmirror_kernel", _kernels(metafunc), ids=lambda k: f"kernel-{k}")


@pytest.fixture
def hmmirror_kernel(request: pytest.FixtureRequest) -> str:
    """The kernel profile of this test run (parametrized by the plugin)."""
    return str(getattr(request, "param", KERNELS[-1]))


@pytest.fixture
def hmmirror_machine(hmmirror_kernel: str) -> Any:
    """A fresh 256 MiB machine of the profile."""
    from hmmirror.machine import Machine
    return Machine(hmmirror_kernel, ram=RAM)


@pytest.fixture
def hmmirror_process(hmmirror_machine: Any) -> Any:
    """A process named ``app``."""
    return hmmirror_machine.spawn("app")


@pytest.fixture
def hmmirror_mirror(hmmirror_process: Any) -> Iterator[Any]:
    """A :class:`~hmmirror.mirror.Mirror` of ``hmmirror_process``."""
    from hmmirror.mirror import Mirror
    mirror = Mirror(hmmirror_process, "test_mirror")
    yield mirror
    if not hmmirror_process.mm.exited:
        mirror.close()


@pytest.fixture
def hmmirror_dmirror(hmmirror_process: Any) -> Iterator[Any]:
    """``/dev/hmm_dmirror0`` opened by ``hmmirror_process`` (a :class:`~hmmirror.mirror.DmirrorHandle`)."""
    if not hmmirror_process.machine.profile.interval_notifiers:
        pytest.skip(f"kernel {hmmirror_process.machine.profile.name} has no test_hmm device "
                    "(mmu_interval_notifier appeared in 5.5)")
    from hmmirror.mirror import open_dmirror
    dev = open_dmirror(hmmirror_process)
    yield dev
    if not hmmirror_process.mm.exited:
        dev.close()
