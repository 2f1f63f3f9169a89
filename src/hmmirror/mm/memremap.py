"""ZONE_DEVICE page maps: ``percpu_ref``, ``struct dev_pagemap`` and its lifecycle (kernel/memremap.c,
mm/memremap.c [6.x]).

Follows mm-substrate.md §3 ([5.2] shape, used by both profiles; see "Model choices" below):

* ``percpu_ref`` is ``{count, dead}``: ``init`` -> ``count = 1``; ``get`` is unconditional; ``tryget_live``
  fails once ``dead``; ``put`` at zero runs the release callback; ``kill`` marks it dead and drops the
  initial reference.
* ``devm_memremap_pages`` registers the pfn range (``machine.pgmaps``, the ``pgmap_array`` lookup used by
  :meth:`~hmmirror.machine.Machine.pgmap_of`), initialises every device page (refcount 1, ``PG.device``) and
  takes one ``pgmap.ref`` reference per device page.
* ``get_dev_pagemap(machine, pfn, cached)`` / ``put_dev_pagemap(pgmap)``: the cached pointer is returned as-is
  (no new reference) when it covers ``pfn``; otherwise the cached reference is dropped and a new lookup takes
  a reference with ``percpu_ref_tryget_live`` (None once the ref is dead).  These are the semantics
  hmm-5.2.md §8 relies on.
* Teardown (``devm_memremap_pages_release``), in this order: ``pgmap.kill(ref)``; ``put_page`` on every
  device page (an idle page goes 1 -> 0 and drops its pgmap reference); ``pgmap.cleanup(ref)`` waits with
  ``sched.wait_event`` until the count is zero; then the range is removed (lookups find nothing).

A teardown whose count can never drain (a leaked ``get_dev_pagemap``, a pinned page never released) is a
clear error state, never an endless loop: while it waits ``pgmap.state == "draining"`` and
``pgmap.waiting_for`` holds the outstanding count; the sequential driver :func:`run_memunmap_pages` turns
the scheduler's :class:`~hmmirror.errors.Deadlock` into ``pgmap.state == "stuck"`` (``pgmap.stuck_count`` =
the holders' count, a ``pgmap_stuck`` event) and re-raises it with that count in the message.

Model choices:
* Idle device pages hold refcount 1 in both profiles (the [5.2] convention; [6.x] idles them at 0).  Under
  ``profile.dax_refcounted`` mappings add one reference per leaf on top of that, so the per-page pgmap
  reference is still dropped exactly when a page's refcount reaches zero.
* ``memunmap_pages`` [5.17+, ``profile.memunmap_put_many``] drops the per-page references of a non-private
  pgmap with one ``percpu_ref_put_many`` and leaves the pages alone: a page still mapped ([6.18] refcounted
  DAX leaves) or pinned holds a folio reference but no pgmap reference, so the teardown does not wait for it.
  [5.2] puts every device page instead; a page still referenced keeps its pgmap reference until its last put.
* ``page_free`` (``pgmap->ops->page_free`` [6.x], ``pgmap->page_free`` [5.2]) runs when a page of a
  device-private / fsdax pgmap becomes idle again (refcount back to 1, ``__put_devmap_managed_page``);
  ``migrate_to_ram`` is the device-private CPU fault hook (``do_swap_page`` calls ``pgmap.ops.migrate_to_ram``).
* Device-private pages under ``profile.device_private_free_at_zero`` [6.0+] follow the kernel's zero-based
  convention instead: a free page has refcount 0 and holds no pgmap reference (``memremap_pages`` takes none
  for them); the driver's allocator calls :func:`zone_device_page_init` (refcount 1, folio locked, one
  ``pgmap.ref`` reference); the put that reaches 0 runs ``free_zone_device_folio``: the page forgets its
  anon mapping, ``page_free`` hands it back to the driver and the pgmap reference is put.  Teardown kills the
  ref and waits until every allocated page was freed.  ``pgmap.zone_device_data`` (int64, one slot per page,
  -1 = NULL) is ``page->zone_device_data``: a driver stores a pfn or an index there, never an object.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import HPAGE_PUD_NR, PAGE_SHIFT, PAGE_SIZE
from hmmirror.errors import Deadlock
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.machine import Machine

EINVAL, ENOMEM, ENXIO = 22, 12, 6

#: memory section size on x86-64 (SECTION_SIZE_BITS = 27): overlap checks are per section
SECTION_SHIFT = 27
PAGES_PER_SECTION = 1 << (SECTION_SHIFT - PAGE_SHIFT)


# --- percpu_ref ------------------------------------------------------------------------------------------
class PercpuRef:
    """``struct percpu_ref`` modelled as ``{count, dead}`` (mm-substrate.md §3), plus per-operation counts.

    ``stats`` counts operations (``get``, ``get_many`` (pages), ``tryget_live``, ``tryget_live_failed``,
    ``put``, ``put_many`` (pages), ``kill``, ``release``) for observability; it never affects behaviour.
    """

    __slots__ = ("name", "count", "dead", "release", "released", "stats")

    def __init__(self, name: str = "ref") -> None:
        self.name = name
        self.count = 0
        self.dead = True                 # not initialised yet: percpu_ref_init() makes it live
        self.release: Callable[[PercpuRef], None] | None = None
        self.released = False
        self.stats: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"PercpuRef({self.name} count={self.count}{' dead' if self.dead else ''})"


def percpu_ref_init(ref: PercpuRef, release: Callable[[PercpuRef], None] | None = None) -> int:
    """percpu_ref_init() (lib/percpu-refcount.c): ``count = 1``, live.  Returns 0."""
    ref.count = 1
    ref.dead = False
    ref.release = release
    ref.released = False
    ref.stats.clear()
    return 0


def percpu_ref_get_many(ref: PercpuRef, nr: int) -> None:
    """percpu_ref_get_many(): unconditional (the caller already holds a reference or the ref is live)."""
    ref.count += nr
    ref.stats["get_many"] += nr


def percpu_ref_get(ref: PercpuRef) -> None:
    """percpu_ref_get(): unconditional."""
    ref.count += 1
    ref.stats["get"] += 1


def percpu_ref_tryget_live(ref: PercpuRef) -> bool:
    """percpu_ref_tryget_live(): fails once the ref is dead (killed), else takes a reference."""
    if ref.dead:
        ref.stats["tryget_live_failed"] += 1
        return False
    ref.count += 1
    ref.stats["tryget_live"] += 1
    return True


def percpu_ref_put_many(ref: PercpuRef, nr: int) -> None:
    """percpu_ref_put_many(): at zero the release callback runs; below zero is a reported model bug."""
    if nr <= 0:
        return
    ref.count -= nr
    ref.stats["put_many" if nr > 1 else "put"] += nr
    if ref.count < 0:
        sched.report("percpu_ref_underflow", f"{ref.name}: count went to {ref.count}")
    elif ref.count == 0:
        ref.released = True
        ref.stats["release"] += 1
        if ref.release is not None:
            ref.release(ref)


def percpu_ref_put(ref: PercpuRef) -> None:
    """percpu_ref_put()."""
    percpu_ref_put_many(ref, 1)


def percpu_ref_kill(ref: PercpuRef) -> None:
    """percpu_ref_kill(): mark dead (tryget_live fails from now on), then drop the initial reference.

    Killing twice is a kernel bug (``WARN_ONCE("... called more than once")``).
    """
    if ref.dead:
        sched.report("WARN_ON", f"percpu_ref_kill({ref.name}) called more than once")
        return
    ref.dead = True
    ref.stats["kill"] += 1
    percpu_ref_put(ref)


def percpu_ref_is_zero(ref: PercpuRef) -> bool:
    """percpu_ref_is_zero(): a dead ref whose count reached zero."""
    return ref.dead and ref.count == 0


# --- struct dev_pagemap ----------------------------------------------------------------------------------
class MemoryType(IntEnum):
    """enum memory_type (include/linux/memremap.h).

    ``MEMORY_DEVICE_GENERIC`` is device-dax's type from 5.10 (``MEMORY_DEVICE_DEVDAX`` in 5.3-5.9; the 5.2 type
    is not confirmed, mm-substrate.md §10.4); the model only distinguishes private / fsdax / generic.
    """

    MEMORY_DEVICE_PRIVATE = 1
    MEMORY_DEVICE_FS_DAX = 2
    MEMORY_DEVICE_GENERIC = 3
    MEMORY_DEVICE_PCI_P2PDMA = 4


MEMORY_DEVICE_PRIVATE = MemoryType.MEMORY_DEVICE_PRIVATE
MEMORY_DEVICE_FS_DAX = MemoryType.MEMORY_DEVICE_FS_DAX
MEMORY_DEVICE_GENERIC = MemoryType.MEMORY_DEVICE_GENERIC
MEMORY_DEVICE_DEVDAX = MemoryType.MEMORY_DEVICE_GENERIC          # 5.3-5.9 name of the same type
MEMORY_DEVICE_PCI_P2PDMA = MemoryType.MEMORY_DEVICE_PCI_P2PDMA


class DevPagemapOps:
    """``struct dev_pagemap_ops``.  Drivers subclass it; ``None`` attributes are absent hooks.

    * ``page_free(pgmap, pfn)``: plain; a page of a managed pgmap (device-private, fsdax) became idle.
    * ``migrate_to_ram(vmf)``: a generator returning a ``vm_fault_t``; the CPU touched a device-private
      entry (``do_swap_page``).  Required for ``MEMORY_DEVICE_PRIVATE``.
    """

    page_free: Any = None
    migrate_to_ram: Any = None


@dataclass(frozen=True)
class PfnRange:
    """``struct resource`` / ``struct range`` of a pgmap, in pfns: ``[start, end)`` (end exclusive)."""

    start: int
    end: int

    @property
    def npages(self) -> int:
        return self.end - self.start

    @property
    def phys_start(self) -> int:
        """``res.start`` (bytes)."""
        return self.start << PAGE_SHIFT

    @property
    def phys_end(self) -> int:
        """``res.end`` (bytes, inclusive, as ``struct resource``)."""
        return (self.end << PAGE_SHIFT) - 1

    def __repr__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


PGMAP_STATES = ("new", "live", "dying", "draining", "stuck", "removed")


@dataclass(eq=False)
class DevPagemap:
    """``struct dev_pagemap``.

    ``res`` is the pfn range (set by :func:`devm_memremap_pages` when the driver leaves it None and gives
    ``nr_pages``); ``ref`` the driver-supplied ``percpu_ref`` ([5.2]; embedded [6.18]); ``kill(ref)`` is plain,
    ``cleanup(ref)`` is a generator that waits for the count to reach zero; ``owner`` identifies the driver of
    device-private memory ([6.x], required non-None there).

    ``state``: ``new`` -> ``live`` (registered) -> ``dying`` (killed) -> ``draining`` (``cleanup`` waiting,
    ``waiting_for`` = outstanding count) -> ``removed``; or ``stuck`` (``stuck_count`` = holders) when a
    sequential teardown can never drain.
    """

    name: str
    type: MemoryType
    nr_pages: int = 0
    res: PfnRange | None = None
    ref: PercpuRef | None = None
    kill: Callable[[PercpuRef], None] | None = None
    cleanup: Callable[[PercpuRef], Gen[None]] | None = None
    ops: DevPagemapOps | None = None
    owner: Any = None
    align_pages: int = HPAGE_PUD_NR          # alignment of the physical range (pmem: 1 GiB)
    dev: Any = None                          # the hosting device (pmem, dev_dax, ...)
    data: Any = None
    zone_device_data: Any = None             # np.int64[npages]: page->zone_device_data (device-private), -1 = NULL
    free_at_zero: bool = False               # device-private pages free at refcount 0 (set at registration)
    machine: Any = None                      # set at registration
    state: str = "new"
    waiting_for: int = 0
    stuck_count: int = 0
    history: list[str] = field(default_factory=list)    # lifecycle steps, in order

    def covers(self, pfn: int) -> bool:
        """``res.start <= PFN_PHYS(pfn) <= res.end``."""
        r = self.res
        return r is not None and r.start <= pfn < r.end

    def put_device_page(self, pfn: int, new_count: int) -> None:
        """Called by ``PhysMem.put_page`` for a page of this pgmap (see :func:`put_device_page`)."""
        if self.machine is not None:
            put_device_page(self.machine, self, pfn, new_count)

    @property
    def count(self) -> int:
        """The current ``pgmap.ref`` count."""
        return self.ref.count if self.ref is not None else 0

    def stats(self) -> dict[str, Any]:
        """Observability: range, count, dead, state and the counts of gets and puts so far."""
        ref = self.ref
        return {
            "name": self.name,
            "type": self.type.name,
            "res": None if self.res is None else (self.res.start, self.res.end),
            "count": self.count,
            "dead": bool(ref.dead) if ref is not None else None,
            "state": self.state,
            "waiting_for": self.waiting_for,
            "stuck_count": self.stuck_count,
            "ops": dict(ref.stats) if ref is not None else {},
            "history": list(self.history),
        }

    def __repr__(self) -> str:
        return f"DevPagemap({self.name} {self.type.name} {self.res} count={self.count} {self.state})"


def pgmap_default_kill(ref: PercpuRef) -> None:
    """The driver's ``pgmap->kill`` when it has nothing else to do (dev_dax_percpu_kill [5.2])."""
    percpu_ref_kill(ref)


def pgmap_default_cleanup(pgmap: DevPagemap) -> Callable[[PercpuRef], Gen[None]]:
    """The driver's ``pgmap->cleanup``: wait until the ref count reaches zero (wait_for_completion on the
    release completion [5.2] dev_dax_percpu_exit; ``blk_cleanup_queue`` for pmem), then ``percpu_ref_exit``."""

    def cleanup(ref: PercpuRef) -> Gen[None]:
        yield from pgmap_wait_idle(pgmap)

    return cleanup


def pgmap_wait_idle(pgmap: DevPagemap) -> Gen[None]:
    """Ours: ``wait_event(ref count == 0)`` with the pgmap's state showing what it waits for.

    In sequential mode a count that cannot drain raises :class:`Deadlock` from :func:`sched.run`; the
    message names the pgmap and its holders' count.
    """
    ref = pgmap.ref
    assert ref is not None
    if ref.count == 0:
        return
    pgmap.state = "draining"
    pgmap.waiting_for = ref.count
    pgmap.history.append(f"wait:{ref.count}")
    machine = pgmap.machine
    if machine is not None:
        machine.log("pgmap_wait", pgmap=pgmap.name, count=ref.count)

    def drained() -> bool:
        pgmap.waiting_for = ref.count
        return ref.count == 0

    yield from sched.wait_event(drained, f"pgmap {pgmap.name} reference drain ({ref.count} holders)")
    pgmap.waiting_for = 0


def new_dev_pagemap(name: str, type: MemoryType, nr_pages: int, dev: Any = None,
                    ops: DevPagemapOps | None = None, owner: Any = None,
                    align_pages: int = HPAGE_PUD_NR) -> DevPagemap:
    """Ours: a pgmap with a live ref and the default kill/cleanup, as drivers set it up before
    ``devm_memremap_pages`` (5.2 dev_dax_probe / pmem_attach_disk)."""
    pgmap = DevPagemap(name, type, nr_pages, ops=ops, owner=owner, align_pages=align_pages, dev=dev)
    pgmap.ref = PercpuRef(f"{name}.ref")
    percpu_ref_init(pgmap.ref)
    pgmap.kill = pgmap_default_kill
    pgmap.cleanup = pgmap_default_cleanup(pgmap)
    return pgmap


# --- registration ----------------------------------------------------------------------------------------
def _section_span(r: PfnRange) -> tuple[int, int]:
    lo = r.start & ~(PAGES_PER_SECTION - 1)
    hi = -(-r.end // PAGES_PER_SECTION) * PAGES_PER_SECTION
    return lo, hi


def devm_memremap_pages(machine: "Machine", pgmap: DevPagemap) -> int:
    """devm_memremap_pages() (kernel/memremap.c [5.2]; memremap_pages() [6.x]): register ``pgmap``.

    Requires ``ref``, ``kill`` and ``cleanup`` (-EINVAL).  With ``res`` unset, a new device pfn range of
    ``nr_pages`` is appended above all memory (``PhysMem.add_device_range``, aligned to ``align_pages``).
    A given ``res`` must not share a memory section with another pgmap (-ENOMEM) nor intersect RAM
    (-ENXIO), and must lie in an existing, unowned device range (-ENXIO).  Every device page gets refcount 1
    and ``PG.device``; ``pgmap.ref`` takes one reference per device page.  Returns 0 or -errno.
    """
    if pgmap.ref is None or pgmap.kill is None or pgmap.cleanup is None:
        return -EINVAL
    if pgmap.type == MEMORY_DEVICE_PRIVATE and (pgmap.ops is None or pgmap.ops.migrate_to_ram is None
                                                or pgmap.ops.page_free is None):
        return -EINVAL
    if pgmap.type == MEMORY_DEVICE_PRIVATE and pgmap.owner is None and machine.profile.pgmap_owner_required:
        return -EINVAL                                      # [6.x] device-private pgmaps need an owner
    mem = machine.mem
    free_at_zero = pgmap.type == MEMORY_DEVICE_PRIVATE and machine.profile.device_private_free_at_zero
    if pgmap.res is None:
        if pgmap.nr_pages <= 0:
            return -EINVAL
        start = mem.add_device_range(pgmap.nr_pages, pgmap.align_pages, owner=pgmap,
                                     idle_refcount=0 if free_at_zero else 1)
        pgmap.res = PfnRange(start, start + pgmap.nr_pages)
    else:
        r = pgmap.res
        if r.start < mem.nr_ram:
            return -ENXIO                                   # region_intersects(System RAM)
        lo, hi = _section_span(r)
        for other in machine.pgmaps:
            assert other.res is not None
            if other.res.start < hi and other.res.end > lo:
                return -ENOMEM                              # "Conflicting mapping in same section"
        slot = None
        for i, (s, e, owner) in enumerate(mem.device_ranges):
            if s <= r.start and r.end <= e and (owner is None or getattr(owner, "state", "") == "removed"):
                slot = i
        if slot is None:
            return -ENXIO
        s, e, _ = mem.device_ranges[slot]
        mem.device_ranges[slot] = (s, e, pgmap)
    r = pgmap.res
    mem.flags[r.start: r.end] = PG.device                  # init every device page (page->pgmap = pgmap)
    mem.refcount[r.start: r.end] = 0 if free_at_zero else 1
    mem.mapcount[r.start: r.end] = 0
    mem.order[r.start: r.end] = 0
    pgmap.free_at_zero = free_at_zero
    if pgmap.type == MEMORY_DEVICE_PRIVATE:
        import numpy as np
        pgmap.zone_device_data = np.full(r.npages, -1, dtype=np.int64)
    if not free_at_zero:                                   # [6.x] no per-page reference for private pages
        percpu_ref_get_many(pgmap.ref, r.npages)
    machine.pgmaps.append(pgmap)                           # pgmap_array[res] = pgmap
    pgmap.machine = machine
    pgmap.state = "live"
    pgmap.history.append("memremap")
    machine.log("memremap_pages", pgmap=pgmap.name, start_pfn=r.start, end_pfn=r.end, type=pgmap.type.name)
    return 0


memremap_pages = devm_memremap_pages


# --- lookups ---------------------------------------------------------------------------------------------
def get_dev_pagemap(machine: "Machine", pfn: int, cached: DevPagemap | None = None) -> DevPagemap | None:
    """get_dev_pagemap(pfn, pgmap) (kernel/memremap.c [5.2]): a live reference on the pgmap of ``pfn``.

    ``cached`` (a pgmap the caller holds a reference on) is returned as-is, without a new reference, when it
    covers ``pfn``; otherwise its reference is dropped and a new lookup is made, taking a reference with
    ``percpu_ref_tryget_live``.  Returns None when no pgmap covers ``pfn`` or its ref is dead (killed), so
    after a failed lookup the caller holds nothing.
    """
    machine.counters["get_dev_pagemap"] += 1
    if cached is not None:
        if cached.covers(pfn):
            return cached
        put_dev_pagemap(cached)
    pgmap = machine.pgmap_of(pfn)                          # radix/xarray lookup under rcu_read_lock
    if pgmap is not None:
        assert pgmap.ref is not None
        if not percpu_ref_tryget_live(pgmap.ref):
            pgmap = None
    return pgmap


def put_dev_pagemap(pgmap: DevPagemap | None) -> None:
    """put_dev_pagemap(): ``percpu_ref_put(pgmap->ref)`` if ``pgmap`` is non-NULL."""
    if pgmap is not None:
        assert pgmap.ref is not None
        percpu_ref_put(pgmap.ref)


def is_device_private_page(machine: "Machine", pfn: int) -> bool:
    """is_device_private_page()."""
    pgmap = machine.pgmap_of(pfn)
    return pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE


def is_zone_device_page(machine: "Machine", pfn: int) -> bool:
    """is_zone_device_page()."""
    return 0 <= pfn < machine.mem.nr_pfns and bool(machine.mem.flags[pfn] & PG.device)


# --- device-private pages: allocation and freeing [6.0+] ---------------------------------------------------
def page_pgmap(machine: "Machine", pfn: int) -> DevPagemap | None:
    """page_pgmap() [6.15] / page->pgmap: the pgmap of a ZONE_DEVICE page (None for other pfns)."""
    return machine.pgmap_of(pfn) if pfn >= machine.mem.nr_ram else None


def zone_device_page_init(machine: "Machine", pfn: int) -> None:
    """zone_device_page_init() (mm/memremap.c, 6.x): hand a free device-private page to its driver.

    ``WARN_ON_ONCE(!percpu_ref_tryget_live(&pgmap->ref))``, ``set_page_count(page, 1)``, ``lock_page(page)``.
    The page must be free (refcount 0): initialising a page somebody still references is reported
    (``zone_device_page_init_busy``), as it corrupts that user's reference (invariant I6).
    """
    mem = machine.mem
    pgmap = page_pgmap(machine, pfn)
    if pgmap is None or pgmap.type != MEMORY_DEVICE_PRIVATE:
        sched.report("BUG_ON", f"zone_device_page_init({pfn:#x}): not a device-private page")
        return
    if int(mem.refcount[pfn]) != 0:
        sched.report("zone_device_page_init_busy",
                     f"zone_device_page_init({pfn:#x}) of {pgmap.name}: refcount {int(mem.refcount[pfn])}, not 0")
    assert pgmap.ref is not None
    if not percpu_ref_tryget_live(pgmap.ref):
        sched.report("WARN_ON", f"zone_device_page_init({pfn:#x}): pgmap {pgmap.name} is dying")
    mem.refcount[pfn] = 1
    if mem.flags[pfn] & PG.locked:
        sched.report("BUG_ON", f"zone_device_page_init({pfn:#x}): page already locked")
    mem.flags[pfn] = PG.device | PG.locked
    machine.counters["zone_device_page_init"] += 1


def free_zone_device_folio(machine: "Machine", pgmap: DevPagemap, pfn: int) -> None:
    """free_zone_device_folio() (mm/memremap.c, 6.x) for a device-private page whose refcount reached 0:
    ``folio->mapping = NULL``, ``pgmap->ops->page_free(page)``, ``put_dev_pagemap(pgmap)``."""
    mem = machine.mem
    if mem.mapcount[pfn] != 0:
        sched.report("BUG_ON", f"device page {pfn:#x} freed while mapped {int(mem.mapcount[pfn])} times")
    if mem.flags[pfn] & PG.locked:
        sched.report("BUG_ON", f"device page {pfn:#x} freed while locked")
    mem.flags[pfn] = PG.device
    mem.clear(pfn)
    machine.counters["free_zone_device_folio"] += 1
    if pgmap.ops is not None and pgmap.ops.page_free is not None:
        pgmap.ops.page_free(pgmap, pfn)
    put_dev_pagemap(pgmap)


# --- page references of device pages --------------------------------------------------------------------
def put_device_page(machine: "Machine", pgmap: DevPagemap, pfn: int, new_count: int) -> None:
    """The ZONE_DEVICE part of put_page(), after the page's refcount became ``new_count``.

    [5.2] ``put_devmap_managed_page`` -> ``__put_devmap_managed_page``: for managed types (device-private,
    fsdax) a count of 1 means the page is idle again and ``page_free`` runs; a count of 0 is the final put
    of a page (teardown, or a pinned page released after it) and drops the page's pgmap reference
    (``__put_page`` -> ``put_dev_pagemap``).  [6.0+] device-private pages: 0 is free
    (:func:`free_zone_device_folio`).
    """
    if pgmap.free_at_zero:
        if new_count == 0:
            free_zone_device_folio(machine, pgmap, pfn)
        elif new_count < 0:
            sched.report("page_ref_underflow", f"device page {pfn:#x} of {pgmap.name}: refcount {new_count}")
        return
    if new_count == 1 and pgmap.type in (MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_FS_DAX):
        if pgmap.ops is not None and pgmap.ops.page_free is not None:
            pgmap.ops.page_free(pgmap, pfn)
    elif new_count == 0:
        put_dev_pagemap(pgmap)
    elif new_count < 0:
        sched.report("page_ref_underflow", f"device page {pfn:#x} of {pgmap.name}: refcount {new_count}")


# --- teardown --------------------------------------------------------------------------------------------
def devm_memremap_pages_release(machine: "Machine", pgmap: DevPagemap) -> Gen[int]:
    """devm_memremap_pages_release() (kernel/memremap.c [5.2]; memunmap_pages() [6.x]): tear ``pgmap`` down.

    Order: ``pgmap.kill(ref)`` (lookups fail from now on; holders keep their references); the per-page
    references: [6.x] one ``percpu_ref_put_many`` (device-private pages: none, each allocated page holds its
    own), [5.2] ``put_page`` of every device page (idle pages drop their pgmap reference, pinned keep theirs);
    ``pgmap.cleanup(ref)`` sleeps until the count reaches zero; then the range is removed (``pgmap_of``
    finds nothing).  Returns 0, or -EINVAL if ``pgmap`` is not registered.  May sleep.
    """
    if pgmap not in machine.pgmaps or pgmap.state not in ("live",):
        return -EINVAL
    assert pgmap.ref is not None and pgmap.kill is not None and pgmap.cleanup is not None and pgmap.res is not None
    yield from sched.might_sleep("devm_memremap_pages_release")
    pgmap.kill(pgmap.ref)
    pgmap.state = "dying"
    pgmap.history.append("kill")
    machine.log("pgmap_kill", pgmap=pgmap.name, count=pgmap.ref.count)
    r = pgmap.res
    mem = machine.mem
    if pgmap.free_at_zero:
        # [6.x] memunmap_pages(): no per-page reference to drop for device-private pages; every page the
        # driver still holds keeps its pgmap reference until its last put.
        pgmap.history.append(f"in_use:{int((mem.refcount[r.start: r.end] > 0).sum())}")
    elif machine.profile.memunmap_put_many:
        # [5.17+] memunmap_pages(): percpu_ref_put_many(&pgmap->ref, pfn_len) for every type but private /
        # coherent: the pgmap references memremap_pages() took per page go at once, the pages are not put (a
        # mapped or pinned page holds a folio reference, no pgmap reference), so only get_dev_pagemap()
        # holders are waited for below.
        percpu_ref_put_many(pgmap.ref, r.npages)
        pgmap.history.append(f"put_many:{r.npages}")
    else:
        # [5.2] for_each_device_pfn: put_page(pfn_to_page(pfn)) -- vectorised: every page loses one reference;
        # those reaching zero drop one pgmap reference each (idle pages); others (pinned) keep theirs.
        mem.refcount[r.start: r.end] -= 1
        rc = mem.refcount[r.start: r.end]
        if (rc < 0).any():
            sched.report("page_ref_underflow", f"{pgmap.name}: device page refcount below zero at teardown")
        idle = int((rc == 0).sum())
        percpu_ref_put_many(pgmap.ref, idle)
        pgmap.history.append(f"put_pages:{idle}")
    yield from sched.preempt_point("devm_memremap_pages_release")
    yield from pgmap.cleanup(pgmap.ref)
    # pages are dead and unused: undo the mapping, pgmap_array[range] = NULL
    machine.pgmaps.remove(pgmap)
    mem.flags[r.start: r.end] = PG.reserved
    pgmap.state = "removed"
    pgmap.history.append("removed")
    machine.log("pgmap_removed", pgmap=pgmap.name)
    return 0


memunmap_pages = devm_memremap_pages_release


def run_memunmap_pages(machine: "Machine", pgmap: DevPagemap, gen: Gen[Any] | None = None,
                       task: sched.Task | None = None) -> Any:
    """Ours: drive a teardown (``gen``, default ``devm_memremap_pages_release``) sequentially.

    When the reference count can never drain the scheduler raises :class:`Deadlock`; the pgmap is then left
    in state ``"stuck"`` with ``stuck_count`` = the holders' count, a ``pgmap_stuck`` event is logged and
    the Deadlock is re-raised with that count in its message.
    """
    if gen is None:
        gen = devm_memremap_pages_release(machine, pgmap)
    try:
        return sched.run(gen, task)
    except Deadlock as exc:
        if pgmap.state == "draining":
            pgmap.state = "stuck"
            pgmap.stuck_count = pgmap.count
            pgmap.history.append(f"stuck:{pgmap.count}")
            machine.log("pgmap_stuck", pgmap=pgmap.name, count=pgmap.count)
            raise Deadlock(f"teardown of pgmap {pgmap.name} is stuck: {pgmap.count} reference(s) are never "
                           f"put ({exc})") from None
        raise


def pfn_to_phys(pfn: int) -> int:
    """PFN_PHYS()."""
    return pfn * PAGE_SIZE
