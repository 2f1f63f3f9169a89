"""Where the pages of the mirrored process live, step by step: the data of the placement band under the swim
lanes (``hmmirror replay --png``).

:class:`PlaceTimeline` is an observer instrument (it never reports): after every step at which the machine
logged something it classifies each watched page by its CPU page-table entry (``mm/inspect.inspect_arrays``)
and keeps a sample when the picture changed.  The watched pages are those of the mirrored process's VMAs when
the run starts (at most :data:`MAX_PAGES`, the first ones in address order).

Places (:data:`PLACES`): ``none`` (nothing mapped), ``system`` (a system-memory page, present or swapped),
``device`` (a device-private entry: the data is in device memory), ``exclusive`` (a device-exclusive entry:
the page is in system memory, the device holds it for atomics), ``migrating`` (a migration entry: the page
is locked and being moved -- also by a CPU-side migration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmmirror.include.pagestate import KINDS

PLACES = ("none", "system", "device", "exclusive", "migrating")
PLACE_COLORS = {"none": "#ffffff", "system": "#bab0ac", "device": "#4e79a7", "exclusive": "#f28e2b",
                "migrating": "#e15759"}
MAX_PAGES = 4096

# page-state kind code -> place code
_KIND_TO_PLACE = np.ones(len(KINDS), dtype=np.uint8)
_KIND_TO_PLACE[KINDS.index("none")] = 0
_KIND_TO_PLACE[KINDS.index("device_private")] = 2
_KIND_TO_PLACE[KINDS.index("device_exclusive")] = 3
_KIND_TO_PLACE[KINDS.index("migration")] = 4


@dataclass
class PlaceTimeline:
    """Observer: ``samples`` is a list of ``(step, places)`` (``places`` a uint8 array over the watched pages,
    codes into :data:`PLACES`), one per change; ``ranges`` the watched pages as ``(label, start, npages)``."""

    name: str = "placement"
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    samples: list[tuple[int, np.ndarray]] = field(default_factory=list)
    mm: Any = None
    dirty: bool = True

    def attach(self, eng: Any, run: Any) -> None:
        self.samples = []
        self.ranges = []
        self.dirty = True
        proc = run.procs.get(run.scenario.mirror) if getattr(run, "procs", None) else None
        self.mm = proc.mm if proc is not None else getattr(run.driver, "mm", None)
        if self.mm is None:
            return
        labels = {}
        for name, val in (getattr(run, "names", None) or {}).items():
            if isinstance(val, tuple) and val and isinstance(val[0], int):
                labels.setdefault(val[0], name)
            elif isinstance(val, int):
                labels.setdefault(val, name)
        left = MAX_PAGES
        for vma in list(self.mm.vmas):
            if left <= 0:
                break
            n = min((vma.vm_end - vma.vm_start) >> 12, left)
            self.ranges.append((labels.get(vma.vm_start, f"{vma.vm_start:#x}"), vma.vm_start, n))
            left -= n
        self.sample(0)

    @property
    def npages(self) -> int:
        return sum(n for _l, _s, n in self.ranges)

    def places(self) -> np.ndarray:
        """The place code of every watched page now."""
        from hmmirror.mm.inspect import inspect_arrays

        out = []
        for _label, start, n in self.ranges:
            pa = inspect_arrays(self.mm, start, start + n * 4096)
            out.append(_KIND_TO_PLACE[pa.kind])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)

    def sample(self, step: int) -> None:
        if self.mm is None or not self.ranges:
            return
        cur = self.places()
        if not self.samples or not np.array_equal(self.samples[-1][1], cur):
            self.samples.append((step, cur))

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        self.dirty = True

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if self.dirty:
            self.dirty = False
            self.sample(eng.step)

    def at(self, step: int) -> np.ndarray:
        """The places of the watched pages after ``step``."""
        cur = self.samples[0][1] if self.samples else np.zeros(self.npages, dtype=np.uint8)
        for s, arr in self.samples:
            if s > step:
                break
            cur = arr
        return cur

    def matrix(self, first: int, last: int) -> np.ndarray:
        """Places as a ``(pages, steps)`` matrix over steps ``first..last`` (what the band draws)."""
        n = last - first + 1
        mat = np.zeros((self.npages, max(n, 0)), dtype=np.uint8)
        if n <= 0:
            return mat
        bounds = [s for s, _a in self.samples]
        for k, (s, arr) in enumerate(self.samples):
            lo = max(s, first) - first if k else 0
            hi = (bounds[k + 1] - first) if k + 1 < len(bounds) else n
            if hi <= 0 or lo >= n:
                continue
            mat[:, max(lo, 0): min(hi, n)] = arr[:, None]
        return mat

    def history(self, va: int) -> list[str]:
        """The places the page at ``va`` went through, in order, consecutive repeats merged."""
        idx = self.index(va)
        out: list[str] = []
        for _s, arr in self.samples:
            p = PLACES[int(arr[idx])]
            if not out or out[-1] != p:
                out.append(p)
        return out

    def index(self, va: int) -> int:
        off = 0
        for _label, start, n in self.ranges:
            if start <= va < start + n * 4096:
                return off + ((va - start) >> 12)
            off += n
        raise KeyError(f"{va:#x} is not a watched page")
