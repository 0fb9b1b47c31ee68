"""softmax, log_softmax and logsumexp with temperature, masks and custom JVPs.

Each public function checks its concrete arguments and calls one jitted
implementation, which checks shapes and dtypes once per trace and calls a
short primal over the per-slice logits of ``jsoftmax._normalise`` (z =
(x - max) / t, every limit defined there), with its JVP rule directly below.
Excluded entries are those where ``where`` is False or the input is -inf.
The rules are written from z and the normaliser, so the edge handling of the
forward pass never leaks NaNs into the derivatives.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _normalise as nz
from jsoftmax._checks import Axis, compute_dtype, host_args, is_traced, promoted_dtype, slice_args
from jsoftmax._normalise import INF, AxisName

__all__ = ["log_softmax", "logsumexp", "softmax"]


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
        A negative or NaN Python or NumPy value raises ValueError; in a jax
        array (traced or not, which is never read back to the host) it makes
        its slices NaN.
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
    return _softmax_jit(*host_args("softmax", x, where, temperature), axis, axis_name)


@partial(jax.jit, static_argnums=(3, 4))
def _softmax_jit(x, where, t, axis, axis_name):
    x, dtype, axes, mask, t = slice_args("softmax", x, axis, where, t)
    return nz.softmax(nz.Axes(axes, axis_name), x, t, mask).astype(dtype)


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
    return _log_softmax_jit(*host_args("log_softmax", x, where, temperature), axis, axis_name)


@partial(jax.jit, static_argnums=(3, 4))
def _log_softmax_jit(x, where, t, axis, axis_name):
    x, dtype, axes, mask, t = slice_args("log_softmax", x, axis, where, t)
    return nz.log_softmax(nz.Axes(axes, axis_name), x, t, mask).astype(dtype)


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

    Matches :func:`jax.nn.logsumexp` on every argument, in value and dtype;
    its derivative in ``b_i``, ``t exp(a_i / t) / sum_j b_j exp(a_j / t)``,
    holds also where ``b_i = 0`` (jax.nn gives 0 there). As ``t -> 0`` it is the
    (masked) maximum, which ``t = 0`` returns exactly; ``t = inf`` is +inf when
    more than one unit of weight is included. A slice with every entry
    excluded gives -inf (sign 0) and zero gradients. Without ``return_sign``
    a negative sum gives NaN, as in ``jax.nn``.

    Args:
      a: input array.
      axis: axis or axes to reduce: an int, a tuple of ints, or None (all).
      b: optional weights that broadcast against ``a`` (the result takes the
        broadcast shape, as in jax.nn); may be negative; bool is 0 / 1.
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
    a, where, t = host_args("logsumexp", a, where, temperature, "a")
    # A Python number stays one: it is weakly typed in the result dtype.
    b = b if isinstance(b, jax.Array | np.ndarray | int | float | None) else np.asarray(b)
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
        return _complex_logsumexp(a, axis, b, keepdims, return_sign, where, temperature, axis_name)
    return _logsumexp_jit(a, where, t, b, axis, axis_name, keepdims, return_sign)


@partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _logsumexp_jit(x, where, t, b, axis, axis_name, keepdims, return_sign):
    promoted = None if b is None else promoted_dtype(x, b)
    if b is not None:  # a and b broadcast against each other, as in jax.nn
        try:
            shape = np.broadcast_shapes(jnp.shape(x), jnp.shape(b))
        except ValueError as err:
            raise ValueError(f"logsumexp: b has shape {jnp.shape(b)}, which does not broadcast "
                             f"against a's shape {x.shape}; give weights that broadcast with a"
                             ) from err
        x, b = jnp.broadcast_to(x, shape), jnp.broadcast_to(b, shape)
    x, dtype, axes, mask, t = slice_args("logsumexp", x, axis, where, t, "a")
    if b is not None:
        if not jnp.issubdtype(promoted, jnp.floating):
            raise TypeError(f"logsumexp: b has dtype {b.dtype}, which is not a real number "
                            "type; cast it first, e.g. b.astype(jnp.float32)")
        dtype, b = promoted, jnp.asarray(b).astype(compute_dtype(promoted))
    lse, sign = _logsumexp(nz.Axes(axes, axis_name), x, t, mask, b)
    if not return_sign and b is not None:  # without b the sum is never negative
        # A select over a NaN constant; jax.nn wraps it the same way (jax-ml/jax#7634).
        with jax.debug_nans(False):
            lse = nz.select(sign < 0, jnp.nan, lse)
    if not keepdims:
        lse, sign = jnp.squeeze(lse, axes), jnp.squeeze(sign, axes)
    lse, sign = lse.astype(dtype), sign.astype(dtype)
    return (lse, sign) if return_sign else lse


def _logsumexp_parts(axes, x, t, mask, b):
    """``(lse, sign, z, s, shift)``, keepdims: s = sum(b exp(z)) and
    lse = shift + t log|s|, with its limits. Entries with b = 0 are excluded,
    from the max too, as in ``jax.nn.logsumexp``."""
    if b is not None:
        mask = (b != 0) if mask is None else mask & (b != 0)
    z, shift = nz.logits(axes, x, t, mask)
    e = jnp.exp(z)
    s = nz.reduce(e if b is None else b * e, axes)
    lse = nz.log_sum(shift, s, t)
    if t is not None and b is not None:
        # With one unit of weight left, the limit at t = inf is the weighted
        # mean of the included entries (the shift when b = 1).
        unit_at_inf = (t == INF) & (jnp.abs(s) == 1)
        x = nz.select(mask, x, 0.0).astype(s.dtype)
        mean = nz.reduce(b * x, axes) / nz.select(s == 0, 1.0, s)
        lse = nz.select(unit_at_inf, mean, lse)
    return lse, jnp.sign(s), z, s, shift


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _logsumexp(axes, x, t, mask, b):
    if t is None and b is None:
        return nz.untempered_log_sum(axes, x, mask)
    return _logsumexp_parts(axes, x, t, mask, b)[:2]


@partial(_logsumexp.defjvp, symbolic_zeros=True)
def _logsumexp_jvp(axes, primals, tangents):
    """d lse = sum(P dx) + (log|s| - sum(P z)) dt + t sum(exp(z) / s db),
    with P = b exp(z) / s the weighted softmax.

    The dt term is the derivative of t lse(x / t) in t, the entropy of P when
    b = 1; log s is then taken to full accuracy, since the entropy of a
    confident slice is mostly the part of log s below an ulp of 1.
    """
    x, t, mask, b = primals
    dx, dt, _, db = (nz.tangent_value(v) for v in tangents)
    lse, sign, z, s, shift = _logsumexp_parts(axes, x, t, mask, b)
    safe_s = nz.select(s == 0, 1.0, s)
    weights = jnp.exp(z) / safe_s
    probs = weights if b is None else b * weights
    out = jnp.zeros_like(lse)
    if dx is not None:
        out = out + nz.reduce(probs * dx, axes)
    if dt is not None:
        if b is None:
            entropy = nz.normaliser(z, axes, mean_z=True, split=True).entropy
        else:
            # z is -inf exactly where P is 0: a product with 0 there, not a
            # select after it (whose cotangent would meet 0 * -inf).
            entropy = jnp.log(jnp.abs(safe_s)) - nz.reduce(
                probs * nz.select(z == -INF, 0.0, z), axes)
            entropy = nz.select(s == 0, 0.0, entropy)
        out = out + entropy * dt
    if db is not None:
        # d lse / d b_i = t exp((x_i - shift) / t) / s, also where b_i = 0.
        diff = (x.astype(s.dtype) - shift) * (1.0 if t is None else nz.inverse_temperature(t))
        w_all = jnp.exp(diff if mask is None else nz.select(mask, diff, -INF))
        out = out + (1.0 if t is None else t) * nz.reduce(w_all * db, axes) / safe_s
    return (lse, sign), (out, jnp.zeros_like(sign))


def _complex_logsumexp(a, axis, b, keepdims, return_sign, where, temperature, axis_name):
    """Complex inputs: the edge contract is for real logits, so these are
    computed as jax.nn.logsumexp computes them (t = 1 on one device)."""
    if axis_name is not None or not (
        not is_traced(temperature) and np.all(np.asarray(temperature) == 1)
    ):
        raise TypeError(
            "logsumexp: complex inputs take neither temperature nor axis_name; "
            "pass real logits for those")
    return jax.nn.logsumexp(a, axis, b, keepdims, return_sign, where)
