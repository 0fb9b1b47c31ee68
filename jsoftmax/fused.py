"""Fused linear cross-entropy: the output layer's loss without the [N, V] logits.

A language model's loss is ``cross_entropy(hidden @ weight, labels)`` with a
vocabulary V of 32k to 256k classes, and the logits array [N, V] (plus the
same again for its gradient) is often the largest thing in memory. Here the
vocabulary is walked in chunks of ``chunk_size`` columns of ``weight``:

* forward: an online (streaming) logsumexp keeps, per example, the running
  maximum ``m`` and the sum ``s`` of ``exp(y - m)`` over the chunks seen so
  far, rescaling ``s`` by ``exp(m_old - m_new)`` when the maximum grows;
* backward (``jax.custom_vjp``): the chunk logits are recomputed from
  ``hidden`` and ``weight`` and turned into the chunk of ``d loss / d logits``
  at once, which is multiplied into the gradients of ``hidden`` and of that
  chunk of ``weight``.

Only [N, chunk_size] arrays are ever live, and the residuals saved between
the passes are the inputs and three numbers per example. The same loop can
also keep, per example, the moment of the logits that gives their entropy
and their running argmax (``return_stats``); :mod:`jsoftmax.fused_divergence`
walks two output layers with the same pieces. With ``axis_name``
the vocabulary is also sharded across a mesh axis (inside ``jax.shard_map``):
the per-shard maxima and sums are combined with ``lax.pmax`` and ``lax.psum``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _vocab as vc
from jsoftmax._checks import concrete, host_array, widen_labels
from jsoftmax._normalise import select
from jsoftmax._xla_cpu import per_chunk
from jsoftmax.core import AxisName

__all__ = ["FusedStats", "fused_linear_cross_entropy"]

_NAME = "fused_linear_cross_entropy"


# The forward pass: online logsumexp over vocabulary chunks.


def _moved_moment(u, s, m, shift, decay):
    """``u = sum exp(y - m) (y - m)`` (with ``s = sum exp(y - m)``) moved onto
    ``shift``: every ``y - m`` gains ``m - shift``."""
    gained = select(jnp.isfinite(m), m - shift, 0.0)
    return decay * (u + gained * s)


def _moment_terms(exps, shifted):
    """Terms ``exp(y - shift) (y - shift)`` of the moment from ``shifted = y -
    shift``: 0, not 0 * -inf, for an excluded (-inf) logit. (A clamp rather
    than a select: XLA:CPU would store a selected [N, chunk] array before
    summing it.)"""
    return exps * jnp.maximum(shifted, jnp.finfo(shifted.dtype).min)


def _argmax_and_sums(y, *xs):
    """The argmax of ``y`` over axis 1 (the lowest index on ties, int32) and
    the sums of ``xs`` over it, in one reduction. XLA fuses the producers of
    a reduction of several operands into it, where XLA:CPU would store the
    [N, chunk] producer of each sum of its own (and drops the argmax if
    it is not used, so there are two sums)."""
    index = lax.broadcasted_iota(jnp.int32, y.shape, 1)

    def pick(a, b):
        (va, ia, *sa), (vb, ib, *sb) = a, b
        later = (vb > va) | ((vb == va) & (ib < ia))
        totals = (p + q for p, q in zip(sa, sb, strict=True))
        return select(later, vb, va), select(later, ib, ia), *totals

    init = (jnp.array(-jnp.inf, y.dtype), jnp.array(y.shape[1], jnp.int32),
            *(jnp.zeros((), x.dtype) for x in xs))
    _, best, *totals = lax.reduce((y, index, *xs), init, pick, (1,))
    return best, *totals


def _with_label(rest, y_label, shift, present):
    """The sum of exp(y - shift) over every class from the sum ``rest`` over
    all but the label, where the label's logit is ``present``."""
    return rest + select(present, jnp.exp(y_label - shift), 0.0)


def _entropy_of(s, u):
    """``-sum p log p = log s - u / s`` from the sum and the moment at one
    shift; both terms are >= 0, so a small entropy keeps its relative
    accuracy. 0 where nothing is included."""
    some = s > 0
    safe = select(some, s, 1.0)
    return select(some, jnp.log(safe) - u / safe, 0.0)


def _forward(chunk, axis_name, h, w, bias, labels, inv_t, cap, mask, stats=False):
    """Returns per-example ``(lse, gap, y_label, y_sum, valid, extra)``, each [N].

    ``y = cap(h @ w + bias) * inv_t`` are the scaled logits (``cap`` the
    soft cap, when there is one); ``lse`` is their logsumexp over the
    (global) vocabulary, ``y_label`` the label's logit, ``gap = lse -
    y_label`` the cross-entropy, ``y_sum`` the sum of all logits (for label
    smoothing) and ``valid`` whether the label is in range. With ``stats``,
    ``extra`` is ``(entropy, argmax)`` of ``y``, else ``()``.

    The loop accumulates, besides the running maximum m, the sum of
    exp(y - m) over every class but the label. Then
    ``gap = log1p(rest * exp(m - y_label))``, which keeps its relative
    accuracy when the label dominates and the loss is far below 1 (a plain
    ``log(sum)`` near 1 would lose it), and costs one select per logit.
    The statistics add the sum over every class, the moment
    ``sum exp(y - m) (y - m)`` (for the entropy) and the running argmax.
    """
    n = h.shape[0]
    v_local = w.shape[1]
    acc = vc.acc_dtype(h.dtype)
    offset = vc.shard_offset(axis_name, v_local)
    if mask is not None:
        # Masked rows compute on zeros, so a NaN there cannot leak anywhere.
        h = select(mask[:, None], h, jnp.zeros((), h.dtype))

    def step(carry, start, size):
        m, rest, y_label, y_sum, *extra = carry
        w_c, bias_c = per_chunk(start, w, bias)
        y = vc.chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)[0]
        m_new, shift, exps, decay = vc.online_step(m, y)
        cols = offset + start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        hit = cols == labels[:, None]
        terms = select(hit, 0.0, exps)
        rest_new = rest * decay + jnp.sum(terms, axis=1)
        # The label's logit picked from the chunk: a gather of weight's
        # columns would need an [N, D] buffer, and this is the very value
        # the logsumexp sees.
        if not stats:
            picked = jnp.sum(select(hit, y, 0.0), axis=1)
        else:
            # The moment u = sum exp(y - shift) (y - shift) for the entropy,
            # from the loss's own terms and the label's per-row term (a sum
            # over exps would keep another [N, chunk] array). ``picked`` is
            # one logit and zeros: the same bits from any reduction.
            u, best = extra
            top, picked, moment = _argmax_and_sums(
                y, select(hit, y, 0.0), _moment_terms(terms, y - shift[:, None]))
            first = offset + start
            before = (labels >= offset) & (labels < first)
            s_old = _with_label(rest, y_label, select(jnp.isfinite(m), m, 0.0), before)
            here = (labels >= first) & (labels < first + size)
            label_term = _moment_terms(jnp.exp(picked - shift), picked - shift)
            u = _moved_moment(u, s_old, m, shift, decay) + moment + select(here, label_term, 0.0)
            # Strictly greater: on a tie the earlier (lower) index stays.
            extra = (u, select(m_new > m, first + top, best))
        if cap is not None:
            # Capped logits are not linear in w: their sum is accumulated.
            y_sum = y_sum + jnp.sum(y, axis=1)
        return m_new, rest_new, y_label + picked, y_sum, *extra

    carry = (jnp.full((n,), -jnp.inf, acc), *(jnp.zeros((n,), acc) for _ in range(3)))
    if stats:
        carry = (*carry, jnp.zeros((n,), acc), jnp.full((n,), -1, jnp.int32))
    # Under shard_map, the loop state varies over whatever the chunks vary over.
    axes = vc.vma(h, w, bias, labels, inv_t, cap)
    carry = tuple(vc.varying(c, axes) for c in carry)
    m, rest, y_label, y_sum, *extra = vc.over_chunks(step, carry, v_local, chunk)
    if axis_name is not None:
        m_global, shift = vc.global_shift(axis_name, m)
        decay = jnp.exp(m - shift)
        rest_local = rest
        rest = lax.psum(rest * decay, axis_name)
        if stats:
            u, best = extra
            local = vc.label_index(axis_name, v_local, labels)[1]
            s = _with_label(rest_local, y_label, select(jnp.isfinite(m), m, 0.0), local)
            u = lax.psum(_moved_moment(u, s, m, shift, decay), axis_name)
            # The lowest global index among the shards that hold the maximum.
            big = jnp.iinfo(jnp.int32).max
            best = lax.pmin(select(m == m_global, best, big), axis_name)
            extra = (u, select(best == big, -1, best))
        m = m_global

    # The label's logit (0 if out of range, from the one shard that has it).
    y_label = vc.psum(y_label, axis_name)
    valid = vc.label_index(axis_name, v_local, labels)[2]

    # lse - y_label = log(rest * exp(m - y_label) + 1). m - y_label is 0 when
    # the label is the maximum (both are the same chunk logit); when it is
    # far below, log(rest) + (m - y_label) avoids overflowing exp.
    d = select(jnp.isfinite(m), m, 0.0) - y_label
    near = d < 30.0
    gap = select(
        near,
        jnp.log1p(rest * jnp.exp(select(near, d, 0.0))),
        d + jnp.log(rest + jnp.exp(-select(near, 30.0, d))),
    )
    # The logsumexp itself from the max: y_label + gap would carry the rounding
    # of the label's logit (ulp of |y_label|) into every probability of the
    # backward pass, and a label far below the max has a large |y_label|.
    # (An out-of-range label left ``rest`` whole: nothing to add back.)
    top = select(jnp.isfinite(m), m, 0.0)
    total = _with_label(rest, y_label, top, valid)
    lse = top + jnp.log(total)

    if cap is None:
        # Without a cap the sum of the logits comes straight from the
        # weights' row sums (and the bias's sum).
        # (An elementwise product, not a matmul: XLA:CPU would convert a
        # 16-bit ``hidden`` to float32 whole for a mixed-dtype matmul.)
        y_sum = jnp.sum(h * jnp.sum(w, axis=1, dtype=acc), axis=1)
        if bias is not None:
            y_sum = y_sum + jnp.sum(bias, dtype=acc)
        if inv_t is not None:
            y_sum = y_sum * inv_t.reshape(inv_t.shape[:1])
    y_sum = vc.psum(y_sum, axis_name)
    if stats:
        u, best = extra
        # A NaN logit makes its row's statistics NaN and its argmax -1.
        nan_row = jnp.isnan(lse)
        extra = (select(nan_row, jnp.nan, _entropy_of(total, u)), select(nan_row, -1, best))
    return lse, gap, y_label, y_sum, valid, tuple(extra)


def _combine(lse, gap, y_label, y_sum, valid, mask, alpha, z_loss, vocab):
    """The per-example loss from the forward's per-example numbers:
    lse - (1 - a) y_label - (a / V) y_sum + z lse**2, grouped so that the
    cross-entropy ``gap`` keeps its own precision."""
    # Without smoothing the sum of the logits plays no part, not even a -inf
    # one (an excluded class): 0, not 0 * -inf.
    # A -inf logit (an excluded class) in the sum costs +inf, as the unfused
    # loss's smoothed labels do, also when the label's own logit is -inf.
    smoothing = select(
        alpha == 0, 0.0, select(y_sum == -jnp.inf, jnp.inf, alpha * (y_label - y_sum / vocab))
    )
    loss = gap + smoothing + z_loss * lse * lse
    # Every class excluded (lse = -inf): 0 whatever the label, as in the
    # unfused loss; an out-of-range label otherwise NaN.
    loss = select(lse == -jnp.inf, 0.0, select(valid, loss, jnp.nan))
    if mask is not None:
        loss = select(mask, loss, 0.0)
    return loss


# The custom derivative.


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss):
    out, _ = _fused_fwd(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss)
    return out


def _fused_fwd(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss):
    """The loss, and with ``stats`` also ``(lse, entropy, argmax)`` per example."""
    lse, gap, y_label, y_sum, valid, extra = _forward(
        chunk, axis_name, h, w, bias, labels, vc.inverse(t), cap, mask, stats
    )
    vocab = vc.vocab_size(axis_name, w.shape[1])
    loss = _combine(lse, gap, y_label, y_sum, valid, mask, alpha, z_loss, vocab)
    ok = vc.valid_options(t, cap)
    if ok is not None:
        loss = select(ok, loss, jnp.nan)
    entropy = None
    out = loss
    if stats:
        entropy, argmax = extra
        # The statistics do not depend on the label: an out-of-range one
        # leaves them defined. An excluded example gives 0, 0 and -1.
        lse_out, ent_out = lse, entropy
        if ok is not None:
            lse_out, ent_out = select(ok, lse_out, jnp.nan), select(ok, ent_out, jnp.nan)
        if mask is not None:
            lse_out, ent_out = select(mask, lse_out, 0.0), select(mask, ent_out, 0.0)
            argmax = select(mask, argmax, -1)
        out = (loss, lse_out, ent_out, argmax)
    residuals = (
        h, w, bias, labels, t, cap, mask, alpha, z_loss, lse, y_label, y_sum, valid, entropy
    )
    return out, residuals


def _fused_bwd(chunk, axis_name, stats, residuals, cotangent):
    h, w, bias, labels, t, cap, mask, alpha, z_loss, lse, y_label, y_sum, valid, ent = residuals
    vc.check_vma(_NAME, axis_name, w)
    v_local = w.shape[1]
    vocab = vc.vocab_size(axis_name, v_local)
    offset = vc.shard_offset(axis_name, v_local)
    inv_t = vc.row_inverse(t, h.shape[0])
    acc = vc.acc_dtype(h.dtype)
    g, g_lse, g_ent = (c.astype(acc) for c in cotangent[:3]) if stats else (cotangent, 0, 0)
    g = g.astype(acc)
    # d loss / d y_j = g * ((1 + 2 z lse) p_j - (1 - alpha) [j == label] - alpha / V)
    # As in the unfused loss: an out-of-range label (NaN loss), every class
    # excluded (0) and an infinite loss (the label's class excluded, or any
    # class under smoothing) are constants, with zero gradients.
    nothing = lse == -jnp.inf
    infinite = (y_label == -jnp.inf) | ((alpha != 0) & (y_sum == -jnp.inf))
    g = select(valid & ~nothing & ~infinite, g, 0.0)
    if stats:
        g_lse, g_ent = select(nothing, 0.0, g_lse), select(nothing, 0.0, g_ent)
    lse = select(nothing, 0.0, lse)  # p = exp(-inf - 0) = 0 there, not NaN
    if mask is not None:
        g = select(mask, g, 0.0)
        h = select(mask[:, None], h, jnp.zeros((), h.dtype))
    a = g * (1 + 2 * z_loss * lse)
    if stats:
        # d lse / d y_j = p_j and d H / d y_j = -p_j (log p_j + H): the
        # statistics' cotangents join the loss's in the same chunk cotangent.
        if mask is not None:
            g_lse, g_ent = select(mask, g_lse, 0.0), select(mask, g_ent, 0.0)
        a = a + g_lse - g_ent * ent
        g_ent_col = g_ent[:, None]
    a = a[:, None]
    b = (g * (1 - alpha))[:, None]
    e = (g * (alpha / vocab))[:, None]
    lse_col = lse[:, None]
    h_t = vc.transposed_once(h)

    def step(carry, start, size):
        # h_t too: else, in a loop XLA unrolls, its transpose would be folded
        # into a 16-bit matmul that XLA:CPU cannot run.
        w_c, bias_c, h_t_c = per_chunk(start, w, bias, h_t)
        y, z, th = vc.chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)
        log_p = y - lse_col
        p = jnp.exp(log_p)
        cols = offset + start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        dy = a * p - select(cols == labels[:, None], b, 0.0) - e
        if stats:
            dy = dy - g_ent_col * _moment_terms(p, log_p)
        return vc.grad_step(carry, dy, y, z, th, cap, inv_t, h, h_t_c, w_c, bias, start, size)

    axes = vc.vma(h, w, bias, labels, inv_t, cap, a, b, e, *([g_ent] if stats else []))
    carry = tuple(vc.varying(c, axes) for c in vc.grad_carry(h, w, bias))
    dh, dw, db, ty, tc = vc.over_chunks(step, carry, v_local, chunk)
    dh, dt, d_cap = vc.grad_outputs(axis_name, t, cap, dh, ty, tc)
    # The options' own derivatives are cheap: both are per-example numbers.
    # An excluded class makes the smoothing term a constant +inf: no derivative.
    smooth = y_label - y_sum / vocab
    d_alpha = jnp.sum(g * select(jnp.isfinite(smooth), smooth, 0.0)).astype(alpha.dtype)
    d_z = jnp.sum(g * lse * lse).astype(z_loss.dtype)
    db = None if bias is None else db
    return dh.astype(h.dtype), dw, db, None, dt, d_cap, None, d_alpha, d_z


_fused.defvjp(_fused_fwd, _fused_bwd)


# The public function: checks on static information, then one jitted call.


class FusedStats(NamedTuple):
    """Per-example statistics of the logits ``y`` of
    :func:`fused_linear_cross_entropy` (its ``return_stats=True``), each of
    the labels' shape: ``logsumexp`` (log sum_j exp y_j), ``entropy``
    (-sum_j p_j log p_j in nats, p = softmax(y)) and ``argmax`` (the class of
    the largest logit, the lowest index on ties; int32). An example excluded
    by ``where`` has 0, 0 and -1."""

    logsumexp: jax.Array
    entropy: jax.Array
    argmax: jax.Array


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _fused_jit(
    chunk, axis_name, batch, dtype, reduction, stats,
    h, w, bias, labels, where, t, cap, alpha, zeta, weights,
):
    """Everything a call does on the device, in one computation: the casts
    and reshapes to [N, D] rows, the temperature per row, the loss, its
    weights and reduction (and the statistics, per example)."""
    acc = vc.acc_dtype(dtype)
    h2, w, bias = vc.rows(batch, dtype, h, w, bias)
    n = h2.shape[0]
    # Widened, never narrowed: an int64 label must not wrap into range.
    lab = widen_labels(jnp.asarray(labels)).reshape(n)
    mask, t, cap = vc.row_options(_NAME, batch, w.shape[1], where, t, cap, acc)
    alpha, zeta = jnp.asarray(alpha).astype(acc), jnp.asarray(zeta).astype(acc)
    # A jax array is checked here, never read back: out of range gives NaN.
    alpha = select((alpha >= 0) & (alpha <= 1), alpha, jnp.nan)
    zeta = select(zeta >= 0, zeta, jnp.nan)
    (w,), (bias,), (h2, lab, t, cap, mask, alpha, zeta) = vc.vary(
        _NAME, axis_name, {"weight": w}, (bias,), (h2, lab, t, cap, mask, alpha, zeta)
    )
    out = _fused(chunk, axis_name, stats, h2, w, bias, lab, t, cap, mask, alpha, zeta)
    loss = out[0] if stats else out
    if weights is not None:
        weights = jnp.broadcast_to(jnp.asarray(weights).astype(acc), batch).reshape(n)
    loss = vc.reduce(loss, mask, weights, reduction)
    loss = (loss if reduction != "none" else loss.reshape(batch)).astype(dtype)
    if not stats:
        return loss
    lse, ent, argmax = (x.reshape(batch) for x in out[1:])
    return loss, FusedStats(lse.astype(dtype), ent.astype(dtype), argmax)


def fused_linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    temperature: ArrayLike = 1.0,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    axis_name: AxisName | None = None,
    bias: ArrayLike | None = None,
    logit_soft_cap: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    reduction: str = "none",
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, FusedStats]:
    r"""Cross-entropy of ``hidden @ weight`` without materialising the logits.

    .. math::
        \ell_n = \mathrm{lse}(y_n) - \sum_j q_{nj} y_{nj} + \zeta\, \mathrm{lse}(y_n)^2,
        \quad y_n = \frac{c \tanh((h_n W + b) / c)}{t},
        \quad q_n = (1 - \alpha)\, e_{\mathrm{label}_n} + \frac{\alpha}{V}

    Equal, in value and in gradients with respect to ``hidden``, ``weight``,
    ``bias``, ``temperature``, ``label_smoothing``, ``z_loss``,
    ``logit_soft_cap`` and ``weights``, to the unfused
    ``softmax_cross_entropy_with_integer_labels(logits, labels,
    temperature=..., label_smoothing=...)`` plus the z-loss on ``logits =
    c * tanh((hidden @ weight + bias) / c)`` (or ``hidden @ weight + bias``
    without a cap), times ``weights`` and reduced, but the [N, V]
    logits never exist: the vocabulary is processed ``chunk_size`` columns
    at a time with an online logsumexp, and the backward pass recomputes each
    chunk's logits. Temporary memory is O(N * chunk_size) instead of O(N * V);
    the price is one more matmul (the recomputation) in the backward pass.

    Label smoothing is ``optax.smooth_labels`` followed by the soft-label
    cross-entropy. The z-loss (PaLM) adds ``z_loss * lse(logits / t) ** 2``
    per example. Masked examples give loss 0 and zero gradients; a label
    outside ``[0, V)`` on an included example gives NaN, never a silently
    wrong number (and, as in the unfused loss, zero gradient). bfloat16 / float16 inputs go into the
    matmuls as they are, with float32 accumulation and a float32 logsumexp;
    the loss is returned in the inputs' dtype. The matmuls use JAX's default
    matmul precision: on recent NVIDIA GPUs float32 inputs are multiplied in
    TF32 unless ``jax.default_matmul_precision("highest")`` is set (as for
    ``hidden @ weight`` in the unfused loss). The derivatives are a custom
    VJP: reverse mode (``jax.grad``, ``jax.vjp``) only, not ``jax.jvp``.

    Args:
      hidden: [N, D] activations (or [..., D]; leading axes are the batch).
      weight: [D, V] output projection.
      labels: integer class indices of shape [N] (``hidden.shape[:-1]``).
      where: optional boolean mask of the labels' shape; False excludes the
        example (loss 0, zero gradients).
      chunk_size: vocabulary columns per chunk, a positive int. None picks a
        power of two with about 2**21 logits per chunk (N * chunk_size), at
        least 256 and at most V. V need not be a multiple of it.
      temperature: t > 0 dividing the logits, a scalar or one per example.
        (The limits t = 0 and t = inf of :func:`jsoftmax.log_softmax` are not
        supported here: a Python or NumPy one raises ValueError; one in a
        JAX array, traced or not, gives NaN.)
      label_smoothing: alpha in [0, 1].
      z_loss: coefficient >= 0 of the squared logsumexp. Out of range (this
        and ``label_smoothing``): ValueError, or NaN from a jax array.
      axis_name: name of a mesh axis (inside ``jax.shard_map``) over which
        ``weight``'s vocabulary axis is sharded. ``hidden``, ``labels``,
        ``where`` and ``weights`` are then the same on every shard of that
        axis, labels are global class indices, and the result is the loss
        over the whole vocabulary (Megatron-style vocab-parallel
        cross-entropy). The gradients of ``weight`` and ``bias`` stay
        sharded.
      bias: optional [V] bias added to ``hidden @ weight``; with
        ``axis_name``, each shard's slice of it (sharded like ``weight``'s
        columns, e.g. ``in_specs=P("v")``). A -inf entry excludes its class
        (probability 0, zero gradients), as a -inf logit does in the
        unfused loss; label smoothing then gives +inf, its target being
        spread over every class. Under ``logit_soft_cap`` a -inf entry is
        capped to -c like any other logit, so it does not exclude its class.
        +inf entries (or +inf ``hidden``) are not supported: they give NaN.
      logit_soft_cap: c > 0 caps the logits smoothly to (-c, c) as
        ``c * tanh(logits / c)`` (Gemma 2's final-logit soft-capping, c =
        30), before the temperature, the loss, the z-loss and the smoothing.
        None or 0 (and inf, the identity's limit) switch it off. A negative
        or NaN Python or NumPy value raises ValueError; one in a JAX array is
        never read back and gives NaN.
      weights: optional per-example weights, broadcastable to
        ``labels.shape``, multiplying each example's loss (and so its
        gradient). Masked examples contribute 0 whatever their weight.
      reduction: "none" (the per-example losses), "sum" (of the weighted
        losses) or "mean": that sum divided by the sum of the included
        examples' weights (their count without ``weights``), and 0 with zero
        gradients when nothing is included. With the batch sharded over
        another mesh axis, "sum" and "mean" reduce this shard's examples.
      return_stats: also return, from the same chunked pass, the
        :class:`~jsoftmax.fused.FusedStats` of the logits ``y`` above (cap,
        bias and temperature included) per example, whatever the
        ``reduction``: ``logsumexp`` :math:`\mathrm{lse}(y_n)`, ``entropy``
        :math:`H_n = \mathrm{lse}(y_n) - \sum_j p_{nj} y_{nj}`, ``p =
        softmax(y_n)``, and ``argmax`` (a global class index under
        ``axis_name``). ``logsumexp`` and ``entropy`` have exact gradients
        with respect to ``hidden``, ``weight``, ``bias``, ``temperature``
        and ``logit_soft_cap``, computed in the loss's backward pass; the
        statistics do not depend on the labels. Only per-example vectors are
        added to the memory, and the loss is bit for bit the one without
        them.

    Returns:
      The per-example loss, shape ``labels.shape`` (a scalar for "sum" and
      "mean"), in the dtype of ``hidden @ weight + bias``; with
      ``return_stats``, the pair ``(loss, stats)``.

    Examples:
      >>> import jsoftmax
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> weight = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
      >>> jsoftmax.fused_linear_cross_entropy(hidden, weight, jnp.array([0, 1]), chunk_size=2)
      Array([0.5514447 , 0.14293163], dtype=float32)
      >>> jsoftmax.fused_linear_cross_entropy(
      ...     hidden, weight, jnp.array([0, 1]), where=jnp.array([True, False]))
      Array([0.5514447, 0.       ], dtype=float32)
      >>> jsoftmax.fused_linear_cross_entropy(
      ...     hidden, weight, jnp.array([0, 1]), bias=jnp.array([0.0, 0.5, 0.0]),
      ...     logit_soft_cap=1.0, weights=jnp.array([1.0, 3.0]), reduction="mean")
      Array(0.5096075, dtype=float32)
      >>> loss, stats = jsoftmax.fused_linear_cross_entropy(
      ...     hidden, weight, jnp.array([0, 1]), return_stats=True)
      >>> bool(jnp.allclose(stats.entropy, jsoftmax.entropy(hidden @ weight)))
      True
      >>> stats.argmax
      Array([0, 1], dtype=int32)
    """
    # Checks on static information only: the device work is one jitted call.
    h, w, dtypes = vc.check_linear(_NAME, hidden, weight)
    lab = host_array(labels)
    if not jnp.issubdtype(lab.dtype, jnp.integer):
        raise TypeError(
            f"{_NAME}: labels must be integer class indices; got dtype {lab.dtype}. "
            "For soft (probability) labels use the unfused softmax_cross_entropy")
    batch = tuple(h.shape[:-1])
    if tuple(lab.shape) != batch:
        raise ValueError(
            f"{_NAME}: labels has shape {tuple(lab.shape)} but hidden {tuple(h.shape)} has "
            f"batch shape {batch}; give one label per row of hidden")
    mask, t, cap, weights = vc.check_options(
        _NAME, batch, where, chunk_size, axis_name, temperature, logit_soft_cap, weights,
        reduction,
    )
    for arg, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if np.ndim(value) != 0:
            raise ValueError(f"{_NAME}: {arg} must be a scalar; got shape {np.shape(value)}")
    alpha = concrete(_NAME, "label_smoothing", label_smoothing, 0.0, 1.0,
                     hint=" (0 = no smoothing)")
    zeta = concrete(_NAME, "z_loss", z_loss, hint=" (0 = no z-loss; PaLM uses 1e-4)")
    b, b_dtype = vc.check_bias(_NAME, bias, w.shape)
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"{_NAME}: return_stats must be True or False; got {return_stats!r}")
    dtype = jnp.dtype(jnp.result_type(*dtypes, *([b_dtype] if b is not None else [])))
    v = w.shape[1]
    n = int(np.prod(batch, dtype=np.int64))
    chunk = vc.default_chunk_size(n, v) if chunk_size is None else int(min(chunk_size, v))
    return _fused_jit(
        chunk, axis_name, batch, dtype, reduction, bool(return_stats),
        h, w, b, lab, mask, t, cap, alpha, zeta, weights,
    )
