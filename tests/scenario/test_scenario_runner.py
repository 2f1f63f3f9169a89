"""Running scenarios on the model: records, errno results, expectations, the bundled examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmmirror.errors import InputError
from hmmirror.scenario import load, parse, run
from hmmirror.scenario.report import dumps, render_run, runs_json

ROOT = Path(__file__).resolve().parents[2]

ANON = '''
[machine]
ram = "256M"

[[op]]
op = "mmap"
as = "buf"
length = "64K"
prot = "rw"

[[op]]
op = "touch"
addr = "buf"
access = "read"

[[op]]
op = "inspect"
as = "read"
addr = "buf"
{expect_read}

[[op]]
op = "touch"
addr = "buf"
length = "4K"
access = "write"

[[op]]
op = "inspect"
addr = "buf"
{expect_write}
'''

# mm-substrate.md §9 A2: anon private, read every page -> zero pfn, read-only; one write -> new pfn (§5.3).
A2_READ = ('expect = { ret = 16, pages = [ { range = "all", kind = "zero", zero = true, write = false, '
           'level = "pte" } ] }')
A2_WRITE = ('expect = { pages = [ { range = "0", kind = "anon", write = true, exclusive = true, '
            'pfn_differs_from = "read" }, { range = "1-15", kind = "zero", pfn_same_as = "read" } ] }')


def test_scenario_run_anon_a2_expectations_hold() -> None:
    r = run(parse(ANON.format(expect_read=A2_READ, expect_write=A2_WRITE)))
    assert r.ok, [m for rec in r.records for m in rec.mismatches]
    assert [rec.expect_ok for rec in r.records] == [None, None, True, None, True]
    assert r.records[1].ret == 16                       # touch: pages touched (length ran to the mapping end)


def test_scenario_run_detects_a_wrong_expectation() -> None:
    wrong = 'expect = { ret = 3, pages = [ { range = "0-15", kind = "anon" } ] }'   # A2 says: zero page
    r = run(parse(ANON.format(expect_read=wrong, expect_write="")))
    rec = r.records[2]
    assert rec.expect_ok is False and not r.ok
    assert rec.mismatches == ["ret: expected 3, got 16", "pages 0-15: kind expected 'anon', got 'zero'"]


def test_scenario_run_record_json_shape() -> None:
    r = run(parse(ANON.format(expect_read=A2_READ, expect_write="")))
    doc = json.loads(dumps(runs_json([r])))
    assert doc["kernel"] == "6.18" and doc["ok"] is True
    recs = doc["records"]
    assert len(recs) == 5
    for i, rec in enumerate(recs):
        assert {"index", "op", "proc", "ok", "ret", "errno", "args", "line"} <= set(rec)
        assert rec["index"] == i and rec["proc"] == "p" and rec["ok"] is True and rec["errno"] is None
    assert recs[0]["ret"].startswith("0x")                  # addresses as hex strings
    assert recs[1]["args"]["addr"] == recs[0]["ret"]
    assert "pages" not in recs[1] and "expect_ok" not in recs[1]
    pages = recs[2]["pages"]
    assert len(pages) == 16 and recs[2]["expect_ok"] is True
    assert pages[0]["kind"] == "zero" and pages[0]["addr"] == recs[0]["ret"] and pages[0]["pfn"].startswith("0x")


def test_scenario_run_is_deterministic() -> None:
    text = ANON.format(expect_read=A2_READ, expect_write=A2_WRITE)
    assert dumps(run(parse(text)).to_json()) == dumps(run(parse(text)).to_json())


def test_scenario_errno_is_a_result() -> None:
    # munmap(2): EINVAL for an unaligned address; a CPU access without a VMA is SIGSEGV (§5, x86 fault path)
    r = run(parse('''
[[op]]
op = "mmap"
as = "b"
length = "8K"
[[op]]
op = "munmap"
addr = "b+100"
length = "4K"
expect.errno = "EINVAL"
[[op]]
op = "touch"
addr = 0x10000
length = "8K"
expect.errno = "EFAULT"
[[op]]
op = "munmap"
addr = "b"
length = "8K"
expect.errno = "EINVAL"
'''))
    einval, efault, wrong = r.records[1:]
    assert (einval.ok, einval.errno, einval.expect_ok) == (False, "EINVAL", True)
    assert (efault.ok, efault.errno, efault.ret, efault.extra["signal"]) == (False, "EFAULT", 0, "SIGSEGV")
    assert efault.expect_ok is True
    assert wrong.ok and wrong.expect_ok is False and "succeeded" in wrong.mismatches[0]


def test_scenario_failed_mmap_leaves_its_name_undefined() -> None:
    # a private mapping of device-dax is refused (§5.8); the later op names a result that does not exist
    r = run(parse('''
[[machine.pmem]]
name = "pmem1"
size = "2G"
mode = "devdax"
[[op]]
op = "mmap"
as = "d"
file = "/dev/dax1.0"
length = "2M"
flags = ["private"]
expect.errno = "EINVAL"
[[op]]
op = "touch"
addr = "d"
length = "4K"
'''))
    assert r.records[0].expect_ok is True
    assert r.records[1].errno == "EINVAL" and "failed" in r.records[1].note


def test_scenario_expectations_per_kernel() -> None:
    text = '''
[[op]]
op = "mmap"
length = "4K"
as = "b"
[[op]]
op = "inspect"
addr = "b"
[[op.expect]]
kernel = "5.2"
ret = 99
[[op.expect]]
ret = 0
'''
    r618 = run(parse(text))
    assert r618.ok and r618.records[1].expect_ok is True          # the 5.2 table does not apply
    r52 = run(parse(text), kernel="5.2")
    assert r52.kernel == "5.2" and r52.records[1].mismatches == ["ret: expected 99, got 0"]


def test_scenario_runtime_range_outside_address_space_is_bad_input() -> None:
    scn = parse('[[op]]\nop = "mmap"\nlength = "4K"\nas = "b"\n[[op]]\nop = "touch"\naddr = "b+0x100000000000"\n'
                'length = "4K"\n', "x.toml")
    with pytest.raises(InputError, match=r"^x\.toml:5: op 1 \(touch\): .*outside the user address space"):
        run(scn)


def test_scenario_expect_pages_beyond_the_range_is_bad_input() -> None:
    scn = parse('[[op]]\nop = "mmap"\nlength = "8K"\nas = "b"\n[[op]]\nop = "inspect"\naddr = "b"\n'
                'expect.pages = [ { range = "5", present = false } ]\n', "x.toml")
    with pytest.raises(InputError, match="beyond the 2 pages"):
        run(scn)


def test_scenario_report_renders() -> None:
    from rich.console import Console

    r = run(parse(ANON.format(expect_read=A2_READ, expect_write=A2_WRITE), "anon.toml"))
    con = Console(record=True, width=120)
    con.print(render_run(r))
    text = con.export_text()
    assert "anon.toml" in text and "all met" in text and "zero" in text


def _examples() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_scenario_examples_meet_their_spec_expectations(path: Path) -> None:
    """Every example's expectations cite mm-substrate.md §9 observation ids; they must hold on 6.18."""
    r = run(load(path))
    missing = [rec.note for rec in r.records if rec.unsupported]
    if missing:
        pytest.skip(f"model piece not in this build yet: {missing[0]}")
    assert r.ok, [f"op {rec.index}: {m}" for rec in r.records for m in rec.mismatches]
    assert any(rec.expect_ok for rec in r.records)


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_scenario_demo_scenario_meets_its_expectations(kernel: str) -> None:
    """The embedded demo (§5.7 fsdax PTE/PMD, §5.8 device-dax PUD) holds under both profiles."""
    r = run(load(ROOT / "src" / "hmmirror" / "data" / "demo.toml"), kernel=kernel)
    assert r.ok, [f"op {rec.index}: {m}" for rec in r.records for m in rec.mismatches]
    assert sum(1 for rec in r.records if rec.expect_ok) == 3
