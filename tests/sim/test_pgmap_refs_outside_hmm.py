"""``pgmap_refcount`` blames HMM only for what changes inside HMM calls.

The invariant's rule (mm-substrate.md §3, hmm-5.2.md §8): the ``get_dev_pagemap`` references an HMM walk takes
are all given back before the call returns ([6.x] HMM takes none).  A device job's own steps outside HMM calls
-- its mmput -> exit_mmap, a pgmap reference the driver keeps for itself -- are not HMM's, and must move the
baseline as any other task's steps do (session 5's blind 6.18 dmirror campaign, seed 55819: a device task's
mmput -> exit_mmap was blamed on its last hmm_range_fault, ``pgmap_refcount|...hmm_range_fault|dropped``).
A reference kept by an HMM call is still reported (tests/sim/test_sim_invariants.py::test_pgmap_refcount).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sim_toy_drivers as toy  # noqa: E402

from hmmirror import Machine
from hmmirror.kernel import sched
from hmmirror.mm.memremap import get_dev_pagemap, put_dev_pagemap
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

L = 8 * 4096


class OwnPgmapRefMirror(toy.GoodMirror):
    """A correct mirror that holds a reference on its device memory's pgmap across its HMM calls, taken and
    dropped outside them (as a driver that keeps the dev_pagemap of memory it uses alive)."""

    name = "own-pgmap-ref"

    def fault(self, start: int, end: int, write: bool):
        pgmap = get_dev_pagemap(self.machine, self.machine.pgmaps[0].res.start, None)
        yield from sched.preempt_point("driver")
        ret = yield from super().fault(start, end, write)          # hmm_range_fault: returns with it held
        yield from sched.preempt_point("driver")
        put_dev_pagemap(pgmap)
        yield from sched.preempt_point("driver")
        ret2 = yield from super().fault(start, end, write)         # and again with it dropped
        return ret or ret2


def _fault(start: int, end: int):
    def factory(run):
        return device_fault(run, start, end, True)
    return factory


def test_a_driver_pgmap_reference_outside_hmm_calls_is_not_blamed_on_hmm():
    m = Machine("6.18", ram=64 << 20)
    m.add_pmem("pmem1", 16 << 20, "devdax", 2 << 20)
    p = m.spawn("p")
    a = p.mmap(L)
    p.touch(a, L, write=True)
    drv = OwnPgmapRefMirror()
    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", _fault(a, a + L))], SwitchListScheduler([]), None)
    assert f is None, f.describe()
    assert m.pgmaps[0].ref.stats.get("tryget_live", 0) >= 1    # the driver's reference was taken (and put)


def test_a_reference_an_hmm_call_keeps_is_still_reported_beside_one_the_driver_holds():
    m = Machine("6.18", ram=64 << 20)
    m.add_pmem("pmem1", 16 << 20, "devdax", 2 << 20)
    p = m.spawn("p")
    a = p.mmap(L)

    class Both(toy.PgmapLeakMirror):
        def fault(self, start, end, write):
            get_dev_pagemap(self.machine, self.machine.pgmaps[0].res.start, None)   # the driver's own
            yield from sched.preempt_point("driver")
            return (yield from super().fault(start, end, write))                  # the leaky "HMM call"

    f, eng = run_tasks(m, Both(), p.mm, [("dev0", "device", _fault(a, a + L))], SwitchListScheduler([]), None)
    assert f is not None and f.invariant == "pgmap_refcount", f and f.describe()
    # the one the "HMM call" kept, not the driver's own (which moved the baseline)
    assert f.detail == "kept" and f.state["count"] == f.state["baseline"] + 1, f.describe()
