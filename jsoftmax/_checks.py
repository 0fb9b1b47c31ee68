"""Argument checks and canonicalisation shared by the public functions.

Every public function validates its arguments here, before anything is traced,
so that a mistake produces one clear error that names the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int] | None

_LOW_PRECISION = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


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
    for floats, float64 (float32 without x64) for 64-bit integers, float32
    for other integers and booleans."""
    return _dtype_facts(jnp.dtype(dtype), jax.config.jax_enable_x64)[2]


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


def classes_last(a: jax.Array, batch_axes: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Moves ``axes`` (in the given order) last and merges them into one."""
    a = jnp.transpose(a, batch_axes + axes)
    # The class count spelled out: -1 cannot be inferred for an empty batch.
    classes = int(np.prod(a.shape[len(batch_axes) :], dtype=np.int64))
    return a.reshape((*a.shape[: len(batch_axes)], classes))


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


def broadcasts_to(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(src, dst) == tuple(dst)
    except ValueError:
        return False


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


def slice_args(
    name: str, x: ArrayLike, axis: Axis, where: ArrayLike | None, temperature: ArrayLike,
    arg: str = "x",
):
    """The checks of a function over slices (softmax-like), on static
    information only: ``(array, output dtype, sorted axes, mask, temperature,
    layout)``. :func:`shaped_slice_args` finishes the mask and the
    temperature inside the jitted computation, so an eager call makes one
    dispatch. float16 and bfloat16 arrays stay as they are (the callee takes
    the slice max in the input dtype, where it is exact)."""
    arr, out_dtype = as_real_array(name, x, arg, keep_low_precision=True)
    axes = canonicalize_axes(name, axis, arr.ndim)
    mask = mask_spec(name, where, arr.shape)
    t, layout = temperature_spec(name, temperature, arr.shape, axes)
    return arr, out_dtype, axes, mask, t, layout


def shaped_slice_args(axes, layout: str, x: jax.Array, t, mask):
    """The temperature and mask of :func:`slice_args`, inside the jit."""
    t = shaped_temperature(t, layout, x.shape, tuple(axes), compute_dtype(x.dtype))
    return t, shaped_mask(mask, x.shape)

