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

from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax._checks import (
    dtype_of,
    host_array,
    is_traced,
    mask_spec,
    shaped_mask,
    shaped_temperature,
    temperature_spec,
    weights_spec,
    widen_labels,
)
from jsoftmax._normalise import select
from jsoftmax._xla_cpu import per_chunk
from jsoftmax.core import AxisName

__all__ = ["FusedStats", "fused_linear_cross_entropy"]

_NAME = "fused_linear_cross_entropy"
_F32 = jnp.float32

# Default number of logits per chunk (rows x columns): 8 MiB of float32 for each
# [N, chunk] temporary, which stays in a CPU's last-level cache; larger chunks
# were slower on CPU and no smaller in the loop overhead (benchmarks/fused.py).
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK = 256


def _default_chunk_size(n: int, v: int) -> int:
    """A power of two near ``_CHUNK_ELEMENTS / n``, at least 256, at most ``v``."""
    target = max(_CHUNK_ELEMENTS // max(n, 1), _MIN_CHUNK)
    chunk = 1 << (target.bit_length() - 1)
    return int(min(chunk, v))


def _acc(dtype):
    """The accumulation dtype: float32 for 16-bit inputs, else the input's own."""
    return jnp.promote_types(dtype, _F32)


def _dot(a, b):
    """``a @ b`` accumulated in at least float32 (operands keep their dtype)."""
    return jnp.matmul(a, b, preferred_element_type=_acc(a.dtype))


def _dot_nt(a, b):
    """``a @ b.T`` accumulated in at least float32, without materialising ``b.T``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_acc(a.dtype))


def _dot_tn(a, a_t, b):
    """``a.T @ b`` accumulated in at least float32; ``a_t`` is ``a.T`` made
    once by :func:`_transposed_once`, or None to contract ``a`` in place."""
    if a_t is not None:
        return _dot(a_t, b)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_acc(a.dtype))


def _transposed_once(a):
    """``a.T`` as an array of its own for 16-bit ``a``, else None.

    XLA:CPU multiplies bfloat16 natively only with the contracted axis last
    in the left operand; otherwise it converts both operands to float32
    first, i.e. all of ``hidden``. One 16-bit transposed copy, made outside
    the chunk loop, costs half of that and no time per chunk.
    """
    return a.T if jnp.dtype(a.dtype).itemsize < 4 else None


def _shard_offset(axis_name, v_local):
    """Global index of this shard's first vocabulary column (0 unsharded)."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * v_local


def _axis_names(axis_name):
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def _vocab_size(axis_name, v_local):
    if axis_name is None:
        return v_local
    return v_local * lax.axis_size(axis_name)


def _vma(*xs):
    """The mesh axes (inside ``jax.shard_map``) that any of ``xs`` varies over."""
    axes = set()
    for x in xs:
        if x is None:
            continue
        aval = jax.typeof(x)
        varying = getattr(aval, "vma", None)  # jax < 0.9
        if varying is None:
            varying = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
        axes |= set(varying)
    return frozenset(axes)


def _varying(x, axes):
    """``x`` marked as varying over ``axes`` (a no-op outside shard_map)."""
    if x is None:
        return None
    missing = tuple(sorted(set(axes) - _vma(x), key=str))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)  # jax < 0.8


def _over_chunks(step, carry, v_local, chunk):
    """Runs ``carry = step(carry, start, size)`` over the vocabulary: a
    fori_loop over the full chunks, then the remainder once."""
    count, remainder = divmod(v_local, chunk)
    if count:
        carry = lax.fori_loop(0, count, lambda i, c: step(c, i * chunk, chunk), carry)
    if remainder:
        # A loop of one trip too: XLA:CPU then sees the remainder's operands
        # as loop values, and multiplies them in 16 bits as in the loop above.
        carry = lax.fori_loop(0, 1, lambda _, c: step(c, count * chunk, remainder), carry)
    return carry


def _cols(x, start, size):
    """Columns ``start:start + size`` of ``x``'s last (vocabulary) axis."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _linear(h, w, bias, start, size):
    """The chunk ``h @ w + bias`` of the raw logits, in the accumulation dtype."""
    z = _dot(h, _cols(w, start, size))
    if bias is not None:
        z = z + _cols(bias, start, size).astype(z.dtype)
    return z


def _chunk_logits(h, w_c, bias_c, start, size, cap, inv_t):
    """``(y, z, th)`` of a chunk: the scaled logits ``y = cap(z) * inv_t``, the
    raw ``z = h @ w + bias`` and :func:`_soft_cap`'s tanh."""
    z = _linear(h, w_c, bias_c, start, size)
    capped, th = _soft_cap(z, cap)
    return (capped if inv_t is None else capped * inv_t), z, th


def _cap_on(cap):
    """Whether capping applies: 0 and inf (the identity's limit) switch it off."""
    return (cap > 0) & jnp.isfinite(cap)


def _soft_cap(z, cap):
    """``cap * tanh(z / cap)`` and the tanh (None when there is no cap)."""
    if cap is None:
        return z, None
    on = _cap_on(cap)
    c = select(on, cap, 1.0)
    th = jnp.tanh(z / c)
    return select(on, c * th, z), th


def _soft_cap_grads(z, th, cap):
    """``(d capped / d z, d capped / d cap)`` from :func:`_soft_cap`'s tanh."""
    on = _cap_on(cap)
    # 1 - tanh**2 as a product keeps a little more accuracy near |tanh| = 1.
    slope = (1.0 - th) * (1.0 + th)
    # An excluded (-inf) logit is capped to -c, where slope is 0: u * slope
    # -> 0, which the clamp keeps from being -inf * 0.
    big = jnp.finfo(z.dtype).max
    u = jnp.clip(z / select(on, cap, 1.0), -big, big)
    return select(on, slope, 1.0), select(on, th - u * slope, 0.0)


# --------------------------------------------------------------------------
# The forward pass: online logsumexp over vocabulary chunks.
# --------------------------------------------------------------------------


def _online_step(m, y):
    """One chunk of an online logsumexp over the rows of ``y``: the new
    running maximum, the shift the sums are kept at (0 while nothing finite
    has been seen), ``exp(y - shift)`` and ``exp(m - shift)``, the factor that
    moves the sums of the chunks seen so far onto the new shift."""
    m_new = jnp.maximum(m, jnp.max(y, axis=1))
    shift = select(jnp.isfinite(m_new), m_new, 0.0)
    return m_new, shift, jnp.exp(y - shift[:, None]), jnp.exp(m - shift)


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


def _global_shift(axis_name, m):
    """The maximum over the shards and the shift the summed sums are kept at."""
    m_global = lax.pmax(m, axis_name)
    return m_global, select(jnp.isfinite(m_global), m_global, 0.0)


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
    acc = _acc(h.dtype)
    offset = _shard_offset(axis_name, v_local)
    if mask is not None:
        # Masked rows compute on zeros, so a NaN there cannot leak anywhere.
        h = select(mask[:, None], h, jnp.zeros((), h.dtype))

    def step(carry, start, size):
        m, rest, y_label, y_sum, *extra = carry
        w_c, bias_c = per_chunk(start, w, bias)
        y = _chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)[0]
        m_new, shift, exps, decay = _online_step(m, y)
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
    axes = _vma(h, w, bias, labels, inv_t, cap)
    carry = tuple(_varying(c, axes) for c in carry)
    m, rest, y_label, y_sum, *extra = _over_chunks(step, carry, v_local, chunk)
    if axis_name is not None:
        m_global, shift = _global_shift(axis_name, m)
        decay = jnp.exp(m - shift)
        rest_local = rest
        rest = lax.psum(rest * decay, axis_name)
        if stats:
            u, best = extra
            local = (labels >= offset) & (labels < offset + v_local)
            s = _with_label(rest_local, y_label, select(jnp.isfinite(m), m, 0.0), local)
            u = lax.psum(_moved_moment(u, s, m, shift, decay), axis_name)
            # The lowest global index among the shards that hold the maximum.
            big = jnp.iinfo(jnp.int32).max
            best = lax.pmin(select(m == m_global, best, big), axis_name)
            extra = (u, select(best == big, -1, best))
        m = m_global

    # The label's logit (0 if out of range, from the one shard that has it).
    y_label = _psum(y_label, axis_name)
    valid = (labels >= 0) & (labels < _vocab_size(axis_name, v_local))

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
    y_sum = _psum(y_sum, axis_name)
    if stats:
        u, best = extra
        extra = (_entropy_of(total, u), best)
    return lse, gap, y_label, y_sum, valid, tuple(extra)


def _combine(lse, gap, y_label, y_sum, valid, mask, alpha, z_loss, vocab):
    """The per-example loss from the forward's per-example numbers:
    lse - (1 - a) y_label - (a / V) y_sum + z lse**2, grouped so that the
    cross-entropy ``gap`` keeps its own precision."""
    # Without smoothing the sum of the logits plays no part, not even a -inf
    # one (an excluded class): 0, not 0 * -inf.
    smoothing = select(alpha == 0, 0.0, alpha * (y_label - y_sum / vocab))
    loss = gap + smoothing + z_loss * lse * lse
    loss = select(valid, loss, jnp.nan)
    if mask is not None:
        loss = select(mask, loss, 0.0)
    return loss


# --------------------------------------------------------------------------
# The backward pass's steps, shared with the fused divergence.
# --------------------------------------------------------------------------


def _check_vma(name, axis_name, w):
    """Refuses gradients under shard_map without the varying-axes types: the
    cotangent could not be told apart from a replicated one, and the weight
    gradient would come out scaled."""
    if axis_name is not None and not set(_axis_names(axis_name)) <= _vma(w):
        raise ValueError(
            f"{name}: gradients with axis_name={axis_name!r} need jax.shard_map with "
            "check_vma=True (the default) and weight sharded over that axis"
        )


def _row_inverse(t, n):
    """1 / t as a scalar or an [N, 1] column (None without a temperature)."""
    inv_t = _inverse(t)
    return inv_t if inv_t is None or inv_t.ndim == 0 else inv_t.reshape(n, 1)


def _grad_carry(h, w, bias):
    """Zeros for :func:`_grad_step`'s ``(dh, dw, db, ty, tc)``."""
    acc = _acc(h.dtype)
    return (
        jnp.zeros(h.shape, acc),
        jnp.zeros(w.shape, w.dtype),
        jnp.zeros(() if bias is None else bias.shape, w.dtype if bias is None else bias.dtype),
        jnp.zeros(h.shape[:1], acc),
        jnp.zeros(h.shape[:1], acc),
    )


def _option_grads(dy, y, z, th, cap, inv_t, ty, tc):
    """``d out / d z`` from a chunk's ``dy = d out / d y`` (y the scaled
    logits), and the per-example sums ``ty`` and ``tc`` that give the
    temperature's and the cap's gradients."""
    if inv_t is not None:
        # d y / d capped = 1 / t. An excluded (-inf) logit has dy = 0: the
        # clamp keeps 0 * -inf out of the sum (a select would cost XLA:CPU
        # a stored [N, chunk] array).
        dy = dy * inv_t
        ty = ty + jnp.sum(dy * jnp.maximum(y, jnp.finfo(y.dtype).min), axis=1)
    if cap is not None:
        # Through the cap: d capped / d z = 1 - tanh(z / c)**2.
        slope, d_cap = _soft_cap_grads(z, th, cap)
        tc = tc + jnp.sum(dy * d_cap, axis=1)
        dy = dy * slope
    return dy, ty, tc


def _grad_step(carry, dy, y, z, th, cap, inv_t, h, h_t_c, w_c, bias, start, size):
    """Adds a chunk's ``dy = d out / d y`` into ``(dh, dw, db, ty, tc)``: the
    gradients of hidden, weight and bias, and the per-example sums of
    :func:`_option_grads`."""
    dh, dw, db, ty, tc = carry
    dy, ty, tc = _option_grads(dy, y, z, th, cap, inv_t, ty, tc)
    dz = dy.astype(w_c.dtype)
    dh = dh + _dot_nt(dz, _cols(w_c, start, size))
    dw_c = _dot_tn(h, h_t_c, dz.astype(h.dtype)).astype(dw.dtype)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
    if bias is not None:
        db_c = jnp.sum(dy, axis=0).astype(bias.dtype)
        db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
    return dh, dw, db, ty, tc


def _grad_outputs(axis_name, t, cap, dh, ty, tc):
    """hidden's gradient summed over the shards, and the temperature's and
    the cap's from their per-example sums."""
    dh = _psum(dh, axis_name)
    dt = None
    if t is not None:
        # y = z / t, so d out / d t = -sum_j (d out / d y_j) y_j / t (ty
        # holds the sum with the 1 / t folded in).
        dt_rows = -_psum(ty, axis_name)
        dt = jnp.sum(dt_rows) if t.ndim == 0 else dt_rows.reshape(t.shape)
        dt = dt.astype(t.dtype)
    d_cap = None if cap is None else jnp.sum(_psum(tc, axis_name)).astype(cap.dtype)
    return dh, dt, d_cap


# --------------------------------------------------------------------------
# The custom derivative.
# --------------------------------------------------------------------------


def _valid_options(t, cap):
    """Per example, whether the temperature and the cap are valid (None when
    both are static): a traced t <= 0, inf or NaN, or a negative or NaN cap,
    gives NaN."""
    ok = None
    if t is not None:
        ok = (t > 0) & jnp.isfinite(t)
        ok = ok.reshape(ok.shape[:1]) if ok.ndim else ok
    if cap is not None:
        ok = cap >= 0 if ok is None else ok & (cap >= 0)
    return ok


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss):
    out, _ = _fused_fwd(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss)
    return out


def _inverse(t):
    return None if t is None else 1.0 / t


def _fused_fwd(chunk, axis_name, stats, h, w, bias, labels, t, cap, mask, alpha, z_loss):
    """The loss, and with ``stats`` also ``(lse, entropy, argmax)`` per example."""
    lse, gap, y_label, y_sum, valid, extra = _forward(
        chunk, axis_name, h, w, bias, labels, _inverse(t), cap, mask, stats
    )
    vocab = _vocab_size(axis_name, w.shape[1])
    loss = _combine(lse, gap, y_label, y_sum, valid, mask, alpha, z_loss, vocab)
    ok = _valid_options(t, cap)
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
    _check_vma(_NAME, axis_name, w)
    v_local = w.shape[1]
    vocab = _vocab_size(axis_name, v_local)
    offset = _shard_offset(axis_name, v_local)
    inv_t = _row_inverse(t, h.shape[0])
    acc = _acc(h.dtype)
    g, g_lse, g_ent = (c.astype(acc) for c in cotangent[:3]) if stats else (cotangent, 0, 0)
    g = g.astype(acc)
    # d loss / d y_j = g * ((1 + 2 z lse) p_j - (1 - alpha) [j == label] - alpha / V)
    # An out-of-range label: NaN loss, zero gradient, as in the unfused loss.
    g = select(valid, g, 0.0)
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
    h_t = _transposed_once(h)

    def step(carry, start, size):
        # h_t too: else, in a loop XLA unrolls, its transpose would be folded
        # into a 16-bit matmul that XLA:CPU cannot run.
        w_c, bias_c, h_t_c = per_chunk(start, w, bias, h_t)
        y, z, th = _chunk_logits(h, w_c, bias_c, start, size, cap, inv_t)
        log_p = y - lse_col
        p = jnp.exp(log_p)
        cols = offset + start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        dy = a * p - select(cols == labels[:, None], b, 0.0) - e
        if stats:
            dy = dy - g_ent_col * _moment_terms(p, log_p)
        return _grad_step(carry, dy, y, z, th, cap, inv_t, h, h_t_c, w_c, bias, start, size)

    axes = _vma(h, w, bias, labels, inv_t, cap, a, b, e, *([g_ent] if stats else []))
    carry = tuple(_varying(c, axes) for c in _grad_carry(h, w, bias))
    dh, dw, db, ty, tc = _over_chunks(step, carry, v_local, chunk)
    dh, dt, d_cap = _grad_outputs(axis_name, t, cap, dh, ty, tc)
    # The options' own derivatives are cheap: both are per-example numbers.
    d_alpha = jnp.sum(g * (y_label - y_sum / vocab)).astype(alpha.dtype)
    d_z = jnp.sum(g * lse * lse).astype(z_loss.dtype)
    db = None if bias is None else db
    return dh.astype(h.dtype), dw, db, None, dt, d_cap, None, d_alpha, d_z


_fused.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------
# The public function: checks on static information, then one jitted call.
# --------------------------------------------------------------------------

_REDUCTIONS = ("none", "sum", "mean")


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


def _reduce(loss, mask, weights, reduction):
    """Weights and reduction of the per-example loss, in plain JAX (autodiff
    carries the weights into the custom derivative's cotangent)."""
    if weights is not None:
        loss = loss * weights
        if mask is not None:
            # An excluded example contributes nothing, whatever its weight.
            loss = select(mask, loss, 0.0)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    count = jnp.ones(loss.shape, loss.dtype) if weights is None else weights
    if mask is not None:
        count = select(mask, count, 0.0)
    count = jnp.sum(count)
    # Nothing included (or zero total weight): 0 with zero gradients, not 0 / 0.
    empty = count == 0
    return select(empty, 0.0, total / select(empty, 1.0, count))


def _rows(batch, dtype, h, w, bias):
    """hidden as [N, D] rows, weight and bias, cast to ``dtype``."""
    h, w = jnp.asarray(h).astype(dtype), jnp.asarray(w).astype(dtype)
    bias = None if bias is None else jnp.asarray(bias).astype(dtype)
    n = int(np.prod(batch, dtype=np.int64))
    return h.reshape(n, w.shape[0]), w, bias


def _row_options(batch, v, layout, where, t, cap, acc):
    """The mask per row, the temperature (a scalar or an [N, 1] column) and
    the cap, in the accumulation dtype."""
    n = int(np.prod(batch, dtype=np.int64))
    mask = shaped_mask(where, batch)
    mask = None if mask is None else mask.reshape(n)
    t = shaped_temperature(t, layout, (*batch, v), (len(batch),), acc)
    if t is not None and t.ndim:
        t = jnp.broadcast_to(t, (*batch, 1)).reshape(n, 1)
    cap = None if cap is None else jnp.asarray(cap).astype(acc)
    return mask, t, cap


def _vary(name, axis_name, weights, biases, others):
    """Inside shard_map, every input given the varying mesh axes of all of
    them except ``axis_name`` (a data-parallel batch, say), so that the
    custom derivative sees one type; the transposes of these casts sum the
    gradients of replicated inputs over those axes. ``weights`` maps each
    weight's argument name to it: each must vary over ``axis_name``. The
    biases are slices of the vocabulary like the weights' columns."""
    names = set() if axis_name is None else set(_axis_names(axis_name))
    every = _vma(*weights.values(), *biases, *others)
    for arg, w in weights.items():
        if names and every and not names <= _vma(w):
            raise ValueError(
                f"{name}: axis_name={axis_name!r} but {arg} does not vary over that mesh "
                f"axis; shard {arg}'s vocabulary axis over it, e.g. in_specs=P(None, "
                f"{axis_name!r}) in jax.shard_map"
            )
    rest = every - names
    return (
        [_varying(w, rest) for w in weights.values()],
        [_varying(b, every) for b in biases],
        [_varying(x, rest) for x in others],
    )


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _fused_jit(
    chunk, axis_name, batch, dtype, layout, reduction, stats,
    h, w, bias, labels, where, t, cap, alpha, zeta, weights,
):
    """Everything a call does on the device, in one computation: the casts
    and reshapes to [N, D] rows, the temperature per row, the loss, its
    weights and reduction (and the statistics, per example)."""
    acc = _acc(dtype)
    h2, w, bias = _rows(batch, dtype, h, w, bias)
    n = h2.shape[0]
    # Widened, never narrowed: an int64 label must not wrap into range.
    lab = widen_labels(jnp.asarray(labels)).reshape(n)
    mask, t, cap = _row_options(batch, w.shape[1], layout, where, t, cap, acc)
    alpha, zeta = jnp.asarray(alpha).astype(acc), jnp.asarray(zeta).astype(acc)
    (w,), (bias,), (h2, lab, t, cap, mask, alpha, zeta) = _vary(
        _NAME, axis_name, {"weight": w}, (bias,), (h2, lab, t, cap, mask, alpha, zeta)
    )
    out = _fused(chunk, axis_name, stats, h2, w, bias, lab, t, cap, mask, alpha, zeta)
    loss = out[0] if stats else out
    if weights is not None:
        weights = jnp.broadcast_to(jnp.asarray(weights).astype(acc), batch).reshape(n)
    loss = _reduce(loss, mask, weights, reduction)
    loss = (loss if reduction != "none" else loss.reshape(batch)).astype(dtype)
    if not stats:
        return loss
    lse, ent, argmax = (x.reshape(batch) for x in out[1:])
    return loss, FusedStats(lse.astype(dtype), ent.astype(dtype), argmax)


def _float_dtype(name, arg, x):
    """The float dtype ``x`` is computed in (integers promote to the default
    float), from static information only."""
    dtype = dtype_of(name, x, arg)
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.dtype(jnp.result_type(float))
    raise TypeError(
        f"{name}: {arg} has dtype {dtype}, which is not a real number type; "
        f"cast it first, e.g. {arg}.astype(jnp.float32)"
    )


def _check_linear(name, hidden, weight, hidden_arg="hidden", weight_arg="weight"):
    """``(h, w, dtypes)`` of a [..., D] hidden and a [D, V] weight."""
    h, w = host_array(hidden), host_array(weight)
    dtypes = [_float_dtype(name, hidden_arg, h), _float_dtype(name, weight_arg, w)]
    if h.ndim < 1:
        raise ValueError(f"{name}: {hidden_arg} must have shape [N, D]; got a scalar")
    if w.ndim != 2:
        raise ValueError(f"{name}: {weight_arg} must have shape [D, V]; got shape {w.shape}")
    if h.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name}: {hidden_arg} has shape {h.shape} and {weight_arg} {w.shape}; "
            f"{hidden_arg}'s last axis (D = {h.shape[-1]}) must equal {weight_arg}'s first "
            f"axis ({w.shape[0]}). If your {weight_arg} is [V, D] (an embedding table), pass "
            f"{weight_arg}.T"
        )
    if w.shape[1] == 0:
        raise ValueError(f"{name}: {weight_arg} has no vocabulary columns (shape {w.shape})")
    return h, w, dtypes


def _check_options(name, batch, where, chunk_size, axis_name, temperature, cap, weights,
                   reduction):
    """The checks of the options every fused function takes; returns the
    mask, the cap and the weights as operands."""
    mask = None if where is None else host_array(mask_spec(name, where, batch))
    if chunk_size is not None and (
        not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
    ):
        raise TypeError(f"{name}: chunk_size must be a positive int or None; got {chunk_size!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"{name}: chunk_size must be a positive int; got {chunk_size}")
    if axis_name is not None and not isinstance(axis_name, Hashable):
        raise TypeError(f"{name}: axis_name must be a mesh axis name or None; got {axis_name!r}")
    _check_temperature(name, temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{name}: reduction must be one of {', '.join(map(repr, _REDUCTIONS))}; "
            f"got {reduction!r}"
        )
    return mask, _check_soft_cap(name, cap), weights_spec(name, weights, batch)


def _check_option(arg, value, low, high, hint):
    """A non-negative (or [0, 1]) scalar option; traced values pass
    unchecked, and the jitted call converts it."""
    if np.ndim(value) != 0:
        raise ValueError(f"{_NAME}: {arg} must be a scalar; got shape {np.shape(value)}")
    if not is_traced(value):
        # A Python number is read without NumPy; an array (rare here) is read back.
        v = float(value) if isinstance(value, (int, float)) else float(np.asarray(value))
        if not (low <= v <= high):
            raise ValueError(f"{_NAME}: {arg} must be in [{low}, {high}] ({hint}); got {v!r}")
    return host_array(value)


def _check_temperature(name, temperature):
    """The limits t = 0 and t = inf are not supported: a Python or NumPy one
    raises; one in a JAX array is never read back and gives NaN."""
    if is_traced(temperature) or isinstance(temperature, jax.Array):
        return
    if isinstance(temperature, (int, float)):
        bad = temperature == 0 or temperature in (np.inf, -np.inf)
    else:
        values = np.asarray(temperature, dtype=np.float64)
        bad = np.any(values == 0) or np.any(np.isinf(values))
    if bad:
        raise ValueError(
            f"{name}: temperature must be finite and > 0 here; for the hard-max (0) or "
            "uniform (inf) limits use the unfused function on hidden @ weight"
        )


def _check_bias(name, bias, w_shape, arg="bias", weight_arg="weight"):
    """``(value, dtype)`` of a [V] bias (``(None, None)`` without one)."""
    if bias is None:
        return None, None
    b = host_array(bias)
    b_dtype = _float_dtype(name, arg, b)
    if tuple(b.shape) != (w_shape[1],):
        raise ValueError(
            f"{name}: {arg} has shape {tuple(b.shape)} but {weight_arg} {tuple(w_shape)}; "
            f"give one bias per vocabulary column, shape ({w_shape[1]},) (with axis_name, "
            f"this shard's slice, sharded like {weight_arg}'s columns)"
        )
    return b, b_dtype


def _check_soft_cap(name, cap):
    """The soft cap as an operand, or None when it is off (None, 0 or inf).

    A Python or NumPy value must be >= 0; one in a JAX array, traced or not,
    is never read back, and a negative or NaN one gives NaN.
    """
    if cap is None:
        return None
    if np.ndim(cap) != 0:
        raise ValueError(
            f"{name}: logit_soft_cap must be a scalar; got shape {np.shape(cap)}"
        )
    if is_traced(cap) or isinstance(cap, jax.Array):
        return cap
    c = float(cap) if isinstance(cap, (int, float)) else float(np.asarray(cap))
    if not c >= 0:
        raise ValueError(
            f"{name}: logit_soft_cap must be > 0 (Gemma 2 uses 30.0), or None or 0 for no "
            f"capping; got {c!r}"
        )
    return None if c in (0.0, np.inf) else host_array(cap)


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
    ``hidden @ weight`` in the unfused loss).

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
      z_loss: coefficient >= 0 of the squared logsumexp.
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
        spread over every class.
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
    h, w, dtypes = _check_linear(_NAME, hidden, weight)
    lab = host_array(labels)
    if not jnp.issubdtype(lab.dtype, jnp.integer):
        raise TypeError(
            f"{_NAME}: labels must be integer class indices; got dtype {lab.dtype}. "
            "For soft (probability) labels use the unfused softmax_cross_entropy"
        )
    batch = tuple(h.shape[:-1])
    if tuple(lab.shape) != batch:
        raise ValueError(
            f"{_NAME}: labels has shape {tuple(lab.shape)} but hidden {tuple(h.shape)} has "
            f"batch shape {batch}; give one label per row of hidden"
        )
    mask, cap, weights = _check_options(
        _NAME, batch, where, chunk_size, axis_name, temperature, logit_soft_cap, weights,
        reduction,
    )
    alpha = _check_option("label_smoothing", label_smoothing, 0.0, 1.0, "0 = no smoothing")
    zeta = _check_option("z_loss", z_loss, 0.0, np.inf, "0 = no z-loss; PaLM uses 1e-4")
    b, b_dtype = _check_bias(_NAME, bias, w.shape)
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"{_NAME}: return_stats must be True or False; got {return_stats!r}")
    dtype = jnp.dtype(jnp.result_type(*dtypes, *([b_dtype] if b is not None else [])))
    v = w.shape[1]
    t, layout = temperature_spec(_NAME, temperature, (*batch, v), (len(batch),))
    n = int(np.prod(batch, dtype=np.int64))
    chunk = _default_chunk_size(n, v) if chunk_size is None else int(min(chunk_size, v))
    return _fused_jit(
        chunk, axis_name, batch, dtype, layout, reduction, bool(return_stats),
        h, w, b, lab, mask, t, cap, alpha, zeta, weights,
    )
