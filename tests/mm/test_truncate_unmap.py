"""truncate / hole punch / unmap_mapping_range.

Expected values: mm-substrate.md §6 ("truncate/hole punch/unmap_mapping_range: clears entries mapping the
file range in every VMA; CLEAR per VMA range"), §5.5 (SIGBUS beyond EOF), and the kernel's
truncate_pagecache() (mm/truncate.c, 5.2 and 6.18 alike), which calls unmap_mapping_range(holebegin, 0,
even_cows=1) twice around truncate_inode_pages(), and truncate_pagecache_range() (hole punch, even_cows=0).
"""

from __future__ import annotations

import pytest

from hmmirror import KernelError, Machine
from hmmirror.fs.file import HOLE
from hmmirror.fs.super import vfs_fallocate_punch_hole
from hmmirror.kernel import sched
from hmmirror.mm.truncate import unmap_mapping_range
from hmmirror.testing import invalidations as clears
from hmmirror.testing import present_pages as present

P = 4096
BASE = 0x7F00_0000_0000


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_truncate_clears_the_tail_in_every_mapping(kernel: str, fstype: str) -> None:
    m = Machine(kernel, ram=256 << 20)
    m.mount("/mnt", fstype)
    # a cold file, read in by the faults below as small folios: a written file is one 64-page folio
    # [6.18], and truncating through it unmaps it whole (test_host_fidelity.py)
    m.create_file("/mnt/f", 64 * P, "data", cached=fstype == "tmpfs")
    inode = m.files["/mnt/f"]
    p, q, r = m.spawn("p"), m.spawn("q"), m.spawn("r")
    a = p.mmap(64 * P, "rw", ["shared"], file="/mnt/f", addr=BASE)
    b = q.mmap(64 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    c = r.mmap(8 * P, "r", ["shared"], file="/mnt/f", addr=BASE)        # maps only pages 0..7
    p.touch(a, 64 * P)
    q.touch(b, 64 * P)
    q.touch(b + 40 * P, write=True, fill=5)                              # a private COW copy in the tail
    r.touch(c, 8 * P)
    free0 = m.mem.nr_free_pages()
    ev0 = len(m.events)
    m.truncate("/mnt/f", 16 * P)
    # every mapping of the tail is gone, private COW copies included (even_cows=1)
    assert present(p, a, 64) == list(range(16))
    assert present(q, b, 64) == list(range(16))
    assert present(r, c, 8) == list(range(8))
    # CLEAR per VMA over its part of the hole, twice (truncate_pagecache); nothing for r's VMA
    tail_p, tail_q = ("p", a + 16 * P, a + 64 * P), ("q", b + 16 * P, b + 64 * P)
    assert sorted(clears(m, ev0)) == sorted([tail_p, tail_q, tail_p, tail_q])
    # the page cache of the tail is dropped and its 48 pages (+ the COW copy) freed
    assert inode.i_mapping.nrpages == 16 and inode.i_size == 16 * P
    assert m.mem.nr_free_pages() - free0 == 48 + 1
    # access beyond the new EOF: SIGBUS
    with pytest.raises(KernelError) as ei:
        p.touch(a + 20 * P)
    assert "SIGBUS" in str(ei.value)


def test_truncate_grow_emits_nothing() -> None:
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt", "ext4")
    m.create_file("/mnt/f", 4 * P, "data")
    p = m.spawn("p")
    a = p.mmap(16 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    p.touch(a)
    ev0 = len(m.events)
    m.truncate("/mnt/f", 16 * P)
    assert clears(m, ev0) == []
    p.touch(a + 10 * P)                                                  # now inside EOF: a hole page
    assert m.files["/mnt/f"].i_size == 16 * P


def test_unmap_mapping_range_without_even_cows_keeps_private_copies() -> None:
    # zap_details.check_mapping (even_cows=0): page-cache entries go, private anonymous copies stay
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt", "ext4")
    m.create_file("/mnt/f", 16 * P, "data")
    inode = m.files["/mnt/f"]
    p = m.spawn("p")
    a = p.mmap(16 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    p.touch(a, 16 * P)
    p.touch(a + 3 * P, write=True, fill=8)
    ev0 = len(m.events)
    sched.run(unmap_mapping_range(inode.i_mapping, 2 * P, 4 * P, False), p.mm.task)
    assert present(p, a, 16) == [0, 1, 3] + list(range(6, 16))
    assert p.inspect(a + 3 * P, P)[0].kind == "anon"
    assert clears(m, ev0) == [("p", a + 2 * P, a + 6 * P)]
    sched.run(unmap_mapping_range(inode.i_mapping, 2 * P, 4 * P, True), p.mm.task)
    assert 3 not in present(p, a, 16)


def test_punch_hole_keeps_size_and_private_copies() -> None:
    # fallocate(PUNCH_HOLE|KEEP_SIZE) = truncate_pagecache_range (even_cows=0); blocks become holes
    m = Machine("5.2", ram=256 << 20)
    m.mount("/mnt", "ext4")
    m.create_file("/mnt/f", 16 * P, "data")
    inode = m.files["/mnt/f"]
    p, q = m.spawn("p"), m.spawn("q")
    a = p.mmap(16 * P, "rw", ["shared"], file="/mnt/f", addr=BASE)
    b = q.mmap(16 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    p.touch(a, 16 * P)
    q.touch(b + 5 * P, write=True, fill=3)
    f = m.open_file("/mnt/f")
    ret = sched.run(vfs_fallocate_punch_hole(f, 4 * P, 4 * P), p.mm.task)
    assert ret == 0 and inode.i_size == 16 * P
    assert present(p, a, 16) == [0, 1, 2, 3] + list(range(8, 16))
    assert present(q, b, 16) == [5] and q.check(b + 5 * P, P, 3) == 0
    assert [inode.i_mapping.find_page(i) for i in range(4, 8)] == [-1] * 4
    assert (inode.blocks[4:8] == HOLE).all()
    p.touch(a + 5 * P)                                                   # re-read: a new zero page
    assert p.read_bytes(a + 5 * P, 4) == bytes(4)


def test_tmpfs_punch_hole_frees_pages() -> None:
    # obs B6 (MADV_REMOVE = punch hole on shmem): pages freed
    m = Machine("6.18", ram=256 << 20)
    m.mount("/t", "tmpfs")
    m.create_file("/t/f", 8 * P, "data")
    free0 = m.mem.nr_free_pages()
    sched.run(vfs_fallocate_punch_hole(m.open_file("/t/f"), 0, 8 * P))
    assert m.mem.nr_free_pages() - free0 == 8
    assert m.files["/t/f"].i_mapping.nrpages == 0


def test_hugetlbfs_truncate_zaps_whole_pages_and_refills_the_pool() -> None:
    m = Machine("6.18", ram=256 << 20, hugepages_2m=2)
    m.mount("/huge", "hugetlbfs")
    m.create_file("/huge/f", 4 << 20, "data")
    p = m.spawn("p")
    a = p.mmap(4 << 20, "rw", ["shared"], file="/huge/f")
    p.touch(a, 4 << 20)
    assert m.mem.hugetlb_free[9] == []
    ev0 = len(m.events)
    m.truncate("/huge/f", 2 << 20)
    assert all(s.present for s in p.inspect(a, 2 << 20))
    assert not any(s.present for s in p.inspect(a + (2 << 20), 2 << 20))
    assert clears(m, ev0) == [("p", a + (2 << 20), a + (4 << 20))]
    assert len(m.mem.hugetlb_free[9]) == 1
