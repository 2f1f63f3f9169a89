"""Zapping the last mapping of a ZONE_DEVICE page runs put_page()'s device path, at the PTE level as at the PMD
level (6.18 blind campaign seed 630917: ``device_teardown|mm.memremap.pgmap_wait_idle|-``).

Expected values: mm/memremap.py's convention (an idle device page holds refcount 1 and its pgmap reference; under
``dax_refcounted`` every leaf mapping adds one reference; the put that reaches 0 after the teardown's put drops
the page's pgmap reference), the same for every leaf level -- the kernel's zap_pte_range and zap_huge_pmd both
end in a folio put (mm/memory.c, mm/huge_memory.c, 6.18).  A device-dax unbind that finds a page still mapped
waits for that mapping to go; once a munmap zaps it, the teardown completes.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE
from hmmirror.kernel.sched import run_until_blocked
from hmmirror.mm.memremap import devm_memremap_pages_release

MiB = 1 << 20




@pytest.mark.parametrize("align", [PAGE_SIZE, PMD_SIZE], ids=["pte", "pmd"])
def test_unmapping_a_dax_page_after_the_teardown_put_drops_its_pgmap_reference(align: int) -> None:
    m = Machine("6.18", ram=256 * MiB)
    pmem = m.add_pmem("pmem0", 64 * MiB, "devdax", align)
    p = m.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 5 * PAGE_SIZE, 1)
    lvl, _, _ = p.mm.pt.lookup(a + 5 * PAGE_SIZE)
    assert lvl == ("pte" if align == PAGE_SIZE else "pmd")
    head = pmem.start_pfn + (5 if align == PAGE_SIZE else 0)
    pgmap = pmem.pgmap
    assert int(m.mem.refcount[head]) == 2                     # idle 1 + the one leaf that maps it
    gen = devm_memremap_pages_release(m, pgmap)               # no unmap_mapping_range first: still mapped
    point = run_until_blocked(gen)
    assert point is not None and point != ("done", 0)
    assert pgmap.state == "draining" and pgmap.count == 1     # only the mapped page keeps its reference
    assert p.munmap(a, 4 * MiB) == 0                          # the zap puts the page's last reference
    assert int(m.mem.refcount[head]) == 0
    assert pgmap.count == 0
    assert run_until_blocked(gen) == ("done", 0)
    assert pgmap.state == "removed"
