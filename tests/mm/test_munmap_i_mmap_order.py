"""munmap keeps a file VMA in its file's i_mmap until the VMA's page tables are zapped.

Expected order (mm/vma.c 6.18 vms_complete_munmap_vmas -> vms_clear_ptes: unmap_vmas, then free_pgtables ->
unlink_file_vma_batch_add under i_mmap_rwsem; 5.2 mm/mmap.c unmap_region: unmap_vmas, then free_pgtables ->
unlink_file_vma): the VMA leaves the mm's tree first, i_mmap only after the zap, so an rmap walk of the file
that runs meanwhile (a device-dax unbind's unmap_mapping_range, memory_failure) still finds every PTE that
maps the file (6.18 blind campaign seed 630917: the unbind missed a page munmap had not zapped yet).
"""

from __future__ import annotations

import pytest

from hmmirror import Machine
from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.kernel import sched
from hmmirror.mm.debug import page_values
from hmmirror.mm.mmap import do_munmap

MiB = 1 << 20


@pytest.mark.parametrize("kernel", ["5.2", "6.18"])
def test_a_file_vma_stays_in_i_mmap_while_munmap_zaps_it(kernel: str) -> None:
    m = Machine(kernel, ram=256 * MiB)
    m.add_pmem("pmem0", 64 * MiB, "devdax", PAGE_SIZE)
    p = m.spawn("p")
    a = p.mmap(16 * PAGE_SIZE, "rw", ["shared"], file="/dev/dax0.0")
    p.touch(a + 2 * PAGE_SIZE, 8 * PAGE_SIZE)
    start, end = a + 2 * PAGE_SIZE, a + 10 * PAGE_SIZE
    inode = p.mm.vma_lookup(a).vm_file.inode

    def mapped() -> int:
        return sum(1 for v, _ in page_values(p.mm, start, end).values() if v & 1)

    assert mapped() == 8
    seen = []

    def munmap_checked():
        gen = do_munmap(p.mm, start, end - start)
        try:
            point = next(gen)
            while True:
                victim = [v for v in inode.i_mmap if v.vm_start <= start < v.vm_end]
                seen.append((mapped(), len(victim), p.mm.vma_lookup(start) is None))
                got = yield point
                point = gen.send(got)
        except StopIteration as stop:
            return stop.value

    assert sched.run(munmap_checked(), p.mm.task) == 0
    assert len(seen) > 1
    # while any PTE of the range is still present the VMA is in i_mmap; the split at the edges (vma_prepare
    # takes i_mmap_rwsem for write first: points where the VMA is still in the mm's tree) comes before the
    # zap, which runs with the VMA already out of the mm's tree and still in i_mmap
    assert all(victims == 1 for n, victims, _ in seen if n), seen
    gone = [g for _, _, g in seen]
    assert gone == sorted(gone), seen                      # out of the tree once, for good
    assert any(n and g for n, _, g in seen), seen          # the zap's window: detached, mapped, in i_mmap
    assert mapped() == 0 and not [v for v in inode.i_mmap if v.vm_start <= start < v.vm_end]
