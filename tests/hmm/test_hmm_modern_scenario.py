"""dmirror from scenario files, ``hmmirror run --json``, the demo story through the device, and one scenario
run under both profiles (documented differences only).

Expected values: hmm-modern.md §4.6/§4.7/§6.4 for 6.18; hmm-5.2.md §9 and §13 for 5.2.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from hmmirror.scenario import parse, run

SCENARIO = """
title = "dmirror through a scenario"
[machine]
kernel = "6.x"
ram = "256M"
[[process]]
name = "p"
[[op]]
op = "mmap"
as = "buf"
length = "32K"
prot = "rw"
[[op]]
op = "touch"
addr = "buf"
length = "8K"
access = "write"
fill = "index32"
[[op]]
op = "touch"
addr = "buf+8K"
length = "4K"
[[op]]
op = "munmap"
addr = "buf+28K"
length = "4K"
[[op]]
op = "dmirror_open"
[[op]]
op = "dmirror_snapshot"
addr = "buf"
length = "32K"
expect = { snapshot = "02 02 11 00 00 00 00 ff", cpages = 8 }
[[op]]
op = "dmirror_read"
addr = "buf"
length = "16K"
fill = "index32"
expect = { cpages = 4, faults = 1, bad_pages = 2 }
[[op]]
op = "dmirror_pt"
addr = "buf"
length = "28K"
expect = { ret = 4, pt = "wwrr---" }
[[op]]
op = "dmirror_write"
addr = "buf+16K"
length = "8K"
fill = 7
expect = { cpages = 2, faults = 1 }
[[op]]
op = "check"
addr = "buf+16K"
length = "8K"
fill = 7
expect = { ret = 0 }
[[op]]
op = "dmirror_read"
addr = "buf+24K"
length = "8K"
expect = { errno = "EFAULT" }
[[op]]
op = "dmirror_snapshot"
addr = "buf+1"
length = "4K"
expect = { errno = "EINVAL" }
[[op]]
op = "munmap"
addr = "buf"
length = "4K"
[[op]]
op = "dmirror_pt"
addr = "buf"
length = "28K"
expect = { ret = 4, pt = "--rrww-" }
[[op]]
op = "dmirror_close"
"""


def test_dmirror_scenario_ops():
    r = run(parse(SCENARIO, "dmirror.toml"))
    bad = [(x.index, x.op, x.mismatches, x.note) for x in r.records if x.expect_ok is False or x.bug]
    assert not bad
    assert r.ok
    # §6.1: the munmap of [buf, buf+4K) also drops page 1 (the inclusive upper bound of the invalidation)
    assert r.records[13].extra["pt"] == "--rrww-"


def test_run_json_prints_the_snapshot(tmp_path):
    from hmmirror.cli.main import cli

    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    res = CliRunner().invoke(cli, ["run", str(f), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    snaps = [rec["snapshot"] for rec in doc["records"] if rec["op"] == "dmirror_snapshot" and rec["ok"]]
    assert snaps == [[0x02, 0x02, 0x11, 0x00, 0x00, 0x00, 0x00, 0xFF]]


def test_demo_story_through_dmirror():
    from hmmirror.scenario.dmirror_ops import dmirror_demo_story

    d = dmirror_demo_story("6.x")
    json.dumps(d)
    assert d["kernel"] == "6.18" and d["ok"]
    maps = d["mappings"]
    # the demo touches: fsdax PTEs read (64) and written (64); fsdax PMDs read / written; one device-dax PUD
    assert maps["fsdax_pte"]["snapshot_before"][:128] == [0x01] * 64 + [0x02] * 64
    assert set(maps["fsdax_pmd"]["snapshot_before"][:512]) == {0x05}
    assert set(maps["fsdax_pmd"]["snapshot_before"][512:]) == {0x06}
    assert set(maps["devdax_pud"]["snapshot"]) == {0x0A}
    for name in maps:                                    # §6.3: one fault round for a fresh mirror
        assert maps[name]["read"] == {"ret": 0, "cpages": 16, "faults": 1}
        assert maps[name]["pt"] == 16


def test_demo_story_under_5_2_has_no_device():
    from hmmirror.scenario.dmirror_ops import dmirror_demo_story

    d = dmirror_demo_story("5.2")
    assert d["device"]["errno"] == "ENOENT" and d["mappings"] == {}


CROSS = """
title = "one mirroring scenario under both profiles"
[machine]
ram = "256M"
[[process]]
name = "p"
[[op]]
op = "mmap"
as = "a"
length = "16K"
prot = "rw"
[[op]]
op = "touch"
addr = "a"
length = "4K"
access = "write"
[[op]]
op = "touch"
addr = "a+4K"
length = "4K"
[[op]]
op = "mmap"
as = "n"
length = "4K"
prot = "none"
[[op]]
op = "mirror_range"
comment = "an anonymous page written by the CPU"
addr = "a"
length = "4K"
[[op]]
op = "mirror_range"
comment = "the shared zero page"
addr = "a+4K"
length = "4K"
[[op]]
op = "mirror_range"
comment = "pte_none (the PTE table exists)"
addr = "a+8K"
length = "4K"
[[op]]
op = "mirror_range"
comment = "a PROT_NONE VMA"
addr = "n"
[[op]]
op = "mirror_range"
comment = "the zero page, read fault requested"
addr = "a+4K"
length = "4K"
access = "read"
[[op]]
op = "mirror_range"
comment = "a write fault on the zero page"
addr = "a+4K"
length = "4K"
access = "write"
[[op]]
op = "dmirror_open"
"""


def _summary(kernel: str) -> list[tuple]:
    r = run(parse(CROSS, "cross.toml"), kernel)
    return [(x.op, x.errno, x.ret, tuple(x.extra.get("entries", ()))) for x in r.records]


def test_same_scenario_under_both_profiles():
    old, new = _summary("5.2"), _summary("6.18")
    anon = new[4][3][0]                                  # "VW@<pfn>", identical pfn in both models
    assert anon.startswith("VW@") and old[4][3] == (anon,)
    zero = new[5][3][0]
    # 6.18 (hmm-modern.md §4.6/§4.7): 0 for every call; zero page = a normal read-only page; no VM_READ = ERROR
    assert new[4:] == [
        ("mirror_range", None, 0, (anon,)),
        ("mirror_range", None, 0, (zero,)),
        ("mirror_range", None, 0, ("NONE",)),
        ("mirror_range", None, 0, ("ERROR",)),
        ("mirror_range", None, 0, (zero,)),
        ("mirror_range", None, 0, (new[9][3][0],)),
        ("dmirror_open", None, 0, ()),
    ]
    assert zero.startswith("V@") and new[9][3][0].startswith("VW@") and new[9][3][0] not in (anon, zero)
    # 5.2 (hmm-5.2.md §9, §13): a page count; the zero page is SPECIAL (snapshot: walk error unused, count 0;
    # fault: -EFAULT and NONE from `last`); no VM_READ: -EPERM, all NONE; no dmirror device (no test_hmm).
    assert old[4:9] == [
        ("mirror_range", None, 1, (anon,)),
        ("mirror_range", None, 0, ("SPECIAL",)),
        ("mirror_range", None, 1, ("NONE",)),
        ("mirror_range", "EPERM", -1, ("NONE",)),
        ("mirror_range", "EFAULT", -14, ("NONE",)),
    ]
    assert old[10][0:2] == ("dmirror_open", "ENOENT")
    # Everything else is identical: the CPU side (mmap, touch) and the untouched-PTE entry.
    same = [i for i in range(len(old)) if old[i] == new[i]]
    assert same == [0, 1, 2, 3]
    assert [old[i][3] for i in (4, 6)] == [new[i][3] for i in (4, 6)]
