"""The suite's output hygiene guard (tests/conftest.py): a session that leaves a new file in the repository
tree fails and names it; relative output paths land in a temporary working directory, not in the tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_file_left_in_the_tree_fails_the_session(pytester: pytest.Pytester) -> None:
    subprocess.run(["git", "init", "-q", str(pytester.path)], check=True)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_out="""
        from pathlib import Path

        def test_relative_output_goes_to_a_temporary_cwd():
            Path("anon").write_bytes(b"png")          # what the contract fuzz once did with --png anon
            assert not (Path(__file__).parent / "anon").exists()

        def test_absolute_output_into_the_tree():
            (Path(__file__).parent / "p").write_bytes(b"png")
    """)
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(passed=2)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*files left in the repository tree*", "  ?? p"])
    assert "anon" not in r.stdout.str().split("files left in the repository tree")[1]


def test_a_clean_session_passes(pytester: pytest.Pytester) -> None:
    subprocess.run(["git", "init", "-q", str(pytester.path)], check=True)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_ok="def test_ok():\n    assert True\n")
    r = pytester.runpytest("-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.OK
    assert "files left" not in r.stdout.str()
