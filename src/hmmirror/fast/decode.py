"""Vectorised decoding of page-table entries (ours: the numpy form of the predicates of arch/x86/pgtable.py).

Every function takes a uint64 array of entries and returns an array; each is the element-wise twin of the
scalar predicate named in its docstring, and the equivalence tests check them against those predicates on
random entries.

:func:`pte_kinds` classifies PTEs into the kinds HMM distinguishes (the rows of hmm-5.2.md §13 and
hmm-modern.md §4.6).  What a kind *means* for HMM differs between the profiles; each fast HMM module keeps
that as a table indexed by kind (``fast/hmm_v5_2.py``: ``PTE_RULES_5_2``; ``fast/hmm_modern.py``:
``PTE_RULES_MODERN``), so the two versions' rules can be read side by side.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import MAX_SWAPFILES, PAGE_SHIFT, SWP_OFFSET_MASK, SWP_OFFSET_SHIFT, SWP_TYPE_SHIFT
from hmmirror.arch.x86.pgtable import SwpType as T

U64 = np.uint64
PFN_MASK = U64(x86.PTE_PFN_MASK)
AD = U64(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
P = U64(x86._PAGE_PRESENT)
RW = U64(x86._PAGE_RW)
PROTNONE = U64(x86._PAGE_PROTNONE)
SPECIAL = U64(x86._PAGE_SPECIAL)
DEVMAP = U64(x86._PAGE_DEVMAP)
PSE = U64(x86._PAGE_PSE)
_PRESENT_ANY = P | PROTNONE


class Kind(IntEnum):
    """What a PTE is, as HMM's per-entry handlers tell it apart (first match in this order).

    Present entries (``pte_present``: P or PROTNONE) are all ``PRESENT``; their attributes (protnone,
    special, devmap, write, pfn) are separate arrays, because the profiles test them in different orders.
    Non-present, non-none entries are classified by swap type.
    """

    NONE = 0              # pte_none(): no bits but accessed/dirty
    PRESENT = 1           # pte_present()
    SWAP = 2              # a real swap entry (type < MAX_SWAPFILES)
    MIGRATION = 3         # is_migration_entry()
    DEVICE_PRIVATE = 4    # is_device_private_entry()
    DEVICE_EXCLUSIVE = 5  # is_device_exclusive_entry() [6.x]
    HWPOISON = 6          # is_hwpoison_entry()
    MARKER = 7            # is_pte_marker() [6.18]
    OTHER = 8             # any other non-swap type


#: swap type -> Kind, for the 32 values of the 5-bit type field
_TYPE_KIND = np.full(32, Kind.OTHER, dtype=np.uint8)
_TYPE_KIND[:MAX_SWAPFILES] = Kind.SWAP
for _t in (T.SWP_MIGRATION_READ, T.SWP_MIGRATION_WRITE, T.SWP_MIGRATION_READ_EXCLUSIVE):
    _TYPE_KIND[int(_t)] = Kind.MIGRATION
for _t in (T.SWP_DEVICE_PRIVATE_READ, T.SWP_DEVICE_PRIVATE_WRITE):
    _TYPE_KIND[int(_t)] = Kind.DEVICE_PRIVATE
_TYPE_KIND[int(T.SWP_DEVICE_EXCLUSIVE)] = Kind.DEVICE_EXCLUSIVE
_TYPE_KIND[int(T.SWP_HWPOISON)] = Kind.HWPOISON
_TYPE_KIND[int(T.SWP_PTE_MARKER)] = Kind.MARKER


def none(e: np.ndarray) -> np.ndarray:
    """pte_none()."""
    return (e & ~AD) == 0


def present(e: np.ndarray) -> np.ndarray:
    """pte_present(): P or PROTNONE."""
    return (e & _PRESENT_ANY) != 0


def protnone(e: np.ndarray) -> np.ndarray:
    """pte_protnone() / pmd_protnone(): PROTNONE set and P clear."""
    return (e & _PRESENT_ANY) == PROTNONE


def write(e: np.ndarray) -> np.ndarray:
    """pte_write()."""
    return (e & RW) != 0


def special(e: np.ndarray) -> np.ndarray:
    """pte_special()."""
    return (e & SPECIAL) != 0


def devmap(e: np.ndarray) -> np.ndarray:
    """pte_devmap() [5.2 .. 6.16]."""
    return (e & DEVMAP) != 0


def pfn(e: np.ndarray) -> np.ndarray:
    """pte_pfn() (uint64)."""
    return (e & PFN_MASK) >> U64(PAGE_SHIFT)


def swp_type(e: np.ndarray) -> np.ndarray:
    """The type field of a swap-format entry (``pte_to_swp_entry().type``), as uint8."""
    return (e >> U64(SWP_TYPE_SHIFT)).astype(np.uint8)


def swp_offset(e: np.ndarray) -> np.ndarray:
    """The offset of a swap-format entry (stored inverted), as uint64 (``pte_to_swp_entry().offset``)."""
    return (~(e >> U64(SWP_OFFSET_SHIFT))) & U64(SWP_OFFSET_MASK)


def pte_kinds(e: np.ndarray) -> np.ndarray:
    """:class:`Kind` of every entry (uint8)."""
    k = np.full(e.shape, Kind.PRESENT, dtype=np.uint8)
    k[none(e)] = Kind.NONE
    swp = ~present(e) & (k != Kind.NONE)
    if swp.any():
        k[swp] = _TYPE_KIND[swp_type(e[swp])]
    return k


def all_plain_present(e: np.ndarray, mask: int) -> bool:
    """True when every entry is present with P set and none of the bits of ``mask`` (for example
    PROTNONE | SPECIAL | DEVMAP): the common case, which needs no per-kind handling."""
    return bool(((e & U64(x86._PAGE_PRESENT | mask)) == P).all())
