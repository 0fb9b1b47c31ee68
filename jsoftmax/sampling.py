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
from jsoftmax._checks import (
    Axis,
    broadcasts_to,
    cast_real,
    class_layout,
    classes_last,
    host_array,
    is_traced,
    mask_spec,
    real_spec,
    reduced_shape,
    shaped_mask,
    shaped_temperature,
    temperature_per_row,
    temperature_spec,
)
from jsoftmax.core import log_softmax, softmax

__all__ = ["gumbel_softmax", "sample"]

_INF = float("inf")


# --------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------


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
        log_probs, _ = nz.logits((scores.ndim - 1,), scores, t)
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


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sample_jit(layout_axes, out_dtype, layout, squeeze_p, top_k, key, x, where, t, p):
    """Everything a call of :func:`sample` does on the device: the
    conversions, the classes moved last and merged, and the draw."""
    axes, sorted_axes, batch_axes = layout_axes
    x = cast_real(x, out_dtype)
    shape = x.shape
    mask = shaped_mask(where, shape)
    t = shaped_temperature(t, layout, shape, sorted_axes, x.dtype)
    if p is not None:
        p = jnp.asarray(p).astype(x.dtype)
        if squeeze_p:
            p = jnp.squeeze(p, sorted_axes)  # the keepdims shape, as temperature takes
        p = jnp.broadcast_to(p, reduced_shape(shape, sorted_axes))[..., None]
    x = classes_last(x, batch_axes, axes)
    if mask is not None:
        mask = classes_last(mask, batch_axes, axes)
    return _sample(key, x, mask, temperature_per_row(t, sorted_axes), top_k, p)


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
    # Checks on static information only: the device work is one jitted call.
    x, out_dtype = real_spec(name, logits, "logits")
    shape = tuple(np.shape(x))
    axes, sorted_axes, batch_axes = class_layout(name, axis, len(shape))
    batch = reduced_shape(shape, sorted_axes)
    mask = host_array(mask_spec(name, where, shape)) if where is not None else None
    t, layout = temperature_spec(name, temperature, shape, sorted_axes)
    num_classes = int(np.prod([shape[a] for a in axes]))
    if top_k is not None:
        if is_traced(top_k) or isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise TypeError(f"{name}: top_k must be a Python int (static); got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"{name}: top_k must be >= 1 (None keeps all); got {top_k}")
        top_k = min(int(top_k), num_classes)
    p, squeeze_p = _top_p_spec(name, top_p, shape, sorted_axes)
    if num_classes == 0:  # nothing to sample in any slice
        return jnp.full(batch, -1, jnp.int32)
    return _sample_jit(
        (axes, sorted_axes, batch_axes), out_dtype, layout, squeeze_p, top_k, key, x, mask, t,
        p,
    )


def _top_p_spec(name, top_p, shape, sorted_axes):
    """``(top_p, squeeze)`` checked from static information (a concrete
    value must be in [0, 1]); ``squeeze`` says it has the keepdims shape."""
    if top_p is None:
        return None, False
    if not is_traced(top_p):
        values = np.asarray(top_p, np.float64)
        if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
            raise ValueError(f"{name}: top_p must be in [0, 1] (1 keeps all); got {top_p!r}")
    p_shape = tuple(np.shape(top_p))
    keepdims = tuple(1 if i in sorted_axes else n for i, n in enumerate(shape))
    squeeze = len(p_shape) == len(shape) and len(p_shape) > 0 and all(
        a == b or a == 1 for a, b in zip(p_shape, keepdims, strict=True)
    )
    if squeeze:
        p_shape = reduced_shape(p_shape, sorted_axes)
    batch = reduced_shape(shape, sorted_axes)
    if not broadcasts_to(p_shape, batch):
        raise ValueError(
            f"{name}: top_p of shape {p_shape} does not broadcast to the batch shape "
            f"{batch}; pass a scalar or one value per slice"
        )
    return host_array(top_p), squeeze


# --------------------------------------------------------------------------
# gumbel_softmax
# --------------------------------------------------------------------------


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


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _gumbel_softmax_jit(layout_axes, out_dtype, layout, hard, key, x, where, t):
    """Everything a call of :func:`gumbel_softmax` does on the device: the
    classes moved last and merged, the sample, and back to the input layout."""
    axes, sorted_axes, batch_axes = layout_axes
    x = cast_real(x, out_dtype)
    shape = x.shape
    mask = shaped_mask(where, shape)
    t = shaped_temperature(t, layout, shape, sorted_axes, x.dtype)
    flat = classes_last(x, batch_axes, axes)
    if mask is not None:
        mask = classes_last(mask, batch_axes, axes)
    y = _gumbel_softmax(key, flat, mask, temperature_per_row(t, sorted_axes), hard)
    perm = batch_axes + axes
    y = y.reshape(tuple(shape[i] for i in perm))
    return jnp.transpose(y, tuple(int(i) for i in np.argsort(perm))).astype(out_dtype)


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
    # Checks on static information only: the device work is one jitted call.
    x, out_dtype = real_spec(name, logits, "logits")
    shape = tuple(np.shape(x))
    axes, sorted_axes, batch_axes = class_layout(name, axis, len(shape))
    mask = host_array(mask_spec(name, where, shape)) if where is not None else None
    t, layout = temperature_spec(name, temperature, shape, sorted_axes)
    if not isinstance(hard, (bool, np.bool_)):
        raise TypeError(f"{name}: hard must be a Python bool (static); got {hard!r}")
    return _gumbel_softmax_jit(
        (axes, sorted_axes, batch_axes), out_dtype, layout, bool(hard), key, x, mask, t
    )
