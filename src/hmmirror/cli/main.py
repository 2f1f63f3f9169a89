"""Entry point of the ``hmmirror`` command, and the one place that turns outcomes into exit codes.

Each subcommand lives in its own module of this package and exposes a click command named ``command``;
:data:`SUBCOMMANDS` lists them.  The exit codes are those of :mod:`hmmirror.cli.common`: a command returns
0 or 1; bad input of any kind (click's usage errors, :class:`~hmmirror.errors.InputError`,
:class:`~hmmirror.errors.KernelError` raised while reading the user's input) ends as one line on stderr and
code 2; Ctrl-C and SIGTERM end with code 130 (a command that has a summary prints it first); a closed output
pipe ends quietly; anything else is a bug of hmmirror: one line on stderr naming a crash report written to
disk (code 3), never a traceback on the terminal.
"""

from __future__ import annotations

import datetime
import errno as _errno
import importlib
import os
import platform
import signal
import sys
import tempfile
import traceback
from typing import Any, NoReturn

import click

from hmmirror.cli.common import (EXIT_CODES_HELP, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_USAGE)
from hmmirror.errors import InputError, KernelError

#: Subcommand modules under ``hmmirror.cli``; a missing module is skipped (the command is not built yet).
SUBCOMMANDS = ("demo", "run", "show", "live", "crosscheck", "bench", "fuzz", "replay", "guest")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             invoke_without_command=True, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="hmmirror")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """hmmirror: an executable model of Linux HMM address-space mirroring."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _register() -> None:
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"hmmirror.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hmmirror.cli.{name}":
                continue
            raise
        cmd = mod.command
        if cmd.epilog is None:
            cmd.epilog = EXIT_CODES_HELP
        cli.add_command(cmd, name=name)


_register()


def fail(message: str) -> NoReturn:
    """Print one clear error line and exit with code 2."""
    _err_line(f"hmmirror: error: {message}")
    sys.exit(EXIT_USAGE)


def _err_line(text: str) -> None:
    text = " ".join(str(text).split())        # one line, whatever the message held
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def crash_dir() -> str:
    """Where crash reports go: ``$HMMIRROR_CRASH_DIR``, else ``$XDG_STATE_HOME/hmmirror/crashes`` (or
    ``~/.local/state/...``), else the temporary directory."""
    env = os.environ.get("HMMIRROR_CRASH_DIR")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "hmmirror", "crashes")


def write_crash_report(exc: BaseException, argv: list[str]) -> str:
    """Write the traceback and the context of an internal error to a file; returns its path."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hmmirror")
    except PackageNotFoundError:
        ver = "unknown"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join([
        "hmmirror crash report (an internal error: please report it with this file)\n",
        f"version: {ver}\npython: {sys.version.split()[0]} on {platform.platform()}\n",
        f"argv: {argv!r}\ncwd: {os.getcwd()}\n\n",
        "".join(traceback.format_exception(exc)),
    ])
    for d in (crash_dir(), tempfile.gettempdir()):
        try:
            os.makedirs(d, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".txt", dir=d)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(path, 0o644)
            return path
        except OSError:
            continue
    return "(no writable directory for the report)"


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops the command like Ctrl-C (the same clean path, code 130)."""
    raise KeyboardInterrupt


def _quiet_pipe() -> NoReturn:
    """The reader of our output went away: no message, no flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    os._exit(EXIT_PIPE)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI and exit with the contract's code; never a traceback on the terminal."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        prev_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:                 # not the main thread (tests calling main() from a thread)
        prev_term = None
    try:
        rv = cli.main(args=args, prog_name="hmmirror", standalone_mode=False)
    except click.UsageError as exc:
        fail(exc.format_message())
    except click.exceptions.Abort:
        _err_line("hmmirror: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _err_line("hmmirror: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except InputError as exc:
        fail(str(exc))
    except KernelError as exc:
        fail(str(exc))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message())
    except BrokenPipeError:
        _quiet_pipe()
    except SystemExit:
        if type(sys.stdout).__name__ == "_PacifyFlushWrapper":   # click met EPIPE and exits 1: quietly 141
            _quiet_pipe()
        raise
    except Exception as exc:           # noqa: BLE001 - the contract: no traceback on the terminal
        if isinstance(exc, OSError) and exc.errno == _errno.EPIPE:
            _quiet_pipe()
        path = write_crash_report(exc, args)
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        _err_line(f"hmmirror: internal error: {type(exc).__name__}{': ' + msg if msg else ''} "
                  f"(a bug in hmmirror; crash report: {path})")
        sys.exit(EXIT_INTERNAL)
    finally:
        if prev_term is not None:
            try:
                signal.signal(signal.SIGTERM, prev_term)
            except ValueError:
                pass
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_pipe()
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
