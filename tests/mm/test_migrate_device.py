"""Scripted migration paths (device-memory.md; issue 11 "done when"): to device, back on a CPU fault,
eviction, device-exclusive access and its restore, and migrations the kernel refuses (a file page, a pinned
page, a shared anonymous mapping).  Each asserts the CPU entries, the notifier events with their owner, the
page references and the bytes.

Expected values are the kernel's rules (mm/migrate_device.c, mm/memory.c do_swap_page, mm/rmap.c,
lib/test_hmm.c), not captured output: a writable anonymous page goes to the device as a writable
device-private entry mapped once (refcount 1, mapcount 1), its system page is freed, the device saw only its
own MIGRATE invalidation; a CPU access brings it back writable through migrate_to_ram and frees the device
page (refcount 0, back on the driver's free list); eviction (RELEASE) uses CLEAR invalidations; an exclusive
entry keeps the page's mapping and reference [6.15+] and the CPU access restores the same pfn after an
EXCLUSIVE invalidation with no owner.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SIZE, SwpType, pte_to_swp_entry
from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open
from hmmirror.kernel import sched
from hmmirror.mm import migrate_device as md
from hmmirror.mm.debug import check_counts
from hmmirror.mm.page_alloc import PG

ENOENT, EINVAL = 2, 22
N = 4


def pattern(npages: int, salt: int = 0) -> bytes:
    return (np.arange(npages * PAGE_SIZE // 4, dtype="<i4") + salt).tobytes()


@pytest.fixture
def m():
    return Machine("6.18", ram=256 << 20)


@pytest.fixture
def p(m):
    return m.spawn("p")


@pytest.fixture
def fd(p):
    return hmm_open(p, 0)


def entry(p, addr: int) -> int:
    level, _, e = p.mm.pt.lookup(addr)
    assert level == "pte"
    return e


def events_since(m, mark: int, what: str = "invalidate_range_start") -> list[dict]:
    return [e for e in m.events[mark:] if e.get("what") == what]


def migrate_to_dev(fd, addr: int, npages: int) -> tuple[int, HmmDmirrorCmd, bytes]:
    buf = bytearray(npages * PAGE_SIZE)
    cmd = HmmDmirrorCmd(addr, buf, npages)
    ret = fd.ioctl("MIGRATE_TO_DEV", cmd)
    return ret, cmd, bytes(buf)


def test_to_device(m, p, fd):
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(N))
    old = [x86.pte_pfn(entry(p, a + i * PAGE_SIZE)) for i in range(N)]
    mark = len(m.events)
    ret, cmd, data = migrate_to_dev(fd, a, N)
    assert (ret, cmd.cpages) == (0, N)
    assert data == pattern(N)                                     # the device read back what the CPU wrote
    dev = fd.device
    for i in range(N):
        s = pte_to_swp_entry(entry(p, a + i * PAGE_SIZE))
        assert s.type == SwpType.SWP_DEVICE_PRIVATE_WRITE          # writable PTE -> writable device entry
        pgmap = m.pgmap_of(s.offset)
        assert pgmap.owner is dev and pgmap.type.name == "MEMORY_DEVICE_PRIVATE"
        assert (int(m.mem.refcount[s.offset]), int(m.mem.mapcount[s.offset])) == (1, 1)
        assert not m.mem.flags[s.offset] & PG.locked
        assert m.mem.read(dev.backing_page(s.offset)) == pattern(N)[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert m.mem.flags[old[i]] & PG.buddy                    # the system page was freed
    inv = events_since(m, mark)
    assert [(e["event"], e.get("owner")) for e in inv] == [("MIGRATE", dev.path)]   # collect only: no hole
    skipped = events_since(m, mark, "dmirror_invalidate")
    assert [e.get("skipped") for e in skipped] == [True]          # the device ignores its own migration
    assert check_counts(m) == []


def test_back_on_cpu_fault(m, p, fd):
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(N, 7))
    assert migrate_to_dev(fd, a, N)[0] == 0
    dpages = [pte_to_swp_entry(entry(p, a + i * PAGE_SIZE)).offset for i in range(N)]
    dev = fd.device
    cfree = dev.cfree
    mark = len(m.events)
    assert p.read_bytes(a + PAGE_SIZE, PAGE_SIZE) == pattern(N, 7)[PAGE_SIZE:2 * PAGE_SIZE]
    e1 = entry(p, a + PAGE_SIZE)
    assert x86.pte_present(e1) and x86.pte_write(e1)              # a writable device page comes back writable
    new = x86.pte_pfn(e1)
    assert new < m.mem.nr_ram and m.mem.flags[new] & PG.anon
    assert (int(m.mem.refcount[new]), int(m.mem.mapcount[new])) == (1, 1)   # mapped once, no other holder
    assert not m.mem.flags[new] & PG.locked
    assert m.mem.read(new) == pattern(N, 7)[PAGE_SIZE:2 * PAGE_SIZE]
    assert int(m.mem.refcount[dpages[1]]) == 0                    # the device page is free again...
    assert dev.cfree == cfree + 1                                 # ... and back on the driver's list
    assert int(m.counters["dmirror_devmem_fault"]) == 1
    inv = events_since(m, mark)
    assert [(e["event"], e.get("owner")) for e in inv] == [("MIGRATE", dev.path)]
    assert [e["start"] for e in inv] == [a + PAGE_SIZE]
    # the other pages are still on the device, untouched
    for i in (0, 2, 3):
        assert pte_to_swp_entry(entry(p, a + i * PAGE_SIZE)).offset == dpages[i]
    assert check_counts(m) == []


def test_eviction(m, p, fd):
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(N, 3))
    assert migrate_to_dev(fd, a, N)[0] == 0
    dpages = [pte_to_swp_entry(entry(p, a + i * PAGE_SIZE)).offset for i in range(N)]
    pgmap = m.pgmap_of(dpages[0])
    mark = len(m.events)
    assert fd.ioctl("RELEASE", HmmDmirrorCmd(a, None, N)) == 0
    for i in range(N):
        e = entry(p, a + i * PAGE_SIZE)
        assert x86.pte_present(e) and x86.pte_write(e) and x86.pte_pfn(e) < m.mem.nr_ram
        new = x86.pte_pfn(e)
        assert (int(m.mem.refcount[new]), int(m.mem.mapcount[new])) == (1, 1) and m.mem.flags[new] & PG.anon
        assert not m.mem.flags[new] & PG.locked
        assert int(m.mem.refcount[dpages[i]]) == 0                # every device page was put to zero (page_free)
    assert int(m.counters["free_zone_device_folio"]) >= N
    inv = events_since(m, mark)
    assert [e["event"] for e in inv] == ["CLEAR"] * N             # try_to_migrate(): one per page, no owner
    assert all("owner" not in e for e in inv)
    assert pgmap.state == "removed" and pgmap not in m.pgmaps
    assert p.read_bytes(a, N * PAGE_SIZE) == pattern(N, 3)
    assert check_counts(m) == []


def test_exclusive_and_restore(m, p, fd):
    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(N, 11))
    pfns = [x86.pte_pfn(entry(p, a + i * PAGE_SIZE)) for i in range(N)]
    mark = len(m.events)
    buf = bytearray(N * PAGE_SIZE)
    cmd = HmmDmirrorCmd(a, buf, N)
    assert fd.ioctl("EXCLUSIVE", cmd) == 0 and cmd.cpages == N and bytes(buf) == pattern(N, 11)
    for i in range(N):
        s = pte_to_swp_entry(entry(p, a + i * PAGE_SIZE))
        assert s.type == SwpType.SWP_DEVICE_EXCLUSIVE and s.offset == pfns[i]
        assert (int(m.mem.refcount[pfns[i]]), int(m.mem.mapcount[pfns[i]])) == (1, 1)   # [6.15+] rmap kept
    assert [(e["event"], e.get("owner")) for e in events_since(m, mark)] == [("EXCLUSIVE", None)] * N
    assert fd.ioctl("CHECK_EXCLUSIVE", HmmDmirrorCmd(a, None, N)) == -1     # -EPERM: still atomic
    mark = len(m.events)
    p.write_bytes(a + 2 * PAGE_SIZE, b"\x01")                       # the CPU takes the page back
    e2 = entry(p, a + 2 * PAGE_SIZE)
    assert x86.pte_present(e2) and x86.pte_write(e2) and x86.pte_pfn(e2) == pfns[2]
    assert [(e["event"], e.get("owner")) for e in events_since(m, mark)] == [("EXCLUSIVE", None)]
    assert (int(m.mem.refcount[pfns[2]]), int(m.mem.mapcount[pfns[2]])) == (1, 1)   # same page, same counts
    assert not m.mem.flags[pfns[2]] & PG.locked
    # dmirror_do_update() erases [start >> 12, end >> 12] inclusive: pages 2 and 3 leave the device table
    assert [(va - a) // PAGE_SIZE for va, _, tag in fd.pt_entries() if tag == "atomic"] == [0, 1]
    want = bytearray(pattern(N, 11))
    want[2 * PAGE_SIZE] = 1
    assert p.read_bytes(a, N * PAGE_SIZE) == bytes(want)        # the store landed in the same page; the read
    for i in range(N):                                          # restored the other entries to the same pages
        e = entry(p, a + i * PAGE_SIZE)
        assert x86.pte_present(e) and x86.pte_pfn(e) == pfns[i]
        assert (int(m.mem.refcount[pfns[i]]), int(m.mem.mapcount[pfns[i]])) == (1, 1)
    assert [tag for _va, _, tag in fd.pt_entries() if tag == "atomic"] == []
    assert check_counts(m) == []


def test_make_device_exclusive_owner(m, p):
    """make_device_exclusive(mm, addr, owner, &folio) [6.15+]: the EXCLUSIVE invalidation carries the owner
    and the folio comes back locked and referenced."""
    from hmmirror.mm.rmap import make_device_exclusive

    a = p.mmap(PAGE_SIZE, "rw")
    p.write_bytes(a, b"x")
    pfn = x86.pte_pfn(entry(p, a))

    class Owner:
        name = "gpu0"

    def go():
        yield from sched.down_read(p.mm.mmap_sem)
        r = yield from make_device_exclusive(p.mm, a, Owner())
        sched.up_read(p.mm.mmap_sem)
        return r

    mark = len(m.events)
    page, folio = sched.run(go(), p.mm.task)
    assert page == folio == pfn
    assert m.mem.flags[pfn] & PG.locked and int(m.mem.refcount[pfn]) == 2    # the PTE's + the caller's
    assert [(e["event"], e.get("owner")) for e in events_since(m, mark)] == [("EXCLUSIVE", "gpu0")]
    assert check_counts(m, extra_refs={pfn: 1}) == []


def test_file_page_refused(m, p, fd):
    """A private file mapping's page-cache pages are collected (page->mapping is set) but migrate_vma_pages()
    refuses to move a page with a mapping to device memory; finalize restores the PTEs: -ENOENT."""
    m.mount("/data", "ext4")
    m.create_file("/data/f", N * PAGE_SIZE, "data")
    a = p.mmap(N * PAGE_SIZE, "r", ["private"], file="/data/f")
    before = p.read_bytes(a, N * PAGE_SIZE)
    ents = [entry(p, a + i * PAGE_SIZE) for i in range(N)]
    refs = [int(m.mem.refcount[x86.pte_pfn(e)]) for e in ents]
    mark = len(m.events)
    ret, cmd, _ = migrate_to_dev(fd, a, N)
    assert ret == -ENOENT
    dev = fd.device
    # collected and unmapped under one MIGRATE invalidation with the device's owner (page->mapping is set, so
    # migrate_vma_collect_pmd() takes it), which dmirror ignores; nothing else is invalidated
    assert [(e["event"], e.get("owner")) for e in events_since(m, mark)] == [("MIGRATE", dev.path)]
    assert [e.get("skipped") for e in events_since(m, mark, "dmirror_invalidate")] == [True]
    # the device pages allocated for the copy were put back by migrate_vma_finalize(): all free again
    assert dev.calloc == N and dev.free_count() == sum(c.pgmap.nr_pages for c in dev.devmem_chunks)
    for c in dev.devmem_chunks:
        lo, hi = c.pgmap.res.start, c.pgmap.res.end
        assert not m.mem.refcount[lo:hi].any()
    for i in range(N):
        e = entry(p, a + i * PAGE_SIZE)
        assert x86.pte_present(e) and x86.pte_pfn(e) == x86.pte_pfn(ents[i]) and not x86.pte_write(e)
        assert int(m.mem.refcount[x86.pte_pfn(e)]) == refs[i]
        assert int(m.mem.mapcount[x86.pte_pfn(e)]) == 1
    assert p.read_bytes(a, N * PAGE_SIZE) == before
    assert len(fd.pt_entries()) == 0
    assert check_counts(m) == []


def test_pinned_page_refused(m, p, fd):
    """A page with an extra reference (a GUP pin) fails migrate_vma_check_page() and is restored."""
    from hmmirror.mm.gup import FOLL_GET, FOLL_WRITE, __get_user_pages, put_user_page

    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(2))

    def pin():
        yield from sched.down_read(p.mm.mmap_sem)
        got = yield from __get_user_pages(p.mm, a, 1, FOLL_GET | FOLL_WRITE)
        sched.up_read(p.mm.mmap_sem)
        return got

    (pinned,) = sched.run(pin(), p.mm.task)
    ret, cmd, _ = migrate_to_dev(fd, a, 2)
    assert ret == -ENOENT and cmd.cpages == 0                    # page 0 stayed: nothing read back
    assert x86.pte_present(entry(p, a)) and x86.pte_pfn(entry(p, a)) == pinned
    assert pte_to_swp_entry(entry(p, a + PAGE_SIZE)).type == SwpType.SWP_DEVICE_PRIVATE_WRITE
    assert check_counts(m, extra_refs={pinned: 1}) == []
    put_user_page(p.mm, pinned)
    assert check_counts(m) == []


def test_setup_rejects(m, p):
    """migrate_vma_setup() argument checks: no VMA, a VM_SPECIAL VMA, an empty range, a range outside the VMA."""
    a = p.mmap(2 * PAGE_SIZE, "rw")
    vma = p.mm.vma_lookup(a)

    def setup(args):
        def go():
            yield from sched.down_read(p.mm.mmap_sem)
            r = yield from md.migrate_vma_setup(args)
            sched.up_read(p.mm.mmap_sem)
            return r
        return sched.run(go(), p.mm.task)

    assert setup(md.MigrateVma(None, a, a + PAGE_SIZE)) == -EINVAL
    assert setup(md.MigrateVma(vma, a, a)) == -EINVAL
    assert setup(md.MigrateVma(vma, a, a + 4 * PAGE_SIZE)) == -EINVAL
    args = md.MigrateVma(vma, a, a + 2 * PAGE_SIZE, flags=md.MIGRATE_VMA_SELECT_SYSTEM)
    assert setup(args) == 0
    # two none entries of anonymous memory: MIGRATE without a page, counted in cpages
    assert args.src.tolist() == [md.MIGRATE_PFN_MIGRATE] * 2 and args.cpages == 2
    sched.run(md.migrate_vma_finalize(args), p.mm.task)


def test_device_range_collects_every_referenced_unlocked_pfn(m, p, fd):
    """migrate_device_range() over a whole chunk writes every entry (the kernel's loop over each pfn): 0 for a
    free pfn and for a page somebody else has locked (migrate_device_pfn_lock's folio_trylock fails, the
    reference it took is put back), migrate_pfn|MIGRATE for the others; only the unlocked ones move back.
    (The model visits only the pfns with a reference: the result must be the per-pfn rule all the same.)"""
    from hmmirror.mm.folio import folio_trylock, folio_unlock

    def is_migration(e: int) -> bool:
        return not x86.pte_present(e) and x86.is_migration_entry(pte_to_swp_entry(e))

    a = p.mmap(N * PAGE_SIZE, "rw")
    p.write_bytes(a, pattern(N, 5))
    assert migrate_to_dev(fd, a, N)[0] == 0
    dpages = [pte_to_swp_entry(entry(p, a + i * PAGE_SIZE)).offset for i in range(N)]
    chunk = fd.dmirror.mdevice.devmem_chunks[0]
    start, npages = chunk.start, chunk.npages
    assert npages > 1000 and all(start <= d < start + npages for d in dpages)
    locked = dpages[1]
    assert folio_trylock(m.mem, locked)                          # somebody else holds the page lock
    refs = [int(m.mem.refcount[d]) for d in dpages]
    src = np.full(npages, 0xDEAD, dtype=np.uint64)              # stale contents: every entry must be written
    assert sched.run(md.migrate_device_range(m, src, start, npages)) == 0
    want = np.zeros(npages, dtype=np.uint64)
    for d in dpages:
        if d != locked:
            want[d - start] = md.migrate_pfn(d) | md.MIGRATE_PFN_MIGRATE
    assert np.array_equal(src, want)
    assert int(m.mem.refcount[locked]) == refs[1]               # the failed trylock gave its reference back
    for i, d in enumerate(dpages):                               # collected: +1, and unmapped to a migration
        if d != locked:                                          # entry by try_to_migrate: -1 (the mapping's)
            assert is_migration(entry(p, a + i * PAGE_SIZE)) and int(m.mem.refcount[d]) == refs[i]
    dst = np.zeros(npages, dtype=np.uint64)
    sched.run(md.migrate_device_pages(m, src, dst, npages))      # no destination: nothing moves
    sched.run(md.migrate_device_finalize(m, src, dst, npages))
    assert [int(m.mem.refcount[d]) for d in dpages] == refs      # collection references dropped again
    folio_unlock(m.mem, locked)
    for i in range(N):
        assert pte_to_swp_entry(entry(p, a + i * PAGE_SIZE)).offset == dpages[i]   # still device-private
    assert p.read_bytes(a, N * PAGE_SIZE) == pattern(N, 5)
    assert check_counts(m) == []
