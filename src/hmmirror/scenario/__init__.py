"""Scenario files: a machine, files, processes and a list of operations with expectations (TOML).

``load(path)`` parses and validates a file (:mod:`.schema`), ``run(scenario)`` executes it on the model
(:mod:`.runner`); :mod:`.report` renders the records.  The format is documented in docs/scenarios.md.
Operations are registered with :func:`register_op`; modules of this package named ``*_ops`` are loaded
automatically.
"""

from hmmirror.scenario.runner import Outcome, OpResult, Run, RunContext, build, execute, run
from hmmirror.scenario.schema import OPS, Addr, Op, OpDef, Scenario, load, parse, parse_addr, parse_size, register_op

__all__ = [
    "OPS", "Addr", "Op", "OpDef", "OpResult", "Outcome", "Run", "RunContext", "Scenario", "build", "execute",
    "load", "parse", "parse_addr", "parse_size", "register_op", "run",
]
