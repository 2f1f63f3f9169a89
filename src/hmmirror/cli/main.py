"""Entry point of the ``hmmirror`` command.

Each subcommand lives in its own module of this package and exposes a click command named ``command``;
:data:`SUBCOMMANDS` lists them.  Bad input of any kind ends as one line on stderr and exit code 2:
click's usage errors, :class:`~hmmirror.errors.InputError` and :class:`~hmmirror.errors.KernelError` raised
while reading the user's input.
"""

from __future__ import annotations

import importlib
import sys

import click

from hmmirror.errors import InputError, KernelError

#: Subcommand modules under ``hmmirror.cli``; a missing module is skipped (the command is not built yet).
SUBCOMMANDS = ("demo", "run", "show", "live", "crosscheck", "bench", "fuzz", "replay")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hmmirror")
def cli() -> None:
    """hmmirror: an executable model of Linux HMM address-space mirroring."""


def _register() -> None:
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"hmmirror.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hmmirror.cli.{name}":
                continue
            raise
        cli.add_command(mod.command, name=name)


_register()


def fail(message: str) -> None:
    """Print one clear error line and exit with code 2."""
    click.echo(f"hmmirror: error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors and bad input give one line and exit code 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="hmmirror", standalone_mode=False)
    except click.UsageError as exc:
        fail(exc.format_message().replace("\n", " "))
    except click.exceptions.Abort:
        fail("aborted")
    except InputError as exc:
        fail(str(exc))
    except KernelError as exc:
        fail(str(exc))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
