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


def test_named_axes_are_distinct_in_trees_and_caches():
    """The axes with a mesh axis name never equal the plain axes, as values
    or as pytree structures, so no trace or compilation of one serves the other."""
    import jax

    from jsoftmax._normalise import Axes

    named = Axes((1,), "v")
    assert named == Axes((1,), "v") and hash(named) == hash(Axes((1,), "v"))
    assert named != Axes((1,), "w") and named != Axes((1,)) and named != (1,)
    assert jax.tree.leaves(named) == []
    assert jax.tree.structure(named) != jax.tree.structure(Axes((1,)))
