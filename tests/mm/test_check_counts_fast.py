"""``mm.debug.check_counts`` (the frames that exist, kept scratch arrays) gives exactly the mismatches of
``check_counts_reference`` (arrays over the whole pfn space): on the states of generated runs of every profile,
and on those states broken on purpose -- counts of RAM, device and hole frames changed, leaf entries pointed at
frames of each kind -- so that the lists compared are not all empty."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.mm.debug import _SCRATCH, _segments, check_counts, check_counts_reference, poisoned_refs_of
from hmmirror.mm.page_alloc import PG
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.invariants import default_invariants
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import generate
from hmmirror.sim.schedulers import RandomScheduler


class _Both:
    """Every 7th step: both checks on the live state (with and without extra references)."""

    def __init__(self) -> None:
        self.compared = 0
        self.nonempty = 0
        self.poisoned = 0

    def attach(self, eng, run):
        self.run = run

    def after_step(self, eng, st, point):
        if eng.step % 11 == 0:
            self.compare()

    def run_finished(self, eng):
        self.compare()

    def compare(self, extra=None):
        m = self.run.machine
        ref = check_counts_reference(m, extra_refs=extra)
        assert check_counts(m, extra_refs=extra) == ref
        # the poisoned pages' references found by the check itself = named in extra_refs
        both = dict(extra or {})
        for p, k in poisoned_refs_of(m.mem).items():
            both[p] = both.get(p, 0) + k
        refp = check_counts_reference(m, extra_refs=both or None)
        assert check_counts(m, extra_refs=extra, poisoned_refs=True) == refp
        self.poisoned += bool(poisoned_refs_of(m.mem))
        self.compared += 1
        self.nonempty += bool(ref)


def _break_and_compare(both: _Both, rng: random.Random) -> None:
    """Change one count or one leaf entry at a time, compare both checks, put it back."""
    m = both.run.machine
    mem = m.mem
    segs = _segments(mem)
    hole = [(a, b) for (_, a), (b, _) in zip(segs, segs[1:]) if a < b]
    targets = [rng.randrange(0, mem.nr_ram) for _ in range(3)]
    targets += [rng.randrange(s, e) for s, e in segs[1:]]
    targets += [rng.randrange(a, b) for a, b in hole]
    # poisoned frames (memory_failure keeps their reference): with and without a reference
    for pfn in targets[:3]:
        old = int(mem.flags[pfn])
        mem.flags[pfn] = old | PG.hwpoison
        both.compare()
        oldrc = int(mem.refcount[pfn])
        mem.refcount[pfn] = oldrc + 1
        both.compare()
        mem.refcount[pfn] = oldrc
        mem.flags[pfn] = old
    for pfn in targets:
        for arr in (mem.mapcount, mem.refcount):
            old = int(arr[pfn])
            arr[pfn] = old + rng.choice((1, -1, 3))
            both.compare()
            both.compare(extra={pfn: 1})
            arr[pfn] = old
    # a present PTE pointed at a RAM / device / hole frame
    pool = m.pool
    rows = np.flatnonzero(pool.level == 1)
    for r in rows[:3].tolist():
        ents = pool.tables[r]
        present = np.flatnonzero((ents & np.uint64(x86._PAGE_PRESENT)) != 0)
        if not present.size:
            continue
        i = int(present[0])
        old = int(ents[i])
        for pfn in targets:
            ents[i] = np.uint64((old & ~x86.PTE_PFN_MASK) | (pfn << 12))
            both.compare()
        ents[i] = np.uint64(old)
    both.compare()


@pytest.mark.parametrize("kernel", ["5.2", "6.12", "6.18"])
def test_check_counts_equals_the_reference(kernel):
    both = _Both()
    rng = random.Random(kernel)
    holes = 0
    for seed in range(7):
        sc = generate(SeededChoices(seed), kernel, "builtin")
        run_scenario(sc, RandomScheduler(SeededChoices(seed)), invariants=default_invariants() + [both],
                     record_trace=False)
        holes += len(_segments(both.run.machine.mem)) > 1
        _break_and_compare(both, rng)
        for arrays in _SCRATCH.values():          # the kept arrays are all zero again after the checks
            assert not any(a.any() for a in arrays)
    assert both.compared > 150 and both.nonempty > 50, (both.compared, both.nonempty)
    assert both.poisoned >= 7, both.poisoned
    assert holes, "no generated machine had a device range above RAM"
