"""I4 (hmm_range_input) "a device fault that fails where the CPU mapping allows it", at a shmem page that
memory_failure poisoned and whose hwpoison entry was zapped since (MADV_DONTNEED, munmap of a part, ...).

Kernel (6.18): memory_failure keeps a poisoned shmem folio in the page cache (shmem_error_remove_folio returns 0),
so the CPU's next fault there finds it and __do_fault() returns VM_FAULT_HWPOISON (mm/memory.c): SIGBUS.  The
CPU mapping does not allow the access; hmm_range_fault's handle_mm_fault gets VM_FAULT_HWPOISON (part of
VM_FAULT_ERROR) and hmm_vma_fault returns -EFAULT (mm/hmm.c): the device fault failing there is right.
Found by the docs' worked-example campaign (seed 71329): ``hmm_range_input|mypkg.mysvm.MySvm.fault|-``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import sim_toy_drivers as toy  # noqa: E402

from hmmirror import Machine
from hmmirror.arch.x86 import pgtable as x86
from hmmirror.errors import KernelError
from hmmirror.kernel import sched
from hmmirror.mm.memory_failure import memory_failure_pagecache
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

PAGE = 4096
L = 4 * PAGE
EFAULT = 14


def _poisoned_shmem(zap: bool):
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L, "rw", ("shared", "anonymous"))
    p.touch(a, L, write=True)
    vma = p.mm.vma_lookup(a)
    pfn = x86.pte_pfn(p.mm.pt.lookup(a + PAGE)[2])
    assert sched.run(memory_failure_pagecache(p.mm, vma, a + PAGE, pfn), p.mm.task) == 0
    assert x86.is_hwpoison_entry(x86.pte_to_swp_entry(p.mm.pt.lookup(a + PAGE)[2]))
    if zap:
        assert p.madvise(a, L, "dontneed") == 0
        assert x86.pte_none(p.mm.pt.lookup(a + PAGE)[2])
    return m, p, a


def _device_fault(m, p, a, drv):
    rets = []

    def job(run):
        ret = yield from device_fault(run, a, a + L, False)
        rets.append(ret)

    f, _eng = run_tasks(m, drv, p.mm, [("dev0", "device", job)], SwitchListScheduler([]))
    return f, rets


@pytest.mark.parametrize("zap", [False, True], ids=["hwpoison-entry", "entry-zapped"])
def test_device_fault_over_a_poisoned_shmem_page_fails_as_the_cpu_does(zap):
    m, p, a = _poisoned_shmem(zap)
    f, rets = _device_fault(m, p, a, toy.GoodMirror())
    assert f is None, f.describe()
    assert rets == [-EFAULT]                        # hmm_vma_fault: VM_FAULT_HWPOISON -> -EFAULT
    with pytest.raises(KernelError, match="SIGBUS"):
        p.touch(a + PAGE, PAGE, write=False)        # the CPU's own read gets SIGBUS too


def test_a_device_fault_failing_over_healthy_shmem_pages_is_still_a_finding():
    class Refuses(toy.GoodMirror):
        def fault(self, start, end, write):
            yield from self.fault_loop(start, end, write)
            return -EFAULT                          # fails although the CPU mapping allows the access

    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(L, "rw", ("shared", "anonymous"))
    p.touch(a, L, write=True)
    f, _rets = _device_fault(m, p, a, Refuses())
    assert f is not None and f.invariant == "hmm_range_input", f and f.describe()
