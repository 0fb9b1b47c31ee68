"""The core at t = 1, no mask, no weights against float64 NumPy, on arrays
large enough for XLA's fused CPU kernels.

XLA compiles large reductions differently from the small arrays of
tests/test_core.py (and its fused max has dropped NaN at some widths), so the
edge handling is checked here at sizes where it actually runs fused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jsoftmax

INF = np.inf
BIG = float(np.finfo(np.float32).max)


def _edge_rows(width):
    """Nine rows: ordinary ones and every edge, at a width XLA fuses."""
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


ORDINARY = [0, 1, 5, 6, 7, 8]  # rows with a finite max and no NaN
EPS = float(np.finfo(np.float32).eps)


# Widths at which XLA:CPU has chosen different kernels for these reductions.
@pytest.fixture(
    scope="module", params=[1024, 2048, 40000], ids=["rows1024", "rows2048", "rows40000"]
)
def x(request):
    return _edge_rows(request.param)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_fast_path_values_against_float64(x, name):
    got = np.asarray(jax.jit(FUNCS[name])(x), np.float64)[ORDINARY]
    want = ref.split_at_max(name, np.asarray(x)[ORDINARY])
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    ok = np.isfinite(want)
    if name == "softmax":  # absolute, as in test_core: tiny entries inherit x - max rounding
        np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=4 * EPS)
    else:  # the contract: 8 eps max(1, |value|)
        err = np.abs(got[ok] - want[ok]) / np.maximum(1.0, np.abs(want[ok]))
        assert np.max(err) <= 8 * EPS, np.max(err) / EPS


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_fast_path_gradients_against_float64(x, name):
    fn = FUNCS[name]
    w = np.asarray(jax.random.normal(jax.random.key(3), jax.eval_shape(fn, x).shape))

    def loss(x):
        out = fn(x)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * w)

    got = np.asarray(jax.jit(jax.grad(loss))(x), np.float64)
    rows = np.asarray(x, np.float64)[ORDINARY]
    p, _ = ref.softmax_and_max(rows)
    w = np.asarray(w, np.float64)[ORDINARY]
    included = np.isfinite(rows)
    if name == "softmax":
        want = p * (w - np.sum(p * w, -1, keepdims=True))
    elif name == "log_softmax":
        g = np.where(included, w, 0.0)  # the loss drops the -inf outputs
        want = np.where(included, g - p * g.sum(-1, keepdims=True), 0.0)
    else:
        want = p * w[:, None]
    scale = np.max(np.abs(w)) * (1 if name != "log_softmax" else rows.shape[-1] ** 0.5)
    np.testing.assert_allclose(got[ORDINARY], want, rtol=0, atol=1e-5 * scale)
    # Excluded entries (-inf, and the finite ones of a +inf row) move nothing.
    assert np.all(got[1, ::5] == 0) and np.all(got[2] == 0)
    assert np.all(got[3, [0, 70]] == 0)
    assert np.all(np.isnan(got[4]))  # the NaN row


def test_fast_path_edge_values(x):
    s = np.asarray(jax.jit(jsoftmax.softmax)(x))
    ls = np.asarray(jax.jit(jsoftmax.log_softmax)(x))
    lse = np.asarray(jax.jit(lambda x: jsoftmax.logsumexp(x, axis=-1))(x))
    assert np.all(s[2] == 0) and np.all(ls[2] == -INF) and lse[2] == -INF
    np.testing.assert_array_equal(s[3][[3, 50]], 0.5)
    assert np.sum(s[3]) == 1.0 and s[3, 70] == 0 and ls[3, 70] == -INF and lse[3] == INF
    assert np.all(np.isnan(s[4])) and np.all(np.isnan(ls[4])) and np.isnan(lse[4])
    assert s[5, 0] == s[5, 7] == s[5, -1] == s[5].max()  # ties share equally
    # The top entry of the dominant row is -log1p(rest) ~ -1e-13, to within
    # an ulp of 1 (float32 takes jax.nn's single sum).
    rest = np.exp(np.asarray(x[6], np.float64) - float(x[6, 0]))[1:].sum()
    assert abs(ls[6, 0] + np.log1p(rest)) <= EPS


def test_fast_logsumexp_nan_next_to_inf_is_nan():
    # A NaN poisons its slice also next to a +inf (the fused max alone would
    # drop the NaN and return +inf). Hand reference: any NaN term -> NaN.
    x = np.zeros((3, 4096), np.float32)
    x[0, [5, 9]] = [INF, np.nan]
    x[1, 7] = np.nan
    x[2, 3] = INF
    lse = np.asarray(jax.jit(lambda x: jsoftmax.logsumexp(x, axis=-1))(jnp.asarray(x)))
    assert np.isnan(lse[0]) and np.isnan(lse[1]) and lse[2] == INF
