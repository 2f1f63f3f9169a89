"""One test per failure class of issue 13's list that is about input: each ends with exit code 2 and one line
naming FILE:LINE (or the option), fast, never a traceback; and the install/exit-code classes that are not
covered by test_cli_contract.py / test_cli_fuzz_lifecycle.py."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest

from hmmirror.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "docs" / "sim-reproducers" / "coherence-commit-194d3eea.toml"


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def bad(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    t0 = time.monotonic()
    code, out, err = cli(argv, capsys)
    assert time.monotonic() - t0 < 20
    assert code == 2, (code, out[-500:], err[-500:])
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hmmirror: error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def write(tmp_path: Path, text: str | bytes, name: str = "s.toml") -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


# ---------------------------------------------------------------------------------------------- install

def test_fuzz_needs_nothing_beyond_the_plain_install() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(doc["project"]["dependencies"])
    assert "hypothesis" in deps                                # fuzz's generator and shrinker
    extras = doc["project"]["optional-dependencies"]
    assert any("distributed" in d for d in extras["dask"])     # optional: fuzz --dask
    assert any("distributed" in d for d in extras["test"])     # CI tests the Dask path


def test_missing_dask_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__

    def no_dask(name: str, *a: object, **k: object) -> object:
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("No module named 'distributed'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    bad(capsys, ["fuzz", "--runs", "1", "--dask", "local:2", "--findings", str(tmp_path)],
        "--dask", "pip install 'hmmirror[dask]'")


# ---------------------------------------------------------------------------------------------- TOML limits

@pytest.mark.parametrize("cmd", ["run", "replay"])
def test_deeply_nested_arrays(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[machine]\nram = \"64M\"\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    bad(capsys, [cmd, f], f"{f}:3", "nested too deeply")


@pytest.mark.parametrize("cmd", ["run", "replay"])
def test_integer_over_4300_digits(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[machine]\n\nram = " + "9" * 5000 + "\n")
    bad(capsys, [cmd, f], f"{f}:3", "4300 digits")


@pytest.mark.parametrize("cmd", ["run", "replay", "show"])
def test_not_utf8(cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, b"[machine]\nram = \"64M\"\n# caf\xe9\n")
    bad(capsys, [cmd, f], f"{f}:3", "not UTF-8")


def test_huge_input_file_is_refused_without_reading_it_all(capsys: pytest.CaptureFixture[str]) -> None:
    bad(capsys, ["run", "/dev/zero"], "/dev/zero", "larger than 16 MiB")


def test_op_name_that_is_a_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[[op]]\nop = [\"mmap\"]\nlength = \"4K\"\n")
    bad(capsys, ["run", f], f"{f}:2", "must be the name of an operation")


# ---------------------------------------------------------------------------------------------- machine bounds

def test_ram_64T(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[machine]\nram = \"64T\"\n")
    bad(capsys, ["run", f], f"{f}:2", "machine.ram", "more than the model supports")


def test_file_of_2_pow_63_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[[machine.fs]]\nmount = \"/mnt/e\"\ntype = \"ext4\"\n\n[[file]]\npath = \"/mnt/e/x\"\n"
                        f"size = {2**63}\n")
    bad(capsys, ["run", f], f"{f}:7", "does not fit")


def test_dax_file_larger_than_its_pmem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[[machine.pmem]]\nname = \"pmem0\"\nsize = \"16M\"\n\n[[machine.fs]]\nmount = \"/mnt/d\"\n"
                        "type = \"ext4\"\ndax = \"pmem0\"\n\n[[file]]\npath = \"/mnt/d/x\"\nsize = \"32M\"\n")
    bad(capsys, ["run", f], f"{f}:12", "pmem device pmem0")


def test_touch_of_1TiB_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "[[op]]\nop = \"mmap\"\nas = \"b\"\nlength = \"1T\"\n\n[[op]]\nop = \"touch\"\naddr = \"b\"\n")
    bad(capsys, ["run", f], f"{f}:6", "page budget")


def test_page_budget_can_be_raised_explicitly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = ("[limits]\npages = 600000\n\n[machine]\nram = \"4G\"\n\n[[op]]\nop = \"mmap\"\nas = \"b\"\n"
            "length = \"2200M\"\n\n[[op]]\nop = \"inspect\"\naddr = \"b\"\n")
    from hmmirror.scenario import parse
    assert parse(text, "ok.toml").ops[1].name == "inspect"           # 563200 pages: within the raised budget
    f = write(tmp_path, text.replace("600000", str(1 << 30)))
    bad(capsys, ["run", f], f"{f}:2", "limits.pages")


# ---------------------------------------------------------------------------------------------- reproducers

def repro_text() -> str:
    return REPRO.read_text()


@pytest.mark.parametrize("edit, line_of, words", [
    (lambda t: t.replace("[sim]\ndriver", "[sim]\nbogus = 1\ndriver"), "bogus = 1", "unknown key 'bogus'"),
    (lambda t: t.replace("[finding]\n", "[finding]\nextra = 1\n"), "extra = 1", "unknown key 'extra'"),
    (lambda t: t.replace("max_steps = 100000", "max_steps = \"many\""), "max_steps", "sim.max_steps"),
    (lambda t: t.replace("max_steps = 100000", "max_steps = 100000000000"), "max_steps", "between 1 and"),
    (lambda t: t.replace('jobs = [{ addr = "m0+16K"', 'jobs = [{ addr = 7.5'), 'addr = 7.5', "addr"),
    (lambda t: t.replace('write = false }]\n\n[[sim.device]]\nname = "dev1"',
                         'write = false, speed = 3 }]\n\n[[sim.device]]\nname = "dev1"'), "speed = 3",
     "unknown key 'speed'"),
    (lambda t: t.replace('ops = [{ op = "madvise"', 'ops = [{ op = "inspect"'), 'op = "inspect"',
     "'inspect' cannot run in a simulator thread"),
    (lambda t: t.replace('ops = [{ op = "madvise", addr = "m0+4K"', 'ops = [{ op = "madvise", addr = "zz+4K"'),
     "zz+4K", "names no"),
    (lambda t: t.replace('runs = [["cpu0", 5]', 'runs = [["cpu0", "five"]'), "runs = ", "sim.schedule.runs[0]"),
    (lambda t: t.replace('kind = "switch"', 'kind = "fair"'), 'kind = "fair"', "sim.scheduler.kind"),
    (lambda t: t.replace('signature = "', 'signature = 3\n# "'), "signature = 3", "finding.signature"),
    (lambda t: t.replace('mirror = "p"', 'mirror = "q"'), 'mirror = "q"', "sim.mirror"),
    (lambda t: t.replace("[sim]\n", "[simulator]\n").replace("[[sim.", "[[simulator."), "[simulator]",
     "unknown key 'simulator'"),
    (lambda t: t.replace('[[sim.device]]\nname = "dev0"\n', '[[sim.device]]\n'), "[[sim.device]]",
     "needs a 'name'"),
    (lambda t: "process = []\n" + t.replace('[[process]]\nname = "p"\n', ''), "process = []", "empty array"),
    (lambda t: t.replace('driver = "builtin"', 'driver = "x"'), 'driver = "x"', "sim.driver 'x' must be"),
])
def test_reproducer_schema(edit, line_of: str, words: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    text = edit(repro_text())
    assert text != repro_text()
    line = next(i for i, x in enumerate(text.splitlines(), 1) if line_of in x)
    f = write(tmp_path, text)
    bad(capsys, ["replay", f], f"{f}:{line}", words)


def test_reproducer_without_sim_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, (ROOT / "examples" / "thp.toml").read_text())
    bad(capsys, ["replay", f], f, "no [sim] table")


def test_the_shipped_reproducers_still_validate_and_replay(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["replay", str(REPRO), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["reproduced"] is True


# ---------------------------------------------------------------------------------------------- crosscheck: 1

def test_crosscheck_disagreement_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from hmmirror.live import crosscheck, hostenv

    monkeypatch.setattr(hostenv, "why_not_live", lambda: None)
    monkeypatch.setattr(hostenv, "thp_settings", lambda: {})

    def fake(scn, report, host_thp):                 # the kernel says otherwise on one field of one page
        report.scenarios += 1
        report.pages += 1
        report.count("kind", False)
        report.disagreements.append(crosscheck.Disagreement(scn.file, 0, "kind", "anon", "zero", page=0))

    monkeypatch.setattr(crosscheck, "crosscheck_scenario", fake)
    code, out, err = cli(["crosscheck", str(ROOT / "examples" / "thp.toml"), "--json"], capsys)
    assert code == 1, err
    assert json.loads(out)["disagreements"]


# ---------------------------------------------------------------------------------------------- docs

def test_every_registered_op_is_documented_in_scenarios_md() -> None:
    from hmmirror.scenario.runner import load_extensions
    from hmmirror.scenario.schema import OPS

    load_extensions()
    doc = (ROOT / "docs" / "scenarios.md").read_text()
    missing = [name for name in sorted(OPS) if f"| `{name}` |" not in doc]
    assert not missing, f"docs/scenarios.md lists no row for: {', '.join(missing)}"


def test_every_simulator_op_mode_and_event_is_documented_in_scenarios_md() -> None:
    # what a [sim] table accepts (the schema's names: the generator's drawing tables and the fallbacks)
    from hmmirror.scenario.schema import EVENT_KEYS, SIM_THREAD_OPS, _sim_names
    from hmmirror.sim.scenario import EVENT_KINDS

    rows = {line.split("|")[1].strip(): line for line in (ROOT / "docs" / "scenarios.md").read_text().splitlines()
            if line.startswith("| `[")}
    want = {"`[[sim.thread]]`": SIM_THREAD_OPS, "`[[sim.device]]`": _sim_names("mode", ("fault",)),
            "`[[sim.event]]`": _sim_names("event", tuple(EVENT_KINDS)) + tuple(EVENT_KEYS)}
    for table, names in want.items():
        missing = [n for n in names if f"`{n}`" not in rows[table]]
        assert not missing, f"docs/scenarios.md's {table} row lacks {missing}"


def test_readme_lists_every_command() -> None:
    from hmmirror.cli.main import cli as group

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in sorted(group.commands) if f"| `hmmirror {name}" not in readme]
    assert not missing, f"the README's command table has no row for: {', '.join(missing)}"


def test_readme_names_the_built_in_drivers() -> None:
    from hmmirror.sim.driver import BUILTIN_NAMES

    row = next(r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| `hmmirror fuzz"))
    missing = [n for n in ("builtin", *BUILTIN_NAMES) if n not in row]
    assert not missing, f"README fuzz row lacks --driver {missing}"


def test_readme_row_of_each_command_names_all_its_options() -> None:
    from hmmirror.cli.main import cli as group

    import click

    def options(cmd: click.Command) -> list[str]:        # a group's row names its commands' options too
        subs = list(cmd.commands.values()) if isinstance(cmd, click.Group) else []
        own = [o for p in cmd.params for o in p.opts if o.startswith("--") and o != "--help"]
        return own + [o for sub in subs for o in options(sub)]

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `hmmirror ")]
    for name, cmd in sorted(group.commands.items()):
        row = next(r for r in rows if r.startswith(f"| `hmmirror {name}"))
        if isinstance(cmd, click.Group):
            assert all(sub in row for sub in cmd.commands), f"README row of {name} lacks a command: {row}"
        missing = [o for o in options(cmd) if f"`{o}" not in row]
        assert not missing, f"README row of {name} lacks {missing}"


def test_reproducer_driver_that_cannot_be_imported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, repro_text().replace('driver = "builtin"', 'driver = "nosuchmodule_xyz:D"'))
    bad(capsys, ["replay", f], f"{f}: sim.driver", "cannot import")
