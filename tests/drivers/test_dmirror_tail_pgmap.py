"""6.12 test_hmm: SNAPSHOT of a 2 MiB device-dax PMD reads its tail pages as device-coherent memory of
another device (profile field ``dmirror_tail_pgmap_aliases_head``).

Expected bytes measured in the 6.12.118 test guest (``hmmirror crosscheck --guest``, a write fault on a
2 MiB-aligned device-dax mapping then HMM_DMIRROR_SNAPSHOT): head page 0x06 (PMD | WRITE), the 511 tail pages
0x56 (DEV_COHERENT_REMOTE | PMD | WRITE).  Cause: in 6.12 ``page->pgmap`` shares its word with
``compound_head``; fixed by ``page_pgmap()`` in 6.15, so 6.18 reads 0x06 for every page.
"""

from __future__ import annotations

import dataclasses

import pytest

from hmmirror import profiles
from hmmirror.scenario import parse, run

SCENARIO = """
[machine]
kernel = "{kernel}"
[[machine.pmem]]
name = "pmem1"
size = "64M"
mode = "devdax"
align = "{align}"
[[op]]
op = "mmap"
as = "d"
file = "/dev/dax1.0"
length = "4M"
flags = ["shared"]
[[op]]
op = "touch"
addr = "d"
length = "4K"
access = "write"
[[op]]
op = "dmirror_open"
[[op]]
op = "dmirror_snapshot"
addr = "d"
length = "2M"
"""


def _snapshot(kernel: str, align: str = "2M") -> list[int]:
    r = run(parse(SCENARIO.format(kernel=kernel, align=align), "tail.toml"))
    rec = r.records[-1]
    assert rec.ok, rec.note
    return rec.extra["snapshot"]


@pytest.fixture
def quirk_profile(monkeypatch: pytest.MonkeyPatch) -> str:
    """The 6.12 profile when the model has it, else 6.18 with only this field switched on."""
    if "6.12" in profiles.PROFILES:
        assert profiles.PROFILES["6.12"].dmirror_tail_pgmap_aliases_head
        return "6.12"
    prof = dataclasses.replace(profiles.V6_18, name="6.12-tail-quirk", dmirror_tail_pgmap_aliases_head=True)
    monkeypatch.setitem(profiles.PROFILES, prof.name, prof)
    return prof.name


def test_tail_pages_of_a_devdax_pmd_read_as_remote_coherent(quirk_profile: str) -> None:
    assert _snapshot(quirk_profile) == [0x06] + [0x56] * 511


def test_without_the_alias_every_page_reads_pmd_write() -> None:
    assert not profiles.V6_18.dmirror_tail_pgmap_aliases_head
    assert _snapshot("6.18") == [0x06] * 512


def test_only_compound_device_dax_folios_alias(quirk_profile: str) -> None:
    from hmmirror.drivers.test_hmm import tail_pgmap_type

    class Dev:
        align = 4096

    class Res:
        start = 1 << 20

    class Pgmap:
        dev = Dev()
        res = Res()

    # 4 KiB alignment: no compound folios (vmemmap_shift 0), nothing aliases
    assert tail_pgmap_type(Pgmap(), (1 << 20) + 5) is None
    Dev.align = 2 << 20
    assert tail_pgmap_type(Pgmap(), 1 << 20) is None                        # the head page
    assert tail_pgmap_type(Pgmap(), (1 << 20) + 1) == "MEMORY_DEVICE_COHERENT"
    Dev.align = 1 << 30                                                     # 0x40000 >> 8 = 0x400: no type
    assert tail_pgmap_type(Pgmap(), (1 << 20) + 7) == ""
