"""hmmirror.fast: the vectorised HMM walks, bit-for-bit the reference walks of ``mm/hmm/``.

Entry points (generators, driven like the reference ones with ``yield from`` / ``sched.run``):

* :func:`hmm_range_fault` -- profile-agnostic: ``hmm_range_fault(range)`` for a modern ``HmmRange``,
  ``hmm_range_fault(range, block)`` for a 5.2 one;
* :func:`hmm_range_snapshot` -- 5.2 only;
* the per-profile modules :mod:`hmmirror.fast.hmm_modern` and :mod:`hmmirror.fast.hmm_v5_2` with the exact
  signatures of the reference functions plus ``reference=``.

The fast walk is the default.  The reference walk (kernel order, one entry at a time, every preemption
point of the reference) is one flag away: ``reference=True`` on a call, or
:func:`set_reference_walk(machine) <set_reference_walk>` for every call on a machine (the simulator wants
this: the fast walk has fewer preemption points, so it cannot be interleaved at every place the kernel can).

Building blocks: :mod:`~hmmirror.fast.gather` (entries of a range as arrays), :mod:`~hmmirror.fast.decode`
(vectorised entry predicates and PTE kinds), :mod:`~hmmirror.fast.fault` (vectorised anonymous fault-in),
:mod:`~hmmirror.fast.bench` (``hmmirror bench``).
"""

from __future__ import annotations

from typing import Any

from hmmirror.kernel.sched import Gen

_ATTR = "hmm_reference_walk"


def set_reference_walk(machine: Any, on: bool = True) -> None:
    """Make every call through this package on ``machine`` use the reference walk (``on=False``: fast)."""
    setattr(machine, _ATTR, bool(on))


def uses_reference_walk(machine: Any) -> bool:
    """Does ``machine`` default to the reference walk?"""
    return bool(getattr(machine, _ATTR, False))


def _machine_of(range: Any) -> Any:   # noqa: A002 - kernel name
    notifier = getattr(range, "notifier", None)
    if notifier is not None and getattr(notifier, "mm", None) is not None:
        return notifier.mm.machine
    hmm = getattr(range, "hmm", None)
    if hmm is not None and getattr(hmm, "machine", None) is not None:
        return hmm.machine
    return getattr(range, "machine", None)


def hmm_range_fault(range: Any, *args: Any, reference: bool | None = None) -> Gen[int]:   # noqa: A002
    """hmm_range_fault() of the range's API: modern ``(range)`` or 5.2 ``(range, block)``; fast unless
    ``reference`` (default: the machine's setting, see :func:`set_reference_walk`)."""
    if reference is None:
        reference = uses_reference_walk(_machine_of(range))
    if hasattr(range, "hmm_pfns"):
        from hmmirror.fast import hmm_modern
        return (yield from hmm_modern.hmm_range_fault(range, *args, reference=reference))
    from hmmirror.fast import hmm_v5_2
    return (yield from hmm_v5_2.hmm_range_fault(range, *args, reference=reference))


def hmm_range_snapshot(range: Any, *, reference: bool | None = None) -> Gen[int]:   # noqa: A002
    """hmm_range_snapshot() [5.2]; fast unless ``reference`` (default: the machine's setting)."""
    if reference is None:
        reference = uses_reference_walk(_machine_of(range))
    from hmmirror.fast import hmm_v5_2
    return (yield from hmm_v5_2.hmm_range_snapshot(range, reference=reference))


__all__ = ["hmm_range_fault", "hmm_range_snapshot", "set_reference_walk", "uses_reference_walk"]
