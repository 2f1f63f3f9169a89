"""Random scenarios for the differential runner, restricted to what real Linux can run here.

Each scenario is generated as TOML text (so it can be saved, read, and re-run with ``hmmirror run`` or
``hmmirror crosscheck``) from one seeded stream (numpy's PCG64): the same ``(seed, index)`` always gives
the same file, byte for byte.  The mix covers anonymous private and shared memory, tmpfs and ext4 files
(shared and private), THP through MADV_HUGEPAGE, hugetlbfs 2 MiB pages, mprotect, munmap, madvise
(DONTNEED, POPULATE_READ/WRITE, HUGEPAGE) and fork, with an ``inspect`` of every live mapping after each
operation.
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


@dataclass
class _Gen:
    rng: np.random.Generator
    ops: list[str] = field(default_factory=list)
    maps: list[_Mapping] = field(default_factory=list)
    procs: list[str] = field(default_factory=lambda: ["p"])
    uses: set[str] = field(default_factory=set)

    def pick(self, seq: list[str] | tuple[str, ...]) -> str:
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def op(self, text: str) -> None:
        self.ops.append(text)


MAP_KINDS = ("anon", "anon", "anon_thp", "shared_anon", "tmpfs", "ext4", "ext4_private", "hugetlb")


def _mmap(g: _Gen, i: int) -> None:
    kind = g.pick(MAP_KINDS)
    name = f"m{i}"
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
    else:
        pages = int(g.rng.integers(8, 48))
        length = pages * 4 * KIB
        prot = g.pick(("rw", "rw", "r"))
        if kind in ("anon", "shared_anon"):
            share = "shared" if kind == "shared_anon" else "private"
            g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "{prot}"\n'
                 f'flags = ["{share}", "anonymous"]')
        else:
            fs = "/mnt/t" if kind == "tmpfs" else "/mnt/e"
            g.uses.add("tmpfs" if kind == "tmpfs" else "ext4")
            share = "private" if kind == "ext4_private" else "shared"
            g.op(f'op = "mmap"\nas = "{name}"\nlength = {length}\nprot = "{prot}"\nflags = ["{share}"]\n'
                 f'file = "{fs}/f{i}"')
            g.uses.add(f"file:{fs}/f{i}:{length}")
    g.maps.append(_Mapping(name, length, prot, kind, "p"))


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
    kind = g.pick(("touch_r", "touch_w", "touch_w", "dontneed", "populate", "mprotect", "munmap", "fork"))
    if kind == "touch_r":
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
                g.maps.append(_Mapping(mm.name, mm.length, mm.prot, mm.kind, "c"))
    else:
        g.op(f'op = "touch"\n{where}\naccess = "read"')


def random_scenario(seed: int, index: int, max_ops: int = 8) -> str:
    """The TOML text of random scenario ``index`` of stream ``seed``."""
    g = _Gen(np.random.default_rng([seed, index]))
    for i in range(1 + int(g.rng.integers(2))):
        _mmap(g, i)
    for _ in range(2 + int(g.rng.integers(max_ops - 1))):
        _one_op(g)
        _inspect_all(g)
    head = [f'title = "random scenario {index} of seed {seed}"', "", "[machine]", 'kernel = "6.18"',
            'ram = "1G"']
    if "hugetlb" in g.uses:
        head.append("hugepages_2m = 2")
    body = []
    for fs, typ in (("/mnt/t", "tmpfs"), ("/mnt/e", "ext4")):
        if typ in g.uses:
            body += ["", "[[machine.fs]]", f'mount = "{fs}"', f'type = "{typ}"']
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
