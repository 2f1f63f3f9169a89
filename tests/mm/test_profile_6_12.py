"""The 6.12 profile (Debian 13's LTS kernel): where it differs from 6.18.

Expected values: the 6.12.118 sources (linux-source-6.12) and what the test_hmm guest measured on that
kernel (TEAM.md log of the guest helper; tests/live/test_guest_*.py run it).
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.profiles import get_profile

PAGE = 4096


def test_profile_names() -> None:
    assert get_profile("6.12").name == get_profile("v6.12").name == "6.12"
    assert Machine("6.12", ram=64 << 20).profile.hmm_module == "hmmirror.mm.hmm.modern"


def test_pmd_exclusive_reads_each_subpage() -> None:
    # fs/proc/task_mmu.c pagemap_pmd_range (6.12): folio_precise_page_mapcount(folio, page + idx) == 1
    m = Machine("6.12", ram=256 << 20)
    p = m.spawn()
    a = p.mmap(PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, PAGE, write=True)
    c = p.fork("c")
    c.touch(a, PAGE, write=True)
    parent = p.inspect(a, PMD_SIZE)
    assert all(s.level == "pmd" for s in parent)
    assert [s.exclusive for s in parent] == [True] + [False] * 511


def test_ext4_has_no_large_folios_but_xfs_has() -> None:
    # guest (6.12.118): a write fault on an ext4 file written with one pwrite maps only that page; xfs has had
    # large folios since 5.18, but 6.12 fault-around maps only the window and finish_fault one page
    for fstype, want in (("ext4", [0]), ("xfs", [0])):
        m = Machine("6.12", ram=256 << 20)
        m.mount("/mnt/e", fstype)
        m.create_file("/mnt/e/f", 32 * PAGE)
        p = m.spawn()
        a = p.mmap(32 * PAGE, "rw", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
        p.touch(a, PAGE, write=True)
        assert [i for i, s in enumerate(p.inspect(a, 32 * PAGE)) if s.present] == want, fstype
    m = Machine("6.12", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 32 * PAGE)
    assert m.files["/mnt/e/f"].i_mapping.folio_order is None


def test_fsdax_pagemap_bits() -> None:
    # guest (6.12.118): fs-DAX PTE leaves read neither PM_FILE nor exclusive (devmap PTEs are special,
    # vm_normal_page() is NULL); fs-DAX PMD leaves read PM_FILE and not exclusive (DAX is not mapcounted)
    m = Machine("6.12", ram=256 << 20)
    m.add_pmem("pmem0", 64 << 20, "fsdax")
    m.mount("/mnt/d", "ext4", dax="pmem0")
    m.create_file("/mnt/d/f", 4 << 20, "zero")
    p = m.spawn()
    a = p.mmap(4 << 20, "rw", ["shared"], file="/mnt/d/f", align=PMD_SIZE)
    p.touch(a, PAGE, write=True)                                   # a PMD (the block is allocated)
    pmd = p.inspect(a, PAGE)[0]
    assert pmd.level == "pmd" and pmd.file and not pmd.exclusive
    b = p.mmap(16 * PAGE, "rw", ["shared"], file="/mnt/d/f", offset=PMD_SIZE + 4 * PAGE)
    p.touch(b, PAGE, write=True)                                   # a PTE: the VMA cannot hold a PMD
    pte = p.inspect(b, PAGE)[0]
    assert pte.level == "pte" and pte.kind == "devmap" and not pte.file and not pte.exclusive
