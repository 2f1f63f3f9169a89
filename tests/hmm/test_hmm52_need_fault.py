"""hmm_pte_need_fault / hmm_range_need_fault [5.2], exhaustively against the truth table of hmm-5.2.md §4."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import DP, VALID, WRITE  # noqa: E402
from hmmirror.mm.hmm import v5_2 as hmm

BITS = (VALID, WRITE, DP)
ALL8 = [sum(b for b, on in zip(BITS, combo) if on) for combo in itertools.product((0, 1), repeat=3)]
U64 = (1 << 64) - 1
EXTRA = 1 << 40          # a driver bit outside flags[]: must not matter


def walk_state(fault_mode: bool, mask: int = U64, default: int = 0) -> hmm.HmmVmaWalk:
    r = hmm.new_range(0, 4096)
    r.pfn_flags_mask = mask
    r.default_flags = default
    return hmm.HmmVmaWalk(r, fault=fault_mode)


def expected_pte(fault_mode: bool, req_raw: int, mask: int, default: int, cpu: int,
                 f0: bool, w0: bool) -> tuple[bool, bool]:
    """The table of hmm-5.2.md §4, first matching condition (inputs f0/w0 are the in-out values)."""
    if not fault_mode:
        return f0, w0                                   # snapshot mode: unchanged
    req = (req_raw & mask) | default
    if not req & VALID:
        return f0, w0                                   # req lacks VALID: unchanged
    if cpu & DP:
        if req & DP:
            return True, bool(req & WRITE)              # c has DP and req has DP
        return f0, w0                                   # c has DP, req lacks DP: unchanged
    if req & WRITE and not cpu & WRITE:
        return True, True                               # req has WRITE and c lacks WRITE
    if not cpu & VALID:
        return True, w0                                 # c lacks VALID: fault, write_fault unchanged
    return False, w0                                    # otherwise: fault assigned False


MASKS = [(U64, 0), (0, 0), (0, VALID), (0, VALID | WRITE), (WRITE, VALID), (VALID | DP, 0), (U64, DP)]


def test_hmm_pte_need_fault_exhaustive() -> None:
    n = 0
    for fault_mode in (False, True):
        for mask, default in MASKS:
            ws = walk_state(fault_mode, mask, default)
            for req in ALL8:
                for extra in (0, EXTRA):
                    for cpu in ALL8:
                        for f0, w0 in itertools.product((False, True), repeat=2):
                            got = hmm.hmm_pte_need_fault(ws, req | extra, cpu, f0, w0)
                            want = expected_pte(fault_mode, req | extra, mask, default, cpu, f0, w0)
                            assert got == want, (fault_mode, hex(mask), default, req, extra, cpu, f0, w0)
                            n += 1
    assert n == 2 * len(MASKS) * 8 * 2 * 8 * 4


def expected_range(fault_mode: bool, reqs: list[int], cpu: int, mask: int = U64,
                   default: int = 0) -> tuple[bool, bool]:
    """hmm-5.2.md §4, stated declaratively: all pages share ``cpu``; the loop stops only on write_fault;
    ``fault`` ends as ``not cpu VALID`` once a page requests VALID, (False, False) when none does."""
    if not fault_mode:
        return False, False
    eff = [(r & mask) | default for r in reqs]
    valid = [r for r in eff if r & VALID]
    if cpu & DP:
        dp = [r for r in valid if r & DP]
        if any(r & WRITE for r in dp):
            return True, True
        if dp:
            return True, False
        return False, False
    if not cpu & WRITE and any(r & WRITE for r in valid):
        return True, True
    if valid:
        return (not cpu & VALID), False
    return False, False


def test_hmm_range_need_fault_all_sequences_up_to_three_pages() -> None:
    for fault_mode in (False, True):
        ws = walk_state(fault_mode)
        for length in range(4):
            for reqs in itertools.product(ALL8, repeat=length):
                arr = np.array(list(reqs) + [VALID | WRITE], dtype=np.uint64)   # a trailing page not examined
                for cpu in ALL8:
                    got = hmm.hmm_range_need_fault(ws, arr, length, cpu)
                    assert got == expected_range(fault_mode, list(reqs), cpu), (fault_mode, reqs, cpu)


def test_hmm_range_need_fault_with_mask_and_default_flags() -> None:
    for mask, default in MASKS:
        ws = walk_state(True, mask, default)
        for reqs in itertools.product(ALL8, repeat=2):
            arr = np.array(reqs, dtype=np.uint64)
            for cpu in ALL8:
                got = hmm.hmm_range_need_fault(ws, arr, 2, cpu)
                assert got == expected_range(True, list(reqs), cpu, mask, default), (mask, default, reqs, cpu)


def test_range_need_fault_stops_early_only_on_write_fault() -> None:
    # hmm-5.2.md §4: "early exit only on write_fault": a read fault on page 0 does not stop the loop, so a
    # later page without VALID leaves the result, and a later VALID page re-assigns fault.
    ws = walk_state(True)
    # cpu VALID only: page 0 requests VALID (fault=False), page 1 requests WRITE -> (True, True)
    assert hmm.hmm_range_need_fault(ws, np.array([VALID, VALID | WRITE], dtype=np.uint64), 2, VALID) == (True, True)
    # cpu 0: page 0 VALID -> fault True; page 1 nothing -> unchanged
    assert hmm.hmm_range_need_fault(ws, np.array([VALID, 0], dtype=np.uint64), 2, 0) == (True, False)
    # n = 0: nothing examined
    assert hmm.hmm_range_need_fault(ws, np.array([VALID | WRITE], dtype=np.uint64), 0, 0) == (False, False)


def test_hmm_rst_default_flags_section() -> None:
    # hmm-5.2.md §12: VALID = 1<<63, WRITE = 1<<62; default_flags = 1<<63, pfn_flags_mask = 0 requests every
    # page with at least read; pfn_flags_mask = 1<<62 with pfns[k] = 1<<62 also requests write for page k.
    r = hmm.new_range(0, 3 * 4096, flags=(1 << 63, 1 << 62, 1 << 61))
    r.default_flags, r.pfn_flags_mask = 1 << 63, 0
    ws = hmm.HmmVmaWalk(r, fault=True)
    reqs = np.array([0, 1 << 62, 0], dtype=np.uint64)
    cpu_ro = 1 << 63
    assert [hmm.hmm_pte_need_fault(ws, int(x), 0, False, False) for x in reqs] == [(True, False)] * 3
    assert [hmm.hmm_pte_need_fault(ws, int(x), cpu_ro, False, False) for x in reqs] == [(False, False)] * 3
    r.pfn_flags_mask = 1 << 62
    assert [hmm.hmm_pte_need_fault(ws, int(x), cpu_ro, False, False) for x in reqs] == \
        [(False, False), (True, True), (False, False)]
