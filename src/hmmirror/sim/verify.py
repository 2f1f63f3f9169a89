"""A reproducer is kept only if it replays to its own signature in a fresh process.

``python -m hmmirror.sim.verify FILE`` replays ``FILE`` (its recorded schedule) and prints one JSON line:
``{"signature": first, "signatures": [every finding's], "diverged": ..., "steps": ...}``; the file replays
if its signature is among the findings (a run records one finding per invariant and goes on).

:func:`replays_in_fresh_process` runs that replay in a process that shares nothing with the campaign's: no
state left over from its runs (counters, caches, lazily built tables, module globals), another hash seed.
Starting a new interpreter per reproducer costs more than most replays (interpreter start, numpy, the
model's modules: ~0.2 CPU-seconds, against ~10-50 ms for a small replay), so each worker starts one
*zygote* (``python -m hmmirror.sim.verify --zygote``) the first time it verifies: a new interpreter that
imports the model and runs nothing.  Each replay is a ``fork()`` of that zygote -- a fresh process in the
same sense as before (a clean interpreter that has only imported code, with its own hash seed, different
from the worker's), without the start-up.  The zygote forks nothing else and keeps no state between
replays (each child exits).  When the zygote cannot be used (it died, its pipe broke, fork failed), the
replay falls back to a new interpreter (``python -m hmmirror.sim.verify FILE``), as before.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

#: seconds a fresh replay may take (a reproducer is small; a page-count finding replays a second time with
#: the walk at every step)
VERIFY_TIMEOUT = 300.0

#: the model's packages a zygote imports before it forks (what a replay of any scenario may import)
PRELOAD = ("arch", "include", "kernel", "mm", "fs", "drivers", "fast", "scenario", "sim")
#: modules of those a replay never needs (campaign machinery, its optional dependencies)
PRELOAD_SKIP = ("hmmirror.sim.fuzz", "hmmirror.sim.dask", "hmmirror.sim.lanes", "hmmirror.fast.bench")


@dataclass
class Verdict:
    ok: bool
    signature: str | None
    why: str


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the child imports what this process can import (a user's --driver module found through sys.path)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTHONHASHSEED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)     # the next fresh interpreter starts from compiled modules
    return env


def _judge(returncode: int, stdout: str, stderr: str, signature: str) -> Verdict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if returncode != 0 or not lines:
        err = ([ln for ln in (stderr or stdout).strip().splitlines() if not ln.startswith("{")] or ["no output"])[-1]
        return Verdict(False, None, f"the fresh replay failed (exit {returncode}): {err[:200]}")
    out = json.loads(lines[-1])
    sigs = out.get("signatures") or ([out["signature"]] if out.get("signature") else [])
    if out.get("diverged"):
        return Verdict(False, sigs[0] if sigs else None, f"the fresh replay diverged: {out['diverged']}")
    if signature not in sigs:
        return Verdict(False, sigs[0] if sigs else None,
                       f"the fresh replay gave {', '.join(sigs) if sigs else 'no finding'}")
    return Verdict(True, signature, "replayed")


def replays_in_new_interpreter(path: str, signature: str, timeout: float = VERIFY_TIMEOUT) -> Verdict:
    """Replay ``path`` in a new Python interpreter; ``ok`` if it reports ``signature`` without divergence."""
    try:
        from hmmirror.sim.lifecycle import set_pdeathsig    # dies with the worker that started it
        proc = subprocess.run([sys.executable, "-m", "hmmirror.sim.verify", path], capture_output=True,
                              text=True, timeout=timeout, env=_child_env(), stdin=subprocess.DEVNULL,
                              preexec_fn=set_pdeathsig)
    except subprocess.TimeoutExpired:
        return Verdict(False, None, f"the fresh replay took more than {timeout:.0f} s")
    except OSError as exc:
        return Verdict(False, None, f"cannot start a fresh replay: {exc.strerror}")
    return _judge(proc.returncode, proc.stdout, proc.stderr, signature)


class _Broken(Exception):
    """The zygote cannot serve (gone, pipe closed, garbled answer): use a new interpreter."""


class Zygote:
    """A clean interpreter (``python -m hmmirror.sim.verify --zygote``) that forks one child per replay.

    Protocol (one request at a time): write the file's absolute path and a newline; the zygote answers one
    JSON line ``{"pid": child}`` when the child started and one ``{"rc": exit status, "out": its output}``
    when it ended.  Closing the zygote's stdin ends it.
    """

    def __init__(self) -> None:
        from hmmirror.sim.lifecycle import set_pdeathsig

        self.env = _child_env()
        self.owner = os.getpid()
        self.proc = subprocess.Popen([sys.executable, "-m", "hmmirror.sim.verify", "--zygote"], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     preexec_fn=set_pdeathsig)
        self.buf = b""

    def usable(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None and self.env == _child_env()

    def _line(self, deadline: float) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()                 # type: ignore[union-attr]
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _Broken("the zygote ended")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError as exc:
            raise _Broken(f"garbled answer {line[:80]!r}") from exc

    def replay(self, path: str, signature: str, timeout: float) -> Verdict:
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write(os.path.abspath(path).encode() + b"\n")   # type: ignore[union-attr]
            self.proc.stdin.flush()                                          # type: ignore[union-attr]
        except OSError as exc:
            raise _Broken(str(exc)) from exc
        pid = 0
        try:
            started = self._line(deadline)
            if "error" in started:
                raise _Broken(started["error"])
            pid = int(started["pid"])
            done = self._line(deadline)
        except TimeoutError:
            self.close(kill=True)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return Verdict(False, None, f"the fresh replay took more than {timeout:.0f} s")
        return _judge(int(done["rc"]), done.get("out", ""), "", signature)

    def close(self, kill: bool = False) -> None:
        if self.owner != os.getpid():
            return                          # a forked copy of the worker's object: the zygote is not ours
        try:
            if kill:
                self.proc.kill()
            else:
                self.proc.stdin.close()     # type: ignore[union-attr]
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        try:
            self.proc.stdout.close()        # type: ignore[union-attr]
        except OSError:
            pass


_zygote: Zygote | None = None


def _get_zygote() -> Zygote | None:
    global _zygote
    z = _zygote
    if z is not None and not z.usable():
        z.close(kill=True)
        z = _zygote = None
    if z is None and os.environ.get("HMMIRROR_VERIFY_ZYGOTE", "1") != "0":
        try:
            z = _zygote = Zygote()
        except OSError:
            return None
        import atexit
        atexit.register(shutdown_zygote)
    return z


def shutdown_zygote() -> None:
    """End this process's zygote (if any) and wait for it (its CPU time counts as this process's children's)."""
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None


def replays_in_fresh_process(path: str, signature: str, timeout: float = VERIFY_TIMEOUT) -> Verdict:
    """Replay ``path`` in a fresh process (a fork of this worker's zygote, else a new interpreter); ``ok`` if
    it reports ``signature`` without divergence."""
    z = _get_zygote()
    if z is not None:
        try:
            return z.replay(path, signature, timeout)
        except (_Broken, OSError, KeyError, ValueError):
            shutdown_zygote()
    return replays_in_new_interpreter(path, signature, timeout)


def _replay_json(path: str) -> str:
    from hmmirror.sim.replay import replay_file

    rep = replay_file(path)
    f = rep.result.finding
    return json.dumps({"signature": f.signature if f is not None else None,
                       "signatures": [x.signature for x in rep.result.findings],
                       "diverged": rep.result.diverged, "steps": rep.result.steps})


def _preload() -> None:
    """Import the model (every module a replay may import), nothing else: no run, no state."""
    import importlib
    import pkgutil

    import hmmirror
    import hmmirror.sim.replay  # noqa: F401

    for pkg in PRELOAD:
        name = f"hmmirror.{pkg}"
        try:
            mod = importlib.import_module(name)
        except Exception:                    # noqa: BLE001 - a module that cannot load here is loaded (and fails) in the child
            continue
        for info in pkgutil.walk_packages(mod.__path__, name + "."):
            if info.name in PRELOAD_SKIP or any(info.name.startswith(s + ".") for s in PRELOAD_SKIP):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:                # noqa: BLE001
                continue
    _ = hmmirror


def zygote_main() -> int:
    """Serve replay requests on stdin, one fork per request (see :class:`Zygote`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)       # a Ctrl-C of the terminal ends it quietly
    try:
        _preload()
    except Exception:                        # noqa: BLE001 - serve anyway: the children import what they need
        pass
    import gc
    gc.collect()
    gc.freeze()                              # the children's collections leave the zygote's pages shared
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        path = raw.decode().strip()
        if not path:
            continue
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(r)
            os.close(w)
            out.write(json.dumps({"error": f"fork: {exc.strerror}"}).encode() + b"\n")
            out.flush()
            continue
        if pid == 0:                         # the fresh process: replay, print, exit
            code = 1
            try:
                os.close(r)
                from hmmirror.sim.lifecycle import set_pdeathsig
                set_pdeathsig()
                os.dup2(w, 1)
                os.dup2(w, 2)
                sys.stdout = os.fdopen(1, "w", closefd=False)
                sys.stderr = os.fdopen(2, "w", closefd=False)
                print(_replay_json(path), flush=True)
                code = 0
            except BaseException:            # noqa: BLE001 - reported through the exit status and output
                import traceback
                try:
                    traceback.print_exc()
                    sys.stderr.flush()
                except BaseException:        # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(w)
        out.write(json.dumps({"pid": pid}).encode() + b"\n")
        out.flush()
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        text = b"".join(chunks).decode(errors="replace")
        if len(text) > 20000:
            text = text[:2000] + "\n...\n" + text[-8000:]
        out.write(json.dumps({"rc": rc, "out": text}).encode() + b"\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--zygote"]:
        return zygote_main()
    if len(args) != 1:
        print("usage: python -m hmmirror.sim.verify FILE", file=sys.stderr)
        return 2
    print(_replay_json(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
