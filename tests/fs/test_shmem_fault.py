"""shmem: shared anonymous memory, tmpfs files, memfd, tmpfs huge=always.

Expected values: mm-substrate.md §4.2, §5.6 and observations B1-B6, C9, H-T1..3 of §9.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.fs.shmem import memfd_create
from hmmirror.mm.page_alloc import PG

P = 4096
BASE = 0x7F00_0000_0000          # 2 MiB aligned


def invalidations(m: Machine) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["event"]) for e in m.events if e["what"] == "invalidate_range_start"]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_shared_anon_read_gives_real_writable_pages(kernel: str) -> None:
    # obs B1-B3: shared anon read -> real shmem pages (no zero page), writable (no write-notify, §4.2)
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 8 * P)
    st = p.inspect(a, 8 * P)
    assert all(s.present and s.kind == "shmem" and not s.zero and s.write for s in st)
    assert len({s.pfn for s in st}) == 8
    vma = p.mm.vma_lookup(a)
    assert vma.kind == "shmem" and vma.vm_pgoff == 0
    n0 = m.counters["handle_mm_fault"]
    p.touch(a, 8 * P, write=True, fill=4)              # already writable: no fault
    assert m.counters["handle_mm_fault"] == n0


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_shared_anon_read_allocates_only_the_faulting_page(kernel: str) -> None:
    # §5.6: fault-around maps only pages already in the file; a read allocates one page
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(32 * P, "r", ["shared", "anonymous"])
    free0 = m.mem.nr_free_pages()
    p.touch(a + 3 * P)
    assert free0 - m.mem.nr_free_pages() == 1
    assert [i for i, s in enumerate(p.inspect(a, 32 * P)) if s.present] == [3]


def test_shared_anon_pages_stay_after_dontneed() -> None:
    pytest.importorskip("hmmirror.mm.madvise")
    # obs B5: same pfns after DONTNEED + re-read (pages stay in the shmem file)
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 8 * P, write=True, fill=7)
    before = [s.pfn for s in p.inspect(a, 8 * P)]
    p.madvise(a, 8 * P, "dontneed")
    assert not any(s.present for s in p.inspect(a, 8 * P))
    p.touch(a, 8 * P)
    assert [s.pfn for s in p.inspect(a, 8 * P)] == before
    assert p.check(a, 8 * P, 7) == 0


def test_shmem_page_counts() -> None:
    # docs/design.md: one reference for the shmem file's cache + one per mapping; mapcount = mappings
    m = Machine("6.18", ram=256 << 20)
    m.mount("/dev/shm", "tmpfs")
    m.create_file("/dev/shm/f", 4 * P, "data")
    pfn = m.files["/dev/shm/f"].i_mapping.find_page(1)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (1, 0)
    assert m.mem.flags[pfn] & PG.swapbacked
    p, q = m.spawn("p"), m.spawn("q")
    a = p.mmap(4 * P, "rw", ["shared"], file="/dev/shm/f")
    b = q.mmap(4 * P, "rw", ["shared"], file="/dev/shm/f")
    p.touch(a + P)
    q.touch(b + P)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (3, 2)
    assert p.inspect(a + P, P)[0].pfn == q.inspect(b + P, P)[0].pfn == pfn


def test_memfd_is_shmem() -> None:
    # §4.3: tmpfs / memfd: fault allocates, shared writable from the first fault
    m = Machine("6.18", ram=256 << 20)
    p, q = m.spawn("p"), m.spawn("q")
    f = memfd_create(m, "buf", 4 * P)
    a = p.mmap(4 * P, "rw", ["shared"], file=f)
    b = q.mmap(4 * P, "rw", ["shared"], file=f)
    p.write_bytes(a + 2 * P, b"hello")
    assert q.read_bytes(b + 2 * P, 5) == b"hello"
    s = q.inspect(b + 2 * P, P)[0]
    assert s.kind == "shmem" and s.write


def test_tmpfs_fallocated_pages_are_not_mapped_by_fault_around() -> None:
    # mm/shmem.c: fallocated pages are !Uptodate until first use; filemap_map_pages skips them
    m = Machine("6.18", ram=256 << 20)
    m.mount("/t", "tmpfs")
    m.create_file("/t/f", 32 * P, "zero")
    p = m.spawn("p")
    a = p.mmap(32 * P, "r", ["shared"], file="/t/f", addr=BASE)
    free0 = m.mem.nr_free_pages()
    p.touch(a + 2 * P)
    assert [i for i, s in enumerate(p.inspect(a, 32 * P)) if s.present] == [2]
    assert m.mem.nr_free_pages() == free0                # the page existed already


def _huge_setup(kernel: str, content: str = "sparse"):
    m = Machine(kernel, ram=256 << 20)
    m.mount("/h", "tmpfs", huge="always")
    m.create_file("/h/f", 4 << 20, content)
    return m, m.spawn("p")


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_huge_tmpfs_shared_write_is_pmd_mapped(kernel: str) -> None:
    # obs H-T1: tmpfs huge=always, write one byte -> PMD mapped
    m, p = _huge_setup(kernel)
    a = p.mmap(4 << 20, "rw", ["shared"], file="/h/f")
    assert a % (2 << 20) == 0                            # shmem_get_unmapped_area aligns huge mappings
    p.write_bytes(a + 5 * P, b"x")
    st = p.inspect(a, 2 << 20)
    assert all(s.present and s.level == "pmd" and s.write for s in st)
    assert [s.pfn for s in st] == list(range(st[0].pfn, st[0].pfn + 512))
    assert not p.inspect(a + (2 << 20), P)[0].present


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_huge_tmpfs_private_read_then_write(kernel: str) -> None:
    # obs H-T2: private read -> PMD mapped (read-only);
    # obs H-T3: private write p1 -> PMD cleared (CLEAR [2M), §5.4 split of a file PMD), only p1 present (anon)
    m, p = _huge_setup(kernel)
    a = p.mmap(4 << 20, "rw", ["private"], file="/h/f")
    p.touch(a)
    st = p.inspect(a, 2 << 20)
    assert all(s.present and s.level == "pmd" and not s.write and s.kind == "shmem" for s in st)
    cached = st[1].pfn
    inv0 = len(invalidations(m))
    p.touch(a + P, write=True, fill=1)
    st2 = p.inspect(a, 2 << 20)
    assert [i for i, s in enumerate(st2) if s.present] == [1]
    assert st2[1].kind == "anon" and st2[1].level == "pte" and st2[1].write and st2[1].pfn != cached
    assert (a, a + (2 << 20), "CLEAR") in invalidations(m)[inv0:]
    # the shmem file still holds its huge page, only unmapped from this process
    assert m.files["/h/f"].i_mapping.find_page(1) == cached
    assert m.mem.mapcount[cached] == 0


def test_huge_tmpfs_data_file_fault_around_maps_pmd() -> None:
    # §5.6 + filemap_map_pages: a cached PMD-sized folio at the window start is mapped by one PMD
    m, p = _huge_setup("6.18", content="data")
    a = p.mmap(4 << 20, "r", ["shared"], file="/h/f")
    n0 = m.counters["handle_mm_fault"]
    p.touch(a + (2 << 20) + 17 * P)
    assert m.counters["handle_mm_fault"] - n0 == 1
    st = p.inspect(a + (2 << 20), 2 << 20)
    assert all(s.level == "pmd" for s in st)
    head = st[0].pfn
    assert m.mem.refcount[head] == 2 and m.mem.mapcount[head + 100] == 1     # cache + the PMD mapping


def test_huge_tmpfs_unaligned_vma_falls_back_to_small_pages() -> None:
    # transhuge_vma_suitable: the 2 MiB block must fit the VMA with VA and offset congruent
    m, p = _huge_setup("6.18")
    a = p.mmap(2 << 20, "rw", ["shared"], file="/h/f", offset=P, align=2 << 20)
    p.touch(a, write=True, fill=1)
    s = p.inspect(a, P)[0]
    assert s.level == "pte" and s.kind == "shmem"


def test_shared_anon_pages_are_freed_by_the_last_munmap() -> None:
    # shmem_zero_setup's file is held only by the VMA: the last unmap evicts it (shmem_evict_inode);
    # a partial munmap keeps the file
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    free0 = m.mem.nr_free_pages()
    a = p.mmap(8 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 8 * P, write=True, fill=1)
    p.munmap(a, 4 * P)
    assert free0 - m.mem.nr_free_pages() == 8
    assert p.check(a + 4 * P, 4 * P, 1) == 0
    p.munmap(a + 4 * P, 4 * P)
    assert m.mem.nr_free_pages() == free0
