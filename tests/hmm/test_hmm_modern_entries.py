"""hmm_range_fault() of 6.18, one CPU state at a time: the per-entry table (hmm-modern.md §4.6), the return
codes (§4.7), the restart at ``last`` (§4.1) and the observability of a call.

States the public API cannot create yet (markers, migration and device-private entries, bad PMDs, NUMA
protnone) are written into the page tables directly; expectations are the spec's, never the model's output.
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SIZE, PMD_SIZE
from hmmirror.errors import ModelBug
from hmmirror.kernel import sched
from hmmirror.mm.hmm.modern import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_P2PDMA,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_to_pfn,
    hmm_range_fault,
    model_range_fault,
    run_range_fault,
)
from hmmirror.mm.mmu_notifier import MmuIntervalNotifier, MmuIntervalNotifierOps, mmu_interval_notifier_insert

EPERM, EFAULT, EBUSY, EINVAL = 1, 14, 16, 22
V, W, E = HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_ERROR
F, FW = HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
O9, O18 = 9 << HMM_PFN_ORDER_SHIFT, 18 << HMM_PFN_ORDER_SHIFT


@pytest.fixture
def m() -> Machine:
    return Machine("6.18", ram=256 << 20)


@pytest.fixture
def p(m):
    return m.spawn("p")


def fault(p, addr, n=1, flags=0, mask=0, pfns=None, owner=None):
    return run_range_fault(p, addr, n, flags, mask, None if pfns is None else np.array(pfns, dtype=np.uint64),
                           owner)


def pte_at(p, addr):
    level, ptr, e = p.mm.pt.lookup(addr)
    assert level == "pte", level
    return ptr, e


def set_pte(p, addr, value):
    """Write a PTE at ``addr`` (tables allocated as needed): a state the API cannot create."""
    pt = p.mm.pt
    pudp = pt.walk_to_pud(addr, alloc=True)
    pmdp = pt.pmd_alloc(pudp, addr)
    pt.pte_alloc(pmdp)
    p.machine.pool.set(pt.pte_offset_map(pmdp, addr), value)


def pfn_of(p, addr):
    return x86.pte_pfn(pte_at(p, addr)[1])


# --- VMA level -------------------------------------------------------------------------------------------
def test_gap(p):
    a = p.mmap(3 * PAGE_SIZE, "rw")
    p.munmap(a, 3 * PAGE_SIZE)
    ret, out = fault(p, a, 3)
    assert ret == 0 and out.tolist() == [E] * 3                  # §4.6 gap: ERROR
    assert fault(p, a, 3, F)[0] == -EFAULT                       # §4.7


def test_gap_between_vmas_is_one_hole(p, m):
    a = p.mmap(3 * PAGE_SIZE, "rw")
    p.touch(a, 3 * PAGE_SIZE, write=True)
    p.munmap(a + PAGE_SIZE, PAGE_SIZE)
    ret, out = fault(p, a, 3)
    assert ret == 0
    assert out[1] == E and out[0] & V and out[2] & V
    assert fault(p, a, 3, F)[0] == -EFAULT


@pytest.mark.parametrize("prot", ["none", "w"])
def test_vma_without_read(p, prot):
    a = p.mmap(2 * PAGE_SIZE, prot)
    ret, out = fault(p, a, 2)
    assert ret == 0 and out.tolist() == [E, E]                   # §4.6 no VM_READ: ERROR
    assert fault(p, a, 2, F)[0] == -EFAULT


def test_vm_pfnmap(p):
    a = p.mmap(2 * PAGE_SIZE, "rw", ["shared"], file="pfnmap")
    ret, out = fault(p, a, 2)
    assert ret == 0 and out.tolist() == [E, E]                   # §4.6 VM_IO|VM_PFNMAP: ERROR
    assert fault(p, a, 2, F)[0] == -EFAULT


def test_only_the_unsupported_vmas_part_is_error(p):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    b = p.mmap(PAGE_SIZE, "none", addr=a + 2 * PAGE_SIZE, flags=["private", "anonymous", "fixed"])
    assert b == a + 2 * PAGE_SIZE
    p.touch(a, 2 * PAGE_SIZE, write=True)
    ret, out = fault(p, a, 3)
    assert ret == 0
    assert out[0] == pfn_of(p, a) | V | W and out[2] == E


# --- PTE level -------------------------------------------------------------------------------------------
def test_pte_none(p, m):
    a = p.mmap(PAGE_SIZE, "rw")
    assert fault(p, a).__getitem__(1).tolist() == [0]            # §4.6 none: 0
    ret, out = fault(p, a, 1, F)                                 # read fault: the shared zero page
    assert ret == 0 and out.tolist() == [m.mem.zero_pfn | V]
    ret, out = fault(p, a, 1, FW)                                # write fault: COW of the zero page
    assert ret == 0 and out[0] == pfn_of(p, a) | V | W and pfn_of(p, a) != m.mem.zero_pfn


def test_present_ptes(p, m):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    p.touch(a + PAGE_SIZE, PAGE_SIZE)
    ret, out = fault(p, a, 2)
    assert ret == 0
    assert out.tolist() == [pfn_of(p, a) | V | W, m.mem.zero_pfn | V]   # zero page: normal read-only page


def test_write_request_on_a_read_only_pte_faults(p, m):
    a = p.mmap(PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE)                                        # zero page, read-only
    ret, out = fault(p, a, 1, FW)
    assert ret == 0 and out[0] & W and out[0] & V
    assert m.counters["hmm_faults"] == 1


def test_eperm_for_a_write_fault_without_vm_write(p):
    a = p.mmap(PAGE_SIZE, "r")
    assert fault(p, a, 1, FW)[0] == -EPERM                       # §4.4 / §4.7
    assert fault(p, a, 1, F)[0] == 0


def test_efault_from_vm_fault_error(p, m):
    """A fault answered with SIGBUS (a shared file mapping beyond EOF) gives -EFAULT (§4.4)."""
    m.mount("/mnt", "ext4")
    m.create_file("/mnt/f", PAGE_SIZE, "data")
    a = p.mmap(2 * PAGE_SIZE, "r", ["shared"], file="/mnt/f")
    assert fault(p, a + PAGE_SIZE, 1)[1].tolist() == [0]
    assert fault(p, a + PAGE_SIZE, 1, F)[0] == -EFAULT


def test_pte_markers(p, m):
    a = p.mmap(3 * PAGE_SIZE, "rw")
    set_pte(p, a, x86.make_pte_marker(x86.PTE_MARKER_GUARD))
    set_pte(p, a + PAGE_SIZE, x86.make_pte_marker(x86.PTE_MARKER_POISONED))
    set_pte(p, a + 2 * PAGE_SIZE, x86.make_pte_marker(x86.PTE_MARKER_UFFD_WP))
    assert fault(p, a, 3)[1].tolist() == [0, 0, 0]               # §4.6 marker: 0
    assert fault(p, a, 1, F)[0] == -EFAULT                       # guard: SIGSEGV
    assert fault(p, a + PAGE_SIZE, 1, F)[0] == -EFAULT           # poison: HWPOISON


def test_uffd_wp_marker_is_faulted_like_none(p, m):
    a = p.mmap(PAGE_SIZE, "rw")
    set_pte(p, a, x86.make_pte_marker(x86.PTE_MARKER_UFFD_WP))
    ret, out = fault(p, a, 1, F)                                 # §4.6: faulted like a none entry
    assert ret == 0 and out.tolist() == [m.mem.zero_pfn | V]


def test_protnone_pte(p, m):
    a = p.mmap(PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    pfn = pfn_of(p, a)
    set_pte(p, a, x86.pfn_pte(pfn, x86.PAGE_NONE))               # a NUMA-hinting entry in a readable VMA
    assert fault(p, a)[1].tolist() == [pfn]                      # §4.6: pfn, VALID clear
    ret, out = fault(p, a, 1, F)                                 # NUMA hint fault restores the protection
    assert ret == 0 and out[0] & V and hmm_pfn_to_pfn(int(out[0])) == pfn


def test_special_pte_in_a_mixedmap_vma(p):
    from hmmirror.drivers.test_hmm import hmm_open

    fd = hmm_open(p, 0)
    a = p.mmap(2 * PAGE_SIZE, "rw", ["private"], file=fd)
    set_pte(p, a + PAGE_SIZE, x86.pfn_pte(pfn_of(p, a + PAGE_SIZE), x86.PAGE_READONLY) | x86._PAGE_SPECIAL)
    ret, out = fault(p, a, 2)
    assert ret == 0 and out[0] == pfn_of(p, a) | V and out[1] == E   # §4.6 VM_PFNMAP-style special: ERROR
    assert fault(p, a, 2, F)[0] == -EFAULT


def test_swap_entry(p, m):
    from hmmirror.mm.swap import model_swap_out

    a = p.mmap(PAGE_SIZE, "rw")
    p.write_bytes(a, b"swapped!")
    assert sched.run(model_swap_out(p.mm, a), p.mm.task) == 0
    assert not x86.pte_present(pte_at(p, a)[1])
    assert fault(p, a)[1].tolist() == [0]                        # §4.6 swap: 0
    ret, out = fault(p, a, 1, F)                                 # fault: swap-in
    assert ret == 0 and out[0] & V
    assert p.read_bytes(a, 8) == b"swapped!"


def test_hwpoison_entry(p):
    a = p.mmap(PAGE_SIZE, "rw")
    set_pte(p, a, x86.make_hwpoison_entry(0x1234))
    assert fault(p, a)[1].tolist() == [0]                        # §4.6 hwpoison: 0
    assert fault(p, a, 1, F)[0] == -EFAULT                       # no fault issued
    assert p.machine.counters["hmm_faults"] == 0


def test_device_exclusive_entry_without_fault(p):
    a = p.mmap(PAGE_SIZE, "rw")
    set_pte(p, a, x86.swp_entry_to_pte(x86.SwpEntry(int(x86.SwpType.SWP_DEVICE_EXCLUSIVE), 0x1234)))
    assert fault(p, a)[1].tolist() == [0]                        # §4.6 device-exclusive: 0 (fault: later)


def step_until_blocked(gen, task):
    prev = sched.set_current(task)
    try:
        while True:
            pt = next(gen)
            if pt.ready is not None and not pt.ready():
                return pt
    finally:
        sched.set_current(prev)


def finish(gen, task):
    prev = sched.set_current(task)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
    finally:
        sched.set_current(prev)


def test_migration_entry(p, m):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    p.touch(a, 2 * PAGE_SIZE, write=True)
    ptep, orig = pte_at(p, a + PAGE_SIZE)
    m.pool.set(ptep, x86.make_migration_entry(x86.pte_pfn(orig), True))
    ret, out = fault(p, a, 2)
    assert ret == 0 and out[1] == 0                              # §4.6 migration, no fault: 0
    gen = model_range_fault(p.mm, a, a + 2 * PAGE_SIZE, F)
    pt = step_until_blocked(gen, p.mm.task)                      # waits for the migration
    assert pt.what == "migration_entry_wait"
    m.pool.set(ptep, orig)                                       # migration done
    ret, out = finish(gen, p.mm.task)
    assert ret == 0 and out[1] == x86.pte_pfn(orig) | V | W
    assert m.counters["hmm_walks"] >= 3                          # the -EBUSY restart, at `last`
    assert m.counters["hmm_faults"] == 0


class _DevOps:
    migrated: list[int] = []

    def page_free(self, pgmap, pfn):
        pass

    def migrate_to_ram(self, vmf):
        """A driver moving the page back: a fresh page replaces the device-private entry."""
        mm = vmf.vma.vm_mm
        new = mm.machine.mem.alloc_page()
        mm.machine.pool.set(vmf.ptep, x86.pfn_pte(new, x86.PAGE_SHARED))
        _DevOps.migrated.append(vmf.address)
        return 0
        yield  # pragma: no cover


def device_private(m):
    from hmmirror.mm.memremap import MEMORY_DEVICE_PRIVATE, devm_memremap_pages, new_dev_pagemap

    owner = object()
    pg = new_dev_pagemap("devpriv", MEMORY_DEVICE_PRIVATE, 1024, ops=_DevOps(), owner=owner)   # type: ignore[arg-type]
    assert devm_memremap_pages(m, pg) == 0
    return owner, pg.res.start


def test_device_private_entry_of_the_owner(p, m):
    owner, dpfn = device_private(m)
    a = p.mmap(2 * PAGE_SIZE, "rw")
    set_pte(p, a, x86.make_device_private_entry(dpfn, True))
    set_pte(p, a + PAGE_SIZE, x86.make_device_private_entry(dpfn + 1, False))
    ret, out = fault(p, a, 2, owner=owner)
    assert ret == 0 and out.tolist() == [dpfn | V | W, (dpfn + 1) | V]
    ret, out = fault(p, a, 2, FW, owner=owner)                   # never faulted, even for REQ_WRITE
    assert ret == 0 and out.tolist() == [dpfn | V | W, (dpfn + 1) | V]


def test_device_private_entry_of_another_owner(p, m):
    owner, dpfn = device_private(m)
    a = p.mmap(PAGE_SIZE, "rw")
    set_pte(p, a, x86.make_device_private_entry(dpfn, True))
    assert fault(p, a, 1, owner=object())[1].tolist() == [0]     # §4.6: 0
    _DevOps.migrated.clear()
    ret, out = fault(p, a, 1, F, owner=object())                 # fault -> the owner's migrate_to_ram
    assert ret == 0 and out[0] & V and _DevOps.migrated == [a]


# --- PMD level -------------------------------------------------------------------------------------------
def thp(p, write=True):
    a = p.mmap(2 * PMD_SIZE, "rw")
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(h, PMD_SIZE, "hugepage")
    p.touch(h, PAGE_SIZE, write=write)
    level, pmdp, pmd = p.mm.pt.lookup(h)
    assert level == "pmd" and x86.pmd_leaf(pmd)
    return h, pmdp, pmd


def test_thp_pmd(p):
    h, _, pmd = thp(p)
    ret, out = fault(p, h + 10 * PAGE_SIZE, 4)
    base = x86.pmd_pfn(pmd) + 10
    assert ret == 0 and out.tolist() == [(base + k) | V | W | O9 for k in range(4)]   # §4.6 leaf PMD


def test_huge_zero_pmd(p, m):
    h, _, pmd = thp(p, write=False)
    ret, out = fault(p, h, 2)
    zero = x86.pmd_pfn(pmd)
    assert m.mem.is_huge_zero_pfn(zero) and not m.mem.is_zero_pfn(zero)
    assert ret == 0 and out.tolist() == [zero | V | O9, (zero + 1) | V | O9]   # §4.6 notes: huge zero folio pfns
    ret, out = fault(p, h, 1, FW)                                # write request: a THP replaces it
    assert ret == 0 and out[0] & W and x86.pmd_pfn(p.mm.pt.lookup(h)[2]) != zero


def test_protnone_pmd(p, m):
    h, pmdp, pmd = thp(p)
    m.pool.set(pmdp, x86.pfn_pte(x86.pmd_pfn(pmd), x86.PAGE_NONE) | x86._PAGE_PSE)
    ret, out = fault(p, h, 2)
    assert ret == 0 and out.tolist() == [x86.pmd_pfn(pmd), x86.pmd_pfn(pmd) + 1]   # pfn, no flags, no order


def test_pmd_migration_entry(p, m):
    h, pmdp, pmd = thp(p)
    m.pool.set(pmdp, x86.make_migration_entry(x86.pmd_pfn(pmd), True))
    assert fault(p, h, 2)[1].tolist() == [0, 0]                  # §4.6: 0
    gen = model_range_fault(p.mm, h, h + 2 * PAGE_SIZE, F)
    assert step_until_blocked(gen, p.mm.task).what == "migration_entry_wait"
    m.pool.set(pmdp, pmd)
    ret, out = finish(gen, p.mm.task)
    assert ret == 0 and out[0] == x86.pmd_pfn(pmd) | V | W | O9


def test_bad_and_absent_pmds(p, m):
    h, pmdp, pmd = thp(p)
    m.pool.set(pmdp, x86.pfn_pte(x86.pmd_pfn(pmd), x86._PAGE_PRESENT | x86._PAGE_USER))   # pmd_bad
    assert fault(p, h, 2)[1].tolist() == [E, E]                  # §4.6 pmd_bad: ERROR
    assert fault(p, h, 2, F)[0] == -EFAULT
    m.pool.set(pmdp, x86.make_hwpoison_entry(x86.pmd_pfn(pmd)))  # other non-present PMD
    assert fault(p, h, 2)[1].tolist() == [E, E]
    assert fault(p, h, 2, F)[0] == -EFAULT


def test_device_private_pmd_of_the_owner(p, m):
    owner, dpfn = device_private(m)
    h, pmdp, _ = thp(p)
    m.pool.set(pmdp, x86.make_device_private_entry(dpfn, True))
    ret, out = fault(p, h + 3 * PAGE_SIZE, 2, owner=owner)
    assert ret == 0 and out.tolist() == [(dpfn + 3 + k) | V | W | O9 for k in range(2)]
    assert fault(p, h, 2, owner=object())[1].tolist() == [E, E]  # another owner, no fault: ERROR


# --- hugetlb ---------------------------------------------------------------------------------------------
@pytest.fixture
def hp():
    m = Machine("6.18", ram=256 << 20, hugepages_2m=2)
    return m.spawn("p")


def test_hugetlb_entries(hp):
    a = hp.mmap(2 * PMD_SIZE, "rw", ["private", "anonymous", "hugetlb"])
    hp.touch(a, PAGE_SIZE, write=True)
    ret, out = fault(hp, a + 5 * PAGE_SIZE, 2)
    head = x86.pte_pfn(hp.mm.pt.lookup(a)[2])
    assert ret == 0 and out.tolist() == [(head + 5 + k) | V | W | O9 for k in range(2)]
    ret, out = fault(hp, a + PMD_SIZE + 7 * PAGE_SIZE, 2)        # none huge entry: pfn bits, order, no VALID
    assert ret == 0 and out.tolist() == [(7 + k) | O9 for k in range(2)]


def test_hugetlb_reads_only_the_first_pages_request(hp):
    a = hp.mmap(2 * PMD_SIZE, "rw", ["private", "anonymous", "hugetlb"])
    hp.touch(a, PAGE_SIZE)                 # the tables above exist, so the second huge page's entry is walked
    b = a + PMD_SIZE
    ret, out = fault(hp, b, 2, 0, F, pfns=[0, F])                # page 1 requests a fault, page 0 does not
    assert ret == 0 and out.tolist() == [0 | O9, 1 | O9]         # §4.5: only out[i] of the first page is read
    assert hp.machine.counters["hmm_faults"] == 0
    ret, out = fault(hp, b, 2, 0, F, pfns=[F, 0])
    assert ret == 0 and out[0] & V and out[1] & V


def test_hugetlb_without_tables_is_a_hole(hp):
    """walk_hugetlb_range: no entry pointer (the PUD is none) -> pte_hole, where every page's request counts."""
    a = hp.mmap(PMD_SIZE, "rw", ["private", "anonymous", "hugetlb"])
    assert fault(hp, a, 2)[1].tolist() == [0, 0]
    ret, out = fault(hp, a, 2, 0, F, pfns=[0, F])
    head = x86.pte_pfn(hp.mm.pt.lookup(a)[2])
    assert ret == 0 and out.tolist() == [(head + k) | V | O9 for k in range(2)]   # a private read fault


# --- return codes, sticky bits, restart, observability -----------------------------------------------------
def direct(p, start, end, seq_offset=0, flags=0):
    class Ops(MmuIntervalNotifierOps):
        pass

    sub = MmuIntervalNotifier()
    assert sched.run(mmu_interval_notifier_insert(sub, p.mm, max(start, 0x1000), 0x1000, Ops()), p.mm.task) == 0
    r = HmmRange(sub, start, end, np.zeros(max((end - start) >> 12, 1), dtype=np.uint64),
                 notifier_seq=sub.invalidate_seq + seq_offset, default_flags=flags)

    def body():
        yield from sched.down_read(p.mm.mmap_sem)
        ret = yield from hmm_range_fault(r)
        sched.up_read(p.mm.mmap_sem)
        return ret

    return sched.run(body(), p.mm.task), r


def test_ebusy_when_the_sequence_is_stale(p, m):
    a = p.mmap(PAGE_SIZE, "rw")
    ret, _ = direct(p, a, a + PAGE_SIZE, seq_offset=2)
    assert ret == -EBUSY and m.counters["hmm_ebusy"] == 1 and m.counters["hmm_walks"] == 0


def test_einval_for_an_empty_range(p):
    a = p.mmap(PAGE_SIZE, "rw")
    assert direct(p, a, a)[0] == -EINVAL


def test_mmap_lock_must_be_held(p):
    a = p.mmap(PAGE_SIZE, "rw")
    sub = MmuIntervalNotifier()
    sched.run(mmu_interval_notifier_insert(sub, p.mm, a, PAGE_SIZE, MmuIntervalNotifierOps()), p.mm.task)
    r = HmmRange(sub, a, a + PAGE_SIZE, np.zeros(1, dtype=np.uint64), notifier_seq=sub.invalidate_seq)
    with pytest.raises(ModelBug, match="lockdep"):
        sched.run(hmm_range_fault(r), p.mm.task)


def test_sticky_bits_survive(p, m):
    a = p.mmap(3 * PAGE_SIZE, "rw")
    p.touch(a, PAGE_SIZE, write=True)
    p.munmap(a + 2 * PAGE_SIZE, PAGE_SIZE)
    sticky = [HMM_PFN_DMA_MAPPED, HMM_PFN_P2PDMA, HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA]
    ret, out = fault(p, a, 3, pfns=sticky)
    assert ret == 0
    assert out.tolist() == [sticky[0] | pfn_of(p, a) | V | W, sticky[1], sticky[2] | E]


def test_restart_resumes_at_last(p, m):
    """§4.1: after a fault the walk restarts at `last` (the faulting page), not at range.start."""
    a = p.mmap(8 * PAGE_SIZE, "rw")
    p.touch(a, 4 * PAGE_SIZE, write=True)
    ret, out = fault(p, a, 8, F)
    assert ret == 0 and all(int(e) & V for e in out)
    assert m.counters["hmm_walks"] == 2
    assert m.counters["hmm_pages_walked"] == 8 + 4
    assert m.counters["hmm_faults"] == 4                         # pages [4, 8) of the PMD chunk


def test_observability(p, m):
    a = p.mmap(2 * PAGE_SIZE, "rw")
    fault(p, a, 2, FW)
    ev = [e for e in m.events if e["what"] == "hmm_vma_fault"]
    assert len(ev) == 1 and ev[0]["write"] and ev[0]["start"] == a and ev[0]["end"] == a + 2 * PAGE_SIZE
    assert "rwsem:p.mmap_lock" in ev[0]["locks"]                 # the lock context at handle_mm_fault
    calls = [e for e in m.events if e["what"] == "hmm_range_fault"]
    assert calls[-1]["ret"] == 0 and calls[-1]["faults"] == 2 and calls[-1]["walks"] == 2


def test_devmap_variant_of_6_1(m):
    """§4.9: under a profile with devmap bits (6.1-6.16), a devmap PMD is a leaf for HMM too."""
    import dataclasses

    from hmmirror.profiles import V6_18

    mm = Machine(dataclasses.replace(V6_18, name="6.18-devmap", devmap_bits=True), ram=64 << 20)
    q = mm.spawn("q")
    h, pmdp, pmd = thp(q)
    mm.pool.set(pmdp, pmd | x86._PAGE_DEVMAP)                    # pmd_trans_huge() is false now
    ret, out = fault(q, h, 1)
    assert ret == 0 and out.tolist() == [x86.pmd_pfn(pmd) | V | W | O9]
    assert HPAGE_PMD_NR == 512
