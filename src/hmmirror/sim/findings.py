"""Findings: a broken invariant with the step, the stack of model functions and the state that broke it.

A finding's *signature* keeps distinct causes apart: the invariant, the model function where it broke
(``location``), and what was involved at the violating step -- the VMA kind, the page-table entry type at
the address concerned, and the kernel background event that interleaved with the violating operation (if
any).  Two root causes that break the same invariant in the same function differ in at least one of these
in practice (e.g. a pgmap leak on a device-dax PMD vs. on a fsdax PTE).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

_SIM = "/hmmirror/sim/"
_SCHED = "/hmmirror/kernel/sched.py"
_PKG = "/hmmirror/"


@dataclass
class Finding:
    """One broken invariant."""

    invariant: str
    message: str
    step: int
    task: str
    task_kind: str = "-"
    op: str = ""
    stack: list[str] = field(default_factory=list)
    location: str = "-"
    vma_kind: str = "-"
    entry: str = "-"
    kevent: str = "-"
    addr: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> str:
        """``invariant|location|vma kind|entry type|background event``."""
        return "|".join((self.invariant, self.location, self.vma_kind, self.entry, self.kevent))

    @property
    def sig_id(self) -> str:
        """A short stable id of the signature (file names of reproducers)."""
        slug = re.sub(r"[^a-z0-9]+", "-", f"{self.invariant}-{self.location.rsplit('.', 1)[-1]}".lower())
        return f"{slug.strip('-')[:48]}-{hashlib.sha1(self.signature.encode()).hexdigest()[:8]}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["signature"] = self.signature
        d["addr"] = None if self.addr is None else hex(self.addr)
        d["state"] = {k: _plain(v) for k, v in self.state.items()}
        return d

    def describe(self) -> str:
        """A few lines for a terminal."""
        lines = [f"[{self.invariant}] {self.message}",
                 f"  at step {self.step}, task {self.task} ({self.task_kind}) {self.op}",
                 f"  where: {self.location}   vma: {self.vma_kind}   entry: {self.entry}   event: {self.kevent}"]
        if self.addr is not None:
            lines.append(f"  address: {self.addr:#x}")
        if self.stack:
            lines.append("  stack (outermost first):")
            lines += [f"    {s}" for s in self.stack[-12:]]
        for k, v in list(self.state.items())[:12]:
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return strip_ids(repr(v))


_HEX_ID = re.compile(r" at 0x[0-9a-f]+")


def strip_ids(s: str) -> str:
    """Remove object addresses from a repr (they differ between processes)."""
    return _HEX_ID.sub("", s)


def is_model_frame(f: Any) -> bool:
    fn = f.f_code.co_filename.replace("\\", "/")
    return _PKG in fn and _SIM not in fn


def describe_frame(f: Any, lineno: int | None = None) -> str:
    fn = f.f_code.co_filename.replace("\\", "/")
    i = fn.rfind(_PKG)
    mod = fn[i + len(_PKG):] if i >= 0 else fn.rsplit("/", 1)[-1]
    mod = mod[:-3] if mod.endswith(".py") else mod
    return f"{mod.replace('/', '.')}.{f.f_code.co_qualname}:{lineno if lineno is not None else f.f_lineno}"


def gen_stack(gen: Any) -> list[str]:
    """The model functions of a suspended generator chain, outermost first (``module.function:line``)."""
    out = []
    while gen is not None:
        f = getattr(gen, "gi_frame", None)
        if f is None:
            break
        if _SIM not in f.f_code.co_filename.replace("\\", "/"):
            out.append(describe_frame(f))
        gen = getattr(gen, "gi_yieldfrom", None)
    return out


def frame_stack(frame: Any) -> list[str]:
    """The model functions of the running Python stack, outermost first (the simulator's frames excluded)."""
    out = []
    f = frame
    while f is not None:
        fn = f.f_code.co_filename.replace("\\", "/")
        if fn.endswith("/hmmirror/sim/engine.py") and f.f_code.co_name == "_loop":
            break
        if _SIM not in fn and ("site-packages" not in fn or _PKG in fn) and "/_pytest/" not in fn \
                and "/pluggy/" not in fn:
            out.append(describe_frame(f))
        f = f.f_back
    out.reverse()
    # keep from the first model frame on (drops runner / CLI frames)
    for i, s in enumerate(out):
        if not s.startswith(("cli.", "sim.")) and "." in s:
            return out[i:]
    return out


def location_of(stack: list[str]) -> str:
    """The innermost function of ``stack`` outside kernel/sched.py (where the rule broke), without line."""
    for s in reversed(stack):
        name = s.rsplit(":", 1)[0]
        if not name.startswith("kernel.sched."):
            return name
    return stack[-1].rsplit(":", 1)[0] if stack else "-"
