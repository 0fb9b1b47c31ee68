"""Formulations that XLA:CPU needs and other backends do not.

Each is dispatched with ``jax.lax.platform_dependent``, so that a program
lowered for another backend never sees it, and computes the identity of
its arguments (the values are the same on every backend; the tests of its
callers run on CPU, where it is active, and compare with references).
Measured with jax 0.10.2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["per_chunk"]


def per_chunk(start: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """``xs`` tied to a loop's chunk ``start`` on XLA:CPU, as they are elsewhere.

    XLA:CPU hoists the float32 conversion of a 16-bit operand out of a chunk
    loop and converts all of it once (2.1 GB for a Llama-3-sized ``weight``);
    an optimisation barrier with the chunk start keeps each chunk's
    conversion inside the loop.
    """
    start = jnp.asarray(start)

    def tied(start, *xs):
        return lax.optimization_barrier((start, xs))[1]

    def untouched(start, *xs):
        return xs

    return lax.platform_dependent(start, *xs, cpu=tied, default=untouched)
