"""Host settings and self-cleaning host resources for live observation.

Every resource is a context manager that restores the host on exit, also when the body raises: the hugetlb
pool size, loop-device filesystems, tmpfs and hugetlbfs mounts, THP settings. A resource that cannot be
had on this host raises :class:`Unavailable` with a one-line reason (tests turn it into a skip).

:func:`quiet_run` repeats a live run until one ran while the kernel moved no page on its own (compaction,
reclaim): only such a run shows what the scenario's operations do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hmmirror.errors import HmmirrorError

THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
HUGEPAGES_DIR = Path("/sys/kernel/mm/hugepages")
#: Huge page sizes by name, in kB as the sysfs directory names spell them.
HUGEPAGE_KB = {"2M": 2048, "1G": 1048576}
#: Seconds a host command (mkfs, mount, losetup) may take; mkfs.xfs of a 320 MB image took over 60 s while
#: the host was in a direct-reclaim storm (14:30 UTC, load ~27).  A command that still does not finish means
#: the host is too busy (reason starting with HOST_BUSY), not that it lacks the resource.
_CMD_TIMEOUT = 300.0
T = TypeVar("T")


class Unavailable(HmmirrorError):
    """A host resource or setting cannot be had here; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def is_root() -> bool:
    """The effective user is root (needed for pfns, kpageflags, mounts and the hugetlb pool)."""
    return os.geteuid() == 0


def why_not_live() -> str | None:
    """None if live observation works here, else the reason it does not (one line)."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.read(8)
    except OSError as exc:
        return f"/proc/self/pagemap is not readable ({exc.strerror})"
    if not is_root():
        return "not root: pagemap hides pfns and /proc/kpageflags is unreadable"
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.read(8)
    except OSError as exc:
        return f"/proc/kpageflags is not readable ({exc.strerror})"
    return None


# ------------------------------------------------------------------------------------- THP settings


def _bracketed(text: str) -> str:
    """The selected word of a sysfs choice list (``"always [madvise] never"`` -> ``"madvise"``)."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def _read_sys(path: Path) -> str | None:
    """Text of a sysfs file, None if absent."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def thp_settings() -> dict[str, str | bool | int | None]:
    """THP settings of the host: ``enabled``, ``defrag``, ``use_zero_page``, ``shmem_enabled``,
    ``hpage_pmd_size`` and ``khugepaged_scan_sleep_ms`` (None where the file is missing)."""
    raw = {name: _read_sys(THP_DIR / name) for name in ("enabled", "defrag", "use_zero_page",
                                                          "shmem_enabled", "hpage_pmd_size")}
    sleep = _read_sys(THP_DIR / "khugepaged" / "scan_sleep_millisecs")
    return {
        "enabled": _bracketed(raw["enabled"]) if raw["enabled"] else None,
        "defrag": _bracketed(raw["defrag"]) if raw["defrag"] else None,
        "use_zero_page": None if raw["use_zero_page"] is None else raw["use_zero_page"] != "0",
        "shmem_enabled": _bracketed(raw["shmem_enabled"]) if raw["shmem_enabled"] else None,
        "hpage_pmd_size": int(raw["hpage_pmd_size"]) if raw["hpage_pmd_size"] else None,
        "khugepaged_scan_sleep_ms": int(sleep) if sleep else None,
    }


def _write_sys(path: Path, value: str) -> None:
    """Write a sysfs value; failure becomes :class:`Unavailable`."""
    try:
        path.write_text(value)
    except OSError as exc:
        raise Unavailable(f"cannot write {value!r} to {path}: {exc.strerror}") from None


@contextlib.contextmanager
def thp_config(enabled: str | None = None, defrag: str | None = None, use_zero_page: bool | None = None,
               shmem_enabled: str | None = None) -> Iterator[dict[str, str | bool | int | None]]:
    """Set THP settings for the body (host-global!), restoring the previous values on exit."""
    wanted = {"enabled": enabled, "defrag": defrag, "shmem_enabled": shmem_enabled,
              "use_zero_page": None if use_zero_page is None else str(int(use_zero_page))}
    before = thp_settings()
    done: list[tuple[str, str]] = []
    try:
        for name, value in wanted.items():
            if value is None:
                continue
            old = before[name]
            _write_sys(THP_DIR / name, value)
            done.append((name, str(int(old)) if isinstance(old, bool) else str(old)))
        yield thp_settings()
    finally:
        for name, old in reversed(done):
            with contextlib.suppress(Unavailable):
                _write_sys(THP_DIR / name, old)


# ------------------------------------------------------------------------------------- host activity

#: ``/proc/vmstat`` counters that move when the kernel migrates, isolates or reclaims pages on its own:
#: compaction (kcompactd, direct compaction of any process, ``alloc_contig_range`` of balloon/virtio-mem/
#: hugetlb), and kswapd/direct/khugepaged reclaim.  None of them moves for what a scenario does itself
#: (faults, fork, DONTNEED, MADV_PAGEOUT's ``reclaim_pages``, splits, truncate).  Such activity changes a live
#: run's outcome: a migration that cannot get a large destination folio splits the folio (``try_split_folio``
#: in mm/migrate.c), and a split page-cache folio is unmapped, not remapped (``remap_page`` remaps only
#: anonymous folios, mm/huge_memory.c); an isolated folio is skipped by MADV_PAGEOUT; a folio under migration
#: is locked (fault-around skips it) and mapped by migration entries.
ACTIVITY_COUNTERS = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_split", "compact_isolated",
                     "compact_stall", "pgscan_kswapd", "pgscan_direct", "pgscan_khugepaged")
#: khugepaged's own collapse count (MADV_COLLAPSE does not count there).
KHUGEPAGED_COLLAPSED = THP_DIR / "khugepaged" / "pages_collapsed"
#: Prefix of the reason of a run skipped because the host never stayed quiet (see :func:`quiet_run`).
HOST_BUSY = "host busy"


def host_activity() -> dict[str, int]:
    """The :data:`ACTIVITY_COUNTERS` now (and ``khugepaged_pages_collapsed``); missing counters are left out."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in ACTIVITY_COUNTERS:
                    out[key] = int(value)
    collapsed = _read_sys(KHUGEPAGED_COLLAPSED)
    if collapsed is not None and collapsed.isdigit():
        out["khugepaged_pages_collapsed"] = int(collapsed)
    return out


def activity_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved from ``before`` to ``after``, with how much."""
    return {k: after[k] - before[k] for k in after if k in before and after[k] != before[k]}


def quiet_run(run: Callable[[], T], attempts: int = 8) -> T:
    """``run()`` until one call ran while the kernel moved no page on its own (:func:`host_activity` unchanged
    over the call), and return that call's result; a run the host disturbed is not evidence either way.

    Raises :class:`Unavailable` (reason starting with :data:`HOST_BUSY`) when every attempt was disturbed.
    """
    moved: dict[str, int] = {}
    for attempt in range(attempts):
        before = host_activity()
        result = run()
        moved = activity_between(before, host_activity())
        if not moved:
            return result
        time.sleep(0.05 * (attempt + 1))
    what = ", ".join(f"{k} +{v}" for k, v in sorted(moved.items()))
    raise Unavailable(f"{HOST_BUSY}: the kernel migrated or reclaimed pages on its own during each of "
                      f"{attempts} runs (last: {what})")


# ------------------------------------------------------------------------------------- hugetlb pool


@dataclass(frozen=True)
class HugePool:
    """A reserved hugetlb pool: ``count`` free pages of ``size`` while the context is open."""

    size: str
    count: int
    page_bytes: int
    sysfs: Path


def _pool_dir(size: str) -> Path:
    """sysfs directory of one huge page size, or :class:`Unavailable`."""
    if size not in HUGEPAGE_KB:
        raise Unavailable(f"unknown huge page size {size!r} (use '2M' or '1G')")
    d = HUGEPAGES_DIR / f"hugepages-{HUGEPAGE_KB[size]}kB"
    if not d.is_dir():
        raise Unavailable(f"{size} huge pages are not supported by this kernel ({d} missing)")
    return d


def _pool_counts(d: Path) -> tuple[int, int]:
    """``(nr_hugepages, free_hugepages)`` of a pool."""
    return int((d / "nr_hugepages").read_text()), int((d / "free_hugepages").read_text())


@contextlib.contextmanager
def reserve_hugepages(size: str = "2M", count: int = 1) -> Iterator[HugePool]:
    """Grow the ``size`` hugetlb pool so that ``count`` pages are free; restore ``nr_hugepages`` on exit.

    Raises :class:`Unavailable` (pool unchanged) when not root or when the kernel cannot find the memory.
    """
    d = _pool_dir(size)
    if not is_root():
        raise Unavailable("not root: cannot change the hugetlb pool")
    nr_before, free = _pool_counts(d)
    grown = free < count
    try:
        if grown:
            _write_sys(d / "nr_hugepages", str(nr_before + count - free))
            nr_now, free_now = _pool_counts(d)
            if free_now < count:
                raise Unavailable(f"hugetlb {size} pool could only grow to {nr_now} pages "
                                  f"({free_now} free, {count} wanted): memory too fragmented or too small")
        yield HugePool(size, count, HUGEPAGE_KB[size] * 1024, d)
    finally:
        if grown:
            with contextlib.suppress(Unavailable, OSError):
                _write_sys(d / "nr_hugepages", str(nr_before))


# ------------------------------------------------------------------------------------- mounts


def _run(argv: list[str]) -> None:
    """Run a host command; failure becomes :class:`Unavailable` with its first error line."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{HOST_BUSY}: {argv[0]} did not finish in {_CMD_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise Unavailable(f"{argv[0]} failed: {exc}") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise Unavailable(f"{' '.join(argv[:2])} failed: {msg[0] if msg else f'exit {res.returncode}'}")


def _need_tools(*names: str) -> None:
    """Raise :class:`Unavailable` unless root and every command exists."""
    if not is_root():
        raise Unavailable("not root: cannot mount")
    for name in names:
        if shutil.which(name) is None:
            raise Unavailable(f"{name} is not installed")


def _umount(path: str) -> None:
    """Unmount, retrying a busy mount a few times, then lazily (never raises)."""
    for _ in range(20):
        if subprocess.run(["umount", path], capture_output=True, check=False).returncode == 0:
            return
        if not os.path.ismount(path):
            return
        time.sleep(0.05)
    subprocess.run(["umount", "-l", path], capture_output=True, check=False)


@contextlib.contextmanager
def _mountpoint(prefix: str) -> Iterator[str]:
    """A fresh temporary directory, removed on exit."""
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _mounted(argv: list[str], target: str) -> Iterator[str]:
    """Run a mount command; unmount ``target`` on exit (also if the mount half-succeeded)."""
    try:
        _run(argv)
        yield target
    finally:
        if os.path.ismount(target):
            _umount(target)


@contextlib.contextmanager
def tmpfs(huge: str = "never", size: str | None = None) -> Iterator[str]:
    """Mount a tmpfs (``huge=never|always|within_size|advise``) on a temp dir; yield its path."""
    _need_tools("mount", "umount")
    opts = f"huge={huge}" + (f",size={size}" if size else "")
    with _mountpoint("hmmirror-tmpfs-") as d, _mounted(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d], d):
        yield d


@contextlib.contextmanager
def hugetlbfs(pagesize: str = "2M") -> Iterator[str]:
    """Mount a hugetlbfs of ``pagesize`` (``"2M"``/``"1G"``) on a temp dir; yield its path."""
    _pool_dir(pagesize)
    _need_tools("mount", "umount")
    with _mountpoint("hmmirror-hugetlbfs-") as d, \
            _mounted(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize}", "none", d], d):
        yield d


@contextlib.contextmanager
def _loop_device(image: str) -> Iterator[str]:
    """Attach ``image`` to a free loop device; detach on exit."""
    try:
        res = subprocess.run(["losetup", "--find", "--show", image], capture_output=True, text=True,
                             timeout=_CMD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{HOST_BUSY}: losetup did not finish in {_CMD_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise Unavailable(f"losetup failed: {exc}") from None
    if res.returncode != 0:
        raise Unavailable(f"losetup failed: {res.stderr.strip() or res.returncode}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


_MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}
#: Smallest image each mkfs accepts (mkfs.xfs refuses filesystems below 300 MB); the image is sparse.
MIN_IMAGE = {"ext4": 64 << 20, "xfs": 320 << 20}


def _parse_size(size: int | str) -> int:
    """Bytes of ``123``, ``"64M"``, ``"1G"``, ``"4KiB"``."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s, 0) * mult


@contextlib.contextmanager
def loop_fs(fstype: str = "ext4", size: int | str = "64M", options: str | None = None) -> Iterator[str]:
    """A fresh ``ext4``/``xfs`` filesystem on a loop device over a temp image; yield its mount path.  The
    (sparse) image is at least :data:`MIN_IMAGE` bytes for its type (mkfs.xfs refuses less than 300 MB).

    Always unmounts, detaches the loop device and removes the image, also when the body raises.
    """
    if fstype not in _MKFS:
        raise Unavailable(f"unsupported loop filesystem {fstype!r} (use ext4 or xfs)")
    _need_tools(_MKFS[fstype][0], "losetup", "mount", "umount")
    with _mountpoint(f"hmmirror-{fstype}-") as top:
        image, mnt = os.path.join(top, "image"), os.path.join(top, "mnt")
        os.mkdir(mnt)
        with open(image, "wb") as f:
            f.truncate(max(_parse_size(size), MIN_IMAGE[fstype]))
        _run(_MKFS[fstype] + [image])
        with _loop_device(image) as dev:
            argv = ["mount", "-t", fstype] + (["-o", options] if options else []) + [dev, mnt]
            with _mounted(argv, mnt):
                yield mnt


@contextlib.contextmanager
def filesystem(fstype: str, *, huge: str = "never", pagesize: str = "2M",
               size: int | str = "64M") -> Iterator[str]:
    """One filesystem of a scenario's ``[[machine.fs]]`` kind (``ext4``, ``xfs``, ``tmpfs``, ``hugetlbfs``)."""
    if fstype == "tmpfs":
        cm = tmpfs(huge=huge)
    elif fstype == "hugetlbfs":
        cm = hugetlbfs(pagesize=pagesize)
    else:
        cm = loop_fs(fstype, size)
    with cm as path:
        yield path
