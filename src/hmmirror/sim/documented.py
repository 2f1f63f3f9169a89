"""The behaviours docs/known-behaviours.md documents as the kernel's own (or lib/test_hmm.c's), by signature.

A campaign report uses :func:`documented_as` to say which of its findings carry the signature of a documented
real behaviour of the built-in drivers (B1-B14 for the 5.2 driver, M1-M7 for lib/test_hmm.c's dmirror, G1-G2
for ``--driver gpusvm``), so
"nothing new" is plain when those are all a campaign found.  This labels findings; it does not make them
known: a campaign stays blind (its reproducers are saved and its steering is unchanged) unless the user
passes them with ``--known`` (e.g. ``--known docs/sim-reproducers``).  A matching signature is evidence, not
proof, of the same cause: the reproducer is still there to look at.

``tests/sim/test_documented.py`` keeps this table and the document's rows in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Documented:
    """One row of docs/known-behaviours.md: its id, the kernel profiles and built-in driver it is about, and
    the signature patterns (regular expressions on ``invariant|location|detail``) it is reported as."""

    id: str
    kernels: tuple[str, ...]
    patterns: tuple[str, ...]
    driver: str = "builtin"


_V52 = ("5.2",)
_DMIRROR = ("6.12", "6.18")          # lib/test_hmm.c's dmirror: the same test code in both profiles
_GPUSVM = ("6.18",)                  # drivers/drm_gpusvm.py: a 6.18 driver

DOCUMENTED: tuple[Documented, ...] = (
    Documented("B1", _V52, (r"^commit_invalid\|drivers\.hmm_mirror_v5_2\.",
                            r"^coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|commit$")),
    Documented("B2", _V52, (r"^liveness\|mm\.hmm\.v5_2\.hmm_range_fault\|refault",
                            r"^liveness\|step_bound:drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.populate\|")),
    Documented("B3", _V52, (r"^report:null_deref\|mm\.hmm\.v5_2\.hmm_vma_do_fault\|",)),
    Documented("B4", _V52, (r"^sleep_in_atomic\|mm\.hmm\.v5_2\.hmm_invalidate_range_end\|",)),
    # B5 is located where the count check first sees the leaked frames: exit_mmap's mmput, or the driver's next
    # step; any other page_counts location is not B5 (benchmarks/search_campaigns.py BEHAVIOURS_5_2: the same)
    Documented("B5", _V52, (r"^page_counts\|(kernel\.fork\.mmput|"
                            r"drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.populate)\|",)),
    Documented("B6", _V52, (r"^sleep_in_atomic\|mm\.memory\.handle_mm_fault\|", r"^recursive_lock\|mm\.huge_memory\.",
                            r"^deadlock\|mm\.huge_memory\.zap_huge_pud\|",
                            r"^deadlock\|mm\.pagewalk_v5_2\.pud_trans_huge_lock\|")),
    Documented("B7", _V52, (r"^report:pfns_overflow\|",)),
    Documented("B8", _V52, (r"^liveness\|mm\.hmm\.v5_2\.hmm_range_fault\|no-fault",)),
    Documented("B9", _V52, (r"^pgmap_refcount\|mm\.hmm\.v5_2\.hmm_range_(fault|snapshot)\|kept",)),
    Documented("B11", _V52, (r"^result_contract\|mm\.hmm\.v5_2\.hmm_range_fault\|",
                             r"^coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|walk$")),
    Documented("B12", _V52, (r"^pte_map_balance\|mm\.hmm\.v5_2\.hmm_vma_walk_pmd\|",)),
    Documented("B13", _V52, (r"^coherence\|drivers\.hmm_mirror_v5_2\.HmmMirrorDriver52\.commit\|after_end$",)),
    Documented("B14", _V52, (r"^report:VM_BUG_ON\|mm\.hmm\.v5_2\.hmm_invalidate_range_start\|",)),
    Documented("M2", _DMIRROR, (r"^coherence\|drivers\.test_hmm\.DmirrorPageTable\.store\|commit$",
                                r"^coherence\|drivers\.test_hmm\.DmirrorPageTable\.store\|walk$")),
    Documented("M3", _DMIRROR, (r"^coherence\|drivers\.test_hmm\.DmirrorPageTable\.store\|after_end$",)),
    Documented("M4", _DMIRROR, (r"^report:WARN_ON\|drivers\.test_hmm\.Dmirror\.program\|",
                                r"^hmm_range_input\|sim\.adapters\.DmirrorAdapter\.fault\|")),
    Documented("M5", _DMIRROR, (r"^coherence\|drivers\.test_hmm\.Dmirror\.program\|commit$",)),
    Documented("M6", _DMIRROR, (r"^commit_invalid\|drivers\.test_hmm\.DmirrorPageTable\.store\|",)),
    Documented("M7", _DMIRROR, (r"^coherence\|drivers\.device_mmu\.DevicePageTable\.commit_range\|commit$",)),
    # the drm_gpusvm-shaped built-in driver (--driver gpusvm): drm_gpusvm/Xe behaviour, G1-G2
    Documented("G1", _GPUSVM, (r"^result_contract\|drivers\.drm_gpusvm\.DrmGpusvm\.fault\|driver_fault$",),
               driver="gpusvm"),
    Documented("G2", _GPUSVM, (r"^hmm_range_input\|drivers\.drm_gpusvm\.DrmGpusvm\.fault\|-$",), driver="gpusvm"),
)

_COMPILED = tuple((d, tuple(re.compile(p) for p in d.patterns)) for d in DOCUMENTED)


def documented_as(signature: str, kernel: str, driver: str = "builtin") -> str | None:
    """The id of the documented behaviour whose pattern ``signature`` matches for this kernel profile and
    driver (``builtin``: the profile's built-in driver), or None."""
    for d, pats in _COMPILED:
        if driver == d.driver and kernel in d.kernels and any(p.search(signature) for p in pats):
            return d.id
    return None
