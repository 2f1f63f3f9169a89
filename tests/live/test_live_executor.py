"""Live tests of hmmirror.live.executor and hmmirror.live.hostenv (expected values: mm-substrate.md §9).

Every test cleans up through context managers: workers are killed and reaped, mounts unmounted and the
hugetlb pool restored, also when an assertion fails.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from hmmirror.errors import InputError
from hmmirror.live import hostenv
from hmmirror.live import executor
from hmmirror.live.executor import LiveExecutor, LiveOpResult

sys.path.insert(0, str(Path(__file__).parent))
from livecheck import quiet  # noqa: E402

_REASON = hostenv.why_not_live()
pytestmark = [pytest.mark.live, pytest.mark.xdist_group("host"), pytest.mark.skipif(_REASON is not None, reason=f"live: {_REASON}")]


def mmap(name: str, length: str, **kw: object) -> dict:
    """An anonymous private RW mmap op (overridable)."""
    return {"op": "mmap", "length": length, "prot": "rw", "flags": ["private", "anonymous"], "as": name, **kw}


def run_ops(*args: object, **kw: object) -> list[LiveOpResult]:
    """:func:`executor.run_ops` on a quiet host (a run the kernel disturbed on its own is repeated)."""
    return quiet(lambda: executor.run_ops(*args, **kw))


def by_index(results: list[LiveOpResult]) -> dict[int, LiveOpResult]:
    """Results keyed by op index, asserting nothing was refused or unsupported."""
    assert not any(r.unsupported or (r.note or "").startswith("refused") for r in results), results
    return {r.index: r for r in results}


def test_fork_shares_pfns_then_parent_write_copies() -> None:
    """F1/F2: after fork both sides map the same pfns (not exclusive); a parent write copies one page."""
    ops = [
        mmap("buf", "24K"),
        {"op": "touch", "addr": "buf", "length": "16K", "access": "write"},
        {"op": "touch", "addr": "buf+16K", "length": "8K", "access": "read"},
        {"op": "fork", "child": "c"},
        {"op": "inspect", "addr": "buf", "length": "24K"},
        {"op": "inspect", "proc": "c", "addr": "buf", "length": "24K"},
        {"op": "touch", "addr": "buf", "length": "4K", "access": "write"},
        {"op": "inspect", "addr": "buf", "length": "24K"},
        {"op": "inspect", "proc": "c", "addr": "buf", "length": "24K"},
    ]
    r = by_index(run_ops(ops))
    assert all(x.ok for x in r.values())
    parent, child = r[4].pages, r[5].pages
    assert [p.pfn for p in parent] == [p.pfn for p in child]
    assert [p.kind for p in parent] == ["anon"] * 4 + ["zero"] * 2
    assert not any(p.exclusive for p in parent + child)
    after_p, after_c = r[7].pages, r[8].pages
    assert after_p[0].pfn != parent[0].pfn and after_p[0].exclusive
    assert after_c[0].pfn == parent[0].pfn and [p.pfn for p in after_p[1:]] == [p.pfn for p in parent[1:]]


def test_dontfork_and_wipeonfork() -> None:
    """F6c/F7c: the child has no VMA for a DONTFORK range and an empty one for WIPEONFORK."""
    ops = [
        mmap("a", "8K"), mmap("b", "8K"),
        {"op": "touch", "addr": "a", "length": "8K", "access": "write"},
        {"op": "touch", "addr": "b", "length": "8K", "access": "write"},
        {"op": "madvise", "addr": "a", "length": "8K", "advice": "dontfork"},
        {"op": "madvise", "addr": "b", "length": "8K", "advice": "wipeonfork"},
        {"op": "fork", "child": "c"},
        {"op": "inspect", "proc": "c", "addr": "a", "length": "8K"},
        {"op": "inspect", "proc": "c", "addr": "b", "length": "8K"},
        {"op": "touch", "proc": "c", "addr": "a", "length": "4K", "access": "read"},
        {"op": "check", "proc": "c", "addr": "b", "length": "8K", "fill": 0},
    ]
    r = by_index(run_ops(ops))
    assert not any(p.present for p in r[7].pages + r[8].pages)
    assert r[9].errno == "EFAULT" and r[9].signal == "SIGSEGV"
    assert r[10].ok and r[10].ret == 0


def test_thp_across_fork() -> None:
    """F8: a PMD-mapped THP stays PMD-mapped on both sides of a fork, same pfns."""
    if hostenv.thp_settings()["enabled"] in (None, "never"):
        pytest.skip("THP disabled on this host")
    ops = [
        mmap("t", "2M", align="2M"),
        {"op": "madvise", "addr": "t", "length": "2M", "advice": "hugepage"},
        {"op": "touch", "addr": "t", "length": "4K", "access": "write"},
        {"op": "fork", "child": "c"},
        {"op": "inspect", "addr": "t"},
        {"op": "inspect", "proc": "c", "addr": "t"},
    ]
    r = by_index(run_ops(ops))
    assert r[0].ret % (2 << 20) == 0
    for pages in (r[4].pages, r[5].pages):
        assert len(pages) == 512 and all(p.huge and p.level == "pmd" and p.kind == "anon" for p in pages)
    assert [p.pfn for p in r[4].pages] == [p.pfn for p in r[5].pages]


def test_tmpfs_shared_read_and_check() -> None:
    """C1 on tmpfs: one read byte maps present shmem pages around it (file bit set); data reads back."""
    try:
        with hostenv.tmpfs() as mnt:
            files = [{"path": "/mnt/t/f", "size": "256K", "content": "data"}]
            ops = [
                {"op": "mmap", "length": "256K", "prot": "r", "flags": ["shared"], "file": "/mnt/t/f",
                 "align": "64K", "as": "f"},
                {"op": "touch", "addr": "f+80K", "length": "4K", "access": "read"},
                {"op": "inspect", "addr": "f", "length": "256K"},
                {"op": "check", "addr": "f", "length": "256K", "fill": "index32"},
            ]
            r = by_index(run_ops(ops, files=files, mounts={"/mnt/t": mnt}))
            assert os.listdir(mnt) == []  # created files are removed
    except hostenv.Unavailable as exc:
        pytest.skip(exc.reason)
    present = [i for i, p in enumerate(r[2].pages) if p.present]
    assert 20 in present and len(present) <= 16
    assert all(r[2].pages[i].kind == "shmem" and r[2].pages[i].file for i in present)
    assert r[3].ok and r[3].ret == 0


def test_ext4_fault_around_window() -> None:
    """D1: ext4 MAP_SHARED, read one byte of p20 -> 16 PTEs, window aligned on the VA (p16-p31 here)."""
    try:
        with hostenv.loop_fs("ext4", "16M") as mnt:
            files = [{"path": "/mnt/e/f", "size": "256K", "content": "data"}]
            ops = [
                {"op": "mmap", "length": "256K", "prot": "r", "flags": ["shared"], "file": "/mnt/e/f",
                 "align": "64K", "as": "f"},
                {"op": "touch", "addr": "f+80K", "length": "4K", "access": "read"},
                {"op": "inspect", "addr": "f", "length": "256K"},
            ]
            r = by_index(run_ops(ops, files=files, mounts={"/mnt/e": mnt}))
    except hostenv.Unavailable as exc:
        pytest.skip(exc.reason)
    present = [i for i, p in enumerate(r[2].pages) if p.present]
    assert present == list(range(16, 32))
    assert all(r[2].pages[i].kind == "file" and r[2].pages[i].file for i in present)


def test_errors_are_results_and_worker_survives() -> None:
    """EINVAL from mprotect and a touch of a PROT_NONE page are results; the worker keeps running."""
    ops = [
        mmap("buf", "16K"),
        {"op": "mprotect", "addr": "buf+1", "length": "4K", "prot": "r"},
        {"op": "mprotect", "addr": "buf+8K", "length": "8K", "prot": "none"},
        {"op": "touch", "addr": "buf", "length": "16K", "access": "write", "fill": "index32"},
        {"op": "check", "addr": "buf", "length": "8K", "fill": "index32"},
        {"op": "exit"},
        {"op": "inspect", "addr": "buf", "length": "16K"},
    ]
    r = by_index(run_ops(ops))
    assert (r[1].ok, r[1].errno) == (False, "EINVAL")
    assert r[2].ok
    assert (r[3].ok, r[3].errno, r[3].signal, r[3].ret) == (False, "EFAULT", "SIGSEGV", 2)
    assert (r[4].ok, r[4].ret) == (True, 0)
    assert r[5].ok and (r[6].ok, r[6].errno) == (False, "ESRCH")


def test_refuses_to_touch_its_own_interpreter() -> None:
    """An munmap of the worker's own heap is refused, not performed."""
    heap = next(line for line in Path("/proc/self/maps").read_text().splitlines() if "[heap]" in line)
    lo = int(heap.split("-")[0], 16)
    (res,) = run_ops([{"op": "munmap", "addr": lo, "length": 4096}])
    assert not res.ok and res.note and res.note.startswith("refused")


def test_timeout_kills_worker_and_everything_is_reaped() -> None:
    """A stuck op times out; afterwards no worker (parent or forked child) is left, not even a zombie."""
    with LiveExecutor(("p",), timeout=0.3) as ex:
        results = ex.run([{"op": "fork", "child": "c"}, {"op": "_sleep", "proc": "c", "seconds": 5},
                          {"op": "exit"}])
        pids = [p.pid for p in ex.procs.values()]
    assert results[1].errno == "ETIMEDOUT" and results[2].ok
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or f" {os.getpid()} " not in stat.read_text()


def test_bad_input_raises_before_running() -> None:
    """Unknown ops, names and processes are InputErrors naming the op; no process is started."""
    t = time.perf_counter()
    for ops, text in [
        ([{"op": "frobnicate"}], "unknown op"),
        ([{"op": "touch", "addr": "nowhere+4K", "length": 4096}], "names no earlier mapping"),
        ([{"op": "exit", "proc": "q"}], "unknown process"),
        ([mmap("a", "4K", prot="rwz")], "unknown prot"),
        ([mmap("a", "4K", file="/not/mounted")], "no mounted filesystem"),
    ]:
        with pytest.raises(InputError) as ei:
            run_ops(ops)
        assert text in str(ei.value) and "\n" not in str(ei.value)
    assert time.perf_counter() - t < 1.0


def test_hostenv_cleans_up_on_failure() -> None:
    """tmpfs and the hugetlb pool are restored when the body raises."""
    pool = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    before = pool.read_text()
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        with hostenv.tmpfs() as mnt, hostenv.reserve_hugepages("2M", 1):
            seen.append(mnt)
            raise RuntimeError("boom")
    assert seen and not os.path.ismount(seen[0]) and not os.path.exists(seen[0])
    assert pool.read_text() == before


def test_thp_settings_and_reason() -> None:
    """THP settings parse into plain values."""
    s = hostenv.thp_settings()
    assert s["enabled"] in ("always", "madvise", "never") and isinstance(s["use_zero_page"], bool)
    assert hostenv.why_not_live() is None and hostenv.is_root()


def test_workers_run_on_the_controllers_one_cpu_and_affinity_is_restored() -> None:
    """madvise_pageout drains only the local CPU's folio batches (lru_add_drain), so the files and every
    worker of a scenario share one CPU; the controller gets its own affinity back afterwards."""
    before = os.sched_getaffinity(0)
    ex = LiveExecutor(("p",))
    with ex:
        assert ex.cpu in before
        assert os.sched_getaffinity(0) == {ex.cpu}
        assert os.sched_getaffinity(ex.procs["p"].pid) == {ex.cpu}
        res = ex.execute(0, {"op": "fork", "proc": "p", "child": "c"})
        assert res.ok
        assert os.sched_getaffinity(ex.procs["c"].pid) == {ex.cpu}
    assert os.sched_getaffinity(0) == before
