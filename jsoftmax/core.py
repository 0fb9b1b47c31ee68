"""softmax, log_softmax and logsumexp with temperature, masks and custom JVPs.

All three are built on one shifted-logits computation (``_shifted_logits``):
per slice, subtract the maximum over the included entries and divide by the
temperature, so that every exponent is <= 0 and the largest is exactly 0.
That makes ``exp`` unable to overflow and the normaliser at least 1, except in
a slice with nothing included, whose normaliser is 0 and which we define.

Excluded entries are those where ``where`` is False or the input is -inf.
The derivatives are custom JVP rules written from the outputs, so the forward
edge handling (selects, infinities) never leaks NaNs into the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax._checks import (
    Axis,
    as_real_array,
    broadcast_mask,
    canonicalize_axes,
    canonicalize_temperature,
    compute_dtype,
    upcast,
)

__all__ = ["log_softmax", "logsumexp", "softmax"]

_INF = float("inf")

# A mesh axis name, as jax.shard_map and lax.psum take it.
AxisName = Hashable


# --------------------------------------------------------------------------
# The shared forward computation.
# --------------------------------------------------------------------------


def _shifted_logits(axes, x, t, mask, keep=None):
    """Returns ``(y, x_max)``: ``y = (x - max) / t`` per slice, with limits.

    * excluded entries (``mask`` False or x == -inf) are -inf;
    * a slice whose max is +inf puts 0 on its +inf entries and -inf elsewhere
      (the limit of the softmax is uniform over them);
    * t == 0 puts 0 on the maxima (ties included) and -inf elsewhere;
    * t == inf puts 0 on every included entry;
    * a traced negative or NaN temperature gives NaN;
    * a NaN anywhere in a slice makes the slice's max, and so its result, NaN.

    ``keep`` (the nonzero weights of logsumexp) excludes entries from the max
    only; the caller drops them from the sum.
    """
    x = upcast(x)
    if mask is not None:
        x = jnp.where(mask, x, -_INF)
    candidates = x if keep is None else jnp.where(keep, x, -_INF)
    x_max = _max(candidates, axes)
    shift = jnp.where(jnp.isfinite(x_max), x_max, 0.0)
    diff = x - shift
    if t is None:
        y = jnp.where(x_max == _INF, jnp.where(x == _INF, 0.0, -_INF), diff)
        return y, x_max
    # diff / t is NaN for -inf / inf and for 0 / 0; both are fixed by the selects.
    # At t = inf every included entry is 0; diff * 0 keeps NaN entries NaN.
    y = jnp.where(t == _INF, jnp.where(diff == -_INF, -_INF, diff * 0.0), diff / t)
    y = jnp.where(x_max == _INF, -_INF, y)
    # The maxima are exactly 0 (0 / 0 at t = 0). For 0 < t < inf that value
    # is also diff / t; y - stop_gradient(y) keeps its derivative, which the
    # weighted logsumexp differentiates through these operations (a constant
    # 0 there made its second derivatives vanish at ties).
    moving = (t > 0) & (t < _INF) & (x_max < _INF)
    at_top = jnp.where(moving, y - lax.stop_gradient(y), 0.0)
    y = jnp.where((x == x_max) & (x_max > -_INF), at_top, y)
    # Added rather than selected: XLA:CPU (jax 0.10.2) returns garbage for exp
    # of a select whose other branch is a NaN constant.
    y = y + jnp.where(t >= 0, 0.0, jnp.nan)
    return y, x_max


def _safe_total(total):
    """The normaliser with 0 (a slice with nothing included) replaced by 1."""
    return jnp.where(total == 0, 1.0, total)


def _log_normalizer(y, axes):
    """Returns ``(log(total), total)`` for ``total = sum(exp(y))``.

    The entries at the maximum (y == 0) contribute exactly 1 each, so with
    ``top`` their count and ``below`` the rest, log(total) =
    log(top) + log1p(below / top). This keeps log_softmax's largest entry
    accurate to a few ulp when ``below`` is tiny (log(1 + 1e-10) is not 0).
    """
    at_top = y == 0
    top, below = _sum_pair(at_top.astype(y.dtype), jnp.where(at_top, 0.0, jnp.exp(y)), axes)
    safe_top = jnp.where(top == 0, 1.0, top)
    log_total = jnp.where(top == 0, jnp.log(below), jnp.log(safe_top) + jnp.log1p(below / safe_top))
    return log_total, top + below


def _inverse_temperature(t):
    """1 / t, with 1 / 0 taken as 0: the hard max does not move with x."""
    positive = t > 0
    return jnp.where(positive, 1.0 / jnp.where(positive, t, 1.0), 0.0)


def _value(tangent):
    """None for a symbolic-zero tangent, else the tangent in the compute dtype.

    A float16 / bfloat16 input has a tangent of its dtype; upcasting it once
    here keeps reverse mode to one rounding of the cotangent (several float32
    uses of a bfloat16 tangent each transpose to their own rounding).
    """
    if tangent is None or isinstance(tangent, SymbolicZero):
        return None
    return upcast(tangent)


def _sum(v, axes, keepdims=True):
    out = jnp.sum(v, axis=axes, keepdims=keepdims)
    name = getattr(axes, "axis_name", None)
    return out if name is None else lax.psum(out, name)


def _max(v, axes, keepdims=True):
    out = jnp.max(v, axis=axes, keepdims=keepdims, initial=-_INF)
    name = getattr(axes, "axis_name", None)
    return out if name is None else lax.pmax(out, name)


class _Reduction(tuple):
    """Reduced axes that also span a named mesh axis (vocab-parallel calls).

    A tuple of ints like the plain ``axes`` everywhere else; ``_max`` and
    ``_sum`` also reduce across the mesh axis ``axis_name`` with ``lax.pmax``
    and ``lax.psum`` (inside ``jax.shard_map``), and so do the custom JVP
    rules, which are written with ``_sum``. Equality and hash include the
    name, since the axes are a static jit argument.
    """

    def __new__(cls, axes, axis_name):
        self = super().__new__(cls, axes)
        self.axis_name = axis_name
        return self

    def __eq__(self, other):
        return tuple.__eq__(self, other) and self.axis_name == getattr(other, "axis_name", None)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((tuple(self), self.axis_name))

    def __reduce__(self):
        return _Reduction, (tuple(self), self.axis_name)


def _canonical_args(name, x, axis, where, temperature, arg="x"):
    """The checks every public function starts with: ``(array, output dtype,
    sorted axes, boolean mask or None, temperature or None)``.

    float16 and bfloat16 arrays stay as they are: the computations upcast them
    after taking the slice max in the input dtype (exact there), so that XLA
    reads the input once per pass instead of keeping a float32 copy.
    """
    arr, out_dtype = as_real_array(name, x, arg, keep_low_precision=True)
    axes = canonicalize_axes(name, axis, arr.ndim)
    mask = broadcast_mask(name, where, arr.shape)
    t = canonicalize_temperature(name, temperature, arr.shape, axes, compute_dtype(arr.dtype))
    return arr, out_dtype, axes, mask, t


def _reduction(axes, axis_name):
    """``axes`` as they are, or with the mesh axis ``axis_name`` added."""
    return axes if axis_name is None else _Reduction(axes, axis_name)


def _sum_pair(a, b, axes):
    """Sums of ``a`` and ``b`` over ``axes`` (keepdims) in one variadic reduce.

    Two separate sums make XLA materialise the exponentials for the backward
    pass (an input-sized temporary); one reduce with two outputs fuses.
    """
    zero = jnp.zeros((), a.dtype)
    sum_a, sum_b = jax.lax.reduce(
        (a, b), (zero, zero), lambda u, v: (u[0] + v[0], u[1] + v[1]), tuple(axes)
    )
    sums = jnp.expand_dims(sum_a, tuple(axes)), jnp.expand_dims(sum_b, tuple(axes))
    name = getattr(axes, "axis_name", None)
    return sums if name is None else lax.psum(sums, name)


# --------------------------------------------------------------------------
# The fast path: no temperature, no mask, no logsumexp weights.
#
# XLA on CPU compiles max, subtract, exp, sum and divide over a slice into one
# fused kernel, but a compare or select anywhere in that chain splits it into
# several passes over memory (1.2-5x slower than jax.nn). These helpers give
# the results of ``_shifted_logits`` and ``_log_normalizer`` for t = 1 and no
# mask with only min, max, sign and arithmetic per element.
# --------------------------------------------------------------------------


def _nan_if_inf(total):
    """0, or NaN where a slice total is infinite (or NaN).

    XLA's fused CPU kernel computes min(NaN, c) as c, so the min in
    ``_plain_logits`` can turn a NaN entry into a huge finite logit; on a slice
    whose max is finite its exp is then +inf, which no ordinary slice can sum
    to (each term is at most 1). Adding this per-slice term makes such a slice
    NaN again. (A NaN in a slice whose max is +inf looks like one more +inf
    entry there; only the general path tells them apart.)
    """
    return total - total


def _plain_logits(axes, x, exclude=True):
    """``(y, x_max)`` with ``y = _shifted_logits(axes, x, None, None)[0]``.

    The shift is the slice max clamped to the finite range, so that a slice of
    -inf gives -inf - (-big) = -inf rather than NaN. On a slice whose max is
    +inf, x is first halved: +inf -> min(+inf, big) - big = 0, while a finite
    entry lands at or below -big / 2 (exp gives 0); ``exclude`` then sends those
    entries to -inf by a factor 4. Elsewhere y = x - max exactly.
    """
    # Everything downstream is invariant to the shift, so it carries no
    # derivative (differentiating the fast JVP twice would otherwise need one
    # of max and, across devices, of pmax, which has none).
    # The max is exact in any dtype; taken before the upcast (see _canonical_args).
    x_max = upcast(_max(lax.stop_gradient(x), axes))
    return _plain_logits_given_max(upcast(x), x_max, exclude), x_max


def _plain_logits_given_max(x, x_max, exclude=True):
    """The logits of ``_plain_logits`` for entries ``x`` of slices whose max is
    ``x_max`` (broadcastable: also one entry per slice, e.g. a label's)."""
    big = jnp.finfo(x.dtype).max
    finite_max = big / jnp.maximum(x_max, big)  # 0 where the max is +inf, else 1
    # Two mins, not min(max(..)): XLA would make a clamp, which its fusion rejects.
    shift = -jnp.minimum(-jnp.minimum(x_max, big), big)
    y = jnp.minimum(x * (0.5 + 0.5 * finite_max), big) - shift
    return y * (4.0 - 3.0 * finite_max) if exclude else y


def _plain_softmax_parts(axes, x):
    """``(exp(y), normalizer, x_max, total)``: softmax = exp(y) / normalizer, where
    the normalizer is the slice total, 1 for a slice with nothing included,
    and NaN for a slice with a NaN (see ``_nan_if_inf``)."""
    y, x_max = _plain_logits(axes, x, exclude=False)
    unnormalized = jnp.exp(y)
    total = _sum(unnormalized, axes)
    return unnormalized, jnp.maximum(total, 1.0) + _nan_if_inf(total), x_max, total


# XLA:CPU (jax 0.10.2) compiles the two sums of ``_plain_log_normalizer``
# into one kernel on slices of up to about 1024 entries. On longer slices it
# keeps exp(y) in memory for them (16-31 MiB on the benchmark's shapes), unless
# the count at the top is taken without exp: 1.3-1.6x jax.nn's time instead
# of 2.2-2.8x at 2048-32000 entries, but 1.5x instead of 1.3x at 1024.
_LONG_SLICE = 1024


def _plain_log_normalizer(axes, y, long_slice=False):
    """``(log_total, total)`` as ``_log_normalizer(y, axes)``, without selects.

    y <= 0, so exp(y) is exactly 1 at the maximum and floor(exp(y)) counts the
    entries there. (An entry within 2^-24 of the max also counts, which moves
    the total by less than one rounding.) A slice with nothing included has
    log_total = log 1 + log1p(0) = 0.

    With ``long_slice`` the count is max(1 + y 2^126, 0) instead: 1 where
    y == 0 and 0 where y <= -2^-126 (a smaller difference is flushed to 0),
    and ``below`` subtracts the same indicator, written with other constants
    so that XLA shares no input-sized expression between the two sums (see
    ``_LONG_SLICE``). Either way top + below splits exp(y) exactly.
    """
    if long_slice:
        top = _sum(jnp.maximum(1.0 + y * 2.0**126, 0.0), axes)
        below = _sum(jnp.exp(y) - jnp.maximum(2.0 + y * 2.0**127, -0.0) * 0.5, axes)
    else:
        unnormalized = jnp.exp(y)
        at_top = jnp.floor(unnormalized)
        top = _sum(at_top, axes)
        below = _sum(unnormalized - at_top, axes)
    safe_top = jnp.maximum(top, 1.0)
    return jnp.log(safe_top) + jnp.log1p(below / safe_top), top + below


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _softmax(axes, x, t, mask):
    if t is None and mask is None:
        unnormalized, normalizer, _, _ = _plain_softmax_parts(axes, x)
        return unnormalized / normalizer
    y, _ = _shifted_logits(axes, x, t, mask)
    unnormalized = jnp.exp(y)
    return unnormalized / _safe_total(_sum(unnormalized, axes))


def _softmax_jvp(axes, primals, tangents):
    x, t, mask = primals
    dx, dt, _ = tangents
    probs = _softmax(axes, x, t, mask)
    return probs, _softmax_tangent(axes, probs, t, _value(dx), _value(dt))


_softmax.defjvp(_softmax_jvp, symbolic_zeros=True)


def _softmax_tangent(axes, probs, t, dx, dt):
    """d softmax = s * (dz - sum(s * dz)) with dz = (dx - log(s) dt) / t.

    The temperature term uses shift invariance: z = x / t and log s differ by
    a per-slice constant, which the centring removes. Wrapped in
    ``jax.checkpoint`` so that reverse mode keeps only ``probs`` as residual.
    """

    def tangent(probs, t, dx, dt):
        u = jnp.zeros_like(probs) if dx is None else dx
        if dt is not None:
            positive = probs > 0
            log_probs = jnp.where(positive, jnp.log(jnp.where(positive, probs, 1.0)), 0.0)
            u = u - log_probs * dt
        out = probs * (u - _sum(probs * u, axes))
        return out if t is None else out * _inverse_temperature(t)

    return jax.checkpoint(tangent, prevent_cse=False)(probs, t, dx, dt)


_softmax_jit = jax.jit(_softmax, static_argnums=0)


def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Softmax with temperature and mask, defined at every edge.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp((x_i - m) / t)}{\sum_j \exp((x_j - m) / t)},
        \quad m = \max_j x_j

    Excluded entries (``where`` False, or ``x == -inf``) get probability 0 and
    zero derivatives. A slice with every entry excluded is all zeros (with
    zero gradients), never NaN. Entries equal to +inf share the mass of their
    slice equally. A NaN makes its slice NaN and leaves the others alone.
    float16 and bfloat16 are computed in float32 and returned in their own
    dtype; integers promote to the default float dtype.

    Args:
      x: input logits.
      axis: the axis or axes to normalise over: an int, a tuple of ints, or
        None for all axes.
      where: optional boolean mask broadcastable to ``x``; False excludes.
      temperature: t >= 0, a scalar or an array broadcastable to the batch
        shape (``x``'s shape without ``axis``), one temperature per slice.
        ``t = 0`` is the hard max (one-hot on the argmax, ties shared),
        ``t = inf`` is uniform over the included entries. Differentiable.
      axis_name: name of a mesh axis (inside ``jax.shard_map``) over which
        the normalised axis is also sharded: each shard holds a slice of the
        classes, and the maximum and the sums become ``lax.pmax`` and
        ``lax.psum`` over it, so the result (and its derivatives) equals the
        unsharded call on the concatenated array. Differentiating needs
        ``check_vma=True`` (shard_map's default).

    Returns:
      An array of ``x``'s shape and (floating) dtype whose slices sum to 1,
      or to 0 where every entry is excluded.

    Examples:
      >>> import jsoftmax
      >>> jsoftmax.softmax(jnp.array([10.0, 2.0, 10000.0, 4.0]))
      Array([0., 0., 1., 0.], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([1.0, 1.0, 0.0]), temperature=0.0)
      Array([0.5, 0.5, 0. ], dtype=float32)
    """
    arr, out_dtype, axes, mask, t = _canonical_args("softmax", x, axis, where, temperature)
    return _softmax_jit(_reduction(axes, axis_name), arr, t, mask).astype(out_dtype)


# --------------------------------------------------------------------------
# log_softmax
# --------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_softmax(axes, x, t, mask):
    if t is None and mask is None:
        y, _ = _plain_logits(axes, x)
        # Forward only: in reverse mode the exp-free count measured 1.2-2.6x
        # slower than the floor count (XLA then keeps more input-sized arrays).
        long_slice = math.prod(y.shape[a] for a in axes) > _LONG_SLICE
        return y - _plain_log_normalizer(axes, y, long_slice)[0]
    y, _ = _shifted_logits(axes, x, t, mask)
    log_total, total = _log_normalizer(y, axes)
    return y - jnp.where(total == 0, 0.0, log_total)


def _log_softmax_jvp(axes, primals, tangents):
    x, t, mask = primals
    dx, dt, _ = tangents
    if t is None and mask is None:
        y, _ = _plain_logits(axes, x)
        log_total = _plain_log_normalizer(axes, y)[0]
        return y - log_total, _plain_log_softmax_tangent(axes, y, log_total, _value(dx))
    log_probs = _log_softmax(axes, x, t, mask)
    return log_probs, _log_softmax_tangent(axes, log_probs, t, _value(dx), _value(dt))


def _plain_log_softmax_tangent(axes, y, log_total, dx):
    """The fast path's d log_softmax = dx - sum(softmax * dx), from ``y`` (the
    single input-sized residual) and the per-slice ``log_total``.

    With e = exp(y) (exactly 1 at the max) and q = 1 - 1/total = -expm1(-log_total),
    sum(softmax * dx) = sum(e * dx) - sum(q e * dx). Kept as two sums, reverse
    mode gives the cotangent (g - e G) + q e G: the cancellation at the max
    happens before the small term is added, so a component like
    1 - softmax_max ~ 5.6e-17 (float64) survives instead of rounding to 0. The
    order of the two sums below fixes that order of accumulation. Excluded
    entries (y = -inf) are masked as in ``_log_softmax_tangent``.
    """
    if dx is None:
        return jnp.zeros_like(y)

    def tangent(y, log_total, dx):
        unnormalized = jnp.exp(y)
        q = -jnp.expm1(-log_total)
        small = _sum((q * unnormalized) * dx, axes)  # first here, added last in reverse
        moment = _sum(unnormalized * dx, axes)
        # 1 where y is finite, 0 where y = -inf, without a select (which XLA's
        # fused CPU kernel rejects): a finite y is at least -max, so
        # y * tiny lies in [-4, 0], while -inf stays -inf and is clipped to -9.
        tiny = jnp.finfo(y.dtype).tiny
        included = jnp.minimum(jnp.maximum(y * tiny, -9.0) + 9.0, 1.0)
        return ((dx - moment) + small) * included

    return jax.checkpoint(tangent, prevent_cse=False)(y, log_total, dx)


_log_softmax.defjvp(_log_softmax_jvp, symbolic_zeros=True)


def _log_softmax_tangent(axes, log_probs, t, dx, dt):
    """d log_softmax = dz - sum(softmax * dz), zero on excluded entries.

    Computing sum(s * dz) from s = exp(log_probs) keeps gradient components
    far below eps (s_j * dz_j is tiny, not lost in 1 - s_i). Checkpointed so
    reverse mode keeps only ``log_probs``.
    """

    def tangent(log_probs, t, dx, dt):
        probs = jnp.exp(log_probs)
        included = log_probs != -_INF
        u = jnp.zeros_like(log_probs) if dx is None else dx
        if dt is not None:
            u = u - jnp.where(included, log_probs, 0.0) * dt
        out = u - _sum(probs * u, axes)
        if t is not None:
            out = out * _inverse_temperature(t)
        # Mask last: a -inf cotangent on an excluded entry must meet a select,
        # not a multiplication (0 * -inf is NaN in second-order reverse mode).
        return jnp.where(included, out, 0.0)

    return jax.checkpoint(tangent)(log_probs, t, dx, dt)


_log_softmax_jit = jax.jit(_log_softmax, static_argnums=0)


def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Log-softmax with temperature and mask, computed without ``log(softmax)``.

    .. math::
        \mathrm{log\_softmax}(x)_i = \frac{x_i - m}{t}
            - \log \sum_j \exp\left(\frac{x_j - m}{t}\right), \quad m = \max_j x_j

    Excluded entries (``where`` False, or ``x == -inf``) are -inf with zero
    derivatives; a fully excluded slice is all -inf with zero gradients.
    ``t = 0`` gives 0 on the argmax (``-log k`` for a k-way tie) and -inf
    elsewhere. Dtype rules as in :func:`softmax`.

    Args:
      x: input logits.
      axis: the axis or axes to normalise over: an int, a tuple of ints, or None.
      where: optional boolean mask broadcastable to ``x``; False excludes.
      temperature: t >= 0, scalar or one per slice (see :func:`softmax`).
      axis_name: mesh axis over which ``axis`` is also sharded (see
        :func:`softmax`).

    Returns:
      An array of ``x``'s shape and (floating) dtype with values in [-inf, 0].

    Examples:
      >>> import jsoftmax
      >>> jsoftmax.log_softmax(jnp.array([10.0, 2.0, 10000.0, 4.0]))
      Array([-9990., -9998.,     0., -9996.], dtype=float32)
    """
    arr, out_dtype, axes, mask, t = _canonical_args("log_softmax", x, axis, where, temperature)
    return _log_softmax_jit(_reduction(axes, axis_name), arr, t, mask).astype(out_dtype)


# --------------------------------------------------------------------------
# logsumexp
# --------------------------------------------------------------------------


def _logsumexp_parts(axes, x, t, mask, b):
    """Returns ``(lse, sign, weights)`` with keepdims, where
    ``weights = exp(x / t) / sum(b * exp(x / t))`` (the derivative in ``b``
    divided by t; softmax is ``b * weights``). The general path: with no
    temperature, mask or weights ``_logsumexp`` takes ``_plain_logsumexp``."""
    keep = None if b is None else b != 0
    x = upcast(x)
    y, x_max = _shifted_logits(axes, x, t, mask, keep)
    # One plain sum: lse is dominated by x_max or by an O(1) log, so log1p buys
    # no accuracy here, and a single reduction lets XLA fuse the backward pass.
    unnormalized = jnp.exp(y)
    weighted = unnormalized if b is None else jnp.where(keep, b * unnormalized, 0.0)
    total = _sum(weighted, axes)
    log_total = jnp.log(jnp.abs(total))
    if t is None:
        lse = x_max + log_total
    else:
        # t * log(total) -> 0 as t -> inf only when exactly one unit of weight
        # is left; then the limit is the weighted mean of the included entries.
        unit_at_inf = jnp.isinf(t) & (jnp.abs(total) == 1)
        scaled = jnp.where(unit_at_inf, 0.0, t * log_total)
        lse = jnp.where(total == 0, -_INF, x_max + scaled)
        if b is not None:
            mean = _sum(jnp.where(weighted != 0, weighted * x, 0.0), axes) / _safe_total(total)
            lse = jnp.where(unit_at_inf, mean, lse)
    return lse, jnp.sign(total), unnormalized / _safe_total(total)


def _plain_logsumexp(axes, x):
    """``(lse, sign)`` for t = 1, no mask and no weights, without derivatives.

    The operations of ``jax.nn.logsumexp``: one max, one sum of exp(x - shift)
    with the shift replaced by 0 on a slice whose max is not finite (a select
    on the per-slice max, which XLA:CPU keeps out of the fused exp-and-sum
    kernel). Every edge then follows from the arithmetic: a slice of -inf sums
    to 0 (lse -inf, sign 0), an entry of +inf makes the sum +inf, and a NaN
    makes it NaN (also next to a +inf, where the fast path's clamped logits
    cannot tell them apart).
    """
    # Reduced without keepdims, as jax.nn does: XLA:CPU then keeps one per-slice
    # temporary fewer.
    x_max = upcast(_max(x, axes, keepdims=False))
    shift = jnp.where(jnp.isfinite(x_max), x_max, 0.0)
    total = _sum(jnp.exp(upcast(x) - jnp.expand_dims(shift, axes)), axes, keepdims=False)
    return jnp.expand_dims(shift + jnp.log(total), axes), jnp.expand_dims(jnp.sign(total), axes)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _logsumexp(axes, x, t, mask, b):
    if t is None and mask is None and b is None:
        return _plain_logsumexp(axes, x)
    lse, sign, _ = _logsumexp_parts(axes, x, t, mask, b)
    return lse, sign


def _logsumexp_jvp(axes, primals, tangents):
    x, t, mask, b = primals
    dx, dt, _, db = (_value(v) for v in tangents)
    if b is None:
        # Through the custom rules (higher derivatives stay finite at the edges).
        lse, sign = _logsumexp(axes, x, t, mask, None)
        probs = weights = _softmax(axes, x, t, mask)
    else:
        # Second derivatives in b go through these primitive operations.
        lse, sign, weights = _logsumexp_parts(axes, x, t, mask, b)
        probs = b * weights
    dlse = _logsumexp_tangent(axes, probs, weights, t, b, dx, dt, db)
    return (lse, sign), (dlse, jnp.zeros_like(sign))


_logsumexp.defjvp(_logsumexp_jvp, symbolic_zeros=True)


def _logsumexp_tangent(axes, probs, weights, t, b, dx, dt, db):
    """d lse = sum(s * dx) - sum(s * log|w|) dt + t * sum(w * db).

    The temperature term is the derivative of t * lse(x / t) in t, which is
    lse(x / t) - sum(s * x / t) = -sum(s * log|w|) (the entropy when b = 1).
    """

    def tangent(probs, weights, t, dx, dt, db):
        out = jnp.zeros(probs.shape[:0], probs.dtype)
        if dx is not None:
            out = out + _sum(probs * dx, axes)
        if dt is not None:
            nonzero = probs != 0
            log_w = jnp.log(jnp.abs(jnp.where(nonzero, weights, 1.0)))
            out = out - _sum(jnp.where(nonzero, probs * log_w, 0.0), axes) * dt
        if db is not None:
            scale = 1.0 if t is None else t
            out = out + scale * _sum(weights * db, axes)
        keep_shape = tuple(1 if i in axes else n for i, n in enumerate(probs.shape))
        return jnp.broadcast_to(out, keep_shape)

    if b is None:
        return jax.checkpoint(lambda p, t, dx, dt: tangent(p, p, t, dx, dt, None))(
            probs, t, dx, dt
        )
    return tangent(probs, weights, t, dx, dt, db)


_logsumexp_jit = jax.jit(_logsumexp, static_argnums=0)


def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    axis_name: AxisName | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log of the sum of exponentials; with temperature, the smooth maximum.

    .. math::
        \mathrm{lse}_t(a) = t \log \sum_i b_i \exp(a_i / t)
            = m + t \log \sum_i b_i \exp((a_i - m) / t)

    Matches :func:`jax.nn.logsumexp` on every argument. As ``t -> 0`` it is the
    (masked) maximum, which ``t = 0`` returns exactly; ``t = inf`` is +inf when
    more than one unit of weight is included. A slice with every entry
    excluded gives -inf (sign 0) and zero gradients. Without ``return_sign``
    a negative sum gives NaN, as in ``jax.nn``.

    Args:
      a: input array.
      axis: axis or axes to reduce: an int, a tuple of ints, or None (all).
      b: optional weights broadcastable to ``a``; may be negative.
      keepdims: keep the reduced axes with size 1.
      return_sign: also return the sign of the sum; the first output is then
        the log of its absolute value.
      where: optional boolean mask broadcastable to ``a``; False excludes.
      temperature: t >= 0, scalar or one per slice (see :func:`softmax`).
      axis_name: mesh axis over which ``axis`` is also sharded (see
        :func:`softmax`); ``b`` and ``where`` are sharded like ``a``.

    Returns:
      The reduced array, or ``(lse, sign)`` with ``return_sign=True``.

    Examples:
      >>> import jsoftmax
      >>> jsoftmax.logsumexp(jnp.array([0.0, 0.0]))
      Array(0.6931472, dtype=float32)
      >>> jsoftmax.logsumexp(jnp.array([1.0, 3.0, 2.0]), temperature=0.0)
      Array(3., dtype=float32)
    """
    arr, out_dtype, axes, mask, t = _canonical_args("logsumexp", a, axis, where, temperature, "a")
    weights = None
    if b is not None:
        weights, _ = as_real_array("logsumexp", b, "b")
        try:
            weights = jnp.broadcast_to(weights.astype(compute_dtype(arr.dtype)), arr.shape)
        except ValueError as err:
            raise ValueError(
                f"logsumexp: b has shape {weights.shape}, which does not broadcast to a's "
                f"shape {arr.shape}; give weights of a's shape"
            ) from err
    lse, sign = _logsumexp_jit(_reduction(axes, axis_name), arr, t, mask, weights)
    if not return_sign and weights is not None:  # without b the sum is never negative
        lse = jnp.where(sign < 0, jnp.nan, lse)
    if not keepdims:
        lse, sign = jnp.squeeze(lse, axes), jnp.squeeze(sign, axes)
    lse, sign = lse.astype(out_dtype), sign.astype(out_dtype)
    return (lse, sign) if return_sign else lse
