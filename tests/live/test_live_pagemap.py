"""Live tests of hmmirror.live.pagemap against the host kernel (expected values: mm-substrate.md §9).

Mappings are made in this test process with ctypes and unmapped by the fixture, also on failure.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Iterator

import pytest

from hmmirror.errors import InputError
from hmmirror.live import hostenv
from hmmirror.live.pagemap import PAGE_SIZE, read_columns, read_range

_REASON = hostenv.why_not_live()
pytestmark = [pytest.mark.live, pytest.mark.xdist_group("host"), pytest.mark.skipif(_REASON is not None, reason=f"live: {_REASON}")]

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
MAP_SHARED, MAP_PRIVATE, MAP_ANON, MAP_NORESERVE, MAP_HUGETLB = 0x01, 0x02, 0x20, 0x4000, 0x40000
MADV_DONTNEED, MADV_HUGEPAGE, MADV_GUARD_INSTALL = 4, 14, 102
MiB = 1 << 20
PID = os.getpid()

Mapper = Callable[..., int]


@pytest.fixture
def mapper() -> Iterator[Mapper]:
    """``mapper(length, prot=RW, flags=PRIVATE|ANON, align=0)`` -> address; unmaps everything afterwards."""
    maps: list[tuple[int, int]] = []

    def _map(length: int, prot: int = PROT_RW, flags: int = MAP_PRIVATE | MAP_ANON, align: int = 0) -> int:
        total = length + align
        addr = libc.mmap(None, total, prot, flags, -1, 0)
        assert addr not in (None, (1 << 64) - 1), os.strerror(ctypes.get_errno())
        maps.append((addr, total))
        return (addr + align - 1) // align * align if align else addr

    yield _map
    for addr, length in maps:
        libc.munmap(addr, length)


def read_pages(addr: int, n: int) -> None:
    """CPU read of one byte per page."""
    for i in range(n):
        ctypes.c_char.from_address(addr + i * PAGE_SIZE).value  # noqa: B018 - the access is the point


def write_pages(addr: int, n: int) -> None:
    """CPU write of one byte per page."""
    for i in range(n):
        ctypes.c_char.from_address(addr + i * PAGE_SIZE).value = b"\x01"


def test_untouched_mapping_not_present(mapper: Mapper) -> None:
    """A1: an untouched anonymous mapping has no present entry."""
    a = mapper(16 * PAGE_SIZE)
    pages = read_range(PID, a, a + 16 * PAGE_SIZE)
    assert len(pages) == 16
    assert all(not p.present and p.kind == "none" and p.pfn is None and p.write is None for p in pages)


def test_anon_read_maps_zero_page(mapper: Mapper) -> None:
    """A2: reading every page of private anon memory maps the one shared zero page."""
    a = mapper(16 * PAGE_SIZE)
    read_pages(a, 16)
    pages = read_range(PID, a, a + 16 * PAGE_SIZE)
    assert all(p.present and p.kind == "zero" and p.zero and p.level == "pte" for p in pages)
    assert len({p.pfn for p in pages}) == 1
    assert not any(p.file or p.exclusive or p.huge for p in pages)


def test_anon_write_gives_distinct_exclusive_pages(mapper: Mapper) -> None:
    """A3: writing every page gives distinct, exclusive anonymous pages."""
    a = mapper(16 * PAGE_SIZE)
    write_pages(a, 16)
    pages = read_range(PID, a, a + 16 * PAGE_SIZE)
    assert all(p.kind == "anon" and p.exclusive and not p.zero and not p.file for p in pages)
    assert len({p.pfn for p in pages}) == 16


def test_dontneed_then_read(mapper: Mapper) -> None:
    """A11/A12: DONTNEED of p2-5 empties them; a read maps the zero page there."""
    a = mapper(8 * PAGE_SIZE)
    write_pages(a, 8)
    assert libc.madvise(a + 2 * PAGE_SIZE, 4 * PAGE_SIZE, MADV_DONTNEED) == 0
    pages = read_range(PID, a, a + 8 * PAGE_SIZE)
    assert [p.present for p in pages] == [True, True, False, False, False, False, True, True]
    read_pages(a, 8)
    assert [p.kind for p in read_range(PID, a, a + 8 * PAGE_SIZE)][1:7] == ["anon"] + ["zero"] * 4 + ["anon"]


def test_prot_none_keeps_present_entries(mapper: Mapper) -> None:
    """A8-A10: mprotect(NONE) keeps the entries present with their pfns; they read as protnone."""
    a = mapper(4 * PAGE_SIZE)
    write_pages(a, 4)
    before = read_range(PID, a, a + 4 * PAGE_SIZE)
    assert libc.mprotect(a, 4 * PAGE_SIZE, PROT_NONE) == 0
    after = read_range(PID, a, a + 4 * PAGE_SIZE)
    assert [p.pfn for p in after] == [p.pfn for p in before]
    assert all(p.present and p.protnone for p in after)
    assert libc.mprotect(a, 4 * PAGE_SIZE, PROT_RW) == 0
    assert all(p.protnone is False for p in read_range(PID, a, a + 4 * PAGE_SIZE))


def _need_thp() -> None:
    if hostenv.thp_settings()["enabled"] in (None, "never"):
        pytest.skip("THP disabled on this host")


def test_thp_write_maps_pmd(mapper: Mapper) -> None:
    """T1: MADV_HUGEPAGE on an aligned 2 MiB, one written byte -> one PMD-mapped THP."""
    _need_thp()
    a = mapper(2 * MiB, align=2 * MiB)
    assert libc.madvise(a, 2 * MiB, MADV_HUGEPAGE) == 0
    write_pages(a, 1)
    pages = read_range(PID, a, a + 2 * MiB)
    assert all(p.present and p.huge and p.level == "pmd" and p.kind == "anon" for p in pages)
    assert [p.pfn for p in pages] == list(range(pages[0].pfn, pages[0].pfn + 512))
    assert pages[0].pfn % 512 == 0


def test_thp_read_maps_huge_zero_page(mapper: Mapper) -> None:
    """T2: one read byte maps the huge zero page by a PMD; its pagemap file bit is set (§9)."""
    _need_thp()
    if not hostenv.thp_settings()["use_zero_page"]:
        pytest.skip("THP use_zero_page is off")
    a = mapper(2 * MiB, align=2 * MiB)
    assert libc.madvise(a, 2 * MiB, MADV_HUGEPAGE) == 0
    read_pages(a, 1)
    pages = read_range(PID, a, a + 2 * MiB)
    assert all(p.kind == "zero" and p.zero and p.huge and p.level == "pmd" and p.file for p in pages)


def test_shared_anon_read_is_shmem(mapper: Mapper) -> None:
    """B1: reading shared anonymous memory allocates shmem pages (no zero page), file bit set."""
    a = mapper(8 * PAGE_SIZE, flags=MAP_SHARED | MAP_ANON)
    read_pages(a, 8)
    pages = read_range(PID, a, a + 8 * PAGE_SIZE)
    assert all(p.present and p.kind == "shmem" and p.file and not p.zero for p in pages)
    assert len({p.pfn for p in pages}) == 8


def test_hugetlb_2m_read_allocates_whole_page(mapper: Mapper) -> None:
    """H2: a read of one byte of a MAP_HUGETLB 2 MiB mapping maps the whole huge page (PMD)."""
    try:
        with hostenv.reserve_hugepages("2M", 1):
            a = mapper(2 * MiB, flags=MAP_PRIVATE | MAP_ANON | MAP_HUGETLB)
            read_pages(a, 1)
            pages = read_range(PID, a, a + 2 * MiB)
            libc.munmap(a, 2 * MiB)  # give the page back before the pool shrinks
    except hostenv.Unavailable as exc:
        pytest.skip(exc.reason)
    assert all(p.present and p.kind == "hugetlb" and p.huge and p.level == "pmd" for p in pages)
    assert [p.pfn for p in pages] == list(range(pages[0].pfn, pages[0].pfn + 512))


def test_guard_marker(mapper: Mapper) -> None:
    """A16 [6.18]: MADV_GUARD_INSTALL leaves a swap-format marker entry."""
    a = mapper(4 * PAGE_SIZE)
    if libc.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_GUARD_INSTALL) != 0:
        pytest.skip("MADV_GUARD_INSTALL not supported by this kernel")
    pages = read_range(PID, a, a + 4 * PAGE_SIZE)
    assert pages[1].kind == "marker" and pages[1].swapped and not pages[1].present
    assert [p.kind for p in pages[::2]] == ["none", "none"]


def test_columns_match_records(mapper: Mapper) -> None:
    """read_columns gives the same values as read_range."""
    a = mapper(8 * PAGE_SIZE)
    write_pages(a, 3)
    cols = read_columns(PID, a, a + 8 * PAGE_SIZE)
    recs = read_range(PID, a, a + 8 * PAGE_SIZE)
    assert [p.pfn for p in recs] == cols["pfn"] and [p.kind for p in recs] == cols["kind"]


def test_one_gib_is_fast(mapper: Mapper) -> None:
    """A 1 GiB PROT_NONE reservation (Z1) reads as not present, quickly."""
    a = mapper(1 << 30, prot=PROT_NONE, flags=MAP_PRIVATE | MAP_ANON | MAP_NORESERVE)
    t = time.perf_counter()
    cols = read_columns(PID, a, a + (1 << 30))
    assert time.perf_counter() - t < 2.0
    assert not any(cols["present"]) and len(cols["present"]) == 1 << 18


@pytest.mark.parametrize(("start", "end", "what"), [
    (0x1001, 0x3000, "aligned"), (0x3000, 0x3000, "empty"), (0x4000, 0x1000, "empty"),
    (1 << 63, (1 << 63) + PAGE_SIZE, "beyond"), (0, 1 << 65, "overflow"), (-PAGE_SIZE, 0, "negative"),
])
def test_bad_ranges_raise_einval(start: int, end: int, what: str) -> None:
    """Unaligned, empty and overflowing ranges: one-line InputError EINVAL."""
    with pytest.raises(InputError) as ei:
        read_range(PID, start, end)
    assert ei.value.errno_name == "EINVAL" and what in str(ei.value) and "\n" not in str(ei.value)


def test_missing_process_esrch() -> None:
    """A PID that does not exist: ESRCH."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    with pytest.raises(InputError) as ei:
        read_range(pid, 0, PAGE_SIZE)
    assert ei.value.errno_name == "ESRCH"


def test_zombie_esrch() -> None:
    """An exited, unreaped child has no address space: ESRCH."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.002)
        with pytest.raises(InputError) as ei:
            read_range(pid, 0, PAGE_SIZE)
        assert ei.value.errno_name == "ESRCH"
    finally:
        os.waitpid(pid, 0)


def test_no_permission_eacces() -> None:
    """An unprivileged reader of root's pagemap gets EACCES/EPERM (checked in a forked child)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            read_range(PID, 0, PAGE_SIZE)
            code = 1
        except InputError as exc:
            code = 0 if exc.errno_name in ("EACCES", "EPERM") else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


# ------------------------------------------------------------------------------------------ CLI


def test_cli_json_and_table(mapper: Mapper) -> None:
    """``hmmirror live PID START END --json`` prints every page; the table compresses runs."""
    import json

    from click.testing import CliRunner

    from hmmirror.cli.live import command

    a = mapper(8 * PAGE_SIZE)
    write_pages(a, 2)
    res = CliRunner().invoke(command, [str(PID), hex(a), str(a + 8 * PAGE_SIZE), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["pid"] == PID and len(doc["pages"]) == 8 and doc["pages"][0]["kind"] == "anon"
    res = CliRunner().invoke(command, [str(PID), hex(a), hex(a + 8 * PAGE_SIZE)])
    assert res.exit_code == 0 and "0-1" in res.output and "2-7" in res.output


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input through the real entry point: one line on stderr, exit code 2."""
    main = pytest.importorskip("hmmirror.cli.main")
    with pytest.raises(SystemExit) as ei:
        main.main(["live", str(PID), "0x1001", "0x2000"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aligned" in err
