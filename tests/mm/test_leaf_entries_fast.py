"""``mm.debug.leaf_entries`` (the PTE tables of an mm scanned in one numpy pass) returns exactly the arrays of
``leaf_entries_reference`` (one scan per table, in walk order): on the live states of generated runs of every
profile, for the whole address space and for ranges cut inside PTE tables and huge leaves."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hmmirror.mm.debug import LEVEL_PTE, leaf_entries, leaf_entries_reference
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.invariants import default_invariants
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import generate
from hmmirror.sim.schedulers import RandomScheduler


class _Compare:
    """Every 5th step and at the end: both forms on every live mm, whole and cut at random addresses."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.compared = 0
        self.huge_and_pte = 0      # results holding both PTE and PMD/PUD-level leaves (the merge path)
        self.cut = 0               # cut ranges that returned something

    def attach(self, eng, run):
        self.run = run

    def after_step(self, eng, st, point):
        if eng.step % 5 == 0:
            self.compare()

    def run_finished(self, eng):
        self.compare()

    def compare(self):
        for mm in self.run.machine.mms.values():
            if mm.exited:
                continue
            got = leaf_entries(mm)
            want = leaf_entries_reference(mm)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and np.array_equal(g, w)
            self.compared += 1
            lv = want[2]
            self.huge_and_pte += bool((lv == LEVEL_PTE).any() and (lv != LEVEL_PTE).any())
            if want[0].size:
                lo, hi = int(want[0][0]), int(want[0][-1]) + 4096
                for _ in range(2):
                    a = self.rng.randrange(lo, hi) & ~0xFFF | self.rng.choice((0, 0x10))
                    b = a + self.rng.choice((4096, 3 * 4096 + 7, 600 << 12, 3 << 21))
                    got = leaf_entries(mm, a, b)
                    want = leaf_entries_reference(mm, a, b)
                    for g, w in zip(got, want):
                        assert g.dtype == w.dtype and np.array_equal(g, w)
                    self.cut += bool(want[0].size)


@pytest.mark.parametrize("kernel", ["5.2", "6.12", "6.18"])
def test_leaf_entries_equals_the_reference(kernel):
    cmp = _Compare(random.Random(kernel))
    for seed in range(12):
        sc = generate(SeededChoices(seed), kernel, "builtin")
        run_scenario(sc, RandomScheduler(SeededChoices(seed)), invariants=default_invariants() + [cmp],
                     record_trace=False)
    assert cmp.compared > 100 and cmp.cut > 20, (cmp.compared, cmp.cut)
    assert cmp.huge_and_pte > 0, "no state had huge and PTE leaves together"
