"""entropy, kl_divergence and segment_softmax against the formulas users write.

Usage::

    python benchmarks/family.py [--quick] [--seconds S] [--only NAME]

References, each in one process with jsoftmax, interleaved (see run.py):

* entropy: ``-sum(jax.nn.softmax(x) * jax.nn.log_softmax(x))``;
* kl_divergence (the teacher's logits fixed, the student's differentiated):
  ``sum(p * (log_p - jax.nn.log_softmax(student)))`` with p and log_p the
  teacher's softmax and log_softmax;
* segment_softmax: jraph's formulation (jraph v0.0.6.dev0
  jraph/_src/utils.py): ``segment_max``, ``exp``, ``segment_sum``, gather,
  at E = 1,000,000 entries with 8 heads over 100,000 segments, ids sorted
  (with ``indices_are_sorted=True`` for both) and unsorted.

Prints one markdown table in run.py's format; no timing is asserted anywhere.
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

import jsoftmax
from benchmarks import run

SEGMENT_SHAPE, SEGMENTS = (1_000_000, 8), 100_000
QUICK_SEGMENT_SHAPE, QUICK_SEGMENTS = (2000, 8), 200


def _hand_entropy(x, _):
    return -jnp.sum(jax.nn.softmax(x) * jax.nn.log_softmax(x), axis=-1)


def _hand_kl(student, teacher):
    p, log_p = jax.nn.softmax(teacher), jax.nn.log_softmax(teacher)
    return jnp.sum(p * (log_p - jax.nn.log_softmax(student)), axis=-1)


def divergence_pairs() -> list[run.Pair]:
    # ``labels="probs"`` gives a second array of the logits' shape: the teacher.
    return [
        run.Pair("entropy", "hand-written", lambda x, _: jsoftmax.entropy(x), _hand_entropy),
        run.Pair("kl_divergence", "hand-written",
                 lambda x, teacher: jsoftmax.kl_divergence(teacher, x), _hand_kl,
                 labels="probs"),
    ]


def jraph_segment_softmax(logits, ids, num_segments, indices_are_sorted):
    """jraph's segment_softmax formulation."""
    maxs = jax.ops.segment_max(logits, ids, num_segments, indices_are_sorted=indices_are_sorted)
    logits = jnp.exp(logits - maxs[ids])
    totals = jax.ops.segment_sum(logits, ids, num_segments, indices_are_sorted=indices_are_sorted)
    return logits / totals[ids]


def segment_case(shape, num_segments, ordered, mode, *, seconds, min_reps, max_reps, rng):
    """One run.Timing of segment_softmax against jraph's formulation."""
    kx, ki, kp = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, shape, jnp.float32) * 2.0
    ids = jax.random.randint(ki, shape[:1], 0, num_segments)
    if ordered:
        ids = jnp.sort(ids)
    proj = jax.random.normal(kp, shape, jnp.float32)

    def program(fn):
        if mode == "fwd":
            return fn
        return jax.grad(lambda x, ids: jnp.sum(fn(x, ids) * proj))

    ours = program(lambda x, ids: jsoftmax.segment_softmax(
        x, ids, num_segments, indices_are_sorted=ordered))
    ref = program(lambda x, ids: jraph_segment_softmax(x, ids, num_segments, ordered))
    compiled = {
        "ours": jax.jit(ours).lower(x, ids).compile(),
        "ref": jax.jit(ref).lower(x, ids).compile(),
        "floor": jax.jit(jnp.exp).lower(x).compile(),
    }
    args = {"ours": (x, ids), "ref": (x, ids), "floor": (x,)}
    times, reps, calls = run.time_interleaved(
        compiled, args, seconds=seconds, min_reps=min_reps, max_reps=max_reps, rng=rng)
    name = f"segment_softmax ({'sorted' if ordered else 'unsorted'} ids, {num_segments} segments)"
    temp = {k: run.temp_bytes(compiled[k]) for k in ("ours", "ref")}
    return run.summarise(name, "jraph formulation", mode, "float32", shape, times, reps, calls,
                         temp)


def main(argv=None) -> list[run.Timing]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing budget per case (default 4, quick 0.05)")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only functions whose name contains NAME (repeatable)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.05 if args.quick else 4.0)
    min_reps, max_reps = (3, 5) if args.quick else (20, 1000)
    shapes = run.QUICK_SHAPES if args.quick else run.FULL_SHAPES
    seg_shape, segments = (
        (QUICK_SEGMENT_SHAPE, QUICK_SEGMENTS) if args.quick else (SEGMENT_SHAPE, SEGMENTS)
    )
    rng = np.random.default_rng(0)
    wanted = lambda name: not args.only or any(s in name for s in args.only)
    timings = []
    for pair in divergence_pairs():
        if not wanted(pair.name):
            continue
        for shape in shapes:
            for dtype in run.DTYPES:
                for mode in run.MODES:
                    timings.append(run.bench_case(
                        pair, shape, dtype, mode, seconds=seconds, min_reps=min_reps,
                        max_reps=max_reps, rng=rng))
                    print(f"# {pair.name} {mode} {jnp.dtype(dtype).name} {shape}: "
                          f"{timings[-1].ratio:.2f}", file=sys.stderr, flush=True)
    if wanted("segment_softmax"):
        for ordered in (True, False):
            for mode in run.MODES:
                timings.append(segment_case(
                    seg_shape, segments, ordered, mode, seconds=seconds, min_reps=min_reps,
                    max_reps=max_reps, rng=rng))
                print(f"# {timings[-1].function} {mode}: {timings[-1].ratio:.2f}",
                      file=sys.stderr, flush=True)
    print("## Machine\n")
    for k, v in run.machine().items():
        print(f"- {k}: {v}")
    print("\n## entropy, kl_divergence and segment_softmax against the hand-written "
          "formulas (ratio = jsoftmax / reference; target <= 1.05, temp bytes no larger)\n")
    print(run.timing_table(timings))
    met = sum(t.meets_target for t in timings)
    print(f"\nTargets met on {met}/{len(timings)} cases.")
    return timings


if __name__ == "__main__":
    main()
