"""memory_failure() of page-cache and DAX pages (mm/memory-failure.c, 5.2 and 6.x).

The anonymous case (an exclusively mapped 4 KiB anonymous page becomes a hwpoison entry) is
``hmmirror.sim.kevents.memory_failure``; the other kinds of page are here, as the ``memory_failure`` event drives
them (an asynchronous report, not MF_ACTION_REQUIRED: a patrol scrub or a corrected-then-uncorrectable error):

* **page cache** (ext4/xfs/shmem, order-0 folio): ``TestSetPageHWPoison``, the reference memory_failure holds
  (``get_hwpoison_page``), then ``hwpoison_user_mappings``: a clean folio of a mapping that can write back
  (ext4, xfs) whose PTEs ``folio_mkclean`` finds clean is *dropped without side effects* -- ``try_to_unmap``
  without TTU_HWPOISON clears its PTEs --; a dirty one (or one ``folio_mkclean`` found dirty through a PTE, or
  any shmem folio: shmem cannot write back) gets a hwpoison entry in every PTE mapping it.  Each mapping is
  changed under MMU_NOTIFY_CLEAR of that page (``try_to_unmap_one``); ``folio_mkclean`` write-protects and cleans
  the dirty/writable PTEs first under MMU_NOTIFY_PROTECTION_PAGE (``page_vma_mkclean_one``).  Then
  ``me_pagecache_clean``/``me_pagecache_dirty``: ext4/xfs ``error_remove_page`` truncates the page out of the
  page cache (``truncate_inode_page``: a later fault reads the block again), shmem keeps it (``shmem_error_remove
  _page`` returns 0: a later fault finds the poisoned page, ``__do_fault`` returns VM_FAULT_HWPOISON).  A large
  folio: [5.2] a non-anonymous THP is refused (``-EBUSY``, PG_hwpoison cleared again); [6.x]
  ``try_to_split_thp_page``: a clean ext4/xfs folio is split (unmapped whole from every mapping, then order-0
  folios); a dirty one cannot be (``filemap_release_folio`` refuses its private state) and shmem THP splitting is
  not modelled: ``MF_MSG_UNSPLIT_THP``, ignored (``-EBUSY``), the page stays poisoned.  With the default ``vm.memory_failure_early_kill = 0`` an asynchronous report kills nobody
  (``collect_procs`` takes early-kill tasks only); the process gets SIGBUS when it touches a hwpoison entry.
* **DAX** (fsdax and device-dax pages, ZONE_DEVICE): ``memory_failure_dev_pagemap`` [5.2] /
  ``mf_generic_kill_procs`` [6.x]: ``dax_lock_page`` (no mapping: -EBUSY), ``SetPageHWPoison``, MF_MUST_KILL,
  and ``unmap_and_kill``: ``unmap_mapping_range`` of the file range the largest mapping covers (the page, or
  its 2 MiB / 1 GiB block: device-dax mappings are not broken up) -- the entries become none, not hwpoison
  entries -- then ``kill_procs``: SIGBUS (BUS_MCEERR_AO) to every process that mapped it.  The model does not
  deliver signals: the process is taken to handle SIGBUS (as databases on pmem do) and goes on.  A DAX fault
  maps the poisoned pfn again (the pmem badblocks list the MCE path fills is not modelled).

The PTEs mapping a page are found by the model's rmap scan (``rmap.rmap_find``), each changed under its PTE lock;
a page-cache page's scans hold its mapping's ``i_mmap_rwsem`` for read, as rmap_walk_file() does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.include.mm_types import MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm import rmap
from hmmirror.mm.memory import pte_lockptr
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

EINVAL, EBUSY, ENXIO, EHWPOISON = 22, 16, 6, 133
_NOT_HWPOISON = 0xFFFF_FFFF & ~PG.hwpoison


def _ptl(mm: "MMStruct", addr: int) -> Any:
    pudp = mm.pt.walk_to_pud(addr)
    return pte_lockptr(mm, mm.pt.pmd_offset(pudp, addr))


def _pte_maps(mm: "MMStruct", addr: int, pfn: int) -> Any:
    """The PTE pointer at ``addr`` if it is a present PTE mapping ``pfn``, else None."""
    level, ptep, pte = mm.pt.lookup(addr)
    if level != "pte" or ptep is None or not pte & x86._PAGE_PRESENT or x86.pte_pfn(pte) != pfn:
        return None
    return ptep


def _rmap_walk_file(mapping: Any, walk: Gen[int]) -> Gen[int]:
    """rmap_walk_file() (mm/rmap.c [5.2] / [6.x]): the walk of a page-cache folio's mappings runs under
    ``i_mmap_lock_read(mapping)`` -- so it neither overlaps a truncation's unmap nor mm_take_all_locks() (an mm
    registering its first mmu notifier waits for a walk in progress, and a walk waits for the registration)."""
    from hmmirror.mm.truncate import _i_mmap

    _vmas, lock = _i_mmap(mapping)
    if lock is None:
        return (yield from walk)
    yield from sched.down_read(lock)
    try:
        return (yield from walk)
    finally:
        sched.up_read(lock)


def folio_mkclean(machine: Any, pfn: int, mapping: Any = None) -> Gen[int]:
    """folio_mkclean() -> page_vma_mkclean_one() (mm/rmap.c): every PTE mapping ``pfn`` that is dirty or
    writable is write-protected and cleaned, under MMU_NOTIFY_PROTECTION_PAGE of that page (the walk under the
    ``mapping``'s i_mmap_rwsem, read).  Returns how many PTEs it changed (non-zero: dirty through a mapping)."""
    if mapping is not None:
        return (yield from _rmap_walk_file(mapping, folio_mkclean(machine, pfn)))
    cleaned = 0
    for mm, addr, pte in rmap.rmap_find(machine, np.array([pfn]), kinds=("present",)):
        if not (x86.pte_dirty(pte) or x86.pte_write(pte)):
            continue
        vma = mm.vma_lookup(addr)
        if vma is None:
            continue
        r = mmu_notifier_range_init(MMU_NOTIFY.PROTECTION_PAGE, vma, mm, addr, addr + PAGE_SIZE)
        yield from mmu_notifier_invalidate_range_start(r)
        ptl = _ptl(mm, addr)
        yield from sched.spin_lock(ptl)
        ptep = _pte_maps(mm, addr, pfn)
        if ptep is not None:
            cur = machine.pool.get(ptep)
            if x86.pte_dirty(cur) or x86.pte_write(cur):
                machine.pool.set(ptep, x86.pte_wrprotect(cur) & ~x86._PAGE_DIRTY)
                cleaned += 1
        sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
    return cleaned


def try_to_unmap_hwpoison(machine: Any, pfn: int, poison: bool, mapping: Any = None) -> Gen[int]:
    """try_to_unmap() -> try_to_unmap_one() (mm/rmap.c) of an order-0 page-cache page: every PTE mapping it
    becomes a hwpoison entry (``poison``, TTU_HWPOISON) or none, under MMU_NOTIFY_CLEAR of the page; the
    mapping's rmap and reference go (the dirty bit is carried to the folio).  The walk holds the ``mapping``'s
    i_mmap_rwsem for read (rmap_walk_file).  Returns how many it unmapped."""
    if mapping is not None:
        return (yield from _rmap_walk_file(mapping, try_to_unmap_hwpoison(machine, pfn, poison)))
    mem = machine.mem
    done = 0
    for mm, addr, _pte in rmap.rmap_find(machine, np.array([pfn]), kinds=("present",)):
        vma = mm.vma_lookup(addr)
        if vma is None:
            continue
        r = mmu_notifier_range_init(MMU_NOTIFY.CLEAR, vma, mm, addr, addr + PAGE_SIZE)
        yield from mmu_notifier_invalidate_range_start(r)
        ptl = _ptl(mm, addr)
        yield from sched.spin_lock(ptl)
        ptep = _pte_maps(mm, addr, pfn)
        if ptep is not None:
            cur = machine.pool.get(ptep)
            if cur & x86._PAGE_DIRTY:
                mem.flags[pfn] |= PG.dirty
            machine.pool.set(ptep, x86.make_hwpoison_entry(pfn) if poison else 0)
            rmap.page_remove_rmap(mem, pfn)
            mem.put_page(pfn)
            done += 1
        sched.spin_unlock(ptl)
        yield from mmu_notifier_invalidate_range_end(r)
    return done


def memory_failure_pagecache(mm: "MMStruct", vma: "VMA", addr: int, pfn: int) -> Gen[int]:
    """memory_failure() (mm/memory-failure.c [5.2] / [6.x]) of the page-cache page ``pfn`` mapped at ``addr``:
    poison, unmap from every mapping (hwpoison entries when dirty or shmem, plain unmap when clean), then
    drop it from the page cache (ext4/xfs) or keep it (shmem).  0, or -EBUSY / -EHWPOISON / -EINVAL.
    ``addr`` may be mapped by a PTE or [6.x] by the PMD of a 2 MiB folio (split first)."""
    machine = mm.machine
    mem = machine.mem
    file = vma.vm_file
    if file is None:
        return -EINVAL
    inode = file.inode
    mapping = inode.i_mapping
    index = vma.linear_page_index(addr)
    if mapping.find_page(index) != pfn:
        return -EINVAL
    if mem.flags[pfn] & PG.hwpoison:
        return -EHWPOISON                               # "already hardware poisoned"
    mem.flags[pfn] |= PG.hwpoison                       # TestSetPageHWPoison
    shmem = bool(getattr(vma.vm_ops, "is_shmem", False))
    can_writeback = not shmem                           # mapping_can_writeback(): ext4/xfs yes, shmem no
    head = mem.compound_head(pfn)
    first, end = (head - pfn + index, head - pfn + index + (1 << int(mem.order[head]))) if mem.order[head] \
        else mapping.folio_span(index)
    if end - first > 1:
        if machine.profile.name == "5.2":
            # [5.2] a non-anonymous THP is not handled: "non anonymous thp", unpoisoned, -EBUSY
            mem.flags[pfn] &= _NOT_HWPOISON
            machine.log("memory_failure", mm=mm.name, addr=addr, pfn=pfn, unmapped=False, kind="pagecache",
                        result="ignored: non anonymous thp")
            return -EBUSY
        frames = mapping.lookup_range(first, end)
        if shmem or (can_writeback and (mem.flags[frames[frames >= 0]] & PG.dirty).any()) or mem.order[head]:
            # [6.x] try_to_split_thp_page() fails: a dirty ext4/xfs folio's private state cannot be released
            # (filemap_release_folio); shmem and compound folios are not split by the model
            machine.log("memory_failure", mm=mm.name, addr=addr, pfn=pfn, unmapped=False, kind="pagecache",
                        result="ignored: large folio not split (MF_MSG_UNSPLIT_THP)")
            return -EBUSY
        # [6.x] try_to_split_thp_page() of a clean page-cache folio: split_folio() unmaps the whole folio from
        # every mapping (remap_page() skips file folios), the pages become order-0 folios
        from hmmirror.mm.truncate import split_cache_folio, unmap_mapping_pages
        yield from unmap_mapping_pages(mapping, first, end - first, False)
        split_cache_folio(mapping, first, end, [0] * (end - first))
    mem.get_page(pfn)                                   # get_hwpoison_page(): memory_failure's reference
    yield from sched.might_sleep("hwpoison_user_mappings")                           # mapping_can_writeback(): ext4/xfs yes, shmem no
    poison = True
    if can_writeback and not mem.flags[pfn] & PG.dirty:
        if (yield from folio_mkclean(machine, pfn, mapping)):
            mem.flags[pfn] |= PG.dirty                  # folio_set_dirty()
        else:
            poison = False                              # "corrupted page was clean: dropped without side effects"
    unmapped = yield from try_to_unmap_hwpoison(machine, pfn, poison, mapping)
    dirty = bool(mem.flags[pfn] & PG.dirty)
    if can_writeback:
        # me_pagecache_clean/_dirty -> generic_error_remove_page -> truncate_inode_page(): out of the page
        # cache (a dirty page also sets AS_EIO on the mapping: the data is lost)
        mapping.delete_range(mem, index, index + 1)
        if dirty:
            inode.__dict__["wb_err"] = -5              # mapping_set_error(mapping, -EIO)
    machine.log("memory_failure", mm=mm.name, addr=addr, pfn=pfn, unmapped=bool(unmapped), kind="pagecache",
                result="dirty: hwpoison entries" if poison else "clean: dropped", kept_in_cache=not can_writeback)
    return 0


def memory_failure_dev_pagemap(mm: "MMStruct", vma: "VMA", addr: int, pfn: int) -> Gen[int]:
    """memory_failure_dev_pagemap() [5.2] / mf_generic_kill_procs() + unmap_and_kill() [6.x] of the DAX page
    ``pfn`` (fsdax or device-dax) mapped at ``addr``: poison it, unmap the file range of the largest mapping
    of it (``unmap_mapping_range``: the entries become none) and SIGBUS the processes that mapped it."""
    from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE, get_dev_pagemap, put_dev_pagemap
    from hmmirror.mm.truncate import unmap_mapping_range

    machine = mm.machine
    mem = machine.mem
    pgmap = get_dev_pagemap(machine, pfn, None)
    if pgmap is None:
        return -ENXIO                                   # a dying namespace: no live pgmap for the pfn
    try:
        file = vma.vm_file
        mapping = getattr(file, "inode", None) if file is not None else None
        if mapping is None:
            return -EBUSY                                # dax_lock_page(): no mapping to lock
        if getattr(pgmap, "type", None) == MEMORY_DEVICE_PRIVATE:
            return -ENXIO                                # device memory that may need the device: not handled
        if pfn < mem.nr_pfns:
            mem.flags[pfn] |= PG.hwpoison               # SetPageHWPoison
        # the size of the largest mapping of the page (dev_pagemap_mapping_shift): PUD, PMD or PTE
        level, _p, _e = mm.pt.lookup(addr)
        size = {"pud": 1 << 30, "pmd": 2 << 20}.get(level, PAGE_SIZE)
        index = vma.linear_page_index(addr)
        start = (index << PAGE_SHIFT) & ~(size - 1)
        yield from sched.might_sleep("unmap_and_kill")
        yield from unmap_mapping_range(mapping, start, size, False)
        machine.log("memory_failure", mm=mm.name, addr=addr, pfn=pfn, unmapped=True, kind="dax",
                    result=f"unmapped {size >> PAGE_SHIFT} pages; SIGBUS (BUS_MCEERR_AO) to the mapping processes")
        return 0
    finally:
        put_dev_pagemap(pgmap)
