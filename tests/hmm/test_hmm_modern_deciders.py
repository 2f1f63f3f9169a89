"""The pure deciders of mm/hmm.c 6.18, tested exhaustively (hmm-modern.md §3, §4.3).

``hmm_pte_need_fault`` against the spec's formula over every combination of request bits, mask, default
flags and CPU flags; the vectorised ``hmm_range_need_fault`` against the kernel's literal loop over every
sequence of up to three per-page requests; the ``*_to_hmm_pfn_flags`` producers over every entry kind.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.mm.hmm import modern as hmm
from hmmirror.mm.hmm.modern import (
    HMM_NEED_ALL_BITS,
    HMM_NEED_FAULT,
    HMM_NEED_WRITE_FAULT,
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_FLAGS,
    HMM_PFN_INOUT_FLAGS,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    HmmVmaWalk,
    hmm_pfn_to_map_order,
    hmm_pfn_to_pfn,
    hmm_pte_need_fault,
    hmm_range_need_fault,
)

F, W = HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE
# request words: the two request bits, sticky bits and pfn/order noise that must not matter
REQUESTS = [0, F, W, F | W, F | HMM_PFN_ERROR, W | HMM_PFN_DMA_MAPPED, F | W | 0x1234,
            HMM_PFN_P2PDMA | (7 << HMM_PFN_ORDER_SHIFT)]
MASKS = [0, F, W, F | W, (1 << 64) - 1]
DEFAULTS = [0, F, W, F | W]
CPU = [0, HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_VALID | HMM_PFN_WRITE,
       HMM_PFN_VALID | (9 << HMM_PFN_ORDER_SHIFT), HMM_PFN_VALID | HMM_PFN_WRITE | (18 << HMM_PFN_ORDER_SHIFT)]


def walk_for(default_flags: int, mask: int) -> HmmVmaWalk:
    r = HmmRange(None, 0, 0, np.zeros(0, dtype=np.uint64), default_flags=default_flags,   # type: ignore[arg-type]
                 pfn_flags_mask=mask)
    return HmmVmaWalk(r, 0)


def spec_pte_need_fault(req: int, mask: int, default: int, cpu: int) -> int:
    """hmm-modern.md §4.3, written out."""
    req = (req & mask) | default
    if not req & F:
        return 0
    if req & W and not cpu & HMM_PFN_WRITE:
        return HMM_NEED_FAULT | HMM_NEED_WRITE_FAULT
    if not cpu & HMM_PFN_VALID:
        return HMM_NEED_FAULT
    return 0


def kernel_range_need_fault(walk: HmmVmaWalk, reqs: list[int], cpu: int) -> int:
    """The kernel's loop (mm/hmm.c 6.18), literally."""
    r = walk.range
    if not (r.default_flags | r.pfn_flags_mask) & F:
        return 0
    acc = 0
    for q in reqs:
        acc |= hmm_pte_need_fault(walk, q, cpu)
        if acc == HMM_NEED_ALL_BITS:
            return acc
    return acc


def test_constants():
    assert HMM_PFN_VALID == 1 << 63 and HMM_PFN_WRITE == 1 << 62 and HMM_PFN_ERROR == 1 << 61
    assert (HMM_PFN_DMA_MAPPED, HMM_PFN_P2PDMA, HMM_PFN_P2PDMA_BUS) == (1 << 60, 1 << 59, 1 << 58)
    assert HMM_PFN_ORDER_SHIFT == 53
    assert HMM_PFN_FLAGS == sum(1 << b for b in range(53, 64))
    assert HMM_PFN_INOUT_FLAGS == HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS
    assert HMM_PFN_REQ_FAULT == HMM_PFN_VALID and HMM_PFN_REQ_WRITE == HMM_PFN_WRITE
    e = HMM_PFN_VALID | HMM_PFN_WRITE | (9 << 53) | 0x12345
    assert hmm_pfn_to_pfn(e) == 0x12345 and hmm_pfn_to_map_order(e) == 9
    assert hmm.HMM_PFN.names(HMM_PFN_VALID | HMM_PFN_WRITE) == "VALID|WRITE"


@pytest.mark.parametrize("default", DEFAULTS)
@pytest.mark.parametrize("mask", MASKS)
def test_pte_need_fault_exhaustive(default, mask):
    walk = walk_for(default, mask)
    for req, cpu in itertools.product(REQUESTS, CPU):
        assert hmm_pte_need_fault(walk, req, cpu) == spec_pte_need_fault(req, mask, default, cpu), \
            (hex(req), hex(mask), hex(default), hex(cpu))


@pytest.mark.parametrize("default", DEFAULTS)
@pytest.mark.parametrize("mask", MASKS)
def test_range_need_fault_equals_the_kernel_loop(default, mask):
    walk = walk_for(default, mask)
    for n in range(0, 4):
        for reqs in itertools.product(REQUESTS, repeat=n):
            arr = np.array(reqs, dtype=np.uint64)
            for cpu in CPU:
                assert hmm_range_need_fault(walk, arr, n, cpu) == kernel_range_need_fault(walk, list(reqs), cpu)


def test_range_need_fault_reads_only_npages():
    walk = walk_for(0, F | W)
    arr = np.array([0, 0, F | W], dtype=np.uint64)
    assert hmm_range_need_fault(walk, arr, 2, 0) == 0
    assert hmm_range_need_fault(walk, arr, 3, 0) == HMM_NEED_ALL_BITS


def test_pure_snapshot_shortcut():
    """§4.3: no fault possible when neither default_flags nor pfn_flags_mask has REQ_FAULT."""
    walk = walk_for(W, W)
    arr = np.array([F | W] * 4, dtype=np.uint64)
    assert hmm_range_need_fault(walk, arr, 4, 0) == 0


# --- cpu_flags producers (§4.3) --------------------------------------------------------------------------
P, RW, PSE = x86._PAGE_PRESENT, x86._PAGE_RW, x86._PAGE_PSE
ORDER9, ORDER18 = 9 << HMM_PFN_ORDER_SHIFT, 18 << HMM_PFN_ORDER_SHIFT
PROTNONE = x86._PAGE_PROTNONE


@pytest.mark.parametrize("pte,want", [
    (0, 0),                                                  # none
    (x86._PAGE_ACCESSED | x86._PAGE_DIRTY, 0),               # none (A/D ignored)
    (x86.make_swap_entry(1, 5), 0),                          # not present
    (x86.make_migration_entry(0x100, True), 0),
    (x86.pfn_pte(0x100, PROTNONE), 0),                       # protnone
    (x86.pfn_pte(0x100, P), HMM_PFN_VALID),
    (x86.pfn_pte(0x100, P | RW), HMM_PFN_VALID | HMM_PFN_WRITE),
    (x86.pfn_pte(0x100, P | x86._PAGE_SPECIAL), HMM_PFN_VALID),
])
def test_pte_to_hmm_pfn_flags(pte, want):
    assert hmm.pte_to_hmm_pfn_flags(None, pte) == want   # type: ignore[arg-type]


@pytest.mark.parametrize("pmd,want", [
    (x86.pfn_pte(0x200, P | PSE), HMM_PFN_VALID | ORDER9),
    (x86.pfn_pte(0x200, P | PSE | RW), HMM_PFN_VALID | HMM_PFN_WRITE | ORDER9),
    (x86.pfn_pte(0x200, PROTNONE | PSE), 0),
])
def test_pmd_to_hmm_pfn_flags(pmd, want):
    assert hmm.pmd_to_hmm_pfn_flags(None, pmd) == want   # type: ignore[arg-type]


@pytest.mark.parametrize("pud,want", [
    (x86.pfn_pte(0x40000, P | PSE), HMM_PFN_VALID | ORDER18),
    (x86.pfn_pte(0x40000, P | PSE | RW), HMM_PFN_VALID | HMM_PFN_WRITE | ORDER18),
    (x86.pfn_pte(0x40000, PSE), 0),                          # not present
])
def test_pud_to_hmm_pfn_flags(pud, want):
    assert hmm.pud_to_hmm_pfn_flags(None, pud) == want   # type: ignore[arg-type]


def test_pfns_fill_keeps_sticky_bits():
    arr = np.array([HMM_PFN_DMA_MAPPED | F | 0x77, HMM_PFN_P2PDMA_BUS | W, 0], dtype=np.uint64)
    r = HmmRange(None, 0x1000, 0x4000, arr)   # type: ignore[arg-type]
    hmm.hmm_pfns_fill(0x1000, 0x4000, r, HMM_PFN_ERROR)
    assert arr.tolist() == [HMM_PFN_DMA_MAPPED | HMM_PFN_ERROR, HMM_PFN_P2PDMA_BUS | HMM_PFN_ERROR, HMM_PFN_ERROR]
