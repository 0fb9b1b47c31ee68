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
from jsoftmax._checks import (
    Axis,
    as_real_array,
    shaped_slice_args,
    slice_args,
)
from jsoftmax._normalise import INF, AxisName

__all__ = ["entropy", "kl_divergence"]


def _finite(v: jax.Array) -> jax.Array:
    """``v`` with -inf replaced by 0: the log-probability of an excluded
    entry, made safe to multiply by its probability 0 (in both directions)."""
    return nz.select(v == -INF, 0.0, v)


# --------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------


@jax.custom_jvp
def _entropy(axes, x, t, mask):
    z, _ = nz.logits(axes, x, t, mask)
    return nz.entropy(z, axes)


@partial(_entropy.defjvp, symbolic_zeros=True)
def _entropy_jvp(primals, tangents):
    """dH = -sum p (z - sum(p z)) dz = -sum p (log p + H) dz, with
    dz = (dx - z dt) / t. Checkpointed on log p: reverse mode keeps one
    input-sized array."""
    axes, x, t, mask = primals
    dx, dt = nz.tangent_value(tangents[1]), nz.tangent_value(tangents[2])
    z, _ = nz.logits(axes, x, t, mask)
    h = nz.entropy(z, axes)
    dz = nz.tangent_logits(None if dt is None else z, t, dx, dt)
    if dz is None:
        return h, jnp.zeros_like(h)
    log_p = nz.log_probabilities(z, nz.accurate_log_normaliser(z, axes)[0])
    return h, jax.checkpoint(_entropy_tangent, prevent_cse=False)(axes, log_p, h, dz)


def _entropy_tangent(axes, log_p, h, dz):
    safe = _finite(log_p)
    weight = nz.select(log_p == -INF, 0.0, jnp.exp(safe) * (safe + h))
    return -nz.reduce_sum(weight * dz, axes)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _entropy_jit(axes, dtype, layout, x, t, mask):
    h = _entropy(axes, x, *shaped_slice_args(axes, layout, x, t, mask))
    return jnp.squeeze(h, tuple(axes)).astype(dtype)


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
    arr, dtype, axes, mask, t, layout = slice_args("entropy", logits, axis, where, temperature)
    return _entropy_jit(nz.reduction(axes, axis_name), dtype, layout, arr, t, mask)


# --------------------------------------------------------------------------
# kl_divergence
# --------------------------------------------------------------------------


def _kl_parts(axes, xp, xq, t, mask):
    """``(kl, zp, zq, log s_p, log s_q, |p|)`` keepdims, with
    KL = sum(exp(zp) (zp - zq)) / s_p - log s_p + log s_q and |p| = sum p
    (1, or 0 for a slice with nothing included in p)."""
    zp, _ = nz.logits(axes, xp, t, mask)
    zq, _ = nz.logits(axes, xq, t, mask)
    # 0 where p is 0, whatever q is; +inf where only q is 0 (also where p's
    # probability underflows: it is not 0). The branches not taken stay
    # finite, so that their zero cotangents meet no inf in second derivatives.
    cross = jnp.exp(zp) * (_finite(zp) - _finite(zq))
    cross = nz.select(zp == -INF, 0.0, nz.select(zq == -INF, INF, cross))
    norm = nz.normaliser(zp, axes)
    s_q, weighted = nz.reduce_sum(jnp.exp(zq), axes), nz.reduce_sum(cross, axes)
    log_s_q = jnp.log(nz.safe_normaliser(s_q))
    mass = (norm.s > 0).astype(zp.dtype)
    infinite = weighted == INF
    finite = nz.select(infinite, 0.0, weighted) / nz.safe_normaliser(norm.s)
    kl = nz.select(infinite, INF, finite - norm.log_s + log_s_q)
    return nz.select(norm.s == 0, 0.0, kl), zp, zq, norm.log_s, log_s_q, mass


@jax.custom_jvp
def _kl_divergence(axes, xp, xq, t, mask):
    return _kl_parts(axes, xp, xq, t, mask)[0]


@partial(_kl_divergence.defjvp, symbolic_zeros=True)
def _kl_divergence_jvp(primals, tangents):
    """dKL = sum p (log p - log q - KL) dz_p - sum (p - |p| q) dz_q, with
    dz = (dx - z dt) / t. Zero where KL is +inf (no finite direction changes
    it). Checkpointed on both logits: reverse mode keeps two input-sized
    arrays."""
    axes, xp, xq, t, mask = primals
    dxp, dxq, dt = (nz.tangent_value(v) for v in tangents[1:4])
    kl, zp, zq, log_s_p, log_s_q, mass = _kl_parts(axes, xp, xq, t, mask)
    dzp = nz.tangent_logits(None if dt is None else zp, t, dxp, dt)
    dzq = nz.tangent_logits(None if dt is None else zq, t, dxq, dt)
    if dzp is None and dzq is None:
        return kl, jnp.zeros_like(kl)
    tangent = jax.checkpoint(_kl_tangent, prevent_cse=False)
    return kl, tangent(axes, zp, zq, log_s_p, log_s_q, mass, kl, dzp, dzq)


def _kl_tangent(axes, zp, zq, log_s_p, log_s_q, mass, kl, dzp, dzq):
    infinite = kl == INF
    p = jnp.exp(zp - log_s_p)  # 0 where p is excluded
    out = jnp.zeros_like(kl)
    if dzp is not None:
        # log p - log q - KL, made finite before it multiplies the tangent:
        # its transpose would otherwise meet 0 * inf where KL is +inf.
        offset = nz.select(infinite, 0.0, log_s_p - log_s_q + kl)
        gap = _finite(zp) - _finite(zq) - offset
        out = out + nz.reduce_sum(p * gap * dzp, axes)
    if dzq is not None:
        q = jnp.exp(zq - log_s_q)
        out = out - nz.reduce_sum((p - mass * q) * dzq, axes)
    return nz.select(infinite, 0.0, out)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _kl_divergence_jit(axes, dtype, layout, xp, xq, t, mask):
    t, mask = shaped_slice_args(axes, layout, xp, t, mask)
    kl = _kl_divergence(axes, xp, xq, t, mask)
    return jnp.squeeze(kl, tuple(axes)).astype(dtype)


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
    name = "kl_divergence"
    arr_p, dtype_p, axes, mask, t, layout = slice_args(
        name, logits_p, axis, where, temperature, "logits_p"
    )
    arr_q, dtype_q = as_real_array(name, logits_q, "logits_q", keep_low_precision=True)
    if arr_q.shape != arr_p.shape:
        raise ValueError(
            f"{name}: logits_q has shape {arr_q.shape} but logits_p has shape "
            f"{arr_p.shape}; give both distributions' logits with the same shape"
        )
    dtype = jnp.promote_types(dtype_p, dtype_q)
    if arr_p.dtype != arr_q.dtype:
        arr_p, arr_q = arr_p.astype(dtype), arr_q.astype(dtype)
    return _kl_divergence_jit(
        nz.reduction(axes, axis_name), dtype, layout, arr_p, arr_q, t, mask
    )
