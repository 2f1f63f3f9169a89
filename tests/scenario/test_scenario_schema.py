"""Scenario files: parsing, validation and FILE:LINE error messages (docs/scenarios.md)."""

from __future__ import annotations

import re

import pytest

from hmmirror.errors import InputError
from hmmirror.scenario import OPS, parse, register_op, run
from hmmirror.scenario.schema import Addr, Locator, parse_addr, parse_size


def bad(text: str, file: str = "s.toml") -> str:
    """The error message of an invalid scenario (it must be one line starting with FILE)."""
    with pytest.raises(InputError) as ei:
        parse(text, file)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(file)
    return msg


# ------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("text,value", [
    ("4K", 4096), ("2M", 2 << 20), ("1G", 1 << 30), ("4KiB", 4096), ("0x3000", 0x3000), (8192, 8192),
    ("16k", 16384), ("1T", 1 << 40), (0, 0),
])
def test_scenario_parse_size(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text,word", [("-4K", "negative"), (-1, "negative"), ("4Q", "bad"), (True, "bad"),
                                       (1 << 64, "overflows"), ("1.5M", "bad")])
def test_scenario_parse_size_rejects(text: object, word: str) -> None:
    with pytest.raises(InputError, match=word):
        parse_size(text, "length")


def test_scenario_parse_addr() -> None:
    assert parse_addr("buf+8K") == Addr(8192, "buf", "buf+8K")
    assert parse_addr("buf - 4K").offset == -4096
    assert parse_addr("buf").name == "buf" and parse_addr("buf").offset == 0
    assert parse_addr("0x7f0000000000") == Addr(0x7F0000000000, None, "0x7f0000000000")
    assert parse_addr(4096).offset == 4096
    for b in (-4096, "-0x1000", "buf+", "1x2", 2.5):
        with pytest.raises(InputError):
            parse_addr(b)


# ------------------------------------------------------------------------------------------- locator

LOC_TEXT = '''\
title = "x"
[machine]
ram = "256M"
thp = { enabled = "always" }

[[machine.pmem]]
name = "pmem0"

[[op]]
op = "mmap"

[[op]]
op = "inspect"
length = "4K"   # a comment
expect = { ret = 1, pages = [
    { range = "0", kind = "anon" },
    { range = "1", kind = "zero" },
] }
[op.extra]
k = 'v'
'''


def test_scenario_locator_lines() -> None:
    loc = Locator(LOC_TEXT)
    assert loc.find(("title",)) == 1
    assert loc.find(("machine", "ram")) == 3
    assert loc.find(("machine", "thp", "enabled")) == 4
    assert loc.find(("machine", "pmem", 0)) == 6
    assert loc.find(("machine", "pmem", 0, "name")) == 7
    assert loc.find(("op", 0)) == 9
    assert loc.find(("op", 1, "length")) == 14
    assert loc.find(("op", 1, "expect", "ret")) == 15
    assert loc.find(("op", 1, "expect", "pages", 1, "kind")) == 17
    assert loc.find(("op", 1, "extra", "k")) == 20
    assert loc.find(("op", 1, "nothing")) == 12          # falls back to the op's header


# ------------------------------------------------------------------------------------------- errors

def test_scenario_malformed_toml_names_line_and_column() -> None:
    msg = bad('[machine]\nram = 1G\n')
    assert re.match(r"s\.toml:2:\d+: malformed TOML", msg)


def test_scenario_unknown_key_names_key_and_line() -> None:
    msg = bad('[machine]\nram = "256M"\n\n[[op]]\nop = "mmap"\nlenght = "4K"\n')
    assert msg.startswith("s.toml:6:") and "'lenght'" in msg and "length" in msg


def test_scenario_unknown_key_in_machine_and_thp() -> None:
    assert bad('[machine]\nrma = "1G"\n').startswith("s.toml:2:")
    assert "enabld" in bad('[machine]\nthp.enabld = "always"\n')
    assert bad('bogus = 1\n').startswith("s.toml:1:")


def test_scenario_unknown_key_in_expect_pages_row() -> None:
    msg = bad('[[op]]\nop = "mmap"\nlength = "4K"\nas = "b"\n[[op]]\nop = "inspect"\naddr = "b"\n'
              'expect = { pages = [\n  { range = "0", kind = "anon" },\n  { range = "0", knd = "anon" },\n] }\n')
    assert msg.startswith("s.toml:10:") and "'knd'" in msg


def test_scenario_unknown_op() -> None:
    msg = bad('[[op]]\nop = "mmapp"\n')
    assert msg.startswith("s.toml:2:") and "mmapp" in msg


def test_scenario_unaligned_address_is_bad_input_unless_an_errno_is_expected() -> None:
    base = '[[op]]\nop = "mmap"\nlength = "8K"\nas = "b"\n[[op]]\nop = "munmap"\naddr = "b+100"\nlength = "4K"\n'
    msg = bad(base)
    assert msg.startswith("s.toml:7:") and "not page aligned" in msg
    parse(base + 'expect.errno = "EINVAL"\n')       # a test of the kernel's answer is fine


def test_scenario_negative_size() -> None:
    assert "negative" in bad('[[op]]\nop = "mmap"\nlength = "-4K"\n')
    assert "negative" in bad('[[op]]\nop = "mmap"\nlength = -4096\n')


def test_scenario_range_outside_address_space() -> None:
    # 4-level paging: user space is [0, 2^47 - 4096) (mm-substrate.md §1.1 / TASK_SIZE_MAX)
    text = '[machine]\npaging = {p}\n[[op]]\nop = "touch"\naddr = 0x7ffffffff000\nlength = "8K"\n'
    assert "outside the user address space" in bad(text.format(p=4))
    parse(text.format(p=5))
    assert "overflows" in bad('[[op]]\nop = "touch"\naddr = 0x10000000000000000\nlength = "4K"\n')


def test_scenario_names_must_be_defined_earlier() -> None:
    assert "names no earlier result" in bad('[[op]]\nop = "touch"\naddr = "buf"\nlength = "4K"\n')
    msg = bad('[[op]]\nop = "mmap"\nlength = "4K"\nas = "b"\n[[op]]\nop = "inspect"\naddr = "b"\nas = "i"\n'
              '[[op]]\nop = "touch"\naddr = "i"\n')
    assert "inspection" in msg


def test_scenario_length_may_be_left_out_only_for_named_mappings() -> None:
    assert "missing key 'length'" in bad('[[op]]\nop = "touch"\naddr = 0x10000\n')


def test_scenario_processes_and_fork() -> None:
    scn = parse('[[process]]\nname = "a"\n[[op]]\nop = "fork"\nchild = "b"\n[[op]]\nop = "exit"\nproc = "b"\n')
    assert scn.processes == ["a"] and [o.proc for o in scn.ops] == ["a", "b"]
    assert "unknown process 'b'" in bad('[[process]]\nname = "a"\n[[op]]\nop = "exit"\nproc = "b"\n')
    assert "already exists" in bad('[[process]]\nname = "a"\n[[op]]\nop = "fork"\nchild = "a"\n')


def test_scenario_files_and_devices_are_checked() -> None:
    machine = ('[[machine.pmem]]\nname = "pmem1"\nsize = "2G"\nmode = "devdax"\n'
               '[[machine.fs]]\nmount = "/mnt/t"\ntype = "tmpfs"\n[[file]]\npath = "/mnt/t/f"\nsize = "1M"\n')
    parse(machine + '[[op]]\nop = "mmap"\nlength = "1G"\nfile = "/dev/dax1.0"\nflags = ["shared"]\n')
    assert "not a [[file]]" in bad(machine + '[[op]]\nop = "mmap"\nlength = "4K"\nfile = "/mnt/t/g"\n')
    assert "device-dax" in bad(machine + '[[op]]\nop = "mmap"\nlength = "4K"\nfile = "/dev/dax0.0"\n')
    assert "under no" in bad('[[file]]\npath = "/nowhere/f"\nsize = "4K"\n')
    assert "dax" in bad('[[machine.fs]]\nmount = "/m"\ntype = "ext4"\ndax = "pmem9"\n')


def test_scenario_values_are_checked() -> None:
    assert "prot" in bad('[[op]]\nop = "mmap"\nlength = "4K"\nprot = "rwz"\n')
    assert "mmap flag" in bad('[[op]]\nop = "mmap"\nlength = "4K"\nflags = ["privat"]\n')
    assert "align" in bad('[[op]]\nop = "mmap"\nlength = "4K"\nalign = "3K"\n')
    assert "errno" in bad('[[op]]\nop = "mmap"\nlength = "4K"\nexpect.errno = "EBOGUS"\n')
    assert "kernel" in bad('[machine]\nkernel = "4.19"\n')
    assert "page range" in bad('[[op]]\nop = "mmap"\nlength = "4K"\nas = "b"\n[[op]]\nop = "inspect"\n'
                               'addr = "b"\nexpect.pages = [ { range = "3-1" } ]\n')


def test_scenario_kernel_alias_and_raw_ops() -> None:
    scn = parse('[machine]\nkernel = "6.x"\n[[op]]\nop = "mmap"\nlength = "2M"\nas = "b"\n'
                '[[op]]\nop = "touch"\naddr = "b+4K"\n')
    assert scn.machine.kernel == "6.18"
    assert scn.raw_ops()[1] == {"op": "touch", "addr": "b+4K"}     # as written, for the live executor
    assert scn.ops[1].args["addr"] == Addr(4096, "b", "b+4K")


# ------------------------------------------------------------------------------------------- extension

def test_scenario_register_op_extends_the_format() -> None:
    seen = {}

    def handler(ctx, op):   # type: ignore[no-untyped-def]
        seen.update(ctx.args)
        return 7

    register_op("probe_op", handler, {"addr": "addr", "length": "size", "flag": "bool"}, ("addr",),
                range_op=True, expect_keys={})
    try:
        scn = parse('[[op]]\nop = "mmap"\nlength = "8K"\nas = "b"\n[[op]]\nop = "probe_op"\naddr = "b+4K"\n'
                    'flag = true\nexpect.ret = 7\n')
        r = run(scn)
        assert r.ok and r.records[1].ret == 7
        start = r.ctx.names["b"][0]
        assert seen == {"addr": start + 4096, "length": 4096, "flag": True}   # length runs to the mapping end
        assert "flag" in bad('[[op]]\nop = "probe_op"\naddr = 0x1000\nlength = 1\nflag = 3\n')
    finally:
        OPS.pop("probe_op", None)
    with pytest.raises(ValueError):
        register_op("probe_op2", handler, {"proc": "name"})
