"""Tests for fused_linear_cross_entropy against a float64 NumPy reference
(reference.fused_linear_cross_entropy).

The reference materialises the logits and applies the textbook formulas:
label smoothing as optax.smooth_labels followed by the soft-label
cross-entropy, logits divided by the temperature, z_loss * lse ** 2, and the
gradient d loss / d logits = ((1 + 2 z lse) softmax - q) / t derived by hand.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from reference import fused_linear_cross_entropy as fused_reference

import jsoftmax
from jsoftmax import fused_linear_cross_entropy

N, D, V = 6, 5, 11  # V is prime: every chunk size but 1 and V leaves a remainder


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """The tolerances below assume float32 matmuls. On recent NVIDIA GPUs JAX's
    default precision multiplies float32 in TF32 (10-bit mantissa), which put
    the fused and the unfused gradients 3e-3 apart on an H200."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (2 * rng.normal(size=(D, V))).astype(np.float32)
    labels = rng.integers(0, V, size=N).astype(np.int32)
    g = rng.uniform(0.5, 1.5, size=N).astype(np.float32)
    return h, w, labels, g


CASES = {
    "plain": {},
    "temperature": {"t": 0.7},
    "per_example_temperature": {"t": np.linspace(0.5, 2.0, N).astype(np.float32)},
    "smoothing": {"alpha": 0.2},
    "z_loss": {"z": 0.01},
    "everything": {"t": 1.3, "alpha": 0.1, "z": 0.05},
}


def _call(h, w, labels, *, t=1.0, alpha=0.0, z=0.0, mask=None, chunk_size=None, jit=False):
    def f(h, w, t):
        return fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=chunk_size, temperature=t,
            label_smoothing=alpha, z_loss=z,
        )

    return jax.jit(f) if jit else f


@pytest.mark.parametrize(
    ("case", "chunk_size", "jit"),
    [(case, chunk, False) for case in sorted(CASES) for chunk in (4, None)]
    + [("everything", 4, True), ("per_example_temperature", None, True)],
)
def test_values_and_gradients(data, case, chunk_size, jit):
    h, w, labels, g = data
    opts = CASES[case]
    t = opts.get("t", 1.0)
    f = _call(h, w, labels, **opts, chunk_size=chunk_size, jit=jit)
    loss, vjp = jax.vjp(f, h, w, jnp.asarray(t, jnp.float32))
    dh, dw, dt = vjp(jnp.asarray(g))
    ref, grads = fused_reference(h, w, labels, g, **opts)
    np.testing.assert_allclose(loss, ref, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(dh, grads["hidden"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(dw, grads["weight"], rtol=2e-4, atol=1e-5)
    expected_dt = grads["temperature"]
    if np.ndim(t) == 0:
        expected_dt = expected_dt.sum()
    np.testing.assert_allclose(dt, expected_dt, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "everything", "per_example_temperature"])
def test_equals_the_unfused_loss(data, case):
    """The fused loss is jsoftmax's integer-label cross-entropy of hidden @ weight,
    plus the z-loss, in values and in gradients (both through autodiff here)."""
    h, w, labels, g = data
    opts = CASES[case]
    t, alpha, z = opts.get("t", 1.0), opts.get("alpha", 0.0), opts.get("z", 0.0)
    mask = np.array([True, True, False, True, True, True])

    def unfused(h, w, t):
        logits = h @ w
        ce = jsoftmax.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=mask, temperature=t, label_smoothing=alpha
        )
        t_col = jnp.reshape(t, (-1, 1)) if jnp.ndim(t) else t
        lse = jsoftmax.logsumexp(logits / t_col, axis=-1)
        return ce + jnp.where(mask, z * lse**2, 0.0)

    def fused(h, w, t):
        return fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=4, temperature=t, label_smoothing=alpha,
            z_loss=z,
        )

    t = jnp.asarray(t, jnp.float32)
    expected, vjp = jax.vjp(unfused, h, w, t)
    got, vjp2 = jax.vjp(fused, h, w, t)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)
    for actual, want in zip(vjp2(jnp.asarray(g)), vjp(jnp.asarray(g)), strict=True):
        np.testing.assert_allclose(actual, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, V, 64])
def test_chunk_sizes_agree_with_optax(data, chunk_size):
    h, w, labels, _ = data
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    expected = optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.codegen
@pytest.mark.parametrize("chunk_size", [3, V])
def test_confident_predictions_keep_relative_accuracy(chunk_size):
    """Losses far below 1 (the label's logit dominates) are accurate relative
    to their own size, not to the size of the logits; the maximum sits in a
    later chunk for some rows, so the running sums get rescaled."""
    rng = np.random.default_rng(5)
    d = 16  # > V, so any logits can be reached
    w = rng.normal(size=(d, V)).astype(np.float32)
    labels = np.array([0, 4, 7, 10, 5, 9], np.int32)
    # Logits margin * [j == label] + noise, so the loss is about V exp(-margin).
    margins = 12.0 + 2.0 * np.arange(N)
    targets = np.where(np.arange(V) == labels[:, None], margins[:, None], 0.0)
    targets = targets + rng.normal(0, 0.3, (N, V))
    h = np.linalg.lstsq(w.T.astype(np.float64), targets.T, rcond=None)[0].T.astype(np.float32)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    ref, _ = fused_reference(h, w, labels, np.ones(N))
    assert np.all(ref < 1e-4) and np.all(ref > 1e-11)
    np.testing.assert_allclose(loss, ref, rtol=1e-4)


def test_batch_axes_and_per_example_temperature(data):
    h, w, labels, g = data
    t = np.linspace(0.5, 2.0, N).astype(np.float32)
    loss = fused_linear_cross_entropy(
        h.reshape(2, 3, D), w, labels.reshape(2, 3), temperature=t.reshape(2, 3), chunk_size=4
    )
    ref, _ = fused_reference(h, w, labels, g, t=t)
    assert loss.shape == (2, 3)
    np.testing.assert_allclose(loss.reshape(N), ref, rtol=2e-5, atol=1e-5)


def test_mask_gives_zero_loss_and_gradients(data):
    h, w, labels, g = data
    h = h.copy()
    h[1] = np.nan  # a masked row's garbage must not leak
    labels = labels.copy()
    labels[4] = V + 3  # nor its out-of-range label
    mask = np.array([True, False, True, True, False, True])
    f = _call(h, w, labels, mask=mask, alpha=0.1, z=0.01, chunk_size=4)
    loss, vjp = jax.vjp(f, h, w, jnp.float32(1.0))
    dh, dw, _ = vjp(jnp.asarray(g))
    ref, grads = fused_reference(np.nan_to_num(h), w, labels, g, alpha=0.1, z=0.01, mask=mask)
    np.testing.assert_allclose(loss, ref, rtol=2e-5, atol=1e-5)
    assert np.all(np.asarray(dh)[~mask] == 0)
    np.testing.assert_allclose(dh, grads["hidden"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(dw, grads["weight"], rtol=2e-4, atol=1e-5)


def test_fully_masked_batch(data):
    h, w, labels, _ = data
    mask = np.zeros(N, bool)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, where=mask).sum(), (0, 1)
    )(h, w)
    assert loss == 0
    assert not np.any(dh) and not np.any(dw)


@pytest.mark.parametrize("bad", [-1, V, 1000])
def test_out_of_range_label_is_nan(data, bad):
    h, w, labels, _ = data
    labels = labels.copy()
    labels[2] = bad
    loss = jax.jit(lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=4))(h, w)
    assert np.isnan(loss[2])
    ref, _ = fused_reference(h, w, labels, np.ones(N))
    keep = np.arange(N) != 2
    np.testing.assert_allclose(np.asarray(loss)[keep], ref[keep], rtol=2e-5, atol=1e-5)
    # The example's gradient is zero, as in the unfused loss; the others are untouched.
    weights = np.where(keep, 1.0, 0.5).astype(np.float32)
    dh, dw = jax.grad(
        lambda h, w: jnp.sum(weights * fused_linear_cross_entropy(h, w, labels, chunk_size=4)),
        (0, 1),
    )(h, w)
    _, grads = fused_reference(h, w, labels, weights)
    assert np.all(dh[2] == 0)
    np.testing.assert_allclose(dh, grads["hidden"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(dw, grads["weight"], rtol=2e-4, atol=1e-5)
    unfused_dh = jax.grad(
        lambda h: jnp.sum(weights * jsoftmax.softmax_cross_entropy_with_integer_labels(
            h @ w, labels))
    )(h)
    np.testing.assert_allclose(dh, unfused_dh, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(data, dtype):
    h, _, _, _ = data
    rng = np.random.default_rng(1)
    # A wide vocabulary makes a low-precision sum of exponentials visibly wrong.
    w = rng.normal(size=(D, 4099)).astype(np.float32)
    labels = rng.integers(0, 4099, size=N).astype(np.int32)
    h_lo, w_lo = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=512).sum(), (0, 1)
    )(h_lo, w_lo)
    per_example = fused_linear_cross_entropy(h_lo, w_lo, labels, chunk_size=512)
    assert per_example.dtype == dtype and dh.dtype == dtype and dw.dtype == dtype
    # The reference sees exactly the rounded inputs.
    ref, grads = fused_reference(np.asarray(h_lo, np.float64), np.asarray(w_lo, np.float64),
                                 labels, np.ones(N))
    np.testing.assert_allclose(np.asarray(per_example, np.float64), ref, rtol=1e-2)
    np.testing.assert_allclose(float(loss), ref.sum(), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(dh, np.float64), grads["hidden"], rtol=3e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), grads["weight"], rtol=3e-2, atol=1e-3)


def test_check_grads_float64(x64):
    rng = np.random.default_rng(2)
    h = rng.normal(size=(3, 4))
    w = rng.normal(size=(4, 7))
    labels = np.array([0, 6, 3], np.int32)
    mask = np.array([True, True, False])

    def f(h, w, t, alpha, z):
        loss = fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=3, temperature=t, label_smoothing=alpha,
            z_loss=z,
        )
        return jnp.sum(loss * jnp.array([1.0, 0.5, 2.0]))

    check_grads(f, (h, w, 0.8, 0.1, 0.05), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_traced_invalid_temperature_is_nan(data):
    h, w, labels, _ = data
    loss = jax.jit(lambda t: fused_linear_cross_entropy(h, w, labels, temperature=t))(0.0)
    assert np.all(np.isnan(loss))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden": np.zeros((N, D + 1))}, ValueError, "last axis"),
        ({"weight": np.zeros((D, V, 1))}, ValueError, r"\[D, V\]"),
        ({"labels": np.zeros(N)}, TypeError, "integer class indices"),
        ({"labels": np.zeros(N + 1, np.int32)}, ValueError, "one label per row"),
        ({"where": np.ones(N + 1, bool)}, ValueError, "does not broadcast"),
        ({"where": np.ones((N, V), bool)}, ValueError, "one per example"),
        ({"chunk_size": 0}, ValueError, "positive"),
        ({"chunk_size": -4}, ValueError, "positive"),
        ({"chunk_size": 2.5}, TypeError, "positive int"),
        ({"temperature": 0.0}, ValueError, "finite and > 0"),
        ({"temperature": -1.0}, ValueError, r"finite and > 0 here; got -1\.0"),
        ({"temperature": float("nan")}, ValueError, "finite and > 0 here; got nan"),
        ({"temperature": np.array([1.0, -2.0])}, ValueError, r"finite and > 0 here; got -2\.0"),
        ({"temperature": np.inf}, ValueError, "finite and > 0"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"z_loss": -0.1}, ValueError, "z_loss"),
        ({"hidden": np.zeros((N, D), np.complex64)}, TypeError, "real number"),
    ],
)
def test_errors(data, kwargs, error, match):
    h, w, labels, _ = data
    args = {"hidden": h, "weight": w, "labels": labels, **kwargs}
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                                   **args)


@pytest.mark.parametrize(("option", "bad"), [("label_smoothing", 1.5), ("label_smoothing", -0.1),
                                           ("z_loss", -1e-4), ("z_loss", np.nan)])
def test_options_in_a_jax_array_out_of_range_give_nan(data, option, bad):
    # Never read back, traced or not: an invalid value gives NaN, as an
    # invalid temperature in a jax array does.
    h, w, labels, _ = data
    call = lambda v: fused_linear_cross_entropy(h, w, labels, **{option: v})
    for got in (call(jnp.float32(bad)), jax.jit(call)(jnp.float32(bad))):
        assert np.all(np.isnan(np.asarray(got)))
    assert np.all(np.isfinite(np.asarray(call(jnp.float32(0.1)))))


@pytest.mark.codegen
def test_compiled_memory_is_a_fraction_of_unfused():
    """Temporary memory of jit(value_and_grad(mean loss)); deterministic, so assertable."""
    n, d, v = 1024, 64, 8192
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(loss_fn):
        step = jax.jit(jax.value_and_grad(lambda h, w, y: loss_fn(h, w, y).mean(), (0, 1)))
        return step.lower(h, w, labels).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=256))
    # optax keeps the logits and their gradient; jsoftmax's integer-label
    # loss computes the gradient in one pass over the logits, so it keeps one
    # [n, v] array (the logits) fewer: the fused loss is compared with both.
    for ce, arrays in (
        (optax.losses.softmax_cross_entropy_with_integer_labels, 2),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, 1),
    ):
        unfused = temp_bytes(lambda h, w, y, ce=ce: ce(h @ w, y))
        assert unfused >= arrays * n * v * 4
        assert fused * 8 <= unfused, (fused, unfused)


def test_exported_at_top_level():
    import jsoftmax.fused

    assert jsoftmax.fused_linear_cross_entropy is jsoftmax.fused.fused_linear_cross_entropy
    assert "fused_linear_cross_entropy" in jsoftmax.__all__


def test_backward_with_a_label_far_below_the_max():
    # Logits [0, 0.5, -1e4], label 2: d loss / d logits = softmax - onehot
    # (float64 by hand); the row sums to 0.
    h = jnp.array([[1.0]])
    w = jnp.array([[0.0, 0.5, -1e4]])
    got = jax.grad(lambda w: jsoftmax.fused_linear_cross_entropy(h, w, jnp.array([2])).sum())(w)
    x = np.array([0.0, 0.5, -1e4])
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(np.asarray(got)[0], p - np.eye(3)[2], rtol=1e-6, atol=1e-7)


def test_backward_on_wide_logits_matches_softmax_minus_onehot():
    rng = np.random.default_rng(2)
    h = jnp.asarray(np.eye(6, 6, dtype=np.float32))
    x = (rng.standard_normal((6, 40)) * 300).astype(np.float32)
    labels = np.argmin(x, axis=1)
    got = jax.grad(
        lambda w: jsoftmax.fused_linear_cross_entropy(h, w, jnp.asarray(labels)).sum()
    )(jnp.asarray(x))
    x64 = x.astype(np.float64)
    p = np.exp(x64 - x64.max(1, keepdims=True))
    want = p / p.sum(1, keepdims=True) - np.eye(40)[labels]
    assert np.max(np.abs(np.asarray(got, np.float64) - want)) < 1e-6


def test_int64_label_out_of_range_is_nan_not_wrapped(x64):
    loss = jsoftmax.fused_linear_cross_entropy(
        jnp.ones((1, 2)), jnp.ones((2, 3)), jnp.array([2**32 + 1], jnp.int64)
    )
    assert np.isnan(np.asarray(loss)).all()


def test_fused_loss_on_constants_under_jit():
    h = np.array([[1.0, 0.5], [-0.3, 2.0], [0.0, 0.0]], np.float32)
    w = np.array([[1.0, -2.0, 0.5, 3.0], [0.2, 0.1, -1.0, 1e4]], np.float32)
    labels = np.array([0, 3, 1])
    f = lambda h, w: fused_linear_cross_entropy(h, w, labels)
    want = np.asarray(f(jnp.asarray(h), jnp.asarray(w)))
    logits = h.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(1, keepdims=True)
    ref = (m[:, 0] + np.log(np.exp(logits - m).sum(1))) - logits[np.arange(3), labels]
    np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda: f(h, w))(), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(h, w), want, rtol=1e-6)


# --------------------------------------------------------------------------
# bias, logit_soft_cap, weights and reduction.
# --------------------------------------------------------------------------

MASK = np.array([True, True, False, True, True, True])


def _unfused_options(labels, *, cap=None, alpha=0.0, z=0.0, mask=None, reduction="none"):
    """The same composition in JAX from jsoftmax's unfused loss, as a
    function of (hidden, weight, bias, weights, temperature)."""

    def f(h, w, b, weights, t):
        logits = h @ w + b
        if cap:
            logits = cap * jnp.tanh(logits / cap)
        ce = jsoftmax.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=mask, temperature=t, label_smoothing=alpha
        )
        t_col = jnp.reshape(t, (-1, 1)) if jnp.ndim(t) else t
        lse = jsoftmax.logsumexp(logits / t_col, axis=-1)
        keep = np.ones(labels.shape, bool) if mask is None else mask
        loss = weights * (ce + jnp.where(keep, z * lse**2, 0.0))
        if reduction == "none":
            return loss
        assert reduction == "mean", reduction
        return loss.sum() / jnp.sum(jnp.where(keep, jnp.broadcast_to(weights, loss.shape), 0.0))

    return f


def _fused_options(labels, *, chunk_size, cap=None, alpha=0.0, z=0.0, mask=None,
                   reduction="none"):
    def f(h, w, b, weights, t):
        return fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=chunk_size, temperature=t,
            label_smoothing=alpha, z_loss=z, bias=b, logit_soft_cap=cap, weights=weights,
            reduction=reduction,
        )

    return f


@pytest.fixture(scope="module")
def option_data(data):
    h, w, labels, _ = data
    rng = np.random.default_rng(7)
    bias = rng.normal(size=V).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, size=N).astype(np.float32)
    return h, w, labels, bias, weights


OPTION_CASES = {
    "bias": {},
    "bias_smoothed": {"t": 0.7, "alpha": 0.2, "z": 0.01, "mask": MASK},
    # A cap of 2.5 bites: the logits of h @ w + bias reach about 10.
    "cap": {"cap": 2.5},
    "cap_per_example_temperature": {"cap": 2.5, "t": np.linspace(0.5, 2.0, N)},
    "everything": {"cap": 2.5, "t": 0.8, "alpha": 0.1, "z": 0.02, "mask": MASK},
}


@pytest.mark.parametrize(
    ("case", "chunk_size", "reduction"),
    [(case, 4, "none") for case in sorted(OPTION_CASES)]
    + [("everything", chunk, red) for chunk in (3, None) for red in ("sum", "mean")]
    + [("bias", V, "mean")],
)
def test_options_match_the_unfused_composition(option_data, case, chunk_size, reduction):
    h, w, labels, bias, weights = option_data
    opts = dict(OPTION_CASES[case])
    t = jnp.asarray(opts.pop("t", 1.0), jnp.float32)
    args = (h, w, bias, weights, t)
    fused = jax.jit(_fused_options(labels, chunk_size=chunk_size, reduction=reduction, **opts))
    got, vjp = jax.vjp(fused, *args)
    g = jnp.ones_like(got) if reduction != "none" else jnp.linspace(0.5, 1.5, N)
    ref, grads = fused_reference(h, w, labels, np.asarray(g), bias=bias, weights=weights,
                                 reduction=reduction, t=np.asarray(t), **opts)
    if np.ndim(t) == 0:
        grads["temperature"] = grads["temperature"].sum()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5)
    names = ("hidden", "weight", "bias", "weights", "temperature")
    for name, actual in zip(names, vjp(g), strict=True):
        np.testing.assert_allclose(actual, grads[name], rtol=2e-4, atol=1e-5, err_msg=name)
    if (case, chunk_size, reduction) == ("everything", None, "mean"):
        # The float64 reference above is the truth; the composition of the
        # library's unfused functions agrees with it too, every option at once.
        want, vjp_ref = jax.vjp(_unfused_options(labels, reduction=reduction, **opts), *args)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
        for name, actual, unfused_grad in zip(names, vjp(g), vjp_ref(g), strict=True):
            np.testing.assert_allclose(actual, unfused_grad, rtol=2e-4, atol=1e-5, err_msg=name)
    if "mask" in opts:
        assert not np.any(np.asarray(vjp(g)[0])[~MASK])


def test_cap_limits_large_logits(option_data):
    """Logits of about 1e4 are capped before the exponentials: the loss and
    gradients are those of the unfused composition, where tanh saturates."""
    h, w, labels, _, _ = option_data
    w_big = w * 1e3
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: fused_linear_cross_entropy(
            h, w, labels, logit_soft_cap=30.0, chunk_size=4, reduction="sum"), (0, 1)
    )(h, w_big)
    ref, grads = fused_reference(h, w_big, labels, cap=30.0, reduction="sum")
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert np.isfinite(dh).all() and np.isfinite(dw).all()
    # float32 rounds logits of 1e4 by about 1e-3 before the cap, and hidden's
    # gradient sums terms of weight's size (1e3): 0.2% of its largest entry.
    np.testing.assert_allclose(dh, grads["hidden"], rtol=2e-4,
                               atol=5e-3 * np.abs(grads["hidden"]).max())
    np.testing.assert_allclose(dw, grads["weight"], rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("cap", [None, 0, 0.0, np.float32(0), np.inf])
def test_cap_off(data, cap):
    h, w, labels, _ = data
    got = fused_linear_cross_entropy(h, w, labels, logit_soft_cap=cap, chunk_size=4)
    want, _ = fused_reference(h, w, labels)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_traced_cap(option_data):
    """A cap in a JAX array is an operand: the same loss as a Python cap, its
    own exact gradient, off at 0, and NaN when negative."""
    h, w, labels, bias, _ = option_data
    f = jax.jit(lambda c: fused_linear_cross_entropy(
        h, w, labels, bias=bias, logit_soft_cap=c, chunk_size=4))
    capped, grads = fused_reference(h, w, labels, bias=bias, cap=2.5)
    np.testing.assert_allclose(f(2.5), capped, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(
        f(0.0), fused_reference(h, w, labels, bias=bias)[0], rtol=2e-5, atol=1e-5
    )
    assert np.isnan(f(-1.0)).all()
    d_cap = jax.grad(lambda c: f(c).sum())(2.5)
    assert abs(grads["cap"]) > 0.1  # the cap bites
    np.testing.assert_allclose(d_cap, grads["cap"], rtol=2e-4)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_of_nothing_is_zero(option_data, weighted):
    h, w, labels, bias, weights = option_data
    cases = [np.zeros(N, bool)]
    if weighted:
        cases.append(MASK)  # included examples, all of weight 0 below
    for mask in cases:
        wts = np.where(MASK, 0.0, weights).astype(np.float32) if weighted else None

        def f(h, w, b, mask=mask, wts=wts):
            return fused_linear_cross_entropy(
                h, w, labels, bias=b, where=mask, weights=wts, reduction="mean",
                logit_soft_cap=2.5, z_loss=0.1, chunk_size=4,
            )

        loss, grads = jax.value_and_grad(f, (0, 1, 2))(h, w, bias)
        assert loss == 0
        for grad in grads:
            assert np.all(np.asarray(grad) == 0)


def test_weights_broadcast_and_batch_axes(option_data):
    h, w, labels, bias, weights = option_data
    got = fused_linear_cross_entropy(
        h.reshape(2, 3, D), w, labels.reshape(2, 3), bias=bias,
        weights=weights[:3], chunk_size=4,
    )
    expected, _ = fused_reference(h, w, labels, bias=bias, weights=np.tile(weights[:3], 2))
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.reshape(N), expected, rtol=2e-5, atol=1e-5)
    scalar = fused_linear_cross_entropy(h, w, labels, weights=2.0, reduction="sum")
    np.testing.assert_allclose(scalar, 2 * fused_reference(h, w, labels)[0].sum(), rtol=2e-5)


def test_options_under_vmap(option_data):
    """vmap over a stack of two problems equals the calls one by one."""
    h, w, labels, bias, weights = option_data
    hs = np.stack([h, -0.5 * h])
    ws = np.stack([weights, weights[::-1]])
    masks = np.stack([MASK, np.ones(N, bool)])

    def one(h, b, wt, m):
        return fused_linear_cross_entropy(
            h, w, labels, bias=b, where=m, weights=wt, logit_soft_cap=2.5, z_loss=0.01,
            label_smoothing=0.1, reduction="mean", chunk_size=3,
        )

    batched = jax.jit(jax.vmap(jax.value_and_grad(one, (0, 1, 2)), in_axes=(0, None, 0, 0)))
    loss, grads = batched(hs, bias, ws, masks)
    for i in range(2):
        ref, want = fused_reference(hs[i], w, labels, bias=bias, cap=2.5, z=0.01, alpha=0.1,
                                    mask=masks[i], weights=ws[i], reduction="mean")
        np.testing.assert_allclose(loss[i], ref, rtol=2e-5, atol=1e-6)
        for actual, name in zip(grads, ("hidden", "bias", "weights"), strict=True):
            np.testing.assert_allclose(actual[i], want[name], rtol=2e-4, atol=1e-6,
                                       err_msg=name)


@pytest.mark.parametrize(("reduction", "capped"), [("none", False), ("mean", True)])
def test_check_grads_options_float64(x64, reduction, capped):
    rng = np.random.default_rng(3)
    h = rng.normal(size=(4, 3))
    w = 2 * rng.normal(size=(3, 7))
    labels = np.array([0, 6, 3, 2], np.int32)
    mask = np.array([True, True, False, True])

    def f(h, w, b, wts, cap, t, alpha, z):
        loss = fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=3, temperature=t, label_smoothing=alpha,
            z_loss=z, bias=b, logit_soft_cap=cap if capped else None, weights=wts,
            reduction=reduction,
        )
        return jnp.sum(loss * jnp.array([1.0, 0.5, 2.0, -1.0])[: loss.size])

    args = (h, w, rng.normal(size=7), rng.uniform(0.5, 2, 4), 1.5, 0.8, 0.1, 0.05)
    check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bias": np.zeros(V + 1)}, ValueError, "one bias per vocabulary column"),
        ({"bias": np.zeros((1, V))}, ValueError, "one bias per vocabulary column"),
        ({"bias": np.zeros(V, np.complex64)}, TypeError, "real number"),
        ({"logit_soft_cap": -1.0}, ValueError, "logit_soft_cap must be >= 0"),
        ({"logit_soft_cap": np.nan}, ValueError, "None or 0 for no capping"),
        ({"logit_soft_cap": np.array(-30.0)}, ValueError, "Gemma 2 uses 30"),
        ({"logit_soft_cap": np.ones(2)}, ValueError, "scalar"),
        ({"weights": np.ones(N + 1)}, ValueError, "one weight per example"),
        ({"weights": np.ones(N, np.complex64)}, TypeError, "real number"),
        ({"reduction": "avg"}, ValueError, "'none', 'sum', 'mean'"),
        ({"reduction": None}, ValueError, "reduction must be one of"),
    ],
)
def test_option_errors(data, kwargs, error, match):
    h, w, labels, _ = data
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(h, w, labels, **kwargs)


@pytest.mark.codegen
def test_options_keep_the_memory_fraction():
    """bias, cap, weights and mean still never build [N, V]: the step's
    temporaries stay those of the plain fused loss, a fraction of unfused."""
    n, d, v = 1024, 64, 8192
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    b = jax.ShapeDtypeStruct((v,), jnp.float32)
    wts = jax.ShapeDtypeStruct((n,), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(loss_fn):
        step = jax.jit(jax.value_and_grad(loss_fn, (0, 1, 2, 3)))
        return step.lower(h, w, b, wts, labels).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda h, w, b, wt, y: fused_linear_cross_entropy(
        h, w, y, chunk_size=256).mean() + 0 * (b.sum() + wt.sum()))
    fused = temp_bytes(lambda h, w, b, wt, y: fused_linear_cross_entropy(
        h, w, y, chunk_size=256, bias=b, logit_soft_cap=30.0, weights=wt, reduction="mean"))

    def unfused(h, w, b, wt, y):
        logits = 30.0 * jnp.tanh((h @ w + b) / 30.0)
        ce = jsoftmax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(wt * ce) / jnp.sum(wt)

    reference = temp_bytes(unfused)
    assert reference >= n * v * 4
    assert fused * 8 <= reference, (fused, reference)
    # The options add per-example and per-chunk temporaries only.
    assert fused <= plain + 4 * n * 256 * 4 + 2 * v * 4, (fused, plain)


def _step_temp_bytes(n, d, v, dtype, loss_fn):
    """Temporaries of jit(value_and_grad(mean loss)) w.r.t. hidden and weight,
    compiled from shapes only (nothing is allocated)."""
    h = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((d, v), dtype)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda h, w, y: loss_fn(h, w, y).mean(), (0, 1)))
    return step.lower(h, w, labels).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.codegen
def test_learned_temperature_keeps_no_logits_sized_temporary():
    # d loss / dt is summed per example inside the backward chunk loop, from
    # the chunk's scaled cotangent: the temperature adds at most a chunk-free
    # margin to what the gradients of hidden and weight alone keep, far below
    # one [n, v] array (and below one [n, chunk] one).
    n, d, v = 512, 256, 8192
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    loss = lambda h, w, t, y: fused_linear_cross_entropy(h, w, y, temperature=t).mean()

    def temp(argnums):
        step = jax.jit(jax.grad(loss, argnums))
        return step.lower(h, w, t, labels).compile().memory_analysis().temp_size_in_bytes

    logits_only = temp((0, 1))
    for argnums in (2, (0, 1, 2)):
        got = temp(argnums)
        assert got <= logits_only + n * 256, (argnums, got, logits_only)


@pytest.mark.codegen
def test_bfloat16_keeps_no_float32_copy_of_the_operands():
    """bfloat16 temporaries are float32's plus two buffers only: the float32
    accumulator of hidden's gradient (which float32 keeps in its output) and
    the 16-bit chunk gradient (which float32 writes over its logits). A
    float32 copy of weight (d * v * 4 bytes) or of hidden would not fit."""
    n, d, v, chunk = 256, 64, 4096, 128

    def temp(dtype):
        return _step_temp_bytes(n, d, v, dtype, lambda h, w, y: fused_linear_cross_entropy(
            h, w, y, chunk_size=chunk))

    bf16, f32 = temp(jnp.bfloat16), temp(jnp.float32)
    assert bf16 <= f32 + n * d * 4 + n * chunk * 2, (bf16, f32)


@pytest.mark.parametrize("v", [100, 256, 300, 1000])
def test_bfloat16_gradients_for_any_number_of_chunks(v):
    """One chunk, exactly one, one and a remainder, several and a remainder:
    every layout of the chunk loop compiles to matmuls XLA can run in 16
    bits, and the gradients match float64 on the rounded inputs."""
    rng = np.random.default_rng(2)
    n, d = 48, 32
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * d**-0.5, jnp.bfloat16)
    labels = rng.integers(0, v, size=n).astype(np.int32)
    mask = np.arange(n) % 4 != 0
    loss, (dh, dw) = jax.jit(jax.value_and_grad(
        lambda h, w: fused_linear_cross_entropy(
            h, w, labels, chunk_size=256, where=mask).astype(jnp.float32).sum(), (0, 1)
    ))(h, w)
    ref, grads = fused_reference(np.asarray(h, np.float64), np.asarray(w, np.float64), labels,
                                 np.ones(n), mask=mask)
    np.testing.assert_allclose(float(loss), ref.sum(), rtol=1e-2)
    # The chunk gradient is rounded to bfloat16 before its matmuls: errors
    # scale with the largest gradient, not each entry's (some nearly cancel).
    for got, want in ((dh, grads["hidden"]), (dw, grads["weight"])):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-2,
                                   atol=3e-2 * np.abs(want).max())


@pytest.mark.codegen
def test_llama3_scale_bfloat16_memory_fraction():
    """N = 8192, D = 4096, V = 128256 in bfloat16 (compile only): the fused
    step keeps at most 1/30 of the temporaries of optax's unfused step."""
    n, d, v = 8192, 4096, 128256
    fused = _step_temp_bytes(n, d, v, jnp.bfloat16, fused_linear_cross_entropy)
    unfused = _step_temp_bytes(n, d, v, jnp.bfloat16, lambda h, w, y: (
        optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, y)))
    assert unfused >= n * v * 4
    assert fused * 30 <= unfused, (fused, unfused)


# --------------------------------------------------------------------------
# return_stats: logsumexp, entropy and argmax of the loss's own logits.
# --------------------------------------------------------------------------


def _stats_reference(h, w, g_lse, g_ent, *, bias=None, cap=None, t=1.0, mask=None):
    """lse, entropy and argmax of y = cap tanh((h w + b) / cap) / t in float64
    on materialised logits, and the gradients of sum(g_lse lse + g_ent H),
    derived by hand: d lse / d y = p, d H / d y = -p (log p + H), then
    through the temperature and the cap as in the loss's reference."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    n = h.shape[0]
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    t = np.broadcast_to(np.asarray(t, np.float64), (n,))[:, None]
    logits = h @ w + (0.0 if bias is None else np.asarray(bias, np.float64))
    capped = cap * np.tanh(logits / cap) if cap else logits
    y = capped / t
    top = y.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(y - top).sum(axis=1, keepdims=True))
    log_p = y - lse
    p = np.exp(log_p)
    ent = -(p * log_p).sum(axis=1)
    g_lse = np.where(keep, np.asarray(g_lse, np.float64), 0.0)[:, None]
    g_ent = np.where(keep, np.asarray(g_ent, np.float64), 0.0)[:, None]
    dy = g_lse * p - g_ent * p * (log_p + ent[:, None])
    d_capped = dy / t
    # d capped / d logits and d capped / d cap.
    u = np.tanh(logits / cap) if cap else 0.0
    slope, by_cap = (1 - u**2, u - logits / cap * (1 - u**2)) if cap else (1.0, 0.0)
    d_logits, d_cap = d_capped * slope, np.sum(d_capped * by_cap)
    stats = (np.where(keep, lse[:, 0], 0.0), np.where(keep, ent, 0.0),
             np.where(keep, np.argmax(y, axis=1), -1))
    grads = {"hidden": d_logits @ w.T, "weight": h.T @ d_logits, "bias": d_logits.sum(axis=0),
             "cap": d_cap, "temperature": -(dy * y).sum(axis=1) / t[:, 0]}
    return stats, grads


STATS_CASES = {
    # chunk_size, reduction, options of the loss (t and cap are arguments)
    "plain": (4, "none", {}),
    "everything": (3, "mean", {"label_smoothing": 0.1, "z_loss": 0.02, "where": MASK}),
    "default_chunk": (None, "sum", {"where": MASK}),
}


@pytest.fixture(scope="module")
def stats_step():
    """One jitted vjp of (loss, lse, entropy) shared by the cases (compiled once per case)."""

    @partial(jax.jit, static_argnums=(0, 1, 2))
    def step(chunk_size, reduction, keys, h, w, b, weights, t, cap, labels, cots, extra):
        opts = dict(zip(keys, extra, strict=True))

        def f(h, w, b, t, cap):
            loss, stats = fused_linear_cross_entropy(
                h, w, labels, bias=b, weights=weights, temperature=t, logit_soft_cap=cap,
                chunk_size=chunk_size, reduction=reduction, return_stats=True, **opts)
            return (loss, stats.logsumexp, stats.entropy), stats.argmax

        (out, vjp, argmax) = jax.vjp(f, h, w, b, t, cap, has_aux=True)
        # Forward passes only, with and without the statistics.
        primal = f(h, w, b, t, cap)[0][0]
        plain = fused_linear_cross_entropy(
            h, w, labels, bias=b, weights=weights, temperature=t, logit_soft_cap=cap,
            chunk_size=chunk_size, reduction=reduction, **opts)
        return out, argmax, vjp(cots), (primal, plain)

    return step


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_stats_values_and_gradients(option_data, stats_step, case):
    h, w, labels, bias, weights = option_data
    chunk_size, reduction, opts = STATS_CASES[case]
    t = np.linspace(0.6, 1.8, N).astype(np.float32)
    cap = np.float32(2.5)
    mask = opts.get("where")
    rng = np.random.default_rng(11)
    g_loss = np.float32(1.3) if reduction != "none" else np.linspace(0.5, 1.5, N, dtype=np.float32)
    g_lse, g_ent = rng.normal(size=(2, N)).astype(np.float32)
    keys = tuple(sorted(opts))
    (loss, lse, ent), argmax, grads, (primal, plain) = stats_step(
        chunk_size, reduction, keys, h, w, bias, weights, t, cap, labels,
        (g_loss, g_lse, g_ent), tuple(opts[k] for k in keys))
    # The loss is bit for bit the one without the statistics.
    np.testing.assert_array_equal(primal, plain)
    ref, _ = fused_reference(h, w, labels, bias=bias, cap=cap, t=t, weights=weights,
                             reduction=reduction, alpha=opts.get("label_smoothing", 0.0),
                             z=opts.get("z_loss", 0.0), mask=mask)
    np.testing.assert_allclose(loss, ref, rtol=2e-5, atol=1e-5)
    (want_lse, want_ent, want_argmax), want = _stats_reference(
        h, w, g_lse, g_ent, bias=bias, cap=cap, t=t, mask=mask)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(argmax, want_argmax)
    assert argmax.dtype == jnp.int32 and lse.shape == ent.shape == (N,)
    # The gradients are the loss's plus the statistics' (both in float64).
    _, loss_grads = fused_reference(
        h, w, labels, g_loss, bias=bias, cap=cap, t=t, weights=weights, reduction=reduction,
        alpha=opts.get("label_smoothing", 0.0), z=opts.get("z_loss", 0.0), mask=mask)
    for name, actual in zip(("hidden", "weight", "bias", "temperature", "cap"), grads,
                            strict=True):
        expected = want[name] + loss_grads[name]
        np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-5, err_msg=name)
    if mask is not None:
        assert not np.any(np.asarray(grads[0])[~mask])
        assert np.all(np.asarray(argmax)[~mask] == -1)


def test_stats_argmax_ties_are_the_lowest_index_across_chunks():
    # Row 0: the maximum 2.0 at 1, 4 and 9 (three chunks of 3); row 1: at 10
    # only (the remainder chunk); row 2: every logit equal; row 3: excluded.
    x = np.zeros((4, V), np.float32)
    x[0, [1, 4, 9]] = 2.0
    x[1, 10] = 5.0
    x[3, 2] = 7.0
    h, w = np.eye(4, dtype=np.float32), x  # h @ w = x
    where = np.array([True, True, True, False])
    labels = np.zeros(4, np.int32)
    _, stats = fused_linear_cross_entropy(h, w, labels, where=where, chunk_size=3,
                                          return_stats=True)
    np.testing.assert_array_equal(stats.argmax, [1, 10, 0, -1])
    np.testing.assert_allclose(stats.entropy[2], np.log(V), rtol=1e-6)
    assert stats.logsumexp[3] == 0 and stats.entropy[3] == 0


def test_stats_of_an_out_of_range_label_stay_defined(data):
    """The statistics do not depend on the label: an out-of-range one makes
    the loss NaN but leaves them, and their gradients, those of its logits."""
    h, w, labels, _ = data
    labels = labels.copy()
    labels[[1, 4]] = [-1, V]

    def f(h):
        loss, stats = fused_linear_cross_entropy(h, w, labels, chunk_size=4, return_stats=True)
        return stats.logsumexp.sum() + stats.entropy.sum(), loss

    (value, loss), dh = jax.value_and_grad(f, has_aux=True)(h)
    (lse, ent, _), want = _stats_reference(h, w, np.ones(N), np.ones(N))
    assert np.isnan(loss[1]) and np.isnan(loss[4])
    np.testing.assert_allclose(value, lse.sum() + ent.sum(), rtol=1e-6)
    np.testing.assert_allclose(dh, want["hidden"], rtol=2e-4, atol=1e-5)


def test_stats_match_the_core_functions(option_data):
    """logsumexp, entropy and argmax of the materialised capped logits, by the
    library's unfused functions, in values and in autodiff gradients."""
    h, w, labels, bias, _ = option_data
    t = jnp.float32(0.8)

    def fused(h, w, t):
        _, stats = fused_linear_cross_entropy(h, w, labels, bias=bias, temperature=t,
                                              logit_soft_cap=2.5, chunk_size=4,
                                              return_stats=True)
        return stats

    def unfused(h, w, t):
        y = 2.5 * jnp.tanh((h @ w + bias) / 2.5)
        return jsoftmax.logsumexp(y, axis=-1, temperature=t), jsoftmax.entropy(y, temperature=t)

    got = fused(h, w, t)
    want = unfused(h, w, t)
    np.testing.assert_allclose(got.logsumexp, want[0] / t, rtol=2e-6)
    np.testing.assert_allclose(got.entropy, want[1], rtol=2e-5)
    np.testing.assert_array_equal(got.argmax, np.argmax(np.asarray(h @ w + bias), axis=1))
    def objective(lse, ent):
        return jnp.sum(lse * jnp.arange(N)) - jnp.sum(ent)

    g_fused = jax.grad(lambda *a: objective(*fused(*a)[:2]), (0, 1, 2))(h, w, t)
    g_unfused = jax.grad(
        lambda h, w, t: objective(unfused(h, w, t)[0] / t, unfused(h, w, t)[1]), (0, 1, 2)
    )(h, w, t)
    for actual, expected in zip(g_fused, g_unfused, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-5)


def test_check_grads_stats_float64(x64):
    rng = np.random.default_rng(3)
    h = rng.normal(size=(4, 3))
    w = 2 * rng.normal(size=(3, 7))
    labels = np.array([0, 6, 3, 2], np.int32)
    mask = np.array([True, True, False, True])

    def f(h, w, b, cap, t):
        loss, stats = fused_linear_cross_entropy(
            h, w, labels, where=mask, chunk_size=3, temperature=t, bias=b,
            logit_soft_cap=cap, z_loss=0.05, return_stats=True,
        )
        return jnp.sum(loss + stats.logsumexp * jnp.array([1.0, 0.5, 2.0, -1.0])
                       - 0.7 * stats.entropy)

    args = (h, w, rng.normal(size=7), 1.5, rng.uniform(0.5, 2, 4))
    check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_stats_in_bfloat16(data):
    h, _, _, _ = data
    rng = np.random.default_rng(1)
    w = rng.normal(size=(D, 700)).astype(np.float32)
    labels = rng.integers(0, 700, size=N).astype(np.int32)
    h_lo, w_lo = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    _, stats = fused_linear_cross_entropy(h_lo, w_lo, labels, chunk_size=256,
                                          return_stats=True)
    assert stats.logsumexp.dtype == stats.entropy.dtype == jnp.bfloat16
    (lse, ent, argmax), _ = _stats_reference(np.asarray(h_lo, np.float64),
                                             np.asarray(w_lo, np.float64), np.ones(N), np.ones(N))
    np.testing.assert_allclose(np.asarray(stats.logsumexp, np.float64), lse, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(stats.entropy, np.float64), ent, rtol=2e-2)
    np.testing.assert_array_equal(stats.argmax, argmax)


def test_return_stats_must_be_a_bool(data):
    h, w, labels, _ = data
    with pytest.raises(TypeError, match="return_stats must be True or False"):
        fused_linear_cross_entropy(h, w, labels, return_stats="yes")


@pytest.mark.codegen
def test_stats_add_only_per_example_vectors():
    """The statistics and their gradients add a few [N] vectors to the fused
    step's temporaries, no [N, chunk] array (and no [N, V] one)."""
    n, d, v, chunk = 1024, 64, 8192, 256

    def with_stats(h, w, y):
        loss, stats = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, return_stats=True)
        return loss + stats.logsumexp + 0.01 * stats.entropy

    plain = _step_temp_bytes(n, d, v, jnp.float32, lambda h, w, y: fused_linear_cross_entropy(
        h, w, y, chunk_size=chunk))
    stats = _step_temp_bytes(n, d, v, jnp.float32, with_stats)
    assert stats <= plain + 16 * n * 4, (stats, plain)


def test_a_minus_inf_bias_excludes_a_class(option_data):
    """A -inf bias gives its class probability 0: the loss, its gradients
    (the temperature's included) and the statistics are those of the other
    classes, finite, as in the unfused loss; with label smoothing the target
    gives the class mass, and the loss is +inf there as in the unfused one."""
    h, w, labels, bias, _ = option_data
    bias = bias.copy()
    bias[[3, 8]] = -np.inf
    labels = np.where(np.isin(labels, [3, 8]), 0, labels).astype(np.int32)
    t = np.float32(0.8)

    def fused(h, w, b, t):
        loss, stats = fused_linear_cross_entropy(h, w, labels, bias=b, temperature=t,
                                                 chunk_size=4, return_stats=True)
        return loss, stats.entropy

    got, vjp = jax.vjp(fused, h, w, bias, t)
    grads = vjp((jnp.ones(N), jnp.full(N, -0.5)))
    # float64 on the included classes only, by hand: d loss / d y = p - onehot,
    # d H / d y = -p (log p + H), d / d t = -(d / d y) . y / t.
    keep = np.isfinite(bias)
    y = (h.astype(np.float64) @ w[:, keep] + bias[keep]) / t
    log_p = y - np.log(np.exp(y - y.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - y.max(1, keepdims=True)
    p = np.exp(log_p)
    ent = -(p * log_p).sum(1)
    onehot = np.eye(V)[labels][:, keep]
    dy = (p - onehot) + 0.5 * p * (log_p + ent[:, None])
    np.testing.assert_allclose(got[0], -(onehot * log_p).sum(1), rtol=2e-5)
    np.testing.assert_allclose(got[1], ent, rtol=2e-5)
    want_dw = np.zeros((D, V))
    want_dw[:, keep] = h.T @ dy / t
    np.testing.assert_allclose(grads[0], dy @ w[:, keep].T / t, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(grads[1], want_dw, rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(grads[2])[~keep] == 0)
    np.testing.assert_allclose(grads[3], -(dy * y).sum() / t, rtol=2e-4)
    smoothed = fused_linear_cross_entropy(h, w, labels, bias=bias, label_smoothing=0.1)
    assert np.all(np.isposinf(smoothed))


@pytest.mark.parametrize("x64", [False, True], ids=["default", "x64"])
def test_integer_inputs_take_jax_nn_float_dtype(x64):
    # jax.nn's rule, as every other function: int32 computes in float32, also
    # under x64; int64 (x64 only) in float64.
    with jax.enable_x64(x64):
        labels = jnp.zeros(3, jnp.int32)
        h, w = jnp.ones((3, 4), jnp.int32), jnp.ones((4, 5), jnp.int32)
        got = jsoftmax.fused_linear_cross_entropy(h, w, labels)
        assert got.dtype == jax.nn.log_softmax(h @ w).dtype == jnp.float32
        np.testing.assert_allclose(got, np.full(3, np.log(5.0)), rtol=1e-6)
        if x64:
            wide = jsoftmax.fused_linear_cross_entropy(h.astype(jnp.int64), w.astype(jnp.int64),
                                                       labels)
            assert wide.dtype == jax.nn.log_softmax((h @ w).astype(jnp.int64)).dtype


EXCLUDED_BIASES = {
    "every class": [-np.inf] * 5,
    "the second class": [0.0, -np.inf, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("excluded", sorted(EXCLUDED_BIASES))
def test_excluded_classes_edges_match_the_unfused_loss(excluded, alpha):
    # -inf biases exclude classes: every class gives 0 with zero gradients,
    # whatever the label and the smoothing; the label's class (or, under
    # smoothing, any class) gives +inf, a constant: zero gradients. Compared
    # with the unfused loss and the core functions on the materialised logits.
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    bias = jnp.asarray(EXCLUDED_BIASES[excluded], jnp.float32)
    labels = jnp.array([0, 1, 2])

    def fused(h, w):
        loss, stats = fused_linear_cross_entropy(
            h, w, labels, bias=bias, label_smoothing=alpha, return_stats=True, chunk_size=2)
        return loss, stats.logsumexp, stats.entropy

    def unfused(h, w):
        y = h @ w + bias
        loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
            y, labels, label_smoothing=alpha)
        return loss, jsoftmax.logsumexp(y, axis=1), jsoftmax.entropy(y)

    for got, want in zip(fused(h, w), unfused(h, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def objective(f):
        # Every loss, the infinite ones too: their gradients are zero.
        def total(h, w):
            loss, _, entropy = f(h, w)
            return jnp.sum(loss + entropy)
        return jax.grad(total, argnums=(0, 1))

    for got, want in zip(objective(fused)(h, w), objective(unfused)(h, w), strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_stats_of_a_nan_row_are_nan_and_its_argmax_minus_one():
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32).at[1, 2].set(jnp.nan)
    w = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    loss, stats = fused_linear_cross_entropy(h, w, jnp.array([0, 1, 2]), return_stats=True,
                                             chunk_size=2)
    assert np.isnan(loss[1]) and np.isnan(stats.logsumexp[1]) and np.isnan(stats.entropy[1])
    assert stats.argmax[1] == -1
    rows = np.array([0, 2])
    np.testing.assert_allclose(stats.entropy[rows], jsoftmax.entropy(h @ w)[rows], rtol=1e-5)
    np.testing.assert_array_equal(stats.argmax[rows], jnp.argmax(h @ w, axis=1)[rows])
