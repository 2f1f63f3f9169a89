"""MMU notifiers: classic subscribers and interval subscriptions (mm/mmu_notifier.c).

Classic subscribers exist in every profile ([5.2] and [6.18]); interval subscriptions only where
``profile.interval_notifiers`` is true.  Callbacks may sleep, so they are generators; the core runs them with
``yield from``.

Every invalidation is also appended to the machine's event log (``mmu_notifier_invalidate_range_start`` /
``_end`` records with range, event and blockable flag), which tests and the simulator read.
"""

from __future__ import annotations

import bisect
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hmmirror.include.mm_types import MMU_NOTIFIER_RANGE_BLOCKABLE, MMU_NOTIFY
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import VMA, MMStruct

ULONG_MAX = (1 << 64) - 1


@dataclass
class MmuNotifierRange:
    """``struct mmu_notifier_range``."""

    mm: "MMStruct"
    start: int
    end: int
    event: MMU_NOTIFY = MMU_NOTIFY.UNMAP
    flags: int = MMU_NOTIFIER_RANGE_BLOCKABLE
    vma: "VMA | None" = None
    owner: Any = None
    itree_started: bool = False       # model: this range went through the interval side of _start

    def __repr__(self) -> str:
        b = "blockable" if self.flags & MMU_NOTIFIER_RANGE_BLOCKABLE else "nonblock"
        return f"Range({self.start:#x}-{self.end:#x} {self.event.name} {b})"


def mmu_notifier_range_init(event: MMU_NOTIFY, vma: "VMA | None", mm: "MMStruct", start: int, end: int,
                            owner: Any = None) -> MmuNotifierRange:
    """mmu_notifier_range_init() / mmu_notifier_range_init_owner()."""
    return MmuNotifierRange(mm, start, end, event, 0, vma, owner)


def mmu_notifier_range_blockable(r: MmuNotifierRange) -> bool:
    """mmu_notifier_range_blockable()."""
    return bool(r.flags & MMU_NOTIFIER_RANGE_BLOCKABLE)


class MmuNotifierOps:
    """``struct mmu_notifier_ops`` (classic).  Override the hooks you need; generators may sleep."""

    def release(self, mn: "MmuNotifier", mm: "MMStruct") -> Gen[None]:
        return
        yield

    def invalidate_range_start(self, mn: "MmuNotifier", r: MmuNotifierRange) -> Gen[int]:
        return 0
        yield

    def invalidate_range_end(self, mn: "MmuNotifier", r: MmuNotifierRange) -> Gen[None]:
        return
        yield

    has_invalidate_range_end = True


@dataclass(eq=False)
class MmuNotifier:
    """``struct mmu_notifier``: a classic subscriber."""

    ops: MmuNotifierOps
    mm: "MMStruct | None" = None


class MmuIntervalNotifierOps:
    """``struct mmu_interval_notifier_ops``: ``invalidate(sub, range, cur_seq) -> bool`` (a generator)."""

    def invalidate(self, sub: "MmuIntervalNotifier", r: MmuNotifierRange, cur_seq: int) -> Gen[bool]:
        return True
        yield


@dataclass(eq=False)
class MmuIntervalNotifier:
    """``struct mmu_interval_notifier``: ``[start, last]`` (inclusive last, as the kernel's interval tree)."""

    start: int = 0
    last: int = 0
    ops: MmuIntervalNotifierOps | None = None
    mm: "MMStruct | None" = None
    invalidate_seq: int = 0
    in_tree: bool = False


class IntervalTree:
    """Interval tree of subscriptions: sorted by start, with a max-``last`` segment tree over that order.

    ``overlapping(s, e)`` visits only subtrees whose maximum ``last`` reaches ``s`` among entries whose start
    is ``<= e``: O(log n + matches), not a scan of all subscriptions.  Insert/remove keep the sorted order
    (a list insertion) and mark the segment tree stale; the next query rebuilds it with numpy, level by level.
    Equal starts keep insertion order (the kernel's rb-tree inserts an equal key to the right).
    """

    def __init__(self) -> None:
        self._items: list[MmuIntervalNotifier] = []
        self._keys: list[tuple[int, int]] = []
        self._max: list[int] = []
        self._n = 0
        self._seq = 0
        self._stale = True

    def __len__(self) -> int:
        return len(self._items)

    def insert(self, sub: MmuIntervalNotifier) -> None:
        self._seq += 1
        key = (sub.start, self._seq)
        i = bisect.bisect_left(self._keys, key)
        self._keys.insert(i, key)
        self._items.insert(i, sub)
        self._stale = True

    def remove(self, sub: MmuIntervalNotifier) -> None:
        i = self._items.index(sub)
        del self._items[i]
        del self._keys[i]
        self._stale = True

    def _rebuild(self) -> None:
        import numpy as np

        n = 1
        while n < max(len(self._items), 1):
            n *= 2
        mx = np.zeros(2 * n, dtype=np.uint64)
        if self._items:
            mx[n:n + len(self._items)] = np.fromiter((s.last for s in self._items), dtype=np.uint64,
                                                     count=len(self._items))
        h = n // 2
        while h >= 1:                                  # parents of level [2h, 4h) are [h, 2h)
            mx[h:2 * h] = np.maximum(mx[2 * h:4 * h:2], mx[2 * h + 1:4 * h:2])
            h //= 2
        self._n = n
        self._max = mx.tolist()
        self._stale = False

    def overlapping(self, start: int, last: int) -> list[MmuIntervalNotifier]:
        """Subscriptions intersecting ``[start, last]``, in tree (start) order."""
        k = bisect.bisect_right(self._keys, (last, 1 << 62))   # candidates: items[:k] have start <= last
        out: list[MmuIntervalNotifier] = []
        if k == 0:
            return out
        if self._stale:
            self._rebuild()
        self._collect(1, 0, self._n, k, start, out)
        return out

    def _collect(self, node: int, lo: int, hi: int, k: int, start: int, out: list[MmuIntervalNotifier]) -> None:
        if lo >= k or self._max[node] < start:
            return
        if hi - lo == 1:
            out.append(self._items[lo])
            return
        mid = (lo + hi) // 2
        self._collect(2 * node, lo, mid, k, start, out)
        self._collect(2 * node + 1, mid, hi, k, start, out)


class NotifierSubscriptions:
    """``struct mmu_notifier_subscriptions`` (6.x naming; [5.2] ``mmu_notifier_mm`` with the list only)."""

    def __init__(self, mm: "MMStruct") -> None:
        self.list: list[MmuNotifier] = []            # classic, head first (newest first)
        self.lock = Lock(f"{mm.name}.subscriptions.lock", "spin")
        self.invalidate_seq = 2                       # even: no interval invalidation in progress
        self.active_invalidate_ranges = 0
        self.itree = IntervalTree()
        self.has_itree = False                        # set by the first interval insert, never cleared
        # deferred_list: hlist_add_head order (newest first), applied at the last mn_itree_inv_end()
        self.deferred: list[tuple[str, MmuIntervalNotifier]] = []
        self.srcu_readers = 0


def _subs(mm: "MMStruct") -> NotifierSubscriptions:
    if mm.notifier_subscriptions is None:
        mm.notifier_subscriptions = NotifierSubscriptions(mm)
    return mm.notifier_subscriptions


def _log(mm: "MMStruct", what: str, r: MmuNotifierRange, **extra: Any) -> None:
    if what == "invalidate_range_start":
        mm.machine.counters["mmu_notifier_invalidations"] += 1
    if r.owner is not None:                 # MIGRATE / EXCLUSIVE ranges name the device that caused them
        extra.setdefault("owner", getattr(r.owner, "path", None) or getattr(r.owner, "name", None) or repr(r.owner))
    mm.machine.log(what, mm=mm.name, start=r.start, end=r.end, event=r.event.name,
                   blockable=mmu_notifier_range_blockable(r), **extra)


# --- classic registration --------------------------------------------------------------------------------
def __mmu_notifier_register(mn: MmuNotifier, mm: "MMStruct") -> Gen[int]:
    """__mmu_notifier_register() (mm/mmu_notifier.c [6.x]; do_mmu_notifier_register [5.2]): the caller holds the
    mmap lock for write; the subscriber is linked with mm_take_all_locks() held, so an invalidation that
    started before it (an rmap walk holding an i_mmap_rwsem or an anon_vma for read) has ended first and
    none starts meanwhile -- a new subscriber never gets an invalidate_range_end without its start."""
    if mm.mm_users <= 0:
        sched.report("WARN_ON", f"__mmu_notifier_register on {mm.name} with mm_users == 0")
    yield from sched.might_sleep("mm_take_all_locks")
    locks = yield from mm_take_all_locks(mm)
    subs = _subs(mm)
    mm.mm_count += 1                                  # mmgrab
    mn.mm = mm
    subs.list.insert(0, mn)
    mm_drop_all_locks(locks)
    mm.machine.log("mmu_notifier_register", mm=mm.name)
    return 0


def mmu_notifier_register(mn: MmuNotifier, mm: "MMStruct") -> Gen[int]:
    """mmu_notifier_register(): takes the mmap lock for write itself."""
    yield from sched.down_write(mm.mmap_sem)
    try:
        return (yield from __mmu_notifier_register(mn, mm))
    finally:
        sched.up_write(mm.mmap_sem)


def mmdrop(mm: "MMStruct") -> None:
    """mmdrop()."""
    mm.mm_count -= 1


def mmu_notifier_unregister_no_release(mn: MmuNotifier, mm: "MMStruct") -> None:
    """mmu_notifier_unregister_no_release(): unlink without SRCU synchronisation, then mmdrop."""
    subs = _subs(mm)
    if mn in subs.list:
        subs.list.remove(mn)
    mmdrop(mm)


def mmu_notifier_unregister(mn: MmuNotifier, mm: "MMStruct") -> Gen[None]:
    """mmu_notifier_unregister(): release() if still linked, unlink, synchronize_srcu, mmdrop."""
    subs = _subs(mm)
    if mn in subs.list:
        yield from mn.ops.release(mn, mm)
        subs.list.remove(mn)
    yield from sched.might_sleep("synchronize_srcu")
    mmdrop(mm)


# --- interval registration [5.5+] ------------------------------------------------------------------------
def mmu_interval_notifier_insert(sub: MmuIntervalNotifier, mm: "MMStruct", start: int, length: int,
                                 ops: MmuIntervalNotifierOps) -> Gen[int]:
    """mmu_interval_notifier_insert() [6.x] (mm/mmu_notifier.c): must not be called with the mmap lock held.

    The first interval subscription of an mm registers the per-mm subscriptions object through
    ``mmu_notifier_register(NULL, mm)``, which takes the mmap lock for write (mm_take_all_locks): that is
    what keeps an invalidation that started before the registration from ending after it.
    """
    if not mm.machine.profile.interval_notifiers:
        return -22
    yield from sched.might_sleep("mmu_interval_notifier_insert")
    subs = mm.notifier_subscriptions
    if subs is None or not subs.has_itree:
        yield from sched.down_write(mm.mmap_sem)
        try:
            locks = yield from mm_take_all_locks(mm)
            __mmu_notifier_register_itree(mm)
            mm_drop_all_locks(locks)
        finally:
            sched.up_write(mm.mmap_sem)
    return __mmu_interval_notifier_insert(sub, mm, start, length, ops)


def mm_take_all_locks(mm: "MMStruct") -> Gen[list[Lock]]:
    """mm_take_all_locks() (mm/vma.c [6.x], mm/mmap.c [5.2]): with the mmap lock held for write, take the global
    ``mm_all_locks_mutex``, then the ``i_mmap_rwsem`` of the mapping of every file VMA of ``mm`` for write
    (each mapping once, AS_MM_ALL_LOCKS): first the hugetlbfs mappings (their rwsem is a lock class of its own,
    hugetlbfs_i_mmap_rwsem_key, ordered before every other ``i_mmap_rwsem`` in mm/rmap.c), then all the others.
    The kernel takes the locks of one class "randomly" (VMA order) because the VM code never nests them and
    ``mm_all_locks_mutex`` keeps two mm_take_all_locks() from running at once.  An rmap walk of a file mapped
    here (``unmap_mapping_range`` and its invalidation) that is running is waited for, none starts meanwhile.
    __mmu_notifier_register() relies on it ("We can't race against any other mmu notifier method either
    thanks to mm_take_all_locks()"): an invalidation that started before the mm had an interval tree (so
    counted in no ``active_invalidate_ranges``) cannot still be running when the first subscription goes in.
    Last, the root rwsem of the anon_vma of every VMA that has one, for write (vm_lock_anon_vma(), each root
    once): an rmap walk of an anonymous folio (reclaim's try_to_unmap, migration's try_to_migrate, memory
    failure) holds it for read across its invalidations, so it too is waited for and none starts meanwhile.
    Not modelled: vma_start_write() of every VMA (no per-VMA locks in the model).  Returns what
    mm_drop_all_locks() releases, the mutex first."""
    from hmmirror.mm.mm_struct import is_vm_hugetlb_page
    from hmmirror.mm.rmap import anon_vma_lock_write
    from hmmirror.mm.truncate import _i_mmap

    mutex = mm.machine.mm_all_locks_mutex
    if not sched.mutex_trylock(mutex):             # mutex_lock(): the uncontended fast path does not sleep
        yield from sched.mutex_lock(mutex)         # (so a run with one registration keeps its schedule)
    taken: list[Lock] = [mutex]                    # (its other sleeps are the lock acquisitions below)
    vmas = list(mm.vmas)
    for hugetlb_pass in (True, False):
        for vma in vmas:
            f = vma.vm_file
            inode = getattr(f, "inode", None) if f is not None else None
            if inode is None or is_vm_hugetlb_page(vma) != hugetlb_pass:
                continue
            _vmas, lock = _i_mmap(inode)
            if lock is not None and lock not in taken:          # vm_lock_mapping(): AS_MM_ALL_LOCKS
                yield from sched.down_write(lock)
                taken.append(lock)
    for vma in vmas:                                            # the anon_vmas after every i_mmap_rwsem
        av = vma.anon_vma
        if av is not None and av.root.rwsem not in taken:       # vm_lock_anon_vma(): root bit in rb_root
            yield from anon_vma_lock_write(av)                  # (uncontended: no sleep, as the mutex)
            taken.append(av.root.rwsem)
    return taken


def mm_drop_all_locks(locks: list[Lock]) -> None:
    """mm_drop_all_locks() (mm/vma.c [6.x], mm/mmap.c [5.2]): release the rwsems mm_take_all_locks() took (i_mmap_rwsems and
    anon_vma roots), then ``mm_all_locks_mutex``."""
    mutex, rwsems = locks[0], locks[1:]
    for lock in rwsems:
        sched.up_write(lock)
    sched.mutex_unlock(mutex)


def mmu_interval_notifier_insert_locked(sub: MmuIntervalNotifier, mm: "MMStruct", start: int, length: int,
                                        ops: MmuIntervalNotifierOps) -> int:
    """mmu_interval_notifier_insert_locked() [6.x]: the caller holds the mmap lock for write."""
    if not mm.machine.profile.interval_notifiers:
        return -22
    if mm.mmap_sem.owner is not sched.current():
        sched.report("lockdep", f"mmu_interval_notifier_insert_locked without {mm.mmap_sem.name} held for write")
    subs = mm.notifier_subscriptions
    if subs is None or not subs.has_itree:
        __mmu_notifier_register_itree(mm)
    return __mmu_interval_notifier_insert(sub, mm, start, length, ops)


def __mmu_notifier_register_itree(mm: "MMStruct") -> None:
    """__mmu_notifier_register(NULL, mm) [6.x]: allocate the subscriptions object, set ``has_itree``."""
    if mm.mm_users <= 0:
        sched.report("BUG_ON", f"__mmu_notifier_register on {mm.name} with mm_users == 0")
    _subs(mm).has_itree = True


def __mmu_interval_notifier_insert(sub: MmuIntervalNotifier, mm: "MMStruct", start: int, length: int,
                                   ops: MmuIntervalNotifierOps) -> int:
    """__mmu_interval_notifier_insert() [6.x]: the new subscription's seq is always odd (see read_begin)."""
    subs = _subs(mm)
    sub.mm, sub.ops, sub.in_tree = mm, ops, False
    if length == 0 or start + length - 1 > ULONG_MAX:       # check_add_overflow(start, length - 1)
        return -75                                        # -EOVERFLOW
    sub.start, sub.last = start, start + length - 1
    if mm.mm_users <= 0:                                  # WARN_ON: "Must call with a mmget() held"
        mm.machine.log("WARN_ON", what_failed="mmu_interval_notifier_insert with mm_users == 0", mm=mm.name)
        return -22
    mm.mm_count += 1                                      # mmgrab, paired with mmdrop in _remove
    if subs.active_invalidate_ranges:
        # An invalidation may be running over an unknown range: the new subscription must assume it is
        # covered.  The tree cannot change while invalidating (odd seq): defer the insert to inv_end.
        if subs.invalidate_seq & 1:
            subs.deferred.insert(0, ("insert", sub))
        else:
            subs.invalidate_seq |= 1
            subs.itree.insert(sub)
            sub.in_tree = True
        sub.invalidate_seq = subs.invalidate_seq
    else:
        if subs.invalidate_seq & 1:
            mm.machine.log("WARN_ON", what_failed="odd invalidate_seq with no active range", mm=mm.name)
        sub.invalidate_seq = subs.invalidate_seq - 1     # odd, != current
        subs.itree.insert(sub)
        sub.in_tree = True
    mm.machine.log("mmu_interval_notifier_insert", mm=mm.name, start=sub.start, last=sub.last)
    return 0


def mmu_interval_notifier_remove(sub: MmuIntervalNotifier) -> Gen[None]:
    """mmu_interval_notifier_remove(): waits until no invalidate callback for ``sub`` can run."""
    mm = sub.mm
    assert mm is not None
    yield from sched.might_sleep("mmu_interval_notifier_remove")
    subs = _subs(mm)
    seq = 0
    if subs.invalidate_seq & 1:
        if not sub.in_tree:                               # insert still pending on the deferred list
            subs.deferred = [(op, s) for op, s in subs.deferred if s is not sub]
        else:                                             # removal deferred to the last inv_end
            subs.deferred.insert(0, ("remove", sub))
            seq = subs.invalidate_seq
    else:
        if not sub.in_tree:
            mm.machine.log("WARN_ON", what_failed="mmu_interval_notifier_remove of a subscription not in the tree",
                           mm=mm.name)
        else:
            subs.itree.remove(sub)
            sub.in_tree = False
    if seq:
        yield from sched.wait_event(lambda: subs.invalidate_seq != seq, "mmu_interval_notifier_remove")
    mmdrop(mm)
    mm.machine.log("mmu_interval_notifier_remove", mm=mm.name, start=sub.start, last=sub.last)


def mmu_interval_read_begin(sub: MmuIntervalNotifier) -> Gen[int]:
    """mmu_interval_read_begin(): a sequence number; waits while an invalidation covers ``sub``."""
    assert sub.mm is not None
    subs = _subs(sub.mm)
    seq = sub.invalidate_seq
    if seq == subs.invalidate_seq:
        yield from sched.wait_event(lambda: subs.invalidate_seq != seq, "mmu_interval_read_begin")
    return seq


def mmu_interval_read_retry(sub: MmuIntervalNotifier, seq: int) -> bool:
    """mmu_interval_read_retry(): call under the driver lock taken by ``invalidate``."""
    return sub.invalidate_seq != seq


def mmu_interval_check_retry(sub: MmuIntervalNotifier, seq: int) -> bool:
    """mmu_interval_check_retry(): a lock-free hint."""
    return sub.invalidate_seq != seq


def mmu_interval_set_seq(sub: MmuIntervalNotifier, cur_seq: int) -> None:
    """mmu_interval_set_seq(): from ``invalidate``, under the driver lock."""
    sub.invalidate_seq = cur_seq


# --- invalidation ----------------------------------------------------------------------------------------
def _itree_invalidate_start(subs: NotifierSubscriptions, r: MmuNotifierRange) -> Gen[int]:
    """mn_itree_invalidate()."""
    subs.active_invalidate_ranges += 1
    hits = subs.itree.overlapping(r.start, r.end - 1)
    if hits:
        subs.invalidate_seq |= 1
    cur_seq = subs.invalidate_seq
    for sub in hits:
        assert sub.ops is not None
        ok = yield from _call_atomic_aware(r, sub.ops.invalidate(sub, r, cur_seq))
        if not ok:
            if mmu_notifier_range_blockable(r):
                sched.report("WARN_ON", "interval invalidate returned false for a blockable range")
                continue
            _itree_inv_end(subs)
            return -11
    return 0


def _itree_inv_end(subs: NotifierSubscriptions) -> None:
    """mn_itree_inv_end()."""
    subs.active_invalidate_ranges -= 1
    if subs.active_invalidate_ranges or not subs.invalidate_seq & 1:
        return
    subs.invalidate_seq += 1                          # becomes even: no interval invalidation in progress
    for _op, sub in subs.deferred:                    # decided by tree membership, as the kernel does
        if not sub.in_tree:
            subs.itree.insert(sub)
            sub.in_tree = True
        else:
            subs.itree.remove(sub)
            sub.in_tree = False
    subs.deferred.clear()


def _call_atomic_aware(r: MmuNotifierRange, gen: Gen[Any]) -> Gen[Any]:
    """Run a callback; for a non-blockable range the task is atomic (sleeping is a reported bug)."""
    task = sched.current()
    atomic = not mmu_notifier_range_blockable(r)
    task.atomic += atomic
    try:
        return (yield from gen)
    finally:
        task.atomic -= atomic


def _classic_start(subs: NotifierSubscriptions, r: MmuNotifierRange) -> Gen[int]:
    ret = 0
    for mn in list(subs.list):
        rc = yield from _call_atomic_aware(r, mn.ops.invalidate_range_start(mn, r))
        if rc:
            ret = rc
    return ret


def mmu_notifier_invalidate_range_start(r: MmuNotifierRange) -> Gen[None]:
    """mmu_notifier_invalidate_range_start(): blockable; entries change only after this returns."""
    r.flags |= MMU_NOTIFIER_RANGE_BLOCKABLE
    yield from sched.might_sleep("mmu_notifier_invalidate_range_start")
    _log(r.mm, "invalidate_range_start", r)
    subs = r.mm.notifier_subscriptions
    if subs is None:
        return
    if subs.has_itree:
        r.itree_started = True
        yield from _itree_invalidate_start(subs, r)
    yield from _classic_start(subs, r)


def mmu_notifier_invalidate_range_start_nonblock(r: MmuNotifierRange) -> Gen[int]:
    """mmu_notifier_invalidate_range_start_nonblock(): subscribers must not sleep; may fail with -EAGAIN."""
    r.flags &= ~MMU_NOTIFIER_RANGE_BLOCKABLE
    _log(r.mm, "invalidate_range_start", r)
    subs = r.mm.notifier_subscriptions
    if subs is None:
        return 0
    if subs.has_itree:
        rc = yield from _itree_invalidate_start(subs, r)
        if rc:                                        # the interval side was ended by the core itself
            _log(r.mm, "invalidate_range_start_failed", r, ret=rc)
            return rc
        r.itree_started = True
    rc = yield from _classic_start(subs, r)
    if rc and r.mm.machine.profile.interval_notifiers:
        # [6.x] the core ends every classic subscriber that implements invalidate_range_end.  It does not
        # end the interval side: __mmu_notifier_invalidate_range_start() returns the hlist error after a
        # successful mn_itree_invalidate(), and the caller calls no _end, so active_invalidate_ranges
        # stays raised (mainline 6.x as written; kept deliberately, a simulator can report it).
        for mn in list(subs.list):
            if mn.ops.has_invalidate_range_end:
                yield from _call_atomic_aware(r, mn.ops.invalidate_range_end(mn, r))
    if rc:
        _log(r.mm, "invalidate_range_start_failed", r, ret=rc)
    return rc


def mmu_notifier_invalidate_range_end(r: MmuNotifierRange) -> Gen[None]:
    """mmu_notifier_invalidate_range_end(): after the entries changed."""
    subs = r.mm.notifier_subscriptions
    if subs is not None:
        if r.itree_started:
            r.itree_started = False
            _itree_inv_end(subs)
        for mn in list(subs.list):
            yield from _call_atomic_aware(r, mn.ops.invalidate_range_end(mn, r))
    _log(r.mm, "invalidate_range_end", r)


def mmu_notifier_release(mm: "MMStruct") -> Gen[None]:
    """__mmu_notifier_release(): intervals get RELEASE over everything; classic ``release`` then unlink."""
    subs = mm.notifier_subscriptions
    if subs is None:
        return
    if subs.has_itree:
        r = MmuNotifierRange(mm, 0, ULONG_MAX, MMU_NOTIFY.RELEASE, MMU_NOTIFIER_RANGE_BLOCKABLE)
        _log(mm, "invalidate_range_start", r)
        yield from _itree_invalidate_start(subs, r)
        _itree_inv_end(subs)
        _log(mm, "invalidate_range_end", r)
    for mn in list(subs.list):
        yield from mn.ops.release(mn, mm)
    subs.list.clear()
    yield from sched.might_sleep("synchronize_srcu")
