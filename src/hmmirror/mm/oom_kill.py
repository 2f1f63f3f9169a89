"""The OOM reaper (mm/oom_kill.c): unmap the private memory of an OOM victim before it exits.

Per anonymous or private VMA (not hugetlb or ``VM_PFNMAP``; [5.2] not ``VM_LOCKED`` either) the reaper opens a
*non-blockable* UNMAP range ``[vm_start, vm_end)`` (mm-substrate.md §6, §7): subscribers must not sleep and may
refuse with -EAGAIN.  A refused VMA is skipped, its entries stay, and no ``invalidate_range_end`` is called
for it; the reap then reports failure (the kernel retries later).

Followed: v5.2 and v6.18 ``__oom_reap_task_mm`` / ``oom_reap_task_mm`` (mmap_read_trylock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.include.mm_types import MMU_NOTIFY, VM
from hmmirror.include.oom import check_stable_address_space  # noqa: F401  (re-exported: the reaper's mark)
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import unmap_page_range
from hmmirror.mm.mm_struct import VMA, vma_is_anonymous
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start_nonblock,
    mmu_notifier_range_init,
)

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct


def oom_reapable_vma(vma: VMA) -> bool:
    """The VMA test of __oom_reap_task_mm(): [5.2] can_madv_dontneed_vma() (not locked, hugetlb or PFN-mapped),
    [6.18] not hugetlb or PFN-mapped; and only anonymous or private memory is worth reaping."""
    skip = VM.HUGETLB | VM.PFNMAP
    if vma.vm_mm.machine.profile.oom_reap_skips_locked:
        skip |= VM.LOCKED
    if vma.vm_flags & skip:
        return False
    return vma_is_anonymous(vma) or not vma.vm_flags & VM.SHARED


def __oom_reap_task_mm(mm: "MMStruct") -> Gen[bool]:
    """__oom_reap_task_mm(): mark the mm MMF_UNSTABLE (faults check it: check_stable_address_space), then
    zap every reapable VMA inside a non-blockable UNMAP range.

    Returns False when a subscriber refused a range (that VMA was left untouched), True otherwise.
    """
    mm.unstable = True                           # set_bit(MMF_UNSTABLE, &mm->flags)
    ret = True
    for vma in list(mm.vmas):
        if not oom_reapable_vma(vma):
            continue
        r = mmu_notifier_range_init(MMU_NOTIFY.UNMAP, vma, mm, vma.vm_start, vma.vm_end)
        rc = yield from mmu_notifier_invalidate_range_start_nonblock(r)
        if rc:
            ret = False
            continue
        yield from unmap_page_range(vma, r.start, r.end)
        yield from mmu_notifier_invalidate_range_end(r)
    mm.machine.log("oom_reap", mm=mm.name, ok=ret)
    return ret


def oom_reap_task_mm(mm: "MMStruct") -> Gen[bool]:
    """oom_reap_task_mm(): reap under ``mmap_read_trylock``; False if the lock is contended (retry later).

    An address space already torn down (``exit_mmap`` ran) has nothing left: True.
    """
    if not sched.down_read_trylock(mm.mmap_sem):
        return False
    try:
        if mm.exited or mm.mm_users == 0 and not mm.vmas:
            return True
        return (yield from __oom_reap_task_mm(mm))
    finally:
        sched.up_read(mm.mmap_sem)
