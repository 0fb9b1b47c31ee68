"""Tests for entropy and kl_divergence from logits.

References: float64 NumPy and mpmath (tests/reference.py), optax's
kl_divergence on ordinary inputs, and derivatives derived by hand:
dH/dx_i = -p_i (log p_i + H) / t and
dKL/dp_i = p_i (log p_i - log q_i - KL) / t, dKL/dq_i = (q_i - p_i) / t.
"""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.test_util import check_grads

import jsoftmax

INF = np.inf
EPS32 = float(np.finfo(np.float32).eps)
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def _rows(x, axis):
    """x with ``axis`` moved last and the rest flattened: the slices."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1])


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return (3 * rng.standard_normal((4, 6))).astype(np.float32)


# ------------------------------------------------------------------ entropy


@JIT
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("t", [1.0, 0.3, 4.0])
def test_entropy_matches_float64_reference(logits, axis, t, jit):
    keep = np.ones_like(logits, bool)
    keep[1, 2] = keep[0, 0] = False
    got = _maybe_jit(lambda x: jsoftmax.entropy(x, axis, keep, temperature=t), jit)(logits)
    rows = zip(_rows(logits, axis), _rows(keep, axis), strict=True)
    want = [ref.entropy(r, k, t) for r, k in rows]
    assert got.dtype == jnp.float32 and got.shape == (logits.shape[1 - (axis % 2)],)
    np.testing.assert_allclose(got, want, rtol=4 * EPS32 * 10, atol=4 * EPS32)


def test_entropy_per_slice_temperature_and_several_axes(logits):
    t = np.array([0.5, 1.0, 2.0, 0.0], np.float32)
    got = jsoftmax.entropy(logits, temperature=t)
    want = [ref.entropy(r, None, tt) for r, tt in zip(logits, t, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    whole = jsoftmax.entropy(logits, axis=None)
    np.testing.assert_allclose(whole, ref.entropy(logits.ravel()), rtol=1e-5)
    both = jsoftmax.entropy(logits[None], axis=(1, 2))
    np.testing.assert_allclose(both, [ref.entropy(logits.ravel())], rtol=1e-5)


@pytest.mark.codegen
def test_entropy_of_a_confident_slice_keeps_its_relative_accuracy():
    # H = 2.0e-12 here: -sum(softmax * log_softmax) rounds log s = log(1 + 4e-14) to 0
    # in float32 and loses it.
    row = np.array([0.0, -30.0, -31.0, -45.0])
    want = ref.mp_entropy(row)
    got = float(jsoftmax.entropy(jnp.asarray(row, jnp.float32)))
    assert abs(got - want) <= 8 * EPS32 * want
    r32 = row.astype(np.float32)
    hand = -jnp.sum(jax.nn.softmax(r32) * jax.nn.log_softmax(r32))
    assert abs(float(hand) - want) > 0.01 * want  # what the formula users write gives


@pytest.mark.codegen
@pytest.mark.parametrize("name, residuals", [("entropy", 0), ("kl_divergence", 2)])
def test_gradient_keeps_its_residuals_and_no_more(name, residuals):
    # Reverse mode keeps the rule's checkpointed input-sized residuals (none
    # for the entropy, which recomputes from its input, as the hand-written
    # gradient does; both shifted logits for the divergence) and a few
    # per-row vectors.
    rows, cols = 4096, 1024
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    w = jax.ShapeDtypeStruct((rows,), jnp.float32)
    f = {"entropy": lambda x, other: jsoftmax.entropy(x),
         "kl_divergence": lambda x, other: jsoftmax.kl_divergence(other, x)}[name]
    grad = jax.grad(lambda x, other, w: jnp.sum(w * f(x, other)))
    temp = jax.jit(grad).lower(x, x, w).compile().memory_analysis().temp_size_in_bytes
    assert temp <= residuals * rows * cols * 4 + 16 * rows * 4


@pytest.mark.parametrize(
    "row, keep, t, want",
    [
        ([0.0, 0.0, -INF], None, 1.0, np.log(2)),  # -inf logits are masked actions
        ([1.0, 2.0, 3.0], [False] * 3, 1.0, 0.0),  # nothing included
        ([INF, 1.0, INF, INF], None, 1.0, np.log(3)),  # k entries at +inf
        ([2.0, 1.0, 2.0, -INF], None, 0.0, np.log(2)),  # t = 0: the maxima
        ([2.0, 1.0, 7.0, -INF], None, INF, np.log(3)),  # t = inf: the included
        ([2.0, 1.0, 7.0, 0.0], [True, True, False, True], INF, np.log(3)),
    ],
)
def test_entropy_edges(row, keep, t, want):
    x = jnp.asarray(row, jnp.float32)
    mask = None if keep is None else jnp.asarray(keep)
    fn = lambda x: jsoftmax.entropy(x, where=mask, temperature=t)
    np.testing.assert_allclose(fn(x), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(jax.jit(fn)(x), want, rtol=1e-6, atol=0)
    g = jax.grad(fn)(x)
    assert np.all(np.isfinite(g))
    excluded = np.isneginf(np.asarray(row)) | (
        np.zeros(len(row), bool) if keep is None else ~np.asarray(keep)
    )
    assert np.all(np.asarray(g)[excluded] == 0)
    assert np.all(np.isfinite(jax.hessian(fn)(x)))


def test_entropy_nan_stays_in_its_slice_and_empty_axis():
    x = jnp.array([[0.0, jnp.nan], [0.0, 0.0]])
    got = jsoftmax.entropy(x)
    assert np.isnan(got[0]) and got[1] == pytest.approx(np.log(2))
    empty = jsoftmax.entropy(jnp.zeros((3, 0)))
    assert empty.shape == (3,) and np.all(empty == 0)


def _entropy_grad_reference(row, keep, t):
    p = ref.probabilities(row, keep, t)
    h = ref.entropy(row, keep, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(p > 0, -p * (np.log(p) + h) / t, 0.0)
    return g


@pytest.mark.parametrize("t", [1.0, 0.4])
def test_entropy_gradient_matches_the_derivation(logits, t):
    x = logits.copy()
    x[0, 3] = -INF
    got = jax.grad(lambda x: jnp.sum(jsoftmax.entropy(x, temperature=t)))(jnp.asarray(x))
    want = np.stack([_entropy_grad_reference(r, None, t) for r in x.astype(np.float64)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# Entries tied at the top: log p + H, the textbook form of the derivative,
# is there a difference of two numbers near log k.
TIES = pytest.mark.parametrize(
    "dtype, row, t",
    [
        (np.float32, [0.0, 0.0, -12.0], 1.0),
        (np.float32, [0.0, 0.0, -15.0], 0.5),
        (np.float32, [1.0, 1.0, -3.0, 0.5], 0.7),
        (np.float64, [0.0, 0.0, -40.0], 1.0),
    ],
)


@TIES
def test_entropy_derivatives_at_tied_maxima_against_mpmath(dtype, row, t):
    want, want_hess = ref.mp_entropy_derivatives(row, t)
    # exp(z) is as accurate as z itself: to |z| ulps.
    eps = float(np.finfo(dtype).eps) * (1 + np.max(np.abs(row)) / t) / 4
    with jax.enable_x64(dtype == np.float64):
        x, tt = jnp.asarray(row, dtype), jnp.asarray(t, dtype)
        f = lambda x, t: jsoftmax.entropy(x, temperature=t)
        gx, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(x, tt)
        hess = jax.hessian(f)(x, tt)
    # Each component to a few ulps of itself, the small tied ones too.
    np.testing.assert_allclose(gx, want[:-1], rtol=8 * eps, atol=0)
    np.testing.assert_allclose(gt, want[-1], rtol=8 * eps, atol=0)
    # Shift invariance: the components sum to 0.
    assert abs(float(jnp.sum(gx))) <= 8 * eps * np.max(np.abs(want[:-1]))
    scale = np.abs(want_hess).max()
    np.testing.assert_allclose(hess, want_hess, rtol=8 * eps, atol=8 * eps * scale)


@TIES
def test_kl_gradient_at_tied_maxima_against_mpmath(dtype, row, t):
    row_q = [v - 1.0 if v < 0 else v for v in row]  # the same ties, another tail
    want = ref.mp_kl_gradients(row, row_q, t)
    eps = float(np.finfo(dtype).eps) * (1 + np.max(np.abs(row_q)) / t) / 4
    with jax.enable_x64(dtype == np.float64):
        p, q = jnp.asarray(row, dtype), jnp.asarray(row_q, dtype)
        f = lambda p, q, t: jsoftmax.kl_divergence(p, q, temperature=t)
        got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p, q, jnp.asarray(t, dtype))
    n = len(row)
    np.testing.assert_allclose(got[0], want[:n], rtol=8 * eps, atol=0)
    np.testing.assert_allclose(got[1], want[n : 2 * n], rtol=8 * eps, atol=0)
    np.testing.assert_allclose(got[2], want[-1], rtol=8 * eps, atol=0)


def test_entropy_temperature_derivative_against_central_differences(logits):
    row = logits[0].astype(np.float64)
    t, h = 0.7, 1e-6
    want = (ref.entropy(row, None, t + h) - ref.entropy(row, None, t - h)) / (2 * h)
    got = jax.grad(lambda t: jsoftmax.entropy(jnp.asarray(logits[0]), temperature=t))(t)
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.usefixtures("x64")
def test_entropy_check_grads_to_second_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5))
    mask = np.ones((3, 5), bool)
    mask[0, 1] = False
    mask[2] = False  # a fully excluded slice
    f = lambda x, t: jsoftmax.entropy(x, where=mask, temperature=t)
    check_grads(f, (x, 0.7), order=2, modes=["fwd", "rev"])
    check_grads(lambda x: jsoftmax.entropy(x, axis=0), (x,), order=2, modes=["rev"])


def _residuals(fn, x):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(fn, x)
    return buf.getvalue().strip().splitlines()


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_entropy_reverse_mode_saves_no_input_sized_array_but_its_input(t):
    x = jnp.ones((3, 7))
    f = lambda x: jnp.sum(jsoftmax.entropy(x, temperature=jnp.float32(t)))
    full = [line for line in _residuals(f, x) if "[3,7]" in line]
    assert len(full) == 1 and "from the argument" in full[0], full


def test_entropy_vmap_and_low_precision(logits):
    got = jax.vmap(jsoftmax.entropy)(jnp.asarray(logits))
    np.testing.assert_allclose(got, [ref.entropy(r) for r in logits], rtol=1e-5)
    low = jsoftmax.entropy(jnp.asarray(logits, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    want = [ref.entropy(r) for r in np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)]
    np.testing.assert_allclose(np.asarray(low, np.float64), want, rtol=1e-2)


def test_entropy_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        jsoftmax.entropy(jnp.ones(3), temperature=-1.0)
    with pytest.raises(ValueError, match="where has shape"):
        jsoftmax.entropy(jnp.ones(3), where=jnp.ones(4, bool))
    with pytest.raises(TypeError, match="not a real number type"):
        jsoftmax.entropy(jnp.ones(3, jnp.complex64))


# ------------------------------------------------------------ kl_divergence


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(2)
    return tuple((2 * rng.standard_normal((2, 4, 6))).astype(np.float32))


@JIT
@pytest.mark.parametrize("t", [1.0, 0.5, 3.0])
def test_kl_matches_float64_reference(pair, t, jit):
    p, q = pair
    keep = np.ones_like(p, bool)
    keep[2, :4] = False
    fn = _maybe_jit(lambda a, b: jsoftmax.kl_divergence(a, b, where=keep, temperature=t), jit)
    got = fn(p, q)
    want = [ref.kl_divergence(a, b, k, t) for a, b, k in zip(p, q, keep, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kl_matches_optax_on_ordinary_inputs(pair):
    p, q = pair
    want = optax.losses.kl_divergence(jax.nn.log_softmax(q), jax.nn.softmax(p))
    np.testing.assert_allclose(jsoftmax.kl_divergence(p, q), want, rtol=1e-5, atol=1e-6)
    want0 = [ref.kl_divergence(a, b) for a, b in zip(_rows(p, 0), _rows(q, 0), strict=True)]
    np.testing.assert_allclose(jsoftmax.kl_divergence(p, q, axis=0), want0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "p, q, keep, want",
    [
        ([0.0, 0.0, -INF], [0.0, 0.0, 5.0], None, np.log((2 + np.exp(5)) / 2)),
        ([0.0, 0.0, -INF], [0.0, 0.0, -INF], None, 0.0),  # both exclude the entry
        ([0.0, 0.0, -INF], [0.0, 0.0, INF], None, INF),  # q's +inf takes all its mass
        ([0.0, 1.0, -INF], [0.0, -INF, 3.0], None, INF),  # included in p, -inf in q
        ([0.0, -200.0], [0.0, -INF], None, INF),  # p's exp underflows there, yet p > 0
        ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [False] * 3, 0.0),  # nothing included
        ([-INF, -INF], [0.0, 1.0], None, 0.0),  # p has nothing included
        ([0.0, 1.0, 2.0], [5.0, 1.0, 9.0], [True, True, False], None),
    ],
)
def test_kl_edges(p, q, keep, want):
    a, b = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    mask = None if keep is None else jnp.asarray(keep)
    if want is None:
        want = ref.kl_divergence(p, q, keep)
    fn = lambda a, b: jsoftmax.kl_divergence(a, b, where=mask)
    np.testing.assert_allclose(fn(a, b), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(fn)(a, b), want, rtol=1e-6, atol=1e-7)
    ga, gb = jax.grad(fn, argnums=(0, 1))(a, b)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    if want == INF or want == 0.0:  # constant nearby: no direction changes it
        assert np.all(ga == 0) and np.all(gb == 0)
    assert all(np.all(np.isfinite(h)) for h in jax.tree.leaves(jax.hessian(fn)(a, b)))


@pytest.mark.parametrize(
    "p, q, t",
    [([1.0, 0.5], [0.3, -INF], 1.0),  # included in p, excluded in q
     ([1.0, 0.5, -2.0, 1.0], [0.3, 0.9, -1.0, 1.5], 0.0)],  # q's max is not one of p's
)
def test_kl_second_derivatives_are_zero_where_it_is_infinite(p, q, t):
    # Reverse over reverse, the mixed derivative in t and the logits, where
    # every branch of the forward pass is differentiated (its unselected
    # infinite branches included).
    a, b = jnp.asarray(p), jnp.asarray(q)
    f = lambda a, b, t: jsoftmax.kl_divergence(a, b, temperature=t)
    assert f(a, b, t) == INF
    for arg in (0, 1):
        mixed = jax.grad(jax.grad(f, 2), arg)(a, b, t)
        np.testing.assert_array_equal(mixed, 0.0)
        second = jax.jacrev(jax.grad(f, arg), arg)(a, b, t)
        np.testing.assert_array_equal(second, 0.0)


def test_kl_temperature_limits():
    p = jnp.array([2.0, 1.0, 2.0])
    q = jnp.array([2.0, 0.0, 2.0])
    assert jsoftmax.kl_divergence(p, q, temperature=0.0) == 0.0  # same maxima
    assert jsoftmax.kl_divergence(p, jnp.array([0.0, 3.0, 0.0]), temperature=0.0) == INF
    assert jsoftmax.kl_divergence(p, q, temperature=INF) == 0.0  # both uniform
    np.testing.assert_allclose(
        jsoftmax.kl_divergence(jnp.array([2.0, 1.0, 0.0]), p, temperature=0.0), np.log(2)
    )
    # P's maxima {0, 2} are not all maxima of Q: +inf.
    assert jsoftmax.kl_divergence(p, jnp.array([2.0, 1.0, 0.0]), temperature=0.0) == INF


def _kl_grad_reference(a, b, t):
    p, q = ref.probabilities(a, None, t), ref.probabilities(b, None, t)
    kl = ref.kl_divergence(a, b, None, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        gp = np.where(p > 0, p * (np.log(p) - np.log(q) - kl) / t, 0.0)
    return gp, (q - p) / t


@pytest.mark.parametrize("t", [1.0, 0.6])
def test_kl_gradients_match_the_derivation(pair, t):
    p, q = pair
    p = p.copy()
    p[1, 2] = -INF
    f = lambda a, b: jnp.sum(jsoftmax.kl_divergence(a, b, temperature=t))
    ga, gb = jax.grad(f, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
    want = [_kl_grad_reference(a, b, t) for a, b in zip(p.astype(np.float64), q, strict=True)]
    np.testing.assert_allclose(ga, np.stack([w[0] for w in want]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, np.stack([w[1] for w in want]), rtol=1e-4, atol=1e-6)


def test_kl_temperature_derivative_against_central_differences(pair):
    a, b = pair[0][0], pair[1][0]
    t, h = 0.8, 1e-6
    want = (ref.kl_divergence(a, b, None, t + h) - ref.kl_divergence(a, b, None, t - h)) / (2 * h)
    got = jax.grad(lambda t: jsoftmax.kl_divergence(a, b, temperature=t))(t)
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.usefixtures("x64")
def test_kl_check_grads_to_second_order():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 3, 5))
    mask = np.ones((3, 5), bool)
    mask[0, 1] = False
    mask[2] = False
    f = lambda a, b, t: jsoftmax.kl_divergence(a, b, where=mask, temperature=t)
    check_grads(f, (a, b, 0.7), order=2, modes=["fwd", "rev"])


def test_kl_hinton_scaling_and_dtypes(pair):
    p, q = pair
    t = 4.0
    scaled = t**2 * jsoftmax.kl_divergence(p, q, temperature=t)
    want = [t**2 * ref.kl_divergence(a, b, None, t) for a, b in zip(p, q, strict=True)]
    np.testing.assert_allclose(scaled, want, rtol=1e-5)
    mixed = jsoftmax.kl_divergence(jnp.asarray(p, jnp.bfloat16), jnp.asarray(q))
    assert mixed.dtype == jnp.float32
    low = jsoftmax.kl_divergence(jnp.asarray(p, jnp.bfloat16), jnp.asarray(q, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16


def test_kl_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="same shape"):
        jsoftmax.kl_divergence(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        jsoftmax.kl_divergence(jnp.ones(3), jnp.ones(3), temperature=float("nan"))
