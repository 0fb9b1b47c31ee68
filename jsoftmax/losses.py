"""Cross-entropy losses: drop-in replacements for optax's, without the NaNs.

Both losses take the same positional arguments as ``optax.losses`` 0.2.x
(``logits, labels, axis=-1, where=None``) and return the same shapes and
values on ordinary inputs. What differs is the edges, where they follow the
core functions: a class with logit -inf has probability 0, so it costs
nothing when its label is 0 and +inf when its label is positive; an example
with no class left (every class masked out or -inf) costs 0 with zero
gradient. ``temperature`` and ``label_smoothing`` are keyword-only.

The integer-label loss never builds a one-hot or a log-probability array of
the logits' shape: it is log s - z_y on the shared logits of
``jsoftmax._normalise``, and its gradient is recomputed from the logits and
two numbers per example (see the README for the measured memory).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _normalise as nz
from jsoftmax._checks import (
    Axis,
    broadcasts_to,
    classes_last,
    compute_dtype,
    concrete,
    host_args,
    inexact_dtype,
    promoted_dtype,
    slice_args,
    widen_labels,
)
from jsoftmax._normalise import INF, AxisName
from jsoftmax._vocab import label_index

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]


def _host_args(name, logits, labels, where, temperature, label_smoothing, label_kind):
    """The concrete checks of both losses: ``(x, labels, where, t, alpha)``."""
    x, where, t = host_args(name, logits, where, temperature, "logits")
    labels = host_args(name, labels, arg="labels")[0]
    alpha = concrete(name, "label_smoothing", label_smoothing, 0.0, 1.0, neutral=0.0,
                     hint=" (0 is no smoothing)")
    if labels.dtype.kind not in label_kind:
        raise TypeError(
            f"{name}: labels must be integer class indices; got dtype {labels.dtype}. Cast them "
            "(labels.astype(jnp.int32)), or use softmax_cross_entropy for probability labels"
            if label_kind == "iu" else
            f"{name}: labels has dtype {labels.dtype}, which is not a real number type; cast "
            "it first, e.g. labels.astype(jnp.float32)")
    return x, labels, where, t, alpha


def _smoothing(name, alpha, dtype):
    """The label smoothing as a scalar of ``dtype``, NaN outside [0, 1] (a
    jax array's value is checked on the device)."""
    if alpha is None:
        return None
    if jnp.ndim(alpha):
        raise ValueError(f"{name}: label_smoothing must be a scalar in [0, 1]; got shape "
                         f"{jnp.shape(alpha)}")
    alpha = jnp.asarray(alpha, dtype)
    return nz.select((alpha >= 0) & (alpha <= 1), alpha, jnp.nan)


# softmax_cross_entropy (probability labels)


def _kept_labels(labels, mask):
    """The labels with the classes that ``where`` drops set to 0."""
    return labels if mask is None else nz.select(mask, labels, 0.0)


def _probability_terms(x, labels, t, mask, shift, norm):
    """``(probs, surprisal, kept_labels)`` of slices with ``shift`` and
    normaliser ``norm``: softmax, -log softmax (+inf on excluded classes) and
    the labels with the classes that ``where`` drops set to 0."""
    z, _ = nz.logits(None, x, t, mask, shift)
    probs = jnp.exp(z) / nz.select(norm.s == 0, 1.0, norm.s)
    surprisal = nz.select(z == -INF, INF + lax.stop_gradient(norm.log_s), norm.log_s - z)
    return probs, surprisal, _kept_labels(labels, mask)


def _probability_parts(axes, x, labels, t, mask, mean_z=False):
    """``(loss, shift, norm)``: sum_j l_j (log s - z_j) over the kept
    classes, with the slice's shift and normaliser (and ``norm.mean_z``
    when asked for)."""
    z, shift = nz.logits(axes, x, t, mask)
    norm = nz.normaliser(z, axes, mean_z)
    _, surprisal, kept = _probability_terms(x, labels, t, mask, shift, norm)
    terms = nz.select(kept == 0, 0.0, kept * surprisal)
    loss = nz.reduce(terms, axes, keepdims=False)
    nothing = jnp.squeeze(norm.s == 0, axes.axes)
    return nz.select(nothing, 0.0, loss), shift, norm


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _probability_cross_entropy(axes, x, labels, t, mask):
    """sum_j l_j (log s - z_j) over the kept classes. A zero label costs 0
    (0 log 0 = 0), a positive label on a class of probability 0 costs +inf
    (a negative one -inf); a slice with nothing included costs 0."""
    return _probability_parts(axes, x, labels, t, mask)[0]


def _probability_tangent(axes, x, labels, t, mask, shift, norm, dx, dlabels):
    """sum_j (L p_j - l_j) dx_j / t + sum_j (log s - z_j) dl_j over the
    included classes (L the kept label mass), from x and the per-slice shift
    and normaliser (checkpointed by the caller: no residual of x's shape)."""
    probs, surprisal, kept = _probability_terms(x, labels, t, mask, shift, norm)
    included = surprisal != INF
    out = jnp.zeros(norm.s.shape, norm.s.dtype)
    dz = nz.tangent_logits(nz.logits(None, x, t, mask, shift)[0], t, dx, None)
    if dz is not None:
        mass = nz.reduce(kept, axes)
        out = out + nz.reduce(nz.select(included, mass * probs - kept, 0.0) * dz, axes)
    if dlabels is not None:
        dl = dlabels if mask is None else nz.select(mask, dlabels, 0.0)
        out = out + nz.reduce(nz.select(included, surprisal, 0.0) * dl, axes)
    return jnp.squeeze(out, axes.axes)


def _probability_dt(axes, labels, t, mask, norm, loss):
    """d loss / dt = -sum_j (L p_j - l_j) z_j / t where the loss is finite,
    with sum_j l_j z_j = L log s - loss: one number per example (keepdims),
    computed in the forward pass (reverse mode in t keeps nothing of the
    logits' shape)."""
    mass = nz.reduce(_kept_labels(labels, mask), axes)
    infinite = jnp.expand_dims(jnp.isinf(loss), axes.axes)
    label_z = mass * norm.log_s - nz.select(infinite, 0.0, jnp.expand_dims(loss, axes.axes))
    dt = -(mass * norm.mean_z - label_z) * nz.inverse_temperature(t)
    # An infinite loss is a constant: its coefficient is 0, not inf or NaN.
    return nz.select(infinite, 0.0, dt)


@partial(_probability_cross_entropy.defjvp, symbolic_zeros=True)
def _probability_cross_entropy_jvp(axes, primals, tangents):
    """The derivative of :func:`_probability_tangent`; the derivative in a label on
    a class of probability 0 is taken as 0, and an infinite loss is a
    constant."""
    x, labels, t, mask = primals
    dx, dlabels, dt = (nz.tangent_value(v) for v in tangents[:3])
    loss, shift, norm = _probability_parts(axes, x, labels, t, mask, mean_z=dt is not None)
    out = jnp.zeros_like(loss)
    if dx is not None or dlabels is not None:
        tangent = jax.checkpoint(partial(_probability_tangent, axes), prevent_cse=False)
        out = out + tangent(x, labels, t, mask, shift, norm, dx, dlabels)
    if dt is not None:
        coefficient = _probability_dt(axes, labels, t, mask, norm, loss)
        out = out + jnp.squeeze(coefficient * dt, axes.axes)
    # 0 * out keeps a NaN of the example NaN.
    return loss, nz.select(jnp.isinf(loss), 0.0 * out, out)


def _smoothed(axes, labels, mask, alpha):
    """optax.smooth_labels: (1 - a) labels + a / K over the K kept classes."""
    return (1.0 - alpha) * labels + alpha * _kept_weights(axes, labels.shape, mask)


@partial(jax.jit, static_argnums=(5, 6))
def _probability_cross_entropy_jit(x, labels, where, t, alpha, axis, axis_name):
    name = "softmax_cross_entropy"
    result_dtype = promoted_dtype(x, labels)
    x, dtype, axes, mask, t = slice_args(name, x, axis, where, t, "logits", batch_where=True)
    if not broadcasts_to(labels.shape, x.shape):
        raise ValueError(
            f"{name}: labels of shape {labels.shape} do not broadcast to the logits' shape "
            f"{x.shape}; give one probability per logit (for class indices use "
            "softmax_cross_entropy_with_integer_labels)")
    dtype = compute_dtype(dtype)
    labels = jnp.broadcast_to(labels.astype(inexact_dtype(labels.dtype)).astype(dtype), x.shape)
    alpha = _smoothing(name, alpha, dtype)
    axes = nz.Axes(axes, axis_name)
    if alpha is not None:
        labels = _smoothed(axes, labels, mask, alpha)
    return _probability_cross_entropy(axes, x, labels, t, mask).astype(result_dtype)


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
    positional arguments, shapes and values), with the edge semantics of
    :func:`jsoftmax.log_softmax`.
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
        ``where``, exactly as ``optax.smooth_labels`` does. A Python or
        NumPy value out of range raises ValueError; one in a jax array gives NaN.
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
    args = _host_args("softmax_cross_entropy", logits, labels, where, temperature,
                      label_smoothing, "biufV")
    return _probability_cross_entropy_jit(*args, axis, axis_name)


# softmax_cross_entropy_with_integer_labels


def _target(axes, x, labels, mask, alpha):
    """The (smoothed) one-hot label weights w, built per element (a compare
    with the class index, not a scatter): optax.smooth_labels of the one-hot."""
    local, here, _ = label_index(axes.axis_name, x.shape[-1], labels)
    classes = lax.broadcasted_iota(local.dtype, x.shape, x.ndim - 1)
    onehot = ((classes == local[..., None]) & here[..., None]).astype(jnp.float32)
    if alpha is None:
        return onehot
    return (1.0 - alpha) * onehot + alpha * _kept_weights(axes, x.shape, mask)


def _kept_weights(axes, shape, mask):
    """1/K on each of the K classes ``where`` keeps, 0 elsewhere."""
    if mask is None:
        count = float(np.prod([shape[a] for a in axes.axes]))
        name = getattr(axes, "axis_name", None)
        count = count if name is None else count * lax.axis_size(name)
        # No classes: an empty array, whatever its fill.
        return jnp.full(shape, 1.0 / count if count else 0.0, jnp.float32)
    count = nz.reduce(mask.astype(jnp.float32), axes)
    return nz.select(mask, 1.0 / nz.select(count == 0, 1.0, count), 0.0)


def _integer_parts(axes, x, labels, t, mask, alpha, mean_z=False):
    """``(loss, x_y, z_y, valid, shift, norm, cross_entropy, smooth)``, with
    ``norm.mean_z`` when asked for.

    z_y is the label's logit by the same rule as every other logit
    (``_normalise.logits`` of the gathered entry), so log s - z_y is exact
    however far x_y lies below the max. Under ``axis_name`` the shard that
    holds a label's class contributes its logit through a psum.
    """
    local, here, valid = label_index(axes.axis_name, x.shape[-1], labels)
    index = nz.select(here, local, 0)[..., None]
    z, shift = nz.logits(axes, x, t, mask)
    smoothing = ()
    if alpha is not None:
        # optax.smooth_labels then the dense loss: (1 - a) CE + a mean(-log p)
        # over the kept classes, each term divided by K first (no overflow);
        # masked-out classes (z = -inf, weight 0) are absent. Summed in the
        # normaliser's pass over z.
        kept_z = z if mask is None else nz.select(mask, z, 0.0)
        smoothing = (kept_z * _kept_weights(axes, x.shape, mask),)
    norm = nz.normaliser(z, axes, mean_z, smoothing)
    x_y = jnp.take_along_axis(x, index, axis=-1)
    mask_y = None if mask is None else jnp.take_along_axis(mask, index, axis=-1)
    z_y, _ = nz.logits(None, x_y, t, mask_y, shift)
    # -inf for a label on an excluded class (no derivative; NaN with a NaN log s).
    log_p_y = nz.select(z_y == -INF, -INF - lax.stop_gradient(norm.log_s), z_y - norm.log_s)
    name = getattr(axes, "axis_name", None)
    if name is not None:
        z_y = lax.psum(nz.select(here[..., None], z_y, 0.0), name)
        log_p_y = lax.psum(nz.select(here[..., None], log_p_y, 0.0), name)
    cross_entropy = -log_p_y
    valid = valid[..., None]
    smooth = None
    loss = cross_entropy
    if alpha is not None:
        smooth = norm.log_s - norm.sums[0]
        # A term of weight 0 is absent (0 * inf counts as 0).
        loss = nz.select(alpha == 1, 0.0, (1.0 - alpha) * cross_entropy) + nz.select(
            alpha == 0, 0.0, alpha * smooth
        )
    loss = nz.select(norm.s == 0, 0.0, nz.select(valid, loss, jnp.nan))
    return loss, x_y, z_y, valid, shift, norm, cross_entropy, smooth


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _integer_cross_entropy(axes, x, labels, t, mask, alpha):
    """-log softmax(x / t)[label] = log s - z_y, per example (keepdims):
    +inf for a label on an excluded class, 0 for an example with nothing
    included, NaN for a label out of range; with smoothing optax's loss."""
    return _integer_parts(axes, x, labels, t, mask, alpha)[0]


def _integer_tangent(axes, x, labels, t, mask, alpha, shift, s, dx):
    """sum_j (p_j - w_j) dx_j / t over the included classes, from x and the
    per-example shift and normaliser (checkpointed by the caller,
    so reverse mode keeps no array of the logits' shape)."""
    z, _ = nz.logits(None, x, t, mask, shift)
    probs = jnp.exp(z) / nz.select(s == 0, 1.0, s)
    dz = nz.tangent_logits(z, t, dx, None)
    coefficient = nz.select(z == -INF, 0.0, probs - _target(axes, x, labels, mask, alpha))
    return nz.reduce(coefficient * dz, axes)


def _integer_dt(t, alpha, norm, z_y, smooth, loss, valid):
    """d loss / dt = -sum_j (p_j - w_j) z_j / t: sum_j w_j z_j is the label's
    logit, or with smoothing (1 - a) z_y plus a times the kept classes' mean
    logit (log s - smooth). One number per example, computed in the forward
    pass; 0 where the loss is a constant (infinite, nothing included, a
    label out of range), and a term of weight 0 is absent (0 * inf is 0)."""
    z_y = nz.select(jnp.isfinite(z_y), z_y, 0.0)
    target = z_y
    if alpha is not None:
        target = (1.0 - alpha) * z_y + nz.select(alpha == 0, 0.0, alpha * (norm.log_s - smooth))
    coefficient = -(norm.mean_z - target) * nz.inverse_temperature(t)
    constant = jnp.isinf(loss) | (norm.s == 0) | ~valid
    return nz.select(constant, 0.0, coefficient)


@partial(_integer_cross_entropy.defjvp, symbolic_zeros=True)
def _integer_cross_entropy_jvp(axes, primals, tangents):
    """d loss = sum_j (p_j - w_j) dz_j with w the (smoothed) one-hot labels,
    and d loss / da = smooth - CE; 0 where the loss is a constant limit."""
    x, labels, t, mask, alpha = primals
    dx, _, dt, _, dalpha = (nz.tangent_value(v) for v in tangents)
    loss, x_y, z_y, valid, shift, norm, cross_entropy, smooth = _integer_parts(
        axes, x, labels, t, mask, alpha, mean_z=dt is not None
    )
    out = jnp.zeros_like(loss)
    if dx is not None:
        tangent = jax.checkpoint(partial(_integer_tangent, axes), prevent_cse=False)
        out = out + tangent(x, labels, t, mask, alpha, shift, norm.s, dx)
    if dt is not None:
        # The coefficient of dt is a number per example, so that reverse mode
        # with respect to t keeps nothing of the logits' shape.
        out = out + _integer_dt(t, alpha, norm, z_y, smooth, loss, valid) * dt
    if dalpha is not None:
        out = out + nz.select(norm.s == 0, 0.0, smooth - cross_entropy) * dalpha
    # The loss is a constant where it is infinite, where the label's logit is
    # infinite and where the label is out of range; 0 * out there keeps a NaN
    # of the example NaN.
    moves = valid & jnp.isfinite(x_y) & ~jnp.isinf(loss)
    if getattr(axes, "axis_name", None) is not None:
        moves = valid & jnp.isfinite(cross_entropy) & ~jnp.isinf(loss)
    return loss, nz.select(moves, out, 0.0 * out)


@partial(jax.jit, static_argnums=(5, 6))
def _integer_cross_entropy_jit(x, labels, where, t, alpha, axis, axis_name):
    """The checks, the classes moved last and merged into one axis (in the
    order given: a label is a flat index into them), and the loss."""
    name = "softmax_cross_entropy_with_integer_labels"
    x, dtype, axes, mask, t = slice_args(name, x, axis, where, t, "logits", batch_where=True)
    if axis_name is not None and len(axes) != 1:
        raise ValueError(f"{name}: with axis_name the classes must be one axis (the sharded "
                         f"one); got axis={axis!r}")
    batch_shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    if labels.shape != batch_shape:
        raise ValueError(
            f"{name}: labels have shape {labels.shape} but the logits' batch shape is "
            f"{batch_shape} (logits shape {x.shape} without axis {axis}); give one class "
            "index per example")
    alpha = _smoothing(name, alpha, compute_dtype(dtype))
    x, mask, t = classes_last(axis, axes, x, mask, t)  # a temperature one per row
    axes = nz.Axes((x.ndim - 1,), axis_name)
    loss = _integer_cross_entropy(axes, x, widen_labels(labels), t, mask, alpha)
    return loss[..., 0].astype(dtype)


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
    edge, computed as log s - z_y on the shared logits so that no array of
    the logits' shape is kept for the backward pass (without smoothing). A label on a class that is
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
        ``where``. Out of range: ValueError, or NaN from a jax array.
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
    args = _host_args("softmax_cross_entropy_with_integer_labels", logits, labels, where,
                      temperature, label_smoothing, "iu")
    return _integer_cross_entropy_jit(*args, axis, axis_name)
