"""The sequential HMM facade (hmmirror.mirror.Mirror) on both profiles.

Expected values come from the kernel's behaviour as the specs state it (hmm-modern.md, hmm-5.2.md §13) and
from an independent observation of the CPU page tables (``Process.inspect``), never from the facade's own
output.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import HmmRangeError, InputError, KernelError, Machine, Mirror, ModelBug
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.kernel import sched

P = PAGE_SIZE
PROFILES = ("5.2", "6.18")


@pytest.fixture(params=PROFILES)
def proc(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    m = Machine(request.param, ram=64 << 20)
    return m.spawn("app")


def test_write_fault_mirrors_what_the_cpu_maps(proc) -> None:  # type: ignore[no-untyped-def]
    a = proc.mmap(16 * P)
    with proc.mirror() as mirror:
        r = mirror.hmm_range_fault(a, a + 16 * P, write=True)
    cpu = proc.inspect(a, 16 * P)                          # faulted in by the facade's call
    assert all(s.present and s.write and s.kind == "anon" for s in cpu)
    assert r.valid.all() and r.write.all() and not r.error.any()
    assert r.pfn.tolist() == [s.pfn for s in cpu]
    assert r.entries() == [f"VW@{s.pfn:#x}" for s in cpu]
    assert proc.mm.task.held == []


def test_snapshot_does_not_fault(proc) -> None:  # type: ignore[no-untyped-def]
    a = proc.mmap(8 * P)
    proc.touch(a + 2 * P, P, write=True)
    with proc.mirror() as mirror:
        r = mirror.snapshot(a, length=8 * P)
    assert [s.present for s in proc.inspect(a, 8 * P)] == [False, False, True] + [False] * 5
    assert r.valid.tolist() == [False, False, True] + [False] * 5
    assert r.entries()[0] == "NONE" and r.pfn[0] == -1
    assert r.pfn[2] == proc.inspect(a + 2 * P, P)[0].pfn


def test_read_fault_of_the_zero_page_differs_between_profiles() -> None:
    # 6.x: the zero page is a valid read-only entry; 5.2: a special PTE gives SPECIAL and -EFAULT
    # (hmm-5.2.md §13, "PTE present, special, not devmap (includes the shared zero page ...)").
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    a = p.mmap(4 * P)
    r = p.mirror().hmm_range_fault(a, length=4 * P)
    assert r.entries() == [f"V@{m.mem.zero_pfn:#x}"] * 4
    m5 = Machine("5.2", ram=64 << 20)
    p5 = m5.spawn("app")
    a5 = p5.mmap(4 * P)
    with pytest.raises(HmmRangeError) as ei:
        p5.mirror().hmm_range_fault(a5, length=4 * P)
    assert ei.value.errno_name == "EFAULT"
    # the hole path faulted the first page in (the zero page); then the special PTE stopped the walk, and
    # on a non-zero result pfns[last .. end) are set NONE (hmm-5.2.md §9.2)
    assert p5.inspect(a5, P)[0].kind == "zero"
    assert ei.value.result is not None and ei.value.result.entries() == ["NONE"] * 4


def test_the_retry_loop_absorbs_invalidations_the_fault_itself_causes() -> None:
    # 6.18: a write fault on a page shared after fork breaks COW, which invalidates the mirror's interval;
    # hmm_range_fault then sees the changed sequence and returns -EBUSY: the caller's loop tries again.
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    a = p.mmap(8 * P)
    p.touch(a, 8 * P, write=True)
    p.fork("child")
    with p.mirror() as mirror:
        r = mirror.hmm_range_fault(a, length=8 * P, write=True)
        assert r.passes >= 2
        assert r.invalidations and all(i.blockable for i in r.invalidations)
        assert any(i.start <= a < i.end for i in r.invalidations)
    cpu = p.inspect(a, 8 * P)
    assert r.pfn.tolist() == [s.pfn for s in cpu] and all(s.exclusive and s.write for s in cpu)


def test_invalidations_are_recorded(proc) -> None:  # type: ignore[no-untyped-def]
    a = proc.mmap(8 * P)
    with proc.mirror() as mirror:
        mirror.hmm_range_fault(a, length=8 * P, write=True)
        n = len(mirror.invalidations)
        proc.munmap(a + 2 * P, 2 * P)
        new = mirror.invalidations[n:]
    assert new and any(i.start <= a + 2 * P and a + 4 * P <= i.end for i in new)


@pytest.mark.parametrize("kernel,prot,write,errno", [
    ("6.18", "r", True, "EPERM"),        # a write fault in a VMA without VM_WRITE
    ("6.18", "none", False, "EFAULT"),   # hmm_vma_walk_test: no VM_READ, a fault requested
    ("5.2", "none", False, "EPERM"),     # hmm_range_fault [5.2]: no VM_READ, every entry NONE, -EPERM
])
def test_kernel_errors_carry_the_errno_name(kernel: str, prot: str, write: bool, errno: str) -> None:
    m = Machine(kernel, ram=64 << 20)
    p = m.spawn("app")
    a = p.mmap(4 * P, prot)
    with pytest.raises(HmmRangeError) as ei:
        p.mirror().hmm_range_fault(a, length=4 * P, write=write)
    assert ei.value.errno_name == errno
    assert isinstance(ei.value, KernelError)
    assert p.mm.task.held == []


def test_no_vma_6_18_is_efault_and_5_2_hole_is_the_null_dereference() -> None:
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    with pytest.raises(HmmRangeError) as ei:
        p.mirror().hmm_range_fault(0x10000, length=P)
    assert ei.value.errno_name == "EFAULT"
    # 5.2: a fault starting in a gap calls handle_mm_fault with walk->vma == NULL (hmm-5.2.md §9.1, §13)
    m5 = Machine("5.2", ram=64 << 20)
    p5 = m5.spawn("app")
    a = p5.mmap(8 * P)
    p5.munmap(a, P)
    mirror = p5.mirror()
    with pytest.raises(ModelBug) as eb:
        mirror.hmm_range_fault(a, length=8 * P, write=True)
    assert eb.value.kind == "null_deref"
    assert p5.mm.task.held == []                         # the facade released what the dead call held
    r = mirror.hmm_range_fault(a + P, length=7 * P, write=True)
    assert r.valid.all()


def test_bad_arguments_are_input_errors(proc) -> None:  # type: ignore[no-untyped-def]
    a = proc.mmap(4 * P)
    mirror = proc.mirror()
    for args, kw in [((a + 1, a + P), {}), ((a, a), {}), ((a, a + P), {"length": P}), ((a,), {}),
                     ((a, 1 << 60), {}), (("x", a), {})]:
        with pytest.raises(InputError):
            mirror.hmm_range_fault(*args, **kw)
    with pytest.raises(InputError):
        mirror.hmm_range_fault(a, length=P, hmm_pfns=np.zeros(3, dtype=np.uint64))
    mirror.close()
    mirror.close()                                        # idempotent
    with pytest.raises(InputError) as ei:
        mirror.snapshot(a, length=P)
    assert ei.value.errno_name == "EBADF"
    proc.exit()
    with pytest.raises(InputError) as ej:
        Mirror(proc)
    assert ej.value.errno_name == "ESRCH"


def test_a_range_without_a_notifier_is_a_typed_error() -> None:
    from hmmirror.fast import hmm_range_fault as fast_fault
    from hmmirror.mm.hmm import modern as h
    from hmmirror.mm.mmu_notifier import MmuIntervalNotifier

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    a = p.mmap(4 * P)
    mirror = p.mirror()
    for notifier in (None, MmuIntervalNotifier()):        # NULL, and never inserted
        rng = h.HmmRange(notifier, a, a + 4 * P, h.new_hmm_pfns(4))    # type: ignore[arg-type]
        with pytest.raises(InputError):
            mirror.run_range(rng)
        for reference in (True, False):                  # the model itself: the kernel's NULL dereference
            with pytest.raises(ModelBug) as ei:
                sched.run(fast_fault(rng, reference=reference), p.mm.task)
            assert ei.value.kind == "null_deref"
    rng = h.HmmRange(mirror.notifier, a, a + 4 * P, h.new_hmm_pfns(4), default_flags=h.HMM_PFN_REQ_FAULT)
    assert mirror.run_range(rng) == -16                  # no mmu_interval_read_begin: a stale sequence, -EBUSY
    from hmmirror.mm.mmu_notifier import mmu_interval_read_begin
    rng.notifier_seq = sched.run(mmu_interval_read_begin(mirror.notifier), p.mm.task)
    assert mirror.run_range(rng) == 0 and p.mm.task.held == []
    assert all(s.present for s in p.inspect(a, 4 * P))


def test_raw_requests_per_page() -> None:
    # Per-page requests (pfn_flags_mask) decide which pages need a fault; a needed fault covers the rest of
    # the walk's range from that page on (hmm_vma_handle_pte -> hmm_vma_fault(addr, end)), and pages without
    # a request report what the CPU maps.
    from hmmirror.mm.hmm import modern as h

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    a = p.mmap(4 * P)
    p.touch(a, 4 * P)                                     # four read faults: the zero page
    req = np.array([0, h.HMM_PFN_REQ_FAULT, h.HMM_PFN_REQ_FAULT | h.HMM_PFN_REQ_WRITE, 0], dtype=np.uint64)
    r = p.mirror().hmm_range_fault(a, length=4 * P, hmm_pfns=req, default_flags=0,
                                   pfn_flags_mask=h.HMM_PFN_REQ_FAULT | h.HMM_PFN_REQ_WRITE)
    cpu = p.inspect(a, 4 * P)
    assert [s.kind for s in cpu] == ["zero", "zero", "anon", "anon"]
    assert r.entries() == [f"V@{m.mem.zero_pfn:#x}"] * 2 + [f"VW@{s.pfn:#x}" for s in cpu[2:]]


def test_entries_match_the_scenario_decoders(proc) -> None:  # type: ignore[no-untyped-def]
    from hmmirror.scenario.dmirror_ops import decode_modern
    from hmmirror.scenario.hmm_v5_2_ops import decode_entry

    a = proc.mmap(8 * P)
    proc.touch(a, 4 * P, write=True)
    proc.mprotect(a + 2 * P, 2 * P, "r")
    r = proc.mirror().snapshot(a, length=8 * P)
    if proc.machine.profile.interval_notifiers:
        want = [decode_modern(int(e)) for e in r.hmm_pfns.tolist()]
    else:
        from hmmirror.mm.hmm.v5_2 import new_range
        rng = new_range(a, a + 8 * P)
        want = [decode_entry(rng, int(e)) for e in r.hmm_pfns.tolist()]
    assert r.entries() == want
    assert r.write.tolist() == [True, True, False, False] + [False] * 4


def test_dmirror_device(proc) -> None:  # type: ignore[no-untyped-def]
    a = proc.mmap(4 * P)
    if not proc.machine.profile.interval_notifiers:
        with pytest.raises(KernelError) as ei:
            proc.open_dmirror()
        assert ei.value.errno_name == "ENOENT"
        return
    dev = proc.open_dmirror()
    data = bytes(range(256)) * (4 * P // 256)
    cmd = dev.write(a, data)
    assert cmd.cpages == 4
    assert proc.read_bytes(a, 4 * P) == data              # the device wrote through the CPU's frames
    cmd, back = dev.read(a, 4)
    assert back == data
    snap = dev.snapshot(a, 4)
    assert len(snap) == 4 and all(b & 0x02 for b in snap)  # HMM_DMIRROR_PROT_WRITE
    dev.close()


def test_dmirror_migration_and_exclusive_access() -> None:
    # hmm-tests.c "migrate" and "exclusive": cpages counts every page, the data reads back unchanged, the
    # CPU's next access brings a page back (migrate_to_ram / restore of the exclusive entry)
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("app")
    n = 8
    a = p.mmap(n * P)
    data = bytes(range(256)) * (n * P // 256)
    p.write_bytes(a, data)
    with p.open_dmirror() as dev:
        cmd, back = dev.migrate_to_dev(a, n)
        assert cmd.cpages == n and back == data
        assert {s.kind for s in p.inspect(a, n * P)} == {"device_private"}
        assert p.read_bytes(a, P) == data[:P]             # the CPU fault migrates page 0 back
        assert [s.kind for s in p.inspect(a, 2 * P)] == ["anon", "device_private"]
        assert dev.migrate_to_sys(a, n).cpages == n - 1
        assert {s.kind for s in p.inspect(a, n * P)} == {"anon"}
        cmd, back = dev.exclusive(a, n)
        assert cmd.cpages == n and back == data
        assert {s.kind for s in p.inspect(a, n * P)} == {"device_exclusive"}
        with pytest.raises(KernelError) as ei:
            dev.check_exclusive(a, n)
        assert ei.value.errno_name == "EPERM"
        p.touch(a, n * P, write=True)                     # the CPU takes the pages back
        dev.check_exclusive(a, n)
        assert p.read_bytes(a, n * P) == data
        dev.migrate_to_dev(a, n)
        dev.release(a, n)                                 # evicts the device's memory
        assert {s.kind for s in p.inspect(a, n * P)} == {"anon"} and p.read_bytes(a, n * P) == data
        with pytest.raises(InputError):
            dev.write(a, b"x")
    assert dev.closed


def test_faults_run_under_the_mmap_lock_only(proc) -> None:  # type: ignore[no-untyped-def]
    # the kernel's callers hold mmap_lock around hmm_range_fault and never their own driver lock (the
    # invalidate callback takes it: holding it would deadlock against an invalidation)
    m = proc.machine
    a = proc.mmap(4 * P)
    mirror = proc.mirror()
    m.events.clear()
    mirror.hmm_range_fault(a, length=4 * P, write=True)
    if m.profile.interval_notifiers:
        ctx = [e["locks"] for e in m.events if e.get("what") == "hmm_vma_fault"]
    else:
        ctx = [e["locks"] for e in m.events if e.get("what") == "may_sleep" and e.get("call") == "handle_mm_fault"]
    assert ctx and all(c == [f"rwsem:{proc.mm.mmap_sem.name}"] for c in ctx)
    assert not proc.mm.mmap_sem.is_locked() and not mirror.lock.is_locked()
