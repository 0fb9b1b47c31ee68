"""Temperature scaling and calibration metrics (jsoftmax.calibration)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax


def test_fit_temperature_on_separated_data_is_the_end_of_the_range():
    # Every example right with a margin of 10: the NLL falls as t -> 0, so the
    # fit is the lower end of the search range, log t = -5 (the slope in
    # log t underflows to 0 well above it, at t ~ 0.11).
    t = jsoftmax.fit_temperature(jnp.array([[10.0, 0.0], [0.0, 10.0]]), jnp.array([0, 1]))
    np.testing.assert_allclose(t, np.exp(-5.0), rtol=1e-5)


def test_fit_temperature_interior_optimum_against_a_grid():
    # Overconfident logits: the float64 NLL on a fine grid of t has its
    # minimum where the fit lands.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.standard_normal((200, 4)) * 3.0
    logits[np.arange(200), labels] += 2.0
    got = float(jsoftmax.fit_temperature(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    grid = np.exp(np.linspace(-2, 2, 4001))

    def nll(t):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(200), labels])

    best = grid[np.argmin([nll(t) for t in grid])]
    np.testing.assert_allclose(got, best, rtol=2e-3)


def test_calibration_on_constants_under_jit():
    # Closed over as constants, built inside jit, or passed as arguments: one result.
    import jax

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [1.0, 1.0, 3.0], [0.0, -2.0, 1.0]],
                      np.float32)
    labels = np.array([0, 1, 2, 0])
    for fn in (jsoftmax.fit_temperature, jsoftmax.expected_calibration_error):
        want = np.asarray(fn(jnp.asarray(logits), jnp.asarray(labels)))
        np.testing.assert_allclose(jax.jit(lambda f=fn: f(logits, labels))(), want, rtol=1e-5)
        np.testing.assert_allclose(jax.jit(fn)(logits, labels), want, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_fit_temperature_returns_the_logits_dtype(dtype):
    # 3 of 4 right at margin 4: sigmoid(4 / t) = 3/4, t = 4 / log 3.
    logits = jnp.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0]], dtype)
    t = jsoftmax.fit_temperature(logits, jnp.array([0, 1, 1, 1]))
    assert t.dtype == dtype and t.shape == ()
    np.testing.assert_allclose(float(t), 4.0 / np.log(3.0), rtol=float(jnp.finfo(dtype).eps))


@pytest.mark.parametrize("fn", [jsoftmax.expected_calibration_error, jsoftmax.reliability_bins])
def test_calibration_of_probabilities_without_classes_names_the_argument(fn):
    with pytest.raises(ValueError, match=r"probs has no classes \(shape \(3, 0\)\)"):
        fn(jnp.zeros((3, 0)), jnp.zeros(3, jnp.int32))


def test_fit_temperature_without_classes_names_the_argument():
    with pytest.raises(ValueError, match=r"logits has no classes \(shape \(3, 0\)\)"):
        jsoftmax.fit_temperature(jnp.zeros((3, 0)), jnp.zeros(3, jnp.int32))
