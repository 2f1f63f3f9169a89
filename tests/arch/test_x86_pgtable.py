"""x86-64 entry predicates and geometry (mm-substrate.md §1)."""

from __future__ import annotations

import pytest

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import Geometry


def test_none_ignores_accessed_dirty() -> None:
    # §1.2: pte_none(p): no bits other than A/D
    assert x86.pte_none(0)
    assert x86.pte_none(x86._PAGE_ACCESSED | x86._PAGE_DIRTY)
    assert not x86.pte_none(x86._PAGE_PRESENT)


def test_protnone_is_present_but_not_P() -> None:
    # §1.2: pte_present = P or PROTNONE; pte_protnone = PROTNONE and not P
    e = x86.pfn_pte(0x1234, x86.PAGE_NONE)
    assert x86.pte_present(e) and x86.pte_protnone(e)
    assert x86.pte_pfn(e) == 0x1234
    assert not x86.pte_protnone(x86.pfn_pte(5, x86.PAGE_READONLY | x86._PAGE_GLOBAL))


def test_pmd_predicates_devmap_vs_trans_huge() -> None:
    # §1.2: pmd_trans_huge = PSE and not DEVMAP; pmd_devmap = DEVMAP
    thp = x86.pfn_pte(512, x86.PAGE_SHARED) | x86._PAGE_PSE
    dax = thp | x86._PAGE_DEVMAP
    assert x86.pmd_trans_huge(thp) and not x86.pmd_devmap(thp)
    assert x86.pmd_devmap(dax) and not x86.pmd_trans_huge(dax)
    assert x86.pmd_present(thp) and x86.pmd_huge(thp)


def test_pmd_bad_and_table_entry() -> None:
    # §1.2: pmd_bad = (flags & ~USER) != (P|RW|A|D); a table entry is P|RW|A|D|USER
    table = x86.mk_table_entry(7)
    assert not x86.pmd_bad(table)
    assert x86.pmd_bad(table | x86._PAGE_PSE)
    assert x86.table_id_of(table) == 7


def test_pud_leaf_is_bad_for_a_table_walker() -> None:
    # §1.2: a leaf PUD (PSE) satisfies pud_bad
    leaf = x86.pfn_pte(1 << 18, x86.PAGE_SHARED) | x86._PAGE_PSE
    assert x86.pud_bad(leaf) and x86.pud_leaf(leaf)
    assert not x86.pud_bad(x86.mk_table_entry(3))


@pytest.mark.parametrize("kind,check", [
    (lambda: x86.make_migration_entry(0xabc, True), x86.is_writable_migration_entry),
    (lambda: x86.make_device_private_entry(0x123, False), x86.is_device_private_entry),
    (lambda: x86.make_hwpoison_entry(77), x86.is_hwpoison_entry),
])
def test_swap_format_roundtrip(kind, check) -> None:  # type: ignore[no-untyped-def]
    # §1.3: bits 0 and 8 clear; not none, not present
    e = kind()
    assert e & (x86._PAGE_PRESENT | x86._PAGE_PROTNONE) == 0
    assert not x86.pte_none(e) and not x86.pte_present(e)
    s = x86.pte_to_swp_entry(e)
    assert check(s) and x86.non_swap_entry(s)


def test_real_swap_entry_is_swap() -> None:
    s = x86.pte_to_swp_entry(x86.make_swap_entry(3, 1000))
    assert s.type == 3 and s.offset == 1000 and not x86.non_swap_entry(s)


def test_geometry_4_and_5_level() -> None:
    # §1.1: 4-level 48-bit, user space [0, 2^47 - 4096); 5-level 57-bit up to 2^56 - 4096
    g4, g5 = Geometry(4), Geometry(5)
    assert g4.task_size == (1 << 47) - 4096 and g4.p4d_folded and g4.pgdir_shift == 39
    assert g5.task_size == (1 << 56) - 4096 and not g5.p4d_folded and g5.pgdir_shift == 48


def test_addr_end_clips() -> None:
    assert x86.PMD_LEVEL.addr_end(0x1000, 0x400000) == 0x200000
    assert x86.PMD_LEVEL.addr_end(0x1000, 0x3000) == 0x3000
