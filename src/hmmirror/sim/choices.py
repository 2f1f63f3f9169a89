"""The one stream of choices.

Every nondeterministic decision of a simulation -- the machine and scenario a fuzzer generates, the next
task to run, a scheduler's priorities and change points, when to stop -- is drawn from one
:class:`Choices` object.  Two sources exist:

* :class:`SeededChoices`: a splitmix64 generator (pure Python, stable across Python versions and
  processes), for seeded runs and the ``random`` scheduler;
* :class:`HypothesisChoices`: Hypothesis's ``data.draw``, so that Hypothesis shrinks the choice sequence
  itself (used for scenario generation and the bounded switch lists of the fuzzer).

This is the only module of the package that produces pseudo-random numbers (a test greps for ``random``).
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

T = TypeVar("T")
_MASK = (1 << 64) - 1


class Choices:
    """A stream of bounded integer choices (the only primitive; everything else derives from it)."""

    def below(self, n: int) -> int:
        """An integer in ``[0, n)`` (``n >= 1``)."""
        raise NotImplementedError

    def between(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``."""
        return lo + self.below(hi - lo + 1)

    def flip(self, num: int = 1, den: int = 2) -> bool:
        """True with probability ``num/den``."""
        return self.below(den) < num

    def pick(self, seq: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return seq[self.below(len(seq))]


def _mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class SeededChoices(Choices):
    """splitmix64 seeded by an integer: the same seed gives the same stream in every process.

    The seed is scrambled into the starting state (``_mix64``): with the plain ``seed * gamma`` start, the
    stream of seed ``s + 1`` was the stream of seed ``s`` shifted by one draw, so the runs ``seed * 1000 + k``
    of a campaign drew near-copies of each other's scenarios.
    """

    __slots__ = ("state", "count")

    def __init__(self, seed: int) -> None:
        self.state = _mix64((int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
        self.count = 0

    def _next64(self) -> int:
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        self.count += 1
        if n <= 1:
            return 0
        return self._next64() % n          # modulo bias is irrelevant for n << 2**64


class HypothesisChoices(Choices):
    """Choices drawn from a Hypothesis ``st.data()`` object: shrinking works on this sequence.

    A ``st.data()`` object's ``draw`` wraps the draw in bookkeeping for the report of a failing example (a
    note per draw, a check that the strategy did not use ``random``: ``random.getstate()`` twice, an argument
    span for the explain phase); each choice here is drawn from the test case's ``conjecture_data`` directly:
    the same strategy, the same choices and spans, so the same scenarios (tests/sim/test_sim_fastpaths.py), at a
    fraction of the cost.  A ``draw`` function (``st.composite``) is called as it is."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self._st = st
        self._cache: dict[int, Any] = {}
        self.count = 0
        cd = getattr(data, "conjecture_data", None)
        self._draw = cd.draw if cd is not None and HYPOTHESIS_DIRECT else data.draw

    def below(self, n: int) -> int:
        self.count += 1
        if n <= 1:
            return 0
        s = self._cache.get(n)
        if s is None:
            s = self._cache[n] = self._st.integers(0, n - 1)
        return int(self._draw(s))


#: :class:`HypothesisChoices` draws from ``data.conjecture_data`` (off: through ``data.draw``, the reference)
HYPOTHESIS_DIRECT = True


class SaltedHypothesisChoices(HypothesisChoices):
    """:class:`HypothesisChoices` whose every value is rotated by a per-call offset derived from a salt drawn
    once per example (campaign sessions).

    Hypothesis draws some values of a bounded integer far more often than the others -- 0 about 6 % of the
    time whatever the range (its constants and simplest-value heuristics) -- so in a weighted choice the first
    entry of a table was drawn ~6 % of the time whatever its weight, and steering could not move it.  The
    rotation spreads that excess over all values; the stream stays a function of the example's choices."""

    def __init__(self, data: Any) -> None:
        super().__init__(data)
        self.salt: int | None = None

    def below(self, n: int) -> int:
        if n <= 1:
            self.count += 1
            return 0
        if self.salt is None:
            self.salt = int(self.data.draw(self._st.integers(0, _MASK)))
        v = super().below(n)
        return (v + _mix64((self.salt + self.count * 0x9E3779B97F4A7C15) & _MASK)) % n


class ListChoices(Choices):
    """Replays a recorded list of choices; past its end every choice is 0 (the simplest value)."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = list(values)
        self.pos = 0
        self.count = 0

    def below(self, n: int) -> int:
        self.count += 1
        if self.pos < len(self.values):
            v = self.values[self.pos]
            self.pos += 1
            return v % n if n > 1 else 0
        return 0
