"""The placement band of ``hmmirror replay --png`` (sim/placement.py, sim/lanes.py): its data, not its pixels,
follows scripted migrations.

Expected sequences from the kernel's migration paths (device-memory.md): ``migrate_vma_setup`` replaces the
CPU entries by migration entries (migrating), ``migrate_vma_finalize`` installs device-private entries
(device); a CPU access goes through ``do_swap_page`` -> ``migrate_to_ram``, which migrates back (migrating,
then system memory).  ``make_device_exclusive`` leaves a device-exclusive entry per page (exclusive) until a
CPU access restores it (system).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from hmmirror import Machine
from hmmirror.arch.x86.fault import cpu_access
from hmmirror.drivers.drm_gpusvm import DrmGpusvm
from hmmirror.kernel import sched
from hmmirror.sim.adapters import DmirrorAdapter
from hmmirror.sim.invariants import default_invariants
from hmmirror.sim.lanes import draw_lanes, placement_band
from hmmirror.sim.placement import PLACES, PlaceTimeline
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096


def machine(npages):
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(npages * PAGE)
    p.touch(a, npages * PAGE, write=True, fill=7)
    return m, p, a


def test_band_follows_a_migration_to_device_and_back_on_a_cpu_fault(tmp_path):
    m, p, a = machine(16)
    drv = DrmGpusvm()
    tl = PlaceTimeline()

    def cpu(run):     # once the range is in device memory, the CPU reads page 3
        yield from sched.wait_event(lambda: bool(drv.allocations), "test: wait for the migration")
        return (yield from cpu_access(p.mm, a + 3 * PAGE, False))

    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", lambda run: device_fault(run, a, a + 16 * PAGE, False,
                                                                                    "migrate_dev", {})),
                                      ("cpu0", "cpu", cpu)], SwitchListScheduler([]),
                       default_invariants() + [tl])
    assert f is None, f.describe()
    assert [(s, n) for _l, s, n in tl.ranges] == [(a, 16)]
    for i in range(16):     # migrate_to_ram brings the whole allocation back, not only page 3
        assert tl.history(a + i * PAGE) == ["system", "migrating", "device", "migrating", "system"], i
    # the band's matrix over the run's steps says the same, column by column
    res = SimpleNamespace(placement=tl, trace=eng.trace, finding=None, tasks=[("dev0", "device"),
                                                                              ("cpu0", "cpu")])
    mat, labels, first, last = placement_band(res)
    assert mat.shape == (16, last - first + 1) and labels == [(0, f"{a:#x}")]
    col = [PLACES[int(v)] for v in mat[3]]
    merged = [x for k, x in enumerate(col) if k == 0 or col[k - 1] != x]
    assert merged == ["system", "migrating", "device", "migrating", "system"]
    dev_steps = np.flatnonzero(mat[3] == PLACES.index("device")) + first
    # while the page was on the device, the CPU task was the one waiting (it ran only afterwards)
    cpu_steps = [s for s, idx, _k, _w in eng.trace if idx == 1]
    assert dev_steps.size and max(dev_steps) <= max(cpu_steps)
    out = tmp_path / "lanes.png"
    draw_lanes(res, str(out))
    assert out.stat().st_size > 1000


def test_band_shows_exclusive_access_and_its_restore():
    m, p, a = machine(4)
    tl = PlaceTimeline()
    f, _eng = run_tasks(m, DmirrorAdapter(), p.mm,
                        [("dev0", "device", lambda run: device_fault(run, a, a + 4 * PAGE, False, "exclusive", {})),
                         ("cpu0", "cpu", lambda run: cpu_access(p.mm, a + PAGE, True, b"x"))],
                        SwitchListScheduler([]), default_invariants() + [tl])
    assert f is None, f.describe()
    assert tl.history(a) == ["system", "exclusive"]
    assert tl.history(a + PAGE) == ["system", "exclusive", "system"]       # the CPU write restored it


def test_replay_png_draws_the_band_for_a_seeded_gpusvm_run(tmp_path):
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.replay import seeded_run
    from hmmirror.sim.scenario import generate

    seed = next(s for s in range(200) if any(j.get("mode") == "migrate_dev" for d in
                                            generate(SeededChoices(s), "6.18", "gpusvm").devices for j in d["jobs"]))
    tl = PlaceTimeline()
    res = seeded_run("6.18", seed, "gpusvm", placement=tl)
    assert res.placement is tl and tl.samples and tl.npages > 0
    out = tmp_path / "run.png"
    draw_lanes(res, str(out))
    assert out.stat().st_size > 1000
