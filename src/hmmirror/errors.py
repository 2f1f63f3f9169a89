"""Typed errors of the public API.

Inside the model, functions that model kernel functions return negative errno ints exactly where the kernel
does (``return -EBUSY``).  At the public boundary (Python API, scenario runner, CLI) such a value becomes a
:class:`KernelError` carrying the errno *name*; bad user input (addresses, sizes, files) becomes a
:class:`InputError`, also carrying an errno name (``EINVAL`` unless said otherwise).  A broken model
assumption is a :class:`ModelBug` (the kernel's ``BUG_ON``/``WARN_ON``), which the simulator reports as a
finding.
"""

from __future__ import annotations

import errno as _errno


def errno_name(code: int) -> str:
    """Name of an errno value, accepting the kernel's negative convention (``-22`` -> ``"EINVAL"``)."""
    code = abs(int(code))
    return _errno.errorcode.get(code, f"E{code}")


def errno_value(name: str) -> int:
    """Positive errno value of a name (``"EINVAL"`` -> 22)."""
    try:
        return int(getattr(_errno, name))
    except AttributeError as exc:
        raise ValueError(f"unknown errno name {name!r}") from exc


class HmmirrorError(Exception):
    """Base class of every error hmmirror raises on purpose."""


class KernelError(HmmirrorError):
    """A modelled kernel call failed with an errno (the Python face of ``return -EXXX``)."""

    def __init__(self, errno: int | str, message: str = "") -> None:
        self.errno = errno_value(errno) if isinstance(errno, str) else abs(int(errno))
        self.errno_name = errno_name(self.errno)
        self.message = message
        super().__init__(f"{self.errno_name}: {message}" if message else self.errno_name)


class InputError(KernelError):
    """Bad input from a user: file, argument, address or size.  One line, exit code 2 from the CLI."""

    def __init__(self, message: str, errno: int | str = "EINVAL", where: str | None = None) -> None:
        self.where = where
        super().__init__(errno, f"{where}: {message}" if where else message)

    def __str__(self) -> str:  # the one clear line
        return self.message


class ModelBug(HmmirrorError):
    """A model invariant broke (``BUG_ON``/``WARN_ON``).  The simulator turns it into a finding."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}")


class Deadlock(ModelBug):
    """A task waits for something nobody can provide (sequential runner: nobody else can run)."""

    def __init__(self, message: str) -> None:
        super().__init__("deadlock", message)


def check(ret: int, what: str = "") -> int:
    """Turn a kernel-style return value into a Python result: negative -> :class:`KernelError`."""
    if isinstance(ret, int) and ret < 0:
        raise KernelError(-ret, what)
    return ret
