"""The device-memory ioctls of dmirror as scenario operations (hmmirror.scenario.dmirror_ops), the same op
names and result fields the guest's C player runs on a real kernel.

Expected values: lib/test_hmm.c and mm/migrate_device.c (device-memory.md): a migration reads the pages back
from the device (cpages); the snapshot of a page on the caller's device is DEV_PRIVATE_LOCAL|WRITE (0x22); a
CPU read brings a page back (0x02 again, the rest still 0x22); MIGRATE_TO_SYS counts the pages it moved;
CHECK_EXCLUSIVE is EPERM while the device holds an exclusive entry and 0 once the CPU took the page back;
GUP on a device page faults it back; RELEASE evicts; FLAGS does not exist in the 6.18 module (EINVAL).
"""

from __future__ import annotations

from hmmirror.mm.debug import check_counts
from hmmirror.scenario import parse, run

SCENARIO = """
title = "device memory through scenario ops"
[machine]
kernel = "6.18"
ram = "256M"
[[process]]
name = "p"
[[op]]
op = "mmap"
as = "buf"
length = "32K"
prot = "rw"
[[op]]
op = "touch"
addr = "buf"
length = "32K"
access = "write"
fill = "index32"
[[op]]
op = "dmirror_open"
[[op]]
op = "dmirror_migrate_to_dev"
addr = "buf"
length = "16K"
fill = "index32"
expect = { cpages = 4, bad_pages = 0 }
[[op]]
op = "dmirror_snapshot"
addr = "buf"
length = "32K"
expect = { snapshot = "22 22 22 22 02 02 02 02", cpages = 8 }
[[op]]
op = "touch"
addr = "buf+4K"
length = "4K"
[[op]]
op = "dmirror_snapshot"
addr = "buf"
length = "16K"
expect = { snapshot = "22 02 22 22" }
[[op]]
op = "dmirror_migrate_to_sys"
addr = "buf"
length = "16K"
expect = { cpages = 3 }
[[op]]
op = "dmirror_exclusive"
addr = "buf+16K"
length = "8K"
fill = "index32"
expect = { cpages = 2 }
[[op]]
op = "dmirror_check_exclusive"
addr = "buf+16K"
length = "8K"
expect = { errno = "EPERM" }
[[op]]
op = "touch"
addr = "buf+16K"
length = "8K"
[[op]]
op = "dmirror_check_exclusive"
addr = "buf+16K"
length = "8K"
[[op]]
op = "dmirror_migrate_to_dev"
addr = "buf+24K"
length = "8K"
expect = { cpages = 2 }
[[op]]
op = "gup_test"
addr = "buf+24K"
length = "4K"
cmd = "PIN_LONGTERM_BENCHMARK"
[[op]]
op = "dmirror_snapshot"
addr = "buf+24K"
length = "8K"
expect = { snapshot = "02 22" }
[[op]]
op = "dmirror_release"
[[op]]
op = "dmirror_snapshot"
addr = "buf+24K"
length = "8K"
expect = { snapshot = "02 02" }
[[op]]
op = "dmirror_flags"
flags = 1
expect = { errno = "EINVAL" }
[[op]]
op = "dmirror_read"
addr = "buf"
length = "32K"
fill = "index32"
expect = { cpages = 8, bad_pages = 0 }
"""


def test_device_scenario_ops():
    r = run(parse(SCENARIO, "device.toml"))
    bad = [(x.index, x.op, x.mismatches, x.note, x.errno) for x in r.records if x.expect_ok is False or x.bug]
    assert not bad
    assert r.ok
    assert check_counts(r.machine) == []
