"""include/linux/oom.h: the OOM reaper's mark on an address space."""

from __future__ import annotations

from typing import Any

from hmmirror.include.mm_types import VM_FAULT


def check_stable_address_space(mm: Any) -> int:
    """check_stable_address_space() (include/linux/oom.h, 4.14+): VM_FAULT_SIGBUS once the OOM reaper set
    MMF_UNSTABLE on the mm (a fault must not repopulate a reaped range with fresh pages), else 0."""
    return int(VM_FAULT.SIGBUS) if mm.unstable else 0
