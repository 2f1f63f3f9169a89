"""Ports of tools/testing/selftests/mm/hmm-tests.c: every test of the 6.12 file (the one the real 6.12 kernel
runs, 29 ``TEST_F``s), plus the 2026 additions the 6.18 model can run.

Mapping (hmm-modern.md §7; the full list with statuses is docs/hmm-tests-status.md):

* The kselftest fixture ``hmm`` opens ``/dev/hmm_dmirror0`` (``hmm2``: dmirror0 and dmirror1) in the test
  process; here a :class:`~hmmirror.process.Process` of a 6.18 :class:`~hmmirror.machine.Machine` opens them
  with :func:`~hmmirror.drivers.test_hmm.hmm_open`.  Only the ``hmm_device_private`` variants are ported: the
  ``*_device_coherent`` variants need device-coherent memory, which the model does not have (the kernel suite
  SKIPs them without SPM memory, ``spm_addr_dev0/1``).  hmm_ports.py runs these ports test by test under the
  harness's names.
* ``struct hmm_buffer`` is :class:`HmmBuffer`: ``ptr`` is a mapping of the process; ``mirror`` (a malloc'ed
  buffer in the C test) is a Python ``bytearray`` handed to the driver as ``cmd.ptr`` — the driver copies pages
  between the process's frames and it, as ``copy_to_user`` / ``copy_from_user`` do.
* ``hmm_dmirror_cmd(fd, request, buffer, npages)`` is ported as is: 0 or ``-errno``; ``cpages``/``faults`` are
  updated only on success (the ioctl does not copy the command back on error).
* The CPU side (``ptr[i] = i``, ``ASSERT_EQ(ptr[i], i)``) goes through ``Process.write_bytes`` /
  ``read_bytes``: real user accesses of the model (faults included).
* ``HMM_BUFFER_SIZE`` is 4 MiB (1024 pages); data patterns are the C ``int`` arrays (``i``, ``-i``, ``i + c``).

Every expected value is the kernel test's own assertion unless a comment marks it "derived" (a consequence of
the spec that the kernel test does not assert).
"""

from __future__ import annotations

import numpy as np
import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE
from hmmirror.drivers.test_hmm import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
    hmm_open,
)
from hmmirror.kernel import sched

EFAULT, EPERM, ENOENT, EINVAL = 14, 1, 2, 22
HMM_BUFFER_SIZE = 1024 << 12
NTIMES = 10


# --- the harness ---------------------------------------------------------------------------------------------
class HmmBuffer:
    """``struct hmm_buffer``: ``ptr`` (a user mapping), ``mirror`` (the caller buffer), ``size``, ``cpages``,
    ``faults``."""

    def __init__(self, size: int, mirror_size: int | None = None) -> None:
        self.ptr = 0
        self.size = size
        self.mirror = bytearray(size if mirror_size is None else mirror_size)
        self.cpages = 0
        self.faults = 0


def hmm_dmirror_cmd(fd, request: int, buffer: HmmBuffer, npages: int, caller=None) -> int:
    """hmm_dmirror_cmd(): the ioctl; 0, or -errno (cpages/faults are updated only on success)."""
    cmd = HmmDmirrorCmd(buffer.ptr, buffer.mirror, npages)
    ret = fd.ioctl(request, cmd, caller)
    if ret == 0:
        buffer.cpages = cmd.cpages
        buffer.faults = cmd.faults
    return ret


def hmm_migrate_sys_to_dev(fd, buffer: HmmBuffer, npages: int) -> int:
    """hmm_migrate_sys_to_dev()."""
    return hmm_dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer, npages)


def hmm_migrate_dev_to_sys(fd, buffer: HmmBuffer, npages: int) -> int:
    """hmm_migrate_dev_to_sys()."""
    return hmm_dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer, npages)


def ints(values: np.ndarray) -> bytes:
    """A C ``int`` array as bytes."""
    return values.astype("<i4").tobytes()


def as_ints(data: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype="<i4")


def pattern(size: int, f=lambda i: i) -> bytes:
    """``for (i = 0; i < size / sizeof(int); ++i) ptr[i] = f(i);``"""
    return ints(f(np.arange(size // 4, dtype=np.int64)))


def require(module: str) -> None:
    """Skip until another engineer's substrate module lands."""
    pytest.importorskip(module, reason=f"{module} is not in the model yet")


@pytest.fixture(params=["6.18", "6.12"])
def kernel(request) -> str:
    """The 6.18 profile (the model's reference) and 6.12 (the guest's kernel: the C tests' own values hold
    for both)."""
    return request.param


def new_machine(kernel: str, **kw) -> Machine:
    """The machine every port runs on (``kw``: huge pages reserved as by HUGETLB_SETUP_DEFAULT_PAGES)."""
    kw.setdefault("ram", 512 << 20)
    return Machine(kernel, **kw)


@pytest.fixture
def machine(kernel) -> Machine:
    m = new_machine(kernel)
    yield m
    # derived (the model's own check, not the C test's): page counts stay exact through every test,
    # migrations and device-exclusive entries included
    from hmmirror.mm.debug import check_counts
    assert check_counts(m) == []


@pytest.fixture
def proc(machine):
    return machine.spawn("hmm-tests")


@pytest.fixture
def fd(proc):
    """FIXTURE(hmm) variant hmm_device_private: /dev/hmm_dmirror0; teardown closes it (ASSERT_EQ(close, 0))."""
    f = hmm_open(proc, 0)
    yield f
    if f.private_data is not None:
        f.close()


@pytest.fixture
def fds(proc):
    """FIXTURE(hmm2) variant hmm2_device_private: dmirror0 and dmirror1."""
    f0, f1 = hmm_open(proc, 0), hmm_open(proc, 1)
    yield f0, f1
    f0.close()
    f1.close()


# --- TEST_F(hmm, ...) --------------------------------------------------------------------------------------
def test_open_close(fd):
    """Simple NULL test of device open/close."""
    assert fd.private_data is not None
    fd.close()
    assert fd.private_data is None


def test_anon_read(proc, fd):
    """Read private anonymous memory: pages 0-1 stay pte_none / zero page."""
    require("hmmirror.mm.mprotect")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    # Initialize buffer in system memory but leave the first two pages zero (pte_none and pfn_zero).
    data = pattern(size)
    proc.write_bytes(buffer.ptr + 2 * PAGE_SIZE, data[2 * PAGE_SIZE:])
    proc.mprotect(buffer.ptr, size, "r")
    # Populate the CPU page table with a special zero page.
    assert as_ints(proc.read_bytes(buffer.ptr + PAGE_SIZE, 4))[0] == 0
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    got = as_ints(buffer.mirror)
    assert (got[:2 * PAGE_SIZE // 4] == 0).all()
    assert (got[2 * PAGE_SIZE // 4:] == np.arange(2 * PAGE_SIZE // 4, size // 4)).all()


def test_anon_read_prot(proc, fd):
    """Read private anonymous memory which has been protected with mprotect() PROT_NONE."""
    require("hmmirror.mm.mprotect")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    buffer.mirror[:] = pattern(size, lambda i: -i)       # so we can verify it isn't written
    proc.mprotect(buffer.ptr, size, "none")
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_READ, buffer, npages)
    assert ret == -EFAULT
    proc.mprotect(buffer.ptr, size, "r")
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)
    assert bytes(buffer.mirror) == pattern(size, lambda i: -i)


def test_anon_write(proc, fd):
    """Write private anonymous memory."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    buffer.mirror[:] = pattern(size)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)


def test_anon_write_prot(proc, fd):
    """Write private anonymous memory which has been protected with mprotect() PROT_READ."""
    require("hmmirror.mm.mprotect")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "r", ["private", "anonymous"])
    # Simulate a device reading a zero page of memory.
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_READ, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    assert buffer.faults == 1
    buffer.mirror[:] = pattern(size)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == -EPERM
    assert proc.read_bytes(buffer.ptr, size) == bytes(size)
    # Now allow writing and see that the zero page is replaced.
    proc.mprotect(buffer.ptr, size, "rw")
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)


@pytest.mark.parametrize("migrate", [0, 1], ids=["mirror", "migrate"])
@pytest.mark.parametrize("use_thp", [0, 1], ids=["pte", "thp"])
def test_anon_write_child(proc, fd, use_thp, migrate):
    """A device writing an anonymous private mapping in a forked child copies on write.  The 6.12 test is the
    ``pte``/``mirror`` case; the 2026 file loops over THP and over a migration to device 0 before the fork."""
    require("hmmirror.kernel.fork")
    if use_thp:
        require("hmmirror.mm.madvise")
    npages = (PMD_SIZE if use_thp else HMM_BUFFER_SIZE) >> 12
    size = npages << 12
    buffer = HmmBuffer(size * 2, size)
    old_ptr = proc.mmap(size * 2, "rw", ["private", "anonymous"])
    buffer.ptr = old_ptr
    if use_thp:
        buffer.ptr = (old_ptr + size - 1) & ~(size - 1)
        proc.madvise(buffer.ptr, size, "hugepage")
    proc.write_bytes(buffer.ptr, pattern(size))
    buffer.mirror[:] = pattern(size, lambda i: -i)
    if migrate:
        ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
        assert ret == 0
        assert buffer.cpages == npages
    child = proc.fork("child")
    # Child: sees the parent's values; opens its own mirror; the device write copies on write.
    assert child.read_bytes(buffer.ptr, size) == pattern(size)     # faults migrated pages back
    if not migrate:
        assert bytes(buffer.mirror) == pattern(size, lambda i: -i)
    child_fd = hmm_open(child, 0)
    ret = hmm_dmirror_cmd(child_fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    if not migrate:
        assert child.read_bytes(buffer.ptr, size) == pattern(size, lambda i: -i)
    child_fd.close()
    child.exit()
    # Parent, after waitpid: its buffer did not change.
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)


def test_anon_write_child_shared(proc, fd):
    """A device writing an anonymous shared mapping in a forked child does not copy on write."""
    require("hmmirror.kernel.fork")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["shared", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    buffer.mirror[:] = pattern(size, lambda i: -i)
    child = proc.fork("child")
    assert child.read_bytes(buffer.ptr, size) == pattern(size)
    assert bytes(buffer.mirror) == pattern(size, lambda i: -i)
    child_fd = hmm_open(child, 0)
    ret = hmm_dmirror_cmd(child_fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert child.read_bytes(buffer.ptr, size) == pattern(size, lambda i: -i)
    child_fd.close()
    child.exit()
    # Parent: the buffer did change.
    assert proc.read_bytes(buffer.ptr, size) == pattern(size, lambda i: -i)


def test_anon_write_huge(proc, fd, machine):
    """Write private anonymous huge page."""
    require("hmmirror.mm.madvise")
    size = 2 * PMD_SIZE
    buffer = HmmBuffer(size)
    old_ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    size //= 2
    npages = size >> 12
    buffer.ptr = (old_ptr + size - 1) & ~(size - 1)
    proc.madvise(buffer.ptr, size, "hugepage")
    buffer.mirror = bytearray(pattern(size))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)
    # derived (hmm-modern.md §4.6; the kernel test does not assert it): the write fault made a THP, so a
    # snapshot reports PMD-sized writable entries.
    snap = HmmBuffer(size, npages)
    snap.ptr = buffer.ptr
    assert hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, snap, npages) == 0
    assert set(snap.mirror) == {HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD}


def test_anon_write_hugetlbfs(kernel):
    """Write huge TLBFS page (HUGETLB_SETUP_DEFAULT_PAGES(1): one free default-size (2 MiB) huge page).

    The 1 GiB default-size variant is covered by test_compound only (a 1 GiB WRITE would move 1 GiB of data).
    """
    require("hmmirror.mm.hugetlb")
    hsize = PMD_SIZE
    m = new_machine(kernel, hugepages_2m=1)
    proc = m.spawn("hmm-tests")
    fd = hmm_open(proc, 0)
    size = -(-(2 << 20) // hsize) * hsize                  # ALIGN(TWOMEG, default_hsize)
    npages = size >> 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous", "hugetlb"])
    buffer.mirror = bytearray(pattern(size))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)
    proc.munmap(buffer.ptr, buffer.size)
    fd.close()


def hmm_create_file(machine: Machine, size: int, fstype: str) -> str:
    """hmm_create_file(): an O_TMPFILE in /tmp of ``size`` bytes (a sparse file after ftruncate)."""
    if "/tmp" not in machine.mounts:
        machine.mount("/tmp", fstype)
    path = f"/tmp/hmm-{len(machine.files)}"
    machine.create_file(path, size, "sparse")
    return path


def _file_pages(machine: Machine, path: str) -> np.ndarray:
    return machine.files[path].i_mapping.lookup_range(0, machine.files[path].nr_pages)


def pwrite(machine: Machine, path: str, data: bytes) -> int:
    """pwrite(fd, data, size, 0) into the page cache (the model has no write(2) yet: generic_perform_write's
    effect — every page cached, holding the bytes; ext4 marks the blocks written)."""
    from hmmirror.fs.filemap import add_new_cache_pages
    from hmmirror.mm.page_alloc import PG

    inode = machine.files[path]
    n = len(data) // PAGE_SIZE
    missing = np.flatnonzero(_file_pages(machine, path)[:n] < 0)
    flag = PG.swapbacked if inode.sb.fstype == "tmpfs" else PG.file
    add_new_cache_pages(machine.mem, inode, missing.astype(np.int64), flag)
    inode.set_blocks(0, n, 1)
    for i, pfn in enumerate(_file_pages(machine, path)[:n].tolist()):
        machine.mem.write(pfn, 0, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    return len(data)


def pread(machine: Machine, path: str, size: int) -> bytes:
    """pread(fd, buf, size, 0) (the model has no read(2) yet: cached pages' bytes, holes read as zero)."""
    out = bytearray()
    for pfn in _file_pages(machine, path)[: size // PAGE_SIZE].tolist():
        out += machine.mem.read(pfn) if pfn >= 0 else bytes(PAGE_SIZE)
    return bytes(out)


@pytest.mark.parametrize("fstype", ["tmpfs", "ext4"])
def test_file_read(machine, proc, fd, fstype):
    """Read mmap'ed file memory (/tmp as tmpfs or as a disk filesystem)."""
    require("hmmirror.fs.super")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    path = hmm_create_file(machine, size, fstype)
    buffer = HmmBuffer(size)
    assert pwrite(machine, path, pattern(size)) == size
    buffer.mirror[:] = bytes(size)
    buffer.ptr = proc.mmap(size, "r", ["shared"], file=path)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert bytes(buffer.mirror) == pattern(size)


@pytest.mark.parametrize("fstype", ["tmpfs", "ext4"])
def test_file_write(machine, proc, fd, fstype):
    """Write mmap'ed file memory (a sparse file, MAP_SHARED read/write)."""
    require("hmmirror.fs.super")
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    path = hmm_create_file(machine, size, fstype)
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["shared"], file=path)
    buffer.mirror[:] = pattern(size)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)
    # Check that the device also wrote the file.
    got = pread(machine, path, size)
    assert len(got) == size
    assert got == pattern(size)


def test_anon_read_multiple(proc, fd):
    """Read anonymous memory multiple times (NTIMES fresh mappings, ptr[i] = i + c)."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    for c in range(NTIMES):
        buffer = HmmBuffer(size)
        buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
        proc.write_bytes(buffer.ptr, pattern(size, lambda i, c=c: i + c))
        ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_READ, buffer, npages)
        assert ret == 0
        assert buffer.cpages == npages
        assert buffer.faults == 1
        assert bytes(buffer.mirror) == pattern(size, lambda i, c=c: i + c)
        proc.munmap(buffer.ptr, size)


def _interleave(tasks, switch_after: int) -> dict[str, object]:
    """Ours: drive two generators on one CPU — the first runs ``switch_after`` scheduling points, then the
    second runs whenever it can, the first whenever the second is blocked (a deterministic stand-in for the
    test's ``nanosleep(rand() % 32000)`` before the munmap thread runs).  Returns each task's result."""
    gens = {name: (task, gen) for name, task, gen in tasks}
    order = [name for name, _, _ in tasks]
    results: dict[str, object] = {}
    pending: dict[str, object] = {}
    steps = 0
    while len(results) < len(order):
        runnable = [n for n in order if n not in results
                    and (n not in pending or pending[n].ready is None or pending[n].ready())]
        if not runnable:
            raise AssertionError("deadlock between the test's threads")
        name = runnable[0] if steps < switch_after or len(runnable) == 1 else runnable[1]
        task, gen = gens[name]
        prev = sched.set_current(task)
        try:
            pending[name] = next(gen)
        except StopIteration as stop:
            results[name] = stop.value
            pending.pop(name, None)
        finally:
            sched.set_current(prev)
        steps += 1
    return results


def test_anon_teardown(machine, proc, fd):
    """Try reading anonymous memory while it is being unmapped (a second thread munmaps the second half)."""
    from hmmirror.mm.mmap import vm_munmap

    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    outcomes = []
    for c in range(NTIMES):
        buffer = HmmBuffer(size)
        buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
        proc.write_bytes(buffer.ptr, pattern(size, lambda i, c=c: i + c))
        cmd = HmmDmirrorCmd(buffer.ptr, buffer.mirror, npages)
        thread = sched.Task(f"{proc.name}.unmap_buffer", "cpu")
        res = _interleave([("read", proc.mm.task, fd.fops_unlocked_ioctl(HMM_DMIRROR_READ, cmd)),
                           ("unmap", thread, vm_munmap(proc.mm, buffer.ptr + size // 2, size // 2))],
                          switch_after=c * 40)
        rc = res["read"]
        if rc == 0:
            assert cmd.cpages == npages
            assert cmd.faults == 1
            assert bytes(buffer.mirror) == pattern(size, lambda i, c=c: i + c)
        outcomes.append(rc)
        proc.munmap(buffer.ptr, size // 2)
    # derived (hmm-modern.md §7: "-EFAULT expected when the VMA vanished first"): the early schedules read all
    # pages before the munmap; the later ones find the second half gone.
    assert set(outcomes) <= {0, -EFAULT}
    assert 0 in outcomes and -EFAULT in outcomes


def test_mixedmap(proc, fd):
    """Test memory snapshot without faulting in pages accessed by the device (mmap of the dmirror fd)."""
    npages = 1
    size = npages << 12
    buffer = HmmBuffer(size, npages)
    buffer.ptr = proc.mmap(size, "rw", ["private"], file=fd)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.mirror[0] == HMM_DMIRROR_PROT_READ


def test_snapshot(proc, fds):
    """TEST_F(hmm2, snapshot): a snapshot of CPU page tables without faulting (page 5 migrated to device 0,
    page 6 to device 1)."""
    fd0, fd1 = fds
    npages = 7
    size = npages << 12
    # The C test mallocs npages bytes, and MIGRATE_TO_DEV's copy_to_user of one page runs past them into its
    # heap (it succeeds there); the port's buffer holds that page.
    buffer = HmmBuffer(size, PAGE_SIZE)
    buffer.ptr = proc.mmap(size, "none", ["private", "anonymous"])
    p = buffer.ptr
    proc.munmap(p + PAGE_SIZE, PAGE_SIZE)                 # punch a hole after the first page
    proc.mprotect(p + 2 * PAGE_SIZE, PAGE_SIZE, "r")      # page 2: read-only zero page
    val = as_ints(proc.read_bytes(p + 2 * PAGE_SIZE, 4))[0] + 3
    assert val == 3
    proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, "rw")     # page 3: read-only
    proc.write_bytes(p + 3 * PAGE_SIZE, ints(np.array([val])))
    proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, "r")
    proc.mprotect(p + 4 * PAGE_SIZE, 3 * PAGE_SIZE, "rw")  # pages 4-6: read-write
    proc.write_bytes(p + 4 * PAGE_SIZE, ints(np.array([val])))
    buffer.ptr = p + 5 * PAGE_SIZE                        # page 5 will be migrated to device 0
    ret = hmm_migrate_sys_to_dev(fd0, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    buffer.ptr = p + 6 * PAGE_SIZE                        # page 6 will be migrated to device 1
    ret = hmm_migrate_sys_to_dev(fd1, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    buffer.ptr = p
    ret = hmm_dmirror_cmd(fd0, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    m = buffer.mirror
    assert m[0] == HMM_DMIRROR_PROT_ERROR
    assert m[1] == HMM_DMIRROR_PROT_ERROR
    assert m[2] == HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ
    assert m[3] == HMM_DMIRROR_PROT_READ
    assert m[4] == HMM_DMIRROR_PROT_WRITE
    assert m[5] == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
    assert m[6] == HMM_DMIRROR_PROT_NONE


@pytest.mark.parametrize("hsize", [PMD_SIZE, 1 << 30], ids=["2M", "1G"])
def test_compound(kernel, hsize):
    """Test hmm_range_fault() handling of large pages (PMD or PUD) mapped by a large page-table entry."""
    require("hmmirror.mm.hugetlb")
    require("hmmirror.mm.mprotect")
    m = new_machine(kernel, ram=2 << 30, hugepages_2m=int(hsize == PMD_SIZE), hugepages_1g=int(hsize != PMD_SIZE))
    proc = m.spawn("hmm-tests")
    fd = hmm_open(proc, 0)
    size = -(-(2 << 20) // hsize) * hsize                  # ALIGN(TWOMEG, default_hsize)
    npages = size >> 12
    flags = ["private", "anonymous", "hugetlb"] + ([] if hsize == PMD_SIZE else ["huge_1g"])
    buffer = HmmBuffer(size, npages)
    buffer.ptr = proc.mmap(size, "rw", flags)
    # The C test writes ptr[i] = i over the whole page; the first store already maps the whole huge page
    # writable (hugetlb write fault), and the bytes do not affect the snapshot, so one page is written here.
    proc.write_bytes(buffer.ptr, pattern(PAGE_SIZE))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    m0 = buffer.mirror
    prot = HMM_DMIRROR_PROT_WRITE | (HMM_DMIRROR_PROT_PUD if m0[0] & HMM_DMIRROR_PROT_PUD else HMM_DMIRROR_PROT_PMD)
    assert all(b == prot for b in m0)
    assert prot == (0x06 if hsize == PMD_SIZE else 0x0A)   # hmm-modern.md §7: 0x06, or 0x0A with 1 GiB pages
    proc.mprotect(buffer.ptr, size, "r")
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    prot = HMM_DMIRROR_PROT_READ | (HMM_DMIRROR_PROT_PUD if m0[0] & HMM_DMIRROR_PROT_PUD else HMM_DMIRROR_PROT_PMD)
    assert all(b == prot for b in buffer.mirror)
    assert prot == (0x05 if hsize == PMD_SIZE else 0x09)
    proc.munmap(buffer.ptr, buffer.size)
    fd.close()


def test_double_map(proc, fds):
    """TEST_F(hmm2, double_map): two devices read the same memory; after a migration to device 1, device 0
    reads it again through migrate_to_ram."""
    fd0, fd1 = fds
    npages = 6
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    proc.mprotect(buffer.ptr, size, "r")
    ret = hmm_dmirror_cmd(fd0, HMM_DMIRROR_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert bytes(buffer.mirror) == pattern(size)
    ret = hmm_dmirror_cmd(fd1, HMM_DMIRROR_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert bytes(buffer.mirror) == pattern(size)
    # Migrate pages to device 1 and try to read from device 0.
    ret = hmm_migrate_sys_to_dev(fd1, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    ret = hmm_dmirror_cmd(fd0, HMM_DMIRROR_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert bytes(buffer.mirror) == pattern(size)


# --- migration -------------------------------------------------------------------------------------------------
def test_migrate(proc, fd):
    """Migrate anonymous memory to device private memory."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)


@pytest.mark.parametrize("fstype", ["tmpfs", "ext4"])
def test_migrate_file_private(machine, proc, fd, fstype):
    """Migrate private file memory to device private memory (the CPU's stores made every page an anonymous
    copy)."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    path = hmm_create_file(machine, size, fstype)
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private"], file=path)
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)


def test_migrate_fault(proc, fd):
    """Migrate to the device, fault half of it back, then migrate the mix of system and device memory."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    # Fault half the pages back to system memory and check them.
    assert proc.read_bytes(buffer.ptr, size // 2) == pattern(size)[: size // 2]
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)


def test_migrate_release(proc, fd):
    """Migrate to the device, release the device memory (HMM_DMIRROR_RELEASE evicts it), fault back."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_RELEASE, buffer, npages)
    assert ret == 0
    assert proc.read_bytes(buffer.ptr, size // 2) == pattern(size)[: size // 2]


def test_migrate_shared(proc, fd):
    """Migrate anonymous shared memory to device private memory: -ENOENT."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["shared", "anonymous"])
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == -ENOENT


def test_migrate_mixed(proc, fds):
    """TEST_F(hmm2, migrate_mixed): migrate various memory types to device private memory."""
    fd0, fd1 = fds
    npages = 6
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "none", ["private", "anonymous"])
    p = buffer.ptr
    # Migrating a protected area should be an error.
    ret = hmm_migrate_sys_to_dev(fd1, buffer, npages)
    assert ret == -EINVAL
    # Punch a hole after the first page address: an error if the vma doesn't cover the range.
    proc.munmap(buffer.ptr + PAGE_SIZE, PAGE_SIZE)
    ret = hmm_migrate_sys_to_dev(fd1, buffer, 3)
    assert ret == -EINVAL
    # Page 2 will be a read-only zero page.
    proc.mprotect(buffer.ptr + 2 * PAGE_SIZE, PAGE_SIZE, "r")
    val = as_ints(proc.read_bytes(buffer.ptr + 2 * PAGE_SIZE, 4))[0] + 3
    assert val == 3
    # Page 3 will be read-only.
    proc.mprotect(buffer.ptr + 3 * PAGE_SIZE, PAGE_SIZE, "rw")
    proc.write_bytes(buffer.ptr + 3 * PAGE_SIZE, ints(np.array([val])))
    proc.mprotect(buffer.ptr + 3 * PAGE_SIZE, PAGE_SIZE, "r")
    # Pages 4-5 will be read-write.
    proc.mprotect(buffer.ptr + 4 * PAGE_SIZE, 2 * PAGE_SIZE, "rw")
    proc.write_bytes(buffer.ptr + 4 * PAGE_SIZE, ints(np.array([val])))
    proc.write_bytes(buffer.ptr + 5 * PAGE_SIZE, ints(np.array([val])))
    # Now try to migrate pages 2-5 to device 1.
    buffer.ptr = p + 2 * PAGE_SIZE
    ret = hmm_migrate_sys_to_dev(fd1, buffer, 4)
    assert ret == 0
    assert buffer.cpages == 4
    # Page 5 won't be migrated to device 0 because it's on device 1.
    buffer.ptr = p + 5 * PAGE_SIZE
    ret = hmm_migrate_sys_to_dev(fd0, buffer, 1)
    assert ret == -ENOENT
    buffer.ptr = p


def test_migrate_multiple(proc, fd):
    """Migrate to device memory and back (through CPU faults: private variant) NTIMES."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    for _c in range(NTIMES):
        buffer = HmmBuffer(size)
        buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
        proc.write_bytes(buffer.ptr, pattern(size))
        ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
        assert ret == 0
        assert buffer.cpages == npages
        assert bytes(buffer.mirror) == pattern(size)
        # (the coherent variant migrates back with MIGRATE_TO_SYS; the private one faults)
        assert proc.read_bytes(buffer.ptr, size) == pattern(size)
        proc.munmap(buffer.ptr, size)


# --- device-exclusive access ------------------------------------------------------------------------------------
def _inc_all(proc, addr: int, size: int) -> None:
    """``for (i...) ASSERT_EQ(ptr[i]++, i);`` as the CPU does it: read the ints, then store them + 1."""
    vals = as_ints(proc.read_bytes(addr, size))
    assert (vals == np.arange(size // 4)).all()
    proc.write_bytes(addr, ints(vals.astype(np.int64) + 1))


def test_exclusive(proc, fd):
    """Basic check of exclusive faulting."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    # Fault pages back to system memory and check them.
    _inc_all(proc, buffer.ptr, size)
    assert proc.read_bytes(buffer.ptr, size) == pattern(size, lambda i: i + 1)
    # Check atomic access revoked.
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer, npages)
    assert ret == 0


def test_exclusive_mprotect(proc, fd):
    """Exclusive access, then mprotect(PROT_READ): a device write fails with -EPERM."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    proc.mprotect(buffer.ptr, size, "r")
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_WRITE, buffer, npages)
    assert ret == -EPERM


def test_exclusive_cow(proc, fd):
    """Check copy-on-write works after exclusive access: fork(), then parent and child both increment."""
    npages = HMM_BUFFER_SIZE >> 12
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    child = proc.fork("child")
    # Both processes run the rest of the test (the C test does not wait): one after the other here.
    for who in (proc, child):
        _inc_all(who, buffer.ptr, size)
        assert who.read_bytes(buffer.ptr, size) == pattern(size, lambda i: i + 1)
    child.exit()


# --- GUP and copy-on-write with device pages --------------------------------------------------------------------
def gup_test_exec(proc, addr: int, cmd: str, npages: int, size: int, flags: int) -> int:
    """gup_test_exec(): the gup_test ioctl with ``gup_flags = FOLL_WRITE | flags``; 0 or the errno."""
    from hmmirror.mm.gup import FOLL_WRITE
    from hmmirror.mm.gup_test import GupTest, gup_test_ioctl

    gup = GupTest(addr=addr, size=size, nr_pages_per_call=npages, gup_flags=FOLL_WRITE | flags)
    ret = sched.run(gup_test_ioctl(proc.mm, cmd, gup), proc.mm.task)
    return -ret


def test_hmm_gup_test(proc, fd):
    """GUP on device pages (gup_test module): every variant migrates the page back to system memory."""
    from hmmirror.mm.gup import FOLL_LONGTERM

    npages = 4
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    assert gup_test_exec(proc, buffer.ptr, "GUP_BASIC_TEST", 1, PAGE_SIZE, 0) == 0
    assert gup_test_exec(proc, buffer.ptr + PAGE_SIZE, "GUP_FAST_BENCHMARK", 1, PAGE_SIZE, 0) == 0
    assert gup_test_exec(proc, buffer.ptr + 2 * PAGE_SIZE, "PIN_FAST_BENCHMARK", 1, PAGE_SIZE, FOLL_LONGTERM) == 0
    assert gup_test_exec(proc, buffer.ptr + 3 * PAGE_SIZE, "PIN_LONGTERM_BENCHMARK", 1, PAGE_SIZE, 0) == 0
    # Take snapshot to CPU pagetables.
    snap = HmmBuffer(size, npages)
    snap.ptr = buffer.ptr
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, snap, npages)
    assert ret == 0
    assert snap.cpages == npages
    m = snap.mirror
    assert list(m) == [HMM_DMIRROR_PROT_WRITE] * 4
    # Check again the content on the pages. Make sure there's no corrupted data.
    assert proc.read_bytes(buffer.ptr, size) == pattern(size)


def test_hmm_cow_in_device(proc, fd):
    """Copy-on-write in device pages: the parent's write after fork migrates the page back first, then COWs."""
    npages = 4
    size = npages << 12
    buffer = HmmBuffer(size)
    buffer.ptr = proc.mmap(size, "rw", ["private", "anonymous"])
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    child = proc.fork("child")                              # the child spins until SIGTERM
    proc.write_bytes(buffer.ptr, pattern(size))             # parent writes to the COW pages
    child.exit()                                            # kill(pid, SIGTERM); waitpid()
    snap = HmmBuffer(size, npages)
    snap.ptr = buffer.ptr
    ret = hmm_dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, snap, npages)
    assert ret == 0
    assert snap.cpages == npages
    assert list(snap.mirror) == [HMM_DMIRROR_PROT_WRITE] * npages


# --- 2026 additions whose expectations do not depend on device-private THP ----------------------------------------
def _huge_buffer(proc, size: int, prot: str, advice: str | None):
    """``mmap(2 * size)``, ``map = ALIGN(ptr, size)``, ``madvise(map, size, advice)``."""
    old_ptr = proc.mmap(2 * size, prot, ["private", "anonymous"])
    mapped = (old_ptr + size - 1) & ~(size - 1)
    if advice:
        assert proc.madvise(mapped, size, advice) == 0
    return old_ptr, mapped


def test_migrate_anon_huge_empty(proc, fd):
    """Migrate a private anonymous huge empty (never touched, read-only) range."""
    size = PMD_SIZE                                        # read_pmd_pagesize()
    npages = size >> 12
    buffer = HmmBuffer(2 * size, size)
    buffer.mirror[:] = b"\xff" * size
    old_ptr, buffer.ptr = _huge_buffer(proc, size, "r", "hugepage")
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == bytes(size)
    proc.munmap(old_ptr, 2 * size)


def test_migrate_anon_huge_zero(proc, fd):
    """Migrate a private anonymous huge zero page, then fault it back."""
    size = PMD_SIZE
    npages = size >> 12
    buffer = HmmBuffer(2 * size, size)
    buffer.mirror[:] = b"\xff" * size
    old_ptr, buffer.ptr = _huge_buffer(proc, size, "r", "hugepage")
    assert as_ints(proc.read_bytes(buffer.ptr, 4))[0] == 0   # a read-only zero huge page
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == bytes(size)
    assert proc.read_bytes(buffer.ptr, size) == bytes(size)
    proc.munmap(old_ptr, 2 * size)


def test_migrate_anon_huge_free(proc, fd):
    """Migrate a private anonymous huge page, then MADV_FREE it."""
    size = PMD_SIZE
    npages = size >> 12
    buffer = HmmBuffer(2 * size, size)
    buffer.mirror[:] = b"\xff" * size
    old_ptr, buffer.ptr = _huge_buffer(proc, size, "rw", "hugepage")
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    assert proc.madvise(buffer.ptr, size, "free") == 0
    proc.munmap(old_ptr, 2 * size)


@pytest.mark.parametrize("use_thp", [0, 1], ids=["nohuge", "huge"])
@pytest.mark.parametrize("j", [0, 1, 2], ids=["off0", "off1/4", "off1/2"])
def test_migrate_partial_unmap_fault(proc, fd, use_thp, j):
    """Migrate, munmap half of the range at an offset, fault the rest back (the C test loops over both)."""
    size = PMD_SIZE
    unmap_size = size // 2
    offsets = [0, size // 4, size // 2]
    npages = size >> 12
    buffer = HmmBuffer(2 * size, size)
    buffer.mirror[:] = b"\xff" * size
    old_ptr, buffer.ptr = _huge_buffer(proc, size, "rw", "hugepage" if use_thp else "nohugepage")
    proc.write_bytes(buffer.ptr, pattern(size))
    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert bytes(buffer.mirror) == pattern(size)
    proc.munmap(buffer.ptr + offsets[j], unmap_size)
    data = pattern(size)
    if offsets[j] > 0:
        assert proc.read_bytes(buffer.ptr, offsets[j]) == data[:offsets[j]]
    tail = offsets[j] + unmap_size
    if tail < size:
        assert proc.read_bytes(buffer.ptr + tail, size - tail) == data[tail:]
    proc.munmap(old_ptr, 2 * size)


def test_migrate_remap_fault(proc, fd):
    """Migrate, mremap(MREMAP_MAYMOVE | MREMAP_FIXED [| MREMAP_DONTUNMAP]) the range before or after the
    migration to three offsets past it, fault it back at the new address (THP on and off): the device-private
    entries move with the page tables."""
    size = PMD_SIZE
    npages = size >> 12
    data = pattern(size)
    for before in (0, 1):
        for dont_unmap in (0, 1):
            for use_thp in (0, 1):
                for off in (0, size // 4, size // 2):
                    buffer = HmmBuffer(8 * size, size)
                    buffer.mirror[:] = b"\xff" * size
                    old_ptr = proc.mmap(8 * size, "rw", ["private", "anonymous"])
                    mapped = (old_ptr + size - 1) & ~(size - 1)
                    assert proc.madvise(mapped, size, "hugepage" if use_thp else "nohugepage") == 0
                    proc.munmap(mapped + size, 2 * size)
                    buffer.ptr = mapped
                    proc.write_bytes(buffer.ptr, data)

                    def remap():
                        return proc.mremap(mapped, size, size, True, mapped + size + off,
                                           dontunmap=bool(dont_unmap))
                    if before:
                        buffer.ptr = new_ptr = remap()
                    ret = hmm_migrate_sys_to_dev(fd, buffer, npages)
                    assert ret == 0
                    assert buffer.cpages == npages
                    assert bytes(buffer.mirror) == data
                    if not before:
                        buffer.ptr = new_ptr = remap()
                    assert proc.read_bytes(buffer.ptr, size) == data   # faults back at the new address
                    proc.munmap(new_ptr, size)
                    proc.munmap(old_ptr, 8 * size)
