"""What every subcommand shares: the exit codes, checks of options and output paths before work starts.

The exit-code contract (README, ``hmmirror --help``):

==== ==========================================================================================
code meaning
==== ==========================================================================================
0    ran, nothing found (every expectation held, no finding, no disagreement)
1    findings, failed expectations or disagreements (``run``, ``fuzz``, ``crosscheck``, ``replay``)
2    bad input or usage: one line naming FILE:LINE or the option
3    internal error (a bug of hmmirror): one line and the path of a crash report
130  interrupted (Ctrl-C or SIGTERM): the summary so far, ``--json`` still printed
141  the output pipe was closed (``| head``): ends quietly, as a process killed by SIGPIPE
==== ==========================================================================================
"""

from __future__ import annotations

import inspect
import math
import os
import stat
from typing import Any

import click

from hmmirror.errors import InputError

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141

EXIT_CODES_HELP = (
    "Exit codes: 0 ran, nothing found; 1 findings, failed expectations or disagreements (run, fuzz, "
    "crosscheck, replay); 2 bad input or usage (one line naming FILE:LINE or the option); 3 internal error "
    "(one line and the path of a crash report); 130 interrupted (Ctrl-C, SIGTERM; the summary so far is "
    "printed, --json too); 141 output pipe closed."
)

#: Largest seed accepted on the command line (seeds are 64-bit).
MAX_SEED = (1 << 64) - 1


def seed_option(*decls: str, **kw: Any) -> Any:
    """A ``--seed`` option: an integer in [0, 2**64)."""
    return click.option(*decls, type=click.IntRange(0, MAX_SEED), **kw)


def finite_seconds(value: float | None, option: str, allow_zero: bool = False) -> float | None:
    """A positive finite number of seconds (``nan``, ``inf``, negative and zero are bad input)."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise click.BadParameter(f"{value!r} is not a positive finite number of seconds", param_hint=option)
    if value > 366 * 86400:
        raise click.BadParameter(f"{value!r} is more than a year; stop a long campaign with Ctrl-C instead",
                                 param_hint=option)
    return value


def check_output_file(path: str | None, option: str) -> str | None:
    """``path`` can be written: not a directory, its directory exists and is writable (before any work).

    An existing non-directory (a file, ``/dev/stdout``, ``/dev/null``) is accepted when it is writable.
    """
    if path is None:
        return None
    if not path or "\0" in path:
        raise InputError(f"{option}: {path!r} is not a file name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"{option} {path}: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{option} {path}: is a directory (give a file name)")
        if not os.access(path, os.W_OK):
            raise InputError(f"{option} {path}: not writable")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory {parent} is not writable")
    return path


def prepare_output_dir(path: str, option: str) -> str:
    """Create directory ``path`` if needed; it must end up a writable directory (before any work)."""
    if not path or "\0" in path:
        raise InputError(f"{option}: {path!r} is not a directory name")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{option} {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot create the directory: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory not writable")
    return path


def resolve_driver(spec: str, kernel: str | None = None, option: str = "--driver") -> Any:
    """Import, construct and type-check a ``package.module:ClassName`` driver; InputError (exit 2) if bad.

    Returns the class (``None`` for ``builtin``).  Done once in the parent before a campaign starts, so a bad
    driver is bad input, never a finding of the model.
    """
    from hmmirror.sim.driver import check_driver, load_driver

    if spec in ("builtin", ""):
        return None
    try:
        factory = load_driver(spec)
    except InputError as exc:
        raise InputError(f"{option} {spec}: {exc}") from None
    except Exception as exc:         # noqa: BLE001 - importing user code can raise anything
        raise InputError(f"{option} {spec}: importing it failed: {type(exc).__name__}: {_first(exc)}") from None
    if not inspect.isclass(factory):
        raise InputError(f"{option} {spec}: {type(factory).__name__} is not a class "
                         f"(name a subclass of hmmirror.sim.driver.DriverBase)")
    try:
        drv = factory()
    except Exception as exc:         # noqa: BLE001 - the user's constructor
        raise InputError(f"{option} {spec}: constructing {factory.__name__}() failed: "
                         f"{type(exc).__name__}: {_first(exc)}") from None
    try:
        check_driver(drv)
    except InputError as exc:
        raise InputError(f"{option} {spec}: {exc}") from None
    for name in ("fault", "invalidate"):
        fn = getattr(type(drv), name, None)
        if not inspect.isgeneratorfunction(fn):
            raise InputError(f"{option} {spec}: {factory.__name__}.{name} must be a generator function "
                             f"(it runs as a task: use `yield from` for locks and HMM calls)")
    profiles = getattr(drv, "profiles", None)
    if kernel is not None and profiles is not None:
        from hmmirror.profiles import get_profile
        if get_profile(kernel).name not in tuple(profiles):
            raise InputError(f"{option} {spec}: the driver supports kernel {', '.join(profiles)}, not {kernel}")
    return factory


def _first(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0][:200] if s else ""
