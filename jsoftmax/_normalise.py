"""The per-slice semantics that every function of the library shares.

A *slice* is what one softmax normalises: the entries of the reduced axes
(and, with ``axis_name``, of every shard of them), or of one segment. For
each slice :func:`logits` gives the shifted, tempered logits

.. math::
    z_i = (x_i - m) / t, \\qquad m = \\max_{j \\text{ included}} x_j,

and :func:`normaliser` their normaliser :math:`s = \\sum_i \\exp z_i`, with
every limit defined here and nowhere else:

* an entry is *excluded* where ``mask`` is False or ``x == -inf``: z = -inf;
* a slice with nothing included has m = -inf, z = -inf everywhere, s = 0;
* a slice whose maximum is +inf has z = 0 on its +inf entries and -inf on
  the others (the softmax is uniform over the +inf entries);
* t = 0 gives z = 0 on the maxima (ties included) and -inf elsewhere (the
  hard max); t = inf gives z = 0 on every included entry (uniform);
* a NaN entry, or a traced negative or NaN temperature, makes the slice NaN.

The maxima have z exactly 0 and every other z is below 0, so ``exp`` cannot
overflow and s >= 1 on a slice with something included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jsoftmax import _xla_cpu
from jsoftmax._checks import widen_labels

__all__ = [
    "INF",
    "Axes",
    "AxisName",
    "Normaliser",
    "Segments",
    "inverse_temperature",
    "log_softmax",
    "log_sum",
    "logits",
    "normaliser",
    "reduce",
    "select",
    "softmax",
    "tangent_logits",
    "tangent_value",
    "untempered_log_sum",
]

INF = float("inf")

# A mesh axis name, as jax.shard_map and lax.psum take it.
AxisName = Hashable


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Axes:
    """The reduced axes of the slices, and ``axis_name``: the mesh axis
    (inside ``jax.shard_map``) they also span, or None. A pytree without
    leaves, so that it passes through a custom JVP as :class:`Segments` does."""

    axes: tuple[int, ...]
    axis_name: AxisName | None = None


@partial(jax.tree_util.register_dataclass, data_fields=["rows"],
         meta_fields=["num_segments", "indices_are_sorted"])
@dataclasses.dataclass(frozen=True)
class Segments:
    """Ragged slices: the entries (axis 0) that share a segment id; trailing
    axes are independent slices. The ids are rows of a table of
    ``num_segments + 2``, shifted by one and clipped (sorted ids stay
    sorted): rows 0 and -1 collect the ids out of range, in no segment
    (:meth:`members`). A reduction with ``keepdims`` gives each entry its
    row's total, so every function here works per segment unchanged;
    without, the table (:meth:`segment_rows` drops the two extra rows)."""

    rows: jax.Array
    num_segments: int
    indices_are_sorted: bool = False

    @classmethod
    def from_ids(cls, ids: jax.Array, num_segments: int, indices_are_sorted: bool = False):
        ids = widen_labels(ids)  # ids + 1 must not wrap around
        rows = select(ids < 0, 0, select(ids >= num_segments, num_segments + 1, ids + 1))
        return cls(rows, num_segments, indices_are_sorted)

    def members(self, ndim: int) -> jax.Array:
        """True for the entries that belong to a segment, shaped to broadcast
        against an entries array of rank ``ndim``."""
        valid = (self.rows > 0) & (self.rows <= self.num_segments)
        return valid.reshape(valid.shape + (1,) * (ndim - 1))

    def table(self, per_segment: jax.Array, fill: float) -> jax.Array:
        """Per-segment values ([num_segments, ...]) as the table of rows."""
        pad = [(1, 1)] + [(0, 0)] * (per_segment.ndim - 1)
        return jnp.pad(per_segment, pad, constant_values=fill)

    def segment_rows(self, table: jax.Array) -> jax.Array:
        """The rows of the segments proper, [num_segments, ...]."""
        return table[1 : self.num_segments + 1]

    def per_entry(self, table: jax.Array) -> jax.Array:
        """Each entry's row of ``table`` (the ids are in range by construction)."""
        return table.at[self.rows].get(mode="promise_in_bounds")

    def reduce(self, op, v, keepdims):
        """The sum (or ``op="max"``) of ``v`` (or of each of a tuple) per segment."""
        if isinstance(v, tuple):
            return tuple(self.reduce(op, u, keepdims) for u in v)
        segment_op = jax.ops.segment_max if op == "max" else jax.ops.segment_sum
        table = segment_op(v, self.rows, self.num_segments + 2,
                           indices_are_sorted=self.indices_are_sorted)
        return self.per_entry(table) if keepdims else table


def select(cond: jax.Array, on_true, on_false) -> jax.Array:
    """``jnp.where(cond, on_true, on_false)`` for a boolean ``cond`` and at
    least one array branch, as one ``lax.select``: jnp.where is a jitted
    function, traced anew at each call (BENCHMARKS.md, Compile)."""
    arrays = [v for v in (on_true, on_false) if isinstance(v, jax.Array | np.ndarray)]
    if not arrays:
        raise TypeError("select: one of on_true and on_false must be an array, for its dtype")
    dtype = jnp.result_type(on_true, on_false)  # a Python number is weakly typed
    shape = jnp.broadcast_shapes(jnp.shape(cond), *(v.shape for v in arrays))
    like = arrays[0] if arrays[0].dtype == dtype else lax.convert_element_type(arrays[0], dtype)
    branches = [
        jnp.broadcast_to(v if v.dtype == dtype else lax.convert_element_type(v, dtype), shape)
        if isinstance(v, jax.Array | np.ndarray) else lax.full_like(like, v, shape=shape)
        for v in (on_true, on_false)
    ]
    return lax.select(jnp.broadcast_to(cond, shape), *branches)


def reduce(v, slices, op: str = "sum", keepdims: bool = True):
    """The sum (``op="max"``: the max, -inf when empty) of ``v`` over each
    slice: over :class:`Axes` and their mesh axis, or per :class:`Segments`.
    A tuple of arrays of one shape is summed in one pass where the backend
    needs that (``jsoftmax._xla_cpu.sums``)."""
    if isinstance(slices, Segments):
        return slices.reduce(op, v, keepdims)
    axes = slices.axes
    if isinstance(v, tuple):
        out = _xla_cpu.sums(v, axes)
        out = out if keepdims else tuple(jnp.squeeze(o, axes) for o in out)
    else:
        out = (jnp.max if op == "max" else jnp.sum)(v, axes, keepdims=keepdims,
                                                   initial=-INF if op == "max" else None)
    if slices.axis_name is None:
        return out
    return (lax.pmax if op == "max" else lax.psum)(out, slices.axis_name)


def logits(slices, x: jax.Array, t=None, mask=None, shift=None, keepdims: bool = True):
    """``(z, shift)``: z = (x - shift) / t with every limit of this module,
    and the shift, the max of each slice's included entries (0 where there
    is none, NaN for a traced t < 0 or NaN; it carries no derivative). Given
    a ``shift``, z of entries of slices with that shift (a label's logit).
    Without ``keepdims``, shift and t are per row of a :class:`Segments` table.
    """
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    if mask is not None:
        x = select(mask, x, -INF)
    if shift is None:
        # float16 / bfloat16 reduced in their own dtype, where the max is exact.
        m = reduce(lax.stop_gradient(x), slices, "max", keepdims).astype(dtype)
        shift = select(m == -INF, 0.0, m)
        shift = shift if t is None else select(t >= 0, shift, jnp.nan)
    if not keepdims:  # each entry takes its row's
        shift_rows, shift = shift, slices.per_entry(shift)
        t = t if t is None or t.ndim == 0 else slices.per_entry(t)
    x = x.astype(dtype)
    # Where the max is +inf, x - shift is NaN at its +inf entries: z = 0 there.
    z = select(x == INF, 0.0, x - shift)
    if t is not None:
        # Only finite z is divided (an infinite one would give t an infinite
        # derivative); t = 0 divides by inf: -inf below the maxima.
        finite = jnp.isfinite(z)
        scaled = select(finite, z, 0.0) / select(t > 0, t, INF)
        z = select(finite, select((t == 0) & (z != 0), -INF, scaled), z)
    return z, (shift if keepdims else shift_rows)


class Normaliser(NamedTuple):
    """Per slice (keepdims): s = sum(exp(z)) (0 with nothing included, +inf
    for a +inf max, NaN for a NaN); ``log_s`` = log s (0 with nothing
    included); ``below`` = 1 - 1/s, the share of s below the maxima, to full
    accuracy (split sums only, else None); ``mean_z`` = sum(p z) over the
    included entries, p = exp(z) / s (0 with nothing included), when asked
    for; ``sums``, the sum of each further array asked for."""

    s: jax.Array
    log_s: jax.Array
    below: jax.Array | None
    mean_z: jax.Array | None = None
    sums: tuple[jax.Array, ...] = ()

    @property
    def entropy(self) -> jax.Array:
        """-sum p log p = log s - mean_z (asked for), 0 with nothing included."""
        return select(self.s == 0, 0.0, self.log_s - self.mean_z)


def normaliser(z, slices, mean_z=False, sums=(), split=None, keepdims=True) -> Normaliser:
    """The :class:`Normaliser` of logits z, in one pass over z (a second pass
    makes XLA:CPU store z); ``split`` is float64's default (:func:`_split`)."""
    e = jnp.exp(z)
    # A product with 0 at z = -inf, not a select after it (its cotangent would meet 0 * -inf).
    terms = ((e * select(z == -INF, 0.0, z),) if mean_z else ()) + tuple(sums)
    if split or (split is None and z.dtype == jnp.float64):
        s, log_s, below, terms = _split(z, e, slices, terms, keepdims)
    else:
        s, *terms = reduce((e, *terms), slices, keepdims=keepdims) if terms else (
            reduce(e, slices, keepdims=keepdims),)
        log_s, below = jnp.log(select(s == 0, 1.0, s)), None
    mean = terms[0] / select(s == 0, 1.0, s) if mean_z else None
    return Normaliser(s, log_s, below, mean, tuple(terms[1:] if mean_z else terms))


def _split(z, e, slices, terms, keepdims):
    """``(s, log s, below, sums of terms)`` with the maxima (z = 0, exactly 1 each)
    summed apart: with k of them and ``below`` the rest, log s = log k +
    log1p(below / k) and 1 - 1/s = below / s keep ``below`` where it is under an ulp
    of s, and with it the top entry of log_softmax, its gradient 1 -
    softmax_max (jax-ml/jax#40384) and the entropy of a confident slice."""
    at_top = z == 0
    # exp(z), not 1, at the top: the same value, with z's derivative.
    split_e = (select(at_top, e, 0.0), select(at_top, 0.0, e))
    top, below, *terms = reduce((*split_e, *terms), slices, keepdims=keepdims)
    s, safe_top = top + below, select(top == 0, 1.0, top)
    log_s = select(top == 0, 0.0, jnp.log(safe_top) + jnp.log1p(below / safe_top))
    # (s - k) / s: below / s in value, and top - k (exactly 0) carries the top's derivative.
    return s, log_s, (below + (top - lax.stop_gradient(top))) / select(s == 0, 1.0, s), terms


def log_sum(shift: jax.Array, s: jax.Array, t: jax.Array | None) -> jax.Array:
    """The tempered log normaliser shift + t log|s| (logsumexp), shaped like
    ``s``: -inf for a slice with nothing included; t = 0 gives the shift
    (the max). t log|s| -> 0 as t -> inf only when exactly one unit of
    weight is left, and is +inf otherwise."""
    # log of the safe normaliser: differentiating through the select meets
    # no 1 / 0 on an empty slice.
    log_s = jnp.log(jnp.abs(select(s == 0, 1.0, s)))
    if t is not None:
        unit_at_inf = (t == INF) & (jnp.abs(s) == 1)
        log_s = select(unit_at_inf, 0.0, t * log_s)
    return select(s == 0, -INF, shift + log_s)


def untempered_log_sum(slices, x: jax.Array, mask=None) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp, sign)`` keepdims at t = 1 without weights, from x itself:
    :func:`log_sum` over :func:`logits` on every input, as jax.nn.logsumexp
    computes it (a slice whose max is +inf, shifted by 0, sums to +inf, or
    NaN with a NaN), with no per-entry limit and no stored logits."""
    if mask is not None:
        x = select(mask, x, -INF)
    m = reduce(lax.stop_gradient(x), slices, "max").astype(jnp.promote_types(x.dtype, jnp.float32))
    shift = select(jnp.isinf(m), 0.0, m)
    s = reduce(jnp.exp(x.astype(m.dtype) - shift), slices)
    return shift + jnp.log(s), jnp.sign(s)


def inverse_temperature(t: jax.Array) -> jax.Array:
    """1 / t, with 1 / 0 taken as 0: the hard max does not move with x."""
    positive = t > 0
    return select(positive, 1.0 / select(positive, t, 1.0), 0.0)


def tangent_value(tangent) -> jax.Array | None:
    """None for a symbolic-zero tangent, else the tangent in the compute dtype
    (a float16 / bfloat16 tangent upcast once: the cotangent is rounded once)."""
    if tangent is None or isinstance(tangent, SymbolicZero):
        return None
    return tangent.astype(jnp.promote_types(tangent.dtype, jnp.float32))


def tangent_logits(z, t, dx, dt):
    """dz = (dx - z dt) / t, the z term 0 where z is infinite; None when both
    tangents are (symbolic) zeros. dz may be off by a per-slice constant (the
    shift's derivative): every function of z here is invariant to it."""
    dx, dt = (None if isinstance(d, SymbolicZero | None) else d for d in (dx, dt))
    if dx is None and dt is None:
        return None
    dz = jnp.zeros_like(z) if dx is None else dx.astype(z.dtype)
    if dt is not None:
        dz = dz - select(jnp.isfinite(z), z, 0.0) * dt
    return dz if t is None else dz * select(t > 0, 1.0 / select(t > 0, t, 1.0), 0.0)


@jax.custom_jvp
def softmax(slices, x: jax.Array, t=None, mask=None) -> jax.Array:
    """exp(z) / s over each slice: 0 on excluded entries, and on
    every entry of a slice with nothing included."""
    e = jnp.exp(logits(slices, x, t, mask)[0])
    s = reduce(e, slices)
    return e / select(s == 0, 1.0, s)


@partial(softmax.defjvp, symbolic_zeros=True)
def _softmax_jvp(primals, tangents):
    # d softmax = p (dz - sum(p dz)), dz = (dx - z dt) / t.
    slices, x, t, mask = primals
    probs = softmax(slices, x, t, mask)
    dz = tangent_logits(logits(slices, x, t, mask)[0], t, tangents[1], tangents[2])
    if dz is None:
        return probs, jnp.zeros_like(probs)
    return probs, probs * (dz - reduce(probs * dz, slices))


@jax.custom_jvp
def log_softmax(slices, x: jax.Array, t=None, mask=None) -> jax.Array:
    """z - log s over each slice, -inf on excluded entries."""
    z, _ = logits(slices, x, t, mask)
    log_s = normaliser(z, slices).log_s
    # -inf on excluded entries, with no derivative; a NaN log s still gives NaN.
    return select(z == -INF, -INF - lax.stop_gradient(log_s), z - log_s)


@partial(log_softmax.defjvp, symbolic_zeros=True)
def _log_softmax_jvp(primals, tangents):
    """d log_softmax = dz - sum(softmax dz), 0 on excluded entries.

    Where the normaliser carries b = 1 - 1/s (float64), sum(softmax dz) =
    sum(e dz) - sum(b e dz) with e = exp(z), 1 at the maxima: reverse mode
    forms (g - e G) + b e G, so 1 - softmax_max survives below an ulp of 1
    (jax-ml/jax#40384).
    """
    slices, x, t, mask = primals
    z, _ = logits(slices, x, t, mask)
    norm = normaliser(z, slices)
    out = select(z == -INF, -INF - lax.stop_gradient(norm.log_s), z - norm.log_s)
    dz = tangent_logits(z, t, tangents[1], tangents[2])
    if dz is None:
        return out, jnp.zeros_like(out)
    if norm.below is None:  # checkpointed: reverse mode keeps only ``out``
        return out, jax.checkpoint(_log_softmax_tangent)(slices, out, dz)
    e = jnp.exp(z)
    small = reduce((norm.below * e) * dz, slices)  # first: its cotangent is added last
    tangent = (dz - reduce(e * dz, slices)) + small
    # A select, not a product: an excluded entry's cotangent may be -inf.
    return out, select(out == -INF, 0.0, tangent)


def _log_softmax_tangent(slices, out, dz):
    return select(out == -INF, 0.0, dz - reduce(jnp.exp(out) * dz, slices))
