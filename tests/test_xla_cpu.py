"""The XLA:CPU formulations of jsoftmax._xla_cpu against float64 NumPy and
the formulation every other backend runs (jnp.sum per value)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsoftmax import _xla_cpu

INF = float("inf")


def _values(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape) * 3.0
    b = np.exp(rng.normal(size=shape))
    if a.size:
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        # Every edge a sum can meet, in the first slices.
        flat_a[:4] = [INF, 1.0, -INF, 2.0]
        flat_b[:3] = [np.nan, 1.0, INF]
        flat_a[-2:] = [-INF, -INF]
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize(
    "shape, axes", [((6, 5), (1,)), ((3, 4, 7), (1, 2)), ((5, 3), (0,)), ((4, 0), (1,))],
    ids=["rows", "two-axes", "leading", "empty"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_sums_match_numpy_and_one_sum_each(x64, dtype, shape, axes, jit):
    a, b = _values(shape, np.float64 if dtype == jnp.float64 else np.float32, 0)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    sums = jax.jit(_xla_cpu.sums, static_argnums=1) if jit else _xla_cpu.sums
    got = sums((a, b), axes)
    for g, v in zip(got, (a, b), strict=True):
        assert g.dtype == v.dtype and g.shape == np.sum(np.asarray(v), axis=axes,
                                                        keepdims=True).shape
        v64 = np.asarray(v.astype(jnp.float64) if dtype != jnp.bfloat16 else v.astype(
            jnp.float32)).astype(np.float64)
        want = np.sum(v64, axis=axes, keepdims=True)
        other = np.asarray(jnp.sum(v, axis=axes, keepdims=True).astype(jnp.float64))
        g = np.asarray(g.astype(jnp.float64))
        # Same NaN and infinities as both references, and the finite sums
        # within the rounding of a sum in the value's dtype.
        for ref in (want, other):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(ref))
            np.testing.assert_array_equal(np.isinf(g) * np.sign(g), np.isinf(ref) * np.sign(ref))
        finite = np.isfinite(want)
        eps = float(jnp.finfo(dtype).eps)
        scale = np.sum(np.abs(np.where(np.isfinite(v64), v64, 0.0)), axis=axes, keepdims=True)
        assert np.all(np.abs(g - want)[finite] <= 8 * eps * scale[finite] + 1e-300)


def test_sums_of_one_value_and_under_vmap_and_grad():
    a, b = (jnp.asarray(v) for v in _values((4, 6), np.float32, 1))
    (only,) = _xla_cpu.sums((b,), (1,))
    np.testing.assert_allclose(only, jnp.sum(b, 1, keepdims=True), rtol=1e-6)
    batched = jax.vmap(lambda u, w: _xla_cpu.sums((u, w), (0,)))(a, b)
    for g, v in zip(batched, (a, b), strict=True):
        np.testing.assert_allclose(g[:, 0], np.sum(np.asarray(v, np.float64), 1), rtol=1e-5)
    # Linear in each value: the gradient of a weighted total is the weights.
    w = jnp.arange(4.0)[:, None]
    grad = jax.grad(lambda u, v: jnp.sum(w * sum(_xla_cpu.sums((u, 2 * v), (1,)))), (0, 1))
    gu, gv = grad(jnp.ones((4, 6)), jnp.ones((4, 6)))
    np.testing.assert_array_equal(gu, jnp.broadcast_to(w, (4, 6)))
    np.testing.assert_array_equal(gv, jnp.broadcast_to(2 * w, (4, 6)))


def test_sums_differentiate_with_a_value_that_does_not_move():
    # One value is a constant of the differentiated function: its tangent is
    # a symbolic zero, which lax.reduce's own JVP rule does not accept.
    a = jnp.arange(6.0).reshape(2, 3)
    const = jnp.ones((2, 3))
    f = lambda u: _xla_cpu.sums((u * u, const), (1,))
    (sq, ones), (dsq, dones) = jax.jvp(f, (a,), (jnp.ones_like(a),))
    np.testing.assert_array_equal(sq[:, 0], [5.0, 50.0])
    np.testing.assert_array_equal(ones[:, 0], [3.0, 3.0])
    np.testing.assert_array_equal(dsq[:, 0], [6.0, 24.0])  # sum(2 a)
    np.testing.assert_array_equal(dones, 0.0)
    # Forward over reverse (jax.hessian): d2 sum(u^2) / du2 = 2 I per slice.
    hess = jax.hessian(lambda u: jnp.sum(f(u)[0]))(a)
    np.testing.assert_array_equal(hess.reshape(6, 6), 2 * np.eye(6))
