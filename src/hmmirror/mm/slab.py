"""Driver-side allocations whose contents are undefined until written (mm/slub.c, mm/util.c).

``kmalloc_array`` / ``kvmalloc_array`` return memory the caller has not initialised.  The model fills it
with slub's allocation poison (``POISON_INUSE`` bytes, as ``slub_debug=P`` does) so that a read of a word
nobody wrote is recognisable: the simulator's ``hmm_range_input`` check reports an ``hmm_range`` whose
requests come from such a word.  ``kzalloc``-style zeroed memory is ``numpy.zeros``.  A field of a
driver structure that C code would leave uninitialised can be set to :data:`KMALLOC_POISON` in a port.
"""

from __future__ import annotations

import numpy as np

POISON_INUSE = 0x5A                                  # include/linux/poison.h: slab object in use
POISON_FREE = 0x6B                                   # include/linux/poison.h: slab object freed
KMALLOC_POISON = int.from_bytes(bytes([POISON_INUSE]) * 8, "little")   # one unwritten unsigned long
KFREE_POISON = int.from_bytes(bytes([POISON_FREE]) * 8, "little")      # one word of freed memory


def kmalloc_array(n: int) -> np.ndarray:
    """kmalloc_array(n, sizeof(unsigned long), GFP_KERNEL): ``n`` words, contents undefined (poisoned)."""
    return np.full(max(int(n), 0), KMALLOC_POISON, dtype=np.uint64)


kvmalloc_array = kmalloc_array


def kvfree(a: np.ndarray) -> None:
    """kvfree(): the words are poisoned as freed (a use after free reads poison)."""
    a[:] = np.uint64(KFREE_POISON)


def is_poison(v: int) -> bool:
    """Is ``v`` a word nobody wrote since it was allocated?"""
    return int(v) in (KMALLOC_POISON, KFREE_POISON)
