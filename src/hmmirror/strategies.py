"""Hypothesis strategies for a driver team's own test suite: mappings, scenarios and schedules (ours).

One generator, two front ends: every strategy here draws through the simulator's own scenario generator,
:func:`hmmirror.sim.scenario.generate`, with :class:`~hmmirror.sim.choices.HypothesisChoices` -- the
generator and the choice source ``hmmirror fuzz`` uses in its Hypothesis sessions, in the same order
(scenario, then the switch list of :meth:`SwitchListScheduler.draw
<hmmirror.sim.schedulers.SwitchListScheduler.draw>`).  What a campaign can draw, a ``@given`` test can
draw, and Hypothesis shrinks a failing example to a small scenario with few context switches::

    from hypothesis import given, settings
    from hmmirror.strategies import scenarios
    from hmmirror.testing import check_scenario
    from mypkg.mydriver import MyDriver

    @settings(deadline=None, max_examples=50)
    @given(scenarios(kernel="6.18", driver=MyDriver))
    def test_my_driver_keeps_every_invariant(sc):
        check_scenario(sc)            # fails with the finding's description and a reproducer

* :func:`scenarios` -- a whole simulator scenario (:class:`~hmmirror.sim.scenario.SimScenario`): machine,
  mappings and their set-up, CPU threads, device jobs, kernel background events and (by default) a
  bounded switch-list schedule;
* :func:`mappings` -- the machine and mappings part only (the set-up operations a scenario starts with);
  build it with :func:`hmmirror.testing.build`;
* :func:`schedules` -- a switch list ``[(step, rank), ...]`` for :class:`SwitchListScheduler`.

A ``driver`` may be a class (or any callable returning a driver instance) or a ``"package.module:Class"``
spec; it is recorded in the scenario as a spec, so :func:`hmmirror.testing.check_scenario` builds a fresh
instance for every run and the reproducer names it.
"""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any, Callable

from hypothesis import strategies as st

from hmmirror.sim.choices import Choices, HypothesisChoices
from hmmirror.sim.scenario import SimScenario, generate
from hmmirror.sim.schedulers import SwitchListScheduler

#: The switch-list bound of ``hmmirror fuzz`` (``--max-switches`` default, sim/fuzz.Config.max_switches).
MAX_SWITCHES = 24

_REGISTRY = "hmmirror._user_drivers"
_serial = itertools.count(1)


def driver_spec(driver: Any) -> str:
    """A ``"module:attr"`` spec that :func:`hmmirror.sim.driver.load_driver` resolves to ``driver``.

    A string passes through.  A class importable under its own module and name gives that spec (a
    reproducer then replays in another process); anything else is registered in an in-process module
    (``hmmirror._user_drivers``), good for this process only.
    """
    if driver is None:
        return "builtin"
    if isinstance(driver, str):
        return driver
    if not callable(driver):
        raise TypeError(f"driver must be a class, a factory or a 'package.module:Class' string, not {driver!r}")
    mod = sys.modules.get(getattr(driver, "__module__", "") or "")
    name = getattr(driver, "__qualname__", "")
    if mod is not None and name and "." not in name and getattr(mod, name, None) is driver:
        return f"{mod.__name__}:{name}"
    reg = sys.modules.get(_REGISTRY)
    if reg is None:
        reg = sys.modules[_REGISTRY] = types.ModuleType(_REGISTRY, "drivers registered by hmmirror.strategies")
    for attr, value in vars(reg).items():
        if value is driver:
            return f"{_REGISTRY}:{attr}"
    attr = f"driver_{next(_serial)}_{getattr(driver, '__name__', 'factory')}"
    setattr(reg, attr, driver)
    return f"{_REGISTRY}:{attr}"


class _Draws:
    """The ``data`` object :class:`HypothesisChoices` expects, around a composite strategy's ``draw``."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        self.draw = draw


def draw_scenario(c: Choices, kernel: str, driver: str = "builtin", kinds: tuple[str, ...] | None = None,
                  events: tuple[str, ...] | None = None, schedule: bool = True,
                  max_switches: int = MAX_SWITCHES, inject: bool = False,
                  weights: dict[str, float] | None = None, features: list[str] | None = None,
                  targets: list[tuple[str, ...]] | None = None) -> SimScenario:
    """The draws of one campaign run, from any choice stream: :func:`~hmmirror.sim.scenario.generate`, then
    (``schedule``) a switch list from the same stream, stored as the scenario's ``[sim.scheduler]``.
    ``inject`` allows the generator's opt-in entries (``hmmirror fuzz --inject``: device-memory jobs and
    events); ``weights``, ``features`` and ``targets`` go to ``generate`` (a campaign's steering
    and coverage targets).  ``hmmirror fuzz``'s
    Hypothesis sessions draw through this function too."""
    sc = generate(c, kernel, driver, kinds, events, weights=weights, inject=inject, features=features,
                  targets=targets)
    if schedule:
        sw = SwitchListScheduler.draw(c, max_switches)
        sc.scheduler = {"kind": "switch", "switches": [list(x) for x in sw.switches]}
    return sc


def scenarios(kernel: str = "6.18", *, driver: Any = "builtin", kinds: tuple[str, ...] | None = None,
              events: tuple[str, ...] | None = None, schedule: bool = True,
              max_switches: int = MAX_SWITCHES, inject: bool = False) -> st.SearchStrategy[SimScenario]:
    """Simulator scenarios for ``kernel`` drawn by the campaigns' generator (see the module docstring).

    ``kinds`` restricts the VMA kinds (default: every kind the model supports), ``events`` the background
    events (default: all; ``()`` for none); ``schedule=False`` leaves the scheduler to the caller;
    ``inject=True`` adds the opt-in device-memory jobs and events (as ``hmmirror fuzz --inject``).
    """
    spec = driver_spec(driver)
    kinds_t = tuple(kinds) if kinds is not None else None
    events_t = tuple(events) if events is not None else None

    @st.composite
    def _scenario(draw: Callable[[Any], Any]) -> SimScenario:
        return draw_scenario(HypothesisChoices(_Draws(draw)), kernel, spec, kinds_t, events_t, schedule,
                             max_switches, inject)

    return _scenario()


def mappings(kernel: str = "6.18", *, kinds: tuple[str, ...] | None = None) -> st.SearchStrategy[SimScenario]:
    """The machine and mappings of a drawn scenario: ``[machine]``, ``[[file]]``, processes and the set-up
    operations (mmap, madvise, first touches), with no concurrent part.  Build it with
    :func:`hmmirror.testing.build`; the mappings are named ``m0``, ``m1``, ... in ``built.names``."""

    def strip(sc: SimScenario) -> SimScenario:
        sc.threads, sc.devices, sc.events = [], [], []
        sc.scheduler = {"kind": "switch", "switches": []}
        return sc

    return scenarios(kernel, kinds=kinds, events=(), schedule=False).map(strip)


def schedules(max_switches: int = MAX_SWITCHES) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Switch lists ``[(step, rank), ...]`` as the fuzzer draws them (at most ``max_switches`` context
    switches; at step ``step`` the scheduler switches to the ``rank``-th other runnable task)."""

    @st.composite
    def _schedule(draw: Callable[[Any], Any]) -> list[tuple[int, int]]:
        return [tuple(x) for x in SwitchListScheduler.draw(HypothesisChoices(_Draws(draw)), max_switches).switches]

    return _schedule()


__all__ = ["MAX_SWITCHES", "draw_scenario", "driver_spec", "mappings", "scenarios", "schedules"]
