"""Build the guest: prerequisites, the 6.12 kernel, the static helpers and the base initramfs, all cached.

Cache layout under :func:`cache_dir` (``$XDG_CACHE_HOME/hmmirror/guest``, else ``~/.cache/hmmirror/guest``):

- ``src-VER/linux-source-6.12/``: the kernel tree, extracted once per Debian source version ``VER``;
- ``build-VER/``: the kernel's out-of-tree build directory (``make O=``), kept, so a changed fragment
  rebuilds incrementally;
- ``kernel-KEY/``: ``bzImage``, its ``.config`` and ``manifest.json``; ``KEY`` hashes the source version and
  the fragment (``data/kernel.config``), so the kernel is rebuilt exactly when one of them changes;
- ``helpers-KEY/``: ``player``, ``hmm-tests`` (both ``gcc -static``) and ``base.cpio.gz``; ``KEY`` hashes the
  source version, ``player.c`` and the initramfs recipe.

Everything is done under one file lock (``build.lock``): concurrent callers (pytest workers, two shells)
wait for one build instead of racing.  Missing prerequisites raise :class:`Missing` naming what is missing and
how to get it (root and apt when packages are missing, free disk space).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: Debian package with the kernel tree (a .tar.xz under /usr/src).
SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
SOURCE_TOPDIR = "linux-source-6.12"
#: Bumped when the build recipe (not the fragment) changes in a way that needs a rebuild.
RECIPE = "hmmirror-guest-kernel v1"
#: Bytes of free disk the first build needs (tree ~1.7 GB, build ~0.2 GB), and later builds.
DISK_FIRST, DISK_AGAIN = 3 << 30, 512 << 20
#: Compile steps of a clean build with the shipped fragment (progress total when no earlier count exists).
DEFAULT_COMPILE_STEPS = 1500

#: What the build and the guest need: (what, how to test for it, Debian package).
PackageCheck = tuple[str, Callable[[], bool], str]


class Missing(Exception):
    """A prerequisite is missing; ``items`` are one-line descriptions (the CLI exits with code 2)."""

    def __init__(self, items: list[str]) -> None:
        super().__init__("; ".join(items))
        self.items = items


class BuildFailed(Exception):
    """A build step failed; ``log`` is the file with its output."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message + (f" (log: {log})" if log else ""))
        self.log = log


#: progress(step, done, total): step is a short label; done/total None when unknown.
Progress = Callable[[str, int | None, int | None], None]


def _quiet(_step: str, _done: int | None, _total: int | None) -> None:
    return None


# ----------------------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hmmirror/guest`` (``~/.cache/hmmirror/guest`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hmmirror" / "guest"


def fragment_text() -> str:
    """The config fragment merged onto ``tinyconfig`` (package data)."""
    return resources.files("hmmirror.live.guest").joinpath("data/kernel.config").read_text()


def player_source() -> str:
    """``player.c`` (package data)."""
    return resources.files("hmmirror.live.guest").joinpath("player.c").read_text()


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", version)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- prerequisites


def _which(name: str) -> bool:
    return shutil.which(name) is not None


def is_static_elf(path: str | Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP), i.e. statically linked."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox_path() -> str | None:
    """A statically linked busybox (Debian's busybox-static), or None."""
    for cand in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and is_static_elf(cand):
            return cand
    return None


def _static_libc() -> bool:
    try:
        out = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(out.stdout.strip()) and os.path.exists(out.stdout.strip())


def _header(name: str) -> bool:
    return any(os.path.exists(os.path.join(d, name)) for d in ("/usr/include", "/usr/local/include"))


BUILD_CHECKS: list[PackageCheck] = [
    (f"{SOURCE_TARBALL}", lambda: SOURCE_TARBALL.exists(), SOURCE_PACKAGE),
    ("gcc", lambda: _which("gcc"), "gcc"),
    ("make", lambda: _which("make"), "make"),
    ("flex", lambda: _which("flex"), "flex"),
    ("bison", lambda: _which("bison"), "bison"),
    ("bc", lambda: _which("bc"), "bc"),
    ("xz", lambda: _which("xz"), "xz-utils"),
    ("libelf headers (gelf.h)", lambda: _header("gelf.h"), "libelf-dev"),
    ("static libc (libc.a)", _static_libc, "libc6-dev"),
    ("a static busybox", lambda: busybox_path() is not None, "busybox-static"),
    ("mkfs.ext4", lambda: shutil.which("mkfs.ext4") is not None or os.path.exists("/sbin/mkfs.ext4"), "e2fsprogs"),
    ("mkfs.xfs", lambda: shutil.which("mkfs.xfs") is not None or os.path.exists("/sbin/mkfs.xfs"), "xfsprogs"),
]
RUN_CHECKS: list[PackageCheck] = [
    ("qemu-system-x86_64", lambda: _which("qemu-system-x86_64"), "qemu-system-x86"),
]
#: Every Debian package the guest needs (for .ci/run and the README).
APT_PACKAGES = sorted({pkg for _w, _t, pkg in BUILD_CHECKS + RUN_CHECKS})


def missing_packages(checks: list[PackageCheck] | None = None) -> list[tuple[str, str]]:
    """``(what, package)`` of every failed check."""
    return [(what, pkg) for what, test, pkg in (checks or BUILD_CHECKS + RUN_CHECKS) if not test()]


def can_install() -> bool:
    """Root and apt-get: packages can be installed here."""
    return os.geteuid() == 0 and _which("apt-get")


def apt_install(packages: list[str], log: Callable[[str], None] = lambda s: None) -> None:
    """``apt-get install`` the packages (once more after ``apt-get update`` if the first try fails)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for attempt in (0, 1):
        if attempt:
            log("apt-get update")
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        log("apt-get install " + " ".join(packages))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode == 0:
            return
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
    raise Missing([f"apt-get install {' '.join(packages)} failed: {tail[0]}"])


def check_prerequisites(install: bool = True, need_build: bool = True,
                        log: Callable[[str], None] = lambda s: None) -> None:
    """Install missing packages where possible (root + apt-get), else raise :class:`Missing`."""
    checks = (BUILD_CHECKS if need_build else []) + RUN_CHECKS
    missing = missing_packages(checks)
    if missing and install and can_install():
        apt_install(sorted({pkg for _w, pkg in missing}), log)
        missing = missing_packages(checks)
    if missing:
        pkgs = " ".join(sorted({pkg for _w, pkg in missing}))
        how = "as root: " if os.geteuid() != 0 else ""
        where = "" if _which("apt-get") else " (apt-get is not available here: a Debian-based system is needed)"
        raise Missing([f"missing {', '.join(w for w, _p in missing)}; install {how}apt-get install {pkgs}{where}"])


def source_version() -> str:
    """The installed ``linux-source-6.12`` package version (e.g. ``6.12.118-1~deb12u1``)."""
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        r = None
    if r is not None and r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    st = SOURCE_TARBALL.stat()
    return f"tarball-{st.st_size}-{int(st.st_mtime)}"


def _check_disk(path: Path, need: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise Missing([f"not enough disk space in {path}: {free >> 20} MiB free, the build needs "
                       f"{need >> 20} MiB (set XDG_CACHE_HOME to a larger disk)"])


# ----------------------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifacts:
    """A built guest: kernel image, helpers and the base initramfs."""

    kernel_dir: Path
    helpers_dir: Path
    source_version: str
    source_dir: Path

    @property
    def bzimage(self) -> Path:
        return self.kernel_dir / "bzImage"

    @property
    def player(self) -> Path:
        return self.helpers_dir / "player"

    @property
    def hmm_tests(self) -> Path:
        return self.helpers_dir / "hmm-tests"

    @property
    def base_initramfs(self) -> Path:
        return self.helpers_dir / "base.cpio.gz"

    def complete(self) -> bool:
        return all(p.exists() for p in (self.bzimage, self.player, self.hmm_tests, self.base_initramfs,
                                         self.kernel_dir / "manifest.json", self.helpers_dir / "manifest.json"))


def _keys(version: str) -> tuple[str, str]:
    from hmmirror.live.guest import initramfs

    kkey = _digest(RECIPE, version, fragment_text())
    hkey = _digest(RECIPE, version, player_source(), initramfs.recipe_text())
    return kkey, hkey


def artifacts_for(version: str) -> Artifacts:
    """Where the artifacts of source ``version`` with the shipped fragment and helpers live."""
    root = cache_dir()
    kkey, hkey = _keys(version)
    return Artifacts(root / f"kernel-{kkey}", root / f"helpers-{hkey}", version,
                     root / f"src-{_safe(version)}" / SOURCE_TOPDIR)


def cached() -> Artifacts | None:
    """The complete cached build for the installed source, or None (no package, nothing built yet)."""
    if not SOURCE_TARBALL.exists():
        return None
    try:
        art = artifacts_for(source_version())
    except OSError:
        return None
    if not art.complete():
        return None
    _touch(art)
    return art


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Exclusive lock over the whole cache (one builder at a time, across processes)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(progress: Progress = _quiet, install: bool = True, log: Callable[[str], None] = lambda s: None,
                 force: bool = False) -> Artifacts:
    """The guest artifacts, built now if the cache lacks them (see the module docstring)."""
    if not force:
        art = cached()
        if art is not None:
            return art
    check_prerequisites(install=install, log=log)
    with build_lock():
        version = source_version()
        art = artifacts_for(version)
        if art.complete() and not force:
            return art
        _check_disk(cache_dir(), DISK_AGAIN if art.source_dir.exists() else DISK_FIRST)
        if force or not (art.bzimage.exists() and (art.kernel_dir / "manifest.json").exists()):
            _extract(art, progress)
            _build_kernel(art, progress)
        if force or not (art.helpers_dir / "manifest.json").exists():
            _build_helpers(art, progress)
        _touch(art)
        _prune(art)
        return art


#: Kernels and helpers of other fragments or sources unused this long are removed (other checkouts of
#: hmmirror on the same machine share the cache and may still use theirs).
PRUNE_AFTER = 14 * 86400


def _touch(art: Artifacts) -> None:
    """Record that ``art`` is in use (its directories' ``last-used`` stamps)."""
    for d in (art.kernel_dir, art.helpers_dir):
        with contextlib.suppress(OSError):
            (d / "last-used").touch()


def _prune(art: Artifacts) -> None:
    """Remove kernels and helpers nobody used for :data:`PRUNE_AFTER` (the build tree stays)."""
    now = time.time()
    for d in cache_dir().iterdir():
        if not (d.is_dir() and d.name.startswith(("kernel-", "helpers-"))) or d in (art.kernel_dir, art.helpers_dir):
            continue
        stamp = d / "last-used"
        try:
            used = stamp.stat().st_mtime if stamp.exists() else d.stat().st_mtime
        except OSError:
            continue
        if now - used > PRUNE_AFTER:
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------- steps


def _run(cmd: list[str], logf: Path, cwd: Path | None = None, on_line: Callable[[str], None] | None = None,
         what: str = "") -> None:
    """Run ``cmd`` niced, appending its output to ``logf``; BuildFailed on a non-zero exit."""
    with open(logf, "a") as lf:
        lf.write("$ " + " ".join(cmd) + "\n")
        lf.flush()
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lf.write(line)
                lf.flush()
                if on_line:
                    on_line(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        raise BuildFailed(f"{what or cmd[0]} failed with exit code {rc}", logf)


def _extract(art: Artifacts, progress: Progress) -> None:
    """Unpack the kernel tree once per source version (into a temporary directory, then renamed)."""
    src = art.source_dir
    stamp = src.parent / ".extracted"
    st = SOURCE_TARBALL.stat()
    want = f"{st.st_size} {int(st.st_mtime)}"
    if stamp.exists() and stamp.read_text() == want and (src / "Makefile").exists():
        return
    progress("unpacking linux-source", None, None)
    src.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(src, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=src.parent))
    try:
        _run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp)], src.parent / "extract.log", what="tar")
        (tmp / SOURCE_TOPDIR).rename(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(want)


def _config_problems(config: str, fragment: str) -> list[str]:
    """Fragment options the final .config does not have as asked (a dependency was not met)."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line) or re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            have[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    bad = []
    for line in fragment.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
        if m and have.get(m.group(1), "n") != m.group(2):
            bad.append(f"{m.group(1)}={m.group(2)} (got {have.get(m.group(1), 'n')})")
    return bad


def _build_kernel(art: Artifacts, progress: Progress) -> None:
    """tinyconfig + fragment, olddefconfig, ``make bzImage`` in the kept build directory."""
    src = art.source_dir
    bdir = cache_dir() / f"build-{_safe(art.source_version)}"
    bdir.mkdir(parents=True, exist_ok=True)
    logf = bdir / "build.log"
    logf.write_text("")
    frag = fragment_text()
    make = ["make", "-C", str(src), f"O={bdir}", "ARCH=x86_64"]
    progress("configuring the kernel", None, None)
    _run([*make, "tinyconfig"], logf, what="make tinyconfig")
    (bdir / "fragment.config").write_text(frag)
    _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(bdir), str(bdir / ".config"),
          str(bdir / "fragment.config")], logf, cwd=bdir, what="merge_config.sh")
    _run([*make, "olddefconfig"], logf, what="make olddefconfig")
    config = (bdir / ".config").read_text()
    bad = _config_problems(config, frag)
    if bad:
        raise BuildFailed("the kernel configuration lacks options of the fragment: " + ", ".join(bad), logf)
    counts = cache_dir() / "compile-steps.json"
    try:
        total = int(json.loads(counts.read_text()).get("clean", DEFAULT_COMPILE_STEPS))
    except (OSError, ValueError, AttributeError):
        total = DEFAULT_COMPILE_STEPS
    steps = 0
    step_re = re.compile(r"^\s+(CC|AS|LD|AR|HOSTCC|HOSTLD|OBJCOPY|GEN|UPD|CALL|VDSO\w*|RELOCS|BUILD|ZOFFSET|"
                         r"MKPIGGY|SORTTAB|KSYMS|NM|OBJTOOL|MODPOST|SYNC|WRAP|POLICY|CPUSTR|MKREQ|UNROLL|HYPERCALLS|"
                         r"SYSHDR|SYSTBL|TABLE|CHKSHA1|MKELF|LZ4|GZIP|XZKERN|COPY|PASYMS|ATOMIC)\b")
    start = time.monotonic()

    def on_line(line: str) -> None:
        nonlocal steps
        if step_re.match(line):
            steps += 1
            progress("compiling the kernel", min(steps, total), total)

    progress("compiling the kernel", 0, total)
    jobs = str(max(1, os.cpu_count() or 1))
    _run([*make, f"-j{jobs}", "bzImage"], logf, on_line=on_line, what="make bzImage")
    image = bdir / "arch/x86/boot/bzImage"
    if not image.exists():
        raise BuildFailed("make bzImage produced no arch/x86/boot/bzImage", logf)
    if steps > total or not counts.exists():
        with contextlib.suppress(OSError):
            counts.write_text(json.dumps({"clean": max(steps, total)}))
    tmp = Path(tempfile.mkdtemp(prefix=".kernel-", dir=cache_dir()))
    tmp.chmod(0o755)
    shutil.copy2(image, tmp / "bzImage")
    shutil.copy2(bdir / ".config", tmp / "config")
    (tmp / "fragment.config").write_text(frag)
    (tmp / "manifest.json").write_text(json.dumps({
        "source_package": SOURCE_PACKAGE, "source_version": art.source_version, "recipe": RECIPE,
        "kernel_release": _kernel_release(bdir), "compile_steps": steps,
        "compile_seconds": round(time.monotonic() - start, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1))
    shutil.rmtree(art.kernel_dir, ignore_errors=True)
    tmp.rename(art.kernel_dir)


def _kernel_release(bdir: Path) -> str:
    with contextlib.suppress(OSError):
        return (bdir / "include/config/kernel.release").read_text().strip()
    return "?"


def _build_helpers(art: Artifacts, progress: Progress) -> None:
    """``player`` and ``hmm-tests`` (gcc -static against the tree's uapi header), then the base initramfs."""
    from hmmirror.live.guest import initramfs

    progress("building the static helpers", None, None)
    src = art.source_dir
    tmp = Path(tempfile.mkdtemp(prefix=".helpers-", dir=cache_dir()))
    tmp.chmod(0o755)
    try:
        logf = tmp / "build.log"
        (tmp / "player.c").write_text(player_source())
        _run(["gcc", "-static", "-O2", "-Wall", "-I", str(src), "-o", str(tmp / "player"), str(tmp / "player.c")],
             logf, what="gcc player.c")
        _run(["gcc", "-static", "-O2", "-I", str(src / "tools/testing/selftests"), "-I", str(src), "-o",
              str(tmp / "hmm-tests"), str(src / "tools/testing/selftests/mm/hmm-tests.c"), "-lpthread"],
             logf, what="gcc hmm-tests.c")
        shutil.copy2(src / "tools/testing/selftests/mm/hmm-tests.c", tmp / "hmm-tests.c")
        progress("making the initramfs", None, None)
        initramfs.write_base(tmp / "base.cpio.gz", {"/bin/player": tmp / "player",
                                                     "/bin/hmm-tests": tmp / "hmm-tests"})
        (tmp / "manifest.json").write_text(json.dumps({"source_version": art.source_version,
                                                       "built": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        shutil.rmtree(art.helpers_dir, ignore_errors=True)
        tmp.rename(art.helpers_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
