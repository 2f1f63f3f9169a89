"""hugetlb faults, hugetlbfs files and huge_pte_offset.

Expected values: mm-substrate.md §1.4 (locks), §5.9, §6 and observations H1-H9, F10/F11 of §9;
huge_pte_offset: hmm-5.2.md §6.
"""

from __future__ import annotations

import pytest

from hmmirror import KernelError, Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE, PUD_SIZE
from hmmirror.kernel import sched
from hmmirror.mm.hugetlb import huge_pte_offset

P = 4096
M2 = PMD_SIZE
G1 = PUD_SIZE


def invalidations(m: Machine) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["event"]) for e in m.events if e["what"] == "invalidate_range_start"]


def faults(m: Machine) -> int:
    return m.counters["handle_mm_fault"]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_untouched_read_then_write_probe(kernel: str) -> None:
    m = Machine(kernel, ram=256 << 20, hugepages_2m=2)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private", "anonymous", "hugetlb"])
    assert a % M2 == 0
    # obs H1: untouched -> not present
    assert not any(s.present for s in p.inspect(a, M2))
    free0 = len(m.mem.hugetlb_free[9])
    # obs H2: read one byte -> whole huge page allocated, read-only (no zero page)
    p.touch(a + 7 * P)
    st = p.inspect(a, M2)
    assert all(s.present and s.kind == "hugetlb" and s.level == "pmd" and not s.write and not s.zero for s in st)
    assert [s.pfn for s in st] == list(range(st[0].pfn, st[0].pfn + 512))
    assert len(m.mem.hugetlb_free[9]) == free0 - 1
    # obs H3b: write probe -> 1 fault, same pfns, now writable; §6: no notifier (write bit set in place)
    n0, inv0 = faults(m), len(invalidations(m))
    p.touch(a + 100 * P, write=True, fill=3)
    st2 = p.inspect(a, M2)
    assert faults(m) - n0 == 1
    assert [s.pfn for s in st2] == [s.pfn for s in st] and all(s.write for s in st2)
    assert len(invalidations(m)) == inv0
    assert p.check(a + 100 * P, P, 3) == 0


def test_private_write_on_none_entry_maps_writable_directly() -> None:
    # §5.9: a write fault on a none entry maps it writable directly (one fault)
    m = Machine("6.18", ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private", "anonymous", "hugetlb"])
    n0 = faults(m)
    p.touch(a, write=True, fill=1)
    assert faults(m) - n0 == 1
    s = p.inspect(a, P)[0]
    assert s.write and s.exclusive and not s.file
    head = s.pfn
    assert m.mem.refcount[head] == 1 and m.mem.mapcount[head] == m.mem.mapcount[head + 511] == 1


def test_shared_hugetlb_read_maps_writable() -> None:
    # §5.9: shared mapping: writable if the VMA is writable
    m = Machine("5.2", ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["shared", "anonymous", "hugetlb"])
    p.touch(a)
    s = p.inspect(a, P)[0]
    assert s.present and s.write and s.file and s.kind == "hugetlb"
    assert m.mem.refcount[s.pfn] == 2                       # page cache + the mapping


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_no_free_huge_page_is_sigbus(kernel: str) -> None:
    # §5.9: no free huge page -> SIGBUS
    m = Machine(kernel, ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a)
    with pytest.raises(KernelError) as ei:
        p.touch(a + M2)
    assert "SIGBUS" in str(ei.value)


def test_map_hugetlb_length_rounded_and_bad_size_rejected() -> None:
    m = Machine("6.18", ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(P, "rw", ["private", "anonymous", "hugetlb"])
    vma = p.mm.vma_lookup(a)
    assert vma.vm_end - vma.vm_start == M2 and vma.hstate_order == 9 and vma.kind == "hugetlb"
    with pytest.raises(KernelError) as ei:
        p.mmap(M2, "rw", 0x02 | 0x20 | 0x40000 | (25 << 26))   # MAP_PRIVATE|ANON|HUGETLB|MAP_HUGE_32MB
    assert ei.value.errno_name == "EINVAL"


def test_1g_hugetlb_is_a_pud_leaf_of_contiguous_pfns() -> None:
    # obs H9: 1 GiB page -> PUD leaf, 262144 contiguous pfns
    m = Machine("6.18", ram=2 << 30, hugepages_1g=1)
    p = m.spawn("p")
    a = p.mmap(G1, "rw", ["private", "anonymous", "hugetlb", "huge_1g"])
    assert a % G1 == 0 and p.mm.vma_lookup(a).hstate_order == 18
    p.touch(a + 12345 * P)
    level, ptr, entry = p.mm.pt.lookup(a)
    assert level == "pud" and entry & 0x80                    # PSE leaf at the PUD level
    first, last = p.inspect(a, P)[0], p.inspect(a + G1 - P, P)[0]
    assert first.level == "pud" and last.pfn == first.pfn + 262143
    head = first.pfn
    assert (m.mem.mapcount[head: head + 262144] == 1).all()


def _locks_at_set(m: Machine) -> list[list[str]]:
    """Record the locks held whenever an entry of the pool is written."""
    seen: list[list[str]] = []
    pool = m.pool
    orig = pool.set

    def spy(ptr, val):
        seen.append([lk.name for lk in sched.current().held])
        orig(ptr, val)

    pool.set = spy  # type: ignore[method-assign]
    return seen


def test_huge_pte_locks() -> None:
    # §1.4: 2 MiB hugetlb entries under the PMD table's split lock, 1 GiB entries under mm.page_table_lock
    m = Machine("6.18", ram=2 << 30, hugepages_2m=1, hugepages_1g=1)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private", "anonymous", "hugetlb"])
    b = p.mmap(G1, "rw", ["private", "anonymous", "hugetlb", "huge_1g"])
    seen = _locks_at_set(m)
    p.touch(a)
    pmd_table = huge_pte_offset(p.mm, a, M2)[0]
    assert any(f"ptl[{pmd_table}]" in held for held in seen)
    seen.clear()
    p.touch(b)
    assert any(p.mm.page_table_lock.name in held for held in seen)


def test_huge_pte_offset() -> None:
    # hmm-5.2.md §6: a pointer for present, swap-type and none entries at the hstate's level whenever the
    # levels above exist; 2 MiB: NULL if PGD/P4D not present or the PUD is none; 1 GiB: NULL only if the
    # PGD/P4D is not present
    m = Machine("5.2", ram=2 << 30, hugepages_2m=1, hugepages_1g=1)
    p = m.spawn("p")
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"])
    assert huge_pte_offset(p.mm, a, M2) is None               # nothing below the PGD
    p.touch(a)
    ptr = huge_pte_offset(p.mm, a, M2)
    assert ptr is not None and m.pool.get(ptr) & 0x80
    ptr2 = huge_pte_offset(p.mm, a + M2, M2)                  # same PMD table, none entry
    assert ptr2 is not None and m.pool.get(ptr2) == 0
    b = p.mmap(G1, "rw", ["private", "anonymous", "hugetlb", "huge_1g"])
    pud = huge_pte_offset(p.mm, b, G1)
    if p.mm.pt.walk_to_pud(b) is None:
        assert pud is None                                    # PGD/P4D not present
    else:
        assert pud is not None and m.pool.get(pud) == 0       # none PUD returned as such
    p.touch(b)
    pud = huge_pte_offset(p.mm, b, G1)
    assert pud is not None and m.pool.get(pud) & 0x80
    # a 2 MiB lookup through a PUD leaf returns the PUD entry (hugepage at the PUD level)
    assert huge_pte_offset(p.mm, b + M2, M2) == pud


def test_hugetlbfs_private_read_then_write_copies_whole_page() -> None:
    # obs H5-H8: hugetlbfs private read then write: the write copies the whole huge page
    # §6 / §5.9: the copy replaces the entry under notifier CLEAR over the huge page
    m = Machine("6.18", ram=256 << 20, hugepages_2m=2)
    m.mount("/huge", "hugetlbfs", pagesize=M2)
    m.create_file("/huge/f", M2, "data")
    inode = m.files["/huge/f"]
    cached = inode.i_mapping.find_page(0)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private"], file="/huge/f")
    p.touch(a)
    s = p.inspect(a, P)[0]
    assert s.pfn == cached and not s.write
    inv0 = len(invalidations(m))
    p.touch(a + 9 * P, write=True, fill=6)
    st = p.inspect(a, M2)
    assert all(x.write and x.pfn != cached + i for i, x in enumerate(st))
    assert [x.pfn for x in st] == list(range(st[0].pfn, st[0].pfn + 512))
    assert invalidations(m)[inv0:] == [(a, a + M2, "CLEAR")]
    assert m.mem.refcount[cached] == 1 and m.mem.mapcount[cached] == 0     # only the page cache holds it
    assert inode.i_mapping.find_page(0) == cached


def test_hugetlbfs_shared_mappings_see_the_same_page() -> None:
    m = Machine("5.2", ram=256 << 20, hugepages_2m=1)
    m.mount("/huge", "hugetlbfs")
    m.create_file("/huge/f", M2, "sparse")
    p, q = m.spawn("p"), m.spawn("q")
    a = p.mmap(M2, "rw", ["shared"], file="/huge/f")
    b = q.mmap(M2, "rw", ["shared"], file="/huge/f")
    p.write_bytes(a + 3 * P, b"shared")
    assert q.read_bytes(b + 3 * P, 6) == b"shared"
    head = p.inspect(a, P)[0].pfn
    assert m.mem.refcount[head] == 3 and m.mem.mapcount[head] == 2


def test_hugetlbfs_sizes_must_be_huge_aligned() -> None:
    m = Machine("6.18", ram=256 << 20, hugepages_2m=1)
    m.mount("/huge", "hugetlbfs")
    with pytest.raises(KernelError):
        m.create_file("/huge/g", M2 + P, "sparse")
    m.create_file("/huge/f", M2, "sparse")
    with pytest.raises(KernelError) as ei:
        m.truncate("/huge/f", P)
    assert ei.value.errno_name == "EINVAL"


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_dontneed_on_hugetlb(kernel: str) -> None:
    pytest.importorskip("hmmirror.mm.madvise")
    # §5.9 / obs H4: [5.2] MADV_DONTNEED on hugetlb -> EINVAL; [6.18] zaps whole huge pages
    m = Machine(kernel, ram=256 << 20, hugepages_2m=2)
    p = m.spawn("p")
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, 2 * M2, write=True, fill=1)
    if not m.profile.hugetlb_dontneed:
        with pytest.raises(KernelError) as ei:
            p.madvise(a, 2 * M2, "dontneed")
        assert ei.value.errno_name == "EINVAL"
        return
    free0 = len(m.mem.hugetlb_free[9])
    p.madvise(a, M2, "dontneed")
    assert not any(s.present for s in p.inspect(a, M2))
    assert all(s.present for s in p.inspect(a + M2, M2))
    assert len(m.mem.hugetlb_free[9]) == free0 + 1


def test_fork_private_write_copies_whole_huge_page() -> None:
    pytest.importorskip("hmmirror.kernel.fork")
    # obs F10/F11: hugetlb private across fork, parent writes -> whole 2 MiB copied (CLEAR [huge page))
    m = Machine("6.18", ram=256 << 20, hugepages_2m=3)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, write=True, fill=2)
    old = p.inspect(a, P)[0].pfn
    c = p.fork("c")
    assert c.inspect(a, P)[0].pfn == old
    inv0 = len(invalidations(m))
    p.touch(a + 5 * P, write=True, fill=4)
    new = p.inspect(a, P)[0].pfn
    assert new != old and c.inspect(a, P)[0].pfn == old
    assert (a, a + M2, "CLEAR") in invalidations(m)[inv0:]
    assert p.check(a, P, 2) == 0 and c.check(a, P, 2) == 0           # the copy carries the old contents
    assert p.check(a + 5 * P, P, 4) == 0 and c.read_bytes(a + 5 * P, 4) == bytes(4)


def test_shared_map_hugetlb_page_returns_to_the_pool_after_munmap() -> None:
    # the MAP_HUGETLB file is held only by its VMA: the last munmap frees its pages (hugetlbfs_evict_inode)
    m = Machine("6.18", ram=256 << 20, hugepages_2m=1)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["shared", "anonymous", "hugetlb"])
    p.touch(a, write=True, fill=1)
    assert m.mem.hugetlb_free[9] == []
    p.munmap(a, M2)
    assert len(m.mem.hugetlb_free[9]) == 1
