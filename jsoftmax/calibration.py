"""Calibration of classifiers: reliability bins, expected calibration error,
and temperature scaling fitted through jsoftmax's ``temperature`` argument.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
2017) divides a trained model's logits by one scalar ``t > 0`` fitted on held
out data by minimising the negative log-likelihood. It does not change the
argmax, so accuracy stays the same, while the confidences move towards the
observed accuracy.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jsoftmax._checks import as_real_array
from jsoftmax.core import log_softmax

__all__ = [
    "ReliabilityBins",
    "expected_calibration_error",
    "fit_temperature",
    "mean_nll",
    "reliability_bins",
]

# The fitted log-temperature is clipped to this range: on a validation set the
# model classifies perfectly the NLL keeps falling as t -> 0, and a far too
# small or large t says more about the data than about calibration.
_LOG_T_RANGE = (-5.0, 5.0)


def _cross_entropy(logits: jax.Array, labels: jax.Array, temperature) -> jax.Array:
    """Per-example ``-log softmax(logits / t)[label]``.

    Stand-in for ``jsoftmax.softmax_cross_entropy_with_integer_labels`` until
    that lands; built on our ``log_softmax`` so the temperature gradient is ours.
    """
    log_probs = log_softmax(logits, temperature=temperature)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _check_classification(
    name: str, scores: ArrayLike, labels: ArrayLike, what: str
) -> tuple[jax.Array, jax.Array]:
    """Validates ``scores`` of shape (N, K) and integer ``labels`` of shape (N,)."""
    arr, _ = as_real_array(name, scores, what)
    lab = jnp.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: {what} must have shape (examples, classes); got shape {arr.shape}"
        )
    if not jnp.issubdtype(lab.dtype, jnp.integer):
        raise TypeError(
            f"{name}: labels must be integer class indices; got dtype {lab.dtype} "
            "(use labels.astype(jnp.int32), or argmax of one-hot labels)"
        )
    if lab.shape != arr.shape[:1]:
        raise ValueError(
            f"{name}: labels must have shape ({arr.shape[0]},), one per row of {what}; "
            f"got shape {lab.shape}"
        )
    return arr, lab


def _check_num_bins(name: str, num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"{name}: num_bins must be a positive int; got {num_bins!r}")
    return int(num_bins)


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of the top-class confidence (the data of a
    reliability diagram). Empty bins have confidence and accuracy 0."""

    edges: jax.Array
    """The ``num_bins + 1`` bin edges, 0 to 1."""
    counts: jax.Array
    """Number of examples whose confidence falls in each bin."""
    confidence: jax.Array
    """Mean top-class probability of the examples in each bin."""
    accuracy: jax.Array
    """Fraction of the examples in each bin whose top class is the label."""


@partial(jax.jit, static_argnums=2)
def _reliability_bins(probs, labels, num_bins):
    confidence = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(probs.dtype)
    # Bin m (1-based) holds confidences in ((m - 1) / M, m / M]; 0 goes to bin 1.
    index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    counts = jnp.zeros(num_bins, jnp.int32).at[index].add(1)
    conf_sum = jnp.zeros(num_bins, probs.dtype).at[index].add(confidence)
    correct_sum = jnp.zeros(num_bins, probs.dtype).at[index].add(correct)
    safe = jnp.maximum(counts, 1).astype(probs.dtype)
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=probs.dtype)
    return ReliabilityBins(edges, counts, conf_sum / safe, correct_sum / safe)


def reliability_bins(probs: ArrayLike, labels: ArrayLike, num_bins: int = 15) -> ReliabilityBins:
    r"""Bins examples by top-class confidence: the data of a reliability diagram.

    Bin :math:`m` of :math:`M` holds the examples whose confidence
    :math:`\max_k p_{ik}` lies in :math:`((m-1)/M, m/M]` (a confidence of
    exactly 0 goes to the first bin).

    Args:
      probs: predicted probabilities of shape (N, K).
      labels: integer class labels of shape (N,).
      num_bins: number of equal-width bins on [0, 1].

    Returns:
      A :class:`ReliabilityBins` of ``edges``, ``counts``, mean ``confidence``
      and ``accuracy`` per bin.

    Examples:
      >>> from jsoftmax.calibration import reliability_bins
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> bins = reliability_bins(probs, jnp.array([0, 1, 1]), num_bins=2)
      >>> bins.counts.tolist()
      [0, 3]
      >>> [round(float(v), 4) for v in bins.confidence], [round(float(v), 4) for v in bins.accuracy]
      ([0.0, 0.8], [0.0, 0.6667])
    """
    name = "reliability_bins"
    arr, lab = _check_classification(name, probs, labels, "probs")
    return _reliability_bins(arr, lab, _check_num_bins(name, num_bins))


def expected_calibration_error(
    probs: ArrayLike, labels: ArrayLike, num_bins: int = 15
) -> jax.Array:
    r"""Expected calibration error of the top-class confidence (Guo et al. 2017).

    .. math::
        \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{N}
            \left| \mathrm{acc}(B_m) - \mathrm{conf}(B_m) \right|

    with the equal-width bins of :func:`reliability_bins`.

    Args:
      probs: predicted probabilities of shape (N, K).
      labels: integer class labels of shape (N,).
      num_bins: number of equal-width bins on [0, 1] (15 in Guo et al.).

    Returns:
      A scalar in [0, 1]; 0 is perfectly calibrated.

    Examples:
      >>> from jsoftmax.calibration import expected_calibration_error
      >>> probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
      >>> expected_calibration_error(probs, jnp.array([0, 1, 1]), num_bins=2)
      Array(0.13333333, dtype=float32)
    """
    name = "expected_calibration_error"
    arr, lab = _check_classification(name, probs, labels, "probs")
    bins = _reliability_bins(arr, lab, _check_num_bins(name, num_bins))
    weights = bins.counts.astype(arr.dtype) / arr.shape[0]
    return jnp.sum(weights * jnp.abs(bins.accuracy - bins.confidence))


def mean_nll(logits: ArrayLike, labels: ArrayLike, temperature: ArrayLike = 1.0) -> jax.Array:
    r"""Mean negative log-likelihood of ``labels`` under ``softmax(logits / t)``.

    .. math::
        \mathrm{NLL}(t) = -\frac{1}{N} \sum_i \log \mathrm{softmax}(z_i / t)_{y_i}

    Args:
      logits: logits of shape (N, K).
      labels: integer class labels of shape (N,).
      temperature: t >= 0, differentiable.

    Returns:
      A scalar.

    Examples:
      >>> from jsoftmax.calibration import mean_nll
      >>> nll = mean_nll(jnp.array([[0.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1]), temperature=2.0)
      >>> round(float(nll), 5)  # (log 2 + log(1 + e)) / 2
      1.0032
    """
    arr, lab = _check_classification("mean_nll", logits, labels, "logits")
    return jnp.mean(_cross_entropy(arr, lab, temperature))


@partial(jax.jit, static_argnums=2)
def _fit_log_temperature(logits, labels, max_steps):
    # The problem is one smooth, unimodal variable (the NLL is convex in 1/t),
    # so L-BFGS with optax's zoom line search converges in about ten steps to
    # float precision with no learning rate to tune; a first-order optimiser
    # would need hundreds of steps and a step size. Fitting log t keeps t > 0.
    # The gradient in log t goes through jsoftmax's temperature derivative.
    def objective(log_t):
        return jnp.mean(_cross_entropy(logits, labels, jnp.exp(log_t)))

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        log_t, state = carry
        value, grad = value_and_grad(log_t, state=state)
        updates, state = optimizer.update(
            grad, state, log_t, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(log_t, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_steps) & (jnp.abs(grad) > 1e-6))

    log_t = jnp.zeros((), logits.dtype)
    log_t, _ = jax.lax.while_loop(keep_going, step, (log_t, optimizer.init(log_t)))
    return jnp.clip(log_t, *_LOG_T_RANGE)


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *, max_steps: int = 50) -> jax.Array:
    r"""Fits the temperature that minimises the NLL (temperature scaling).

    .. math::
        t^\star = \arg\min_{t > 0} \; -\frac{1}{N} \sum_i \log \mathrm{softmax}(z_i / t)_{y_i}

    Minimises over :math:`\log t` with L-BFGS, starting from t = 1, with the
    gradient taken through jsoftmax's ``temperature`` argument. Fit it on held
    out data (a validation split), never on the training data, on which a
    trained model looks better calibrated than it is. The result is clipped to
    :math:`[e^{-5}, e^{5}]`.

    Args:
      logits: logits of shape (N, K) from the trained model.
      labels: integer class labels of shape (N,).
      max_steps: the most L-BFGS iterations (it usually needs about ten).

    Returns:
      The temperature, a positive scalar of the logits' float dtype.

    Examples:
      >>> from jsoftmax.calibration import fit_temperature
      >>> logits = jnp.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0]])
      >>> t = fit_temperature(logits, jnp.array([0, 1, 1, 1]))  # 3 of 4 right
      >>> round(float(jax.nn.sigmoid(4.0 / t)), 4)  # so the confidence is 3/4
      0.75
    """
    arr, lab = _check_classification("fit_temperature", logits, labels, "logits")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"fit_temperature: max_steps must be a positive int; got {max_steps!r}")
    return jnp.exp(_fit_log_temperature(arr, lab, int(max_steps)))
