"""The device-memory profile fields, each way (profiles.py): the 6.12 behaviour of do_swap_page (no page lock
around migrate_to_ram), make_device_exclusive_range (the exclusive entry drops its rmap but keeps the
reference), dmirror release evicting the device's pages, and the FLAGS ioctl of the 2026 driver.

The 6.12 profile itself is added by another change (fidelity); these tests run the 6.18 profile with the
device fields switched to their 6.12 values, so each field's branch is exercised whatever the profile list.
Expected values: mm/memory.c do_swap_page and mm/rmap.c make_device_exclusive_range of 6.12, lib/test_hmm.c.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, SwpType, pte_to_swp_entry
from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open
from hmmirror.mm.debug import check_counts
from hmmirror.mm.page_alloc import PG
from hmmirror.profiles import V6_18

N = 8
OLD_DEVICE = dataclasses.replace(V6_18, name="6.18-with-6.12-device-fields", do_swap_page_device_lock=False,
                                 make_device_exclusive_single=False, dmirror_release_evicts=True)


def data(n: int = N) -> bytes:
    return np.arange(n * PAGE_SIZE // 4, dtype="<i4").tobytes()


def entry(p, addr):
    return p.mm.pt.lookup(addr)[2]


def test_fault_back_without_the_page_lock():
    """[6.12] do_swap_page takes only a reference; migrate_vma_collect_pmd() trylocks the fault page itself
    and finalize unlocks it: the page comes back, nothing stays locked."""
    m = Machine(OLD_DEVICE, ram=256 << 20)
    p = m.spawn("p")
    fd = hmm_open(p, 0)
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, data())
    assert fd.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(a, bytearray(N * PAGE_SIZE), N)) == 0
    dpage = pte_to_swp_entry(entry(p, a)).offset
    assert p.read_bytes(a, N * PAGE_SIZE) == data()
    assert not m.mem.flags[dpage] & PG.locked and int(m.mem.refcount[dpage]) == 0
    assert m.counters["do_swap_page_device_locked"] == 0
    assert check_counts(m) == []


def test_exclusive_range_drops_the_rmap():
    """[6.12] make_device_exclusive_range(): the entry holds the reference, not the mapcount; the CPU access
    restores both."""
    m = Machine(OLD_DEVICE, ram=256 << 20)
    p = m.spawn("p")
    fd = hmm_open(p, 0)
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, data())
    pfn = x86.pte_pfn(entry(p, a))
    buf = bytearray(N * PAGE_SIZE)
    cmd = HmmDmirrorCmd(a, buf, N)
    assert fd.ioctl("EXCLUSIVE", cmd) == 0 and cmd.cpages == N and bytes(buf) == data()
    assert pte_to_swp_entry(entry(p, a)).type == SwpType.SWP_DEVICE_EXCLUSIVE
    assert (int(m.mem.refcount[pfn]), int(m.mem.mapcount[pfn])) == (1, 0)
    assert check_counts(m) == []
    assert p.read_bytes(a, 4) == data()[:4]
    assert x86.pte_pfn(entry(p, a)) == pfn and (int(m.mem.refcount[pfn]), int(m.mem.mapcount[pfn])) == (1, 1)
    assert check_counts(m) == []
    p.munmap(a, N * PAGE_SIZE)                                 # zap of the remaining exclusive entries
    assert check_counts(m) == []


def test_release_evicts_the_device():
    """dmirror_fops_release() of 6.12.y migrates every page of the device back (the 6.15-6.18 module leaves
    them: ``dmirror_release_evicts`` False, checked on the 6.18 profile)."""
    for prof, evicted in ((OLD_DEVICE, True), (V6_18, False)):
        m = Machine(prof, ram=256 << 20)
        p = m.spawn("p")
        fd = hmm_open(p, 0)
        a = p.mmap(N * PAGE_SIZE, "rw")
        p.write_bytes(a, data())
        assert fd.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(a, bytearray(N * PAGE_SIZE), N)) == 0
        fd.close()
        assert x86.pte_present(entry(p, a)) == evicted
        assert p.read_bytes(a, N * PAGE_SIZE) == data()        # either way the CPU gets its data
        assert check_counts(m) == []


def test_flags_fail_alloc():
    """The 2026 driver's HMM_DMIRROR_FLAGS: FAIL_ALLOC makes the next device allocation fail once; with 4 KiB
    pages that page stays in system memory, so the read-back stops there (-ENOENT)."""
    prof = dataclasses.replace(V6_18, name="6.18-with-flags", dmirror_flags_ioctl=True)
    m = Machine(prof, ram=256 << 20)
    p = m.spawn("p")
    fd = hmm_open(p, 0)
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, data())
    assert fd.ioctl("FLAGS", HmmDmirrorCmd(a, None, 1)) == 0
    cmd = HmmDmirrorCmd(a, bytearray(N * PAGE_SIZE), N)
    assert fd.ioctl("MIGRATE_TO_DEV", cmd) == -2
    assert x86.pte_present(entry(p, a))                          # the first page did not move
    assert pte_to_swp_entry(entry(p, a + PAGE_SIZE)).type == SwpType.SWP_DEVICE_PRIVATE_WRITE
    assert fd.dmirror.flags == 0                                 # one-shot
    assert check_counts(m) == []


def test_the_6_12_profile_has_these_values():
    """The 6.12 profile (the guest's kernel) carries the device fields the tests above switch on."""
    from hmmirror.profiles import get_profile

    p = get_profile("6.12")
    assert (p.device_private_free_at_zero, p.do_swap_page_device_lock, p.make_device_exclusive_single,
            p.dmirror_release_evicts, p.dmirror_flags_ioctl) == (True, False, False, True, False)
