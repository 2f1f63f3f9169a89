"""x86-64 page-table entry bits, predicates and geometry.

Follows arch/x86/include/asm/pgtable_types.h, pgtable.h and pgtable_64.h.  Entries are plain Python ints
(one 64-bit word, as in the kernel); the leaf tables that hold them are numpy uint64 arrays
(:mod:`hmmirror.mm.pgtable`).  Predicates take the entry value, as the kernel's ``pte_*(pte_t)`` do.

Model choice: an entry that points to a lower table stores that table's *id* in the pfn field (page-table
pages are not taken from the model's RAM).  Everything that reads the pfn of a *leaf* sees a real pfn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from enum import IntEnum

# --- entry bits (pgtable_types.h) -------------------------------------------------------------------
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PWT = 1 << 3
_PAGE_PCD = 1 << 4
_PAGE_ACCESSED = 1 << 5
_PAGE_DIRTY = 1 << 6
_PAGE_PSE = 1 << 7
_PAGE_GLOBAL = 1 << 8
_PAGE_PROTNONE = _PAGE_GLOBAL          # only meaningful when _PAGE_PRESENT is clear
_PAGE_SPECIAL = 1 << 9                 # _PAGE_BIT_SOFTW1
_PAGE_UFFD_WP = 1 << 10                # _PAGE_BIT_SOFTW2 [6.18]
_PAGE_SOFT_DIRTY = 1 << 11             # _PAGE_BIT_SOFTW3
_PAGE_DEVMAP = 1 << 58                 # _PAGE_BIT_SOFTW4 [5.2 .. 6.16]
_PAGE_NX = 1 << 63

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
PTRS_PER_TABLE = 512
HPAGE_PMD_NR = PMD_SIZE // PAGE_SIZE
HPAGE_PUD_NR = PUD_SIZE // PAGE_SIZE

PTE_PFN_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)     # physical address bits 12..51
PTE_FLAGS_MASK = ~PTE_PFN_MASK & ((1 << 64) - 1)
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY   # _KERNPG_TABLE|USER
_HPAGE_CHG_IGNORED = _PAGE_ACCESSED | _PAGE_DIRTY

# Common protections (pgprot values) built from the bits above.
PAGE_NONE = _PAGE_PROTNONE | _PAGE_ACCESSED
PAGE_READONLY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
PAGE_SHARED = PAGE_READONLY | _PAGE_RW
PAGE_COPY = PAGE_READONLY          # private writable: read-only until a write fault (COW)


def pfn_pte(pfn: int, prot: int) -> int:
    """pfn_pte(): an entry mapping ``pfn`` with protection bits ``prot``."""
    return (pfn << PAGE_SHIFT) & PTE_PFN_MASK | (prot & PTE_FLAGS_MASK)


# --- PTE predicates -------------------------------------------------------------------------------------
def pte_none(pte: int) -> bool:
    """pte_none(): no bits other than accessed/dirty (x86 ignores A/D for 'none')."""
    return (pte & ~_HPAGE_CHG_IGNORED) == 0


def pte_present(pte: int) -> bool:
    """pte_present(): P or PROT_NONE (PROT_NONE / NUMA-hint entries count as present)."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_protnone(pte: int) -> bool:
    """pte_protnone(): PROT_NONE set and P clear."""
    return (pte & (_PAGE_PROTNONE | _PAGE_PRESENT)) == _PAGE_PROTNONE


def pte_write(pte: int) -> bool:
    """pte_write()."""
    return bool(pte & _PAGE_RW)


def pte_dirty(pte: int) -> bool:
    """pte_dirty()."""
    return bool(pte & _PAGE_DIRTY)


def pte_special(pte: int) -> bool:
    """pte_special()."""
    return bool(pte & _PAGE_SPECIAL)


def pte_devmap(pte: int) -> bool:
    """pte_devmap() [5.2 .. 6.16]."""
    return bool(pte & _PAGE_DEVMAP)


def pte_pfn(pte: int) -> int:
    """pte_pfn(): the frame number of a present entry (0 for a none entry)."""
    return (pte & PTE_PFN_MASK) >> PAGE_SHIFT


pmd_pfn = pte_pfn
pud_pfn = pte_pfn
pmd_write = pte_write
pud_write = pte_write
pmd_devmap = pte_devmap
pud_devmap = pte_devmap
pmd_protnone = pte_protnone


def pte_mkwrite(pte: int) -> int:
    """pte_mkwrite()."""
    return pte | _PAGE_RW


def pte_wrprotect(pte: int) -> int:
    """pte_wrprotect()."""
    return pte & ~_PAGE_RW


def pte_mkdirty(pte: int) -> int:
    """pte_mkdirty()."""
    return pte | _PAGE_DIRTY


def pte_mkyoung(pte: int) -> int:
    """pte_mkyoung()."""
    return pte | _PAGE_ACCESSED


def pte_modify(pte: int, newprot: int) -> int:
    """pte_modify(): keep the pfn (and dirty/accessed/special/devmap), take the rest from ``newprot``."""
    keep = PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SPECIAL | _PAGE_DEVMAP | _PAGE_PSE | _PAGE_SOFT_DIRTY
    return (pte & keep) | (newprot & ~keep)


# --- PMD / PUD predicates -------------------------------------------------------------------------------
pmd_none = pte_none
pud_none = pte_none


def pmd_present(pmd: int) -> bool:
    """pmd_present(): P, PROT_NONE or PSE (a splitting huge PMD stays present)."""
    return bool(pmd & (_PAGE_PRESENT | _PAGE_PROTNONE | _PAGE_PSE))


def pmd_trans_huge(pmd: int) -> bool:
    """pmd_trans_huge(): PSE and not devmap."""
    return (pmd & (_PAGE_PSE | _PAGE_DEVMAP)) == _PAGE_PSE


def pmd_leaf(pmd: int) -> bool:
    """pmd_leaf() / pmd_large(): the PSE bit (any huge PMD, devmap or not)."""
    return bool(pmd & _PAGE_PSE)


def pmd_huge(pmd: int) -> bool:
    """pmd_huge() [5.2]: not none and (P|PSE) != P."""
    return not pmd_none(pmd) and (pmd & (_PAGE_PRESENT | _PAGE_PSE)) != _PAGE_PRESENT


def pmd_bad(pmd: int) -> bool:
    """pmd_bad(): flags other than USER differ from a table entry's P|RW|A|D."""
    return (pmd & PTE_FLAGS_MASK & ~_PAGE_USER) != (_PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY)


def pud_present(pud: int) -> bool:
    """pud_present(): the P bit."""
    return bool(pud & _PAGE_PRESENT)


def pud_leaf(pud: int) -> bool:
    """pud_huge() [5.2] / pud_leaf() [6.18]: the PSE bit."""
    return bool(pud & _PAGE_PSE)


pud_huge = pud_leaf


def pud_trans_huge(pud: int) -> bool:
    """pud_trans_huge(): PSE and not devmap."""
    return (pud & (_PAGE_PSE | _PAGE_DEVMAP)) == _PAGE_PSE


def pud_bad(pud: int) -> bool:
    """pud_bad(): flags beyond P|RW|A|D|USER (a PSE leaf is 'bad' for a table walker)."""
    return bool(pud & PTE_FLAGS_MASK & ~(_PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_USER))


def mk_table_entry(table_id: int) -> int:
    """An upper-level entry pointing to a lower table (``_PAGE_TABLE`` with the table id as pfn)."""
    return pfn_pte(table_id, _PAGE_TABLE)


def table_id_of(entry: int) -> int:
    """The table id stored in a non-leaf entry."""
    return (entry & PTE_PFN_MASK) >> PAGE_SHIFT


# --- swap-format entries (pgtable_64.h __swp_entry; swapops.h) ----------------------------------------
SWP_TYPE_BITS = 5
SWP_TYPE_SHIFT = 64 - SWP_TYPE_BITS          # type in bits 59..63
SWP_OFFSET_SHIFT = 9                          # offset stored inverted in bits 9..58
SWP_OFFSET_BITS = SWP_TYPE_SHIFT - SWP_OFFSET_SHIFT
SWP_OFFSET_MASK = (1 << SWP_OFFSET_BITS) - 1


class SwpType(IntEnum):
    """Swap-entry types.

    Model numbering (a tagged representation, see mm-substrate.md 1.3): real swap devices are
    ``0 .. MAX_SWAPFILES-1``; the special kinds follow.  The kernel's numbers differ between versions;
    nothing outside this module depends on the numbers, only on the predicates below.
    """

    SWP_DEVICE_EXCLUSIVE = 23
    SWP_PTE_MARKER = 24
    SWP_MIGRATION_READ_EXCLUSIVE = 25
    SWP_MIGRATION_READ = 26
    SWP_MIGRATION_WRITE = 27
    SWP_HWPOISON = 28
    SWP_DEVICE_PRIVATE_WRITE = 29
    SWP_DEVICE_PRIVATE_READ = 30


MAX_SWAPFILES = 23

# PTE marker kinds (offset of a SWP_PTE_MARKER entry) [6.18]
PTE_MARKER_UFFD_WP = 1 << 0
PTE_MARKER_POISONED = 1 << 1
PTE_MARKER_GUARD = 1 << 2


@dataclass(frozen=True, slots=True)
class SwpEntry:
    """swp_entry_t: a (type, offset) pair; for migration/device-private/hwpoison the offset is a pfn."""

    type: int
    offset: int


def swp_entry_to_pte(entry: SwpEntry) -> int:
    """swp_entry_to_pte(): encode (bits 0 and 8 clear, offset inverted)."""
    inv = (~entry.offset) & SWP_OFFSET_MASK
    return (entry.type << SWP_TYPE_SHIFT) | (inv << SWP_OFFSET_SHIFT)


def pte_to_swp_entry(pte: int) -> SwpEntry:
    """pte_to_swp_entry(): decode a non-present, non-none entry."""
    typ = (pte >> SWP_TYPE_SHIFT) & ((1 << SWP_TYPE_BITS) - 1)
    off = (~(pte >> SWP_OFFSET_SHIFT)) & SWP_OFFSET_MASK
    return SwpEntry(typ, off)


def non_swap_entry(e: SwpEntry) -> bool:
    """non_swap_entry(): migration, device-private, hwpoison, markers..."""
    return e.type >= MAX_SWAPFILES


def is_migration_entry(e: SwpEntry) -> bool:
    """is_migration_entry()."""
    return e.type in (SwpType.SWP_MIGRATION_READ, SwpType.SWP_MIGRATION_WRITE, SwpType.SWP_MIGRATION_READ_EXCLUSIVE)


def is_writable_migration_entry(e: SwpEntry) -> bool:
    """is_writable_migration_entry()."""
    return e.type == SwpType.SWP_MIGRATION_WRITE


def is_device_private_entry(e: SwpEntry) -> bool:
    """is_device_private_entry()."""
    return e.type in (SwpType.SWP_DEVICE_PRIVATE_READ, SwpType.SWP_DEVICE_PRIVATE_WRITE)


def is_writable_device_private_entry(e: SwpEntry) -> bool:
    """is_writable_device_private_entry()."""
    return e.type == SwpType.SWP_DEVICE_PRIVATE_WRITE


def is_hwpoison_entry(e: SwpEntry) -> bool:
    """is_hwpoison_entry()."""
    return e.type == SwpType.SWP_HWPOISON


def is_device_exclusive_entry(e: SwpEntry) -> bool:
    """is_device_exclusive_entry() [6.x]."""
    return e.type == SwpType.SWP_DEVICE_EXCLUSIVE


def is_pte_marker(e: SwpEntry) -> bool:
    """is_pte_marker_entry() [6.18]."""
    return e.type == SwpType.SWP_PTE_MARKER


def make_migration_entry(pfn: int, write: bool) -> int:
    """make_{readable,writable}_migration_entry() as a PTE value."""
    t = SwpType.SWP_MIGRATION_WRITE if write else SwpType.SWP_MIGRATION_READ
    return swp_entry_to_pte(SwpEntry(int(t), pfn))


def make_hwpoison_entry(pfn: int) -> int:
    """make_hwpoison_entry() as a PTE value."""
    return swp_entry_to_pte(SwpEntry(int(SwpType.SWP_HWPOISON), pfn))


def make_device_private_entry(pfn: int, write: bool) -> int:
    """make_{readable,writable}_device_private_entry() as a PTE value."""
    t = SwpType.SWP_DEVICE_PRIVATE_WRITE if write else SwpType.SWP_DEVICE_PRIVATE_READ
    return swp_entry_to_pte(SwpEntry(int(t), pfn))


def make_swap_entry(dev: int, offset: int) -> int:
    """swp_entry(type, offset) for a real swap device, as a PTE value."""
    return swp_entry_to_pte(SwpEntry(dev, offset))


def make_pte_marker(kind: int) -> int:
    """make_pte_marker() [6.18] as a PTE value."""
    return swp_entry_to_pte(SwpEntry(int(SwpType.SWP_PTE_MARKER), kind))


def is_swap_pte(pte: int) -> bool:
    """is_swap_pte(): not none and not present."""
    return not pte_none(pte) and not pte_present(pte)


# --- geometry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One paging level: its name, the VA shift of its index and whether a leaf may sit here."""

    name: str
    shift: int
    leaf_ok: bool

    @property
    def size(self) -> int:
        return 1 << self.shift

    def index(self, addr: int) -> int:
        return (addr >> self.shift) & (PTRS_PER_TABLE - 1)

    def addr_end(self, addr: int, end: int) -> int:
        """pXd_addr_end(): the next boundary of this level after ``addr``, clipped to ``end``."""
        boundary = (addr + self.size) & ~(self.size - 1)
        return boundary if boundary - 1 < end - 1 else end


@dataclass(frozen=True)
class Geometry:
    """x86-64 paging: 4-level (48-bit) or 5-level (57-bit); P4D is folded onto the PGD with 4 levels."""

    levels: int

    # the properties are computed once per geometry (cached_property writes the instance __dict__, which a
    # frozen dataclass allows): page-table walks read them at every level

    @cached_property
    def pgdir_shift(self) -> int:
        return 48 if self.levels == 5 else 39

    @cached_property
    def va_bits(self) -> int:
        return 57 if self.levels == 5 else 48

    @cached_property
    def task_size(self) -> int:
        """TASK_SIZE_MAX: user space is ``[0, 2^(va_bits-1) - 4096)``."""
        return (1 << (self.va_bits - 1)) - PAGE_SIZE

    @cached_property
    def default_mmap_top(self) -> int:
        """Top of the default mmap area: 47-bit user space unless a hint above it is given."""
        return (1 << 47) - PAGE_SIZE

    @cached_property
    def pgd(self) -> Level:
        return Level("pgd", self.pgdir_shift, False)

    @cached_property
    def p4d(self) -> Level:
        return Level("p4d", 39, False)

    @cached_property
    def p4d_folded(self) -> bool:
        return self.levels == 4


PUD_LEVEL = Level("pud", PUD_SHIFT, True)
PMD_LEVEL = Level("pmd", PMD_SHIFT, True)
PTE_LEVEL = Level("pte", PAGE_SHIFT, True)


def canonical(addr: int, geo: Geometry) -> bool:
    """A user address is canonical and below TASK_SIZE."""
    return 0 <= addr <= geo.task_size
