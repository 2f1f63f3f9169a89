"""The model errors the host cross-check found (issue 12), as model-only tests.

Expected values are the host kernel's (6.18.44, CONFIG_PAGE_MAPCOUNT=y), observed by the live tests in
tests/live/test_live_fidelity.py, which run the same scenarios on the real kernel; these run everywhere.
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PMD_SIZE

PAGE = 4096


def _thp_fork(kernel: str) -> tuple[list, list]:
    m = Machine(kernel, ram=256 << 20)
    m.thp.enabled = "madvise"
    p = m.spawn()
    a = p.mmap(PMD_SIZE, align=PMD_SIZE)
    p.madvise(a, PMD_SIZE, "hugepage")
    p.touch(a, PAGE, write=True)
    c = p.fork("c")
    c.touch(a, PAGE, write=True)
    return p.inspect(a, PMD_SIZE), c.inspect(a, PMD_SIZE)


def test_pmd_exclusive_reads_head_page_6_18() -> None:
    # error 1: the parent's PMD (the child maps 511 of its pages by PTEs) reads the head page's mapcount
    parent, child = _thp_fork("6.18")
    assert all(s.level == "pmd" for s in parent)
    assert all(s.exclusive for s in parent)
    assert child[0].exclusive and not any(s.exclusive for s in child[1:])


def test_pte_exclusive_of_large_file_folio_is_per_page() -> None:
    # error 1, PTE side: a page the other mm dropped is exclusive though its folio is mapped there too
    m = Machine("6.18", ram=256 << 20)
    m.mount("/mnt/e", "ext4")
    m.create_file("/mnt/e/f", 32 * PAGE)
    p = m.spawn()
    a = p.mmap(32 * PAGE, "r", ["shared"], file="/mnt/e/f", align=PMD_SIZE)
    p.touch(a, PAGE)
    c = p.fork("c")
    c.touch(a, PAGE)
    c.madvise(a, 8 * PAGE, "dontneed")
    st = p.inspect(a, 32 * PAGE)
    assert all(s.present for s in st)
    assert [s.exclusive for s in st] == [True] * 8 + [False] * 24
