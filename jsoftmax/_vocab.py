"""The vocabulary-chunk machinery that the fused functions share.

``jsoftmax.fused`` (the linear cross-entropy) and ``jsoftmax.fused_divergence``
(the linear KL divergence) walk the vocabulary in chunks of ``weight``'s
columns with the pieces here: the chunk loop and its default size, the chunk
logits with bias, soft cap and temperature, the online logsumexp step, the
backward step that turns a chunk of ``d / d logits`` into the gradients of
``hidden``, ``weight`` and ``bias``, the vocab-parallel helpers (``axis_name``)
and the argument checks both functions take.
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax._checks import broadcasts_to, concrete, host_array, inexact_dtype, slice_args
from jsoftmax._normalise import select

F32 = jnp.float32


# Default number of logits per chunk (rows x columns): 8 MiB of float32 for each
# [N, chunk] temporary, which stays in a CPU's last-level cache; larger chunks
# were slower on CPU and no smaller in the loop overhead (benchmarks/fused.py).
CHUNK_ELEMENTS = 1 << 21


MIN_CHUNK = 256


def default_chunk_size(n: int, v: int) -> int:
    """A power of two near ``CHUNK_ELEMENTS / n``, at least 256, at most ``v``."""
    target = max(CHUNK_ELEMENTS // max(n, 1), MIN_CHUNK)
    chunk = 1 << (target.bit_length() - 1)
    return int(min(chunk, v))


def acc_dtype(dtype):
    """The accumulation dtype: float32 for 16-bit inputs, else the input's own."""
    return jnp.promote_types(dtype, F32)


def dot(a, b):
    """``a @ b`` accumulated in at least float32 (operands keep their dtype)."""
    return jnp.matmul(a, b, preferred_element_type=acc_dtype(a.dtype))


def dot_nt(a, b):
    """``a @ b.T`` accumulated in at least float32, without materialising ``b.T``."""
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=acc_dtype(a.dtype))


def dot_tn(a, a_t, b):
    """``a.T @ b`` accumulated in at least float32; ``a_t`` is ``a.T`` made
    once by :func:`transposed_once`, or None to contract ``a`` in place."""
    if a_t is not None:
        return dot(a_t, b)
    dims = (((0,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=acc_dtype(a.dtype))


def transposed_once(a):
    """``a.T`` as an array of its own for 16-bit ``a``, else None.

    XLA:CPU multiplies bfloat16 natively only with the contracted axis last
    in the left operand; otherwise it converts both operands to float32
    first, i.e. all of ``hidden``. One 16-bit transposed copy, made outside
    the chunk loop, costs half of that and no time per chunk.
    """
    return a.T if jnp.dtype(a.dtype).itemsize < 4 else None


def axis_names(axis_name):
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def shard_offset(axis_name, v_local):
    """The global index of this shard's first vocabulary column (0 unsharded)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * v_local


def vocab_size(axis_name, v_local):
    return v_local if axis_name is None else v_local * lax.axis_size(axis_name)


def label_index(axis_name, v_local, labels):
    """``(local, here, valid)``: global labels as indices into this shard's
    columns, whether this shard holds them, and whether they are in range."""
    if axis_name is None:
        valid = (labels >= 0) & (labels < v_local)
        return labels, valid, valid
    local = labels - lax.axis_index(axis_name) * v_local
    valid = (labels >= 0) & (labels < v_local * lax.axis_size(axis_name))
    return local, (local >= 0) & (local < v_local), valid


def psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def vma(*xs):
    """The mesh axes (inside ``jax.shard_map``) that any of ``xs`` varies over."""
    axes = set()
    for x in xs:
        if x is None:
            continue
        aval = jax.typeof(x)
        names = getattr(aval, "vma", None)  # jax < 0.9
        if names is None:
            names = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
        axes |= set(names)
    return frozenset(axes)


def varying(x, axes):
    """``x`` marked as varying over ``axes`` (a no-op outside shard_map)."""
    if x is None:
        return None
    missing = tuple(sorted(set(axes) - vma(x), key=str))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)  # jax < 0.8


def over_chunks(step, carry, v_local, chunk):
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


def cols(x, start, size):
    """Columns ``start:start + size`` of ``x``'s last (vocabulary) axis."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def linear(h, w, bias, start, size):
    """The chunk ``h @ w + bias`` of the raw logits, in the accumulation dtype."""
    z = dot(h, cols(w, start, size))
    if bias is not None:
        z = z + cols(bias, start, size).astype(z.dtype)
    return z


def chunk_logits(h, w_c, bias_c, start, size, cap, inv_t):
    """``(y, z, th)`` of a chunk: the scaled logits ``y = cap(z) * inv_t``, the
    raw ``z = h @ w + bias`` and :func:`soft_cap`'s tanh."""
    z = linear(h, w_c, bias_c, start, size)
    capped, th = soft_cap(z, cap)
    return (capped if inv_t is None else capped * inv_t), z, th


def cap_on(cap):
    """Whether capping applies: 0 and inf (the identity's limit) switch it off."""
    return (cap > 0) & jnp.isfinite(cap)


def soft_cap(z, cap):
    """``cap * tanh(z / cap)`` and the tanh (None when there is no cap)."""
    if cap is None:
        return z, None
    on = cap_on(cap)
    c = select(on, cap, 1.0)
    th = jnp.tanh(z / c)
    return select(on, c * th, z), th


def soft_cap_grads(z, th, cap):
    """``(d capped / d z, d capped / d cap)`` from :func:`soft_cap`'s tanh."""
    on = cap_on(cap)
    # 1 - tanh**2 as a product keeps a little more accuracy near |tanh| = 1.
    slope = (1.0 - th) * (1.0 + th)
    # An excluded (-inf) logit is capped to -c, where slope is 0: u * slope
    # -> 0, which the clamp keeps from being -inf * 0.
    big = jnp.finfo(z.dtype).max
    u = jnp.clip(z / select(on, cap, 1.0), -big, big)
    return select(on, slope, 1.0), select(on, th - u * slope, 0.0)


def online_step(m, y):
    """One chunk of an online logsumexp over the rows of ``y``: the new
    running maximum, the shift the sums are kept at (0 while nothing finite
    has been seen), ``exp(y - shift)`` and ``exp(m - shift)``, the factor that
    moves the sums of the chunks seen so far onto the new shift."""
    m_new = jnp.maximum(m, jnp.max(y, axis=1))
    shift = select(jnp.isfinite(m_new), m_new, 0.0)
    return m_new, shift, jnp.exp(y - shift[:, None]), jnp.exp(m - shift)


def global_shift(axis_name, m):
    """The maximum over the shards and the shift the summed sums are kept at."""
    m_global = lax.pmax(m, axis_name)
    return m_global, select(jnp.isfinite(m_global), m_global, 0.0)


def check_vma(name, axis_name, w):
    """Refuses gradients under shard_map without the varying-axes types: the
    cotangent could not be told apart from a replicated one, and the weight
    gradient would come out scaled."""
    if axis_name is not None and not set(axis_names(axis_name)) <= vma(w):
        raise ValueError(
            f"{name}: gradients with axis_name={axis_name!r} need jax.shard_map with "
            "check_vma=True (the default) and weight sharded over that axis")


def row_inverse(t, n):
    """1 / t as a scalar or an [N, 1] column (None without a temperature)."""
    inv_t = inverse(t)
    return inv_t if inv_t is None or inv_t.ndim == 0 else inv_t.reshape(n, 1)


def grad_carry(h, w, bias):
    """Zeros for :func:`grad_step`'s ``(dh, dw, db, ty, tc)``."""
    acc = acc_dtype(h.dtype)
    return (
        jnp.zeros(h.shape, acc),
        jnp.zeros(w.shape, w.dtype),
        jnp.zeros(() if bias is None else bias.shape, w.dtype if bias is None else bias.dtype),
        jnp.zeros(h.shape[:1], acc),
        jnp.zeros(h.shape[:1], acc),
    )


def option_grads(dy, y, z, th, cap, inv_t, ty, tc):
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
        slope, d_cap = soft_cap_grads(z, th, cap)
        tc = tc + jnp.sum(dy * d_cap, axis=1)
        dy = dy * slope
    return dy, ty, tc


def grad_step(carry, dy, y, z, th, cap, inv_t, h, h_t_c, w_c, bias, start, size):
    """Adds a chunk's ``dy = d out / d y`` into ``(dh, dw, db, ty, tc)``: the
    gradients of hidden, weight and bias, and the per-example sums of
    :func:`option_grads`."""
    dh, dw, db, ty, tc = carry
    dy, ty, tc = option_grads(dy, y, z, th, cap, inv_t, ty, tc)
    dz = dy.astype(w_c.dtype)
    dh = dh + dot_nt(dz, cols(w_c, start, size))
    dw_c = dot_tn(h, h_t_c, dz.astype(h.dtype)).astype(dw.dtype)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
    if bias is not None:
        db_c = jnp.sum(dy, axis=0).astype(bias.dtype)
        db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
    return dh, dw, db, ty, tc


def grad_outputs(axis_name, t, cap, dh, ty, tc):
    """hidden's gradient summed over the shards, and the temperature's and
    the cap's from their per-example sums."""
    dh = psum(dh, axis_name)
    dt = None
    if t is not None:
        # y = z / t, so d out / d t = -sum_j (d out / d y_j) y_j / t (ty
        # holds the sum with the 1 / t folded in).
        dt_rows = -psum(ty, axis_name)
        dt = jnp.sum(dt_rows) if t.ndim == 0 else dt_rows.reshape(t.shape)
        dt = dt.astype(t.dtype)
    d_cap = None if cap is None else jnp.sum(psum(tc, axis_name)).astype(cap.dtype)
    return dh, dt, d_cap


def valid_options(t, cap):
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


def inverse(t):
    return None if t is None else 1.0 / t


REDUCTIONS = ("none", "sum", "mean")


def reduce(loss, mask, weights, reduction):
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


def rows(batch, dtype, h, w, bias):
    """hidden as [N, D] rows, weight and bias, cast to ``dtype``."""
    h, w = jnp.asarray(h).astype(dtype), jnp.asarray(w).astype(dtype)
    bias = None if bias is None else jnp.asarray(bias).astype(dtype)
    n = int(np.prod(batch, dtype=np.int64))
    return h.reshape(n, w.shape[0]), w, bias


def row_options(name, batch, v, where, t, cap, acc):
    """The mask per row, the temperature (a scalar or an [N, 1] column) and
    the cap, in the accumulation dtype; ``where`` and ``t`` are checked as
    the unfused functions check them against the logits (never built: a
    broadcast that nothing reads)."""
    n = int(np.prod(batch, dtype=np.int64))
    if where is not None and jnp.ndim(where) > len(batch):  # one per example, not per class
        raise ValueError(f"{name}: where has shape {jnp.shape(where)}; give one per example, "
                         f"of the labels' shape {batch}")
    logits = jnp.broadcast_to(jnp.zeros((), acc), (*batch, v))
    _, _, _, mask, t = slice_args(name, logits, -1, where, t, "hidden @ weight", batch_where=True)
    mask = None if mask is None else mask[..., 0].reshape(n)
    if t is not None and t.ndim:
        t = jnp.broadcast_to(t, (*batch, 1)).reshape(n, 1)
    cap = None if cap is None else jnp.asarray(cap).astype(acc)
    return mask, t, cap


def vary(name, axis_name, weights, biases, others):
    """Inside shard_map, every input given the varying mesh axes of all of
    them except ``axis_name`` (a data-parallel batch, say), so that the
    custom derivative sees one type; the transposes of these casts sum the
    gradients of replicated inputs over those axes. ``weights`` maps each
    weight's argument name to it: each must vary over ``axis_name``. The
    biases are slices of the vocabulary like the weights' columns."""
    names = set() if axis_name is None else set(axis_names(axis_name))
    every = vma(*weights.values(), *biases, *others)
    for arg, w in weights.items():
        if names and every and not names <= vma(w):
            raise ValueError(
                f"{name}: axis_name={axis_name!r} but {arg} does not vary over that mesh "
                f"axis; shard {arg}'s vocabulary axis over it, e.g. in_specs=P(None, "
                f"{axis_name!r}) in jax.shard_map")
    rest = every - names
    return (
        [varying(w, rest) for w in weights.values()],
        [varying(b, every) for b in biases],
        [varying(x, rest) for x in others],
    )


def float_dtype(name, arg, x):
    """The float dtype ``x`` is computed in: jax.nn's rule, as in every other
    function (an int32 array gives float32, also under x64)."""
    if x.dtype.kind in "iuf" or x.dtype == jnp.bfloat16:
        return inexact_dtype(x.dtype)
    raise TypeError(
        f"{name}: {arg} has dtype {x.dtype}, which is not a real number type; "
        f"cast it first, e.g. {arg}.astype(jnp.float32)")


def check_linear(name, hidden, weight, hidden_arg="hidden", weight_arg="weight"):
    """``(h, w, dtypes)`` of a [..., D] hidden and a [D, V] weight."""
    h, w = host_array(hidden), host_array(weight)
    dtypes = [float_dtype(name, hidden_arg, h), float_dtype(name, weight_arg, w)]
    if h.ndim < 1:
        raise ValueError(f"{name}: {hidden_arg} must have shape [N, D]; got a scalar")
    if w.ndim != 2:
        raise ValueError(f"{name}: {weight_arg} must have shape [D, V]; got shape {w.shape}")
    if h.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name}: {hidden_arg} has shape {h.shape} and {weight_arg} {w.shape}; "
            f"{hidden_arg}'s last axis (D = {h.shape[-1]}) must equal {weight_arg}'s first "
            f"axis ({w.shape[0]}). If your {weight_arg} is [V, D] (an embedding table), pass "
            f"{weight_arg}.T")
    if w.shape[1] == 0:
        raise ValueError(f"{name}: {weight_arg} has no vocabulary columns (shape {w.shape})")
    return h, w, dtypes


def check_options(name, batch, where, chunk_size, axis_name, temperature, cap, weights,
                  reduction):
    """The concrete checks of the options every fused function takes; returns
    ``(where, temperature, cap, weights)`` for the jitted call (``where``
    and ``temperature``'s shapes are checked there)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer | None):
        raise TypeError(f"{name}: chunk_size must be a positive int or None; got {chunk_size!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"{name}: chunk_size must be a positive int; got {chunk_size}")
    if axis_name is not None and not isinstance(axis_name, Hashable):
        raise TypeError(f"{name}: axis_name must be a mesh axis name or None; got {axis_name!r}")
    # The limits t = 0 and t = inf are not supported here.
    temperature = concrete(name, "temperature", temperature, closed=False, hint=" here",
                           fix=". For the hard-max (0) or uniform (inf) limits use the "
                           "unfused function on hidden @ weight")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{name}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}; "
            f"got {reduction!r}")
    if cap is not None and np.ndim(cap) != 0:
        raise ValueError(f"{name}: logit_soft_cap must be a scalar; got shape {np.shape(cap)}")
    if cap is not None and not isinstance(cap, jax.Array):
        cap = concrete(name, "logit_soft_cap", cap,
                       hint=" (Gemma 2 uses 30.0), or None or 0 for no capping")
        cap = None if float(cap) in (0.0, np.inf) else cap  # no capping
    if weights is not None:
        weights = host_array(weights)
        if not np.issubdtype(weights.dtype, np.number) or weights.dtype.kind == "c":
            raise TypeError(f"{name}: weights has dtype {weights.dtype}, which is not a real "
                            "number type; cast it first, e.g. weights.astype(jnp.float32)")
        if not broadcasts_to(weights.shape, batch):
            raise ValueError(f"{name}: weights has shape {weights.shape}, which does not broadcast "
                             f"to the examples' shape {batch}; give one weight per example")
    return host_array(where), temperature, cap, weights


def check_bias(name, bias, w_shape, arg="bias", weight_arg="weight"):
    """``(value, dtype)`` of a [V] bias (``(None, None)`` without one)."""
    if bias is None:
        return None, None
    b = host_array(bias)
    b_dtype = float_dtype(name, arg, b)
    if tuple(b.shape) != (w_shape[1],):
        raise ValueError(
            f"{name}: {arg} has shape {tuple(b.shape)} but {weight_arg} {tuple(w_shape)}; "
            f"give one bias per vocabulary column, shape ({w_shape[1]},) (with axis_name, "
            f"this shard's slice, sharded like {weight_arg}'s columns)")
    return b, b_dtype
