"""More background events (issue 10): fsdax namespace removal, the mirror unregistering while others run, a
5.2 range registered and unregistered concurrently, and the opt-in injection of page-table states no syscall
makes on x86-64.  Each registers its body with :data:`hmmirror.sim.kevents.HANDLERS` and its drawing function
with the generator's EVENTS table (:func:`hmmirror.sim.scenario.register`).
"""

from __future__ import annotations

from typing import Any

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PMD_SIZE, PUD_SIZE
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.sim import kevents
from hmmirror.sim.scenario import Entry, GenCtx, fmt_size, register

ENOENT, ENODEV, EINVAL = 2, 19, 22


# --- bodies ---------------------------------------------------------------------------------------------
def pmem_remove(run: Any, ev: dict[str, Any], mm: Any, addr: Any) -> Gen[int]:
    """Remove the fsdax namespace under a mounted, mapped DAX filesystem ([5.2] ``nd_pmem_remove``)."""
    from hmmirror.drivers.nvdimm.pmem import nd_pmem_remove

    dev = run.machine.devices.get(ev.get("device", "pmem0"))
    if dev is None or getattr(dev, "mode", "") != "fsdax":
        return -ENOENT
    return (yield from nd_pmem_remove(dev))


def mirror_unbind(run: Any, ev: dict[str, Any], mm: Any, addr: Any) -> Gen[int]:
    """The driver under test unregisters its mirror (5.2 ``hmm_mirror_unregister``, 6.x the interval notifier
    removal of a file release) while other tasks run.  Like a real driver's release, it first stops new
    device faults and waits for those in flight (the harness does it for every driver: ``run.unbound``)."""
    run.unbound = True
    yield from sched.wait_event(lambda: getattr(run, "inflight", 0) == 0, "unbind: wait for device faults")
    yield from run.driver.unbind()
    run.machine.log("mirror_unbind", driver=getattr(run.driver, "name", "?"))
    return 0


def range_churn(run: Any, ev: dict[str, Any], mm: Any, addr: Any) -> Gen[int]:
    """[5.2] a second range of ``[addr, addr+length)`` registered, held a while and unregistered."""
    from hmmirror.mm.hmm import v5_2

    if addr is None:
        return -EINVAL
    start = addr & ~((1 << PAGE_SHIFT) - 1)
    end = start + max(int(ev.get("pages", 1)), 1) * 4096
    r = v5_2.new_range(start, end, PAGE_SHIFT, name="churn")
    ret = yield from v5_2.hmm_range_register(r, mm, start, end, PAGE_SHIFT)
    if ret:
        return ret
    for _ in range(int(ev.get("hold", 2))):
        yield from sched.preempt_point("range_churn")
    yield from v5_2.hmm_range_unregister(r)
    return 0


def inject(run: Any, ev: dict[str, Any], mm: Any, addr: Any) -> Gen[int]:
    """Opt-in: write a page-table state no syscall makes on x86-64 where the slot is empty --
    ``pmd_bad``: a non-present, non-migration PMD (a hwpoison swap entry at the PMD level); ``pud_huge``: a
    present huge PUD leaf without the devmap bit outside hugetlb.  Findings of the run are marked injected."""
    if addr is None:
        return -EINVAL
    run.injected = True
    pt, pool = mm.pt, mm.machine.pool
    pudp = pt.walk_to_pud(addr, alloc=True)
    if ev.get("what") == "pud_huge":
        if not x86.pte_none(pool.get(pudp)):
            return -EINVAL
        base = mm.machine.mem.nr_ram & ~((PUD_SIZE >> PAGE_SHIFT) - 1)
        pool.set(pudp, x86.pfn_pte(base, 0x27) | x86._PAGE_PSE)
    else:
        if x86.pud_leaf(pool.get(pudp)):
            return -EINVAL
        pmdp = pt.pmd_alloc(pudp, addr)
        if not x86.pte_none(pool.get(pmdp)):
            return -EINVAL
        pool.set(pmdp, x86.make_hwpoison_entry(1))
    mm.machine.log("inject", state=ev.get("what", "pmd_bad"), addr=addr & ~(PMD_SIZE - 1))
    yield from sched.preempt_point("inject")
    return 0


kevents.HANDLERS.update({"pmem_remove": (pmem_remove, False), "mirror_unbind": (mirror_unbind, False),
                         "range_churn": (range_churn, True), "inject": (inject, True)})


# --- drawing -------------------------------------------------------------------------------------------
def _draw_pmem_remove(g: GenCtx, name: str) -> dict[str, Any] | None:
    for pm in g.sc.machine.get("pmem", []):
        if pm.get("mode") == "fsdax":
            return {"name": name, "kind": "pmem_remove", "device": pm["name"]}
    return None


def _draw_range_churn(g: GenCtx, name: str) -> dict[str, Any]:
    _m, a, n = g.rng(16)
    return {"name": name, "kind": "range_churn", "addr": a, "pages": n, "hold": 1 + g.c.below(6)}


def _draw_inject(g: GenCtx, name: str) -> dict[str, Any]:
    m = g.c.pick(g.maps)
    first = g.c.below(m.pages)
    return {"name": name, "kind": "inject", "what": g.c.pick(("pmd_bad", "pud_huge")),
            "addr": f"{m.name}+{fmt_size(first * 4096)}" if first else m.name}


for _e in (Entry("pmem_remove", 5, _draw_pmem_remove, profiles=("5.2",), needs=lambda g: g.has("fsdax")),
           Entry("mirror_unbind", 2, lambda g, name: {"name": name, "kind": "mirror_unbind"}),
           Entry("range_churn", 2, _draw_range_churn, profiles=("5.2",)),
           Entry("inject", 4, _draw_inject, opt_in=True)):
    register("event", _e)
