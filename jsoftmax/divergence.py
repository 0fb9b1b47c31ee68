"""Entropy and KL divergence of softmax distributions given by their logits.

Both take logits, not probabilities, so that excluded entries (``where``
False, or -inf) are exactly 0 probability and contribute exactly 0, where
``-sum(p * log p)`` meets 0 * -inf. They are built on the shared logits of
``jsoftmax._normalise`` and have custom JVP rules that are exact and NaN-free
to second order.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _normalise as nz
from jsoftmax._checks import Axis, host_args, inexact_dtype, slice_args
from jsoftmax._normalise import INF, AxisName

__all__ = ["entropy", "kl_divergence"]


def _finite(v: jax.Array) -> jax.Array:
    """``v`` with -inf replaced by 0: the log-probability of an excluded
    entry, made safe to multiply by its probability 0 (in both directions)."""
    return nz.select(v == -INF, 0.0, v)


# entropy


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _entropy(axes, x, t, mask):
    z, _ = nz.logits(axes, x, t, mask)
    # log s split at the maxima: the entropy of a confident slice is mostly
    # the part of log s below an ulp of 1.
    return nz.normaliser(z, axes, mean_z=True, split=True).entropy


@partial(_entropy.defjvp, symbolic_zeros=True)
def _entropy_jvp(axes, primals, tangents):
    """dH = -sum p (z - sum(p z)) dz, with dz = (dx - z dt) / t.

    Written with z - sum(p z), not the equal log p + H: that difference of
    two numbers near log k cancels where k entries tie at the top. Checkpointed
    on x: reverse mode keeps no array of its own of x's shape.
    """
    x, t, mask = primals
    z, shift = nz.logits(axes, x, t, mask)
    norm = nz.normaliser(z, axes, mean_z=True, split=True)
    h = norm.entropy
    dx, dt = nz.tangent_value(tangents[0]), nz.tangent_value(tangents[1])
    if dx is None and dt is None:
        return h, jnp.zeros_like(h)
    tangent = jax.checkpoint(_entropy_tangent, static_argnums=(0,))
    return h, tangent(axes, x, t, mask, shift, norm.log_s, norm.mean_z, dx, dt)


def _entropy_tangent(axes, x, t, mask, shift, log_s, mean_z, dx, dt):
    z, _ = nz.logits(axes, x, t, mask, shift)
    # p is 0 where z is -inf, and the finite stand-in keeps 0 * -inf out.
    spread = jnp.exp(z - log_s) * (_finite(z) - mean_z)
    return -nz.reduce(spread * nz.tangent_logits(z, t, dx, dt), axes)


@partial(jax.jit, static_argnums=(3, 4))
def _entropy_jit(x, where, t, axis, axis_name):
    x, dtype, axes, mask, t = slice_args("entropy", x, axis, where, t, "logits")
    h = _entropy(nz.Axes(axes, axis_name), x, t, mask)
    return jnp.squeeze(h, axes).astype(dtype)


def entropy(
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""The Shannon entropy (in nats) of ``softmax(logits, axis, where, temperature=t)``.

    .. math::
        H = -\sum_i p_i \log p_i = \log s - \sum_i p_i z_i, \qquad
        z_i = (x_i - m) / t, \quad s = \sum_j \exp z_j, \quad p_i = \exp(z_i) / s

    Excluded entries (``where`` False, or -inf logits: masked actions) have
    probability 0 and contribute exactly 0, with zero derivatives; a slice
    with every entry excluded has entropy 0 and zero gradients. k entries at
    +inf give log k; ``t = 0`` gives log(number of maxima); ``t = inf`` gives
    log(number of included entries). A NaN makes its slice NaN. The first
    and second derivatives in ``logits`` and ``temperature`` are exact (the
    small entropy of a confident slice keeps its relative accuracy).

    Args:
      logits: unnormalised log-probabilities.
      axis: the axis or axes of the distribution: an int, a tuple of ints, or
        None for all.
      where: optional boolean mask broadcastable to ``logits``; False excludes.
      temperature: t >= 0, a scalar or one per slice (see
        :func:`jsoftmax.softmax`). Differentiable.
      axis_name: mesh axis over which ``axis`` is also sharded (see
        :func:`jsoftmax.softmax`).

    Returns:
      The entropy per slice: ``logits``' shape without ``axis``, in its
      floating dtype.

    Examples:
      >>> import jsoftmax
      >>> jsoftmax.entropy(jnp.array([0.0, 0.0, -jnp.inf]))
      Array(0.6931472, dtype=float32)
      >>> jsoftmax.entropy(jnp.array([1.0, 2.0]), where=jnp.array([False, False]))
      Array(0., dtype=float32)
    """
    return _entropy_jit(*host_args("entropy", logits, where, temperature, "logits"), axis,
                        axis_name)


# kl_divergence


def _kl_parts(axes, xp, xq, t, mask):
    """``(kl, zp, zq, log s_p, log s_q, |p|, mean_gap)`` keepdims, with
    KL = mean_gap - log s_p + log s_q, mean_gap = sum(p (zp - zq)) (0 where
    KL is +inf) and |p| = sum p (1, or 0 for a slice with nothing included
    in p)."""
    zp, _ = nz.logits(axes, xp, t, mask)
    zq, _ = nz.logits(axes, xq, t, mask)
    # 0 where p is 0, whatever q is; +inf where only q is 0 (also where p's
    # probability underflows: it is not 0). The branches not taken stay
    # finite, so that their zero cotangents meet no inf in second derivatives.
    cross = jnp.exp(zp) * (_finite(zp) - _finite(zq))
    cross = nz.select(zp == -INF, 0.0, nz.select(zq == -INF, INF, cross))
    norm = nz.normaliser(zp, axes)
    s_q, weighted = nz.reduce(jnp.exp(zq), axes), nz.reduce(cross, axes)
    log_s_q = jnp.log(nz.select(s_q == 0, 1.0, s_q))
    infinite = weighted == INF
    finite = nz.select(infinite, 0.0, weighted) / nz.select(norm.s == 0, 1.0, norm.s)
    kl = nz.select(infinite, INF, finite - norm.log_s + log_s_q)
    mass = (norm.s > 0).astype(zp.dtype)
    return nz.select(norm.s == 0, 0.0, kl), zp, zq, norm.log_s, log_s_q, mass, finite


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kl_divergence(axes, xp, xq, t, mask):
    return _kl_parts(axes, xp, xq, t, mask)[0]


@partial(_kl_divergence.defjvp, symbolic_zeros=True)
def _kl_divergence_jvp(axes, primals, tangents):
    """dKL = sum p (g - sum(p g)) dz_p - sum (p - |p| q) dz_q (|p| = sum p, 1
    or 0 where p has nothing included), with
    g = zp - zq (log p - log q up to a per-slice constant) and
    dz = (dx - z dt) / t. Written with sum(p g), not the equal
    KL + log s_p - log s_q: that difference of two numbers near log k cancels
    where k entries tie at the top. Zero where KL is +inf (no finite
    direction changes it). Checkpointed on both logits: reverse mode keeps
    two input-sized arrays."""
    xp, xq, t, mask = primals
    dxp, dxq, dt = tangents[:3]
    kl, zp, zq, log_s_p, log_s_q, mass, mean_gap = _kl_parts(axes, xp, xq, t, mask)
    dzp, dzq = nz.tangent_logits(zp, t, dxp, dt), nz.tangent_logits(zq, t, dxq, dt)
    if dzp is None and dzq is None:
        return kl, jnp.zeros_like(kl)
    tangent = jax.checkpoint(_kl_tangent, prevent_cse=False, static_argnums=(0,))
    return kl, tangent(axes, zp, zq, log_s_p, log_s_q, mass, kl, mean_gap, dzp, dzq)


def _kl_tangent(axes, zp, zq, log_s_p, log_s_q, mass, kl, mean_gap, dzp, dzq):
    infinite = kl == INF
    p = jnp.exp(zp - log_s_p)  # 0 where p is excluded
    out = jnp.zeros_like(kl)
    if dzp is not None:
        # Finite before it multiplies the tangent (mean_gap is 0 where KL is
        # +inf): its transpose would otherwise meet 0 * inf.
        gap = _finite(zp) - _finite(zq) - mean_gap
        out = out + nz.reduce(p * gap * dzp, axes)
    if dzq is not None:
        # p - q = (d - q sum(d)) / s_p with d = exp(zp) - exp(zq) (as
        # s_q - s_p = -sum(d)): no two numbers near 1/k are subtracted where k
        # entries tie at the top. |p| makes it exactly 0 where p is empty.
        q = jnp.exp(zq - log_s_q)
        d = _exp_difference(zp, zq)
        p_minus_q = (d - q * nz.reduce(d, axes)) * jnp.exp(-log_s_p)
        out = out - nz.reduce(mass * p_minus_q * dzq, axes)
    return nz.select(infinite, 0.0, out)


def _exp_difference(a, b):
    """exp(a) - exp(b) to full relative accuracy, as +-exp(hi) (1 - exp(lo - hi)),
    with exact derivatives where a = b too (the selects, not max and min,
    pick the branch); 0 where both are -inf."""
    both = (a == -INF) & (b == -INF)
    a, b = nz.select(both, 0.0, a), nz.select(both, 0.0, b)
    first = a >= b
    hi, lo = nz.select(first, a, b), nz.select(first, b, a)
    d = -jnp.exp(hi) * jnp.expm1(lo - hi)
    return nz.select(first, d, -d)


@partial(jax.jit, static_argnums=(4, 5))
def _kl_divergence_jit(xp, xq, where, t, axis, axis_name):
    if xq.shape != xp.shape:
        raise ValueError(f"kl_divergence: logits_q has shape {xq.shape} but logits_p has shape "
                         f"{xp.shape}; give both distributions' logits with the same shape")
    dtype = jnp.promote_types(inexact_dtype(xp.dtype), inexact_dtype(xq.dtype))
    xq = slice_args("kl_divergence", xq, axis, None, None, "logits_q")[0].astype(dtype)
    xp, _, axes, mask, t = slice_args("kl_divergence", xp, axis, where, t, "logits_p")
    kl = _kl_divergence(nz.Axes(axes, axis_name), xp.astype(dtype), xq, t, mask)
    return jnp.squeeze(kl, axes).astype(dtype)


def kl_divergence(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""KL(P || Q) between ``P = softmax(logits_p / t)`` and ``Q = softmax(logits_q / t)``.

    .. math::
        \mathrm{KL}(P \,\|\, Q) = \sum_i P_i (\log P_i - \log Q_i)

    ``where`` excludes an entry from both distributions. An entry with
    ``P_i = 0`` (excluded in ``logits_p``) contributes 0 whatever ``logits_q``
    is there; one with ``P_i > 0`` and ``Q_i = 0`` makes the divergence +inf
    (with zero gradients), not NaN. A slice with nothing included in
    ``logits_p`` gives 0. Gradients in both logits and in the temperature are
    exact and NaN-free wherever the value is finite.

    For distillation with Hinton et al.'s scaling (gradients of the same size
    at every temperature), multiply by t²:
    ``t**2 * kl_divergence(teacher_logits, student_logits, temperature=t)``.

    Args:
      logits_p: logits of P (the target, e.g. the teacher).
      logits_q: logits of Q (e.g. the student), of the same shape.
      axis: the axis or axes of the distributions: an int, a tuple of ints or None.
      where: optional boolean mask broadcastable to the logits; False excludes.
      temperature: t >= 0, applied to both; a scalar or one per slice (see
        :func:`jsoftmax.softmax`). Differentiable.
      axis_name: mesh axis over which ``axis`` is also sharded (see
        :func:`jsoftmax.softmax`).

    Returns:
      The divergence per slice (the logits' shape without ``axis``), >= 0 up
      to rounding.

    Examples:
      >>> import jsoftmax
      >>> p = jnp.array([0.0, 0.0, -jnp.inf])
      >>> jsoftmax.kl_divergence(p, jnp.array([0.0, 0.0, 5.0]))
      Array(4.3202386, dtype=float32)
      >>> jsoftmax.kl_divergence(p, jnp.array([0.0, -jnp.inf, 0.0]))
      Array(inf, dtype=float32)
    """
    xp, where, t = host_args("kl_divergence", logits_p, where, temperature, "logits_p")
    xq = host_args("kl_divergence", logits_q, arg="logits_q")[0]
    return _kl_divergence_jit(xp, xq, where, t, axis, axis_name)
