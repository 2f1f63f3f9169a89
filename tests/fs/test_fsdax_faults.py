"""fsdax (ext4 -o dax on an fsdax pmem device): PTE and PMD faults, holes, write-notify, COW, unmapping.

Expected values: mm-substrate.md §5.7 (fault rules and the [5.2] PMD check order, obs-6.1 results),
§1.2 (DAX leaf kinds per era: [5.2] SPECIAL|DEVMAP PTEs and DEVMAP PMDs, [6.18] plain entries; holes map the
zero page (special, not devmap) or the huge zero PMD), §2.1 (DAX pages take no reference in 5.2), §4.1-4.2
(VM_HUGEPAGE; write-notify for ext4 DAX), §6 (write into a zero-page-mapped hole: CLEAR over each mapping,
truncate: CLEAR per VMA).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE
from hmmirror.errors import KernelError
from hmmirror.fs.file import HOLE
from hmmirror.include.mm_types import VM
from hmmirror.mm.mm_struct import vma_is_dax
from hmmirror.testing import invalidations as clears

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def dax(machine: Machine):
    pmem = machine.add_pmem("pmem0", 64 * MiB)
    sb = machine.mount("/mnt/pmem", "ext4", dax="pmem0")
    return machine, pmem, sb.s_type


def entry(p, addr: int) -> tuple[str, int]:
    lvl, _, e = p.mm.pt.lookup(addr)
    return lvl, e


def invalidations(machine: Machine, since: int = 0) -> list[dict]:
    return [e for e in machine.events[since:] if e["what"] == "invalidate_range_start"]


# --- PTE faults --------------------------------------------------------------------------------------------
def test_pte_fault_maps_the_pmem_pfn_then_write_sets_write_in_place(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/small", 16 * KiB, "data")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/small")
    p.touch(a + PAGE_SIZE, 1)
    lvl, e = entry(p, a + PAGE_SIZE)
    pfn = fs.block_pfn(inode, 1)
    assert lvl == "pte" and x86.pte_pfn(e) == pfn and pmem.start_pfn <= pfn < pmem.end_pfn
    assert x86.pte_devmap(e) == machine.profile.devmap_bits              # [5.2] DEVMAP; [6.18] none
    assert x86.pte_special(e) == machine.profile.devmap_bits             # pte_mkdevmap sets SPECIAL too
    assert not x86.pte_write(e)                                          # write-notify: read-only
    mark = len(machine.events)
    p.touch(a + PAGE_SIZE, 1, write=True)
    lvl, e2 = entry(p, a + PAGE_SIZE)
    assert x86.pte_pfn(e2) == pfn and x86.pte_write(e2)                  # pfn_mkwrite: same pfn, in place
    assert invalidations(machine, mark) == []                            # no notifier
    if machine.profile.dax_refcounted:
        assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (2, 1)
    else:
        assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (1, 0)   # idle value


def test_dax_vma_flags(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/f", 4 * MiB, "data")
    p = machine.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/mnt/pmem/f")
    vma = p.mm.vma_lookup(a)
    assert vma.vm_flags & VM.HUGEPAGE and vma_is_dax(vma)
    assert not vma.vm_flags & (VM.PFNMAP | VM.MIXEDMAP)


def test_4k_hole_read_maps_the_zero_page_special_not_devmap(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/sparse", 16 * KiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/sparse")
    p.touch(a, 1)
    lvl, e = entry(p, a)
    assert lvl == "pte" and x86.pte_pfn(e) == machine.mem.zero_pfn
    assert x86.pte_special(e) and not x86.pte_devmap(e) and not x86.pte_write(e)


def test_write_into_a_4k_hole_clears_the_zero_page_then_maps_pmem(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/sparse", 16 * KiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/sparse")
    p.touch(a, 1)
    mark = len(machine.events)
    p.touch(a, 1, write=True, fill=0x11)
    assert clears(machine, mark) == [("p", a, a + PAGE_SIZE)]            # unmap_mapping_pages: CLEAR [4K)
    lvl, e = entry(p, a)
    pfn = fs.block_pfn(inode, 0)
    assert pfn >= pmem.start_pfn and x86.pte_pfn(e) == pfn and x86.pte_write(e)
    assert p.read_bytes(a, 2) == b"\x11\x11"


def test_write_into_a_hole_unmaps_the_zero_page_in_every_vma(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/sparse", 16 * KiB, "sparse")
    p, q = machine.spawn("p"), machine.spawn("q")
    a = p.mmap(16 * KiB, "r", ["shared"], file="/mnt/pmem/sparse")
    b = q.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/sparse")
    p.touch(a + 2 * PAGE_SIZE, 1)
    assert p.inspect(a + 2 * PAGE_SIZE, 1)[0].zero
    mark = len(machine.events)
    q.write_bytes(b + 2 * PAGE_SIZE, b"xy")
    assert sorted(clears(machine, mark)) == sorted([("p", a + 2 * PAGE_SIZE, a + 3 * PAGE_SIZE),
                                                    ("q", b + 2 * PAGE_SIZE, b + 3 * PAGE_SIZE)])
    assert not p.inspect(a + 2 * PAGE_SIZE, 1)[0].present                # p's zero-page PTE is gone
    assert p.read_bytes(a + 2 * PAGE_SIZE, 2) == b"xy"                   # and it refaults the pmem page
    assert p.inspect(a + 2 * PAGE_SIZE, 1)[0].pfn == fs.block_pfn(inode, 2)


def test_access_beyond_eof_is_sigbus(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/f", 8 * KiB, "data")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/f")
    p.touch(a + PAGE_SIZE, 1)
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a + 2 * PAGE_SIZE, 1)


# --- PMD faults --------------------------------------------------------------------------------------------
def test_aligned_2m_maps_a_devmap_pmd_then_write_in_place(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/big", 4 * MiB, "data")
    p = machine.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/mnt/pmem/big")
    assert a % PMD_SIZE == 0
    p.touch(a + 2 * MiB + 5 * PAGE_SIZE, 1)
    lvl, e = entry(p, a + 2 * MiB)
    head = fs.block_pfn(inode, HPAGE_PMD_NR)
    assert lvl == "pmd" and x86.pmd_leaf(e) and x86.pte_pfn(e) == head and head % HPAGE_PMD_NR == 0
    assert x86.pmd_devmap(e) == machine.profile.devmap_bits
    assert x86.pmd_trans_huge(e) != machine.profile.devmap_bits         # pmd_trans_huge excludes devmap
    assert not x86.pmd_write(e)                                          # read fault under write-notify
    st = p.inspect(a + 2 * MiB + 5 * PAGE_SIZE, 1)[0]
    assert st.kind == "devmap" and st.pfn == head + 5 and st.huge
    mark = len(machine.events)
    p.touch(a + 2 * MiB, 1, write=True)
    lvl, e2 = entry(p, a + 2 * MiB)
    assert lvl == "pmd" and x86.pte_pfn(e2) == head and x86.pmd_write(e2)
    assert invalidations(machine, mark) == []
    if machine.profile.dax_refcounted:
        assert int(machine.mem.refcount[head]) == 2
    else:
        assert int(machine.mem.refcount[head]) == 1 and int(machine.mem.mapcount[head]) == 0


def test_misaligned_offset_or_address_falls_back_to_ptes(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/big", 4 * MiB, "data")
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "r", ["shared"], file="/mnt/pmem/big", offset=PAGE_SIZE)   # offset not congruent
    p.touch(a, 1)
    lvl, e = entry(p, a)
    assert lvl == "pte" and x86.pte_pfn(e) == fs.block_pfn(inode, 1)
    b = p.mmap(2 * MiB, "r", ["shared", "fixed"], file="/mnt/pmem/big", addr=0x7E0000001000)   # VA not congruent
    p.touch(b, 1)
    lvl, e = entry(p, b)
    assert lvl == "pte" and x86.pte_pfn(e) == fs.block_pfn(inode, 0)


def test_pmd_falls_back_when_a_pte_entry_exists_in_that_2m(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/big", 4 * MiB, "data")
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "r", ["shared"], file="/mnt/pmem/big", offset=PAGE_SIZE)
    p.touch(a, 1)                                                        # a PTE entry at index 1
    b = p.mmap(4 * MiB, "r", ["shared"], file="/mnt/pmem/big")
    p.touch(b + 7 * PAGE_SIZE, 1)
    assert entry(p, b + 7 * PAGE_SIZE)[0] == "pte"                       # chunk 0: fallback
    p.touch(b + 2 * MiB, 1)
    assert entry(p, b + 2 * MiB)[0] == "pmd"                             # chunk 1: no PTE entry there


def test_pmd_falls_back_when_the_extent_is_shorter_than_2m(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/big", 2 * MiB, "data")
    inode.blocks[7] = HOLE                                               # punch one block (white-box)
    fs.blocks.release(inode.private["dax_pblk"][7:8].copy())
    inode.private["dax_pblk"][7] = -1
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "r", ["shared"], file="/mnt/pmem/big")
    p.touch(a, 1)
    assert entry(p, a)[0] == "pte"
    p.touch(a + 7 * PAGE_SIZE, 1)
    assert p.inspect(a + 7 * PAGE_SIZE, 1)[0].zero


def test_pmd_block_past_eof_falls_back_then_sigbus_beyond(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/f", 3 * MiB, "data")
    p = machine.spawn("p")
    a = p.mmap(4 * MiB, "r", ["shared"], file="/mnt/pmem/f")
    p.touch(a, 1)
    assert entry(p, a)[0] == "pmd"
    p.touch(a + 2 * MiB, 1)                                              # block extends past EOF: PTEs
    assert entry(p, a + 2 * MiB)[0] == "pte"
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a + 3 * MiB, 1)


def test_2m_hole_read_maps_the_huge_zero_pmd(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/sparse", 4 * MiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/mnt/pmem/sparse")
    p.touch(a + 9 * PAGE_SIZE, 1)
    lvl, e = entry(p, a)
    assert lvl == "pmd" and x86.pmd_leaf(e) and machine.mem.is_huge_zero_pfn(x86.pte_pfn(e))
    assert not x86.pmd_devmap(e) and not x86.pmd_write(e)


def test_unwritten_extent_reads_as_huge_zero_then_write_maps_pmem_pmd(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/falloc", 2 * MiB, "zero")
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "rw", ["shared"], file="/mnt/pmem/falloc")
    p.touch(a, 1)
    assert p.inspect(a, 1)[0].zero and entry(p, a)[0] == "pmd"           # obs-6.1
    mark = len(machine.events)
    p.touch(a + PAGE_SIZE, 1, write=True)
    assert clears(machine, mark) == [("p", a, a + PMD_SIZE)]             # zero PMD unmapped: CLEAR [2M)
    lvl, e = entry(p, a)
    assert lvl == "pmd" and x86.pte_pfn(e) == fs.block_pfn(inode, 0) and x86.pmd_write(e)
    assert x86.pmd_devmap(e) == machine.profile.devmap_bits


def test_write_into_a_2m_hole_maps_a_new_aligned_pmem_pmd(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/sparse", 4 * MiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/mnt/pmem/sparse")
    p.touch(a, 1)
    mark = len(machine.events)
    p.touch(a, 1, write=True, fill=0x42)
    assert clears(machine, mark) == [("p", a, a + PMD_SIZE)]
    lvl, e = entry(p, a)
    head = fs.block_pfn(inode, 0)
    assert lvl == "pmd" and x86.pte_pfn(e) == head and head % HPAGE_PMD_NR == 0
    assert p.read_bytes(a, 1) == b"\x42"


# --- private mappings --------------------------------------------------------------------------------------
def test_private_write_copies_into_an_anon_page(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/small", 16 * KiB, "data")
    w = machine.spawn("w")
    s = w.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/small")
    w.write_bytes(s + PAGE_SIZE, b"hello")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["private"], file="/mnt/pmem/small")
    p.touch(a + PAGE_SIZE, 1)                                            # read: the pmem pfn, read-only
    st = p.inspect(a + PAGE_SIZE, 1)[0]
    assert st.pfn == fs.block_pfn(inode, 1) and not st.write
    mark = len(machine.events)
    p.write_bytes(a + PAGE_SIZE, b"J")                                   # COW: CLEAR [4K), anon copy
    assert clears(machine, mark) == [("p", a + PAGE_SIZE, a + 2 * PAGE_SIZE)]
    st = p.inspect(a + PAGE_SIZE, 1)[0]
    assert st.kind == "anon" and st.pfn < machine.mem.nr_ram and st.write
    assert p.read_bytes(a + PAGE_SIZE, 5) == b"Jello"
    assert w.read_bytes(s + PAGE_SIZE, 5) == b"hello"                    # the file is unchanged
    p.write_bytes(a + 2 * PAGE_SIZE, b"K")                               # write to a none PTE: do_cow_fault
    st = p.inspect(a + 2 * PAGE_SIZE, 1)[0]
    assert st.kind == "anon" and st.write


def test_private_write_into_a_huge_zero_pmd_leaves_one_anon_page(dax) -> None:
    machine, pmem, fs = dax
    machine.create_file("/mnt/pmem/sparse", 2 * MiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "rw", ["private"], file="/mnt/pmem/sparse")
    p.touch(a, 1)
    assert entry(p, a)[0] == "pmd" and p.inspect(a, 1)[0].zero          # obs-6.1: huge zero PMD
    p.touch(a + PAGE_SIZE, 1, write=True)                                # obs-6.1: PMD cleared, 1 anon page
    states = p.inspect(a, 2 * MiB)
    assert states[1].kind == "anon" and states[1].level == "pte"
    assert [i for i, s in enumerate(states) if s.present] == [1]
    # the PMD is cleared ([5.2] by the DAX fallback, [6.x] by wp_huge_pmd), then the PTE fault downgrades
    # the huge zero entry: unmap_mapping_pages over the 2 MiB (fs/dax.c grab_mapping_entry)
    assert clears(machine) == [("p", a, a + PMD_SIZE)] * 2


# --- truncate ------------------------------------------------------------------------------------------------
def test_truncate_unmaps_the_tail_and_frees_its_blocks(dax) -> None:
    machine, pmem, fs = dax
    inode = machine.create_file("/mnt/pmem/small", 16 * KiB, "data")
    p = machine.spawn("p")
    a = p.mmap(16 * KiB, "rw", ["shared"], file="/mnt/pmem/small")
    p.touch(a, 16 * KiB)
    free_before = fs.blocks.nr_free()
    mark = len(machine.events)
    machine.truncate("/mnt/pmem/small", 4 * KiB)
    # truncate_pagecache unmaps the tail twice (before and after dropping the cache): CLEAR per VMA each time
    assert clears(machine, mark) == [("p", a + PAGE_SIZE, a + 4 * PAGE_SIZE)] * 2
    assert [s.present for s in p.inspect(a, 16 * KiB)] == [True, False, False, False]
    assert fs.blocks.nr_free() == free_before + 3 and fs.block_pfn(inode, 1) == -1
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a + PAGE_SIZE, 1)


def test_mount_needs_an_fsdax_namespace(machine: Machine) -> None:
    from hmmirror.errors import InputError

    machine.add_pmem("pmem1", 64 * MiB, "devdax", PMD_SIZE)
    with pytest.raises(InputError):
        machine.mount("/mnt/x", "ext4", dax="pmem1")


def test_write_into_a_huge_zero_pmd_without_an_aligned_chunk_falls_back(machine: Machine) -> None:
    # A 4 MiB device whose two 2 MiB chunks are both partly used: a 2 MiB write allocation gets scattered
    # blocks, the extent is shorter than 2 MiB, the PMD fault falls back (§5.7) and the PTE fault maps pmem.
    pmem = machine.add_pmem("pmem0", 4 * MiB)
    fs = machine.mount("/mnt/pmem", "ext4", dax="pmem0").s_type
    machine.create_file("/mnt/pmem/a", 4 * KiB, "data")                  # one block of chunk 0
    fs.blocks.free[HPAGE_PMD_NR] = False                                 # one block of chunk 1 in use
    inode = machine.create_file("/mnt/pmem/b", 2 * MiB, "sparse")
    p = machine.spawn("p")
    a = p.mmap(2 * MiB, "rw", ["shared"], file="/mnt/pmem/b")
    p.touch(a, 1)
    assert p.inspect(a, 1)[0].zero and entry(p, a)[0] == "pmd"
    mark = len(machine.events)
    p.touch(a, 1, write=True)
    lvl, e = entry(p, a)
    assert lvl == "pte" and x86.pte_pfn(e) == fs.block_pfn(inode, 0) and x86.pte_write(e)
    # CLEAR [2M): the DAX fallback split; [5.8+] wp_huge_pmd splits again after FALLBACK; then the PTE fault
    # downgrades the huge zero entry (unmap_mapping_pages over the 2 MiB)
    n = 3 if machine.profile.wp_huge_split_on_fallback else 2
    assert clears(machine, mark) == [("p", a, a + PMD_SIZE)] * n
    assert machine.counters["thp_fault_fallback"] == 1
