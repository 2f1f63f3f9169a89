"""Scenario features for the campaign's steering (ours): what each device job meets, read off a drawn scenario.

The generator records the choices it made (``table:name``, ``name:option``, ``target:KIND``) as flat counts: a run
that drew ``mode:snapshot``, ``target:anon`` and ``populate:read`` does not say that the snapshot was of the
pages that were read.  Whether a walk meets a zero-page PTE (``hmm_vma_handle_pte`` -> ``-EFAULT``), starts in a
gap below a VMA (a hole fault with no VMA) or runs over a page a background event acts on is a property of one
job *and* the mapping pages it covers -- an interaction the flat counts cannot express, and the reason a model of
them tells the runs that only re-trigger a known signature from the others poorly (session 4: AUC ~0.72).

:func:`scenario_features` derives, per device job, features of the job's API mode and access x the VMA kind it
covers x what the set-up did to those pages (read / written / neither), the range shape (inside, past the end,
starting below the mapping: in a gap or a neighbour), a gap inside the range, the mapping's protection and, for
fsdax, the file's content; the CPU operations racing on those pages (a read touch, a write touch, which madvise);
the background events acting on those pages (memory_failure, migrate...); per background event its kind x the VMA
kind it acts on.  They name scenario
properties only (never a finding), prefixed ``x:`` so that the generator's weights never read them: they feed the
known-only model that decides whether a drawn scenario is run (:func:`hmmirror.sim.fuzz.accept_probability`).
"""

from __future__ import annotations

import re
from typing import Any

_ADDR = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*?)(?:([+-])(\d+)([KMG]?))?$")
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _pages(v: Any) -> int:
    if isinstance(v, int):
        return max(1, v // 4096)
    m = re.match(r"^(\d+)([KMG]?)$", str(v))
    return max(1, int(m.group(1)) * _UNIT[m.group(2)] // 4096) if m else 1


def _where(expr: Any) -> tuple[str, int] | None:
    """``"m1+8K"`` -> ``("m1", 2)``; ``"m1-8K"`` -> ``("m1", -2)`` (pages from the mapping's start)."""
    m = _ADDR.match(str(expr))
    if not m:
        return None
    off = int(m.group(3)) * _UNIT[m.group(4)] // 4096 if m.group(3) else 0
    return m.group(1), -off if m.group(2) == "-" else off


def _kind(op: dict[str, Any], files: dict[str, dict[str, Any]], setup: list[dict[str, Any]]) -> str:
    flags = op.get("flags") or []
    f = op.get("file")
    if "hugetlb" in flags:
        return "hugetlb_1g" if "huge_1g" in flags else "hugetlb"
    if f:
        f = str(f)
        if f.startswith("/dev/dax"):
            return "devdax_" + str(op.get("align", "2M"))
        if f in ("pfnmap", "mixedmap"):
            return f
        fi = files.get(f, {})
        if f.startswith("/mnt/dax"):
            return "fsdax_" + ("shared" if "shared" in flags else "private") + "_" + str(fi.get("content", "data"))
        return "file_" + ("shared" if "shared" in flags else "private") + \
            ("_cold" if fi.get("cached") is False else "_warm")
    if "shared" in flags:
        return "shmem"
    thp = any(o.get("op") == "madvise" and o.get("advice") == "hugepage" and o.get("addr") == op.get("as")
              for o in setup)
    return "anon_thp" if thp else "anon"


def scenario_features(sc: Any) -> list[str]:
    """The ``x:`` features of a scenario (a :class:`~hmmirror.sim.scenario.SimScenario`), see the module doc."""
    return [f for fs in job_features(sc) for f in fs]


def job_features(sc: Any) -> list[list[str]]:
    """The ``x:`` features of each device job of a scenario, then (last) those of its background events."""
    files = {str(f.get("path")): f for f in sc.files}
    maps: dict[str, dict[str, Any]] = {}
    for op in sc.setup:
        if op.get("op") == "mmap" and op.get("as"):
            maps[str(op["as"])] = {"kind": _kind(op, files, sc.setup), "pages": _pages(op.get("length", 4096)),
                                   "prot": str(op.get("prot", "rw")), "touch": [], "gaps": [], "mprot": []}
    for op in sc.setup:
        w = _where(op.get("addr", "")) if op.get("op") in ("touch", "munmap", "mprotect") else None
        if w is None or w[0] not in maps:
            continue
        span = (w[1], w[1] + _pages(op.get("length", 4096)))
        m = maps[w[0]]
        if op["op"] == "touch":
            m["touch"].append((span, str(op.get("access", "read"))))
        elif op["op"] == "munmap":
            m["gaps"].append(span)
        else:
            m["mprot"].append(span)
    racing: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for t in sc.threads:
        for op in t.get("ops", []):
            w = _where(op.get("addr", ""))
            if w is not None and w[0] in maps:
                what = str(op.get("op"))
                if what == "touch":                   # a read touch of an anonymous page maps the zero page
                    what += "_" + str(op.get("access", "read"))[0]
                elif what == "madvise":
                    what += "_" + str(op.get("advice", "-"))
                racing.setdefault(w[0], []).append(((w[1], w[1] + _pages(op.get("length", 4096))), what))
    # background events on pages of a mapping (memory_failure, migrate, ...): those on a job's pages
    on_pages: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for ev in sc.events:
        w = _where(ev.get("addr", "")) if ev.get("addr") else None
        if w is not None and w[0] in maps:
            n = _pages(ev["length"]) if ev.get("length") else int(ev.get("pages", 1) or 1)
            on_pages.setdefault(w[0], []).append(((w[1], w[1] + n), str(ev.get("kind"))))

    def meets(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    jobs: list[list[str]] = []
    for d in sc.devices:
        for job in d.get("jobs", []):
            w = _where(job.get("addr", ""))
            if w is None or w[0] not in maps:
                continue
            m = maps[w[0]]
            out: list[str] = []
            jobs.append(out)
            span = (w[1], w[1] + _pages(job.get("length", 4096)))
            mode = str(job.get("mode", "fault"))
            acc = "s" if mode.startswith("snapshot") else "w" if job.get("write") else "r"
            j = f"{mode}:{acc}"
            k = m["kind"]
            done = {a for s, a in m["touch"] if meets(s, span)}
            pop = "w" if "write" in done else "r" if "read" in done else "n"
            shape = "below" if span[0] < 0 else "past" if span[1] > m["pages"] else "in"
            out += [f"x:{j}", f"x:{acc}:{k}", f"x:{acc}:{k}:{pop}", f"x:{acc}:{shape}"]
            if m["prot"] != "rw" or any(meets(s, span) for s in m["mprot"]):
                out.append(f"x:{acc}:{k}:prot")
            if any(meets(s, span) for s in m["gaps"]):
                out.append(f"x:{acc}:gap")
            out += [f"x:{acc}:cpu:{o}" for o in sorted({o for s, o in racing.get(w[0], ()) if meets(s, span)})]
            out += [f"x:{acc}:ev:{e}" for e in sorted({e for s, e in on_pages.get(w[0], ()) if meets(s, span)})]
    out = []
    for ev in sc.events:
        w = _where(ev.get("addr", "")) if ev.get("addr") else None
        k = maps[w[0]]["kind"] if w is not None and w[0] in maps else "-"
        out.append(f"x:ev:{ev.get('kind')}:{k}")
    return jobs + [out]


# --- the known-only model: noisy-OR over the jobs of a run ---------------------------------------------------
#: a run is one bag of instances: one per device job (its ``x:`` features and ``bias:job``), and the background
#: (the generator's flat features, the events' ``x:`` features and ``bias:bg``).  Each instance ``i`` alone would
#: make the run hit a known signature with probability ``r_i = sigmoid(w . x_i)``; the run does unless none does:
#: ``P = 1 - prod(1 - r_i)``.  Any one job that walks a zero-page PTE or starts in a gap is enough for a known
#: signature whatever else the run draws -- an additive (logistic) model of the run's feature counts lets the
#: harmless features of the other jobs cancel that job out (session 4: AUC ~0.72-0.77 on 5.2 runs; this one 0.81
#: on the same held-out runs, and its lowest-risk fifth of the runs hit only known signatures 11 % of the time,
#: against 16 % for the logistic model's).
MIL_L2 = 1.0            # L2 penalty (per weight, on the mean loss times the number of runs)
MIL_STEPS = 100         # Adam steps (deterministic: fixed count, fixed order); the coordinator fits between
MIL_RATE = 0.3          # rounds while the workers wait: 100 steps at 0.3 fit as well as 300 at 0.1 (held-out
                        # AUC 0.803 both, 5.2 runs), in ~2 s instead of ~5 s for 4 000 runs at load 16
MIL_MIN_SUPPORT = 4     # a feature needs this many runs that have it


def bag(flat: list[str], inst: list[list[str]]) -> list[list[str]]:
    """The instances of one run: ``inst`` is :func:`job_features` (jobs, then the events' features)."""
    jobs = inst[:-1] if inst else []
    ev = inst[-1] if inst else []
    return [["bias:job"] + j for j in jobs] + [["bias:bg"] + [f for f in flat if not f.startswith("variant:")] + ev]


def fit_noisy_or(bags: list[list[list[str]]], y: list[float], warm: dict[str, float] | None = None
                 ) -> dict[str, float]:
    """The weights of the noisy-OR model (feature -> weight; absent: 0) fitted to runs ``bags`` with labels
    ``y`` (1: the run hit only known signatures).  Sparse: an instance is a list of (feature, count)."""
    import numpy as np

    support: dict[str, int] = {}
    for b in bags:
        for f in {f for inst in b for f in inst}:
            support[f] = support.get(f, 0) + 1
    names = sorted(f for f, n in support.items() if n >= MIL_MIN_SUPPORT)
    if not names or len(bags) < 2 * MIL_MIN_SUPPORT or min(y) == max(y):
        return {}
    col = {f: i for i, f in enumerate(names)}
    ii: list[int] = []
    ff: list[int] = []
    owner: list[int] = []
    k = 0
    for r, b in enumerate(bags):
        for inst in b:
            for f in inst:
                j = col.get(f)
                if j is not None:
                    ii.append(k)
                    ff.append(j)
            owner.append(r)
            k += 1
    ii_a, ff_a, own = np.array(ii), np.array(ff), np.array(owner)
    yv = np.array(y, dtype=float)
    n, m = len(bags), len(names)
    w = np.array([float((warm or {}).get(f, 0.0)) for f in names])
    mo, ve = np.zeros(m), np.zeros(m)
    for t in range(1, MIL_STEPS + 1):
        z = np.bincount(ii_a, weights=w[ff_a], minlength=k)
        s = np.clip(np.bincount(own, weights=np.logaddexp(0.0, z), minlength=n), 1e-9, 700.0)
        ds = (1.0 - yv) - yv / np.expm1(s)                 # d(loss)/d(sum of softplus), per run
        gz = ds[own] * (0.5 + 0.5 * np.tanh(0.5 * z))      # times sigmoid(z) (tanh form: no overflow)
        g = (np.bincount(ff_a, weights=gz[ii_a], minlength=m) + MIL_L2 * w) / n
        mo = 0.9 * mo + 0.1 * g
        ve = 0.999 * ve + 0.001 * g * g
        w -= MIL_RATE * (mo / (1 - 0.9 ** t)) / (np.sqrt(ve / (1 - 0.999 ** t)) + 1e-8)
    return {f: round(float(v), 5) for f, v in zip(names, w) if abs(v) > 1e-4}


def noisy_or(weights: dict[str, float], b: list[list[str]]) -> float:
    """The model's probability that a run of the bag ``b`` hits only known signatures."""
    import math

    s = 0.0
    for inst in b:
        z = sum(weights.get(f, 0.0) for f in inst)
        s += max(z, 0.0) + math.log1p(math.exp(-abs(z)))    # softplus
    return 1.0 - math.exp(-s)
