"""docs/api.md runs: its ``python`` blocks in order in one namespace, its ``python test`` blocks as test files
of a fresh pytest session (pytester) in which the hmmirror plugin is loaded through its entry point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).parents[2] / "docs" / "api.md"
FENCE = re.compile(r"^```([a-z]+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def blocks(kind: str) -> list[tuple[int, str]]:
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang, info = m.group(1), m.group(2).strip()
        if lang == "python" and info == kind:
            out.append((text.count("\n", 0, m.start()) + 1, m.group(3)))
    return out


def test_every_python_block_is_tested() -> None:
    text = DOC.read_text(encoding="utf-8")
    infos = {m.group(2).strip() for m in FENCE.finditer(text) if m.group(1) == "python"}
    assert infos <= {"", "test"}, infos                  # no block escapes both runners
    assert len(blocks("")) >= 8 and len(blocks("test")) >= 2


def test_examples_run_in_order() -> None:
    ns: dict[str, object] = {"__name__": "docs_api"}
    for line, code in blocks(""):
        try:
            exec(compile(code, f"{DOC}:{line}", "exec"), ns)
        except Exception as exc:                         # name the block that broke
            raise AssertionError(f"docs/api.md block at line {line}: {type(exc).__name__}: {exc}") from exc


def test_test_blocks_pass_under_the_plugin(pytester: pytest.Pytester) -> None:
    files = {f"test_api_doc_{i}": code for i, (_line, code) in enumerate(blocks("test"))}
    pytester.makepyfile(**files)
    res = pytester.runpytest("-q", "-p", "no:randomly", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=6)                        # one test on all 3 profiles, one 6.18-only, two @given


def test_docstring_examples() -> None:
    import doctest

    import hmmirror.mirror

    res = doctest.testmod(hmmirror.mirror, raise_on_error=False)
    assert res.attempted >= 5 and res.failed == 0
