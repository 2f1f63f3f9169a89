"""A device-dax teardown while a page is still mapped, and the zap of that mapping afterwards, at the PTE level
as at the PMD level (6.18 blind campaign seed 630917: ``device_teardown|mm.memremap.pgmap_wait_idle|-``; session 6:
``pgmap_refcount|mm.hmm.modern.hmm_range_fault|dropped``, seed 55819).

Expected values from the kernel (6.18): memunmap_pages() (mm/memremap.c) kills the ref and drops the references
memremap_pages() took for the pages of a non-private pgmap with one percpu_ref_put_many(pfn_len) -- the pages
themselves are not put and a mapped page holds no pgmap reference -- so wait_for_completion() does not wait for
the mapping (the kernel relies on kill_dev_dax() having unmapped every mapping first: the pages' memmap goes
next); a devdax leaf holds one folio reference (vmf_insert_folio_pmd / vmf_insert_page_mkwrite, 6.15+)
on a GENERIC page idle at refcount 1 (__init_zone_device_page leaves GENERIC pages at 1), and the zap of that
leaf (zap_pte_range / zap_huge_pmd, both a folio put) gives it back: refcount 1 again, no pgmap put.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE
from hmmirror.kernel.sched import run_until_blocked
from hmmirror.mm.memremap import devm_memremap_pages_release

MiB = 1 << 20


@pytest.mark.parametrize("align", [PAGE_SIZE, PMD_SIZE], ids=["pte", "pmd"])
def test_a_mapped_dax_page_does_not_hold_up_the_teardown_and_its_zap_puts_the_leaf_reference(align: int) -> None:
    m = Machine("6.18", ram=256 * MiB)
    pmem = m.add_pmem("pmem0", 64 * MiB, "devdax", align)
    p = m.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 5 * PAGE_SIZE, 1)
    lvl, _, _ = p.mm.pt.lookup(a + 5 * PAGE_SIZE)
    assert lvl == ("pte" if align == PAGE_SIZE else "pmd")
    head = pmem.start_pfn + (5 if align == PAGE_SIZE else 0)
    pgmap = pmem.pgmap
    npages = pgmap.res.npages
    assert int(m.mem.refcount[head]) == 2                     # idle 1 + the one leaf that maps it
    gen = devm_memremap_pages_release(m, pgmap)               # no unmap_mapping_range first: still mapped
    assert run_until_blocked(gen) == ("done", 0)              # nothing to wait for
    assert pgmap.state == "removed" and pgmap.count == 0
    assert pgmap.ref.stats["put_many"] == npages              # every per-page reference at once
    assert int(m.mem.refcount[head]) == 2                     # the pages are not put


@pytest.mark.parametrize("align", [PAGE_SIZE, PMD_SIZE], ids=["pte", "pmd"])
def test_zapping_a_dax_leaf_gives_back_its_folio_reference(align: int) -> None:
    m = Machine("6.18", ram=256 * MiB)
    pmem = m.add_pmem("pmem0", 64 * MiB, "devdax", align)
    p = m.spawn("p")
    a = p.mmap(4 * MiB, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 5 * PAGE_SIZE, 1)
    head = pmem.start_pfn + (5 if align == PAGE_SIZE else 0)
    count = pmem.pgmap.count
    assert int(m.mem.refcount[head]) == 2
    assert p.munmap(a, 4 * MiB) == 0
    assert int(m.mem.refcount[head]) == 1 and int(m.mem.mapcount[head]) == 0
    assert pmem.pgmap.count == count                          # a leaf holds no pgmap reference


def test_5_2_teardown_puts_every_device_page_and_waits_for_one_still_referenced() -> None:
    # 5.2 devm_memremap_pages_release(): put_page() of every device page; a page somebody still holds (here a
    # reference taken the way GUP's get_page does) keeps its pgmap reference until its last put
    m = Machine("5.2", ram=256 * MiB)
    pmem = m.add_pmem("pmem0", 64 * MiB, "devdax", PAGE_SIZE)
    pgmap = pmem.pgmap
    pfn = pmem.start_pfn + 3
    m.mem.get_page(pfn)
    gen = devm_memremap_pages_release(m, pgmap)
    point = run_until_blocked(gen)
    assert point != ("done", 0) and pgmap.state == "draining" and pgmap.count == 1
    m.mem.put_page(pfn)                                       # the holder's put: 0, the page's pgmap reference
    assert pgmap.count == 0
    assert run_until_blocked(gen) == ("done", 0) and pgmap.state == "removed"
