"""The sparse page-content store (``mm.page_contents.PageContents``: tags in per-chunk arrays, a page buffer
only where bytes past the first 8 are nonzero) holds the same bytes as the reference (``DictContents``: a
``bytearray`` per written page): operation by operation on random sequences, and over whole generated runs
of every profile (same results, same bytes in every frame at the end)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.mm import page_alloc
from hmmirror.mm.page_contents import CHUNK, DictContents, PageContents
from hmmirror.sim.choices import SeededChoices
from hmmirror.sim.runner import run_scenario
from hmmirror.sim.scenario import generate
from hmmirror.sim.schedulers import RandomScheduler


def _same(fast: PageContents, ref: DictContents, pfns: list[int]) -> None:
    for p in pfns:
        assert fast.read(p) == ref.read(p), p
        assert fast.get_tag(p) == ref.get_tag(p), p
        # "stored" may differ only for a page that reads as zeroes
        if (p in fast) != (p in ref):
            assert ref.read(p) == bytes(PAGE_SIZE) and p not in fast, p
        got = fast.get(p)
        assert (bytes(got) if got is not None else bytes(PAGE_SIZE)) == ref.read(p)
    lo, hi = min(pfns), max(pfns) + 1
    assert set(fast.stored_in(lo, hi)) <= set(ref.stored_in(lo, hi))
    assert all(ref.read(p) == bytes(PAGE_SIZE) for p in set(ref.stored_in(lo, hi)) - set(fast.stored_in(lo, hi)))


def _data(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(n)
    if kind == 1:                                  # nonzero only in the first bytes
        return bytes(rng.randrange(256) for _ in range(min(n, 8))) + bytes(max(0, n - 8))
    return bytes(rng.randrange(256) for _ in range(n))


@pytest.mark.parametrize("seed", range(4))
def test_store_holds_what_the_reference_holds_operation_by_operation(seed):
    rng = random.Random(seed)
    fast, ref = PageContents(), DictContents()
    # pfns in two chunks and far away (a device range), some on chunk edges
    universe = [0, 1, 2, 7, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3, 262144 + 5, 262144 + CHUNK + 9]
    ops = 0
    for _ in range(400):
        p, q = rng.choice(universe), rng.choice(universe)
        op = rng.randrange(10)
        if op == 0:
            off = rng.choice((0, 0, 3, 7, 8, 9, 100, PAGE_SIZE - 1))
            n = rng.choice((1, 5, 8, 16, PAGE_SIZE - off))
            n = min(n, PAGE_SIZE - off)
            d = _data(rng, n)
            fast.write(p, off, d)
            ref.write(p, off, d)
        elif op == 1:
            v = rng.choice((0, rng.randrange(1 << 64), 0xD1 << 56 | rng.randrange(1 << 20)))
            fast.set_tag(p, v)
            ref.set_tag(p, v)
        elif op == 2:
            off = rng.choice((0, 2, 8, 50))
            stop = rng.choice((off + 1, 8, 60, PAGE_SIZE))
            stop = max(stop, off)
            fast.zero(p, off, stop)
            ref.zero(p, off, stop)
        elif op == 3:
            fast.copy(q, p)
            ref.copy(q, p)
        elif op == 4:
            fast.discard(p)
            ref.discard(p)
        elif op == 5:
            lo = rng.choice(universe)
            hi = lo + rng.choice((1, 3, CHUNK, 2 * CHUNK + 5))
            fast.drop_range(lo, hi)
            ref.drop_range(lo, hi)
        elif op == 6:
            pf = np.array(rng.sample(universe, rng.randrange(1, len(universe))), dtype=np.int64)
            vals = np.array([rng.randrange(1 << 64) for _ in range(pf.size)], dtype=np.uint64)
            fast.store_tags(pf, vals)
            ref.store_tags(pf, vals)
        elif op == 7:
            pf = np.array([rng.choice(universe) for _ in range(6)], dtype=np.int64)
            assert fast.load_tags(pf).tolist() == ref.load_tags(pf).tolist()
        elif op == 8:
            d = _data(rng, PAGE_SIZE)              # a whole page written (dmirror, swap-in)
            fast.write(p, 0, d)
            ref.write(p, 0, d)
        else:
            got, want = fast.pop(p), ref.pop(p, None)
            assert (bytes(got) if got is not None else bytes(PAGE_SIZE)) == \
                (bytes(want) if want is not None else bytes(PAGE_SIZE))
        ops += 1
        _same(fast, ref, universe)
    assert fast.full or fast.tags


def test_a_tagged_gigabyte_costs_eight_bytes_a_page():
    """A 1 GiB device job tags every page: 2 MiB of chunk arrays, no page buffer (the reference: 1 GiB)."""
    fast = PageContents()
    pfns = np.arange(262144, dtype=np.int64) + (1 << 18)
    fast.store_tags(pfns, (np.arange(pfns.size, dtype=np.uint64) + np.uint64(1)) | np.uint64(0xD1 << 56))
    assert not fast.full and fast.nbytes() == pfns.size * 8
    assert fast.read(int(pfns[5]), 0, 8) == ((0xD1 << 56) | 6).to_bytes(8, "little")
    fast.drop_range(int(pfns[0]), int(pfns[-1]) + 1)
    assert not fast.tags and len(fast) == 0


def _final_bytes(machine) -> dict[int, bytes]:
    mem = machine.mem
    return {p: mem.read(p) for p in sorted(mem.contents.keys()) if mem.read(p) != bytes(PAGE_SIZE)}


class _Grab:
    """Keeps the run's machine (its bytes are compared after the run)."""

    def attach(self, eng, run):
        self.machine = run.machine


@pytest.mark.parametrize("kernel", ["5.2", "6.12", "6.18"])
def test_runs_see_the_same_bytes_with_either_store(kernel, monkeypatch):
    from hmmirror.sim.invariants import default_invariants

    tagged = 0
    for seed in range(6):
        out = []
        for sparse in (False, True):
            monkeypatch.setattr(page_alloc, "SPARSE_CONTENTS", sparse)
            sc = generate(SeededChoices(seed), kernel, "builtin")
            grab = _Grab()
            res = run_scenario(sc, RandomScheduler(SeededChoices(seed)), invariants=default_invariants() + [grab],
                               record_trace=False)
            assert isinstance(grab.machine.mem.contents, PageContents if sparse else DictContents)
            out.append((res.steps, res.schedule, [f.signature for f in res.findings], _final_bytes(grab.machine)))
        assert out[0] == out[1], seed
        tagged += len(out[1][3])
    assert tagged > 0, "no generated run stored any bytes"
