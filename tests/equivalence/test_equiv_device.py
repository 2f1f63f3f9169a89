"""Differential tests on device-memory states built by the model itself: pages migrated to dmirror device 0
(the caller's owner) and device 1 (a foreign owner), device-exclusive entries, pages still in system memory
and holes.  The fast ``hmm_range_fault`` (hmmirror.fast.hmm_modern) must equal the reference walk in every
observable: the return code, the pfns, the page tables and frame metadata after the faults (a foreign page
is faulted back through its owner's migrate_to_ram, an exclusive entry restored), the counters, the event
log, the pgmap counts and the page contents.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open
from hmmirror.fast import hmm_modern as fast
from hmmirror.kernel import sched
from hmmirror.mm.debug import check_counts
from hmmirror.mm.hmm import modern as h
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert
from hmmirror.mm.mmu_notifier import mmu_interval_read_begin

N = 96                                       # pages: [0,16) dev0, [16,32) dev1, [32,40) exclusive,
                                             # [40,64) system, [64,80) dev0 again after a partial fault,
                                             # [80,96) never touched


def _world():
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    fd0, fd1 = hmm_open(p, 0), hmm_open(p, 1)
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, (np.arange(80 * PAGE_SIZE // 4, dtype="<i4")).tobytes())
    buf = bytearray(16 * PAGE_SIZE)
    assert fd0.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(a, buf, 16)) == 0
    assert fd1.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(a + 16 * PAGE_SIZE, buf, 16)) == 0
    assert fd0.ioctl("EXCLUSIVE", HmmDmirrorCmd(a + 32 * PAGE_SIZE, bytearray(8 * PAGE_SIZE), 8)) == 0
    assert fd0.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(a + 64 * PAGE_SIZE, buf, 16)) == 0
    p.read_bytes(a + 70 * PAGE_SIZE, 8)        # one page of that run back in system memory
    assert check_counts(m) == []
    return m, p, fd0, a


def _walk(m, p, owner, start, end, default, reference):
    mm = p.mm

    def go():
        sub = MmuIntervalNotifier()
        assert (yield from mmu_interval_notifier_insert(sub, mm, 0, 1 << 56, MmuIntervalNotifierOps())) == 0
        seq = yield from mmu_interval_read_begin(sub)
        rng = h.HmmRange(sub, start, end, h.new_hmm_pfns((end - start) >> PAGE_SHIFT), seq, default, 0, owner)
        m.events.clear()
        m.counters.clear()
        yield from sched.down_read(mm.mmap_sem)
        r = yield from fast.hmm_range_fault(rng, reference=reference)
        sched.up_read(mm.mmap_sem)
        return r, rng.hmm_pfns.tobytes()

    return sched.run(go(), mm.task)


def _state(m):
    pool, mem = m.pool, m.mem
    return {"tables": pool.tables.tobytes(), "ref": mem.refcount.tobytes(), "map": mem.mapcount.tobytes(),
            "flags": mem.flags.tobytes(), "contents": {k: bytes(v) for k, v in mem.contents.items()},
            "counters": dict(m.counters), "events": [dict(e) for e in m.events],
            "pgmaps": [(g.name, g.count, g.state) for g in m.pgmaps]}


@pytest.mark.parametrize("default", [0, h.HMM_PFN_REQ_FAULT, h.HMM_PFN_REQ_FAULT | h.HMM_PFN_REQ_WRITE],
                         ids=["snapshot", "fault", "write"])
@pytest.mark.parametrize("who", ["dev0", "none"])
@pytest.mark.parametrize("window", [(0, N), (10, 40), (60, 90)], ids=["all", "dev-excl", "mixed"])
def test_device_states_fast_equals_reference(default, who, window):
    m, p, fd0, a = _world()
    owner = fd0.device if who == "dev0" else None
    start, end = a + window[0] * PAGE_SIZE, a + window[1] * PAGE_SIZE
    m2, p2 = copy.deepcopy((m, p))
    r1 = _walk(m, p, owner, start, end, default, True)
    r2 = _walk(m2, p2, owner if owner is None else m2.devices[owner.path], start, end, default, False)
    assert r1 == r2
    assert _state(m) == _state(m2)
    assert check_counts(m) == [] and check_counts(m2) == []
