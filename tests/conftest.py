"""Shared fixtures: small machines for each profile.

Output hygiene: every test runs with its working directory in a temporary directory (a relative output path
of a test or of the CLI it runs cannot land in the repository), and the session fails when it leaves new
files in the repository tree -- ``git status --porcelain --ignored`` before and after, caches and the venv
aside (a contract-fuzz run once left 13 PNG files named ``1``, ``p``, ``anon``... in the repository root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hmmirror import Machine

PROFILES = ("5.2", "6.12", "6.18")

#: path components whose appearance in the tree is not the suite's output: caches, the venv, build metadata
_NOT_OUTPUT = {"__pycache__", ".venv", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def tree_entries(root: Path) -> set[str] | None:
    """``git status`` entries of the repository tree (untracked, ignored and changed paths) that are not
    caches; None when ``root`` is not a git work tree (an unpacked sdist: nothing to compare)."""
    try:
        r = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v1", "--ignored", "-z"],
                           capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    out = set()
    for entry in r.stdout.decode("utf-8", "surrogateescape").split("\0"):
        parts = entry[3:].rstrip("/").split("/")
        if entry and not (_NOT_OUTPUT & set(parts)) and not parts[-1].endswith(".egg-info"):
            out.add(entry)
    return out


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")          # the xdist controller, or a plain session


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if _controller(session.config):
        session.config.stash[_BEFORE] = tree_entries(session.config.rootpath)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if not _controller(session.config) or before is None or os.environ.get("HMMIRROR_TREE_CHECK") == "0":
        return
    after = tree_entries(session.config.rootpath) or set()
    left = sorted(after - before)
    if left:
        session.config.stash[_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    left = terminalreporter.config.stash.get(_LEFT, None)
    if left:
        terminalreporter.section("files left in the repository tree", sep="=", red=True, bold=True)
        for e in left:
            terminalreporter.line(f"  {e}")
        terminalreporter.line("the suite must write only under tmp_path (session FAILED; HMMIRROR_TREE_CHECK=0 "
                              "skips this check while you edit files during a run)", red=True)


_BEFORE = pytest.StashKey[set[str] | None]()
_LEFT = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session", autouse=True)
def _cwd_outside_the_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run every test with its working directory outside the repository."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(old)


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
