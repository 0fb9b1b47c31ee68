"""Tests for segment_softmax, segment_log_softmax and segment_logsumexp.

References: the dense float64 softmax of each segment's entries
(tests/reference.py, written from the definition), and on ordinary inputs
jraph's formulation, ported from jraph v0.0.6.dev0 jraph/_src/utils.py
(segment_max, exp, segment_sum, gather).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

import jsoftmax

INF = np.inf
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _jraph_segment_softmax(logits, ids, num_segments):
    """jraph's segment_softmax: its formulation, used as a reference."""
    maxs = jax.ops.segment_max(logits, ids, num_segments)
    logits = jnp.exp(logits - maxs[ids])
    return logits / jax.ops.segment_sum(logits, ids, num_segments)[ids]


@pytest.fixture(scope="module")
def graph():
    """20 entries with 2 heads over 6 segments; segment 4 is empty."""
    rng = np.random.default_rng(0)
    ids = rng.choice([0, 1, 2, 3, 5], size=20)
    x = (2 * rng.standard_normal((20, 2))).astype(np.float32)
    return x, ids, 6


@JIT
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
def test_matches_dense_softmax_on_each_segment(graph, sort, jit):
    x, ids, n = graph
    if sort:
        order = np.argsort(ids, kind="stable")
        x, ids = x[order], ids[order]
    keep = np.ones_like(x, bool)
    keep[3, 1] = keep[7, 0] = False
    t = np.array([1.0, 0.5, 2.0, 0.0, 1.0, INF], np.float32)[:, None]

    def fns(x, ids):
        kw = dict(where=keep, temperature=t, indices_are_sorted=sort)
        return (jsoftmax.segment_softmax(x, ids, n, **kw),
                jsoftmax.segment_log_softmax(x, ids, n, **kw),
                jsoftmax.segment_logsumexp(x, ids, n, **kw))

    p, lp, lse = (jax.jit(fns) if jit else fns)(x, ids)
    np.testing.assert_allclose(p, ref.segment_apply(ref.probabilities, x, ids, n, keep, t),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lp, ref.segment_apply(ref.log_probabilities, x, ids, n, keep, t),
                               rtol=1e-6, atol=1e-6)
    want = ref.segment_logsumexp(x, ids, n, keep, t)
    finite = np.isfinite(want)
    np.testing.assert_allclose(lse[finite], want[finite], rtol=1e-6)
    np.testing.assert_array_equal(lse[~finite], want[~finite])
    assert p.dtype == lp.dtype == lse.dtype == jnp.float32 and lse.shape == (n, 2)


def test_equals_jraph_formulation_on_ordinary_inputs(graph):
    x, ids, n = graph
    np.testing.assert_allclose(
        jsoftmax.segment_softmax(x, ids, n), _jraph_segment_softmax(x, ids, n), rtol=1e-6
    )


def test_edges_per_segment():
    # segment 0: ordinary; 1: fully masked; 2: two +inf; 3: a NaN; 4: empty;
    # ids 9 and -1 are in no segment.
    x = jnp.array([0.0, 1.0, 5.0, 6.0, INF, 2.0, INF, 1.0, jnp.nan, 3.0, 4.0])
    ids = jnp.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 9, -1])
    keep = jnp.array([True, True, False, False] + [True] * 7)
    p = jsoftmax.segment_softmax(x, ids, 5, where=keep)
    lp = jsoftmax.segment_log_softmax(x, ids, 5, where=keep)
    lse = jsoftmax.segment_logsumexp(x, ids, 5, where=keep)
    e = 1 / (1 + np.e)
    np.testing.assert_allclose(p[:2], [e, 1 - e], rtol=1e-6)
    np.testing.assert_array_equal(p[2:7], [0, 0, 0.5, 0, 0.5])
    assert np.all(np.isnan(p[7:9])) and np.all(p[9:] == 0)
    np.testing.assert_array_equal(lp[2:4], [-INF, -INF])
    np.testing.assert_array_equal(lp[9:], [-INF, -INF])
    np.testing.assert_allclose(lse[0], np.log(1 + np.e), rtol=1e-6)
    assert lse[1] == -INF and lse[2] == INF and np.isnan(lse[3]) and lse[4] == -INF

    # The gradients of the well-defined segments are finite, and zero on the
    # excluded entries, the empty and the fully masked segments.
    finite = jnp.array([True] * 7 + [False, False, True, True])
    for fn in (
        lambda x: jnp.sum(jnp.where(finite, jsoftmax.segment_softmax(x, ids, 5, where=keep)
                                    * jnp.arange(11.0), 0.0)),
        lambda x: jnp.sum(jsoftmax.segment_logsumexp(x, ids, 5, where=keep)[jnp.array([0, 1, 4])]),
    ):
        g = np.asarray(jax.grad(fn)(x))
        assert np.all(np.isfinite(g[finite])), g
        np.testing.assert_array_equal(g[2:4], 0.0)
        np.testing.assert_array_equal(g[9:], 0.0)
        h = np.asarray(jax.hessian(fn)(x))[np.ix_(finite, finite)]
        assert np.all(np.isfinite(h)), h


def test_hard_max_and_uniform_temperatures_per_segment():
    x = jnp.array([1.0, 3.0, 3.0, 0.0, 2.0, -INF])
    ids = jnp.array([0, 0, 0, 1, 1, 1])
    p = jsoftmax.segment_softmax(x, ids, 2, temperature=jnp.array([0.0, INF]))
    np.testing.assert_array_equal(p, [0, 0.5, 0.5, 0.5, 0.5, 0])
    lse = jsoftmax.segment_logsumexp(x, ids, 2, temperature=jnp.array([0.0, INF]))
    np.testing.assert_array_equal(lse, [3.0, INF])


def test_invalid_traced_temperature_makes_only_its_segment_nan():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    ids = jnp.array([0, 0, 1, 1])
    p = jax.jit(lambda t: jsoftmax.segment_softmax(x, ids, 2, temperature=t))(
        jnp.array([-1.0, 1.0])
    )
    assert np.all(np.isnan(p[:2])) and np.all(np.isfinite(p[2:]))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
    "fn",
    [jsoftmax.segment_softmax, jsoftmax.segment_logsumexp],
    ids=["softmax", "logsumexp"],
)
def test_check_grads_to_second_order(fn):
    # segment_log_softmax is core's log_softmax rule over the same Segments
    # reduction that segment_softmax exercises here (its second order is
    # checked in tests/test_core.py); its values and gradients are above.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 2))
    ids = np.array([0, 2, 0, 1, 2, 2, 0, 1, 5])  # 5 is in no segment
    keep = np.ones((9, 2), bool)
    keep[0, 0] = False
    # No empty segment here: check_grads feeds the outputs back as tangents
    # and cotangents, and an empty segment's -inf would make them NaN itself
    # (its zero gradients are tested above).
    f = lambda x, t: fn(x, ids, 3, where=keep, temperature=t)
    check_grads(f, (x, np.array([0.7, 1.3, 2.0])[:, None]), order=2, modes=["fwd", "rev"])


def test_gradient_matches_dense_softmax_per_segment(graph):
    x, ids, n = graph
    proj = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    got = jax.grad(lambda x: jnp.sum(jsoftmax.segment_softmax(x, ids, n) * proj))(x)
    # d/dx_i sum_j proj_j p_j = p_i (proj_i - sum_j p_j proj_j) within the segment.
    p = ref.segment_apply(ref.probabilities, x, ids, n)
    want = np.zeros_like(p)
    for g in range(n):
        m = ids == g
        want[m] = p[m] * (proj[m] - np.sum(p[m] * proj[m], axis=0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_and_low_precision(graph):
    x, ids, n = graph
    batched = jax.vmap(lambda x: jsoftmax.segment_softmax(x, ids, n), in_axes=1, out_axes=1)(x)
    np.testing.assert_allclose(batched, ref.segment_apply(ref.probabilities, x, ids, n),
                               rtol=1e-6, atol=1e-7)
    low = jsoftmax.segment_softmax(jnp.asarray(x, jnp.bfloat16), ids, n)
    assert low.dtype == jnp.bfloat16
    want = ref.segment_apply(ref.probabilities, np.asarray(jnp.asarray(x, jnp.bfloat16),
                                                           np.float64), ids, n)
    np.testing.assert_allclose(np.asarray(low, np.float64), want, rtol=1e-2, atol=1e-3)


def test_num_segments_defaults_outside_jit_and_is_required_under_it():
    x = jnp.array([1.0, 2.0, 3.0])
    ids = jnp.array([0, 2, 2])
    assert jsoftmax.segment_logsumexp(x, ids).shape == (3,)
    assert jsoftmax.segment_logsumexp(x[:0], ids[:0]).shape == (0,)
    assert jsoftmax.segment_softmax(x[:0], ids[:0], 4).shape == (0,)
    with pytest.raises(ValueError, match="num_segments is required under jit"):
        jax.jit(lambda ids: jsoftmax.segment_softmax(x, ids))(ids)


def test_bad_arguments_name_the_fix():
    x = jnp.ones((3, 2))
    with pytest.raises(TypeError, match="integer segment ids"):
        jsoftmax.segment_softmax(x, jnp.zeros(3), 2)
    with pytest.raises(ValueError, match="one id per entry"):
        jsoftmax.segment_softmax(x, jnp.zeros(4, int), 2)
    with pytest.raises(ValueError, match="entries axis first"):
        jsoftmax.segment_softmax(jnp.float32(1.0), jnp.zeros((), int), 1)
    with pytest.raises(ValueError, match="temperature"):
        jsoftmax.segment_softmax(x, jnp.zeros(3, int), 2, temperature=jnp.ones(3))
    with pytest.raises(TypeError, match="num_segments must be a Python int"):
        jsoftmax.segment_softmax(x, jnp.zeros(3, int), 2.0)


def test_vmap_over_logits_and_ids():
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)
    ids = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], [2, 2, 2, 0, 0, -1]])
    got = jax.vmap(lambda x, i: jsoftmax.segment_softmax(x, i, 3))(x, ids)
    want = [ref.segment_apply(ref.probabilities, x[k], ids[k], 3) for k in range(3)]
    np.testing.assert_allclose(got, np.nan_to_num(want, nan=0.0), rtol=1e-6, atol=1e-7)
