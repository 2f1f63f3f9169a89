"""Boot the guest once for one job: QEMU with the built kernel, the base initramfs plus the job's files.

The job's results leave the guest on a raw virtio disk (a sparse file here, read after QEMU exits); the
serial console (QEMU's stdout) carries the kernel log and ``HMMG:`` progress lines, passed to
``on_console`` as they arrive.  QEMU runs in its own process group and is killed (group-wide) on timeout,
on an exception and on KeyboardInterrupt; the temporary directory is always removed.

Guest memory map (``-m 6G``: QEMU's pc machine puts 3 GiB below 4 GiB and the other 3 GiB from 4 GiB on): five
emulated pmem ranges (``memmap=SIZE!START``, kept apart so the e820 table does not merge them): ``/dev/pmem0``
512 MiB for ext4 with ``-o dax``, ``/dev/pmem1`` 256 MiB for ext4 without DAX (an ordinary page-cache
filesystem), ``/dev/pmem2`` 256 MiB for device-dax with 2 MiB alignment, ``/dev/pmem3`` 320 MiB for xfs
(mkfs.xfs refuses less than 300 MB), ``/dev/pmem4`` 2 GiB at 5 GiB for device-dax with 1 GiB alignment (its
data starts 1 GiB into the namespace: 1 GiB usable, PUD faults).  Guest RAM pages are touched lazily by QEMU,
so the host pays only for what the guest uses.
The 512 MiB at 4 GiB is reserved (``memmap=SIZE$START``) and handed to test_hmm as its two
special-purpose-memory chunks (``test_hmm.spm_addr_dev0/1``, 256 MiB = ``DEVMEM_CHUNK_SIZE`` each): with
them the module also creates the device-coherent ``/dev/hmm_dmirror2`` and ``3``, so hmm-tests' ``*_device_coherent``
variants run instead of skipping.  test_hmm maps a chunk with ``memremap_pages(MEMORY_DEVICE_COHERENT)``,
which only requires that the range is not System RAM; the reserved e820 range is real guest RAM that the
kernel never uses.  (Should that module init fail, test_hmm creates no device at all.)
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hmmirror.live.guest import initramfs
from hmmirror.live.guest.build import Artifacts

#: ``(device, size, start)`` of the emulated pmem ranges, in the order the guest numbers them.
PMEM = (("/dev/pmem0", "512M", "1G"), ("/dev/pmem1", "256M", "1600M"), ("/dev/pmem2", "256M", "1920M"),
        ("/dev/pmem3", "320M", "2240M"), ("/dev/pmem4", "2G", "5G"))
MEMORY = "6G"
#: ``(start, size)`` of test_hmm's two device-coherent chunks, reserved e820 RAM above 4 GiB.
SPM = ((0x100000000, "256M"), (0x110000000, "256M"))
RESULTS_DISK = 1 << 30          # sparse: only what the guest writes takes space
BOOT_ARGS = ("console=ttyS0 loglevel=4 panic=-1 default_hugepagesz=2M hugepagesz=2M hugepagesz=1G "
             "transparent_hugepage=madvise")


class GuestError(Exception):
    """The guest did not finish its job (boot failure, kernel panic, timeout); ``console`` is its output."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.console.splitlines()[-n:])


@dataclass
class JobResult:
    """What one boot produced: the results text (between the markers), the console, the wall time."""

    results: str
    console: str
    seconds: float
    accel: str


def kvm_usable() -> bool:
    """/dev/kvm can be opened read-write (QEMU still falls back to TCG if creating a VM fails)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def accel_args() -> list[str]:
    """``-accel`` options: TCG, or ``$HMMIRROR_GUEST_ACCEL`` (``kvm``) where KVM really works.

    Not KVM by default: on the machines this was built on /dev/kvm opens but QEMU aborts when it sets up
    the vCPU (``failed to set MSR 0x10a``, nested virtualisation), and QEMU's ``-accel kvm -accel tcg``
    fallback does not cover a failure that late.
    """
    forced = os.environ.get("HMMIRROR_GUEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return ["-accel", forced] + (["-cpu", "host"] if forced == "kvm" else ["-cpu", "max"])
    return ["-accel", "tcg", "-cpu", "max"]


def qemu_command(art: Artifacts, initrd: Path, disk: Path, extra_args: str = "") -> list[str]:
    """The QEMU command line of one boot."""
    memmap = " ".join(f"memmap={size}!{start}" for _dev, size, start in PMEM)
    memmap += "".join(f" memmap={size}${start:#x}" for start, size in SPM)
    memmap += f" test_hmm.spm_addr_dev0={SPM[0][0]:#x} test_hmm.spm_addr_dev1={SPM[1][0]:#x}"
    append = f"{BOOT_ARGS} {memmap} {extra_args}".strip()
    return ["qemu-system-x86_64", *accel_args(), "-m", MEMORY, "-smp", "1", "-nodefaults",
            "-no-reboot", "-display", "none", "-serial", "stdio", "-kernel", str(art.bzimage), "-initrd",
            str(initrd), "-drive", f"file={disk},format=raw,if=virtio", "-append", append]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def run_job(art: Artifacts, files: Mapping[str, bytes | str], timeout: float = 600.0,
            on_console: Callable[[str], None] | None = None) -> JobResult:
    """Boot once with ``files`` (guest path -> content; ``/job/run.sh`` is run) and return its results.

    Raises :class:`GuestError` when QEMU fails, the guest does not finish within ``timeout`` seconds, or no
    results come back.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hmmirror-guest-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(art.base_initramfs.read_bytes() + initramfs.job_archive(files))
        disk = Path(tmp) / "results.img"
        with open(disk, "wb") as f:
            f.truncate(RESULTS_DISK)
        cmd = qemu_command(art, initrd, disk)
        console: list[str] = []
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise GuestError(f"cannot start QEMU: {exc}") from None
        try:
            _pump(proc, console, on_console, start + timeout)
        finally:
            _kill_group(proc)
        text = "".join(console)
        if proc.returncode not in (0, None) and "HMMG: done" not in text:
            raise GuestError(f"QEMU exited with code {proc.returncode}", text)
        results = _read_results(disk)
        if results is None:
            why = "the guest kernel panicked" if "Kernel panic" in text else "the guest wrote no results"
            raise GuestError(why, text)
        accel = cmd[cmd.index("-accel") + 1]
        return JobResult(results, text, time.monotonic() - start, accel)


def _pump(proc: subprocess.Popen[bytes], console: list[str], on_console: Callable[[str], None] | None,
          deadline: float) -> None:
    """Collect QEMU's output line by line until it exits; GuestError after ``deadline``."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError("the guest did not finish in time", "".join(console))
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r") + "\n"
                console.append(line)
                if on_console:
                    on_console(line)
        if pending:
            console.append(pending.decode("utf-8", "replace"))
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        sel.close()


def _read_results(disk: Path) -> str | None:
    """The text between the HMMG-RESULTS and HMMG-END markers of the results disk, or None."""
    with open(disk, "rb") as f:
        head = f.read(13)
        if head != b"HMMG-RESULTS\n":
            return None
        chunks = []
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            nul = block.find(b"\0")
            if nul >= 0:
                chunks.append(block[:nul])
                break
            chunks.append(block)
    data = b"".join(chunks)
    end = data.rfind(b"HMMG-END")
    if end < 0:
        return None
    return data[:end].decode("utf-8", "replace")
