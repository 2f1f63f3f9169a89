"""The host cross-check's known model and runner errors (issue 12), each reproduced on this kernel.

Every test runs a scenario in real worker processes and in the model (``crosscheck_scenario``), asserts the
real kernel's values first (the behaviour the fix follows, observed on 6.18.44 with CONFIG_PAGE_MAPCOUNT=y)
and then that the model agrees page by page.  Resources (workers, loop mounts, hugetlb pools) are released
by context managers, also when an assertion fails.  Only a run the host kernel did not disturb on its own
(compaction, reclaim; ``livecheck.both``) is asserted on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hmmirror.live import hostenv

sys.path.insert(0, str(Path(__file__).parent))
from livecheck import both, disagreements, fill  # noqa: E402

_REASON = hostenv.why_not_live()
pytestmark = [pytest.mark.live, pytest.mark.xdist_group("host"),
              pytest.mark.skipif(_REASON is not None, reason=f"live: {_REASON}")]


THP_FORK = """
machine = { kernel = "6.18" }
op = [
  { op = "mmap", as = "m", length = "2M", prot = "rw", flags = ["private", "anonymous"], align = "2M" },
  { op = "madvise", addr = "m", length = "2M", advice = "hugepage" },
  { op = "touch", addr = "m", length = "4K", access = "write" },
  { op = "fork", child = "c" },
  { op = "touch", proc = "c", addr = "m", length = "4K", access = "write" },
  { op = "inspect", proc = "p", addr = "m", length = "2M" },
  { op = "inspect", proc = "c", addr = "m", length = "2M" },
]
"""


def test_pagemap_exclusive_of_pmd_thp_reads_the_head_page() -> None:
    """Error 1: after fork and a COW of the child's first page, the parent's PMD still maps a folio the
    child maps with 511 PTEs; 6.18 reads the head page's precise mapcount (1) for all 512 entries."""
    model, real, rep = both(THP_FORK)
    parent, child = real[5].pages, real[6].pages
    assert all(p.level == "pmd" for p in parent)
    assert all(p.exclusive for p in parent)                  # the kernel: exclusive, though shared
    assert child[0].exclusive and not any(p.exclusive for p in child[1:])
    assert disagreements(rep) == []


FILE_FOLIO_FORK = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/e", type = "ext4" }] }
file = [{ path = "/mnt/e/f", size = "128K" }]
op = [
  { op = "mmap", as = "m", length = "128K", prot = "r", flags = ["shared"], file = "/mnt/e/f", align = "2M" },
  { op = "touch", addr = "m", length = "4K" },
  { op = "fork", child = "c" },
  { op = "touch", proc = "c", addr = "m", length = "4K" },
  { op = "madvise", proc = "c", addr = "m", length = "32K", advice = "dontneed" },
  { op = "inspect", proc = "p", addr = "m", length = "128K" },
]
"""


def test_pagemap_exclusive_of_pte_mapped_large_folio_is_per_page() -> None:
    """Error 1 (PTE side): with CONFIG_PAGE_MAPCOUNT a PTE reads its own page's mapcount, not "is the folio
    mapped by another mm": pages the child dropped are exclusive in the parent, the others are not (a
    shared file mapping's PTEs are not copied by fork: the child's touch maps the folio anew).  Also
    runner error 3: a fresh mapping in the arena has no PTE table, so finish_fault maps the whole 32-page
    folio (it ends at EOF, so fault-around maps nothing)."""
    model, real, rep = both(FILE_FOLIO_FORK)
    pages = real[5].pages
    assert all(p.present for p in pages)                     # the whole 32-page folio
    assert [p.exclusive for p in pages] == [True] * 8 + [False] * 24
    assert disagreements(rep) == []


def _file_faults(fstype: str, npages: int, touches: list[int], map_pages: int | None = None) -> str:
    """A file of ``npages`` written with one pwrite, a 2 MiB-aligned shared read mapping of ``map_pages``,
    read touches of the given pages, one inspect."""
    length = f"{(map_pages or npages) * 4}K"
    touch = "".join(f'  {{ op = "touch", addr = "m+{t * 4}K", length = "4K" }},\n' for t in touches)
    return f"""
machine = {{ kernel = "6.18", fs = [{{ mount = "/mnt/e", type = "{fstype}" }}] }}
file = [{{ path = "/mnt/e/f", size = "{npages * 4}K" }}]
op = [
  {{ op = "mmap", as = "m", length = "{length}", prot = "r", flags = ["shared"], file = "/mnt/e/f", align = "2M" }},
{touch}  {{ op = "inspect", addr = "m", length = "{length}" }},
]
"""


# (pages in the file, pages touched, pages mapped, first and last mapped page, PMD), seen on 6.18.44.  The
# written file's folios: 32 -> [32]; 48 -> [32, 16]; 42 -> [32, 8, 2]; 256 -> [256]; 1024 -> [512, 512].
FILE_CASES = [
    (32, [0], None, (0, 31), False),        # folio ends at EOF: fault-around maps nothing, finish_fault all
    (48, [0], None, (0, 31), False),        # folio [0,32) ends before EOF: fault-around maps it whole
    (48, [40], None, (32, 47), False),      # folio [32,48) ends at EOF: finish_fault maps it whole
    (42, [41], None, (32, 41), False),      # [32,40) below EOF: mapped large (table installed), [40,42) too
    (256, [8], 16, (8, 8), False),          # 256-page folio at EOF, 16-page VMA: only the faulting page
    (256, [8, 3], 16, (0, 15), False),      # now the PTE table exists: fault-around maps the window
    (1024, [0], None, (0, 511), True),      # error 3: a cached PMD-order folio is PMD-mapped, no HUGEPAGE
    (1024, [600], None, (512, 1023), True),  # at EOF: finish_fault still maps the PMD (i_size covers it)
]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: f"{c[0]}p-touch{'-'.join(map(str, c[1]))}")
def test_file_faults_on_large_folios(fstype: str, case: tuple) -> None:
    """Errors 2 and 3: fault-around and finish_fault on the large folios of a freshly written file."""
    npages, touches, map_pages, (lo, hi), pmd = case
    model, real, rep = both(_file_faults(fstype, npages, touches, map_pages), f"{fstype}-{npages}.toml")
    pages = real[-1].pages
    mapped = [i for i, p in enumerate(pages) if p.present]
    assert mapped == list(range(lo, hi + 1))
    assert all((p.level == "pmd") == pmd for p in pages if p.present)
    assert disagreements(rep) == []


PARTLY_MAPPED = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/e", type = "ext4" }] }
file = [{ path = "/mnt/e/f", size = "128K" }]
op = [
  { op = "mmap", as = "m", length = "128K", prot = "rw", flags = ["shared"], file = "/mnt/e/f", align = "2M" },
  { op = "touch", addr = "m", length = "4K" },
  { op = "madvise", addr = "m", length = "16K", advice = "dontneed" },
  { op = "touch", addr = "m+4K", length = "4K", access = "write" },
  { op = "inspect", addr = "m", length = "128K" },
]
"""


def test_finish_fault_maps_one_page_of_a_partly_mapped_folio() -> None:
    """Error 2: a shared write fault (no fault-around) in a folio whose other PTEs are mapped maps one page."""
    model, real, rep = both(PARTLY_MAPPED)
    assert [i for i, p in enumerate(real[-1].pages) if p.present] == [1] + list(range(4, 32))
    assert disagreements(rep) == []


PAGEOUT = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/e", type = "{fs}" }] }
file = [{ path = "/mnt/e/f", size = "64K" }]
op = [
  { op = "mmap", as = "m", length = "64K", prot = "rw", flags = ["{share}"], file = "/mnt/e/f" },
  { op = "touch", addr = "m", length = "4K" },
  { op = "touch", addr = "m+12K", length = "4K", access = "write" },
  { op = "mmap", as = "a", length = "16K", prot = "rw", flags = ["private", "anonymous"] },
  { op = "touch", addr = "a", length = "16K", access = "write" },
  { op = "madvise", addr = "m", length = "64K", advice = "pageout" },
  { op = "madvise", addr = "a", length = "16K", advice = "pageout" },
  { op = "inspect", addr = "m", length = "64K" },
  { op = "inspect", addr = "a", length = "16K" },
  { op = "touch", addr = "m+20K", length = "4K" },
  { op = "inspect", addr = "m", length = "64K" },
]
"""


@pytest.mark.parametrize("fs", ["ext4", "xfs", "tmpfs"])
@pytest.mark.parametrize("share", ["shared", "private"])
def test_madv_pageout_unmaps_file_pages(fs: str, share: str) -> None:
    """Error 5: MADV_PAGEOUT unmaps the range's file pages (this machine has no swap: anonymous memory and
    private COW copies stay)."""
    model, real, rep = both(fill(PAGEOUT, fs=fs, share=share), f"pageout-{fs}-{share}.toml")
    assert [i for i, p in enumerate(real[7].pages) if p.present] == ([3] if share == "private" else [])
    assert all(p.present for p in real[8].pages)
    assert disagreements(rep) == []


TRUNCATE = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/e", type = "{fs}" }] }
file = [{ path = "/mnt/e/f", size = "{size}K" }]
op = [
  { op = "mmap", as = "m", length = "{size}K", prot = "r", flags = ["shared"], file = "/mnt/e/f", align = "2M" },
  { op = "touch", addr = "m", length = "{size}K" },
  { op = "inspect", addr = "m", length = "{size}K" },
  { op = "truncate", file = "/mnt/e/f", size = "{new}" },
  { op = "inspect", addr = "m", length = "{size}K" },
  { op = "touch", addr = "m+{touch}K", length = "4K" },
  { op = "inspect", addr = "m", length = "{size}K" },
]
"""

# (fs, file KiB, new size in bytes, page touched after, pages mapped right after the truncate)
TRUNCATE_CASES = [
    ("ext4", 192, 40 * 4096, 33, list(range(32))),          # 48 pages: folios [0,32) [32,48); cut at 40
    ("ext4", 192, 42 * 4096 + 100, 41, list(range(32))),    # cut inside page 42
    ("xfs", 192, 36 * 4096, 32, list(range(32))),
    ("xfs", 192, 42 * 4096 + 100, 41, list(range(32))),     # xfs_truncate_page dirties [32,48): not split
    ("ext4", 4096, 600 * 4096, 520, []),                    # 1024 pages: two PMD folios; the second cut
]


@pytest.mark.parametrize("case", TRUNCATE_CASES, ids=lambda c: f"{c[0]}-{c[1]}K-to-{c[2]}")
def test_truncate_through_a_large_folio_unmaps_it(case: tuple) -> None:
    """Error 6: truncate splits the folio the new EOF cuts, and splitting a file folio unmaps all of it,
    its pages below the new EOF included."""
    fs, size, new, touch, mapped = case
    model, real, rep = both(fill(TRUNCATE, fs=fs, size=size, new=new, touch=touch * 4), f"trunc-{fs}.toml")
    after = [i for i, p in enumerate(real[4].pages) if p.present]
    if size == 4096:
        assert after == list(range(512))                     # the first PMD folio lies wholly below
    else:
        assert after == mapped
    assert disagreements(rep) == []


COLLAPSE = """
machine = {{ kernel = "6.18"{fs} }}
{file}op = [
  {{ op = "mmap", as = "m", length = "2M", prot = "rw", flags = {flags}, {backing}align = "2M" }},
  {{ op = "touch", addr = "m", length = "4K" }},
  {{ op = "touch", addr = "m+20K", length = "4K", access = "write" }},
  {{ op = "madvise", addr = "m", length = "2M", advice = "collapse" }},
  {{ op = "inspect", addr = "m", length = "2M" }},
]
"""
TMPFS = ', fs = [{ mount = "/mnt/t", type = "tmpfs" }]'


@pytest.mark.parametrize("kind", ["tmpfs-data", "tmpfs-sparse", "shared-anon"])
def test_madv_collapse_of_shmem_with_shmem_enabled_never(kind: str) -> None:
    """Error 4: MADV_COLLAPSE of shmem succeeds whatever shmem_enabled / huge= say, and PMD-maps it."""
    if kind == "shared-anon":
        text = COLLAPSE.format(fs="", file="", flags='["shared", "anonymous"]', backing="")
    else:
        content = "data" if kind == "tmpfs-data" else "sparse"
        text = COLLAPSE.format(fs=TMPFS, file=f'file = [{{ path = "/mnt/t/f", size = "2M", content = "{content}" }}]\n',
                               flags='["shared"]', backing='file = "/mnt/t/f", ')
    with hostenv.thp_config(shmem_enabled="never"):         # restored on exit, also on failure
        model, real, rep = both(text, f"collapse-{kind}.toml")
    assert real[3].ok
    assert all(p.present and p.level == "pmd" for p in real[4].pages)
    assert disagreements(rep) == []


PAGEOUT_PARTIAL = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/e", type = "ext4" }] }
file = [{ path = "/mnt/e/f", size = "64K" }]
op = [
  { op = "mmap", as = "m", length = "64K", prot = "rw", flags = ["shared"], file = "/mnt/e/f" },
  { op = "touch", addr = "m", length = "4K", access = "{access}" },
  { op = "mmap", as = "t", length = "4M", prot = "rw", flags = ["private", "anonymous"], align = "2M" },
  { op = "madvise", addr = "t", length = "4M", advice = "hugepage" },
  { op = "touch", addr = "t+2M", length = "8K", access = "write", fill = 7 },
  { op = "touch", addr = "t+3M", length = "4K", access = "write" },
  { op = "madvise", addr = "m", length = "32K", advice = "pageout" },
  { op = "madvise", addr = "t+1M", length = "1536K", advice = "pageout" },
  { op = "inspect", addr = "m", length = "64K" },
  { op = "inspect", addr = "t+2M", length = "2M" },
]
"""


@pytest.mark.parametrize("access", ["read", "write"])
def test_madv_pageout_of_part_of_a_large_folio(access: str) -> None:
    """Error 5, partial folios: a clean file folio partly in the range is split, which unmaps all of it; a
    dirty one cannot be split and stays mapped.  An anonymous THP partly in the range is split and its
    zero-filled subpages become the shared zero page (no swap here: nothing else is reclaimed)."""
    model, real, rep = both(fill(PAGEOUT_PARTIAL, access=access), f"pageout-partial-{access}.toml")
    filep, thp = real[8].pages, real[9].pages
    assert [p.present for p in filep] == [access == "write"] * 16
    assert [p.kind for p in thp[:2]] == ["anon", "anon"] and all(p.level == "pte" for p in thp)
    assert all(p.kind == "zero" for p in thp[2:])
    assert disagreements(rep) == []


BEYOND_EOF = """
machine = { kernel = "6.18", fs = [{ mount = "/mnt/t", type = "tmpfs" }] }
file = [{ path = "/mnt/t/f", size = "44K" }]
op = [
  { op = "mmap", as = "m", length = "44K", prot = "r", flags = ["shared"], file = "/mnt/t/f", align = "2M" },
  { op = "truncate", file = "/mnt/t/f", size = 21241 },
  { op = "touch", addr = "m+40K", length = "4K" },
  { op = "inspect", addr = "m", length = "44K" },
]
"""


def test_a_read_beyond_eof_faults_around_before_its_sigbus() -> None:
    """Runner error: the worker must not skip a load that will SIGBUS, the kernel faults (and maps the
    pages around it below EOF) before it sends the signal; the worker takes that fault through
    /proc/self/mem."""
    model, real, rep = both(BEYOND_EOF, "beyond-eof.toml")
    assert real[2].errno == "EFAULT" and real[2].signal == "SIGBUS"
    assert [i for i, p in enumerate(real[3].pages) if p.present] == list(range(6))
    assert disagreements(rep) == []


def _collapse_ops(*prep: str) -> str:
    """A 4 MiB MADV_HUGEPAGE anonymous mapping, the ``prep`` ops (inline tables), MADV_COLLAPSE, an inspect."""
    ops = "".join(f"  {op},\n" for op in prep)
    return ('machine = { kernel = "6.18" }\nop = [\n'
            '  { op = "mmap", as = "m", length = "4M", prot = "rw", flags = ["private", "anonymous"], align = "2M" },\n'
            '  { op = "madvise", addr = "m", length = "4M", advice = "hugepage" },\n' + ops +
            '  { op = "madvise", addr = "m", length = "4M", advice = "collapse" },\n'
            '  { op = "inspect", addr = "m", length = "4M" },\n]\n')


NOHUGE = '{ op = "madvise", addr = "m", length = "4M", advice = "nohugepage" }'
HUGE = '{ op = "madvise", addr = "m", length = "4M", advice = "hugepage" }'


def test_madv_collapse_stops_at_a_block_without_page_table() -> None:
    """6.18.44: MADV_COLLAPSE of [empty 2 MiB, PTE-mapped 2 MiB] returns EINVAL at the empty block and
    leaves the second one PTE-mapped (the 6.12 source goes on past SCAN_PMD_NULL)."""
    text = _collapse_ops(NOHUGE, '{ op = "touch", addr = "m+2M", length = "64K", access = "write" }', HUGE)
    model, real, rep = both(text, "collapse-stop.toml")
    assert real[-2].errno == "EINVAL"
    assert all(p.level == "pte" for p in real[-1].pages if p.present) and real[-1].pages[512].present
    assert disagreements(rep) == []


@pytest.mark.parametrize("written", [False, True])
def test_madv_collapse_of_zero_page_ptes(written: bool) -> None:
    """6.18.44: a block of read-only zero-page PTEs collapses (no writable PTE is needed any more) once the
    VMA has an anon_vma (one written page anywhere in it); with only zero pages it has none: EINVAL."""
    write = ['{ op = "touch", addr = "m+2M", length = "4K", access = "write" }'] if written else []
    text = _collapse_ops(NOHUGE, '{ op = "touch", addr = "m", length = "4M" }', *write, HUGE)
    model, real, rep = both(text, "collapse-zero.toml")
    assert real[-2].errno == (None if written else "EINVAL")
    assert all((p.level == "pmd") == written for p in real[-1].pages)
    assert disagreements(rep) == []


EMPTY_SHMEM_COLLAPSE = """
machine = { kernel = "6.18" }
op = [
  { op = "mmap", as = "m", length = "2M", prot = "rw", flags = ["shared", "anonymous"], align = "2M" },
  { op = "madvise", addr = "m", length = "2M", advice = "collapse" },
  { op = "inspect", addr = "m", length = "2M" },
  { op = "touch", addr = "m+1M", length = "4K" },
  { op = "madvise", addr = "m", length = "2M", advice = "collapse" },
  { op = "inspect", addr = "m", length = "2M" },
]
"""


def test_madv_collapse_of_an_empty_shmem_block() -> None:
    """6.18.44: a shmem block with nothing cached does not collapse (EINVAL); one cached page is enough."""
    with hostenv.thp_config(shmem_enabled="never"):
        model, real, rep = both(EMPTY_SHMEM_COLLAPSE, "collapse-empty-shmem.toml")
    assert real[1].errno == "EINVAL" and not any(p.present for p in real[2].pages)
    assert real[4].errno is None and all(p.level == "pmd" for p in real[5].pages)
    assert disagreements(rep) == []


THP_COW_REUSE = """
machine = { kernel = "6.18" }
op = [
  { op = "mmap", as = "m", length = "2M", prot = "rw", flags = ["private", "anonymous"], align = "2M" },
  { op = "madvise", addr = "m", length = "2M", advice = "hugepage" },
  { op = "touch", addr = "m", length = "2M", access = "write" },
  { op = "fork", proc = "p", child = "c" },
  { op = "touch", proc = "c", addr = "m+400K", length = "400K", access = "write" },
  { op = "touch", addr = "m+1200K", length = "4K", access = "write" },
  { op = "inspect", addr = "m", length = "2M" },
  { op = "touch", addr = "m+600K", length = "4K", access = "write" },
  { op = "inspect", addr = "m", length = "2M" },
  { op = "exit", proc = "c" },
  { op = "touch", addr = "m+4K", length = "4K", access = "write" },
  { op = "inspect", addr = "m", length = "2M" },
]
"""


def test_cow_of_a_pte_mapped_thp_reuses_only_a_folio_this_mm_maps_alone() -> None:
    """__wp_can_reuse_large_anon_folio() (6.15+): the parent's write to a page of its PTE-mapped THP copies
    while the child still maps part of the folio, and reuses the page once the child has exited."""
    model, real, rep = both(THP_COW_REUSE, "thp-cow-reuse.toml")
    shared, after = real[6].pages, real[8].pages
    assert after[150].pfn != shared[150].pfn                # child alive: copied
    last = real[11].pages
    assert last[1].pfn == after[1].pfn                      # child gone: reused in place
    assert disagreements(rep) == []
