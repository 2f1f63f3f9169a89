"""DAX mirrored through dmirror on 6.18 — tests the kernel's hmm-tests.c lacks.

Expected bytes are the spec's derived expectations (hmm-modern.md §6.4 and the end of §7: "an fsdax PMD
installed by a read fault snapshots 0x05, after a write fault 0x06; an fsdax PTE hole read snapshots 0x11;
device-dax PMD/PUD mappings snapshot 0x05/0x06, 0x09/0x0A"), with the entry permissions of mm-substrate.md
§5.7 (fsdax: write-notify, read faults map read-only) and §5.8 (device-dax: vm_page_prot, a read fault of a
shared writable mapping is already writable).  They are model hypotheses for a real-kernel check.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE

pytest.importorskip("hmmirror.fs.dax", reason="the fsdax substrate (fs/dax.py) is not in the model yet")
pytest.importorskip("hmmirror.drivers.dax.device", reason="device-dax (drivers/dax) is not in the model yet")

from hmmirror.drivers.test_hmm import hmm_open  # noqa: E402

READ, WRITE, PMD, PUD, ZERO = 0x01, 0x02, 0x04, 0x08, 0x10


@pytest.fixture
def fsdax():
    m = Machine("6.18", ram=256 << 20)
    m.add_pmem("pmem0", 1 << 30, "fsdax")
    m.mount("/mnt/pmem0", "ext4", dax="pmem0")
    m.create_file("/mnt/pmem0/data", 8 << 20, "data")
    m.create_file("/mnt/pmem0/hole", 8 << 20, "sparse")
    p = m.spawn("p")
    return m, p, hmm_open(p, 0)


def test_fsdax_pte(fsdax):
    """A mapping whose VA and file offset are not congruent mod 2 MiB gets PTEs (§5.7)."""
    m, p, fd = fsdax
    a = p.mmap(PMD_SIZE, "rw", ["shared"], file="/mnt/pmem0/data", offset=PAGE_SIZE, align=PMD_SIZE)
    p.touch(a, 4 * PAGE_SIZE)                                   # read faults: read-only (write-notify)
    p.touch(a + 4 * PAGE_SIZE, 4 * PAGE_SIZE, write=True)       # write faults: writable
    snap = fd.snapshot(a, 12)
    assert list(snap) == [READ] * 4 + [WRITE] * 4 + [0x00] * 4
    # Through the device: a device write faults the read-only pages writable (pfn_mkwrite) and the CPU
    # sees the data in the pmem pages.
    data = np.arange(8 * PAGE_SIZE // 4, dtype="<i4").tobytes()
    cmd = fd.write(a, data)
    assert (cmd.cpages, cmd.faults) == (8, 1)
    assert p.read_bytes(a, 8 * PAGE_SIZE) == data
    assert list(fd.snapshot(a, 8)) == [WRITE] * 8
    cmd, got = fd.read(a, 8)
    assert got == data and cmd.faults == 0                      # the device page table already covers it


def test_fsdax_pte_hole_reads_the_zero_page(fsdax):
    m, p, fd = fsdax
    a = p.mmap(PMD_SIZE, "rw", ["shared"], file="/mnt/pmem0/hole", offset=PAGE_SIZE, align=PMD_SIZE)
    p.touch(a, PAGE_SIZE)
    assert list(fd.snapshot(a, 2)) == [ZERO | READ, 0x00]        # 0x11: the 4 KiB zero page (§7 derived)
    cmd, got = fd.read(a + PAGE_SIZE, 1)                         # READ faults the hole read-only too
    assert (cmd.cpages, cmd.faults) == (1, 1) and got == bytes(PAGE_SIZE)
    assert list(fd.snapshot(a, 2)) == [ZERO | READ, ZERO | READ]


def test_fsdax_pmd(fsdax):
    m, p, fd = fsdax
    a = p.mmap(2 * PMD_SIZE, "rw", ["shared"], file="/mnt/pmem0/data", align=PMD_SIZE)
    p.touch(a, PAGE_SIZE)                                        # read fault: devmap-less PMD, read-only
    p.touch(a + PMD_SIZE, PAGE_SIZE, write=True)                 # write fault: writable PMD
    snap = fd.snapshot(a, 1024)
    assert set(snap[:512]) == {READ | PMD}                       # 0x05
    assert set(snap[512:]) == {WRITE | PMD}                      # 0x06
    # A device write to the read-only PMD upgrades it in place; the snapshot then reads 0x06.
    cmd = fd.write(a, bytes([7]) * PAGE_SIZE)
    assert cmd.faults == 1
    assert set(fd.snapshot(a, 512)) == {WRITE | PMD}
    assert p.read_bytes(a, 4) == bytes([7]) * 4


def test_fsdax_pmd_hole_is_the_huge_zero_page(fsdax):
    m, p, fd = fsdax
    a = p.mmap(PMD_SIZE, "r", ["shared"], file="/mnt/pmem0/hole", align=PMD_SIZE)
    p.touch(a, PAGE_SIZE)
    assert set(fd.snapshot(a, 512)) == {READ | PMD}              # 0x05: the huge zero page is not ZERO (§6.4)


@pytest.mark.parametrize("align,prot,want", [
    (PMD_SIZE, "rw", WRITE | PMD),                               # 0x06
    (PMD_SIZE, "r", READ | PMD),                                 # 0x05
    (PUD_SIZE, "rw", WRITE | PUD),                               # 0x0A
    (PUD_SIZE, "r", READ | PUD),                                 # 0x09
], ids=["pmd-rw", "pmd-r", "pud-rw", "pud-r"])
def test_device_dax(align, prot, want):
    m = Machine("6.18", ram=256 << 20)
    m.add_pmem("pmem1", 2 << 30, "devdax", align=align)
    p = m.spawn("p")
    fd = hmm_open(p, 0)
    a = p.mmap(align, prot, ["shared"], file="/dev/dax1.0", align=align)
    p.touch(a, PAGE_SIZE)
    assert set(fd.snapshot(a, 512)) == {want}
    if prot == "rw":
        data = bytes(range(256)) * 16
        cmd = fd.write(a + 3 * PAGE_SIZE, data)
        assert (cmd.cpages, cmd.faults) == (1, 1)
        assert p.read_bytes(a + 3 * PAGE_SIZE, PAGE_SIZE) == data
    else:
        assert fd.ioctl("WRITE", _cmd(a, 1)) == -1               # -EPERM: no VM_WRITE (§4.4)


def test_device_dax_pud_read_through_the_device():
    m = Machine("6.18", ram=256 << 20)
    m.add_pmem("pmem1", 2 << 30, "devdax", align=PUD_SIZE)
    p = m.spawn("p")
    fd = hmm_open(p, 0)
    a = p.mmap(PUD_SIZE, "rw", ["shared"], file="/dev/dax1.0", align=PUD_SIZE)
    p.write_bytes(a + 5 * PAGE_SIZE, b"pud leaf")
    cmd, got = fd.read(a, 8)                                     # the PUD leaf is reported, never split
    assert (cmd.cpages, cmd.faults) == (8, 1)
    assert got[5 * PAGE_SIZE:5 * PAGE_SIZE + 8] == b"pud leaf"
    assert p.mm.pt.lookup(a)[0] == "pud"


def _cmd(addr: int, npages: int):
    from hmmirror.drivers.test_hmm import HmmDmirrorCmd

    return HmmDmirrorCmd(addr, bytearray(npages * PAGE_SIZE), npages)
