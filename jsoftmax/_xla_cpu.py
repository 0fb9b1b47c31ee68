"""Formulations that XLA:CPU needs and other backends do not.

Each is dispatched with ``jax.lax.platform_dependent``, so that a program
lowered for another backend never sees it, and computes the identity of
its arguments (the values are the same on every backend; the tests of its
callers run on CPU, where it is active, and compare with references).
Measured with jax 0.10.2.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["per_chunk", "sums"]


def per_chunk(start: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """``xs`` tied to a loop's chunk ``start`` on XLA:CPU, as they are elsewhere.

    XLA:CPU hoists the float32 conversion of a 16-bit operand out of a chunk
    loop and converts all of it at once (a float32 copy of a Llama-3-sized
    ``weight``, BENCHMARKS.md); an optimisation barrier with the chunk start
    keeps each chunk's conversion inside the loop.
    """
    start = jnp.asarray(start)

    def tied(start, *xs):
        return lax.optimization_barrier((start, xs))[1]

    def untouched(start, *xs):
        return xs

    return lax.platform_dependent(start, *xs, cpu=tied, default=untouched)


def sums(values: tuple[jax.Array, ...], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """The sums of ``values`` (one shape) over ``axes``, keepdims, in one pass on XLA:CPU.

    XLA:CPU hands a sum to a YNNPACK fusion that takes neither compares nor
    selects, and it stores an elementwise producer that feeds more than one
    sum: an input-sized buffer per sum where a derivative needs the entropy
    of the logits (their masked product with exp). One variadic reduction is
    fused by XLA itself, producers and all. Elsewhere, one sum each.
    """
    axes = tuple(axes)
    if len(values) == 1:
        return _separate(axes, *values)
    return lax.platform_dependent(
        *values, cpu=partial(_variadic, axes), default=partial(_separate, axes)
    )


def _separate(axes, *values):
    return tuple(jnp.sum(v, axis=axes, keepdims=True) for v in values)


# lax.reduce's JVP rule fails on a symbolic-zero tangent (a value that does
# not depend on the differentiated input; as reduce_window's did,
# jax-ml/jax#32548), so the sums carry their own: a sum is linear.
@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _variadic(axes, *values):
    zeros = tuple(jnp.zeros((), v.dtype) for v in values)
    out = lax.reduce(values, zeros, _add, axes)
    return tuple(jnp.expand_dims(o, axes) for o in out)


@_variadic.defjvp
def _variadic_jvp(axes, primals, tangents):
    return _variadic(axes, *primals), _separate(axes, *tangents)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))
