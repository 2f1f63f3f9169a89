"""Inodes, open files and the page cache of an inode (include/linux/fs.h: ``struct inode``, ``struct file``,
``struct address_space``).

The page cache of an inode is one numpy ``int64`` array indexed by page index (hugetlbfs: by huge-page index)
holding the pfn cached there, ``-1`` where nothing is cached.  A large folio (a tmpfs huge page, a 6.18
PMD-sized page-cache folio, a hugetlb page) fills the slots of all its subpages with consecutive pfns (hugetlbfs:
one slot per huge page holding the head pfn).  There is no Python object per cached page; the per-page state
(uptodate, dirty, locked, file or swap-backed) is in ``PhysMem.flags``.

Counting convention (docs/design.md): while a folio is in a page cache it holds exactly one reference on its
head, whatever its size; every leaf entry mapping it holds one more.  So an unmapped cached 4 KiB page has
refcount 1 and a page mapped by ``n`` PTEs has refcount ``n + 1`` and mapcount ``n``.

Per-block state of a disk file (``Inode.blocks``, one int8 per 4 KiB page): ``HOLE``, ``DATA`` (written) or
``UNWRITTEN`` (fallocated, reads as zeroes).  The model keeps no disk contents: a page read from disk reads as
zeroes (model simplification; bytes written through a mapping stay in the cached page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT
from hmmirror.kernel.sched import Lock, lockdep_set_class
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.fs.super import SuperBlock
    from hmmirror.mm.mm_struct import VMA
    from hmmirror.mm.page_alloc import PhysMem

HOLE, DATA, UNWRITTEN = 0, 1, 2


def pages_of(nbytes: int, shift: int = PAGE_SHIFT) -> int:
    """DIV_ROUND_UP(size, PAGE_SIZE): pages needed to hold ``nbytes`` (``shift``: page size of the index)."""
    return (nbytes + (1 << shift) - 1) >> shift


class AddressSpace:
    """``struct address_space``: the page cache of one inode, index -> pfn (``-1``: not cached).

    ``i_mmap_rwsem`` is the rwsem the kernel takes around walks of ``i_mmap`` (unmap_mapping_range).
    """

    def __init__(self, host: "Inode", nr_slots: int = 0) -> None:
        self.host = host
        self.pages = np.full(max(nr_slots, 16), -1, dtype=np.int64)
        self.nrpages = 0                                  # cached slots (a 2 MiB folio fills 512)
        # [6.18] large page-cache folios of 4 KiB frames: order of the folio holding each slot (naturally
        # aligned in the file); None while every folio is a single page.  Only the folio's extent matters
        # to the model (how much fault-around maps), not physical contiguity.
        self.folio_order: np.ndarray | None = None
        self.i_mmap_rwsem = Lock(f"{host.path}.i_mmap_rwsem", "rwsem")
        # lockdep: __address_space_init_once()'s init_rwsem() gives every mapping's i_mmap_rwsem one class;
        # hugetlbfs_get_inode() sets hugetlbfs_i_mmap_rwsem_key (fs/hugetlbfs/inode.c [6.x]), ordered first
        lockdep_set_class(self.i_mmap_rwsem, "hugetlbfs_i_mmap_rwsem_key"
                          if getattr(getattr(host, "sb", None), "fstype", None) == "hugetlbfs"
                          else "mapping->i_mmap_rwsem")

    @property
    def i_mmap(self) -> "list[VMA]":
        """The VMAs mapping this file (kept on the inode, as the design doc describes)."""
        return self.host.i_mmap

    def _ensure(self, n: int) -> None:
        if n > self.pages.shape[0]:
            grown = np.full(max(n, self.pages.shape[0] * 2), -1, dtype=np.int64)
            grown[: self.pages.shape[0]] = self.pages
            self.pages = grown
            if self.folio_order is not None:
                orders = np.zeros(grown.shape[0], dtype=np.uint8)
                orders[: self.folio_order.shape[0]] = self.folio_order
                self.folio_order = orders

    def folio_span(self, index: int) -> tuple[int, int]:
        """The slots ``[first, end)`` of the (possibly large) folio holding ``index``."""
        if self.folio_order is None or index >= self.folio_order.shape[0]:
            return index, index + 1
        n = 1 << int(self.folio_order[index])
        first = index & ~(n - 1)
        return first, first + n

    def set_folio_orders(self, start: int, orders: list[int]) -> None:
        """Record consecutive folios of the given orders from slot ``start`` on."""
        if self.folio_order is None:
            self.folio_order = np.zeros(self.pages.shape[0], dtype=np.uint8)
        idx = start
        for o in orders:
            self._ensure(idx + (1 << o))
            self.folio_order[idx: idx + (1 << o)] = o
            idx += 1 << o

    # -- lookups (plain: the kernel does them under RCU) -----------------------------------------------------
    def find_page(self, index: int) -> int:
        """find_get_entry() without the reference: the pfn cached at ``index`` or -1."""
        if index < 0 or index >= self.pages.shape[0]:
            return -1
        return int(self.pages[index])

    def find_get_page(self, mem: "PhysMem", index: int) -> int:
        """find_get_page(): the pfn cached at ``index`` with a new reference on its folio, or -1."""
        pfn = self.find_page(index)
        if pfn >= 0:
            mem.get_page(pfn)
        return pfn

    def lookup_range(self, start: int, end: int) -> np.ndarray:
        """The slots ``[start, end)`` (a copy; -1 where nothing is cached or beyond the array)."""
        out = np.full(max(end - start, 0), -1, dtype=np.int64)
        hi = min(end, self.pages.shape[0])
        if hi > start:
            out[: hi - start] = self.pages[start:hi]
        return out

    def range_empty(self, start: int, end: int) -> bool:
        """No slot of ``[start, end)`` is cached."""
        hi = min(end, self.pages.shape[0])
        return hi <= start or not (self.pages[start:hi] >= 0).any()

    def cached_indices(self) -> np.ndarray:
        """Indices of every cached slot."""
        return np.flatnonzero(self.pages >= 0)

    # -- insertion and removal -------------------------------------------------------------------------------
    def add_to_page_cache(self, index: int, pfn: int, nr: int = 1) -> None:
        """add_to_page_cache_lru() / filemap_add_folio(): slots ``[index, index+nr)`` get ``pfn..pfn+nr-1``.

        The folio's allocation reference becomes the cache's reference (not taken again here).
        """
        self._ensure(index + nr)
        self.pages[index: index + nr] = np.arange(pfn, pfn + nr, dtype=np.int64)
        self.nrpages += nr
        if self.folio_order is not None:                 # a new folio: its extent is its compound order
            self.folio_order[index: index + nr] = 0

    def add_huge(self, index: int, head: int) -> None:
        """hugetlb_add_to_page_cache(): one slot (a huge-page index) holds the head pfn."""
        self._ensure(index + 1)
        self.pages[index] = head
        self.nrpages += 1

    def delete_range(self, mem: "PhysMem", start: int, end: int, per_slot_heads: bool = False) -> int:
        """delete_from_page_cache() over ``[start, end)``: empty the slots; a folio whose last slot went
        drops the cache's reference (freed if nothing else holds it).  Returns the number of slots emptied.

        ``per_slot_heads``: every slot holds a head pfn (hugetlbfs).
        """
        hi = min(end, self.pages.shape[0])
        if hi <= start:
            return 0
        sl = self.pages[start:hi]
        present = sl[sl >= 0].copy()
        if not present.size:
            return 0
        if self.folio_order is not None:                 # the slots' folios are gone with them
            self.folio_order[start:hi][sl >= 0] = 0
        sl[sl >= 0] = -1
        self.nrpages -= int(present.size)
        if per_slot_heads:
            heads = present
        else:
            order = mem.order[present].astype(np.int64)
            heads = np.unique(present & ~((np.int64(1) << order) - 1))
        for head in heads.tolist():
            n = 1 << int(mem.order[head])
            if not per_slot_heads and n > 1:
                # a large folio stays cached while any of its slots remains
                lo = max(start - n, 0)
                window = self.pages[lo: hi + n]
                if ((window >= head) & (window < head + n)).any():
                    continue
            mem.flags[head: head + n] &= ~np.uint32(PG.file | PG.dirty)
            mem.put_page(head)
        return int(present.size)

    def __repr__(self) -> str:
        return f"AddressSpace({self.host.path}, {self.nrpages} cached)"


class IMmap(list):  # type: ignore[type-arg]
    """``inode->i_mapping->i_mmap``: the VMAs mapping a file (a list; mm/ appends and removes).

    For a file that only its VMAs hold (shared anonymous memory, ``MAP_HUGETLB``: no file descriptor
    exists), removing the last VMA is the last ``fput``: the inode is evicted and its page cache freed
    (shmem_evict_inode / hugetlbfs_evict_inode).  Model shortcut for the missing file reference counts.
    """

    def __init__(self, inode: "Inode") -> None:
        super().__init__()
        self._inode = inode

    def remove(self, vma: "VMA") -> None:
        super().remove(vma)
        if not self and self._inode.release_on_last_unmap:
            self._inode.evict()


class Inode:
    """``struct inode``: a file's size, its mappings and its page cache.

    ``i_mmap`` lists the VMAs mapping the file (mmap/munmap/split keep it up to date).  ``blocks`` is the
    per-page block state of a disk file (``HOLE``/``DATA``/``UNWRITTEN``).  ``huge_shift`` is the page shift
    of the page-cache index (12, or 21 / 30 for hugetlbfs).  ``private`` holds backend-specific state (fsdax
    extents, hugetlb fault mutex, ...).
    """

    _next_ino = 1

    def __init__(self, sb: "SuperBlock", path: str, size: int, huge_shift: int = PAGE_SHIFT) -> None:
        self.sb = sb
        self.path = path
        self.i_ino = Inode._next_ino
        Inode._next_ino += 1
        self.i_size = size
        self.huge_shift = huge_shift
        self.i_mmap: list[VMA] = IMmap(self)
        self.blocks = np.zeros(pages_of(size), dtype=np.int8)
        self.i_mapping = AddressSpace(self, pages_of(size, huge_shift))
        self.private: dict[str, Any] = {}
        self.unlinked = False
        self.release_on_last_unmap = False     # only VMAs hold this file (shared anon, MAP_HUGETLB)

    def evict(self) -> int:
        """evict() -> truncate_inode_pages_final(): drop the whole page cache.  Returns the slots dropped."""
        mapping = self.i_mapping
        return mapping.delete_range(self.machine.mem, 0, mapping.pages.shape[0],
                                    per_slot_heads=self.huge_shift != PAGE_SHIFT)

    @property
    def machine(self) -> Any:
        return self.sb.machine

    @property
    def nr_pages(self) -> int:
        """Pages (of the index's size) below EOF: ``DIV_ROUND_UP(i_size, page size)``."""
        return pages_of(self.i_size, self.huge_shift)

    def set_blocks(self, start: int, end: int, state: int) -> None:
        """Record the block state of pages ``[start, end)`` (growing the array as needed)."""
        if end > self.blocks.shape[0]:
            grown = np.zeros(end, dtype=np.int8)
            grown[: self.blocks.shape[0]] = self.blocks
            self.blocks = grown
        self.blocks[start:end] = state

    def __repr__(self) -> str:
        return f"Inode({self.path}, {self.i_size} bytes, {self.sb.fstype})"


class File:
    """``struct file``: an open file.  ``mmap(vma)`` is ``f_op->mmap`` (sets ``vm_ops`` and flags).

    ``mmap_align`` (the alignment get_unmapped_area gives this file's mappings), ``huge_page_size``
    (hugetlbfs: lengths are rounded up to it) and ``huge`` (tmpfs/shmem huge pages allowed, read by
    ``transparent_hugepage_enabled``) are read by mm/.
    """

    def __init__(self, inode: Inode, readable: bool = True, writable: bool = True, map_flags: int = 0) -> None:
        self.inode = inode
        self.readable = readable
        self.writable = writable
        self.map_flags = map_flags
        self.f_op = inode.sb.s_type

    @property
    def f_mapping(self) -> AddressSpace:
        return self.inode.i_mapping

    @property
    def mmap_align(self) -> int:
        return int(self.f_op.mmap_align(self.inode))

    @property
    def huge_page_size(self) -> int:
        return (1 << self.inode.huge_shift) if self.inode.huge_shift != PAGE_SHIFT else 0

    @property
    def huge(self) -> bool:
        return bool(self.f_op.huge_enabled(self.inode))

    def mmap(self, vma: "VMA") -> int:
        """call_mmap(): ``f_op->mmap(file, vma)``; 0 or -errno."""
        return int(self.f_op.mmap(self, vma))

    def __repr__(self) -> str:
        return f"File({self.inode.path}, {'rw' if self.writable else 'ro'})"

