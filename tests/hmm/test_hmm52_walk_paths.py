"""The HMM 5.2 walk, path by path, on page-table states built directly (hmm-5.2.md §5-§9, §13).

Every expected value comes from the spec: the per-entry outcome table of §13, the handler pseudo-code of
§7, the ``last``/count rules of §9.1, the pgmap reference sites of §8 and the entry encoding of §1.4
(VALID 1, WRITE 2, DEVICE_PRIVATE 4, pfn_shift 12, ERROR ...FE, NONE 0, SPECIAL ...FC).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hmm52_helpers import (  # noqa: E402
    BASE,
    DP,
    ERROR,
    G1,
    K,
    M2,
    NONE,
    SPECIAL,
    VALID,
    WRITE,
    Recorder,
    Stepper,
    add_vma,
    devmap_huge,
    devmap_pte,
    ent,
    fault,
    machine,
    new_registered_range,
    normal_pte,
    out,
    pgmap,
    pmd_ptr,
    set_pmd,
    set_pte,
    set_pud,
    snapshot,
    special_pte,
    thp_pmd,
)
from hmmirror.arch.x86 import pgtable as x86  # noqa: E402
from hmmirror.arch.x86.pgtable import (  # noqa: E402
    PAGE_NONE,
    _PAGE_PSE,
    make_device_private_entry,
    make_hwpoison_entry,
    make_migration_entry,
    make_swap_entry,
    pfn_pte,
)
from hmmirror.errors import Deadlock, ModelBug  # noqa: E402
from hmmirror.include.mm_types import FAULT_FLAG, VM  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.hmm import v5_2 as hmm  # noqa: E402
from hmmirror.mm.memremap import percpu_ref_kill  # noqa: E402

MARK = 0x5A5A_0000_0000_0001          # a value no path writes: shows entries left untouched


@pytest.fixture
def env():
    m = machine()
    p = m.spawn("p")
    return m, p.mm


# --- holes and the count ---------------------------------------------------------------------------------
def test_unpopulated_range_snapshot_is_all_none_and_count_zero(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 16 * K)
    r = new_registered_range(mm, BASE, BASE + 16 * K)
    r.pfns[:] = MARK
    # §13 "no table (hole)": NONE, 0, last = hole start; §9.1: count = (last - start) >> 12
    assert snapshot(mm, r) == 0
    assert out(r) == [NONE] * 16


def test_pte_table_mix_snapshot(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 16 * K)
    pg = pgmap(m)
    d = pg.res.start
    ram_w, ram_r, ram_pn = m.mem.alloc_page(), m.mem.alloc_page(), m.mem.alloc_page()
    states = [
        (0, None),                                            # 0: none (the table exists)
        (1, normal_pte(ram_w, write=True)),
        (2, normal_pte(ram_r, write=False)),
        (3, make_swap_entry(0, 7)),                           # real swap entry
        (4, make_device_private_entry(0x123, True)),
        (5, make_device_private_entry(0x124, False)),
        (6, make_migration_entry(ram_r, False)),
        (7, devmap_pte(d + 5, write=True)),
        (8, pfn_pte(ram_pn, PAGE_NONE)),                     # PROT_NONE: present on x86
        (9, devmap_pte(d + 6, write=False)),
    ]
    for i, val in states:
        if val is not None:
            set_pte(m, mm, BASE + i * K, val)
    set_pte(m, mm, BASE + 15 * K, 0)                          # make sure the table covers the range
    r = new_registered_range(mm, BASE, BASE + 16 * K)
    r.pfns[:] = MARK
    before = pg.count
    assert snapshot(mm, r) == 16                             # the PTE loop ran to the chunk end
    assert out(r) == [
        NONE,
        ent(ram_w, write=True),
        ent(ram_r),
        NONE,                                                 # swap: NONE
        ent(0x123, write=True, dp=True),                      # from_pfn(swp_offset) | VALID|DP|WRITE
        ent(0x124, dp=True),
        NONE,                                                 # migration (snapshot): NONE
        ent(d + 5, write=True),
        ent(ram_pn),                                          # 5.2: no pte_protnone test -> VALID
        ent(d + 6),
    ] + [NONE] * 6
    # §8: one cached reference while walking the table, put after the PTE loop
    assert pg.count == before
    assert pg.ref.stats["tryget_live"] == 1 and pg.ref.stats["put"] == 1


def test_hwpoison_stops_the_walk_and_leaks_the_cached_pgmap(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 8 * K)
    pg = pgmap(m)
    set_pte(m, mm, BASE, devmap_pte(pg.res.start))
    set_pte(m, mm, BASE + K, make_hwpoison_entry(0x99))
    set_pte(m, mm, BASE + 2 * K, devmap_pte(pg.res.start + 1))
    r = new_registered_range(mm, BASE, BASE + 8 * K)
    r.pfns[:] = MARK
    before = pg.count
    # §7.3: other non-swap entry -> ERROR, -EFAULT; §7.2: last = addr; §9.1 snapshot ignores the result and
    # entries after the stop keep their values
    assert snapshot(mm, r) == 1
    assert out(r) == [ent(pg.res.start, write=True), ERROR] + [MARK] * 6
    # §8: -EFAULT does not pass through fault_lbl and hmm_vma_walk_pmd returns it directly: the cached
    # reference is never put (ws.pgmap is reset by assignment at the next iteration)
    assert pg.count == before + 1


def test_fault_mode_error_clears_from_last(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    set_pte(m, mm, BASE + K, make_hwpoison_entry(0x99))
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    # §9.1: on a non-zero result pfns[last .. end) are set NONE (the ERROR written at `last` included)
    assert fault(mm, r, request=[0, 0, 0, 0]) == -hmm.EFAULT
    assert out(r)[1:] == [NONE] * 3


# --- special PTEs in a VMA without VM_PFNMAP ----------------------------------------------------------------
def test_zero_page_is_special_in_snapshot_and_fault(env) -> None:
    m, mm = env
    from hmmirror.process import Process

    p = Process(m, mm)
    a = p.mmap(4 * K, "rw")
    p.touch(a, 2 * K)                                         # read faults: shared zero page, special
    r = new_registered_range(mm, a, a + 4 * K)
    r.pfns[:] = MARK
    # §13 "PTE present, special, not devmap": SPECIAL, -EFAULT (snapshot: result ignored, count = last)
    assert snapshot(mm, r) == 0
    assert out(r) == [SPECIAL] + [MARK] * 3
    # fault mode, read request: no fault needed (cpu has VALID) -> -EFAULT, pfns[last..] NONE
    assert fault(mm, r, request=VALID) == -hmm.EFAULT
    assert out(r) == [NONE] * 4
    assert m.counters["hmm.faults"] == 0


def test_pte_map_unmap_events(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    m.events.clear()
    snapshot(mm, r)
    kinds = [e["what"] for e in m.events if e["what"] in ("pte_offset_map", "pte_unmap")]
    assert kinds == ["pte_offset_map", "pte_unmap"]
    set_pte(m, mm, BASE + K, special_pte(m.mem.zero_pfn))
    m.events.clear()
    snapshot(mm, r)
    # §8: the -EFAULT of a special PTE skips fault_lbl: no pte_unmap (a no-op on x86-64, recorded)
    kinds = [e["what"] for e in m.events if e["what"] in ("pte_offset_map", "pte_unmap")]
    assert kinds == ["pte_offset_map"]


# --- devmap lookups ---------------------------------------------------------------------------------------
def test_devmap_pte_lookup_failure_returns_ebusy(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    pg = pgmap(m)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    set_pte(m, mm, BASE + K, devmap_pte(pg.res.start))
    percpu_ref_kill(pg.ref)                                   # tryget_live fails from now on
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    r.pfns[:] = MARK
    # §13: "NONE and -EBUSY if the lookup fails"; snapshot ignores it; last = that page
    assert snapshot(mm, r) == 1
    assert out(r)[:2] == [ent(int(r.pfns[0]) >> 12, write=True), NONE]
    assert out(r)[2:] == [MARK, MARK]
    # fault mode: -EBUSY restarts while the range stays valid: the model reports the 5.2 livelock
    with pytest.raises(ModelBug) as exc:
        fault(mm, r, request=VALID)
    assert exc.value.kind == "livelock"


def test_devmap_pmd_partial_chunk_and_thp(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * M2)
    pg = pgmap(m)
    d = pg.res.start
    set_pmd(m, mm, BASE, devmap_huge(d + 512, write=False))
    head = m.mem.alloc_folio(9)
    set_pmd(m, mm, BASE + M2, thp_pmd(head, write=True))
    start = BASE + M2 - 3 * K                                 # 3 pages of the devmap PMD, 2 of the THP
    r = new_registered_range(mm, start, start + 5 * K)
    before = pg.count
    assert snapshot(mm, r) == 5
    # §7.2: pfn = pmd_pfn + pte_index(addr); cpu = VALID [| WRITE]
    assert out(r) == [ent(d + 512 + 509), ent(d + 512 + 510), ent(d + 512 + 511),
                      ent(head, write=True), ent(head + 1, write=True)]
    assert pg.count == before
    assert pg.ref.stats["tryget_live"] == 1                   # one lookup, cached for the other pfns


def test_pmd_protnone_bad_and_nonpresent(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * M2)
    head = m.mem.alloc_folio(9)
    set_pmd(m, mm, BASE, thp_pmd(head))                        # chunk 0: THP
    set_pmd(m, mm, BASE + M2, pfn_pte(head, PAGE_NONE) | _PAGE_PSE)        # chunk 1: protnone THP
    tid = m.pool.alloc(1)
    set_pmd(m, mm, BASE + 2 * M2, pfn_pte(tid, x86._PAGE_PRESENT | x86._PAGE_USER | x86._PAGE_ACCESSED))  # bad
    set_pmd(m, mm, BASE + 3 * M2, make_swap_entry(1, 3))      # non-present, not migration
    r = new_registered_range(mm, BASE, BASE + 4 * M2)
    r.pfns[:] = MARK
    ret = snapshot(mm, r)
    o = out(r)
    assert o[:512] == [ent(head + k, write=True) for k in range(512)]
    assert o[512:1024] == [NONE] * 512                        # protnone: NONE for the chunk
    assert o[1024:2048] == [ERROR] * 1024                     # pmd_bad / other non-present: ERROR
    # §9.1: last = chunk start for protnone (hole_), unchanged by hmm_pfns_bad
    assert ret == 512


def test_pmd_migration_entry(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * M2)
    pg = pgmap(m)
    d = pg.res.start
    set_pmd(m, mm, BASE, devmap_huge(d))
    pmdp1 = pmd_ptr(mm, BASE + M2)
    m.pool.set(pmdp1, make_migration_entry(d + 512, False))
    r = new_registered_range(mm, BASE, BASE + 2 * M2)
    r.pfns[:] = MARK
    # §13 "PMD migration entry": not written, 0 (last stays at the end of chunk 0)
    assert snapshot(mm, r) == 512
    assert out(r)[512:] == [MARK] * 512
    # fault mode without a VALID request: not written, 0
    assert fault(mm, r, request=0) == 1024 - 512
    assert out(r)[512:] == [0] * 512
    # with a VALID request: pmd_migration_entry_wait, then -EBUSY and a re-walk from `last`
    r.pfns[:] = VALID
    r.default_flags, r.pfn_flags_mask = 0, (1 << 64) - 1

    def body():
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from hmm.hmm_range_fault(r, True)
        sched.up_read(mm.mmap_sem)
        return ret

    st = Stepper(body(), mm.task)
    pt = st.run_until(lambda p: p.ready is not None and not p.ready())
    assert pt.what == "migration_entry_wait"
    m.pool.set(pmdp1, devmap_huge(d + 512))                   # the migration completes
    assert st.finish() == 1024
    assert out(r)[512:] == [ent(d + 512 + k, write=True) for k in range(512)]
    assert r.stats["walk_ebusy"] == 1


def test_pte_swap_and_migration_entries_never_fault(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 3 * K)
    ram = m.mem.alloc_page()
    set_pte(m, mm, BASE, normal_pte(ram))
    set_pte(m, mm, BASE + K, make_migration_entry(ram, False))
    set_pte(m, mm, BASE + 2 * K, make_swap_entry(0, 9))
    r = new_registered_range(mm, BASE, BASE + 3 * K)
    seen = []
    m.fault_hooks.append(lambda *a: seen.append(a))
    # §7.3: for non-present entries fault/write_fault are still False where they are tested (hmm_pte_need_fault
    # is not called for swap and migration entries), so §13 "real swap entry / migration entry": NONE, 0 in
    # fault mode too, even when VALID|WRITE is requested
    assert fault(mm, r, request=VALID | WRITE) == 3
    assert out(r) == [ent(ram, write=True), NONE, NONE]
    assert seen == [] and r.stats["walk_ebusy"] == 0


# --- PUD ----------------------------------------------------------------------------------------------------
def test_devmap_pud_range_in_the_middle(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, G1)
    pg = pgmap(m)
    d = pg.res.start
    set_pud(m, mm, BASE, devmap_huge(d))
    start = BASE + (512 << 20) + 8 * K
    r = new_registered_range(mm, start, start + 16 * K)
    before = pg.count
    assert snapshot(mm, r) == 16
    # §7.1: pfn = pud_pfn + ((addr & ~PUD_MASK) >> PAGE_SHIFT)
    off = (start - BASE) >> 12
    assert out(r) == [ent(d + off + k, write=True) for k in range(16)]
    assert pg.count == before
    assert fault(mm, r, request=VALID | WRITE) == 16          # writable PUD: no fault needed
    assert out(r) == [ent(d + off + k, write=True) for k in range(16)]
    assert pg.count == before


def test_pud_none_hole_after_a_devmap_pud(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * G1)
    pg = pgmap(m)
    set_pud(m, mm, BASE, devmap_huge(pg.res.start, write=False))
    r = new_registered_range(mm, BASE + G1 - 2 * K, BASE + G1 + 2 * K)
    r.pfns[:] = MARK
    # PUD 0 fills 2 entries (last = BASE + 1G); PUD 1 is none: pte_hole -> NONE, last = hole start
    assert snapshot(mm, r) == 2
    off = (G1 - 2 * K) >> 12
    assert out(r) == [ent(pg.res.start + off), ent(pg.res.start + off + 1), NONE, NONE]


def test_pud_fault_needed_sleeps_under_the_pud_lock(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, G1)
    pg = pgmap(m)
    set_pud(m, mm, BASE, devmap_huge(pg.res.start, write=False))
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    # §7.1: the hole/fault path runs in the pud_entry context with the PUD lock (mm.page_table_lock) held;
    # handle_mm_fault may sleep (mm-substrate.md §8): a sleep in atomic context
    with pytest.raises(ModelBug) as exc:
        fault(mm, r, request=VALID | WRITE)
    assert exc.value.kind == "sleep_in_atomic"
    ev = [e for e in m.events if e["what"] == "may_sleep" and e["call"] == "handle_mm_fault"][-1]
    assert f"spin:{mm.page_table_lock.name}" in ev["locks"]
    assert ev["flags"] == int(FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.REMOTE | FAULT_FLAG.WRITE)


def _trans_huge_pud_env(env):
    m, mm = env
    add_vma(m, mm, BASE, G1)
    pg = pgmap(m)
    set_pud(m, mm, BASE, pfn_pte(pg.res.start, x86.PAGE_SHARED) | _PAGE_PSE)   # pud_trans_huge, not devmap
    return m, mm, new_registered_range(mm, BASE, BASE + 4 * K)


def test_non_devmap_huge_pud_takes_the_split_path(env) -> None:
    m, mm, r = _trans_huge_pud_env(env)
    # §7.1: split_huge_pud with the PUD lock held by the walker: the CLEAR notifier may sleep
    with pytest.raises(ModelBug) as exc:
        snapshot(mm, r)
    assert exc.value.kind == "sleep_in_atomic"
    ev = [e for e in m.events if e["what"] == "may_sleep" and e["call"] == "split_huge_pud"][-1]
    assert f"spin:{mm.page_table_lock.name}" in ev["locks"]


def test_split_path_retakes_the_pud_lock(env) -> None:
    m, mm, r = _trans_huge_pud_env(env)
    # ... and __split_huge_pud then takes mm.page_table_lock again (mm-substrate.md §8: a spinlock is not
    # recursive, the acquisition never completes)
    with Recorder() as rec:
        with pytest.raises(Deadlock):
            snapshot(mm, r)
    assert rec.kinds[0] == "sleep_in_atomic"
    assert "recursive_lock" in rec.kinds


# --- hugetlb ----------------------------------------------------------------------------------------------
def test_hugetlb_page_shift(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * M2, flags=VM.READ | VM.WRITE | VM.HUGETLB | VM.MAYREAD | VM.MAYWRITE,
            hstate_order=9)
    h0 = 0x8000                                               # any 2 MiB aligned pfn
    set_pmd(m, mm, BASE, thp_pmd(h0, write=True))             # huge page 0 present; huge page 1 none
    r = new_registered_range(mm, BASE, BASE + 2 * M2, shift=21)
    assert r.pfns.shape == (2,)
    # §7.4: one entry per huge page; a none entry still gets from_pfn(pte_pfn(none) = 0) (VALID set) | 0
    assert snapshot(mm, r) == 1024                            # the count is in 4 KiB pages (§9.1)
    assert out(r) == [ent(h0, write=True), ent(0)]
    # PAGE_SHIFT granularity: pfn = pte_pfn + ((start & mask) >> 12) + k
    r2 = new_registered_range(mm, BASE + 8 * K, BASE + 12 * K, name="r2")
    assert snapshot(mm, r2) == 4
    assert out(r2) == [ent(h0 + 8 + k, write=True) for k in range(4)]


def test_hugetlb_page_shift_checks(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, M2, flags=VM.READ | VM.WRITE | VM.HUGETLB | VM.MAYREAD | VM.MAYWRITE, hstate_order=9)
    add_vma(m, mm, BASE + M2, M2)                              # an ordinary VMA after it
    r = new_registered_range(mm, BASE, BASE + M2, shift=30 - 9)
    r1 = new_registered_range(mm, BASE + M2, BASE + 2 * M2, shift=21, name="r1")
    assert snapshot(mm, r1) == -hmm.EINVAL                    # page_shift != PAGE_SHIFT on a normal VMA
    r.page_shift = 30                                         # mismatching huge shift on a 2 MiB hstate
    assert snapshot(mm, r) == -hmm.EINVAL


def test_hugetlb_hole_with_huge_page_shift_overruns_pfns(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * M2, flags=VM.READ | VM.WRITE | VM.HUGETLB | VM.MAYREAD | VM.MAYWRITE,
            hstate_order=9)
    r = new_registered_range(mm, BASE, BASE + 2 * M2, shift=21)
    # snapshot: walk_hugetlb_range calls pte_hole once per huge page (PUD none, §6); each hole writes NONE
    # with the range's shift and sets last to its own start, so last = the second huge page (§9.1)
    assert snapshot(mm, r) == 512
    assert out(r) == [NONE, NONE]
    # fault: hmm_vma_walk_hole indexes and counts with PAGE_SHIFT (§1.3): 512 requests read from a
    # 2-entry array, a buffer overrun of the C code
    with pytest.raises(ModelBug) as exc:
        fault(mm, r, request=VALID)
    assert exc.value.kind == "pfns_overflow"


# --- gaps, permissions, device VMAs, validity -------------------------------------------------------------
def test_gap_between_vmas(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, K)
    add_vma(m, mm, BASE + 2 * K, K)
    set_pte(m, mm, BASE, normal_pte(m.mem.alloc_page()))
    set_pte(m, mm, BASE + 2 * K, normal_pte(m.mem.alloc_page()))
    r = new_registered_range(mm, BASE, BASE + 3 * K)
    r.pfns[:] = MARK
    assert snapshot(mm, r) == 3
    assert out(r)[1] == NONE                                  # §13 gap: NONE, 0
    # fault mode with a VALID request on the gap page: handle_mm_fault with walk->vma == NULL
    with pytest.raises(ModelBug) as exc:
        fault(mm, r, request=[0, VALID, 0])
    assert exc.value.kind == "null_deref"


def test_no_read_permission_eperm_clears_everything(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K, flags=VM.MAYREAD | VM.MAYWRITE)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    r.pfns[:] = MARK
    assert snapshot(mm, r) == -hmm.EPERM
    assert out(r) == [NONE] * 4


@pytest.mark.parametrize("flag", [VM.IO, VM.PFNMAP, VM.MIXEDMAP])
def test_device_vmas_efault(env, flag) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K, flags=VM.READ | VM.MAYREAD | flag)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    assert snapshot(mm, r) == -hmm.EFAULT
    assert fault(mm, r, request=VALID) == -hmm.EFAULT


def test_no_vma_efault(env) -> None:
    m, mm = env
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    assert snapshot(mm, r) == -hmm.EFAULT


def test_invalid_range_at_entry(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    r.valid = False
    held = {}

    def snap():
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from hmm.hmm_range_snapshot(r)
        held["snapshot"] = mm.mmap_sem.held_by(mm.task)
        if held["snapshot"]:
            sched.up_read(mm.mmap_sem)
        return ret

    def flt():
        yield from sched.down_read(mm.mmap_sem)
        ret = yield from hmm.hmm_range_fault(r, True)
        held["fault"] = mm.mmap_sem.held_by(mm.task)
        return ret

    # §9.2: snapshot -EAGAIN with mmap_sem untouched; fault -EAGAIN with mmap_sem released by hmm
    assert sched.run(snap(), mm.task) == -hmm.EAGAIN
    assert sched.run(flt(), mm.task) == -hmm.EAGAIN
    assert held == {"snapshot": True, "fault": False}
    assert m.counters["hmm.ret.EAGAIN"] == 2


# --- fault mode: the hole path ----------------------------------------------------------------------------
@pytest.mark.parametrize("block", [True, False])
def test_hole_path_faults_every_page_to_the_chunk_end(env, block) -> None:
    m, mm = env
    from hmmirror.process import Process

    p = Process(m, mm)
    a = p.mmap(8 * K, "rw")
    p.touch(a, K, write=True)                                  # page 0 present (the PTE table exists)
    seen: list[tuple[int, int]] = []
    m.fault_hooks.append(lambda vma, addr, flags: seen.append((addr, int(flags))))
    r = new_registered_range(mm, a, a + 8 * K)
    req = [0] * 8
    req[2] = VALID | WRITE
    ret = fault(mm, r, block=block, request=req)
    # §5: faulted pages 2..7 in ascending order with the same write_fault; flags ALLOW_RETRY|REMOTE in
    # both modes (+WRITE); the re-walk reads the NONE written there as requests (no more faults)
    wflags = int(FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.REMOTE | FAULT_FLAG.WRITE)
    assert seen == [(a + i * K, wflags) for i in range(2, 8)]
    assert ret == 8
    cpu = p.inspect(a, 8 * K)
    o = out(r)
    assert o[0] == ent(cpu[0].pfn, write=True)
    assert o[1] == NONE                                        # none, no request: NONE
    assert o[2:] == [ent(s.pfn, write=True) for s in cpu[2:]]
    assert r.stats["faults"] == 6 and r.stats["walk_ebusy"] == 1


def test_snapshot_never_faults(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 4 * K)
    seen = []
    m.fault_hooks.append(lambda *a: seen.append(a))
    r = new_registered_range(mm, BASE, BASE + 4 * K)
    r.pfns[:] = VALID | WRITE                                  # requests are ignored by a snapshot
    assert snapshot(mm, r) == 0 and seen == []


def test_device_private_entry_faults_only_when_requested(env) -> None:
    m, mm = env
    add_vma(m, mm, BASE, 2 * K)
    set_pte(m, mm, BASE, make_device_private_entry(0x321, False))
    set_pte(m, mm, BASE + K, normal_pte(m.mem.alloc_page()))
    r = new_registered_range(mm, BASE, BASE + 2 * K)
    # request VALID|WRITE without DEVICE_PRIVATE: no fault for a device-private entry (§4)
    assert fault(mm, r, request=[VALID | WRITE, 0]) == 2
    assert out(r)[0] == ent(0x321, dp=True)
    # with DEVICE_PRIVATE: hole path -> handle_mm_fault -> do_swap_page -> no pgmap -> SIGBUS -> ERROR
    assert fault(mm, r, request=[VALID | DP, 0]) == -hmm.EFAULT
    assert out(r) == [NONE, NONE]

