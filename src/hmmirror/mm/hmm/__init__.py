"""hmmirror.mm.hmm: the HMM layer of each kernel profile, one module per profile (mm/hmm.c).

The module is chosen per machine by ``machine.profile.hmm_module`` (``hmmirror.mm.hmm.v5_2`` for the 5.2
profile, ``hmmirror.mm.hmm.modern`` for 6.18), over the same substrate.  The two modules do not share code:
the difference between the 5.2 file and today's should stay visible.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def hmm_module(machine: Any) -> ModuleType:
    """The HMM implementation of ``machine``'s kernel profile (imported on first use)."""
    return importlib.import_module(machine.profile.hmm_module)


def hmm_api_version(machine: Any) -> str:
    """``"5.2"`` or ``"modern"``: which HMM API the machine's profile offers (the module's last name part)."""
    name = machine.profile.hmm_module.rsplit(".", 1)[-1]
    return "5.2" if name == "v5_2" else name
