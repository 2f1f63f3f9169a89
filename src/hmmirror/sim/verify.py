"""A reproducer is kept only if it replays to its own signature in a fresh process.

``python -m hmmirror.sim.verify FILE`` replays ``FILE`` (its recorded schedule) and prints one JSON line:
``{"signature": first, "signatures": [every finding's], "diverged": ..., "steps": ...}``; the file replays
if its signature is among the findings (a run records one finding per invariant and goes on).  :func:`replays_in_fresh_process` runs that in a new
interpreter -- a different hash seed, no state left over from the campaign's process (imports, counters,
caches) -- and compares: what a user's ``hmmirror replay`` will see is what the campaign saw, or the file is
not written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

#: seconds a fresh replay may take (a reproducer is small; a page-count finding replays a second time with
#: the walk at every step)
VERIFY_TIMEOUT = 300.0


@dataclass
class Verdict:
    ok: bool
    signature: str | None
    why: str


def replays_in_fresh_process(path: str, signature: str, timeout: float = VERIFY_TIMEOUT) -> Verdict:
    """Replay ``path`` in a new Python process; ``ok`` if it reports ``signature`` without divergence."""
    env = dict(os.environ)
    # the child imports what this process can import (a user's --driver module found through sys.path)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTHONHASHSEED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)     # the next fresh replay starts from compiled modules
    try:
        from hmmirror.sim.lifecycle import set_pdeathsig    # dies with the worker that started it
        proc = subprocess.run([sys.executable, "-m", "hmmirror.sim.verify", path], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                              preexec_fn=set_pdeathsig)
    except subprocess.TimeoutExpired:
        return Verdict(False, None, f"the fresh replay took more than {timeout:.0f} s")
    except OSError as exc:
        return Verdict(False, None, f"cannot start a fresh replay: {exc.strerror}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Verdict(False, None, f"the fresh replay failed (exit {proc.returncode}): {err[:200]}")
    out = json.loads(lines[-1])
    sigs = out.get("signatures") or ([out["signature"]] if out.get("signature") else [])
    if out.get("diverged"):
        return Verdict(False, sigs[0] if sigs else None, f"the fresh replay diverged: {out['diverged']}")
    if signature not in sigs:
        return Verdict(False, sigs[0] if sigs else None,
                       f"the fresh replay gave {', '.join(sigs) if sigs else 'no finding'}")
    return Verdict(True, signature, "replayed")


def main(argv: list[str] | None = None) -> int:
    from hmmirror.sim.replay import replay_file

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hmmirror.sim.verify FILE", file=sys.stderr)
        return 2
    rep = replay_file(args[0])
    f = rep.result.finding
    print(json.dumps({"signature": f.signature if f is not None else None,
                      "signatures": [x.signature for x in rep.result.findings],
                      "diverged": rep.result.diverged, "steps": rep.result.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
