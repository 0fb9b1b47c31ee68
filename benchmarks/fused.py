"""The fused output-layer functions against the unfused formulas: compiled memory and time.

Measures ``jax.jit(jax.value_and_grad(mean of the per-example values,
argnums=(0, 1)))`` (gradients with respect to the student's hidden and
weight), for two suites:

* ``--suite loss`` (the default), the cross-entropy of ``hidden @ weight``:
  unfused, ``softmax_cross_entropy_with_integer_labels(hidden @ weight,
  labels)``, optax's and jsoftmax's, which materialise [N, V] (ratios are
  against optax's, the first row); fused,
  ``fused_linear_cross_entropy(..., chunk_size=C)`` for the default chunk
  size and the sizes given with ``--chunks``; and the default chunk size
  with ``return_stats=True``, differentiating ``loss - 0.01 * entropy`` (a
  policy-gradient loss with an entropy bonus; the argmax is used too).
* ``--suite divergence``, distillation: KL(teacher || student) with the
  teacher (hidden size ``--teacher-d``) under ``stop_gradient``; unfused,
  ``kl_divergence(teacher_hidden @ teacher_weight, hidden @ weight)``
  (ratios are against it, the first row); fused,
  ``fused_linear_kl_divergence`` for the default and the ``--chunks``.

Memory is ``compiled.memory_analysis().temp_size_in_bytes`` (deterministic:
the buffers XLA allocates besides arguments and outputs). Time is the best
and the median wall time of ``--repeats`` calls after one warm-up call, the
calls of all variants interleaved; on a shared machine the best is the
steadier of the two (other jobs only ever add time).

Prints a markdown table, and the ratio of the stats' variant to the fused
loss alone at the same chunk size. Usage::

    python benchmarks/fused.py                      # N=4096, D=512, V=32768
    python benchmarks/fused.py --n 1024 --v 8192 --chunks 256 1024 --repeats 3
    python benchmarks/fused.py --v 262144 --repeats 0   # memory only: compile, no run
    python benchmarks/fused.py --suite divergence --teacher-d 768
    python benchmarks/fused.py --suite divergence --n 8192 --d 4096 --teacher-d 4096 \\
        --v 128256 --dtype bfloat16 --chunks --repeats 0
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jsoftmax
from jsoftmax._vocab import default_chunk_size

_STATS = "fused + stats"


def _loss_variants(args, default):
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

    def with_stats(h, w, y):
        loss, stats = jsoftmax.fused_linear_cross_entropy(h, w, y, return_stats=True)
        # The argmax joins as an exact 0, so that it is computed too.
        return loss - 0.01 * stats.entropy + 0 * (stats.argmax == y)

    variants[f"{_STATS}, chunk_size={default} (default)"] = with_stats
    return variants


def _divergence_variants(args, default):
    sg = jax.lax.stop_gradient
    variants = {
        "unfused, jsoftmax.kl_divergence": lambda h, w, ht, wt: jsoftmax.kl_divergence(
            sg(ht) @ sg(wt), h @ w),
    }
    for chunk in sorted({default, *args.chunks}):
        if chunk > args.v:
            continue
        label = f"fused, chunk_size={chunk}" + (" (default)" if chunk == default else "")
        variants[label] = lambda h, w, ht, wt, c=chunk: jsoftmax.fused_linear_kl_divergence(
            h, w, sg(ht), sg(wt), chunk_size=c)
    return variants


def _inputs(args, dtype):
    """Random inputs, or shapes only when nothing runs."""
    shapes = [(args.n, args.d), (args.d, args.v)]
    if args.suite == "divergence":
        shapes += [(args.n, args.teacher_d), (args.teacher_d, args.v)]
    if args.repeats == 0:
        arrays = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    else:
        keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
        # hidden ~ 0.5 N(0, 1), weight ~ N(0, 1 / D): logits of size about 0.5.
        arrays = [
            (jax.random.normal(k, s) * (0.5 if i % 2 == 0 else s[0] ** -0.5)).astype(dtype)
            for i, (k, s) in enumerate(zip(keys, shapes, strict=False))
        ]
    if args.suite == "loss":
        labels = (jax.ShapeDtypeStruct((args.n,), jnp.int32) if args.repeats == 0
                  else jax.random.randint(keys[-1], (args.n,), 0, args.v))
        arrays.append(labels)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="loss", choices=["loss", "divergence"])
    parser.add_argument("--n", type=int, default=4096, help="examples (rows of hidden)")
    parser.add_argument("--d", type=int, default=512, help="hidden size")
    parser.add_argument("--teacher-d", type=int, default=768,
                        help="the teacher's hidden size (--suite divergence)")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[512, 1024, 4096],
                        help="chunk sizes to measure besides the default")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per variant; 0 compiles only (memory, no time)")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    inputs = _inputs(args, dtype)
    default = default_chunk_size(args.n, args.v)
    make = _loss_variants if args.suite == "loss" else _divergence_variants
    variants = make(args, default)

    compiled, memory, values = {}, {}, {}
    argnums = (0, 1)
    for name, fn in variants.items():
        step = jax.jit(jax.value_and_grad(lambda *a, f=fn: f(*a).mean(), argnums))
        compiled[name] = step.lower(*inputs).compile()
        memory[name] = compiled[name].memory_analysis().temp_size_in_bytes
        if args.repeats > 0:
            values[name] = float(jax.block_until_ready(compiled[name](*inputs))[0])

    base = next(iter(variants))
    sizes = f"N={args.n}, D={args.d}, V={args.v}"
    if args.suite == "divergence":
        sizes += f", teacher D={args.teacher_d} (under stop_gradient)"
    header = (f"{args.suite}: jit(value_and_grad(mean)) in hidden and weight, {sizes}, "
              f"{args.dtype}, {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    vs = "vs " + base.split(", ", 1)[1] if args.suite == "loss" else "vs unfused"
    if args.repeats == 0:
        print(header + "\n")
        print(f"| variant | temp memory (bytes) | memory {vs} |")
        print("|---|---:|---:|")
        for name in variants:
            print(f"| {name} | {memory[name]:,} | {memory[name] / memory[base]:.4f} |")
        return

    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - start)

    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{header}, {args.repeats} timed calls each\n")
    print(f"| variant | temp memory (bytes) | memory {vs} | best time (s) | best {vs} "
          f"| median time (s) | median {vs} | value |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {memory[name]:,} | {memory[name] / memory[base]:.4f} "
              f"| {best[name]:.3f} | {best[name] / best[base]:.2f} "
              f"| {median[name]:.3f} | {median[name] / median[base]:.2f} | {values[name]:.6f} |")
    stats = next((name for name in variants if name.startswith(_STATS)), None)
    if stats is not None:
        alone = f"fused, chunk_size={default} (default)"
        print(f"\n{_STATS} vs the fused loss alone: memory +{memory[stats] - memory[alone]:,} "
              f"bytes, best time {best[stats] / best[alone]:.3f}x, "
              f"median time {median[stats] / median[alone]:.3f}x")


if __name__ == "__main__":
    main()
