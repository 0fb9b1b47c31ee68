"""The internal helpers of jsoftmax._normalise that the public functions'
tests reach only through their results: ``select`` against NumPy's where."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jsoftmax import _normalise as nz

INF = float("inf")


def _cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=(3, 1)).astype(np.float32)
    cond = rng.random((3, 4)) < 0.5
    row_cond = rng.random((3, 1)) < 0.5
    return [
        ("same-shape", cond, a, -a),
        ("broadcast-array", cond, a, b),
        ("scalar-false", cond, a, -INF),
        ("scalar-true", row_cond, 0.0, a),
        ("row-cond", row_cond, a, b),
        ("nan-scalar", cond, a, np.nan),
        ("scalar-cond", np.bool_(True), b, 2.0),
    ]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_select_is_numpy_where(case, jit):
    _, cond, on_true, on_false = case
    # Arrays go in as arguments (traced under jit), Python numbers as constants.
    is_array = [isinstance(v, np.ndarray) for v in (on_true, on_false)]
    arrays = [jnp.asarray(v) for v, a in zip((on_true, on_false), is_array, strict=True) if a]

    def f(c, *arrays):
        it = iter(arrays)
        vals = [next(it) if a else v for v, a in zip((on_true, on_false), is_array, strict=True)]
        return nz.select(c, *vals)

    got = (jax.jit(f) if jit else f)(jnp.asarray(cond), *arrays)
    want = np.where(cond, on_true, on_false).astype(np.float32)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want)


def test_select_keeps_the_dtype_and_weak_type_of_jnp_where(x64):
    strong = jnp.ones((2, 3), jnp.float32)
    weak = jnp.asarray(1.0)  # a weakly typed scalar, as a Python temperature becomes
    half = jnp.ones((2, 3), jnp.bfloat16)
    cond = jnp.array([[True, False, True], [False, True, False]])
    for on_true, on_false in [(strong, 0.0), (weak, 0.0), (half, -INF), (strong, jnp.ones(3)),
                              (jnp.arange(6).reshape(2, 3), -1)]:
        got = nz.select(cond, on_true, on_false)
        want = jnp.where(cond, on_true, on_false)
        assert (got.dtype, got.weak_type, got.shape) == (want.dtype, want.weak_type, want.shape)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Branches that promote to a third dtype, or an integer array beside a
    # float number: jnp.where's dtype and values (the result is not weak).
    for on_true, on_false in [(half, jnp.ones((2, 3), jnp.float16)),
                              (jnp.ones(3, jnp.int8), jnp.full(3, 2, jnp.uint8)),
                              (jnp.arange(6).reshape(2, 3), 0.5)]:
        got = nz.select(cond, on_true, on_false)
        want = jnp.where(cond, on_true, on_false)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_select_derivatives_are_those_of_where():
    cond = jnp.array([True, False, True])
    x = jnp.array([1.0, -2.0, 3.0])
    grad = jax.grad(lambda v: jnp.sum(nz.select(cond, v * v, 5.0)))(x)
    np.testing.assert_array_equal(np.asarray(grad), [2.0, 0.0, 6.0])
    check_grads(lambda v: nz.select(cond, jnp.sin(v), v), (x,), order=2)


def test_select_needs_an_array_for_its_dtype():
    with pytest.raises(TypeError, match="must be an array"):
        nz.select(jnp.array([True]), 0.0, 1.0)
