"""Thin adapters: the HMM engineers' drivers behind the simulator's driver interface.

* ``drivers/test_hmm.py`` :class:`Dmirror` ([6.x]): ``populate(start, end, write)``,
  ``invalidate(sub, range, cur_seq)``, ``gc()``, its own numpy device page table (``pfn << 2 | tag``).
* ``drivers/hmm_mirror_v5_2.py`` :class:`HmmMirrorDriver52` ([5.2]): ``register(mm)``, ``populate``,
  ``sync_cpu_device_pagetables(mirror, update)``, ``gc()``, a device page table of 5.2 device entries.

Each adapter keeps a :class:`~hmmirror.sim.driver.DevicePageTable` in step with the driver's own table (its
``store``/``erase`` methods are wrapped on the instance), and routes the driver's notifier callback through
``adapter.invalidate`` so that the simulator sees every delivery.  The drivers themselves are untouched.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.kernel.sched import Gen
from hmmirror.sim.driver import DevicePageTable


def _have(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except ImportError:
        return False


class DmirrorAdapter:
    """lib/test_hmm.c's dmirror (``hmmirror.drivers.test_hmm.Dmirror``) as a simulator driver."""

    name = "dmirror"

    def __init__(self, unit: int = 0) -> None:
        self.unit = unit
        self.pt = DevicePageTable()
        self.mm: Any = None
        self.file: Any = None
        self.dm: Any = None

    def bind(self, mm: Any) -> Gen[int]:
        from hmmirror.drivers import test_hmm as th

        self.mm = mm
        devs = th.hmm_dmirror_init(mm.machine)
        f = yield from th.dmirror_fops_open(devs[self.unit], mm)
        if isinstance(f, int):
            return f
        self.file = f
        dm = self.dm = f.private_data if getattr(f, "private_data", None) is not None else f.dmirror
        orig_inv = dm.invalidate
        self._orig_invalidate = orig_inv
        dm.invalidate = lambda sub, r, cur_seq: self.invalidate(sub, r, cur_seq)
        pt = dm.pt
        store_range, erase_range, destroy = pt.store_range, pt.erase_range, pt.destroy
        mine = self.pt

        def _store_range(first: int, entries: np.ndarray) -> None:
            store_range(first, entries)
            for i, e in enumerate(np.asarray(entries).tolist()):
                va = (first + i) << PAGE_SHIFT
                if e:
                    mine.map(va, e >> 2, (e & 3) == th.DPT_XA_TAG_WRITE)
                else:
                    mine.unmap(va, va + PAGE_SIZE)

        def _erase_range(first: int, last: int) -> int:
            n = erase_range(first, last)
            mine.unmap(first << PAGE_SHIFT, (last + 1) << PAGE_SHIFT)
            return n

        def _destroy() -> None:
            destroy()
            mine.clear()

        pt.store_range, pt.erase_range, pt.destroy = _store_range, _erase_range, _destroy
        return 0

    def invalidate(self, sub: Any, r: Any, cur_seq: int) -> Gen[bool]:
        return (yield from self._orig_invalidate(sub, r, cur_seq))

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        return (yield from self.dm.populate(start, end, write))

    def gc(self) -> Gen[Any]:
        return (yield from self.dm.gc())

    def unbind(self) -> Gen[None]:
        if self.file is not None:
            yield from self.file.fops_release()
            self.file = None


class Hmm52Adapter:
    """The hmm.rst [5.2] driver (``hmmirror.drivers.hmm_mirror_v5_2.HmmMirrorDriver52``) as a simulator driver."""

    name = "mirror52"

    def __init__(self, literal: bool = False) -> None:
        self.literal = literal
        self.pt = DevicePageTable()
        self.mm: Any = None
        self.drv: Any = None

    def bind(self, mm: Any) -> Gen[int]:
        from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52
        from hmmirror.mm.hmm.v5_2 import HMM_PFN_VALID, HMM_PFN_WRITE

        self.mm = mm
        drv = self.drv = HmmMirrorDriver52(mm.machine)
        self._orig_sync = drv.sync_cpu_device_pagetables
        drv.sync_cpu_device_pagetables = lambda mirror, update: self.invalidate(mirror, update)
        pt, mine = drv.pt, self.pt
        store, clear = pt.store, pt.clear
        shift, fvalid, fwrite = drv.pfn_shift, drv.flags[HMM_PFN_VALID], drv.flags[HMM_PFN_WRITE]

        def _store(addr: int, entries: np.ndarray) -> None:
            store(addr, entries)
            for i, e in enumerate(np.asarray(entries).tolist()):
                va = addr + i * PAGE_SIZE
                if e and e & fvalid:
                    mine.map(va, e >> shift, bool(e & fwrite))
                else:
                    mine.unmap(va, va + PAGE_SIZE)

        def _clear(start: int, end: int) -> int:
            n = clear(start, end)
            mine.unmap(start, end)
            return n

        pt.store, pt.clear = _store, _clear
        return (yield from drv.register(mm))

    def invalidate(self, mirror: Any, update: Any) -> Gen[int]:
        return (yield from self._orig_sync(mirror, update))

    def fault(self, start: int, end: int, write: bool) -> Gen[int]:
        return (yield from self.drv.populate(start, end, write, literal=self.literal))

    def gc(self) -> Gen[Any]:
        return (yield from self.drv.gc())

    def unbind(self) -> Gen[None]:
        yield from self.drv.unregister()


class Hmm52LiteralAdapter(Hmm52Adapter):
    """The [5.2] driver run exactly as Documentation/vm/hmm.rst prints the loop (``literal=True``)."""

    name = "mirror52-literal"

    def __init__(self) -> None:
        super().__init__(literal=True)


def dmirror_driver(probe: bool = False) -> Any:
    if probe:
        return _have("hmmirror.drivers.test_hmm")
    return DmirrorAdapter()


def hmm52_driver(probe: bool = False) -> Any:
    if probe:
        return _have("hmmirror.drivers.hmm_mirror_v5_2")
    return Hmm52Adapter()
