"""Fused linear KL divergence: distillation without the [N, V] logits.

Distilling a teacher into a student over a large vocabulary needs, per
example, KL(softmax(y_t) || softmax(y_s)) of two logits arrays
``y = hidden @ weight`` of shape [N, V]. As in
:mod:`jsoftmax.fused`, the vocabulary is walked in chunks:

* forward: online logsumexps of both logits and, at the teacher's running
  shift, the cross term ``sum_j exp(y_t - m_t) ((y_t - m_t) - (y_s - m_s))``,
  moved onto a new shift whenever either maximum grows;
* backward (``jax.custom_vjp``): both chunks of logits are recomputed and
  turned into ``d KL / d y_s = q - p`` and ``d KL / d y_t = p (log p - log q
  - KL)`` at once, multiplied into the gradients of the hidden states and of
  that chunk of the weights. The teacher's matmuls are skipped when nothing
  differentiates through it (under ``jax.lax.stop_gradient``, say).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax import _vocab as vc
from jsoftmax._normalise import select
from jsoftmax._xla_cpu import per_chunk, sums
from jsoftmax.core import AxisName

__all__ = ["fused_linear_kl_divergence"]

_NAME = "fused_linear_kl_divergence"
_INF = jnp.inf


def _finite(v):
    """``v`` with -inf replaced by 0, safe to multiply by a probability 0."""
    return select(v == -_INF, 0.0, v)


def _old_shift(m):
    """The shift the sums up to a running maximum ``m`` are kept at."""
    return select(jnp.isfinite(m), m, 0.0)


def _moved_cross(c, s_t, gained, decay_t):
    """The cross term moved onto new shifts: every ``(y_t - m_t) - (y_s -
    m_s)`` gains ``gained`` and every weight exp(y_t - m_t) is scaled by
    ``decay_t``; +inf stays +inf."""
    return select(c == _INF, _INF, decay_t * (c + gained * s_t))


# The forward pass.


def _forward(chunk, axis_name, student, teacher, inv_t, cap, mask):
    """Per example ``(kl, lse_s, lse_t)``; ``student`` and ``teacher`` are
    ``(hidden, weight, bias)``. -inf where a side includes nothing."""
    (h, w, bias), (ht, wt, bt) = student, teacher
    n = h.shape[0]
    acc = vc.acc_dtype(h.dtype)
    if mask is not None:
        # Masked rows compute on zeros, so a NaN there cannot leak anywhere.
        h = select(mask[:, None], h, jnp.zeros((), h.dtype))
        ht = select(mask[:, None], ht, jnp.zeros((), ht.dtype))

    def step(carry, start, size):
        m_t, s_t, c, m_s, s_s = carry
        w_c, bias_c, wt_c, bt_c = per_chunk(start, w, bias, wt, bt)
        y_s = vc.chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)[0]
        y_t = vc.chunk_logits(ht, wt_c, bt_c, start, size, cap, inv_t)[0]
        m_t_new, shift_t, e_t, decay_t = vc.online_step(m_t, y_t)
        m_s_new, shift_s, e_s, decay_s = vc.online_step(m_s, y_s)
        # A class the teacher excludes adds 0 whatever the student gives it;
        # one only the student excludes makes the divergence +inf (also where
        # the teacher's probability underflows: it is not 0).
        gap = (y_t - shift_t[:, None]) - (y_s - shift_s[:, None])
        cross = select(y_t == -_INF, 0.0, select(y_s == -_INF, _INF, e_t * gap))
        # One reduction for the three sums: XLA:CPU would store e_t (and the
        # selected cross terms) for sums of their own.
        sum_t, sum_cross, sum_s = (x[:, 0] for x in sums((e_t, cross, e_s), (1,)))
        gained = (_old_shift(m_t) - shift_t) - (_old_shift(m_s) - shift_s)
        c = _moved_cross(c, s_t, gained, decay_t) + sum_cross
        return m_t_new, s_t * decay_t + sum_t, c, m_s_new, s_s * decay_s + sum_s

    carry = (jnp.full((n,), -_INF, acc), jnp.zeros((n,), acc), jnp.zeros((n,), acc),
             jnp.full((n,), -_INF, acc), jnp.zeros((n,), acc))
    axes = vc.vma(h, w, bias, ht, wt, bt, inv_t, cap)
    carry = tuple(vc.varying(x, axes) for x in carry)
    m_t, s_t, c, m_s, s_s = vc.over_chunks(step, carry, w.shape[1], chunk)
    if axis_name is not None:
        m_t_global, shift_t = vc.global_shift(axis_name, m_t)
        m_s_global, shift_s = vc.global_shift(axis_name, m_s)
        decay_t, decay_s = jnp.exp(m_t - shift_t), jnp.exp(m_s - shift_s)
        gained = (_old_shift(m_t) - shift_t) - (_old_shift(m_s) - shift_s)
        c = lax.psum(_moved_cross(c, s_t, gained, decay_t), axis_name)
        s_t, s_s = lax.psum(s_t * decay_t, axis_name), lax.psum(s_s * decay_s, axis_name)
        m_t, m_s = m_t_global, m_s_global
    log_s_t, log_s_s = jnp.log(s_t), jnp.log(s_s)
    # KL = sum p (log p - log q) = c / s_t - log s_t + log s_q, at the shifts.
    infinite = c == _INF
    finite = select(infinite, 0.0, c) / select(s_t > 0, s_t, 1.0) - log_s_t + log_s_s
    kl = select(infinite, _INF, finite)
    # Nothing included in the teacher: 0, as in kl_divergence.
    kl = select(s_t > 0, kl, 0.0)
    return kl, _old_shift(m_s) + log_s_s, _old_shift(m_t) + log_s_t


# The custom derivative.


def _kl_value(chunk, axis_name, h, w, bias, ht, wt, bt, t, cap, mask):
    """The divergence per example, and ``(lse_s, lse_t)``."""
    kl, lse_s, lse_t = _forward(
        chunk, axis_name, (h, w, bias), (ht, wt, bt), vc.inverse(t), cap, mask
    )
    ok = vc.valid_options(t, cap)
    if ok is not None:
        kl = select(ok, kl, jnp.nan)
    if mask is not None:
        kl = select(mask, kl, 0.0)
    return kl, (lse_s, lse_t)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_kl(chunk, axis_name, h, w, bias, ht, wt, bt, t, cap, mask):
    kl, _ = _kl_value(chunk, axis_name, h, w, bias, ht, wt, bt, t, cap, mask)
    return kl


def _fused_kl_fwd(chunk, axis_name, *primals):
    # With symbolic zeros, each array comes with whether it is differentiated:
    # the teacher's gradient matmuls run only if one of its arrays is.
    values = tuple(None if p is None else p.value for p in primals)
    teacher = any(p is not None and p.perturbed for p in primals[3:6])
    kl, (lse_s, lse_t) = _kl_value(chunk, axis_name, *values)
    # ``()`` or ``(None,)``: a flag with no leaves, as residuals must be arrays.
    return kl, (values, kl, lse_s, lse_t, (None,) if teacher else ())


def _fused_kl_bwd(chunk, axis_name, residuals, g):
    (h, w, bias, ht, wt, bt, t, cap, mask), kl, lse_s, lse_t, teacher = residuals
    vc.check_vma(_NAME, axis_name, w)
    acc = vc.acc_dtype(h.dtype)
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(kl.shape, acc)
    inv_t = vc.row_inverse(t, h.shape[0])
    # Zero where the divergence is +inf (no finite direction changes it) or
    # the example excluded.
    infinite = kl == _INF
    g = select(infinite, 0.0, g.astype(acc))
    if mask is not None:
        g = select(mask, g, 0.0)
        h = select(mask[:, None], h, jnp.zeros((), h.dtype))
        ht = select(mask[:, None], ht, jnp.zeros((), ht.dtype))
    # A side with nothing included: its probabilities are all 0.
    mass = (lse_t > -_INF).astype(acc)[:, None]
    lse_s_col, lse_t_col = _finite(lse_s)[:, None], _finite(lse_t)[:, None]
    g_col, kl_col = g[:, None], select(infinite, 0.0, kl)[:, None]
    h_t, ht_t = vc.transposed_once(h), (vc.transposed_once(ht) if teacher else None)

    def step(carry, start, size):
        student, teach = carry
        w_c, bias_c, wt_c, bt_c, h_t_c, ht_t_c = per_chunk(start, w, bias, wt, bt, h_t, ht_t)
        y_s, z_s, th_s = vc.chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)
        y_t, z_t, th_t = vc.chunk_logits(ht, wt_c, bt_c, start, size, cap, inv_t)
        log_p, log_q = y_t - lse_t_col, y_s - lse_s_col
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        # d KL / d y_s = |p| q - p.
        dy_s = g_col * (mass * q - p)
        student = vc.grad_step(student, dy_s, y_s, z_s, th_s, cap, inv_t, h, h_t_c, w_c, bias,
                             start, size)
        # d KL / d y_t = p (log p - log q - KL), 0 where p is.
        dy_t = g_col * p * (_finite(log_p) - _finite(log_q) - kl_col)
        if teacher:
            teach = vc.grad_step(teach, dy_t, y_t, z_t, th_t, cap, inv_t, ht, ht_t_c, wt_c, bt,
                               start, size)
        elif inv_t is not None or cap is not None:
            # The temperature and the cap are shared: the teacher's logits
            # still add to their gradients.
            ty, tc = vc.option_grads(dy_t, y_t, z_t, th_t, cap, inv_t, *teach)[1:]
            teach = (ty, tc)
        return student, teach

    student = vc.grad_carry(h, w, bias)
    carry = (student, vc.grad_carry(ht, wt, bt) if teacher else student[3:])
    axes = vc.vma(h, w, bias, ht, wt, bt, inv_t, cap, g)
    carry = jax.tree.map(lambda x: vc.varying(x, axes), carry)
    (dh, dw, db, ty, tc), (*teach, tyt, tct) = vc.over_chunks(step, carry, w.shape[1], chunk)
    dh, dt, d_cap = vc.grad_outputs(axis_name, t, cap, dh, ty + tyt, tc + tct)
    grads = (dh.astype(h.dtype), dw, None if bias is None else db)
    if teacher:
        dht, dwt, dbt = teach
        dht = vc.psum(dht, axis_name)
        grads = (*grads, dht.astype(ht.dtype), dwt, None if bt is None else dbt)
    else:
        grads = (*grads, None, None, None)
    return (*grads, dt, d_cap, None)


_fused_kl.defvjp(_fused_kl_fwd, _fused_kl_bwd, symbolic_zeros=True)


# The public function.


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _fused_kl_jit(
    chunk, axis_name, batch, dtype, reduction,
    h, w, bias, ht, wt, bt, where, t, cap, weights,
):
    """The casts and reshapes to [N, D] rows, the divergence, its weights and
    reduction, in one computation."""
    acc = vc.acc_dtype(dtype)
    h, w, bias = vc.rows(batch, dtype, h, w, bias)
    ht, wt, bt = vc.rows(batch, dtype, ht, wt, bt)
    mask, t, cap = vc.row_options(_NAME, batch, w.shape[1], where, t, cap, acc)
    (w, wt), (bias, bt), (h, ht, t, cap, mask) = vc.vary(
        _NAME, axis_name, {"weight": w, "teacher_weight": wt}, (bias, bt), (h, ht, t, cap, mask)
    )
    kl = _fused_kl(chunk, axis_name, h, w, bias, ht, wt, bt, t, cap, mask)
    if weights is not None:
        weights = jnp.broadcast_to(jnp.asarray(weights).astype(acc), batch).reshape(-1)
    kl = vc.reduce(kl, mask, weights, reduction)
    return (kl if reduction != "none" else kl.reshape(batch)).astype(dtype)


def fused_linear_kl_divergence(
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    logit_soft_cap: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    axis_name: AxisName | None = None,
) -> jax.Array:
    r"""KL(teacher || student) of two linear output layers without materialising their logits.

    .. math::
        \mathrm{KL}_n = \sum_j p_{nj} (\log p_{nj} - \log q_{nj}),
        \quad p_n = \mathrm{softmax}(y^t_n), \quad q_n = \mathrm{softmax}(y^s_n),
        \quad y_n = \frac{c \tanh((h_n W + b) / c)}{t}

    with ``y^s`` from ``hidden``, ``weight`` and ``bias`` (the student) and
    ``y^t`` from ``teacher_hidden``, ``teacher_weight`` and
    ``teacher_bias`` (the teacher; its hidden size may differ, the
    vocabulary, cap and temperature are shared). Equal, in value and in
    gradients with respect to every array argument, to
    ``kl_divergence(teacher_logits, student_logits, temperature=t)`` on the
    materialised logits, weighted and reduced; but the [N, V] logits never
    exist: both vocabularies are walked ``chunk_size`` columns at a time
    with online logsumexps, and the backward pass recomputes each chunk.
    Temporary memory is O(N * chunk_size); the price is a second pass of
    both matmuls. The teacher's gradient matmuls run only when something
    differentiates through the teacher (not under ``jax.lax.stop_gradient``,
    as distillation uses it).

    The edges are those of :func:`jsoftmax.kl_divergence`: a class the
    teacher excludes (a -inf ``teacher_bias``) contributes 0 whatever the
    student gives it; one the teacher includes and the student excludes
    makes the divergence +inf (with zero gradients), not NaN; gradients are
    finite wherever the value is. Under ``logit_soft_cap`` a -inf bias is
    capped to -c like any other logit and excludes nothing; +inf logits are
    not supported. bfloat16 / float16 inputs go into the
    matmuls as they are, with float32 accumulation; the result is in the
    inputs' dtype. The derivatives are a custom VJP: reverse mode
    (``jax.grad``, ``jax.vjp``) only, not ``jax.jvp``. Unlike the fused
    loss it returns no statistics.

    For distillation with Hinton et al.'s scaling (gradients of the same
    size at every temperature), multiply by t²:
    ``t**2 * fused_linear_kl_divergence(..., temperature=t)``.

    Args:
      hidden: [N, D] student activations (or [..., D]; leading axes are the batch).
      weight: [D, V] student output projection.
      teacher_hidden: [N, D_t] teacher activations, the same batch shape.
      teacher_weight: [D_t, V] teacher output projection.
      where: optional boolean mask of the batch shape; False excludes the
        example (divergence 0, zero gradients).
      temperature: t > 0 dividing both logits, a scalar or one per example
        (a Python or NumPy 0 or inf raises; one in a JAX array gives NaN).
      bias: optional [V] student bias.
      teacher_bias: optional [V] teacher bias; -inf excludes a class.
      logit_soft_cap: c > 0 caps both logits to ``c * tanh(logits / c)``
        before the temperature; None or 0 (or inf) is off.
      weights: optional per-example weights, broadcastable to the batch shape.
      reduction: "none", "sum" or "mean", as in
        :func:`jsoftmax.fused_linear_cross_entropy`.
      chunk_size: vocabulary columns per chunk; None picks the default of
        :func:`jsoftmax.fused_linear_cross_entropy` (about 2**21 logits of
        each side per chunk).
      axis_name: mesh axis (inside ``jax.shard_map``) over which both
        weights' vocabulary axes (and the biases) are sharded; the hidden
        states are the same on every shard of it, and the result is the
        divergence over the whole vocabulary.

    Returns:
      The divergence per example (the batch shape; a scalar for "sum" and
      "mean"), >= 0 up to rounding.

    Examples:
      >>> import jsoftmax
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> weight = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
      >>> teacher_hidden = jnp.array([[2.0], [1.0]])
      >>> teacher_weight = jnp.array([[1.0, 0.5, 0.0]])
      >>> kl = jsoftmax.fused_linear_kl_divergence(
      ...     hidden, weight, teacher_hidden, teacher_weight, chunk_size=2)
      >>> bool(jnp.allclose(kl, jsoftmax.kl_divergence(
      ...     teacher_hidden @ teacher_weight, hidden @ weight)))
      True
      >>> jsoftmax.fused_linear_kl_divergence(
      ...     hidden, weight, teacher_hidden, teacher_weight,
      ...     teacher_bias=jnp.array([0.0, 0.0, -jnp.inf]), bias=jnp.array([0.0, -jnp.inf, 0.0]))
      Array([inf, inf], dtype=float32)
    """
    h, w, dtypes = vc.check_linear(_NAME, hidden, weight)
    ht, wt, t_dtypes = vc.check_linear(
        _NAME, teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight"
    )
    batch = tuple(h.shape[:-1])
    if tuple(ht.shape[:-1]) != batch:
        raise ValueError(
            f"{_NAME}: teacher_hidden has shape {tuple(ht.shape)} but hidden "
            f"{tuple(h.shape)}; give both one row per example (the same batch shape)")
    if wt.shape[1] != w.shape[1]:
        raise ValueError(
            f"{_NAME}: teacher_weight has {wt.shape[1]} vocabulary columns but weight "
            f"{w.shape[1]}; the teacher and the student must share the vocabulary")
    mask, t, cap, weights = vc.check_options(
        _NAME, batch, where, chunk_size, axis_name, temperature, logit_soft_cap, weights,
        reduction,
    )
    b, b_dtype = vc.check_bias(_NAME, bias, w.shape)
    bt, bt_dtype = vc.check_bias(_NAME, teacher_bias, wt.shape, "teacher_bias", "teacher_weight")
    biases = [x for x, y in ((b_dtype, b), (bt_dtype, bt)) if y is not None]
    dtype = jnp.dtype(jnp.result_type(*dtypes, *t_dtypes, *biases))
    v = w.shape[1]
    n = int(np.prod(batch, dtype=np.int64))
    chunk = vc.default_chunk_size(n, v) if chunk_size is None else int(min(chunk_size, v))
    return _fused_kl_jit(
        chunk, axis_name, batch, dtype, reduction,
        h, w, b, ht, wt, bt, mask, t, cap, weights,
    )
