"""Softmax over ragged groups: the entries that share a segment id.

``segment_softmax`` and ``segment_log_softmax`` are the core functions with
the slices given by :class:`jsoftmax._normalise.Segments` instead of axes:
the same primal, the same custom JVP and the same edge semantics, per
segment. ``segment_logsumexp`` returns one value per segment and has its own
rule below.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _normalise as nz
from jsoftmax._checks import host_args, is_traced, slice_args
from jsoftmax._normalise import INF

__all__ = ["segment_log_softmax", "segment_logsumexp", "segment_softmax"]


def _host_args(name, logits, segment_ids, num_segments, where, temperature):
    """The concrete checks: ``(logits, ids, where, t, num_segments)``."""
    x, where, t = host_args(name, logits, where, temperature, "logits")
    ids = segment_ids if isinstance(segment_ids, jax.Array) else np.asarray(segment_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name}: segment_ids has dtype {ids.dtype}; give integer segment ids, "
                        "e.g. segment_ids.astype(jnp.int32)")
    if num_segments is None:
        if is_traced(ids):
            raise ValueError(f"{name}: num_segments is required under jit (it fixes the output "
                             "shape); pass num_segments=<number of segments>")
        # As jax.ops.segment_sum: max id + 1, read back once.
        num_segments = int(jnp.max(ids, initial=-1)) + 1
    if is_traced(num_segments) or not isinstance(num_segments, int | np.integer) or isinstance(
            num_segments, bool):
        raise TypeError(f"{name}: num_segments must be a Python int; got {num_segments!r}")
    if num_segments < 0:
        raise ValueError(f"{name}: num_segments must be >= 0; got {num_segments}")
    return x, ids, where, t, int(num_segments)


def _segment_args(name, x, ids, where, t, num_segments, indices_are_sorted):
    """Inside the jit: ``(x, dtype, segments, mask, t)``, with ``t`` a scalar
    or per row of the segments' table. The entries outside every segment
    need no mask: they are normalised in rows of their own, which the
    callers drop."""
    if x.ndim == 0:
        raise ValueError(f"{name}: logits must have an entries axis first (shape [E, ...]); "
                         "got a scalar")
    if ids.shape != x.shape[:1]:
        raise ValueError(f"{name}: segment_ids has shape {ids.shape}; give one id per entry, "
                         f"shape ({x.shape[0]},) for logits of shape {x.shape}")
    x, dtype, _, mask, _ = slice_args(name, x, (), where, None, "logits")
    # The temperature broadcasts against the table of segments, [num_segments, ...].
    table = jnp.zeros((num_segments, *x.shape[1:]), x.dtype)
    t = slice_args(name, table, (), None, t, "logits")[4]
    seg = nz.Segments.from_ids(ids, num_segments, indices_are_sorted)
    if t is not None and t.ndim:
        t = seg.table(jnp.broadcast_to(t, table.shape), 1.0)
    return x, dtype, seg, mask, t


@partial(jax.jit, static_argnums=(4, 5, 6))
def _per_entry_jit(x, ids, where, t, log, num_segments, indices_are_sorted):
    name = "segment_log_softmax" if log else "segment_softmax"
    x, dtype, seg, mask, t = _segment_args(name, x, ids, where, t, num_segments,
                                           indices_are_sorted)
    t = t if t is None or t.ndim == 0 else seg.per_entry(t)
    out = (nz.log_softmax if log else nz.softmax)(seg, x, t, mask)
    # A select on the output: masking these entries' input instead costs
    # a second pass of the segment reductions on XLA:CPU.
    return nz.select(seg.members(x.ndim), out, -INF if log else 0.0).astype(dtype)


_DOC_ARGS = """
    Args:
      logits: an array of shape [E, ...]: E entries, whose trailing axes (such
        as attention heads) are normalised independently.
      segment_ids: integer array of shape [E], the segment of each entry. An
        id that is negative or >= ``num_segments`` puts its entry in no
        segment: it is excluded, as ``jax.ops.segment_sum`` drops it.
      num_segments: the number of segments, a Python int. Required under
        ``jit``; outside it, omitted means max id + 1.
      where: optional boolean mask broadcastable to ``logits``; False excludes.
      temperature: t >= 0, a scalar or an array broadcastable to
        ``[num_segments, ...]`` (one per segment, optionally per trailing
        index). ``t = 0`` is the hard max of each segment and ``t = inf``
        uniform over its included entries. Differentiable.
      indices_are_sorted: promise that ``segment_ids`` is sorted, which lets
        the segment reductions run faster (a wrong promise gives wrong results).
"""


def segment_softmax(
    logits: ArrayLike,
    segment_ids: ArrayLike,
    num_segments: int | None = None,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    indices_are_sorted: bool = False,
) -> jax.Array:
    args = _host_args("segment_softmax", logits, segment_ids, num_segments, where, temperature)
    return _per_entry_jit(*args[:4], False, args[4], bool(indices_are_sorted))


def segment_log_softmax(
    logits: ArrayLike,
    segment_ids: ArrayLike,
    num_segments: int | None = None,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    indices_are_sorted: bool = False,
) -> jax.Array:
    args = _host_args("segment_log_softmax", logits, segment_ids, num_segments, where,
                      temperature)
    return _per_entry_jit(*args[:4], True, args[4], bool(indices_are_sorted))


segment_softmax.__doc__ = r"""Softmax over the entries that share a segment id (ragged slices).

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp((x_i - m_g) / t_g)}
            {\sum_{j : g_j = g} \exp((x_j - m_g) / t_g)}, \quad g = g_i,
        \quad m_g = \max_{j : g_j = g} x_j

    Each segment behaves as one slice of :func:`jsoftmax.softmax`: excluded
    entries are 0 with zero derivatives, a segment with nothing included is
    all 0 (never NaN), +inf entries share their segment's mass, and a NaN
    makes its own segment NaN and leaves the others alone.
""" + _DOC_ARGS + r"""
    Returns:
      An array of ``logits``' shape whose entries in each segment sum to 1
      (0 for a segment with nothing included, and for entries in none).

    Examples:
      >>> import jsoftmax
      >>> x = jnp.array([0.0, 0.0, 1.0, 5.0])
      >>> jsoftmax.segment_softmax(x, jnp.array([0, 0, 1, 2]))
      Array([0.5, 0.5, 1. , 1. ], dtype=float32)
"""

segment_log_softmax.__doc__ = r"""Log-softmax over the entries that share a segment id.

    .. math::
        \mathrm{log\_softmax}(x)_i = \frac{x_i - m_g}{t_g}
            - \log \sum_{j : g_j = g} \exp\left(\frac{x_j - m_g}{t_g}\right), \quad g = g_i

    Each segment behaves as one slice of :func:`jsoftmax.log_softmax`:
    excluded entries (and entries in no segment) are -inf with zero
    derivatives.
""" + _DOC_ARGS + r"""
    Returns:
      An array of ``logits``' shape with values in [-inf, 0].

    Examples:
      >>> import jsoftmax
      >>> x = jnp.array([0.0, 0.0, 1.0])
      >>> jsoftmax.segment_log_softmax(x, jnp.array([0, 0, 1]))
      Array([-0.6931472, -0.6931472,  0.       ], dtype=float32)
"""


# segment_logsumexp: one value per segment


def _logsumexp_parts(seg, x, t, mask):
    """``(lse, z, s)``: lse and s per row of the segment table, z per entry."""
    z, shift = nz.logits(seg, x, t, mask, keepdims=False)
    s = nz.reduce(jnp.exp(z), seg, keepdims=False)
    return nz.log_sum(shift, s, t), z, s


@jax.custom_jvp
def _segment_logsumexp(seg, x, t, mask):
    return _logsumexp_parts(seg, x, t, mask)[0]


@partial(_segment_logsumexp.defjvp, symbolic_zeros=True)
def _segment_logsumexp_jvp(primals, tangents):
    """d lse_g = sum_{i in g} p_i dx_i + H_g dt_g, with p the segment's
    softmax and H_g its entropy (the derivative of t lse(x / t) in t)."""
    seg, x, t, mask = primals
    dx, dt = nz.tangent_value(tangents[1]), nz.tangent_value(tangents[2])
    lse, z, s = _logsumexp_parts(seg, x, t, mask)
    out = jnp.zeros_like(lse)
    if dx is not None:
        probs = jnp.exp(z) / seg.per_entry(nz.select(s == 0, 1.0, s))
        out = out + nz.reduce(probs * dx, seg, keepdims=False)
    if dt is not None:
        out = out + nz.normaliser(z, seg, mean_z=True, split=True, keepdims=False).entropy * dt
    return lse, out


@partial(jax.jit, static_argnums=(4, 5))
def _logsumexp_jit(x, ids, where, t, num_segments, indices_are_sorted):
    x, dtype, seg, mask, t = _segment_args("segment_logsumexp", x, ids, where, t, num_segments,
                                           indices_are_sorted)
    return seg.segment_rows(_segment_logsumexp(seg, x, t, mask)).astype(dtype)


def segment_logsumexp(
    logits: ArrayLike,
    segment_ids: ArrayLike,
    num_segments: int | None = None,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    indices_are_sorted: bool = False,
) -> jax.Array:
    args = _host_args("segment_logsumexp", logits, segment_ids, num_segments, where, temperature)
    return _logsumexp_jit(*args, bool(indices_are_sorted))


segment_logsumexp.__doc__ = r"""Log-sum-exp of each segment; with temperature, its smooth max.

    .. math::
        \mathrm{lse}_g = t_g \log \sum_{i : g_i = g} \exp(x_i / t_g)

    A segment with nothing included (empty, or every entry excluded) gives
    -inf with zero gradients; ``t = 0`` gives the segment's max; ``t = inf``
    is +inf for a segment with more than one included entry.
""" + _DOC_ARGS + r"""
    Returns:
      An array of shape ``[num_segments, ...]``.

    Examples:
      >>> import jsoftmax
      >>> x = jnp.array([0.0, 0.0, 1.0])
      >>> jsoftmax.segment_logsumexp(x, jnp.array([0, 0, 2]))
      Array([0.6931472,      -inf, 1.       ], dtype=float32)
"""
