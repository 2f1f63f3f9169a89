"""Per-page state of a real process, read from the host kernel (read-only on the target).

Sources, all read from outside the target process:

- ``/proc/PID/pagemap``: one 64-bit entry per virtual page (bit 63 present, 62 swap-format entry, 61 file
  page or shared anon, 58 guard marker [6.15+], 57 uffd-wp, 56 mapped exactly once, 55 soft-dirty, 0-54 pfn,
  zeroed without ``CAP_SYS_ADMIN``, or swap type (bits 0-4) and offset).
- ``/proc/kpageflags``: one 64-bit ``KPF_*`` word per pfn (root only).
- the ``PAGEMAP_SCAN`` ioctl on the same pagemap fd [6.7+]: ``PAGE_IS_HUGE`` marks pages mapped by a PMD or
  PUD leaf (THP, hugetlb), ``PAGE_IS_PFNZERO`` the zero page even when pfns are hidden.
- ``/proc/PID/maps`` and ``/proc/PID/mountinfo``: the VMAs, to tell shmem from file; ``/proc/PID/smaps``
  only when a VMA in the range may be hugetlb, a device or PFNMAP (``VmFlags``, ``KernelPageSize``).

The result is a list of :class:`~hmmirror.include.pagestate.PageState`, one per 4 KiB page; fields the host
does not expose are ``None`` (``write`` always: pagemap does not export the PTE write bit).

Field rules:

- ``kind`` of a present page, first match: PFNMAP VMA -> ``special``; zero page -> ``zero``; hugetlb VMA or
  ``KPF_HUGE`` -> ``hugetlb``; ``KPF_HWPOISON``; ``KPF_NOPAGE`` (ZONE_DEVICE) -> ``devmap``; ``KPF_ANON`` ->
  ``anon``; ``KPF_SWAPBACKED`` -> ``shmem``; else ``file``. Without kpageflags: bit 61 and the VMA's backing.
  Not present: swap-format -> ``marker`` (guard bit or swap type 31), ``migration``/``hwpoison`` where the
  kernel config fixes their type numbers, else ``swap``; otherwise ``none``.
- ``level``: ``pte`` unless ``PAGE_IS_HUGE``; a huge leaf is ``pmd``/``pud`` by the VMA's page size for
  hugetlb and device-dax, ``pmd`` for THP (anon, shmem, file, fsdax); None without PAGEMAP_SCAN.
- ``zero``: ``KPF_ZERO_PAGE`` (the 4 KiB zero page and the huge zero folio), else ``PAGE_IS_PFNZERO``.
- ``file``, ``exclusive``, ``swapped``: pagemap bits 61, 56, 62 as read (False where not present), except
  ``exclusive`` is None for PUD leaves (see :func:`_exclusive`).
- ``protnone``: True for present entries in a PROT_NONE VMA; False in accessible VMAs when NUMA balancing is
  off (else None: NUMA-hinting entries cannot be told from pagemap); False where not present.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import gc
import gzip
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from functools import lru_cache
from itertools import starmap

import numpy as np

from hmmirror.errors import InputError
from hmmirror.include.pagestate import FIELDS, PageState

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_GUARD_REGION = 1 << 58
PM_UFFD_WP = 1 << 57
PM_MMAP_EXCLUSIVE = 1 << 56
PM_SOFT_DIRTY = 1 << 55
PM_PFRAME_MASK = (1 << 55) - 1
SWP_TYPE_BITS = 5  # MAX_SWAPFILES_SHIFT: swap type in bits 0-4 of a swap-format pagemap entry
SWP_PTE_MARKER = (1 << SWP_TYPE_BITS) - 1  # the top swap type is always the PTE marker

#: Largest range one call reads (pages); 2**24 pages = 64 GiB of address space, 128 MiB of pagemap.
MAX_PAGES = 1 << 24


class KPF(IntEnum):
    """``/proc/kpageflags`` bits (include/uapi/linux/kernel-page-flags.h)."""

    KPF_LOCKED = 0
    KPF_ERROR = 1
    KPF_REFERENCED = 2
    KPF_UPTODATE = 3
    KPF_DIRTY = 4
    KPF_LRU = 5
    KPF_ACTIVE = 6
    KPF_SLAB = 7
    KPF_WRITEBACK = 8
    KPF_RECLAIM = 9
    KPF_BUDDY = 10
    KPF_MMAP = 11
    KPF_ANON = 12
    KPF_SWAPCACHE = 13
    KPF_SWAPBACKED = 14
    KPF_COMPOUND_HEAD = 15
    KPF_COMPOUND_TAIL = 16
    KPF_HUGE = 17
    KPF_UNEVICTABLE = 18
    KPF_HWPOISON = 19
    KPF_NOPAGE = 20
    KPF_KSM = 21
    KPF_THP = 22
    KPF_OFFLINE = 23
    KPF_ZERO_PAGE = 24
    KPF_IDLE = 25
    KPF_PGTABLE = 26


class PageIs(IntFlag):
    """``PAGE_IS_*`` categories of the ``PAGEMAP_SCAN`` ioctl (include/uapi/linux/fs.h)."""

    PAGE_IS_WPALLOWED = 1 << 0
    PAGE_IS_WRITTEN = 1 << 1
    PAGE_IS_FILE = 1 << 2
    PAGE_IS_PRESENT = 1 << 3
    PAGE_IS_SWAPPED = 1 << 4
    PAGE_IS_PFNZERO = 1 << 5
    PAGE_IS_HUGE = 1 << 6
    PAGE_IS_SOFT_DIRTY = 1 << 7
    PAGE_IS_GUARD = 1 << 8  # [6.15+]


#: ``_IOWR('f', 16, struct pm_scan_arg)``, sizeof(struct pm_scan_arg) == 96.
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg``."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class PageRegion(ctypes.Structure):
    """``struct page_region``: ``[start, end)`` with its ``PAGE_IS_*`` categories."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


# --------------------------------------------------------------------------------------------- VMAs


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/smaps`` (kernel names where they exist)."""

    vm_start: int
    vm_end: int
    perms: str                  # "rw-p"
    offset: int                 # file offset in bytes (vm_pgoff << PAGE_SHIFT)
    dev: tuple[int, int]        # (major, minor)
    inode: int
    path: str                   # "" for anonymous; "[heap]"; "/dev/zero (deleted)" ...
    vm_flags: frozenset[str]    # smaps "VmFlags" mnemonics ("ht", "pf" ...); empty when read from maps
    kernel_page_size: int       # smaps "KernelPageSize" in bytes
    backing: str                # "anon", "file", "shmem", "hugetlb", "fsdax", "devdax", "pfnmap"

    @property
    def accessible(self) -> bool:
        """The VMA allows some access (PROT_NONE VMAs do not)."""
        return self.perms[:3] != "---"

    @property
    def shared(self) -> bool:
        """``VM_SHARED`` (maps shows ``s``)."""
        return self.perms[3] == "s"


def _proc_open(pid: int, name: str, flags: int = os.O_RDONLY) -> int:
    """Open ``/proc/PID/NAME``; a missing process or missing permission becomes one-line InputError."""
    path = f"/proc/{pid}/{name}"
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise InputError(f"no process with PID {pid}", errno="ESRCH") from None
    except PermissionError as exc:
        code = _errno.errorcode.get(exc.errno or _errno.EACCES, "EACCES")
        raise InputError(f"no permission to read {path} (need root or ptrace access)", errno=code) from None


def _proc_read_text(pid: int, name: str) -> str:
    """Whole text of ``/proc/PID/NAME`` (one-line InputError on failure)."""
    fd = _proc_open(pid, name)
    try:
        chunks = []
        while True:
            try:
                buf = os.read(fd, 1 << 20)
            except ProcessLookupError:
                raise InputError(f"process {pid} exited while reading {name}", errno="ESRCH") from None
            if not buf:
                break
            chunks.append(buf)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _parse_mountinfo(text: str) -> dict[tuple[int, int], tuple[str, str]]:
    """``(major, minor) -> (fstype, super options)`` from ``/proc/PID/mountinfo``."""
    out: dict[tuple[int, int], tuple[str, str]] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        major, _, minor = left.split()[2].partition(":")
        rparts = right.split()
        fstype = rparts[0] if rparts else ""
        sopts = rparts[2] if len(rparts) > 2 else ""
        out.setdefault((int(major), int(minor)), (fstype, sopts))
    return out


_SHMEM_PATH_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/")


def _backing(path: str, dev: tuple[int, int], flags: frozenset[str],
             mounts: dict[tuple[int, int], tuple[str, str]]) -> str:
    """What backs a VMA: decided from VmFlags first, then the filesystem of its device."""
    if "ht" in flags:
        return "hugetlb"
    if "pf" in flags:
        return "pfnmap"
    if not path.startswith("/"):
        return "anon"
    if path.startswith("/dev/dax"):
        return "devdax"
    fstype, sopts = mounts.get(dev, ("", ""))
    if fstype == "hugetlbfs":
        return "hugetlb"
    if fstype in ("tmpfs", "shmem"):
        return "shmem"
    if fstype in ("ext4", "xfs", "ext2") and "dax" in sopts.split(","):
        return "fsdax"
    if not fstype and path.startswith(_SHMEM_PATH_PREFIXES):
        return "shmem"
    return "file"


def _parse_header(line: str) -> tuple[int, int, str, int, tuple[int, int], int, str] | None:
    """Fields of a maps/smaps VMA header line, or None if the line is not a header."""
    parts = line.split(None, 5)
    if len(parts) < 5 or "-" not in parts[0] or ":" not in parts[3]:
        return None
    try:
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        return lo, hi, parts[1], int(parts[2], 16), (major, minor), int(parts[4]), \
            (parts[5].strip() if len(parts) > 5 else "")
    except ValueError:
        return None


_HEX = frozenset("0123456789abcdef")


def _iter_smaps(text: str, lo: int, hi: int) -> Iterator[tuple[tuple, dict[str, str]]]:
    """Yield ``(header fields, {KernelPageSize, VmFlags})`` per VMA of an smaps text overlapping [lo, hi).

    Header lines start with a lowercase hex digit, key lines with an uppercase letter; only the two
    keys we use are kept, and VMAs outside the range are skipped without parsing.
    """
    header: tuple | None = None
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if line[:1] in _HEX:
            if header is not None:
                yield header, keys
            header, keys = None, {}
            vstart, _, rest = line.partition("-")
            if int(vstart, 16) < hi and int(rest[:rest.index(" ")], 16) > lo:
                header = _parse_header(line)
        elif header is not None and line.startswith(("KernelPageSize:", "VmFlags:")):
            key, _, value = line.partition(":")
            keys[key] = value.strip()
    if header is not None:
        yield header, keys


def _needs_smaps(path: str, dev: tuple[int, int], mounts: dict[tuple[int, int], tuple[str, str]]) -> bool:
    """Whether a VMA's kind needs smaps (VmFlags, KernelPageSize): hugetlb, devices, internal mounts."""
    if not path.startswith("/"):
        return path.startswith("[vvar") or path.startswith("[vdso")  # special mappings: VM_PFNMAP-like
    if path.startswith("/dev/zero"):  # shared anonymous memory: shmem, never hugetlb or PFNMAP
        return False
    if path.startswith(("/dev/", "/anon_hugepage", "/memfd:")):
        return True
    return mounts.get(dev, ("",))[0] in ("", "hugetlbfs")


def read_vmas(pid: int, lo: int = 0, hi: int = 1 << 64) -> list[Vma]:
    """The VMAs of process ``pid`` overlapping ``[lo, hi)``, sorted by address.

    ``/proc/PID/maps`` is enough for anonymous memory and ordinary files; ``/proc/PID/smaps`` (slower: it
    walks every VMA's page tables) is read only when some VMA in the range needs VmFlags or KernelPageSize.
    """
    mounts = _parse_mountinfo(_proc_read_text(pid, "mountinfo"))
    heads = [h for h, _ in _iter_smaps(_proc_read_text(pid, "maps"), lo, hi)]
    if any(_needs_smaps(h[6], h[4], mounts) for h in heads):
        items = list(_iter_smaps(_proc_read_text(pid, "smaps"), lo, hi))
    else:
        items = [(h, {}) for h in heads]
    vmas = []
    for (vlo, vhi, perms, off, dev, inode, path), keys in items:
        flags = frozenset(keys.get("VmFlags", "").split())
        kps = int(keys.get("KernelPageSize", "4 kB").split()[0]) * 1024
        vmas.append(Vma(vlo, vhi, perms, off, dev, inode, path, flags, kps,
                        _backing(path, dev, flags, mounts)))
    return vmas


# ------------------------------------------------------------------------------------ raw readers


def check_range(start: int, end: int) -> None:
    """Validate ``[start, end)``: page-aligned, non-empty, inside 64-bit space, not absurdly large."""
    if start < 0 or end < 0:
        raise InputError(f"negative address in range [{start:#x}, {end:#x})")
    if start % PAGE_SIZE or end % PAGE_SIZE:
        raise InputError(f"range [{start:#x}, {end:#x}) is not 4 KiB aligned")
    if end <= start:
        raise InputError(f"empty range [{start:#x}, {end:#x}): END must be above START")
    if end > 1 << 64:
        raise InputError(f"range end {end:#x} overflows the 64-bit address space")
    if (end - start) >> PAGE_SHIFT > MAX_PAGES:
        raise InputError(f"range of {(end - start) >> PAGE_SHIFT} pages is larger than the limit {MAX_PAGES}")


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """pread until ``size`` bytes or end of data (pagemap stops at the task size)."""
    out = bytearray()
    while len(out) < size:
        try:
            chunk = os.pread(fd, min(size - len(out), 1 << 27), offset + len(out))
        except ProcessLookupError:
            raise InputError("process exited while reading its pagemap", errno="ESRCH") from None
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_pagemap_fd(fd: int, start: int, end: int) -> np.ndarray:
    """Pagemap entries of ``[start, end)`` from an open pagemap fd (one uint64 per page)."""
    n = (end - start) >> PAGE_SHIFT
    buf = _pread_all(fd, n * 8, (start >> PAGE_SHIFT) * 8)
    if len(buf) < n * 8:
        last = start + (len(buf) // 8) * PAGE_SIZE
        raise InputError(f"range [{start:#x}, {end:#x}) goes beyond the user address space "
                         f"(entries end at {last:#x})")
    return np.frombuffer(buf, dtype=np.uint64)


def read_pagemap(pid: int, start: int, end: int) -> np.ndarray:
    """Raw pagemap entries of process ``pid`` for ``[start, end)`` (one pread)."""
    check_range(start, end)
    fd = _proc_open(pid, "pagemap")
    try:
        return read_pagemap_fd(fd, start, end)
    finally:
        os.close(fd)


def _pfn_clusters(pfns: np.ndarray, gap: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi]`` clusters of sorted unique pfns where neighbours are at most ``gap`` apart."""
    if pfns.size == 0:
        return
    breaks = np.nonzero(np.diff(pfns) > gap)[0]
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [pfns.size - 1]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(pfns[s]), int(pfns[e])


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique values (sort-based: numpy 2's hash-based ``np.unique`` is slower here)."""
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


def read_kpageflags(pfns: np.ndarray, gap: int = 512) -> np.ndarray | None:
    """``KPF_*`` words for ``pfns`` (same shape), or None when ``/proc/kpageflags`` is not readable.

    Unique pfns are read in clusters (one pread per run of pfns closer than ``gap``), so a THP or a
    1 GiB hugetlb page costs one read.
    """
    try:
        fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        uniq = _sorted_unique(pfns.astype(np.uint64))
        flags = np.zeros(uniq.size, dtype=np.uint64)
        for lo, hi in _pfn_clusters(uniq, gap):
            words = np.frombuffer(_pread_all(fd, (hi - lo + 1) * 8, lo * 8), dtype=np.uint64)
            i, j = np.searchsorted(uniq, np.array([lo, hi + 1], dtype=np.uint64))
            idx = uniq[i:j] - np.uint64(lo)
            ok = idx < words.size
            flags[i:j][ok] = words[idx[ok].astype(np.int64)]
        return flags[np.searchsorted(uniq, pfns.astype(np.uint64))]
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _scan_return_mask() -> int:
    """Categories asked from PAGEMAP_SCAN (PAGE_IS_GUARD only where the kernel knows it)."""
    base = PageIs.PAGE_IS_HUGE | PageIs.PAGE_IS_PFNZERO | PageIs.PAGE_IS_PRESENT | PageIs.PAGE_IS_SWAPPED
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return int(base)
    try:
        probe = _scan_regions(fd, 0, PAGE_SIZE, int(base | PageIs.PAGE_IS_GUARD), 0)
        return int(base | PageIs.PAGE_IS_GUARD) if probe is not None else int(base)
    except OSError:
        return int(base)
    finally:
        os.close(fd)


def _scan_regions(fd: int, start: int, end: int, return_mask: int, anyof: int,
                  vec_len: int = 4096) -> list[tuple[int, int, int]] | None:
    """PAGEMAP_SCAN ``[start, end)``: ``(start, end, categories)`` regions; None if the ioctl is missing.

    Loop invariant: regions below ``arg.start`` are collected; the kernel resumes from ``walk_end``.
    """
    vec = (PageRegion * vec_len)()
    out: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        arg = PmScanArg(size=ctypes.sizeof(PmScanArg), start=pos, end=end, vec=ctypes.addressof(vec),
                        vec_len=vec_len, category_anyof_mask=anyof, return_mask=return_mask)
        n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.addressof(arg))
        if n < 0:
            err = ctypes.get_errno()
            if err in (_errno.ENOTTY, _errno.EINVAL):
                return None
            raise OSError(err, os.strerror(err))
        out.extend((vec[i].start, vec[i].end, vec[i].categories) for i in range(n))
        if arg.walk_end <= pos:
            break
        pos = arg.walk_end
    return out


def scan_categories_fd(fd: int, start: int, end: int) -> np.ndarray | None:
    """Per-page ``PAGE_IS_*`` words for pages that are huge, zero or guards; None without PAGEMAP_SCAN."""
    mask = _scan_return_mask()
    anyof = mask & int(PageIs.PAGE_IS_HUGE | PageIs.PAGE_IS_PFNZERO | PageIs.PAGE_IS_GUARD)
    try:
        regions = _scan_regions(fd, start, end, mask, anyof)
    except OSError:
        return None
    if regions is None:
        return None
    cats = np.zeros((end - start) >> PAGE_SHIFT, dtype=np.uint64)
    for lo, hi, c in regions:
        cats[(lo - start) >> PAGE_SHIFT:(hi - start) >> PAGE_SHIFT] = c
    return cats


# ------------------------------------------------------------------------------------ classification


@dataclass
class RawPages:
    """Everything read about ``[start, end)``, before classification (arrays are one entry per page)."""

    start: int
    entries: np.ndarray            # pagemap words
    kflags: np.ndarray | None      # KPF words (0 where not present); None if kpageflags unreadable
    cats: np.ndarray | None        # PAGE_IS_* words; None without PAGEMAP_SCAN
    vmas: list[Vma]                # VMAs overlapping the range
    vma_index: np.ndarray          # index into vmas per page, -1 outside any VMA
    numa_balancing: bool | None    # host NUMA balancing (protnone entries in accessible VMAs)


def _numa_balancing() -> bool | None:
    """Host ``kernel.numa_balancing`` (None if unreadable)."""
    try:
        with open("/proc/sys/kernel/numa_balancing") as f:
            return f.read().strip() != "0"
    except OSError:
        return None


def _vma_index(vmas: list[Vma], start: int, end: int) -> tuple[list[Vma], np.ndarray]:
    """VMAs overlapping ``[start, end)`` and, per page, the index of its VMA (-1 for none)."""
    idx = np.full((end - start) >> PAGE_SHIFT, -1, dtype=np.int32)
    hits = [v for v in vmas if v.vm_start < end and v.vm_end > start]
    for i, v in enumerate(hits):
        lo = (max(v.vm_start, start) - start) >> PAGE_SHIFT
        hi = (min(v.vm_end, end) - start) >> PAGE_SHIFT
        idx[lo:hi] = i
    return hits, idx


def _check_alive(pid: int) -> None:
    """ESRCH for a missing process or a zombie (its address space is gone)."""
    stat = _proc_read_text(pid, "stat")
    state = stat[stat.rfind(")") + 2:][:1]
    if state in ("Z", "X"):
        raise InputError(f"process {pid} has exited (zombie): no address space", errno="ESRCH")


def read_raw(pid: int, start: int, end: int) -> RawPages:
    """Read pagemap, kpageflags, PAGEMAP_SCAN categories and VMAs of ``[start, end)`` of ``pid``."""
    check_range(start, end)
    if not isinstance(pid, int) or pid <= 0:
        raise InputError(f"bad PID {pid!r}: must be a positive integer")
    _check_alive(pid)
    fd = _proc_open(pid, "pagemap")
    try:
        entries = read_pagemap_fd(fd, start, end)
        cats = scan_categories_fd(fd, start, end)
    finally:
        os.close(fd)
    vmas, vidx = _vma_index(read_vmas(pid, start, end), start, end)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    pfns = entries & np.uint64(PM_PFRAME_MASK)
    kflags = None
    if present.any() and np.any(pfns[present] != 0):
        got = read_kpageflags(pfns[present])
        if got is not None:
            kflags = np.zeros_like(entries)
            kflags[present] = got
    return RawPages(start, entries, kflags, cats, vmas, vidx, _numa_balancing())


def _bit(words: np.ndarray | None, bit: int) -> np.ndarray | None:
    """Boolean array of one bit (``bit`` is a bit number) of a word array."""
    if words is None:
        return None
    return (words >> np.uint64(bit)) & np.uint64(1) != 0


def _mask(words: np.ndarray | None, mask: int) -> np.ndarray | None:
    """Boolean array: any bit of ``mask`` set."""
    if words is None:
        return None
    return (words & np.uint64(mask)) != 0


def _vma_attr(raw: RawPages, fn: Callable[[Vma], object], default: object) -> np.ndarray:
    """Per-page array of ``fn(vma)`` (``default`` outside any VMA)."""
    table = np.array([fn(v) for v in raw.vmas] + [default])
    return table[raw.vma_index]  # index -1 picks the default


def _swap_kinds(entries: np.ndarray, swapped: np.ndarray) -> np.ndarray:
    """Kind of swap-format entries: guard/other PTE markers, otherwise ``swap``.

    Migration, device-private and hwpoison entries use swap types whose numbering depends on the kernel
    configuration; they are reported as ``swap`` except where :func:`_nonswap_types` can tell them apart.
    Without ``CAP_SYS_ADMIN`` the type field reads 0, so only guard markers (bit 58) are recognised.
    """
    kinds = np.full(entries.shape, "swap", dtype=object)
    swp_type = (entries & np.uint64((1 << SWP_TYPE_BITS) - 1)).astype(np.int64)
    for t, name in _nonswap_types().items():
        kinds[swapped & (swp_type == t)] = name
    kinds[swapped & ((swp_type == SWP_PTE_MARKER) | _mask(entries, PM_GUARD_REGION))] = "marker"
    return kinds


@lru_cache(maxsize=1)
def _nonswap_types() -> dict[int, str]:
    """Swap types of migration/hwpoison entries, when the kernel config makes the layout certain.

    include/linux/swap.h stacks from the top: PTE marker (31), device types, migration (3), hwpoison (1).
    Only without CONFIG_DEVICE_PRIVATE is the position of the migration types certain.
    """
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    except OSError:
        return {}
    if "CONFIG_DEVICE_PRIVATE=y" in config or "CONFIG_MIGRATION=y" not in config:
        return {}
    out = {SWP_PTE_MARKER - k: "migration" for k in (1, 2, 3)}
    if "CONFIG_MEMORY_FAILURE=y" in config:
        out[SWP_PTE_MARKER - 4] = "hwpoison"
    return out


def _present_kinds(raw: RawPages, zero: np.ndarray | None) -> np.ndarray:
    """Kind of present entries, from kpageflags where readable, else from pagemap bit 61 and the VMA."""
    n = raw.entries.size
    backing = _vma_attr(raw, lambda v: v.backing, "anon")
    file_bit = _mask(raw.entries, PM_FILE)
    kinds = np.full(n, "anon", dtype=object)
    if raw.kflags is not None:
        kf = raw.kflags
        kinds[~_bit(kf, KPF.KPF_ANON) & _bit(kf, KPF.KPF_SWAPBACKED)] = "shmem"
        kinds[~_bit(kf, KPF.KPF_ANON) & ~_bit(kf, KPF.KPF_SWAPBACKED)] = "file"
        kinds[_bit(kf, KPF.KPF_NOPAGE)] = "devmap"
        kinds[_bit(kf, KPF.KPF_HUGE)] = "hugetlb"
        kinds[_bit(kf, KPF.KPF_HWPOISON)] = "hwpoison"
    else:
        kinds[file_bit] = np.where(backing[file_bit] == "shmem", "shmem", "file")
        kinds[np.isin(backing, ("fsdax", "devdax"))] = "devmap"
    kinds[backing == "hugetlb"] = "hugetlb"
    if zero is not None:
        kinds[zero] = "zero"
    kinds[backing == "pfnmap"] = "special"
    return kinds


def _zero(raw: RawPages, present: np.ndarray) -> np.ndarray | None:
    """Per-page: the pfn is the 4 KiB zero page or part of the huge zero folio (None if unknown)."""
    if raw.kflags is not None:
        return _bit(raw.kflags, KPF.KPF_ZERO_PAGE) & present
    if raw.cats is not None:
        return _mask(raw.cats, PageIs.PAGE_IS_PFNZERO) & present
    return None


def _levels(raw: RawPages, present: np.ndarray, huge: np.ndarray | None) -> np.ndarray:
    """``pte``/``pmd``/``pud`` per present page (None where it cannot be told)."""
    levels = np.full(raw.entries.size, None, dtype=object)
    if huge is None:
        levels[present] = None
        return levels
    levels[present & ~huge] = "pte"
    backing = _vma_attr(raw, lambda v: v.backing, "anon")
    kps = _vma_attr(raw, lambda v: v.kernel_page_size, PAGE_SIZE)
    # hugetlb and device-dax: the leaf size is the VMA's page size; THP (anon, shmem, file, fsdax): PMD only
    sized = np.isin(backing, ("hugetlb", "devdax"))
    levels[present & huge & ~sized] = "pmd"
    levels[present & huge & sized & (kps == PMD_SIZE)] = "pmd"
    levels[present & huge & sized & (kps == PUD_SIZE)] = "pud"
    return levels


def _huge(raw: RawPages, present: np.ndarray) -> np.ndarray | None:
    """Per-page: mapped by a PMD/PUD leaf (PAGEMAP_SCAN ``PAGE_IS_HUGE``); None without the ioctl."""
    if raw.cats is None:
        return None
    return _mask(raw.cats, PageIs.PAGE_IS_HUGE) & present


def _protnone(raw: RawPages, present: np.ndarray) -> np.ndarray:
    """Per-page protnone: present in a PROT_NONE VMA is True; NUMA hints unknowable with balancing on."""
    accessible = _vma_attr(raw, lambda v: v.accessible, True)
    out = np.full(raw.entries.size, False, dtype=object)
    out[present & ~accessible] = True
    if raw.numa_balancing is not False:
        out[present & accessible] = None
    return out


def classify_columns(raw: RawPages) -> dict[str, list]:
    """Per-field columns (lists in :data:`~hmmirror.include.pagestate.FIELDS` order) of the page states."""
    e = raw.entries
    present = _mask(e, PM_PRESENT)
    swapped = _mask(e, PM_SWAP) & ~present
    zero = _zero(raw, present)
    huge = _huge(raw, present)
    kinds = np.where(present, _present_kinds(raw, zero), _swap_kinds(e, swapped))
    kinds[~present & ~swapped] = "none"
    pfn_ok = present & ((e & np.uint64(PM_PFRAME_MASK)) != 0)
    levels = _levels(raw, present, huge)
    return {
        "addr": (raw.start + (np.arange(e.size, dtype=np.int64) << PAGE_SHIFT)).tolist(),
        "present": present.tolist(),
        "pfn": np.where(pfn_ok, (e & np.uint64(PM_PFRAME_MASK)).astype(object), None).tolist(),
        "kind": kinds.tolist(),
        "level": levels.tolist(),
        "write": [None] * e.size,
        "zero": (zero.tolist() if zero is not None else _unknown_when(present)),
        "huge": (huge.tolist() if huge is not None else _unknown_when(present)),
        "file": _mask(e, PM_FILE).tolist(),
        "exclusive": _exclusive(e, levels),
        "swapped": _mask(e, PM_SWAP).tolist(),
        "protnone": _protnone(raw, present).tolist(),
    }


def _exclusive(entries: np.ndarray, levels: np.ndarray) -> list[bool | None]:
    """Pagemap bit 56; None for PUD leaves, where 6.18 reports it inconsistently.

    Observed on 6.18: a private 1 GiB hugetlb page mapped once reads bit 56 set in some runs and clear
    in others for the same state (2 MiB pages are stable). The bit is derived through
    ``hugetlb_pmd_shared()`` on the PUD table, so it is not trusted there.
    """
    out = np.where(_mask(entries, PM_MMAP_EXCLUSIVE), True, False).astype(object)
    out[levels == "pud"] = None
    return out.tolist()


def classify(raw: RawPages) -> list[PageState]:
    """Turn raw arrays into one :class:`PageState` per page (unknown fields are ``None``)."""
    cols = classify_columns(raw)
    was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of small objects: collection passes would dominate
    try:
        return list(starmap(PageState, zip(*(cols[name] for name in FIELDS))))
    finally:
        if was_enabled:
            gc.enable()


def _unknown_when(present: np.ndarray) -> list[bool | None]:
    """``None`` for present pages (the host does not say), ``False`` for the rest."""
    return [None if p else False for p in present.tolist()]


def read_range(pid: int, start: int, end: int) -> list[PageState]:
    """Per-page state of ``[start, end)`` in process ``pid``: one :class:`PageState` per 4 KiB page.

    Read-only on the target. Raises :class:`~hmmirror.errors.InputError` (one line; errno ``ESRCH``,
    ``EACCES``/``EPERM`` or ``EINVAL``) for a missing process, missing permission or a bad range.
    """
    return classify(read_raw(pid, start, end))


def read_columns(pid: int, start: int, end: int) -> dict[str, list]:
    """Like :func:`read_range` but as per-field columns (faster for big ranges: no per-page objects)."""
    return classify_columns(read_raw(pid, start, end))
