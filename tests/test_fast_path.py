"""The select-free fast path of the core (t = 1, no mask, no weights) against
the general path, on arrays large enough for XLA's fused CPU kernels.

XLA compiles large reductions differently from the small arrays of
tests/test_core.py, so the edge handling of the fast path is checked here at
sizes where it actually runs fused. The general path is reached with a traced
temperature of 1, which is the same function (test_core checks both against
float64 and mpmath references).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax

INF = np.inf
BIG = float(np.finfo(np.float32).max)


def _edge_rows(width):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, width)).astype(np.float32) * 3
    x[1, ::5] = -INF  # -inf entries
    x[2, :] = -INF  # nothing included
    x[3, [3, 50]] = INF  # +inf entries share the mass; float32 max does not
    x[3, 70] = BIG
    x[4, width // 2] = np.nan  # NaN poisons its row only
    x[5, [0, 7, width - 1]] = x[5].max() + 1.0  # a three-way tie on top
    x[6] *= 10.0  # a dominant top entry: rest summing to ~1e-13
    x[6, 0] = x[6].max() + 30.0
    x[7] *= 1e29
    x[8] = 0.0  # uniform
    return jnp.asarray(x)


FUNCS = {
    "softmax": lambda x, **k: jsoftmax.softmax(x, **k),
    "log_softmax": lambda x, **k: jsoftmax.log_softmax(x, **k),
    "logsumexp": lambda x, **k: jsoftmax.logsumexp(x, axis=-1, **k),
}


def _general(fn):
    return jax.jit(lambda x, t: fn(x, temperature=t))


def _assert_same(fast, general, rtol, atol=1e-30):
    fast, general = np.asarray(fast, np.float64), np.asarray(general, np.float64)
    assert fast.shape == general.shape
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(general))
    np.testing.assert_array_equal(np.isinf(fast) * np.sign(fast),
                                  np.isinf(general) * np.sign(general))
    ok = np.isfinite(general)
    np.testing.assert_allclose(fast[ok], general[ok], rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=[2048, 40000], ids=["rows2048", "rows40000"])
def x(request):
    return _edge_rows(request.param)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_fast_path_values_match_the_general_path(x, name):
    fn = FUNCS[name]
    _assert_same(jax.jit(fn)(x), _general(fn)(x, 1.0), rtol=4e-7)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_fast_path_gradients_match_the_general_path(x, name):
    fn = FUNCS[name]
    w = jax.random.normal(jax.random.key(3), jax.eval_shape(fn, x).shape)

    def loss(x, t):
        out = fn(x) if t is None else fn(x, temperature=t)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * w)

    fast = jax.jit(jax.grad(lambda x: loss(x, None)))(x)
    general = jax.jit(jax.grad(loss))(x, 1.0)
    # g - softmax * sum(g) cancels: compare at the scale of its terms.
    _assert_same(fast, general, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))
    # Excluded entries (-inf, and the finite ones of a +inf row) move nothing.
    assert np.all(np.asarray(fast)[1, ::5] == 0) and np.all(np.asarray(fast)[2] == 0)
    assert np.all(np.asarray(fast)[3, [0, 70]] == 0)


def test_fast_path_edge_values(x):
    s = np.asarray(jax.jit(jsoftmax.softmax)(x))
    ls = np.asarray(jax.jit(jsoftmax.log_softmax)(x))
    lse = np.asarray(jax.jit(lambda x: jsoftmax.logsumexp(x, axis=-1))(x))
    assert np.all(s[2] == 0) and np.all(ls[2] == -INF) and lse[2] == -INF
    np.testing.assert_array_equal(s[3][[3, 50]], 0.5)
    assert np.sum(s[3]) == 1.0 and s[3, 70] == 0 and ls[3, 70] == -INF and lse[3] == INF
    assert np.all(np.isnan(s[4])) and np.all(np.isnan(ls[4])) and np.isnan(lse[4])
    assert s[5, 0] == s[5, 7] == s[5, -1] == s[5].max()  # ties share equally
    # The top entry of the dominant row keeps its tiny value: -log1p(rest).
    rest = np.exp(np.asarray(x[6], np.float64) - float(x[6, 0]))[1:].sum()
    np.testing.assert_allclose(ls[6, 0], -np.log1p(rest), rtol=4e-7)
    assert ls[6, 0] != 0.0
