"""Drivers that are wrong in the ways ``--driver`` must refuse before a campaign starts (exit code 2)."""

from __future__ import annotations

from hmmirror.sim.driver import DriverBase

NOT_A_CLASS = 42


def a_function() -> None:
    """A function, not a class."""


class NeedsArgs(DriverBase):
    """Its constructor needs an argument the simulator does not give."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size


class Explodes(DriverBase):
    """Its constructor raises."""

    def __init__(self) -> None:
        raise RuntimeError("no device")


class NoMethods:
    """Not a driver at all."""


class PlainFault(DriverBase):
    """``fault`` is a plain function: it would run outside the scheduler."""

    def fault(self, start: int, end: int, write: bool) -> int:   # type: ignore[override]
        return 0

    def invalidate(self, inv):  # type: ignore[no-untyped-def]
        return True
        yield


class Only52(DriverBase):
    """A driver for the 5.2 profile only."""

    profiles = ("5.2",)

    def fault(self, start, end, write):  # type: ignore[no-untyped-def]
        return 0
        yield

    def invalidate(self, inv):  # type: ignore[no-untyped-def]
        return True
        yield
