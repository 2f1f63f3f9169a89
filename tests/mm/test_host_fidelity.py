"""The model errors the host cross-check found (issue 12), as model-only tests.

Expected values are the host kernel's (6.18.44, CONFIG_PAGE_MAPCOUNT=y), observed by the live tests in
tests/live/test_live_fidelity.py, which run the same scenarios on the real kernel; these run everywhere.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE

PAGE = 4096


def _thp_fork(kernel: str) -> tuple[list, list]:
    m = Machine(kernel, ram=256 << 20)
    m.thp.enabled = "madvise"
    p = m.spawn()
    a = p.mmap(PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, PAGE, write=True)
    c = p.fork("c")
    c.touch(a, PAGE, write=True)
    return p.inspect(a, PMD_SIZE), c.inspect(a, PMD_SIZE)


def test_pmd_exclusive_reads_head_page_6_18() -> None:
    # error 1: the parent's PMD (the child maps 511 of its pages by PTEs) reads the head page's mapcount
    parent, child = _thp_fork("6.18")
    assert all(s.level == "pmd" for s in parent)
    assert all(s.exclusive for s in parent)
    assert child[0].exclusive and not any(s.exclusive for s in child[1:])


def test_pte_exclusive_of_large_file_folio_is_per_page() -> None:
    # error 1, PTE side: a page the other mm dropped is exclusive though its folio is mapped there too
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 32 * PAGE)
    p = m.spawn()
    a = p.mmap(32 * PAGE, "r", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    p.touch(a, PAGE)
    c = p.fork("c")
    c.touch(a, PAGE)
    c.madvise(a, 8 * PAGE, "dontneed")
    st = p.inspect(a, 32 * PAGE)
    assert all(s.present for s in st)
    assert [s.exclusive for s in st] == [True] * 8 + [False] * 24


# (pages in the file, pages touched, pages mapped, first and last mapped page, PMD): errors 2 and 3, seen on
# 6.18.44 for a file written with one pwrite (its folios: 32 -> [32]; 48 -> [32, 16]; 42 -> [32, 8, 2];
# 256 -> [256]; 1024 -> [512, 512]) mapped 2 MiB-aligned, shared, read-only.
FILE_CASES = [
    (32, [0], None, (0, 31), False),
    (48, [0], None, (0, 31), False),
    (48, [40], None, (32, 47), False),
    (42, [41], None, (32, 41), False),
    (256, [8], 16, (8, 8), False),
    (256, [8, 3], 16, (0, 15), False),
    (1024, [0], None, (0, 511), True),
    (1024, [600], None, (512, 1023), True),
]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: f"{c[0]}p-touch{'-'.join(map(str, c[1]))}")
def test_file_faults_on_large_folios(fstype: str, case: tuple) -> None:
    npages, touches, map_pages, (lo, hi), pmd = case
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", fstype)
    m.create_file("/mnt/e/f", npages * PAGE)
    p = m.spawn()
    n = map_pages or npages
    a = p.mmap(n * PAGE, "r", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    for t in touches:
        p.touch(a + t * PAGE)
    st = p.inspect(a, n * PAGE)
    assert [i for i, s in enumerate(st) if s.present] == list(range(lo, hi + 1))
    assert all((s.level == "pmd") == pmd for s in st if s.present)


def test_finish_fault_maps_one_page_of_a_partly_mapped_folio() -> None:
    # error 2: finish_fault maps the whole folio only if all its PTEs are none (pte_range_none), else one
    # page.  A shared write fault skips fault-around: after DONTNEED of pages 0-3 of a 32-page folio whose
    # other pages stay mapped, a write to page 1 maps page 1 alone.
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 32 * PAGE)
    p = m.spawn()
    a = p.mmap(32 * PAGE, "rw", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    p.touch(a)
    assert all(s.present for s in p.inspect(a, 32 * PAGE))
    p.madvise(a, 4 * PAGE, "dontneed")
    p.touch(a + PAGE, write=True)
    assert [i for i, s in enumerate(p.inspect(a, 4 * PAGE)) if s.present] == [1]


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
@pytest.mark.parametrize("share", ["shared", "private"])
def test_madv_pageout_unmaps_file_pages(fstype: str, share: str) -> None:
    # error 5 (6.18.44, no swap): MADV_PAGEOUT unmaps the file pages of the range (clean, dirty, shmem);
    # a private COW copy and anonymous memory stay; clean disk-file pages leave the page cache
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", fstype)
    m.create_file("/mnt/e/f", 16 * PAGE)
    p = m.spawn()
    a = p.mmap(16 * PAGE, "rw", [share], file="/mnt/e/f")
    p.touch(a)
    p.touch(a + 3 * PAGE, write=True)
    b = p.mmap(4 * PAGE)
    p.touch(b, 4 * PAGE, write=True)
    assert all(s.present for s in p.inspect(a, 16 * PAGE))
    assert p.madvise(a, 16 * PAGE, "pageout") == 0 and p.madvise(b, 4 * PAGE, "pageout") == 0
    st = p.inspect(a, 16 * PAGE)
    assert [i for i, s in enumerate(st) if s.present] == ([3] if share == "private" else [])
    assert all(s.present for s in p.inspect(b, 4 * PAGE))


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "tmpfs"])
@pytest.mark.parametrize("dirty", [False, True])
def test_madv_pageout_reclaims_clean_file_folios(fstype: str, dirty: bool) -> None:
    # error 5 (6.18.44, mincore after MADV_PAGEOUT): a clean disk-file folio is dropped from the page cache;
    # a dirty one (the 16-page file is one folio) and shmem stay cached
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", fstype)
    m.create_file("/mnt/e/f", 16 * PAGE)
    p = m.spawn()
    a = p.mmap(16 * PAGE, "rw", ["shared"], file="/mnt/e/f")
    p.touch(a, PAGE, write=dirty)
    assert p.madvise(a, 16 * PAGE, "pageout") == 0
    assert not any(s.present for s in p.inspect(a, 16 * PAGE))
    cached = m.files["/mnt/e/f"].i_mapping.cached_indices().tolist()
    assert cached == ([] if fstype != "tmpfs" and not dirty else list(range(16)))


@pytest.mark.parametrize("new", [40 * PAGE, 42 * PAGE + 100])
def test_truncate_through_a_large_folio_unmaps_it(new: int) -> None:
    # error 6 (6.18.44): a 48-page file is folios [0,32) [32,48); truncating inside the second splits it,
    # which unmaps all its pages, those below the new EOF too; [0,32) stays mapped
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 48 * PAGE)
    p = m.spawn()
    a = p.mmap(48 * PAGE, "r", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    p.touch(a, 48 * PAGE)
    assert all(s.present for s in p.inspect(a, 48 * PAGE))
    m.truncate("/mnt/e/f", new)
    assert [i for i, s in enumerate(p.inspect(a, 48 * PAGE)) if s.present] == list(range(32))
    # 6.18 splits at the EOF page: the part below stays cached as folios of the largest aligned orders
    mapping = m.files["/mnt/e/f"].i_mapping
    assert mapping.folio_span(33) == (32, 40)
    assert mapping.find_page(39) >= 0 and mapping.find_page(43) < 0


@pytest.mark.parametrize("kind", ["tmpfs-data", "tmpfs-sparse", "shared-anon"])
def test_madv_collapse_of_shmem_ignores_shmem_enabled_never(kind: str) -> None:
    # error 4 (6.18.44, shmem_enabled=never, tmpfs huge=never): MADV_COLLAPSE succeeds and PMD-maps the
    # block (512 present pages, one folio), holes filled
    m = Machine("6.18", ram=256 << 20)
    m.thp.shmem_enabled = "never"
    p = m.spawn()
    if kind == "shared-anon":
        a = p.mmap(PMD_SIZE, "rw", ["shared", "anonymous"], align=PMD_SIZE)
    else:
        m.mount("/mnt/t", "tmpfs", huge="never")
        m.create_file("/mnt/t/f", PMD_SIZE, "data" if kind == "tmpfs-data" else "sparse")
        a = p.mmap(PMD_SIZE, "rw", ["shared"], file="/mnt/t/f", align=PMD_SIZE)
    p.touch(a)
    p.touch(a + 5 * PAGE)
    assert not any(s.level == "pmd" for s in p.inspect(a, PMD_SIZE))
    assert p.madvise(a, PMD_SIZE, "collapse") == 0
    st = p.inspect(a, PMD_SIZE)
    assert all(s.present and s.level == "pmd" and s.kind == "shmem" for s in st)
    assert [s.pfn for s in st] == list(range(st[0].pfn, st[0].pfn + 512))


@pytest.mark.parametrize("dirty", [False, True])
def test_madv_pageout_of_part_of_a_large_folio(dirty: bool) -> None:
    # error 5, partial folios (6.18.44): a clean 16-page file folio half in the range is split and so
    # unmapped whole, a dirty one stays; an anonymous THP half in the range is split and its zero-filled
    # subpages become the zero page
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 16 * PAGE)
    p = m.spawn()
    a = p.mmap(16 * PAGE, "rw", ["shared"], file="/mnt/e/f")
    p.touch(a, PAGE, write=dirty)
    t = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(t, 2 * PMD_SIZE, "hugepage")
    p.touch(t + PMD_SIZE, 2 * PAGE, write=True, fill=7)
    assert p.madvise(a, 8 * PAGE, "pageout") == 0
    assert p.madvise(t + PMD_SIZE // 2, PMD_SIZE * 3 // 4, "pageout") == 0
    assert [s.present for s in p.inspect(a, 16 * PAGE)] == [dirty] * 16
    thp = p.inspect(t + PMD_SIZE, PMD_SIZE)
    assert [s.kind for s in thp[:2]] == ["anon", "anon"] and all(s.level == "pte" for s in thp)
    assert all(s.kind == "zero" for s in thp[2:])


def _two_blocks(kernel: str, touch_second: bool, write_first: bool) -> tuple:
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn()
    a = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, 2 * PMD_SIZE, "nohugepage")
    if write_first:
        p.touch(a, PMD_SIZE)                                  # zero-page PTEs in block 0
        p.touch(a, PAGE, write=True)                          # one anon page: the VMA gets an anon_vma
    if touch_second:
        p.touch(a + PMD_SIZE, 16 * PAGE, write=True)
    p.madvise(a, 2 * PMD_SIZE, "hugepage")
    return p, a


@pytest.mark.parametrize("kernel,continues", [("6.18", False), ("6.12", True)])
def test_madv_collapse_at_a_block_without_page_table(kernel: str, continues: bool) -> None:
    # 6.18.44 (measured): SCAN_PMD_NULL ends the walk with EINVAL; 6.12 (source) goes on to the next block
    p, a = _two_blocks(kernel, touch_second=True, write_first=False)
    with pytest.raises(Exception) as ei:
        p.madvise(a, 2 * PMD_SIZE, "collapse")
    assert "EINVAL" in str(ei.value)
    assert (p.inspect(a + PMD_SIZE, PAGE)[0].level == "pmd") is continues


@pytest.mark.parametrize("written", [False, True])
def test_madv_collapse_of_zero_pages_needs_an_anon_vma_not_a_writable_pte(written: bool) -> None:
    # 6.18.44: block 0 of zero-page PTEs only collapses (no SCAN_PAGE_RO any more) when the VMA has an
    # anon_vma (one page written in block 1); without one it is SCAN_PAGE_ANON: EINVAL, nothing collapsed
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn()
    a = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, 2 * PMD_SIZE, "nohugepage")
    p.touch(a, 2 * PMD_SIZE)
    if written:
        p.touch(a + PMD_SIZE, PAGE, write=True)
    p.madvise(a, 2 * PMD_SIZE, "hugepage")
    if written:
        assert p.madvise(a, 2 * PMD_SIZE, "collapse") == 0
    else:
        with pytest.raises(Exception) as ei:
            p.madvise(a, 2 * PMD_SIZE, "collapse")
        assert "EINVAL" in str(ei.value)
    assert all((s.level == "pmd") == written for s in p.inspect(a, 2 * PMD_SIZE))


@pytest.mark.parametrize("fstype, mapped", [("xfs", [1]), ("ext4", list(range(14)))])
def test_truncate_inside_a_block_of_xfs_keeps_the_folio_whole(fstype: str, mapped: list[int]) -> None:
    # 6.18.44 (tests/live: TRUNCATE_CASES; crosscheck --random 200 --seed 1, scenario 30): a 17-page file is
    # folios [0,16) [16]; truncating to 54543 bytes (inside page 13) on xfs first zeroes the block tail
    # (xfs_setattr_size -> xfs_truncate_page) which dirties [0,16); iomap_release_folio refuses a dirty
    # folio, so the split fails and the folio stays whole past EOF: a read of page 1 maps that page only
    # (no large mapping across EOF, no PTE table for fault-around).  ext4 zeroes after truncating the page
    # cache: the folio is split and fault-around maps 0-13.
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", fstype)
    m.create_file("/mnt/e/f", 17 * PAGE)
    p = m.spawn()
    a = p.mmap(17 * PAGE, "rw", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    m.truncate("/mnt/e/f", 54543)
    p.touch(a + PAGE, 1)
    assert [i for i, s in enumerate(p.inspect(a, 17 * PAGE)) if s.present] == mapped


def _thp_cow_after_fork(kernel: str, child_exits: bool) -> tuple[int, int]:
    """A THP written, fork, the child writes pages 100-199 (copies); the parent writes page 300 (its PMD is
    split, page 300 copied), then (child gone or not) page 150.  Returns (pfn before, pfn after) of 150."""
    m = Machine(kernel, ram=256 << 20)
    m.thp.enabled = "madvise"
    p = m.spawn()
    a = p.mmap(PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, PMD_SIZE, write=True)
    c = p.fork("c")
    c.touch(a + 100 * PAGE, 100 * PAGE, write=True)
    p.touch(a + 300 * PAGE, PAGE, write=True)
    before = p.inspect(a + 150 * PAGE, PAGE)[0].pfn
    if child_exits:
        c.exit()
    p.touch(a + 150 * PAGE, PAGE, write=True)
    return before, p.inspect(a + 150 * PAGE, PAGE)[0].pfn


def test_cow_of_a_pte_mapped_thp_still_mapped_by_the_child_copies() -> None:
    # 6.18.44 (crosscheck --random 200 --seed 1, scenario 177: 65 pages the parent wrote got new frames):
    # __wp_can_reuse_large_anon_folio() reuses a page of a large anon folio only when every mapping of the
    # folio is this mm's; the child still maps pages of it, so the parent's write copies
    before, after = _thp_cow_after_fork("6.18", child_exits=False)
    assert after != before
    # once the child is gone the folio is the parent's alone (511 PTEs): the write reuses the page
    before, after = _thp_cow_after_fork("6.18", child_exits=True)
    assert after == before


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_truncate_through_a_dirty_pmd_folio_keeps_it_whole(fstype: str) -> None:
    # 6.18.44 (crosscheck --random 200 --seed 31337, scenario 146): a 4 MiB file (two PMD folios), a shared
    # populate_write of pages 623-645 dirties the second; truncating to 2 920 448 bytes (713 pages) cannot
    # split it (filemap_release_folio refuses dirty buffer heads / iomap state), so it is unmapped and stays
    # whole past EOF; a populate_read of 691-712 then maps page by page (finish_fault: the folio reaches past
    # EOF) and, once a PTE table exists, fault-around maps its window below EOF: pages 688-712.  (A clean
    # folio is split at the EOF page and fault-around maps whole folios from 640.)
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", fstype)
    m.create_file("/mnt/e/f", 4 << 20)
    p = m.spawn()
    a = p.mmap(4 << 20, "rw", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    assert p.madvise(a + 623 * PAGE, 23 * PAGE, "populate_write") == 0
    m.truncate("/mnt/e/f", 2920448)
    assert p.madvise(a + 691 * PAGE, 22 * PAGE, "populate_read") == 0
    assert [i for i, s in enumerate(p.inspect(a, 4 << 20)) if s.present] == list(range(688, 713))
