"""Per-call overhead of jsoftmax against jax.nn and optax: eager and compile.

Usage::

    python benchmarks/overhead.py [--quick] [--json FILE] [--only NAME]
                                  [--eager-only | --compile-only] [--compile-reps N]

Two measurements for every public function, each side by side with the
function it replaces (or, where there is none, with one jitted call of the
same computation), interleaved in one process in a fresh random order each
repetition, so that machine noise hits both sides of a pair:

* **Eager µs per call.** A tiny input (10 float32 logits) called eagerly
  after warm-up, ``block_until_ready`` after every call: what is left is the
  Python argument handling and the dispatches. Variants: plain, a Python
  temperature, a device-array temperature and a mask; the reference gets the
  same through ``x / t`` and its own ``where`` (or ``jnp.where``).
* **Compile ms.** ``jax.jit(jax.grad(sum of f)).lower(x).compile()`` at
  (256, 32000) float32 (``sample`` is not differentiable: ``jax.jit(f)``),
  after ``jax.clear_caches()`` so that every trace is paid for, at t = 1 and
  with a temperature; of it, the XLA part (``.compile()`` of the lowered
  program) is reported too. The machine record has XLA_FLAGS ("" if unset).

The ratio is the median over repetitions of jsoftmax / reference within the
same repetition. ``--quick`` uses a small compile shape and few repetitions
(the test suite runs it as a smoke test); no timing is ever asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsoftmax
from benchmarks.run import machine
from jsoftmax import calibration

T = 0.7
EAGER_SHAPE = (10,)
FULL_COMPILE_SHAPE = (256, 32000)
QUICK_COMPILE_SHAPE = (8, 128)
# The fused loss compiles a matmul of hidden (N, D) with weight (D, V).
HIDDEN = 512
QUICK_HIDDEN = 16


# The functions measured, each against what it replaces.
FUNCTIONS = (
    "softmax", "log_softmax", "logsumexp", "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels", "sample", "gumbel_softmax",
    "fused_linear_cross_entropy", "reliability_bins", "expected_calibration_error",
    "mean_nll", "fit_temperature",
)


@dataclass(frozen=True)
class Case:
    """One variant of one function: ``ours(inputs)`` and ``ref(inputs)``."""

    function: str
    reference: str
    variant: str
    ours: Callable
    ref: Callable


@dataclass
class Row:
    function: str
    reference: str
    kind: str  # "eager" (µs per call) or "compile" (ms)
    variant: str
    ours: float
    ref: float
    ratio: float
    reps: int
    # Compile rows: the XLA part of ``ours`` and ``ref`` (ms), medians.
    ours_xla: float | None = None
    ref_xla: float | None = None


# --------------------------------------------------------------------------
# Inputs and the cases.
# --------------------------------------------------------------------------


def inputs(shape, hidden=8):
    """Every argument a case may take, as device arrays of ``shape``'s batch."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], shape, jnp.float32)
    v = shape[-1]
    batch = shape[:-1]
    probs = jax.nn.softmax(jax.random.normal(keys[1], shape))
    return {
        "x": x,
        "probs": probs,
        "label": jax.random.randint(keys[2], batch, 0, v),
        "mask": jnp.arange(v) % 4 != 3,
        "row_mask": jnp.ones(batch, bool),
        "t": jnp.asarray(T, jnp.float32),
        "key": jax.random.key(1),
        "h": jax.random.normal(keys[3], (*batch, hidden), jnp.float32),
        "w": jax.random.normal(keys[4], (hidden, v), jnp.float32) * hidden**-0.5,
        "scores": jax.nn.softmax(x),
    }


def _temperature_variants(name, ref_name, ours, ref, mask=True):
    """plain, Python t, array t and mask variants of ``ours(a, t, where)``
    against ``ref(a, t, where)`` (t None for 1, where None for no mask)."""
    cases = [
        Case(name, ref_name, "plain", lambda a: ours(a, 1.0, None), lambda a: ref(a, None, None)),
        Case(name, ref_name, "t=0.7", lambda a: ours(a, T, None), lambda a: ref(a, T, None)),
        Case(name, ref_name, "t=array", lambda a: ours(a, a["t"], None),
             lambda a: ref(a, a["t"], None)),
    ]
    if mask:
        cases.append(Case(name, ref_name, "mask", lambda a: ours(a, 1.0, a["mask"]),
                          lambda a: ref(a, None, a["mask"])))
    return cases


def _scaled(x, t):
    return x if t is None else x / t


def _masked(x, where):
    return x if where is None else jnp.where(where, x, -jnp.inf)


def cases() -> list[Case]:
    """Every public function, each against what it replaces."""
    out = []
    for name in ("softmax", "log_softmax"):
        ours_fn, ref_fn = getattr(jsoftmax, name), getattr(jax.nn, name)
        out += _temperature_variants(
            name, f"jax.nn.{name}",
            lambda a, t, m, f=ours_fn: f(a["x"], where=m, temperature=t),
            lambda a, t, m, f=ref_fn: f(_scaled(a["x"], t), where=m),
        )
    out += _temperature_variants(
        "logsumexp", "jax.nn.logsumexp",
        lambda a, t, m: jsoftmax.logsumexp(a["x"], -1, where=m, temperature=t),
        lambda a, t, m: (jax.nn.logsumexp(a["x"], -1, where=m) if t is None
                         else t * jax.nn.logsumexp(a["x"] / t, -1, where=m)),
    )
    out += _temperature_variants(
        "softmax_cross_entropy", "optax",
        lambda a, t, m: jsoftmax.softmax_cross_entropy(a["x"], a["probs"], where=m,
                                                       temperature=t),
        lambda a, t, m: optax.softmax_cross_entropy(_scaled(a["x"], t), a["probs"], where=m),
    )
    out += _temperature_variants(
        "softmax_cross_entropy_with_integer_labels", "optax",
        lambda a, t, m: jsoftmax.softmax_cross_entropy_with_integer_labels(
            a["x"], a["label"], where=m, temperature=t),
        lambda a, t, m: optax.softmax_cross_entropy_with_integer_labels(
            _scaled(a["x"], t), a["label"], where=m),
    )
    out += _temperature_variants(
        "sample", "jax.random.categorical",
        lambda a, t, m: jsoftmax.sample(a["key"], a["x"], where=m, temperature=t),
        lambda a, t, m: jax.random.categorical(a["key"], _masked(_scaled(a["x"], t), m)),
    )
    out += _temperature_variants(
        "gumbel_softmax", "jax.nn.softmax(x + gumbel)",
        lambda a, t, m: jsoftmax.gumbel_softmax(a["key"], a["x"], where=m, temperature=t),
        lambda a, t, m: jax.nn.softmax(
            _scaled(a["x"] + jax.random.gumbel(a["key"], a["x"].shape), t), where=m),
    )
    # The fused loss masks examples: the mask variant uses a row mask.
    out += _temperature_variants(
        "fused_linear_cross_entropy", "optax on h @ w",
        lambda a, t, m: jsoftmax.fused_linear_cross_entropy(
            a["h"], a["w"], a["label"], where=None if m is None else a["row_mask"],
            temperature=t),
        lambda a, t, m: optax.softmax_cross_entropy_with_integer_labels(
            _scaled(a["h"] @ a["w"], t), a["label"],
            where=None if m is None else a["row_mask"][:, None]),
    )
    out += _calibration_cases()
    return out


# The calibration functions replace nothing in jax.nn or optax: their
# reference is their own jitted computation called directly (the dispatch
# floor), and optax's mean loss in one jitted call for mean_nll.
_nll_jit = jax.jit(lambda x, y, t: jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(x / t, y)))


def _calibration_cases() -> list[Case]:
    floor = "one jit call"
    return [
        Case("reliability_bins", floor, "plain",
             lambda a: calibration.reliability_bins(a["scores"], a["label"], 15),
             lambda a: calibration._reliability_bins(15, a["scores"], a["label"])),
        Case("expected_calibration_error", floor, "plain",
             lambda a: calibration.expected_calibration_error(a["scores"], a["label"], 15),
             lambda a: calibration._calibration_error(15, a["scores"], a["label"])),
        Case("mean_nll", "optax mean", "t=0.7",
             lambda a: calibration.mean_nll(a["x"], a["label"], T),
             lambda a: _nll_jit(a["x"], a["label"], T)),
        Case("fit_temperature", floor, "plain",
             lambda a: calibration.fit_temperature(a["x"], a["label"]),
             lambda a: calibration._fit_temperature(a["x"], a["label"])),
    ]


def _calibration_inputs(a):
    """Calibration takes (examples, classes): the logits as 2 rows of 5."""
    x = a["x"].reshape(2, -1)
    return {**a, "x": x, "scores": jax.nn.softmax(x), "label": jnp.array([0, 3])}


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------


def _eager_us(fn, a, calls):
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(a))
    return (time.perf_counter() - start) / calls * 1e6


def _compile_ms(fn, a, grad):
    """Cold compile time, and its XLA part (ms): caches cleared, so every
    trace is counted."""
    jax.clear_caches()
    x = a["x"]

    def scalar(x):
        return jnp.sum(fn({**a, "x": x}).astype(jnp.float32))

    program = jax.grad(scalar) if grad else scalar
    start = time.perf_counter()
    lowered = jax.jit(program).lower(x)
    xla_start = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    return (end - start) * 1e3, (end - xla_start) * 1e3


def _interleaved(measure, ours, ref, reps, rng):
    """Median of each side and of their per-repetition ratio."""
    mine, theirs, ratios = [], [], []
    for _ in range(reps):
        order = [(ours, mine), (ref, theirs)]
        for i in rng.permutation(2):
            fn, out = order[i]
            out.append(measure(fn))
        ratios.append(mine[-1] / theirs[-1])
    return statistics.median(mine), statistics.median(theirs), statistics.median(ratios)


def bench_eager(case, a, *, reps, calls, rng) -> Row:
    for fn in (case.ours, case.ref):  # compile and warm up
        for _ in range(3):
            jax.block_until_ready(fn(a))
    ours, ref, ratio = _interleaved(lambda f: _eager_us(f, a, calls), case.ours, case.ref,
                                    reps, rng)
    return Row(case.function, case.reference, "eager", case.variant, ours, ref, ratio, reps)


def bench_compile(case, a, *, reps, rng) -> Row:
    grad = case.function != "sample"
    fused = case.function == "fused_linear_cross_entropy"
    xla = {case.ours: [], case.ref: []}

    def measure(fn):
        if fused:  # differentiate with respect to hidden
            total, part = _compile_ms(lambda b: fn({**b, "h": b["x"]}), {**a, "x": a["h"]}, grad)
        else:
            total, part = _compile_ms(fn, a, grad)
        xla[fn].append(part)
        return total

    ours, ref, ratio = _interleaved(measure, case.ours, case.ref, reps, rng)
    return Row(case.function, case.reference, "compile", case.variant, ours, ref, ratio, reps,
               statistics.median(xla[case.ours]), statistics.median(xla[case.ref]))


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| function | reference | variant | eager µs jsoftmax | eager µs reference | eager ratio "
        "| compile ms jsoftmax | compile ms reference | compile ratio "
        "| of it XLA ms jsoftmax | of it XLA ms reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {}
    for r in rows:
        by_key.setdefault((r.function, r.reference, r.variant), {})[r.kind] = r
    for (function, reference, variant), kinds in by_key.items():
        cells = []
        for kind, fmt in (("eager", "{:.1f}"), ("compile", "{:.0f}")):
            r = kinds.get(kind)
            cells += (["-"] * 3 if r is None else
                      [fmt.format(r.ours), fmt.format(r.ref), f"{r.ratio:.2f}"])
        r = kinds.get("compile")
        cells += ["-"] * 2 if r is None else [f"{r.ours_xla:.0f}", f"{r.ref_xla:.0f}"]
        lines.append(f"| {function} | {reference} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only functions whose name contains NAME (repeatable)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--eager-only", action="store_true", help="skip the compile times")
    only.add_argument("--compile-only", action="store_true", help="skip the eager times")
    parser.add_argument("--compile-reps", type=int, default=None, metavar="N",
                        help="cold compiles per function and reference (default 3, quick 1)")
    args = parser.parse_args(argv)
    eager_reps, calls, compile_reps = (2, 5, 1) if args.quick else (10, 200, 3)
    if args.compile_reps is not None:
        compile_reps = args.compile_reps
    shape = QUICK_COMPILE_SHAPE if args.quick else FULL_COMPILE_SHAPE
    hidden = QUICK_HIDDEN if args.quick else HIDDEN
    rng = np.random.default_rng(0)
    info = machine()
    started = time.perf_counter()

    small = inputs(EAGER_SHAPE)
    small_fused = inputs((4, EAGER_SHAPE[0]))
    big = inputs(shape, hidden)
    rows = []
    for case in cases():
        if args.only and not any(s in case.function for s in args.only):
            continue
        calibrating = case.reference in ("one jit call", "optax mean")
        fused = case.function == "fused_linear_cross_entropy"
        a = _calibration_inputs(small) if calibrating else small_fused if fused else small
        if not args.compile_only:
            rows.append(bench_eager(case, a, reps=eager_reps, calls=calls, rng=rng))
        # Compile times at t = 1 and with a Python temperature.
        if case.variant in ("plain", "t=0.7") and not calibrating and not args.eager_only:
            rows.append(bench_compile(case, big, reps=compile_reps, rng=rng))
        print(f"# {case.function} {case.variant}: " + ", ".join(
            f"{r.kind} {r.ratio:.2f}" for r in rows if
            (r.function, r.variant) == (case.function, case.variant)), file=sys.stderr, flush=True)
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(table(rows))
    result = {"machine": info, "rows": [asdict(r) for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
