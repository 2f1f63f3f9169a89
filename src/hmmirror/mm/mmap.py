"""mmap(2) and munmap(2): creating, splitting, merging and removing VMAs (mm/mmap.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.include.mm_types import MAP, MMU_NOTIFY, PROT, VM
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memory import free_pgtables, unmap_page_range
from hmmirror.mm.mm_struct import VMA, vm_set_page_prot
from hmmirror.mm.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_range_init,
)

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, ENOMEM, EACCES, ENODEV, ENXIO = 22, 12, 13, 19, 6
MMAP_BASE = 0x7F00_0000_0000          # top of the (deterministic) top-down mmap area


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def calc_vm_prot_bits(prot: int) -> int:
    """calc_vm_prot_bits()."""
    return ((VM.READ if prot & PROT.READ else 0) | (VM.WRITE if prot & PROT.WRITE else 0)
            | (VM.EXEC if prot & PROT.EXEC else 0))


def get_unmapped_area(mm: "MMStruct", addr: int, length: int, flags: int, align: int = PAGE_SIZE) -> int:
    """get_unmapped_area(): MAP_FIXED takes ``addr``; a free hint is used; else the highest free gap
    below MMAP_BASE (top-down), aligned to ``align``.  Returns the address or -ENOMEM/-EINVAL."""
    task_size = mm.machine.geo.task_size
    if length > task_size:
        return -ENOMEM
    if flags & MAP.FIXED:
        if addr & (PAGE_SIZE - 1) or addr + length > task_size:
            return -EINVAL
        return addr
    if addr:
        addr = page_align(addr)
        if addr + length <= task_size and not mm.vmas_in(addr, addr + length) and addr % align == 0:
            return addr
    top = min(MMAP_BASE, task_size)
    for vma in reversed(mm.vmas):
        if vma.vm_start >= top:
            continue
        if vma.vm_end < top:
            cand = (top - length) & ~(align - 1)
            if cand >= vma.vm_end:
                return cand
        top = vma.vm_start
    cand = (top - length) & ~(align - 1)
    return cand if cand >= 0x10000 else -ENOMEM


def do_mmap(mm: "MMStruct", addr: int, length: int, prot: int, flags: int, file: Any = None, pgoff: int = 0,
            align: int = PAGE_SIZE) -> Gen[int]:
    """do_mmap() + mmap_region(): caller holds the mmap lock for write.  Returns the address or -errno."""
    if length <= 0:
        return -EINVAL
    length = page_align(length)
    if not flags & (MAP.SHARED | MAP.PRIVATE) or (flags & MAP.SHARED and flags & MAP.PRIVATE):
        return -EINVAL
    if flags & MAP.HUGETLB and file is None:
        from hmmirror.fs.hugetlbfs import hugetlb_file_setup
        file = hugetlb_file_setup(mm.machine, length, flags)
        if isinstance(file, int):
            return file
    if file is not None:
        align = max(align, getattr(file, "mmap_align", PAGE_SIZE))
        hsize = getattr(file, "huge_page_size", 0)
        if hsize:
            length = (length + hsize - 1) & ~(hsize - 1)
    vm_flags = calc_vm_prot_bits(prot) | VM.MAYREAD | VM.MAYWRITE | VM.MAYEXEC
    if flags & MAP.SHARED:
        vm_flags |= VM.SHARED | VM.MAYSHARE
    if file is not None:
        if prot & PROT.READ and not file.readable:
            return -EACCES
        if flags & MAP.SHARED and not file.writable:
            if prot & PROT.WRITE:
                return -EACCES
            vm_flags &= ~(VM.SHARED | VM.MAYWRITE)
    addr = get_unmapped_area(mm, addr, length, flags, align)
    if addr < 0:
        return addr
    if flags & MAP.FIXED and mm.vmas_in(addr, addr + length):
        ret = yield from do_munmap(mm, addr, length)
        if ret:
            return ret
    vma = VMA(mm, addr, addr + length, int(vm_flags), pgoff if file is not None else addr >> 12, file)
    if file is not None:
        ret = file.mmap(vma)
        if ret:
            return ret
    elif flags & MAP.SHARED:
        from hmmirror.fs.shmem import shmem_zero_setup
        shmem_zero_setup(vma)
    vma.vm_page_prot = vm_set_page_prot(vma)
    mm.insert_vma(vma)
    if file is not None and hasattr(file, "inode"):
        yield from vma_link_file(vma)
    mm.machine.log("mmap", mm=mm.name, start=addr, end=addr + length, kind=vma.kind)
    if flags & MAP.POPULATE:
        from hmmirror.mm.gup import mm_populate
        yield from mm_populate(mm, addr, length)
    return addr


def vma_link_file(vma: VMA) -> Gen[None]:
    """vma_link_file() (mm/vma.c [6.18]; the file half of vma_link() [5.2]): insert a new file VMA into its
    mapping's i_mmap under i_mmap_lock_write, so it waits for an rmap walk of the file in progress."""
    lock = file_i_mmap_rwsem(vma.vm_file)
    if lock is not None:
        yield from sched.down_write(lock)
    vma.vm_file.inode.i_mmap.append(vma)
    if lock is not None:
        sched.up_write(lock)


def unlink_file_vma(vma: VMA) -> Gen[None]:
    """unlink_file_vma() (mm/mmap.c [5.2]; unlink_file_vma_batch_process() mm/vma.c [6.18]): free_pgtables()
    takes a file VMA out of i_mmap under i_mmap_lock_write before its page tables go, so an rmap walk of the
    file in progress (unmap_mapping_range, memory_failure) has finished with it first."""
    f = vma.vm_file
    if f is None or not hasattr(f, "inode") or vma not in f.inode.i_mmap:
        return
    lock = file_i_mmap_rwsem(f)
    if lock is not None:
        yield from sched.down_write(lock)
    if vma in f.inode.i_mmap:
        f.inode.i_mmap.remove(vma)
    if lock is not None:
        sched.up_write(lock)


# --- splitting and merging -------------------------------------------------------------------------------
def split_alignment(vma: VMA) -> int:
    """The alignment a split of ``vma`` must respect (hugetlb page size, device-dax ``align``)."""
    if vma.vm_flags & VM.HUGETLB:
        return PAGE_SIZE << vma.hstate_order
    ops = vma.vm_ops
    return getattr(ops, "split_align", PAGE_SIZE) if ops is not None else PAGE_SIZE


def file_i_mmap_rwsem(file: Any) -> "sched.Lock | None":
    """``file->f_mapping->i_mmap_rwsem`` (the rwsem i_mmap_lock_write/read take), None for no such file."""
    inode = getattr(file, "inode", None) if file is not None else None
    if inode is None:
        return None
    mapping = getattr(inode, "i_mapping", None)
    lock = getattr(mapping, "i_mmap_rwsem", None) if mapping is not None else None
    return lock if lock is not None else getattr(inode, "i_mmap_rwsem", None)


def __split_vma(mm: "MMStruct", vma: VMA, addr: int) -> Gen[int]:
    """__split_vma() (mm/vma.c [6.18]; mm/mmap.c [5.2]): ``vma`` keeps ``[vm_start, addr)``, a new VMA gets
    ``[addr, vm_end)``.

    A file VMA's mapping is locked first (vma_prepare(): i_mmap_lock_write), and held while a THP straddling
    ``addr`` is split (vma_adjust_trans_huge: notifier CLEAR [2M)), the bounds change and the new VMA enters
    i_mmap (vma_complete): an rmap walk of the file (unmap_mapping_range, memory_failure) sees the VMA
    whole or both halves, never the lower half alone.  Returns 0 or -EINVAL (hugetlb / device-dax split at
    an unaligned address; vm_ops->may_split runs before anything is locked).
    """
    if addr % split_alignment(vma):
        return -EINVAL
    lock = file_i_mmap_rwsem(vma.vm_file)
    if lock is not None:
        yield from sched.down_write(lock)
    if addr % PMD_SIZE:
        from hmmirror.mm.huge_memory import split_huge_pmd_address
        yield from split_huge_pmd_address(vma, addr)
    if addr % PUD_SIZE and not vma.vm_flags & VM.HUGETLB:
        yield from _split_pud_at(vma, addr)
    new = VMA(mm, addr, vma.vm_end, vma.vm_flags, vma.vm_pgoff + ((addr - vma.vm_start) >> 12), vma.vm_file,
              vma.vm_ops, vma.anon_vma, vma.vm_page_prot, vma.hstate_order, vma.devmap, dict(vma.extra))
    vma.vm_end = addr
    mm.insert_vma(new)
    if vma.vm_file is not None and hasattr(vma.vm_file, "inode"):
        vma.vm_file.inode.i_mmap.append(new)
    if lock is not None:
        sched.up_write(lock)
    return 0


def _split_pud_at(vma: VMA, addr: int) -> Gen[None]:
    from hmmirror.arch.x86.pgtable import pud_leaf
    from hmmirror.mm.huge_memory import __split_huge_pud

    level, p, e = vma.vm_mm.pt.lookup(addr)
    if level == "pud" and p is not None and pud_leaf(e):
        yield from __split_huge_pud(vma, p, addr)


def can_merge(a: VMA, b: VMA) -> bool:
    """is_mergeable_vma() + anon/file continuity: ``b`` follows ``a`` with the same properties."""
    if a.vm_end != b.vm_start or a.vm_flags != b.vm_flags or a.vm_file is not b.vm_file:
        return False
    if a.vm_ops is not b.vm_ops or a.hstate_order != b.hstate_order or a.vm_page_prot != b.vm_page_prot:
        return False
    if a.vm_flags & (VM.PFNMAP | VM.MIXEDMAP | VM.IO):
        return False
    if a.vm_file is not None:
        return a.vm_pgoff + ((a.vm_end - a.vm_start) >> 12) == b.vm_pgoff
    return a.anon_vma == b.anon_vma or not (a.anon_vma and b.anon_vma)


def vma_merge_range(mm: "MMStruct", start: int, end: int) -> None:
    """vma_merge(): merge compatible neighbours around ``[start, end)`` (after a flag change)."""
    vmas = mm.vmas_in(max(start - 1, 0), end + 1)
    i = 0
    while i + 1 < len(vmas):
        a, b = vmas[i], vmas[i + 1]
        if can_merge(a, b):
            a.vm_end = b.vm_end
            a.anon_vma = a.anon_vma or b.anon_vma
            mm.remove_vma(b)
            if b.vm_file is not None and hasattr(b.vm_file, "inode") and b in b.vm_file.inode.i_mmap:
                b.vm_file.inode.i_mmap.remove(b)
            vmas.pop(i + 1)
        else:
            i += 1


def split_range(mm: "MMStruct", start: int, end: int) -> Gen[int]:
    """Split VMAs so that ``start`` and ``end`` are VMA boundaries.  0 or -EINVAL."""
    for addr in (start, end):
        vma = mm.vma_lookup(addr)
        if vma is not None and vma.vm_start < addr:
            ret = yield from __split_vma(mm, vma, addr)
            if ret:
                return ret
    return 0


# --- munmap ----------------------------------------------------------------------------------------------
def do_munmap(mm: "MMStruct", start: int, length: int) -> Gen[int]:
    """do_munmap(): split at the edges, one UNMAP invalidation over ``[start, end)``, zap, free tables."""
    if start & (PAGE_SIZE - 1) or length <= 0:
        return -EINVAL
    length = page_align(length)
    end = start + length
    if end > mm.machine.geo.task_size:
        return -EINVAL
    if not mm.vmas_in(start, end):
        return 0
    for vma in mm.vmas_in(start, end):
        a = split_alignment(vma)
        if (start > vma.vm_start and start % a) or (end < vma.vm_end and end % a):
            return -EINVAL
    ret = yield from split_range(mm, start, end)
    if ret:
        return ret
    victims = mm.vmas_in(start, end)
    for vma in victims:
        mm.remove_vma(vma)                             # detached from the mm: lookups no longer find them
    r = mmu_notifier_range_init(MMU_NOTIFY.UNMAP, victims[0], mm, start, end)
    yield from mmu_notifier_invalidate_range_start(r)
    for vma in victims:
        yield from unmap_page_range(vma, vma.vm_start, vma.vm_end)
    yield from mmu_notifier_invalidate_range_end(r)
    # free_pgtables() -> unlink_file_vma(): a file VMA leaves i_mmap only after its zap (5.2 unmap_region,
    # 6.18 vms_complete_munmap_vmas -> vms_clear_ptes), so an rmap walk of the file meanwhile
    # (unmap_mapping_range, memory_failure) still finds and zaps it
    for vma in victims:
        yield from unlink_file_vma(vma)
    free_pgtables(mm, start, end)
    mm.machine.log("munmap", mm=mm.name, start=start, end=end)
    return 0


def vm_munmap(mm: "MMStruct", start: int, length: int) -> Gen[int]:
    """vm_munmap(): takes the mmap lock for write."""
    yield from sched.down_write(mm.mmap_sem)
    try:
        return (yield from do_munmap(mm, start, length))
    finally:
        sched.up_write(mm.mmap_sem)


def vm_mmap(mm: "MMStruct", addr: int, length: int, prot: int, flags: int, file: Any = None, pgoff: int = 0,
            align: int = PAGE_SIZE) -> Gen[int]:
    """vm_mmap_pgoff(): takes the mmap lock for write (MAP_POPULATE runs after it is dropped, as read)."""
    populate = flags & MAP.POPULATE
    yield from sched.down_write(mm.mmap_sem)
    try:
        addr = yield from do_mmap(mm, addr, length, prot, flags & ~MAP.POPULATE, file, pgoff, align)
    finally:
        sched.up_write(mm.mmap_sem)
    if addr >= 0 and populate:
        from hmmirror.mm.gup import mm_populate
        yield from sched.down_read(mm.mmap_sem)
        try:
            yield from mm_populate(mm, addr, page_align(length))
        finally:
            if mm.mmap_sem.held_by():
                sched.up_read(mm.mmap_sem)
    return addr
