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


def test_write_to_huge_zero_pmd_splits_and_copies_one_page() -> None:
    # 6.12.118 mm/huge_memory.c do_huge_pmd_wp_page(): `if (is_huge_zero_pmd(orig_pmd)) goto fallback` ->
    # __split_huge_pmd() + VM_FAULT_FALLBACK; the PTE write fault then copies only the written page (guest:
    # 511 zero-page PTEs and one 4 KiB anonymous page).  6.18 (do_huge_zero_wp_pmd) maps a new THP instead.
    for kernel, want_huge in (("6.12", False), ("6.18", True)):
        m = Machine(kernel, ram=256 << 20)
        p = m.spawn()
        a = p.mmap(PMD_SIZE, align=PMD_SIZE)
        p.madvise(a, PMD_SIZE, "hugepage")
        p.touch(a, 1)
        assert all(s.zero and s.level == "pmd" for s in p.inspect(a, PMD_SIZE)), kernel
        p.touch(a + 7 * PAGE, 1, write=True)
        st = p.inspect(a, PMD_SIZE)
        if want_huge:
            assert all(s.kind == "anon" and s.level == "pmd" for s in st)
        else:
            assert [i for i, s in enumerate(st) if not s.zero] == [7]
            assert st[7].kind == "anon" and st[7].level == "pte" and st[7].write
            assert all(s.kind == "zero" and s.level == "pte" and s.present for i, s in enumerate(st) if i != 7)


def _cold_read(kernel: str, file_pages: int, touches: list[int]) -> list[int]:
    m = Machine(kernel, ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", file_pages * PAGE, cached=False)
    p = m.spawn()
    a = p.mmap(file_pages * PAGE, "rw", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    for t in touches:
        p.touch(a + t * PAGE, 1)
    return [i for i, s in enumerate(p.inspect(a, file_pages * PAGE)) if s.present]


def test_cold_read_fault_around_skips_the_readahead_mark() -> None:
    # 6.12.118 mm/filemap.c do_sync_mmap_readahead(): read-around start = pgoff - ra_pages/2, size ra_pages
    # (32), async ra_pages/4 (8); page_cache_ra_unbounded() sets PG_readahead on start + nr - 8 and
    # next_uptodate_folio() skips it.  Guest (examples/file_faultaround.toml): a read of page 20 of a 1 MiB
    # ext4 file maps 16-31 except 28 (start 4, mark 28).  Host 6.18.44 maps all of 16-31.
    assert _cold_read("6.12", 256, [20]) == [i for i in range(16, 32) if i != 28]
    assert _cold_read("6.18", 256, [20]) == list(range(16, 32))
    # near EOF do_page_cache_ra() clamps the read to the last page: 24 pages, fault 20 -> start 4, nr 20,
    # mark 4 + 20 - 8 = 16
    assert _cold_read("6.12", 24, [20]) == list(range(17, 24))
    # a read fault on the marked page clears PG_readahead (page_cache_async_ra) and maps it
    assert _cold_read("6.12", 256, [20, 28]) == list(range(16, 32))


def test_write_to_a_shared_page_of_a_large_anon_folio_always_copies() -> None:
    # 6.12.118 mm/memory.c wp_can_reuse_anon_folio(): `if (folio_test_large(folio)) return false;` -- a page
    # of a PTE-mapped THP that is not AnonExclusive is copied even when this mm maps the folio alone
    m = Machine("6.12", ram=256 << 20)
    p = m.spawn()
    a = p.mmap(PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, PMD_SIZE, write=True)
    c = p.fork("c")
    p.touch(a + 300 * PAGE, PAGE, write=True)          # splits the parent's PMD, copies page 300
    c.exit()
    before = p.inspect(a + 150 * PAGE, PAGE)[0].pfn
    p.touch(a + 150 * PAGE, PAGE, write=True)
    assert p.inspect(a + 150 * PAGE, PAGE)[0].pfn != before
