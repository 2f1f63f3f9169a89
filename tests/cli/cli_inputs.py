"""Malformed inputs for the CLI contract fuzz test (tests/cli/test_cli_fuzz_contract.py) and its long version
(benchmarks/bench_cli_contract.py): Hypothesis strategies that turn the project's own scenario files and
reproducers into broken ones -- structure-aware (a key's value replaced by a nasty value, an unknown key added,
a table replaced, a key deleted) and text-level (a line deleted or inserted, bytes that are not UTF-8, deep
nesting, integers past Python's 4300-digit conversion limit) -- and random command lines.

:func:`run_case` runs one case in this process through ``hmmirror.cli.main.main`` and classifies it; the
contract is violated when the exit code is not 0, 1 or 2, when a code-2 error is not exactly one line starting
``hmmirror: error:`` naming the input file or an option, when a crash report appears, when anything printed a
traceback, or when an input known to be malformed did not give 2.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "examples").glob("*.toml"))
REPRODUCERS = sorted((ROOT / "docs" / "sim-reproducers").glob("*.toml"))
#: the step bound written into base reproducers (fast replays) and the page budget of base scenarios
SIM_STEPS = 3000
PAGES = 4096


def _base_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in SCENARIOS:
        doc = tomllib.loads(p.read_text())
        doc["limits"] = {"pages": PAGES}
        out.append(("run", doc))
    for p in REPRODUCERS:
        doc = tomllib.loads(p.read_text())
        doc["sim"]["max_steps"] = SIM_STEPS
        out.append(("replay", doc))
    return out


BASES = _base_docs()

NASTY_INTS = [-1, 0, 1, 4095, 4097, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63), 10**30]
NASTY_STRS = ["", " ", "64T", "1T", "1P", "16E", "-4K", "0x", "0xfffffffffffffffff", "4K4K", "nan", "m0-28K",
              "m0+1T", "m0+-4K", "zz+4K", "\x00", "é", "\u202e", "/", "/dev/zero", "../../etc", "a" * 300,
              "mmap", "touch", "inspect", "fork", "builtin", "x:y", "os:path", "switch", "pct", "9" * 50]
NASTY_VALUES: list[Any] = (NASTY_INTS + NASTY_STRS + [True, False, 1.5, -0.0, float("inf"), float("nan"), [],
                           [1, "a"], ["mmap"], {}, {"op": "mmap"}, [[[[1]]]], {"a": {"b": {"c": 1}}}])


def nasty_value() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.sampled_from(NASTY_VALUES), st.integers(), st.text(max_size=20),
                     st.floats(allow_nan=True, allow_infinity=True), st.booleans())
    return st.recursive(leaf, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                    st.dictionaries(st.text(min_size=1, max_size=8), ch, max_size=3)),
                        max_leaves=6)


def _paths(v: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a TOML document."""
    out = [prefix] if prefix else []
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, prefix + (i,))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


# ----------------------------------------------------------------------------------------- TOML text

def _tkey(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in k) + '"'


def _tval(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else ("-inf" if v == float("-inf") else repr(v)))
    if isinstance(v, str):
        return _tstr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_tval(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_tkey(k)} = {_tval(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _tstr(s: str) -> str:
    return '"' + "".join(c if (c.isprintable() and c not in '"\\') else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                         else f"\\U{ord(c):08x}" for c in s) + '"'


def dumps(doc: dict[str, Any]) -> str:
    """TOML text of ``doc`` (arrays of tables as [[...]], everything else inline)."""
    out: list[str] = []

    def table(t: dict[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in t.items() if not (isinstance(v, dict) and v) and not _aot(v)}
        for k, v in scalars.items():
            out.append(f"{_tkey(k)} = {_tval(v)}")
        for k, v in t.items():
            if isinstance(v, dict) and v:
                out.append(f"\n[{'.'.join(_tkey(x) for x in path + [k])}]")
                table(v, path + [k])
            elif _aot(v):
                for item in v:
                    out.append(f"\n[[{'.'.join(_tkey(x) for x in path + [k])}]]")
                    table(item, path + [k])

    table(doc, [])
    return "\n".join(out) + "\n"


def _aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


# ----------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    command: str                       # run / replay / show / crosscheck (file based) or argv
    data: bytes | None                 # the input file's bytes (None: no file)
    argv: list[str] = field(default_factory=list)
    must_fail: bool = False            # known malformed: exit code 2 is the only right answer
    how: str = ""


@st.composite
def file_cases(draw: st.DrawFn) -> Case:
    """A scenario or reproducer of the project, broken in one or two ways."""
    cmd, base = draw(st.sampled_from(BASES))
    doc = copy.deepcopy(base)
    kind = draw(st.sampled_from(["value", "value", "unknown_key", "delete", "table", "text", "bytes", "deep",
                                 "bigint", "none"]))
    must_fail = False
    how = kind
    paths = _paths(doc)
    if kind in ("value", "unknown_key", "delete", "table") and paths:
        path = draw(st.sampled_from(paths))
        parent = _get(doc, path[:-1])
        if kind == "value":
            parent[path[-1]] = draw(nasty_value())
        elif kind == "delete":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif kind == "table":
            parent[path[-1]] = draw(st.sampled_from([{}, {"x": 1}, [], [{}], "x", 0]))
        else:
            target = _get(doc, path) if isinstance(_get(doc, path), dict) else parent
            if isinstance(target, dict):
                target[draw(st.sampled_from(["bogus", "Op", "size2", "ops_", "kernel_"]))] = draw(nasty_value())
                must_fail = True
        how = f"{kind} at {'.'.join(map(str, path))}"
    if kind == "unknown_key" and not must_fail:
        doc["bogus_top"] = 1
        must_fail = True
    text = dumps(doc)
    data = text.encode()
    if kind == "text":
        lines = text.splitlines()
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if draw(st.booleans()) and lines:
            del lines[i]
        else:
            lines.insert(i, draw(st.sampled_from(["[", "]]", "x = ", "= 1", "[[op]]", "[sim]", "op = 'touch'",
                                                  '"""', "a.b.c = 1", "[machine]", "x = 1979-05-27"])))
        data = "\n".join(lines).encode()
    elif kind == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"])) + data[at:]
        must_fail = True               # not UTF-8, or a control character TOML forbids
    elif kind == "deep":
        n = draw(st.sampled_from([200, 900, 3000, 20000]))
        data = data + f"\nzz_deep = {'[' * n}{']' * n}\n".encode()
        must_fail = True
    elif kind == "bigint":
        n = draw(st.sampled_from([4301, 5000, 20000]))
        data = data + f"\nzz_big = {'7' * n}\n".encode()
        must_fail = True
    return Case(cmd, data, must_fail=must_fail, how=how)


OPTS: dict[str, list[str]] = {
    "run": ["--kernel", "--json", "--no-pages"],
    "show": ["--proc", "--range", "--png", "--json", "--kernel"],
    "replay": ["--seed", "--kernel", "--driver", "--png", "--log", "--every-step", "--json"],
    "fuzz": ["--kernel", "--seconds", "--runs", "--jobs", "--driver", "--findings", "--scheduler", "--seed",
             "--kinds", "--events", "--json", "--fresh"],
    "demo": ["--kernel", "--png", "--json"],
    "live": [],
}
FLAGS = {"--json", "--no-pages", "--every-step", "--fresh"}
ARG_VALUES = ["", "0", "1", "-1", "nan", "inf", "1e309", "5.2", "6.18", "6.x", "4.19", "x", "9" * 30,
              "/dev/null", "/missing/dir/x.png", "/", ".", "buf:buf+4K", "0:0", "0x1000:0x0", "builtin",
              "os:path", "nosuch:X", "anon", "anon,bogus", "none", "local:0", "local:x", "switch", "p", "-"]


@st.composite
def argv_cases(draw: st.DrawFn, tmp: str) -> Case:
    """A command line of random options and values (file arguments are a scenario of the project)."""
    cmd = draw(st.sampled_from(sorted(OPTS)))
    argv = [cmd]
    for opt in draw(st.lists(st.sampled_from(OPTS[cmd] + ["--bogus"]), max_size=4, unique=True)):
        argv.append(opt)
        if opt not in FLAGS:
            v = draw(st.sampled_from(ARG_VALUES + [tmp, os.path.join(tmp, "out.png")]))
            argv.append(v)
    if cmd in ("run", "show") and draw(st.booleans()):
        argv.insert(1, str(draw(st.sampled_from(SCENARIOS))))
    if cmd == "live":
        argv += draw(st.lists(st.sampled_from(ARG_VALUES), max_size=4))
    if cmd == "fuzz":               # valid campaigns stay short: one run, one kind, no events
        argv += ["--runs", "1", "--scheduler", "random", "--kinds", "anon", "--events", "none", "--findings",
                 os.path.join(tmp, "findings")] if "--runs" not in argv else []
    return Case("argv", None, argv, how="argv")


# ----------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    code: int
    out: str
    err: str
    problem: str | None            # None: the contract held


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run ``case`` in this process (``main`` with captured output) and check the contract."""
    from hmmirror.cli.main import main

    crash_dir = tmp / "crashes"
    os.environ["HMMIRROR_CRASH_DIR"] = str(crash_dir)
    before = set(os.listdir(crash_dir)) if crash_dir.exists() else set()
    if case.data is not None:
        f = tmp / "input.toml"
        f.write_bytes(case.data)
        argv = [case.command, str(f)]
        if case.command == "replay":
            argv += ["--log", str(tmp / "log.txt")]
    else:
        argv = list(case.argv)
    out, err = io.StringIO(), io.StringIO()
    code = None
    cwd = os.getcwd()
    os.chdir(tmp)                              # relative output paths of random command lines land here
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except BaseException as exc:           # noqa: BLE001 - anything escaping main is a contract breach
            return Outcome(-1, out.getvalue(), err.getvalue(), f"escaped main: {type(exc).__name__}: {exc}")
        finally:
            os.chdir(cwd)
    o, e = out.getvalue(), err.getvalue()
    after = set(os.listdir(crash_dir)) if crash_dir.exists() else set()
    problem = None
    if "Traceback" in o or "Traceback" in e:
        problem = "traceback printed"
    elif after - before or code == 3:
        problem = f"internal error (crash report): {e.strip()[:300]}"
    elif code not in (0, 1, 2):
        problem = f"exit code {code}"
    elif code == 2:
        lines = e.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("hmmirror: error: "):
            problem = f"code 2 without exactly one error line: {e[:300]!r}"
        elif case.data is not None and str(tmp / "input.toml") not in lines[0]:
            problem = f"code 2 does not name the file: {lines[0][:300]}"
    elif case.must_fail:
        problem = f"malformed input ({case.how}) accepted with exit code {code}"
    return Outcome(code if code is not None else 0, o, e, problem)


def limits() -> contextlib.AbstractContextManager[None]:
    """Small model limits while fuzzing, so a valid mutated input runs in milliseconds."""
    from hmmirror.scenario import schema

    @contextlib.contextmanager
    def cm() -> Any:
        saved = (schema.MAX_PAGE_BUDGET, schema.DEFAULT_PAGE_BUDGET, schema.MAX_SIM_STEPS, schema.MAX_RAM)
        schema.MAX_PAGE_BUDGET = schema.DEFAULT_PAGE_BUDGET = PAGES
        schema.MAX_SIM_STEPS = SIM_STEPS
        schema.MAX_RAM = 1 << 30
        try:
            yield
        finally:
            schema.MAX_PAGE_BUDGET, schema.DEFAULT_PAGE_BUDGET, schema.MAX_SIM_STEPS, schema.MAX_RAM = saved

    return cm()


_ = sys
