"""Page-cache faults of ext4/xfs (and the fault-around rule shared with tmpfs).

Expected values: mm-substrate.md §4.2, §5.1, §5.5 and the observations C*/D*/X* of §9.
"""

from __future__ import annotations

import pytest

from hmmirror import KernelError, Machine
from hmmirror.fs.file import DATA, HOLE
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.mm.memory import handle_mm_fault
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.truncate import invalidate_mapping_pages

P = 4096
BASE = 0x7F00_0000_0000            # 2 MiB aligned
# a VMA starting 13 pages past a 64 KiB boundary: page 20 lies at 64K-boundary + 1 page, so the window
# align_down(addr, 64K) starts at page 19 (the probe's "p19-p34 for that base", obs C1/D1/X1)
BASE13 = BASE + 13 * P


def setup(kernel: str, fstype: str, content: str = "data", npages: int = 256, ram: int = 256 << 20,
          cached: bool = True):
    m = Machine(kernel, ram=ram)
    m.mount("/mnt", fstype)
    m.create_file("/mnt/f", npages * P, content, cached=cached)
    return m, m.spawn("p")


# The §5.5 window rule holds for a page cache of small folios (a cold file read by faults in the model).
# A file written with one pwrite sits in large folios [6.18]: test_host_fidelity.py covers those.
COLD = {"cached": False}


def present(p, addr: int, npages: int) -> list[int]:
    return [i for i, s in enumerate(p.inspect(addr, npages * P)) if s.present]


def faults(m: Machine) -> int:
    return m.counters["handle_mm_fault"]


def invalidations(m: Machine) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["event"]) for e in m.events if e["what"] == "invalidate_range_start"]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "tmpfs"])
def test_fault_around_window_follows_the_va(kernel: str, fstype: str) -> None:
    # obs C1/D1/X1: read one byte of p20 -> 16 PTEs, window aligned on the VA (p19-p34 for that base)
    m, p = setup(kernel, fstype, **COLD)
    a = p.mmap(64 * P, "rw", ["shared"], file="/mnt/f", addr=BASE13)
    assert a == BASE13
    p.touch(a + 20 * P)
    assert present(p, a, 64) == list(range(19, 35))


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_fault_around_window_clipped_to_the_vma(fstype: str) -> None:
    # §5.5: S = max(align_down(addr, 64K), vm_start), [S, S+16 pages) clipped to the VMA end
    m, p = setup("6.18", fstype, **COLD)
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE13)
    p.touch(a + 1 * P)                      # align_down falls below vm_start: S = vm_start
    assert present(p, a, 64) == list(range(0, 16))
    b = p.mmap(5 * P, "r", ["shared"], file="/mnt/f", addr=BASE + (1 << 21))
    p.touch(b + 2 * P)                      # a 5-page VMA: the window is the VMA
    assert present(p, b, 5) == [0, 1, 2, 3, 4]


def test_fault_around_window_clipped_to_the_pte_table() -> None:
    # §5.5: the window ends at the end of the 2 MiB PTE table of the faulting address
    m, p = setup("6.18", "ext4", **COLD)
    start = BASE + (1 << 21) - 4 * P        # 4 pages below a 2 MiB boundary
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=start)
    p.touch(a + 1 * P)
    assert present(p, a, 64) == [0, 1, 2, 3]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_shared_write_after_read_takes_one_fault_same_pfn(kernel: str, fstype: str) -> None:
    # obs D2/X2: write after read -> 1 fault, same pfn; §6: page_mkwrite sets the write bit in place, no notifier
    m, p = setup(kernel, fstype)
    a = p.mmap(64 * P, "rw", ["shared"], file="/mnt/f", addr=BASE13)
    p.touch(a + 20 * P)
    before = p.inspect(a + 20 * P, P)[0]
    assert before.write is False and before.kind == "file"        # §4.2 write-notify: read-only
    n0, inv0 = faults(m), len(invalidations(m))
    p.touch(a + 20 * P, write=True, fill=5)
    after = p.inspect(a + 20 * P, P)[0]
    assert faults(m) - n0 == 1
    assert after.pfn == before.pfn and after.write is True
    assert len(invalidations(m)) == inv0
    assert p.read_bytes(a + 20 * P, 4) == bytes([5]) * 4


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_tmpfs_shared_write_after_read_takes_no_fault(kernel: str) -> None:
    # obs C2: tmpfs has no write-notify, the read fault already mapped the page writable
    m, p = setup(kernel, "tmpfs")
    a = p.mmap(64 * P, "rw", ["shared"], file="/mnt/f", addr=BASE13)
    p.touch(a + 20 * P)
    assert p.inspect(a + 20 * P, P)[0].write is True
    n0 = faults(m)
    p.touch(a + 20 * P, write=True, fill=1)
    assert faults(m) - n0 == 0


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_private_read_maps_page_cache_read_only_and_write_copies(kernel: str, fstype: str) -> None:
    # obs C5/C6 (D6): MAP_PRIVATE read -> page-cache pfns read-only; write p0-1 -> anon copies,
    # §6 wp_page_copy: notifier CLEAR [4K) per copied page
    m, p = setup(kernel, fstype)
    inode = m.files["/mnt/f"]
    a = p.mmap(16 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    p.touch(a, 16 * P)
    st = p.inspect(a, 16 * P)
    assert [s.pfn for s in st] == [inode.i_mapping.find_page(i) for i in range(16)]
    assert all(s.write is False and s.kind in ("file", "shmem") for s in st)
    inv0 = len(invalidations(m))
    p.touch(a, 2 * P, write=True, fill=9)
    st2 = p.inspect(a, 16 * P)
    for i in (0, 1):
        assert st2[i].kind == "anon" and st2[i].write is True and st2[i].pfn != st[i].pfn
    assert [s.pfn for s in st2[2:]] == [s.pfn for s in st[2:]]
    assert invalidations(m)[inv0:] == [(a, a + P, "CLEAR"), (a + P, a + 2 * P, "CLEAR")]
    # the page cache is untouched by the private copies
    assert [inode.i_mapping.find_page(i) for i in range(2)] == [st[0].pfn, st[1].pfn]
    assert m.mem.read(st[0].pfn, 0, 4) == bytes(4)


def test_private_write_to_unmapped_page_copies_without_notifier() -> None:
    # §5.5 / §6: a private write on a none PTE is do_cow_fault: anon copy, no invalidation (entry was none)
    m, p = setup("6.18", "ext4")
    a = p.mmap(16 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    inv0 = len(invalidations(m))
    p.touch(a + 3 * P, write=True, fill=2)
    s = p.inspect(a + 3 * P, P)[0]
    assert s.kind == "anon" and s.write is True
    assert present(p, a, 16) == [3]                         # write faults map exactly one page
    assert len(invalidations(m)) == inv0


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_private_dontneed_then_read_maps_page_cache_again(fstype: str) -> None:
    pytest.importorskip("hmmirror.mm.madvise")
    # obs C7/D7: DONTNEED drops the anon copy; the next read maps the page-cache page again
    m, p = setup("6.18", fstype)
    inode = m.files["/mnt/f"]
    a = p.mmap(16 * P, "rw", ["private"], file="/mnt/f", addr=BASE)
    p.touch(a, 2 * P, write=True, fill=9)
    p.madvise(a, 16 * P, "dontneed")
    p.touch(a)
    st = p.inspect(a, 2 * P)
    assert [s.pfn for s in st] == [inode.i_mapping.find_page(0), inode.i_mapping.find_page(1)]
    assert all(s.kind != "anon" and s.write is False for s in st)


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@pytest.mark.parametrize("fstype,new_pages", [("tmpfs", 1), ("ext4", 16), ("xfs", 16)])
def test_sparse_hole_read(kernel: str, fstype: str, new_pages: int) -> None:
    # obs C9 vs D9: sparse file, read p0: tmpfs 1 new page; ext4/xfs 16 new zero-filled page-cache pages
    m, p = setup(kernel, fstype, content="sparse")
    inode = m.files["/mnt/f"]
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    free0 = m.mem.nr_free_pages()
    p.touch(a)
    assert inode.i_mapping.nrpages == new_pages
    assert free0 - m.mem.nr_free_pages() == new_pages
    assert present(p, a, 64) == list(range(new_pages))
    assert p.read_bytes(a, 8) == bytes(8)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "tmpfs"])
def test_access_beyond_eof_is_sigbus(fstype: str) -> None:
    # §5.5: access at or beyond EOF -> VM_FAULT_SIGBUS (KernelError EFAULT at the Process boundary)
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt", fstype)
    m.create_file("/mnt/f", P + 100, "data")               # EOF inside page 1: pages 0 and 1 exist
    p = m.spawn("p")
    a = p.mmap(4 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    p.touch(a + P)
    with pytest.raises(KernelError) as ei:
        p.touch(a + 2 * P)
    assert ei.value.errno_name == "EFAULT" and "SIGBUS" in str(ei.value)
    assert present(p, a, 4) == [0, 1]                      # fault-around stops at EOF too


def _fault(p, addr: int, flags: FAULT_FLAG) -> tuple[int, bool]:
    """handle_mm_fault with mmap_sem taken for read, as the fault path holds it; (ret, still held)."""
    mm = p.mm

    def go():
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from handle_mm_fault(mm.vma_lookup(addr), addr, flags)
        held = mm.mmap_sem.held_by()
        if held:
            sched.up_read(mm.mmap_sem)
        return ret, held

    return sched.run(go(), mm.task)


def test_cold_read_with_allow_retry_returns_retry_and_releases_mmap_sem() -> None:
    # §5.1: a read fault on an uncached file page returns RETRY after starting readahead, mmap_sem released;
    # the retried fault finds the page uptodate (and fault-around maps the window, §5.5)
    m, p = setup("5.2", "ext4", content="sparse")
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    ret, held = _fault(p, a, FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.USER)
    assert ret & VM_FAULT.RETRY and ret & VM_FAULT.MAJOR and not held
    assert present(p, a, 64) == []
    ret, held = _fault(p, a, FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.TRIED | FAULT_FLAG.USER)
    assert ret & ~VM_FAULT.NOPAGE == 0 and held            # solved by fault-around: VM_FAULT_NOPAGE
    assert present(p, a, 64) == list(range(16))


def test_cold_read_with_retry_nowait_keeps_mmap_sem() -> None:
    # §5.1: RETRY has released mmap_sem "unless RETRY_NOWAIT"
    m, p = setup("6.18", "xfs", content="sparse")
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    ret, held = _fault(p, a, FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.RETRY_NOWAIT)
    assert ret & VM_FAULT.RETRY and held


def test_cold_read_without_allow_retry_maps_only_the_page() -> None:
    # §5.1: callers without ALLOW_RETRY never see RETRY; the readahead still fills the window's cache
    m, p = setup("6.18", "ext4", content="sparse")
    inode = m.files["/mnt/f"]
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    ret, held = _fault(p, a + 3 * P, FAULT_FLAG.REMOTE)
    assert not ret & VM_FAULT.RETRY and ret & VM_FAULT.MAJOR and held
    assert present(p, a, 64) == [3]
    assert inode.i_mapping.nrpages == 16


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_page_cache_counts_are_mappings_plus_one(kernel: str) -> None:
    # docs/design.md counting convention: refcount = leaf entries + 1 while cached; mapcount = leaf entries
    m, p = setup(kernel, "ext4")
    q = m.spawn("q")
    inode = m.files["/mnt/f"]
    a = p.mmap(16 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    b = q.mmap(16 * P, "r", ["private"], file="/mnt/f", addr=BASE)
    pfn = inode.i_mapping.find_page(5)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (1, 0)
    p.touch(a + 5 * P)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (2, 1)
    q.touch(b + 5 * P)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (3, 2)
    p.munmap(a, 16 * P)
    q.munmap(b, 16 * P)
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (1, 0)
    assert m.mem.flags[pfn] & PG.file


def test_page_mkwrite_allocates_the_block_of_a_hole_and_dirties_the_page() -> None:
    # §4.2/§4.3: ext4 page_mkwrite on the first write to a shared page (block allocation for a hole)
    m, p = setup("6.18", "ext4", content="sparse")
    inode = m.files["/mnt/f"]
    a = p.mmap(16 * P, "rw", ["shared"], file="/mnt/f", addr=BASE)
    p.touch(a + 2 * P)
    assert inode.blocks[2] == HOLE
    p.touch(a + 2 * P, write=True, fill=3)
    pfn = inode.i_mapping.find_page(2)
    assert inode.blocks[2] == DATA and m.mem.flags[pfn] & PG.dirty
    assert inode.blocks[3] == HOLE


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_read_after_fadvise_dontneed_is_one_major_fault_with_16_ptes(kernel: str) -> None:
    # obs D11: after POSIX_FADV_DONTNEED (invalidate_mapping_pages), read one byte -> one major fault, 16 PTEs
    m, p = setup(kernel, "ext4")
    inode = m.files["/mnt/f"]
    assert invalidate_mapping_pages(inode.i_mapping, 0, 255) == 256
    a = p.mmap(64 * P, "r", ["shared"], file="/mnt/f", addr=BASE13)
    maj0 = m.counters["pgmajfault"]
    p.touch(a + 20 * P)
    assert m.counters["pgmajfault"] - maj0 == 1
    assert present(p, a, 64) == list(range(19, 35))


def test_invalidate_mapping_pages_keeps_mapped_and_dirty_pages() -> None:
    # mm/truncate.c invalidate_mapping_pages: only clean, unmapped, unlocked pages are dropped
    m, p = setup("6.18", "ext4", **COLD)
    inode = m.files["/mnt/f"]
    a = p.mmap(16 * P, "rw", ["shared"], file="/mnt/f", addr=BASE)
    p.touch(a)                                             # maps pages 0..15
    q = m.spawn("q")
    b = q.mmap(16 * P, "rw", ["shared"], file="/mnt/f", addr=BASE + 16 * P, offset=16 * P)
    q.touch(b, write=True, fill=1)                         # page 16 dirty (and mapped)
    q.munmap(b, 16 * P)
    dropped = invalidate_mapping_pages(inode.i_mapping, 0, 31)
    assert dropped == 15                                   # 17..31; 0..15 mapped, 16 dirty
    assert inode.i_mapping.find_page(16) >= 0 and inode.i_mapping.find_page(17) < 0


@pytest.mark.parametrize("flags", [["shared"], ["private"]])
def test_6_18_madv_hugepage_read_maps_the_whole_2m_by_a_pmd(flags: list[str]) -> None:
    # obs D12/X12 [6.18 only]: PROT_READ, 2 MiB aligned, MADV_HUGEPAGE, read one byte -> whole 2 MiB PMD-mapped
    m, p = setup("6.18", "ext4", npages=1024)
    inode = m.files["/mnt/f"]
    invalidate_mapping_pages(inode.i_mapping, 0, 1023)
    a = p.mmap(4 << 20, "r", flags, file="/mnt/f", addr=BASE)
    p.mm.vma_lookup(a).vm_flags |= VM.HUGEPAGE             # what MADV_HUGEPAGE does (flags only, §6)
    p.touch(a + 5 * P)
    st = p.inspect(a, 2 << 20)
    assert all(s.present and s.level == "pmd" for s in st)
    assert [s.pfn for s in st] == list(range(st[0].pfn, st[0].pfn + 512))
    assert present(p, a + (2 << 20), 512) == []


def test_5_2_madv_hugepage_read_maps_ptes() -> None:
    # §5.5: [5.2] no PMD mappings of ext4/xfs page cache
    m, p = setup("5.2", "ext4", npages=1024, content="sparse")
    a = p.mmap(4 << 20, "r", ["shared"], file="/mnt/f", addr=BASE)
    p.mm.vma_lookup(a).vm_flags |= VM.HUGEPAGE
    p.touch(a + 5 * P)
    assert present(p, a, 512) == list(range(16))
    assert all(s.level == "pte" for s in p.inspect(a, 16 * P))


def test_file_fault_over_a_uffd_wp_marker_replaces_it() -> None:
    # [6.18] §5.2: a uffd-wp PTE marker is handled as a none entry; the fault installs over it
    # (vmf_pte_changed() compares with the marker, FAULT_FLAG_ORIG_PTE_VALID)
    from hmmirror.arch.x86 import pgtable as x86
    from hmmirror.mm.memory import VmFault, do_fault

    m, p = setup("6.18", "ext4")
    a = p.mmap(16 * P, "r", ["shared"], file="/mnt/f", addr=BASE)
    p.touch(a + 8 * P)            # 6.18: the file is one 256-page folio ending at EOF: page 8 alone
    p.touch(a)                    # with the PTE table present, fault-around maps the window 0..15
    vma = p.mm.vma_lookup(a)
    _, ptep, entry = p.mm.pt.lookup(a + 3 * P)
    assert entry                                           # mapped by the fault-around above
    m.pool.set(ptep, 0)                                    # unmap page 3 by hand, as a zap would
    pfn = m.files["/mnt/f"].i_mapping.find_page(3)
    m.mem.mapcount[pfn] -= 1
    m.mem.refcount[pfn] -= 1
    marker = x86.make_pte_marker(x86.PTE_MARKER_UFFD_WP)
    m.pool.set(ptep, marker)
    vmf = VmFault(vma, a + 3 * P, FAULT_FLAG.REMOTE, vma.linear_page_index(a + 3 * P))
    vmf.pudp = p.mm.pt.walk_to_pud(a + 3 * P)
    vmf.pmdp = p.mm.pt.pmd_offset(vmf.pudp, a + 3 * P)
    vmf.ptep, vmf.orig_pte = ptep, marker
    sched.run(do_fault(vmf), p.mm.task)
    s = p.inspect(a + 3 * P, P)[0]
    assert s.present and s.pfn == pfn
    assert (m.mem.refcount[pfn], m.mem.mapcount[pfn]) == (2, 1)


# --- [6.18] large page-cache folios (observed on this machine's 6.18 kernel by `hmmirror crosscheck`) -----
def test_large_folio_write_orders_follow_generic_perform_write() -> None:
    # one buffered write of 42 pages from index 0: folios of 32, 8 and 2 pages (ilog2 of what is left,
    # limited by the index alignment), as __filemap_get_folio(fgf_set_order(len)) makes them
    from hmmirror.fs.filemap import write_folio_orders

    assert write_folio_orders(0, 42) == [5, 3, 1]
    assert write_folio_orders(0, 1024) == [9, 9]           # capped at PMD order
    assert write_folio_orders(3, 5) == [0, 2]              # index 3 is odd: order 0, then index 4: order 2


def test_fault_around_maps_whole_large_folio_on_618_only() -> None:
    # a warm 42-page ext4 file written at once: a read of page 23 maps the fault-around window (for
    # this 64K-aligned VA: pages 16..31) and, in 6.18, all of the 32-page folio [0, 32) it touches (filemap_map_pages maps an entire
    # large folio that lies inside the VMA and the page table); 5.2 maps the window only.
    from hmmirror import Machine

    for kernel, first_mapped in (("6.18", 0), ("5.2", 16)):
        m = Machine(kernel, ram=256 << 20)
        m.mount("/mnt/e", "ext4")
        m.create_file("/mnt/e/f", 42 * 4096)
        p = m.spawn()
        a = p.mmap(42 * 4096, "r", ["shared"], file="/mnt/e/f", addr=0x7F0000000000)
        p.touch(a + 23 * 4096, 1)
        present = [s.present for s in p.inspect(a, 42 * 4096)]
        assert present.index(True) == first_mapped, kernel
