"""Reverse-map counting (mm/rmap.c): mapcount updates for mapped frames.

Only mapcount is touched here; references are taken and dropped by the callers exactly where the kernel
does (a new anonymous page's allocation reference becomes its mapping's reference; a page-cache page's
``->fault`` reference becomes the mapping's; fork takes one with ``get_page``).  Frames that mappings do not
count (the zero pages, special pfns, device frames under profiles where DAX is not refcounted) are skipped
by :func:`counted`.
"""

from __future__ import annotations

import numpy as np

from hmmirror.mm.page_alloc import PG, PhysMem


def counted(mem: PhysMem, pfn: int, dax_refcounted: bool) -> bool:
    """Is a mapping of ``pfn`` reflected in refcount/mapcount?"""
    if pfn >= mem.nr_pfns:
        return False
    fl = int(mem.flags[pfn])
    if fl & PG.zero:
        return False
    if fl & PG.device:
        return dax_refcounted
    return True


def counted_mask(mem: PhysMem, pfns: np.ndarray, dax_refcounted: bool) -> np.ndarray:
    """Vectorised :func:`counted` over an array of pfns."""
    inside = pfns < mem.nr_pfns
    fl = np.zeros(pfns.shape, dtype=np.uint32)
    fl[inside] = mem.flags[pfns[inside]]
    ok = inside & ((fl & PG.zero) == 0)
    dev = (fl & PG.device) != 0
    if not dax_refcounted:
        ok &= ~dev
    return ok


def page_add_new_anon_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_add_new_anon_rmap() / folio_add_new_anon_rmap(): first mapping of a new anon page or THP."""
    mem.mapcount[pfn: pfn + nr] = 1
    mem.flags[pfn: pfn + nr] |= PG.anon | PG.anon_exclusive


def page_add_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_add_file_rmap() / page_dup_rmap() / page_add_anon_rmap(): one more mapping of ``nr`` frames."""
    mem.mapcount[pfn: pfn + nr] += 1


def page_remove_rmap(mem: PhysMem, pfn: int, nr: int = 1) -> None:
    """page_remove_rmap(): one mapping of ``nr`` frames less."""
    mem.mapcount[pfn: pfn + nr] -= 1
