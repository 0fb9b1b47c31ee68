"""Sampling from softmax distributions: temperature, top-k, top-p, Gumbel-softmax.

Both functions use the Gumbel-max trick: ``argmax(log p + g)`` with ``g``
standard Gumbel noise is a draw from ``p``. The log-probabilities come from
:func:`jsoftmax.log_softmax`, so masks, -inf logits, +inf logits and the
temperature limits behave as they do there.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _normalise as nz
from jsoftmax._checks import Axis, classes_last, concrete, host_args, is_traced, slice_args
from jsoftmax.core import log_softmax, softmax

__all__ = ["gumbel_softmax", "sample"]

_INF = float("inf")


# sample


def _sample(key, x, mask, t, top_k, top_p):
    """One index per row of ``x`` ([batch..., classes]), -1 for an empty row."""
    kept = x != -_INF
    if mask is not None:
        kept = kept & mask
    poisoned = jnp.any(kept & jnp.isnan(x), -1)
    scores = nz.select(kept & ~jnp.isnan(x), x, -_INF)
    if top_k is not None:
        # The k largest logits, sorted (ties: the lower index first).
        scores, index = jax.lax.top_k(scores, top_k)
    else:
        index = None
    live = scores != -_INF
    if top_p is None:
        # The draw needs the tempered logits only: log s is one constant per
        # slice, which cannot move the argmax (and costs compile time).
        log_probs, _ = nz.logits(nz.Axes((scores.ndim - 1,)), scores, t)
    else:
        log_probs = log_softmax(scores, -1, None, temperature=1.0 if t is None else t)
    if top_p is not None:
        if index is None:
            order = jnp.argsort(-scores, axis=-1, stable=True)
            scores = jnp.take_along_axis(scores, order, -1)
            log_probs = jnp.take_along_axis(log_probs, order, -1)
            live = scores != -_INF
            index = order
        # Nucleus: the most probable classes until their mass reaches top_p
        # (the first is always kept).
        probs = jnp.exp(log_probs)
        before = jnp.cumsum(probs, -1) - probs
        first = jnp.arange(scores.shape[-1]) == 0
        live = live & ((before < top_p) | first)
    noise = jax.random.gumbel(key, scores.shape, scores.dtype)
    drawn = jnp.argmax(nz.select(live, log_probs + noise, -_INF), -1)
    if t is not None:
        # t = 0 is greedy: the first maximum, without noise.
        is_greedy = (t == 0)[..., 0] if t.ndim else t == 0
        drawn = nz.select(is_greedy, jnp.argmax(scores, -1), drawn)
    if index is not None:
        drawn = jnp.take_along_axis(index, drawn[..., None], -1)[..., 0]
    empty = ~jnp.any(live, -1) | poisoned
    if t is not None:  # a traced negative or NaN temperature: nothing to draw
        empty = empty | ~((t >= 0)[..., 0] if t.ndim else t >= 0)
    return nz.select(empty, -1, drawn).astype(jnp.int32)


@partial(jax.jit, static_argnums=(5, 6))
def _sample_jit(key, x, where, t, p, axis, top_k):
    """The checks, the classes moved last and merged, and the draw."""
    x, dtype, axes, mask, t = slice_args("sample", x, axis, where, t, "logits")
    if p is not None:
        p = slice_args("sample", x, axis, None, p, "logits", t_name="top_p")[4]
    x, mask, t, p = classes_last(axis, axes, x.astype(jnp.promote_types(dtype, jnp.float32)),
                                 mask, t, p)
    if p is not None and p.ndim == 0:
        p = jnp.broadcast_to(p, (*x.shape[:-1], 1))
    if x.shape[-1] == 0:  # nothing to sample in any slice
        return jnp.full(x.shape[:-1], -1, jnp.int32)
    return _sample(key, x, mask, t, None if top_k is None else min(top_k, x.shape[-1]), p)


def sample(
    key: ArrayLike,
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    top_k: int | None = None,
    top_p: ArrayLike | None = None,
) -> jax.Array:
    r"""Draws one class index per slice from ``softmax(logits / t)``.

    .. math::
        i = \arg\max_j \left(\log \mathrm{softmax}(x / t)_j + g_j\right),
        \quad g_j \sim \mathrm{Gumbel}(0, 1)

    restricted to the classes kept by ``where`` (and with a logit above -inf),
    then to the ``top_k`` largest logits, then to the nucleus: the most
    probable classes, in order, until their probability (after the top-k
    restriction, renormalised) reaches ``top_p``; the most probable class is
    always in the nucleus. ``temperature=0`` is greedy: the first maximum,
    with no randomness. ``temperature=inf`` is uniform over what is kept.
    A slice with nothing left to sample (every class excluded, or a NaN
    among the kept logits) gives -1.

    Args:
      key: a PRNG key (``jax.random.key`` or ``PRNGKey``); draws for
        different slices are independent.
      logits: unnormalised log-probabilities.
      axis: the class axis or axes (an int or a tuple of ints); with a tuple
        the index is a flat index into the slice, axes in the order given.
      where: optional boolean mask broadcastable to ``logits``; False excludes.
      temperature: t >= 0, a scalar or one per slice (batch shape); may be
        traced.
      top_k: keep only the k largest logits (a static Python int >= 1; ties
        at the boundary go to the lower index). None keeps all; a k larger
        than the number of classes keeps all too, as in Hugging Face's
        ``top_k`` filtering.
      top_p: nucleus mass in [0, 1], a scalar or one per slice (the batch
        shape, or the keepdims shape that ``temperature`` takes); may be
        traced. None (or 1) keeps all.

    Returns:
      int32 indices of the batch shape (``logits``' shape without ``axis``).

    Examples:
      >>> import jax, jsoftmax
      >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
      >>> jsoftmax.sample(jax.random.key(0), logits, temperature=0.0)
      Array([1, 0], dtype=int32)
      >>> jsoftmax.sample(jax.random.key(0), logits, where=jnp.array([False, False, False]))
      Array([-1, -1], dtype=int32)
      >>> jsoftmax.sample(jax.random.key(0), logits, top_k=1)
      Array([1, 0], dtype=int32)
    """
    name = "sample"
    x, where, t = host_args(name, logits, where, temperature, "logits")
    if top_p is not None:
        top_p = concrete(name, "top_p", top_p, 0.0, 1.0, hint=" (1 keeps all)")
    if top_k is not None:
        if is_traced(top_k) or isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
            raise TypeError(f"{name}: top_k must be a Python int (static); got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"{name}: top_k must be >= 1 (None keeps all); got {top_k}")
        top_k = int(top_k)
    return _sample_jit(key, x, where, t, top_p, axis, top_k)


# gumbel_softmax


def _gumbel_softmax(key, x, mask, t, hard):
    noise = jax.random.gumbel(key, x.shape, x.dtype)
    # log_softmax(x) rather than x: the same sample (shift invariance) where x
    # is finite, and a fair draw among +inf logits, which x + g cannot order.
    perturbed = log_softmax(x, -1, mask) + noise
    soft = softmax(perturbed, -1, mask, temperature=1.0 if t is None else t)
    if not hard or x.shape[-1] == 0:
        return soft
    kept = perturbed != -_INF
    if mask is not None:
        kept = kept & mask
    scores = nz.select(kept, perturbed, -_INF)
    winner = jnp.argmax(scores, -1)
    one_hot = jax.nn.one_hot(winner, x.shape[-1], dtype=x.dtype)
    one_hot = nz.select(jnp.any(kept, -1, keepdims=True), one_hot, 0.0)
    one_hot = nz.select(jnp.isnan(soft), jnp.nan, one_hot)
    # Straight-through: the value of the one-hot, the gradient of the soft sample.
    return one_hot + (soft - jax.lax.stop_gradient(soft))


@partial(jax.jit, static_argnums=(4, 5))
def _gumbel_softmax_jit(key, x, where, t, axis, hard):
    """The checks, the classes moved last and merged, the sample, and back
    to the input layout."""
    x, dtype, axes, mask, t = slice_args("gumbel_softmax", x, axis, where, t, "logits")
    shape = x.shape
    flat, mask, t = classes_last(axis, axes, x.astype(jnp.promote_types(dtype, jnp.float32)),
                                 mask, t)
    y = _gumbel_softmax(key, flat, mask, t, hard)
    # Back to the input's layout: the class axes from last to where they were.
    order = axes if not isinstance(axis, tuple) else tuple(a % x.ndim for a in axis)
    batch = [n for i, n in enumerate(shape) if i not in axes]
    y = y.reshape((*batch, *(shape[a] for a in order)))
    return jnp.moveaxis(y, tuple(range(len(batch), x.ndim)), order).astype(dtype)


def gumbel_softmax(
    key: ArrayLike,
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    hard: bool = False,
) -> jax.Array:
    r"""A Gumbel-softmax (Concrete) sample: a differentiable relaxed one-hot draw.

    .. math::
        y = \mathrm{softmax}\left(\frac{x + g}{t}\right),
        \quad g_j \sim \mathrm{Gumbel}(0, 1)

    As t -> 0 the sample tends to the one-hot of ``argmax(x + g)``, which is
    a draw from ``softmax(x)`` (the Gumbel-max trick); ``t = 0`` returns that
    one-hot. With ``hard=True`` the value is that one-hot at any temperature
    and the gradient is the soft sample's (straight-through estimator).
    Excluded classes (``where`` False or logit -inf) get 0 and zero gradient;
    a slice with nothing kept is all zeros.

    Args:
      key: a PRNG key.
      logits: unnormalised log-probabilities.
      axis: the class axis or axes.
      where: optional boolean mask broadcastable to ``logits``.
      temperature: t >= 0, a scalar or one per slice; differentiable.
      hard: return one-hot samples with straight-through gradients.

    Returns:
      An array of ``logits``' shape and (floating) dtype whose slices sum to
      1 (0 for a slice with nothing kept).

    Examples:
      >>> import jax, jsoftmax
      >>> logits = jnp.array([0.0, 3.0, -jnp.inf])
      >>> y = jsoftmax.gumbel_softmax(jax.random.key(0), logits, temperature=0.5)
      >>> bool(jnp.isclose(y.sum(), 1.0)), float(y[2])
      (True, 0.0)
      >>> jsoftmax.gumbel_softmax(jax.random.key(0), logits, hard=True).sum()
      Array(1., dtype=float32)
    """
    name = "gumbel_softmax"
    if not isinstance(hard, bool | np.bool_):
        raise TypeError(f"{name}: hard must be a Python bool (static); got {hard!r}")
    x, where, t = host_args(name, logits, where, temperature, "logits")
    return _gumbel_softmax_jit(key, x, where, t, axis, bool(hard))
