"""pmem namespaces (drivers/nvdimm/pmem.c, drivers/dax/pmem.c [5.2]).

``add_pmem(machine, name, size, mode, align)`` models a persistent-memory namespace (``memmap=`` or an
NVDIMM) named ``pmemN``:

* ``mode="fsdax"``: a block device whose pages are ZONE_DEVICE pages of a ``MEMORY_DEVICE_FS_DAX`` pgmap.
  As in 5.2, the pgmap's ``ref`` is the request queue's usage counter (``q_usage_counter``): ``kill`` starts
  freezing the queue, ``cleanup`` is ``blk_cleanup_queue`` (waits for the counter to drain).  A filesystem
  mounted with ``-o dax`` (:mod:`hmmirror.fs.dax`) maps its blocks directly.
* ``mode="devdax"``: the namespace is handed to device-dax; ``/dev/daxN.0`` (:mod:`hmmirror.drivers.dax.device`)
  appears in ``machine.devices`` with region alignment ``align``.

The device's pfn range is appended above all memory, 1 GiB aligned (``PhysMem.add_device_range``), so
pmem pfns are 2 MiB and 1 GiB aligned wherever the device offset is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import HPAGE_PUD_NR, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.errors import InputError
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.memremap import (
    MEMORY_DEVICE_FS_DAX,
    DevPagemap,
    DevPagemapOps,
    PercpuRef,
    devm_memremap_pages,
    devm_memremap_pages_release,
    percpu_ref_init,
    percpu_ref_kill,
    pgmap_wait_idle,
    run_memunmap_pages,
)

if TYPE_CHECKING:
    from hmmirror.machine import Machine

PMEM_MODES = ("fsdax", "devdax")
PMEM_ALIGNS = (PAGE_SIZE, PMD_SIZE, PUD_SIZE)
PMEM_MAX_SIZE = 16 << 30            # model limit: per-pfn metadata arrays grow with the device
_NAME = re.compile(r"^pmem(\d+)$")


class PmemPagemapOps(DevPagemapOps):
    """pmem's ``dev_pagemap_ops``: ``page_free`` wakes truncate waiting for a busy DAX page
    (pmem_pagemap_page_free: ``wake_up_var(&page->_refcount)``); the model only counts it."""

    def page_free(self, pgmap: DevPagemap, pfn: int) -> None:  # type: ignore[override]
        if pgmap.machine is not None:
            pgmap.machine.counters["pmem_page_free"] += 1


@dataclass(eq=False)
class PmemDevice:
    """``struct pmem_device`` with its gendisk name and, in devdax mode, the device-dax instance."""

    machine: "Machine" = field(repr=False)
    name: str = ""
    id: int = 0
    size: int = 0
    mode: str = "fsdax"
    align: int = PMD_SIZE
    start_pfn: int = 0
    pgmap: DevPagemap | None = None
    dev_dax: Any = field(default=None, repr=False)   # drivers.dax.device.DevDax in devdax mode
    fs: Any = field(default=None, repr=False)   # the mounted DAX filesystem (fs/dax.py), if any
    removed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.npages

    def pgoff_to_pfn(self, pgoff: int) -> int:
        """pmem_dax_direct_access(): the pfn of device page ``pgoff`` (-1 beyond the device)."""
        if not 0 <= pgoff < self.npages:
            return -1
        return self.start_pfn + pgoff

    def remove(self, task: Any = None) -> int:
        """Unbind the namespace (sequential): device-dax unbind, or the fsdax pgmap teardown.

        Removing an fsdax device with a mounted DAX filesystem is outside the model (mm-substrate.md §3):
        InputError EBUSY.  A teardown that cannot drain raises Deadlock with the pgmap left ``stuck``.
        """
        if self.removed:
            raise InputError(f"{self.name} was already removed", "ENODEV")
        if self.dev_dax is not None:
            ret = self.dev_dax.unbind(task)
        else:
            if self.fs is not None:
                raise InputError(f"{self.name} has a mounted DAX filesystem", "EBUSY")
            assert self.pgmap is not None
            ret = run_memunmap_pages(self.machine, self.pgmap, pmem_release(self), task)
        self.removed = True
        return int(ret)


def pmem_release_disk(pmem: PmemDevice) -> Gen[None]:
    """pmem_release_disk() (drivers/nvdimm/pmem.c [5.2]): ``kill_dax`` (dax_alive() false: DAX faults that need
    ``dax_direct_access`` now fail) and ``del_gendisk``.  Nothing tells a mounted DAX filesystem or unmaps its
    mappings: in 5.2 they keep mapping the namespace's pfns."""
    yield from sched.might_sleep("kill_dax")            # synchronize_srcu(&dax_srcu)
    pmem.dax_dead = True                                 # type: ignore[attr-defined]
    pmem.machine.log("kill_dax", name=pmem.name)


def nd_pmem_remove(pmem: PmemDevice) -> Gen[int]:
    """Removal of an fsdax namespace with a mounted, mapped DAX filesystem, as 5.2 does it: the devm release
    actions of pmem_attach_disk() in reverse order -- :func:`pmem_release_disk`, then the pgmap teardown
    (``devm_memremap_pages_release``: kill, put the pages, ``blk_cleanup_queue`` waits for the references
    held by walks in flight, remove).  5.2 DAX mappings hold no page or pgmap references (mm-substrate.md §3),
    so the teardown completes while user page tables still map the pfns; ``get_dev_pagemap`` finds no pgmap
    for them from then on.  0, or -ENODEV when already removed."""
    if pmem.removed or pmem.pgmap is None or pmem.dev_dax is not None:
        return -19
    pmem.removed = True
    yield from pmem_release_disk(pmem)
    ret = yield from pmem_release(pmem)
    pmem.machine.log("nd_pmem_remove", name=pmem.name, ret=ret)
    return ret


def blk_freeze_queue_start(ref: PercpuRef) -> None:
    """blk_freeze_queue_start() (block/blk-mq.c): pmem's ``pgmap->kill`` [5.2]: kill ``q_usage_counter``."""
    percpu_ref_kill(ref)


def pmem_release(pmem: PmemDevice) -> Gen[int]:
    """The devm release actions of pmem_attach_disk() [5.2], in order: the pgmap teardown
    (``devm_memremap_pages_release``), whose ``cleanup`` is ``blk_cleanup_queue``."""
    assert pmem.pgmap is not None
    return (yield from devm_memremap_pages_release(pmem.machine, pmem.pgmap))


def _validate(machine: "Machine", name: str, size: int, mode: str, align: int) -> int:
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise InputError(f"pmem device name {name!r} must be pmemN (N a number)")
    if name in machine.devices:
        raise InputError(f"a device named {name!r} already exists", "EEXIST")
    if mode not in PMEM_MODES:
        raise InputError(f"pmem mode must be one of {', '.join(PMEM_MODES)}, not {mode!r}")
    if align not in PMEM_ALIGNS:
        raise InputError(f"pmem align must be 4096, 2 MiB or 1 GiB, not {align!r}")
    if not isinstance(size, int) or size <= 0:
        raise InputError(f"pmem size must be a positive number of bytes, not {size!r}")
    if size % PMD_SIZE:
        raise InputError(f"pmem size {size:#x} must be a multiple of 2 MiB")
    if size % align:
        raise InputError(f"pmem size {size:#x} must be a multiple of its alignment {align:#x}")
    if size > PMEM_MAX_SIZE:
        raise InputError(f"pmem size {size:#x} is larger than the model supports ({PMEM_MAX_SIZE >> 30} GiB)")
    if mode == "devdax" and f"/dev/dax{m.group(1)}.0" in machine.devices:
        raise InputError(f"/dev/dax{m.group(1)}.0 already exists", "EEXIST")
    return int(m.group(1))


def add_pmem(machine: "Machine", name: str, size: int, mode: str = "fsdax", align: int = PMD_SIZE) -> PmemDevice:
    """Add a pmem namespace (pmem_attach_disk() / dax_pmem_probe() [5.2]); see the module docstring.

    Returns the :class:`PmemDevice` (also ``machine.devices[name]``; devdax mode adds
    ``machine.devices["/dev/daxN.0"]``).  Bad names, modes, sizes or alignments raise InputError.
    """
    ident = _validate(machine, name, size, mode, align)
    pmem = PmemDevice(machine, name, ident, size, mode, align)
    if mode == "devdax":
        from hmmirror.drivers.dax.device import devm_create_dev_dax

        dev_dax = devm_create_dev_dax(machine, pmem, f"dax{ident}.0", align)
        pmem.dev_dax = dev_dax
        assert dev_dax.pgmap is not None and dev_dax.pgmap.res is not None
        pmem.pgmap = dev_dax.pgmap
        pmem.start_pfn = dev_dax.pgmap.res.start
        machine.devices[name] = pmem
        machine.devices[dev_dax.path] = dev_dax
        return pmem
    ref = PercpuRef(f"{name}.q_usage_counter")
    percpu_ref_init(ref)
    pgmap = DevPagemap(f"{name}", MEMORY_DEVICE_FS_DAX, size // PAGE_SIZE, ref=ref, ops=PmemPagemapOps(),
                       align_pages=HPAGE_PUD_NR, dev=pmem)
    pgmap.kill = blk_freeze_queue_start

    def blk_cleanup_queue(r: PercpuRef) -> Gen[None]:
        """blk_cleanup_queue(): waits for ``q_usage_counter`` to drain (pmem's ``pgmap->cleanup`` [5.2])."""
        yield from pgmap_wait_idle(pgmap)

    pgmap.cleanup = blk_cleanup_queue
    ret = devm_memremap_pages(machine, pgmap)
    if ret:
        raise InputError(f"{name}: devm_memremap_pages failed", -ret)
    assert pgmap.res is not None
    pmem.pgmap = pgmap
    pmem.start_pfn = pgmap.res.start
    machine.devices[name] = pmem
    machine.log("add_pmem", name=name, mode=mode, size=size, start_pfn=pmem.start_pfn)
    return pmem
