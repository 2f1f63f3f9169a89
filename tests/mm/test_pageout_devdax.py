"""MADV_PAGEOUT of a device-dax mapping (found by the guest's random scenarios: the model raised).

Measured in the 6.12 test guest (``hmmirror guest run``): madvise(MADV_PAGEOUT) over a 2 MiB device-dax
mapping after a write fault returns 0 and the PMD stays mapped (device-dax has no page cache and its
entries are not normal pages, so there is nothing to reclaim).
"""

from __future__ import annotations

import pytest

from hmmirror.scenario import parse, run

SCENARIO = """
[machine]
kernel = "{kernel}"
[[machine.pmem]]
name = "pmem1"
size = "64M"
mode = "devdax"
[[op]]
op = "mmap"
as = "d"
file = "/dev/dax1.0"
length = "2M"
flags = ["shared"]
[[op]]
op = "touch"
addr = "d"
length = "4K"
access = "write"
[[op]]
op = "madvise"
addr = "d"
length = "2M"
advice = "pageout"
expect = {{ ret = 0 }}
[[op]]
op = "inspect"
addr = "d"
length = "8K"
expect = {{ pages = [ {{ range = "all", present = true, kind = "devmap", level = "pmd", huge = true }} ] }}
"""


@pytest.mark.parametrize("kernel", ["6.18"])
def test_pageout_leaves_device_dax_mapped(kernel: str) -> None:
    r = run(parse(SCENARIO.format(kernel=kernel), "pageout.toml"))
    assert r.ok, [(rec.op, rec.errno, rec.note, rec.mismatches) for rec in r.records]
