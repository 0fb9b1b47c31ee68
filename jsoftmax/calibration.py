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
from jax.typing import ArrayLike

from jsoftmax._checks import compute_dtype, concrete, host_args, inexact_dtype
from jsoftmax.losses import softmax_cross_entropy_with_integer_labels

__all__ = [
    "ReliabilityBins",
    "expected_calibration_error",
    "fit_temperature",
    "mean_nll",
    "reliability_bins",
]

# The fitted log-temperature is searched in this range: on a validation set the
# model classifies perfectly the NLL keeps falling as t -> 0, and a far too
# small or large t says more about the data than about calibration.
_LOG_T_RANGE = (-5.0, 5.0)
_BISECTIONS = 40


def _check_classification(name: str, scores: ArrayLike, labels: ArrayLike, what: str):
    """``(scores, labels)`` for the jitted call: scores of shape (N, K) and
    integer labels of shape (N,)."""
    arr, lab, _ = host_args(name, scores, labels, arg=what)
    if arr.dtype.kind in "bc":
        raise TypeError(f"{name}: {what} has dtype {arr.dtype}, which is not a real number "
                        f"type; cast it first, e.g. {what}.astype(jnp.float32)")
    if arr.ndim != 2:
        raise ValueError(f"{name}: {what} must have shape (examples, classes); got shape "
                         f"{tuple(arr.shape)}")
    if what == "probs" and arr.shape[1] == 0:
        raise ValueError(f"{name}: probs has no classes (shape {tuple(arr.shape)}), so no "
                         "example has a top class to bin; give probabilities of shape "
                         "(examples, classes) with at least one class")
    if not jnp.issubdtype(lab.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integer class indices; got dtype {lab.dtype} "
                        "(use labels.astype(jnp.int32), or argmax of one-hot labels)")
    if tuple(lab.shape) != tuple(arr.shape[:1]):
        raise ValueError(f"{name}: labels must have shape ({arr.shape[0]},), one per row of "
                         f"{what}; got shape {tuple(lab.shape)}")
    return arr, lab


def _computed(scores):
    """Scores in the dtype jax.nn computes them in (float32 for 16-bit)."""
    return scores.astype(compute_dtype(inexact_dtype(scores.dtype)))


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


@partial(jax.jit, static_argnums=0)
def _reliability_bins(num_bins, probs, labels):
    probs, labels = _computed(probs), jnp.asarray(labels)
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
    return _reliability_bins(_check_num_bins(name, num_bins), arr, lab)


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
    return _calibration_error(_check_num_bins(name, num_bins), arr, lab)


@partial(jax.jit, static_argnums=0)
def _calibration_error(num_bins, probs, labels):
    bins = _reliability_bins(num_bins, probs, labels)
    weights = bins.counts.astype(bins.confidence.dtype) / probs.shape[0]
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
    # The loss's own check of a concrete temperature (None for exactly 1).
    t = concrete("softmax_cross_entropy_with_integer_labels", "temperature", temperature,
                 neutral=1.0, hint=" (0 is the hard max, inf is uniform)")
    return _mean_nll(arr, lab, t)


@jax.jit
def _mean_nll(logits, labels, t):
    logits = _computed(logits)
    t = 1.0 if t is None else t
    return jnp.mean(softmax_cross_entropy_with_integer_labels(logits, labels, temperature=t))


@jax.jit
def _fit_temperature(logits, labels):
    # Fitted in the compute dtype (float32 for 16-bit logits), returned in the logits'.
    log_t = _fit_log_temperature(_computed(logits), jnp.asarray(labels))
    return jnp.exp(log_t).astype(inexact_dtype(logits.dtype))


def _fit_log_temperature(logits, labels):
    # The NLL is convex in 1/t, so its derivative in u = log t changes sign
    # once, from negative to positive, at the optimum: bisection on that sign
    # over the search range converges surely, with no step size or line search
    # to tune, in one small loop. (optax's L-BFGS with its zoom line search gave
    # the same t but compiled more slowly, and compiling is most of the cost
    # on a validation set this small.) 40 halvings of a width of
    # 10 leave 1e-11 in log t. The derivative goes through jsoftmax's
    # temperature argument.
    nll = lambda u: jnp.mean(
        softmax_cross_entropy_with_integer_labels(logits, labels, temperature=jnp.exp(u))
    )
    slope = jax.grad(nll)

    def halve(_, bracket):
        low, high = bracket
        mid = (low + high) / 2
        # The optimum is below mid. A slope of exactly 0 is one that underflowed
        # on a confident set (NLL ~ e^(-margin / t)), which still rises with t.
        rising = slope(mid) >= 0
        return jnp.where(rising, low, mid), jnp.where(rising, mid, high)

    low, high = (jnp.asarray(v, logits.dtype) for v in _LOG_T_RANGE)
    low, high = jax.lax.fori_loop(0, _BISECTIONS, halve, (low, high))
    u = (low + high) / 2
    return jnp.where(jnp.isfinite(nll(u)), u, jnp.nan)  # NaN or inf losses: no answer


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Fits the temperature that minimises the NLL (temperature scaling).

    .. math::
        t^\star = \arg\min_{t > 0} \; -\frac{1}{N} \sum_i \log \mathrm{softmax}(z_i / t)_{y_i}

    The NLL is convex in :math:`1/t`, so its derivative in :math:`\log t`
    changes sign once; this bisects on that sign over
    :math:`\log t \in [-5, 5]`, with the derivative taken through jsoftmax's
    ``temperature`` argument. An optimum outside that range (a validation set
    the model classifies perfectly drives t to 0) gives the nearest end; a
    NaN or infinite loss (a label out of range) gives NaN. Fit it
    on held-out data (a validation split), never on the training data, on which
    a trained model looks better calibrated than it is.

    Args:
      logits: logits of shape (N, K) from the trained model.
      labels: integer class labels of shape (N,).

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
    if arr.shape[1] == 0:
        raise ValueError(
            f"fit_temperature: logits has no classes (shape {tuple(arr.shape)}): the loss is 0 "
            "at every temperature, so there is nothing to fit; give logits of shape "
            "(examples, classes) with at least one class"
        )
    return _fit_temperature(arr, lab)
