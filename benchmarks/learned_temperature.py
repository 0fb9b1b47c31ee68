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

MODES = ("logits only", "temperature only", "both")


def cases(n: int, v: int, d: int):
    """``(name, loss(*args), args, argnums per mode)``, the temperature the
    second argument; the fused loss's "logits" are hidden and weight."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jnp.zeros((n,), jnp.int32)
    probs = jnp.full((n, v), 1.0 / v)
    plain = dict(zip(MODES, (0, 1, (0, 1)), strict=True))
    return [
        ("logsumexp", lambda x, t: jsoftmax.logsumexp(x, axis=-1, temperature=t),
         (f32(n, v), f32(n)), plain),
        ("softmax_cross_entropy_with_integer_labels",
         lambda x, t: jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels, temperature=t),
         (f32(n, v), f32(n)), plain),
        ("softmax_cross_entropy",
         lambda x, t: jsoftmax.softmax_cross_entropy(x, probs, temperature=t),
         (f32(n, v), f32(n)), plain),
        ("fused_linear_cross_entropy",
         lambda h, t, w: jsoftmax.fused_linear_cross_entropy(h, w, labels, temperature=t),
         (f32(n, d), f32(n), f32(d, v)), dict(zip(MODES, ((0, 2), 1, (0, 1, 2)), strict=True))),
    ]


def temp_bytes(loss, args, argnums) -> int:
    step = jax.jit(jax.grad(lambda *a: jnp.mean(loss(*a)), argnums))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    for name, loss, shapes, argnums in cases(args.n, args.v, args.d):
        rows.append({"function": name,
                     **{mode: temp_bytes(loss, shapes, argnums[mode]) for mode in MODES}})
    print(f"Temporary bytes of jax.grad, N={args.n}, V={args.v}"
          f" (fused: D={args.d}); jax {jax.__version__}, {jax.default_backend()}\n")
    print("| function | " + " | ".join(MODES) + " |")
    print("|---|" + "---:|" * len(MODES))
    for r in rows:
        print(f"| {r['function']} | " + " | ".join(f"{r[m]:,}" for m in MODES) + " |")
    return rows


if __name__ == "__main__":
    main()
