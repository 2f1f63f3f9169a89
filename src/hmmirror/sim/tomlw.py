"""A small TOML writer for reproducer files (Python has tomllib to read TOML but nothing to write it).

Supports what scenarios use: tables, arrays of tables, and values that are str, int, float, bool, lists and
inline tables (dicts inside lists).  Keys are written bare when they are bare-key safe.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_val(x)}" for k, x in v.items() if x is not None) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps(doc: dict[str, Any], header: str = "", inline_aot: set[str] | None = None) -> str:
    """TOML text of ``doc``.  ``inline_aot`` names dotted paths whose lists of dicts stay inline arrays."""
    out: list[str] = []
    if header:
        out += [f"# {line}" if line else "#" for line in header.splitlines()]
        out.append("")
    _emit(doc, [], out, inline_aot or set())
    return "\n".join(out).rstrip() + "\n"


def _emit(tbl: dict[str, Any], path: list[str], out: list[str], inline: set[str]) -> None:
    dotted = ".".join(path)
    simple = [(k, v) for k, v in tbl.items() if v is not None and not _is_table(v)
              and not (_is_aot(v) and f"{dotted}.{k}".lstrip(".") not in inline)]
    for k, v in simple:
        out.append(f"{_key(k)} = {_val(v)}")
    if simple:
        out.append("")
    for k, v in tbl.items():
        sub = path + [k]
        name = ".".join(_key(p) for p in sub)
        if _is_table(v):
            out.append(f"[{name}]")
            _emit(v, sub, out, inline)
        elif _is_aot(v) and ".".join(sub) not in inline:
            for item in v:
                out.append(f"[[{name}]]")
                _emit(item, sub, out, inline)
