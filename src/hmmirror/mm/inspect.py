"""Per-page inspection of the model's page tables (our own helper, in the vocabulary of
:mod:`hmmirror.include.pagestate`; its pagemap-like fields follow fs/proc/task_mmu.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE, pte_to_swp_entry
from hmmirror.include.pagestate import PageState
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct


def _swap_kind(e: int) -> str:
    s = pte_to_swp_entry(e)
    if x86.is_migration_entry(s):
        return "migration"
    if x86.is_device_private_entry(s):
        return "device_private"
    if x86.is_device_exclusive_entry(s):
        return "device_exclusive"
    if x86.is_hwpoison_entry(s):
        return "hwpoison"
    if x86.is_pte_marker(s):
        return "marker"
    return "swap"


def _folio_mapped_only_here(mm: "MMStruct", addr: int, pfn: int, head: int, order: int) -> bool:
    """[6.18] ``!folio_maybe_mapped_shared()``: every mapping of the large folio is one of this mm's
    entries over the folio's linear VA range (model: compares the folio's total mapcount with them)."""
    import numpy as np

    mem = mm.machine.mem
    n = 1 << order
    total = int(mem.mapcount[head: head + n].sum())
    base = addr - ((pfn - head) << 12)
    here = 0
    for a in range(base, base + n * PAGE_SIZE, PAGE_SIZE):
        lvl, p, e = mm.pt.lookup(a)
        if p is None or x86.pte_none(e) or not x86.pte_present(e) and not (lvl != "pte" and e & x86._PAGE_PSE):
            continue
        off = (a & ((PMD_SIZE if lvl == "pmd" else PUD_SIZE) - 1)) >> 12 if lvl != "pte" else 0
        if head <= x86.pte_pfn(e) + off < head + n:
            here += 1
    _ = np
    return total == here


def model_page_state(mm: "MMStruct", addr: int, _memo: dict[int, bool] | None = None) -> PageState:
    """The state of the 4 KiB page at ``addr`` as the model's page tables describe it."""
    mem = mm.machine.mem
    level, p, e = mm.pt.lookup(addr)
    if p is None or x86.pte_none(e):
        return PageState(addr, False, None, "none", None, None, False, False, False, False, False, False)
    if level != "pte" and not x86.pmd_leaf(e) and e & x86._PAGE_PRESENT:
        return PageState(addr, False, None, "none", None, None, False, False, False, False, False, False)
    if not x86.pte_present(e) and not (level != "pte" and e & x86._PAGE_PSE):
        kind = _swap_kind(e)
        return PageState(addr, False, None, kind, level, None, False, False, False, False, True, False)
    off = (addr & ((PMD_SIZE if level == "pmd" else PUD_SIZE) - 1)) >> 12 if level != "pte" else 0
    pfn = x86.pte_pfn(e) + off
    special = level == "pte" and x86.pte_special(e)
    has_meta = pfn < mem.nr_pfns
    fl = int(mem.flags[pfn]) if has_meta else 0
    zero = bool(fl & PG.zero)
    if zero:
        kind = "zero"
    elif fl & PG.device:
        kind = "devmap"
    elif special or not has_meta:
        kind = "special"
    elif fl & PG.hugetlb:
        kind = "hugetlb"
    elif fl & PG.anon:
        kind = "anon"
    elif fl & PG.swapbacked:
        kind = "shmem"
    else:
        kind = "file"
    # pagemap: FILE for a struct page that is not anon (the huge zero folio included, the zero PTE not)
    page = has_meta and not special and not (fl & PG.device and not mm.machine.profile.dax_refcounted)
    file_bit = page and not fl & PG.anon
    # PM_MMAP_EXCLUSIVE: the precise mapcount of the page is 1 (mapcount[] counts a PMD leaf in each of its
    # frames, so it is page->_mapcount + 1 + the folio's entire mapcount); a PMD leaf may read its head's
    exclusive = page and not zero and int(mem.mapcount[pfn]) == 1
    if page and not zero and level == "pmd" and mm.machine.profile.pagemap_pmd_exclusive_head \
            and pfn < mem.nr_ram and not fl & PG.hugetlb:
        exclusive = int(mem.mapcount[pfn - off]) == 1
    if page and not zero and mm.machine.profile.pagemap_exclusive_per_folio and pfn < mem.nr_ram:
        head = mem.compound_head(pfn)
        order = int(mem.order[head])
        if order and not fl & PG.hugetlb:
            memo = _memo if _memo is not None else {}
            if head not in memo:
                memo[head] = _folio_mapped_only_here(mm, addr, pfn, head, order)
            exclusive = memo[head]
    return PageState(
        addr=addr, present=True, pfn=pfn, kind=kind, level=level, write=x86.pte_write(e), zero=zero,
        huge=level != "pte", file=bool(file_bit), exclusive=bool(exclusive), swapped=False,
        protnone=x86.pte_protnone(e),
    )


def inspect_range(mm: "MMStruct", start: int, end: int) -> list[PageState]:
    """Per-page states of ``[start, end)``."""
    memo: dict[int, bool] = {}
    return [model_page_state(mm, a, memo) for a in range(start, end, PAGE_SIZE)]
