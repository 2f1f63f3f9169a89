"""The dmirror driver itself (hmm-modern.md §5-§6): ioctl entry checks and the errno of each failure, the
command struct copied back only on success, the device page table and its invalidation, the bounded retry
loop, user-memory arguments, and a user driver plugged in through :class:`IntervalNotifierDriver`.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.drivers.test_hmm import (
    CMD_STRUCT,
    DPT_XA_TAG_WRITE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    DmirrorPageTable,
    HmmDmirrorCmd,
    IntervalNotifierDriver,
    hmm_open,
)
from hmmirror.errors import KernelError
from hmmirror.kernel import sched
from hmmirror.mm.hmm.modern import HMM_PFN_REQ_FAULT, HMM_PFN_WRITE, HmmRange, hmm_pfn_to_pfn
from hmmirror.mm.mmu_notifier import mmu_interval_notifier_insert, mmu_interval_set_seq

EPERM, ENOENT, ENOMEM, EFAULT, EBUSY, EINVAL, EOPNOTSUPP = 1, 2, 12, 14, 16, 22, 95


@pytest.fixture
def m() -> Machine:
    return Machine("6.18", ram=256 << 20)


@pytest.fixture
def p(m):
    return m.spawn("p")


@pytest.fixture
def fd(p):
    return hmm_open(p, 0)


def cmd(addr, npages, ptr=None):
    return HmmDmirrorCmd(addr, bytearray(npages * PAGE_SIZE) if ptr is None else ptr, npages)


# --- §6.2 entry checks ---------------------------------------------------------------------------------------
def test_entry_checks(p, fd):
    a = p.mmap(4 * PAGE_SIZE, "rw")
    assert fd.ioctl(HMM_DMIRROR_READ, None) == -EFAULT                      # copy_from_user(cmd) fails
    assert fd.ioctl(HMM_DMIRROR_READ, cmd(a + 8, 1)) == -EINVAL             # addr not page aligned
    assert fd.ioctl(HMM_DMIRROR_READ, cmd(a, 0)) == -EINVAL                 # zero pages
    assert fd.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(a, None, 1 << 52)) == -EINVAL   # addr + size overflows
    assert fd.ioctl(0xDEAD, cmd(a, 1)) == -EINVAL                           # unknown command
    assert fd.ioctl(HMM_DMIRROR_FLAGS, cmd(a, 1)) == -EINVAL                # no FLAGS in the 6.18 module
    fd.close()
    assert fd.ioctl(HMM_DMIRROR_READ, cmd(a, 1)) == -EINVAL                 # no dmirror attached


def test_command_copied_back_only_on_success(p, fd):
    a = p.mmap(4 * PAGE_SIZE, "rw")
    c = cmd(a, 4)
    assert fd.ioctl(HMM_DMIRROR_READ, c) == 0
    assert (c.cpages, c.faults) == (4, 1)
    p.mprotect(a, 4 * PAGE_SIZE, "none")
    c.cpages, c.faults = 77, 88
    assert fd.ioctl(HMM_DMIRROR_READ, c) == -EFAULT
    assert (c.cpages, c.faults) == (77, 88)                                 # not copied back on error


def test_read_and_write_errors(m, p, fd):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    assert fd.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(a, None, 1)) == -EFAULT  # copy_to_user(ptr) fails
    assert fd.ioctl(HMM_DMIRROR_WRITE, HmmDmirrorCmd(a, None, 1)) == -EFAULT  # copy_from_user(ptr) fails
    big = (m.mem.nr_ram + 1)
    assert fd.ioctl(HMM_DMIRROR_READ, HmmDmirrorCmd(a, None, big)) == -ENOMEM  # the bounce buffer (vmalloc)
    r = p.mmap(PAGE_SIZE, "r")
    assert fd.ioctl(HMM_DMIRROR_WRITE, cmd(r, 1)) == -EPERM                 # §6.3
    p.munmap(a + PAGE_SIZE, PAGE_SIZE)
    c = cmd(a, 2)
    assert fd.ioctl(HMM_DMIRROR_READ, c) == -EFAULT                         # no VMA for page 1
    assert fd.ioctl(HMM_DMIRROR_SNAPSHOT, HmmDmirrorCmd(a, bytearray(2), 2)) == 0


def test_python_face_raises(p, fd):
    a = p.mmap(PAGE_SIZE, "none")
    with pytest.raises(KernelError) as exc:
        fd.read(a, 1)
    assert exc.value.errno_name == "EFAULT"


def test_user_memory_arguments(m, p, fd):
    """The command and the buffer in the process's memory: copy_from_user / copy_to_user are CPU accesses."""
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.write_bytes(a, b"device reads this")
    buf = p.mmap(2 * PAGE_SIZE, "rw")
    arg = p.mmap(PAGE_SIZE, "rw")
    p.write_bytes(arg, CMD_STRUCT.pack(a, buf, 2, 0, 0))
    assert fd.ioctl(HMM_DMIRROR_READ, arg) == 0
    assert p.read_bytes(buf, 17) == b"device reads this"
    assert CMD_STRUCT.unpack(p.read_bytes(arg, CMD_STRUCT.size))[3:] == (2, 1)   # cpages, faults copied back
    hole = p.mmap(PAGE_SIZE, "none")
    assert fd.ioctl(HMM_DMIRROR_READ, hole) == -EFAULT                     # the cmd is not readable


# --- the device page table and invalidation ------------------------------------------------------------------
def test_device_page_table():
    pt = DmirrorPageTable()
    pt.store(5, 0x1234, DPT_XA_TAG_WRITE)
    pt.store_range(510, np.array([(7 << 2), (8 << 2) | 3, (9 << 2)], dtype=np.uint64))   # crosses a chunk
    assert pt.load(5) == (0x1234 << 2) | 3 and pt.load(6) == 0
    assert pt.load_range(510, 3).tolist() == [7 << 2, (8 << 2) | 3, 9 << 2]
    assert len(pt) == 4 and len(pt.chunks) == 2
    assert pt.erase_range(511, 512) == 2                                   # inclusive bounds
    assert list(pt.items()) == [(5, 0x1234, 3), (510, 7, 0)]
    assert pt.erase_range(0, (1 << 52) - 1) == 2 and not pt.chunks


def test_invalidation_drops_the_page_at_end_too(p, fd):
    """§6.1: the erase covers [start >> 12, end >> 12], so the page at `end` goes as well."""
    a = p.mmap(8 * PAGE_SIZE, "rw")
    p.touch(a, 8 * PAGE_SIZE, write=True)
    fd.read(a, 8)
    assert len(fd.pt_entries()) == 8
    p.mprotect(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE, "r")                     # PROTECTION_VMA [a+2, a+4)
    left = [va for va, _, _ in fd.pt_entries()]
    assert left == [a, a + PAGE_SIZE] + [a + k * PAGE_SIZE for k in range(5, 8)]


def test_read_installs_write_tags_for_writable_ptes_and_zero_page_read_only(m, p, fd):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    fd.read(a, 2)
    (va0, pfn0, t0), (va1, pfn1, t1) = fd.pt_entries()
    assert t0 == "w" and (t1, pfn1) == ("r", m.mem.zero_pfn)               # §6.3


def test_faults_counts_rounds(p, fd):
    a = p.mmap(4 * PAGE_SIZE, "rw")
    assert fd.read(a, 4)[0].faults == 1                                     # fresh mirror
    assert fd.read(a, 4)[0].faults == 0                                     # pt already covers it
    assert fd.write(a, bytes(4 * PAGE_SIZE)).faults == 1                    # read-only entries: fault writable
    assert fd.write(a, bytes(4 * PAGE_SIZE)).faults == 0


def test_retry_bound_gives_ebusy(m, p, fd):
    """A WRITE over zero-page entries: the COW faults invalidate the range during hmm_range_fault, so the
    first pass ends in -EBUSY and is retried; with no retries allowed the loop returns -EBUSY (§5)."""
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.touch(a, 2 * PAGE_SIZE)                                              # zero pages
    fd.dmirror.max_retries = 0
    assert fd.ioctl(HMM_DMIRROR_WRITE, cmd(a, 2)) == -EBUSY
    assert m.counters["dmirror_timeouts"] == 1
    fd.dmirror.max_retries = 1000
    c = cmd(a, 2)
    assert fd.ioctl(HMM_DMIRROR_WRITE, c) == 0 and c.faults == 1


def test_two_devices_are_two_owners(p):
    f0, f1 = hmm_open(p, 0), hmm_open(p, 1)
    assert f0.dmirror.mdevice is not f1.dmirror.mdevice
    with pytest.raises(Exception):
        hmm_open(p, 2)                                                      # coherent units need SPM


def test_open_under_5_2_is_enoent():
    m = Machine("5.2", ram=64 << 20)
    with pytest.raises(KernelError) as exc:
        hmm_open(m.spawn("p"), 0)
    assert exc.value.errno_name == "ENOENT"


def test_release_removes_the_notifier(m, p, fd):
    a = p.mmap(PAGE_SIZE, "rw")
    fd.read(a, 1)
    fd.close()
    assert len(p.mm.notifier_subscriptions.itree) == 0
    p.munmap(a, PAGE_SIZE)
    assert not [e for e in m.events if e["what"] == "dmirror_invalidate" and e["event"] == "UNMAP"]


# --- a user's own driver ---------------------------------------------------------------------------------------
class DictMirror(IntervalNotifierDriver):
    """A minimal driver: its device page table is a dict va -> (pfn, writable)."""

    def __init__(self, mm):
        super().__init__(mm, "dictmirror.lock")
        self.table: dict[int, tuple[int, bool]] = {}
        self.invalidations = 0

    def invalidate(self, sub, r, cur_seq):
        yield from sched.mutex_lock(self.mutex)
        mmu_interval_set_seq(sub, cur_seq)
        for va in [v for v in self.table if r.start <= v < r.end]:
            del self.table[va]
        self.invalidations += 1
        sched.mutex_unlock(self.mutex)
        return True

    def program(self, range):  # noqa: A002
        n = (range.end - range.start) >> 12
        for i, e in enumerate(range.hmm_pfns[:n].tolist()):
            self.table[range.start + i * PAGE_SIZE] = (hmm_pfn_to_pfn(e), bool(e & HMM_PFN_WRITE))
        return 0

    def populate(self, start, end, write):
        pfns = np.zeros((end - start) >> 12, dtype=np.uint64)
        return (yield from self.range_fault(HmmRange(self.notifier, start, end, pfns,
                                                     default_flags=HMM_PFN_REQ_FAULT)))


def test_a_user_driver_plugs_in(m, p):
    drv = DictMirror(p.mm)
    assert sched.run(mmu_interval_notifier_insert(drv.notifier, p.mm, 0, 1 << 47, drv.notifier_ops), p.mm.task) == 0
    a = p.mmap(4 * PAGE_SIZE, "rw")
    p.touch(a, 4 * PAGE_SIZE, write=True)
    assert sched.run(drv.populate(a, a + 4 * PAGE_SIZE, False), p.mm.task) == 0
    assert len(drv.table) == 4 and all(w for _, w in drv.table.values())
    p.munmap(a, PAGE_SIZE)
    assert len(drv.table) == 3 and drv.invalidations == 1
    assert sched.run(drv.gc(), p.mm.task) == 0
