"""``Tracker.prune`` skips a list already pruned with the same or a later ``oldest``: it keeps exactly the
records the plain prune (every call) keeps, on random histories where records start and end at the current
step and ``oldest`` (the earliest snapshot step) moves forward, stays, or steps back."""

from __future__ import annotations

import random

import pytest

from hmmirror.sim.invariants import Tracker


def _plain(recs: list[list], oldest: int) -> list[list]:
    return [d for d in recs if d[3] is None or d[3] >= oldest] if len(recs) > 64 else recs


@pytest.mark.parametrize("seed", range(5))
def test_prune_keeps_what_the_plain_prune_keeps(seed):
    rng = random.Random(seed)
    t = Tracker()
    ref_d: list[list] = []
    ref_h: list[list] = []
    oldest = 0
    for step in range(3000):
        for lst, ref in ((t.delivered, ref_d), (t.history, ref_h)):
            if rng.random() < 0.5:
                rec = [0, 1, step, step if rng.random() < 0.3 else None]
                lst.append(rec)
                ref.append(list(rec))
            open_ = [i for i, d in enumerate(lst) if d[3] is None]
            if open_ and rng.random() < 0.4:     # a record ends now (the same record in both lists)
                i = rng.choice(open_)
                key = lst[i][2]
                lst[i][3] = step
                for r in ref:
                    if r[2] == key and r[3] is None:
                        r[3] = step
                        break
        r = rng.random()
        if r < 0.2:
            oldest = rng.randint(oldest, step)       # the earliest snapshot moves forward
        elif r < 0.25:
            oldest = rng.randint(0, oldest)          # ... or back (a task's snapshot forgotten)
        t.prune(oldest)
        ref_d, ref_h = _plain(ref_d, oldest), _plain(ref_h, oldest)
        assert t.delivered == ref_d and t.history == ref_h, step
