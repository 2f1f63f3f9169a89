"""Virtual time: ``jiffies`` of a machine (include/linux/jiffies.h).

The model has no wall clock.  ``machine.jiffies`` advances by one at every scheduling step of the simulator
(``HZ`` = 1000: one step is one millisecond), so a driver's ``HMM_RANGE_DEFAULT_TIMEOUT`` (1000 ms) is 1000
steps of the whole machine, whoever ran them.  Run sequentially (``sched.run``), nothing advances it: no
other task can keep a range busy there, so a retry loop never needs its timeout.
"""

from __future__ import annotations

from typing import Any

HZ = 1000


def jiffies(machine: Any) -> int:
    """``jiffies``: the machine's virtual time in ticks."""
    return int(getattr(machine, "jiffies", 0))


def msecs_to_jiffies(ms: int) -> int:
    """msecs_to_jiffies() (HZ = 1000)."""
    return int(ms) * HZ // 1000


def time_after(a: int, b: int) -> bool:
    """time_after(a, b): ``a`` is later than ``b``."""
    return a - b > 0
