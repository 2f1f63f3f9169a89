"""shmem: tmpfs files, memfd and shared anonymous memory (mm/shmem.c).

Rules (mm-substrate.md §4.2, §5.6, obs B1-B6, C1/C2/C9, H-T1..3):

* A fault allocates the page in the shmem file (no zero page, even for a read), so a hole read gives one new
  page; fault-around maps only pages already in the file (filemap_map_pages is shared with the page cache).
* No ``page_mkwrite``, no dirty accounting: no write-notify, so a writable shared mapping gets writable
  entries from the first (read) fault.
* Pages stay in the file when mappings are zapped (``MADV_DONTNEED``: a re-read maps the same pfns);
  ``MADV_REMOVE`` / hole punch / truncate free them.
* ``huge=always`` mounts (and shared anonymous memory when ``thp.shmem_enabled`` is "always"/"force") allocate
  a 2 MiB folio for a fault whose 2 MiB-aligned file block lies below EOF, is not cached yet and fits the
  VMA (VA and offset congruent); it is PMD-mapped by finish_fault/fault-around (do_set_pmd).  A private
  write to such a PMD clears the PMD and maps one anonymous 4 KiB copy (obs H-T3: wp_huge_pmd splits a file
  PMD by clearing it; do_cow_fault then copies the page).  Model simplification: the kernel's
  ``huge=always`` may also allocate a huge page reaching past EOF; the model requires the block below EOF.
* Fallocated pages ("zero" files) are allocated but not uptodate until first faulted (fault-around skips
  them; the fault clears and marks them uptodate), as shmem_fallocate leaves them.
* Hole punching (``fallocate(PUNCH_HOLE)``, MADV_REMOVE) is :func:`shmem_fallocate`: under the inode lock it
  publishes the hole in ``inode->i_private`` (:class:`ShmemFalloc`), unmaps it, truncates it, then clears it
  and wakes the faults that came into the hole meanwhile: :func:`shmem_fault` waits there
  (``shmem_falloc_wait``) and returns VM_FAULT_RETRY (mmap lock dropped) or VM_FAULT_NOPAGE without a page,
  so that faults cannot keep refilling a hole being punched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hmmirror.arch.x86.pgtable import HPAGE_PMD_NR, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE
from hmmirror.errors import InputError
from hmmirror.fs.file import File, Inode, pages_of
from hmmirror.fs.filemap import filemap_map_pages
from hmmirror.fs.super import FileSystemType, SuperBlock
from hmmirror.include.mm_types import FAULT_FLAG, VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen, Lock
from hmmirror.mm.folio import folio_test_locked, folio_trylock
from hmmirror.mm.memory import VmFault, transhuge_vma_suitable
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.page_alloc import PG

if TYPE_CHECKING:
    from hmmirror.machine import Machine


def shmem_huge_mode(inode: Inode) -> str:
    """The huge= policy of the inode's mount; the internal mount (shared anon, memfd) follows
    /sys/kernel/mm/transparent_hugepage/shmem_enabled."""
    sb = inode.sb
    if sb.s_fs_info.get("internal"):
        return str(sb.machine.thp.shmem_enabled)
    return str(sb.huge)


def shmem_huge_wanted(inode: Inode, vma: VMA | None) -> bool:
    """shmem_is_huge(): may a fault through ``vma`` allocate a PMD-sized folio in this file?"""
    mode = shmem_huge_mode(inode)
    if vma is not None and vma.vm_flags & VM.NOHUGEPAGE:
        return mode == "force"
    if mode in ("always", "force", "within_size"):
        return True
    if mode == "advise":
        return vma is not None and bool(vma.vm_flags & VM.HUGEPAGE)
    return False


def _add_small(machine: "Machine", inode: Inode, index: int, uptodate: bool = True) -> int:
    mem = machine.mem
    pfn = mem.alloc_page()
    if pfn < 0:
        return -1
    inode.i_mapping.add_to_page_cache(index, pfn)
    mem.flags[pfn] = PG.swapbacked | (PG.uptodate if uptodate else 0)
    machine.counters["shmem_pages"] += 1
    return pfn


def _add_huge(machine: "Machine", inode: Inode, hindex: int, uptodate: bool = True) -> int:
    mem = machine.mem
    head = mem.alloc_folio(9)
    if head < 0:
        return -1
    inode.i_mapping.add_to_page_cache(hindex, head, HPAGE_PMD_NR)
    mem.flags[head: head + HPAGE_PMD_NR] |= np.uint32(PG.swapbacked | (PG.uptodate if uptodate else 0))
    machine.counters["shmem_thp"] += 1
    return head


def shmem_alloc_and_add(machine: "Machine", inode: Inode, index: int, vma: VMA | None, address: int,
                        uptodate: bool = True) -> int:
    """shmem_alloc_and_acct_page() + shmem_add_to_page_cache(): a new page (or the subpage of a new 2 MiB
    folio when the huge policy allows it) cached at ``index``; its pfn, or -1 when memory is exhausted."""
    if shmem_huge_wanted(inode, vma):
        hindex = index & ~(HPAGE_PMD_NR - 1)
        fits = hindex + HPAGE_PMD_NR <= inode.nr_pages and inode.i_mapping.range_empty(hindex, hindex + HPAGE_PMD_NR)
        if fits and vma is not None:
            fits = transhuge_vma_suitable(vma, address & ~(PMD_SIZE - 1))
        if fits:
            head = _add_huge(machine, inode, hindex, uptodate)
            if head >= 0:
                return head + (index - hindex)
    return _add_small(machine, inode, index, uptodate)


@dataclass(eq=False)
class ShmemFalloc:
    """``struct shmem_falloc`` (mm/shmem.c): the hole a PUNCH_HOLE is punching, published in ``inode->i_private``
    (here ``inode.private["shmem_falloc"]``): page indices ``[start, next)``; ``waitq``: faults into it wait."""

    start: int
    next: int
    waitq: bool = True


def shmem_inode_lock(inode: Inode) -> Lock:
    """``inode->i_rwsem`` of a shmem inode (inode_lock()), made on first use; one lockdep class for all."""
    lock = inode.private.get("i_rwsem")
    if lock is None:
        lock = inode.private["i_rwsem"] = sched.lockdep_set_class(Lock(f"{inode.path}.i_rwsem", "rwsem"),
                                                                   "&sb->s_type->i_mutex_key")
    return lock


def shmem_falloc_wait(vmf: VmFault, inode: Inode) -> Gen[int]:
    """shmem_falloc_wait() (mm/shmem.c, 6.x; inline in 5.2 shmem_fault): a fault into the hole a punch is
    punching sleeps until the punch ends (``wake_up_all(shmem_falloc_waitq)``) and returns without a page:
    VM_FAULT_RETRY with the mmap lock dropped when the fault may retry (maybe_unlock_mmap_for_io), else
    VM_FAULT_NOPAGE (the access faults again).  0 when the fault is outside the hole."""
    falloc = inode.private.get("shmem_falloc")
    if falloc is None or not falloc.waitq or not falloc.start <= vmf.pgoff < falloc.next:
        return 0
    ret = int(VM_FAULT.NOPAGE)
    mm = vmf.mm
    if (vmf.flags & (FAULT_FLAG.ALLOW_RETRY | FAULT_FLAG.RETRY_NOWAIT)) == FAULT_FLAG.ALLOW_RETRY:
        sched.up_read(mm.mmap_sem)
        ret = int(VM_FAULT.RETRY)
    mm.machine.counters["shmem_falloc_wait"] += 1
    yield from sched.wait_event(lambda: inode.private.get("shmem_falloc") is not falloc, "shmem_falloc_waitq")
    return ret


def shmem_fallocate(file: File, mode: int, offset: int, length: int) -> Gen[int]:
    """shmem_fallocate() (mm/shmem.c), ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` (madvise_remove, and
    fallocate through :meth:`ShmemFs.punch_hole`; an allocating fallocate is -EOPNOTSUPP in the model): under ``inode_lock``, publish the hole
    (:class:`ShmemFalloc`), unmap its whole pages from every mapping keeping private COW copies, truncate it
    (shmem_truncate_range: partial pages zeroed, whole ones dropped -- a folio still mapped is unmapped
    first), then clear ``i_private`` and wake the faults waiting in :func:`shmem_falloc_wait`."""
    from hmmirror.mm.madvise import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    if not mode & FALLOC_FL_PUNCH_HOLE or not mode & FALLOC_FL_KEEP_SIZE:
        return -95                                        # EOPNOTSUPP (-EINVAL for PUNCH_HOLE alone: vfs)
    return (yield from shmem_punch_hole(file.inode, offset, length))


def shmem_punch_hole(inode: Inode, offset: int, length: int) -> Gen[int]:
    """shmem_fallocate()'s FALLOC_FL_PUNCH_HOLE branch on ``inode`` (see :func:`shmem_fallocate`)."""
    from hmmirror.mm.truncate import truncate_inode_pages_range, unmap_mapping_range

    if length <= 0:
        return -22
    lock = shmem_inode_lock(inode)
    yield from sched.down_write(lock)
    try:
        unmap_start = (offset + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        unmap_end = ((offset + length) & ~(PAGE_SIZE - 1)) - 1
        falloc = ShmemFalloc(unmap_start >> PAGE_SHIFT, (unmap_end + 1) >> PAGE_SHIFT)
        inode.private["shmem_falloc"] = falloc                # inode->i_private = &shmem_falloc
        try:
            if unmap_end > unmap_start:
                yield from unmap_mapping_range(inode.i_mapping, unmap_start, 1 + unmap_end - unmap_start, False)
            yield from truncate_inode_pages_range(inode.i_mapping, offset, offset + length - 1)
        finally:
            inode.private["shmem_falloc"] = None          # i_private = NULL; wake_up_all(&shmem_falloc_waitq)
    finally:
        sched.up_write(lock)
    return 0


def shmem_fault(vmf: VmFault) -> Gen[int]:
    """shmem_fault() -> shmem_getpage_gfp(SGP_CACHE) (mm/shmem.c): find or allocate the page; ``vmf.page``
    referenced and locked (VM_FAULT_LOCKED).  VM_FAULT_SIGBUS at or beyond EOF, VM_FAULT_OOM when no page can be allocated; a fault into a
    hole being punched waits for the punch (:func:`shmem_falloc_wait`) and returns without a page."""
    vma, mm = vmf.vma, vmf.mm
    machine, mem = mm.machine, mm.machine.mem
    inode: Inode = vma.vm_file.inode
    mapping = inode.i_mapping
    index = vmf.pgoff
    if inode.private.get("shmem_falloc") is not None:   # unlikely(inode->i_private)
        ret = yield from shmem_falloc_wait(vmf, inode)
        if ret:
            return ret
    if index >= inode.nr_pages:
        return int(VM_FAULT.SIGBUS)
    pfn = mapping.find_page(index)
    if pfn < 0:
        yield from sched.might_sleep("shmem_alloc_page")
        pfn = mapping.find_page(index)                    # another task may have added it meanwhile
        if pfn < 0:
            if index >= inode.nr_pages:
                return int(VM_FAULT.SIGBUS)
            pfn = shmem_alloc_and_add(machine, inode, index, vma, vmf.address)
            if pfn < 0:
                return int(VM_FAULT.OOM)
    while not folio_trylock(mem, pfn):
        yield from sched.wait_event(lambda p=pfn: not folio_test_locked(mem, p), "lock_page")
        pfn = mapping.find_page(index)
        if pfn < 0:
            return int(VM_FAULT.SIGBUS) if index >= inode.nr_pages else 0
    if not mem.flags[pfn] & PG.uptodate:                  # a fallocated page: cleared on first use
        mem.clear(pfn)
        mem.flags[pfn] |= PG.uptodate
    mem.get_page(pfn)
    vmf.page = pfn
    return int(VM_FAULT.LOCKED)                           # shmem_get_folio_gfp() returns it locked


class ShmemVmOps(VmOps):
    """shmem_vm_ops: ``fault`` and ``map_pages``; no ``page_mkwrite`` and no dirty accounting."""

    name = "shmem"
    is_shmem = True
    fault = staticmethod(shmem_fault)
    map_pages = staticmethod(filemap_map_pages)


SHMEM_VM_OPS = ShmemVmOps()


class ShmemFs(FileSystemType):
    """tmpfs: files whose pages live only in the page cache ("data": every page allocated now, dirty;
    "zero": fallocated pages, not uptodate; "sparse": nothing).  ENOSPC when RAM cannot hold them."""

    name = "tmpfs"

    def new_inode(self, sb: SuperBlock, path: str, size: int, content: str) -> Inode:
        inode = super().new_inode(sb, path, size, content)
        if content == "sparse":
            return inode
        n = pages_of(size)
        mem = self.machine.mem
        if n > mem.nr_free_pages():
            raise InputError(f"create_file: {path}: tmpfs cannot hold {n} pages in RAM", "ENOSPC")
        uptodate = content == "data"
        index = 0
        while index < n:
            if index % HPAGE_PMD_NR == 0 and index + HPAGE_PMD_NR <= n and shmem_huge_wanted(inode, None):
                if _add_huge(self.machine, inode, index, uptodate) >= 0:
                    index += HPAGE_PMD_NR
                    continue
            if _add_small(self.machine, inode, index, uptodate) < 0:
                raise InputError(f"create_file: {path}: out of memory", "ENOSPC")
            index += 1
        if uptodate:
            pfns = inode.i_mapping.pages[:n]
            mem.flags[pfns] |= np.uint32(PG.dirty)
        return inode

    def mmap(self, file: File, vma: VMA) -> int:
        """shmem_mmap()."""
        vma.vm_ops = SHMEM_VM_OPS
        return 0

    def punch_hole(self, inode: Inode, offset: int, length: int) -> Gen[int]:
        """``fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE)``: shmem_fallocate() (:func:`shmem_punch_hole`)."""
        return (yield from shmem_punch_hole(inode, offset, length))

    def mmap_align(self, inode: Inode) -> int:
        """shmem_get_unmapped_area(): 2 MiB for files that may get huge pages."""
        return PMD_SIZE if shmem_huge_mode(inode) in ("always", "force", "within_size") else PAGE_SIZE

    def huge_enabled(self, inode: Inode) -> bool:
        return shmem_huge_mode(inode) != "never" and shmem_huge_mode(inode) != "deny"


# --- the internal mount: shared anonymous memory and memfd ----------------------------------------------
def shm_mnt(machine: "Machine") -> SuperBlock:
    """The kernel-internal tmpfs mount (``shm_mnt``) of a machine: shared anonymous memory and memfds.  Kept
    on the machine (a module-level table keyed by the machine kept every machine alive through the mount)."""
    sb = machine.__dict__.get("_shm_mnt")
    if sb is None:
        sb = SuperBlock(machine, "<shm_mnt>", "tmpfs", ShmemFs(machine))
        sb.s_fs_info["internal"] = True
        machine.__dict__["_shm_mnt"] = sb
    return sb


def shmem_file_setup(machine: "Machine", name: str, size: int) -> File:
    """shmem_file_setup() / shmem_kernel_file_setup(): an unlinked shmem file of ``size`` bytes."""
    sb = shm_mnt(machine)
    inode = Inode(sb, name, size)
    inode.unlinked = True
    return File(inode, readable=True, writable=True)


def memfd_create(machine: "Machine", name: str, size: int) -> File:
    """memfd_create(2) + ftruncate(2): a shmem file on the internal mount (map it with ``Process.mmap``)."""
    return shmem_file_setup(machine, f"memfd:{name}", size)


def shmem_zero_setup(vma: VMA) -> int:
    """shmem_zero_setup() (mm/shmem.c): back a ``MAP_SHARED|MAP_ANONYMOUS`` VMA by an unlinked shmem file of
    the VMA's size.  do_mmap ignores the offset of a shared anonymous mapping (pgoff = 0)."""
    machine = vma.vm_mm.machine
    file = shmem_file_setup(machine, "/dev/zero (deleted)", vma.vm_end - vma.vm_start)
    file.inode.release_on_last_unmap = True           # only the VMA (and its copies) hold the file
    vma.vm_pgoff = 0
    vma.vm_file = file
    vma.vm_ops = SHMEM_VM_OPS
    file.inode.i_mmap.append(vma)
    return 0
