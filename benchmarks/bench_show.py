"""``hmmirror show`` against ``hmmirror run`` on the same file: is the viewer no slower than the run plus drawing?

Runs each command in a fresh Python process (``python -m hmmirror.cli.main``-style, through the installed
package or ``--src``), ``--repeat`` times, and prints the best wall and user+sys CPU times.  ``--per-folio``
switches the 6.18 profile's ``pagemap_exclusive_per_folio`` on (CONFIG_NO_PAGE_MAPCOUNT: pagemap's
"exclusive" is ``!folio_maybe_mapped_shared``), the setting under which the per-page reference inspection
made 13 M page-table lookups for ``show`` (issue 13).

    python benchmarks/bench_show.py                                  # examples/*.toml + the big mapping
    python benchmarks/bench_show.py --per-folio benchmarks/scenarios/big_mapping.toml
    python benchmarks/bench_show.py --src /work/main/src --per-folio benchmarks/scenarios/big_mapping.toml
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_DRIVER = """
import dataclasses, sys
if {per_folio!r}:
    import hmmirror.profiles as P
    P.PROFILES["6.18"] = dataclasses.replace(P.PROFILES["6.18"], pagemap_exclusive_per_folio=True)
from hmmirror.cli.main import main
sys.argv = ["hmmirror"] + {argv!r}
main()
"""


def timed(argv: list[str], src: str | None, per_folio: bool) -> tuple[float, float, int]:
    """(wall seconds, child CPU seconds, exit code) of one fresh process running ``hmmirror ARGV``."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _DRIVER.format(per_folio=per_folio, argv=argv)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
    return wall, cpu, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--src", help="a source tree to run instead of the installed package (e.g. /work/main/src)")
    ap.add_argument("--per-folio", action="store_true", help="6.18 with pagemap_exclusive_per_folio on")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--proc", help="--proc for show")
    args = ap.parse_args()
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml"))) + [
        os.path.join(HERE, "scenarios", "big_mapping.toml")]
    print(f"{'file':44} {'run wall':>9} {'run cpu':>8} {'show wall':>10} {'show cpu':>9}  show/run (cpu)")
    for f in files:
        best: dict[str, tuple[float, float]] = {}
        for cmd in ("run", "show"):
            argv = [cmd, f] + (["--proc", args.proc] if args.proc and cmd == "show" else [])
            runs = [timed(argv, args.src, args.per_folio) for _ in range(args.repeat)]
            best[cmd] = (min(r[0] for r in runs), min(r[1] for r in runs))
        ratio = best["show"][1] / best["run"][1] if best["run"][1] else float("nan")
        print(f"{os.path.relpath(f, ROOT):44} {best['run'][0]:8.2f}s {best['run'][1]:7.2f}s "
              f"{best['show'][0]:9.2f}s {best['show'][1]:8.2f}s  {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
