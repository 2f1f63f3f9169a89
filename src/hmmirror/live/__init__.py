"""The real-kernel side of hmmirror: the only package that touches the host kernel.

- :mod:`hmmirror.live.pagemap` reads the per-page state of a real process (``/proc/PID/pagemap``,
  ``/proc/kpageflags``, the ``PAGEMAP_SCAN`` ioctl) as :class:`~hmmirror.include.pagestate.PageState` records.
- :mod:`hmmirror.live.hostenv` reads host settings and provides self-cleaning host resources (hugetlb pool,
  loop-device filesystems, tmpfs and hugetlbfs mounts).
- :mod:`hmmirror.live.executor` runs scenario operations in real worker processes.

Nothing in the model imports this package.
"""

from __future__ import annotations

__all__ = ["executor", "hostenv", "pagemap"]
