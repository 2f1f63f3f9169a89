"""Malformed inputs for the CLI contract fuzz test (tests/cli/test_cli_fuzz_contract.py) and its long version
(benchmarks/bench_cli_contract.py): Hypothesis strategies that turn the project's own scenario files and
reproducers into broken ones -- structure-aware (a key's value replaced by a nasty value, an unknown key added,
a table replaced, a key deleted) and text-level (a line deleted or inserted, bytes that are not UTF-8, deep
nesting, integers past Python's 4300-digit conversion limit), given to every command that reads a scenario --
and random command lines of every command and option the CLI has (read from the click tree, so a command or
option added later is fuzzed too).  Work that takes minutes or needs the machine (guest boots and builds, the
live cross-check, ``bench``, Dask clusters) is stubbed out by :func:`no_heavy_work`: a command that gets that far
has accepted its input, which is what this fuzz checks.

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
    command: str                       # the command words of a file case ("run", "guest run" ...) or "argv"
    data: bytes | None                 # the input file's bytes (None: no file)
    argv: list[str] = field(default_factory=list)
    must_fail: bool = False            # known malformed: exit code 2 is the only right answer
    how: str = ""


#: the commands that read a scenario file (the guest ones stop at the guest: see :func:`no_heavy_work`)
SCENARIO_COMMANDS = ["run", "run", "show", "guest run", "crosscheck --guest"]


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
    if cmd == "run":                   # every command that reads a scenario file: the same checks, same errors
        cmd = draw(st.sampled_from(SCENARIO_COMMANDS))
    return Case(cmd, data, must_fail=must_fail, how=how)


def command_table() -> dict[tuple[str, ...], list[Any]]:
    """Every command of the CLI (``("guest", "run")`` for a group's command) with its click parameters, read
    from the CLI itself: a command or option added later is fuzzed without editing this file."""
    import click

    from hmmirror.cli.main import cli

    out: dict[tuple[str, ...], list[Any]] = {}

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, path + (name,))
        else:
            out[path] = [p for p in cmd.params if p.name != "help"]

    walk(cli, ())
    return out


COMMANDS = command_table()
ARG_VALUES = ["", "0", "1", "-1", "nan", "inf", "1e309", "5.2", "6.12", "6.18", "6.x", "4.19", "x", "9" * 30,
              "/dev/null", "/missing/dir/x.png", "/", ".", "buf:buf+4K", "0:0", "0x1000:0x0", "builtin",
              "os:path", "nosuch:X", "anon", "anon,bogus", "none", "local:0", "local:x", "switch", "p", "-"]
#: values worth trying for particular options, besides ARG_VALUES and the case's own directory and file names
OPTION_VALUES: dict[str, list[str]] = {
    "--dask": ["local:1", "local:2", "local:99999", "tcp://", "tcp://127.0.0.1:1", "a b"],
    "--driver": ["gpusvm", "GPUSVM", "hmmirror.sim.refdrivers:IntervalMirror", "hmmirror.sim.refdrivers:Nope", "hmmirror.errors:InputError"],
    "--kinds": ["anon,file", ",", "anon,,anon"],
    "--events": ["fork", "none,fork", "bogus"],
    "--known": ["/dev/null", "/missing/known.txt", "@known"],
    "--timeout": ["10", "86401", "9.5"],
    "--random": ["10000", "10001"],
    "--range": ["m0:m0+4K", "buf", "buf+4K:buf", "0:1T", "zz:zz+1"],
    "--proc": ["app", "nosuch"],
    "--max-disagreements": ["0", "1048577"],
    "--runs": ["2", str(1 << 40), str((1 << 40) + 1)],      # 2**40 is valid: FUZZ_BOUNDS' --seconds ends it
    "--seed": [str(2**63), str(2**64), "0x10"],
    "--profile": ["5.2", "6.12"],
}
FILE_VALUES = ["/", "/dev/null", "/missing/scenario.toml", "@scenario", "@reproducer", "@dir"]
#: bounds a fuzz campaign of a random command line gets unless the line sets them: one cheap run
FUZZ_BOUNDS = {"--runs": "1", "--seconds": "5", "--scheduler": "random", "--kinds": "anon", "--events": "none"}


def _value(draw: st.DrawFn, p: Any, tmp: str) -> str:
    import click

    name = p.opts[0] if p.opts else p.name
    pool = ARG_VALUES + OPTION_VALUES.get(name, []) + [tmp, os.path.join(tmp, "out.png")]
    if isinstance(p.type, click.Choice):
        pool = pool + [str(c) for c in p.type.choices] * 3
    v = draw(st.sampled_from(pool))
    if v == "@known":
        path = os.path.join(tmp, "known.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("# signatures\ncoherence|x|-\n\u00e9\n")
        v = path
    return v


def _file_arg(draw: st.DrawFn, cmd: tuple[str, ...], tmp: str) -> str:
    v = draw(st.sampled_from(FILE_VALUES + ARG_VALUES[:4]))
    if v == "@scenario":
        return str(draw(st.sampled_from(SCENARIOS)))
    if v == "@reproducer":
        return str(draw(st.sampled_from(REPRODUCERS)))
    if v == "@dir":
        return tmp
    return v


@st.composite
def argv_cases(draw: st.DrawFn, tmp: str) -> Case:
    """A command line of any command (every command and option the CLI has, read from it), with random option
    values; file arguments are a scenario or reproducer of the project or a nasty path."""
    import click

    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    params = COMMANDS[cmd]
    opts = [p for p in params if isinstance(p, click.Option)]
    argv = list(cmd)
    for p in draw(st.lists(st.sampled_from(opts + [None]), max_size=4, unique_by=lambda p: id(p))):
        if p is None:
            argv.append("--bogus")
            continue
        argv.append(draw(st.sampled_from(p.opts)))
        if not p.is_flag:
            argv.append(_value(draw, p, tmp))
    for a in (p for p in params if isinstance(p, click.Argument)):
        if a.nargs == -1:
            n = draw(st.integers(0, 2))
        else:
            n = a.nargs if draw(st.integers(0, 9)) else draw(st.integers(0, a.nargs + 1))   # mostly the right count
        for _ in range(n):
            file_like = isinstance(a.type, click.Path) or a.name in ("file", "files")
            argv.append(_file_arg(draw, cmd, tmp) if file_like else draw(st.sampled_from(ARG_VALUES)))
    if cmd == ("fuzz",):                   # a valid campaign stays short: one run or 5 s, one kind, no events
        for opt, v in FUZZ_BOUNDS.items():
            if opt not in argv:
                argv += [opt, v]
        if "--findings" not in argv:
            argv += ["--findings", os.path.join(tmp, "findings")]
    return Case("argv", None, argv, how="argv:" + " ".join(cmd))


class WorkStarted(BaseException):
    """Raised by the stand-ins of :func:`no_heavy_work`: the command accepted its input and started real
    work (a guest boot, a kernel build, the live cross-check, the benchmark, a Dask cluster)."""


@contextlib.contextmanager
def no_heavy_work() -> Any:
    """Stand-ins for the work that takes minutes or needs the machine (QEMU guest, kernel build, live
    cross-check, ``bench``, a Dask cluster): the contract under test is the input checking in front of it."""
    import hmmirror.cli.bench as bench
    import hmmirror.cli.guest as guest
    import hmmirror.live.crosscheck as live_cc

    def stop(*_a: Any, **_k: Any) -> Any:
        raise WorkStarted()

    patches = [(guest, "ensure_guest", stop), (guest, "_need_qemu", stop), (live_cc, "crosscheck_scenario", stop),
               (bench, "run_bench", stop)]
    try:
        import hmmirror.sim.dask as dask_mod
        patches.append((dask_mod.DaskExecutor, "factory", classmethod(lambda cls, address: stop)))
    except ImportError:
        pass
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


# ----------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    code: int
    out: str
    err: str
    problem: str | None            # None: the contract held
    started: bool = False          # the command accepted its input and started work that is stubbed out


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run ``case`` in this process (``main`` with captured output) and check the contract."""
    from hmmirror.cli.main import main

    crash_dir = tmp / "crashes"
    os.environ["HMMIRROR_CRASH_DIR"] = str(crash_dir)
    before = set(os.listdir(crash_dir)) if crash_dir.exists() else set()
    if case.data is not None:
        f = tmp / "input.toml"
        f.write_bytes(case.data)
        argv = case.command.split() + [str(f)]
        if case.command == "replay":
            argv += ["--log", str(tmp / "log.txt")]
    else:
        argv = list(case.argv)
    out, err = io.StringIO(), io.StringIO()
    code = None
    cwd = os.getcwd()
    os.chdir(tmp)                              # relative output paths of random command lines land here
    started = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), no_heavy_work():
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except WorkStarted:
            code, started = 0, True            # input accepted; the heavy work itself is not under test here
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
    return Outcome(code if code is not None else 0, o, e, problem, started)


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
