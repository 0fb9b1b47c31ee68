"""Runs tests/multidevice/ on 4 simulated CPU devices in a subprocess.

XLA reads the device count once, when JAX starts, so the flag cannot be set
inside this test process without disturbing every other test.
"""

import pytest
from processes import ROOT, cpu_env, run_pytest

# Two halves of about equal time, so that two workers can share them.
HALVES = {"fused": "fused", "the_rest": "not fused"}


@pytest.mark.slow
@pytest.mark.parametrize("half", sorted(HALVES))
def test_vocab_parallel_on_four_devices(half):
    result = run_pytest(["-k", HALVES[half], str(ROOT / "tests" / "multidevice")],
                        cpu_env(4, JSOFTMAX_MULTIDEVICE="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_named_reduction_is_a_distinct_static_argument():
    """The named axes are a tuple of ints to jnp, but never equal to the plain
    axes, so jit never reuses an unsharded compilation for a sharded call."""
    from jsoftmax._normalise import Reduction as _Reduction

    named = _Reduction((1,), "v")
    assert tuple(named) == (1,)
    assert named != (1,) and (1,) != named and not named == (1,)
    assert named == _Reduction((1,), "v") and named != _Reduction((1,), "w")
    assert hash(named) == hash(_Reduction((1,), "v")) != hash((1,))
