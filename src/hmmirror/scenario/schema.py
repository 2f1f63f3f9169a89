"""Scenario files: TOML parsing and validation (the format is documented in docs/scenarios.md).

:func:`load` / :func:`parse` turn a file into a :class:`Scenario` whose every value is checked before anything
runs: sizes become ints, addresses become :class:`Addr` (a literal or ``NAME+OFFSET``, resolved by the runner
once ``NAME``'s ``mmap`` has run), unknown keys, unknown operations, bad sizes and unaligned or out-of-range
literal addresses are refused.  Every refusal is an :class:`~hmmirror.errors.InputError` whose message starts
with ``FILE:LINE:`` (``tomllib`` reports no positions, so :class:`Locator` finds the line of a key path by
scanning the source text).

Operations are described by :class:`OpDef` records in :data:`OPS`; :func:`register_op` adds one (the built-in
operations are registered by :mod:`hmmirror.scenario.runner`, later issues add theirs the same way).
"""

from __future__ import annotations

import errno as _errno
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmmirror.arch.x86.pgtable import PAGE_SIZE, Geometry
from hmmirror.errors import InputError
from hmmirror.include.pagestate import KINDS, LEVELS
from hmmirror.process import ADVICE, MAP_FLAGS, PROTS, fill_bytes
from hmmirror.profiles import get_profile

U64 = 1 << 64
_SIZE_RE = re.compile(r"^(0x[0-9a-f_]+|[0-9][0-9_]*)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
# a name may hold '-' but not before a digit: "buf-4K" is buf minus 4K, not a name
_NAME_RE = re.compile(r"^[A-Za-z_](?:[\w.]|-(?![0-9]))*$")
_EXPR_RE = re.compile(r"^([A-Za-z_](?:[\w.]|-(?![0-9]))*)\s*(?:([+-])\s*(.+))?$")
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

Path_ = tuple[str | int, ...]   # a key path: ("op", 3, "expect", "pages", 0, "kind")


# ----------------------------------------------------------------------------------------- values


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes of an int or a size string (``"4K"``, ``"2M"``, ``"1G"``, ``"4KiB"``, ``"0x3000"``).

    Negative, fractional or >= 2**64 values raise :class:`InputError` naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f"bad {what} {value!r}: use an integer or a size like \"4K\", \"2M\", \"1G\"")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise InputError(f"negative {what} {value!r}")
        m = _SIZE_RE.match(text)
        if not m:
            raise InputError(f"bad {what} {value!r}: use an integer or a size like \"4K\", \"2M\", \"1G\"")
        value = int(m.group(1).replace("_", ""), 0) * _MULT[m.group(2).lower()]
    if value < 0:
        raise InputError(f"negative {what} {value}")
    if value >= U64:
        raise InputError(f"{what} {value:#x} overflows 64 bits")
    return value


@dataclass(frozen=True)
class Addr:
    """An address: a literal (``name`` None) or ``name + offset`` where ``name`` is an earlier result."""

    offset: int
    name: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or (f"{self.offset:#x}" if self.name is None else f"{self.name}{self.offset:+#x}")


def parse_addr(value: Any, what: str = "address") -> Addr:
    """An :class:`Addr` from an int, a hex/decimal string or an expression ``NAME``, ``NAME+8K``, ``NAME-4K``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f"bad {what} {value!r}: use an integer, \"0x...\" or \"NAME+OFFSET\"")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"negative {what} {value}")
        if value >= U64:
            raise InputError(f"{what} {value:#x} overflows 64 bits")
        return Addr(value, None, f"{value:#x}")
    text = value.strip()
    if text.startswith("-"):
        raise InputError(f"negative {what} {value!r}")
    if text[:1].isdigit():
        try:
            lit = int(text.replace("_", ""), 0)
        except ValueError:
            raise InputError(f"bad {what} {value!r}: use an integer, \"0x...\" or \"NAME+OFFSET\"") from None
        return parse_addr(lit, what)
    m = _EXPR_RE.match(text)
    if not m:
        raise InputError(f"bad {what} {value!r}: use an integer, \"0x...\" or \"NAME+OFFSET\"")
    off = parse_size(m.group(3).strip(), f"offset in {what} {value!r}") if m.group(3) else 0
    return Addr(-off if m.group(2) == "-" else off, m.group(1), text)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{what} must be true or false, not {value!r}")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer, not {value!r}")
    return value


def _count(value: Any, what: str) -> int:
    v = _int(value, what)
    if v < 0:
        raise InputError(f"negative {what} {v}")
    return v


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{what} must be a non-empty string, not {value!r}")
    return value


def _name(value: Any, what: str) -> str:
    s = _str(value, what)
    if not _NAME_RE.match(s):
        raise InputError(f"{what} {s!r} is not a name (letters, digits, '_', '-', '.'; not starting with a digit)")
    return s


#: Device files a mapping may name without a path: ``pfnmap`` (VM_PFNMAP), ``mixedmap`` (VM_MIXEDMAP, simulator).
SPECIAL_FILES = ("pfnmap", "mixedmap")


def _path(value: Any, what: str) -> str:
    s = _str(value, what)
    if not s.startswith("/") and s not in SPECIAL_FILES:
        raise InputError(f"{what} {s!r} must be an absolute path (or \"pfnmap\")")
    return s


def _prot(value: Any, what: str) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7:
        return value
    if not isinstance(value, str) or value.lower() not in PROTS:
        raise InputError(f"unknown {what} {value!r} (one of {', '.join(PROTS)})")
    return value.lower()


def _flags(value: Any, what: str) -> list[str]:
    names = [s.strip() for s in re.split(r"[,|]", value)] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{what} must be a list of names like [\"private\", \"anonymous\"], not {value!r}")
    for n in names:
        if n.lower() not in MAP_FLAGS:
            raise InputError(f"unknown mmap flag {n!r} (one of {', '.join(MAP_FLAGS)})")
    return [n.lower() for n in names]


def _advice(value: Any, what: str) -> str:
    if not isinstance(value, str) or value.lower() not in ADVICE:
        raise InputError(f"unknown {what} {value!r} (one of {', '.join(sorted(ADVICE))})")
    return value.lower()


def _fill(value: Any, what: str) -> str | int:
    try:
        fill_bytes(value, 0)
    except InputError:
        raise InputError(f"bad {what} {value!r} (use \"index32\" or a byte value 0..255)") from None
    return value


def _align(value: Any, what: str) -> int:
    v = parse_size(value, what)
    if v < PAGE_SIZE or v & (v - 1):
        raise InputError(f"{what} {value!r} must be a power of two of at least 4K")
    return v


def _enum(*choices: str) -> Callable[[Any, str], str]:
    def conv(value: Any, what: str) -> str:
        if value not in choices:
            raise InputError(f"{what} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    conv.__name__ = f"one of {choices}"
    return conv


def _errno_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.isupper() or not hasattr(_errno, value):
        raise InputError(f"{what} {value!r} is not an errno name like \"EINVAL\"")
    return value


#: Value kinds usable in :class:`OpDef` key tables (a callable ``conv(value, what)`` is also accepted).
KINDS_OF_VALUE: dict[str, Callable[[Any, str], Any]] = {
    "size": parse_size, "addr": parse_addr, "int": _int, "count": _count, "bool": _bool, "str": _str,
    "name": _name, "path": _path, "prot": _prot, "flags": _flags, "advice": _advice, "fill": _fill,
    "access": _enum("read", "write"), "errno": _errno_name, "align": _align,
}


# ----------------------------------------------------------------------------------------- source lines


class Locator:
    """Line numbers of the keys, tables and array elements of TOML source text (our helper).

    ``tomllib`` returns plain dicts without positions; this scanner walks the (already valid) text once and
    records the line of every key path, e.g. ``("op", 3, "length")`` or ``("machine", "pmem", 0)``.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Path_, int] = {}
        self._aot: dict[Path_, int] = {}
        try:
            self._scan()
        except (IndexError, ValueError, RecursionError):   # best effort: positions are a convenience
            pass

    def find(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path`` or of its nearest recorded ancestor (None if nothing matches)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    # -- scanner --
    def _peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def _adv(self, n: int = 1) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def _ws(self, newlines: bool = False) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._adv()
            elif c == "#" and newlines:
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def _skip_comment_line(self) -> None:
        self._ws()
        if self._peek() == "#":
            while self.i < len(self.s) and self.s[self.i] != "\n":
                self.i += 1

    def _string(self) -> str:
        q3 = self._peek(3)
        if q3 in ('"""', "'''"):
            end = self.s.index(q3, self.i + 3)
            while self.s[end + 3:end + 4] == q3[0]:   # up to two quotes may end the content
                end += 1
            text = self.s[self.i + 3:end]
            self._adv(end + 3 - self.i)
            return text
        q = self._peek()
        j = self.i + 1
        while self.s[j] != q:
            j += 2 if (q == '"' and self.s[j] == "\\") else 1
        text = self.s[self.i + 1:j]
        self._adv(j + 1 - self.i)
        return text

    def _key(self) -> list[str]:
        parts = []
        while True:
            self._ws()
            c = self._peek()
            if c in ('"', "'"):
                parts.append(self._string())
            else:
                j = self.i
                while j < len(self.s) and (self.s[j].isalnum() or self.s[j] in "_-"):
                    j += 1
                if j == self.i:
                    raise ValueError("no key")
                parts.append(self.s[self.i:j])
                self.i = j
            self._ws()
            if self._peek() != ".":
                return parts
            self._adv()

    def _value(self, path: Path_) -> None:
        c = self._peek()
        if c in ('"', "'"):
            self._string()
        elif c == "{":
            self._adv()
            while True:
                self._ws()
                if self._peek() == "}":
                    self._adv()
                    return
                if self._peek() == ",":
                    self._adv()
                    continue
                line = self.line
                parts = self._key()
                self.lines.setdefault(path + tuple(parts), line)
                self._ws()
                self._adv()                       # '='
                self._ws()
                self._progress(path + tuple(parts))
        elif c == "[":
            self._adv()
            n = 0
            while True:
                self._ws(newlines=True)
                if self._peek() == "]":
                    self._adv()
                    return
                if self._peek() == ",":
                    self._adv()
                    n += 1
                    continue
                self.lines.setdefault(path + (n,), self.line)
                self._progress(path + (n,))
        else:
            while self.i < len(self.s) and self.s[self.i] not in ",]}\n#":
                self.i += 1

    def _progress(self, path: Path_) -> None:
        """``_value`` that must consume something (a stuck scanner gives up instead of looping)."""
        at = self.i
        self._value(path)
        if self.i == at:
            raise ValueError("scanner made no progress")

    def _header(self, aot: bool) -> Path_:
        line = self.line
        self._adv(2 if aot else 1)
        parts = self._key()
        self._ws()
        self._adv(2 if aot else 1)
        path: Path_ = ()
        for k, name in enumerate(parts):
            path = path + (name,)
            if aot and k == len(parts) - 1:
                n = self._aot.get(path, 0)
                self._aot[path] = n + 1
                self.lines.setdefault(path, line)
                path = path + (n,)
            elif path in self._aot:
                path = path + (self._aot[path] - 1,)
        self.lines[path] = line
        return path

    def _scan(self) -> None:
        table: Path_ = ()
        while True:
            self._ws(newlines=True)
            if self.i >= len(self.s):
                return
            if self._peek(2) == "[[":
                table = self._header(True)
            elif self._peek() == "[":
                table = self._header(False)
            else:
                line = self.line
                parts = self._key()
                self.lines.setdefault(table + tuple(parts), line)
                self._ws()
                self._adv()                       # '='
                self._ws()
                self._value(table + tuple(parts))
            self._skip_comment_line()


def path_str(path: Sequence[str | int]) -> str:
    """``("op", 3, "expect", "ret")`` -> ``op[3].expect.ret``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# ----------------------------------------------------------------------------------------- operations


@dataclass
class OpDef:
    """How an operation is written and run.

    ``keys``: key -> value kind (a name of :data:`KINDS_OF_VALUE`, a tuple of allowed strings, or a callable
    ``conv(value, what)`` raising InputError); the common keys ``op``, ``proc``, ``as``, ``expect``,
    ``comment`` are implicit.  ``required``: keys that must be present.  ``range_op``: the op acts on
    ``addr``/``length``; ``length`` may be left out when ``addr`` names a mapping (to its end).
    ``aligned``: keys whose value must be page aligned (an unaligned value is bad input unless the op
    expects an errno).  ``as_kind``: what ``as`` names: ``"mapping"`` (usable in address expressions, with
    a length), ``"value"`` (an address-like result) or ``"pages"`` (an inspection, for pfn comparisons).
    ``handler(ctx, op)`` runs it (see :mod:`hmmirror.scenario.runner`); ``expect_keys``: extra expectation
    keys, compared with equal-named fields of the outcome's ``extra``.
    """

    name: str
    handler: Callable[..., Any]
    keys: Mapping[str, Any] = field(default_factory=dict)
    required: Sequence[str] = ()
    range_op: bool = False
    aligned: Sequence[str] = ()
    as_kind: str = "value"
    ret_kind: str = "int"          # "int" or "addr" (reported as a hex string)
    expect_keys: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


#: Registered operations by name.
OPS: dict[str, OpDef] = {}

COMMON_OP_KEYS = ("op", "proc", "as", "expect", "comment")


def register_op(name: str, handler: Callable[..., Any], keys: Mapping[str, Any] | None = None,
                required: Sequence[str] = (), **options: Any) -> OpDef:
    """Register (or replace) the operation ``name``; ``options`` are the other :class:`OpDef` fields.

    Example (a later issue's HMM op)::

        register_op("range_fault", my_handler, keys={"mirror": "name", "addr": "addr", "length": "size",
                    "write": "bool"}, required=("mirror", "addr"), range_op=True)
    """
    bad = [k for k in (keys or {}) if k in COMMON_OP_KEYS]
    if bad:
        raise ValueError(f"op {name!r}: key {bad[0]!r} is common to every op; do not redeclare it")
    for k, kind in (keys or {}).items():
        if isinstance(kind, str) and kind not in KINDS_OF_VALUE:
            raise ValueError(f"op {name!r}: key {k!r} has unknown kind {kind!r} (one of {', '.join(KINDS_OF_VALUE)})")
    d = OpDef(name, handler, dict(keys or {}), tuple(required), **options)
    OPS[name] = d
    return d


def _converter(kind: Any) -> Callable[[Any, str], Any]:
    if callable(kind):
        return kind
    if isinstance(kind, tuple):
        return _enum(*kind)
    return KINDS_OF_VALUE[kind]


# ----------------------------------------------------------------------------------------- the model of a file


@dataclass
class PageRow:
    """One row of ``expect.pages``: pages ``first..last`` (inclusive, indices in the inspected range)."""

    first: int
    last: int | None                   # None: to the end of the range ("all" / "N-")
    fields: dict[str, Any]
    pfn_same_as: str | None = None
    pfn_differs_from: str | None = None
    contiguous: bool | None = None
    path: Path_ = ()
    text: str = ""


@dataclass
class Expect:
    """One ``expect`` table of an op."""

    kernels: tuple[str, ...] | None = None   # applies only under these profiles (None: all)
    ret: Any = None                           # int or Addr (for address results)
    errno: str | None = None
    pages: list[PageRow] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path_ = ()


@dataclass
class Op:
    """One validated ``[[op]]``: converted arguments in ``args`` (addresses as :class:`Addr`), the raw table
    in ``raw`` (as written, for the live executor), its ``line``."""

    index: int
    name: str
    proc: str
    args: dict[str, Any]
    raw: dict[str, Any]
    as_: str | None = None
    expect: list[Expect] = field(default_factory=list)
    line: int | None = None
    path: Path_ = ()

    @property
    def expects_errno(self) -> bool:
        return any(e.errno for e in self.expect)


@dataclass
class PmemSpec:
    name: str
    size: int
    mode: str
    align: int
    line: int | None = None


@dataclass
class FsSpec:
    mount: str
    type: str
    dax: str | None = None
    huge: str = "never"
    pagesize: int | None = None
    line: int | None = None


@dataclass
class FileSpec:
    path: str
    size: int
    content: str = "data"
    line: int | None = None
    cached: bool = True


@dataclass
class MachineSpec:
    kernel: str = "6.18"
    ram: int = 1 << 30
    paging: int = 4
    hugepages_2m: int = 0
    hugepages_1g: int = 0
    thp: dict[str, Any] = field(default_factory=dict)
    pmem: list[PmemSpec] = field(default_factory=list)
    fs: list[FsSpec] = field(default_factory=list)
    line: int | None = None


@dataclass
class Scenario:
    """A parsed and validated scenario file."""

    file: str
    text: str
    data: dict[str, Any]
    machine: MachineSpec
    files: list[FileSpec]
    processes: list[str]
    ops: list[Op]
    title: str = ""
    description: str = ""
    locator: Locator | None = None

    def where(self, path: Sequence[str | int]) -> str:
        """``FILE:LINE`` of a key path (``FILE`` when no line is known)."""
        line = self.locator.find(path) if self.locator else None
        return f"{self.file}:{line}" if line else self.file

    def raw_ops(self) -> list[dict[str, Any]]:
        """The ops as written (dicts of docs/scenarios.md), e.g. for :func:`hmmirror.live.executor.run_ops`."""
        return [dict(op.raw) for op in self.ops]

    def raw_files(self) -> list[dict[str, Any]]:
        return [{"path": f.path, "size": f.size, "content": f.content, "cached": f.cached} for f in self.files]


# ----------------------------------------------------------------------------------------- validation

TOP_KEYS = ("title", "description", "machine", "file", "process", "op", "limits")
MACHINE_KEYS = ("kernel", "ram", "paging", "hugepages_2m", "hugepages_1g", "thp", "pmem", "fs")
THP_KEYS = {"enabled": ("always", "madvise", "never"), "defrag": ("always", "defer", "defer+madvise", "madvise",
                                                                  "never"),
            "use_zero_page": "bool", "shmem_enabled": ("never", "always", "within_size", "advise")}
PMEM_KEYS = ("name", "size", "mode", "align")
FS_KEYS = ("mount", "type", "dax", "huge", "pagesize")
FS_TYPES = ("ext4", "xfs", "tmpfs", "hugetlbfs")
FILE_KEYS = ("path", "size", "content", "cached")
EXPECT_KEYS = ("kernel", "ret", "errno", "pages")
ROW_SPECIAL = ("range", "pfn_same_as", "pfn_differs_from", "contiguous")
ROW_BOOL_FIELDS = ("present", "write", "zero", "huge", "file", "exclusive", "swapped", "protnone")


#: The model's limits (bad input beyond them): RAM, one ext4/xfs file (the page cache index is an array).
MAX_RAM = 64 << 30
MAX_FILE = 64 << 30
#: Pages a scenario may make the model work through one by one (touch, inspect, HMM and dmirror ranges,
#: populate), about 30 us each: the default bounds a scenario to well under a minute; ``[limits] pages``
#: raises it up to the maximum.
DEFAULT_PAGE_BUDGET = 1 << 19
MAX_PAGE_BUDGET = 1 << 24
#: Range ops whose cost does not grow with the pages of the range (per VMA, per present entry).
CHEAP_RANGE_OPS = ("munmap", "mprotect", "madvise", "mremap")
PER_PAGE_ADVICE = ("willneed", "populate_read", "populate_write")


class _Validator:
    """Walks the parsed TOML dict and builds the :class:`Scenario`; every error names FILE:LINE."""

    def __init__(self, file: str, text: str, allowed_ops: Sequence[str] | None = None) -> None:
        self.file = file
        self.text = text
        self.loc = Locator(text)
        self.allowed_ops = tuple(allowed_ops) if allowed_ops is not None else None
        self.fs_used: dict[str, int] = {}
        self.special_files: tuple[str, ...] = ("pfnmap",)
        self.ops_where = "here"
        self.fork_unique = True         # a second fork to the same name is bad input (the simulator: EEXIST)
        self.page_budget = DEFAULT_PAGE_BUDGET

    def fail(self, path: Sequence[str | int], msg: str) -> InputError:
        line = self.loc.find(path)
        where = f"{self.file}:{line}" if line else self.file
        return InputError(msg, where=where)

    def table(self, value: Any, path: Path_, allowed: Sequence[str], what: str | None = None) -> dict[str, Any]:
        """``value`` must be a table whose keys are all in ``allowed``."""
        what = what or path_str(path)
        if not isinstance(value, dict):
            raise self.fail(path, f"{what} must be a table, not {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(path + (k,), f"unknown key {k!r} in {what} (known: {', '.join(allowed)})")
        return value

    def array_of_tables(self, value: Any, path: Path_) -> list[dict[str, Any]]:
        if isinstance(value, dict):
            raise self.fail(path, f"{path_str(path)} must be an array of tables: write [[{path_str(path)}]]")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(path, f"{path_str(path)} must be an array of tables: write [[{path_str(path)}]]")
        return value

    def conv(self, conv: Callable[[Any, str], Any], value: Any, path: Path_, what: str | None = None,
             prefix: str | None = None) -> Any:
        """``conv(value, what)``; an error is located at ``path`` and prefixed (``op 3 (mmap): ...``)."""
        try:
            return conv(value, what or path_str(path))
        except InputError as exc:
            raise self.fail(path, f"{prefix}: {exc}" if prefix else str(exc)) from None
        except RecursionError:
            raise self.fail(path, f"{prefix + ': ' if prefix else ''}{what or path_str(path)}: "
                                  f"value nested too deeply") from None

    # -- sections --
    def scenario(self, data: dict[str, Any]) -> Scenario:
        self.table(data, (), TOP_KEYS, "the top level")
        title = self.conv(_str, data["title"], ("title",)) if "title" in data else ""
        desc = self.conv(_str, data["description"], ("description",)) if "description" in data else ""
        machine = self.machine(data.get("machine", {}))
        self.geo = Geometry(machine.paging)
        files = [self.file_entry(f, ("file", i), machine)
                 for i, f in enumerate(self.array_of_tables(data.get("file", []), ("file",)))]
        procs: list[str] = []
        for i, p in enumerate(self.array_of_tables(data.get("process", []), ("process",))):
            self.table(p, ("process", i), ("name",))
            name = self.conv(_name, p.get("name", "p"), ("process", i, "name"), "process name")
            if name in procs:
                raise self.fail(("process", i, "name"), f"process {name!r} is declared twice")
            procs.append(name)
        if "process" in data and not procs:
            raise self.fail(("process",), "process is an empty array: declare at least one [[process]] "
                                          "(or leave it out for one process \"p\")")
        procs = procs or ["p"]
        self.page_budget = self.limits(data.get("limits", {}))
        self.devices = {f"/dev/dax{m.name[4:] if m.name.startswith('pmem') else m.name}.0"
                        for m in machine.pmem if m.mode == "devdax"}
        self.file_paths = {f.path for f in files}
        ops = self.ops(self.array_of_tables(data.get("op", []), ("op",)), procs, machine)
        self.check_budget(files, ops)
        return Scenario(self.file, self.text, data, machine, files, procs, ops, title, desc, self.loc)

    def limits(self, value: Any) -> int:
        """``[limits] pages = N``: the page budget (default :data:`DEFAULT_PAGE_BUDGET`)."""
        lim = self.table(value, ("limits",), ("pages",), "[limits]")
        if "pages" not in lim:
            return DEFAULT_PAGE_BUDGET
        n = self.conv(_count, lim["pages"], ("limits", "pages"), "limits.pages")
        if not 1 <= n <= MAX_PAGE_BUDGET:
            raise self.fail(("limits", "pages"), f"limits.pages must be between 1 and {MAX_PAGE_BUDGET}, not {n}")
        return n

    def check_budget(self, files: list[FileSpec], ops: list[Op]) -> None:
        """Pages the scenario makes the model work through one by one, against the page budget: the ops that
        walk, fault or copy their range page by page, ``populate`` mmaps, and files created uncached."""
        lengths: dict[str, int] = {}
        used = 0
        for f in files:
            if not f.cached:
                used += -(-f.size // PAGE_SIZE)
        for op in ops:
            n = 0
            length = op.args.get("length")
            if op.name == "mmap":
                if isinstance(length, int) and length >= self.geo.task_size:
                    raise self.fail(op.path + ("length",), f"op {op.index} (mmap): length {length:#x} is larger "
                                                           f"than the user address space ({self.geo.task_size:#x})")
                if op.as_ and isinstance(length, int):
                    lengths[op.as_] = length
                if "populate" in (op.args.get("flags") or ()) and isinstance(length, int):
                    n = length
            elif OPS[op.name].range_op and op.name not in CHEAP_RANGE_OPS and not (
                    op.name == "madvise" and op.args.get("advice") not in PER_PAGE_ADVICE):
                if not isinstance(length, int):
                    addr = op.args.get("addr")
                    length = lengths.get(addr.name, 0) if isinstance(addr, Addr) and addr.name else 0
                n = length
            if op.name == "fork":
                n = 0
            used += -(-int(n) // PAGE_SIZE)
            if used > self.page_budget:
                raise self.fail(op.path, f"op {op.index} ({op.name}): the scenario works through {used} pages "
                                         f"one by one by here, over its page budget of {self.page_budget} "
                                         f"(raise it with [limits] pages = N, at most {MAX_PAGE_BUDGET})")
        if used > self.page_budget:
            raise self.fail(("file",), f"the uncached files hold {used} pages, over the page budget of "
                                       f"{self.page_budget} (raise it with [limits] pages = N)")

    def machine(self, m: Any) -> MachineSpec:
        path: Path_ = ("machine",)
        self.table(m, path, MACHINE_KEYS, "[machine]")
        spec = MachineSpec(line=self.loc.find(path))
        if "kernel" in m:
            try:
                spec.kernel = get_profile(m["kernel"]).name
            except InputError as exc:
                raise self.fail(path + ("kernel",), str(exc)) from None
        if "ram" in m:
            spec.ram = self.conv(parse_size, m["ram"], path + ("ram",), "machine.ram")
            if spec.ram == 0 or spec.ram % (2 << 20):
                raise self.fail(path + ("ram",), f"machine.ram {m['ram']!r} must be a positive multiple of 2M")
            if spec.ram > MAX_RAM:
                raise self.fail(path + ("ram",), f"machine.ram {m['ram']!r} is more than the model supports "
                                                 f"({MAX_RAM >> 30}G)")
        if "paging" in m:
            spec.paging = self.conv(_int, m["paging"], path + ("paging",), "machine.paging")
            if spec.paging not in (4, 5):
                raise self.fail(path + ("paging",), f"machine.paging must be 4 or 5 levels, not {spec.paging}")
        for k in ("hugepages_2m", "hugepages_1g"):
            if k in m:
                setattr(spec, k, self.conv(_count, m[k], path + (k,), f"machine.{k}"))
        if spec.hugepages_2m * (2 << 20) + spec.hugepages_1g * (1 << 30) > spec.ram:
            raise self.fail(path + ("hugepages_2m" if "hugepages_2m" in m else "hugepages_1g",),
                            f"the hugetlb pool ({spec.hugepages_2m} x 2M + {spec.hugepages_1g} x 1G) is larger "
                            f"than machine.ram ({spec.ram >> 20}M)")
        if "thp" in m:
            thp = self.table(m["thp"], path + ("thp",), tuple(THP_KEYS), "machine.thp")
            spec.thp = {k: self.conv(_converter(THP_KEYS[k]), v, path + ("thp", k), f"machine.thp.{k}")
                        for k, v in thp.items()}
        for i, p in enumerate(self.array_of_tables(m.get("pmem", []), path + ("pmem",))):
            pp = path + ("pmem", i)
            self.table(p, pp, PMEM_KEYS, f"machine.pmem[{i}]")
            for k in ("name", "size"):
                if k not in p:
                    raise self.fail(pp, f"machine.pmem[{i}] needs a {k!r}")
            name = self.conv(_name, p["name"], pp + ("name",), "pmem name")
            if any(x.name == name for x in spec.pmem):
                raise self.fail(pp + ("name",), f"pmem device {name!r} is declared twice")
            size = self.conv(parse_size, p["size"], pp + ("size",), f"size of pmem {name}")
            if size == 0 or size % (2 << 20):
                raise self.fail(pp + ("size",), f"size of pmem {name} must be a positive multiple of 2M")
            mode = self.conv(_enum("fsdax", "devdax"), p.get("mode", "fsdax"), pp + ("mode",), "pmem mode")
            align = self.conv(parse_size, p.get("align", "2M"), pp + ("align",), "pmem align")
            if align not in (4096, 2 << 20, 1 << 30):
                raise self.fail(pp + ("align",), f"pmem align must be \"4K\", \"2M\" or \"1G\", not {p['align']!r}")
            spec.pmem.append(PmemSpec(name, size, mode, align, self.loc.find(pp)))
        for i, f in enumerate(self.array_of_tables(m.get("fs", []), path + ("fs",))):
            fp = path + ("fs", i)
            self.table(f, fp, FS_KEYS, f"machine.fs[{i}]")
            for k in ("mount", "type"):
                if k not in f:
                    raise self.fail(fp, f"machine.fs[{i}] needs a {k!r}")
            mount = self.conv(_path, f["mount"], fp + ("mount",), "mount point")
            fstype = self.conv(_enum(*FS_TYPES), f["type"], fp + ("type",), "fs type")
            dax = None
            if "dax" in f:
                dax = self.conv(_name, f["dax"], fp + ("dax",), "dax device")
                dev = next((x for x in spec.pmem if x.name == dax), None)
                if dev is None or dev.mode != "fsdax":
                    raise self.fail(fp + ("dax",), f"dax = {dax!r} names no fsdax [[machine.pmem]] device")
                if fstype not in ("ext4", "xfs"):
                    raise self.fail(fp + ("dax",), f"-o dax needs ext4 or xfs, not {fstype}")
            huge = self.conv(_enum("never", "always", "within_size", "advise"), f.get("huge", "never"),
                             fp + ("huge",), "tmpfs huge")
            pagesize = None
            if "pagesize" in f:
                pagesize = self.conv(parse_size, f["pagesize"], fp + ("pagesize",), "hugetlbfs pagesize")
                if pagesize not in (2 << 20, 1 << 30):
                    raise self.fail(fp + ("pagesize",), "hugetlbfs pagesize must be \"2M\" or \"1G\"")
            spec.fs.append(FsSpec(mount, fstype, dax, huge, pagesize, self.loc.find(fp)))
        return spec

    def file_entry(self, f: dict[str, Any], path: Path_, machine: MachineSpec) -> FileSpec:
        self.table(f, path, FILE_KEYS, f"file[{path[1]}]")
        if "path" not in f:
            raise self.fail(path, f"file[{path[1]}] needs a 'path'")
        p = self.conv(_path, f["path"], path + ("path",), "file path")
        if not any(p.startswith(fs.mount.rstrip("/") + "/") for fs in machine.fs):
            known = ", ".join(fs.mount for fs in machine.fs) or "none"
            raise self.fail(path + ("path",), f"file {p!r} is under no [[machine.fs]] mount (mounts: {known})")
        size = self.conv(parse_size, f.get("size", 0), path + ("size",), "file size")
        fs = max((x for x in machine.fs if p.startswith(x.mount.rstrip("/") + "/")), key=lambda x: len(x.mount))
        if fs.dax is not None:
            cap, what = next(d.size for d in machine.pmem if d.name == fs.dax), f"the pmem device {fs.dax}"
        elif fs.type in ("tmpfs", "hugetlbfs"):
            cap, what = machine.ram, "machine.ram"
        else:
            cap, what = MAX_FILE, "the model's largest file"
        used = self.fs_used.get(fs.mount, 0)
        if used + size > cap:
            raise self.fail(path + ("size",), f"file {p!r}: {size >> 20}M (with the other files of {fs.mount}: "
                                              f"{(used + size) >> 20}M) does not fit {what} ({cap >> 20}M)")
        self.fs_used[fs.mount] = used + size
        content = self.conv(_enum("data", "sparse", "zero"), f.get("content", "data"), path + ("content",),
                            "file content")
        cached = self.conv(_bool, f.get("cached", True), path + ("cached",), "file cached")
        return FileSpec(p, size, content, self.loc.find(path), cached)

    def ops(self, ops: list[dict[str, Any]], procs: list[str], machine: MachineSpec, base: Path_ = ("op",),
            names: dict[str, str] | None = None) -> list[Op]:
        from hmmirror.scenario.runner import load_extensions   # the built-in ops register themselves there

        load_extensions()
        live = list(procs)                 # processes that exist at this point of the list
        names = {} if names is None else names      # `as` name -> as_kind of its op
        self.names = names
        out = []
        for i, raw in enumerate(ops):
            path: Path_ = base + (i,)
            if not isinstance(raw, dict):
                raise self.fail(path, f"op {i} must be a table like {{ op = \"touch\", addr = \"m0\" }}, "
                                      f"not {type(raw).__name__}")
            kind = raw.get("op")
            if kind is None:
                raise self.fail(path, f"op {i} has no 'op' key (one of {', '.join(sorted(OPS))})")
            if not isinstance(kind, str):
                raise self.fail(path + ("op",), f"op {i}: 'op' must be the name of an operation (a string), "
                                                f"not {type(kind).__name__}")
            if kind not in OPS or (self.allowed_ops is not None and kind not in self.allowed_ops):
                if self.allowed_ops is not None and kind in OPS:
                    raise self.fail(path + ("op",), f"op {i}: {kind!r} cannot run {self.ops_where} "
                                                    f"(one of {', '.join(self.allowed_ops)})")
                raise self.fail(path + ("op",), f"op {i}: unknown op {kind!r} (one of {', '.join(sorted(OPS))})")
            d = OPS[kind]
            what = f"op {i} ({kind})"
            self.table(raw, path, tuple(d.keys) + COMMON_OP_KEYS, what)
            for k in d.required:
                if k not in raw:
                    raise self.fail(path, f"{what}: missing key {k!r}")
            proc = self.conv(_name, raw.get("proc", procs[0]), path + ("proc",), "proc", what)
            if proc not in live:
                raise self.fail(path + ("proc",), f"{what}: unknown process {proc!r} (known here: {', '.join(live)})")
            args = {k: self.conv(_converter(d.keys[k]), v, path + (k,), k, what)
                    for k, v in raw.items() if k in d.keys}
            op = Op(i, kind, proc, args, raw, line=self.loc.find(path), path=path)
            if "comment" in raw:
                self.conv(_str, raw["comment"], path + ("comment",), "comment", what)
            if "expect" in raw:
                op.expect = self.expects(raw["expect"], path + ("expect",), d, what)
            self.check_op(op, d, names, what, machine)
            if "as" in raw:
                op.as_ = self.conv(_name, raw["as"], path + ("as",), "as", what)
                names[op.as_] = d.as_kind
            if kind == "fork":
                child = args["child"]
                if child in live and self.fork_unique:
                    raise self.fail(path + ("child",), f"{what}: a process named {child!r} already exists")
                live.append(child)
            out.append(op)
        return out

    def check_op(self, op: Op, d: OpDef, names: dict[str, str], what: str, machine: MachineSpec) -> None:
        """Static checks: names defined earlier, alignment, ranges inside the user address space, files."""
        p = op.path
        for k, v in op.args.items():
            if isinstance(v, Addr) and v.name is not None:
                kind = names.get(v.name)
                if kind is None:
                    raise self.fail(p + (k,), f"{what}: address {v.text!r} names no earlier result (`as = ...`)")
                if kind == "pages":
                    raise self.fail(p + (k,), f"{what}: {v.name!r} names an inspection, not an address")
        addr = op.args.get("addr")
        if d.range_op and "length" not in op.args and isinstance(addr, Addr):
            if addr.name is None or names.get(addr.name) != "mapping":
                raise self.fail(p, f"{what}: missing key 'length' (it may be left out only when addr names a "
                                   f"mapping)")
        for k in d.aligned:
            v = op.args.get(k)
            off = v.offset if isinstance(v, Addr) and (v.name is None or names.get(v.name) == "mapping") else (
                v if isinstance(v, int) else None)
            if off is not None and off % PAGE_SIZE and not op.expects_errno:
                raise self.fail(p + (k,), f"{what}: {k} {op.raw[k]!r} is not page aligned (4K); "
                                          f"add expect.errno to test the kernel's answer")
        length = op.args.get("length")
        if isinstance(addr, Addr) and addr.name is None:
            top = self.geo.task_size
            end = addr.offset + (length if isinstance(length, int) else 0)
            if addr.offset >= top or end > top:
                raise self.fail(p + ("addr",), f"{what}: range {addr.offset:#x}+{(length or 0):#x} is outside the "
                                               f"user address space [0, {top:#x}) of {machine.paging}-level paging")
        f = op.args.get("file")
        if f == "mixedmap" and "mixedmap" not in self.special_files:
            raise self.fail(p + ("file",), f"{what}: \"mixedmap\" is a device of simulator scenarios only")
        if isinstance(f, str) and f not in SPECIAL_FILES and not f.startswith("/dev/") and f not in self.file_paths:
            known = ", ".join(sorted(self.file_paths)) or "none"
            raise self.fail(p + ("file",), f"{what}: file {f!r} is not a [[file]] of the scenario (files: {known})")
        if isinstance(f, str) and f.startswith("/dev/dax") and f not in self.devices:
            known = ", ".join(sorted(self.devices)) or "none"
            raise self.fail(p + ("file",), f"{what}: {f} is no device-dax device of the machine (devices: {known})")
        for e in op.expect:
            if e.pages is not None and not d.range_op and d.name != "mmap":
                raise self.fail(e.path + ("pages",), f"{what}: expect.pages needs an op with a range "
                                                     f"(use an inspect op)")
            for row in e.pages or ():
                for ref in (row.pfn_same_as, row.pfn_differs_from):
                    if ref is not None and names.get(ref) != "pages":
                        raise self.fail(row.path, f"{what}: {ref!r} names no earlier inspect (`as = ...`)")

    def expects(self, value: Any, path: Path_, d: OpDef, what: str) -> list[Expect]:
        if isinstance(value, dict):
            return [self.expect(value, path, d, what)]
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return [self.expect(v, path + (j,), d, what) for j, v in enumerate(value)]
        raise self.fail(path, f"{what}: expect must be a table (or an array of tables), not {value!r}")

    def expect(self, e: dict[str, Any], path: Path_, d: OpDef, what: str) -> Expect:
        self.table(e, path, EXPECT_KEYS + tuple(d.expect_keys), f"{what}: expect")
        out = Expect(path=path)
        if "kernel" in e:
            ks = e["kernel"] if isinstance(e["kernel"], list) else [e["kernel"]]
            try:
                out.kernels = tuple(get_profile(k).name for k in ks)
            except InputError as exc:
                raise self.fail(path + ("kernel",), f"{what}: expect.kernel: {exc}") from None
        if "errno" in e:
            out.errno = self.conv(_errno_name, e["errno"], path + ("errno",), "expect.errno", what)
        if "ret" in e:
            conv = parse_addr if d.ret_kind == "addr" else _int
            out.ret = self.conv(conv, e["ret"], path + ("ret",), "expect.ret", what)
            if isinstance(out.ret, Addr) and out.ret.name is not None:
                raise self.fail(path + ("ret",), f"{what}: expect.ret must be a literal address")
        if out.errno and "ret" in e:
            raise self.fail(path, f"{what}: expect has both 'ret' and 'errno' (an op either succeeds or fails)")
        if "pages" in e:
            rows = e["pages"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise self.fail(path + ("pages",), f"{what}: expect.pages must be a list of tables like "
                                                   f"{{ range = \"0-3\", kind = \"anon\" }}")
            out.pages = [self.page_row(r, path + ("pages", j), what) for j, r in enumerate(rows)]
        for k, kind in d.expect_keys.items():
            if k in e:
                out.extra[k] = self.conv(_converter(kind), e[k], path + (k,), f"expect.{k}", what)
        return out

    def page_row(self, r: dict[str, Any], path: Path_, what: str) -> PageRow:
        allowed = ROW_SPECIAL + ("kind", "level", "pfn") + ROW_BOOL_FIELDS
        self.table(r, path, allowed, f"{what}: expect.pages row")
        if "range" not in r:
            raise self.fail(path, f"{what}: expect.pages row needs a 'range' (\"i\", \"i-j\" or \"all\")")
        text = r["range"]
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d*)\s*)?", str(text)) if isinstance(text, str | int) else None
        if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
            first, last = text, text
        elif text in ("all", "*"):
            first, last = 0, None
        elif m and isinstance(text, str):
            first = int(m.group(1))
            last = first if m.group(2) is None else (int(m.group(2)) if m.group(2) else None)
            if last is not None and last < first:
                raise self.fail(path + ("range",), f"{what}: page range {text!r} ends before it starts")
        else:
            raise self.fail(path + ("range",), f"{what}: bad page range {text!r} (use \"i\", \"i-j\", \"i-\" or "
                                               f"\"all\": page indices of the inspected range)")
        fields: dict[str, Any] = {}
        for k, v in r.items():
            kp = path + (k,)
            if k in ROW_BOOL_FIELDS:
                fields[k] = self.conv(_bool, v, kp, k, what)
            elif k == "kind":
                fields[k] = self.conv(_enum(*KINDS), v, kp, "kind", what)
            elif k == "level":
                lv = self.conv(_enum(*LEVELS, "none"), v, kp, "level", what)
                fields[k] = None if lv == "none" else lv
            elif k == "pfn":
                fields[k] = self.conv(parse_addr, v, kp, "pfn", what).offset
        row = PageRow(first, last, fields, path=path, text=str(text))
        if "pfn_same_as" in r:
            row.pfn_same_as = self.conv(_name, r["pfn_same_as"], path + ("pfn_same_as",), "pfn_same_as", what)
        if "pfn_differs_from" in r:
            row.pfn_differs_from = self.conv(_name, r["pfn_differs_from"], path + ("pfn_differs_from",),
                                             "pfn_differs_from", what)
        if "contiguous" in r:
            row.contiguous = self.conv(_bool, r["contiguous"], path + ("contiguous",), "contiguous", what)
        return row


def _toml_error(file: str, exc: tomllib.TOMLDecodeError) -> InputError:
    """``FILE:LINE:COL: malformed TOML: ...`` from tomllib's ``... (at line L, column C)``."""
    msg = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m:
        return InputError(f"malformed TOML: {msg[:m.start()]}", where=f"{file}:{m.group(1)}:{m.group(2)}")
    m = re.search(r"\s*\(at end of document\)$", msg)
    if m:
        return InputError(f"malformed TOML: {msg[:m.start()]} (at end of document)", where=file)
    return InputError(f"malformed TOML: {msg}", where=file)


#: Largest input file read (scenarios and reproducers are a few KiB; this stops ``/dev/zero`` and the like).
MAX_INPUT_BYTES = 16 << 20


def _deepest_line(text: str) -> int:
    """Line of the deepest ``[``/``{`` nesting (roughly: strings are not skipped)."""
    depth = best = 0
    line = best_line = 1
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif ch in "]}":
            depth -= 1
        elif ch == "\n":
            line += 1
    return best_line


def loads_toml(text: str, file: str) -> dict[str, Any]:
    """``tomllib.loads`` whose every failure is an :class:`InputError` naming FILE:LINE (malformed TOML,
    nesting deeper than the parser's recursion, integers longer than Python converts)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(file, exc) from None
    except RecursionError:
        raise InputError("malformed TOML: arrays or tables nested too deeply",
                         where=f"{file}:{_deepest_line(text)}") from None
    except ValueError as exc:          # int('9' * 5000): Python's integer string conversion limit
        m = re.search(r"[0-9_]{4000,}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise InputError(f"malformed TOML: {str(exc).split(';')[0]}",
                         where=f"{file}:{line}" if line else file) from None


def read_input(path: str | Path) -> str:
    """The UTF-8 text of an input file (at most :data:`MAX_INPUT_BYTES`); InputError naming it otherwise."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", where=str(path)) from None
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"larger than {MAX_INPUT_BYTES >> 20} MiB: not a scenario file", where=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError("malformed TOML: not UTF-8 text", where=f"{path}:{line}") from None


def parse(text: str, file: str = "<scenario>") -> Scenario:
    """Parse and validate scenario ``text`` (``file`` names it in error messages)."""
    data = loads_toml(text, file)
    try:
        return _Validator(file, text).scenario(data)
    except RecursionError:
        raise InputError("a value is nested too deeply", where=file) from None


def load(path: str | Path) -> Scenario:
    """Read and validate the scenario file ``path`` (InputError with FILE:LINE on any problem)."""
    return parse(read_input(path), str(path))


# ----------------------------------------------------------------------------------------- simulator scenarios

#: What a simulator scenario (and so a reproducer) may hold besides a scenario file's sections.
SIM_TOP_KEYS = TOP_KEYS + ("sim", "finding")
SIM_KEYS = ("driver", "mirror", "max_steps", "thread", "device", "event", "scheduler", "schedule")
#: Set-up ops the simulator runs before the interleaving (sim/runner.py ``_setup_op``) and CPU thread ops.
SIM_SETUP_OPS = ("mmap", "touch", "munmap", "mprotect", "madvise")
SIM_THREAD_OPS = ("touch", "munmap", "mmap", "mprotect", "madvise", "fork")
JOB_KEYS = {"addr": "addr", "length": "size", "write": "bool", "mode": "str", "pattern": "count", "delay": "count"}
def _event_device(value: Any, what: str) -> str:
    """A device of an event: a /dev path (pmem_unbind) or a pmem namespace name (pmem_remove)."""
    s = _str(value, what)
    if re.match(r"^pmem\d+$", s):
        return s
    return _path(s, what)


EVENT_KEYS = {"name": "name", "kind": "str", "delay": "count", "addr": "addr", "length": "size", "hold": "count",
              "device": _event_device, "proc": "name", "pages": "count", "what": ("pmd_bad", "pud_huge"),
              "rounds": "count"}
#: Keys of ``[finding]`` (the saved finding of a reproducer) and their kinds.
FINDING_KEYS: dict[str, str] = {"invariant": "str", "location": "str", "signature": "str", "step": "count",
                                "task": "str", "message": "anystr", "seed": "count", "detail": "anystr",
                                "hits": "count"}
MAX_SIM_STEPS = 10_000_000
MAX_SIM_PARTS = 10_000          # threads, ops of a thread, devices, jobs, events, switches


def _anystr(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, not {value!r}")
    return value


def _sim_names(table: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    """Entry names of a generator drawing table (sim/scenario.py), or ``fallback``."""
    try:
        from hmmirror.sim import scenario as simsc
        names = tuple(e.name for e in getattr(simsc, "TABLES", {}).get(table, ()))
    except ImportError:
        names = ()
    return tuple(dict.fromkeys(names + fallback))


class _SimValidator(_Validator):
    """A scenario file plus ``[sim]`` (and ``[finding]`` in a reproducer)."""

    def __init__(self, file: str, text: str) -> None:
        super().__init__(file, text, allowed_ops=SIM_SETUP_OPS)
        self.ops_where = "in the set-up of a simulator scenario"
        self.special_files = SPECIAL_FILES
        self.fork_unique = False

    def sim_doc(self, data: dict[str, Any]) -> dict[str, Any]:
        self.table(data, (), SIM_TOP_KEYS, "the top level")
        if "sim" not in data:
            raise self.fail((), "not a simulator scenario: no [sim] table")
        base = {k: v for k, v in data.items() if k in TOP_KEYS}
        scn = self.scenario(base)
        setup_names = dict(self.names) if hasattr(self, "names") else {}
        self.sim(data["sim"], scn, setup_names)
        if "finding" in data:
            self.finding(data["finding"])
        return data

    def parts(self, value: Any, path: Path_, what: str) -> list[Any]:
        if isinstance(value, dict):
            raise self.fail(path, f"{what} must be an array of tables: write [[{path_str(path)}]]")
        if not isinstance(value, list):
            raise self.fail(path, f"{what} must be an array, not {type(value).__name__}")
        if len(value) > MAX_SIM_PARTS:
            raise self.fail(path, f"{what} has {len(value)} entries (at most {MAX_SIM_PARTS})")
        return value

    def keyed(self, value: Any, path: Path_, kinds: Mapping[str, str], what: str,
              required: Sequence[str] = ()) -> dict[str, Any]:
        self.table(value, path, tuple(kinds), what)
        for k in required:
            if k not in value:
                raise self.fail(path, f"{what} needs a {k!r}")
        conv = dict(KINDS_OF_VALUE, anystr=_anystr)
        for k, v in value.items():
            kind: Any = kinds[k]
            self.conv(kind if callable(kind) else _enum(*kind) if isinstance(kind, tuple) else conv[kind], v,
                      path + (k,), f"{what}.{k}")
        return value

    def sim(self, sim: Any, scn: Scenario, setup_names: dict[str, str]) -> None:
        path: Path_ = ("sim",)
        self.table(sim, path, SIM_KEYS, "[sim]")
        if "driver" in sim:
            drv = self.conv(_str, sim["driver"], path + ("driver",), "sim.driver")
            if drv not in ("builtin", "gpusvm") and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", drv):
                raise self.fail(path + ("driver",), f"sim.driver {drv!r:.80} must be \"builtin\", \"gpusvm\" or "
                                                    f"package.module:ClassName")
        procs = list(scn.processes)
        if "mirror" in sim:
            m = self.conv(_name, sim["mirror"], path + ("mirror",), "sim.mirror")
            if m not in procs:
                raise self.fail(path + ("mirror",), f"sim.mirror {m!r} is no [[process]] (known: {', '.join(procs)})")
        if "max_steps" in sim:
            n = self.conv(_count, sim["max_steps"], path + ("max_steps",), "sim.max_steps")
            if not 1 <= n <= MAX_SIM_STEPS:
                raise self.fail(path + ("max_steps",), f"sim.max_steps must be between 1 and {MAX_SIM_STEPS}")
        # every `as` name of the threads is usable everywhere (threads interleave): collect them first
        names = dict(setup_names)
        threads = self.parts(sim.get("thread", []), path + ("thread",), "sim.thread")
        children: list[str] = []
        for i, t in enumerate(threads):
            self.table(t, path + ("thread", i), ("name", "proc", "ops"), f"sim.thread[{i}]")
            if "name" not in t:
                raise self.fail(path + ("thread", i), f"sim.thread[{i}] needs a 'name' (its task name)")
            for j, op in enumerate(self.parts(t.get("ops", []), path + ("thread", i, "ops"), f"sim.thread[{i}].ops")):
                if isinstance(op, dict):
                    if isinstance(op.get("as"), str):
                        names[op["as"]] = "mapping"
                    if op.get("op") == "fork" and isinstance(op.get("child"), str):
                        children.append(op["child"])
        seen: set[str] = set()
        for i, t in enumerate(threads):
            tp = path + ("thread", i)
            if "name" in t:
                nm = self.conv(_name, t["name"], tp + ("name",), "thread name")
                if nm in seen:
                    raise self.fail(tp + ("name",), f"task name {nm!r} is used twice")
                seen.add(nm)
            proc = self.conv(_name, t.get("proc", procs[0]), tp + ("proc",), "thread proc")
            if proc not in procs + children:
                raise self.fail(tp + ("proc",), f"sim.thread[{i}]: unknown process {proc!r}")
            self.allowed_ops, self.ops_where = SIM_THREAD_OPS, "in a simulator thread"
            try:
                self.ops(t.get("ops", []), procs + children, scn.machine, tp + ("ops",), dict(names))
            finally:
                self.allowed_ops, self.ops_where = SIM_SETUP_OPS, "in the set-up of a simulator scenario"
        modes = _sim_names("mode", ("fault",))
        for i, d in enumerate(self.parts(sim.get("device", []), path + ("device",), "sim.device")):
            dp = path + ("device", i)
            self.table(d, dp, ("name", "jobs"), f"sim.device[{i}]")
            if "name" not in d:
                raise self.fail(dp, f"sim.device[{i}] needs a 'name' (its task name)")
            if "name" in d:
                nm = self.conv(_name, d["name"], dp + ("name",), "device name")
                if nm in seen:
                    raise self.fail(dp + ("name",), f"task name {nm!r} is used twice")
                seen.add(nm)
            for j, job in enumerate(self.parts(d.get("jobs", []), dp + ("jobs",), f"sim.device[{i}].jobs")):
                jp = dp + ("jobs", j)
                self.keyed(job, jp, JOB_KEYS, f"sim.device[{i}].jobs[{j}]", ("addr",))
                self.sim_addr(job["addr"], jp + ("addr",), names)
                if "mode" in job and job["mode"] not in modes:
                    raise self.fail(jp + ("mode",), f"unknown device job mode {job['mode']!r} "
                                                    f"(one of {', '.join(modes)})")
                if "pattern" in job and job["pattern"] > 0xFFFF:
                    raise self.fail(jp + ("pattern",), "pattern must be below 65536")
        from hmmirror.sim.scenario import EVENT_KINDS
        kinds = _sim_names("event", tuple(EVENT_KINDS))
        for i, e in enumerate(self.parts(sim.get("event", []), path + ("event",), "sim.event")):
            ep = path + ("event", i)
            self.keyed(e, ep, EVENT_KEYS, f"sim.event[{i}]", ("name", "kind"))
            if e["kind"] not in kinds:
                raise self.fail(ep + ("kind",), f"unknown event kind {e['kind']!r} (one of {', '.join(kinds)})")
            if "addr" in e:
                self.sim_addr(e["addr"], ep + ("addr",), names)
            if "proc" in e and e["proc"] not in procs + children:
                raise self.fail(ep + ("proc",), f"sim.event[{i}]: unknown process {e['proc']!r}")
            if "name" in e:
                if e["name"] in seen:
                    raise self.fail(ep + ("name",), f"task name {e['name']!r} is used twice")
                seen.add(e["name"])
        if "scheduler" in sim:
            self.scheduler(sim["scheduler"], path + ("scheduler",))
        if "schedule" in sim:
            sp = path + ("schedule",)
            self.table(sim["schedule"], sp, ("runs",), "sim.schedule")
            runs = sim["schedule"].get("runs", [])
            if not isinstance(runs, list):
                raise self.fail(sp + ("runs",), "sim.schedule.runs must be an array of [task, steps] pairs")
            for k, r in enumerate(runs):
                if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                        and isinstance(r[1], int) and not isinstance(r[1], bool) and 0 < r[1] <= MAX_SIM_STEPS):
                    raise self.fail(sp + ("runs", k), f"sim.schedule.runs[{k}] must be [\"task\", steps], "
                                                      f"not {r!r:.80}")

    def sim_addr(self, value: Any, path: Path_, names: dict[str, str]) -> None:
        a = self.conv(parse_addr, value, path, path_str(path))
        if a.name is not None and a.name not in names:
            raise self.fail(path, f"{path_str(path)}: address {a.text!r} names no mapping (`as = ...`)")

    def scheduler(self, s: Any, path: Path_) -> None:
        self.table(s, path, ("kind", "switches", "seed", "depth", "expected_steps"), "sim.scheduler")
        kind = s.get("kind", "switch")
        if kind not in ("switch", "random", "pct"):
            raise self.fail(path + ("kind",), f"sim.scheduler.kind must be one of 'switch', 'random', 'pct', "
                                              f"not {kind!r:.80}")
        for k in ("seed", "depth", "expected_steps"):
            if k in s:
                v = self.conv(_count, s[k], path + (k,), f"sim.scheduler.{k}")
                if v >= 1 << 64 or (k != "seed" and v > MAX_SIM_STEPS):
                    raise self.fail(path + (k,), f"sim.scheduler.{k} {v} is out of range")
        sw = s.get("switches", [])
        if not isinstance(sw, list) or len(sw) > MAX_SIM_PARTS:
            raise self.fail(path + ("switches",), f"sim.scheduler.switches must be an array of at most "
                                                  f"{MAX_SIM_PARTS} [step, task] pairs")
        for k, x in enumerate(sw):
            if not (isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                and 0 <= v <= MAX_SIM_STEPS for v in x)):
                raise self.fail(path + ("switches", k), f"sim.scheduler.switches[{k}] must be [step, task], "
                                                        f"two small non-negative integers, not {x!r:.80}")

    def finding(self, f: Any) -> None:
        self.keyed(f, ("finding",), FINDING_KEYS, "finding", ("signature",))


def parse_sim(text: str, file: str = "<simulator scenario>") -> dict[str, Any]:
    """Validate a simulator scenario or reproducer (a scenario file plus ``[sim]`` and ``[finding]``);
    returns the TOML document (for :meth:`hmmirror.sim.scenario.SimScenario.from_doc`).  Every refusal is an
    :class:`InputError` naming FILE:LINE."""
    data = loads_toml(text, file)
    try:
        return _SimValidator(file, text).sim_doc(data)
    except RecursionError:
        raise InputError("a value is nested too deeply", where=file) from None


def load_sim(path: str | Path) -> dict[str, Any]:
    """Read and validate a simulator scenario or reproducer file (see :func:`parse_sim`)."""
    return parse_sim(read_input(path), str(path))
