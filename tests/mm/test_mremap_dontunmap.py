"""mremap(MREMAP_DONTUNMAP) (mm/mremap.c, 5.7+; any VMA but VM_DONTEXPAND/VM_PFNMAP since 5.13): always a move
of the same length; the entries move to the new address, the old VMA stays mapped and empty (a later access
faults a fresh page), and the old range is not unmapped a second time.  5.2 has no such flag (-EINVAL).
Expected values from the 6.12/6.18 source: SYSCALL mremap's flag checks, mremap_to(), move_vma()."""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.errors import KernelError
from hmmirror.mm.debug import check_counts

N = 4


def data() -> bytes:
    return np.arange(N * PAGE_SIZE // 4, dtype="<i4").tobytes()


def pfn_at(p, addr: int) -> int:
    e = p.mm.pt.lookup(addr)[2]
    return x86.pte_pfn(e) if e and x86.pte_present(e) else -1


def unmaps(m, mark: int) -> list[tuple[int, int]]:
    return [(e["start"], e["end"]) for e in m.events[mark:]
            if e.get("what") == "invalidate_range_start" and e.get("event") == "UNMAP"]


@pytest.mark.parametrize("kernel", ["6.12", "6.18"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "anywhere"])
def test_dontunmap_moves_the_pages_and_keeps_the_old_range(kernel, fixed):
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(3 * N * PAGE_SIZE, "rw")
    p.munmap(a + N * PAGE_SIZE, 2 * N * PAGE_SIZE)            # a hole to move into
    p.write_bytes(a, data())
    pfns = [pfn_at(p, a + i * PAGE_SIZE) for i in range(N)]
    mark = len(m.events)
    target = a + 2 * N * PAGE_SIZE if fixed else 0
    new = p.mremap(a, N * PAGE_SIZE, N * PAGE_SIZE, True, target, dontunmap=True)
    assert new != a and (not fixed or new == target)
    assert [pfn_at(p, new + i * PAGE_SIZE) for i in range(N)] == pfns           # the same pages moved
    assert p.read_bytes(new, N * PAGE_SIZE) == data()
    old = p.mm.vma_lookup(a)
    assert old is not None and old.vm_start <= a and old.vm_end >= a + N * PAGE_SIZE   # still mapped
    assert all(pfn_at(p, a + i * PAGE_SIZE) == -1 for i in range(N))                 # and empty
    # move_page_tables' UNMAP of the old range, and no do_munmap of it afterwards
    assert unmaps(m, mark).count((a, a + N * PAGE_SIZE)) == 1
    assert all((int(m.mem.refcount[f]), int(m.mem.mapcount[f])) == (1, 1) for f in pfns)
    assert p.read_bytes(a, N * PAGE_SIZE) == bytes(N * PAGE_SIZE)                    # faults afresh: zeroes
    assert check_counts(m) == []


def test_without_dontunmap_the_old_range_goes():
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(3 * N * PAGE_SIZE, "rw")
    p.munmap(a + N * PAGE_SIZE, 2 * N * PAGE_SIZE)
    p.write_bytes(a, data())
    mark = len(m.events)
    p.mremap(a, N * PAGE_SIZE, N * PAGE_SIZE, True, a + 2 * N * PAGE_SIZE)
    assert p.mm.vma_lookup(a) is None
    assert unmaps(m, mark).count((a, a + N * PAGE_SIZE)) == 2                # move_page_tables + do_munmap


@pytest.mark.parametrize("kernel,old_len,new_len,maymove,ok", [
    ("5.2", N, N, True, False),          # no MREMAP_DONTUNMAP before 5.7
    ("6.18", N, 2 * N, True, False),     # never a resize
    ("6.18", N, N, False, False),        # always a move: needs MREMAP_MAYMOVE
    ("6.18", N, N, True, True),
])
def test_dontunmap_flag_checks(kernel, old_len, new_len, maymove, ok):
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn("p")
    a = p.mmap(N * PAGE_SIZE, "rw")
    if ok:
        assert p.mremap(a, old_len * PAGE_SIZE, new_len * PAGE_SIZE, maymove, dontunmap=True) > 0
    else:
        with pytest.raises(KernelError) as ei:
            p.mremap(a, old_len * PAGE_SIZE, new_len * PAGE_SIZE, maymove, dontunmap=True)
        assert ei.value.errno_name == "EINVAL"
