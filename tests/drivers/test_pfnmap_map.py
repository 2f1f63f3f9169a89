"""A remap_pfn_range driver (VM_PFNMAP) and a vm_insert_page driver (VM_MIXEDMAP).

Expected values: mm-substrate.md §4.1 (remap_pfn_range sets VM_IO|VM_PFNMAP|VM_DONTEXPAND|VM_DONTDUMP,
vm_insert_page sets VM_MIXEDMAP), §4.3 and §5.10 (special PTEs for the whole range at mmap time, writable per
vm_page_prot; vm_insert_page: normal PTE of a refcounted page, MAP_PRIVATE read-only), §2.2 (vm_normal_page),
§1.2 (VM_PFNMAP leaf: P, SPECIAL, device/MMIO pfn).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.drivers.pfnmap import MMIO_BASE_PFN, open_pfnmap
from hmmirror.errors import InputError, KernelError
from hmmirror.include.mm_types import VM
from hmmirror.mm.memory import vm_normal_page

MiB = 1 << 20


def test_pfnmap_special_ptes_at_mmap_time(machine: Machine) -> None:
    p = machine.spawn("p")
    f = open_pfnmap(machine)
    faults = machine.counters["handle_mm_fault"]
    a = p.mmap(1 * MiB, "rw", ["shared"], file=f, offset=8 * PAGE_SIZE)
    vma = p.mm.vma_lookup(a)
    want = VM.IO | VM.PFNMAP | VM.DONTEXPAND | VM.DONTDUMP
    assert vma.vm_flags & want == want and not vma.vm_flags & VM.MIXEDMAP
    for i in range(256):                                     # every page populated by mmap itself
        lvl, _, e = p.mm.pt.lookup(a + i * PAGE_SIZE)
        assert lvl == "pte" and x86.pte_present(e) and x86.pte_special(e) and not x86.pte_devmap(e)
        assert x86.pte_pfn(e) == MMIO_BASE_PFN + 8 + i and x86.pte_write(e)   # shared RW: vm_page_prot
        assert vm_normal_page(vma, a + i * PAGE_SIZE, e) == -1
    assert machine.pgmap_of(MMIO_BASE_PFN) is None and MMIO_BASE_PFN >= machine.mem.nr_pfns
    p.write_bytes(a, b"io")                                  # no fault needed
    assert p.read_bytes(a, 2) == b"io"
    assert machine.counters["handle_mm_fault"] == faults
    assert p.inspect(a, 1)[0].kind == "special"


def test_pfnmap_read_only_mapping_and_bounds(m52: Machine) -> None:
    p = m52.spawn("p")
    f = open_pfnmap(m52)
    a = p.mmap(64 * 1024, "r", ["shared"], file=f)
    assert not x86.pte_write(p.mm.pt.lookup(a)[2])
    with pytest.raises(KernelError) as exc:                  # beyond the BAR
        p.mmap(2 * MiB, "rw", ["shared"], file=f, offset=255 * MiB)
    assert exc.value.errno_name == "EINVAL"


def test_pfnmap_private_mapping_copies_on_write(m618: Machine) -> None:
    p = m618.spawn("p")
    f = open_pfnmap(m618)
    a = p.mmap(4 * PAGE_SIZE, "rw", ["private"], file=f)
    vma = p.mm.vma_lookup(a)
    assert vma.vm_pgoff == MMIO_BASE_PFN                     # COW remap: vm_pgoff becomes the pfn
    e = p.mm.pt.lookup(a)[2]
    assert x86.pte_special(e) and not x86.pte_write(e)       # private writable: read-only (COW)
    p.write_bytes(a, b"x")
    st = p.inspect(a, 1)[0]
    assert st.kind == "anon" and st.write


def test_mixedmap_vm_insert_page_maps_refcounted_pages(machine: Machine) -> None:
    p = machine.spawn("p")
    f = open_pfnmap(machine, "mixedmap")
    a = p.mmap(1 * MiB, "rw", ["shared"], file=f)
    vma = p.mm.vma_lookup(a)
    assert vma.vm_flags & VM.MIXEDMAP and not vma.vm_flags & VM.PFNMAP
    p.write_bytes(a + PAGE_SIZE, b"m")
    lvl, _, e = p.mm.pt.lookup(a + PAGE_SIZE)
    pfn = x86.pte_pfn(e)
    assert lvl == "pte" and not x86.pte_special(e) and x86.pte_write(e) and pfn < machine.mem.nr_ram
    assert vm_normal_page(vma, a + PAGE_SIZE, e) == pfn
    assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (2, 1)   # driver + mapping
    q = machine.spawn("q")
    b = q.mmap(1 * MiB, "r", ["shared"], file=open_pfnmap(machine, "mixedmap"))
    assert q.read_bytes(b + PAGE_SIZE, 1) == b"m"            # the same driver page
    assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (3, 2)
    p.munmap(a, 1 * MiB)
    q.munmap(b, 1 * MiB)
    assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (1, 0)   # driver keeps it


def test_mixedmap_private_is_read_only_then_copied(m52: Machine) -> None:
    p = m52.spawn("p")
    a = p.mmap(64 * 1024, "rw", ["private"], file=open_pfnmap(m52, "mixedmap"))
    p.touch(a, 1)
    st = p.inspect(a, 1)[0]
    assert not st.write and st.kind == "file"
    driver_pfn = st.pfn
    p.touch(a, 1, write=True)
    st = p.inspect(a, 1)[0]
    assert st.kind == "anon" and st.write and st.pfn != driver_pfn
    assert int(m52.mem.mapcount[driver_pfn]) == 0


def test_unknown_kind(m52: Machine) -> None:
    with pytest.raises(InputError):
        open_pfnmap(m52, "mmio")
