"""Mounts, file creation, open(2) and truncate(2): the VFS entry points the :class:`~hmmirror.machine.Machine`
methods call (fs/super.c, fs/namei.c, fs/open.c).

A mount is a :class:`SuperBlock` whose ``s_type`` is a :class:`FileSystemType`: the object that creates inodes,
implements ``f_op->mmap`` and size changes for that filesystem.  The built-in types are

* ``ext4`` / ``xfs``: page cache (:mod:`hmmirror.fs.filemap`),
* ``tmpfs``: shmem (:mod:`hmmirror.fs.shmem`; ``huge="always"`` gives PMD-sized pages),
* ``hugetlbfs``: hugetlb pages (:mod:`hmmirror.fs.hugetlbfs`; ``pagesize`` 2 MiB or 1 GiB).

**fsdax hook.**  ``mount(..., fstype="ext4"|"xfs", dax="pmem0")`` delegates the filesystem to a DAX backend:
a callable ``backend(machine, sb) -> FileSystemType`` registered with :func:`register_dax_backend`.  If none is
registered, ``mount`` imports :mod:`hmmirror.fs.dax` (which may register itself at import) and otherwise calls
its ``dax_fs_ops(machine, sb)``.  ``sb.dax`` names the pmem device, ``sb.fstype`` is ``"ext4"`` or ``"xfs"``.
The returned type must implement the :class:`FileSystemType` methods (subclassing it is easiest: the default
``setattr_size`` already unmaps and drops the page cache; a DAX type overrides ``new_inode``, ``mmap`` and
whatever else differs).

**Devices.**  ``open_file("/dev/dax...")`` returns ``machine.devices[path].open(map_flags, writable)``;
``open_file("pfnmap")`` returns :func:`hmmirror.drivers.pfnmap.open_pfnmap` ``(machine)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.errors import InputError, KernelError
from hmmirror.fs.file import DATA, HOLE, UNWRITTEN, File, Inode, pages_of
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen

if TYPE_CHECKING:
    from hmmirror.machine import Machine
    from hmmirror.mm.mm_struct import VMA

CONTENTS = {"data": DATA, "sparse": HOLE, "zero": UNWRITTEN}
HUGE_MODES = ("never", "always", "within_size", "advise")


class FileSystemType:
    """``struct file_system_type`` + the inode/file operations the model needs.  Subclasses per filesystem."""

    name = "fs"

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine

    def new_inode(self, sb: "SuperBlock", path: str, size: int, content: str) -> Inode:
        """Create a regular file of ``size`` bytes (``content``: "data", "sparse" or "zero")."""
        inode = Inode(sb, path, size)
        inode.set_blocks(0, pages_of(size), CONTENTS[content])
        return inode

    def mmap(self, file: File, vma: "VMA") -> int:
        """``f_op->mmap``: set ``vma.vm_ops`` (and flags); 0 or -errno."""
        return -19                                           # -ENODEV

    def mmap_align(self, inode: Inode) -> int:
        """The alignment get_unmapped_area gives mappings of this file."""
        return PAGE_SIZE

    def huge_enabled(self, inode: Inode) -> bool:
        """May this file's mappings get PMD leaves from ``transparent_hugepage_enabled`` (shmem)?"""
        return False

    def setattr_size(self, inode: Inode, size: int) -> Gen[int]:
        """``->setattr(ATTR_SIZE)``: truncate_setsize() (shrinking: truncate_pagecache(), mm/truncate.c);
        the blocks past the new EOF are freed."""
        from hmmirror.mm.truncate import truncate_setsize

        yield from truncate_setsize(inode, size)
        inode.blocks[pages_of(size):] = HOLE
        return 0

    def punch_hole(self, inode: Inode, offset: int, length: int) -> Gen[int]:
        """``fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE)`` (ext4_punch_hole / shmem_fallocate):
        unmap the whole pages of the hole from every mapping (private COW copies stay), drop them from the
        page cache, free their blocks."""
        from hmmirror.mm.truncate import truncate_pagecache_range

        if length <= 0:
            return -22
        end = min(offset + length, inode.i_size)
        if end > offset:
            yield from truncate_pagecache_range(inode, offset, end - 1)
            first, last = pages_of(offset), end >> PAGE_SHIFT
            if last > first:
                inode.blocks[first:min(last, inode.blocks.shape[0])] = HOLE
        return 0


class SuperBlock:
    """``struct super_block``: one mount."""

    def __init__(self, machine: "Machine", path: str, fstype: str, s_type: FileSystemType | None,
                 dax: str | None = None, huge: str = "never", pagesize: int | None = None) -> None:
        self.machine = machine
        self.path = path
        self.fstype = fstype
        self.s_type: FileSystemType = s_type if s_type is not None else FileSystemType(machine)
        self.dax = dax
        self.huge = huge
        self.pagesize = pagesize
        self.s_fs_info: dict[str, Any] = {}

    def __repr__(self) -> str:
        extra = f" dax={self.dax}" if self.dax else (f" huge={self.huge}" if self.huge != "never" else "")
        return f"SuperBlock({self.path} {self.fstype}{extra})"


# --- filesystem registry ---------------------------------------------------------------------------------
def _page_cache_fs(machine: "Machine", sb: SuperBlock) -> FileSystemType:
    from hmmirror.fs.filemap import PageCacheFs
    return PageCacheFs(machine)


def _tmpfs(machine: "Machine", sb: SuperBlock) -> FileSystemType:
    from hmmirror.fs.shmem import ShmemFs
    return ShmemFs(machine)


def _hugetlbfs(machine: "Machine", sb: SuperBlock) -> FileSystemType:
    from hmmirror.fs.hugetlbfs import HugetlbFs
    return HugetlbFs(machine)


#: fstype -> factory(machine, sb) -> FileSystemType
FS_TYPES: dict[str, Callable[["Machine", SuperBlock], FileSystemType]] = {
    "ext4": _page_cache_fs,
    "xfs": _page_cache_fs,
    "tmpfs": _tmpfs,
    "hugetlbfs": _hugetlbfs,
}

_dax_backend: Callable[["Machine", SuperBlock], FileSystemType] | None = None


def register_dax_backend(backend: Callable[["Machine", SuperBlock], FileSystemType] | None) -> None:
    """Install the fsdax backend: ``backend(machine, sb) -> FileSystemType`` for ``-o dax`` mounts."""
    global _dax_backend
    _dax_backend = backend


def _dax_fs(machine: "Machine", sb: SuperBlock) -> FileSystemType:
    if _dax_backend is None:
        try:
            import hmmirror.fs.dax as dax
        except ImportError:
            raise InputError("fsdax is not available in this build (no hmmirror.fs.dax)", "ENODEV") from None
        if _dax_backend is None:
            fn = getattr(dax, "dax_fs_ops", None)
            if fn is None:
                raise InputError("hmmirror.fs.dax registers no DAX backend", "ENODEV")
            return fn(machine, sb)  # type: ignore[no-any-return]
    return _dax_backend(machine, sb)


# --- mount / create / open / truncate ----------------------------------------------------------------------
def _norm(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InputError(f"{what}: path must be an absolute path, not {path!r}", "EINVAL")
    return path.rstrip("/") or "/"


def mount(machine: "Machine", path: str, fstype: str, dax: str | None = None, huge: str = "never",
          pagesize: int | None = None) -> SuperBlock:
    """mount(2): ext4/xfs (optionally ``-o dax`` on a pmem device), tmpfs (``huge=``), hugetlbfs
    (``pagesize=``).  Returns the superblock."""
    path = _norm(path, "mount")
    if path in machine.mounts:
        raise InputError(f"mount: {path} is already mounted", "EBUSY")
    if fstype not in FS_TYPES:
        raise InputError(f"mount: unknown filesystem type {fstype!r} (known: {', '.join(sorted(FS_TYPES))})",
                         "ENODEV")
    if dax is not None and fstype not in ("ext4", "xfs"):
        raise InputError(f"mount: -o dax needs ext4 or xfs, not {fstype}")
    if huge not in HUGE_MODES:
        raise InputError(f"mount: huge={huge!r} is not one of {', '.join(HUGE_MODES)}")
    if huge != "never" and fstype != "tmpfs":
        raise InputError(f"mount: huge= is a tmpfs option, not one of {fstype}")
    if fstype == "hugetlbfs":
        pagesize = PMD_SIZE if pagesize is None else pagesize
        if pagesize not in (PMD_SIZE, PUD_SIZE):
            raise InputError(f"mount: hugetlbfs pagesize must be 2 MiB or 1 GiB, not {pagesize}")
    elif pagesize is not None:
        raise InputError(f"mount: pagesize= is a hugetlbfs option, not one of {fstype}")
    sb = SuperBlock(machine, path, fstype, None, dax=dax, huge=huge, pagesize=pagesize)
    if dax is not None:
        if dax not in machine.devices:
            raise InputError(f"mount: no pmem device named {dax!r}", "ENODEV")
        sb.s_type = _dax_fs(machine, sb)
    else:
        sb.s_type = FS_TYPES[fstype](machine, sb)
    machine.mounts[path] = sb
    machine.log("mount", path=path, fstype=fstype, dax=dax, huge=huge, pagesize=pagesize)
    return sb


def find_mount(machine: "Machine", path: str) -> SuperBlock:
    """The mount holding ``path`` (longest mount-point prefix), or InputError ENOENT."""
    best = None
    for mp, sb in machine.mounts.items():
        prefix = mp if mp.endswith("/") else mp + "/"
        if path.startswith(prefix) and (best is None or len(mp) > len(best.path)):
            best = sb
    if best is None:
        raise InputError(f"{path}: not under any mount point", "ENOENT")
    return best


def create_file(machine: "Machine", path: str, size: int, content: str = "data", cached: bool = True) -> Inode:
    """Create a regular file (``content``: "data" every page written, "sparse" a hole, "zero" fallocated).

    ``cached=False``: the written pages are dropped from the page cache afterwards (as after writeback and
    POSIX_FADV_DONTNEED or drop_caches): the file starts cold."""
    path = _norm(path, "create_file")
    if path in machine.files:
        raise InputError(f"create_file: {path} already exists", "EEXIST")
    if not isinstance(size, int) or size < 0:
        raise InputError(f"create_file: size must be a non-negative integer, not {size!r}")
    if content not in CONTENTS:
        raise InputError(f"create_file: content must be one of {', '.join(CONTENTS)}, not {content!r}")
    sb = find_mount(machine, path)
    inode = sb.s_type.new_inode(sb, path, size, content)
    machine.files[path] = inode
    if not cached and getattr(inode, "i_mapping", None) is not None and inode.i_mapping.nrpages:
        from hmmirror.mm.truncate import invalidate_mapping_pages
        invalidate_mapping_pages(inode.i_mapping, 0, inode.i_mapping.pages.shape[0])
    machine.log("create_file", path=path, size=size, content=content)
    return inode


def open_file(machine: "Machine", path: str, map_flags: int = 0, writable: bool = True) -> Any:
    """open(2): a File for a regular file, or the device's file for ``/dev/dax*`` and ``"pfnmap"``."""
    if path == "pfnmap":
        from hmmirror.drivers.pfnmap import open_pfnmap
        return open_pfnmap(machine)
    if not isinstance(path, str):
        raise InputError(f"open: path must be a string, not {path!r}")
    inode = machine.files.get(path)
    if inode is not None:
        return File(inode, readable=True, writable=writable, map_flags=map_flags)
    dev = machine.devices.get(path) if path.startswith("/dev/") else None
    if dev is not None and hasattr(dev, "open"):            # /dev/daxX.Y (device-dax character devices)
        return dev.open(map_flags, writable)
    raise InputError(f"open: no such file or device {path!r}", "ENOENT")


def vfs_fallocate_punch_hole(file: File, offset: int, length: int) -> Gen[int]:
    """vfs_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) (fs/open.c), as MADV_REMOVE uses it:
    0 or -errno (-EOPNOTSUPP where the filesystem cannot punch holes)."""
    punch = getattr(file.f_op, "punch_hole", None)
    if punch is None:
        return -95
    return (yield from punch(file.inode, offset, length))


def truncate(machine: "Machine", path: str, size: int) -> int:
    """truncate(2): set the size; shrinking unmaps the tail from every mapping and drops its cache."""
    inode = machine.files.get(path)
    if inode is None:
        raise InputError(f"truncate: no file {path!r}", "ENOENT")
    if not isinstance(size, int) or size < 0:
        raise InputError(f"truncate: size must be a non-negative integer, not {size!r}")
    task = sched.Task(f"truncate({path})", "cpu")
    ret = sched.run(inode.sb.s_type.setattr_size(inode, size), task)
    if isinstance(ret, int) and ret < 0:
        raise KernelError(-ret, f"truncate {path}")
    machine.log("truncate", path=path, size=size)
    return 0

