"""D1 (``data_lost``) and D2 (``page_place``): a round trip of four written pages through device memory runs
clean with lib/test_hmm.c's dmirror, and each deliberately broken variant is caught where the mistake is.

Expected values from device-memory.md: D1 every byte written is read back whatever migrated in between; D2 a
page is in exactly one place.  The scenario (tests/sim/data/migrate_roundtrip.toml): cpu0 writes, dev0
migrates the pages to device memory and reads them there, cpu1 reads them back (each CPU read faults the page
home through migrate_to_ram).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import device_buggy_drivers as bad  # noqa: E402

from hmmirror.sim.adapters import DmirrorAdapter
from hmmirror.sim.invariants import default_invariants
from hmmirror.sim.invariants_data import DataLost, PagePlace
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import SimScenario
from hmmirror.sim.schedulers import SwitchListScheduler

SCEN = os.path.join(os.path.dirname(__file__), "data", "migrate_roundtrip.toml")
AFTER_CPU0 = 21            # the step cpu0 has finished its writes: switch to dev0 (then cpu1 runs)


def roundtrip(driver):
    invs = default_invariants()
    res = run_scenario(SimScenario.load(SCEN), SwitchListScheduler([(AFTER_CPU0, 1)]), invariants=invs,
                       driver=driver)
    order = []
    for t in res.trace:
        if not order or order[-1] != t[1]:
            order.append(t[1])
    assert order == [0, 2, 1], order        # cpu0, dev0, cpu1: the model changed if this fails
    return res, invs


def test_roundtrip_with_dmirror_is_clean_and_every_read_was_compared():
    res, invs = roundtrip(DmirrorAdapter())
    assert res.findings == [], [f.describe() for f in res.findings]
    d1 = next(i for i in invs if isinstance(i, DataLost))
    assert d1.checked == 8                  # 4 device reads in device memory + 4 CPU reads after migrate_to_ram
    machine = next(i for i in invs if isinstance(i, PagePlace)).machine
    assert machine.counters["dmirror_devmem_fault"] == 4


def test_migration_that_skips_the_copy_loses_data_at_the_migration():
    res, _ = roundtrip(bad.NoCopyDmirror())
    f = next(f for f in res.findings if f.invariant == "data_lost")
    assert f.location == "drivers.test_hmm.Dmirror.dmirror_migrate_to_device", f.describe()


def test_migrate_to_ram_that_keeps_the_device_copy_is_in_two_places():
    res, _ = roundtrip(bad.KeepBothDmirror())
    f = next(f for f in res.findings if f.invariant == "page_place")
    assert (f.location, f.detail) == ("device_buggy_drivers.KeepBothDmirror._devmem_fault", "both"), f.describe()


def test_a_free_device_page_the_cpu_still_maps_is_in_no_place():
    """D2's other half on a machine state: a device-private page the CPU maps whose refcount dropped to 0."""
    res, invs = roundtrip(DmirrorAdapter())
    d2 = next(i for i in invs if isinstance(i, PagePlace))
    machine = d2.machine
    pg = next(p for p in machine.pgmaps if p.type.name == "MEMORY_DEVICE_PRIVATE")
    lo = pg.res.start
    assert d2._bad(np.arange(lo, lo + 8, dtype=np.int64)) is None
    machine.mem.mapcount[lo + 3] = 1                  # a CPU entry names the page, nobody references it
    assert d2._bad(np.arange(lo, lo + 8, dtype=np.int64)) == ("neither", lo + 3)
