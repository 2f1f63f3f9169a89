"""The mirror half of ``hmmirror demo`` (ours): mirror the demo's DAX mappings through the profile's HMM.

Under 5.2 (the seed): a model driver registers an HMM mirror, and for each range ``hmm_range_register`` +
``hmm_range_fault(range, block=True)`` with read requests, under ``mmap_sem`` held for read.  Under 6.x: the
driver loop of hmm.rst (interval notifier, ``hmm_range_fault`` with ``HMM_PFN_REQ_FAULT``), plus the dmirror
SNAPSHOT bytes of the same pages.  Either way the device entries are shown beside the CPU's entries, and the
reference counts of every pgmap before and after (5.2 takes and puts references during the walk; 6.18 takes
none).
"""

from __future__ import annotations

from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PAGE_SIZE
from hmmirror.kernel import sched

#: (VMA name in the demo, offset into it, pages): the seed's shapes incl. a range in the middle of the PUD.
RANGES = (("fsdax_pte", 0, 8), ("fsdax_pmd", 0, 8), ("devdax_pud", 0, 8), ("devdax_pud", 512 << 20, 8))


def _cpu(proc: Any, start: int, n: int) -> list[dict[str, Any]]:
    return [{"pfn": None if s.pfn is None else hex(s.pfn), "kind": s.kind, "level": s.level, "write": s.write}
            for s in proc.inspect(start, n * PAGE_SIZE)]


def _ranges(run: Any, proc_name: str) -> list[tuple[str, int, int]]:
    starts = {name: addr for name, (addr, _len) in run.ctx.names.items()}
    return [(f"{name}+{off >> 20}M" if off else name, starts[name] + off, n)
            for name, off, n in RANGES if name in starts]


def _mirror_v5_2(run: Any, proc: Any) -> list[dict[str, Any]]:
    from hmmirror.drivers.hmm_mirror_v5_2 import HmmMirrorDriver52
    from hmmirror.mm.hmm import v5_2 as hmm
    from hmmirror.scenario.hmm_v5_2_ops import _with_mmap_read, range_record

    drv = HmmMirrorDriver52(run.machine, "gpu0")
    sched.run(drv.register(proc.mm), proc.mm.task)
    out = []
    for label, start, n in _ranges(run, proc.name):
        r = hmm.new_range(start, start + n * PAGE_SIZE, name=label)
        sched.run(hmm.hmm_range_register(r, proc.mm, r.start, r.end, PAGE_SHIFT), proc.mm.task)
        r.default_flags = hmm.DEFAULT_FLAGS[hmm.HMM_PFN_VALID]
        r.pfn_flags_mask = 0
        ret = _with_mmap_read(proc, hmm.hmm_range_fault(r, True))
        rec = range_record(r)
        out.append({"range": label, "start": hex(start), "ret": ret, "pfns": rec["pfns"],
                    "entries": rec["entries"], "cpu": _cpu(proc, start, n)})
        sched.run(hmm.hmm_range_unregister(r), proc.mm.task)
    return out


def _mirror_modern(run: Any, proc: Any) -> list[dict[str, Any]]:
    from hmmirror.drivers.test_hmm import hmm_open
    from hmmirror.mm.hmm import modern

    fd = hmm_open(proc, 0)
    out = []
    for label, start, n in _ranges(run, proc.name):
        snap = fd.snapshot(start, n, proc.mm)
        ret, pfns = sched.run(modern.model_range_fault(proc.mm, start, start + n * PAGE_SIZE,
                                                       default_flags=modern.HMM_PFN_REQ_FAULT),
                              proc.mm.task)
        vals = [int(x) for x in pfns.tolist()]
        out.append({"range": label, "start": hex(start), "ret": ret, "pfns": [f"{v:#x}" for v in vals],
                    "entries": [{"pfn": hex(v & ((1 << 53) - 1)), "valid": bool(v & modern.HMM_PFN_VALID),
                                 "write": bool(v & modern.HMM_PFN_WRITE),
                                 "order": (v >> 53) & 0x1F} for v in vals],
                    "snapshot": list(snap), "cpu": _cpu(proc, start, n)})
    fd.close()
    return out


def mirror_story(run: Any, proc_name: str) -> dict[str, Any]:
    """Mirror the demo's ranges; returns ``{"api", "mirror": [...], "pgmap_refs": {"before", "after"}}``."""
    machine = run.machine
    proc = run.ctx.procs[proc_name]

    def refs() -> dict[str, int]:
        return {p.name: int(p.count) for p in machine.pgmaps}

    if machine.profile.interval_notifiers:
        from hmmirror.drivers.test_hmm import hmm_dmirror_init
        hmm_dmirror_init(machine)              # load test_hmm first: its device-private chunks are pgmaps too
    before = refs()
    if machine.profile.interval_notifiers:
        api, mirror = "hmm_range_fault (6.x) + dmirror", _mirror_modern(run, proc)
    else:
        api, mirror = "hmm_range_fault(range, block) (5.2)", _mirror_v5_2(run, proc)
    return {"api": api, "mirror": mirror, "pgmap_refs": {"before": before, "after": refs()}}
