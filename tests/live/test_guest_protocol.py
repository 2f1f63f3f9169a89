"""The guest's host-side pieces that need no guest: initramfs archives, scenario -> player script, player
output -> records (classified with the kernel's pagemap/kpageflags bit meanings), TAP results, the build's
config check, the CI package list, the guest random scenarios, and the player itself on this host kernel."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hmmirror.live.guest import build, initramfs
from hmmirror.live.guest import vm
from hmmirror.live.guest.jobs import parse_tap, selftest_names
from hmmirror.live.guest.protocol import parse_output, plan
from hmmirror.live.pagemap import KPF, PM_FILE, PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_SWAP, PageIs
from hmmirror.scenario import parse

ROOT = Path(__file__).resolve().parents[2]


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive (the format of the kernel's initramfs unpacker)."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_newc_archive_holds_files_dirs_links_and_device_nodes() -> None:
    c = initramfs.Cpio()
    c.file("/job/run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    c.symlink("/bin/sh", "busybox")
    c.chardev("/dev/console", 5, 1)
    raw = c.finish()
    assert len(raw) % 512 == 0
    entries = _read_newc(raw)
    assert entries["job"][0] == 0o040755
    assert entries["job/run.sh"] == (0o100755, b"#!/bin/sh\necho hi\n", (0, 0))
    assert entries["bin/sh"][0] == 0o120777 and entries["bin/sh"][1] == b"busybox"
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2] == (5, 1)
    job = _read_newc(gzip.decompress(initramfs.job_archive({"/job/run.sh": "x", "/job/script": "y"})))
    assert job["job/run.sh"][0] & 0o777 == 0o755 and job["job/script"][0] & 0o777 == 0o644


SCENARIO = """
machine.hugepages_2m = 2
machine.thp = { enabled = "always", shmem_enabled = "advise" }
machine.pmem = [{ name = "pmem0", size = "64M" }, { name = "pmem1", size = "64M", mode = "devdax" }]
machine.fs = [
  { mount = "/mnt/d", type = "ext4", dax = "pmem0" },
  { mount = "/mnt/t", type = "tmpfs", huge = "always" },
]
file = [{ path = "/mnt/d/f", size = "8M", content = "sparse" }, { path = "/mnt/t/g", size = "64K", cached = false }]
op = [
  { op = "mmap", as = "buf-a.1", length = "4M", align = "2M" },
  { op = "touch", addr = "buf-a.1+8K", length = "8K", access = "write", fill = "index32" },
  { op = "mmap", as = "d", file = "/dev/dax1.0", length = "2M", flags = ["shared"] },
  { op = "dmirror_open" },
  { op = "dmirror_snapshot", addr = "buf-a.1" },
  { op = "madvise", addr = "buf-a.1", length = "2M", advice = "dontneed" },
  { op = "fork", child = "c" },
  { op = "inspect", proc = "c", addr = "buf-a.1" },
]
"""


def test_plan_translates_machine_files_and_ops() -> None:
    p = plan(parse(SCENARIO, "t.toml"), "s0")
    assert p.skip is None and not p.unsupported and p.needs_devdax
    lines = p.lines
    assert lines[0] == "SCN s0" and lines[-1] == "END"
    thp = "/sys/kernel/mm/transparent_hugepage"
    assert f"SYS {thp}/enabled always" in lines and f"SYS {thp}/shmem_enabled advise" in lines
    assert f"SYS {thp}/use_zero_page 1" in lines and f"SYS {thp}/defrag madvise" in lines
    assert lines.index("MKFS ext4 /dev/pmem0") < lines.index("MOUNT ext4 /dev/pmem0 /mnt/d dax")
    assert "MOUNT tmpfs none /mnt/t huge=always" in lines and "HUGE 2048 2" in lines
    assert "FILE /mnt/d/f 8388608 sparse 1" in lines and "FILE /mnt/t/g 65536 data 0" in lines
    assert lines.index("MOUNTINFO") < lines.index("PROC p")
    ops = [ln for ln in lines if ln.startswith("OP ")]
    # mmap: MAP_PRIVATE|MAP_ANONYMOUS = 0x22, PROT_READ|PROT_WRITE = 3; names become player-safe tokens
    assert ops[0] == "OP 0 p mmap len=4194304 prot=3 flags=0x22 off=0 psize=4096 align=2097152 as=n0"
    assert ops[1] == "OP 1 p touch addr=n0+0x2000 len=8192 access=write fill=index32"
    # the model's /dev/dax1.0 (pmem1) is the guest's dax2.0; MAP_SHARED = 0x1
    assert ops[2] == "OP 2 p mmap len=2097152 prot=3 flags=0x1 off=0 psize=4096 path=/dev/dax2.0 as=n1"
    assert ops[3] == "OP 3 p dmirror_open dev=0 fd=dmirror0"
    assert ops[4] == "OP 4 p dmirror_snapshot addr=n0 fd=dmirror0"
    assert ops[5] == "OP 5 p madvise addr=n0 len=2097152 advice=4"      # MADV_DONTNEED = 4
    assert ops[6] == "OP 6 p fork child=c"
    assert ops[7] == "OP 7 c inspect addr=n0"


def test_plan_makes_xfs_on_its_own_pmem() -> None:
    p = plan(parse('[[machine.fs]]\nmount = "/mnt/x"\ntype = "xfs"\n[[op]]\nop = "mmap"\nlength = "4K"\n', "t.toml"))
    assert p.skip is None
    assert p.lines.index("MKFS xfs /dev/pmem3") < p.lines.index("MOUNT xfs /dev/pmem3 /mnt/x -")


@pytest.mark.parametrize("extra, why", [
    ('[[machine.fs]]\nmount = "/mnt/x"\ntype = "xfs"\n[[machine.fs]]\nmount = "/mnt/y"\ntype = "xfs"\n',
     "one xfs"),
    ('[[machine.pmem]]\nname = "pmem0"\nsize = "64M"\nmode = "devdax"\nalign = "4K"\n', "2M or 1G alignment"),
    ('[[machine.pmem]]\nname = "pmem0"\nsize = "2G"\nmode = "devdax"\nalign = "1G"\n', "larger than the guest's 1024 MiB"),
])
def test_plan_skips_what_the_guest_lacks(extra: str, why: str) -> None:
    p = plan(parse(extra + '[[op]]\nop = "mmap"\nlength = "4K"\n', "t.toml"))
    assert p.skip and why in p.skip


def test_plan_marks_model_only_ops_unsupported() -> None:
    text = ('[[op]]\nop = "mmap"\nas = "b"\nlength = "8K"\n[[op]]\nop = "dmirror_open"\n'
            '[[op]]\nop = "dmirror_pt"\naddr = "b"\n[[op]]\nop = "mmap"\nlength = "4K"\nfile = "pfnmap"\n')
    p = plan(parse(text, "t.toml"))
    assert set(p.unsupported) == {2, 3}
    assert not any(" dmirror_pt " in ln or "pfnmap" in ln for ln in p.lines)


def test_parse_output_classifies_with_the_kernels_bit_meanings() -> None:
    pfn = 0x12345
    thp = PM_PRESENT | PM_MMAP_EXCLUSIVE | pfn                       # present, mapped once
    kpf_thp = (1 << KPF.KPF_ANON) | (1 << KPF.KPF_THP) | (1 << KPF.KPF_COMPOUND_HEAD)
    cats = int(PageIs.PAGE_IS_HUGE | PageIs.PAGE_IS_PRESENT)
    shmem = PM_PRESENT | PM_FILE | (pfn + 600)
    kpf_shmem = 1 << KPF.KPF_SWAPBACKED
    devpriv = PM_SWAP | (27 | (0x777 << 5))                            # SWP_DEVICE_WRITE in the guest config
    devexcl = PM_SWAP | (29 | (0x2f57 << 5))                           # SWP_DEVICE_EXCLUSIVE_WRITE
    out = "\n".join([
        "S s0",
        "MI 22 1 0:5 / / rw - rootfs rootfs rw",
        "R 0 1 140000000000 - - addr=0x7f5000000000",
        "I 1 0x7f5000000000 6",
        "V 7f5000000000-7f5000400000 rw-p 00000000 00:00 0 ",
        "VK 4  rd wr mr mw me ac hg ",
        f"P {thp:x} {kpf_thp:x} {cats:x}",
        f"P {shmem:x} {kpf_shmem:x} 0",
        "Z 2",
        f"P {devpriv:x} 0 {int(PageIs.PAGE_IS_SWAPPED):x}",
        f"P {devexcl:x} 0 {int(PageIs.PAGE_IS_SWAPPED):x}",
        "R 1 1 0 - -",
        "R 2 0 3 EFAULT SIGSEGV",
        "R 3 1 0 - - cpages=3 faults=1 snapshot=0602ff00",
        "E s0",
    ]) + "\n"
    res = parse_output(out)["s0"]
    assert res.complete and not res.errors
    r0, r1, r2, r3 = res.records
    assert r0.ok and r0.ret == 140000000000
    pages = r1.pages
    assert pages is not None and len(pages) == 6
    a, s, n1, n2, d, x = pages
    assert (a.present, a.kind, a.level, a.huge, a.exclusive, a.file, a.pfn) == (True, "anon", "pmd", True, True,
                                                                                  False, pfn)
    assert (s.kind, s.level, s.file, s.exclusive) == ("shmem", "pte", True, False)
    assert (n1.present, n1.kind, n2.kind) == (False, "none", "none")
    assert (d.present, d.swapped, d.kind) == (False, True, "device_private")
    assert (x.present, x.swapped, x.kind) == (False, True, "device_exclusive")
    assert (r2.ok, r2.errno, r2.signal, r2.ret) == (False, "EFAULT", "SIGSEGV", 3)
    assert r3.extra == {"cpages": 3, "faults": 1, "snapshot": [0x06, 0x02, 0xFF, 0x00]}


def test_parse_tap_reads_the_harness_lines() -> None:
    text = """TAP version 13
1..3
# Starting 3 tests from 2 test cases.
#  RUN           hmm.hmm_device_private.open_close ...
#            OK  hmm.hmm_device_private.open_close
ok 1 hmm.hmm_device_private.open_close
#      SKIP      DEVICE_COHERENT not available
ok 2 hmm.hmm_device_coherent.open_close # SKIP DEVICE_COHERENT not available
not ok 3 hmm2.hmm2_device_private.migrate_mixed
# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
"""
    res = parse_tap(text)
    assert [(r.number, r.fixture, r.variant, r.test, r.status) for r in res] == [
        (1, "hmm", "hmm_device_private", "open_close", "pass"),
        (2, "hmm", "hmm_device_coherent", "open_close", "skip"),
        (3, "hmm2", "hmm2_device_private", "migrate_mixed", "fail")]
    assert res[1].reason == "DEVICE_COHERENT not available"


def test_plan_puts_a_1g_device_dax_on_pmem4() -> None:
    scn = parse('[[machine.pmem]]\nname = "pmem0"\nsize = "1G"\nmode = "devdax"\nalign = "1G"\n'
                '[[op]]\nop = "mmap"\nfile = "/dev/dax0.0"\nlength = "1G"\nflags = ["shared"]\nalign = "1G"\n', "t.toml")
    p = plan(scn)
    assert p.skip is None and p.needs_devdax_1g and not p.needs_devdax
    (line,) = [ln for ln in p.lines if ln.startswith("OP 0 ")]
    assert "path=/dev/dax4.0" in line and f"align={1 << 30}" in line
    assert any(dev == "/dev/pmem4" and start == "5G" for dev, _size, start in vm.PMEM)


def test_selftest_names_as_the_harness_prints_them() -> None:
    """kselftest_harness.h names a variant's test ``fixture.variant.test`` (``__run_test``: "%s%s%s.%s")."""
    src = """FIXTURE(hmm) { int fd; };
FIXTURE_VARIANT(hmm) { int device_number; };
FIXTURE_VARIANT_ADD(hmm, hmm_device_private) { .device_number = 0, };
FIXTURE_VARIANT_ADD(hmm, hmm_device_coherent) { .device_number = 2, };
FIXTURE(hmm2) { int fd0; };
FIXTURE_VARIANT_ADD(hmm2, hmm2_device_private) { };
TEST_F(hmm, open_close) { }
TEST_F(hmm2, snapshot) { }
TEST_F(hmm, anon_read) { }
TEST(plain) { }
"""
    assert selftest_names(src) == [
        "hmm.hmm_device_private.open_close", "hmm.hmm_device_private.anon_read",
        "hmm.hmm_device_coherent.open_close", "hmm.hmm_device_coherent.anon_read",
        "hmm2.hmm2_device_private.snapshot"]


def test_qemu_command_gives_test_hmm_its_device_coherent_memory(tmp_path: Path) -> None:
    """The SPM chunks are reserved (``$``), apart from the pmem ranges and RAM below 3 GiB, and at least
    test_hmm's DEVMEM_CHUNK_SIZE (256 MiB) each."""
    art = build.Artifacts(tmp_path, tmp_path, "x", tmp_path)
    append = vm.qemu_command(art, tmp_path / "i", tmp_path / "d")[-1]
    (a0, s0), (a1, s1) = vm.SPM
    assert f"memmap={s0}${a0:#x}" in append and f"memmap={s1}${a1:#x}" in append
    assert f"test_hmm.spm_addr_dev0={a0:#x}" in append and f"test_hmm.spm_addr_dev1={a1:#x}" in append
    assert min(a0, a1) >= 4 << 30 and abs(a1 - a0) >= 256 << 20 and s0 == s1 == "256M"


def test_config_check_names_options_the_kernel_did_not_take() -> None:
    config = "CONFIG_TEST_HMM=y\n# CONFIG_DEVICE_PRIVATE is not set\nCONFIG_PCI=y\n"
    frag = "CONFIG_TEST_HMM=y\nCONFIG_DEVICE_PRIVATE=y\nCONFIG_MODULES=n\nCONFIG_PCI=y\n"
    assert build._config_problems(config, frag) == ["CONFIG_DEVICE_PRIVATE=y (got n)"]


def test_fragment_has_what_the_guest_needs() -> None:
    frag = build.fragment_text()
    for opt in ("CONFIG_TEST_HMM=y", "CONFIG_DEVICE_PRIVATE=y", "CONFIG_ZONE_DEVICE=y", "CONFIG_PCI=y",
                "CONFIG_X86_PMEM_LEGACY=y", "CONFIG_FS_DAX=y", "CONFIG_DEV_DAX_PMEM=y", "CONFIG_VIRTIO_BLK=y",
                "CONFIG_PROC_PAGE_MONITOR=y", "CONFIG_HUGETLBFS=y", "CONFIG_TRANSPARENT_HUGEPAGE=y"):
        assert re.search(rf"^{opt}$", frag, re.M), opt


def test_ci_installs_every_package_the_guest_needs() -> None:
    ci = (ROOT / ".ci/run").read_text()
    for pkg in build.APT_PACKAGES:
        assert re.search(rf"[\s\"]{re.escape(pkg)}[\s\"]", ci), pkg


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "hmmirror" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / ".cache" / "hmmirror" / "guest"


def test_cache_key_changes_with_fragment_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    a = build.artifacts_for("6.12.1-1")
    assert build.artifacts_for("6.12.1-1") == a
    assert build.artifacts_for("6.12.2-1").kernel_dir != a.kernel_dir
    monkeypatch.setattr(build, "fragment_text", lambda: "CONFIG_TEST_HMM=y\n")
    b = build.artifacts_for("6.12.1-1")
    assert b.kernel_dir != a.kernel_dir and b.helpers_dir == a.helpers_dir


def test_guest_random_scenarios_are_deterministic_and_run_on_the_model() -> None:
    from hmmirror.live.randscen import random_scenario
    from hmmirror.scenario import run

    texts = [random_scenario(7, i, guest=True) for i in range(20)]
    assert texts == [random_scenario(7, i, guest=True) for i in range(20)]
    assert texts[0] != random_scenario(7, 0)
    joined = "\n".join(texts)
    # what only the guest can run: device commands, fs-DAX and device-dax mappings
    assert "dmirror_snapshot" in joined and "/mnt/d/" in joined and "/dev/dax1.0" in joined
    for i, t in enumerate(texts[:8]):
        r = run(parse(t, f"g{i}.toml"))
        assert all(rec.bug is None and not rec.unsupported for rec in r.records), t


def _uapi_tree() -> Path | None:
    for cand in sorted(build.cache_dir().glob("src-*/linux-source-6.12")):
        if (cand / "lib/test_hmm_uapi.h").exists():
            return cand
    return None


@pytest.mark.live
def test_player_runs_on_this_host_kernel(tmp_path: Path) -> None:
    """The player's protocol end to end on the host kernel (no test_hmm here: dmirror_open is ENOENT)."""
    tree = _uapi_tree()
    if tree is None or shutil.which("gcc") is None:
        pytest.skip("needs gcc and the guest's kernel tree (run `hmmirror guest build` once)")
    if os.geteuid() != 0:
        pytest.skip("needs root (pfns and /proc/kpageflags)")
    exe = tmp_path / "player"
    src = tmp_path / "player.c"
    src.write_text(build.player_source())
    subprocess.run(["gcc", "-O1", "-I", str(tree), "-o", str(exe), str(src)], check=True, capture_output=True)
    scn = parse(f"""
[[machine.fs]]
mount = "{tmp_path}/t"
type = "tmpfs"
[[file]]
path = "{tmp_path}/t/f"
size = "16K"
[[op]]
op = "mmap"
as = "a"
length = "16K"
[[op]]
op = "touch"
addr = "a"
length = "8K"
access = "write"
[[op]]
op = "fork"
child = "c"
[[op]]
op = "inspect"
addr = "a"
[[op]]
op = "touch"
proc = "c"
addr = "a"
length = "4K"
access = "write"
[[op]]
op = "inspect"
addr = "a"
[[op]]
op = "mmap"
as = "f"
file = "{tmp_path}/t/f"
length = "32K"
flags = ["shared"]
[[op]]
op = "check"
addr = "f"
length = "16K"
fill = "index32"
[[op]]
op = "touch"
addr = "f+16K"
length = "4K"
[[op]]
op = "dmirror_open"
""", "host.toml")
    p = plan(scn, "h")
    script = tmp_path / "script"
    script.write_text("\n".join(ln for ln in p.lines if not ln.startswith(("SYS", "MKFS"))) + "\n")
    out = tmp_path / "out"
    try:
        subprocess.run([str(exe), str(script), str(out)], check=True, timeout=60, capture_output=True)
    finally:
        subprocess.run(["umount", "-l", f"{tmp_path}/t"], capture_output=True)
    res = parse_output(out.read_text(), {"h": p})["h"]
    assert res.complete and not res.errors
    mm, touch, fork, shared, touch_c, after, mf, check, beyond, dmo = res.records
    assert mm.ok and touch.ret == 2 and fork.ok
    # after fork both written pages are mapped by parent and child: present, anon, not exclusive
    assert [(s.present, s.kind, s.exclusive) for s in shared.pages] == [(True, "anon", False)] * 2 + \
        [(False, "none", False)] * 2
    # the child's write copied page 0: the parent's page 0 is mapped once again (exclusive)
    assert after.pages[0].exclusive is True and after.pages[1].exclusive is False
    assert check.ok and check.ret == 0                       # the file holds the index pattern
    assert (beyond.errno, beyond.signal) == ("EFAULT", "SIGBUS")   # beyond EOF of the 16K file
    assert (dmo.ok, dmo.errno) == (False, "ENOENT")


def test_missing_packages_are_named_with_the_command_that_installs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "BUILD_CHECKS", [("flex", lambda: False, "flex"), ("gcc", lambda: True, "gcc")])
    monkeypatch.setattr(build, "RUN_CHECKS", [("qemu-system-x86_64", lambda: False, "qemu-system-x86")])
    monkeypatch.setattr(build.os, "geteuid", lambda: 1000)
    with pytest.raises(build.Missing) as exc:
        build.check_prerequisites(install=True)
    (msg,) = exc.value.items
    assert "missing flex, qemu-system-x86_64" in msg
    assert "as root: apt-get install flex qemu-system-x86" in msg
    with pytest.raises(build.Missing) as exc2:
        build.check_prerequisites(install=True, need_build=False)
    assert "flex" not in exc2.value.items[0]


def test_guest_build_without_prerequisites_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from hmmirror.cli.main import main

    monkeypatch.setattr(build, "cached", lambda: None)

    def missing(**_kw: object) -> None:
        raise build.Missing(["missing flex; install as root: apt-get install flex"])

    monkeypatch.setattr(build, "check_prerequisites", missing)
    with pytest.raises(SystemExit) as exc:
        main(["guest", "build", "--json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install flex" in err[0]


def test_not_enough_disk_is_a_missing_prerequisite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 << 30, 9 << 30, 1 << 30))
    with pytest.raises(build.Missing, match="not enough disk space"):
        build._check_disk(tmp_path, build.DISK_FIRST)
