"""committer_frame: the location of a device-table commit comes from the model's frames alone.

A reproducer is written only when a fresh process replays it to the same signature; a location taken from
the frames that run the engine (a campaign worker's multiprocessing frames, runpy in a fresh replay, pytest
here) differs between the two and the finding can never be confirmed.
"""

import sys

from hmmirror.sim.invariants import committer_frame


def _function(filename: str, name: str, body: str, env: dict) -> None:
    """Define ``name`` in ``env`` as if it were written in ``filename`` (its frames carry that file)."""
    exec(compile(f"def {name}():\n    {body}\n", filename, "exec"), env)


def _stack(outer_file: str) -> str:
    """outer (any file) -> engine._loop -> sim/adapters.fault_mode -> device_mmu.commit_range -> probe."""
    env: dict = {"committer_frame": committer_frame, "sys": sys}
    _function("/x/hmmirror/drivers/device_mmu.py", "commit_range",
              "return committer_frame(sys._getframe(0)).f_code.co_name", env)
    _function("/x/hmmirror/sim/adapters.py", "fault_mode", "return commit_range()", env)
    _function("/x/hmmirror/sim/engine.py", "_loop", "return fault_mode()", env)
    _function(outer_file, "run", "return _loop()", env)
    return env["run"]()


def test_a_commit_by_the_simulator_is_located_in_the_simulator_whoever_runs_the_engine() -> None:
    # a worker process, a fresh replay and a test run the same engine loop: one location
    assert _stack("/usr/lib/python3/multiprocessing/process.py") == "fault_mode"
    assert _stack("<frozen runpy>") == "fault_mode"
    assert _stack("/x/hmmirror/sim/fuzz.py") == "fault_mode"


def test_a_commit_by_a_driver_outside_the_simulator_is_located_in_the_driver() -> None:
    env: dict = {"committer_frame": committer_frame, "sys": sys}
    _function("/x/hmmirror/drivers/device_mmu.py", "commit_range",
              "return committer_frame(sys._getframe(0)).f_code.co_name", env)
    _function("/x/hmmirror/drivers/test_hmm.py", "dmirror_do_fault", "return commit_range()", env)
    _function("/x/hmmirror/sim/adapters.py", "fault_mode", "return dmirror_do_fault()", env)
    _function("/x/hmmirror/sim/engine.py", "_loop", "return fault_mode()", env)
    assert env["_loop"]() == "dmirror_do_fault"
