"""pmem namespaces: add_pmem in fsdax and devdax mode, input validation, removal.

Expected values: mm-substrate.md §2.1 (ZONE_DEVICE ranges above RAM, device pages with struct page),
§3 (pgmap registration, one reference per device page; pmem's pgmap.ref is the queue usage counter),
docs/design.md (device ranges 1 GiB aligned) and the brief's naming rule (pmemN -> /dev/daxN.0).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import HPAGE_PUD_NR, PMD_SIZE, PUD_SIZE
from hmmirror.drivers.dax.device import DevDax
from hmmirror.drivers.nvdimm.pmem import PmemDevice
from hmmirror.errors import InputError
from hmmirror.mm.memremap import MEMORY_DEVICE_FS_DAX, MEMORY_DEVICE_GENERIC, get_dev_pagemap
from hmmirror.mm.page_alloc import PG

MiB = 1 << 20


def test_fsdax_namespace(machine: Machine) -> None:
    pmem = machine.add_pmem("pmem0", 64 * MiB)
    assert isinstance(pmem, PmemDevice) and machine.devices["pmem0"] is pmem
    assert pmem.mode == "fsdax" and pmem.dev_dax is None
    pg = pmem.pgmap
    assert pg is not None and pg.type == MEMORY_DEVICE_FS_DAX
    assert pg.ref is not None and pg.ref.name == "pmem0.q_usage_counter"   # §3: pmem uses the queue counter
    assert pmem.start_pfn >= machine.mem.nr_ram and pmem.start_pfn % HPAGE_PUD_NR == 0
    assert pg.res is not None and (pg.res.start, pg.res.end) == (pmem.start_pfn, pmem.start_pfn + 64 * MiB // 4096)
    assert pg.count == 1 + pmem.npages
    assert (machine.mem.flags[pmem.start_pfn: pmem.end_pfn] & PG.device).all()
    assert machine.pgmap_of(pmem.start_pfn + 5) is pg


def test_devdax_namespace_creates_dev_dax(machine: Machine) -> None:
    pmem = machine.add_pmem("pmem3", 64 * MiB, "devdax", PMD_SIZE)
    dev = machine.devices["/dev/dax3.0"]
    assert isinstance(dev, DevDax) and pmem.dev_dax is dev and machine.devices["pmem3"] is pmem
    assert dev.align == PMD_SIZE and dev.alive and dev.size == 64 * MiB
    assert dev.pgmap is not None and dev.pgmap.type == MEMORY_DEVICE_GENERIC
    assert pmem.start_pfn % HPAGE_PUD_NR == 0


def test_two_devices_do_not_overlap(m618: Machine) -> None:
    a = m618.add_pmem("pmem0", 64 * MiB)
    b = m618.add_pmem("pmem1", 64 * MiB, "devdax", 4096)
    assert b.start_pfn >= a.end_pfn and b.start_pfn % HPAGE_PUD_NR == 0
    assert m618.pgmap_of(a.start_pfn) is a.pgmap and m618.pgmap_of(b.start_pfn) is b.pgmap


@pytest.mark.parametrize("args", [
    ("disk0", 64 * MiB, "fsdax", PMD_SIZE),            # not pmemN
    ("pmem0", 64 * MiB, "sector", PMD_SIZE),           # unknown mode
    ("pmem0", 64 * MiB, "devdax", 8192),               # alignment not 4K/2M/1G
    ("pmem0", 3 * MiB, "fsdax", 4096),                 # size not a multiple of 2 MiB
    ("pmem0", 0, "fsdax", PMD_SIZE),
    ("pmem0", 512 * MiB, "devdax", PUD_SIZE),          # size not a multiple of the alignment
    ("pmem0", 64 << 30, "fsdax", PMD_SIZE),            # beyond the model's limit
])
def test_bad_arguments_are_input_errors(m52: Machine, args: tuple) -> None:
    with pytest.raises(InputError):
        m52.add_pmem(*args)
    assert "pmem0" not in m52.devices and not m52.pgmaps


def test_duplicate_name(m52: Machine) -> None:
    m52.add_pmem("pmem0", 64 * MiB)
    with pytest.raises(InputError) as exc:
        m52.add_pmem("pmem0", 64 * MiB)
    assert exc.value.errno_name == "EEXIST"


def test_remove_fsdax_namespace(m52: Machine) -> None:
    pmem = m52.add_pmem("pmem0", 64 * MiB)
    pg = pmem.pgmap
    assert pg is not None
    assert pmem.remove() == 0
    assert pg.state == "removed" and m52.pgmap_of(pmem.start_pfn) is None
    assert get_dev_pagemap(m52, pmem.start_pfn, None) is None
    with pytest.raises(InputError):
        pmem.remove()


def test_remove_with_mounted_dax_fs_is_refused(m52: Machine) -> None:
    pmem = m52.add_pmem("pmem0", 64 * MiB)
    m52.mount("/mnt/pmem", "ext4", dax="pmem0")
    with pytest.raises(InputError) as exc:                   # §3: outside the model
        pmem.remove()
    assert exc.value.errno_name == "EBUSY"
