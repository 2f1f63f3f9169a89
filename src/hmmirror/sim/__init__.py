"""The deterministic interleaving simulator (docs/simulator.md): tasks interleaved at the model's
preemption points, invariants checked after every step, fuzzing with shrinking, exact replay.

Public entry points: :func:`run_scenario`, :func:`run_tasks`, :func:`device_fault`, :class:`SimScenario`,
:class:`DriverBase`, :class:`DevicePageTable`, :class:`MirrorDriver`, :func:`replay_file`,
:func:`seeded_run`, :func:`run_campaign`.  Nothing in the model imports this package.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run_scenario": "hmmirror.sim.runner", "run_tasks": "hmmirror.sim.runner", "device_fault": "hmmirror.sim.runner",
    "SimScenario": "hmmirror.sim.scenario", "generate": "hmmirror.sim.scenario",
    "DriverBase": "hmmirror.sim.driver", "DevicePageTable": "hmmirror.sim.driver",
    "MirrorDriver": "hmmirror.sim.driver", "Invalidation": "hmmirror.sim.driver",
    "replay_file": "hmmirror.sim.replay", "seeded_run": "hmmirror.sim.replay",
    "run_campaign": "hmmirror.sim.fuzz", "Config": "hmmirror.sim.fuzz", "Finding": "hmmirror.sim.findings",
    "Engine": "hmmirror.sim.engine",
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(mod), name)


__all__ = sorted(_EXPORTS)
