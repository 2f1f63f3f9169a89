"""Freeing a folio forgets the stored bytes of exactly its frames, whichever way ``free_folio`` looks them up
(page by page for a small folio, through the few stored pages for a huge one)."""

from __future__ import annotations

from hmmirror.arch.x86.pgtable import HPAGE_PUD_NR
from hmmirror.mm.page_alloc import PhysMem


def test_freeing_a_huge_folio_forgets_only_its_stored_pages():
    mem = PhysMem(2 << 30, hugepages_1g=1)
    head = mem.alloc_hugetlb(18)
    small = mem.alloc_page()
    inside = [head, head + 5, head + HPAGE_PUD_NR - 1]
    outside = [small, head - 1, head + HPAGE_PUD_NR]
    for p in inside + outside:
        mem.write(p, 0, b"\xd1" * 8)
    mem.refcount[head] = 0
    mem.free_folio(head)
    assert sorted(mem.contents) == sorted(outside)
    assert mem.read(head + 5, 0, 8) == bytes(8)


def test_freeing_a_page_forgets_its_bytes_among_many():
    mem = PhysMem(64 << 20)
    pages = [mem.alloc_page() for _ in range(40)]
    for p in pages:
        mem.write(p, 8, b"x")
    mem.refcount[pages[7]] = 0
    mem.free_folio(pages[7])
    assert sorted(mem.contents) == sorted(p for p in pages if p != pages[7])
