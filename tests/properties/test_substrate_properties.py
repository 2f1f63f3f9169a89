"""Property tests of the mm substrate over random operation sequences (Hypothesis), both kernel profiles.

Operations: mmap (private anon, 2 MiB-aligned anon with MADV_HUGEPAGE, shared anon when shmem exists),
munmap, mprotect, madvise, mremap (when the module exists), read/write touches, fork and exit, on small
machines.  After every operation:

1. the page counts agree with a walk of every live mm's page tables (``mm.debug.check_counts``; the
   convention of docs/design.md "Data layout");
2. after a successful munmap no entry (present or not) remains in the range (mm-substrate.md §6, munmap);
3. every entry that changed was covered by an invalidate_range_start/end pair issued before the change
   became visible (§6, last paragraph: installs into none entries and in-place permission upgrades of the
   same pfn need none; accessed/dirty bits are not changes).  A classic subscriber on every mm snapshots
   the entries of each range at its start and at its end; a change between two observations of a page is
   allowed only while a range covering that page is open.  After ``release`` (exit_mmap) the mm is no
   longer checked: release is the notification.
"""

from __future__ import annotations

from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hmmirror import KernelError, Machine  # noqa: E402
from hmmirror.arch.x86.pgtable import _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_RW, PMD_SIZE, PTE_PFN_MASK  # noqa: E402
from hmmirror.kernel import sched  # noqa: E402
from hmmirror.mm.debug import check_counts, entries_in, page_values  # noqa: E402
from hmmirror.mm.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_register  # noqa: E402

P = 4096
M2 = PMD_SIZE

try:
    import hmmirror.fs.shmem  # noqa: F401
    HAVE_SHMEM = True
except ImportError:
    HAVE_SHMEM = False

try:
    import hmmirror.mm.mremap  # noqa: F401
    HAVE_MREMAP = True
except ImportError:
    HAVE_MREMAP = False

KINDS = ["mmap", "mmap_thp", "mmap_thp", "mmap_shared", "munmap", "munmap", "mprotect", "mprotect", "mprotect",
         "madvise", "madvise", "madvise", "touch_r", "touch_w", "touch_w", "touch_rw", "touch_rw", "fork", "fork",
         "exit", "mremap"]
ADVICE_5_2 = ["dontneed", "dontneed", "hugepage", "nohugepage", "dontfork", "wipeonfork", "free", "remove"]
ADVICE_6_18 = ADVICE_5_2 + ["populate_write", "populate_read", "pageout", "collapse"]
PROTS = ["none", "r", "rw", "rw"]

OPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 15), st.integers(0, 1023),
                         st.integers(0, 1023)), min_size=10, max_size=30)


class Recorder(MmuNotifierOps):
    """Classic subscriber: snapshots the entries of every range at its start and at its end."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def release(self, mn, mm):  # type: ignore[no-untyped-def]
        self.log.append(("release", mm.name, 0, 0, 0, None))
        return
        yield

    def invalidate_range_start(self, mn, r):  # type: ignore[no-untyped-def]
        self.log.append(("start", r.mm.name, id(r), r.start, r.end, page_values(r.mm, r.start, r.end)))
        return 0
        yield

    def invalidate_range_end(self, mn, r):  # type: ignore[no-untyped-def]
        self.log.append(("end", r.mm.name, id(r), r.start, r.end, page_values(r.mm, r.start, r.end)))
        return
        yield


def allowed_unnotified(old: tuple[int, int] | None, new: tuple[int, int] | None) -> bool:
    """§6: a change that needs no invalidation: none -> anything (install), or the same pfn and level with
    permissions only gained (write set, protnone made accessible); accessed/dirty already masked out."""
    if old == new or old is None:
        return True
    if new is None:
        return False
    (ov, ol), (nv, nl) = old, new
    present = _PAGE_PRESENT | _PAGE_PROTNONE
    if ol != nl or not ov & present or not nv & present or (ov & PTE_PFN_MASK) != (nv & PTE_PFN_MASK):
        return False
    perm = _PAGE_RW | _PAGE_PRESENT | _PAGE_PROTNONE
    if (ov & ~perm) != (nv & ~perm):
        return False
    lost_write = ov & _PAGE_RW and not nv & _PAGE_RW
    lost_access = ov & _PAGE_PRESENT and not nv & _PAGE_PRESENT
    return not lost_write and not lost_access


def check_coverage(name: str, before: dict[int, Any], after: dict[int, Any], log: list[tuple[Any, ...]]) -> None:
    """Property 3 for one mm over one operation (see the module docstring)."""
    events = [e for e in log if e[1] == name]
    if any(e[0] == "release" for e in events):
        return
    last = dict(before)
    open_ranges: dict[int, tuple[int, int]] = {}

    def covered(pg: int) -> bool:
        return any(s <= pg < e for s, e in open_ranges.values())

    for kind, _, key, s, e, snap in events:
        if kind == "end":
            open_ranges.setdefault(key, (s, e))               # this range was open during the change
        pages = set(snap) | {pg for pg in last if s <= pg < e}
        for pg in pages:
            old, new = last.get(pg), snap.get(pg)
            if old != new and not covered(pg) and not allowed_unnotified(old, new):
                raise AssertionError(f"{name}: entry at {pg:#x} changed {old} -> {new} before the "
                                     f"{kind} of range [{s:#x}, {e:#x})")
            if new is None:
                last.pop(pg, None)
            else:
                last[pg] = new
        if kind == "start":
            open_ranges[key] = (s, e)
        else:
            open_ranges.pop(key, None)
    assert not open_ranges, f"{name}: ranges left open: {open_ranges}"
    for pg in set(last) | set(after):
        old, new = last.get(pg), after.get(pg)
        if not allowed_unnotified(old, new):
            raise AssertionError(f"{name}: entry at {pg:#x} changed {old} -> {new} without an invalidation")


class World:
    """A small machine, its processes and one recorder log."""

    def __init__(self, kernel: str) -> None:
        self.m = Machine(kernel, ram=96 << 20)
        self.procs: list[Any] = []
        self.log: list[tuple[Any, ...]] = []
        self.n = 0
        self.advice = ADVICE_6_18 if kernel == "6.18" else ADVICE_5_2
        self.spawn()

    def _register(self, p: Any) -> None:
        sched.run(mmu_notifier_register(MmuNotifier(Recorder(self.log)), p.mm), p.mm.task)

    def spawn(self) -> None:
        p = self.m.spawn(f"p{self.n}")
        self.n += 1
        self._register(p)
        self.procs.append(p)

    def target(self, p: Any, j: int, k: int, l_: int) -> tuple[int, int] | None:
        """A range relative to one of ``p``'s VMAs; it may run past the VMA (holes, neighbours)."""
        if not p.mm.vmas:
            return None
        v = p.mm.vmas[j % len(p.mm.vmas)]
        npages = (v.vm_end - v.vm_start) // P
        start = v.vm_start + (k % npages) * P
        return start, (1 + l_ % (npages + 2)) * P

    def apply(self, op: tuple[str, int, int, int, int]) -> tuple[Any, int, int] | None:
        """Run one operation; returns ``(process, start, end)`` after a successful munmap."""
        kind, i, j, k, l_ = op
        p = self.procs[i % len(self.procs)]
        try:
            if kind == "mmap":
                p.mmap((1 + k % 12) * P, PROTS[l_ % 4])
            elif kind == "mmap_thp":
                a = p.mmap((1 + k % 2) * M2, "rw", align=M2)
                p.madvise(a, (1 + k % 2) * M2, "hugepage")
            elif kind == "mmap_shared":
                if HAVE_SHMEM:
                    p.mmap((1 + k % 8) * P, PROTS[1 + l_ % 3], ["shared", "anonymous"])
            elif kind == "fork":
                c = p.fork(f"p{self.n}")
                self.n += 1
                self._register(c)
                self.procs.append(c)
            elif kind == "exit":
                p.exit()
                self.procs.remove(p)
                if not self.procs:
                    self.spawn()
            else:
                t = self.target(p, j, k, l_)
                if t is None:
                    return None
                start, length = t
                if kind == "munmap":
                    p.munmap(start, length)
                    return p, start, start + length
                if kind == "mprotect":
                    p.mprotect(start, length, PROTS[(k + l_) % 4])
                elif kind == "madvise":
                    p.madvise(start, length, self.advice[(k * 7 + l_) % len(self.advice)])
                elif kind == "touch_r":
                    p.touch(start, min(length, 64 * P))
                elif kind == "mremap":
                    if HAVE_MREMAP:
                        from hmmirror.mm.mremap import MREMAP_MAYMOVE, do_mremap
                        new_len = (1 + (k * 13 + l_) % 12) * P
                        sched.run(do_mremap(p.mm, start, length, new_len, MREMAP_MAYMOVE), p.mm.task)
                else:
                    p.touch(start, min(length, 64 * P), write=True, fill=(k % 250) + 1)
        except KernelError:
            pass
        return None

    def snapshot(self) -> dict[str, dict[int, Any]]:
        return {p.name: page_values(p.mm) for p in self.procs}


def run_sequence(kernel: str, ops: list[tuple[str, int, int, int, int]]) -> None:
    w = World(kernel)
    steps = []
    for op in ops:                       # "touch_rw": a read, then (checked separately) a write of the same range
        steps += [("touch_r",) + op[1:], ("touch_w",) + op[1:]] if op[0] == "touch_rw" else [op]
    for n, op in enumerate(steps):
        before = w.snapshot()
        w.log.clear()
        unmapped = w.apply(op)
        after = w.snapshot()
        where = f"after op {n} {op}"
        bad = check_counts(w.m)
        assert bad == [], f"{where}: {bad}"                                   # property 1
        if unmapped is not None:
            p, s, e = unmapped
            assert entries_in(p.mm, s, e) == [], f"{where}: entries left after munmap"   # property 2
        for name in set(before) | set(after):
            try:
                check_coverage(name, before.get(name, {}), after.get(name, {}), w.log)   # property 3
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(ops=OPS)
def test_counts_unmap_and_notifier_coverage(kernel: str, ops: list[tuple[str, int, int, int, int]]) -> None:
    run_sequence(kernel, ops)


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_thp_fork_cow_sequence(kernel: str) -> None:
    # a fixed sequence through the THP paths the random search may reach rarely: THP, fork, partial
    # mprotect / DONTNEED / munmap, writes on both sides, exits
    run_sequence(kernel, [
        ("mmap_thp", 0, 0, 1, 0), ("touch_w", 0, 0, 0, 600), ("fork", 0, 0, 0, 0), ("touch_w", 0, 0, 5, 0),
        ("touch_w", 1, 0, 700, 0), ("mprotect", 1, 0, 3, 4), ("madvise", 0, 0, 9, 0), ("touch_r", 1, 0, 0, 900),
        ("munmap", 0, 0, 300, 100), ("exit", 1, 0, 0, 0), ("touch_w", 0, 0, 0, 1023), ("exit", 0, 0, 0, 0),
    ])
