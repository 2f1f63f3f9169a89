"""Benchmarks of the fast walk against the reference walk and the real kernel's walk (ours).

One run measures, for each case, in this process:

* the model's fast snapshot (``hmm_range_fault`` with no request [6.18], ``hmm_range_snapshot`` [5.2]) over
  the whole range, and the reference snapshot over a smaller range of the same shape (scaled per page);
* the host kernel's ``/proc/self/pagemap`` read and ``PAGEMAP_SCAN`` ioctl over a real mapping of the same
  shape made in this process (anonymous 4 KiB pages, anonymous THP, a ``PROT_NONE`` reservation for holes,
  a 1 GiB hugetlb page for the PUD case; the host has no fsdax/device-dax, so the fsdax PMD case is compared
  with anonymous THP and the device-dax PUD case with hugetlb 1 GiB, and the report says so);
* for the 4 KiB case also the fault-in of the whole range by the fast ``hmm_range_fault`` (against the
  kernel's ``MADV_POPULATE_WRITE`` of the same range) and the model's bytes of state per mapped page.

Every time is the median of ``runs`` runs after one warm-up run.  Nothing here is a test: the test suite
checks equality of results (tests/equivalence); this reports speed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.kernel import sched

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Case:
    """One benchmark case (the ``--json`` record)."""

    name: str
    profile: str
    pages: int
    model_ns_per_page: float
    reference_ns_per_page: float | None = None
    reference_pages: int | None = None
    kernel_pagemap_ns_per_page: float | None = None
    kernel_pagemap_scan_ns_per_page: float | None = None
    ratio: float | None = None                    # model / kernel pagemap
    ratio_scan: float | None = None               # model / kernel PAGEMAP_SCAN
    speedup_vs_reference: float | None = None     # reference / model
    entries_per_second: float | None = None
    kernel_shape: str | None = None
    goal: str | None = None
    goal_met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def median_time(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``fn()`` over ``runs`` runs, after one warm-up run (seconds); the garbage
    collector is off while a run is timed."""
    fn()
    times = []
    gc.collect()
    for _ in range(max(1, runs)):
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return statistics.median(times)


# --- the model side --------------------------------------------------------------------------------------
class ModelRange:
    """An HMM range of one process in the profile's API, with fast and reference snapshot calls."""

    def __init__(self, p: Any, start: int, end: int) -> None:
        self.p, self.mm, self.m = p, p.mm, p.machine
        self.start, self.end = start, end
        self.api = "5.2" if self.m.profile.hmm_module.endswith("v5_2") else "modern"
        if self.api == "5.2":
            from hmmirror.mm.hmm import v5_2 as h

            class Ops(h.HmmMirrorOps):
                def sync_cpu_device_pagetables(self, mirror: Any, update: Any) -> Any:
                    return 0
                    yield  # pragma: no cover

            mm = self.mm
            if mm.hmm is None:
                def reg() -> Any:
                    yield from sched.down_write(mm.mmap_sem)
                    r = yield from h.hmm_mirror_register(h.HmmMirror(Ops()), mm)
                    sched.up_write(mm.mmap_sem)
                    return r
                assert sched.run(reg(), mm.task) == 0
            self.range = h.new_range(start, end)
            assert sched.run(h.hmm_range_register(self.range, mm, start, end, PAGE_SHIFT), mm.task) == 0
        else:
            from hmmirror.mm.hmm import modern as h
            from hmmirror.mm.mmu_notifier import (
                MmuIntervalNotifier,
                MmuIntervalNotifierOps,
                mmu_interval_notifier_insert,
                mmu_interval_read_begin,
            )

            sub = MmuIntervalNotifier()
            assert sched.run(mmu_interval_notifier_insert(sub, self.mm, 0, 1 << 56, MmuIntervalNotifierOps()),
                             self.mm.task) == 0
            seq = sched.run(mmu_interval_read_begin(sub), self.mm.task)
            self.range = h.HmmRange(sub, start, end, h.new_hmm_pfns((end - start) >> PAGE_SHIFT), seq)

    @property
    def pfns(self) -> np.ndarray:
        return self.range.pfns if self.api == "5.2" else self.range.hmm_pfns

    def snapshot(self, reference: bool = False, keep_events: bool = False) -> int:
        """One snapshot (no fault requested) under the mmap lock; the return value.  The event log is
        cleared afterwards unless ``keep_events`` (repeated runs would grow it)."""
        mm = self.mm
        rng = self.range
        if self.api == "5.2":
            from hmmirror.fast import hmm_v5_2 as f
            rng.default_flags = rng.pfn_flags_mask = 0
            call: Any = lambda: f.hmm_range_snapshot(rng, reference=reference)       # noqa: E731
        else:
            from hmmirror.fast import hmm_modern as f
            rng.default_flags = rng.pfn_flags_mask = 0
            call = lambda: f.hmm_range_fault(rng, reference=reference)                # noqa: E731

        def go() -> Any:
            yield from sched.down_read(mm.mmap_sem)
            r = yield from call()
            if mm.mmap_sem.held_by(mm.task):
                sched.up_read(mm.mmap_sem)
            return r

        ret = sched.run(go(), mm.task)
        if not keep_events:
            self.m.events.clear()
        return ret  # type: ignore[no-any-return]

    def fault_in(self, write: bool = True, reference: bool = False, keep_events: bool = False) -> int:
        """``hmm_range_fault`` requesting every page (writable if ``write``)."""
        mm = self.mm
        rng = self.range
        if self.api == "5.2":
            from hmmirror.fast import hmm_v5_2 as f
            rng.default_flags = 1 | (2 if write else 0)
            rng.pfn_flags_mask = 0
            call: Any = lambda: f.hmm_range_fault(rng, True, reference=reference)     # noqa: E731
        else:
            from hmmirror.fast import hmm_modern as f
            rng.default_flags = f.ref.HMM_PFN_REQ_FAULT | (f.ref.HMM_PFN_REQ_WRITE if write else 0)
            rng.pfn_flags_mask = 0
            call = lambda: f.hmm_range_fault(rng, reference=reference)                # noqa: E731

        def go() -> Any:
            yield from sched.down_read(mm.mmap_sem)
            r = yield from call()
            if mm.mmap_sem.held_by(mm.task):
                sched.up_read(mm.mmap_sem)
            return r

        ret = sched.run(go(), mm.task)
        if not keep_events:
            self.m.events.clear()
        return ret  # type: ignore[no-any-return]


def _machine(profile: str, ram: int, **kw: Any) -> Any:
    from hmmirror import Machine
    return Machine(profile, ram=ram, **kw)


def make_resident(m: Any) -> None:
    """Touch every host page of the machine's per-frame arrays (the model's memmap) once.

    numpy's ``zeros`` maps memory lazily; the first write to each 4 KiB of it is a host page fault (tens of
    microseconds on this class of VM).  The kernel's ``struct page`` array is resident from boot, so the
    benchmark makes the model's resident too before timing.  Values are unchanged.
    """
    mem = m.mem
    for arr in (mem.refcount, mem.mapcount, mem.flags, mem.order, mem._free4k, mem._blocks):
        v = arr.reshape(-1).view(np.uint8)
        v[::PAGE_SIZE] = v[::PAGE_SIZE]


def model_4k(profile: str, size: int, logging: bool = True) -> tuple[Any, int, float]:
    """A process with ``size`` bytes of anonymous 4 KiB pages, faulted in by the fast ``hmm_range_fault``;
    returns (process, start, seconds of the fault-in).  ``logging=False`` turns the event log off."""
    m = _machine(profile, size + 128 * MiB)
    m.logging = logging
    make_resident(m)
    p = m.spawn("bench")
    a = p.mmap(size, "rw", ["private", "anonymous"], align=PUD_SIZE)
    r = ModelRange(p, a, a + size)
    r.snapshot()                                            # imports and first use outside the timing
    t0 = time.perf_counter()
    ret = r.fault_in(write=True)
    dt = time.perf_counter() - t0
    expect = 0 if r.api == "modern" else size >> PAGE_SHIFT
    if ret != expect:
        raise RuntimeError(f"fault-in returned {ret}")
    return p, a, dt


def model_thp(profile: str, size: int) -> tuple[Any, int]:
    """``size`` bytes of anonymous THP (one write per 2 MiB)."""
    m = _machine(profile, size + 128 * MiB)
    p = m.spawn("bench")
    a = p.mmap(size, "rw", ["private", "anonymous"], align=PUD_SIZE)
    p.madvise(a, size, "hugepage")
    for off in range(0, size, PMD_SIZE):
        p.touch(a + off, 1, write=True)
    return p, a


def model_fsdax_pmd(profile: str, size: int) -> tuple[Any, int]:
    """``size`` bytes of an fsdax file mapped by PMDs of pmem (one write per 2 MiB: a read of an unwritten
    extent would map the huge zero page instead)."""
    m = _machine(profile, 256 * MiB)
    m.add_pmem("pmem0", size + 64 * MiB, "fsdax")
    m.mount("/mnt/pmem", "ext4", dax="pmem0")
    m.create_file("/mnt/pmem/big", size, "zero")
    p = m.spawn("bench")
    a = p.mmap(size, "rw", ["shared"], file="/mnt/pmem/big", align=PUD_SIZE)
    for off in range(0, size, PMD_SIZE):
        p.touch(a + off, 1, write=True)
    return p, a


def model_devdax_pud(profile: str, size: int) -> tuple[Any, int]:
    """``size`` bytes of device-dax with 1 GiB alignment (PUD leaves)."""
    m = _machine(profile, 256 * MiB)
    m.add_pmem("pmem0", size, "devdax", PUD_SIZE)
    p = m.spawn("bench")
    a = p.mmap(size, "rw", ["shared"], file="/dev/dax0.0")
    for off in range(0, size, PUD_SIZE):
        p.touch(a + off, 1)
    return p, a


def model_holes(profile: str, size: int) -> tuple[Any, int]:
    """``size`` bytes of untouched anonymous memory (no page tables: holes)."""
    m = _machine(profile, 64 * MiB)
    p = m.spawn("bench")
    a = p.mmap(size, "rw", ["private", "anonymous"], align=PUD_SIZE)
    return p, a


def leaf_levels(p: Any, start: int, end: int) -> dict[str, int]:
    """Pages per level (hole/pte/pmd/pud/other) in ``[start, end)``: checks a case has its shape."""
    from hmmirror.fast.gather import gather_range
    g = gather_range(p.mm, start, end)
    names = ["hole", "pte", "pmd", "pud", "other"]
    counts = np.bincount(g.level, minlength=5)
    return {names[i]: int(c) for i, c in enumerate(counts) if c}


def model_bytes_per_page(m: Any, pages: int) -> dict[str, float]:
    """Model state per mapped 4 KiB page: page tables (allocated rows and live rows), per-frame metadata,
    and the allocator's arrays (``_free4k``, ``_blocks``)."""
    mem = m.mem
    b = m.model_bytes()
    alloc = int(mem._free4k.nbytes + mem._blocks.nbytes)
    tables_live = b["page_tables_live"]
    meta = b["page_metadata"]
    return {
        "page_tables_allocated": b["page_tables"] / pages,
        "page_tables_live": tables_live / pages,
        "page_metadata": meta / pages,
        "allocator": alloc / pages,
        "total_live": (tables_live + meta) / pages,
        "total_allocated": (b["page_tables"] + meta + alloc) / pages,
        "ram_pages": float(mem.nr_ram),
    }


# --- the kernel side -------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_HUGETLB = 0x02, 0x20, 0x4000, 0x40000
MAP_HUGE_1GB = 30 << 26
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 14, 15, 23
MAP_FAILED = ctypes.c_void_p(-1).value


class KernelMap:
    """A real mapping in this process (unmapped by :meth:`close`)."""

    def __init__(self, size: int, prot: int = PROT_RW, flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
                 align: int = PAGE_SIZE) -> None:
        self.raw_size = size + (align if align > PAGE_SIZE else 0)
        addr = _libc.mmap(None, self.raw_size, prot, flags, -1, 0)
        if addr in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {size} bytes failed: {os.strerror(ctypes.get_errno())}")
        self.raw = addr
        self.addr = (addr + align - 1) & ~(align - 1) if align > PAGE_SIZE else addr
        self.size = size

    def madvise(self, advice: int) -> None:
        if _libc.madvise(self.addr, self.size, advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise({advice}): {os.strerror(err)}")

    def close(self) -> None:
        _libc.munmap(self.raw, self.raw_size)


def pagemap_unreadable() -> str | None:
    """Why ``/proc/self/pagemap`` cannot be read here, or None."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError as exc:
        return f"/proc/self/pagemap is not readable ({exc.strerror})"
    try:
        os.pread(fd, 8, 0)
    except OSError as exc:
        return f"/proc/self/pagemap cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    return None


class KernelTimer:
    """Times the kernel's pagemap read and PAGEMAP_SCAN over a range of this process."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        from hmmirror.live import pagemap as lp
        self.lp = lp
        self.vec = (lp.PageRegion * 4096)()
        self.scan_ok = True

    def close(self) -> None:
        os.close(self.fd)

    def pagemap(self, start: int, size: int, runs: int) -> float:
        """ns per page of one ``pread`` of the pagemap entries of ``[start, start+size)``."""
        n = size >> PAGE_SHIFT
        buf = np.ones(n, dtype=np.uint64)          # touched: no page faults in copy_to_user
        mv = memoryview(buf).cast("B")

        def read() -> None:
            got = os.preadv(self.fd, [mv], (start >> PAGE_SHIFT) * 8)
            if got != n * 8:
                raise OSError(f"short pagemap read: {got} of {n * 8} bytes")

        return median_time(read, runs) / n * 1e9

    def scan(self, start: int, size: int, runs: int) -> float | None:
        """ns per page of ``PAGEMAP_SCAN`` over the range (all pages, categories PRESENT|HUGE|PFNZERO);
        None where the ioctl does not exist."""
        lp = self.lp
        end = start + size
        mask = int(lp.PageIs.PAGE_IS_PRESENT | lp.PageIs.PAGE_IS_HUGE | lp.PageIs.PAGE_IS_PFNZERO)
        arg = lp.PmScanArg()

        def scan() -> None:
            pos = start
            while pos < end:
                arg.size, arg.flags, arg.start, arg.end = ctypes.sizeof(lp.PmScanArg), 0, pos, end
                arg.vec, arg.vec_len, arg.max_pages = ctypes.addressof(self.vec), len(self.vec), 0
                arg.category_inverted = arg.category_mask = arg.category_anyof_mask = 0
                arg.return_mask = mask
                r = lp._libc.ioctl(self.fd, lp.PAGEMAP_SCAN, ctypes.addressof(arg))
                if r < 0:
                    raise OSError(ctypes.get_errno(), "PAGEMAP_SCAN")
                if arg.walk_end <= pos:
                    break
                pos = arg.walk_end

        try:
            scan()
        except OSError:
            self.scan_ok = False
            return None
        return median_time(scan, runs) / (size >> PAGE_SHIFT) * 1e9


def _kernel_shape(kind: str, size: int, kt: KernelTimer, runs: int) -> dict[str, Any]:
    """Make a real mapping of ``kind`` and time the kernel over it."""
    out: dict[str, Any] = {}
    if kind == "4k":
        km = KernelMap(size)
        km.madvise(MADV_NOHUGEPAGE)
        t0 = time.perf_counter()
        km.madvise(MADV_POPULATE_WRITE)
        out["populate_ns_per_page"] = (time.perf_counter() - t0) / (size >> PAGE_SHIFT) * 1e9
        out["shape"] = "anonymous 4 KiB pages (MADV_NOHUGEPAGE, MADV_POPULATE_WRITE)"
    elif kind == "thp":
        km = KernelMap(size, align=PMD_SIZE)
        km.madvise(MADV_HUGEPAGE)
        km.madvise(MADV_POPULATE_WRITE)
        out["shape"] = "anonymous THP (MADV_HUGEPAGE, MADV_POPULATE_WRITE)"
    elif kind == "hugetlb1g":
        km = KernelMap(size, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_1GB)   # 1 GiB aligned
        km.madvise(MADV_POPULATE_WRITE)
        out["shape"] = "hugetlb 1 GiB page (MAP_HUGETLB|MAP_HUGE_1GB)"
    elif kind == "holes":
        km = KernelMap(size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        out["shape"] = "PROT_NONE MAP_NORESERVE reservation (no page tables)"
    else:
        raise ValueError(kind)
    try:
        if kind in ("thp", "hugetlb1g"):
            huge = _huge_fraction(kt, km.addr, size)
            out["huge_fraction"] = huge
        out["pagemap"] = kt.pagemap(km.addr, size, runs)
        out["scan"] = kt.scan(km.addr, size, runs)
    finally:
        km.close()
    return out


def _huge_fraction(kt: KernelTimer, start: int, size: int) -> float | None:
    """Fraction of the range PAGEMAP_SCAN reports as PAGE_IS_HUGE."""
    lp = kt.lp
    fd = kt.fd
    try:
        regions = lp._scan_regions(fd, start, start + size, int(lp.PageIs.PAGE_IS_HUGE),
                                   int(lp.PageIs.PAGE_IS_HUGE))
    except OSError:
        return None
    if regions is None:
        return None
    return sum(b - a for a, b, _c in regions) / size


# --- the cases -------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    size: int
    ref_size: int
    kernel: str
    kernel_note: str
    goal: str
    goal_ratio: float | None = None


SPECS = [
    Spec("4k_populated_2GiB", 2 * GiB, 8 * MiB, "4k", "same shape", "model <= 0.4 x kernel pagemap", 0.4),
    Spec("thp_2GiB", 2 * GiB, 32 * MiB, "thp", "same shape", "model <= 0.5 x kernel pagemap", 0.5),
    Spec("fsdax_pmd_2GiB", 2 * GiB, 32 * MiB, "thp",
         "no fsdax on the host: compared with anonymous THP (PMD leaves)", "model <= 0.5 x kernel pagemap", 0.5),
    Spec("devdax_pud_1GiB", GiB, 16 * MiB, "hugetlb1g",
         "no device-dax on the host: compared with a hugetlb 1 GiB page (PUD leaf)", ">= 1e9 entries/s"),
    Spec("holes_64GiB", 64 * GiB, 4 * GiB, "holes", "same shape", "model <= 0.3 x kernel pagemap", 0.3),
]


def _build(spec: Spec, profile: str) -> tuple[Any, int, dict[str, Any]]:
    extra: dict[str, Any] = {}
    if spec.name.startswith("4k"):
        _p, _a, dt0 = model_4k(profile, spec.size, logging=False)
        extra["fault_in_ns_per_page_logging_off"] = dt0 / (spec.size >> PAGE_SHIFT) * 1e9
        del _p
        gc.collect()
        p, a, dt = model_4k(profile, spec.size)
        p.machine.logging = True
        extra["fault_in_ns_per_page"] = dt / (spec.size >> PAGE_SHIFT) * 1e9
        extra["bytes_per_page"] = model_bytes_per_page(p.machine, spec.size >> PAGE_SHIFT)
    elif spec.name.startswith("thp"):
        p, a = model_thp(profile, spec.size)
    elif spec.name.startswith("fsdax"):
        p, a = model_fsdax_pmd(profile, spec.size)
    elif spec.name.startswith("devdax"):
        p, a = model_devdax_pud(profile, spec.size)
    else:
        p, a = model_holes(profile, spec.size)
    return p, a, extra


def run_case(spec: Spec, profile: str, runs: int, kernel: dict[str, Any] | None) -> list[Case]:
    """Measure one case for one profile (the kernel numbers are measured once and shared)."""
    p, a, extra = _build(spec, profile)
    npages = spec.size >> PAGE_SHIFT
    extra["levels"] = leaf_levels(p, a, a + min(spec.size, 4 * GiB))
    fast = ModelRange(p, a, a + spec.size)
    t_fast = median_time(lambda: fast.snapshot(), runs)
    small = ModelRange(p, a, a + spec.ref_size)
    t_ref = median_time(lambda: small.snapshot(reference=True), max(1, runs // 2))
    ref_ns = t_ref / (spec.ref_size >> PAGE_SHIFT) * 1e9
    # the fast result equals the reference one on the small range (a cheap in-run sanity check)
    small.snapshot(reference=True)
    expect = small.pfns.copy()
    small.snapshot()
    extra["equal_to_reference_on_small_range"] = bool(np.array_equal(expect, small.pfns))
    model_ns = t_fast / npages * 1e9
    c = Case(spec.name, profile, npages, model_ns, ref_ns, spec.ref_size >> PAGE_SHIFT,
             speedup_vs_reference=ref_ns / model_ns, goal=spec.goal, extra=extra)
    c.entries_per_second = 1e9 / model_ns
    if kernel is not None:
        c.kernel_pagemap_ns_per_page = kernel.get("pagemap")
        c.kernel_pagemap_scan_ns_per_page = kernel.get("scan")
        c.kernel_shape = f"{kernel.get('shape')}; {spec.kernel_note}"
        if kernel.get("huge_fraction") is not None:
            c.extra["kernel_huge_fraction"] = kernel["huge_fraction"]
        if c.kernel_pagemap_ns_per_page:
            c.ratio = model_ns / c.kernel_pagemap_ns_per_page
        if c.kernel_pagemap_scan_ns_per_page:
            c.ratio_scan = model_ns / c.kernel_pagemap_scan_ns_per_page
    if spec.goal_ratio is not None:
        c.goal_met = c.ratio is not None and c.ratio <= spec.goal_ratio
    else:
        c.goal_met = c.entries_per_second >= 1e9
    cases = [c]
    if "fault_in_ns_per_page" in extra:
        f = Case("fault_in_4k_2GiB", profile, npages, extra["fault_in_ns_per_page"],
                 goal="model <= 100 ns/page", goal_met=extra["fault_in_ns_per_page"] <= 100)
        if kernel is not None and kernel.get("populate_ns_per_page"):
            f.kernel_shape = "MADV_POPULATE_WRITE of anonymous 4 KiB pages"
            f.extra["kernel_populate_ns_per_page"] = kernel["populate_ns_per_page"]
            f.ratio = f.model_ns_per_page / kernel["populate_ns_per_page"]
        f.extra["logging"] = True
        f.extra["model_ns_per_page_logging_off"] = extra["fault_in_ns_per_page_logging_off"]
        cases.append(f)
    del p, fast, small
    gc.collect()
    return cases


def run_bench(profiles: tuple[str, ...] = ("6.18", "5.2"), runs: int = 5, kernel: bool = True,
              cases: tuple[str, ...] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All cases; returns ``{"cases": [...], "kernel": {...}, "notes": [...]}``."""
    notes: list[str] = []
    why = pagemap_unreadable() if kernel else "kernel measurements not requested"
    kt = None
    if why is None:
        kt = KernelTimer()
    else:
        notes.append(f"kernel side skipped: {why}")
    out: list[Case] = []
    t_start = time.perf_counter()
    try:
        for spec in SPECS:
            if cases and spec.name not in cases:
                continue
            knum = None
            if kt is not None:
                try:
                    if spec.kernel == "hugetlb1g":
                        knum = _kernel_hugetlb(spec.size, kt, runs, notes)
                    else:
                        knum = _kernel_shape(spec.kernel, spec.size, kt, runs)
                except OSError as exc:
                    notes.append(f"{spec.name}: kernel shape not available ({exc})")
            for prof in profiles:
                if progress:
                    progress(f"{spec.name} [{prof}]")
                out.extend(run_case(spec, prof, runs, knum))
    finally:
        if kt is not None:
            kt.close()
    if kt is not None and not kt.scan_ok:
        notes.append("PAGEMAP_SCAN is not available on this kernel: kernel_pagemap_scan_ns_per_page is null")
    return {"cases": [asdict(c) for c in out], "notes": notes, "runs": runs,
            "seconds": time.perf_counter() - t_start}


def _kernel_hugetlb(size: int, kt: KernelTimer, runs: int, notes: list[str]) -> dict[str, Any] | None:
    """The PUD-shaped kernel mapping: a hugetlb 1 GiB page (pool grown temporarily), else THP."""
    from hmmirror.live import hostenv
    try:
        with hostenv.reserve_hugepages("1G", size // GiB):
            return _kernel_shape("hugetlb1g", size, kt, runs)
    except (hostenv.Unavailable, OSError) as exc:
        notes.append(f"devdax_pud_1GiB: no hugetlb 1 GiB page ({exc}); compared with anonymous THP instead")
        k = _kernel_shape("thp", size, kt, runs)
        return k


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_bench` result."""
    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [f"{'case':<20} {'prof':<5} {'pages':>9} {'model':>8} {'ref':>9} {'pagemap':>8} {'scan':>7} "
             f"{'ratio':>6} {'x ref':>7}  goal",
             "(ns/page; ratio = model/pagemap; x ref = reference/model)"]
    for c in result["cases"]:
        goal = "" if c["goal"] is None else f"{c['goal']}: {'met' if c['goal_met'] else 'NOT met'}"
        lines.append(f"{c['name']:<20} {c['profile']:<5} {c['pages']:>9} {f(c['model_ns_per_page']):>8} "
                     f"{f(c['reference_ns_per_page'], '{:.0f}'):>9} {f(c['kernel_pagemap_ns_per_page']):>8} "
                     f"{f(c['kernel_pagemap_scan_ns_per_page']):>7} {f(c['ratio'], '{:.3f}'):>6} "
                     f"{f(c['speedup_vs_reference'], '{:.0f}'):>7}  {goal}")
    for c in result["cases"]:
        off = c["extra"].get("model_ns_per_page_logging_off")
        if off is not None:
            lines.append(f"fault-in [{c['profile']}] with the event log off: {off:.1f} ns/page "
                         f"(5.2 records one may_sleep event per handle_mm_fault)")
    for c in result["cases"]:
        bpp = c["extra"].get("bytes_per_page")
        if bpp:
            lines.append(f"memory [{c['profile']}]: {bpp['total_live']:.1f} B/page live state (page tables "
                         f"{bpp['page_tables_live']:.1f} + struct-page arrays {bpp['page_metadata']:.1f}); "
                         f"allocated incl. pool slack and allocator arrays {bpp['total_allocated']:.1f} B/page "
                         f"(goal <= 24; the kernel: 8 B PTE + 64 B struct page)")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"{result['seconds']:.1f} s, medians of {result['runs']} runs after a warm-up")
    return "\n".join(lines)


__all__ = ["Case", "ModelRange", "SPECS", "format_table", "median_time", "run_bench"]
