"""MMF_UNSTABLE: the OOM reaper marks the address space unstable before it zaps it (mm/oom_kill.c
__oom_reap_task_mm, ``set_bit(MMF_UNSTABLE)``), and every path that would install a new page in a private
mapping checks it under the page-table lock (include/linux/oom.h check_stable_address_space(): VM_FAULT_SIGBUS):
do_anonymous_page (zero page and new page), __do_huge_pmd_anonymous_page and the huge zero page,
finish_fault for a !VM_SHARED mapping, migrate_vma_insert_page (a hole migrated to the device).  So a reaped
range is never silently repopulated with zeroes (4.14+: the 5.2 and 6.x profiles alike).

Expected values from those sources: the CPU access gets SIGBUS, a device fault through hmm_range_fault gets
-EFAULT (VM_FAULT_ERROR), a hole migrated to the device stays a hole (dmirror reads back -ENOENT), a shared
file mapping (not reaped, not checked) still faults normally; no page is allocated or leaked.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE
from hmmirror.errors import KernelError
from hmmirror.kernel import sched
from hmmirror.mm.debug import check_counts
from hmmirror.mm.oom_kill import check_stable_address_space, oom_reap_task_mm

ENOENT, EFAULT = 2, 14
VM_FAULT_SIGBUS = 0x2
N = 4


def reap(p) -> None:
    assert sched.run(oom_reap_task_mm(p.mm), p.mm.task) is True


def none_at(p, addr: int) -> bool:
    level, _, e = p.mm.pt.lookup(addr)
    return e == 0 or x86.pte_none(e)


def sigbus(fn) -> bool:
    with pytest.raises(KernelError) as ei:
        fn()
    return ei.value.errno_name == "EFAULT" and ("SIGBUS" in str(ei.value) or "signal 7" in str(ei.value))


@pytest.mark.parametrize("kernel", ["5.2", "6.12", "6.18"])
def test_anonymous_faults_after_the_reap_get_sigbus(kernel):
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("victim")
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, b"\x55" * PAGE_SIZE)
    assert check_stable_address_space(p.mm) == 0
    reap(p)
    assert check_stable_address_space(p.mm) == VM_FAULT_SIGBUS
    assert none_at(p, a)                                          # the reaper zapped the page
    allocated = m.counters["anon_pages_allocated"]
    assert sigbus(lambda: p.read_bytes(a + PAGE_SIZE, 4))         # read: no zero page installed
    assert sigbus(lambda: p.write_bytes(a, b"x"))                 # write: no new page installed
    assert none_at(p, a) and none_at(p, a + PAGE_SIZE)
    assert m.counters["anon_pages_allocated"] == allocated
    assert check_counts(m) == []


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_huge_anonymous_fault_after_the_reap_gets_sigbus(kernel):
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("victim")
    base = p.mmap(2 * PMD_SIZE, "rw")
    a = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    assert p.madvise(a, PMD_SIZE, "hugepage") == 0
    reap(p)
    assert sigbus(lambda: p.write_bytes(a, b"x"))                 # __do_huge_pmd_anonymous_page
    assert sigbus(lambda: p.read_bytes(a + PMD_SIZE // 2, 4))     # huge zero page (or the PTE fallback)
    assert none_at(p, a)
    assert m.counters["thp_fault_alloc"] == 0
    assert check_counts(m) == []


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_private_file_cow_fault_checks_fault_around_does_not(kernel):
    """finish_fault() checks for a !VM_SHARED mapping ("we might have lost our CoWed page"): a private write
    fault on a none entry (do_cow_fault) gets SIGBUS.  A read fault is served by fault-around first
    (do_fault_around -> filemap_map_pages, which maps cached pages without the check): it succeeds, as does
    any fault on a shared file mapping (neither reaped nor checked)."""
    m = Machine(kernel, ram=256 << 20)
    m.mount("/data", "ext4")
    m.create_file("/data/f", 1024 * PAGE_SIZE, "data")         # the first folio ends before EOF: [6.18]
    p = m.spawn("victim")                                        # fault-around may map them
    priv = p.mmap(N * PAGE_SIZE, "rw", ["private"], file="/data/f")
    shared = p.mmap(N * PAGE_SIZE, "r", ["shared"], file="/data/f")
    reap(p)
    assert sigbus(lambda: p.write_bytes(priv, b"x"))             # do_cow_fault -> finish_fault
    assert none_at(p, priv)
    assert p.read_bytes(priv, PAGE_SIZE) == p.read_bytes(shared, PAGE_SIZE)   # fault-around maps both
    assert not none_at(p, priv) and not none_at(p, shared)
    assert check_counts(m) == []


def test_read_fault_of_a_folio_reaching_eof_gets_sigbus_6_18():
    """[6.18] filemap_map_pages() does not map a folio that reaches EOF (can_map_large false: no PTE table is
    installed, nothing is mapped), so the read fault of a private mapping ends in finish_fault() and its
    check: SIGBUS.  The shared mapping of the same file is not checked and faults normally."""
    m = Machine("6.18", ram=256 << 20)
    m.mount("/data", "ext4")
    m.create_file("/data/f", N * PAGE_SIZE, "data")
    p = m.spawn("victim")
    priv = p.mmap(N * PAGE_SIZE, "r", ["private"], file="/data/f")
    shared = p.mmap(N * PAGE_SIZE, "r", ["shared"], file="/data/f")
    reap(p)
    assert sigbus(lambda: p.read_bytes(priv, 4))
    assert none_at(p, priv)
    assert len(p.read_bytes(shared, PAGE_SIZE)) == PAGE_SIZE
    assert check_counts(m) == []


def test_device_paths_after_the_reap():
    """A device fault gets -EFAULT (handle_mm_fault's VM_FAULT_SIGBUS); migrating a reaped hole to the device
    aborts in migrate_vma_insert_page, the hole stays, the device pages go back free, dmirror reads -ENOENT."""
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open

    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("victim")
    fd = hmm_open(p, 0)
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, b"\x11" * (N * PAGE_SIZE))
    reap(p)
    assert fd.ioctl("READ", HmmDmirrorCmd(a, bytearray(N * PAGE_SIZE), N)) == -EFAULT
    mark = len(m.events)
    cmd = HmmDmirrorCmd(a, bytearray(N * PAGE_SIZE), N)
    assert fd.ioctl("MIGRATE_TO_DEV", cmd) == -ENOENT
    assert all(none_at(p, a + i * PAGE_SIZE) for i in range(N))
    dev = fd.device
    for c in dev.devmem_chunks:
        assert not m.mem.refcount[c.pgmap.res.start:c.pgmap.res.end].any()
    assert dev.free_count() == sum(c.pgmap.nr_pages for c in dev.devmem_chunks)
    assert [e["event"] for e in m.events[mark:] if e.get("what") == "invalidate_range_start"] == ["MIGRATE"] * 2
    assert check_counts(m) == []
