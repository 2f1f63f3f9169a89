"""The per-page state vocabulary shared by the model's inspection and the live observer.

One record per 4 KiB virtual page, as a user (or a differential oracle) sees it. The model fills every
field; the live observer fills what /proc/PID/pagemap, /proc/kpageflags and PAGEMAP_SCAN expose and sets
the rest to ``None`` (unknown), never a guess.

These records are inspection output only (one object per page is fine here); hot structures never hold them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Values of :attr:`PageState.level`: how the page is mapped.
LEVELS = ("pte", "pmd", "pud")

#: Values of :attr:`PageState.kind`.
KINDS = (
    "none",        # nothing mapped (pte_none / hole / no VMA)
    "anon",        # anonymous page (private)
    "file",        # page-cache page (regular file, private or shared)
    "shmem",       # shmem / tmpfs / shared-anon page
    "zero",        # the shared 4 KiB zero page or the huge zero folio
    "devmap",      # ZONE_DEVICE pmem page (fsdax, device-dax)
    "hugetlb",     # hugetlbfs page
    "special",     # VM_PFNMAP / vmf_insert_pfn special entry
    "swap",        # swap entry
    "migration",   # migration entry
    "device_private",
    "device_exclusive",  # make_device_exclusive() entry [6.x]
    "hwpoison",
    "marker",      # PTE marker (6.18: guard, uffd-wp, poison)
)


@dataclass(frozen=True)
class PageState:
    """What is mapped at one 4 KiB virtual page."""

    addr: int
    present: bool              # pagemap bit 63: present entry, including PROT_NONE/NUMA-hint entries
    pfn: int | None = None     # physical frame (None: not present, or not readable)
    kind: str = "none"         # one of KINDS
    level: str | None = None   # "pte" / "pmd" / "pud" for present entries
    write: bool | None = None  # PTE write bit (live: None, pagemap does not export it)
    zero: bool | None = None   # pfn is the 4 KiB zero page or part of the huge zero folio
    huge: bool | None = None   # mapped by a PMD or PUD leaf
    file: bool | None = None   # pagemap bit 61: file page or shared anon (also the huge zero page)
    exclusive: bool | None = None  # pagemap bit 56: the page is mapped exactly once
    swapped: bool | None = None    # pagemap bit 62: swap-format entry (incl. markers)
    protnone: bool | None = None   # PROT_NONE / NUMA-hinting entry (present, not accessible)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json`` output (addresses and pfns as hex strings for readability)."""
        d = asdict(self)
        d["addr"] = hex(self.addr)
        d["pfn"] = None if self.pfn is None else hex(self.pfn)
        return d


FIELDS = tuple(f.name for f in fields(PageState))
#: Fields a differential comparison looks at (pfn is compared through canonical identity classes).
COMPARED_FIELDS = ("present", "kind", "huge", "zero", "file", "exclusive", "swapped", "write", "pfn_class")
