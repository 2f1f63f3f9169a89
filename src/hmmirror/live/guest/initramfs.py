"""The guest's initramfs: a base archive (built once) plus one small job archive per boot.

Both are ``newc`` cpio archives written here (no ``cpio`` tool, no root needed for the device nodes),
gzip-compressed; the kernel unpacks concatenated archives in order, so a boot's initrd is the base followed
by the job.  The base holds a static busybox, ``mkfs.ext4`` and ``mkfs.xfs`` with their shared libraries,
``/etc/mke2fs.conf``,
the static helpers and ``/init``, which mounts the pseudo filesystems, runs ``/job/run.sh``, copies
``/tmp/results`` to the raw results disk (``/dev/vda``) and reboots (QEMU runs with ``-no-reboot``, so
that ends it).  Lines starting ``HMMG:`` on the console mark progress.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

#: The guest's /init.  Changing it changes the helpers' cache key (see :func:`recipe_text`).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs -o size=1G tmpfs /tmp
echo 0 > /proc/sys/kernel/randomize_va_space
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
echo "HMMG: init $(cut -d' ' -f1 /proc/uptime)"
if [ -x /job/run.sh ]; then
    /job/run.sh
    echo "HMMG: job rc=$? at $(cut -d' ' -f1 /proc/uptime)"
else
    echo "HMMG: no job"
fi
if [ -b /dev/vda ] && [ -e /tmp/results ]; then
    { echo "HMMG-RESULTS"; cat /tmp/results; echo; echo "HMMG-END"; } > /dev/vda
    sync
fi
echo "HMMG: done"
reboot -f
"""

RECIPE_VERSION = "initramfs v2 (mkfs.xfs)"


def recipe_text() -> str:
    """Everything that decides the base archive's content besides the helpers (for the cache key)."""
    return RECIPE_VERSION + "\n" + INIT


class Cpio:
    """A ``newc`` archive being written (directories are added for every file's parents)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()
        self.files: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(head + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(head) + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = "/" + path.strip("/")
        if path == "/" or path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, 0o040755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(path))
        self.files.add("/" + path.lstrip("/"))
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        self.mkdir(os.path.dirname(path))
        self._entry(path, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _shared_libs(binary: str) -> list[str]:
    """Absolute paths of the shared libraries (and the loader) ``binary`` needs, from ``ldd``."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def write_base(dest: Path, helpers: Mapping[str, Path]) -> None:
    """Write the base archive (gzip) with busybox, mkfs.ext4, the ``helpers`` (guest path -> file), /init."""
    from hmmirror.live.guest.build import busybox_path

    c = Cpio()
    for d in ("/bin", "/sbin", "/dev", "/proc", "/sys", "/tmp", "/etc", "/mnt", "/job", "/root"):
        c.mkdir(d)
    c.chardev("/dev/console", 5, 1)
    c.chardev("/dev/null", 1, 3)
    bb = busybox_path()
    if bb is None:
        raise FileNotFoundError("a static busybox")
    c.file("/bin/busybox", Path(bb).read_bytes(), 0o755)
    c.symlink("/bin/sh", "busybox")
    for tool in ("mkfs.ext4", "mkfs.xfs"):
        path = shutil.which(tool) or f"/sbin/{tool}"
        c.file(f"/sbin/{tool}", Path(os.path.realpath(path)).read_bytes(), 0o755)
        for lib in _shared_libs(path):
            if f"/{lib.lstrip('/')}" not in c.files:
                c.file(lib, Path(os.path.realpath(lib)).read_bytes(), 0o755)
    if os.path.exists("/etc/mke2fs.conf"):
        c.file("/etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
    for gpath, host in helpers.items():
        c.file(gpath, Path(host).read_bytes(), 0o755)
    c.file("/init", INIT.encode(), 0o755)
    dest.write_bytes(gzip.compress(c.finish(), compresslevel=6, mtime=0))


def job_archive(files: Mapping[str, bytes | str], executable: tuple[str, ...] = ("/job/run.sh",)) -> bytes:
    """A gzip'd archive of one job's files (guest path -> content); ``executable`` get mode 0755."""
    c = Cpio()
    c.dirs.update({"/job", "/tmp", "/bin", "/etc"})     # exist in the base archive
    for path, data in files.items():
        raw = data.encode() if isinstance(data, str) else data
        c.file(path, raw, 0o755 if path in executable else 0o644)
    return gzip.compress(c.finish(), compresslevel=1, mtime=0)
