"""A machine whose processes used the kernel-internal mounts (shared anonymous memory / memfd: ``shm_mnt``;
MAP_HUGETLB: ``hugetlbfs_vfsmount``) is freed once nothing else holds it: the mounts live on the machine, not
in a module-level table keyed by it (which kept every such machine -- arrays, page tables, page bytes -- alive
for the rest of a campaign worker's life)."""

from __future__ import annotations

import gc
import weakref

from hmmirror.arch.x86.pgtable import PMD_SIZE
from hmmirror.fs.hugetlbfs import hugetlbfs_vfsmount
from hmmirror.fs.shmem import memfd_create, shm_mnt
from hmmirror.machine import Machine


def test_a_machine_with_internal_mounts_is_freed():
    m = Machine("6.18", ram=64 << 20, hugepages_2m=4)
    assert shm_mnt(m) is shm_mnt(m)                       # one internal mount per machine
    assert hugetlbfs_vfsmount(m, PMD_SIZE) is hugetlbfs_vfsmount(m, PMD_SIZE)
    memfd_create(m, "x", 1 << 20)
    other = Machine("6.18", ram=64 << 20)
    assert shm_mnt(other) is not shm_mnt(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
