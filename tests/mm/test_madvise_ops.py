"""madvise(2): DONTNEED, FREE/PAGEOUT/COLD, THP advice, fork advice, POPULATE, REMOVE and errors.

Expected values: mm-substrate.md §4.1 (flags, split/merge), §5.4 (THP split), §5.6 (shmem), §5.9 (hugetlb
DONTNEED), §6 (madvise rows) and observations A5-A7, A11-A14, B6, T5, T9 of §9; error codes: v5.2 / v6.18
mm/madvise.c (madvise_behavior_valid, madvise_dontneed_free, madvise_populate, madvise_remove).
"""

from __future__ import annotations

import pytest

from hmmirror import KernelError, Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.include.mm_types import VM
from hmmirror.mm.debug import check_counts, entries_in

P = 4096
M2 = PMD_SIZE


def invalidations(m: Machine, since: int = 0) -> list[tuple[str, int, int, str]]:
    return [(e["what"][len("invalidate_range_"):], e["start"], e["end"], e["event"]) for e in m.events[since:]
            if e["what"] in ("invalidate_range_start", "invalidate_range_end")]


def errno_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(KernelError) as exc:
        fn(*args)
    return exc.value.errno_name


def test_a11_a12_dontneed_then_read(machine: Machine) -> None:
    # A11/A12: write, MADV_DONTNEED p2-5: those entries none (pages freed, page tables kept), then read ->
    # zero page; one CLEAR over the VMA's part of the range
    p = machine.spawn()
    a = p.mmap(8 * P)
    p.touch(a, 8 * P, write=True)
    free0 = machine.mem.nr_free_pages()
    tables0 = machine.pool.nr_tables
    ev = len(machine.events)
    p.madvise(a + 2 * P, 4 * P, "dontneed")
    rng = (a + 2 * P, a + 6 * P, "CLEAR")
    assert invalidations(machine, ev) == [("start",) + rng, ("end",) + rng]
    st = p.inspect(a, 8 * P)
    assert [s.present for s in st] == [True, True, False, False, False, False, True, True]
    assert machine.mem.nr_free_pages() == free0 + 4
    assert machine.pool.nr_tables == tables0
    p.touch(a + 2 * P, 4 * P)
    assert all(s.kind == "zero" for s in p.inspect(a + 2 * P, 4 * P))
    assert check_counts(machine) == []


def test_dontneed_one_clear_per_vma_and_enomem_for_the_hole(machine: Machine) -> None:
    # §6: CLEAR per VMA over its part of [s, e); holes are skipped and reported as -ENOMEM at the end
    p = machine.spawn()
    a = p.mmap(8 * P)
    p.munmap(a + 3 * P, 2 * P)
    p.touch(a, 3 * P, write=True)
    p.touch(a + 5 * P, 3 * P, write=True)
    ev = len(machine.events)
    assert errno_of(p.madvise, a + P, 6 * P, "dontneed") == "ENOMEM"
    starts = [(s, e, k) for w, s, e, k in invalidations(machine, ev) if w == "start"]
    assert starts == [(a + P, a + 3 * P, "CLEAR"), (a + 5 * P, a + 7 * P, "CLEAR")]
    assert [s.present for s in p.inspect(a, 8 * P)] == [True, False, False, False, False, False, False, True]


def test_t5_dontneed_one_page_of_a_thp(machine: Machine) -> None:
    # T5: DONTNEED one 4K page of a THP: PMD split (CLEAR [2M) nested in the CLEAR of the zap), that page
    # none, the other 511 pfns kept
    p = machine.spawn()
    a = p.mmap(2 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a, 1, write=True)
    before = p.inspect(a, M2)
    assert before[0].level == "pmd"
    pg = a + 9 * P
    ev = len(machine.events)
    p.madvise(pg, P, "dontneed")
    assert invalidations(machine, ev) == [("start", pg, pg + P, "CLEAR"), ("start", a, a + M2, "CLEAR"),
                                          ("end", a, a + M2, "CLEAR"), ("end", pg, pg + P, "CLEAR")]
    after = p.inspect(a, M2)
    assert not after[9].present
    assert all(s.level == "pte" and s.pfn == b.pfn for i, (s, b) in enumerate(zip(after, before)) if i != 9)
    assert len(p.mm.vmas) == 1                       # no VMA change
    assert check_counts(machine) == []


def test_a13_free_keeps_pages_without_pressure(machine: Machine) -> None:
    # A13: MADV_FREE without memory pressure: entries unchanged (same pfns); one CLEAR over the range
    p = machine.spawn()
    a = p.mmap(4 * P)
    p.touch(a, 4 * P, write=True, fill=7)
    pfns = [s.pfn for s in p.inspect(a, 4 * P)]
    ev = len(machine.events)
    p.madvise(a, 4 * P, "free")
    assert [s.pfn for s in p.inspect(a, 4 * P)] == pfns
    assert [k for _, _, _, k in invalidations(machine, ev)] == ["CLEAR", "CLEAR"]
    assert p.check(a, 4 * P, 7) == 0
    assert check_counts(machine) == []


def test_a14_pageout_and_cold(machine: Machine) -> None:
    # A14: MADV_PAGEOUT (and COLD) without swap: unchanged [6.18]; they do not exist in 5.2 (added in 5.4)
    p = machine.spawn()
    a = p.mmap(4 * P)
    p.touch(a, 4 * P, write=True)
    pfns = [s.pfn for s in p.inspect(a, 4 * P)]
    if machine.profile.name == "5.2":
        assert errno_of(p.madvise, a, 4 * P, "pageout") == "EINVAL"
        assert errno_of(p.madvise, a, 4 * P, "cold") == "EINVAL"
    else:
        p.madvise(a, 4 * P, "pageout")
        p.madvise(a, 4 * P, "cold")
    assert [s.pfn for s in p.inspect(a, 4 * P)] == pfns


def test_t9_nohugepage_and_flag_split_merge(machine: Machine) -> None:
    # T9: MADV_NOHUGEPAGE -> 4K pages only; §4.1: HUGEPAGE sets VM_HUGEPAGE and clears VM_NOHUGEPAGE (and the
    # reverse); a flag change on part of a VMA splits it; no notifier
    p = machine.spawn()
    a = p.mmap(4 * M2, align=M2)
    ev = len(machine.events)
    p.madvise(a, 4 * M2, "hugepage")
    p.madvise(a + M2, M2, "nohugepage")
    assert invalidations(machine, ev) == []
    vmas = p.mm.vmas
    assert [(v.vm_start - a, v.vm_end - a) for v in vmas] == [(0, M2), (M2, 2 * M2), (2 * M2, 4 * M2)]
    assert vmas[0].vm_flags & VM.HUGEPAGE and not vmas[0].vm_flags & VM.NOHUGEPAGE
    assert vmas[1].vm_flags & VM.NOHUGEPAGE and not vmas[1].vm_flags & VM.HUGEPAGE
    p.touch(a + M2, P, write=True)
    p.touch(a, P, write=True)
    assert p.inspect(a + M2, P)[0].level == "pte"
    assert p.inspect(a, P)[0].level == "pmd"
    # compatible flags again, but the first two VMAs each got their own anon_vma on their first write (a
    # neighbour with other flags is not anon_vma_compatible, find_mergeable_anon_vma) and VMAs with different
    # anon_vmas do not merge (is_mergeable_anon_vma): only the second merges with the third, which has none.
    # Observed on the host kernel (6.18.44): /proc/self/maps shows [a, a+2M) and [a+2M, a+8M).
    p.madvise(a + M2, M2, "hugepage")
    assert [(v.vm_start - a, v.vm_end - a) for v in p.mm.vmas] == [(0, M2), (M2, 4 * M2)]


def test_dontfork_dofork_merge_and_wipeonfork_rules(machine: Machine) -> None:
    # §4.1 split/merge; madvise_behavior(): WIPEONFORK only on private anonymous memory (else EINVAL)
    p = machine.spawn()
    a = p.mmap(8 * P)
    p.madvise(a + 2 * P, 2 * P, "dontfork")
    assert len(p.mm.vmas) == 3 and p.mm.vmas[1].vm_flags & VM.DONTCOPY
    p.madvise(a + 2 * P, 2 * P, "dofork")
    assert len(p.mm.vmas) == 1
    p.madvise(a, 8 * P, "wipeonfork")
    assert p.mm.vmas[0].vm_flags & VM.WIPEONFORK
    p.madvise(a, 8 * P, "keeponfork")
    assert not p.mm.vmas[0].vm_flags & VM.WIPEONFORK
    pytest.importorskip("hmmirror.fs.shmem")
    b = p.mmap(4 * P, "rw", ["shared", "anonymous"])
    assert errno_of(p.madvise, b, 4 * P, "wipeonfork") == "EINVAL"


def test_bad_arguments(machine: Machine) -> None:
    # madvise(): unknown advice or unaligned start -> EINVAL; length 0 -> 0; [5.2] POPULATE_* and COLLAPSE
    # do not exist yet (5.14 / 6.1)
    p = machine.spawn()
    a = p.mmap(4 * P)
    assert errno_of(p.madvise, a, P, 77) == "EINVAL"
    assert errno_of(p.madvise, a + 1, P, "dontneed") == "EINVAL"
    assert p.madvise(a, 0, "dontneed") == 0
    if machine.profile.name == "5.2":
        assert errno_of(p.madvise, a, P, "populate_read") == "EINVAL"
        assert errno_of(p.madvise, a, P, "collapse") == "EINVAL"


def test_dontneed_refused_on_locked_vma(machine: Machine) -> None:
    # §6: DONTNEED is -EINVAL on VM_LOCKED VMAs in both versions (the model has no mlock: flag set directly)
    p = machine.spawn()
    a = p.mmap(4 * P)
    p.mm.vmas[0].vm_flags |= VM.LOCKED
    assert errno_of(p.madvise, a, 4 * P, "dontneed") == "EINVAL"


def test_dontneed_on_hugetlb(machine: Machine) -> None:
    # §5.9 / §6: [5.2] EINVAL on hugetlb VMAs; [6.18] allowed: zaps whole huge pages (H4), an unaligned start
    # is EINVAL and the end is rounded down to the huge page size
    pytest.importorskip("hmmirror.mm.hugetlb")
    m = Machine(machine.profile, ram=256 << 20, hugepages_2m=2)
    p = m.spawn()
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, 2 * M2, write=True)
    if m.profile.name == "5.2":
        assert errno_of(p.madvise, a, M2, "dontneed") == "EINVAL"
        return
    assert errno_of(p.madvise, a + P, M2, "dontneed") == "EINVAL"
    ev = len(m.events)
    p.madvise(a, M2 + 8 * P, "dontneed")            # rounded down to [a, a + 2M)
    assert invalidations(m, ev) == [("start", a, a + M2, "CLEAR"), ("end", a, a + M2, "CLEAR")]
    assert not p.inspect(a, P)[0].present and p.inspect(a + M2, P)[0].present
    assert check_counts(m) == []


def test_populate_read_write(m618: Machine) -> None:
    # A6/A7: MADV_POPULATE_READ -> zero page; then POPULATE_WRITE -> new anon pages [6.18];
    # madvise_populate(): -ENOMEM at a hole, -EINVAL for an incompatible VMA
    p = m618.spawn()
    a = p.mmap(4 * P)
    p.madvise(a, 4 * P, "populate_read")
    assert all(s.kind == "zero" for s in p.inspect(a, 4 * P))
    p.madvise(a, 4 * P, "populate_write")
    st = p.inspect(a, 4 * P)
    assert all(s.kind == "anon" and s.write for s in st) and len({s.pfn for s in st}) == 4
    assert errno_of(p.madvise, a, 8 * P, "populate_read") == "ENOMEM"
    b = p.mmap(2 * P, "r")
    assert errno_of(p.madvise, b, 2 * P, "populate_write") == "EINVAL"
    c = p.mmap(2 * P, "none")
    assert errno_of(p.madvise, c, 2 * P, "populate_read") == "EINVAL"
    assert check_counts(m618) == []


def test_b6_remove_frees_shmem_pages(machine: Machine) -> None:
    # B6: MADV_REMOVE on shared anonymous memory frees the pages (re-read: new zeroed pages);
    # madvise_remove(): EINVAL without a file, EACCES unless shared and writable
    pytest.importorskip("hmmirror.fs.shmem")
    p = machine.spawn()
    a = p.mmap(4 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 4 * P, write=True, fill=5)
    old = [s.pfn for s in p.inspect(a, 4 * P)]
    free0 = machine.mem.nr_free_pages()
    p.madvise(a, 4 * P, "remove")
    assert not any(s.present for s in p.inspect(a, 4 * P))
    assert machine.mem.nr_free_pages() == free0 + 4
    assert p.check(a, 4 * P, 0) == 0
    assert check_counts(machine) == []
    b = p.mmap(2 * P)
    assert errno_of(p.madvise, b, 2 * P, "remove") == "EINVAL"
    c = p.mmap(2 * P, "r", ["shared", "anonymous"])
    assert errno_of(p.madvise, c, 2 * P, "remove") == "EACCES"
    _ = old


def test_dontneed_shmem_keeps_pages(machine: Machine) -> None:
    # B5 / §6: DONTNEED drops the mappings only; shmem pages stay in the file (re-read: same pfns)
    pytest.importorskip("hmmirror.fs.shmem")
    p = machine.spawn()
    a = p.mmap(4 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 4 * P, write=True)
    pfns = [s.pfn for s in p.inspect(a, 4 * P)]
    p.madvise(a, 4 * P, "dontneed")
    assert entries_in(p.mm, a, a + 4 * P) == []
    p.touch(a, 4 * P)
    assert [s.pfn for s in p.inspect(a, 4 * P)] == pfns
    assert check_counts(machine) == []


def test_t7_t11_collapse(m618: Machine) -> None:
    # T7/T11 [6.18]: MADV_COLLAPSE (with or without MADV_HUGEPAGE): PMD again, new pfns, holes filled;
    # CLEAR [2M) around the collapse
    p = m618.spawn()
    a = p.mmap(2 * M2, align=M2)
    p.touch(a, 16 * P, write=True, fill="index32")         # no advice: 4K pages (T10)
    assert p.inspect(a, P)[0].level == "pte"
    p.madvise(a + 3 * P, P, "dontneed")                    # a hole
    old = {s.pfn for s in p.inspect(a, 16 * P) if s.present}
    free0 = m618.mem.nr_free_pages()
    ev = len(m618.events)
    p.madvise(a, M2, "collapse")
    starts = [(e["start"], e["end"], e["event"]) for e in m618.events[ev:] if e["what"] == "invalidate_range_start"]
    assert starts == [(a, a + M2, "CLEAR")]
    st = p.inspect(a, M2)
    assert all(s.level == "pmd" and s.kind == "anon" and s.write for s in st)
    assert not old & {s.pfn for s in st}
    assert p.read_bytes(a + 3 * P, 8) == bytes(8)          # the hole reads as zeroes
    assert p.read_bytes(a + 5 * P, 4) == (5 * 1024).to_bytes(4, "little")
    assert m618.mem.nr_free_pages() == free0 + 15 - 512      # 15 small pages freed, one 2 MiB folio taken
    assert check_counts(m618) == []
    # an untouched block has no page table: not collapsed -> EINVAL (madvise_collapse_errno(SCAN_PMD_NULL))
    assert errno_of(p.madvise, a + M2, M2, "collapse") == "EINVAL"
    p.madvise(a, 2 * M2, "nohugepage")
    assert errno_of(p.madvise, a, M2, "collapse") == "EINVAL"


def test_a15_munmap_contrast(machine: Machine) -> None:
    # A15: munmap p2-3: those entries gone and no VMA there (unlike DONTNEED, which keeps the VMA);
    # T10: without advice under enabled=madvise only 4K pages are used
    p = machine.spawn()
    a = p.mmap(6 * P)
    p.touch(a, 6 * P, write=True)
    p.munmap(a + 2 * P, 2 * P)
    assert [s.present for s in p.inspect(a, 6 * P)] == [True, True, False, False, True, True]
    assert p.mm.vma_lookup(a + 2 * P) is None and p.mm.vma_lookup(a + 3 * P) is None
    assert entries_in(p.mm, a + 2 * P, a + 4 * P) == []
    assert all(s.level == "pte" for s in p.inspect(a, 2 * P))
    assert check_counts(machine) == []
