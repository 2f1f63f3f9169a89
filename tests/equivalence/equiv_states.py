"""Random page-table states for the differential tests of the fast walks (tests/equivalence).

A :class:`Plan` (drawn by Hypothesis) describes VMAs and, per 2 MiB chunk, what the page tables hold; the
entries are written directly into the table pool (every kind HMM tells apart: none, anonymous pages read-only
and writable, the zero page, special PFNs, devmap PTEs/PMDs/PUDs, PROT_NONE/NUMA entries, swap, migration,
device-private (own and foreign owner), device-exclusive, hwpoison, PTE markers, THP, the huge zero page,
bad and non-present PMDs).  :func:`build` turns a plan into a machine; the test deep-copies that machine and
runs the reference walk on one copy and the fast walk on the other, then compares everything observable
(:func:`observe`).

Frames are real where the fault paths look at them (anonymous pages and THPs are allocated with their
rmap counts), so faults requested over these states behave as on a machine that reached them by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DEVMAP,
    _PAGE_DIRTY,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    PAGE_NONE,
    PAGE_READONLY,
    PAGE_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PUD_SIZE,
    pfn_pte,
)
from hmmirror.include.mm_types import VM
from hmmirror.kernel import sched
from hmmirror.mm import rmap
from hmmirror.mm.memremap import (
    MEMORY_DEVICE_FS_DAX,
    MEMORY_DEVICE_PRIVATE,
    DevPagemapOps,
    devm_memremap_pages,
    new_dev_pagemap,
    percpu_ref_kill,
)
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.page_alloc import PG

NCHUNKS = 8                                   # the window: 8 x 2 MiB
WINDOW = NCHUNKS * PMD_SIZE
PUD_PAGES = PUD_SIZE // PAGE_SIZE


class FakeDaxOps(VmOps):
    """A DAX VMA kind for the walk (no VM_PFNMAP/VM_MIXEDMAP) without fault hooks."""

    name = "fakedax"
    is_dax = True


class PrivOps(DevPagemapOps):
    """Device-private pgmap ops (required hooks; faults on these entries are not the subject here)."""

    def page_free(self, pgmap: Any, pfn: int) -> None:
        return None

    def migrate_to_ram(self, vmf: Any) -> Any:
        return 2                                   # VM_FAULT_SIGBUS
        yield                                      # pragma: no cover


VMA_KINDS = {
    "anon_rw": (VM.READ | VM.WRITE | VM.MAYREAD | VM.MAYWRITE, None),
    "anon_thp": (VM.READ | VM.WRITE | VM.MAYREAD | VM.MAYWRITE | VM.HUGEPAGE, None),
    "anon_ro": (VM.READ | VM.MAYREAD | VM.MAYWRITE, None),
    "write_only": (VM.WRITE | VM.MAYWRITE, None),
    "prot_none": (VM.MAYREAD | VM.MAYWRITE, None),
    "pfnmap": (VM.READ | VM.WRITE | VM.PFNMAP | VM.IO | VM.SHARED, "dax"),
    "mixedmap": (VM.READ | VM.WRITE | VM.MIXEDMAP, "dax"),
    "dax": (VM.READ | VM.WRITE | VM.SHARED | VM.MAYSHARE | VM.MAYREAD | VM.MAYWRITE, "dax"),
}
COMMON_VMAS = ["anon_rw", "anon_rw", "anon_rw", "anon_thp", "anon_ro", "dax", "dax"]
RARE_VMAS = ["write_only", "prot_none", "pfnmap", "mixedmap"]

PTE_KINDS = ["none", "anon_rw", "anon_ro", "zero", "special", "devmap_rw", "devmap_ro", "protnone", "swap",
             "migration_r", "migration_w", "devpriv_r", "devpriv_w", "exclusive", "hwpoison", "marker_uffd",
             "marker_guard", "ad_only", "special_high"]
BACKGROUNDS = ["none", "anon_rw", "anon_rw", "anon_ro", "zero", "devmap_rw"]
CLEAN_PTE_KINDS = ["none", "anon_rw", "anon_ro", "zero", "devmap_rw", "devmap_ro", "protnone", "devpriv_w",
                   "ad_only"]
CLEAN_CHUNK_KINDS = ["hole", "empty_table", "ptes", "ptes", "ptes", "thp", "thp_ro", "devmap_pmd", "huge_zero"]
CHUNK_KINDS = ["hole", "empty_table", "ptes", "ptes", "ptes", "ptes", "thp", "thp_ro", "devmap_pmd",
               "devmap_pmd_ro", "thp_protnone", "huge_zero", "pmd_migration", "pmd_devpriv", "pmd_bad",
               "pmd_swap"]


@dataclass
class Chunk:
    kind: str
    background: str = "none"
    overrides: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Plan:
    profile: str
    paging: int
    vmas: list[tuple[int, int, str]]           # (first chunk, chunks, kind); the rest are gaps
    chunks: list[Chunk]
    pud: str                                   # "none", "leaf_rw", "leaf_ro", "table"
    start_page: int                            # the HMM range, in pages of the window (+ PUD region)
    end_page: int
    with_pud: bool                             # the range continues into the PUD region
    default: int
    mask: int
    requests: list[int]                        # per-page input values, cycled
    owner: str                                 # dev_private_owner: "none", "mine", "other"
    kill_pgmap: bool
    mode: str                                  # "snapshot" or "fault" (5.2); modern: always fault
    block: bool
    thp: str


@st.composite
def plans(draw: Any, profile: str) -> Plan:
    """A random plan (see the module docstring)."""
    paging = draw(st.sampled_from([4, 4, 4, 5]))
    # a third of the plans are "clean" (no gaps, no rare VMAs, benign entries): there faults mostly succeed;
    # migration entries (a fault on one waits for a migration nobody completes: Deadlock in a sequential run)
    # appear in one plan in five
    clean = draw(st.integers(0, 2)) == 0
    migration = not clean and draw(st.integers(0, 4)) == 0
    vmas: list[tuple[int, int, str]] = []
    c = 0 if clean else draw(st.integers(0, 1))
    while c < NCHUNKS:
        n = draw(st.integers(1, NCHUNKS - c))
        rare = not clean and draw(st.integers(0, 5)) == 0
        kind = draw(st.sampled_from(COMMON_VMAS + RARE_VMAS if rare else COMMON_VMAS))
        vmas.append((c, n, kind))
        c += n + (0 if clean else draw(st.sampled_from([0, 0, 0, 1])))
    pte_kinds = CLEAN_PTE_KINDS if clean else [k for k in PTE_KINDS if migration or not k.startswith("migration")]
    chunk_kinds = CLEAN_CHUNK_KINDS if clean else [k for k in CHUNK_KINDS if migration or k != "pmd_migration"]
    chunks = []
    for _ in range(NCHUNKS):
        kind = draw(st.sampled_from(chunk_kinds))
        bg = draw(st.sampled_from(BACKGROUNDS))
        ov = draw(st.lists(st.tuples(st.integers(0, 511), st.sampled_from(pte_kinds)), max_size=6))
        chunks.append(Chunk(kind, bg, ov))
    pud = draw(st.sampled_from(["none", "leaf_rw", "leaf_rw", "leaf_ro", "table"]))
    total = NCHUNKS * 512
    s = draw(st.integers(0, total - 1))
    e = draw(st.integers(s + 1, total))
    with_pud = draw(st.booleans()) and e == total or draw(st.integers(0, 7)) == 0
    if with_pud:
        e = total
    if profile == "5.2":
        vf, wf, dpf = 1, 2, 4
        default = draw(st.sampled_from([0, 0, vf, vf | wf, vf | dpf]))
        mask = draw(st.sampled_from([0, 0, vf | wf, (1 << 64) - 1]))
        requests = draw(st.lists(st.sampled_from([0, vf, vf | wf, vf | dpf, vf | wf | dpf, 1 << 40]), min_size=1,
                                 max_size=5))
        mode = draw(st.sampled_from(["snapshot", "snapshot", "fault"]))
    else:
        rf, rw = 1 << 63, 1 << 62
        sticky = [1 << 60, 1 << 59, 1 << 58]
        default = draw(st.sampled_from([0, 0, rf, rf | rw]))
        mask = draw(st.sampled_from([0, 0, rf | rw, (1 << 64) - 1]))
        requests = draw(st.lists(st.sampled_from([0, rf, rf | rw, rw, sticky[0], rf | sticky[1], sticky[2] | 5]),
                                 min_size=1, max_size=5))
        mode = "fault"
    owner = draw(st.sampled_from(["none", "mine", "other"]))
    kill = draw(st.integers(0, 9)) == 0 and (profile != "5.2" or mode == "snapshot")
    return Plan(profile, paging, vmas, chunks, pud, s, e, with_pud, default, mask, requests, owner, kill,
                mode, draw(st.booleans()), draw(st.sampled_from(["madvise", "never", "always"])))


# --- building -------------------------------------------------------------------------------------------
def _ptr(mm: Any, addr: int, level: str) -> tuple[int, int]:
    pt = mm.pt
    pudp = pt.pud_alloc(pt.p4d_alloc(pt.pgd_offset(addr), addr), addr)
    if level == "pud":
        return pudp
    pmdp = pt.pmd_alloc(pudp, addr)
    if level == "pmd":
        return pmdp
    pt.pte_alloc(pmdp)
    return pt.pte_offset_map(pmdp, addr)


class World:
    """What :func:`build` made: the machine, the process, the range bounds, the pgmaps."""

    def __init__(self, plan: Plan) -> None:
        from hmmirror.machine import ThpSettings

        self.plan = plan
        m = Machine(plan.profile, ram=48 << 20, paging=plan.paging, thp=ThpSettings(enabled=plan.thp))
        self.m = m
        self.p = m.spawn("p")
        self.mm = self.p.mm
        self.base = (1 << 52) + (3 << 39) + 5 * PUD_SIZE if plan.paging == 5 else 0x7E00_0000_0000
        self.pud_base = self.base + PUD_SIZE
        # device memory: one fsdax-like pgmap (1 GiB for the PUD leaf + 16 MiB for PMDs/PTEs), one private
        self.dax = new_dev_pagemap("dax0", MEMORY_DEVICE_FS_DAX, PUD_PAGES + NCHUNKS * 512)
        assert devm_memremap_pages(m, self.dax) == 0
        self.priv = new_dev_pagemap("priv0", MEMORY_DEVICE_PRIVATE, 4096, ops=PrivOps(), owner="mine")
        assert devm_memremap_pages(m, self.priv) == 0
        assert self.dax.res is not None and self.priv.res is not None
        self.dax_pfn = self.dax.res.start
        self.priv_pfn = self.priv.res.start

    def pte(self, kind: str, addr: int, k: int) -> int:
        """A PTE of ``kind`` (allocating and accounting a frame where the kind maps one)."""
        m, mem = self.m, self.m.mem
        devmap_bits = m.profile.devmap_bits
        if kind in ("none",):
            return 0
        if kind == "ad_only":
            return _PAGE_ACCESSED | _PAGE_DIRTY
        if kind in ("anon_rw", "anon_ro", "protnone"):
            pfn = mem.alloc_page()
            assert pfn > 0
            rmap.page_add_new_anon_rmap(mem, pfn)
            if kind == "protnone":
                return pfn_pte(pfn, PAGE_NONE)
            if kind == "anon_rw":
                return pfn_pte(pfn, PAGE_SHARED | _PAGE_DIRTY | _PAGE_ACCESSED)
            return pfn_pte(pfn, PAGE_READONLY | _PAGE_ACCESSED)
        if kind == "zero":
            return pfn_pte(mem.zero_pfn, PAGE_READONLY) | _PAGE_SPECIAL
        if kind == "special":
            return pfn_pte(3 + k, PAGE_READONLY) | _PAGE_SPECIAL
        if kind == "special_high":
            return pfn_pte(mem.nr_pfns + 1000 + k, PAGE_SHARED)          # no memmap: not a normal page
        if kind in ("devmap_rw", "devmap_ro"):
            pfn = self.dax_pfn + PUD_PAGES + ((addr - self.base) >> 12)
            prot = PAGE_SHARED if kind == "devmap_rw" else PAGE_READONLY
            e = pfn_pte(pfn, prot | _PAGE_ACCESSED)
            if devmap_bits:
                e |= _PAGE_SPECIAL | _PAGE_DEVMAP
            elif m.profile.dax_refcounted:
                mem.mapcount[pfn] += 1
                mem.refcount[pfn] += 1
            return e
        if kind == "swap":
            return x86.make_swap_entry(0, 100 + k)
        if kind in ("migration_r", "migration_w"):
            pfn = mem.alloc_page()
            rmap.page_add_new_anon_rmap(mem, pfn)
            return x86.make_migration_entry(pfn, kind == "migration_w")
        if kind in ("devpriv_r", "devpriv_w"):
            return x86.make_device_private_entry(self.priv_pfn + (k % 4096), kind == "devpriv_w")
        if kind == "exclusive":
            pfn = mem.alloc_page()
            rmap.page_add_new_anon_rmap(mem, pfn)
            return x86.swp_entry_to_pte(x86.SwpEntry(int(x86.SwpType.SWP_DEVICE_EXCLUSIVE), pfn))
        if kind == "hwpoison":
            pfn = mem.alloc_page()
            mem.flags[pfn] |= PG.hwpoison
            return x86.make_hwpoison_entry(pfn)
        if kind == "marker_uffd":
            return x86.make_pte_marker(x86.PTE_MARKER_UFFD_WP)
        if kind == "marker_guard":
            return x86.make_pte_marker(x86.PTE_MARKER_GUARD)
        raise AssertionError(kind)

    def pmd(self, kind: str, addr: int) -> int | None:
        """A non-table PMD of ``kind`` (None: the chunk holds a PTE table or nothing)."""
        m, mem = self.m, self.m.mem
        if kind in ("thp", "thp_ro", "thp_protnone"):
            head = mem.alloc_folio(9)
            assert head > 0
            rmap.page_add_new_anon_rmap(mem, head, 512)
            prot = {"thp": PAGE_SHARED | _PAGE_DIRTY, "thp_ro": PAGE_READONLY, "thp_protnone": PAGE_NONE}[kind]
            return pfn_pte(head, prot | _PAGE_ACCESSED) | _PAGE_PSE
        if kind == "huge_zero":
            z = mem.huge_zero_pfn()
            return pfn_pte(z, PAGE_READONLY) | _PAGE_PSE
        if kind in ("devmap_pmd", "devmap_pmd_ro"):
            pfn = self.dax_pfn + PUD_PAGES + ((addr - self.base) >> 12)
            prot = PAGE_SHARED if kind == "devmap_pmd" else PAGE_READONLY
            e = pfn_pte(pfn, prot | _PAGE_ACCESSED) | _PAGE_PSE
            if m.profile.devmap_bits:
                e |= _PAGE_DEVMAP
            elif m.profile.dax_refcounted:
                mem.mapcount[pfn:pfn + 512] += 1
                mem.refcount[pfn] += 1
            return e
        if kind == "pmd_migration":
            head = mem.alloc_folio(9)
            return x86.make_migration_entry(head, True)
        if kind == "pmd_devpriv":
            return x86.make_device_private_entry(self.priv_pfn, True)
        if kind == "pmd_bad":
            return pfn_pte(7, PAGE_SHARED) | (1 << 9)                    # present, not a table, not PSE
        if kind == "pmd_swap":
            return x86.make_swap_entry(1, 77)
        return None


def build(plan: Plan) -> World:
    """The machine of ``plan`` (deterministic)."""
    w = World(plan)
    m, mm = w.m, w.mm
    pool = m.pool
    for first, n, kind in plan.vmas:
        flags, ops = VMA_KINDS[kind]
        vma = VMA(mm, w.base + first * PMD_SIZE, w.base + (first + n) * PMD_SIZE, flags,
                  (w.base >> 12) + first * 512, None, FakeDaxOps() if ops == "dax" else None)
        mm.insert_vma(vma)
    for c, chunk in enumerate(plan.chunks):
        a = w.base + c * PMD_SIZE
        if chunk.kind == "hole":
            continue
        pmd = w.pmd(chunk.kind, a)
        if pmd is not None:
            pool.set(_ptr(mm, a, "pmd"), pmd)
            continue
        ptep = _ptr(mm, a, "pte")
        if chunk.kind == "empty_table":
            continue
        over = dict(chunk.overrides)
        row = np.zeros(512, dtype=np.uint64)
        if chunk.background == "none":
            for i, k in sorted(over.items()):
                row[i] = w.pte(k, a + i * PAGE_SIZE, i)
        else:
            for i in range(512):
                row[i] = w.pte(over.get(i, chunk.background), a + i * PAGE_SIZE, i)
        pool.tables[ptep[0]] = row
    # the PUD region: one VMA of 1 GiB, DAX
    if plan.with_pud or plan.pud != "none":
        vma = VMA(mm, w.pud_base, w.pud_base + PUD_SIZE, VMA_KINDS["dax"][0], w.pud_base >> 12, None, FakeDaxOps())
        mm.insert_vma(vma)
        pudp = _ptr(mm, w.pud_base, "pud")
        if plan.pud in ("leaf_rw", "leaf_ro"):
            prot = PAGE_SHARED if plan.pud == "leaf_rw" else PAGE_READONLY
            e = pfn_pte(w.dax_pfn, prot | _PAGE_ACCESSED) | _PAGE_PSE
            if m.profile.devmap_bits:
                e |= _PAGE_DEVMAP
            elif m.profile.dax_refcounted:
                m.mem.mapcount[w.dax_pfn:w.dax_pfn + PUD_PAGES] += 1
                m.mem.refcount[w.dax_pfn] += 1
            pool.set(pudp, e)
        elif plan.pud == "table":
            ptep = _ptr(mm, w.pud_base + PMD_SIZE, "pte")
            pool.set(ptep, w.pte("anon_rw", w.pud_base + PMD_SIZE, 0))
    if plan.kill_pgmap:
        assert w.dax.ref is not None
        percpu_ref_kill(w.dax.ref)
    m.events.clear()
    m.counters.clear()
    return w


def range_bounds(w: World) -> tuple[int, int]:
    """The HMM range of the plan: pages of the window, then (``with_pud``) 16 pages into the PUD region."""
    p = w.plan
    start = w.base + p.start_page * PAGE_SIZE
    end = w.base + p.end_page * PAGE_SIZE
    if p.with_pud:
        end = w.pud_base + 16 * PAGE_SIZE
    return start, end


def requests(plan: Plan, n: int) -> np.ndarray:
    """The input array: the plan's request values, cycled."""
    r = np.array(plan.requests, dtype=np.uint64)
    return np.resize(r, n)


def clone(w: World) -> World:
    """An independent copy of the world (the machine and everything reachable from it)."""
    return copy.deepcopy(w)


# --- observing ------------------------------------------------------------------------------------------
def observe(w: World) -> dict[str, Any]:
    """Everything the equivalence claims identical, as comparable values."""
    m = w.m
    pool, mem = m.pool, m.mem
    return {
        "tables": pool.tables[: pool.tables.shape[0]].tobytes(),
        "levels": pool.level.tobytes(),
        "free_tables": list(pool._free),
        "locks": sorted(pool._locks),
        "refcount": mem.refcount.tobytes(),
        "mapcount": mem.mapcount.tobytes(),
        "flags": mem.flags.tobytes(),
        "order": mem.order.tobytes(),
        "free4k": mem._free4k[: mem._n4k].tobytes(),
        "blocks": mem._blocks[: mem._nblocks].tobytes(),
        "contents": {k: bytes(v) for k, v in mem.contents.items()},
        "counters": dict(m.counters),
        "events": [dict(e) for e in m.events],
        "pgmaps": [(p.name, p.count, dict(p.ref.stats) if p.ref else None, p.state) for p in m.pgmaps],
        "anon_vma": [(v.vm_start, v.anon_vma and v.anon_vma.rwsem.name) for v in w.mm.vmas],
        "mmap_sem": (w.mm.mmap_sem.owner is not None, len(w.mm.mmap_sem.readers)),
        "held": [lk.name for lk in w.mm.task.held],
    }


def outcome(run: Any) -> tuple[str, Any]:
    """Run ``run()``; the result or the exception (type and message)."""
    try:
        return ("ok", run())
    except Exception as exc:  # noqa: BLE001 - both walks must fail the same way
        return ("raise", (type(exc).__name__, str(exc)))


def drive(w: World, gen: Any) -> Any:
    """Drive a generator to completion in the process's task."""
    return sched.run(gen, w.mm.task)


# --- the two APIs ---------------------------------------------------------------------------------------
def prepare(w: World) -> None:
    """Register what the profile's API needs (an interval notifier, or a 5.2 mirror and range) and build
    the range with its requests; then clear the logs so only the walk is compared."""
    from hmmirror.arch.x86.pgtable import PAGE_SHIFT

    start, end = range_bounds(w)
    n = (end - start) >> PAGE_SHIFT
    plan = w.plan
    mm = w.mm
    if plan.profile == "5.2":
        from hmmirror.mm.hmm import v5_2 as h

        class Ops(h.HmmMirrorOps):
            def sync_cpu_device_pagetables(self, mirror: Any, update: Any) -> Any:
                return 0
                yield  # pragma: no cover

        def setup() -> Any:
            yield from sched.down_write(mm.mmap_sem)
            r = yield from h.hmm_mirror_register(h.HmmMirror(Ops()), mm)
            sched.up_write(mm.mmap_sem)
            assert r == 0
            rng = h.new_range(start, end, default_flags=plan.default, pfn_flags_mask=plan.mask)
            rng.pfns[:] = requests(plan, n)
            assert (yield from h.hmm_range_register(rng, mm, start, end, PAGE_SHIFT)) == 0
            return rng

        w.range = drive(w, setup())
    else:
        from hmmirror.mm.hmm import modern as h
        from hmmirror.mm.mmu_notifier import (
            MmuIntervalNotifier,
            MmuIntervalNotifierOps,
            mmu_interval_notifier_insert,
            mmu_interval_read_begin,
        )

        owner = {"none": None, "mine": "mine", "other": "other"}[plan.owner]

        def setup() -> Any:
            sub = MmuIntervalNotifier()
            assert (yield from mmu_interval_notifier_insert(sub, mm, 0, 1 << 56, MmuIntervalNotifierOps())) == 0
            seq = yield from mmu_interval_read_begin(sub)
            return h.HmmRange(sub, start, end, requests(plan, n), seq, plan.default, plan.mask, owner)

        w.range = drive(w, setup())
    w.m.events.clear()
    w.m.counters.clear()


def run_walk(w: World, reference: bool) -> Any:
    """The profile's walk (snapshot or fault) under the mmap lock; returns (ret, pfns)."""
    plan = w.plan
    mm = w.mm
    rng = w.range
    if plan.profile == "5.2":
        from hmmirror.fast import hmm_v5_2 as f

        def go() -> Any:
            yield from sched.down_read(mm.mmap_sem)
            if plan.mode == "snapshot":
                r = yield from f.hmm_range_snapshot(rng, reference=reference)
            else:
                r = yield from f.hmm_range_fault(rng, plan.block, reference=reference)
            if mm.mmap_sem.held_by(mm.task):
                sched.up_read(mm.mmap_sem)
            return r

        ret = drive(w, go())
        return ret, rng.pfns.tobytes(), dict(rng.stats), rng.valid
    from hmmirror.fast import hmm_modern as f

    def go2() -> Any:
        yield from sched.down_read(mm.mmap_sem)
        r = yield from f.hmm_range_fault(rng, reference=reference)
        sched.up_read(mm.mmap_sem)
        return r

    ret = drive(w, go2())
    return ret, rng.hmm_pfns.tobytes()


def compare(plan: Plan) -> tuple[Any, Any]:
    """Build ``plan``, run both walks on copies; returns (reference, fast) observations."""
    w = build(plan)
    prepare(w)
    w2 = clone(w)
    r1 = outcome(lambda: run_walk(w, True))
    r2 = outcome(lambda: run_walk(w2, False))
    return (r1, observe(w)), (r2, observe(w2))
