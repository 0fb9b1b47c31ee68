"""Cross-entropy losses: drop-in replacements for optax's, without the NaNs.

Both losses take the same positional arguments as ``optax.losses`` 0.2.x
(``logits, labels, axis=-1, where=None``) and return the same shapes and
values on ordinary inputs. What differs is the edges, where they follow the
core functions: a class with logit -inf has probability 0, so it costs
nothing when its label is 0 and +inf when its label is positive; an example
with no class left (every class masked out or -inf) costs 0 with zero
gradient. ``temperature`` and ``label_smoothing`` are keyword-only.

The integer-label loss never builds a one-hot or a log-probability array of
the logits' shape: it is one masked ``logsumexp`` of the logits shifted by the
label's logit, so its compiled temporary memory stays at the size of the
batch (see the README for the measured comparison with optax).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax._checks import (
    Axis,
    as_real_array,
    broadcast_mask,
    canonicalize_axes,
    canonicalize_temperature,
    class_layout,
    classes_last,
    compute_dtype,
    is_traced,
    temperature_per_row,
    upcast,
    widen_labels,
)
from jsoftmax.core import (
    AxisName,
    _nan_if_inf,
    _plain_logits,
    _plain_logits_given_max,
    _plain_softmax_parts,
    _softmax,
    _sum,
    _value,
    log_softmax,
    logsumexp,
)

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]

_INF = float("inf")


# --------------------------------------------------------------------------
# Argument handling shared by both losses.
# --------------------------------------------------------------------------


def _loss_mask(name: str, where: ArrayLike | None, shape, axes) -> jax.Array | None:
    """``where`` of the logits' shape, or of the batch shape (as optax accepts)."""
    if where is None:
        return None
    mask = jnp.asarray(where)
    if mask.ndim != len(shape) and mask.ndim == len(shape) - len(axes):
        mask = jnp.expand_dims(mask, axes)
    return broadcast_mask(name, mask, shape)


def _label_smoothing(name: str, alpha: ArrayLike, dtype) -> jax.Array | None:
    """None for a concrete 0, else a scalar array; concrete values in [0, 1]."""
    if jnp.ndim(alpha) != 0:
        raise ValueError(
            f"{name}: label_smoothing must be a scalar in [0, 1]; got shape {jnp.shape(alpha)}"
        )
    if not is_traced(alpha):
        value = float(np.asarray(alpha))
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{name}: label_smoothing must be in [0, 1] (0 is no smoothing); got {value!r}"
            )
        if value == 0.0:
            return None
    return jnp.asarray(alpha, dtype)


def _psum(x, axis_name):
    """The sum over the shards of a vocab-parallel call (``x`` when unsharded)."""
    return x if axis_name is None else lax.psum(x, axis_name)


# --------------------------------------------------------------------------
# softmax_cross_entropy (probability labels)
# --------------------------------------------------------------------------


def _log_normaliser(total):
    """``(log_total, nonempty)`` for a slice total that is 0 (nothing
    included) or at least 1: log_total is log 1 = 0 for an empty slice and NaN
    for an infinite total (a NaN in the slice, see ``core._nan_if_inf``);
    nonempty is 0.0 / 1.0 and carries no derivative, nor does the 1 added to
    an empty slice: max(total, 1) would have a kink at a total of exactly 1
    (one class, or a dominating max), which halves derivatives through it."""
    nonempty = lax.stop_gradient(jnp.minimum(total, 1.0))
    return jnp.log(total + (1.0 - nonempty)) + _nan_if_inf(total), nonempty


def _plain_dense_parts(axes, x):
    """``(y, surprisal, nonempty, included)`` for the fast dense loss.

    ``y`` are the select-free logits of ``core._plain_logits`` (excluded
    classes at -inf); ``surprisal`` is -log softmax = log_total - y with y
    clamped at -big, so that it is finite on excluded classes (their labels
    are handled by the caller); ``nonempty`` is 1.0 per slice, or 0.0 for a
    slice with nothing included; ``included`` is 1.0 / 0.0 per class.

    One sum, as in optax: log_total is accurate to an ulp or two of 1, not
    relative to a total of 1 + tiny, so a loss below about 1e-6 (float32) is
    accurate in absolute, not relative, terms. (The split at the maximum that
    log_softmax uses needs a second sum, which cost 1.1-2.7x more here.)
    """
    y, _ = _plain_logits(axes, x)
    log_total, nonempty = _log_normaliser(_sum(jnp.exp(y), axes))
    surprisal = log_total - jnp.maximum(y, -jnp.finfo(y.dtype).max)
    # A finite y is at least -big, so y * tiny lies in [-4, 0]; -inf stays
    # -inf (as in core._plain_log_softmax_tangent).
    included = jnp.minimum(jnp.maximum(y * jnp.finfo(y.dtype).tiny, -9.0) + 9.0, 1.0)
    return y, surprisal, nonempty, included


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _plain_dense_cross_entropy(axes, x, labels):
    """The loss for t = 1, no mask, no smoothing, one device.

    loss = sum_j l_j (log_total - y_j). XLA:CPU fuses the max, the normaliser
    and this sum as long as no compare or select appears per element or on
    the slice totals, so the edges are arithmetic: on a class with y = -inf
    the term is l_j (log_total + big) + l_j a / (1 - a) with
    a = min(|l_j| / tiny, 1), which is 0 for a zero label and +inf for a
    positive one (-inf for a negative one, as on the general path), and the
    labels of a slice with nothing included are multiplied by ``nonempty`` =
    0. Labels must be finite: an infinite or NaN label gives NaN here.
    """
    _, surprisal, nonempty, included = _plain_dense_parts(axes, x)
    labels = labels * nonempty
    # On excluded classes a = min(|l| / tiny, 1) is 1 for a label of at least
    # the smallest normal number and 0 for a zero label; l * a / (1 - a) is
    # then +-inf or 0. (Not a multiple of big: XLA:CPU materialises that
    # constant as an input-sized array on long rows.)
    tiny = jnp.finfo(surprisal.dtype).tiny
    impossible = jnp.minimum(jnp.abs(labels) * (1.0 - included) / tiny, 1.0)
    terms = labels * surprisal + labels * (impossible / (1.0 - impossible))
    return jnp.sum(terms, axes)


@_plain_dense_cross_entropy.defjvp
def _plain_dense_cross_entropy_jvp(axes, primals, tangents):
    x, labels = primals
    dx, dlabels = (_value(v) for v in tangents)  # in the compute dtype
    loss = _plain_dense_cross_entropy(axes, x, labels)

    def tangent(x, labels, dx, dlabels):
        # d loss = sum_j (L p_j - l_j) dx_j + sum_j (log_total - y_j) dl_j over
        # the included classes (L their label mass); 0 on excluded ones.
        _, surprisal, _, included = _plain_dense_parts(axes, x)
        kept = labels * included
        probs = jnp.exp(-surprisal)  # 0 on excluded classes (exp(-big - log_total))
        out = jnp.sum((_sum(kept, axes) * probs - kept) * dx, axes)
        return out + jnp.sum(surprisal * included * dlabels, axes)

    return loss, jax.checkpoint(tangent, prevent_cse=False)(x, labels, dx, dlabels)


def _dense_cross_entropy(axes, x, labels, mask, t, alpha, axis_name):
    if t is None and mask is None and alpha is None and axis_name is None:
        return _plain_dense_cross_entropy(axes, x, labels)
    x = upcast(x)
    log_probs = log_softmax(
        x, axes, mask, temperature=1.0 if t is None else t, axis_name=axis_name
    )
    if alpha is not None:
        # optax.smooth_labels: (1 - a) * labels + a / (number of classes kept).
        if mask is None:
            count = float(np.prod([x.shape[a] for a in axes]))
            if axis_name is not None:
                count = count * lax.axis_size(axis_name)
        else:
            count = _psum(jnp.sum(mask, axes, keepdims=True, dtype=x.dtype), axis_name)
        labels = (1.0 - alpha) * labels + alpha / jnp.where(count == 0, 1.0, count)
    finite = log_probs != -_INF  # NaN stays on the finite path and propagates
    # 0 * log 0 = 0; a positive label on a class of probability 0 costs +inf.
    # The infinite branch is a constant, so no 0 * inf reaches the gradients.
    impossible = jnp.where(labels == 0, 0.0, jnp.where(labels > 0, -_INF, _INF))
    terms = jnp.where(finite, labels * jnp.where(finite, log_probs, 0.0), impossible)
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    loss = 0.0 - _psum(jnp.sum(terms, axes), axis_name)  # 0 - 0 is +0, not -0
    # An example with nothing left to predict (every class masked or -inf).
    # The slice's total probability (1, or 0 when empty; NaN stays NaN) rather
    # than a count of the finite entries: a compare inside the reduction would
    # split XLA:CPU's fused kernel (and its max reduction drops NaNs).
    mass = jnp.sum(jnp.exp(lax.stop_gradient(log_probs)), axes)
    empty = _psum(mass, axis_name) == 0
    return jnp.where(empty, 0.0, loss)


_dense_cross_entropy_jit = jax.jit(_dense_cross_entropy, static_argnums=(0, 6))


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    label_smoothing: ArrayLike = 0.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Cross-entropy between probability labels and ``softmax(logits / t)``.

    .. math::
        \ell = -\sum_i y_i \log \mathrm{softmax}(x / t)_i,
        \qquad 0 \cdot \log 0 = 0

    A drop-in replacement for ``optax.losses.softmax_cross_entropy`` (same
    positional arguments, shapes and values), built on :func:`log_softmax`.
    Where optax gives NaN this gives the limit: a class with logit -inf and
    label 0 contributes 0 and zero gradient; a positive label on a class with
    logit -inf costs +inf. Classes masked out by ``where`` are dropped from
    the sum, label and all (as in optax). An example with every class
    excluded costs 0 with zero gradient. The gradient with respect to a label
    on a class of probability 0 is taken as 0.

    Args:
      logits: unnormalised log-probabilities.
      labels: target probabilities, broadcastable to ``logits``' shape.
      axis: the class axis or axes: an int, a tuple of ints, or None (all).
      where: optional boolean mask of ``logits``' shape, or of the batch
        shape (``logits``' shape without ``axis``) to mask whole examples.
      temperature: t >= 0, a scalar or one per example; the loss uses
        ``log_softmax(logits, temperature=t)`` (0 = hard max, inf = uniform)
        and is differentiable in t.
      label_smoothing: a in [0, 1]; the labels become
        ``(1 - a) * labels + a / K``, K the number of classes kept by
        ``where``, exactly as ``optax.smooth_labels`` does.
      axis_name: name of a mesh axis (inside ``jax.shard_map``) over which
        the class axis is also sharded, with ``labels`` and ``where`` sharded
        like ``logits``; the loss (and its gradients) is that of the whole,
        unsharded logits. Differentiating needs ``check_vma=True``.

    Returns:
      The loss per example, of the batch shape.

    Examples:
      >>> import jsoftmax
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> jsoftmax.softmax_cross_entropy(logits, labels)
      Array([0.2761297, 2.951799 ], dtype=float32)
      >>> jsoftmax.softmax_cross_entropy(jnp.array([0.0, -jnp.inf]), jnp.array([1.0, 0.0]))
      Array(0., dtype=float32)
    """
    name = "softmax_cross_entropy"
    # float16 / bfloat16 logits stay as they are (see core._canonical_args).
    x, out_dtype = as_real_array(name, logits, "logits", keep_low_precision=True)
    dtype = compute_dtype(x.dtype)
    y, label_dtype = as_real_array(name, labels, "labels")
    try:
        target = np.broadcast_shapes(y.shape, x.shape)
    except ValueError:
        target = None
    if target != x.shape:
        raise ValueError(
            f"{name}: labels of shape {y.shape} do not broadcast to the logits' shape "
            f"{x.shape}; give one probability per logit (for class indices use "
            "softmax_cross_entropy_with_integer_labels)"
        )
    axes = canonicalize_axes(name, axis, x.ndim)
    mask = _loss_mask(name, where, x.shape, axes)
    t = canonicalize_temperature(name, temperature, x.shape, axes, dtype)
    alpha = _label_smoothing(name, label_smoothing, dtype)
    y = jnp.broadcast_to(y.astype(dtype), x.shape)
    loss = _dense_cross_entropy_jit(axes, x, y, mask, t, alpha, axis_name)
    return loss.astype(jnp.promote_types(out_dtype, label_dtype))


# --------------------------------------------------------------------------
# softmax_cross_entropy_with_integer_labels
# --------------------------------------------------------------------------


def _label_logit(x, labels):
    """``(x_y, valid)``: the label's logit (that of class 0 where the label is
    out of range) and whether the label is in range, keepdims.

    A float16 / bfloat16 ``x`` is gathered as its bit pattern: XLA would
    otherwise move the float32 conversion of the gathered logit in front of
    the gather, where the normaliser's conversion of all the logits is, and
    keep that converted array (16 MiB at 4096x1024) for the two.
    """
    valid = ((labels >= 0) & (labels < x.shape[-1]))[..., None]
    index = jnp.where(valid, labels[..., None], 0)
    if x.dtype.itemsize != 2:
        return jnp.take_along_axis(x, index, axis=-1), valid
    # (No derivative flows through bits; the callers differentiate by their own rules.)
    bits = lax.bitcast_convert_type(lax.stop_gradient(x), jnp.uint16)
    bits = jnp.take_along_axis(bits, index, axis=-1)
    return lax.bitcast_convert_type(bits, x.dtype), valid


@jax.custom_jvp
def _plain_integer_cross_entropy(x, labels):
    """The loss for t = 1, no mask, no smoothing, one device: log_total -
    y_label per example, with y_label the label's select-free logit. XLA:CPU
    fuses the max and the normaliser into one kernel and the label's logit is
    gathered once; the rest is per example, with no [batch, classes]
    temporary. Same limits as the general path: +inf for a label on an
    excluded class, log k for a label on one of k logits of +inf, 0 for an
    example with nothing included, NaN for a label out of range.
    """
    _, _, x_max, total = _plain_softmax_parts((x.ndim - 1,), x)
    log_total, _ = _log_normaliser(total)
    x_y, valid = _label_logit(x, labels)
    loss = log_total - _plain_logits_given_max(upcast(x_y), x_max)
    loss = jnp.where(total == 0, 0.0, jnp.where(valid, loss, jnp.nan))
    return loss[..., 0]


@_plain_integer_cross_entropy.defjvp
def _plain_integer_cross_entropy_jvp(primals, tangents):
    """d loss = sum_j (p_j - onehot_j) dx_j with p the (fast) softmax, which
    is uniform over +inf logits; 0 where the loss is a constant limit (a label
    out of range or on an infinite logit), and NaN with a NaN in the example.
    The one-hot is a compare with the class index, so reverse mode is one
    element-wise pass after the softmax (no scatter): fewer temporaries than
    optax's value_and_grad (81,920 against 131,072 bytes at 4096x32768).
    """
    x, labels = primals
    dx = _value(tangents[0])  # in the compute dtype: one rounding in reverse mode
    probs = _softmax((x.ndim - 1,), x, None, None)
    onehot = lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1) == labels[..., None]
    x_y, valid = _label_logit(x, labels)
    moves = valid & (jnp.abs(x_y) != _INF)
    tangent = jnp.sum((probs - onehot) * dx, axis=-1, keepdims=True)
    # tangent - tangent (+0, or NaN) rather than 0 where the loss is a limit:
    # a NaN elsewhere in the example stays NaN, in forward mode as in reverse.
    limit = tangent - tangent
    return _plain_integer_cross_entropy(x, labels), jnp.where(moves, tangent, limit)[..., 0]


def _integer_cross_entropy(x, labels, mask, t, alpha, limits, t_traced, axis_name):
    """The loss on flattened inputs: classes on the last axis, keepdims.

    The cross-entropy of a label y is ``lse_t(x - x_y) / t``: one masked
    logsumexp of the logits shifted by the label's logit, which is accurate
    (the shifted label is exactly 0) and never builds a [batch, classes]
    array. The limits where that formula is 0/0 or inf - inf (t = 0, t = inf,
    a label logit of +inf) are logsumexps too, at t = 1, of 0 / -inf / +inf
    indicator logits: ``log k`` for a k-way tie on the top, +inf when the
    label is not on top.

    With ``axis_name`` the classes are sharded over that mesh axis: labels
    are global, the shard holding a label's class contributes its logit (and
    mask bit) through a psum, and every sum and logsumexp spans the shards.
    """
    if t is None and mask is None and alpha is None and axis_name is None:
        return _plain_integer_cross_entropy(x, labels)
    x = upcast(x)
    num_classes = x.shape[-1]
    valid = ((labels >= 0) & (labels < num_classes))[..., None]
    here = valid  # whether this shard holds the label's class
    local = labels
    if axis_name is not None:
        local = labels - lax.axis_index(axis_name) * num_classes
        here = ((local >= 0) & (local < num_classes))[..., None]
        num_classes = num_classes * lax.axis_size(axis_name)
        valid = ((labels >= 0) & (labels < num_classes))[..., None]
    index = jnp.where(here, local[..., None], 0)
    x_y = jnp.take_along_axis(x, index, axis=-1)
    if axis_name is not None:
        x_y = lax.psum(jnp.where(here, x_y, 0.0), axis_name)
    label_in = valid & (x_y != -_INF)
    if mask is not None:
        label_kept = jnp.take_along_axis(mask, index, axis=-1)
        if axis_name is not None:
            label_kept = lax.psum((here & label_kept).astype(jnp.int32), axis_name) > 0
        label_in = label_in & label_kept
    shift = jnp.where(jnp.isfinite(x_y), x_y, 0.0)
    # With label smoothing the shift is pinned for differentiation and the
    # label's own derivative, -1/t, is added through `moved` below (value 0).
    # Otherwise it comes back as minus the row sum of the z cotangent, a
    # reduction over [batch, classes] that, next to the smoothing term's
    # gradient, makes XLA keep that cotangent as a temporary. (Without
    # smoothing, pinning measured slightly more memory, so it is not done.)
    pinned = shift if alpha is None else jax.lax.stop_gradient(shift)
    z = x - pinned

    # Rows whose loss is a limit: log(#top) if the label is on top, else +inf.
    top_is_inf = label_in & (x_y == _INF)
    special = top_is_inf
    z_special = jnp.where(x == _INF, 0.0, -_INF)
    if t is not None and not limits:
        t_arg = t  # 0 < t < inf: lse_t of the 0 / -inf indicator is t log k
    elif t is not None:
        t_zero, t_inf = t == 0, t == _INF
        special = special | (label_in & (t_zero | t_inf))
        above = jnp.where(x > x_y, _INF, jnp.where(x == x_y, 0.0, -_INF))
        flat = jnp.where(x == _INF, _INF, jnp.where(x == -_INF, -_INF, 0.0))
        z_special = jnp.where(
            top_is_inf, z_special, jnp.where(t_zero, above, jnp.where(t_inf, flat, z_special))
        )
        z_special = jnp.where(jnp.isnan(x), jnp.nan, z_special)
        t_arg = jnp.where(top_is_inf | t_zero | t_inf, 1.0, t)
    else:
        t_arg = None
    if alpha is None and (t is None or not limits):
        # x - x_y for a finite x_y (differentiable in both, ties included: all
        # logits equal, as at a zero initialisation, is a tie with the label).
        # For an infinite x_y a constant: 0 where x equals it and x - x_y
        # elsewhere, which for x_y = +inf is the limit's 0 / -inf indicator and
        # for x_y = -inf keeps a row of -inf empty. The select is per example
        # and the constant carries no derivative, so the backward pass keeps
        # no [batch, classes] array.
        at_label = jnp.where(x_y == -_INF, -_INF, 0.0)
        limit = lax.stop_gradient(jnp.where(x == x_y, at_label, x - x_y))
        z = jnp.where(jnp.isfinite(x_y), x - shift, limit)
    else:
        z = jnp.where(special, z_special, z)
    lse = logsumexp(
        z, -1, None, True, False, mask, temperature=1.0 if t_arg is None else t_arg,
        axis_name=axis_name,
    )
    finite = jnp.isfinite(lse)
    if t_arg is None:
        scaled = lse
    elif not t_traced:
        scaled = lse / t_arg  # t is a constant, with no cotangent to spoil
    else:
        # Select before dividing so that t never meets an infinite numerator
        # (its cotangent would be 0 * inf = NaN).
        scaled = jnp.where(finite, jnp.where(finite, lse, 0.0) / t_arg, lse)
    t_scale = 1.0 if t_arg is None else t_arg
    # Where the label is not a kept class the loss is a constant: 0 for an
    # example with nothing kept, NaN for a label out of range or a NaN in the
    # example, +inf otherwise. One select keeps the backward pass lean.
    empty = lse == -_INF
    if alpha is None:
        constant = jnp.where(empty, 0.0, jnp.where(~valid | jnp.isnan(lse), jnp.nan, _INF))
        return jnp.where(label_in, scaled, constant)[..., 0]

    # Label smoothing, as optax.smooth_labels: (1 - a) * CE + a * S with S the
    # mean of -log_softmax over the K kept classes. Ordinarily S = L - mean(x - s) / t
    # with L = lse_t(x - s) / t, so the loss is L - a * sum(x - s) / (K t): the
    # logsumexp is used once, and only a sum of the logits is added.
    if mask is None:
        kept = True
        count = jnp.asarray(num_classes, x.dtype)
    else:
        kept = mask
        count = _psum(jnp.sum(mask, -1, keepdims=True, dtype=x.dtype), axis_name)
    safe_count = jnp.where(count == 0, 1.0, count)
    # sum(x) - K s rather than sum(x - s): x - s feeds the logsumexp, and a
    # second reader would make XLA keep it as a [batch, classes] array.
    moved = jnp.where(special, 0.0, shift - pinned) / t_scale
    total = _psum(jnp.sum(jnp.where(kept, x, 0.0), -1, keepdims=True), axis_name) - count * pinned
    finite_total = jnp.isfinite(total)
    ordinary = (
        scaled
        - alpha * jnp.where(finite_total, total, 0.0) / (safe_count * t_scale)
        - (1.0 - alpha) * moved
    )
    use_ordinary = valid & finite & finite_total & ~special & (label_in | (alpha == 1))
    if limits:
        use_ordinary = use_ordinary & ~t_zero & ~t_inf

    # Everything else is a constant. In the limits (t = 0, t = inf, a kept
    # logit of +inf) each -log_softmax is log(#top) on the top classes and
    # +inf elsewhere, so S is log K when every kept class is on top.
    if not limits:
        on_top = x == _INF
    else:
        top = logsumexp(  # the max
            x, -1, None, True, False, mask, temperature=0.0, axis_name=axis_name
        )
        on_top = jnp.where(t_inf & (top < _INF), x > -_INF, x == top)
    off_top = _psum(
        jnp.sum(jnp.where(kept, jnp.where(on_top, 0.0, 1.0), 0.0), -1, keepdims=True), axis_name
    )
    smooth = jnp.where(off_top == 0, jnp.log(safe_count), _INF)
    smooth = jnp.where(jnp.isnan(total) | jnp.isnan(lse), jnp.nan, smooth)
    cross_entropy = jnp.where(label_in, scaled, jnp.where(jnp.isnan(lse), jnp.nan, _INF))
    # A term of weight 0 is absent: 0 * inf counts as 0.
    constant = jnp.where(alpha == 1, 0.0, (1.0 - alpha) * cross_entropy) + jnp.where(
        alpha == 0, 0.0, alpha * smooth
    )
    constant = jnp.where(~label_in & empty, 0.0, jnp.where(valid, constant, jnp.nan))
    return jnp.where(use_ordinary, ordinary, jax.lax.stop_gradient(constant))[..., 0]


_integer_cross_entropy_jit = jax.jit(_integer_cross_entropy, static_argnums=(5, 6, 7))


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    label_smoothing: ArrayLike = 0.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Cross-entropy of integer class labels under ``softmax(logits / t)``.

    .. math::
        \ell = -\log \mathrm{softmax}(x / t)_y
             = t^{-1} \, \mathrm{lse}_t(x - x_y)

    A drop-in replacement for
    ``optax.losses.softmax_cross_entropy_with_integer_labels`` (same
    positional arguments, shapes and values) that equals
    ``-log_softmax(logits, axis, where, temperature=t)[label]`` at every
    edge, computed as one masked :func:`logsumexp` so that no array of the
    logits' shape is kept for the backward pass. A label on a class that is
    excluded (``where`` False or logit -inf) costs +inf; an example with every
    class excluded costs 0 with zero gradient (whatever its label); a label
    outside ``[0, num_classes)`` gives NaN for that example, also under jit.

    Args:
      logits: unnormalised log-probabilities.
      labels: integer class indices of the batch shape (``logits``' shape
        without ``axis``). With a tuple ``axis`` a label is a flat index into
        a slice whose axes are in the order given, as in optax.
      axis: the class axis or axes: an int, a tuple of ints, or None (all).
      where: optional boolean mask of ``logits``' shape, or of the batch shape.
      temperature: t >= 0, a scalar or one per example (0 = hard max,
        inf = uniform); differentiable.
      label_smoothing: a in [0, 1]; the same loss as ``optax.smooth_labels``
        of the one-hot labels followed by :func:`softmax_cross_entropy`:
        ``(1 - a) * loss + a * mean(-log_softmax)`` over the classes kept by
        ``where``.
      axis_name: name of a mesh axis (inside ``jax.shard_map``) over which
        the class axis (a single ``axis``) is also sharded, with ``where``
        sharded like ``logits``; ``labels`` are then global class indices,
        the same on every shard (vocab-parallel cross-entropy).
        Differentiating needs ``check_vma=True``.

    Returns:
      The loss per example, of the batch shape.

    Examples:
      >>> import jsoftmax
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      Array([0.2761297, 2.951799 ], dtype=float32)
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 3]))
      Array([0.2761297,       nan], dtype=float32)
      >>> masked = jnp.array([[True, True, True], [False, False, False]])
      >>> labels = jnp.array([0, -1])  # -1: padding, masked out
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels, where=masked)
      Array([0.2761297, 0.       ], dtype=float32)
    """
    name = "softmax_cross_entropy_with_integer_labels"
    # float16 / bfloat16 logits stay as they are (see core._canonical_args).
    x, out_dtype = as_real_array(name, logits, "logits", keep_low_precision=True)
    dtype = compute_dtype(x.dtype)
    axes, sorted_axes, batch_axes = class_layout(name, axis, x.ndim)
    if axis_name is not None and len(axes) != 1:
        raise ValueError(
            f"{name}: with axis_name the classes must be one axis (the sharded one); "
            f"got axis={axis!r}"
        )
    batch_shape = tuple(x.shape[i] for i in batch_axes)
    label_dtype = getattr(labels, "dtype", None)
    if label_dtype is None:
        label_dtype = np.asarray(labels).dtype
    if not jnp.issubdtype(label_dtype, jnp.integer):
        raise TypeError(
            f"{name}: labels must be integer class indices; got dtype {label_dtype}. "
            "Cast them (labels.astype(jnp.int32)), or use softmax_cross_entropy for "
            "probability labels"
        )
    y = widen_labels(jnp.asarray(labels))
    if y.shape != batch_shape:
        raise ValueError(
            f"{name}: labels have shape {y.shape} but the logits' batch shape is "
            f"{batch_shape} (logits shape {x.shape} without axis {axes}); give one "
            "class index per example"
        )
    mask = _loss_mask(name, where, x.shape, sorted_axes)
    t = canonicalize_temperature(name, temperature, x.shape, sorted_axes, dtype)
    alpha = _label_smoothing(name, label_smoothing, dtype)
    x = classes_last(x, batch_axes, axes)
    if mask is not None:
        mask = classes_last(mask, batch_axes, axes)
    t = temperature_per_row(t, sorted_axes)
    # Whether t may be 0 or inf: only then are those limits compiled in.
    traced = is_traced(temperature)
    if t is None:
        limits = False
    elif traced:
        limits = True
    else:
        values = np.asarray(temperature, np.float64)
        limits = bool(np.any((values == 0) | np.isinf(values)))
    loss = _integer_cross_entropy_jit(x, y, mask, t, alpha, limits, traced, axis_name)
    return loss.astype(out_dtype)
