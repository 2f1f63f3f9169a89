"""Random scenarios for the differential runner, restricted to what real Linux can run here.

Each scenario is generated as TOML text (so it can be saved, read, and re-run with ``hmmirror run`` or
``hmmirror crosscheck``) from one seeded stream (numpy's PCG64): the same ``(seed, index)`` always gives
the same file, byte for byte.  The mix covers anonymous private and shared memory, tmpfs, ext4 and xfs
files (shared and private; small ones, and 4 MiB ones whose page cache holds PMD-sized folios), THP through
MADV_HUGEPAGE, hugetlbfs 2 MiB pages, mprotect, munmap, madvise (DONTNEED, POPULATE_READ/WRITE, PAGEOUT,
COLLAPSE), truncate of a mapped file, and fork, with an ``inspect`` of every live mapping after each
operation.

``guest=True`` draws for the test guest (:mod:`hmmirror.live.guest`) from a stream of its own: the same mix
plus fsdax files (ext4 ``-o dax`` on pmem, PTE- and PMD-sized), device-dax mappings (2 MiB alignment), and
device operations through ``/dev/hmm_dmirror0`` (READ, WRITE, and the device-memory commands the model
knows); after every operation the guest scenarios take a dmirror SNAPSHOT of every live mapping besides
the inspect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KIB = 1024
MIB = 1024 * KIB


@dataclass
class _Mapping:
    name: str
    length: int
    prot: str
    kind: str
    proc: str
    alive: bool = True
    path: str | None = None


@dataclass
class _Gen:
    rng: np.random.Generator
    ops: list[str] = field(default_factory=list)
    maps: list[_Mapping] = field(default_factory=list)
    procs: list[str] = field(default_factory=lambda: ["p"])
    uses: set[str] = field(default_factory=set)
    guest: bool = False
    dmirror: set[str] = field(default_factory=set)      # processes with /dev/hmm_dmirror0 open

    def pick(self, seq: list[str] | tuple[str, ...]) -> str:
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def op(self, text: str) -> None:
        self.ops.append(text)


BASE_MAP_KINDS = ("anon", "anon", "anon_thp", "shared_anon", "tmpfs", "ext4", "ext4_private", "hugetlb")
#: The host stream also draws xfs, 4 MiB files of PMD-sized folios and 2 MiB shmem blocks.
MAP_KINDS = BASE_MAP_KINDS + ("xfs", "xfs_private", "big_file", "shmem_thp")
HOST_OP_KINDS = ("pageout", "collapse", "truncate")
FS_OF = {"tmpfs": "/mnt/t", "ext4": "/mnt/e", "xfs": "/mnt/x"}


#: Guest-only mapping kinds (drawn besides MAP_KINDS when ``guest``).
GUEST_MAP_KINDS = MAP_KINDS + ("fsdax", "fsdax", "fsdax_pmd", "devdax")
#: Device commands the guest generator draws when the model registers them (new ports join by name).
GUEST_DEVICE_OPS = ("dmirror_read", "dmirror_write", "dmirror_migrate_to_dev", "dmirror_migrate_to_sys",
                    "dmirror_exclusive")


def _mmap(g: _Gen, i: int) -> None:
    kind = g.pick(GUEST_MAP_KINDS if g.guest else MAP_KINDS)
    name = f"m{i}"
    if kind in ("fsdax", "fsdax_pmd", "devdax"):
        _mmap_dax(g, name, kind, i)
        return
    if kind == "anon_thp":
        length = 4 * MIB
        g.op(f'op = "mmap"\nas = "{name}"\nlength = "4M"\nprot = "rw"\nflags = ["private", "anonymous"]\n'
             f'align = "2M"')
        g.op(f'op = "madvise"\naddr = "{name}"\nlength = "4M"\nadvice = "hugepage"')
        prot = "rw"
    elif kind == "hugetlb":
        g.uses.add("hugetlb")
        length = 2 * MIB
        g.op(f'op = "mmap"\nas = "{name}"\nlength = "2M"\nprot = "rw"\n'
             f'flags = ["private", "anonymous", "hugetlb"]')
        prot = "rw"
    elif kind == "big_file":                        # two PMD-sized page-cache folios (ext4 or xfs)
        fs = FS_OF[g.pick(("ext4", "xfs"))]
        g.uses.add("ext4" if fs == "/mnt/e" else "xfs")
        length, prot = 4 * MIB, g.pick(("r", "rw"))
        share = g.pick(("shared", "private"))
        path = f"{fs}/f{i}"
        g.op(f'op = "mmap"\nas = "{name}"\nlength = "4M"\nprot = "{prot}"\nflags = ["{share}"]\n'
             f'file = "{path}"\nalign = "2M"')
        g.uses.add(f"file:{path}:{length}")
        g.maps.append(_Mapping(name, length, prot, kind, "p", path=path))
        return
    elif kind == "shmem_thp":                       # a 2 MiB shmem block (MADV_COLLAPSE makes it a THP)
        length, prot = 2 * MIB, "rw"
        if g.chance(0.5):
            g.op(f'op = "mmap"\nas = "{name}"\nlength = "2M"\nprot = "rw"\nflags = ["shared", "anonymous"]\n'
                 f'align = "2M"')
            path = None
        else:
            g.uses.add("tmpfs")
            path = f"/mnt/t/f{i}"
            g.op(f'op = "mmap"\nas = "{name}"\nlength = "2M"\nprot = "rw"\nflags = ["shared"]\n'
                 f'file = "{path}"\nalign = "2M"')
            g.uses.add(f"file:{path}:{length}")
        g.maps.append(_Mapping(name, length, prot, kind, "p", path=path))
        return
    else:
        pages = int(g.rng.integers(8, 48))
        length = pages * 4 * KIB
        prot = g.pick(("rw", "rw", "r"))
        if kind in ("anon", "shared_anon"):
            share = "shared" if kind == "shared_anon" else "private"
            g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "{prot}"\n'
                 f'flags = ["{share}", "anonymous"]')
        else:
            fstype = kind.split("_")[0]
            fs = FS_OF[fstype]
            g.uses.add(fstype)
            share = "private" if kind.endswith("_private") else "shared"
            g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "{prot}"\nflags = ["{share}"]\n'
                 f'file = "{fs}/f{i}"')
            g.uses.add(f"file:{fs}/f{i}:{length}")
            g.maps.append(_Mapping(name, length, prot, kind, "p", path=f"{fs}/f{i}"))
            return
    g.maps.append(_Mapping(name, length, prot, kind, "p"))


def _mmap_dax(g: _Gen, name: str, kind: str, i: int) -> None:
    """fsdax: a file on ext4 -o dax, small (PTE faults) or 4 MiB 2 MiB-aligned (PMD faults); devdax: 2-4 MiB
    of /dev/dax1.0 (2 MiB alignment)."""
    if kind == "devdax":
        g.uses.add("devdax")
        length = int(g.rng.integers(1, 3)) * 2 * MIB
        g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "rw"\nflags = ["shared"]\n'
             f'file = "/dev/dax1.0"')
        g.maps.append(_Mapping(name, length, "rw", kind, "p"))
        return
    g.uses.add("fsdax")
    share = g.pick(("shared", "shared", "private"))
    if kind == "fsdax_pmd":
        length = 4 * MIB
        g.op(f'op = "mmap"\nas = "{name}"\nlength = "4M"\nprot = "rw"\nflags = ["{share}"]\n'
             f'file = "/mnt/d/f{i}"\nalign = "2M"')
    else:
        length = int(g.rng.integers(8, 48)) * 4 * KIB
        g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "rw"\nflags = ["{share}"]\n'
             f'file = "/mnt/d/f{i}"')
    g.uses.add(f"file:/mnt/d/f{i}:{length}")
    g.maps.append(_Mapping(name, length, "rw", kind, "p"))


def _device_op(g: _Gen, m: _Mapping, proc: str, where: str) -> None:
    """One dmirror command on a range of ``m`` (opening the device in ``proc`` first when needed)."""
    from hmmirror.scenario.schema import OPS
    from hmmirror.scenario.runner import load_extensions

    load_extensions()
    known = [op for op in GUEST_DEVICE_OPS if op in OPS]
    op = g.pick(tuple(known))
    if proc not in g.dmirror:
        g.op(f'op = "dmirror_open"\nproc = "{proc}"')
        g.dmirror.add(proc)
    g.op(f'op = "{op}"\n{where}')


def _snapshot_all(g: _Gen) -> None:
    for m in g.maps:
        if m.alive and m.proc in g.dmirror:
            g.op(f'op = "dmirror_snapshot"\nproc = "{m.proc}"\naddr = "{m.name}"\nlength = {m.length}')


def _range(g: _Gen, m: _Mapping) -> tuple[int, int]:
    pages = m.length // (4 * KIB)
    start = int(g.rng.integers(pages))
    n = int(g.rng.integers(1, pages - start + 1))
    if m.kind == "hugetlb":
        return 0, pages
    return start, n


def _inspect_all(g: _Gen) -> None:
    for m in g.maps:
        if m.alive:
            g.op(f'op = "inspect"\nproc = "{m.proc}"\naddr = "{m.name}"\nlength = {m.length}')


def _one_op(g: _Gen) -> None:
    live = [m for m in g.maps if m.alive]
    if not live:
        return
    m = live[int(g.rng.integers(len(live)))]
    proc = g.pick(tuple(g.procs))
    start, n = _range(g, m)
    where = f'proc = "{proc}"\naddr = "{m.name}+{start * 4}K"\nlength = "{n * 4}K"'
    kinds = ("touch_r", "touch_w", "touch_w", "dontneed", "populate", "mprotect", "munmap", "fork")
    # both streams add pageout, collapse and truncate; the guest's adds device commands
    kind = g.pick(kinds + HOST_OP_KINDS + ("device", "device", "device") if g.guest else kinds + HOST_OP_KINDS)
    if kind == "device":
        _device_op(g, m, proc, where)
    elif kind == "touch_r":
        g.op(f'op = "touch"\n{where}\naccess = "read"')
    elif kind == "touch_w":
        g.op(f'op = "touch"\n{where}\naccess = "write"')
    elif kind == "dontneed" and m.kind != "hugetlb":
        g.op(f'op = "madvise"\n{where}\nadvice = "dontneed"')
    elif kind == "populate":
        g.op(f'op = "madvise"\n{where}\nadvice = "{g.pick(("populate_read", "populate_write"))}"')
    elif kind == "mprotect" and m.kind != "hugetlb":
        g.op(f'op = "mprotect"\n{where}\nprot = "{g.pick(("r", "rw", "none", "rw"))}"')
    elif kind == "munmap" and g.chance(0.3) and m.kind not in ("hugetlb",):
        g.op(f'op = "munmap"\nproc = "{proc}"\naddr = "{m.name}"\nlength = {m.length}')
        if proc == "p":
            m.alive = False
    elif kind == "fork" and len(g.procs) == 1:
        g.op('op = "fork"\nproc = "p"\nchild = "c"')
        g.procs.append("c")
        for mm in list(g.maps):
            if mm.alive and mm.proc == "p":
                g.maps.append(_Mapping(mm.name, mm.length, mm.prot, mm.kind, "c", path=mm.path))
    elif kind == "pageout" and m.kind != "hugetlb":
        g.op(f'op = "madvise"\n{where}\nadvice = "pageout"')
    elif kind == "collapse" and m.kind in ("anon_thp", "shmem_thp", "big_file"):
        g.op(f'op = "madvise"\nproc = "{proc}"\naddr = "{m.name}"\nlength = {m.length}\nadvice = "collapse"')
    elif kind == "truncate" and m.path is not None and g.chance(0.5):
        size = int(g.rng.integers(1, m.length // (4 * KIB))) * 4 * KIB
        if g.chance(0.3):
            size += int(g.rng.integers(1, 4 * KIB))
        g.op(f'op = "truncate"\nproc = "{proc}"\nfile = "{m.path}"\nsize = {size}')
    else:
        g.op(f'op = "touch"\n{where}\naccess = "read"')


#: Stream tag of the guest generator (its scenarios never coincide with the host's for one seed).
GUEST_STREAM = 0x6E57


def random_scenario(seed: int, index: int, max_ops: int = 8, guest: bool = False) -> str:
    """The TOML text of random scenario ``index`` of stream ``seed`` (``guest``: the guest's mix)."""
    key = [seed, index] if not guest else [seed, index, GUEST_STREAM]
    g = _Gen(np.random.default_rng(key), guest=guest)
    for i in range(1 + int(g.rng.integers(2))):
        _mmap(g, i)
    for _ in range(2 + int(g.rng.integers(max_ops - 1))):
        _one_op(g)
        _inspect_all(g)
        if guest:
            _snapshot_all(g)
    head = [f'title = "random {"guest " if guest else ""}scenario {index} of seed {seed}"', "", "[machine]",
            'kernel = "6.18"', 'ram = "1G"']
    if "hugetlb" in g.uses:
        head.append("hugepages_2m = 2")
    body = []
    if "fsdax" in g.uses:
        body += ["", "[[machine.pmem]]", 'name = "pmem0"', 'size = "64M"', 'mode = "fsdax"']
    if "devdax" in g.uses:
        body += ["", "[[machine.pmem]]", 'name = "pmem1"', 'size = "64M"', 'mode = "devdax"', 'align = "2M"']
    for fs, typ in (("/mnt/t", "tmpfs"), ("/mnt/e", "ext4"), ("/mnt/x", "xfs")):
        if typ in g.uses:
            body += ["", "[[machine.fs]]", f'mount = "{fs}"', f'type = "{typ}"']
    if "fsdax" in g.uses:
        body += ["", "[[machine.fs]]", 'mount = "/mnt/d"', 'type = "ext4"', 'dax = "pmem0"']
    for u in sorted(g.uses):
        if u.startswith("file:"):
            _, path, length = u.split(":")
            content = "sparse" if int(g.rng.integers(4)) == 0 else "data"
            body += ["", "[[file]]", f'path = "{path}"', f"size = {length}", f'content = "{content}"']
    if "c" in g.procs:
        body += ["", "[[process]]", 'name = "p"']
    ops = []
    for text in g.ops:
        ops += ["", "[[op]]", text]
    return "\n".join(head + body + ops) + "\n"
