"""The tests marked ``codegen``, under XLA's default flags.

The suite compiles with XLA:CPU's loop emitters (tests/conftest.py says why)
and skips the tests marked ``codegen`` there: compiled memory and ulp-level
accuracy are properties of the code XLA generates, so they run here, in a
subprocess with XLA's defaults.
"""

import os
import re

import pytest
from processes import run_pytest

# Two halves of about equal time, so that two workers can share them.
HALVES = {"core": ["tests/test_core.py"], "the_rest": ["tests", "--ignore=tests/test_core.py"]}


@pytest.mark.slow
@pytest.mark.parametrize("half", sorted(HALVES))
def test_codegen_tests_pass_under_xla_defaults(request, half):
    flag = request.config.jsoftmax_fast_compile
    if flag is None:
        pytest.skip("this run is under XLA's defaults already, the codegen tests included")
    env = dict(os.environ, JSOFTMAX_TEST_XLA_DEFAULTS="1")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(flag, "").strip()
    listed = run_pytest(["--collect-only", "-m", "codegen", *HALVES[half]], env)
    expected = len([line for line in listed.stdout.splitlines() if "::" in line])
    assert expected >= 10, listed.stdout[-2000:]
    result = run_pytest(["-m", "codegen", *HALVES[half]], env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary)}
    assert set(counts) <= {"passed", "xfailed", "deselected", "warnings"}, summary
    assert counts.get("passed", 0) + counts.get("xfailed", 0) == expected, summary
