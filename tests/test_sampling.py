"""Statistical and exact tests for jsoftmax.sample and jsoftmax.gumbel_softmax.

Frequency tests draw M = 40,000 samples (one batch, one compile) and require
every class frequency to lie within 5 standard errors of its probability,
``|f - p| <= 5 * sqrt(p (1 - p) / M)``, and classes of probability 0 to be
never drawn. Each frequency test also checks that the same tolerance rejects
a wrong distribution, so the test can fail. References are float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import gumbel_softmax, sample

M = 40_000
SIGMAS = 5.0
LOGITS = np.array([1.0, -0.5, 2.0, 0.3, -2.0, 1.7], np.float32)


def _softmax64(x, t=1.0):
    x = np.asarray(x, np.float64)
    z = np.where(np.isfinite(x), (x - x[np.isfinite(x)].max()) / t, -np.inf)
    e = np.exp(z)
    return e / e.sum()


def _frequencies(indices, num_classes):
    indices = np.asarray(indices).ravel()
    assert (indices >= 0).all() and (indices < num_classes).all()
    return np.bincount(indices, minlength=num_classes) / indices.size


def _within_tolerance(freq, probs, draws=M):
    sigma = np.sqrt(probs * (1 - probs) / draws)
    return bool(np.all(np.abs(freq - probs) <= SIGMAS * sigma))


def _assert_matches(freq, probs, wrong=None, draws=M):
    assert _within_tolerance(freq, probs, draws), (freq, probs)
    if wrong is not None:  # the same test rejects a nearby wrong answer
        assert not _within_tolerance(freq, wrong, draws), (freq, wrong)


def _batch(logits, n=M):
    return jnp.broadcast_to(jnp.asarray(logits), (n, len(logits)))


@pytest.mark.parametrize("t", [1.0, 0.5, 2.5])
def test_frequencies_match_tempered_softmax(t):
    drawn = sample(jax.random.key(1), _batch(LOGITS), temperature=t)
    _assert_matches(
        _frequencies(drawn, 6), _softmax64(LOGITS, t), wrong=_softmax64(LOGITS, 1.25 * t)
    )


def test_per_example_temperature_and_top_p_may_be_traced():
    temps = jnp.repeat(jnp.array([0.5, 2.0]), M // 2)
    top_p = jnp.repeat(jnp.array([1.0, 0.6]), M // 2)

    @jax.jit
    def draw(key, t, p):
        return sample(key, _batch(LOGITS), temperature=t, top_p=p)

    drawn = np.asarray(draw(jax.random.key(2), temps, top_p))
    first, second = drawn[: M // 2], drawn[M // 2 :]
    _assert_matches(_frequencies(first, 6), _softmax64(LOGITS, 0.5), draws=M // 2)
    # t = 2 then the nucleus of mass 0.6 (computed by hand below).
    p = _softmax64(LOGITS, 2.0)
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    nucleus = order[before < 0.6]
    want = np.zeros(6)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    _assert_matches(_frequencies(second, 6), want, wrong=p, draws=M // 2)


def test_vmap_over_keys_under_jit():
    keys = jax.random.split(jax.random.key(3), M)
    drawn = jax.jit(jax.vmap(lambda k: sample(k, jnp.asarray(LOGITS))))(keys)
    assert drawn.shape == (M,)
    _assert_matches(_frequencies(drawn, 6), _softmax64(LOGITS), wrong=_softmax64(LOGITS, 1.25))


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_draws_only_the_k_largest(k):
    mask = np.ones(6, bool)
    mask[2] = False  # the largest logit is masked out: top-k is among the kept
    drawn = sample(jax.random.key(4), _batch(LOGITS), where=mask, top_k=k)
    kept_logits = np.where(mask, LOGITS, -np.inf)
    top = np.argsort(-kept_logits, kind="stable")[:k]
    want = np.zeros(6)
    want[top] = _softmax64(kept_logits[top])
    freq = _frequencies(drawn, 6)
    assert set(np.flatnonzero(freq)) <= set(top)
    _assert_matches(freq, want, wrong=None if k == 1 else _softmax64(kept_logits))


@pytest.mark.parametrize(("top_p", "top_k"), [(0.5, None), (0.9, None), (0.8, 4), (0.0, None)])
def test_top_p_draws_only_the_nucleus(top_p, top_k):
    p = _softmax64(LOGITS)
    order = np.argsort(-p, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    q = p[order] / p[order].sum()
    before = np.cumsum(q) - q
    nucleus = order[(before < top_p) | (np.arange(len(order)) == 0)]
    want = np.zeros(6)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    drawn = sample(jax.random.key(5), _batch(LOGITS), top_p=top_p, top_k=top_k)
    freq = _frequencies(drawn, 6)
    assert set(np.flatnonzero(freq)) <= set(nucleus)
    _assert_matches(freq, want, wrong=None if len(nucleus) == 1 else p)


def test_masked_and_minus_inf_classes_are_never_drawn():
    logits = LOGITS.copy()
    logits[0] = -np.inf
    mask = np.array([True, True, False, True, True, True])
    drawn = sample(jax.random.key(6), _batch(logits), where=mask, temperature=3.0)
    freq = _frequencies(drawn, 6)
    assert freq[0] == 0 and freq[2] == 0
    _assert_matches(freq, _softmax64(np.where(mask, logits, -np.inf), 3.0))


def test_nothing_to_sample_gives_minus_one():
    logits = jnp.array([[0.0, 1.0], [-jnp.inf, -jnp.inf], [0.0, jnp.nan], [2.0, 1.0]])
    mask = jnp.array([[False, False], [True, True], [True, True], [True, True]])
    for t in [1.0, 0.0, jnp.inf]:
        got = sample(jax.random.key(7), logits, where=mask, temperature=t, top_k=1)
        np.testing.assert_array_equal(got, [-1, -1, -1, 0])
        got = sample(jax.random.key(7), logits, where=mask, temperature=t, top_p=0.5)
        np.testing.assert_array_equal(got, [-1, -1, -1, 0])


def test_zero_temperature_is_greedy_and_deterministic():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    x[0, [2, 5]] = 9.0  # a tie: the first maximum wins
    mask = rng.random((50, 7)) < 0.8
    mask[0] = True
    want = np.argmax(np.where(mask, x, -np.inf), -1)
    for seed in range(3):
        got = sample(jax.random.key(seed), x, where=mask, temperature=0.0, top_p=0.3)
        np.testing.assert_array_equal(got, want)
    assert want[0] == 2


def test_infinite_temperature_is_uniform_over_the_kept_classes():
    mask = np.array([True, True, False, True, True, True])
    drawn = sample(jax.random.key(9), _batch(LOGITS), where=mask, temperature=jnp.inf)
    want = mask / mask.sum()
    _assert_matches(_frequencies(drawn, 6), want, wrong=_softmax64(np.where(mask, LOGITS, -np.inf)))


def test_axes_and_flat_indices():
    x = jnp.zeros((2, 3, 4)).at[0, 1, 2].set(5.0).at[1, 2, 0].set(5.0)
    got = sample(jax.random.key(0), jnp.moveaxis(x, 0, -1), axis=(0, 1), temperature=0.0)
    np.testing.assert_array_equal(got, [1 * 4 + 2, 2 * 4 + 0])
    got = sample(jax.random.key(0), jnp.swapaxes(x, 1, 2), axis=1, temperature=0.0)
    np.testing.assert_array_equal(got, [[0, 2, 0], [0, 0, 0]])  # ties: the first index
    assert sample(jax.random.key(0), x, axis=(2, 1), temperature=0.0)[0] == 2 * 3 + 1


def test_sample_errors():
    x = jnp.zeros((2, 3))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        sample(key, x, top_k=0)
    with pytest.raises(TypeError, match="top_k must be a Python int"):
        sample(key, x, top_k=2.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        sample(key, x, top_p=1.5)
    with pytest.raises(ValueError, match="top_p has shape"):
        sample(key, x, top_p=jnp.ones(3) * 0.5)
    with pytest.raises(ValueError, match="temperature"):
        sample(key, x, temperature=-1.0)


# --------------------------------------------------------------------------
# gumbel_softmax
# --------------------------------------------------------------------------


def test_hard_gumbel_argmax_frequencies_match_softmax():
    mask = np.array([True, True, True, True, False, True])
    hard = gumbel_softmax(jax.random.key(10), _batch(LOGITS), where=mask, temperature=0.3,
                          hard=True)
    hard = np.asarray(hard)
    assert set(np.unique(hard)) <= {0.0, 1.0} and (hard.sum(-1) == 1).all()
    probs = _softmax64(np.where(mask, LOGITS, -np.inf))
    _assert_matches(hard.mean(0), probs, wrong=_softmax64(np.where(mask, LOGITS, -np.inf), 1.25))


def test_soft_samples_are_distributions_with_zeros_where_excluded():
    logits = jnp.array([[1.0, -jnp.inf, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[True, True, True, False], [False, False, False, False]])
    y = gumbel_softmax(jax.random.key(11), logits, where=mask, temperature=jnp.array([0.7, 1.0]))
    np.testing.assert_allclose(y.sum(-1), [1.0, 0.0], rtol=1e-6)
    assert y[0, 1] == 0 and y[0, 3] == 0
    z = gumbel_softmax(jax.random.key(11), logits, where=mask, hard=True)
    np.testing.assert_array_equal(z[1], 0.0)
    # t = 0 is the one-hot of the perturbed argmax, the same draw as hard=True.
    y0 = gumbel_softmax(jax.random.key(11), logits, where=mask, temperature=0.0)
    np.testing.assert_array_equal(y0, z)


def test_straight_through_gradient_is_the_soft_gradient():
    key = jax.random.key(12)
    x = jnp.asarray(LOGITS)
    w = jnp.arange(6.0)

    def loss(x, t, hard):
        return jnp.sum(w * gumbel_softmax(key, x, temperature=t, hard=hard))

    soft = jax.grad(loss, argnums=(0, 1))(x, 0.8, False)
    hard = jax.grad(loss, argnums=(0, 1))(x, 0.8, True)
    np.testing.assert_allclose(hard[0], soft[0], rtol=1e-6)
    np.testing.assert_allclose(hard[1], soft[1], rtol=1e-6)
    assert np.abs(soft[0]).sum() > 0


def test_gumbel_softmax_axis_and_dtype():
    x = jnp.asarray(np.random.default_rng(13).normal(size=(3, 5, 2)), jnp.bfloat16)
    y = gumbel_softmax(jax.random.key(0), x, axis=1, hard=True)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32).sum(1), 1.0)
    y = gumbel_softmax(jax.random.key(0), x, axis=(2, 1))
    np.testing.assert_allclose(np.asarray(y, np.float32).sum((1, 2)), 1.0, rtol=1e-2)


# ---------------------------------------------------------------- edges found by review


@pytest.mark.parametrize(
    "kwargs", [{}, {"top_k": 2}, {"top_p": 0.5}, {"temperature": 0.0}]
)
def test_sample_on_an_empty_class_axis_is_minus_one(kwargs):
    got = jsoftmax.sample(jax.random.key(0), jnp.ones((2, 0)), **kwargs)
    np.testing.assert_array_equal(got, [-1, -1])
    assert got.dtype == jnp.int32


def test_hard_gumbel_softmax_of_an_empty_class_axis_is_empty():
    got = jsoftmax.gumbel_softmax(jax.random.key(0), jnp.ones((2, 0)), hard=True)
    assert got.shape == (2, 0)


@pytest.mark.parametrize("t", [-1.0, np.nan])
def test_sample_with_an_invalid_traced_temperature_is_minus_one(t):
    draw = jax.jit(lambda t: jsoftmax.sample(jax.random.key(0), jnp.ones((3, 4)), temperature=t))
    np.testing.assert_array_equal(draw(t), [-1, -1, -1])


def test_hard_gumbel_softmax_splits_evenly_among_infinite_logits():
    # softmax([inf, 0, inf]) = [0.5, 0, 0.5]: 2000 draws, a binomial(2000, 0.5)
    # count lies within 4.5 standard deviations (about 100) of 1000.
    keys = jax.random.split(jax.random.key(1), 2000)
    x = jnp.array([jnp.inf, 0.0, jnp.inf])
    draws = jax.vmap(lambda k: jsoftmax.gumbel_softmax(k, x, hard=True))(keys)
    counts = np.asarray(draws.sum(0))
    assert counts[1] == 0 and abs(counts[0] - 1000) < 100 and counts.sum() == 2000


def test_top_p_in_the_keepdims_shape_equals_the_batch_shape():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)), jnp.float32)
    key = jax.random.key(2)
    p = jnp.array([0.2, 0.5, 0.9])
    np.testing.assert_array_equal(
        sample(key, x, top_p=p[:, None]), sample(key, x, top_p=p)
    )


def test_top_k_larger_than_the_class_count_keeps_every_class():
    # As Hugging Face's top-k filtering: min(k, classes). The same draws as
    # no top_k at all would not hold (top_k reorders), so compare frequencies
    # with the softmax over 4000 draws.
    x = jnp.array([0.0, 1.0, -1.0])
    keys = jax.random.split(jax.random.key(3), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(k, x, top_k=10))(keys))
    freq = np.bincount(draws, minlength=3) / 4000
    p = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
    assert np.max(np.abs(freq - p)) < 0.03  # about 4 standard deviations


def test_sampling_on_constants_under_jit():
    x = np.array([[0.5, 2.0, -jnp.inf, 1.0], [jnp.inf, 0.0, jnp.inf, 1.0]], np.float32)
    key = jax.random.key(4)
    for f in (
        lambda x: sample(key, x), lambda x: sample(key, x, temperature=0.5, top_k=2),
        lambda x: gumbel_softmax(key, x, temperature=0.5),
        lambda x: gumbel_softmax(key, x, hard=True),
    ):
        want = np.asarray(f(jnp.asarray(x)))
        np.testing.assert_allclose(np.asarray(jax.jit(lambda f=f: f(x))()), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), want, rtol=1e-6)


def test_negative_zero_temperature_is_greedy():
    x = jnp.array([[1.0, 3.0, 0.0]])
    key = jax.random.key(0)
    got = gumbel_softmax(key, x, temperature=-0.0)
    np.testing.assert_array_equal(got, gumbel_softmax(key, x, temperature=0.0))
    assert np.asarray(got).sum() == 1.0
    np.testing.assert_array_equal(sample(jax.random.key(0), x, temperature=-0.0), [1])
