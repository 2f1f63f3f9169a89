"""Anonymous private memory and anonymous THP faults (mm-substrate.md §5.3, §5.4, §6, §9 A*/T*)."""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE

PAGE = 4096


def events(m: Machine, what: str) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in m.events if e["what"] == what]


def test_untouched_mapping_not_present(machine: Machine) -> None:
    # A1: untouched mapping: not present, no page tables below the top level
    p = machine.spawn()
    a = p.mmap(16 * PAGE)
    assert all(not s.present for s in p.inspect(a, 16 * PAGE))


def test_read_maps_zero_page_then_write_faults_new_page(machine: Machine) -> None:
    # A2: read every page -> zero pfn, special, read-only; one write -> new pfn; no notifier for
    # faults into none entries, CLEAR [4K) for the COW of the zero page (§5.3)
    p = machine.spawn()
    a = p.mmap(8 * PAGE)
    p.touch(a, 8 * PAGE)
    st = p.inspect(a, 8 * PAGE)
    assert all(s.kind == "zero" and s.pfn == machine.mem.zero_pfn and s.write is False for s in st)
    assert events(machine, "invalidate_range_start") == []
    p.touch(a + 3 * PAGE, PAGE, write=True)
    s3 = p.inspect(a + 3 * PAGE, PAGE)[0]
    assert s3.kind == "anon" and s3.write and s3.pfn != machine.mem.zero_pfn and s3.exclusive
    inv = events(machine, "invalidate_range_start")
    assert [(e["start"], e["end"], e["event"]) for e in inv] == [(a + 3 * PAGE, a + 4 * PAGE, "CLEAR")]


def test_write_every_page_distinct_exclusive(machine: Machine) -> None:
    # A3: write every page -> distinct exclusive anon pages, writable
    p = machine.spawn()
    a = p.mmap(32 * PAGE)
    p.touch(a, 32 * PAGE, write=True)
    st = p.inspect(a, 32 * PAGE)
    assert len({s.pfn for s in st}) == 32
    assert all(s.kind == "anon" and s.write and s.exclusive and not s.file for s in st)


def test_populate_rw_private(machine: Machine) -> None:
    # A4: MAP_POPULATE RW private -> new anon pages; A5: PROT_READ populate -> zero page
    p = machine.spawn()
    a = p.mmap(4 * PAGE, "rw", ["private", "anonymous", "populate"])
    assert all(s.kind == "anon" and s.write for s in p.inspect(a, 4 * PAGE))
    b = p.mmap(4 * PAGE, "r", ["private", "anonymous", "populate"])
    assert all(s.kind == "zero" for s in p.inspect(b, 4 * PAGE))


def test_data_written_reads_back(machine: Machine) -> None:
    p = machine.spawn()
    a = p.mmap(4 * PAGE)
    p.touch(a, 4 * PAGE, write=True, fill="index32")
    assert p.check(a, 4 * PAGE, "index32") == 0
    p.write_bytes(a + PAGE - 2, b"\x01\x02\x03\x04")
    assert p.read_bytes(a + PAGE - 2, 4) == b"\x01\x02\x03\x04"


def _thp_area(p, machine):  # type: ignore[no-untyped-def]
    a = p.mmap(4 * PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, 4 * PMD_SIZE, "hugepage")
    return a


def test_thp_write_one_byte_maps_pmd(m618: Machine) -> None:
    # T1: MADV_HUGEPAGE aligned, write one byte -> THP PMD for that 2 MiB only
    p = m618.spawn()
    a = _thp_area(p, m618)
    p.touch(a + 5 * PAGE, 1, write=True)
    st = p.inspect(a, 2 * PMD_SIZE)
    first, second = st[:512], st[512:]
    assert all(s.huge and s.level == "pmd" and s.kind == "anon" and s.write for s in first)
    assert len({s.pfn for s in first}) == 512 and first[1].pfn == first[0].pfn + 1
    assert not any(s.present for s in second)


def test_thp_read_maps_huge_zero_then_write_replaces(m618: Machine) -> None:
    # T2/T3: read one byte -> huge zero PMD; then write -> a new THP replaces it (CLEAR [2M))
    p = m618.spawn()
    a = _thp_area(p, m618)
    p.touch(a, 1)
    st = p.inspect(a, PMD_SIZE)
    assert all(s.zero and s.huge and s.write is False and s.file for s in st)  # §9: huge zero has bit 61
    p.touch(a + 7 * PAGE, 1, write=True)
    st2 = p.inspect(a, PMD_SIZE)
    assert all(s.kind == "anon" and s.huge and s.write for s in st2)
    inv = events(m618, "invalidate_range_start")
    assert [(e["start"], e["end"], e["event"]) for e in inv] == [(a, a + PMD_SIZE, "CLEAR")]


def test_thp_not_used_without_advice_in_madvise_mode(m618: Machine) -> None:
    # T10: no advice with enabled=madvise -> 4K pages only
    p = m618.spawn()
    a = p.mmap(2 * PMD_SIZE, align=PMD_SIZE)
    p.touch(a, 1, write=True)
    assert not p.inspect(a, PAGE)[0].huge


def test_munmap_partial_thp_splits_then_unmaps(m618: Machine) -> None:
    # §6 munmap: CLEAR [2M) for the THP split at s, emitted before the UNMAP [s,e); other pfns kept
    p = m618.spawn()
    a = _thp_area(p, m618)
    p.touch(a, 1, write=True)
    before = p.inspect(a, PMD_SIZE)
    m618.events.clear()
    p.munmap(a + 2 * PAGE, 2 * PAGE)
    inv = [(e["start"], e["end"], e["event"]) for e in events(m618, "invalidate_range_start")]
    assert inv == [(a, a + PMD_SIZE, "CLEAR"), (a + 2 * PAGE, a + 4 * PAGE, "UNMAP")]
    after = p.inspect(a, PMD_SIZE)
    assert not after[2].present and not after[3].present
    kept = [i for i in range(512) if i not in (2, 3)]
    assert all(after[i].pfn == before[i].pfn and after[i].level == "pte" for i in kept)


def test_munmap_frees_pages_and_tables(machine: Machine) -> None:
    # A15 / §1.1: munmap clears entries and frees page tables (free_pgtables)
    p = machine.spawn()
    free0, tables0 = machine.mem.nr_free_pages(), machine.pool.nr_tables
    a = p.mmap(64 * PAGE)
    p.touch(a, 64 * PAGE, write=True)
    assert machine.mem.nr_free_pages() == free0 - 64
    p.munmap(a, 64 * PAGE)
    assert machine.mem.nr_free_pages() == free0
    assert machine.pool.nr_tables == tables0
    assert p.mm.vmas == []


def test_five_level_paging_high_hint(m618: Machine) -> None:
    # §1.1: 5-level: mmap returns addresses above 2^47 only when given a hint above 2^47
    m5 = Machine("6.18", ram=64 << 20, paging=5)
    p = m5.spawn()
    low = p.mmap(PAGE)
    high = p.mmap(PAGE, addr=1 << 52)
    assert low < (1 << 47) and high == 1 << 52
    p.touch(high, PAGE, write=True)
    assert p.inspect(high, PAGE)[0].kind == "anon"
