"""The per-slice semantics that every function of the library shares.

A *slice* is what one softmax normalises: the entries of the reduced axes
(and, with ``axis_name``, of every shard of them). For each slice this module
computes the shifted, tempered logits

.. math::
    z_i = (x_i - m) / t, \\qquad m = \\max_{j \\text{ included}} x_j,

and their normaliser :math:`s = \\sum_i \\exp z_i`, with every limit defined
here and nowhere else:

* an entry is *excluded* where ``mask`` is False or ``x == -inf``: z = -inf;
* a slice with nothing included has m = -inf, z = -inf everywhere, s = 0;
* a slice whose maximum is +inf has z = 0 on its +inf entries and -inf on
  the others (the softmax is uniform over the +inf entries);
* t = 0 gives z = 0 on the maxima (ties included) and -inf elsewhere (the
  hard max); t = inf gives z = 0 on every included entry (uniform);
* a NaN entry, or a traced negative or NaN temperature, makes the slice NaN.

The maxima have z exactly 0 and every other z is below 0, so ``exp`` cannot
overflow and s >= 1 on a slice with something included. The public functions
and their custom JVP rules are written with the names below; nothing else in
the library re-derives a limit.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jsoftmax import _xla_cpu
from jsoftmax._checks import upcast, widen_labels

__all__ = [
    "INF",
    "AxisName",
    "Normaliser",
    "Reduction",
    "Segments",
    "accurate_log_normaliser",
    "entropy",
    "inverse_temperature",
    "log_probabilities",
    "log_sum",
    "logits",
    "normaliser",
    "probabilities",
    "reduce_max",
    "reduce_sum",
    "reduce_sums",
    "reduction",
    "safe_normaliser",
    "select",
    "shifted",
    "slice_shift",
    "tangent_logits",
    "tangent_value",
    "untempered_log_sum",
]

INF = float("inf")

# A mesh axis name, as jax.shard_map and lax.psum take it.
AxisName = Hashable


@jax.tree_util.register_pytree_node_class
class Reduction(tuple):
    """The reduced axes of a slice, optionally spanning a named mesh axis.

    A tuple of ints like plain ``axes``; with ``axis_name``,
    :func:`reduce_max` and :func:`reduce_sum` also reduce across that mesh
    axis with ``lax.pmax`` and ``lax.psum`` (inside ``jax.shard_map``).
    Equality and hash include the name, since the axes are a static jit
    argument. It is a pytree without leaves, so it can also be an ordinary
    argument of a custom-JVP function, as :class:`Segments` is.
    """

    def __new__(cls, axes, axis_name=None):
        self = super().__new__(cls, axes)
        self.axis_name = axis_name
        # Hashed on every jitted call (a static argument): computed once.
        self._hash = hash((tuple(self), axis_name))
        return self

    def __eq__(self, other):
        return tuple.__eq__(self, other) and self.axis_name == getattr(other, "axis_name", None)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return self._hash

    def __reduce__(self):
        return Reduction, (tuple(self), self.axis_name)

    def tree_flatten(self):
        return (), (tuple(self), self.axis_name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux)


@jax.tree_util.register_pytree_node_class
class Segments:
    """Ragged slices: the entries (axis 0) that share a segment id.

    Trailing axes are independent slices, as batch axes are. The ids are
    stored shifted by one and clipped, as rows of a table of
    ``num_segments + 2``: row 0 collects the entries with a negative id and
    the last row those with an id >= num_segments (an order-preserving map,
    so sorted ids stay sorted). Those entries belong to no segment: the
    caller excludes them (:meth:`members`). A reduction with ``keepdims``
    gives each entry its row's total, so every function of this module works
    per segment unchanged; without, it gives the table (:meth:`segment_rows`
    drops the two extra rows).
    """

    def __init__(self, rows: jax.Array, num_segments: int, indices_are_sorted: bool = False):
        self.rows = rows
        self.num_segments = num_segments
        self.indices_are_sorted = indices_are_sorted

    @classmethod
    def from_ids(cls, ids: jax.Array, num_segments: int, indices_are_sorted: bool = False):
        ids = widen_labels(ids)  # ids + 1 must not wrap around
        rows = select(ids < 0, 0, select(ids >= num_segments, num_segments + 1, ids + 1))
        return cls(rows, num_segments, indices_are_sorted)

    def tree_flatten(self):
        return (self.rows,), (self.num_segments, self.indices_are_sorted)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

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
        table = op(v, self.rows, self.num_segments + 2, indices_are_sorted=self.indices_are_sorted)
        return self.per_entry(table) if keepdims else table


def select(cond: jax.Array, on_true, on_false) -> jax.Array:
    """``jnp.where(cond, on_true, on_false)`` for a boolean ``cond``, built on
    ``lax.select``: broadcast, in jnp.where's dtype (a Python number is
    weakly typed), and weakly typed where the array that gives that dtype is.
    At least one branch must be an array.

    The edge semantics make dozens of selects per call, and ``jnp.where`` is
    a jitted function of its own: each one is traced, linearized and
    transposed as a nested program, which made tracing and lowering the
    derivative of a tempered log_softmax 1.4x as slow (BENCHMARKS.md).
    """
    is_array = [isinstance(v, jax.Array | np.ndarray) for v in (on_true, on_false)]
    if not any(is_array):
        raise TypeError("select: one of on_true and on_false must be an array, for its dtype")
    arrays = [v for v, a in zip((on_true, on_false), is_array, strict=True) if a]
    shape = jnp.broadcast_shapes(jnp.shape(cond), *(jnp.shape(v) for v in arrays))
    dtype = jnp.result_type(on_true, on_false)  # a Python number is weakly typed
    branches = [
        lax.convert_element_type(v, dtype) if a and v.dtype != dtype else v
        for v, a in zip((on_true, on_false), is_array, strict=True)
    ]
    like = branches[is_array.index(True)]
    branches = [
        _broadcast(v, shape) if a else lax.full_like(like, v, shape=shape)
        for v, a in zip(branches, is_array, strict=True)
    ]
    return lax.select(_broadcast(cond, shape), *branches)


def _broadcast(v, shape):
    if jnp.shape(v) == shape:
        return v
    return lax.broadcast_in_dim(v, shape, tuple(range(len(shape) - jnp.ndim(v), len(shape))))


@functools.lru_cache(maxsize=256)
def reduction(axes: tuple[int, ...], axis_name: AxisName | None) -> Reduction:
    """``axes`` and the mesh axis ``axis_name`` (or None) as a :class:`Reduction`
    (one object per pair, made once: eager calls ask for it every time)."""
    return Reduction(axes, axis_name)


def _axis_name(axes):
    return getattr(axes, "axis_name", None)


def reduce_sum(v: jax.Array, axes, keepdims: bool = True) -> jax.Array:
    """Sum over ``axes`` and, for a :class:`Reduction`, over its mesh axis;
    per segment for :class:`Segments`."""
    if isinstance(axes, Segments):
        return axes.reduce(jax.ops.segment_sum, v, keepdims)
    out = jnp.sum(v, axis=tuple(axes), keepdims=keepdims)
    name = _axis_name(axes)
    return out if name is None else lax.psum(out, name)


def reduce_sums(values, axes, keepdims: bool = True) -> tuple[jax.Array, ...]:
    """:func:`reduce_sum` of each of ``values`` (of one shape), in one pass
    over the slices where the backend needs that (``jsoftmax._xla_cpu.sums``)."""
    if isinstance(axes, Segments):
        return tuple(reduce_sum(v, axes, keepdims) for v in values)
    out = _xla_cpu.sums(tuple(values), tuple(axes))
    if not keepdims:
        out = tuple(jnp.squeeze(o, tuple(axes)) for o in out)
    name = _axis_name(axes)
    return out if name is None else lax.psum(out, name)


def reduce_max(v: jax.Array, axes, keepdims: bool = True) -> jax.Array:
    """Max over ``axes`` (-inf for an empty slice), across shards too."""
    if isinstance(axes, Segments):
        return axes.reduce(jax.ops.segment_max, v, keepdims)
    out = jnp.max(v, axis=tuple(axes), keepdims=keepdims, initial=-INF)
    name = _axis_name(axes)
    return out if name is None else lax.pmax(out, name)


def slice_shift(
    axes, x: jax.Array, t: jax.Array | None = None, mask=None, keepdims: bool = True
) -> jax.Array:
    """The per-slice shift in the compute dtype: the max of the included
    entries, 0 for a slice with nothing included, NaN for an invalid (traced
    negative or NaN) temperature (``t`` shaped like the result). It carries
    no derivative: everything built on z is invariant to it. float16 /
    bfloat16 ``x`` is reduced in its own dtype, where the max is exact."""
    if mask is not None:
        x = select(mask, x, -INF)
    m = upcast(reduce_max(lax.stop_gradient(x), axes, keepdims))
    shift = select(m == -INF, 0.0, m)
    return shift if t is None else select(t >= 0, shift, jnp.nan)


def shifted(x: jax.Array, shift: jax.Array, t: jax.Array | None = None, mask=None) -> jax.Array:
    """z = (x - shift) / t for entries ``x`` of slices with ``shift`` (any
    broadcastable subset of the entries: a label's logit uses the same rule).

    z <= 0 with the maxima exactly 0. On a slice whose max is +inf its +inf
    entries are 0 (x - shift would be NaN) and the others x - inf = -inf, so
    the softmax is uniform over them with no further case. z is
    differentiable in x and t (dz = dx / t on every finite entry, the maxima
    too); the second derivatives of the JVP rules go through it.
    """
    x = upcast(x)
    if mask is not None:
        x = select(mask, x, -INF)
    z = select(x == INF, 0.0, x - shift)
    if t is None:
        return z
    # Only finite z is divided (an infinite one would give the temperature an
    # infinite derivative). t = inf gives 0 on every finite entry; t = 0 is
    # taken as the constant inf there too, with -inf below the maxima.
    finite = jnp.isfinite(z)
    scaled = select(finite, z, 0.0) / select(t > 0, t, INF)
    return select(finite, select((t == 0) & (z != 0), -INF, scaled), z)


def logits(axes, x: jax.Array, t: jax.Array | None = None, mask=None):
    """``(z, shift)`` for whole slices: see :func:`slice_shift` and
    :func:`shifted`."""
    shift = slice_shift(axes, x, t, mask)
    return shifted(x, shift, t, mask), shift


class Normaliser(NamedTuple):
    """s = sum(exp(z)) per slice (keepdims), ``log_s`` = log s with 0 for a
    slice with nothing included, ``q`` = 1 - 1/s to full accuracy or None,
    ``mean_z`` = sum(p z) over the included entries with p = softmax(z) (0 on
    a slice with nothing included; the part of a derivative in t that the
    softmax weights) when asked for, else None, and ``sums``: the sum over
    the slice of each array asked for. s is 0 for a slice with nothing
    included, +inf for one whose max is +inf and NaN for one with a NaN."""

    s: jax.Array
    log_s: jax.Array
    q: jax.Array | None
    mean_z: jax.Array | None = None
    sums: tuple[jax.Array, ...] = ()


def normaliser(z: jax.Array, axes, mean_z: bool = False, sums=()) -> Normaliser:
    """The :class:`Normaliser` of logits z, with ``mean_z`` and the ``sums``
    of further arrays (of z's shape) from the same pass over z when asked for:
    a second pass would make XLA:CPU store z (see ``jsoftmax._xla_cpu.sums``).

    In float64 log s and q are split at the maxima (:func:`accurate_log_normaliser`),
    which keeps the top entry of log_softmax and its gradient component
    1 - softmax_max (jax-ml/jax#40384) when they are below an ulp of 1. In
    float32 and below that costs a second pass over the slice, so they take
    jax.nn's single sum.
    """
    e = jnp.exp(z)
    weighted = (e * select(z == -INF, 0.0, z),) if mean_z else ()
    extra = (*weighted, *sums)
    if z.dtype == jnp.float64:
        top, below, *extra = _split_sums(z, e, axes, True, *extra)
        log_s, q = _split_log_normaliser(top, below)
        s = top + below
    else:
        s, *extra = reduce_sums((e, *extra), axes)
        log_s, q = jnp.log(safe_normaliser(s)), None
    mean = extra[0] / safe_normaliser(s) if mean_z else None
    return Normaliser(s, log_s, q, mean, tuple(extra[len(weighted):]))


def log_probabilities(z: jax.Array, log_s: jax.Array) -> jax.Array:
    """log softmax from logits z and log normaliser ``log_s``: z - log s, -inf
    on excluded entries (with no derivative: z - log s would move with log s;
    a NaN normaliser still makes them NaN)."""
    return select(z == -INF, -INF - lax.stop_gradient(log_s), z - log_s)


def probabilities(z: jax.Array, s: jax.Array) -> jax.Array:
    """softmax from logits z and normaliser s: exp(z) / s, 0 where nothing is
    included."""
    return jnp.exp(z) / safe_normaliser(s)


def safe_normaliser(s: jax.Array) -> jax.Array:
    """The normaliser with 0 (a slice with nothing included) replaced by 1,
    so that softmax is 0 and log_softmax -inf there."""
    return select(s == 0, 1.0, s)


def accurate_log_normaliser(
    z: jax.Array, axes, keepdims: bool = True
) -> tuple[jax.Array, jax.Array]:
    """``(log s, q)`` with ``q = 1 - 1/s``, both to full relative accuracy.

    The maxima contribute exactly 1 each (z = 0), so with k of them and
    ``below`` the rest, log s = log k + log1p(below / k) and q = below / s.
    Plain log(s) loses ``below`` when it is under an ulp of s, and with it the
    entropy term of d lse / dt and the top entry's gradient of log_softmax
    (jax-ml/jax#40384). An empty slice gives (0, 0).
    """
    return _split_log_normaliser(*_split_sums(z, jnp.exp(z), axes, keepdims))


def _split_sums(z, e, axes, keepdims, *terms):
    """``(top, below, *sums)``: sum(e) at the maxima (z = 0), below them, and
    the sum of each of ``terms``, in one pass; e = exp(z), made once by the
    caller (it builds its terms from it too)."""
    at_top = z == 0
    # exp(z) rather than 1 at the top: the same value, with z's derivative.
    split = (select(at_top, e, 0.0), select(at_top, 0.0, e))
    return reduce_sums((*split, *terms), axes, keepdims)


def _split_log_normaliser(top, below):
    safe_top = select(top == 0, 1.0, top)
    log_s = select(top == 0, 0.0, jnp.log(safe_top) + jnp.log1p(below / safe_top))
    # q = (s - k) / s with k the count at the top: below / s in value, and
    # top - k (exactly 0) carries the top's part of dq.
    moving_top = top - lax.stop_gradient(top)
    return log_s, (below + moving_top) / safe_normaliser(top + below)


def log_sum(shift: jax.Array, s: jax.Array, t: jax.Array | None) -> jax.Array:
    """The tempered log normaliser shift + t log|s| (logsumexp), shaped like
    ``s``: -inf for a slice with nothing included; t = 0 gives the shift
    (the max). t log|s| -> 0 as t -> inf only when exactly one unit of
    weight is left, and is +inf otherwise."""
    # log of the safe normaliser, so that differentiating through the select
    # meets no 1 / 0 on an empty slice.
    log_s = jnp.log(jnp.abs(safe_normaliser(s)))
    if t is not None:
        unit_at_inf = (t == INF) & (jnp.abs(s) == 1)
        log_s = select(unit_at_inf, 0.0, t * log_s)
    return select(s == 0, -INF, shift + log_s)


def untempered_log_sum(axes, x: jax.Array, mask=None) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp, sign)`` keepdims at t = 1 without weights, from x itself.

    The value needs none of the per-entry limits of :func:`shifted`. On a
    slice whose max is +inf it is +inf, or NaN with a NaN in the slice:
    shifting that slice by 0 instead of its max gives exactly that from the
    sum itself (exp(+inf) = +inf; a NaN stays, even where a fused max would
    have dropped it), as jax.nn.logsumexp does. Equal to :func:`log_sum` over
    :func:`logits` on every input, with the logits never stored.
    """
    shift = slice_shift(axes, x, None, mask)
    shift = select(shift == INF, 0.0, shift)
    x = upcast(x)
    if mask is not None:
        x = select(mask, x, -INF)
    s = reduce_sum(jnp.exp(x - shift), axes)
    return shift + jnp.log(s), jnp.sign(s)


def entropy(
    z: jax.Array, axes, keepdims: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(H, log_s, mean_z)``: the Shannon entropy -sum p log p of
    p = softmax(z), in nats, with the log normaliser and mean_z = sum(p z)
    it is built from.

    H = log s - mean_z, with log s split at the maxima, since the entropy of a
    confident slice is mostly the part of log s below an ulp of 1. Excluded
    entries (z = -inf, p = 0) contribute 0 and a slice with nothing included
    has entropy 0 (log_s = 0, mean_z = 0); k entries at z = 0 and nothing else
    give log k."""
    # A product with 0 at z = -inf, not a select after it (whose cotangent
    # would meet 0 * -inf).
    e = jnp.exp(z)
    top, below, ez = _split_sums(z, e, axes, keepdims, e * select(z == -INF, 0.0, z))
    log_s, _ = _split_log_normaliser(top, below)
    s = top + below
    mean_z = ez / safe_normaliser(s)
    return select(s == 0, 0.0, log_s - mean_z), log_s, mean_z


def inverse_temperature(t: jax.Array) -> jax.Array:
    """1 / t, with 1 / 0 taken as 0: the hard max does not move with x."""
    positive = t > 0
    return select(positive, 1.0 / select(positive, t, 1.0), 0.0)


def tangent_value(tangent) -> jax.Array | None:
    """None for a symbolic-zero tangent, else the tangent in the compute dtype.

    A float16 / bfloat16 input has a tangent of its dtype; upcasting it once
    keeps reverse mode to one rounding of the cotangent.
    """
    if tangent is None or isinstance(tangent, SymbolicZero):
        return None
    return upcast(tangent)


def tangent_logits(z, t, dx, dt):
    """The tangent of z: dz = (dx - z dt) / t, without the z term where z is infinite.

    Any per-slice constant may be added to dz (the shift's derivative is one),
    since every function of z here is invariant to it. None when both tangents
    are symbolic zeros.
    """
    if dx is None and dt is None:
        return None
    dz = jnp.zeros_like(z) if dx is None else dx
    if dt is not None:
        dz = dz - select(jnp.isfinite(z), z, 0.0) * dt
    return dz if t is None else dz * inverse_temperature(t)
