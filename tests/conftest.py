"""Shared fixtures: small machines for each profile."""

from __future__ import annotations

import pytest

from hmmirror import Machine

PROFILES = ("5.2", "6.12", "6.18")


@pytest.fixture(params=PROFILES)
def machine(request: pytest.FixtureRequest) -> Machine:
    """A 256 MiB machine, once per kernel profile."""
    return Machine(request.param, ram=256 << 20)


@pytest.fixture
def m618() -> Machine:
    return Machine("6.18", ram=256 << 20)


@pytest.fixture
def m52() -> Machine:
    return Machine("5.2", ram=256 << 20)
