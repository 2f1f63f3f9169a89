"""Processes of a campaign die with the process that started them (Linux ``PR_SET_PDEATHSIG``).

Workers call :func:`die_with_parent` first thing; subprocesses a worker starts (the fresh-process replay of a
reproducer) get :func:`set_pdeathsig` as ``preexec_fn``.  So a SIGKILL of ``hmmirror fuzz`` ends the whole
tree: the kernel sends SIGKILL to each child when its parent dies, whatever killed the parent.
"""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where unsupported."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int) -> None:
    """:func:`set_pdeathsig`, then exit at once if ``parent`` already died (the race before the prctl)."""
    set_pdeathsig()
    if os.getppid() != parent:
        os._exit(1)
