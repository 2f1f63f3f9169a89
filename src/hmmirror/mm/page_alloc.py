"""Physical memory: frames, per-page metadata arrays, the allocator and sparse page contents.

``struct page`` becomes a column in a few numpy arrays indexed by pfn (struct-of-arrays): ``refcount``,
``mapcount``, ``flags`` and ``order``.  RAM occupies pfns ``[0, nr_ram)``; ZONE_DEVICE ranges (pmem) are
appended above RAM, 1 GiB aligned, by :meth:`PhysMem.add_device_range`.

Counting convention (the model's; the kernel stores ``_mapcount`` off by one):
* ``mapcount[pfn]`` = number of leaf entries mapping that 4 KiB frame (a PMD leaf counts for each of its
  512 frames, a PUD leaf for each of its 262144);
* ``refcount[head]`` = one per leaf entry mapping any frame of the folio, plus one while the folio is in a
  page cache / shmem file, plus one while it is free-standing and unmapped (just allocated).
  The zero page, the huge zero folio and special (PFNMAP) frames are not counted by mappings; DAX frames are
  counted or not according to the kernel profile.

Page contents are stored sparsely (mm/page_contents.py): a frame whose nonzero bytes are all in its first 8
(a data tag) is one integer in a per-chunk array, a frame with more holds a ``bytearray``; every other frame
reads as zeroes.
"""

from __future__ import annotations

import numpy as np

from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, HPAGE_PUD_NR, PAGE_SIZE
from hmmirror.mm.page_contents import DictContents, PageContents

#: the sparse content store; False: the reference (a ``bytearray`` per written page)
SPARSE_CONTENTS = True


class PG:
    """Page flag bits (include/linux/page-flags.h), the subset the model needs (plain ints: they are
    OR-ed into a numpy uint32 array)."""

    locked = 1 << 0
    uptodate = 1 << 1
    dirty = 1 << 2
    anon = 1 << 3            # PageAnon (mapping & PAGE_MAPPING_ANON)
    head = 1 << 4
    tail = 1 << 5
    hugetlb = 1 << 6
    zero = 1 << 7            # the zero page or a frame of the huge zero folio
    file = 1 << 8            # page-cache page of a regular file
    swapbacked = 1 << 9      # shmem / tmpfs page
    device = 1 << 10         # ZONE_DEVICE
    hwpoison = 1 << 11
    buddy = 1 << 12          # free
    reserved = 1 << 13
    anon_exclusive = 1 << 14  # PG_anon_exclusive [6.x]
    thp = 1 << 15            # part of a transparent huge folio
    readahead = 1 << 16      # PG_readahead: the page whose access starts the next (async) readahead

    @staticmethod
    def mask(bits: int) -> np.uint32:
        """``~bits`` as a uint32, to clear flags in place: ``mem.flags[pfn] &= PG.mask(PG.locked)``."""
        return np.uint32(0xFFFFFFFF ^ bits)


class PhysMem:
    """RAM and device frames with their metadata arrays."""

    def __init__(self, ram_bytes: int, hugepages_2m: int = 0, hugepages_1g: int = 0) -> None:
        if ram_bytes <= 0 or ram_bytes % (2 << 20):
            raise ValueError("RAM size must be a positive multiple of 2 MiB")
        self.nr_ram = ram_bytes // PAGE_SIZE
        n = self.nr_ram
        self.refcount = np.zeros(n, dtype=np.int32)
        self.mapcount = np.zeros(n, dtype=np.int32)
        self.flags = np.zeros(n, dtype=np.uint32)
        self.order = np.zeros(n, dtype=np.uint8)
        self.contents: PageContents | DictContents = PageContents() if SPARSE_CONTENTS else DictContents()
        self.flags[:] = PG.buddy
        self._init_pools(hugepages_2m, hugepages_1g)
        reserved = self.alloc_page()               # pfn 0 stays reserved (as low memory on x86)
        self.flags[reserved] = PG.reserved
        self.zero_pfn = self.alloc_page()
        self.flags[self.zero_pfn] = PG.zero | PG.reserved | PG.uptodate
        self._huge_zero_pfn = -1
        self.device_ranges: list[tuple[int, int, object]] = []   # (start_pfn, end_pfn, pgmap)

    # -- set-up --------------------------------------------------------------------------------------------
    def _init_pools(self, n2m: int, n1g: int) -> None:
        blocks = self.nr_ram // HPAGE_PMD_NR
        per_1g = HPAGE_PUD_NR // HPAGE_PMD_NR
        top = blocks
        self.hugetlb_free: dict[int, list[int]] = {9: [], 18: []}
        for _ in range(n1g):                       # 1 GiB pages from the top, 1 GiB aligned
            top = (top // per_1g) * per_1g - per_1g
            if top < 1:
                raise ValueError("not enough RAM for the 1 GiB hugetlb pool")
            self.hugetlb_free[18].append(top * HPAGE_PMD_NR)
        for _ in range(n2m):
            top -= 1
            if top < 1:
                raise ValueError("not enough RAM for the 2 MiB hugetlb pool")
            self.hugetlb_free[9].append(top * HPAGE_PMD_NR)
        self.hugetlb_total = {9: n2m, 18: n1g}
        for order, heads in self.hugetlb_free.items():
            heads.sort(reverse=True)               # pop() hands out the lowest first
            for h in heads:
                self.flags[h: h + (1 << order)] = PG.hugetlb
        # free 2 MiB blocks below `top`, as a stack handing out ascending pfns
        self._blocks = np.arange(top - 1, -1, -1, dtype=np.int64)
        self._nblocks = top
        self._free4k = np.zeros(2 * HPAGE_PMD_NR, dtype=np.int64)   # grows as 4 KiB pages are freed
        self._n4k = 0

    def add_device_range(self, npages: int, align_pages: int = HPAGE_PUD_NR, owner: object = None,
                         idle_refcount: int = 1) -> int:
        """Append a ZONE_DEVICE pfn range above everything so far; returns its first pfn.

        ``idle_refcount``: the count of a page nobody uses -- 1 for pmem (and every device page [5.2]),
        0 for device-private pages where the profile frees them at zero [6.0+]."""
        cur = self.refcount.shape[0]
        start = -(-cur // align_pages) * align_pages
        new = start + npages
        # np.zeros of a large array is calloc'd: the OS hands out zeroed pages as they are first touched, so the
        # unused pfns below the aligned start cost nothing (np.empty + a fill wrote every one).  Only RAM and the
        # device ranges hold frames: growing copies those, never the zero gaps between them (copying a gap
        # touched it: page faults on both arrays, 2.5 -> 0.37 ms for a second 32 MiB device range)
        spans = [(0, self.nr_ram)] + [(s, e) for s, e, _ in self.device_ranges]
        for name in ("refcount", "mapcount", "flags", "order"):
            arr = getattr(self, name)
            grown = np.zeros(new, dtype=arr.dtype)
            for s, e in spans:
                grown[s:e] = arr[s:e]
            setattr(self, name, grown)
        self.flags[start:new] = PG.device
        self.refcount[start:new] = idle_refcount   # idle device pages (memremap_pages)
        self.device_ranges.append((start, new, owner))
        return start

    @property
    def nr_pfns(self) -> int:
        return int(self.refcount.shape[0])

    # -- allocation ----------------------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self._nblocks == 0:
            return -1
        self._nblocks -= 1
        return int(self._blocks[self._nblocks]) * HPAGE_PMD_NR

    def alloc_page(self) -> int:
        """alloc_page(): one zeroed frame with refcount 1, or -1 when memory is exhausted."""
        if self._n4k == 0:
            base = self._take_block()
            if base < 0:
                return -1
            self._free4k[:HPAGE_PMD_NR] = np.arange(base + HPAGE_PMD_NR - 1, base - 1, -1)
            self._n4k = HPAGE_PMD_NR
        self._n4k -= 1
        pfn = int(self._free4k[self._n4k])
        self.flags[pfn] = 0
        self.refcount[pfn] = 1
        self.order[pfn] = 0
        return pfn

    def alloc_pages_bulk(self, n: int) -> np.ndarray:
        """alloc_pages_bulk(): up to ``n`` frames (fewer when memory runs out), each with refcount 1."""
        out = np.empty(n, dtype=np.int64)
        got = 0
        while got < n:
            if self._n4k == 0:
                base = self._take_block()
                if base < 0:
                    break
                self._free4k[:HPAGE_PMD_NR] = np.arange(base + HPAGE_PMD_NR - 1, base - 1, -1)
                self._n4k = HPAGE_PMD_NR
            k = min(n - got, self._n4k)
            out[got: got + k] = self._free4k[self._n4k - k: self._n4k][::-1]
            self._n4k -= k
            got += k
        out = out[:got]
        self.flags[out] = 0
        self.refcount[out] = 1
        self.order[out] = 0
        return out

    def alloc_folio(self, order: int = 9) -> int:
        """folio_alloc(order 9): a 2 MiB compound folio (head refcount 1), or -1."""
        assert order == 9
        head = self._take_block()
        if head < 0:
            return -1
        self._mark_compound(head, order, PG.thp)
        return head

    def _mark_compound(self, head: int, order: int, kind: int) -> None:
        n = 1 << order
        self.flags[head: head + n] = PG.tail | kind
        self.flags[head] = PG.head | kind
        self.order[head: head + n] = order
        self.refcount[head: head + n] = 0
        self.refcount[head] = 1

    def alloc_hugetlb(self, order: int) -> int:
        """dequeue_hugetlb_folio(): a page from the hugetlb pool of that order, or -1."""
        pool = self.hugetlb_free.get(order)
        if not pool:
            return -1
        head = pool.pop()
        self._mark_compound(head, order, PG.hugetlb)
        return head

    def huge_zero_pfn(self) -> int:
        """The huge zero folio (allocated on first use), or -1 when no 2 MiB block is free."""
        if self._huge_zero_pfn < 0:
            head = self._take_block()
            if head < 0:
                return -1
            self._mark_compound(head, 9, PG.zero | PG.reserved | PG.uptodate)
            self._huge_zero_pfn = head
        return self._huge_zero_pfn

    def is_zero_pfn(self, pfn: int) -> bool:
        """is_zero_pfn(): the 4 KiB shared zero page only."""
        return pfn == self.zero_pfn

    def is_huge_zero_pfn(self, pfn: int) -> bool:
        """is_huge_zero_pfn(): a frame of the huge zero folio."""
        h = self._huge_zero_pfn
        return h >= 0 and h <= pfn < h + HPAGE_PMD_NR

    # -- freeing -------------------------------------------------------------------------------------------
    def compound_head(self, pfn: int) -> int:
        """compound_head(): the head frame of the folio containing ``pfn``."""
        if pfn >= self.nr_ram:
            return pfn
        order = int(self.order[pfn])
        return pfn & ~((1 << order) - 1)

    def free_folio(self, head: int) -> None:
        """Return a folio whose refcount reached zero to the allocator (or to its hugetlb pool)."""
        order = int(self.order[head])
        n = 1 << order
        fl = int(self.flags[head])
        self.contents.drop_range(head, head + n)
        self.mapcount[head: head + n] = 0
        self.refcount[head: head + n] = 0
        if fl & PG.hugetlb:
            self.flags[head: head + n] = PG.hugetlb
            self.order[head: head + n] = 0
            self.hugetlb_free[order].append(head)
            return
        self.flags[head: head + n] = PG.buddy
        self.order[head: head + n] = 0
        if order == 9:
            self._blocks[self._nblocks] = head // HPAGE_PMD_NR
            self._nblocks += 1
        else:
            if self._n4k == self._free4k.shape[0]:
                self._free4k = np.concatenate([self._free4k, np.zeros_like(self._free4k)])
            self._free4k[self._n4k] = head
            self._n4k += 1

    def get_page(self, pfn: int) -> None:
        """get_page(): take a reference on the folio of ``pfn``."""
        self.refcount[self.compound_head(pfn)] += 1

    def put_page(self, pfn: int) -> None:
        """put_page(): drop a reference; the folio is freed at zero (device pages: see memremap)."""
        head = self.compound_head(pfn)
        self.refcount[head] -= 1
        if head >= self.nr_ram:
            self._put_device_page(head)
        elif self.refcount[head] == 0:
            self.free_folio(head)

    def _put_device_page(self, pfn: int) -> None:
        """ZONE_DEVICE part of put_page(): the owning pgmap's hook (memremap.put_device_page)."""
        for start, end, owner in self.device_ranges:
            if start <= pfn < end:
                hook = getattr(owner, "put_device_page", None)
                if hook is not None:
                    hook(pfn, int(self.refcount[pfn]))
                return

    def nr_free_pages(self) -> int:
        """Free 4 KiB frames (excluding hugetlb pools)."""
        return self._n4k + self._nblocks * HPAGE_PMD_NR

    # -- contents ------------------------------------------------------------------------------------------
    def read(self, pfn: int, offset: int = 0, length: int = PAGE_SIZE) -> bytes:
        """Bytes of a frame (zeroes where nothing was ever written)."""
        return self.contents.read(pfn, offset, length)

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store bytes into a frame (a data-carrying write by the CPU or a device)."""
        self.contents.write(pfn, offset, data)

    def zero(self, pfn: int, offset: int, stop: int) -> None:
        """Zero bytes ``[offset, stop)`` of a frame (a partial-page truncate or block zeroing)."""
        self.contents.zero(pfn, offset, stop)

    def copy(self, dst: int, src: int) -> None:
        """copy_user_highpage(): copy contents (only stored bytes cost memory)."""
        self.contents.copy(dst, src)

    def clear(self, pfn: int) -> None:
        """clear_page()."""
        self.contents.discard(pfn)

    def nbytes(self) -> int:
        """Bytes of per-page metadata (the struct-page arrays)."""
        return int(self.refcount.nbytes + self.mapcount.nbytes + self.flags.nbytes + self.order.nbytes)
