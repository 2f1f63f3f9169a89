"""Folio references and the folio lock (include/linux/mm.h, include/linux/pagemap.h, mm/filemap.c).

The lock is the ``PG.locked`` bit of ``PhysMem.flags`` (no owner is recorded, as in the kernel).  ``folio_lock``
sleeps until the bit is clear (a :func:`~hmmirror.kernel.sched.wait_event`); ``folio_trylock`` never sleeps, so
it may be called under a page-table spinlock, as migrate_vma_collect_pmd() does.  A pfn stands for its folio
(the head frame is looked up with ``compound_head``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.page_alloc import PhysMem

#: GUP_PIN_COUNTING_BIAS (include/linux/mm.h): a FOLL_PIN on a small folio adds this to its refcount
GUP_PIN_COUNTING_BIAS = 1024


def folio_test_locked(mem: "PhysMem", pfn: int) -> bool:
    """folio_test_locked()."""
    return bool(mem.flags[mem.compound_head(pfn)] & PG.locked)


def folio_trylock(mem: "PhysMem", pfn: int) -> bool:
    """folio_trylock(): take the folio lock if it is free; never sleeps."""
    head = mem.compound_head(pfn)
    if mem.flags[head] & PG.locked:
        return False
    mem.flags[head] |= PG.locked
    return True


def folio_lock(mem: "PhysMem", pfn: int, what: str = "folio_lock") -> Gen[None]:
    """folio_lock() / lock_page(): sleep until the folio lock is free, then take it."""
    head = mem.compound_head(pfn)
    yield from sched.might_sleep(what)
    while mem.flags[head] & PG.locked:
        yield from sched.wait_event(lambda: not mem.flags[head] & PG.locked, what)
    mem.flags[head] |= PG.locked


def folio_unlock(mem: "PhysMem", pfn: int) -> None:
    """folio_unlock() / unlock_page(); unlocking an unlocked folio is a kernel BUG (VM_BUG_ON_FOLIO)."""
    head = mem.compound_head(pfn)
    if not mem.flags[head] & PG.locked:
        sched.report("BUG_ON", f"folio_unlock of unlocked folio {head:#x}")
        return
    mem.flags[head] &= PG.mask(PG.locked)


def folio_wait_locked(mem: "PhysMem", pfn: int, what: str = "folio_wait_locked") -> Gen[None]:
    """folio_wait_locked() / migration_entry_wait_on_locked(): sleep until the folio lock is released."""
    head = mem.compound_head(pfn)
    yield from sched.wait_event(lambda: not mem.flags[head] & PG.locked, what)


def folio_get(mem: "PhysMem", pfn: int) -> None:
    """folio_get() / get_page(): one more reference (the caller already holds one, or the page is mapped)."""
    mem.get_page(pfn)


def folio_try_get(mem: "PhysMem", pfn: int) -> bool:
    """folio_try_get() / get_page_unless_zero(): a reference unless the folio is free (refcount 0)."""
    head = mem.compound_head(pfn)
    if mem.refcount[head] <= 0:
        return False
    mem.refcount[head] += 1
    return True


def folio_put(mem: "PhysMem", pfn: int) -> None:
    """folio_put() / put_page(): drop a reference; the folio is freed at zero."""
    mem.put_page(pfn)


def folio_maybe_dma_pinned(mem: "PhysMem", pfn: int) -> bool:
    """folio_maybe_dma_pinned(): a small folio with GUP_PIN_COUNTING_BIAS or more references may be pinned."""
    return int(mem.refcount[mem.compound_head(pfn)]) >= GUP_PIN_COUNTING_BIAS
