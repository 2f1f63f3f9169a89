"""Fuzzing campaigns: random machines, scenarios and schedules; findings shrunk, deduplicated and saved.

A campaign is a search followed by a short finish.  The search runs *units* (:func:`run_unit`): a Hypothesis
session (scenarios and bounded switch lists drawn through ``data.draw``,
:class:`~hmmirror.sim.choices.SaltedHypothesisChoices`, generation only) or a batch of seeded runs under the per-step
``random`` and ``pct`` schedulers (:class:`~hmmirror.sim.choices.SeededChoices`); ``--scheduler mixed`` (the
default) alternates them (bounded switch lists rarely preempt inside short critical sections; per-step random
schedules do).  A run that breaks an invariant with a signature nobody knows yet is kept as it is (its
reproducer text, the smallest per signature); known signatures are counted, not kept.  Nothing stops the
search to shrink or verify: at the end (:meth:`Collector.finish`, a bounded share of ``--seconds``) every new
signature's run is shrunk by :func:`shrink_greedy` (drop events, device jobs, CPU operations, threads, set-up
steps and mappings, then context switches, while the signature still reproduces), all of them are replayed in
one fresh process, and those that replay are written (atomically, ``os.replace``) into the findings directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hmmirror.sim.choices import SaltedHypothesisChoices, SeededChoices
from hmmirror.sim.findings import Finding
from hmmirror.sim.runner import SimResult, run_scenario, scheduler_for
from hmmirror.sim.scenario import SimScenario, generate
from hmmirror.sim.schedulers import PCTScheduler, RandomScheduler
from hmmirror.sim.steer_features import job_features


@dataclass
class Config:
    kernel: str = "6.18"
    driver: str = "builtin"
    seconds: float = 60.0
    jobs: int = 1
    findings_dir: str = "findings"
    scheduler: str = "mixed"
    seed: int = 0
    every_step: bool = False
    examples: int = 200
    max_switches: int = 24
    stop_after: int = 0                         # end the campaign after this many new findings (0: never)
    kinds: tuple[str, ...] | None = None        # VMA kinds to generate (None: every available kind)
    events: tuple[str, ...] | None = None       # background events (None: every available event)
    runs: int = 0                               # stop after this many runs (0: at the deadline only)
    epoch: int = 8                              # units per round (signatures found are shared between rounds)
    fresh: bool = False                         # ignore the saved state: start the seed sequence again
    known_file: str | None = None               # --known: more signatures to treat as known (one a line)
    steer: bool = True                          # move effort away from what produces known signatures
    inject: bool = False                        # draw the opt-in events that write states no syscall makes
    target: bool = True                         # aim a share of the scenarios at cells not covered yet


@dataclass
class Saved:
    """A saved reproducer."""

    finding: Finding
    path: str
    seed: int
    size: tuple[int, int]


@dataclass
class Stats:
    runs: int = 0
    steps: int = 0
    findings: dict[str, Saved] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    known_runs: int = 0                         # runs whose findings were all known already
    rejected: int = 0                           # drawn scenarios not run: expected to hit only known signatures
    known_hits: dict[str, int] = field(default_factory=dict)   # known signature -> runs that hit it
    multi_runs: int = 0                         # runs with more than one finding
    hits: dict[str, int] = field(default_factory=dict)          # new signature -> runs that found it first
    unconfirmed: dict[str, str] = field(default_factory=dict)   # signature -> why no reproducer was kept


def load_known_file(path: str) -> set[str]:
    """Signatures listed in a ``--known`` file: one per line (``#`` comments; a reproducer's ``signature =
    "..."`` line works too).  A directory: the signature of every reproducer (``*.toml``) directly in it
    (e.g. ``docs/sim-reproducers``; its subdirectories -- fixed model bugs, benign, unjudged -- are not read)."""
    out: set[str] = set()
    if os.path.isdir(path):
        return set(known_signatures(path))
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        from hmmirror.errors import InputError
        raise InputError(f"--known {path}: {exc.strerror}") from None
    for line in lines:
        line = line.strip()
        if line.startswith("signature"):
            line = line.split("=", 1)[1].strip().strip('"')
        if line and not line.startswith("#") and line.count("|") >= 2:
            out.add(line)
    return out


class Steering:
    """Feature feedback (ours): which drawn features lead to runs that hit only known signatures, which to new
    coverage cells -- a logistic model of every run so far.

    Every run reports how many times its scenario drew each feature (``table:name`` entries, ``name:option``
    choices, ``target:KIND``), the signatures it hit and whether it reached coverage cells nothing had reached
    before.  :meth:`fit` regresses "the run's findings were all known" (against the signatures known *now*:
    a row keeps its signatures, so a run made before a signature was found counts for it afterwards) and "the
    run reached new cells" on the feature counts (ridge-regularised logistic regressions, iteratively
    reweighted least squares on standardised counts), and turns the per-draw effects into choice weights:
    ``exp(-GAMMA * b_known + NOVELTY * b_cells)``, clamped to [LO, HI].  A feature the generator draws where a
    known signature follows is drawn less; one that reaches new cells, more.  A marginal rate per feature
    (the first version) could not tell which of the many features of a run was responsible -- most features
    appear in most runs -- and left a campaign on an earlier one's findings at ~40 % known-only runs.

    The rows persist in the findings directory (:data:`STEER_FILE`): a campaign started on an earlier one's
    findings steers from its first round on, with the earlier runs' evidence of what produced those
    signatures.  Nothing names a finding: the generator only sees weights per feature.
    """

    MIN_RUNS = 4            # a feature needs this many runs drawing it to get a weight
    GAMMA = 2.0             # strength of the move away from features of known-only runs
    NOVELTY = 0.5           # strength of the move toward features of runs that reached new cells
    LAM = 5.0               # ridge penalty (on standardised counts)
    LO, HI = 0.1, 3.0
    MAX_ROWS = 4000         # most recent runs kept (and persisted)

    def __init__(self) -> None:
        # (order key, feature -> draws, signatures, reached new cells, per-job features or None)
        self.rows: list[tuple[tuple[int, int], dict[str, int], tuple[str, ...], bool, Any]] = []
        self.weights: dict[str, float] = {}
        # the known-only models: {"b0", "beta": feature -> per draw} (logistic, flat counts) and "mil" (feature
        # -> weight: the noisy-OR model over the run's jobs, sim/steer_features.py; it decides what is run)
        self.model: dict[str, Any] = {}
        self._fitted: tuple[int, int] | None = None
        self._mil: tuple[int, int, dict[str, float]] | None = None     # (rows, known hash, weights)

    def feed(self, features: list[str], sigs: "list[str] | tuple[str, ...]", new_cells: bool,
             key: tuple[int, int] = (0, 0), jobs: "list[list[str]] | None" = None) -> None:
        """One run: the features it drew (with repetitions), its signatures, whether it reached new cells, and
        the ``x:`` features of its jobs and events (:func:`~hmmirror.sim.steer_features.job_features`)."""
        fc: dict[str, int] = {}
        for f in features:
            if not f.startswith("variant:"):          # a mapping's kind and protection: not drawn by one choice
                fc[f] = fc.get(f, 0) + 1
        self.rows.append((tuple(key), fc, tuple(sorted(set(sigs))), bool(new_cells),   # type: ignore[arg-type]
                          [list(j) for j in jobs] if jobs is not None else None))

    def counts(self) -> dict[str, Any]:
        return {"rows": [[list(k), fc, list(sg), nc, jb] for k, fc, sg, nc, jb in self.rows]}

    def merge(self, d: dict[str, Any]) -> None:
        """Add the runs of another Steering (a unit's, or a saved campaign's)."""
        for row in d.get("rows", []):
            k, fc, sg, nc = row[:4]
            jb = row[4] if len(row) > 4 else None
            self.rows.append((tuple(k), {str(f): int(n) for f, n in fc.items()}, tuple(sg), bool(nc),
                              [[str(f) for f in j] for j in jb] if jb is not None else None))
        self._fitted = None

    def fit(self, known: "set[str] | frozenset[str]") -> dict[str, float]:
        """The choice weights given the signatures ``known`` now (cached until rows or ``known`` change)."""
        import numpy as np

        key = (len(self.rows), hash(frozenset(known)))
        if self._fitted == key:
            return self.weights
        self._fitted = key
        rows = sorted(self.rows, key=lambda r: r[0])[-self.MAX_ROWS:]     # arrival order differs between runs
        support: dict[str, int] = {}
        for _k, fc, _s, _n, _j in rows:
            for f in fc:
                support[f] = support.get(f, 0) + 1
        feats = sorted(f for f, n in support.items() if n >= self.MIN_RUNS)
        if len(rows) < 2 * self.MIN_RUNS or not feats:
            self.weights, self.model = {}, {}
            return self.weights
        col = {f: i for i, f in enumerate(feats)}
        x = np.zeros((len(rows), len(feats)))
        yk = np.zeros(len(rows))
        yc = np.zeros(len(rows))
        for i, (_k, fc, sg, nc, _j) in enumerate(rows):
            for f, n in fc.items():
                j = col.get(f)
                if j is not None:
                    x[i, j] = n
            yk[i] = bool(sg) and all(s in known for s in sg)
            yc[i] = nc
        sd = x.std(0)
        keep = sd > 1e-9                             # a feature drawn equally often in every run tells nothing
        z = (x[:, keep] - x[:, keep].mean(0)) / sd[keep]
        names = [f for f, k in zip(feats, keep) if k]
        bk, ik = self._logistic(z, yk)
        bc, _ = self._logistic(z, yc)
        bk, bc = bk / sd[keep], bc / sd[keep]
        # away from what leads to known signatures; toward new cells only with features that do not
        # (a feature both reach is what the early runs of any campaign draw: the two would cancel out)
        with np.errstate(over="ignore"):             # exp to inf is clipped to HI: the intended limit
            w = np.clip(np.exp(-self.GAMMA * bk + self.NOVELTY * np.maximum(bc, 0) * (bk <= 0)), self.LO, self.HI)
        self.weights = {f: round(float(v), 4) for f, v in zip(names, w)}
        # the known-only model on raw draw counts (intercept of the centred fit moved to counts = 0)
        mu = x[:, keep].mean(0)
        self.model = {"b0": round(float(ik - (bk * mu).sum()), 6) if yk.min() != yk.max() else
                      (-20.0 if not yk.any() else 20.0),
                      "beta": {f: round(float(v), 6) for f, v in zip(names, bk) if abs(v) > 1e-6}}
        mil = self._fit_mil(rows, known)
        if mil:
            self.model["mil"] = mil
        return self.weights

    MIL_REFIT = 1.5         # the noisy-OR model is fitted again when the rows grew by this factor (or known changed)

    def _fit_mil(self, rows: list[Any], known: "set[str] | frozenset[str]") -> dict[str, float]:
        """The noisy-OR known-only model of the rows that carry job features (refitted as the rows grow)."""
        from hmmirror.sim import steer_features as sf

        kh = hash(frozenset(known))
        seen = len(self.rows)                       # every run so far (the fit sees the latest MAX_ROWS)
        if self._mil is not None and self._mil[1] == kh and seen < self._mil[0] * self.MIL_REFIT:
            return self._mil[2]                     # (before building the bags: they serve only a refit)
        data = [(sf.bag(list(self._flat(fc)), jb), float(bool(sg) and all(s in known for s in sg)))
                for _k, fc, sg, _n, jb in rows if jb is not None]
        w = sf.fit_noisy_or([b for b, _y in data], [y for _b, y in data]) if data else {}
        self._mil = (seen, kh, w)
        return w

    @staticmethod
    def _flat(fc: dict[str, int]) -> Iterator[str]:
        for f, n in sorted(fc.items()):
            for _ in range(n):
                yield f

    def _logistic(self, z: Any, y: Any) -> tuple[Any, float]:
        """Ridge logistic regression (IRLS, a fixed number of Newton steps: deterministic): the coefficients
        and the intercept."""
        import numpy as np

        n, m = z.shape
        if y.min() == y.max():
            return np.zeros(m), 0.0
        b = np.zeros(m)
        b0 = float(np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3)))
        lam = self.LAM * np.eye(m)
        for _ in range(8):
            with np.errstate(over="ignore"):         # exp to inf gives p = 0, the logistic's limit
                p = 1 / (1 + np.exp(-(z @ b + b0)))
            wts = np.maximum(p * (1 - p), 1e-6)
            g = z.T @ (y - p) - self.LAM * b
            h = (z * wts[:, None]).T @ z + lam
            b = b + np.linalg.solve(h, g)
            b0 += float((y - p).sum() / max(wts.sum(), 1e-6))
        return b, b0

    def save(self, path: str) -> None:
        """Write the most recent rows (:data:`STEER_FILE` in the findings directory)."""
        rows = sorted(self.rows, key=lambda r: r[0])[-self.MAX_ROWS:]
        doc = {"version": 2, "rows": [[[-1, i], fc, list(sg), nc, jb] for i, (_k, fc, sg, nc, jb) in enumerate(rows)]}
        write_atomic(path, json.dumps(doc, separators=(",", ":")) + "\n")

    def load(self, path: str) -> None:
        """Add the rows a campaign saved in the findings directory (nothing when there are none)."""
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            if doc.get("version") in (1, 2):                # version 1: no job features (logistic model only)
                self.merge({"rows": [[[-2, i], *row[1:]] for i, row in enumerate(doc["rows"])]})
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return


#: the steering's evidence, kept in the findings directory between campaigns (:class:`Steering`)
STEER_FILE = ".steering.json"

#: a drawn scenario is run with probability ``(1 - p) ** ACCEPT_POWER`` (at least ACCEPT_MIN), ``p`` the
#: known-only model's estimate for it (:attr:`Steering.model`: the noisy-OR model of its jobs when there is one,
#: else the logistic model of its draw counts); otherwise another one is drawn -- a seeded run tries up to
#: MAX_DRAWS candidate seeds (:func:`candidate_seed`) and, when it accepted none, runs the one with the lowest
#: estimate; a Hypothesis session skips the example.  The weights move single choices; this judges the whole
#: scenario (and corrects the Hypothesis front end, which follows the weights only partly: it draws some values,
#: 0 among them, more often than their weight says).  Session 5, offline on 5.2 runs (a model fitted on 4 000
#: unsteered runs, 1 325 held-out runs with their coverage cells): MAX_DRAWS 8, power 2 left 30 % of the runs
#: known-only (56 % unsteered); 8 / 6: 21 %; 16 / 8: 11 %, with fewer distinct cells per run.
ACCEPT_MIN = 0.02
ACCEPT_POWER = 6
MAX_DRAWS = 12


def known_only_estimate(model: dict[str, Any] | None, features: list[str],
                        jobs: "list[list[str]] | None" = None) -> float:
    """The known-only model's probability that a scenario (its drawn ``features``, the ``x:`` features of its
    ``jobs``) hits only known signatures (0 without a model)."""
    import math

    if not model:
        return 0.0
    est = []
    if model.get("mil") and jobs is not None:
        from hmmirror.sim.steer_features import bag, noisy_or
        est.append(noisy_or(model["mil"], bag(features, jobs)))
    beta = model.get("beta", {})
    if beta or "b0" in model:
        t = float(model.get("b0", 0.0)) + sum(beta.get(f, 0.0) for f in features)
        est.append(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, t)))))
    # both: their mean (each model is wrong where the other is not: the scenarios the steering picks are
    # where its model's estimate is lowest -- offline, 5.2, 1 000 runs to learn from: 17 % known-only among
    # the runs picked, against 19 % with the noisy-OR model alone and 23 % with the logistic one)
    return sum(est) / len(est) if est else 0.0


def accept_probability(model: dict[str, Any] | None, features: list[str],
                       jobs: "list[list[str]] | None" = None) -> float:
    """The probability of running a scenario that drew ``features`` (see :data:`ACCEPT_MIN`)."""
    if not model:
        return 1.0
    p = known_only_estimate(model, features, jobs)
    return max(ACCEPT_MIN, (1.0 - p) ** ACCEPT_POWER)


def candidate_seed(seed: int, j: int) -> int:
    """The ``j``-th candidate of the seeded run ``seed`` (``j = 0``: ``seed`` itself); a run made from a later
    candidate is the seeded run of that seed (its reproducer and ``replay --seed`` name it)."""
    return (seed + j * 10 ** 18) % (1 << 64)


def _accepted(model: dict[str, Any] | None, features: list[str], c: Any,
              jobs: "list[list[str]] | None" = None) -> bool:
    """Draw (from ``c``) whether to run the scenario that drew ``features`` (and has ``jobs``)."""
    a = accept_probability(model, features, jobs)
    return a >= 1.0 or c.below(1 << 16) < a * (1 << 16)


class _OutOfTime(BaseException):
    """Ends a Hypothesis session at the campaign deadline (not a test failure)."""


# --- reproducer files ------------------------------------------------------------------------------------
def reproducer_text(res: SimResult, seed: int, cfg: Config, path: str) -> str:
    f = res.finding
    assert f is not None
    sc = res.scenario.copy()
    sc.schedule = res.schedule
    doc_header = "\n".join([
        "hmmirror simulator reproducer",
        f"finding: [{f.invariant}] {f.message}",
        f"where: {f.location}   vma: {f.vma_kind}   entry: {f.entry}   event: {f.kevent}",
        f"at step {f.step} in task {f.task} ({f.task_kind}) {f.op}",
        f"found by: hmmirror fuzz --kernel {cfg.kernel} --scheduler {cfg.scheduler} (run seed {seed})"
        + (f" --driver {cfg.driver}" if cfg.driver != "builtin" else ""),
        f"size: {sc.size()} operations, {res.steps} steps",
        f"replay: hmmirror replay {path}",
    ])
    text = sc.to_toml(doc_header)
    fin = {"invariant": f.invariant, "location": f.location, "signature": f.signature, "step": f.step,
           "task": f.task, "message": f.message, "seed": seed}
    from hmmirror.sim.tomlw import dumps
    return text + "\n" + dumps({"finding": fin})


def _umask() -> int:
    m = os.umask(0o22)
    os.umask(m)
    return m


def write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".toml", dir=d)
    try:
        os.fchmod(fd, 0o666 & ~_umask())        # a readable file (mkstemp makes it 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def known_signatures(directory: str) -> dict[str, tuple[int, int]]:
    """Signatures of the reproducers in ``directory`` and their sizes (the smallest of a signature's files)."""
    out: dict[str, tuple[int, int]] = {}
    if not os.path.isdir(directory):
        return out
    for name in os.listdir(directory):
        if not name.endswith(".toml") or name.startswith(".tmp-"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as fh:
                got = _reproducer_signature(fh.read())
        except OSError:
            continue
        if got is not None and (got[0] not in out or got[1] < out[got[0]]):
            out[got[0]] = got[1]
    return out


#: :func:`_reproducer_signature` by file content: every unit's Recorder reads the (growing) findings/spool
#: directory, and parsing its reproducers again was ~8 % of a 5.2 campaign's CPU
_SIGNATURE_CACHE: dict[bytes, tuple[str, tuple[int, int]] | None] = {}


def _reproducer_signature(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """A reproducer's signature and size (scenario size, scheduled steps); None for a foreign or damaged
    file.  A pure function of the bytes, remembered per content."""
    import tomllib

    try:
        return _SIGNATURE_CACHE[data]
    except KeyError:
        pass
    got: tuple[str, tuple[int, int]] | None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
        sig = doc["finding"]["signature"]
        sc = SimScenario.from_doc(doc)
        steps = sum(int(n) for _t, n in (sc.schedule or []))
        got = (sig, (sc.size(), steps))
    except Exception:          # noqa: BLE001 - a foreign or damaged file
        got = None
    if len(_SIGNATURE_CACHE) >= 4096:
        _SIGNATURE_CACHE.clear()
    _SIGNATURE_CACHE[data] = got
    return got


class Recorder:
    """Keeps the smallest reproducer per signature on disk -- only reproducers that replay.

    ``offer`` keeps the best run per signature in memory; ``flush`` writes it: the reproducer text goes to a
    temporary file in the findings directory, is replayed in a fresh process
    (:func:`~hmmirror.sim.verify.replays_in_fresh_process`), and replaces the saved file only if the replay
    reports the same signature.  A run that does not replay is not saved (``stats.unconfirmed`` says why;
    the text is kept under ``unconfirmed/`` for whoever wants to look).  The first run of a new signature is
    flushed at once (a killed campaign keeps it); smaller ones found while shrinking at :meth:`flush_all`
    (after each session).  ``hit`` counts every run that reached a signature (the campaign summary).
    """

    #: fresh-process verifications per signature before giving up on it for this campaign
    MAX_TRIES = 3

    def __init__(self, cfg: Config, stats: Stats, notify: Callable[[Saved], None] | None = None,
                 verify: bool = True) -> None:
        self.cfg = cfg
        self.stats = stats
        self.known = known_signatures(cfg.findings_dir)
        self.preexisting = set(self.known)
        self.notify = notify
        self.verify = verify
        self.pending: dict[str, tuple[SimResult, int, tuple[int, int]]] = {}
        self.tries: dict[str, int] = {}
        self.found_here: set[str] = set()      # new signatures first found by this recorder's unit

    def hit(self, sig: str) -> None:
        """A run reached ``sig`` (counted whether or not it is saved)."""
        self.stats.hits[sig] = self.stats.hits.get(sig, 0) + 1

    def offer(self, res: SimResult, seed: int) -> bool:
        """Keep ``res`` if its signature is new or it is smaller than the best so far; a new signature is
        written (after its fresh replay) at once.  True if the signature is new to this campaign."""
        f = res.finding
        assert f is not None
        sig = f.signature
        size = (res.scenario.size(), res.steps)
        old = self.known.get(sig)
        pend = self.pending.get(sig)
        if (old is not None and old <= size) or (pend is not None and pend[2] <= size):
            return False
        if self.tries.get(sig, 0) >= self.MAX_TRIES and sig not in self.stats.findings:
            return False
        self.pending[sig] = (res, seed, size)
        new = sig not in self.stats.findings and sig not in self.preexisting
        if old is None:
            self.flush(sig)
        return new

    def flush_all(self) -> None:
        for sig in list(self.pending):
            self.flush(sig)

    def flush(self, sig: str) -> bool:
        """Verify and write the pending run of ``sig``; True if a reproducer was written."""
        item = self.pending.pop(sig, None)
        if item is None:
            return False
        res, seed, size = item
        f = res.finding
        assert f is not None
        path = os.path.join(self.cfg.findings_dir, f"{f.sig_id}.toml")
        text = reproducer_text(res, seed, self.cfg, path)
        if self.verify:
            from hmmirror.sim.verify import replays_in_fresh_process

            self.tries[sig] = self.tries.get(sig, 0) + 1
            tmp = _write_temp(self.cfg.findings_dir, text)
            try:
                verdict = replays_in_fresh_process(tmp, sig)
                if not verdict.ok:
                    if sig not in self.stats.findings:
                        self.stats.unconfirmed[sig] = verdict.why
                        bad = os.path.join(self.cfg.findings_dir, "unconfirmed", f"{f.sig_id}.toml")
                        write_atomic(bad, f"# NOT A REPRODUCER: {verdict.why}\n" + text)
                    return False
                os.replace(tmp, path)
                tmp = ""
            finally:
                if tmp:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
        else:
            write_atomic(path, text)
        self.stats.unconfirmed.pop(sig, None)
        self.known[sig] = size
        saved = Saved(f, path, seed, size)
        self.stats.findings[sig] = saved
        if self.notify is not None:
            self.notify(saved)
        return True


def _write_temp(directory: str, text: str) -> str:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".toml", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    return tmp


# --- one unit of work: the outer loop is in "the campaign" below -------------------------------------


def shrink_budget(cfg: Config) -> float:
    """Seconds of shrinking per new finding: a tenth of a timed campaign (at least 3, at most 60; 60 without a
    time limit), so that a short campaign keeps searching instead of polishing its first reproducer."""
    if not cfg.seconds or cfg.seconds <= 0:
        return 60.0
    return max(3.0, min(60.0, cfg.seconds / 10))


def _coverage_for(cfg: Config) -> Any:
    try:
        from hmmirror.sim.coverage import Coverage
    except ImportError:
        return None
    return Coverage(cfg.kernel, cfg.driver)


class UnitSearch:
    """The search state of one unit: the steering weights and the cells covered before its round (from the
    coordinator, fixed for the unit so that a unit stays a function of its inputs), and what it gives back --
    per-feature feedback, the cells it covered, runs on known signatures, multi-finding runs."""

    def __init__(self, cfg: Config, guide: dict[str, Any] | None = None, unit: int = 0) -> None:
        guide = guide or {}
        self.unit = unit
        self.weights: dict[str, float] = dict(guide.get("weights") or {})
        self.model: dict[str, Any] = dict(guide.get("model") or {})
        self.rejected = 0
        self.cov = _coverage_for(cfg)
        if self.cov is not None and guide.get("cells"):
            self.cov.merge(guide["cells"])
        self._targets: list[tuple[str, ...]] | None = None
        self._frozen: list[tuple[str, ...]] | None = None
        self.steer = Steering()
        self.known_runs = 0
        self.known_stops = 0                        # known-only runs that a known stopping finding ended
        self.multi_runs = 0
        self.known_hits: dict[str, int] = {}

    def collector(self) -> Any:
        return self.cov.run_collector() if self.cov is not None else None

    def targets(self, frozen: bool = False) -> list[tuple[str, ...]] | None:
        """The reachable cells not covered yet (before this round, and by this unit's runs so far): what the
        generator aims a share of its scenarios at (``generate(targets=)``; a function of the unit's inputs).
        ``frozen``: the list as it was at the first call, for the whole unit -- a Hypothesis session replays
        choice prefixes and must see the same draws for them (a list that shrinks while it runs changes what a
        prefix draws: Hypothesis's FlakyStrategyDefinition)."""
        if self.cov is None:
            return None
        if frozen:
            if self._frozen is None:
                from hmmirror.sim.coverage import cell_targets
                self._frozen = cell_targets(self.cov)
            return self._frozen
        if self._targets is None:
            from hmmirror.sim.coverage import cell_targets
            self._targets = cell_targets(self.cov)
        return self._targets

    def result(self) -> dict[str, Any]:
        return {"feedback": self.steer.counts(), "known_runs": self.known_runs, "known_stops": self.known_stops,
                "rejected": self.rejected,
                "multi_runs": self.multi_runs,
                "known_hits": dict(self.known_hits), "cells": self.cov.snapshot() if self.cov is not None else None}


def _account(res: SimResult, seed: int, stats: Stats, rec: Recorder, guide: "UnitSearch | None",
             features: list[str], jobs: "list[list[str]] | None" = None) -> str | None:
    """Book one run: known signatures are counted (not saved again), new ones offered to the recorder (every
    finding of the run, not only the first; a signature first found by this unit counts as known for its later
    runs, which are offered only to keep the smallest run); the unit's steering feedback learns from the run's
    features.  Returns the first new signature."""
    new_cells = guide.cov.add_run(res) if guide is not None and guide.cov is not None else False
    if new_cells and guide is not None:
        guide._targets = None                     # the targets shrink
    mine = rec.found_here
    new = [f for f in res.findings if f.signature not in rec.preexisting and f.signature not in mine]
    known = [f.signature for f in res.findings if f.signature in rec.preexisting or f.signature in mine]
    for sig in known:
        stats.known_hits[sig] = stats.known_hits.get(sig, 0) + 1
    known_only = bool(known) and not new
    stats.known_runs += known_only
    stats.multi_runs += len(res.findings) > 1
    for f in new:
        if f.signature not in rec.tries and f.signature not in stats.findings:
            rec.hit(f.signature)                  # the run that found it (later runs: known hits)
        mine.add(f.signature)
        rec.offer(res.for_finding(f), seed)
    for f in res.findings:
        if f.signature in known and f.signature not in rec.preexisting:
            rec.offer(res.for_finding(f), seed)   # found by this unit before: keep the smaller run
    if guide is not None:
        for sig in known:
            guide.known_hits[sig] = guide.known_hits.get(sig, 0) + 1
        guide.known_runs += known_only
        from hmmirror.sim.engine import STOPPING
        guide.known_stops += known_only and any(f.invariant in STOPPING for f in res.findings)
        guide.multi_runs += len(res.findings) > 1
        guide.steer.feed(features, [f.signature for f in res.findings], bool(new_cells),
                         (guide.unit, len(guide.steer.rows)), jobs)
    return new[0].signature if new else None


def _hypothesis_session(cfg: Config, seed: int, deadline: float, stats: Stats, rec: Recorder,
                        tick: Callable[[], None] | None = None, guide: "UnitSearch | None" = None) -> None:
    """``cfg.examples`` runs of scenarios and bounded switch lists drawn by Hypothesis (generation only: a
    finding does not end the session and is not shrunk here -- the campaign shrinks every new signature once,
    at its end, :meth:`Collector.finish`)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    weights = guide.weights if guide is not None and cfg.steer else None   # fixed for the whole unit
    model = guide.model if guide is not None and cfg.steer else None

    from hmmirror.strategies import draw_scenario     # one generator, two front ends (hmmirror.strategies)

    def body(data: Any) -> None:
        c = SaltedHypothesisChoices(data)        # weights hold for every entry, the first one too
        feats: list[str] = []
        sc = draw_scenario(c, cfg.kernel, cfg.driver, cfg.kinds, cfg.events, max_switches=cfg.max_switches,
                           inject=cfg.inject, weights=weights, features=feats,
                           targets=guide.targets(frozen=True) if guide is not None and cfg.target else None)
        jobs = job_features(sc)
        run_it = _accepted(model, feats, c, jobs)
        if time.monotonic() > deadline:           # after the draws: the same choices draw the same way
            raise _OutOfTime()
        if not run_it:                            # expected to hit only known signatures: not run
            stats.rejected += 1
            if guide is not None:
                guide.rejected += 1
            # a seeded run of the steered draw instead (its seed from this example's data): drawing a scenario
            # through Hypothesis costs ~15x a seeded draw (43 ms against 3 ms at load 19), and skipping the
            # examples the steering rejects left a campaign on known findings at half the runs of a blind one
            _seeded_run(cfg, c.below(1 << 62), deadline, stats, rec, ("random", "pct")[c.below(2)], guide)
            if tick is not None:
                tick()
            return
        res = run_scenario(sc, scheduler_for(sc), every_step=cfg.every_step, record_trace=False,
                           coverage=guide.collector() if guide is not None else None)
        stats.runs += 1
        stats.steps += res.steps
        _account(res, seed, stats, rec, guide, feats, jobs)
        if tick is not None:
            tick()

    test = given(st.data())(body)
    test = settings(max_examples=cfg.examples, database=None, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate],
                    report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)(test)
    test = hseed(seed)(test)
    try:
        with _fixed_constant_pool():
            test()
    except _OutOfTime:
        pass
    except Exception as exc:              # noqa: BLE001 - Hypothesis health/flaky errors end the session only
        stats.errors.append(f"session {seed}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    rec.flush_all()


@contextlib.contextmanager
def _fixed_constant_pool() -> Iterator[None]:
    """Hypothesis draws some integers from a pool of constants it collects from the source of every *local*
    module in ``sys.modules`` (hypothesis.internal.conjecture.providers): a session would draw other scenarios
    in a worker that imported one more module of ours (a forked local worker inherits its parent's imports, a
    Dask worker starts fresh), so ``--runs`` campaigns would not be the same everywhere.  During a session the
    local pool is empty (Hypothesis's global constants stay); restored afterwards."""
    try:
        from hypothesis.internal.conjecture import providers as hp
        empty = hp.Constants(integers=hp.SortedSet(), floats=hp.SortedSet(key=hp.float_to_int),
                             bytes=hp.SortedSet(), strings=hp.SortedSet())
        saved = hp._get_local_constants, hp.CONSTANTS_CACHE
        fresh = type(saved[1])(1024)
    except (ImportError, AttributeError, TypeError):    # another Hypothesis: nothing to pin
        yield
        return
    hp._get_local_constants, hp.CONSTANTS_CACHE = (lambda: empty), fresh
    try:
        yield
    finally:
        hp._get_local_constants, hp.CONSTANTS_CACHE = saved


def draw_steered(cfg: Config, seed: int, stats: Stats | None = None, guide: "UnitSearch | None" = None
                 ) -> tuple[int, Any, SimScenario, list[str], list[list[str]]]:
    """The scenario the seeded run ``seed`` runs: the first of up to :data:`MAX_DRAWS` candidates the steering
    accepts (:func:`accept_probability`), or when it accepts none, the one with the lowest known-only estimate.
    Returns the candidate's seed, its choices (the scheduler draws on from them), the scenario, its drawn
    features and its jobs' features."""
    def draw(seed_j: int) -> tuple[Any, SimScenario, list[str], list[list[str]]]:
        c = SeededChoices(seed_j)
        feats: list[str] = []
        sc = generate(c, cfg.kernel, cfg.driver, cfg.kinds, cfg.events,
                      weights=guide.weights if guide is not None and cfg.steer else None, inject=cfg.inject,
                      features=feats, targets=guide.targets() if guide is not None and cfg.target else None)
        return c, sc, feats, job_features(sc)

    model = guide.model if guide is not None and cfg.steer else None
    best: tuple[float, int] | None = None                  # (estimate, candidate) of the least likely known-only
    for j in range(MAX_DRAWS if model else 1):
        seed_j = candidate_seed(seed, j)
        c, sc, feats, jobs = draw(seed_j)
        if not model or _accepted(model, feats, SeededChoices(seed_j ^ 0x5EED), jobs):
            break
        est = known_only_estimate(model, feats, jobs)
        if best is None or est < best[0]:
            best = (est, j)
        if j == MAX_DRAWS - 1:                             # none accepted: the one least likely known-only
            if best[1] != j:
                seed_j = candidate_seed(seed, best[1])
                c, sc, feats, jobs = draw(seed_j)
            break
        if stats is not None:
            stats.rejected += 1
        if guide is not None:
            guide.rejected += 1
    return seed_j, c, sc, feats, jobs


def _seeded_run(cfg: Config, seed: int, deadline: float, stats: Stats, rec: Recorder,
                scheduler: str | None = None, guide: "UnitSearch | None" = None) -> None:
    """One run of a scenario and a per-step ``random`` / ``pct`` schedule from the seeded stream ``seed`` (a new
    signature is kept as it is; the campaign shrinks it at its end, :meth:`Collector.finish`)."""
    seed_j, c, sc, feats, jobs = draw_steered(cfg, seed, stats, guide)
    seed = seed_j
    if (scheduler or cfg.scheduler) == "random":
        sc.scheduler = {"kind": "random", "seed": seed}
        sched = RandomScheduler(c)
    else:
        sc.scheduler = {"kind": "pct", "seed": seed, "depth": 3, "expected_steps": 2000}
        sched = PCTScheduler(c, 3, 2000)
    res = run_scenario(sc, sched, every_step=cfg.every_step,
                       coverage=guide.collector() if guide is not None else None)
    stats.runs += 1
    stats.steps += res.steps
    _account(res, seed, stats, rec, guide, feats, jobs)


# --- our shrinker for seeded runs ------------------------------------------------------------------------
class NamedSwitchScheduler:
    """Switch points by task name: at step ``s`` run task ``name`` if it is runnable (shrinking aid)."""

    name = "named-switch"

    def __init__(self, switches: list[tuple[int, str]]) -> None:
        self.switches = sorted(switches)
        self._i = 0
        self.cur: Any = None

    def pick(self, engine: Any, runnable: list[Any]) -> Any:
        sw = self.switches
        want = None
        while self._i < len(sw) and sw[self._i][0] <= engine.step:
            want = sw[self._i][1]
            self._i += 1
        if want is not None:
            for t in runnable:
                if t.name == want:
                    self.cur = t
                    return t
        if self.cur is None or self.cur.done or self.cur not in runnable:
            self.cur = runnable[0]
        return self.cur


def _switches(res: SimResult) -> list[tuple[int, str]]:
    out = []
    step = 0
    for name, n in res.schedule:
        out.append((step, name))
        step += int(n)
    return out


def shrink_greedy(res: SimResult, deadline: float, every_step: bool = False, sig: str | None = None
                  ) -> SimResult | None:
    """Greedy delta debugging of a seeded finding (``sig``, default the first): scenario parts, then context
    switches, keeping a run in which that signature is among the findings."""
    assert res.finding is not None
    sig = sig or res.finding.signature
    best_sc = res.scenario.copy()
    best_sw = _switches(res)
    best: SimResult | None = None
    inv = sig.split("|", 1)[0]

    def attempt(sc: SimScenario, sw: list[tuple[int, str]]) -> SimResult | None:
        # the attempt ends at the finding it is looking for (a page-count finding's signature is known only
        # after the replay that locates it: that one ends at the first page-count finding)
        r = run_scenario(sc, NamedSwitchScheduler(sw), every_step=every_step, record_trace=False,
                         stop_when=lambda f: f.signature == sig or (f.invariant == "page_counts" == inv))
        hit = next((f for f in r.findings if f.signature == sig), None)
        return r.for_finding(hit) if hit is not None else None

    first = attempt(best_sc, best_sw)
    if first is None:
        return None
    best = first
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for cand in _scenario_cuts(best_sc):
            if time.monotonic() > deadline:
                break
            r = attempt(cand, best_sw)
            if r is not None:
                best_sc, best, progress = cand, r, True
                break
        if progress:
            continue
        # context switches: halves, then one at a time
        n = len(best_sw)
        chunk = max(n // 2, 1)
        while chunk >= 1 and time.monotonic() < deadline:
            i = 0
            changed = False
            while i < len(best_sw) and time.monotonic() < deadline:
                cand_sw = best_sw[:i] + best_sw[i + chunk:]
                r = attempt(best_sc, cand_sw)
                if r is not None:
                    best_sw, best, changed, progress = cand_sw, r, True, True
                else:
                    i += chunk
            if not changed:
                chunk //= 2
    if best is not None:
        best.scenario.scheduler = {"kind": "switch", "switches": []}
    return best


def shrink_text(text: str, sig: str, deadline: float, every_step: bool = False) -> SimResult | None:
    """Shrink the run a reproducer text records (its scenario under its recorded schedule) keeping ``sig``;
    None when the text does not replay to ``sig`` here."""
    from hmmirror.sim.runner import scheduler_for

    sc = SimScenario.from_toml(text, "reproducer")
    res = run_scenario(sc, scheduler_for(sc), every_step=every_step, record_trace=False)
    hit = next((f for f in res.findings if f.signature == sig), None)
    if hit is None or res.diverged:
        return None
    return shrink_greedy(res.for_finding(hit), deadline, every_step, sig)


def _scenario_cuts(sc: SimScenario) -> list[SimScenario]:
    out = []
    for i in range(len(sc.events)):
        c = sc.copy()
        del c.events[i]
        out.append(c)
    for i, d in enumerate(sc.devices):
        if len(d["jobs"]) > 1:
            for j in range(len(d["jobs"])):
                c = sc.copy()
                del c.devices[i]["jobs"][j]
                out.append(c)
        elif len(sc.devices) > 1:
            c = sc.copy()
            del c.devices[i]
            out.append(c)
    for i, t in enumerate(sc.threads):
        c = sc.copy()
        del c.threads[i]
        out.append(c)
        for j in range(len(t["ops"])):
            c = sc.copy()
            del c.threads[i]["ops"][j]
            out.append(c)
    for i, op in enumerate(sc.setup):
        if op["op"] in ("touch", "madvise"):
            c = sc.copy()
            del c.setup[i]
            out.append(c)
    return out


# --- the campaign: units of work, rounds, workers, signals, resume (the outer loop) ----------------------
#
# A campaign is a sequence of *units*: unit ``u`` is one Hypothesis session or one batch of seeded runs, its
# seed is ``unit_seed(cfg, u)`` and its budget ``cfg.examples`` generated runs (a seeded batch: half of it).
# A unit is a pure function of the configuration, its index, its budget and the signatures known when it
# starts, so units can run anywhere -- a worker process here, a Dask worker on another machine -- in any
# order.  Units are dispatched in *rounds* of ``cfg.epoch`` units (``_rounds``): every unit of a round knows
# the signatures known when the campaign started plus those found by the earlier rounds, and with ``--runs``
# the budgets of a round come from what earlier rounds left.  The same seed therefore gives the same set of
# runs whatever the number of workers and wherever they run.  Workers write reproducers into a private spool
# directory and send the text to the coordinator (:class:`Collector`), which keeps the smallest reproducer per
# signature in the findings directory.  The done units are recorded there (``STATE_FILE``), so a later
# campaign with the same configuration continues the seed sequence.

STATE_FILE = ".campaign-state.json"


def unit_seed(cfg: Config, unit: int) -> int:
    """The seed of unit ``unit`` of the campaign ``cfg.seed`` (the seed sequence resume continues)."""
    return cfg.seed * 1_000_003 + unit


def unit_kind(cfg: Config, unit: int) -> str:
    """``"hypothesis"`` or ``"seeded"``: what unit ``unit`` runs (``mixed`` alternates, starting with Hypothesis)."""
    if cfg.scheduler == "switch" or (cfg.scheduler == "mixed" and unit % 2 == 0):
        return "hypothesis"
    return "seeded"


#: runs of a unit of a timed campaign: small, so that the steering and the coverage of earlier rounds reach the
#: later ones several times a minute (``--runs`` campaigns keep ``examples`` / ``examples // 2``)
TIMED_UNIT_RUNS = 24


def unit_budget(cfg: Config, unit: int) -> int:
    """Runs of a full unit."""
    if not cfg.runs and cfg.seconds and cfg.seconds > 0:
        return max(1, min(TIMED_UNIT_RUNS, cfg.examples))
    return max(1, cfg.examples if unit_kind(cfg, unit) == "hypothesis" else cfg.examples // 2)


def round_size(cfg: Config) -> int:
    """Units per round: ``cfg.epoch``; a timed campaign uses two per worker (feedback flows sooner)."""
    if not cfg.runs and cfg.seconds and cfg.seconds > 0:
        return max(2, 2 * max(cfg.jobs, 1))
    return max(1, cfg.epoch)


#: a timed campaign ends its search this share of ``--seconds`` before the end (at most FINISH_MAX seconds)
#: and spends it shrinking (the first 60 %) and replaying its new findings in a fresh process
FINISH_SHARE = 0.15
FINISH_MAX = 60.0


def campaign_deadlines(cfg: Config, start: float) -> tuple[float, float | None, float]:
    """(end of the search, end of shrinking or None for the per-finding budget, end of the campaign) as
    ``time.time()`` values for a campaign started at ``start``."""
    if not cfg.seconds or cfg.seconds <= 0:
        return float("inf"), None, float("inf")
    end = start + cfg.seconds
    fin = min(cfg.seconds * FINISH_SHARE, FINISH_MAX)
    return end - fin, end - 0.4 * fin, end


def _rounds(cfg: Config, start: int, skip: frozenset[int], deadline_wall: float,
            run_round: Callable[[list[tuple[int, int]], frozenset[str]], list["UnitResult"] | None],
            known: set[str]) -> None:
    """Dispatch the campaign's units in rounds of ``cfg.epoch``: ``run_round(units, known)`` runs a list of
    ``(unit, budget)`` with the signatures known before the round and returns their results (None: stop).

    With ``cfg.runs`` the budgets of a round add up to what is left of it; a unit that ends early (a
    Hypothesis session stops at a new finding) leaves its remaining budget to later rounds, so the campaign
    makes exactly ``cfg.runs`` generated runs.  Everything depends only on earlier rounds' results.
    """
    left = cfg.runs or None
    u = start
    while time.time() < deadline_wall and (left is None or left > 0):
        units: list[tuple[int, int]] = []
        planned = 0
        while len(units) < round_size(cfg):
            if u in skip:
                u += 1
                continue
            b = unit_budget(cfg, u)
            if left is not None:
                b = min(b, left - planned)
                if b <= 0:
                    break
            units.append((u, b))
            planned += b
            u += 1
        if not units:
            return
        results = run_round(units, frozenset(known))
        if results is None:
            return
        for r in results:
            known |= set(r.findings)
        if left is not None:
            made = sum(r.generated for r in results)
            if made == 0:
                return
            left -= made
        if len(results) < len(units):
            return


@dataclass
class UnitResult:
    """What one unit did; ``findings`` maps a signature to its reproducer (``text``, ``name``, ``size``...)."""

    unit: int
    budget: int
    runs: int = 0
    steps: int = 0
    generated: int = 0              # runs drawn by the generator (not shrinking re-runs): what --runs counts
    complete: bool = False
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)    # UnitSearch.result(): feedback, cells, known runs
    hits: dict[str, int] = field(default_factory=dict)          # runs of this unit that reached a signature
    unconfirmed: dict[str, str] = field(default_factory=dict)   # signatures whose runs did not replay


def _saved_payload(s: Saved) -> dict[str, Any]:
    try:
        with open(s.path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        text = ""
    f = s.finding
    return {"invariant": f.invariant, "location": f.location, "signature": f.signature, "seed": s.seed,
            "message": f.message, "size": list(s.size), "name": os.path.basename(s.path), "text": text,
            "spool": os.path.dirname(os.path.abspath(s.path))}


def run_unit(cfg: Config, unit: int, budget: int, known: frozenset[str] | set[str], deadline_wall: float,
             spool: str | None = None, report: Callable[[str, Any], None] | None = None,
             stats: Stats | None = None, guide: dict[str, Any] | None = None) -> UnitResult:
    """Run unit ``unit`` with ``budget`` runs; reproducers are written into ``spool`` (a private temporary
    directory when None) and returned as text.  ``deadline_wall`` is a ``time.time()`` (inf: none).
    ``guide``: the coordinator's steering weights and covered cells before this round (:class:`UnitSearch`)."""
    import dataclasses
    import shutil

    own = spool is None
    spool = spool or tempfile.mkdtemp(prefix="hmmirror-spool-")
    left = deadline_wall - time.time()
    deadline = time.monotonic() + left if left < 1e12 else float("inf")
    ucfg = dataclasses.replace(cfg, findings_dir=spool, examples=budget)
    stats = stats if stats is not None else Stats()
    r0, s0 = stats.runs, stats.steps
    hits0 = dict(stats.hits)
    out = UnitResult(unit, budget)

    def notify(s: Saved) -> None:
        p = _saved_payload(s)
        p["at"] = min(out.findings.get(p["signature"], {}).get("at", float("inf")), time.time())
        out.findings[p["signature"]] = p
        if report is not None:
            report("finding", p)

    # the unit keeps the smallest run per new signature as text; the coordinator shrinks and verifies them
    # once, at the end of the campaign (Collector.finish), so the search never waits for either
    rec = Recorder(ucfg, stats, notify, verify=False)
    rec.preexisting = set(known)
    last = [time.monotonic(), stats.runs, stats.steps]

    def tick() -> None:
        if report is not None and time.monotonic() - last[0] > 0.5:
            report("stats", (stats.runs - last[1], stats.steps - last[2]))
            last[:] = [time.monotonic(), stats.runs, stats.steps]

    seed = unit_seed(cfg, unit)
    search = UnitSearch(cfg, guide, unit)
    try:
        with _unit_gc():
            _unit_body(cfg, ucfg, unit, budget, seed, deadline, stats, rec, tick, search)
        out.complete = time.monotonic() <= deadline
    finally:
        out.runs, out.steps = stats.runs - r0, stats.steps - s0
        out.generated = out.runs
        if report is not None:
            report("stats", (stats.runs - last[1], stats.steps - last[2]))
        out.errors = list(stats.errors)
        out.search = search.result()
        out.hits = {k: n - hits0.get(k, 0) for k, n in stats.hits.items() if n > hits0.get(k, 0)}
        out.unconfirmed = {k: v for k, v in stats.unconfirmed.items() if k not in stats.findings}
        if own:
            shutil.rmtree(spool, ignore_errors=True)
    return out


#: the cyclic garbage collector's thresholds while a unit runs (Python's defaults: 700, 10, 10).  A run makes
#: and drops a whole machine's object graph; with the defaults the collector ran ~120 times a second and a
#: full collection (the campaign's long-lived heap: Hypothesis's trees, steering rows) every ~1.5 s: 10 % of a
#: 5.2 campaign's CPU, 5 % with these (measured through gc.callbacks, session 5).  Only when garbage is
#: collected changes, not what is computed.
UNIT_GC_THRESHOLDS = (10000, 10, 10)


@contextlib.contextmanager
def _unit_gc() -> Iterator[None]:
    """:data:`UNIT_GC_THRESHOLDS` for the duration of a unit (restored afterwards)."""
    import gc

    old = gc.get_threshold()
    gc.set_threshold(*UNIT_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _unit_body(cfg: Config, ucfg: Config, unit: int, budget: int, seed: int, deadline: float, stats: Stats,
               rec: "Recorder", tick: Callable[[], None], search: "UnitSearch") -> None:
    """The runs of a unit: a Hypothesis session or ``budget`` seeded runs."""
    if unit_kind(cfg, unit) == "hypothesis":
        _hypothesis_session(ucfg, seed, deadline, stats, rec, tick, search)
    else:
        for k in range(budget):
            if time.monotonic() > deadline:
                break
            kind = cfg.scheduler if cfg.scheduler in ("random", "pct") else ("random" if k % 2 == 0 else "pct")
            _seeded_run(ucfg, seed * 1000 + k, deadline, stats, rec, kind, search)
            tick()


class Collector:
    """The coordinator's side: keeps the smallest reproducer per signature in ``cfg.findings_dir``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.best = known_signatures(cfg.findings_dir)
        self.start_known = frozenset(self.best) | (load_known_file(cfg.known_file) if cfg.known_file else set())
        self.steer = Steering()
        if not cfg.fresh:                       # --fresh starts again: the earlier runs' evidence too
            self.steer.load(os.path.join(cfg.findings_dir, STEER_FILE))
        self.cov = _coverage_for(cfg)
        self.known_runs = 0
        self.known_stops = 0
        self.multi_runs = 0
        self.rejected = 0
        self.known_hits: dict[str, int] = {}
        self.found: dict[str, dict[str, Any]] = {}     # this campaign's findings by signature
        self.runs = 0
        self.steps = 0
        self.generated = 0
        self.errors: list[str] = []
        self.started = time.time()
        self.interrupted = False
        self.hits: dict[str, int] = {}
        self.unconfirmed: dict[str, str] = {}
        self.workers: dict[Any, list[int]] = {}       # worker -> [runs, steps] (throughput)
        self.pending: dict[str, dict[str, Any]] = {}   # new signature -> best run's payload, before finish()
        self.finish_seconds: dict[str, float] = {}
        self.search_seconds = 0.0
        self.first_at: dict[str, float] = {}            # signature -> wall time of its first run

    def worker_stats(self, w: Any, runs: int, steps: int) -> None:
        self.runs += runs
        self.steps += steps
        ws = self.workers.setdefault(w, [0, 0])
        ws[0] += runs
        ws[1] += steps

    def finding(self, p: dict[str, Any]) -> None:
        """A unit's run of a new signature (reproducer text, not verified yet): the smallest per signature is
        kept (ties: the lower run seed, so that the choice does not depend on which worker reported first);
        :meth:`finish` shrinks, verifies and writes them."""
        sig = p["signature"]
        if p.get("at") is not None:                # when a worker first ran into it (time to first hit)
            self.first_at[sig] = min(self.first_at.get(sig, float("inf")), float(p["at"]))
        if not p.get("text"):
            return
        key = (tuple(p["size"]), p.get("seed", 0))
        old = self.pending.get(sig)
        if old is None or key < (tuple(old["size"]), old.get("seed", 0)):
            self.pending[sig] = dict(p)

    def finish(self, shrink_until: float | None = None, stats: Stats | None = None) -> dict[str, Any]:
        """The end of a campaign: shrink the best run of every new signature (greedy, time-boxed: until the
        wall-clock ``shrink_until``, shared out equally; without one, :func:`shrink_budget` each), replay them
        all in fresh processes (:func:`~hmmirror.sim.verify.replays_in_fresh_process`: forks of one zygote),
        write those that replay into the findings directory and list the others as unconfirmed.  Returns the
        seconds spent shrinking and verifying (reported apart from the search)."""
        from hmmirror.sim.verify import replays_in_fresh_process, shutdown_zygote

        t0 = time.time()
        items = sorted(self.pending.items())
        self.pending = {}
        fdir = self.cfg.findings_dir
        texts: list[tuple[str, dict[str, Any], str, tuple[int, int]]] = []
        for i, (sig, p) in enumerate(items):
            path = os.path.join(fdir, p["name"])
            text = p["text"].replace(p["spool"] + os.sep, fdir.rstrip(os.sep) + os.sep) if p.get("spool") else \
                p["text"]
            size = tuple(p["size"])
            left = (shrink_until - time.time()) / (len(items) - i) if shrink_until is not None else \
                shrink_budget(self.cfg)
            if left > 0.2:
                try:
                    small = shrink_text(text, sig, time.monotonic() + left, self.cfg.every_step)
                except Exception as exc:          # noqa: BLE001 - shrinking is best effort; the run stands
                    small = None
                    self.errors.append(f"shrinking {sig}: {type(exc).__name__}: {exc}")
                if small is not None and (small.scenario.size(), small.steps) < size:
                    size = (small.scenario.size(), small.steps)
                    text = reproducer_text(small, int(p.get("seed", 0)), self.cfg, path)
            texts.append((sig, p, text, size))                  # type: ignore[arg-type]
        t1 = time.time()
        tmps = [_write_temp(fdir, text) for _sig, _p, text, _size in texts]
        try:
            verdicts = [replays_in_fresh_process(t, sig) for t, (sig, _p, _x, _s) in zip(tmps, texts)]
            for tmp, (sig, p, text, size), v in zip(tmps, texts, verdicts):
                path = os.path.join(fdir, p["name"])
                if not v.ok:
                    self.unconfirmed[sig] = v.why
                    write_atomic(os.path.join(fdir, "unconfirmed", p["name"]), f"# NOT A REPRODUCER: {v.why}\n" + text)
                    continue
                old = self.best.get(sig)
                if old is None or size < tuple(old):
                    os.replace(tmp, path)
                    self.best[sig] = size                        # type: ignore[assignment]
                q = {k: v_ for k, v_ in p.items() if k not in ("text", "spool")}
                q["size"], q["reproducer"] = list(size), path
                self.found[sig] = q
                self.unconfirmed.pop(sig, None)
                if stats is not None:
                    f = Finding(p["invariant"], p.get("message", ""), 0, "-", location=p["location"],
                                detail=sig.split("|", 2)[2] if sig.count("|") >= 2 else "-")
                    stats.findings[sig] = Saved(f, path, int(p.get("seed", 0)), size)   # type: ignore[arg-type]
        finally:
            shutdown_zygote()                   # the coordinator's replays end with the campaign
            for t in tmps:
                try:
                    os.unlink(t)
                except OSError:
                    pass
        if stats is not None:
            for sig in self.unconfirmed:
                stats.findings.pop(sig, None)
            stats.unconfirmed.update(self.unconfirmed)
        self.finish_seconds = {"shrink": round(t1 - t0, 1), "verify": round(time.time() - t1, 1)}
        try:
            self.steer.save(os.path.join(fdir, STEER_FILE))   # what the next campaign here steers from
        except OSError as exc:
            self.errors.append(f"saving the steering rows: {exc}")
        return self.finish_seconds

    def unit(self, r: UnitResult) -> None:
        self.generated += r.generated
        for p in r.findings.values():
            self.finding(p)
        for sig, n in getattr(r, "hits", {}).items():
            self.hits[sig] = self.hits.get(sig, 0) + n
        self.unconfirmed.update(getattr(r, "unconfirmed", {}))
        self.errors += [f"unit {r.unit}: {e}" for e in r.errors[:5]]
        sr = r.search or {}
        if sr.get("feedback"):
            self.steer.merge(sr["feedback"])
        if self.cov is not None and sr.get("cells"):
            self.cov.merge(sr["cells"])
        self.known_runs += int(sr.get("known_runs", 0))
        self.known_stops += int(sr.get("known_stops", 0))
        self.rejected += int(sr.get("rejected", 0))
        self.multi_runs += int(sr.get("multi_runs", 0))
        for sig, n in sr.get("known_hits", {}).items():
            self.known_hits[sig] = self.known_hits.get(sig, 0) + int(n)

    def guide(self) -> dict[str, Any]:
        """What the next round's units start from: steering weights and the cells covered so far."""
        # away from what was known when the campaign started (its findings directory, --known): a campaign
        # that also moved away from what it found itself covered fewer cells and missed rare behaviours that
        # share a walk with common ones (session 4, 5.2 seeds 47129/90917/58231: 80-83 % of the reachable
        # cells and B9 in 0 of 3, against 86-89 % and 2 of 3 unsteered); its own finds are counted, not saved
        # again, and steer the campaigns started on its findings
        known = set(self.start_known)
        weights = dict(self.steer.fit(known)) if self.cfg.steer else {}
        return {"weights": weights, "model": dict(self.steer.model) if self.cfg.steer else {},
                "cells": self.cov.snapshot() if self.cov is not None else None}

    def coverage_counts(self) -> tuple[int, int]:
        if self.cov is None:
            return 0, 0
        s = self.cov.summary()
        return s["covered"], s["total"]

    def state(self) -> dict[str, Any]:
        return {"runs": self.runs, "steps": self.steps, "findings": {**self.pending, **self.found},
                "errors": self.errors,
                "started": self.started, "known_runs": self.known_runs, "collector": self}

    def result(self) -> dict[str, Any]:
        findings = sorted(self.found.values(), key=lambda d: (d["invariant"], d["location"], d["signature"]))
        elapsed = time.time() - self.started
        return {"findings": [{"invariant": d["invariant"], "location": d["location"], "reproducer": d["reproducer"],
                              "seed": d["seed"], "signature": d["signature"], "message": d["message"],
                              "hits": self.hits.get(d["signature"], 0) + self.known_hits.get(d["signature"], 0),
                              # seconds from the start of the campaign to the first run that reached it
                              "first_s": round(self.first_at[d["signature"]] - self.started, 1)
                              if d["signature"] in self.first_at else None}
                             for d in findings],
                # signatures reached whose runs did not replay to them in a fresh process: no reproducer
                "unconfirmed": [{"signature": sig, "why": why,
                                 "hits": self.hits.get(sig, 0) + self.known_hits.get(sig, 0)}
                                for sig, why in sorted(self.unconfirmed.items()) if sig not in self.found],
                "runs": self.runs, "generated": self.generated, "steps": self.steps, "errors": self.errors,
                "seconds": round(elapsed, 1), "interrupted": self.interrupted,
                # the search alone, and the end of the campaign: shrinking and fresh-process verification
                "search_seconds": round(self.search_seconds, 1), "finish_seconds": self.finish_seconds,
                **throughput(self.workers, self.search_seconds or elapsed, max(self.cfg.jobs, 1), self.runs,
                             self.steps),
                **self.search_summary()}

    def search_summary(self) -> dict[str, Any]:
        """Runs on known signatures, multi-finding runs, the known signatures hit, how many signatures are new,
        the coverage summary and cells (for the heat map)."""
        runs = max(self.generated or self.runs, 1)
        return {"known_runs": self.known_runs, "known_fraction": round(self.known_runs / runs, 3),
                # of those, the runs a known stopping finding ended (liveness, deadlock...: cut short by it)
                "known_stop_runs": self.known_stops, "known_stop_fraction": round(self.known_stops / runs, 3),
                "multi_finding_runs": self.multi_runs,
                # drawn scenarios not run because the steering expected only known signatures from them
                "rejected_draws": self.rejected,
                "known_hits": dict(sorted(self.known_hits.items(), key=lambda kv: -kv[1])),
                "new": len(self.found), "known_at_start": len(self.start_known),
                "coverage": self.cov.summary() if self.cov is not None else None,
                "coverage_cells": self.cov.snapshot() if self.cov is not None else None}


# -- resume state -------------------------------------------------------------------------------------------
def campaign_key(cfg: Config) -> str:
    """What identifies a campaign's seed sequence (a resumed campaign must match it)."""
    return json.dumps([cfg.kernel, cfg.driver, cfg.scheduler, cfg.seed, cfg.examples, cfg.epoch, cfg.every_step,
                       list(cfg.kinds) if cfg.kinds is not None else None,
                       list(cfg.events) if cfg.events is not None else None])


def load_state(cfg: Config) -> tuple[int, frozenset[int]]:
    """``(first unit not known done, done units above it)`` of this campaign in the findings directory."""
    try:
        with open(os.path.join(cfg.findings_dir, STATE_FILE), encoding="utf-8") as fh:
            doc = json.load(fh)
        st = doc["campaigns"][campaign_key(cfg)]
        return int(st["next"]), frozenset(int(u) for u in st.get("done", []))
    except (OSError, ValueError, KeyError, TypeError):
        return 0, frozenset()


def save_state(cfg: Config, done: set[int]) -> None:
    """Record the done units (compacted: everything below ``next`` is done)."""
    path = os.path.join(cfg.findings_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        if not isinstance(doc.get("campaigns"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        doc = {"campaigns": {}}
    nxt = 0
    while nxt in done:
        nxt += 1
    doc["campaigns"][campaign_key(cfg)] = {"next": nxt, "done": sorted(u for u in done if u > nxt),
                                           "seed": cfg.seed, "kernel": cfg.kernel}
    write_atomic(path, json.dumps(doc, indent=1) + "\n")


# -- in this process ---------------------------------------------------------------------------------------
def campaign(cfg: Config, deadline: float, worker: int = 0, report: Callable[[str, Any], None] | None = None) -> Stats:
    """The campaign in this process, unit after unit, until ``deadline`` (``time.monotonic()``), ``cfg.runs``
    runs or ``cfg.stop_after`` findings; then its new findings are shrunk, verified and written into
    ``cfg.findings_dir`` (:meth:`Collector.finish`)."""
    import shutil

    _ = worker
    os.makedirs(cfg.findings_dir, exist_ok=True)
    stats = Stats()
    now = time.time()
    end_wall = now + (deadline - time.monotonic())
    timed = dataclasses.replace(cfg, seconds=max(end_wall - now, 0.0)) if deadline < float("inf") else cfg
    search_wall, shrink_wall, _end = campaign_deadlines(timed, now)
    spool = tempfile.mkdtemp(prefix="hmmirror-spool-")

    def run_round(units: list[tuple[int, int]], known: frozenset[str]) -> list[UnitResult] | None:
        out = []
        for u, b in units:
            if time.time() >= search_wall:
                return None
            out.append(run_unit(timed, u, b, known, search_wall, spool, report, stats, col.guide()))
            col.unit(out[-1])
            if cfg.stop_after and len(stats.findings) >= cfg.stop_after:
                return None
        return out

    col = Collector(timed)
    try:
        _rounds(timed, 0, frozenset(), search_wall, run_round, set(col.start_known))
        col.search_seconds = time.time() - now
        stats.findings.clear()
        col.finish(shrink_wall, stats)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    stats.known_runs, stats.multi_runs = col.known_runs, col.multi_runs
    return stats


# -- worker processes ---------------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL): the kernel kills this worker when its parent dies, whatever killed it."""
    from hmmirror.sim.lifecycle import die_with_parent
    die_with_parent(parent)


def _worker_main(cfg: Config, parent: int, worker: int, tasks: Any, q: Any) -> None:
    import signal

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the coordinator's: it stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spool = tempfile.mkdtemp(prefix=f"hmmirror-spool-{worker}-")

    def report(kind: str, payload: Any) -> None:
        q.put((kind, worker, payload))

    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            u, b, known, deadline_wall = task[:4]
            guide = task[4] if len(task) > 4 else None
            try:
                r = run_unit(cfg, u, b, known, deadline_wall, spool, report, None, guide)
            except Exception as exc:            # noqa: BLE001 - report it, the coordinator goes on
                r = UnitResult(u, b, errors=[f"{type(exc).__name__}: {exc}"])
            r.findings = {k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in r.findings.items()}
            q.put(("unit", worker, r))
    finally:
        import shutil
        shutil.rmtree(spool, ignore_errors=True)
        from hmmirror.sim.verify import shutdown_zygote
        shutdown_zygote()                       # its replays count as this worker's CPU time


class _Local:
    """Worker processes of this machine (fork), fed units through a queue."""

    def __init__(self, cfg: Config, col: Collector, on_update: Callable[[dict[str, Any]], None] | None) -> None:
        import multiprocessing as mp

        self.cfg, self.col, self.on_update = cfg, col, on_update
        ctx = mp.get_context("fork")
        self.tasks = ctx.Queue()
        self.q = ctx.Queue()
        me = os.getpid()
        self.procs = [ctx.Process(target=_worker_main, args=(cfg, me, w, self.tasks, self.q), daemon=True)
                      for w in range(max(cfg.jobs, 1))]
        for p in self.procs:
            p.start()

    def run_epoch(self, units: list[tuple[int, int]], known: frozenset[str], deadline_wall: float) -> list[UnitResult]:
        import queue as _queue

        guide = self.col.guide()                # steering and coverage of the rounds before this one
        for u, b in units:
            self.tasks.put((u, b, known, deadline_wall, guide))
        out: list[UnitResult] = []
        while len(out) < len(units):
            try:
                kind, w, payload = self.q.get(timeout=0.25)
            except _queue.Empty:
                if self.on_update:
                    self.on_update(self.col.state())
                if not any(p.is_alive() for p in self.procs):
                    self.col.errors.append("every worker process died")
                    break
                if time.time() > deadline_wall + 300:
                    self.col.errors.append("workers did not stop within 5 minutes of the deadline")
                    break
                continue
            if kind == "stats":
                self.col.worker_stats(w, payload[0], payload[1])
            elif kind == "finding":
                self.col.finding(payload)
            elif kind == "unit":
                out.append(payload)
                self.col.unit(payload)
            if self.on_update:
                self.on_update(self.col.state())
        return out

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put_nowait(None)
            except Exception:          # noqa: BLE001
                pass
        end = time.monotonic() + 2
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self.q.cancel_join_thread()
        self.tasks.cancel_join_thread()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=2)
        self.q.cancel_join_thread()
        self.tasks.cancel_join_thread()


def run_campaign(cfg: Config, on_update: Callable[[dict[str, Any]], None] | None = None,
                 executor: Any = None) -> dict[str, Any]:
    """The whole campaign; returns ``{"findings": [...], "runs", "steps", "errors", "seconds", "interrupted"}``.

    Workers are ``cfg.jobs`` processes of this machine unless ``executor`` is given (``executor(cfg, col,
    on_update)`` returns an object with ``run_epoch`` and ``close``, see :mod:`hmmirror.sim.dask`).  A
    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) stops the workers and returns what was
    found so far with ``"interrupted": True``.  The campaign continues the seed sequence of an earlier one
    with the same configuration and findings directory (unless ``cfg.fresh``).
    """
    os.makedirs(cfg.findings_dir, exist_ok=True)
    col = Collector(cfg)
    start, skip = (0, frozenset()) if cfg.fresh else load_state(cfg)
    done = set(range(start)) | set(skip)
    t0 = time.time()
    search_wall, shrink_wall, _end = campaign_deadlines(cfg, t0)
    pool: Any = None
    try:
        pool = (executor or _Local)(cfg, col, on_update)
        def run_round(units: list[tuple[int, int]], known: frozenset[str]) -> list[UnitResult] | None:
            results = pool.run_epoch(units, known, search_wall)
            for r in results:
                if r.complete and (r.budget == unit_budget(cfg, r.unit) or r.generated < r.budget):
                    done.add(r.unit)
            save_state(cfg, done)
            if cfg.stop_after and len(col.found) + len(col.pending) >= cfg.stop_after:
                return None
            return results

        _rounds(cfg, start, skip, search_wall, run_round, set(col.start_known))
        col.search_seconds = time.time() - t0
        pool.close()
        pool = None
    except KeyboardInterrupt:
        col.interrupted = True
        col.search_seconds = time.time() - t0
        if pool is not None:
            pool.kill()
            pool = None
        try:
            save_state(cfg, done)
        except OSError:
            pass
    finally:
        if pool is not None:
            pool.kill()
    try:
        # shrink (not when interrupted: the user wants to stop) and verify what the search found
        col.finish(time.time() if col.interrupted else shrink_wall)
    except KeyboardInterrupt:
        col.interrupted = True
    if on_update:
        on_update(col.state())
    return col.result()


def throughput(workers: dict[Any, list[int]], elapsed: float, jobs: int, runs: int = 0,
               steps: int = 0) -> dict[str, Any]:
    """Runs/s and steps/s per worker (each worker's counts over the campaign's wall time) and their mean
    over ``jobs`` workers (from the totals when the workers did not report separately)."""
    el = max(elapsed, 1e-9)
    per = [{"worker": w, "runs": r, "steps": st, "runs_per_s": round(r / el, 2), "steps_per_s": round(st / el, 1)}
           for w, (r, st) in sorted(workers.items(), key=lambda kv: str(kv[0]))]
    tr = sum(r for r, _ in workers.values()) if workers else runs
    ts = sum(st for _, st in workers.values()) if workers else steps
    n = max(jobs, 1)
    return {"workers": per, "runs_per_s_per_worker": round(tr / el / n, 2),
            "steps_per_s_per_worker": round(ts / el / n, 1)}


_ = (json, scheduler_for)
