"""Swap-out of anonymous pages and swap-in faults (mm/vmscan.c, mm/rmap.c try_to_unmap_one, mm/memory.c
do_swap_page).  Optional in the model: the probe machine has no swap (mm-substrate.md §5.10).

The model's swap device is synchronous (``SWP_SYNCHRONOUS_IO``, like zram): a swap-in reads the slot at once
into a new page, there is no swap cache and the fault never returns ``VM_FAULT_RETRY``.  Slots live in
``machine.swap.slots`` (offset -> the page bytes, ``None`` for a page that only ever read as zeroes) with a
use count in ``machine.swap.swap_map`` (fork duplicates an entry with ``machine.swap.swap_duplicate``).
Model simplification: when a slot is shared (count > 1, after fork) each swap-in makes its own copy where
the kernel would share one swap-cache page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, SwpEntry, make_swap_entry, pte_pfn, pte_present, pte_special
from hmmirror.include.mm_types import MMU_NOTIFY, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.memory import maybe_mkwrite, mk_pte, pte_lockptr
from hmmirror.mm.mm_struct import vma_is_anonymous
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.memory import VmFault
    from hmmirror.mm.mm_struct import VMA, MMStruct

SWAP_DEVICE = 0                       # the model's single swap device (swap type 0)
EINVAL, EBUSY, EAGAIN = 22, 16, 11


def swapin(vmf: "VmFault", entry: SwpEntry) -> Gen[int]:
    """do_swap_page() (mm/memory.c) for a genuine swap entry: read the slot into a new anonymous page and map
    it.  A write fault maps it writable and dirty; a read fault maps it read-only [5.2] or, the page being
    exclusive, writable if ``VM_WRITE`` [6.x] (``profile.swapin_exclusive_writable``).  Returns
    VM_FAULT_MAJOR (| WRITE), 0 if the entry changed meanwhile, VM_FAULT_OOM, or VM_FAULT_SIGBUS for a slot
    that holds nothing (a bad swap entry)."""
    vma, mm = vmf.vma, vmf.mm
    machine, pool, mem, swap = mm.machine, mm.machine.pool, mm.machine.mem, mm.machine.swap
    if entry.type != SWAP_DEVICE or entry.offset not in swap.slots:
        return int(VM_FAULT.SIGBUS)
    assert vmf.pmdp is not None and vmf.ptep is not None
    yield from sched.might_sleep("swap_readpage")
    data = swap.slots.get(entry.offset)
    rmap.anon_vma_prepare(vma)
    pfn = mem.alloc_page()
    if pfn < 0:
        return int(VM_FAULT.OOM)
    if data:
        mem.write(pfn, 0, data)
    ptl = pte_lockptr(mm, vmf.pmdp)
    yield from sched.spin_lock(ptl)
    if pool.get(vmf.ptep) != vmf.orig_pte:            # someone else swapped it in (or zapped it)
        sched.spin_unlock(ptl)
        mem.put_page(pfn)
        return 0
    pte = mk_pte(pfn, vma.vm_page_prot)
    ret = int(VM_FAULT.MAJOR)
    if vmf.write:
        pte = maybe_mkwrite(x86.pte_mkdirty(pte), vma)
        ret |= int(VM_FAULT.WRITE)
    elif machine.profile.swapin_exclusive_writable and vma.vm_flags & VM.WRITE:
        pte = x86.pte_mkwrite(pte)                    # an exclusive anon page may be writable at once
    rmap.page_add_new_anon_rmap(mem, pfn)
    pool.set(vmf.ptep, x86.pte_mkyoung(pte))
    sched.spin_unlock(ptl)
    swap.release_entry(entry)                         # swap_free()
    machine.counters["pswpin"] += 1
    return ret


def model_swap_out(mm: "MMStruct", addr: int) -> Gen[int]:
    """Model reclaim of the anonymous 4 KiB page mapped at ``addr`` (our helper: shrink_page_list ->
    add_to_swap -> try_to_unmap_one -> pageout, for one page of one mm).

    A slot is reserved, the PTE becomes a swap entry under notifier CLEAR ``[addr, +4K)``, the slot gets the
    page's bytes as they are at the unmap (pageout after try_to_unmap), and the page is freed.  The unmap
    holds the anon_vma root rwsem for read (try_to_unmap -> rmap_walk_anon); folio_referenced() before it only
    trylocks it and leaves the page mapped (-EBUSY) when mm_take_all_locks() holds it.  Only a private
    anonymous page mapped once by a PTE and not otherwise referenced is reclaimed: -EINVAL when nothing suitable is mapped there (no VMA, not anonymous, zero page, a THP),
    -EBUSY when the page is shared, pinned or mlocked, -EAGAIN when the entry changed meanwhile.
    """
    machine = mm.machine
    pool, mem, swap = machine.pool, machine.mem, machine.swap
    addr &= ~(PAGE_SIZE - 1)
    vma = mm.vma_lookup(addr)
    if vma is None or not (vma_is_anonymous(vma) or vma.anon_vma):
        return -EINVAL
    level, ptep, pte = mm.pt.lookup(addr)
    if level != "pte" or ptep is None or not pte_present(pte) or not pte & x86._PAGE_PRESENT or pte_special(pte):
        return -EINVAL
    pfn = pte_pfn(pte)
    if pfn >= mem.nr_ram or not mem.flags[pfn] & PG.anon or int(mem.order[mem.compound_head(pfn)]) != 0:
        return -EINVAL
    if vma.vm_flags & VM.LOCKED or int(mem.mapcount[pfn]) != 1 or int(mem.refcount[pfn]) != 1:
        return -EBUSY
    anon_vma = vma.anon_vma
    if anon_vma is not None:
        # folio_check_references() -> folio_referenced(): its rmap walk only trylocks the anon_vma
        # (rwc.try_lock); contended -- mm_take_all_locks() holds it for write -- the folio is activated
        if not sched.down_read_trylock(anon_vma.root.rwsem):
            return -EBUSY
        rmap.anon_vma_unlock_read(anon_vma)
    yield from sched.might_sleep("add_to_swap")
    offset = swap.next_slot
    swap.next_slot += 1
    swap.slots[offset] = None                         # the slot is reserved; pageout fills it (below)
    swap.swap_map[offset] = 1
    if anon_vma is not None:
        # try_to_unmap() -> rmap_walk_anon(): the anon_vma root rwsem is held for read across every
        # try_to_unmap_one(), so mm_take_all_locks() (a first mmu notifier registering) waits for the unmap
        yield from rmap.anon_vma_lock_read(anon_vma)
    try:
        ret = yield from _try_to_unmap_one(mm, vma, addr, ptep, pte, pfn, offset)
    finally:
        if anon_vma is not None:
            rmap.anon_vma_unlock_read(anon_vma)
    if ret < 0:
        return ret
    mem.put_page(pfn)                                 # the page is freed after pageout
    machine.counters["pswpout"] += 1
    machine.log("swap_out", mm=mm.name, addr=addr, slot=offset)
    return 0


def _try_to_unmap_one(mm: "MMStruct", vma: "VMA", addr: int, ptep: Any, pte: int, pfn: int, offset: int) -> Gen[int]:
    """try_to_unmap_one() (mm/rmap.c [5.2] / [6.x]) of the page ``pfn`` mapped by ``pte`` at ``addr``: the
    PTE becomes the swap entry of slot ``offset`` under MMU_NOTIFY_CLEAR of the page (pageout's copy of the
    bytes taken with it).  0, or -EAGAIN (slot released) when the PTE changed meanwhile."""
    machine = mm.machine
    pool, mem, swap = machine.pool, machine.mem, machine.swap
    r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + PAGE_SIZE)
    yield from mmu_notifier_invalidate_range_start(r)
    ptl = pool.ptlock(ptep[0])                        # the PTE table's split lock
    yield from sched.spin_lock(ptl)
    if pool.get(ptep) != pte:
        sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
        swap.release_entry(SwpEntry(SWAP_DEVICE, offset))
        return -EAGAIN
    pool.set(ptep, make_swap_entry(SWAP_DEVICE, offset))
    rmap.page_remove_rmap(mem, pfn)                   # try_to_unmap_one: still under the PTE lock
    # pageout() runs after try_to_unmap() in shrink_folio_list() (mm/vmscan.c, 5.2-6.18): the slot gets the
    # bytes as they are once nothing maps the page, writes made between add_to_swap and the unmap included
    # (a CPU store, or a device storing through its mirror before its invalidate callback ran).  Taken here,
    # under the PTE lock, so a swap-in racing with the rest of the unmap reads them too (no swap cache).
    data = mem.contents.get(pfn)
    swap.slots[offset] = bytes(data) if data is not None else None
    sched.spin_unlock(ptl)
    yield from mmu_notifier_invalidate_range_end(r)
    return 0

