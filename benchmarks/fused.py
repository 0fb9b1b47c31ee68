"""Fused linear cross-entropy against the unfused loss: compiled memory and time.

Measures ``jax.jit(jax.value_and_grad(mean loss, argnums=(0, 1)))`` (gradients
with respect to hidden and weight) for

* unfused: ``softmax_cross_entropy_with_integer_labels(hidden @ weight, labels)``,
  optax's and jsoftmax's, which materialise [N, V] (ratios are against
  optax's, the first row);
* fused: ``fused_linear_cross_entropy(hidden, weight, labels, chunk_size=C)``
  for the default chunk size and the sizes given with ``--chunks``.

Memory is ``compiled.memory_analysis().temp_size_in_bytes`` (deterministic:
the buffers XLA allocates besides arguments and outputs). Time is the best
and the median wall time of ``--repeats`` calls after one warm-up call, the
calls of all variants interleaved; on a shared machine the best is the
steadier of the two (other jobs only ever add time).

Prints a markdown table. Usage::

    python benchmarks/fused.py                      # N=4096, D=512, V=32768
    python benchmarks/fused.py --n 1024 --v 8192 --chunks 256 1024 --repeats 3
    python benchmarks/fused.py --v 262144 --repeats 0   # memory only: compile, no run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jsoftmax
from jsoftmax.fused import _default_chunk_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="examples (rows of hidden)")
    parser.add_argument("--d", type=int, default=512, help="hidden size")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[512, 1024, 4096],
                        help="chunk sizes to measure besides the default")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per variant; 0 compiles only (memory, no time)")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    if args.repeats > 0:
        hidden = (jax.random.normal(keys[0], (args.n, args.d)) * 0.5).astype(dtype)
        weight = (jax.random.normal(keys[1], (args.d, args.v)) * args.d**-0.5).astype(dtype)
        labels = jax.random.randint(keys[2], (args.n,), 0, args.v)
    else:
        hidden = jax.ShapeDtypeStruct((args.n, args.d), dtype)
        weight = jax.ShapeDtypeStruct((args.d, args.v), dtype)
        labels = jax.ShapeDtypeStruct((args.n,), jnp.int32)

    default = _default_chunk_size(args.n, args.v)
    optax_ce = optax.losses.softmax_cross_entropy_with_integer_labels
    jsoftmax_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
    variants = {
        "unfused, optax": lambda h, w, y: optax_ce(h @ w, y),
        "unfused, jsoftmax": lambda h, w, y: jsoftmax_ce(h @ w, y),
    }
    for chunk in sorted({default, *args.chunks}):
        if chunk > args.v:
            continue
        label = f"fused, chunk_size={chunk}" + (" (default)" if chunk == default else "")
        variants[label] = (
            lambda h, w, y, c=chunk: jsoftmax.fused_linear_cross_entropy(h, w, y, chunk_size=c)
        )

    compiled, memory, losses = {}, {}, {}
    for name, loss_fn in variants.items():
        step = jax.jit(jax.value_and_grad(lambda h, w, y, f=loss_fn: f(h, w, y).mean(), (0, 1)))
        compiled[name] = step.lower(hidden, weight, labels).compile()
        memory[name] = compiled[name].memory_analysis().temp_size_in_bytes
        if args.repeats > 0:
            losses[name] = float(jax.block_until_ready(compiled[name](hidden, weight, labels))[0])

    base = next(iter(variants))
    header = (f"jit(value_and_grad(mean loss)), N={args.n}, D={args.d}, V={args.v}, {args.dtype}, "
              f"{jax.devices()[0].platform} ({jax.device_count()} device(s))")
    if args.repeats == 0:
        print(header + "\n")
        print("| variant | temp memory (bytes) | memory vs optax |")
        print("|---|---:|---:|")
        for name in variants:
            print(f"| {name} | {memory[name]:,} | {memory[name] / memory[base]:.4f} |")
        return

    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(hidden, weight, labels))
            times[name].append(time.perf_counter() - start)

    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{header}, {args.repeats} timed calls each\n")
    print("| variant | temp memory (bytes) | memory vs optax | best time (s) | best vs optax "
          "| median time (s) | median vs optax | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {memory[name]:,} | {memory[name] / memory[base]:.4f} "
              f"| {best[name]:.3f} | {best[name] / best[base]:.2f} "
              f"| {median[name]:.3f} | {median[name] / median[base]:.2f} | {losses[name]:.6f} |")


if __name__ == "__main__":
    main()
