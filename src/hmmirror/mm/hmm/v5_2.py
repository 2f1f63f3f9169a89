"""HMM address-space mirroring as in Linux 5.2 (include/linux/hmm.h + mm/hmm.c [5.2]).

The tree is the one that contains "mm/hmm: allow to mirror vma of a file on a DAX backed filesystem".
Specification: hmm-5.2.md (path by path); substrate facts: mm-substrate.md §1-3, 5, 7, 8.

Version followed (hmm-5.2.md §14): the end-of-5.2-cycle ``mm/hmm.c`` with a mutex-based ``struct hmm``
(``dead``, ``notifiers``, ``wq``), ``hmm_vma_walk.pgmap``, ``hmm_vma_walk_pud`` with ``get_dev_pagemap``,
``hmm_range_snapshot``, ``hmm_mirror_register(mirror, mm)``, ``hmm_range_register(range, mm, start, end,
page_shift)`` and initial fault flags ``ALLOW_RETRY | REMOTE``; ``hmm.h`` of the same era (``page_shift``,
``hmm_device_entry_*``).  Stored 5.2/5.3-era copies were read beside the spec through the search tool
(WindRiver-Labs/linux-yocto-5.2 holds an earlier, 5.1-shaped copy; a 5.3-rc copy has ``ranges_lock``,
``mmgrab`` and the ``notifiers_decrement`` error path, which are *not* 5.2); where they differ the spec's
5.2 text is followed.  ``pte_to_hmm_pfn_flags`` has no ``pte_protnone`` test in 5.2 (added later).

The module reads top to bottom like the two kernel files: first the header (flag tables, structs, entry
encoding inlines, ``hmm_range_valid``/``wait_until_valid`` and the old-API inlines), then ``mm/hmm.c`` in
its order: per-mm object and notifier callbacks, mirror registration, the walk callbacks
(``hmm_vma_do_fault`` .. ``hmm_vma_walk_hugetlb_entry``), range registration, snapshot, fault, DMA map.

Model conventions (design.md):

* Functions that may sleep are generators driven with ``yield from`` (``sched.run`` for sequential use).
* C out-parameters are modelled as returned tuples where Python needs it: ``hmm_pte_need_fault`` takes the
  current ``(fault, write_fault)`` and returns the new pair; ``hmm_range_need_fault`` returns the pair.
  A ``uint64_t *pfns`` argument is a numpy view of ``range.pfns`` (writes go through to the array).
* ``struct page *`` is the pfn (an int); ``pfn_to_page``/``page_to_pfn`` are the identity.
* ``kfree`` marks the object ``freed``; the model never reuses it, so a later access can be detected.
* Out-of-bounds accesses to ``range.pfns`` (C buffer overruns, reachable when ``range.page_shift`` is a huge
  page shift while a site indexes with ``PAGE_SHIFT``, hmm-5.2.md §1.3) are reported as ``pfns_overflow``
  through :func:`sched.report` and clipped to the array.
* A NULL dereference of the kernel (``handle_mm_fault`` with ``walk->vma == NULL`` in a gap; a range used
  after unregistration) is reported as ``null_deref``; when a simulator records instead of raising, the model
  continues with ``-EFAULT``.

Observability (never changes behaviour): every API call and notifier callback is an event of
``machine.events`` (``what`` = the kernel function name, with arguments and result); every call that may
sleep is preceded by a ``may_sleep`` event with the lock context (task, held locks, atomic depth), including
``handle_mm_fault``; ``range.stats`` holds the per-call counters of the last snapshot/fault (pfns entries
written by the walk callbacks, faults issued, walks, walks ending in -EBUSY), also added to
``machine.counters`` under ``hmm.*``; :func:`pgmap_refs` reads the per-pgmap reference counts.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_LEVEL,
    PUD_SIZE,
    is_device_private_entry,
    is_migration_entry,
    is_writable_device_private_entry,
    non_swap_entry,
    pmd_bad,
    pmd_devmap,
    pmd_huge,
    pmd_none,
    pmd_pfn,
    pmd_present,
    pmd_protnone,
    pmd_trans_huge,
    pmd_write,
    pte_devmap,
    pte_none,
    pte_pfn,
    pte_present,
    pte_special,
    pte_to_swp_entry,
    pte_write,
    pud_devmap,
    pud_huge,
    pud_none,
    pud_pfn,
    pud_present,
    pud_write,
)
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT, VM_FAULT_ERROR
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.hugetlb import huge_page_order, huge_pte_lock
from hmmirror.mm.memory import handle_mm_fault, migration_entry_wait
from hmmirror.mm.memremap import get_dev_pagemap, put_dev_pagemap
from hmmirror.mm.mm_struct import is_vm_hugetlb_page
from hmmirror.mm.mmu_notifier import (
    MmuNotifier,
    MmuNotifierOps,
    MmuNotifierRange,
    __mmu_notifier_register,
    mmu_notifier_range_blockable,
    mmu_notifier_unregister_no_release,
)
from hmmirror.mm.page_alloc import PG
from hmmirror.mm.pagewalk_v5_2 import MmWalk, huge_page_shift_of, split_huge_pud, walk_page_range
from hmmirror.mm.pgtable import Ptr

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.memremap import DevPagemap
    from hmmirror.mm.mm_struct import VMA, MMStruct

EPERM, ENOENT, EAGAIN, ENOMEM, EFAULT, EBUSY, EINVAL = 1, 2, 11, 12, 14, 16, 22
U64 = (1 << 64) - 1
LIVELOCK_RESTARTS = 1000  # model: restarts at the same address before a livelock is reported
#: model: the same, when no other task ran during those restarts (sched.others_ran): nothing can end the loop
LIVELOCK_RESTARTS_ALONE = 8
range_ = range          # the builtin: ``range`` names struct hmm_range variables below, as in the C code


# =====================================================================================================
# include/linux/hmm.h [5.2]
# =====================================================================================================
class hmm_pfn_flag_e(IntEnum):
    """enum hmm_pfn_flag_e: indexes of ``range.flags[]`` (the driver's bit for each meaning).

    * HMM_PFN_VALID: pfn is valid. It has, at least, read permission.
    * HMM_PFN_WRITE: CPU page table has write permission set.
    * HMM_PFN_DEVICE_PRIVATE: private device memory (ZONE_DEVICE).
    """

    HMM_PFN_VALID = 0
    HMM_PFN_WRITE = 1
    HMM_PFN_DEVICE_PRIVATE = 2
    HMM_PFN_FLAG_MAX = 3


class hmm_pfn_value_e(IntEnum):
    """enum hmm_pfn_value_e: indexes of ``range.values[]`` (whole-entry constants).

    * HMM_PFN_ERROR: corresponding CPU page table entry points to poisoned memory.
    * HMM_PFN_NONE: corresponding CPU page table entry is pte_none().
    * HMM_PFN_SPECIAL: the result of vmf_insert_pfn() or vm_insert_page(); the pfn value is undefined.
      Drivers may alias ERROR and SPECIAL, not NONE with either.
    """

    HMM_PFN_ERROR = 0
    HMM_PFN_NONE = 1
    HMM_PFN_SPECIAL = 2
    HMM_PFN_VALUE_MAX = 3


HMM_PFN_VALID = hmm_pfn_flag_e.HMM_PFN_VALID
HMM_PFN_WRITE = hmm_pfn_flag_e.HMM_PFN_WRITE
HMM_PFN_DEVICE_PRIVATE = hmm_pfn_flag_e.HMM_PFN_DEVICE_PRIVATE
HMM_PFN_ERROR = hmm_pfn_value_e.HMM_PFN_ERROR
HMM_PFN_NONE = hmm_pfn_value_e.HMM_PFN_NONE
HMM_PFN_SPECIAL = hmm_pfn_value_e.HMM_PFN_SPECIAL

#: Suggested model encoding (hmm-5.2.md §1.4; a model choice, not kernel data).
DEFAULT_FLAGS = (1 << 0, 1 << 1, 1 << 2)
DEFAULT_VALUES = (0xFFFF_FFFF_FFFF_FFFE, 0, 0xFFFF_FFFF_FFFF_FFFC)
DEFAULT_PFN_SHIFT = 12

HMM_RANGE_DEFAULT_TIMEOUT = 1000        # ms


class hmm_update_event(IntEnum):
    """enum hmm_update_event [5.2]: only HMM_UPDATE_INVALIDATE exists."""

    HMM_UPDATE_INVALIDATE = 0


HMM_UPDATE_INVALIDATE = hmm_update_event.HMM_UPDATE_INVALIDATE


class Hmm:
    """``struct hmm`` [5.2]: one per mm (``mm.hmm``, written only under ``mm.page_table_lock``).

    ``kref`` (int), ``lock`` (mutex protecting ``ranges`` and ``notifiers``), ``ranges``, ``mirrors``
    (protected by ``mirrors_sem``), the embedded ``mmu_notifier``, ``wq`` (waiters of
    ``hmm_range_wait_until_valid``; the model's waits are predicates, ``wq_wakeups`` counts wake_up_all),
    ``notifiers`` (invalidate_range_start calls past the increment minus invalidate_range_end calls) and
    ``dead``.  ``freed`` is the model's kfree marker.
    """

    def __init__(self, mm: "MMStruct") -> None:
        self.mm: MMStruct | None = mm
        self.kref = 1
        self.lock = Lock(f"{mm.name}.hmm.lock", "mutex")
        self.ranges: list[HmmRange] = []
        self.mirrors: list[HmmMirror] = []
        self.mmu_notifier = MmuNotifier(MmuNotifierOps())     # ops set by hmm_get_or_create
        self.mirrors_sem = Lock(f"{mm.name}.hmm.mirrors_sem", "rwsem")
        self.wq = f"{mm.name}.hmm.wq"
        self.wq_wakeups = 0
        self.notifiers = 0
        self.dead = False
        self.freed = False
        self.machine: Machine = mm.machine                      # model back-pointer (observability)

    def __repr__(self) -> str:
        return (f"Hmm({self.mm.name if self.mm else None} kref={self.kref} notifiers={self.notifiers}"
                f"{' dead' if self.dead else ''}{' freed' if self.freed else ''})")


@dataclass
class HmmUpdate:
    """``struct hmm_update`` [5.2]: ``[start, end)``, ``event`` (always HMM_UPDATE_INVALIDATE), ``blockable``."""

    start: int
    end: int
    event: hmm_update_event
    blockable: bool


class HmmMirrorOps:
    """``struct hmm_mirror_ops`` [5.2]; drivers subclass it (a ``None`` hook is absent).

    * ``release(mirror)``: generator; the mm is going away (called from ``hmm_release``).
    * ``sync_cpu_device_pagetables(mirror, update) -> int``: generator; must not return before the device
      page table is updated for ``[update.start, update.end)``.  "Returns -EAGAIN if update.blockable false
      and callback need to block, 0 otherwise."
    """

    release: Any = None
    sync_cpu_device_pagetables: Any = None


@dataclass(eq=False)
class HmmMirror:
    """``struct hmm_mirror``: ``hmm`` (set by registration), ``ops``; ``list`` is ``hmm.mirrors``."""

    ops: HmmMirrorOps | None
    hmm: Hmm | None = None
    name: str = "mirror"                     # model: a label for the event log


@dataclass(eq=False)
class HmmRange:
    """``struct hmm_range`` [5.2] (hmm-5.2.md §1.3).

    ``pfns`` is a numpy uint64 array (input: per-page request flags; output: encoded entries); ``flags`` and
    ``values`` are the driver's 3-entry tables (indexed by :class:`hmm_pfn_flag_e` /
    :class:`hmm_pfn_value_e`).  ``stats`` holds the model's counters of the last snapshot/fault call.
    """

    start: int = 0
    end: int = 0
    pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    flags: list[int] = field(default_factory=lambda: list(DEFAULT_FLAGS))
    values: list[int] = field(default_factory=lambda: list(DEFAULT_VALUES))
    default_flags: int = 0
    pfn_flags_mask: int = 0
    page_shift: int = PAGE_SHIFT
    pfn_shift: int = DEFAULT_PFN_SHIFT
    valid: bool = False
    hmm: Hmm | None = None
    vma: "VMA | None" = None
    name: str = "range"                      # model: a label for the event log
    stats: Counter[str] = field(default_factory=Counter)
    machine: Any = None                      # model back-pointer, set by hmm_range_register

    def __repr__(self) -> str:
        return f"HmmRange({self.name} {self.start:#x}-{self.end:#x} valid={self.valid})"


def new_range(start: int, end: int, page_shift: int = PAGE_SHIFT, name: str = "range",
              flags: tuple[int, int, int] = DEFAULT_FLAGS, values: tuple[int, int, int] = DEFAULT_VALUES,
              pfn_shift: int = DEFAULT_PFN_SHIFT, default_flags: int = 0, pfn_flags_mask: int = 0) -> HmmRange:
    """Ours: a range with a zeroed ``pfns`` array of ``(end - start) >> page_shift`` entries, as a driver
    would allocate it, and the model's default encoding (hmm-5.2.md §1.4)."""
    n = max(0, (end - start) >> page_shift)
    return HmmRange(start, end, np.zeros(n, dtype=np.uint64), list(flags), list(values), default_flags,
                    pfn_flags_mask, page_shift, pfn_shift, name=name)


# --- entry encoding (header inlines) ---------------------------------------------------------------------
def hmm_range_page_shift(range: HmmRange) -> int:
    """hmm_range_page_shift() [5.2]."""
    return range.page_shift


def hmm_range_page_size(range: HmmRange) -> int:
    """hmm_range_page_size() [5.2]."""
    return 1 << range.page_shift


def hmm_device_entry_to_page(range: HmmRange, entry: int) -> int | None:
    """hmm_device_entry_to_page() [5.2]: the page (pfn) of a device entry, or None for NONE/ERROR/SPECIAL
    values and entries without the VALID bit."""
    if entry == range.values[HMM_PFN_NONE]:
        return None
    if entry == range.values[HMM_PFN_ERROR]:
        return None
    if entry == range.values[HMM_PFN_SPECIAL]:
        return None
    if not entry & range.flags[HMM_PFN_VALID]:
        return None
    return entry >> range.pfn_shift                     # pfn_to_page()


def hmm_device_entry_to_pfn(range: HmmRange, pfn: int) -> int:
    """hmm_device_entry_to_pfn() [5.2]: the pfn of a device entry, or -1 (``-1UL``)."""
    if pfn == range.values[HMM_PFN_NONE]:
        return -1
    if pfn == range.values[HMM_PFN_ERROR]:
        return -1
    if pfn == range.values[HMM_PFN_SPECIAL]:
        return -1
    if not pfn & range.flags[HMM_PFN_VALID]:
        return -1
    return pfn >> range.pfn_shift


def hmm_device_entry_from_page(range: HmmRange, page: int) -> int:
    """hmm_device_entry_from_page() [5.2]: ``hmm_device_entry_from_pfn(range, page_to_pfn(page))``."""
    return hmm_device_entry_from_pfn(range, page)


def hmm_device_entry_from_pfn(range: HmmRange, pfn: int) -> int:
    """hmm_device_entry_from_pfn() [5.2]: ``(pfn << pfn_shift) | flags[HMM_PFN_VALID]`` (always ORs VALID)."""
    return ((pfn << range.pfn_shift) | range.flags[HMM_PFN_VALID]) & U64


# "Below are for HMM internal use only! Not to be used by device driver!"
hmm_pfn_to_page = hmm_device_entry_to_page
hmm_pfn_to_pfn = hmm_device_entry_to_pfn
hmm_pfn_from_page = hmm_device_entry_from_page
hmm_pfn_from_pfn = hmm_device_entry_from_pfn


# --- validity queries ------------------------------------------------------------------------------------
def hmm_range_valid(range: HmmRange) -> bool:
    """hmm_range_valid() [5.2]: ``range.valid`` (a plain read, no lock).

    A driver must hold the lock its ``sync_cpu_device_pagetables`` takes when it calls this (hmm.rst).
    """
    return range.valid


def wait_event_timeout(cond: Callable[[], bool], timeout_ms: int, what: str) -> Gen[int]:
    """Ours: wait_event_timeout() on top of kernel/sched.py, which has no timed wait.

    Time model: one preemption point is one millisecond; the condition is re-tested at each point, so
    other tasks (an invalidation ending) can run meanwhile.  Returns the remaining time (>= 1) when the
    condition held, 0 on timeout, as the kernel macro.  In sequential use nobody else runs, so an unmet
    condition times out (it never deadlocks).
    """
    yield from sched.might_sleep(what)
    for remaining in range(max(int(timeout_ms), 1), 0, -1):
        if cond():
            return remaining
        yield from sched.preempt_point(what)
    return 1 if cond() else 0


def hmm_range_wait_until_valid(range: HmmRange, timeout: int) -> Gen[bool]:
    """hmm_range_wait_until_valid() [5.2]: sleep until the range is valid or its hmm dead (``timeout`` ms).

    Returns False (and clears ``valid``) at once if the hmm is gone or dead; True if already valid; else
    waits and returns the current ``valid``.
    """
    hmm = range.hmm
    if hmm is None or hmm.dead or hmm.mm is None:                 # Check if mm is dead ?
        range.valid = False
        _log(range.machine, "hmm_range_wait_until_valid", range=range.name, ret=False)
        return False
    if range.valid:
        _log(hmm.machine, "hmm_range_wait_until_valid", range=range.name, ret=True)
        return True
    _may_sleep(hmm.machine, "wait_event_timeout", wq=hmm.wq)
    yield from wait_event_timeout(lambda: range.valid or hmm.dead, timeout,
                                  f"hmm_range_wait_until_valid({range.name})")
    # Return current valid status just in case we get lucky
    _log(hmm.machine, "hmm_range_wait_until_valid", range=range.name, ret=range.valid)
    return range.valid


def hmm_mirror_mm_is_alive(mirror: HmmMirror | None) -> bool:
    """hmm_mirror_mm_is_alive() [5.2]: False if no mirror, no hmm, a dead hmm or an hmm without mm."""
    if mirror is None or mirror.hmm is None:
        return False
    hmm = mirror.hmm
    if hmm.dead:
        return False
    if hmm.mm is None:
        return False
    return True


# --- the old API, as inlines of hmm.h ---------------------------------------------------------------------
def hmm_vma_range_done(range: HmmRange) -> Gen[bool]:
    """hmm_vma_range_done() [5.2 inline]: ``ret = hmm_range_valid(range); hmm_range_unregister(range)``."""
    ret = hmm_range_valid(range)
    yield from hmm_range_unregister(range)
    return ret


def hmm_vma_fault(range: HmmRange, block: bool) -> Gen[int]:
    """hmm_vma_fault() [5.2 inline]: the old API over register + wait + fault; caller holds mmap_sem (read).

    Returns 0 with the range still registered (the caller ends with ``hmm_vma_range_done``), or an error with
    ``mmap_sem`` released for -EAGAIN/-EBUSY (hmm-5.2.md §11).  The -EAGAIN from a failed wait leaves the
    range registered (as the inline does).
    """
    assert range.vma is not None
    # With the old API the driver must set each individual entries with the requested flags (valid, write,
    # ...). So here we set the mask to keep intact the entries provided by the driver and zero out the
    # default_flags.
    range.default_flags = 0
    range.pfn_flags_mask = U64
    mm = range.vma.vm_mm
    ret = yield from hmm_range_register(range, mm, range.start, range.end, PAGE_SHIFT)
    if ret:
        return ret
    ok = yield from hmm_range_wait_until_valid(range, HMM_RANGE_DEFAULT_TIMEOUT)
    if not ok:
        # The mmap_sem was taken by driver we release it here and returns -EAGAIN which correspond to
        # mmap_sem have been drop in the old API.
        sched.up_read(mm.mmap_sem)
        return -EAGAIN
    ret = yield from hmm_range_fault(range, block)
    if ret <= 0:
        if ret == -EBUSY or not ret:
            # Same as above drop mmap_sem to match old API.
            sched.up_read(mm.mmap_sem)
            ret = -EBUSY
        elif ret == -EAGAIN:
            ret = -EBUSY
        yield from hmm_range_unregister(range)
        return ret
    return 0


# =====================================================================================================
# observability (ours): events, lock context, counters, pgmap counts -- never changes behaviour
# =====================================================================================================
def _log(machine: "Machine | None", what: str, **fields: Any) -> None:
    if machine is not None:
        machine.log(what, **fields)


def _may_sleep(machine: "Machine | None", call: str, **fields: Any) -> None:
    """Record the lock context of a call that may sleep (before it runs)."""
    if machine is None or not machine.logging:
        return
    task = sched.current()
    # the fields of sched.lock_context(task), without its Held object (one record per faulted page)
    machine.log("may_sleep", call=call, task=task.name, locks=[f"{lk.kind}:{lk.name}" for lk in task.held],
                atomic=task.atomic, **fields)


def _count(range: HmmRange, key: str, n: int = 1) -> None:
    range.stats[key] += n


def _range_machine(range: HmmRange) -> "Machine | None":
    if range.hmm is not None and not range.hmm.freed:
        return range.hmm.machine
    return range.machine


def _livelock_cause(range: HmmRange, faults0: int) -> str:
    """Ours: why the walk restarts without progress -- ``refault`` (every restart faulted the page again
    and the fault left an entry that still needs one) or ``no-fault`` (a lookup failed: pgmap, migration)."""
    return "refault" if range.stats["faults"] > faults0 else "no-fault"


def _traced(fn: Callable[..., Gen[int]]) -> Callable[..., Gen[int]]:
    """Ours: log an API call on ``range`` (first argument) with its result and the per-call counters."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(range: HmmRange, *args: Any) -> Gen[int]:
        range.stats = Counter()
        ret = yield from fn(range, *args)
        machine = _range_machine(range)
        if machine is not None:
            st = dict(range.stats)
            for k, v in st.items():
                machine.counters[f"hmm.{k}"] += v
            machine.counters[f"hmm.calls.{name}"] += 1
            if ret in (-EBUSY, -EAGAIN, -EFAULT, -EINVAL, -EPERM):
                machine.counters[f"hmm.ret.{_ERRNAMES[-ret]}"] += 1
            machine.log(name, range=range.name, start=range.start, end=range.end, args=[_jsonable(a) for a in args],
                        ret=ret, stats=st)
        return ret

    return wrapper


_ERRNAMES = {EPERM: "EPERM", ENOENT: "ENOENT", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EFAULT: "EFAULT",
             EBUSY: "EBUSY", EINVAL: "EINVAL"}


def _jsonable(a: Any) -> Any:
    if isinstance(a, (bool, int, str)) or a is None:
        return a
    return getattr(a, "name", repr(a))


def pgmap_refs(machine: "Machine") -> dict[str, int]:
    """Ours: the reference count of every registered ``dev_pagemap`` (``pgmap.ref.count``), by name."""
    return {p.name: int(p.count) for p in machine.pgmaps}


def hmm_counters(machine: "Machine") -> dict[str, int]:
    """Ours: the ``hmm.*`` counters of the machine (pages walked, faults, walks, -EBUSY walks, returns)."""
    return {k: int(v) for k, v in sorted(machine.counters.items()) if k.startswith("hmm.")}


def hmm_events(machine: "Machine") -> list[dict[str, Any]]:
    """Ours: the events of HMM calls, HMM notifier callbacks and their ``may_sleep`` lock contexts."""
    return [e for e in machine.events if e.get("what", "").startswith("hmm") or e.get("what") == "may_sleep"]


def _check_bounds(range: HmmRange, view: np.ndarray, n: int, site: str) -> int:
    """Ours: the C code would access ``n`` entries from ``view``; report an overrun and clip."""
    if n > view.shape[0]:
        sched.report("pfns_overflow", f"{site}: {n} entries from index {range.pfns.shape[0] - view.shape[0]} "
                                      f"of a {range.pfns.shape[0]}-entry pfns array ({range.name})")
        return int(view.shape[0])
    return n


# =====================================================================================================
# mm/hmm.c [5.2]
# =====================================================================================================
def mm_get_hmm(mm: "MMStruct") -> Hmm | None:
    """mm_get_hmm() [5.2]: ``READ_ONCE(mm->hmm)`` with a new reference (``kref_get_unless_zero``), or None."""
    hmm = mm.hmm
    if hmm is not None and hmm.kref > 0:                 # kref_get_unless_zero()
        hmm.kref += 1
        return hmm
    return None


def hmm_get_or_create(mm: "MMStruct") -> Gen[Hmm | None]:
    """hmm_get_or_create() [5.2]: the mm's ``struct hmm`` with one reference owned by the caller, creating and
    registering it (``__mmu_notifier_register``: mmap_sem must be held for write) on first use.

    Returns None if another hmm is installed meanwhile (even one whose kref is 0) or the notifier
    registration fails.
    """
    hmm = mm_get_hmm(mm)
    if hmm is not None:
        return hmm
    hmm = Hmm(mm)                                        # kmalloc + init (kref = 1)
    yield from sched.spin_lock(mm.page_table_lock)
    cleanup = mm.hmm is not None
    if not cleanup:
        mm.hmm = hmm
    sched.spin_unlock(mm.page_table_lock)
    if cleanup:
        hmm.freed = True                                 # kfree(hmm)
        return None
    hmm.mmu_notifier.ops = hmm_mmu_notifier_ops
    _may_sleep(mm.machine, "__mmu_notifier_register", mm=mm.name)
    if (yield from __mmu_notifier_register(hmm.mmu_notifier, mm)):
        yield from sched.spin_lock(mm.page_table_lock)
        if mm.hmm is hmm:
            mm.hmm = None
        sched.spin_unlock(mm.page_table_lock)
        hmm.freed = True                                 # kfree(hmm)
        return None
    _log(mm.machine, "hmm_create", mm=mm.name)
    return hmm


def hmm_free(hmm: Hmm) -> Gen[None]:
    """hmm_free() [5.2]: the kref release: unlink the notifier (no SRCU wait; ``mmdrop``), clear ``mm.hmm``
    under ``mm.page_table_lock``, kfree.

    When that ``mmdrop`` is the mm's last, ``__mmdrop`` (and ``hmm_mm_destroy``) would run inside it; the
    substrate's ``mmdrop`` only counts, so the model logs the fact (hmm-5.2.md §3.1).
    """
    mm = hmm.mm
    if mm is None:
        sched.report("null_deref", "hmm_free(): hmm->mm is NULL")
        hmm.freed = True
        return
    mmu_notifier_unregister_no_release(hmm.mmu_notifier, mm)
    if mm.mm_count == 0:
        _log(mm.machine, "mmdrop_last", mm=mm.name, caller="hmm_free")
    yield from sched.spin_lock(mm.page_table_lock)
    if mm.hmm is hmm:
        mm.hmm = None
    sched.spin_unlock(mm.page_table_lock)
    hmm.freed = True                                     # kfree(hmm)
    _log(hmm.machine, "hmm_free", mm=mm.name)


def hmm_put(hmm: Hmm) -> Gen[None]:
    """hmm_put() [5.2]: ``kref_put(&hmm->kref, hmm_free)``."""
    hmm.kref -= 1
    if hmm.kref < 0:
        sched.report("kref_underflow", f"hmm of {hmm.mm.name if hmm.mm else None}: kref {hmm.kref}")
    elif hmm.kref == 0:
        yield from hmm_free(hmm)


def hmm_mm_destroy(mm: "MMStruct") -> Gen[None]:
    """hmm_mm_destroy() [5.2]: from ``__mmdrop`` (the last ``mmdrop``): detach and mark the hmm dead.

    The substrate's ``__mmdrop`` does not call it yet; provided for the teardown path (hmm-5.2.md §3.1, §14.4).
    """
    yield from sched.spin_lock(mm.page_table_lock)
    hmm = mm_get_hmm(mm)
    mm.hmm = None
    if hmm is not None:
        hmm.mm = None
        hmm.dead = True
    sched.spin_unlock(mm.page_table_lock)
    _log(mm.machine, "hmm_mm_destroy", mm=mm.name, found=hmm is not None)
    if hmm is not None:
        yield from hmm_put(hmm)


def hmm_release(mn: MmuNotifier, mm: "MMStruct") -> Gen[None]:
    """hmm_release() [5.2] (``mmu_notifier_ops.release``, from ``exit_mmap``): mark the hmm dead, invalidate
    every range, wake the waiters, then detach every mirror calling its ``release`` with ``mirrors_sem``
    dropped around the call."""
    hmm = mm_get_hmm(mm)
    _log(mm.machine, "hmm_release", mm=mm.name)
    if hmm is None:
        sched.report("null_deref", f"hmm_release({mm.name}): mm->hmm has no live reference")
        return
    hmm.dead = True
    _may_sleep(hmm.machine, "mutex_lock", lock=hmm.lock.name)
    yield from sched.mutex_lock(hmm.lock)
    for range in hmm.ranges:
        range.valid = False
    _wake_up_all(hmm)
    sched.mutex_unlock(hmm.lock)

    _may_sleep(hmm.machine, "down_write", lock=hmm.mirrors_sem.name)
    yield from sched.down_write(hmm.mirrors_sem)
    while hmm.mirrors:
        mirror = hmm.mirrors[0]
        del hmm.mirrors[0]                               # list_del_init(&mirror->list)
        if mirror.ops is not None and mirror.ops.release is not None:
            # Drop mirrors_sem so callback can wait on any pending work that might itself trigger
            # mmu_notifier callback and thus would deadlock with us.
            sched.up_write(hmm.mirrors_sem)
            _may_sleep(hmm.machine, "mirror.release", mirror=mirror.name)
            _log(hmm.machine, "hmm_mirror_release", mirror=mirror.name)
            yield from mirror.ops.release(mirror)
            yield from sched.down_write(hmm.mirrors_sem)
    sched.up_write(hmm.mirrors_sem)
    yield from hmm_put(hmm)


def _wake_up_all(hmm: Hmm) -> None:
    """wake_up_all(&hmm->wq): the model's waiters re-test their predicate; counted and logged."""
    hmm.wq_wakeups += 1
    _log(hmm.machine, "hmm_wake_up_all", wq=hmm.wq)


def hmm_invalidate_range_start(mn: MmuNotifier, nrange: MmuNotifierRange) -> Gen[int]:
    """hmm_invalidate_range_start() [5.2] (``mmu_notifier_ops.invalidate_range_start``).

    Count the invalidation in ``hmm.notifiers``, invalidate every registered range overlapping
    ``[start, end]`` (``end == range.start`` counts as overlap), then call every mirror's
    ``sync_cpu_device_pagetables`` (newest first).  Non-blockable paths (hmm-5.2.md §3.4 table): (A)
    ``hmm.lock`` trylock fails -> -EAGAIN, nothing counted; (B) ``mirrors_sem`` trylock fails -> -EAGAIN
    after counting; (C) a mirror returns -EAGAIN -> stop calling mirrors, return **0**: the C loop declares
    its own ``int ret``, so its ``ret = -EAGAIN; goto out`` sets the block-local variable and the function
    returns the outer one.  Python has no block scope: ``ret`` is the function's, ``mret`` the loop's.
    """
    machine = nrange.mm.machine
    hmm = mm_get_hmm(nrange.mm)
    if hmm is None:
        sched.report("VM_BUG_ON", f"hmm_invalidate_range_start({nrange.mm.name}): no hmm")
        return 0
    ret = 0                                              # function-level result
    path = "ok"
    called: list[str] = []
    update = HmmUpdate(nrange.start, nrange.end, HMM_UPDATE_INVALIDATE, mmu_notifier_range_blockable(nrange))

    if update.blockable:
        _may_sleep(machine, "mutex_lock", lock=hmm.lock.name)
        yield from sched.mutex_lock(hmm.lock)
        locked = True
    else:
        locked = sched.mutex_trylock(hmm.lock)
    if not locked:
        ret = -EAGAIN                                    # (A) goto out
        path = "A"
    else:
        hmm.notifiers += 1
        for range in hmm.ranges:
            if update.end < range.start or update.start >= range.end:
                continue
            range.valid = False
        sched.mutex_unlock(hmm.lock)

        if update.blockable:
            _may_sleep(machine, "down_read", lock=hmm.mirrors_sem.name)
            yield from sched.down_read(hmm.mirrors_sem)
            got = True
        else:
            got = sched.down_read_trylock(hmm.mirrors_sem)
        if not got:
            ret = -EAGAIN                                # (B) goto out
            path = "B"
        else:
            stopped = False
            for mirror in list(hmm.mirrors):
                assert mirror.ops is not None
                called.append(mirror.name)
                _may_sleep(machine, "sync_cpu_device_pagetables", mirror=mirror.name,
                           blockable=update.blockable)
                mret = yield from mirror.ops.sync_cpu_device_pagetables(mirror, update)   # block-local `ret`
                if not update.blockable and mret == -EAGAIN:
                    sched.up_read(hmm.mirrors_sem)
                    mret = -EAGAIN               # (C) assigns the block-local variable, then goto out
                    path = "C"
                    stopped = True
                    break
            if not stopped:
                sched.up_read(hmm.mirrors_sem)
    # out:
    yield from hmm_put(hmm)
    _log(machine, "hmm_invalidate_range_start", mm=nrange.mm.name, start=nrange.start, end=nrange.end,
         event=nrange.event.name, blockable=update.blockable, path=path, mirrors=called,
         notifiers=hmm.notifiers, ret=ret)
    return ret


def hmm_invalidate_range_end(mn: MmuNotifier, nrange: MmuNotifierRange) -> Gen[None]:
    """hmm_invalidate_range_end() [5.2]: ``notifiers -= 1`` under ``hmm.lock`` (blocking acquisition, even
    for a non-blockable range); at zero every registered range becomes valid and the waiters are woken.
    Mirrors are not called."""
    machine = nrange.mm.machine
    hmm = mm_get_hmm(nrange.mm)
    if hmm is None:
        sched.report("VM_BUG_ON", f"hmm_invalidate_range_end({nrange.mm.name}): no hmm")
        return
    _may_sleep(machine, "mutex_lock", lock=hmm.lock.name)
    yield from sched.mutex_lock(hmm.lock)
    hmm.notifiers -= 1
    if hmm.notifiers == 0:
        for range in hmm.ranges:
            if not range.valid:
                range.valid = True
        _wake_up_all(hmm)
    sched.mutex_unlock(hmm.lock)
    notifiers = hmm.notifiers
    yield from hmm_put(hmm)
    _log(machine, "hmm_invalidate_range_end", mm=nrange.mm.name, start=nrange.start, end=nrange.end,
         event=nrange.event.name, notifiers=notifiers)


class HmmMmuNotifierOps(MmuNotifierOps):
    """``static const struct mmu_notifier_ops hmm_mmu_notifier_ops`` [5.2]."""

    def release(self, mn: MmuNotifier, mm: "MMStruct") -> Gen[None]:
        return hmm_release(mn, mm)

    def invalidate_range_start(self, mn: MmuNotifier, r: MmuNotifierRange) -> Gen[int]:
        return hmm_invalidate_range_start(mn, r)

    def invalidate_range_end(self, mn: MmuNotifier, r: MmuNotifierRange) -> Gen[None]:
        return hmm_invalidate_range_end(mn, r)


hmm_mmu_notifier_ops = HmmMmuNotifierOps()


# --- mirrors -----------------------------------------------------------------------------------------------
def hmm_mirror_register(mirror: HmmMirror | None, mm: "MMStruct | None") -> Gen[int]:
    """hmm_mirror_register() [5.2]: register a mirror against an mm.  "THE mm->mmap_sem MUST BE HELD IN
    WRITE MODE !" (not checked by the code).

    Returns 0, -EINVAL (no mm, mirror or ops), -ENOMEM (``hmm_get_or_create`` failed).
    """
    if mm is None or mirror is None or mirror.ops is None:
        return -EINVAL
    machine = mm.machine
    mirror.hmm = yield from hmm_get_or_create(mm)
    if mirror.hmm is None:
        _log(machine, "hmm_mirror_register", mm=mm.name, mirror=mirror.name, ret=-ENOMEM)
        return -ENOMEM
    _may_sleep(machine, "down_write", lock=mirror.hmm.mirrors_sem.name)
    yield from sched.down_write(mirror.hmm.mirrors_sem)
    mirror.hmm.mirrors.insert(0, mirror)                 # list_add (head)
    sched.up_write(mirror.hmm.mirrors_sem)
    _log(machine, "hmm_mirror_register", mm=mm.name, mirror=mirror.name, ret=0)
    return 0


def hmm_mirror_unregister(mirror: HmmMirror) -> Gen[None]:
    """hmm_mirror_unregister() [5.2]: unlink the mirror and drop its hmm reference."""
    hmm = mirror.hmm                                     # READ_ONCE
    if hmm is None:
        return
    machine = hmm.machine
    _may_sleep(machine, "down_write", lock=hmm.mirrors_sem.name)
    yield from sched.down_write(hmm.mirrors_sem)
    if mirror in hmm.mirrors:                            # list_del_init (a no-op once detached)
        hmm.mirrors.remove(mirror)
    mirror.hmm = None
    sched.up_write(hmm.mirrors_sem)
    yield from hmm_put(hmm)
    _log(machine, "hmm_mirror_unregister", mirror=mirror.name)


# --- the walk ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class HmmVmaWalk:
    """``struct hmm_vma_walk`` [5.2]: ``range``, ``pgmap`` (the cached dev_pagemap reference), ``last``,
    ``fault``, ``block``.  A stack variable of snapshot/fault, re-initialised field by field per VMA."""

    range: HmmRange
    pgmap: "DevPagemap | None" = None
    last: int = 0
    fault: bool = False
    block: bool | None = None


def hmm_vma_do_fault(walk: MmWalk, addr: int, write_fault: bool, pfn: np.ndarray) -> Gen[int]:
    """hmm_vma_do_fault() [5.2]: ``handle_mm_fault`` on behalf of the device.

    Flags: ``ALLOW_RETRY | REMOTE``, ``ALLOW_RETRY`` again when not ``block`` (the same bit: set in both
    modes), ``WRITE`` for a write fault.  Returns -EAGAIN on ``VM_FAULT_RETRY`` (mmap_sem was released by the
    fault path), -EFAULT on ``VM_FAULT_ERROR`` (``*pfn`` = ERROR), else -EBUSY (the walk restarts).
    ``pfn`` is a view whose element 0 is ``*pfn``.
    """
    flags = FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.REMOTE
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    vma = walk.vma

    flags |= FAULT_FLAG.NONE if hmm_vma_walk.block else FAULT_FLAG.ALLOW_RETRY
    flags |= FAULT_FLAG.WRITE if write_fault else FAULT_FLAG.NONE
    _count(range, "faults")
    machine = walk.mm.machine if walk.mm is not None else None
    _may_sleep(machine, "handle_mm_fault", addr=addr, flags=int(flags), write=write_fault,
               vma=None if vma is None else vma.vm_start)
    if vma is None:
        # handle_mm_fault(NULL, ...) dereferences vma->vm_mm: an oops in 5.2 (hmm-5.2.md §13, gap row).
        sched.report("null_deref", f"hmm_vma_do_fault({addr:#x}): handle_mm_fault with walk->vma == NULL")
        return -EFAULT
    r = yield from handle_mm_fault(vma, addr, flags)
    if r & VM_FAULT.RETRY:
        return -EAGAIN
    if r & VM_FAULT_ERROR:
        pfn[0] = range.values[HMM_PFN_ERROR]
        return -EFAULT
    return -EBUSY


def hmm_pfns_bad(addr: int, end: int, walk: MmWalk) -> int:
    """hmm_pfns_bad() [5.2]: ``values[ERROR]`` for every page of ``[addr, end)`` (``PAGE_SHIFT`` indexing);
    returns 0."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    i = (addr - range.start) >> PAGE_SHIFT
    pfns = range.pfns[i:]
    n = _check_bounds(range, pfns, (end - addr) >> PAGE_SHIFT, "hmm_pfns_bad")
    pfns[:n] = range.values[HMM_PFN_ERROR]               # for (; addr < end; ...) pfns[i] = ERROR
    _count(range, "pages_walked", n)
    return 0


def hmm_vma_walk_hole_(addr: int, end: int, fault: bool, write_fault: bool, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_hole_() [5.2]: write NONE over ``[addr, end)`` and, if a fault is needed, fault every
    page in ascending order with the same ``write_fault`` (step and index use ``range.page_shift``).

    ``last`` is set to ``addr`` and not advanced.  Returns 0 (no fault needed), -EBUSY (all faults done: the
    walk restarts at ``last`` and reads the NONE entries as requests), or the first -EAGAIN/-EFAULT.
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    pfns = range.pfns

    hmm_vma_walk.last = addr
    page_size = hmm_range_page_size(range)
    i = (addr - range.start) >> range.page_shift
    if not (fault or write_fault):
        # No fault: the loop only writes NONE and cannot be preempted, so one slice assignment is the same.
        n = -(-(end - addr) // page_size) if end > addr else 0
        view = pfns[i:]
        n = _check_bounds(range, view, n, "hmm_vma_walk_hole_")
        view[:n] = range.values[HMM_PFN_NONE]
        _count(range, "pages_walked", n)
        return 0
    while addr < end:
        if i >= pfns.shape[0]:
            _check_bounds(range, pfns[i:], 1, "hmm_vma_walk_hole_")
            break
        pfns[i] = range.values[HMM_PFN_NONE]
        _count(range, "pages_walked")
        ret = yield from hmm_vma_do_fault(walk, addr, write_fault, pfns[i:i + 1])
        if ret != -EBUSY:
            return ret
        addr += page_size
        i += 1
    return -EBUSY


def hmm_pte_need_fault(hmm_vma_walk: HmmVmaWalk, pfns: int, cpu_flags: int, fault: bool,
                       write_fault: bool) -> tuple[bool, bool]:
    """hmm_pte_need_fault() [5.2]: must this page be faulted (and for write)?

    ``(fault, write_fault)`` are the C in-out parameters: passed in, returned (possibly unchanged: this
    function never clears them).  The request is ``(pfns & pfn_flags_mask) | default_flags``.  Truth table
    (hmm-5.2.md §4): snapshot mode or no VALID request -> unchanged; CPU device-private: fault only if
    requested (DEVICE_PRIVATE), ``write_fault`` = request has WRITE; else ``fault = not cpu VALID``
    (an assignment) and a WRITE request on a non-writable entry sets both.
    """
    range = hmm_vma_walk.range

    if not hmm_vma_walk.fault:
        return fault, write_fault

    # So we not only consider the individual per page request we also consider the default flags requested
    # for the range.
    pfns = (pfns & range.pfn_flags_mask) | range.default_flags

    # We aren't ask to do anything ...
    if not pfns & range.flags[HMM_PFN_VALID]:
        return fault, write_fault
    # If this is device memory than only fault if explicitly requested
    if cpu_flags & range.flags[HMM_PFN_DEVICE_PRIVATE]:
        # Do we fault on device memory ?
        if pfns & range.flags[HMM_PFN_DEVICE_PRIVATE]:
            write_fault = bool(pfns & range.flags[HMM_PFN_WRITE])
            fault = True
        return fault, write_fault

    # If CPU page table is not valid then we need to fault
    fault = not cpu_flags & range.flags[HMM_PFN_VALID]
    # Need to write fault ?
    if (pfns & range.flags[HMM_PFN_WRITE]) and not (cpu_flags & range.flags[HMM_PFN_WRITE]):
        write_fault = True
        fault = True
    return fault, write_fault


def hmm_range_need_fault(hmm_vma_walk: HmmVmaWalk, pfns: np.ndarray, npages: int,
                         cpu_flags: int) -> tuple[bool, bool]:
    """hmm_range_need_fault() [5.2]: ``hmm_pte_need_fault`` over ``npages`` requests sharing one ``cpu_flags``;
    stops early only on ``write_fault``.  Returns the C out-parameters ``(fault, write_fault)``."""
    if not hmm_vma_walk.fault:
        return False, False

    fault = write_fault = False
    npages = _check_bounds(hmm_vma_walk.range, pfns, npages, "hmm_range_need_fault")
    for req in pfns[:npages].tolist():                   # one entry at a time, in order
        fault, write_fault = hmm_pte_need_fault(hmm_vma_walk, req, cpu_flags, fault, write_fault)
        if write_fault:
            break
    return fault, write_fault


def hmm_vma_walk_hole(addr: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_hole() [5.2] (``mm_walk.pte_hole``): requests of ``[addr, end)`` (``PAGE_SHIFT``
    indexing) against cpu flags 0, then ``hmm_vma_walk_hole_``."""
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range

    i = (addr - range.start) >> PAGE_SHIFT
    npages = (end - addr) >> PAGE_SHIFT
    pfns = range.pfns[i:]
    fault, write_fault = hmm_range_need_fault(hmm_vma_walk, pfns, npages, 0)
    return (yield from hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))


def pmd_to_hmm_pfn_flags(range: HmmRange, pmd: int) -> int:
    """pmd_to_hmm_pfn_flags() [5.2]: 0 for a protnone PMD, else VALID (| WRITE)."""
    if pmd_protnone(pmd):
        return 0
    return range.flags[HMM_PFN_VALID] | range.flags[HMM_PFN_WRITE] if pmd_write(pmd) \
        else range.flags[HMM_PFN_VALID]


def hmm_vma_handle_pmd(walk: MmWalk, addr: int, end: int, pfns: np.ndarray, pmd: int) -> Gen[int]:
    """hmm_vma_handle_pmd() [5.2]: a trans-huge or devmap PMD.

    Hole path (``hmm_vma_walk_hole_``) if protnone or a fault is needed; else ``from_pfn(pmd_pfn + index) |
    cpu`` per page, taking ``get_dev_pagemap`` per pfn for devmap PMDs (cached in ``hmm_vma_walk.pgmap``,
    put after the loop); -EBUSY if a lookup fails.  (The body is under CONFIG_TRANSPARENT_HUGEPAGE, assumed.)
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    assert walk.mm is not None
    machine = walk.mm.machine

    npages = (end - addr) >> PAGE_SHIFT
    cpu_flags = pmd_to_hmm_pfn_flags(range, pmd)
    fault, write_fault = hmm_range_need_fault(hmm_vma_walk, pfns, npages, cpu_flags)

    if pmd_protnone(pmd) or fault or write_fault:
        return (yield from hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))

    npages = _check_bounds(range, pfns, npages, "hmm_vma_handle_pmd")
    pfn = pmd_pfn(pmd) + x86.PTE_LEVEL.index(addr)       # pte_index(addr)
    devmap = pmd_devmap(pmd)
    for i in range_(npages):
        if devmap:
            hmm_vma_walk.pgmap = get_dev_pagemap(machine, pfn, hmm_vma_walk.pgmap)
            if hmm_vma_walk.pgmap is None:
                return -EBUSY
        pfns[i] = hmm_device_entry_from_pfn(range, pfn) | cpu_flags
        _count(range, "pages_walked")
        pfn += 1
    if hmm_vma_walk.pgmap is not None:
        put_dev_pagemap(hmm_vma_walk.pgmap)
        hmm_vma_walk.pgmap = None
    hmm_vma_walk.last = end
    return 0


def pte_to_hmm_pfn_flags(range: HmmRange, pte: int) -> int:
    """pte_to_hmm_pfn_flags() [5.2]: 0 for a none or non-present PTE, else VALID (| WRITE).

    [5.2] has no ``pte_protnone`` test: a PROT_NONE PTE (present on x86) reports VALID.
    """
    if pte_none(pte) or not pte_present(pte):
        return 0
    return range.flags[HMM_PFN_VALID] | range.flags[HMM_PFN_WRITE] if pte_write(pte) \
        else range.flags[HMM_PFN_VALID]


def hmm_vma_handle_pte(walk: MmWalk, addr: int, end: int, pmdp: Ptr, ptep: Ptr, pfn: np.ndarray) -> Gen[int]:
    """hmm_vma_handle_pte() [5.2]: one PTE (``end`` = end of the PMD chunk); ``pfn[0]`` is ``*pfn``.

    Writes NONE first, then: none -> hole path if needed; real swap -> 0; device-private -> entry with
    DEVICE_PRIVATE (hole path only if requested); migration -> wait + -EBUSY if a fault is needed, else 0;
    other non-swap (hwpoison) -> ERROR, -EFAULT; present -> hole path if needed, else devmap (tested
    before special): ``get_dev_pagemap`` (-EBUSY on failure), special: SPECIAL, -EFAULT, else the entry.
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    vma = walk.vma
    assert walk.mm is not None
    machine = walk.mm.machine
    pte = machine.pool.get(ptep)
    orig_pfn = int(pfn[0])

    pfn[0] = range.values[HMM_PFN_NONE]
    _count(range, "pages_walked")
    fault = write_fault = False

    goto_fault = False
    if pte_none(pte):
        fault, write_fault = hmm_pte_need_fault(hmm_vma_walk, orig_pfn, 0, fault, write_fault)
        if fault or write_fault:
            goto_fault = True
        else:
            return 0
    elif not pte_present(pte):
        entry = pte_to_swp_entry(pte)

        if not non_swap_entry(entry):
            if fault or write_fault:
                goto_fault = True
            else:
                return 0
        # This is a special swap entry, ignore migration, use device and report anything else as error.
        elif is_device_private_entry(entry):
            cpu_flags = range.flags[HMM_PFN_VALID] | range.flags[HMM_PFN_DEVICE_PRIVATE]
            cpu_flags |= range.flags[HMM_PFN_WRITE] if is_writable_device_private_entry(entry) else 0
            fault, write_fault = hmm_pte_need_fault(hmm_vma_walk, orig_pfn, cpu_flags, fault, write_fault)
            if fault or write_fault:
                goto_fault = True
            else:
                pfn[0] = hmm_device_entry_from_pfn(range, entry.offset) | cpu_flags   # swp_offset(entry)
                return 0
        elif is_migration_entry(entry):
            if fault or write_fault:
                _ref_pte_unmap(machine, addr, "hmm_vma_handle_pte")
                hmm_vma_walk.last = addr
                assert vma is not None
                _may_sleep(machine, "migration_entry_wait", addr=addr)
                yield from migration_entry_wait(vma.vm_mm, pmdp, addr)
                return -EBUSY
            return 0
        else:
            # Report error for everything else
            pfn[0] = range.values[HMM_PFN_ERROR]
            return -EFAULT
    else:
        cpu_flags = pte_to_hmm_pfn_flags(range, pte)
        fault, write_fault = hmm_pte_need_fault(hmm_vma_walk, orig_pfn, cpu_flags, fault, write_fault)
        if fault or write_fault:
            goto_fault = True
        else:
            if pte_devmap(pte):
                hmm_vma_walk.pgmap = get_dev_pagemap(machine, pte_pfn(pte), hmm_vma_walk.pgmap)
                if hmm_vma_walk.pgmap is None:
                    return -EBUSY
            elif pte_special(pte):                       # IS_ENABLED(CONFIG_ARCH_HAS_PTE_SPECIAL)
                pfn[0] = range.values[HMM_PFN_SPECIAL]
                return -EFAULT
            pfn[0] = hmm_device_entry_from_pfn(range, pte_pfn(pte)) | cpu_flags
            return 0

    assert goto_fault
    # fault:
    if hmm_vma_walk.pgmap is not None:
        put_dev_pagemap(hmm_vma_walk.pgmap)
        hmm_vma_walk.pgmap = None
    _ref_pte_unmap(machine, addr, "hmm_vma_handle_pte")
    # Fault any virtual address we were asked to fault
    return (yield from hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))


def _pte_offset_map(machine: "Machine", mm: "MMStruct", pmdp: Ptr, addr: int, caller: str) -> Ptr:
    """pte_offset_map(): no memory effect on x86-64 without HIGHPTE; recorded as an event (hmm-5.2.md §0).
    The reference walk also marks the mapping on the running task (``sched.pte_map_get``)."""
    _log(machine, "pte_offset_map", mm=mm.name, addr=addr, caller=caller)
    return mm.pt.pte_offset_map(pmdp, addr)


def _pte_unmap(machine: "Machine", addr: int, caller: str) -> None:
    """pte_unmap(): no memory effect; recorded as an event so the map/unmap balance can be checked."""
    _log(machine, "pte_unmap", addr=addr, caller=caller)


def _ref_pte_unmap(machine: "Machine", addr: int, caller: str) -> None:
    """pte_unmap() of the reference walk: the event and the task's mapping (the fast walk logs the events
    of whole tables itself)."""
    _pte_unmap(machine, addr, caller)
    sched.pte_map_put(f"mm.hmm.v5_2.{caller}")


def hmm_vma_walk_pmd(pmdp: Ptr, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_pmd() [5.2] (``mm_walk.pmd_entry``): called without page-table locks.

    none -> ``hmm_vma_walk_hole``; huge in a hugetlb VMA -> ERROR; migration PMD -> wait + -EBUSY if any
    page requests VALID, else 0 (entries not written); other non-present or ``pmd_bad`` -> ERROR for the
    chunk; trans-huge/devmap -> ``hmm_vma_handle_pmd`` (re-read with ``pmd_read_atomic``, no PMD lock);
    else every PTE via ``hmm_vma_handle_pte``, putting the cached pgmap after the table.
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    vma = walk.vma
    assert walk.mm is not None
    machine = walk.mm.machine
    pool = machine.pool
    pfns = range.pfns
    addr = start

    while True:                                          # again:
        pmd = pool.get(pmdp)                             # READ_ONCE(*pmdp)
        if pmd_none(pmd):
            return (yield from hmm_vma_walk_hole(start, end, walk))

        assert range.vma is not None
        if pmd_huge(pmd) and (range.vma.vm_flags & VM.HUGETLB):
            return hmm_pfns_bad(start, end, walk)

        if _is_pmd_migration_entry(pmd):                # thp_migration_supported()
            i = (addr - range.start) >> PAGE_SHIFT
            npages = (end - addr) >> PAGE_SHIFT
            fault, write_fault = hmm_range_need_fault(hmm_vma_walk, pfns[i:], npages, 0)
            if fault or write_fault:
                hmm_vma_walk.last = addr
                assert vma is not None
                _may_sleep(machine, "pmd_migration_entry_wait", addr=addr)
                yield from migration_entry_wait(vma.vm_mm, pmdp, addr, huge=True)
                return -EBUSY
            return 0
        elif not pmd_present(pmd):
            return hmm_pfns_bad(start, end, walk)

        if pmd_devmap(pmd) or pmd_trans_huge(pmd):
            # No need to take pmd_lock here, even if some other threads is splitting the huge pmd we will
            # get that event through mmu_notifier callback.  So just read pmd value and check again its a
            # transparent huge or device mapping one and compute corresponding pfn values.
            pmd = pool.get(pmdp)                         # pmd_read_atomic(pmdp); barrier()
            if not pmd_devmap(pmd) and not pmd_trans_huge(pmd):
                continue                                 # goto again
            i = (addr - range.start) >> PAGE_SHIFT
            return (yield from hmm_vma_handle_pmd(walk, addr, end, pfns[i:], pmd))
        break

    # We have handled all the valid case above ie either none, migration, huge or transparent huge. At this
    # point either it is a valid pmd entry pointing to pte directory or it is a bad pmd that will not recover.
    if pmd_bad(pmd):
        return hmm_pfns_bad(start, end, walk)

    ptep = _pte_offset_map(machine, walk.mm, pmdp, addr, "hmm_vma_walk_pmd")
    sched.pte_map_get("mm.hmm.v5_2.hmm_vma_walk_pmd")
    i = (addr - range.start) >> PAGE_SHIFT
    while addr < end:
        r = yield from hmm_vma_handle_pte(walk, addr, end, pmdp, ptep, pfns[i:])
        if r:
            # hmm_vma_handle_pte() did unmap pte directory
            hmm_vma_walk.last = addr
            return r
        addr += PAGE_SIZE
        ptep = (ptep[0], ptep[1] + 1)
        i += 1
    if hmm_vma_walk.pgmap is not None:
        # We do put_dev_pagemap() here and not in hmm_vma_handle_pte() so that we can leverage
        # get_dev_pagemap() optimization which will not re-take a reference on a pgmap if we already have one.
        put_dev_pagemap(hmm_vma_walk.pgmap)
        hmm_vma_walk.pgmap = None
    _ref_pte_unmap(machine, addr - PAGE_SIZE, "hmm_vma_walk_pmd")       # pte_unmap(ptep - 1)

    hmm_vma_walk.last = addr
    return 0


def _is_pmd_migration_entry(pmd: int) -> bool:
    """is_pmd_migration_entry(): a non-present PMD holding a migration swap entry."""
    return not pmd_present(pmd) and is_migration_entry(pte_to_swp_entry(pmd))


def pud_to_hmm_pfn_flags(range: HmmRange, pud: int) -> int:
    """pud_to_hmm_pfn_flags() [5.2]: 0 for a non-present PUD, else VALID (| WRITE)."""
    if not pud_present(pud):
        return 0
    return range.flags[HMM_PFN_VALID] | range.flags[HMM_PFN_WRITE] if pud_write(pud) \
        else range.flags[HMM_PFN_VALID]


def hmm_vma_walk_pud(pudp: Ptr, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_pud() [5.2] (``mm_walk.pud_entry``): entered with the PUD lock (``mm.page_table_lock``)
    held, for trans-huge or devmap PUDs only.

    A present devmap PUD leaf: hole path if a fault is needed (with the PUD lock still held, so
    ``handle_mm_fault`` sleeps in atomic context), else ``from_pfn(pud_pfn + offset) | cpu`` per page with
    ``get_dev_pagemap`` per pfn (-EBUSY on failure).  A trans-huge non-devmap PUD takes the split path:
    ``split_huge_pud`` (which emits a notifier and takes the PUD lock the walker holds) then the PMD loop.
    """
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    assert walk.mm is not None
    machine = walk.mm.machine
    pool = machine.pool
    addr = start

    while True:                                          # again:
        pud = pool.get(pudp)                             # READ_ONCE(*pudp)
        if pud_none(pud):
            return (yield from hmm_vma_walk_hole(start, end, walk))

        if pud_huge(pud) and pud_devmap(pud):
            if not pud_present(pud):
                return (yield from hmm_vma_walk_hole(start, end, walk))

            i = (addr - range.start) >> PAGE_SHIFT
            npages = (end - addr) >> PAGE_SHIFT
            pfns = range.pfns[i:]

            cpu_flags = pud_to_hmm_pfn_flags(range, pud)
            fault, write_fault = hmm_range_need_fault(hmm_vma_walk, pfns, npages, cpu_flags)
            if fault or write_fault:
                return (yield from hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))

            npages = _check_bounds(range, pfns, npages, "hmm_vma_walk_pud")
            pfn = pud_pfn(pud) + ((addr & (PUD_SIZE - 1)) >> PAGE_SHIFT)    # (addr & ~PUD_MASK)
            for i in range_(npages):
                hmm_vma_walk.pgmap = get_dev_pagemap(machine, pfn, hmm_vma_walk.pgmap)
                if hmm_vma_walk.pgmap is None:
                    return -EBUSY
                pfns[i] = hmm_device_entry_from_pfn(range, pfn) | cpu_flags
                _count(range, "pages_walked")
                pfn += 1
            if hmm_vma_walk.pgmap is not None:
                put_dev_pagemap(hmm_vma_walk.pgmap)
                hmm_vma_walk.pgmap = None
            hmm_vma_walk.last = end
            return 0

        _may_sleep(machine, "split_huge_pud", addr=addr)
        yield from split_huge_pud(walk.vma, pudp, addr)
        if pud_none(pool.get(pudp)):
            continue                                     # goto again
        break

    pmdp = walk.mm.pt.pmd_offset(pudp, addr)
    while True:
        nxt = PMD_LEVEL.addr_end(addr, end)              # pmd_addr_end()
        ret = yield from hmm_vma_walk_pmd(pmdp, addr, nxt, walk)
        if ret:
            return ret
        addr = nxt
        if addr == end:
            break
        pmdp = (pmdp[0], pmdp[1] + 1)
    return 0


def hmm_vma_walk_hugetlb_entry(pte: Ptr, hmask: int, start: int, end: int, walk: MmWalk) -> Gen[int]:
    """hmm_vma_walk_hugetlb_entry() [5.2] (``mm_walk.hugetlb_entry``): one huge page (none, present or
    swap-type entry alike).

    With a huge ``range.page_shift`` one ``pfns`` entry per huge page (-EINVAL if ``start`` is not aligned or
    the page is not whole in ``[start, end)``); with ``PAGE_SHIFT`` one per 4 KiB.  Only the first entry is
    read as the request.  Under the huge-PTE lock: hole path (after unlocking) if a fault is needed, else
    ``from_pfn(pte_pfn + k) | cpu`` (VALID always set by ``from_pfn``, even for a none entry).
    """
    addr = start
    hmm_vma_walk: HmmVmaWalk = walk.private
    range = hmm_vma_walk.range
    vma = walk.vma
    assert vma is not None and walk.mm is not None
    machine = walk.mm.machine
    ret = 0

    size = 1 << huge_page_shift_of(vma)                  # hstate_vma(vma)
    mask = size - 1
    if range.page_shift != PAGE_SHIFT:
        # Make sure we are looking at full page.
        if start & mask:
            return -EINVAL
        if end < start + size:
            return -EINVAL
        pfn_inc = size >> PAGE_SHIFT
    else:
        pfn_inc = 1
        size = PAGE_SIZE

    ptl = yield from huge_pte_lock(walk.mm, huge_page_order(vma), pte)   # huge_pte_lock(hstate_vma(vma), mm, pte)
    entry = machine.pool.get(pte)                        # huge_ptep_get(pte)

    i = (start - range.start) >> range.page_shift
    if i >= range.pfns.shape[0]:
        _check_bounds(range, range.pfns[i:], 1, "hmm_vma_walk_hugetlb_entry")
        sched.spin_unlock(ptl)
        return 0
    orig_pfn = int(range.pfns[i])
    range.pfns[i] = range.values[HMM_PFN_NONE]
    cpu_flags = pte_to_hmm_pfn_flags(range, entry)
    fault = write_fault = False
    fault, write_fault = hmm_pte_need_fault(hmm_vma_walk, orig_pfn, cpu_flags, fault, write_fault)
    if fault or write_fault:
        ret = -ENOENT
    else:
        pfn = pte_pfn(entry) + ((start & mask) >> range.page_shift)
        n = _check_bounds(range, range.pfns[i:], -(-(end - addr) // size), "hmm_vma_walk_hugetlb_entry")
        for k in range_(n):
            range.pfns[i + k] = hmm_device_entry_from_pfn(range, pfn) | cpu_flags
            _count(range, "pages_walked")
            pfn += pfn_inc
        addr += n * size
        hmm_vma_walk.last = end

    # unlock:
    sched.spin_unlock(ptl)

    if ret == -ENOENT:
        return (yield from hmm_vma_walk_hole_(addr, end, fault, write_fault, walk))

    return ret


def hmm_pfns_clear(range: HmmRange, pfns: np.ndarray, addr: int, end: int) -> None:
    """hmm_pfns_clear() [5.2]: ``values[NONE]`` for ``(end - addr) >> PAGE_SHIFT`` entries from ``pfns``."""
    n = _check_bounds(range, pfns, (end - addr) >> PAGE_SHIFT, "hmm_pfns_clear") if end > addr else 0
    pfns[:n] = range.values[HMM_PFN_NONE]


# --- ranges ------------------------------------------------------------------------------------------------
def hmm_range_register(range: HmmRange, mm: "MMStruct", start: int, end: int, page_shift: int) -> Gen[int]:
    """hmm_range_register() [5.2]: start tracking CPU page-table changes over ``[start, end)``.

    Returns 0 (the range holds one hmm reference; valid iff no invalidation is in progress), -EINVAL
    (``start``/``end`` not aligned to ``page_shift``, or ``start >= end``), -EFAULT (no hmm, or its mm is gone
    or dead).  May sleep (``hmm.lock``).
    """
    mask = (1 << page_shift) - 1
    range.machine = mm.machine

    range.valid = False
    range.hmm = None

    if (start & mask) or (end & mask):
        return _ret_register(range, mm, -EINVAL)
    if start >= end:
        return _ret_register(range, mm, -EINVAL)

    range.page_shift = page_shift
    range.start = start
    range.end = end

    range.hmm = yield from hmm_get_or_create(mm)
    if range.hmm is None:
        return _ret_register(range, mm, -EFAULT)

    # Check if hmm_mm_destroy() was call.
    if range.hmm.mm is None or range.hmm.dead:
        yield from hmm_put(range.hmm)
        return _ret_register(range, mm, -EFAULT)

    # Initialize range to track CPU page table updates.
    _may_sleep(mm.machine, "mutex_lock", lock=range.hmm.lock.name)
    yield from sched.mutex_lock(range.hmm.lock)

    range.hmm.ranges.insert(0, range)                    # list_add_rcu (head)

    # If there are any concurrent notifiers we have to wait for them for the range to be valid (see
    # hmm_range_wait_until_valid()).
    if not range.hmm.notifiers:
        range.valid = True
    sched.mutex_unlock(range.hmm.lock)

    return _ret_register(range, mm, 0)


def _ret_register(range: HmmRange, mm: "MMStruct", ret: int) -> int:
    _log(mm.machine, "hmm_range_register", mm=mm.name, range=range.name, start=range.start, end=range.end,
         page_shift=range.page_shift, valid=range.valid, ret=ret)
    return ret


def hmm_range_unregister(range: HmmRange) -> Gen[None]:
    """hmm_range_unregister() [5.2]: stop tracking; drops the range's hmm reference, ``valid = False``.

    A no-op for a range that is not registered (no hmm, or ``end <= start``).
    """
    # Sanity check this really should not happen.
    if range.hmm is None or range.end <= range.start:
        return

    hmm = range.hmm
    machine = hmm.machine
    _may_sleep(machine, "mutex_lock", lock=hmm.lock.name)
    yield from sched.mutex_lock(hmm.lock)
    if range in hmm.ranges:
        hmm.ranges.remove(range)                         # list_del_rcu
    sched.mutex_unlock(hmm.lock)

    # Drop reference taken by hmm_range_register()
    range.valid = False
    yield from hmm_put(hmm)
    range.hmm = None
    _log(machine, "hmm_range_unregister", range=range.name)


def _new_mm_walk(vma: "VMA", hmm_vma_walk: HmmVmaWalk) -> MmWalk:
    """The field-by-field ``mm_walk`` set-up of snapshot and fault (kept identical in both, as in 5.2)."""
    mm_walk = MmWalk()
    mm_walk.vma = vma
    mm_walk.mm = vma.vm_mm
    mm_walk.pte_entry = None
    mm_walk.test_walk = None
    mm_walk.hugetlb_entry = None
    mm_walk.pud_entry = hmm_vma_walk_pud
    mm_walk.pmd_entry = hmm_vma_walk_pmd
    mm_walk.pte_hole = hmm_vma_walk_hole
    mm_walk.hugetlb_entry = hmm_vma_walk_hugetlb_entry
    mm_walk.private = hmm_vma_walk
    return mm_walk


@_traced
def hmm_range_snapshot(range: HmmRange) -> Gen[int]:
    """hmm_range_snapshot() [5.2]: snapshot the CPU page table for a range (no faults).

    Return: the number of valid pages in ``range.pfns`` from ``range.start`` (``(last - start) >>
    PAGE_SHIFT`` of the final VMA iteration), or -EFAULT (hmm gone/dead, no VMA, VM_IO/PFNMAP/MIXEDMAP),
    -EINVAL (page_shift mismatch), -EPERM (VMA without VM_READ: every entry set NONE), -EAGAIN (range not
    valid at an iteration start; mmap_sem untouched).  Walk results are not used: after a walk stopped, the
    loop continues with the next VMA and the entries past the stop keep their old values.

    Locking: caller holds ``mmap_sem`` for read (documented, not checked by hmm.c).
    """
    device_vma = VM.IO | VM.PFNMAP | VM.MIXEDMAP
    start = range.start
    hmm = range.hmm
    if hmm is None or hmm.freed:
        sched.report("null_deref", f"hmm_range_snapshot({range.name}): range->hmm is NULL")
        return -EFAULT
    hmm_vma_walk = HmmVmaWalk(range)

    # Check if hmm_mm_destroy() was call.
    if hmm.mm is None or hmm.dead:
        return -EFAULT

    while True:
        # If range is no longer valid force retry.
        if not range.valid:
            return -EAGAIN

        vma = hmm.mm.find_vma(start)
        if vma is None or (vma.vm_flags & device_vma):
            return -EFAULT

        if is_vm_hugetlb_page(vma):
            if huge_page_shift_of(vma) != range.page_shift and range.page_shift != PAGE_SHIFT:
                return -EINVAL
        else:
            if range.page_shift != PAGE_SHIFT:
                return -EINVAL

        if not vma.vm_flags & VM.READ:
            # If vma do not allow read access, then assume that it does not allow write access, either.
            # HMM does not support architecture that allow write without read.
            hmm_pfns_clear(range, range.pfns, range.start, range.end)
            return -EPERM

        range.vma = vma
        hmm_vma_walk.pgmap = None
        hmm_vma_walk.last = start
        hmm_vma_walk.fault = False
        hmm_vma_walk.range = range
        end = min(range.end, vma.vm_end)
        mm_walk = _new_mm_walk(vma, hmm_vma_walk)

        _count(range, "walks")
        ret = yield from walk_page_range(start, end, mm_walk)
        if ret == -EBUSY:
            _count(range, "walk_ebusy")
        start = end
        if not start < range.end:
            break

    return (hmm_vma_walk.last - range.start) >> PAGE_SHIFT


@_traced
def hmm_range_fault(range: HmmRange, block: bool) -> Gen[int]:
    """hmm_range_fault() [5.2]: snapshot, faulting what the requests need (``block``: may the fault sleep
    without dropping mmap_sem).

    Return (hmm-5.2.md §9.2): the count ``(last - start) >> PAGE_SHIFT`` (mmap_sem held); -EFAULT (hmm
    gone/dead, no VMA, device VMA, walk -EFAULT: fault error, special PTE, other non-swap entry); -EINVAL
    (page_shift mismatch, hugetlb alignment); -EPERM (no VM_READ, every entry NONE); -EAGAIN with mmap_sem
    **released** (range invalid at an iteration start: ``up_read`` here; or ``VM_FAULT_RETRY``: released by
    the fault path); -EBUSY (walk -EBUSY while the range is no longer valid).  After a -EBUSY walk the walk
    restarts at ``last`` while the range is valid (loop invariant: ``pfns`` below ``last`` hold outputs, the
    rest the requests, NONE where the hole path faulted); on a non-zero result ``pfns[last..end)`` are set NONE.

    Locking: caller holds ``mmap_sem`` for read.
    """
    device_vma = VM.IO | VM.PFNMAP | VM.MIXEDMAP
    start = range.start
    hmm = range.hmm
    if hmm is None or hmm.freed:
        sched.report("null_deref", f"hmm_range_fault({range.name}): range->hmm is NULL")
        return -EFAULT
    hmm_vma_walk = HmmVmaWalk(range)

    # Check if hmm_mm_destroy() was call.
    if hmm.mm is None or hmm.dead:
        return -EFAULT

    while True:
        # If range is no longer valid force retry.
        if not range.valid:
            sched.up_read(hmm.mm.mmap_sem)
            return -EAGAIN

        vma = hmm.mm.find_vma(start)
        if vma is None or (vma.vm_flags & device_vma):
            return -EFAULT

        if is_vm_hugetlb_page(vma):
            if huge_page_shift_of(vma) != range.page_shift and range.page_shift != PAGE_SHIFT:
                return -EINVAL
        else:
            if range.page_shift != PAGE_SHIFT:
                return -EINVAL

        if not vma.vm_flags & VM.READ:
            # If vma do not allow read access, then assume that it does not allow write access, either.
            # HMM does not support architecture that allow write without read.
            hmm_pfns_clear(range, range.pfns, range.start, range.end)
            return -EPERM

        range.vma = vma
        hmm_vma_walk.pgmap = None
        hmm_vma_walk.last = start
        hmm_vma_walk.fault = True
        hmm_vma_walk.block = block
        hmm_vma_walk.range = range
        end = min(range.end, vma.vm_end)
        mm_walk = _new_mm_walk(vma, hmm_vma_walk)

        stuck = alone = 0                       # model: restarts without progress (alone: nobody else ran)
        faults0 = range.stats["faults"]
        others0 = sched.others_ran()
        while True:
            _count(range, "walks")
            ret = yield from walk_page_range(start, end, mm_walk)
            progress = hmm_vma_walk.last != start
            start = hmm_vma_walk.last
            if ret == -EBUSY:
                _count(range, "walk_ebusy")
            # Keep trying while the range is valid.
            if not (ret == -EBUSY and range.valid):
                break
            # Model: the kernel can be preempted here (CONFIG_PREEMPT); a restart that never advances `last`
            # (e.g. get_dev_pagemap failing on a dying pgmap while the range stays valid) spins forever in
            # 5.2: reported as a livelock finding, after which the model returns the -EBUSY.
            others = sched.others_ran()
            if progress:
                stuck, alone, faults0 = 0, 0, range.stats["faults"]
            else:
                stuck += 1
                alone = alone + 1 if others == others0 else 0
            others0 = others
            if stuck >= LIVELOCK_RESTARTS or alone >= LIVELOCK_RESTARTS_ALONE:
                sched.report("livelock", f"hmm_range_fault({range.name}): {stuck} walks restarted at "
                                         f"{start:#x} without progress", cause=_livelock_cause(range, faults0))
                break
            yield from sched.preempt_point("hmm_range_fault")

        if ret:
            i = (hmm_vma_walk.last - range.start) >> PAGE_SHIFT
            hmm_pfns_clear(range, range.pfns[i:], hmm_vma_walk.last, range.end)
            return ret
        start = end

        if not start < range.end:
            break

    return (hmm_vma_walk.last - range.start) >> PAGE_SHIFT


# --- DMA (include/linux/dma-mapping.h, a simple device-address model: ours) ------------------------------
DMA_TO_DEVICE, DMA_BIDIRECTIONAL = "to_device", "bidirectional"
DMA_MAPPING_ERROR = U64                                  # (~(dma_addr_t)0)


class DmaDevice:
    """Ours: a ``struct device`` with a trivial IOMMU: ``dma_map_page`` hands out increasing bus addresses
    from ``base``; ``mappings`` holds the live ones (daddr -> (pfn, dir)); ``fail_after`` makes the n-th map
    fail (mapping-error injection, None: never)."""

    def __init__(self, name: str = "dev", base: int = 0x1_0000_0000, fail_after: int | None = None) -> None:
        self.name = name
        self.next = base
        self.fail_after = fail_after
        self.mapped_total = 0
        self.mappings: dict[int, tuple[int, str]] = {}


def dma_map_page(device: DmaDevice, page: int, offset: int, size: int, dir: str) -> int:
    """dma_map_page() (model): a bus address for the page, or DMA_MAPPING_ERROR."""
    if device.fail_after is not None and device.mapped_total >= device.fail_after:
        return DMA_MAPPING_ERROR
    daddr = device.next + offset
    device.next += PAGE_SIZE
    device.mapped_total += 1
    device.mappings[daddr] = (page, dir)
    return daddr


def dma_mapping_error(device: DmaDevice, daddr: int) -> bool:
    """dma_mapping_error()."""
    return daddr == DMA_MAPPING_ERROR


def dma_unmap_page(device: DmaDevice, daddr: int, size: int, dir: str) -> None:
    """dma_unmap_page() (model): unmapping an unknown address is a reported driver bug."""
    if daddr not in device.mappings:
        sched.report("dma_unmap_unknown", f"{device.name}: dma_unmap_page({daddr:#x}) of an unmapped address")
        return
    del device.mappings[daddr]


def set_page_dirty(machine: "Machine", page: int) -> None:
    """set_page_dirty() (model: the PG_dirty bit of the frame)."""
    if 0 <= page < machine.mem.nr_pfns:
        machine.mem.flags[page] |= PG.dirty


def hmm_range_dma_map(range: HmmRange, device: DmaDevice, daddrs: np.ndarray, block: bool) -> Gen[int]:
    """hmm_range_dma_map() [5.2]: ``hmm_range_fault`` then ``dma_map_page`` every entry with a page.

    Returns the number of pages mapped; ``hmm_range_fault``'s error (or -EBUSY for a count of 0); -EBUSY if
    the range became invalid, -EFAULT on a mapping error (the pages mapped so far are unmapped first).
    Same usage pattern as ``hmm_range_fault`` (mmap_sem held for read).
    """
    ret = yield from hmm_range_fault(range, block)
    if ret <= 0:
        return _ret_dma(range, "hmm_range_dma_map", ret if ret else -EBUSY)

    npages = (range.end - range.start) >> PAGE_SHIFT
    mapped = 0
    i = 0
    failed = False
    while i < npages:
        dir = DMA_TO_DEVICE
        # FIXME need to update DMA API to provide invalid DMA address value instead of a function to test
        # dma address value. For now setting it to 0 here is good enough as the pfns[] value is what is use
        # to check what is valid and what isn't.
        daddrs[i] = 0

        page = hmm_device_entry_to_page(range, int(range.pfns[i]))
        if page is None:
            i += 1
            continue

        # Check if range is being invalidated
        if not range.valid:
            ret = -EBUSY
            failed = True
            break

        # If it is read and write than map bi-directional.
        if int(range.pfns[i]) & range.flags[HMM_PFN_WRITE]:
            dir = DMA_BIDIRECTIONAL

        daddrs[i] = dma_map_page(device, page, 0, PAGE_SIZE, dir)
        if dma_mapping_error(device, int(daddrs[i])):
            ret = -EFAULT
            failed = True
            break

        mapped += 1
        i += 1

    if not failed:
        return _ret_dma(range, "hmm_range_dma_map", mapped)

    # unmap:
    npages, k = i, 0
    while k < npages and mapped:
        dir = DMA_TO_DEVICE
        page = hmm_device_entry_to_page(range, int(range.pfns[k]))
        if page is None:
            k += 1
            continue
        if dma_mapping_error(device, int(daddrs[k])):
            k += 1
            continue
        # If it is read and write than map bi-directional.
        if int(range.pfns[k]) & range.flags[HMM_PFN_WRITE]:
            dir = DMA_BIDIRECTIONAL
        dma_unmap_page(device, int(daddrs[k]), PAGE_SIZE, dir)
        mapped -= 1
        k += 1
    return _ret_dma(range, "hmm_range_dma_map", ret)


def hmm_range_dma_unmap(range: HmmRange, vma: "VMA | None", device: DmaDevice, daddrs: np.ndarray | None,
                        dirty: bool) -> int:
    """hmm_range_dma_unmap() [5.2]: unmap what ``hmm_range_dma_map`` mapped; ``set_page_dirty`` for WRITE
    entries when ``dirty``; entries become NONE, ``daddrs`` 0.  Returns the count, or -EINVAL
    (``end <= start``, no ``daddrs``, no ``pfns``)."""
    # Sanity check.
    if range.end <= range.start:
        return -EINVAL
    if daddrs is None:
        return -EINVAL
    if range.pfns is None:
        return -EINVAL

    machine = _range_machine(range)
    npages = (range.end - range.start) >> PAGE_SHIFT
    cpages = 0
    for i in range_(npages):
        dir = DMA_TO_DEVICE
        page = hmm_device_entry_to_page(range, int(range.pfns[i]))
        if page is None:
            continue

        # If it is read and write than map bi-directional.
        if int(range.pfns[i]) & range.flags[HMM_PFN_WRITE]:
            dir = DMA_BIDIRECTIONAL
            # See comments in function description on why it is safe here to call set_page_dirty()
            if dirty and machine is not None:
                set_page_dirty(machine, page)

        # Unmap and clear pfns/dma address
        dma_unmap_page(device, int(daddrs[i]), PAGE_SIZE, dir)
        range.pfns[i] = range.values[HMM_PFN_NONE]
        # FIXME see comments in hmm_vma_dma_map()
        daddrs[i] = 0
        cpages += 1

    _log(machine, "hmm_range_dma_unmap", range=range.name, dirty=dirty, ret=cpages)
    return cpages


def _ret_dma(range: HmmRange, name: str, ret: int) -> int:
    _log(_range_machine(range), name, range=range.name, ret=ret)
    return ret

