"""The hmm.rst 5.2 driver loop, its interleavings with invalidations, scenario operations and the seed story.

Expected values: hmm-5.2.md §12 (the documented loop and the driver lock rule), §3.4 (the notifier paths,
path C returning 0), §3.5 (every registered range becomes valid again when ``notifiers`` returns to 0),
§13/§1.4 (entries).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import K, Stepper, ent  # noqa: E402
from hmmirror import Machine  # noqa: E402
from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52  # noqa: E402
from hmmirror.errors import ModelBug  # noqa: E402
from hmmirror.include.mm_types import MMU_NOTIFY  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.hmm import v5_2 as hmm  # noqa: E402
from hmmirror.mm.memory import zap_page_range  # noqa: E402
from hmmirror.mm.mmu_notifier import (  # noqa: E402
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start_nonblock,
    mmu_notifier_range_init,
    mmu_notifier_release,
)
from hmmirror.scenario import parse, run  # noqa: E402


@pytest.fixture
def anon():
    m = Machine("5.2", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * K, "rw")
    p.touch(a, 8 * K, write=True)
    d = HmmMirrorDriver52(m, "gpu")
    assert sched.run(d.register(p.mm), p.mm.task) == 0
    return m, p, a, d


def test_populate_commits_the_cpu_pfns(anon) -> None:
    m, p, a, d = anon
    assert sched.run(d.populate(a, a + 8 * K, write=True), p.mm.task) == 0
    cpu = p.inspect(a, 8 * K)
    assert d.device_entries(a, a + 8 * K) == [ent(s.pfn, write=True) for s in cpu]
    assert d.check_coherent() == []
    assert d.stats["commits"] == 1 and d.stats["retry_invalid"] == 0
    assert d.last_range is not None and d.last_range.hmm is None          # unregistered at the end
    assert not d.update.is_locked() and not p.mm.mmap_sem.is_locked()


def test_invalidation_clears_device_entries(anon) -> None:
    m, p, a, d = anon
    sched.run(d.populate(a, a + 8 * K, write=True), p.mm.task)
    p.munmap(a + 2 * K, 2 * K)
    ents = d.device_entries(a, a + 8 * K)
    assert ents[2:4] == [0, 0] and all(ents[:2]) and all(ents[4:])
    assert d.stats["entries_cleared"] == 2
    assert d.check_coherent() == []


def _zap(p, a):
    vma = p.mm.find_vma(a)
    return zap_page_range(vma, a, a + K, MMU_NOTIFY.CLEAR)


def test_retry_on_invalidation_in_progress(anon) -> None:
    m, p, a, d = anon
    A = Stepper(d.populate(a, a + 8 * K, write=True), p.mm.task)
    # A: after hmm_range_fault, about to take driver.update
    A.run_until(lambda pt: pt.kind == "sleep" and pt.what == f"mutex_lock({d.update.name})")
    # B: an invalidation of page 0 that has passed invalidate_range_start and is zapping
    B = Stepper(_zap(p, a), sched.Task("B"))
    B.run_until(lambda pt: pt.kind == "lock" and pt.what.startswith("ptl["))
    assert d.last_range.valid is False and p.mm.hmm.notifiers == 1
    # A sees the range invalid under the driver lock: retry; then hmm_range_fault finds it invalid at entry
    # (-EAGAIN, mmap_sem released) and A waits in hmm_range_wait_until_valid
    A.run_until(lambda pt: pt.kind == "preempt" and pt.what.startswith("hmm_range_wait_until_valid"))
    assert d.stats["retry_invalid"] == 1 and d.stats["retry_eagain"] == 1
    assert not p.mm.mmap_sem.is_locked()
    assert B.finish() is None                                  # range_end: notifiers 0, ranges valid again
    assert A.finish() == 0
    assert d.stats["commits"] == 1
    cpu = p.inspect(a, 8 * K)
    assert d.device_entries(a, a + 8 * K) == [ent(s.pfn, write=True) for s in cpu]
    assert d.check_coherent() == []


def test_invalidation_completed_before_the_valid_check_goes_unseen(anon) -> None:
    m, p, a, d = anon
    old = p.inspect(a, K)[0].pfn
    A = Stepper(d.populate(a, a + 8 * K, write=True), p.mm.task)
    A.run_until(lambda pt: pt.kind == "sleep" and pt.what == f"mutex_lock({d.update.name})")
    B = Stepper(_zap(p, a), sched.Task("B"))
    B.finish()
    # §3.5: the range_end that brings notifiers to 0 makes every registered range valid again, so the
    # driver's check passes and it commits the pfn the CPU no longer maps (the 5.2 API cannot see it)
    assert d.last_range.valid is True
    assert A.finish() == 0
    assert d.device_entries(a, a + K) == [ent(old, write=True)]
    assert p.inspect(a, K)[0].present is False
    assert d.check_coherent() == [f"{a:#x}: device pfn {old:#x}, CPU none"]


def test_nonblocking_invalidation_with_the_driver_lock_held(anon) -> None:
    m, p, a, d = anon
    sched.run(d.populate(a, a + 8 * K, write=True), p.mm.task)
    other = sched.Task("driver-job")
    sched.run(sched.mutex_lock(d.update), other)               # the device is busy under its lock
    r = mmu_notifier_range_init(MMU_NOTIFY.UNMAP, p.mm.find_vma(a), p.mm, a, a + 8 * K)
    ret = sched.run(mmu_notifier_invalidate_range_start_nonblock(r), sched.Task("oom_reaper"))
    # the callback answers -EAGAIN (trylock failed); path C: hmm_invalidate_range_start returns 0, so the
    # caller proceeds while the device still maps the range
    assert d.stats["invalidate_eagain"] == 1
    assert ret == 0
    assert all(d.device_entries(a, a + 8 * K))
    assert p.mm.hmm.notifiers == 1
    # the matching range_end runs in the same non-blockable context, and 5.2's hmm_invalidate_range_end
    # takes hmm.lock with a blocking mutex_lock (§3.4): a sleep in atomic context
    with pytest.raises(ModelBug) as exc:
        sched.run(mmu_notifier_invalidate_range_end(r), sched.Task("oom_reaper"))
    assert exc.value.kind == "sleep_in_atomic"


def test_literal_document_loop_treats_a_count_as_failure(anon) -> None:
    m, p, a, d = anon
    # hmm.rst prints "if (ret)": the positive page count of hmm_range_snapshot is returned as an error
    assert sched.run(d.populate(a, a + 8 * K, mode="snapshot", literal=True), p.mm.task) == 8
    assert d.device_entries(a, a + 8 * K) == [0] * 8
    assert d.last_range.hmm is None
    assert sched.run(d.populate(a, a + 8 * K, mode="snapshot"), p.mm.task) == 0
    assert all(d.device_entries(a, a + 8 * K))


def test_release_on_exit_and_gc(anon) -> None:
    m, p, a, d = anon
    sched.run(d.populate(a, a + 8 * K, write=True), p.mm.task)
    sched.run(mmu_notifier_release(p.mm), p.mm.task)
    assert d.released and len(d.pt) == 0
    assert sched.run(d.gc(), p.mm.task) == 1
    assert not hmm.hmm_mirror_mm_is_alive(d.mirror)


# --- scenario operations ----------------------------------------------------------------------------------
SCN = '''
[machine]
kernel = "5.2"
ram = "256M"

[[op]]
op = "mmap"
as = "buf"
length = "16K"
prot = "rw"

[[op]]
op = "touch"
addr = "buf"
length = "8K"
access = "write"

[[op]]
op = "hmm52_mirror_register"
mirror = "gpu"

[[op]]
op = "hmm52_range_register"
range = "r"
addr = "buf"
expect = { ret = 0, valid = true }

[[op]]
op = "hmm52_snapshot"
range = "r"
expect = { ret = 4 }

[[op]]
op = "hmm52_fault"
range = "r"
request = ["2:w"]
expect = { ret = 4 }

[[op]]
op = "hmm52_range_valid"
range = "r"
expect = { ret = 1 }

[[op]]
op = "munmap"
addr = "buf+12K"
length = "4K"

[[op]]
op = "hmm52_range_valid"
range = "r"
expect = { ret = 1, valid = true }

[[op]]
op = "hmm52_range_unregister"
range = "r"

[[op]]
op = "hmm52_range_valid"
range = "r"
expect = { ret = 0 }

[[op]]
op = "hmm52_populate"
mirror = "gpu"
addr = "buf"
length = "8K"
access = "write"
expect = { ret = 0 }

[[op]]
op = "hmm52_device"
mirror = "gpu"
addr = "buf"
length = "8K"
expect = { ret = 2 }

[[op]]
op = "hmm52_mirror_unregister"
mirror = "gpu"
'''


def test_scenario_operations_and_json() -> None:
    r = run(parse(SCN))
    assert r.ok, [(rec.op, rec.mismatches, rec.note) for rec in r.records]
    recs = {i: rec for i, rec in enumerate(r.records)}
    snap = recs[4].to_json()
    # snapshot of 2 written pages and 2 untouched pages: §13 VW entries then NONE (PTE none)
    assert snap["entries"][2:] == ["NONE", "NONE"]
    assert all(e.startswith("VW@") for e in snap["entries"][:2])
    flt = recs[5].to_json()
    # page 2 requested write: hole path from page 2 to the range end (pages 2 and 3, write faults)
    assert all(e.startswith("VW@") for e in flt["entries"][:3]) and flt["entries"][3].startswith("VW@")
    assert flt["stats"]["faults"] == 2 and flt["stats"]["walk_ebusy"] == 1
    assert "pgmap_refs" in flt
    hmf = [c for c in flt["lock_contexts"] if c["call"] == "handle_mm_fault"]
    assert hmf == [{"call": "handle_mm_fault", "locks": ["rwsem:p.mmap_lock"], "atomic": 0, "count": 2}]
    json.dumps(r.to_json())


def test_scenario_fault_errno_and_kernel_guard() -> None:
    text = SCN.split("[[op]]\nop = \"hmm52_range_valid\"")[0]
    text = text.replace('request = ["2:w"]\nexpect = { ret = 4 }', 'block = false\nexpect = { ret = 4 }')
    r = run(parse(text))
    assert r.ok
    r2 = run(parse(text.replace('kernel = "5.2"', 'kernel = "6.18"')))
    rec = [x for x in r2.records if x.op == "hmm52_mirror_register"][0]
    assert rec.errno == "ENOSYS"


# --- the seed's story ---------------------------------------------------------------------------------------
def test_seed_story() -> None:
    from hmmirror.scenario.hmm_v5_2_ops import seed_story

    s = seed_story(pages=4)
    json.dumps(s)
    assert s["kernel"] == "5.2"
    assert s["pgmap_refs"]["before"] == s["pgmap_refs"]["after"]
    pmd, pte = s["mirror"]
    for rng in (pmd, pte):
        for entry, cpu in zip(rng["entries"], rng["cpu"]):
            assert cpu["kind"] == "devmap"
            flags = "VW" if cpu["write"] else "V"
            assert entry == f"{flags}@{cpu['pfn']}"
    assert [c["level"] for c in pmd["cpu"]] == ["pmd"] * 4
    assert [c["level"] for c in pte["cpu"]] == ["pte"] * 4
    assert [c["write"] for c in pte["cpu"]] == [False, True, False, False]
    assert s["ret"] == {"pmd": 4, "pte": 4}

