"""Campaigns on a Dask distributed cluster (``hmmirror fuzz --dask ADDRESS`` or ``--dask local:N``).

The units of a campaign (:func:`hmmirror.sim.fuzz.run_unit`) are pure functions of the configuration, the
unit's index and budget, and the signatures known when its round starts; this executor submits each round's
units as Dask tasks and hands their results -- run counts and the reproducer texts -- to the coordinator,
which writes one reproducer per signature into the findings directory of this machine.  So workers may be on
other machines (they need hmmirror and the driver's module installed), findings are deduplicated into one
directory, and the same seed gives the same set of runs as a local campaign.  Why Dask and not Ray:
docs/campaigns.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from hmmirror.errors import InputError

EXTRA_HINT = "install the dask extra: pip install 'hmmirror[dask]' (or pip install -e '.[dask]')"


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise InputError(f"--dask needs dask.distributed: {EXTRA_HINT}") from None
    return distributed


def check_address(address: str, max_workers: int = 1024) -> str:
    """``local:N`` or a scheduler address (``tcp://host:8786``); InputError if malformed or no dask."""
    _distributed()
    if address.startswith("local:"):
        n = address[6:]
        if not n.isdigit() or not 1 <= int(n) <= max_workers:
            raise InputError(f"--dask {address}: use local:N with N workers, 1 <= N <= {max_workers}")
        return address
    if not address or any(c.isspace() for c in address):
        raise InputError(f"--dask {address!r}: give a scheduler address like tcp://host:8786 or local:N")
    return address


class DaskExecutor:
    """Runs rounds of units on a Dask cluster: ``DaskExecutor.factory(address)`` is a ``run_campaign``
    executor (``executor(cfg, collector, on_update)``)."""

    def __init__(self, cfg: Any, col: Any, on_update: Callable[[dict[str, Any]], None] | None, address: str,
                 connect_timeout: float = 20.0) -> None:
        distributed = _distributed()
        self.cfg, self.col, self.on_update = cfg, col, on_update
        self.cluster = None
        self.tag = uuid.uuid4().hex[:8]
        if address.startswith("local:"):
            self.cluster = distributed.LocalCluster(n_workers=int(address[6:]), threads_per_worker=1,
                                                    processes=True, dashboard_address=None,
                                                    silence_logs=logging.ERROR)
            self.client = distributed.Client(self.cluster)
        else:
            try:
                self.client = distributed.Client(address, timeout=connect_timeout)
            except (OSError, TimeoutError, ValueError) as exc:
                raise InputError(f"--dask {address}: cannot reach the scheduler: {exc}") from None

    @classmethod
    def factory(cls, address: str) -> Callable[..., "DaskExecutor"]:
        return lambda cfg, col, on_update: cls(cfg, col, on_update, address)

    def run_epoch(self, units: list[tuple[int, int]], known: frozenset[str], deadline_wall: float) -> list[Any]:
        from distributed import as_completed

        from hmmirror.sim.fuzz import run_unit

        guide = self.col.guide()
        futs = [self.client.submit(run_unit, self.cfg, u, b, known, deadline_wall, None, None, None, guide,
                                   key=f"hmmirror-unit-{self.tag}-{self.cfg.seed}-{u}", pure=False)
                for u, b in units]
        out = []
        try:
            for fut in as_completed(futs):
                try:
                    r = fut.result()
                except Exception as exc:          # noqa: BLE001 - a lost worker: the round is incomplete
                    self.col.errors.append(f"dask: {type(exc).__name__}: {exc}")
                    continue
                self.col.runs += r.runs
                self.col.steps += r.steps
                self.col.unit(r)
                out.append(r)
                if self.on_update:
                    self.on_update(self.col.state())
        except BaseException:
            self.client.cancel(futs)
            raise
        out.sort(key=lambda r: r.unit)
        return out

    def close(self) -> None:
        t0 = time.monotonic()
        try:
            self.client.close(timeout=10)
        finally:
            if self.cluster is not None:
                self.cluster.close(timeout=max(1.0, 20 - (time.monotonic() - t0)))

    kill = close
