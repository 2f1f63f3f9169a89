"""fork(2): VMA copies, page-table copies, COW and the parent's notifier ranges.

Expected values: mm-substrate.md §4.1 (VM_DONTCOPY, VM_WIPEONFORK), §5.3/§5.4 (COW after fork), §6 (fork row:
PROTECTION_PAGE per copied COW VMA, what is copied) and observations F1-F9 of §9.
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.include.mm_types import VM
from hmmirror.mm.debug import check_counts

P = 4096
M2 = PMD_SIZE


def invalidations(m: Machine, since: int = 0, mm: str | None = None) -> list[tuple[str, int, int, str]]:
    return [(e["mm"], e["start"], e["end"], e["event"]) for e in m.events[since:]
            if e["what"] == "invalidate_range_start" and (mm is None or e["mm"] == mm)]


def faults(m: Machine) -> int:
    return m.counters["handle_mm_fault"]


def test_f1_to_f4b_cow_sequence(machine: Machine) -> None:
    # F1: fork with p0-3 written, p4-5 zero page: same pfns both sides, write-protected
    p = machine.spawn("p")
    a = p.mmap(6 * P)
    p.touch(a, 4 * P, write=True)
    p.touch(a + 4 * P, 2 * P)
    pfns = [s.pfn for s in p.inspect(a, 6 * P)]
    ev = len(machine.events)
    c = p.fork("c")
    # §6: parent mm, one PROTECTION_PAGE [vm_start, vm_end) for the copied COW VMA; nothing in the child
    assert invalidations(machine, ev) == [("p", a, a + 6 * P, "PROTECTION_PAGE")]
    for proc in (p, c):
        st = proc.inspect(a, 6 * P)
        assert [s.pfn for s in st] == pfns and not any(s.write for s in st)
        assert [s.kind for s in st] == ["anon"] * 4 + ["zero"] * 2
    assert all(machine.mem.mapcount[pf] == 2 for pf in pfns[:4])
    assert check_counts(machine) == []
    # F2: the parent's write copies (CLEAR [4K))
    ev = len(machine.events)
    p.touch(a, P, write=True)
    s0 = p.inspect(a, P)[0]
    assert s0.pfn != pfns[0] and s0.write
    assert invalidations(machine, ev) == [("p", a, a + P, "CLEAR")]
    # F3c: the child writes the page now exclusive to it: reuse (same pfn, no notifier)
    ev = len(machine.events)
    c.touch(a, P, write=True)
    s0c = c.inspect(a, P)[0]
    assert s0c.pfn == pfns[0] and s0c.write
    assert invalidations(machine, ev) == []
    # F4b: after the child exits the parent's pages are exclusive but still write-protected: 1 fault, reuse
    c.exit()
    st = p.inspect(a + P, 3 * P)
    assert all(s.exclusive and not s.write for s in st)
    n, ev = faults(machine), len(machine.events)
    p.touch(a + P, 3 * P, write=True)
    assert faults(machine) == n + 3
    assert [s.pfn for s in p.inspect(a + P, 3 * P)] == pfns[1:4]
    assert invalidations(machine, ev) == []
    assert check_counts(machine) == []


def test_reused_page_is_writable_after_mprotect_cycle(m618: Machine) -> None:
    # §5.3 [6.18]: a page reused after fork is anon-exclusive again, so mprotect(R) then RW makes it writable
    p = m618.spawn("p")
    a = p.mmap(P)
    p.touch(a, P, write=True)
    c = p.fork("c")
    c.exit()
    p.touch(a, P, write=True)                      # reuse
    p.mprotect(a, P, "r")
    p.mprotect(a, P, "rw")
    assert p.inspect(a, P)[0].write


def test_f5_shared_anon_not_copied(machine: Machine) -> None:
    # F5/F5c: MAP_SHARED|MAP_ANONYMOUS: child entries not present until touched; then the same pfns; no
    # notifier for a VMA that is not copied
    pytest.importorskip("hmmirror.fs.shmem")
    p = machine.spawn("p")
    a = p.mmap(4 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 4 * P, write=True)
    pfns = [s.pfn for s in p.inspect(a, 4 * P)]
    ev = len(machine.events)
    c = p.fork("c")
    assert invalidations(machine, ev) == []
    assert not any(s.present for s in c.inspect(a, 4 * P))
    c.touch(a, 4 * P)
    assert [s.pfn for s in c.inspect(a, 4 * P)] == pfns
    assert all(s.write for s in p.inspect(a, 4 * P))      # the parent's shared entries are not touched
    assert check_counts(machine) == []


def test_untouched_private_vma_not_copied(machine: Machine) -> None:
    # §6: entries are copied only for VMAs with an anon_vma (a read-only-touched anon VMA has none): no copy,
    # no notifier
    p = machine.spawn("p")
    a = p.mmap(4 * P)
    p.touch(a, 4 * P)                                      # zero page, no anon_vma
    ev = len(machine.events)
    c = p.fork("c")
    assert invalidations(machine, ev) == []
    assert not any(s.present for s in c.inspect(a, 4 * P))


def test_f6c_f7c_dontfork_and_wipeonfork(machine: Machine) -> None:
    # F6c: MADV_DONTFORK -> no VMA in the child; F7c: MADV_WIPEONFORK -> an empty VMA in the child
    p = machine.spawn("p")
    a = p.mmap(4 * P)
    b = p.mmap(4 * P)
    p.touch(a, 4 * P, write=True)
    p.touch(b, 4 * P, write=True)
    p.madvise(a, 4 * P, "dontfork")
    p.madvise(b, 4 * P, "wipeonfork")
    c = p.fork("c")
    assert c.mm.vma_lookup(a) is None
    vb = c.mm.vma_lookup(b)
    assert vb is not None and (vb.vm_start, vb.vm_end) == (b, b + 4 * P) and vb.vm_flags & VM.WIPEONFORK
    assert not any(s.present for s in c.inspect(b, 4 * P))
    c.touch(b, P)
    assert c.inspect(b, P)[0].kind == "zero"
    # the parent keeps its pages writable (neither VMA was copied)
    assert all(s.write for s in p.inspect(a, 4 * P) + p.inspect(b, 4 * P))
    assert check_counts(machine) == []


def test_f8_f9_thp_across_fork(machine: Machine) -> None:
    # F8: a PMD THP across fork: both PMD-mapped (write-protected).  F9: the parent writes one byte:
    # [6.18] parent PMD split (CLEAR [2M)), only that 4K copied (CLEAR [4K)); [5.2] the whole THP copied
    # (CLEAR [2M)).  The child keeps its PMD.
    p = machine.spawn("p")
    a = p.mmap(2 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a, M2, write=True, fill=3)
    head = p.inspect(a, P)[0].pfn
    c = p.fork("c")
    for proc in (p, c):
        s = proc.inspect(a, P)[0]
        assert s.level == "pmd" and s.pfn == head and not s.write
    ev = len(machine.events)
    p.write_bytes(a + 5 * P, b"\x01")
    sp, sc = p.inspect(a, M2), c.inspect(a, M2)
    assert all(s.level == "pmd" and s.pfn == head + i for i, s in enumerate(sc))
    if machine.profile.thp_cow_split:
        assert invalidations(machine, ev) == [("p", a, a + M2, "CLEAR"), ("p", a + 5 * P, a + 6 * P, "CLEAR")]
        assert all(s.level == "pte" for s in sp)
        assert sp[5].pfn != head + 5 and sp[5].write
        assert all(s.pfn == head + i and not s.write for i, s in enumerate(sp) if i != 5)
    else:
        assert invalidations(machine, ev) == [("p", a, a + M2, "CLEAR")]
        assert sp[0].level == "pmd" and sp[0].write and sp[0].pfn != head
        assert not any(s.pfn == head + i for i, s in enumerate(sp))
    assert p.check(a, M2, 3) == 1 and c.check(a, M2, 3) == 0      # p5 got one written byte
    assert check_counts(machine) == []


def test_5_2_thp_cow_falls_back_to_small_pages(m52: Machine) -> None:
    # §5.4 [5.2]: without a new THP (here: THP no longer enabled for the VMA) the shared THP is copied into
    # 512 new small pages under CLEAR [2M)
    p = m52.spawn("p")
    a = p.mmap(M2, align=M2)
    p.madvise(a, M2, "hugepage")
    p.touch(a, M2, write=True, fill=9)
    head = p.inspect(a, P)[0].pfn
    c = p.fork("c")
    p.mm.vmas[0].vm_flags &= ~VM.HUGEPAGE                 # THP disabled for the VMA (flag only: no split)
    ev = len(m52.events)
    p.touch(a, 1, write=True)
    assert invalidations(m52, ev) == [("p", a, a + M2, "CLEAR")]
    st = p.inspect(a, M2)
    assert all(s.level == "pte" and s.write and s.kind == "anon" for s in st)
    assert not any(s.pfn == head + i for i, s in enumerate(st))
    assert p.check(a + P, M2 - P, 9) == 0 and c.check(a, M2, 9) == 0
    assert c.inspect(a, P)[0].level == "pmd"
    assert check_counts(m52) == []


def test_huge_zero_pmd_copied(machine: Machine) -> None:
    # §5.4 / §6: the huge zero PMD of an anon VMA with an anon_vma is copied (read-only in both)
    p = machine.spawn("p")
    a = p.mmap(2 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a, 1)
    assert p.inspect(a, P)[0].zero and p.inspect(a, P)[0].level == "pmd"
    c = p.fork("c")
    s = c.inspect(a, P)[0]
    assert s.zero and s.level == "pmd" and not s.write
    if machine.profile.huge_zero_per_mm:
        assert c.mm.huge_zero_ref
    c.touch(a, 1, write=True)                              # child write: a new THP replaces it
    assert c.inspect(a, P)[0].kind == "anon" and p.inspect(a, P)[0].zero
    assert check_counts(machine) == []


def test_hugetlb_private_fork_clear_range(machine: Machine) -> None:
    # §6 / F10: a hugetlb COW VMA is copied under CLEAR [vm_start, vm_end) of the parent
    pytest.importorskip("hmmirror.mm.hugetlb")
    m = Machine(machine.profile, ram=256 << 20, hugepages_2m=4)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, 1, write=True)
    ev = len(m.events)
    c = p.fork("c")
    assert invalidations(m, ev) == [("p", a, a + M2, "CLEAR")]
    assert c.inspect(a, P)[0].pfn == p.inspect(a, P)[0].pfn and not p.inspect(a, P)[0].write
    assert check_counts(m) == []


def test_shared_hugetlb_copy_depends_on_version(machine: Machine) -> None:
    # §6 lists hugetlb among the VMAs whose entries fork copies; that is the 5.2 rule.  Since v6.0
    # (commit bcd51a3c679d "hugetlb: lazy page table copies in fork()", vma_needs_copy() without VM_HUGETLB)
    # a shared hugetlb VMA, which has no anon_vma, is refaulted instead.  Not a COW mapping: no notifier.
    pytest.importorskip("hmmirror.mm.hugetlb")
    m = Machine(machine.profile, ram=256 << 20, hugepages_2m=2)
    p = m.spawn("p")
    a = p.mmap(M2, "rw", ["shared", "anonymous", "hugetlb"])
    p.touch(a, 1, write=True)
    ev = len(m.events)
    c = p.fork("c")
    assert invalidations(m, ev) == []
    assert c.inspect(a, P)[0].present is (m.profile.name == "5.2")
    c.touch(a, 1)
    assert c.inspect(a, P)[0].pfn == p.inspect(a, P)[0].pfn
    assert check_counts(m) == []
