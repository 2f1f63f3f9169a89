"""The long version of the CLI contract fuzz test: N malformed inputs (default 10,000) through ``hmmirror``.

Inputs come from tests/cli/cli_inputs.py: the project's scenarios and reproducers broken structure-aware and
byte-wise (given to every command that reads one), and random command lines of every command and option (a
quarter of the cases; guest boots and builds, the live cross-check, ``bench`` and Dask clusters are stubbed:
``started`` counts the inputs that got that far).  Each runs in this process through
``hmmirror.cli.main.main``; the script counts exit codes and contract violations (tracebacks, crash reports,
codes outside 0/1/2, code-2 errors that are not one line naming the file or option, malformed inputs that were
accepted) and prints one JSON summary.  Exit code 1 if any violation was seen.

    nice python benchmarks/bench_cli_contract.py --inputs 10000 --seed 1 [--show 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cli"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cli_inputs import argv_cases, file_cases, limits, run_case  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=20, help="violations to print in full")
    args = ap.parse_args()

    codes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    problems: list[dict[str, object]] = []
    tmp_root = Path(tempfile.mkdtemp(prefix="hmmirror-contract-"))
    os.chdir(tmp_root)              # every case also chdirs into its own directory (run_case): random output
    #                                 paths never land where the script was started (a repository, say)
    n = [0]
    t0 = time.time()

    @settings(max_examples=args.inputs, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[__import__("hypothesis").Phase.generate])
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        n[0] += 1
        tmp = tmp_root / f"c{n[0]}"
        tmp.mkdir()
        case = data.draw(argv_cases(str(tmp))) if data.draw(st.integers(0, 3)) == 0 else data.draw(file_cases())
        with limits():
            o = run_case(case, tmp)
        label = case.command if case.data is not None else case.how
        codes[f"{label}:{'started' if o.started else o.code}"] += 1      # started: accepted, heavy work stubbed
        kinds[case.how.split(" at ")[0]] += 1
        if o.problem is not None:
            problems.append({"problem": o.problem, "how": case.how, "argv": case.argv,
                             "err": o.err[-400:],
                             "input": case.data[:2000].decode("utf-8", "replace") if case.data else None})
            if len(problems) <= args.show:
                print(json.dumps(problems[-1], indent=1), file=sys.stderr, flush=True)
        if n[0] % 500 == 0:
            print(f"  {n[0]} inputs, {len(problems)} violations, {time.time() - t0:.0f} s", file=sys.stderr)

    hseed(args.seed)(one)()
    summary = {"inputs": n[0], "violations": len(problems), "seconds": round(time.time() - t0, 1),
               "exit_codes": dict(sorted(codes.items())), "mutations": dict(sorted(kinds.items())),
               "violation_kinds": dict(collections.Counter(p["problem"].split(":")[0] for p in problems))}  # type: ignore[union-attr]
    print(json.dumps(summary, indent=1))
    os.chdir("/")
    shutil.rmtree(tmp_root, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
