"""A device's view of memory: its page table, its TLB and its DMA mappings (ours: the device side of a driver).

What a mirroring device can reach is more than its page table: a zapped entry stays usable from the device
TLB until the driver flushes it, and a page the driver DMA-mapped (``dma_map_page``, an IOMMU mapping)
stays reachable until ``dma_unmap_page``.  Documentation/mm/hmm.rst and drm_gpusvm.c require all three to
be gone before the invalidate callback returns ("Must be called in the invalidate() callback ... for IOMMU
security model").  :class:`DevicePageTable` keeps the three apart so that checks can ask what the device can
still reach (:meth:`DevicePageTable.reaches`).

``tlb=False`` (the default, e.g. lib/test_hmm.c's dmirror, whose "device" is a software page table) makes
every unmap immediate; ``tlb=True`` keeps zapped entries in the TLB until :meth:`tlb_flush`.  DMA mappings
record the user address they were made for (a model addition: the kernel's ``dma_map_page`` takes none), so
an invalidation of an address range knows which mappings must end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PAGE_SIZE = 4096
ULONG_MAX = (1 << 64) - 1
DMA_MAPPING_ERROR = ULONG_MAX
DMA_BASE = 0x8000_0000          # first I/O virtual address handed out by the model's IOMMU


def range_items(pfn: Any, write: Any, valid: Any) -> list[tuple[int, bool] | None]:
    """The ``items`` of :meth:`DevicePageTable.commit_range` from per-page arrays: ``(pfn, write)`` where
    ``valid`` holds, else None (ints and bools, as ``tolist`` gives them).  The common all-valid range is built
    without a Python test per page; :func:`range_items_ref` is the page-by-page reference (tested equal)."""
    pfns, writes = pfn.tolist(), write.tolist()
    if valid.all():
        return list(zip(pfns, writes))
    return [(p, w) if v else None for p, w, v in zip(pfns, writes, valid.tolist())]


def range_items_ref(pfn: Any, write: Any, valid: Any) -> list[tuple[int, bool] | None]:
    """Reference of :func:`range_items`: page by page."""
    return [(int(p), bool(w)) if v else None for p, w, v in zip(pfn.tolist(), write.tolist(), valid.tolist())]


class DevicePageTable:
    """The device's page table ``va -> (pfn, writable)``, its TLB and its DMA mappings.

    Every change of the page table goes through :meth:`map` / :meth:`unmap` / :meth:`clear` /
    :meth:`commit_range`, which tell ``listener(op, va, pfn, write)`` page by page (the simulator's checks look
    only at entries touched since the last step), or ``range_listener(va, items)`` once for a whole
    :meth:`commit_range` when it is set; TLB flushes and DMA (un)mappings tell ``observer(op, fields)``.
    """

    __slots__ = ("entries", "listener", "range_listener", "observer", "tlb", "stale", "dma", "next_iova", "flushes")

    def __init__(self, tlb: bool = False) -> None:
        self.entries: dict[int, tuple[int, bool]] = {}
        self.listener: Callable[[str, int, int, bool], None] | None = None
        self.range_listener: Callable[[int, list[tuple[int, bool] | None]], None] | None = None
        self.observer: Callable[[str, dict[str, Any]], None] | None = None
        self.tlb = tlb                                   # zapped entries stay cached until tlb_flush()
        self.stale: dict[int, tuple[int, bool]] = {}     # va -> entry still in the device TLB
        self.dma: dict[int, tuple[int, int, int]] = {}   # iova -> (pfn, npages, va)
        self.next_iova = DMA_BASE
        self.flushes = 0

    # -- page table ------------------------------------------------------------------------------------------
    def map(self, va: int, pfn: int, write: bool) -> None:
        """Install (commit) a device entry for the page at ``va``."""
        va &= ~(PAGE_SIZE - 1)
        self.entries[va] = (int(pfn), bool(write))
        if self.listener is not None:
            self.listener("map", va, int(pfn), bool(write))

    def commit_range(self, va: int, items: list[tuple[int, bool] | None]) -> None:
        """Program the consecutive pages from ``va`` at once: page ``i`` gets the entry ``items[i]`` =
        ``(pfn, write)`` (as :meth:`map`), or loses its entry when ``items[i]`` is None (as :meth:`unmap` of
        that page).  The same table as page by page; ``range_listener`` hears the whole range in one call."""
        va &= ~(PAGE_SIZE - 1)
        if self.range_listener is None:
            for i, it in enumerate(items):
                v = va + i * PAGE_SIZE
                if it is not None:
                    self.map(v, it[0], it[1])
                else:
                    self.unmap(v, v + PAGE_SIZE)
            return
        ents = self.entries
        if None not in items:
            ents.update(zip(range(va, va + len(items) * PAGE_SIZE, PAGE_SIZE), items))
        else:
            tlb, stale = self.tlb, self.stale
            for i, it in enumerate(items):
                v = va + i * PAGE_SIZE
                if it is not None:
                    ents[v] = it
                elif v in ents:
                    old = ents.pop(v)
                    if tlb:
                        stale[v] = old
        self.range_listener(va, items)

    def unmap(self, start: int, end: int) -> int:
        """Drop the device entries of ``[start, end)`` (still cached in the TLB when ``tlb``); returns how
        many were dropped."""
        ents = self.entries
        if not ents:
            return 0
        if (end - start) // PAGE_SIZE < len(ents):
            gone = [va for va in range(start & ~(PAGE_SIZE - 1), end, PAGE_SIZE) if va in ents]
        else:
            gone = [va for va in ents if start <= va < end]
        for va in gone:
            old = ents.pop(va)
            if self.tlb:
                self.stale[va] = old
            if self.listener is not None:
                self.listener("unmap", va, 0, False)
        return len(gone)

    def wrprotect(self, start: int, end: int) -> None:
        """Make the device entries of ``[start, end)`` read-only (the writable ones stay in the TLB)."""
        for va, (pfn, w) in list(self.entries.items()):
            if start <= va < end and w:
                self.entries[va] = (pfn, False)
                if self.tlb:
                    self.stale[va] = (pfn, True)

    def clear(self) -> None:
        self.unmap(0, ULONG_MAX)

    def get(self, va: int) -> tuple[int, bool] | None:
        return self.entries.get(va & ~(PAGE_SIZE - 1))

    def __len__(self) -> int:
        return len(self.entries)

    # -- TLB -------------------------------------------------------------------------------------------------
    def tlb_flush(self, start: int = 0, end: int = ULONG_MAX) -> int:
        """Invalidate the device TLB for ``[start, end)``; returns how many cached entries it dropped."""
        self.flushes += 1
        if self.stale:
            gone = [va for va in self.stale if start <= va < end]
            for va in gone:
                del self.stale[va]
        else:
            gone = []
        if self.observer is not None:
            self.observer("tlb_flush", {"start": start, "end": end, "dropped": len(gone)})
        return len(gone)

    # -- DMA -------------------------------------------------------------------------------------------------
    def dma_map_page(self, pfn: int, order: int, va: int) -> int:
        """dma_map_page() of ``1 << order`` pages at ``pfn``, made for user address ``va``: an I/O address."""
        iova = self.next_iova
        n = 1 << order
        self.next_iova += n * PAGE_SIZE
        self.dma[iova] = (int(pfn), n, int(va) & ~(PAGE_SIZE - 1))
        if self.observer is not None:
            self.observer("dma_map", {"iova": iova, "pfn": int(pfn), "npages": n, "va": va})
        return iova

    def dma_unmap_page(self, iova: int) -> bool:
        """dma_unmap_page(): end the mapping at ``iova``; False (a bug: a kernel WARN with DMA debugging)
        when there is none."""
        m = self.dma.pop(iova, None)
        if self.observer is not None:
            self.observer("dma_unmap", {"iova": iova, "ok": m is not None})
        return m is not None

    # -- what the device can still reach -----------------------------------------------------------------------
    def reaches(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """Everything in ``[start, end)`` the device can still use: ``(how, va, pfn)`` with ``how`` one of
        ``pte``, ``tlb``, ``dma``."""
        out: list[tuple[str, int, int]] = []
        for name, table in (("pte", self.entries), ("tlb", self.stale)):
            if not table:
                continue
            if (end - start) // PAGE_SIZE < len(table):
                vas = [va for va in range(start & ~(PAGE_SIZE - 1), min(end, 1 << 57), PAGE_SIZE) if va in table]
            else:
                vas = [va for va in table if start <= va < end]
            out += [(name, va, table[va][0]) for va in vas]
        for iova, (pfn, n, va) in self.dma.items():
            if va < end and start < va + n * PAGE_SIZE:
                out.append(("dma", va, pfn))
        return out

    def empty(self) -> bool:
        """Nothing reachable at all (after a teardown)."""
        return not self.entries and not self.stale and not self.dma
