"""Argument checks shared by the public functions.

Each public function checks the concrete values of its arguments with
:func:`host_args` (a negative temperature, a label smoothing out of range),
then calls one jitted implementation, whose :func:`slice_args` checks shapes,
dtypes, axes and the mask once per trace. Every mistake gets one clear error
that names the function, the argument and the fix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None

_LOW_PRECISION = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def host_args(name: str, x: ArrayLike, where=None, temperature=1.0, arg: str = "x",
              low: float = 0.0, high: float = float("inf"), neutral=1.0, what: str = "temperature"):
    """``(x, where, t)`` for a jitted implementation: array-likes as NumPy
    arrays; a Python or NumPy ``temperature`` checked to lie in [low, high],
    None where it is ``neutral`` (the function without it). A jax array is
    checked on the device, where it gives NaN."""
    x, where = (v if isinstance(v, jax.Array | np.ndarray | None) else np.asarray(v)
                for v in (x, where))
    if getattr(x, "dtype", np.dtype(float)).kind not in "biufcV":
        raise TypeError(f"{name}: {arg} has dtype {x.dtype}, which is not a real number type; "
                        f"give an array of numbers, e.g. jnp.asarray({arg}, jnp.float32)")
    if isinstance(temperature, jax.Array):
        return x, where, temperature
    values = np.asarray(temperature)
    if values.dtype.kind not in "biufV":
        raise TypeError(f"{name}: {what} must be a real number or array; got {temperature!r}")
    bad = values[~((values.astype(float) >= low) & (values.astype(float) <= high))]
    if bad.size:
        limits = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name}: {what} must be {limits}{HINTS.get(what, '')}; "
                         f"got {float(bad.ravel()[0])!r}")
    return x, where, None if np.all(values == neutral) else temperature


# What the limits of a concrete value mean, for its error message.
HINTS = {"temperature": " (0 is the hard max, inf is uniform)",
         "label_smoothing": " (0 is no smoothing)"}


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
    axes = range(ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
    if isinstance(axes, float) or not all(isinstance(a, int | np.integer) for a in axes):
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
    try:
        return np.broadcast_shapes(src, dst) == tuple(dst)
    except ValueError:
        return False


def is_traced(value: object) -> bool:
    """True when ``value`` is a JAX tracer (its value is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype we compute in: float32 for float16 and bfloat16."""
    return jnp.dtype(jnp.float32) if dtype in _LOW_PRECISION else jnp.dtype(dtype)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in the dtype we compute in (see :func:`compute_dtype`)."""
    return x.astype(compute_dtype(x.dtype))


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


@functools.lru_cache(maxsize=256)
def _dtype_facts(dtype: jnp.dtype, x64: bool) -> tuple[jnp.dtype, bool, jnp.dtype]:
    """``(canonical dtype, real, inexact dtype)`` of ``dtype``, cached: every
    call checks the same few dtypes, and the NumPy lookups cost more than the
    dispatch of a small computation. ``x64`` keys the cache on the setting
    the canonical dtypes depend on."""
    del x64  # read by canonicalize_dtype; only a key here
    canonical = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))
    real = jnp.issubdtype(canonical, jnp.floating) or jnp.issubdtype(canonical, jnp.integer)
    if jnp.issubdtype(canonical, jnp.inexact):
        inexact = canonical
    else:
        wide = canonical.itemsize == 8 and canonical != jnp.bool_
        inexact = jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64 if wide else np.float32))
    return canonical, real, inexact


def _facts_of(dtype) -> tuple[jnp.dtype, bool, jnp.dtype]:
    return _dtype_facts(jnp.dtype(dtype), jax.config.jax_enable_x64)


def dtype_of(name: str, x: ArrayLike, arg: str = "x") -> jnp.dtype:
    """``x``'s dtype without converting it (a Python number gives NumPy's)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except Exception as err:  # ragged lists and other non-arrays
            raise TypeError(f"{name}: {arg} must be an array of real numbers; got {x!r}") from err
    return _facts_of(dtype)[0]


def _real_out_dtype(name: str, x: ArrayLike, arg: str, allow_bool: bool) -> jnp.dtype:
    """The dtype a real input ``x`` is computed and returned in; TypeError
    for anything else. float64 without x64 enabled gives float32, quietly."""
    dtype = dtype_of(name, x, arg)
    _, real, out_dtype = _facts_of(dtype)
    if not (real or (allow_bool and dtype == jnp.bool_)):
        raise TypeError(
            f"{name}: {arg} has dtype {dtype}, which is not a real number type; "
            f"cast it first, e.g. {arg}.astype(jnp.float32)"
        )
    return out_dtype


def as_real_array(
    name: str,
    x: ArrayLike,
    arg: str = "x",
    *,
    keep_low_precision: bool = False,
    allow_bool: bool = False,
) -> tuple[jax.Array, jnp.dtype]:
    """Converts ``x`` to a JAX array of the dtype we compute in.

    Returns the array cast to the computation dtype and the dtype to return in:
    float16 and bfloat16 are computed in float32 and returned in their own
    dtype; integers promote as in ``jax.nn`` (see :func:`inexact_dtype`).
    With ``keep_low_precision`` float16 and bfloat16 arrays are returned as
    they are, for a callee that calls :func:`upcast` itself.
    """
    out_dtype = _real_out_dtype(name, x, arg, allow_bool)
    # A jax.Array is used as it is: jnp.asarray would cost a dispatch per call.
    arr = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if arr.dtype != out_dtype:
        arr = arr.astype(out_dtype)
    return (arr if keep_low_precision else upcast(arr)), out_dtype


def host_array(value: ArrayLike) -> ArrayLike:
    """``value`` ready to pass to a jitted function without a device
    operation: JAX arrays (and tracers) and NumPy arrays as they are, any
    other array-like (a list, a Python number) as a NumPy array."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return value
    return np.asarray(value)


def real_spec(
    name: str, x: ArrayLike, arg: str = "x", *, allow_bool: bool = False
) -> tuple[ArrayLike, jnp.dtype]:
    """The checks of :func:`as_real_array` on static information only:
    ``(value, out_dtype)`` with ``value`` from :func:`host_array`, for
    :func:`cast_real` to convert inside the jitted computation."""
    return host_array(x), _real_out_dtype(name, x, arg, allow_bool)


def cast_real(x: ArrayLike, out_dtype, *, keep_low_precision: bool = False) -> jax.Array:
    """The array of :func:`real_spec` in ``out_dtype``, and (unless
    ``keep_low_precision``) in the dtype we compute in, as
    :func:`as_real_array` returns it."""
    arr = jnp.asarray(x).astype(out_dtype)
    return arr if keep_low_precision else upcast(arr)


def canonicalize_axes(name: str, axis: Axis, ndim: int) -> tuple[int, ...]:
    """Turns ``axis`` (int, sequence of ints or None) into a sorted tuple of
    non-negative ints, rejecting out-of-range and duplicate axes."""
    if type(axis) is int and -ndim <= axis < ndim:  # the common case, without NumPy
        return (axis % ndim,)
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        axes = (int(axis),)
    elif isinstance(axis, Sequence) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis
    ):
        axes = tuple(int(a) for a in axis)
    else:
        raise TypeError(f"{name}: axis must be an int, a tuple of ints or None; got {axis!r}")
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}: axis {a} is out of range for an array with {ndim} dimension(s); "
                f"use an axis in [{-ndim}, {ndim - 1}]"
            )
    normalized = tuple(a % ndim for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"{name}: axis {axis!r} names the same dimension twice; list each axis once"
        )
    return tuple(sorted(normalized))


def ordered_axes(name: str, axis: Axis, ndim: int) -> tuple[int, ...]:
    """Like :func:`canonicalize_axes` but keeping the order given, which
    defines the flat index over several class axes (losses, sampling)."""
    axes = canonicalize_axes(name, axis, ndim)  # validates range and duplicates
    if axis is None:
        return axes
    if isinstance(axis, Sequence):
        return tuple(int(a) % ndim for a in axis)
    return (int(axis) % ndim,)


def class_layout(
    name: str, axis: Axis, ndim: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(axes, sorted_axes, batch_axes)`` for functions that flatten the class
    axes into one last axis (losses, sampling): the class axes in the order
    given, the same sorted, and the remaining (batch) axes in order."""
    if type(axis) is int and -ndim <= axis < ndim:  # the common case, without NumPy
        a = axis % ndim
        return (a,), (a,), tuple(i for i in range(ndim) if i != a)
    axes = ordered_axes(name, axis, ndim)
    batch_axes = tuple(i for i in range(ndim) if i not in axes)
    return axes, tuple(sorted(axes)), batch_axes


def classes_last(axis: Axis, axes: tuple[int, ...], *arrays):
    """``arrays`` (None, scalars, or of the logits' rank: the keepdims shape
    too) with the class ``axes`` moved last, in the order ``axis`` gives them
    (a flat class index runs over them so, as in optax), and merged into one."""
    out = []
    for a in arrays:
        if a is None or a.ndim == 0:
            out.append(a)
            continue
        order = axes if axis is None or isinstance(axis, int) else tuple(i % a.ndim for i in axis)
        batch = tuple(i for i in range(a.ndim) if i not in axes)
        merged = (*(a.shape[i] for i in batch), math.prod(a.shape[i] for i in order))
        out.append(jnp.transpose(a, batch + order).reshape(merged))
    return out


def temperature_per_row(t: jax.Array | None, axes: tuple[int, ...]) -> jax.Array | None:
    """A canonical temperature (scalar or keepdims shape) as ``[batch..., 1]``,
    to go with :func:`classes_last`."""
    if t is None or t.ndim == 0:
        return t
    return jnp.squeeze(t, axes)[..., None]


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape left after reducing ``axes`` (without keepdims)."""
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def temperature_spec(
    name: str,
    temperature: ArrayLike,
    shape: tuple[int, ...],
    axes: tuple[int, ...],
) -> tuple[ArrayLike | None, str]:
    """Validates ``temperature`` from static information only and returns
    ``(value, layout)`` for :func:`shaped_temperature`, which finishes the
    job inside the jitted computation (no device operation happens here).

    ``value`` is None for a concrete temperature of exactly 1 (the plain
    function). ``layout`` is "scalar", "batch" (an array broadcastable to the
    batch shape) or "keepdims" (the input's rank with size-1 reduced axes).
    A concrete negative or NaN temperature raises ValueError; a traced one is
    left for the computation, which turns it into NaN.
    """
    if temperature is None:
        raise TypeError(f"{name}: temperature must be a number >= 0 or an array; got None")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        # The common case, checked without NumPy.
        if not temperature >= 0:
            raise ValueError(
                f"{name}: temperature must be >= 0 (0 is the hard max, inf is uniform); "
                f"got {temperature!r}"
            )
        return (None if temperature == 1 else float(temperature)), "scalar"
    concrete = not is_traced(temperature)
    if concrete and not isinstance(temperature, jax.Array):
        values = np.asarray(temperature)
        if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
                or values.dtype == jnp.bfloat16):
            raise TypeError(
                f"{name}: temperature must be a real number or array; got {temperature!r}"
            )
        checked = values.astype(np.float64)
        bad = checked[np.isnan(checked) | (checked < 0)]
        if bad.size:
            raise ValueError(
                f"{name}: temperature must be >= 0 (0 is the hard max, inf is uniform); "
                f"got {bad.ravel()[0]!r}"
            )
        if np.all(checked == 1):
            return None, "scalar"
        temperature = values
    t_shape = tuple(np.shape(temperature))
    batch = reduced_shape(shape, axes)
    keepdims = tuple(1 if i in axes else n for i, n in enumerate(shape))
    if not t_shape:
        return temperature, "scalar"
    if broadcasts_to(t_shape, batch):
        return temperature, "batch"
    if len(t_shape) == len(shape) and broadcasts_to(t_shape, keepdims):
        return temperature, "keepdims"
    raise ValueError(
        f"{name}: temperature of shape {t_shape} does not broadcast against the batch "
        f"shape {batch} (input shape {tuple(shape)} with axes {axes} reduced); pass a "
        "scalar or one temperature per slice"
    )


def shaped_temperature(
    value: ArrayLike | None, layout: str, shape: tuple[int, ...], axes: tuple[int, ...], dtype
) -> jax.Array | None:
    """The temperature of :func:`temperature_spec` as an array of ``dtype``
    that broadcasts against the input (a scalar, or the keepdims shape)."""
    if value is None:
        return None
    t = jnp.asarray(value).astype(dtype)
    if layout == "batch":
        t = jnp.expand_dims(jnp.broadcast_to(t, reduced_shape(shape, axes)), axes)
    return t


def mask_spec(name: str, where: ArrayLike | None, shape: tuple[int, ...]) -> ArrayLike | None:
    """Checks from its shape alone that ``where`` broadcasts to ``shape``;
    :func:`shaped_mask` converts it inside the jitted computation."""
    if where is None:
        return None
    mask_shape = tuple(np.shape(where))
    if mask_shape != tuple(shape) and not broadcasts_to(mask_shape, tuple(shape)):
        raise ValueError(
            f"{name}: where has shape {mask_shape}, which does not broadcast to the "
            f"input shape {tuple(shape)}; give a boolean mask of the input's shape "
            "(or one that broadcasts to it)"
        )
    return where


def shaped_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """``where`` as a boolean array of ``shape`` (None stays None)."""
    if where is None:
        return None
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return jnp.broadcast_to(mask, shape)


def weights_spec(name: str, weights: ArrayLike | None, shape: tuple[int, ...]) -> ArrayLike | None:
    """Checks from static information only that ``weights`` are real numbers
    that broadcast to ``shape`` (the examples'); returns them as
    :func:`host_array` does, for the jitted computation to convert."""
    if weights is None:
        return None
    w_shape = tuple(np.shape(weights))
    if not broadcasts_to(w_shape, tuple(shape)):
        raise ValueError(
            f"{name}: weights has shape {w_shape}, which does not broadcast to the "
            f"examples' shape {tuple(shape)}; give one weight per example (labels' shape)"
        )
    dtype = dtype_of(name, weights, "weights")
    if not _facts_of(dtype)[1]:
        raise TypeError(
            f"{name}: weights has dtype {dtype}, which is not a real number type; "
            "cast it first, e.g. weights.astype(jnp.float32)"
        )
    return host_array(weights)
