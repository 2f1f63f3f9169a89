"""End to end: the seed's paths through real mmap + faults on the DAX substrate [5.2].

fsdax PTE and PMD devmap entries (ext4 -o dax), device-dax PUD (1 GiB) leaves, hugetlbfs with page_shift.
Expected values: hmm-5.2.md §13 (VALID always, WRITE per the CPU entry, pfn = the CPU entry's pfn + index),
§8 (every get_dev_pagemap reference put again), mm-substrate.md §5.7-§5.9 (which entries the faults install:
fsdax read faults map read-only under write-notify, device-dax maps writable from vm_page_prot, device-dax
pfns follow the file offset linearly, hugetlb private read faults map read-only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import (  # noqa: E402
    G1,
    K,
    M2,
    NONE,
    VALID,
    WRITE,
    ent,
    fault,
    new_registered_range,
    out,
    snapshot,
)
from hmmirror import Machine  # noqa: E402
from hmmirror.errors import ModelBug  # noqa: E402

pytest.importorskip("hmmirror.drivers.nvdimm.pmem", reason="pmem driver (DAX substrate) not available yet")
pytest.importorskip("hmmirror.fs.dax", reason="fsdax (DAX substrate) not available yet")
pytest.importorskip("hmmirror.drivers.dax.device", reason="device-dax (DAX substrate) not available yet")


def fsdax_machine():
    m = Machine("5.2", ram=256 << 20)
    m.add_pmem("pmem0", 64 << 20, "fsdax")
    m.mount("/mnt", "ext4", dax="pmem0")
    return m, m.pgmaps[0]


def cpu_entries(p, start, n):
    return [(s.pfn, bool(s.write), s.level, s.kind) for s in p.inspect(start, n * K)]


def test_fsdax_pte_devmap_entries() -> None:
    m, pg = fsdax_machine()
    m.create_file("/mnt/small", 4 * K)
    p = m.spawn("p")
    a = p.mmap(4 * K, "rw", ["shared"], file="/mnt/small")
    p.touch(a, K)                                              # read: read-only devmap PTE (write-notify)
    p.touch(a + K, K, write=True)                              # write: writable devmap PTE
    r = new_registered_range(p.mm, a, a + 4 * K)
    before = pg.count
    assert snapshot(p.mm, r) == 4
    cpu = cpu_entries(p, a, 2)
    assert [c[2:] for c in cpu] == [("pte", "devmap")] * 2
    assert out(r) == [ent(cpu[0][0]), ent(cpu[1][0], write=True), NONE, NONE]
    assert pg.count == before
    # fault mode, read requests for every page (default_flags, hmm.rst): pages 2-3 are faulted in
    ret = fault(p.mm, r, default_flags=VALID, mask=0)
    assert ret == 4
    cpu = cpu_entries(p, a, 4)
    assert all(c[2:] == ("pte", "devmap") and pg.covers(c[0]) for c in cpu)
    assert out(r) == [ent(c[0], write=c[1]) for c in cpu]
    assert [c[1] for c in cpu] == [False, True, False, False]
    assert r.stats["faults"] == 2 and pg.count == before
    # the lock context of handle_mm_fault: mmap_sem (read) only, not atomic
    ev = [e for e in m.events if e["what"] == "may_sleep" and e["call"] == "handle_mm_fault"][-1]
    assert ev["locks"] == [f"rwsem:{p.mm.mmap_sem.name}"] and ev["atomic"] == 0
    # a write request on the read-only page 0: write fault (pfn_mkwrite), same pfn, now writable
    pfn0 = cpu[0][0]
    ret = fault(p.mm, r, request=[VALID | WRITE, 0, 0, 0])
    assert ret == 4 and out(r)[0] == ent(pfn0, write=True)
    assert pg.count == before


def test_fsdax_pmd_devmap_entries() -> None:
    m, pg = fsdax_machine()
    m.create_file("/mnt/big", M2)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["shared"], file="/mnt/big", align=M2)
    p.touch(a, K)                                              # read: read-only devmap PMD
    start = a + 508 * K
    r = new_registered_range(p.mm, start, start + 4 * K)
    before = pg.count
    tries = pg.ref.stats["tryget_live"]
    assert snapshot(p.mm, r) == 4
    base = p.inspect(a, K)[0]
    assert (base.level, base.kind, base.write) == ("pmd", "devmap", False) and pg.covers(base.pfn)
    assert out(r) == [ent(base.pfn + 508 + k) for k in range(4)]      # pmd_pfn + pte_index(addr)
    assert pg.count == before and pg.ref.stats["tryget_live"] == tries + 1
    ret = fault(p.mm, r, request=VALID | WRITE)
    assert ret == 4
    after = p.inspect(a, K)[0]
    assert (after.pfn, after.level, after.write) == (base.pfn, "pmd", True)
    assert out(r) == [ent(base.pfn + 508 + k, write=True) for k in range(4)]
    assert pg.count == before


def devdax(size=2 * G1, prot="rw"):
    m = Machine("5.2", ram=256 << 20)
    m.add_pmem("pmem0", size, "devdax", align=G1)
    p = m.spawn("p")
    a = p.mmap(size, prot, ["shared"], file="/dev/dax0.0", align=G1)
    return m, p, a, m.pgmaps[0]


def test_devdax_pud_range_in_the_middle() -> None:
    m, p, a, pg = devdax()
    p.touch(a, K)
    s = p.inspect(a, K)[0]
    assert (s.level, s.kind, s.write, s.pfn) == ("pud", "devmap", True, pg.res.start)
    start = a + (512 << 20) + 8 * K
    r = new_registered_range(p.mm, start, start + 16 * K)
    before = pg.count
    off = (start - a) >> 12
    assert snapshot(p.mm, r) == 16
    assert out(r) == [ent(pg.res.start + off + k, write=True) for k in range(16)]
    assert fault(p.mm, r, request=VALID | WRITE) == 16
    assert out(r) == [ent(pg.res.start + off + k, write=True) for k in range(16)]
    assert pg.count == before and r.stats["faults"] == 0


def test_devdax_pud_none_hole_then_fault() -> None:
    m, p, a, pg = devdax()
    p.touch(a, K)                                              # PUD 0 only
    start = a + G1 - 2 * K
    r = new_registered_range(p.mm, start, start + 4 * K)
    before = pg.count
    assert snapshot(p.mm, r) == 2                              # PUD 1 none: NONE, last = hole start
    d = pg.res.start
    assert out(r) == [ent(d + 262142, write=True), ent(d + 262143, write=True), NONE, NONE]
    # fault: pte_hole at the PUD level (no lock held) faults PUD 1 in, then the walk restarts there
    assert fault(p.mm, r, default_flags=VALID, mask=0) == 4
    assert out(r) == [ent(d + 262142 + k, write=True) for k in range(4)]
    assert p.inspect(a + G1, K)[0].level == "pud"
    assert pg.count == before


def test_devdax_readonly_pud_write_request_sleeps_in_atomic() -> None:
    m, p, a, pg = devdax(size=G1, prot="r")
    p.touch(a, K)
    assert p.inspect(a, K)[0].write is False
    r = new_registered_range(p.mm, a, a + 2 * K)
    assert fault(p.mm, r, request=VALID) == 2                  # read: no fault needed
    with pytest.raises(ModelBug) as exc:
        fault(p.mm, r, request=VALID | WRITE)                  # hole path under the PUD lock
    assert exc.value.kind == "sleep_in_atomic"


def test_hugetlb_page_shift_end_to_end() -> None:
    m = Machine("5.2", ram=256 << 20, hugepages_2m=4)
    p = m.spawn("p")
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"], align=M2)
    p.touch(a, K)                                              # huge page 0: read fault, read-only
    r = new_registered_range(p.mm, a, a + 2 * M2, shift=21)
    assert snapshot(p.mm, r) == 1024
    h0 = p.inspect(a, K)[0]
    assert (h0.level, h0.kind, h0.write) == ("pmd", "hugetlb", False)
    assert out(r) == [ent(h0.pfn), ent(0)]                     # none hugetlb entry: from_pfn(0) | 0
    # fault: huge page 1 is none -> hole path with the huge step: one fault for the whole huge page
    assert fault(p.mm, r, request=VALID) == 1024
    h1 = p.inspect(a + M2, K)[0]
    assert out(r) == [ent(h0.pfn), ent(h1.pfn)]
    assert r.stats["faults"] == 1

