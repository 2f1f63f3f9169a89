"""mprotect(2): VMA split/merge, entry rewriting and PROTECTION_VMA ranges.

Expected values: mm-substrate.md §4.1 (flags, split/merge), §5.3 (mprotect rules), §5.4 (THP split), §6
(mprotect row: PROTECTION_VMA chunking, CLEAR [2M) for THP splits, hugetlb one range) and observations
A8/A9/A10, T6 of §9; error codes: do_mprotect_pkey() (v5.2 / v6.18 mm/mprotect.c).
"""

from __future__ import annotations

import pytest

from hmmirror import KernelError, Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE, PUD_SIZE
from hmmirror.include.mm_types import VM
from hmmirror.mm.debug import check_counts

P = 4096
M2 = PMD_SIZE
G1 = PUD_SIZE


def invalidations(m: Machine, since: int = 0) -> list[tuple[int, int, str]]:
    return [(e["start"], e["end"], e["event"]) for e in m.events[since:] if e["what"] == "invalidate_range_start"]


def faults(m: Machine) -> int:
    return m.counters["handle_mm_fault"]


def test_a8_a10_same_pfns_through_r_none_rw(machine: Machine) -> None:
    # A8/A9/A10: write p0-3 (p4-5 read: zero page), mprotect R / NONE / RW: same pfns throughout
    p = machine.spawn()
    a = p.mmap(6 * P)
    p.touch(a, 4 * P, write=True)
    p.touch(a + 4 * P, 2 * P)
    pfns = [s.pfn for s in p.inspect(a, 6 * P)]
    p.mprotect(a, 6 * P, "r")
    st = p.inspect(a, 6 * P)
    assert [s.pfn for s in st] == pfns and not any(s.write for s in st)
    p.mprotect(a, 6 * P, "none")
    st = p.inspect(a, 6 * P)
    # PROT_NONE entries stay "present" with their pfn (protnone)
    assert [s.pfn for s in st] == pfns and all(s.present and s.protnone and not s.write for s in st)
    p.mprotect(a, 6 * P, "rw")
    st = p.inspect(a, 6 * P)
    assert [s.pfn for s in st] == pfns and not any(s.protnone for s in st)
    # zero-page entries stay read-only in both versions (not anon-exclusive pages)
    assert not st[4].write and not st[5].write
    if machine.profile.mprotect_keeps_exclusive_writable:
        # [6.18] exclusive anon entries are writable at once: writes need no fault
        assert all(s.write for s in st[:4])
        n = faults(machine)
        p.touch(a, 4 * P, write=True)
        assert faults(machine) == n
    else:
        # [5.2] read-only until a write fault reuses them: one fault each, same pfn, no notifier
        assert not any(s.write for s in st[:4])
        n, ev = faults(machine), len(machine.events)
        p.touch(a, 4 * P, write=True)
        assert faults(machine) == n + 4
        assert [s.pfn for s in p.inspect(a, 4 * P)] == pfns[:4]
        assert invalidations(machine, ev) == []
    assert check_counts(machine) == []


def test_one_protection_vma_range_over_a_small_populated_vma(machine: Machine) -> None:
    # §6: one PROTECTION_VMA from the first populated entry to the chunk end clipped to the range
    p = machine.spawn()
    a = p.mmap(6 * P)
    p.touch(a, 6 * P, write=True)
    ev = len(machine.events)
    p.mprotect(a, 6 * P, "r")
    assert invalidations(machine, ev) == [(a, a + 6 * P, "PROTECTION_VMA")]


def test_unpopulated_range_has_no_invalidation(machine: Machine) -> None:
    # §6 / §7: nothing populated under the range -> no notifier at all
    p = machine.spawn()
    a = p.mmap(8 * P)
    ev = len(machine.events)
    p.mprotect(a, 8 * P, "r")
    assert invalidations(machine, ev) == []


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_chunking_across_a_pud_boundary(kernel: str) -> None:
    # §6: [5.2] one range per PUD-sized chunk, from the first populated PMD; [6.18] one per P4D chunk from
    # the first populated PUD.  G is 1 GiB aligned, not 512 GiB aligned.
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn()
    g = 0x7F0040000000
    a = p.mmap(5 * M2, addr=g - 4 * M2, flags=["private", "anonymous", "fixed"])
    assert a == g - 4 * M2
    p.touch(g - 2 * M2 + 8 * P, P, write=True)      # second 2 MiB block below G
    p.touch(g + 4 * P, P, write=True)               # first block above G
    ev = len(m.events)
    p.mprotect(a, 5 * M2, "r")
    if kernel == "5.2":
        assert invalidations(m, ev) == [(g - 2 * M2, g, "PROTECTION_VMA"), (g, g + M2, "PROTECTION_VMA")]
    else:
        assert invalidations(m, ev) == [(a, g + M2, "PROTECTION_VMA")]


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_untouched_vma_next_to_a_populated_one(kernel: str) -> None:
    # §6: [5.2] the notifier needs a populated PMD under the range; [6.18] a populated PUD suffices, so an
    # untouched VMA sharing a PUD with a populated one still gets a PROTECTION_VMA over its range
    m = Machine(kernel, ram=256 << 20)
    p = m.spawn()
    g = 0x7F0040000000
    a = p.mmap(M2, addr=g, flags=["private", "anonymous", "fixed"])
    b = p.mmap(M2, addr=g + 4 * M2, flags=["private", "anonymous", "fixed"])
    p.touch(a, P, write=True)
    ev = len(m.events)
    p.mprotect(b, M2, "r")
    want = [] if kernel == "5.2" else [(b, b + M2, "PROTECTION_VMA")]
    assert invalidations(m, ev) == want


def _thp(p, m):  # type: ignore[no-untyped-def]
    a = p.mmap(2 * M2, align=M2)
    p.madvise(a, 2 * M2, "hugepage")
    p.touch(a, 1, write=True)
    assert p.inspect(a, P)[0].level == "pmd"
    return a


def test_t6_mprotect_one_page_of_a_thp(machine: Machine) -> None:
    # T6: mprotect one 4K page of a THP: the PMD is split (CLEAR [2M) emitted at the VMA split, before the
    # PROTECTION_VMA range), the VMA splits into 3, the other 511 pfns are kept
    p = machine.spawn()
    a = _thp(p, machine)
    before = p.inspect(a, M2)
    pg = a + 7 * P
    ev = len(machine.events)
    p.mprotect(pg, P, "r")
    assert invalidations(machine, ev) == [(a, a + M2, "CLEAR"), (pg, pg + P, "PROTECTION_VMA")]
    after = p.inspect(a, M2)
    assert [s.pfn for s in after] == [s.pfn for s in before]
    assert all(s.level == "pte" for s in after)
    assert not after[7].write and all(s.write for i, s in enumerate(after) if i != 7)
    vmas = [v for v in p.mm.vmas if v.vm_start < a + 2 * M2 and v.vm_end > a]
    assert [(v.vm_start, v.vm_end) for v in vmas] == [(a, pg), (pg, pg + P), (pg + P, a + 2 * M2)]
    assert vmas[1].vm_flags & (VM.READ | VM.WRITE) == VM.READ
    # back to RW: the three VMAs merge again (§4.1 "compatible neighbours merge")
    p.mprotect(pg, P, "rw")
    vmas = [v for v in p.mm.vmas if v.vm_start < a + 2 * M2 and v.vm_end > a]
    assert [(v.vm_start, v.vm_end) for v in vmas] == [(a, a + 2 * M2)]
    assert check_counts(machine) == []


def test_whole_thp_changed_in_place(machine: Machine) -> None:
    # §5.3/§5.4: a THP fully inside the range keeps its PMD; PROT_NONE makes it protnone with its pfns;
    # back to RW: [6.18] the exclusive THP is writable again, [5.2] read-only until a write reuses it
    p = machine.spawn()
    a = _thp(p, machine)
    head = p.inspect(a, P)[0].pfn
    ev = len(machine.events)
    p.mprotect(a, M2, "none")
    s = p.inspect(a, P)[0]
    assert s.level == "pmd" and s.present and s.protnone and s.pfn == head
    assert [e for e in invalidations(machine, ev) if e[2] == "CLEAR"] == []
    p.mprotect(a, M2, "rw")
    s = p.inspect(a, P)[0]
    assert s.level == "pmd" and not s.protnone and s.pfn == head
    assert s.write is machine.profile.mprotect_keeps_exclusive_writable
    p.touch(a + 3 * P, 1, write=True)
    s = p.inspect(a, P)[0]
    assert s.level == "pmd" and s.write and s.pfn == head
    assert check_counts(machine) == []


def test_write_removed_when_vm_write_removed(machine: Machine) -> None:
    # §5.3 / §6: "write removed when VM_WRITE is removed"; a write then faults with SIGSEGV
    p = machine.spawn()
    a = p.mmap(2 * P)
    p.touch(a, 2 * P, write=True)
    p.mprotect(a, 2 * P, "r")
    assert not any(s.write for s in p.inspect(a, 2 * P))
    with pytest.raises(KernelError) as exc:
        p.touch(a, P, write=True)
    assert exc.value.errno_name == "EFAULT"
    assert not p.mm.vmas[0].vm_flags & VM.WRITE


def test_errors(machine: Machine) -> None:
    # do_mprotect_pkey(): EINVAL unaligned start / unknown prot bits, ENOMEM for a hole (VMAs before the hole
    # keep their new protection), len 0 is a no-op
    p = machine.spawn()
    a = p.mmap(4 * P)
    with pytest.raises(KernelError) as exc:
        p.mprotect(a + 1, P, "r")
    assert exc.value.errno_name == "EINVAL"
    with pytest.raises(KernelError) as exc:
        p.mprotect(a, P, 0x10)
    assert exc.value.errno_name == "EINVAL"
    assert p.mprotect(a, 0, "r") == 0
    with pytest.raises(KernelError) as exc:
        p.mprotect(a - 4 * P, 8 * P, "r")           # starts in a hole
    assert exc.value.errno_name == "ENOMEM"
    assert p.mm.vmas[0].vm_flags & VM.WRITE
    with pytest.raises(KernelError) as exc:
        p.mprotect(a, 8 * P, "r")                   # ends in a hole: the mapped part is changed
    assert exc.value.errno_name == "ENOMEM"
    assert p.mm.vmas[0].vm_flags & (VM.READ | VM.WRITE) == VM.READ


def test_eacces_beyond_vm_may(machine: Machine) -> None:
    # §4.1: MAP_SHARED of a file opened read-only clears VM_MAYWRITE; mprotect(PROT_WRITE) -> EACCES
    pytest.importorskip("hmmirror.fs.shmem")
    machine.mount("/tmp", "tmpfs")
    machine.create_file("/tmp/f", 4 * P)
    f = machine.open_file("/tmp/f", writable=False)
    p = machine.spawn()
    a = p.mmap(4 * P, "r", ["shared"], file=f)
    assert not p.mm.vmas[0].vm_flags & VM.MAYWRITE
    with pytest.raises(KernelError) as exc:
        p.mprotect(a, 4 * P, "rw")
    assert exc.value.errno_name == "EACCES"


def test_shared_anon_writable_again(machine: Machine) -> None:
    # §5.3: shared VMAs get their vm_page_prot: shmem has no write-notify, so RW makes entries writable again
    pytest.importorskip("hmmirror.fs.shmem")
    p = machine.spawn()
    a = p.mmap(3 * P, "rw", ["shared", "anonymous"])
    p.touch(a, 3 * P, write=True)
    pfns = [s.pfn for s in p.inspect(a, 3 * P)]
    p.mprotect(a, 3 * P, "r")
    assert not any(s.write for s in p.inspect(a, 3 * P))
    p.mprotect(a, 3 * P, "rw")
    st = p.inspect(a, 3 * P)
    assert all(s.write for s in st) and [s.pfn for s in st] == pfns


def test_hugetlb_one_range_over_the_request(machine: Machine) -> None:
    # §6: hugetlb: one PROTECTION_VMA over [s, e), populated or not
    pytest.importorskip("hmmirror.mm.hugetlb")
    m = Machine(machine.profile, ram=256 << 20, hugepages_2m=2)
    p = m.spawn()
    a = p.mmap(2 * M2, "rw", ["private", "anonymous", "hugetlb"])
    p.touch(a, 1, write=True)
    ev = len(m.events)
    p.mprotect(a, 2 * M2, "r")
    assert invalidations(m, ev) == [(a, a + 2 * M2, "PROTECTION_VMA")]
    s = p.inspect(a, P)[0]
    assert s.level == "pmd" and not s.write
    # a split at an address not aligned to the huge page size is refused
    with pytest.raises(KernelError) as exc:
        p.mprotect(a, P, "rw")
    assert exc.value.errno_name == "EINVAL"
    assert check_counts(m) == []


def test_pud_leaf(machine: Machine) -> None:
    # §6 "mprotect over a PUD leaf": [5.2] the walk would clear it as a bad PUD (model: refused as not
    # modelled); [6.18] changed in place (one PROTECTION_VMA, the leaf kept, write removed)
    pytest.importorskip("hmmirror.drivers.dax.device")
    machine.add_pmem("pmem0", G1, "devdax", G1)
    p = machine.spawn()
    a = p.mmap(G1, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 5 * P, 1)
    assert p.inspect(a, P)[0].level == "pud"
    ev = len(machine.events)
    if machine.profile.name == "5.2":
        with pytest.raises(KernelError) as exc:
            p.mprotect(a, G1, "r")
        assert exc.value.errno == 95                   # EOPNOTSUPP
        assert p.inspect(a, P)[0].write and p.mm.vmas[0].vm_flags & VM.WRITE    # nothing changed
        return
    p.mprotect(a, G1, "r")
    assert invalidations(machine, ev) == [(a, a + G1, "PROTECTION_VMA")]
    s = p.inspect(a, P)[0]
    assert s.level == "pud" and not s.write


def test_write_notify_keeps_dirty_entries_writable(machine: Machine) -> None:
    # §5.3: a shared VMA under write-notify (ext4) gets a read-only vm_page_prot, "except entries that are
    # already dirty, which stay writable": after mprotect(R) then RW, the written page is writable again,
    # the only-read one is not
    pytest.importorskip("hmmirror.fs.filemap")
    machine.mount("/mnt", "ext4")
    machine.create_file("/mnt/f", 16 * P)
    p = machine.spawn()
    a = p.mmap(16 * P, "rw", ["shared"], file="/mnt/f")
    p.touch(a, 2 * P)                                   # read: read-only entries (write-notify)
    p.touch(a, P, write=True)                           # page_mkwrite: p0 writable and dirty
    st = p.inspect(a, 2 * P)
    assert st[0].write and not st[1].write
    p.mprotect(a, 16 * P, "r")
    assert not any(s.write for s in p.inspect(a, 2 * P))
    p.mprotect(a, 16 * P, "rw")
    st = p.inspect(a, 2 * P)
    assert st[0].write and not st[1].write
