"""The CLI contract under malformed input (Hypothesis): the project's scenarios and reproducers broken in every
way tests/cli/cli_inputs.py knows, and random command lines, never give a traceback, a crash report or an exit
code outside 0/1/2; a code-2 error is one line naming the file or the option; a known-malformed input always
gives 2.  The long version (>= 10,000 inputs) is benchmarks/bench_cli_contract.py."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_inputs import argv_cases, file_cases, limits, run_case  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(case=file_cases())
def test_broken_scenarios_and_reproducers_keep_the_contract(case, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("case")
    with limits():
        o = run_case(case, tmp)
    assert o.problem is None, (o.problem, case.how, o.err[-500:])


@settings(max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=__import__("hypothesis").strategies.data())
def test_random_command_lines_keep_the_contract(data, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("argv")
    case = data.draw(argv_cases(str(tmp)))
    with limits():
        o = run_case(case, tmp)
    assert o.problem is None, (o.problem, case.argv, o.err[-500:])
