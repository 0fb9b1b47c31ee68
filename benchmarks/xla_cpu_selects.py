"""What one select per entry costs jax.nn itself on this backend.

The contract gives excluded entries (x = -inf, or ``where`` False) zero
derivatives, and that takes a select on the cotangent in the backward pass.
This script measures what such selects cost when they are added to jax.nn's
own functions, side by side with the plain jax.nn function in one process,
interleaved (``run.time_interleaved``), as ratios, with the compiled
temporaries (``memory_analysis().temp_size_in_bytes``):

* ``where``: jax.nn's function with a ``where`` mask (all True, passed as an
  argument so that XLA cannot fold it);
* ``select``: jax.nn's function with the excluded entries' output set by a
  select (``jnp.where(x == -inf, ...)``), which gives them zero gradients.

"fwd+bwd" is the gradient of ``sum(f(x) * proj)``. Usage::

    python benchmarks/xla_cpu_selects.py [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import temp_bytes, time_interleaved

SHAPES = ((4096, 1024), (256, 32000), (16, 262144))
INF = float("inf")


def variants(fn, fill):
    return {
        "jax.nn": lambda x, m: fn(x),
        "where": lambda x, m: fn(x, where=m),
        "select": lambda x, m: jnp.where(x == -INF, fill, fn(x)),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--shapes", type=str, default=None, help="e.g. 64x512,16x4096")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else tuple(
        tuple(int(n) for n in s.split("x")) for s in args.shapes.split(","))
    rng = np.random.default_rng(0)
    rows = []
    for name, fn, fill in [("log_softmax", jax.nn.log_softmax, -INF),
                           ("softmax", jax.nn.softmax, 0.0)]:
        for shape in shapes:
            x = jax.random.normal(jax.random.key(0), shape) * 2
            m = jnp.ones(shape, bool)
            proj = jax.random.normal(jax.random.key(1), shape)
            for mode in ("fwd", "fwd+bwd"):
                compiled, call_args = {}, {}
                for label, f in variants(fn, fill).items():
                    if mode == "fwd":
                        g, a = f, (x, m)
                    else:
                        g = lambda x, m, p, f=f: jax.grad(lambda x: jnp.sum(f(x, m) * p))(x)
                        a = (x, m, proj)
                    compiled[label] = jax.jit(g).lower(*a).compile()
                    call_args[label] = a
                times, _, _ = time_interleaved(compiled, call_args, seconds=args.seconds,
                                               min_reps=15, max_reps=400, rng=rng)
                row = {"function": name, "shape": "x".join(map(str, shape)), "mode": mode}
                for label in compiled:
                    row[f"{label} ratio"] = float(np.median(times[label] / times["jax.nn"]))
                    row[f"{label} temp"] = temp_bytes(compiled[label])
                rows.append(row)
    print(f"jax {jax.__version__}, {jax.default_backend()}; ratio = time / jax.nn's time "
          "(median of interleaved pairs)\n")
    print("| function | shape | mode | jax.nn temp | where ratio | where temp "
          "| select ratio | select temp |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['function']} | {r['shape']} | {r['mode']} | {r['jax.nn temp']:,} "
              f"| {r['where ratio']:.2f} | {r['where temp']:,} "
              f"| {r['select ratio']:.2f} | {r['select temp']:,} |")
    return rows


if __name__ == "__main__":
    main()
