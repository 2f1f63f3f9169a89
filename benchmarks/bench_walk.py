#!/usr/bin/env python3
"""Run the fast-walk benchmark (same as ``hmmirror bench``); ``--json`` for machine-readable output.

Usage: ``PYTHONPATH=src python benchmarks/bench_walk.py [--json] [--runs N] [--profile 6.18] [--case NAME]``
"""

from __future__ import annotations

import sys

from hmmirror.cli.bench import command

if __name__ == "__main__":
    command.main(args=sys.argv[1:], prog_name="bench_walk.py")
