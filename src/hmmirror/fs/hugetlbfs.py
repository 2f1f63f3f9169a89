"""hugetlbfs and ``MAP_HUGETLB`` files (fs/hugetlbfs/inode.c).

A hugetlbfs inode's page cache is indexed by huge page (``inode.huge_shift`` 21 or 30) and each slot holds the
head pfn of a hugetlb page.  Mappings get ``VM_HUGETLB`` and ``vma.hstate_order`` (9 or 18); their faults go
to :func:`hmmirror.mm.hugetlb.hugetlb_fault`.  ``MAP_HUGETLB`` mappings are backed by an unlinked file of the
internal mount of the requested size (``MAP_HUGE_1GB`` selects 1 GiB, ``MAP_HUGE_2MB`` or nothing 2 MiB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PMD_SIZE, PUD_SIZE
from hmmirror.errors import InputError
from hmmirror.fs.file import File, Inode
from hmmirror.fs.super import FileSystemType, SuperBlock
from hmmirror.include.mm_types import VM
from hmmirror.kernel.sched import Gen
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.machine import Machine

EINVAL = 22
MAP_HUGE_SHIFT, MAP_HUGE_MASK = 26, 0x3F
HUGE_SHIFTS = {PMD_SIZE: 21, PUD_SIZE: 30}


class HugetlbVmOps(VmOps):
    """hugetlb_vm_ops: faults never reach ``->fault`` (handle_mm_fault calls hugetlb_fault)."""

    name = "hugetlb"


HUGETLB_VM_OPS = HugetlbVmOps()


class HugetlbFs(FileSystemType):
    """hugetlbfs: files of huge pages ("data"/"zero": every huge page allocated now from the pool,
    ENOSPC if the pool cannot supply them, as fallocate; "sparse": none).  Sizes are multiples of the
    mount's page size."""

    name = "hugetlbfs"

    def new_inode(self, sb: SuperBlock, path: str, size: int, content: str) -> Inode:
        hsize = int(sb.pagesize or PMD_SIZE)
        if size % hsize:
            raise InputError(f"create_file: {path}: hugetlbfs file sizes must be multiples of {hsize}", "EINVAL")
        inode = Inode(sb, path, size, HUGE_SHIFTS[hsize])
        if content != "sparse":
            mem = self.machine.mem
            order = HUGE_SHIFTS[hsize] - PAGE_SHIFT
            n = inode.nr_pages
            if len(mem.hugetlb_free.get(order, [])) < n:
                raise InputError(f"create_file: {path}: {n} huge pages needed, "
                                 f"{len(mem.hugetlb_free.get(order, []))} free", "ENOSPC")
            for idx in range(n):                            # hugetlbfs_fallocate()
                head = mem.alloc_hugetlb(order)
                mem.flags[head] |= PG.uptodate
                inode.i_mapping.add_huge(idx, head)
        return inode

    def mmap(self, file: File, vma: VMA) -> int:
        """hugetlbfs_file_mmap(): VM_HUGETLB|VM_DONTEXPAND, hstate order; the offset must be huge-page
        aligned; a writable mapping extends i_size to cover it."""
        inode = file.inode
        order = inode.huge_shift - PAGE_SHIFT
        if vma.vm_pgoff & ((1 << order) - 1):
            return -EINVAL
        vma.vm_flags |= VM.HUGETLB | VM.DONTEXPAND
        vma.hstate_order = order
        vma.vm_ops = HUGETLB_VM_OPS
        length = (vma.vm_end - vma.vm_start) + (vma.vm_pgoff << PAGE_SHIFT)
        if vma.vm_flags & VM.WRITE and inode.i_size < length:
            inode.i_size = length
        return 0

    def mmap_align(self, inode: Inode) -> int:
        """hugetlb_get_unmapped_area(): aligned to the huge page size."""
        return 1 << inode.huge_shift

    def setattr_size(self, inode: Inode, size: int) -> Gen[int]:
        """hugetlb_vmtruncate(): the size must be huge-page aligned; shrinking zaps the tail from every
        mapping (private copies included: hugetlb_vmdelete_list) and frees the cached huge pages."""
        from hmmirror.mm.truncate import unmap_mapping_range

        if size & ((1 << inode.huge_shift) - 1):
            return -EINVAL
        old = inode.i_size
        inode.i_size = size
        if size < old:
            yield from unmap_mapping_range(inode.i_mapping, size, 0, True)
            remove_inode_hugepages(inode, size, old)
        return 0

    def punch_hole(self, inode: Inode, offset: int, length: int) -> Gen[int]:
        """hugetlbfs_punch_hole(): huge pages fully inside the hole are unmapped everywhere and freed."""
        from hmmirror.mm.truncate import unmap_mapping_range

        hsize = 1 << inode.huge_shift
        hole_start = (offset + hsize - 1) & ~(hsize - 1)
        hole_end = (offset + length) & ~(hsize - 1)
        if hole_start < hole_end:
            yield from unmap_mapping_range(inode.i_mapping, hole_start, hole_end - hole_start, True)
            remove_inode_hugepages(inode, hole_start, hole_end)
        return 0


def remove_inode_hugepages(inode: Inode, lstart: int, lend: int) -> int:
    """remove_inode_hugepages(): drop the cached huge pages of ``[lstart, lend)`` (bytes); they return to
    the pool once no mapping holds them."""
    shift = inode.huge_shift
    return inode.i_mapping.delete_range(inode.machine.mem, lstart >> shift, (lend + (1 << shift) - 1) >> shift,
                                        per_slot_heads=True)


# --- MAP_HUGETLB -------------------------------------------------------------------------------------------
def hugetlbfs_vfsmount(machine: "Machine", hsize: int) -> SuperBlock:
    """The internal hugetlbfs mount of an hstate (``hugetlbfs_vfsmount[hstate_index]``).  Kept on the machine:
    a module-level table keyed by the machine (even weakly) would keep it alive through the mount's own
    reference to it -- every machine that ever mapped MAP_HUGETLB, with all its arrays and page bytes."""
    per = machine.__dict__.setdefault("_hugetlbfs_vfsmount", {})
    sb = per.get(hsize)
    if sb is None:
        sb = per[hsize] = SuperBlock(machine, f"<hugetlbfs {hsize >> 20}M>", "hugetlbfs", HugetlbFs(machine),
                                     pagesize=hsize)
        sb.s_fs_info["internal"] = True
    return sb


def hstate_sizelog(log: int) -> int:
    """hstate_sizelog(): the huge page size for a MAP_HUGE_* log2 (0: the default, 2 MiB), or 0."""
    if log == 0:
        return PMD_SIZE
    size = 1 << log
    return size if size in HUGE_SHIFTS else 0


def hugetlb_file_setup(machine: "Machine", length: int, map_flags: int) -> File | int:
    """hugetlb_file_setup() for ``MAP_HUGETLB`` (mm/mmap.c ksys_mmap_pgoff): an unlinked hugetlbfs file of
    ``ALIGN(length, huge page size)`` bytes; -EINVAL for an unknown MAP_HUGE_* size."""
    hsize = hstate_sizelog((map_flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK)
    if not hsize:
        return -EINVAL
    size = (length + hsize - 1) & ~(hsize - 1)
    sb = hugetlbfs_vfsmount(machine, hsize)
    inode = Inode(sb, "anon_hugepage (deleted)", size, HUGE_SHIFTS[hsize])
    inode.unlinked = True
    inode.release_on_last_unmap = True                # only the VMA (and its copies) hold the file
    return File(inode, readable=True, writable=True, map_flags=map_flags)

