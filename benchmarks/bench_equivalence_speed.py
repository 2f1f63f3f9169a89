#!/usr/bin/env python3
"""Fast walk versus reference walk on the same small ranges (both profiles): speed-up per shape.

Usage: ``PYTHONPATH=src python benchmarks/bench_equivalence_speed.py``.  Each line: shape, profile, pages,
reference ns/page, fast ns/page, speed-up, and whether the two results are equal.
"""

from __future__ import annotations

import numpy as np

from hmmirror.fast import bench as B

MiB = 1 << 20


def main() -> None:
    shapes = [("4k", lambda prof: B.model_4k(prof, 64 * MiB)[:2]),
              ("thp", lambda prof: B.model_thp(prof, 64 * MiB)),
              ("holes", lambda prof: B.model_holes(prof, 1 << 30))]
    for name, build in shapes:
        for prof in ("6.18", "5.2"):
            p, a = build(prof)
            size = 64 * MiB if name != "holes" else 1 << 30
            r = B.ModelRange(p, a, a + size)
            t_ref = B.median_time(lambda: r.snapshot(reference=True), 3)
            ref = r.pfns.copy()
            t_fast = B.median_time(lambda: r.snapshot(), 5)
            n = size >> 12
            print(f"{name:6} {prof:5} {n:8} ref {t_ref / n * 1e9:9.1f} fast {t_fast / n * 1e9:7.2f} "
                  f"x{t_ref / t_fast:7.0f} equal={np.array_equal(ref, r.pfns)}")


if __name__ == "__main__":
    main()
