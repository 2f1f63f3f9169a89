"""Findings: a broken invariant with the step, the stack of model functions and the state that broke it.

A finding's *signature* names its root cause and nothing incidental: ``invariant|location|detail``.

* ``location`` is the model function, under its kernel name, where the rule broke: the innermost model frame
  that is neither a scheduling primitive (``kernel/sched.py``) nor a wrapper or private helper of ours (a
  decorator's ``wrapper`` is described as the function it wraps).  Invariants that judge a state after the
  fact name the function responsible, from the model's state: a pgmap reference kept after a walk at the
  HMM call that returned with it, a stale device entry after ``invalidate_range_end`` at the subscriber
  whose callback returned while its device still mapped the range.
* ``detail`` is a short cause the invariant derives from the model's state when one location has several
  (``-`` otherwise); the background event when the violating task is that event.

The VMA kind, the entry at the address concerned and the background event that ran nearby are kept in the
finding for the report, but are not part of the signature: the same driver mistake reached on an anonymous
page or a DAX PMD, after a migration or a reclaim, is one cause and gives one reproducer.  Nothing here looks
at the locals of the caller's frames: the address of a finding is the one its invariant passes.
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
    detail: str = "-"
    addr: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> str:
        """``invariant|location|detail`` (see the module docstring)."""
        return "|".join((self.invariant, self.location, self.detail))

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
                 f"  where: {self.location}" + (f" ({self.detail})" if self.detail != "-" else "")
                 + f"   vma: {self.vma_kind}   entry: {self.entry}   event: {self.kevent}"]
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


def module_name(filename: str) -> str:
    """``mm.hmm.v5_2`` for ``.../hmmirror/mm/hmm/v5_2.py`` (a file outside the package: its dotted path from
    the first directory that is a package root we know, else its base name)."""
    fn = filename.replace("\\", "/")
    i = fn.rfind(_PKG)
    mod = fn[i + len(_PKG):] if i >= 0 else fn.rsplit("/", 1)[-1]
    mod = mod[:-3] if mod.endswith(".py") else mod
    return mod.replace("/", ".")


def function_name(fn: Any) -> str:
    """``module.qualname`` of a Python function or bound method, in the naming of :func:`describe_frame`."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    mod = module_name(code.co_filename) if code is not None else str(getattr(fn, "__module__", "?"))
    return f"{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def describe_frame(f: Any, lineno: int | None = None) -> str:
    """``module.function:line`` of a frame; a decorator's wrapper (``f(...).<locals>.wrapper`` holding the
    wrapped function as ``fn``) is described as the wrapped function, under its kernel name."""
    code = f.f_code
    name = code.co_qualname
    mod = module_name(code.co_filename)
    if "<locals>" in name:
        inner = f.f_locals.get("fn") if "wrapper" in name.rsplit(".", 1)[-1] else None
        if inner is not None and hasattr(inner, "__name__"):
            name = inner.__name__             # functools.wraps: the kernel function's name
    return f"{mod}.{name}:{lineno if lineno is not None else f.f_lineno}"


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


def is_kernel_name(name: str) -> bool:
    """Is ``module.function`` a model function under a kernel name (not a scheduling primitive, a wrapper,
    a generator expression or one of our private ``_helpers``; kernel ``__names`` count)?"""
    if name.startswith("kernel.sched."):
        return False
    func = name.rsplit(".", 1)[-1]
    if "<" in name:
        return False
    return not (func.startswith("_") and not func.startswith("__"))


def location_of(stack: list[str]) -> str:
    """The innermost function of ``stack`` under a kernel name (where the rule broke), without line."""
    for s in reversed(stack):
        name = s.rsplit(":", 1)[0]
        if is_kernel_name(name):
            return name
    for s in reversed(stack):
        name = s.rsplit(":", 1)[0]
        if not name.startswith("kernel.sched."):
            return name
    return stack[-1].rsplit(":", 1)[0] if stack else "-"
