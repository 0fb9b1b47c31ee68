"""Compiled temporary memory when the temperature is learned.

For ``logsumexp``, both cross-entropies and ``fused_linear_cross_entropy``,
with a traced per-example temperature, compiles ``jax.grad`` of the mean
(summed) output with respect to the logits only, the temperature only, and
both, and prints ``compiled.memory_analysis().temp_size_in_bytes`` of each
(deterministic; nothing is run, so the full sizes cost only compile time).
The target: the temperature adds nothing of the logits' shape to what the
logits alone keep.

Usage::

    python benchmarks/learned_temperature.py                 # N=4096, V=32768 (D=512)
    python benchmarks/learned_temperature.py --n 512 --v 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsoftmax

MODES = {"logits only": 0, "temperature only": 1, "both": (0, 1)}


def cases(n: int, v: int, d: int):
    """``(name, loss(first, t), first_shape)``: first is the logits, or
    hidden for the fused loss (whose "logits" are hidden and weight)."""
    labels = jnp.zeros((n,), jnp.int32)
    probs = jnp.full((n, v), 1.0 / v)
    weight = jax.ShapeDtypeStruct((d, v), jnp.float32)
    return [
        ("logsumexp", lambda x, t: jsoftmax.logsumexp(x, axis=-1, temperature=t), (n, v)),
        ("softmax_cross_entropy_with_integer_labels",
         lambda x, t: jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels, temperature=t),
         (n, v)),
        ("softmax_cross_entropy",
         lambda x, t: jsoftmax.softmax_cross_entropy(x, probs, temperature=t), (n, v)),
        ("fused_linear_cross_entropy", weight, (n, d)),
    ]


def temp_bytes(loss, first_shape, n, argnums, weight=None) -> int:
    first = jax.ShapeDtypeStruct(first_shape, jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.float32)
    if weight is None:
        f = lambda x, t: jnp.mean(loss(x, t))
        step = jax.jit(jax.grad(f, argnums))
        return step.lower(first, t).compile().memory_analysis().temp_size_in_bytes
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    f = lambda h, t, w, y: jnp.mean(jsoftmax.fused_linear_cross_entropy(h, w, y, temperature=t))
    # "logits" for the fused loss are hidden and weight.
    argnums = {0: (0, 2), 1: 1, (0, 1): (0, 1, 2)}[argnums]
    step = jax.jit(jax.grad(f, argnums))
    return step.lower(first, t, weight, labels).compile().memory_analysis().temp_size_in_bytes


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    for name, loss, shape in cases(args.n, args.v, args.d):
        weight = loss if isinstance(loss, jax.ShapeDtypeStruct) else None
        got = {mode: temp_bytes(None if weight is not None else loss, shape, args.n, a, weight)
               for mode, a in MODES.items()}
        rows.append({"function": name, **got})
    print(f"Temporary bytes of jax.grad, N={args.n}, V={args.v}"
          f" (fused: D={args.d}); jax {jax.__version__}, {jax.default_backend()}\n")
    print("| function | " + " | ".join(MODES) + " |")
    print("|---|" + "---:|" * len(MODES))
    for r in rows:
        print(f"| {r['function']} | " + " | ".join(f"{r[m]:,}" for m in MODES) + " |")
    return rows


if __name__ == "__main__":
    main()
