"""device-dax: ``/dev/daxX.Y`` character devices (drivers/dax/device.c [5.2], mm-substrate.md §5.8, §3, §6).

A ``DevDax`` maps a pmem region with a fixed alignment ``align`` (4 KiB, 2 MiB or 1 GiB):

* ``mmap`` (``dax_mmap`` -> ``check_vma``): dead device -> -ENXIO; private mapping -> -EINVAL; ``vm_start`` or
  ``vm_end`` not a multiple of ``align`` -> -EINVAL.  Sets ``VM_HUGEPAGE``; ``mmap_align = align`` so the
  kernel picks aligned addresses (``dax_get_unmapped_area``).
* Faults (``dev_dax_huge_fault``): every fault repeats ``check_vma`` (SIGBUS on failure: after ``kill_dax``
  this is how new faults fail); for a fault of size ``fs``: ``fs < align`` -> SIGBUS, ``fs > align`` ->
  FALLBACK; a PMD/PUD block outside the VMA -> SIGBUS; an offset beyond the device -> SIGBUS.  So align 4K
  maps PTEs only, 2M PMDs only (a PTE-sized fault is SIGBUS), 1G PUDs only.
* Entries use ``vm_page_prot`` (no write-notify: no ``page_mkwrite``/``pfn_mkwrite``), so a shared writable
  mapping is writable from the first read fault.  [5.2] devmap entries, no page references; [6.18] normal
  refcounted entries (``profile.devmap_bits`` / ``profile.dax_refcounted``).
* ``split`` (partial munmap/mprotect) at an address not aligned to ``align`` -> -EINVAL (``split_align``).
* Unbind (:func:`dev_dax_unbind`), the devm actions of ``dev_dax_probe`` unwound in reverse: ``kill_dev_dax``
  (``kill_dax`` + ``unmap_mapping_range`` of the device inode: CLEAR on every mapping VMA), ``cdev_del``
  (the ``/dev`` node disappears), then the pgmap teardown (``devm_memremap_pages_release``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hmmirror.arch.x86.pgtable import PAGE_SIZE, PMD_SIZE, PUD_SIZE
from hmmirror.errors import InputError
from hmmirror.include.mm_types import VM, VM_FAULT
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.huge_memory import vmf_insert_pfn_pmd, vmf_insert_pfn_pud
from hmmirror.mm.memory import VmFault, vmf_insert_mixed
from hmmirror.mm.memremap import (
    MEMORY_DEVICE_GENERIC,
    DevPagemap,
    PercpuRef,
    devm_memremap_pages,
    devm_memremap_pages_release,
    new_dev_pagemap,
    percpu_ref_kill,
    pgmap_wait_idle,
    run_memunmap_pages,
)
from hmmirror.mm.mm_struct import VMA, VmOps
from hmmirror.mm.truncate import unmap_mapping_range

if TYPE_CHECKING:
    from hmmirror.machine import Machine

EINVAL, ENXIO = 22, 6
FAULT_SIZES = {"pte": PAGE_SIZE, "pmd": PMD_SIZE, "pud": PUD_SIZE}


@dataclass(eq=False)
class DaxInode:
    """The device inode shared by every open of ``/dev/daxX.Y`` (``dax_inode``; ``S_DAX``).

    dax_open() (drivers/dax/device.c [5.2, 6.18]) points every open's ``f_mapping`` at this inode's own
    ``i_data``, so its ``i_mmap`` tree has the ``i_mmap_rwsem`` of any address_space (lockdep class
    ``mapping->i_mmap_rwsem``): kill_dev_dax()'s unmap_mapping_range() walks it under that rwsem and a split
    of a mapping VMA (vma_prepare) takes it for write.  (No ``i_mapping`` attribute: the model's page-cache
    code reads its absence as "no page cache".)"""

    name: str
    i_size: int
    i_mmap: list[VMA] = field(default_factory=list, repr=False)
    dax: bool = True
    machine: "Machine | None" = field(default=None, repr=False)
    i_mmap_rwsem: sched.Lock | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.i_mmap_rwsem = sched.lockdep_set_class(sched.Lock(f"/dev/{self.name}.i_mmap_rwsem", "rwsem"),
                                                    "mapping->i_mmap_rwsem")


class DevDaxVmOps(VmOps):
    """``dax_vm_ops``: ``fault`` / ``huge_fault`` / ``split`` (``split_align``) / ``pagesize``."""

    name = "devdax"
    is_dax = True

    def __init__(self, dev_dax: "DevDax") -> None:
        self.dev_dax = dev_dax
        self.split_align = dev_dax.align

    def fault(self, vmf: VmFault) -> Gen[int]:
        """dev_dax_fault(): ``dev_dax_huge_fault(vmf, PE_SIZE_PTE)``."""
        return (yield from dev_dax_huge_fault(self.dev_dax, vmf, "pte"))

    def huge_fault(self, vmf: VmFault, pe_size: str) -> Gen[int]:  # type: ignore[override]
        """dev_dax_huge_fault()."""
        return (yield from dev_dax_huge_fault(self.dev_dax, vmf, pe_size))

    def pagesize(self, vma: VMA) -> int:
        """dev_dax_pagesize(): the alignment (smaps ``KernelPageSize``)."""
        return self.dev_dax.align


@dataclass(eq=False)
class DevDaxFile:
    """An open ``/dev/daxX.Y`` (``struct file`` with ``private_data = dev_dax``)."""

    dev_dax: "DevDax" = field(repr=False)
    inode: DaxInode = field(repr=False)
    readable: bool = True
    writable: bool = True
    map_flags: int = 0

    @property
    def mmap_align(self) -> int:
        """dax_get_unmapped_area(): addresses aligned to the region alignment."""
        return self.dev_dax.align

    @property
    def path(self) -> str:
        return self.dev_dax.path

    def mmap(self, vma: VMA) -> int:
        """dax_mmap(): ``check_vma`` then ``vm_ops = dax_vm_ops``, ``VM_HUGEPAGE``.  0 or -errno."""
        rc = check_vma(self.dev_dax, vma)
        if rc:
            return rc
        vma.vm_ops = self.dev_dax.vm_ops
        vma.vm_flags |= VM.HUGEPAGE
        vma.devmap = self.dev_dax
        return 0


@dataclass(eq=False)
class DevDax:
    """``struct dev_dax`` over a pmem namespace: region alignment, pgmap, liveness (``dax_alive``)."""

    machine: "Machine" = field(repr=False)
    name: str = ""                   # "dax0.0"
    size: int = 0
    align: int = PMD_SIZE
    pmem: Any = field(default=None, repr=False)
    pgmap: DevPagemap | None = None
    alive: bool = False
    inode: DaxInode | None = field(default=None, repr=False)
    vm_ops: DevDaxVmOps | None = field(default=None, repr=False)
    unbound: bool = False
    srcu_readers: int = 0                    # faults inside dax_read_lock() (dax_srcu read sections)
    device_lock: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.device_lock = sched.Lock(f"{self.name}.device_lock", "mutex")

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    def open(self, map_flags: int = 0, writable: bool = True) -> DevDaxFile:
        """dax_open(): a File over the device inode.  A removed or dead device: InputError ENXIO/ENODEV."""
        if self.unbound:
            raise InputError(f"{self.path}: no such device", "ENODEV")
        assert self.inode is not None
        return DevDaxFile(self, self.inode, True, writable, map_flags)

    def pgoff_to_pfn(self, pgoff: int, size: int) -> int:
        """dax_pgoff_to_phys() as a pfn: the device page ``pgoff`` if ``[pgoff, pgoff+size)`` lies inside the
        device, else -1."""
        assert self.pgmap is not None and self.pgmap.res is not None
        if pgoff < 0 or (pgoff << 12) + size > self.size:
            return -1
        return self.pgmap.res.start + pgoff

    def unbind(self, task: Any = None) -> int:
        """Unbind the driver sequentially (:func:`dev_dax_unbind`).  A teardown that can never drain leaves
        the pgmap ``stuck`` and raises Deadlock (see memremap.run_memunmap_pages)."""
        assert self.pgmap is not None
        return int(run_memunmap_pages(self.machine, self.pgmap, dev_dax_unbind(self), task))


# --- checks and faults -----------------------------------------------------------------------------------
def check_vma(dev_dax: DevDax, vma: VMA) -> int:
    """check_vma() (drivers/dax/device.c): -ENXIO when dead, -EINVAL for a private mapping (no VM_MAYSHARE) or
    a VMA whose start or end is not a multiple of ``align``.  0 when the VMA may map the device."""
    if not dev_dax.alive:
        return -ENXIO
    if not vma.vm_flags & VM.MAYSHARE:
        return -EINVAL
    mask = dev_dax.align - 1
    if vma.vm_start & mask or vma.vm_end & mask:
        return -EINVAL
    return 0


def dev_dax_huge_fault(dev_dax: DevDax, vmf: VmFault, pe_size: str) -> Gen[int]:
    """dev_dax_huge_fault() (drivers/dax/device.c [5.2]): ``__dev_dax_{pte,pmd,pud}_fault`` by ``pe_size``,
    inside ``dax_read_lock()`` (an SRCU read section that kill_dax() waits for)."""
    dev_dax.srcu_readers += 1
    try:
        return (yield from __dev_dax_fault(dev_dax, vmf, pe_size))
    finally:
        dev_dax.srcu_readers -= 1


def __dev_dax_fault(dev_dax: DevDax, vmf: VmFault, pe_size: str) -> Gen[int]:
    """__dev_dax_pte_fault() / __dev_dax_pmd_fault() / __dev_dax_pud_fault() [5.2]."""
    if pe_size not in FAULT_SIZES:
        return int(VM_FAULT.SIGBUS)
    vma = vmf.vma
    fault_size = FAULT_SIZES[pe_size]
    if check_vma(dev_dax, vma):
        return int(VM_FAULT.SIGBUS)
    if fault_size < dev_dax.align:
        return int(VM_FAULT.SIGBUS)
    if fault_size > dev_dax.align:
        return int(VM_FAULT.FALLBACK)
    block = vmf.address & ~(fault_size - 1)
    if block < vma.vm_start or block + fault_size > vma.vm_end:
        return int(VM_FAULT.SIGBUS)                          # "if we are outside of the VMA"
    pfn = dev_dax.pgoff_to_pfn(vma.linear_page_index(block), fault_size)
    if pfn < 0:
        return int(VM_FAULT.SIGBUS)
    dev_dax.machine.counters[f"dev_dax_{pe_size}_fault"] += 1
    if pe_size == "pte":
        return (yield from vmf_insert_mixed(vma, vmf.address, pfn))
    if pe_size == "pmd":
        return (yield from vmf_insert_pfn_pmd(vmf, pfn, vmf.write))
    return (yield from vmf_insert_pfn_pud(vmf, pfn, vmf.write))


# --- probe and unbind ------------------------------------------------------------------------------------
def devm_create_dev_dax(machine: "Machine", pmem: Any, name: str, align: int) -> DevDax:
    """dax_pmem_probe() + devm_create_dev_dax() + dev_dax_probe() [5.2]: a live device-dax instance whose
    pgmap (``MEMORY_DEVICE_GENERIC``) covers the whole namespace.  The pgmap's ``kill``/``cleanup`` are
    ``dev_dax_percpu_kill`` / ``dev_dax_percpu_exit`` (kill the ref / wait for it to drain)."""
    size = pmem.size
    dev_dax = DevDax(machine, name, size, align, pmem)
    pgmap = new_dev_pagemap(name, MEMORY_DEVICE_GENERIC, size // PAGE_SIZE, dev=dev_dax)

    def dev_dax_percpu_kill(ref: PercpuRef) -> None:
        """dev_dax_percpu_kill(): ``percpu_ref_kill``."""
        percpu_ref_kill(ref)

    def dev_dax_percpu_exit(ref: PercpuRef) -> Gen[None]:
        """dev_dax_percpu_exit(): ``wait_for_completion(&dev_dax->cmp)`` then ``percpu_ref_exit``."""
        yield from pgmap_wait_idle(pgmap)

    pgmap.kill = dev_dax_percpu_kill
    pgmap.cleanup = dev_dax_percpu_exit
    ret = devm_memremap_pages(machine, pgmap)
    if ret:
        raise InputError(f"{name}: devm_memremap_pages failed", -ret)
    dev_dax.pgmap = pgmap
    dev_dax.inode = DaxInode(name, size, machine=machine)
    dev_dax.vm_ops = DevDaxVmOps(dev_dax)
    dev_dax.alive = True                                     # run_dax()
    machine.log("dev_dax_probe", name=name, align=align, start_pfn=pgmap.res.start if pgmap.res else None)
    return dev_dax


def kill_dax(dev_dax: DevDax) -> Gen[None]:
    """kill_dax() (drivers/dax/super.c): clear ``DAXDEV_ALIVE`` then ``synchronize_srcu`` (waits for faults
    inside ``dax_read_lock``); new mmaps fail with -ENXIO, new faults with SIGBUS."""
    dev_dax.alive = False
    yield from sched.wait_event(lambda: dev_dax.srcu_readers == 0, "synchronize_srcu(dax_srcu)")


def kill_dev_dax(dev_dax: DevDax) -> Gen[None]:
    """kill_dev_dax() (drivers/dax/bus.c): ``kill_dax`` then ``unmap_mapping_range(inode->i_mapping, 0, 0, 1)``."""
    yield from kill_dax(dev_dax)
    assert dev_dax.inode is not None
    yield from unmap_mapping_range(dev_dax.inode, 0, 0, True)     # CLEAR on every mapping VMA


def dev_dax_unbind(dev_dax: DevDax) -> Gen[int]:
    """Unbinding the device-dax driver (device_release_driver -> devm actions in reverse) [5.2]:
    ``kill_dev_dax``, ``cdev_del``, then ``devm_memremap_pages_release`` of the pgmap.  0 or -errno.
    May sleep (the pgmap teardown waits for every reference).  Runs under ``device_lock()`` as the driver
    core does, so two unbinds are serialised: the second finds the device unbound."""
    yield from sched.mutex_lock(dev_dax.device_lock)
    try:
        if dev_dax.unbound:
            return -ENXIO
        machine = dev_dax.machine
        machine.log("dev_dax_unbind", name=dev_dax.name)
        yield from kill_dev_dax(dev_dax)
        dev_dax.unbound = True                               # cdev_del(): the /dev node goes away
        if machine.devices.get(dev_dax.path) is dev_dax:
            del machine.devices[dev_dax.path]
        assert dev_dax.pgmap is not None
        return (yield from devm_memremap_pages_release(machine, dev_dax.pgmap))
    finally:
        sched.mutex_unlock(dev_dax.device_lock)
