"""Argument checks shared by the public functions.

Each public function checks the concrete values of its arguments with
:func:`host_args` (a negative temperature, a label smoothing out of range),
then calls one jitted implementation, whose :func:`slice_args` checks shapes,
dtypes, axes and the mask once per trace. Every mistake gets one clear error
that names the function, the argument and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None


def host_args(name: str, x: ArrayLike, where=None, temperature=1.0, arg: str = "x"):
    """``(x, where, t)`` for a jitted implementation: array-likes as NumPy
    arrays, a Python or NumPy ``temperature`` checked (:func:`concrete`; None
    where it is 1: the function without it)."""
    if not isinstance(x, jax.Array | np.ndarray):
        try:
            x = np.asarray(x)
        except ValueError as err:  # a ragged list
            raise TypeError(f"{name}: {arg} must be an array of real numbers; got {x!r}") from err
    if not isinstance(where, jax.Array | np.ndarray | None):
        where = np.asarray(where)
    if x.dtype.kind not in "biufcV":
        raise TypeError(f"{name}: {arg} has dtype {x.dtype}, which is not a real number type; "
                        f"give an array of numbers, e.g. jnp.asarray({arg}, jnp.float32)")
    if isinstance(temperature, jax.Array):
        return x, where, temperature
    return x, where, concrete(name, "temperature", temperature, neutral=1.0,
                              hint=" (0 is the hard max, inf is uniform)")


def concrete(name: str, what: str, value, low: float = 0.0, high: float = np.inf, *,
             closed: bool = True, neutral=None, hint: str = "", fix: str = ""):
    """A Python or NumPy ``value`` checked to lie in [low, high] (``closed``)
    or (low, high): None where it is ``neutral`` everywhere, else the value.
    A jax array, traced or not, is never read back: it is returned as it is,
    for the computation to turn an invalid value into NaN."""
    if isinstance(value, jax.Array):
        return value
    if type(value) in (int, float):  # the common case, without NumPy's per-call cost
        if (low <= value <= high) if closed else (low < value < high):
            return None if value == neutral else value
    elif np.asarray(value).dtype.kind not in "iufV":
        raise TypeError(f"{name}: {what} must be a real number or array; got {value!r}")
    v = np.asarray(value, np.float64)
    bad = v[~((v >= low) & (v <= high) if closed else (v > low) & (v < high))]
    if bad.size:
        limits = (f"in [{low:g}, {high:g}]" if high < np.inf else f">= {low:g}") if closed else (
            f"finite and > {low:g}")
        raise ValueError(f"{name}: {what} must be {limits}{hint}; got {float(bad.ravel()[0])!r}"
                         + fix)
    return None if neutral is not None and np.all(v == neutral) else np.asarray(value)


def host_array(value):
    """JAX and NumPy arrays (and None) as they are, other array-likes as NumPy arrays."""
    return value if isinstance(value, jax.Array | np.ndarray | None) else np.asarray(value)


def slice_args(name: str, x: jax.Array, axis: Axis, where, t, arg: str = "x",
               batch_where: bool = False, t_name: str = "temperature"):
    """Inside the jit, once per trace: ``(x, dtype, axes, mask, t)``: ``x`` in
    jax.nn's result ``dtype`` (float16 / bfloat16 kept), ``axes`` sorted,
    ``mask`` of ``x``'s shape, ``t`` a scalar or of the keepdims shape.
    ``batch_where``: a batch-shaped mask masks whole slices (as in optax)."""
    dtype, ndim, shape = x.dtype, x.ndim, x.shape
    dtype = dtype if jnp.issubdtype(dtype, jnp.inexact) else inexact_dtype(dtype)
    if x.dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: {arg} has dtype {x.dtype}, which is not a real number type; "
                        f"cast it first, e.g. {arg}.astype(jnp.float32)")
    axes = range(ndim) if axis is None else axis if isinstance(axis, tuple) else (axis,)
    if not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"{name}: axis must be an int, a tuple of ints or None; got {axis!r}")
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{name}: axis {axis} is out of range for an array with {ndim} "
                         f"dimension(s); use axes in [{-ndim}, {ndim - 1}]")
    axes = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}: axis {axis!r} names the same dimension twice; list each once")
    batch = tuple(n for i, n in enumerate(shape) if i not in axes)
    if batch_where and where is not None and where.ndim == len(batch) < ndim:
        where = jnp.expand_dims(where, axes)
    # What must broadcast: the mask to x, t to the batch shape (or the keepdims shape).
    pairs = [] if where is None else [
        ("where", where.shape, shape, f"to the shape {shape} of {arg}; give a boolean mask of it")]
    if t is not None and jnp.ndim(t):
        keep = tuple(1 if i in axes else n for i, n in enumerate(shape))
        pairs.append((t_name, jnp.shape(t), batch if jnp.ndim(t) <= len(batch) else keep,
                      f"against the batch shape {batch} ({arg} of shape {shape} with axes {axes} "
                      f"reduced); pass a scalar or one {t_name} per slice"))
    for what, src, dst, tail in pairs:
        if len(src) > len(dst) or any(a not in (1, b) for a, b in zip(src[::-1], dst[::-1],
                                                                       strict=False)):
            raise ValueError(f"{name}: {what} has shape {src}, which does not broadcast {tail}")
    mask = None if where is None else jnp.broadcast_to(where.astype(bool), shape)
    if t is not None:
        t = jnp.asarray(t).astype(jnp.promote_types(dtype, jnp.float32))
        t = jnp.expand_dims(jnp.broadcast_to(t, batch), axes) if 0 < t.ndim <= len(batch) else t
    return x.astype(dtype), dtype, axes, mask, t


def broadcasts_to(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """True when an array of shape ``src`` broadcasts to shape ``dst``."""
    return len(src) <= len(dst) and all(a in (1, b) for a, b in zip(src[::-1], dst[::-1],
                                                                    strict=False))


def is_traced(value: object) -> bool:
    """True when ``value`` is a JAX tracer (its value is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype we compute in: float32 for float16 and bfloat16."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def widen_labels(labels: jax.Array) -> jax.Array:
    """Integer class indices in at least int32: comparisons with the class
    count (labels < V) and with class indices overflow in int8 or uint8 when
    there are more classes than the dtype holds (300 classes, uint8 labels)."""
    return labels.astype(jnp.promote_types(labels.dtype, jnp.int32))


def inexact_dtype(dtype) -> jnp.dtype:
    """The floating dtype jax.nn computes an input of ``dtype`` in: its own
    for inexact dtypes, float64 (float32 without x64) for 64-bit integers,
    float32 for other integers and booleans."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return dtype
    wide = dtype.itemsize == 8 and dtype != jnp.bool_
    return jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64 if wide else np.float32))


def promoted_dtype(*values: ArrayLike) -> jnp.dtype:
    """The floating dtype jax.nn computes ``values`` together in (jax's
    ``promote_args_inexact``): their ``jnp.result_type``, in which a Python
    number is weakly typed, made inexact by :func:`inexact_dtype`."""
    arrays = [
        v if isinstance(v, (bool, int, float, jax.Array, np.ndarray)) else np.asarray(v)
        for v in values
    ]
    return inexact_dtype(jnp.result_type(*arrays))


def classes_last(axis: Axis, axes: tuple[int, ...], *arrays):
    """``arrays`` (None, scalars, or of the logits' rank: the keepdims shape
    too) with the class ``axes`` moved last, in the order ``axis`` gives them
    (a flat class index runs over them so, as in optax), and merged into one."""
    out = []
    for a in arrays:
        if a is None or a.ndim == 0:
            out.append(a)
            continue
        order = axes if not isinstance(axis, tuple) else tuple(i % a.ndim for i in axis)
        batch = tuple(i for i in range(a.ndim) if i not in axes)
        merged = (*(a.shape[i] for i in batch), math.prod(a.shape[i] for i in order))
        out.append(jnp.transpose(a, batch + order).reshape(merged))
    return out


