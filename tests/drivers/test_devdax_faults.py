"""device-dax: mmap checks, fault sizes by alignment, entry bits per profile, split alignment, unbind.

Expected values: mm-substrate.md §5.8 (mmap and fault rules), §1.2 (DAX leaf kinds per era), §2.1 (DAX
pages take no reference [5.2] / are refcounted [6.18]), §4.1 (VM_HUGEPAGE), §3 and §6 (device-dax unbind:
kill_dax, CLEAR per mapping VMA, then the pgmap teardown).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.errors import Deadlock, KernelError
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.mm.memory import VmFault
from hmmirror.mm.memremap import get_dev_pagemap

MiB = 1 << 20


def setup(machine: Machine, align: int, size: int = 64 * MiB):
    pmem = machine.add_pmem("pmem0", size, "devdax", align)
    dev = machine.devices["/dev/dax0.0"]
    return pmem, dev, machine.spawn("p")


def starts(machine: Machine, event: str = "CLEAR") -> list[tuple[int, int]]:
    return [(e["start"], e["end"]) for e in machine.events
            if e["what"] == "invalidate_range_start" and e["event"] == event]


@pytest.mark.parametrize("align,level", [(PAGE_SIZE, "pte"), (PMD_SIZE, "pmd"), (PUD_SIZE, "pud")])
def test_fault_size_follows_alignment(machine: Machine, align: int, level: str) -> None:
    size = max(64 * MiB, align)
    pmem, dev, p = setup(machine, align, size)
    a = p.mmap(size, "rw", ["shared"], file="/dev/dax0.0")
    assert a % align == 0                                     # dax_get_unmapped_area: aligned
    off = 5 * PAGE_SIZE if align == PAGE_SIZE else align // 2 + 5 * PAGE_SIZE
    p.touch(a + off, 1)
    lvl, _, e = p.mm.pt.lookup(a + off)
    assert lvl == level
    st = p.inspect(a + off, 1)[0]
    assert st.kind == "devmap" and st.pfn == pmem.start_pfn + off // PAGE_SIZE
    assert st.write                                           # shared RW: writable on a read fault (§5.8)
    if level == "pte":
        assert x86.pte_special(e) == machine.profile.devmap_bits       # [5.2] SPECIAL|DEVMAP; [6.18] normal
    else:
        assert x86.pmd_leaf(e) and x86.pte_pfn(e) % (align // PAGE_SIZE) == 0
    assert x86.pte_devmap(e) == machine.profile.devmap_bits
    assert machine.counters[f"dev_dax_{level}_fault"] == 1
    assert p.mm.vma_lookup(a).vm_flags & VM.HUGEPAGE         # dax_mmap sets VM_HUGEPAGE
    assert p.mm.vma_lookup(a).vm_ops.is_dax


def test_read_only_mapping_gets_read_only_entries(machine: Machine) -> None:
    pmem, dev, p = setup(machine, PMD_SIZE)
    a = p.mmap(4 * MiB, "r", ["shared"], file="/dev/dax0.0")
    p.touch(a, 1)
    st = p.inspect(a, 1)[0]
    assert st.level == "pmd" and not st.write


def test_device_pages_take_no_reference_in_5_2_and_are_refcounted_in_6_18(machine: Machine) -> None:
    pmem, dev, p = setup(machine, PAGE_SIZE)
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 3 * PAGE_SIZE, 1, write=True, fill=0x5A)
    pfn = pmem.start_pfn + 3
    if machine.profile.dax_refcounted:
        assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (2, 1)
    else:
        assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (1, 0)   # idle value
    assert p.read_bytes(a + 3 * PAGE_SIZE, 2) == b"\x5a\x5a"
    p.munmap(a, 4 * MiB)
    assert (int(machine.mem.refcount[pfn]), int(machine.mem.mapcount[pfn])) == (1, 0)


def test_private_mapping_is_einval(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    with pytest.raises(KernelError) as exc:
        p.mmap(4 * MiB, "rw", ["private"], file="/dev/dax0.0")
    assert exc.value.errno_name == "EINVAL"


def test_misaligned_vma_is_einval(m618: Machine) -> None:
    pmem, dev, p = setup(m618, PMD_SIZE)
    with pytest.raises(KernelError) as exc:                   # vm_end not a multiple of align
        p.mmap(3 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    assert exc.value.errno_name == "EINVAL"
    with pytest.raises(KernelError) as exc:                   # vm_start not a multiple of align
        p.mmap(2 * MiB, "rw", ["shared", "fixed"], file="/dev/dax0.0", addr=0x7F0000001000)
    assert exc.value.errno_name == "EINVAL"


def test_pte_sized_fault_on_2m_alignment_is_sigbus(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    vma = p.mm.vma_lookup(a)
    vmf = VmFault(vma, a, FAULT_FLAG.NONE, vma.linear_page_index(a))
    assert sched.run(vma.vm_ops.fault(vmf)) == VM_FAULT.SIGBUS            # fs < align
    assert sched.run(vma.vm_ops.huge_fault(vmf, "pud")) == VM_FAULT.FALLBACK   # fs > align
    vma.vm_flags |= VM.NOHUGEPAGE                             # no PMD attempt: the fault reaches the PTE size
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a, 1)


def test_pud_alignment_refuses_pmd_faults(m618: Machine) -> None:
    pmem, dev, p = setup(m618, PUD_SIZE, PUD_SIZE)
    a = p.mmap(PUD_SIZE, "rw", ["shared"], file="/dev/dax0.0")
    vma = p.mm.vma_lookup(a)
    vmf = VmFault(vma, a, FAULT_FLAG.NONE, vma.linear_page_index(a))
    assert sched.run(vma.vm_ops.huge_fault(vmf, "pmd")) == VM_FAULT.SIGBUS


def test_offset_beyond_device_is_sigbus(machine: Machine) -> None:
    pmem, dev, p = setup(machine, PMD_SIZE, 4 * MiB)
    a = p.mmap(8 * MiB, "rw", ["shared"], file="/dev/dax0.0")  # mmap does not check the size
    p.touch(a + 2 * MiB, 1)
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a + 4 * MiB, 1)


def test_split_must_respect_alignment(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    a = p.mmap(8 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    with pytest.raises(KernelError) as exc:
        p.munmap(a + PAGE_SIZE, PAGE_SIZE)
    assert exc.value.errno_name == "EINVAL"
    p.munmap(a + 2 * MiB, 2 * MiB)                            # aligned split is fine
    assert p.mm.vma_lookup(a + 2 * MiB) is None


def test_write_fault_on_read_only_pmd_sets_write_in_place(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    a = p.mmap(2 * MiB, "r", ["shared"], file="/dev/dax0.0")
    p.touch(a, 1)
    before = p.inspect(a, 1)[0]
    vma = p.mm.vma_lookup(a)
    vma.vm_flags |= VM.WRITE                                  # as mprotect(RW) would allow
    p.touch(a, 1, write=True)
    after = p.inspect(a, 1)[0]
    assert after.pfn == before.pfn and after.write and not before.write
    assert starts(m52) == []                                  # no invalidation (§6: upgrade in place)


def test_unbind_clears_mappings_then_tears_down(machine: Machine) -> None:
    pmem, dev, p = setup(machine, PMD_SIZE)
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    q = machine.spawn("q")
    b = q.mmap(2 * MiB, "rw", ["shared"], file="/dev/dax0.0", offset=2 * MiB)
    p.touch(a, 4 * MiB)
    q.touch(b, 1)
    pg = dev.pgmap
    assert dev.unbind() == 0
    clears = [(e["mm"], e["start"], e["end"]) for e in machine.events
              if e["what"] == "invalidate_range_start" and e["event"] == "CLEAR"]
    assert sorted(clears) == sorted([("p", a, a + 4 * MiB), ("q", b, b + 2 * MiB)])   # one CLEAR per VMA
    assert not p.inspect(a, 4 * MiB)[0].present and not q.inspect(b, 1)[0].present
    assert pg.state == "removed" and machine.pgmap_of(pmem.start_pfn) is None
    assert "/dev/dax0.0" not in machine.devices
    with pytest.raises(KernelError, match="SIGBUS"):          # kill_dax: new faults fail
        p.touch(a, 1)
    kinds = [e["what"] for e in machine.events if e["what"] in ("dev_dax_unbind", "invalidate_range_start",
                                                                  "pgmap_kill", "pgmap_removed")]
    assert kinds[0] == "dev_dax_unbind" and kinds[-2:] == ["pgmap_kill", "pgmap_removed"]


def test_unbind_with_a_leaked_pgmap_reference_is_reported(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    get_dev_pagemap(m52, pmem.start_pfn, None)                # e.g. a walker that never put it
    with pytest.raises(Deadlock):
        dev.unbind()
    assert dev.pgmap.state == "stuck" and dev.pgmap.stuck_count == 1
    assert not dev.alive


def test_mmap_after_kill_is_enxio(m52: Machine) -> None:
    pmem, dev, p = setup(m52, PMD_SIZE)
    f = m52.open_file("/dev/dax0.0")
    dev.alive = False                                         # kill_dax() happened
    with pytest.raises(KernelError) as exc:
        p.mmap(2 * MiB, "rw", ["shared"], file=f)
    assert exc.value.errno_name == "ENXIO"
