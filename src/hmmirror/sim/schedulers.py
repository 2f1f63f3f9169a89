"""Schedulers: who runs next.  Each draws only from the one stream of choices.

* :class:`RandomScheduler` -- at every step a uniformly chosen runnable task (seeded stream).
* :class:`PCTScheduler` -- probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): random
  distinct task priorities, ``depth - 1`` priority change points over the expected run length; the highest
  priority runnable task runs.  Finds bugs of depth ``d`` with probability >= 1/(n k^(d-1)).
* :class:`SwitchListScheduler` -- the bounded-preemption form the fuzzer draws from Hypothesis: a short
  sorted list of ``(step, rank)`` switch points; between them the current task keeps running; at a switch
  point (or when the current task blocks or ends) the ``rank``-th runnable task runs.  An empty list is the
  non-preemptive schedule (each task runs until it blocks, in creation order), which is what shrinking
  converges to: a minimal reproducer has the fewest context switches that still break the invariant.
* :class:`ReplayScheduler` -- follows a recorded schedule (task names, run-length encoded) exactly.

The schedule of every run is recorded (``engine.picks``) whatever the scheduler.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from hmmirror.sim.choices import Choices


class ScheduleDiverged(Exception):
    """A replayed schedule names a task that is not runnable at that step (the model changed)."""


class RandomScheduler:
    name = "random"

    def __init__(self, choices: Choices) -> None:
        self.choices = choices

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        if len(runnable) == 1:
            return runnable[0]
        return runnable[self.choices.below(len(runnable))]


class PCTScheduler:
    name = "pct"

    def __init__(self, choices: Choices, depth: int = 3, expected_steps: int = 2000) -> None:
        self.choices = choices
        self.depth = depth
        self.prio: dict[int, int] = {}
        k = max(expected_steps, 1)
        self.change = sorted({choices.below(k) for _ in range(max(depth - 1, 0))})
        self._ci = 0

    def on_spawn(self, engine: Any, st: Any) -> None:
        # distinct initial priorities above every change-point priority
        self.prio[st.idx] = self.depth + 1 + self.choices.below(1 << 16) * 64 + st.idx

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        best = max(runnable, key=lambda t: self.prio[t.idx])
        step = engine.step
        while self._ci < len(self.change) and self.change[self._ci] <= step:
            # the task that would run at a change point drops below everybody else
            self.prio[best.idx] = self.depth - self._ci
            self._ci += 1
            best = max(runnable, key=lambda t: self.prio[t.idx])
        if best is self._last and self._run >= QUANTUM and len(runnable) > 1:
            # timeslice expired: the spinning task goes below every other (see QUANTUM)
            self.prio[best.idx] = min(self.prio.values()) - 1
            best = max(runnable, key=lambda t: self.prio[t.idx])
        self._run = self._run + 1 if best is self._last else 1
        self._last = best
        return best

    _last: Any = None
    _run = 0


#: timeslice: a task that ran this many consecutive steps while others could run is switched out (round
#: robin), as the kernel's scheduler would; without it a task spinning on a retry-with-timeout loop would
#: starve the very task it waits for, an interleaving no kernel produces
QUANTUM = 512


class SwitchListScheduler:
    name = "switch"

    def __init__(self, switches: list[tuple[int, int]]) -> None:
        self.switches = sorted(switches)
        self._si = 0
        self.cur: Any = None
        self.run_len = 0

    @classmethod
    def draw(cls, choices: Choices, max_switches: int = 24, horizon: int = 4000) -> "SwitchListScheduler":
        """Draw a switch list: a count, then (gap, rank) pairs (gaps shrink towards early switches)."""
        n = choices.below(max_switches + 1)
        out = []
        step = 0
        for _ in range(n):
            step += choices.below(horizon // max(n, 1) + 1)
            out.append((step, choices.below(8)))
        return cls(out)

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        step = engine.step
        cur = self.cur
        sw = self.switches
        rank = None
        while self._si < len(sw) and sw[self._si][0] <= step:
            rank = sw[self._si][1]
            self._si += 1
        if rank is not None:
            others = [t for t in runnable if t is not cur] or runnable
            cur = others[rank % len(others)]
        elif cur is None or cur.done or cur not in runnable:
            cur = runnable[0]
        elif self.run_len >= QUANTUM and len(runnable) > 1:
            cur = _next_after(cur, runnable)
        self.run_len = self.run_len + 1 if cur is self.cur else 1
        self.cur = cur
        return cur


def _next_after(cur: Any, runnable: list[Any]) -> Any:
    """Round robin: the first runnable task created after ``cur`` (wrapping)."""
    for t in runnable:
        if t.idx > cur.idx:
            return t
    return runnable[0]


class ReplayScheduler:
    name = "replay"

    def __init__(self, schedule: list[tuple[str, int]]) -> None:
        self.runs = [(str(n), int(c)) for n, c in schedule]
        self._ri = 0
        self._left = self.runs[0][1] if self.runs else 0
        self.exhausted = False

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        while self._ri < len(self.runs) and self._left == 0:
            self._ri += 1
            self._left = self.runs[self._ri][1] if self._ri < len(self.runs) else 0
        if self._ri >= len(self.runs):
            self.exhausted = True
            return runnable[0]
        name = self.runs[self._ri][0]
        self._left -= 1
        for t in runnable:
            if t.name == name:
                return t
        raise ScheduleDiverged(f"step {engine.step}: the schedule runs {name}, which is not runnable "
                               f"(runnable: {', '.join(t.name for t in runnable)})")


def encode_schedule(engine: Any) -> list[list[Any]]:
    """The recorded picks as run-length ``[[task name, steps], ...]`` (consecutive picks of one name form one
    run; grouped in C: a run records a pick per step; :func:`encode_schedule_ref` is the reference)."""
    names = [t.name for t in engine.tasks]
    return [[n, len(list(g))] for n, g in groupby(map(names.__getitem__, engine.picks))]


def encode_schedule_ref(engine: Any) -> list[list[Any]]:
    """Reference of :func:`encode_schedule`: pick by pick."""
    out: list[list[Any]] = []
    names = [t.name for t in engine.tasks]
    for idx in engine.picks:
        n = names[idx]
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def switches_from_picks(engine: Any) -> list[tuple[int, str]]:
    """The context switches of a recorded run: ``(step, task name)`` where the running task changed."""
    out = []
    prev = None
    for step, idx in enumerate(engine.picks):
        if idx != prev:
            out.append((step, engine.tasks[idx].name))
            prev = idx
    return out
