"""Speed, memory and accuracy of jsoftmax against jax.nn and optax, side by side.

Usage::

    python benchmarks/run.py [--quick] [--json FILE] [--only NAME] [--seconds S]

Prints markdown tables:

* **Speed and memory.** For every function, shape, dtype and mode (forward,
  and forward + backward: the gradient of a random projection of the output,
  so that the backward pass cannot be optimised away), jsoftmax and the
  reference are compiled with ``jax.jit`` and, after warm-up, timed
  *interleaved* in a random order each repetition (so machine noise hits both)
  together with the exp floor (``jnp.exp`` on the same array: a softmax cannot
  be much faster than one pass of exp). Reported: median times, the median of
  the per-repetition ratio jsoftmax / reference and its interquartile range,
  and the compiled temporary bytes from ``compile().memory_analysis()``.
  Forward + backward is also timed against the reference given jsoftmax's
  guarantee (``where=x > -inf``: an excluded entry gets zero derivatives),
  the target there; the plain reference's ratio is reported beside it.
* **Accuracy.** Max error in units in the last place (ulp) of the output dtype
  against a float64 reference (itself spot-checked against mpmath) on random
  rows at several scales.
* **Edge battery.** Pass/fail of ``benchmarks/edge_cases.py`` for jsoftmax and
  jax.nn.

``--quick`` uses small shapes and few repetitions (the test suite runs it as
a smoke test); no timing is ever asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsoftmax
from benchmarks import edge_cases

FULL_SHAPES = ((4096, 1024), (256, 32000), (16, 262144))
QUICK_SHAPES = ((64, 512),)
DTYPES = (jnp.float32, jnp.bfloat16)
MODES = ("fwd", "fwd+bwd")
TARGET_RATIO = 1.05


# --------------------------------------------------------------------------
# The cases: (jsoftmax function, reference function) pairs.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A jsoftmax function and its reference, both ``f(x, labels) -> array``;
    ``guarded``, the reference given jsoftmax's guarantee (``where=x > -inf``:
    an excluded entry gets zero derivatives), is timed beside it forward +
    backward."""

    name: str
    reference: str
    ours: Callable
    ref: Callable
    labels: str | None = None  # None, "probs" (same shape as x) or "int" (one per row)
    guarded: Callable | None = None


def _pairs() -> list[Pair]:
    included = lambda x: x > -jnp.inf
    pairs = [
        Pair("softmax", "jax.nn", lambda x, _: jsoftmax.softmax(x, axis=-1),
             lambda x, _: jax.nn.softmax(x, axis=-1),
             guarded=lambda x, _: jax.nn.softmax(x, axis=-1, where=included(x))),
        Pair("log_softmax", "jax.nn", lambda x, _: jsoftmax.log_softmax(x, axis=-1),
             lambda x, _: jax.nn.log_softmax(x, axis=-1),
             guarded=lambda x, _: jax.nn.log_softmax(x, axis=-1, where=included(x))),
        Pair("logsumexp", "jax.nn", lambda x, _: jsoftmax.logsumexp(x, axis=-1),
             lambda x, _: jax.nn.logsumexp(x, axis=-1),
             guarded=lambda x, _: jax.nn.logsumexp(x, axis=-1, where=included(x))),
    ]
    # The cross-entropies join the benchmark where the package has them.
    if hasattr(jsoftmax, "softmax_cross_entropy"):
        pairs.append(Pair(
            "softmax_cross_entropy", "optax", jsoftmax.softmax_cross_entropy,
            optax.softmax_cross_entropy, labels="probs",
            guarded=lambda x, y: optax.softmax_cross_entropy(x, y, where=included(x))))
    if hasattr(jsoftmax, "softmax_cross_entropy_with_integer_labels"):
        pairs.append(Pair(
            "softmax_cross_entropy_with_integer_labels", "optax",
            jsoftmax.softmax_cross_entropy_with_integer_labels,
            optax.softmax_cross_entropy_with_integer_labels, labels="int",
            guarded=lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
                x, y, where=included(x))))
    return pairs


def _inputs(shape, dtype, labels, seed=0):
    kx, kl, kp = jax.random.split(jax.random.key(seed), 3)
    x = (jax.random.normal(kx, shape, jnp.float32) * 2.0).astype(dtype)
    if labels == "probs":
        aux = jax.nn.softmax(jax.random.normal(kl, shape, jnp.float32)).astype(dtype)
    elif labels == "int":
        aux = jax.random.randint(kl, shape[:-1], 0, shape[-1])
    else:
        aux = jnp.zeros((), dtype)
    return x, aux, kp


def _programs(fn, x, aux, kp, mode):
    """Returns ``(callable, args)`` for one mode of one function."""
    if mode == "fwd":
        return fn, (x, aux)
    out_shape = jax.eval_shape(fn, x, aux).shape
    proj = jax.random.normal(kp, out_shape, jnp.float32)

    def grad(x, aux, proj):
        return jax.grad(lambda x: jnp.sum(fn(x, aux).astype(jnp.float32) * proj))(x)

    return grad, (x, aux, proj)


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------


@dataclass
class Timing:
    function: str
    reference: str
    mode: str
    dtype: str
    shape: tuple[int, ...]
    ours_ms: float
    ref_ms: float
    floor_ms: float
    ratio: float
    ratio_q25: float
    ratio_q75: float
    reps: int
    calls_per_rep: int
    ours_temp_bytes: int
    ref_temp_bytes: int
    # The reference given the same guarantee (forward + backward only).
    guard_ms: float | None = None
    guard_ratio: float | None = None
    guard_temp_bytes: int | None = None
    meets_target: bool = field(init=False)

    def __post_init__(self):
        # Forward + backward pays for the guarantee: its target is the
        # reference given it, where there is one.
        ratio, temp = self.ratio, self.ref_temp_bytes
        if self.guard_ratio is not None:
            ratio, temp = self.guard_ratio, self.guard_temp_bytes
        self.meets_target = ratio <= TARGET_RATIO and self.ours_temp_bytes <= temp


def _call_time(compiled, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / calls


def time_interleaved(compiled: dict, args: dict, *, seconds, min_reps, max_reps, rng):
    """Median-friendly samples: each repetition times every program once, in a
    random order; a sample is ``calls`` back-to-back calls (each blocked on)."""
    for name, c in compiled.items():
        for _ in range(2):
            jax.block_until_ready(c(*args[name]))
    slowest = max(_call_time(c, args[n], 1) for n, c in compiled.items())
    calls = max(1, min(50, round(2e-3 / max(slowest, 1e-7))))
    times = {name: [] for name in compiled}
    names = list(compiled)
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < seconds):
        for i in rng.permutation(len(names)):
            times[names[i]].append(_call_time(compiled[names[i]], args[names[i]], calls))
        reps += 1
    return {k: np.asarray(v) for k, v in times.items()}, reps, calls


def temp_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", -1)) if stats is not None else -1


def _copies(program, n):
    """``program`` applied to ``n`` independent argument tuples in one compiled call.

    On an accelerator one call of a (4096, 1024) softmax takes about as long as
    dispatching it from Python; ``n`` distinct inputs per call make the device
    work dominate while every copy is the same computation (distinct inputs,
    so XLA cannot merge them).
    """
    if n == 1:
        return program
    return lambda *arg_sets: [program(*a) for a in arg_sets]


def bench_case(pair: Pair, shape, dtype, mode, *, seconds, min_reps, max_reps, rng,
               copies=1) -> Timing:
    x, aux, kp = _inputs(shape, dtype, pair.labels)
    programs = {"ours": pair.ours, "ref": pair.ref}
    if mode == "fwd+bwd" and pair.guarded is not None:
        programs["guard"] = pair.guarded
    programs = {k: _programs(f, x, aux, kp, mode)[0] for k, f in programs.items()}
    args = _programs(pair.ours, x, aux, kp, mode)[1]
    # Temporary memory is that of one copy: the programs users would run.
    single = {k: jax.jit(f).lower(*args).compile() for k, f in programs.items()}
    temp = {name: temp_bytes(c) for name, c in single.items()}
    if copies > 1:
        arg_sets = [args] + [
            _programs(pair.ours, *_inputs(shape, dtype, pair.labels, seed=r), mode)[1]
            for r in range(1, copies)
        ]
        args, floor_args = tuple(arg_sets), tuple((a[0],) for a in arg_sets)
    else:
        floor_args = (x,)
    compiled = single if copies == 1 else {
        k: jax.jit(_copies(f, copies)).lower(*args).compile() for k, f in programs.items()
    }
    compiled = {**compiled,
                "floor": jax.jit(_copies(jnp.exp, copies)).lower(*floor_args).compile()}
    all_args = {**{k: args for k in programs}, "floor": floor_args}
    times, reps, calls = time_interleaved(
        compiled, all_args, seconds=seconds, min_reps=min_reps, max_reps=max_reps, rng=rng)
    times = {k: v / copies for k, v in times.items()}
    return summarise(pair.name, pair.reference, mode, jnp.dtype(dtype).name, shape,
                     times, reps, calls, temp)


def summarise(function, reference, mode, dtype, shape, times, reps, calls, temp) -> Timing:
    """A :class:`Timing` from the interleaved samples (seconds per call) of
    "ours", "ref", "floor" and optionally "guard", and the temporary bytes of
    the programs."""
    ratios = times["ours"] / times["ref"]
    guard = {}
    if "guard" in times:
        guard = {"guard_ms": float(np.median(times["guard"]) * 1e3),
                 "guard_ratio": float(np.median(times["ours"] / times["guard"])),
                 "guard_temp_bytes": temp["guard"]}
    return Timing(
        function=function, reference=reference, mode=mode, dtype=dtype, shape=tuple(shape),
        ours_ms=float(np.median(times["ours"]) * 1e3),
        ref_ms=float(np.median(times["ref"]) * 1e3),
        floor_ms=float(np.median(times["floor"]) * 1e3),
        ratio=float(np.median(ratios)),
        ratio_q25=float(np.percentile(ratios, 25)),
        ratio_q75=float(np.percentile(ratios, 75)),
        reps=reps, calls_per_rep=calls,
        ours_temp_bytes=temp["ours"],
        ref_temp_bytes=temp["ref"],
        **guard,
    )


# --------------------------------------------------------------------------
# Accuracy in ulps against float64 (spot-checked with mpmath).
# --------------------------------------------------------------------------


def _ref64(name: str, x: np.ndarray) -> np.ndarray:
    """softmax / log_softmax / logsumexp over the last axis in float64.

    The normaliser is split into the entries at the maximum (``top``, exactly
    1 each) and the rest, so that ``log(total) = log(top) + log1p(below/top)``
    stays accurate when ``below`` is far below 1.
    """
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    d = x - m
    top = np.sum(d == 0, axis=-1, keepdims=True).astype(np.float64)
    below = np.sum(np.where(d == 0, 0.0, np.exp(d)), axis=-1, keepdims=True)
    log_total = np.log(top) + np.log1p(below / top)
    if name == "softmax":
        return np.exp(d) / (top + below)
    if name == "log_softmax":
        return d - log_total
    return (m + log_total)[..., 0]


def _mpmath_check(name: str, x: np.ndarray, ref: np.ndarray) -> None:
    """Raises if the float64 reference disagrees with mpmath on the first row."""
    try:
        import mpmath
    except ImportError:  # the reference is then float64 only
        return
    mpmath.mp.dps = 40
    row = [mpmath.mpf(float(v)) for v in np.asarray(x[0], np.float64)]
    mx = max(row)
    total = mpmath.fsum(mpmath.exp(v - mx) for v in row)
    if name == "softmax":
        want = [mpmath.exp(v - mx) / total for v in row]
    elif name == "log_softmax":
        want = [v - mx - mpmath.log(total) for v in row]
    else:
        want = [mx + mpmath.log(total)]
    got = np.atleast_1d(ref[0])
    for w, g in zip(want, got, strict=True):
        if abs(float(w) - float(g)) > 1e-13 * abs(float(w)) + 1e-300:
            raise AssertionError(f"float64 reference for {name} disagrees with mpmath")


def _ulp(v: np.ndarray, dtype) -> np.ndarray:
    """The spacing of ``dtype`` at float64 values ``v``.

    Below the smallest normal number the unit is that number itself: XLA on CPU
    flushes subnormal results to zero, and counting that flush in subnormal
    spacings (2^-149 in float32) would report millions of "ulps" for an
    absolute error of 1e-38.
    """
    info = jnp.finfo(dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(v), np.finfo(np.float64).tiny)))
    return np.where(
        exponent < info.minexp, np.exp2(float(info.minexp)), np.exp2(exponent - info.nmant)
    )


def ulp_error(got: np.ndarray, want: np.ndarray, dtype) -> float:
    """Max |got - want| in ulps of ``dtype`` at ``want``; inf on a wrong inf or NaN."""
    got = np.asarray(got, np.float64)
    same_nonfinite = (got == want) | (np.isnan(got) & np.isnan(want))
    finite = np.isfinite(want) & np.isfinite(got)
    if np.any(~finite & ~same_nonfinite):
        return math.inf
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: masked below
        err = np.where(finite, np.abs(got - want) / _ulp(want, dtype), 0.0)
    return float(np.max(err)) if err.size else 0.0


@dataclass
class Accuracy:
    function: str
    dtype: str
    scale: float
    ours_ulp: float
    ref_ulp: float


ACCURACY_SCALES = (1.0, 30.0, 1e4, 1e30)


def accuracy(rows: int, cols: int) -> list[Accuracy]:
    funcs = {
        "softmax": (jsoftmax.softmax, jax.nn.softmax),
        "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax),
        "logsumexp": (lambda x: jsoftmax.logsumexp(x, axis=-1),
                      lambda x: jax.nn.logsumexp(x, axis=-1)),
    }
    out = []
    for dtype in DTYPES:
        for scale in ACCURACY_SCALES:
            base = jax.random.normal(jax.random.key(1), (rows, cols), jnp.float32)
            x = (base * scale).astype(dtype)
            x64 = np.asarray(x.astype(jnp.float32), np.float64)
            for name, (ours, ref) in funcs.items():
                want = _ref64(name, x64)
                if dtype == jnp.float32 and scale == 1.0:
                    _mpmath_check(name, x64, want)
                out.append(Accuracy(
                    name, jnp.dtype(dtype).name, scale,
                    ulp_error(np.asarray(ours(x).astype(jnp.float32)), want, dtype),
                    ulp_error(np.asarray(ref(x).astype(jnp.float32)), want, dtype)))
    return out


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "jsoftmax": jsoftmax.__version__,
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _bytes(n: int) -> str:
    if n < 0:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def timing_table(rows: list[Timing]) -> str:
    lines = [
        "| function | vs | mode | dtype | shape | jsoftmax ms | reference ms | ratio | "
        "ratio IQR | exp floor ms | jsoftmax / floor | reference / floor | "
        "temp jsoftmax | temp reference | guarded reference ms | ratio vs guarded | "
        "temp guarded | target |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        guarded = ("- | - | -" if r.guard_ratio is None else
                   f"{r.guard_ms:.3f} | **{r.guard_ratio:.2f}** | {_bytes(r.guard_temp_bytes)}")
        lines.append(
            f"| {r.function} | {r.reference} | {r.mode} | {r.dtype} | "
            f"{r.shape[0]}x{r.shape[1]} | {r.ours_ms:.3f} | {r.ref_ms:.3f} | "
            f"**{r.ratio:.2f}** | {r.ratio_q25:.2f}-{r.ratio_q75:.2f} | {r.floor_ms:.3f} | "
            f"{r.ours_ms / r.floor_ms:.1f} | {r.ref_ms / r.floor_ms:.1f} | "
            f"{_bytes(r.ours_temp_bytes)} | {_bytes(r.ref_temp_bytes)} | {guarded} | "
            f"{'met' if r.meets_target else '**missed**'} |"
        )
    return "\n".join(lines)


def accuracy_table(rows: list[Accuracy]) -> str:
    scales = sorted({r.scale for r in rows})
    head = "| function | dtype | " + " | ".join(f"scale {s:g}" for s in scales) + " |"
    lines = [head, "|" + "---|" * (2 + len(scales))]
    keys = []
    for r in rows:
        if (r.function, r.dtype) not in keys:
            keys.append((r.function, r.dtype))
    for fn, dt in keys:
        cells = []
        for s in scales:
            r = next(a for a in rows if (a.function, a.dtype, a.scale) == (fn, dt, s))
            cells.append(f"{r.ours_ulp:.2f} / {r.ref_ulp:.2f}")
        lines.append(f"| {fn} | {dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def edge_table(results) -> str:
    libs = edge_cases.LIBRARIES
    lines = ["| edge | call | " + " | ".join(libs) + " |", "|" + "---|" * (2 + len(libs))]
    for r in results:
        cells = ["pass" if r.ok[lib] else "**FAIL**" for lib in libs]
        lines.append(f"| {r.name} | `{r.call}` | " + " | ".join(cells) + " |")
    totals = ", ".join(f"{lib} {sum(r.ok[lib] for r in results)}/{len(results)}" for lib in libs)
    lines.append("")
    lines.append(f"Passed: {totals}.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only functions whose name contains NAME (repeatable)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing budget per case (default 4, quick 0.05)")
    parser.add_argument("--copies", type=int, default=None,
                        help="independent inputs per timed call (default 1 on CPU, 8 on "
                             "an accelerator, where one small call is mostly dispatch)")
    args = parser.parse_args(argv)
    copies = args.copies or (1 if jax.default_backend() == "cpu" else 8)

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    seconds = args.seconds if args.seconds is not None else (0.05 if args.quick else 4.0)
    min_reps, max_reps = (3, 5) if args.quick else (30, 1000)
    rng = np.random.default_rng(0)
    info = machine()
    started = time.perf_counter()

    pairs = [p for p in _pairs() if not args.only or any(s in p.name for s in args.only)]
    timings = []
    for pair in pairs:
        for shape in shapes:
            for dtype in DTYPES:
                for mode in MODES:
                    t = bench_case(pair, shape, dtype, mode, seconds=seconds,
                                   min_reps=min_reps, max_reps=max_reps, rng=rng,
                                   copies=copies)
                    timings.append(t)
                    print(f"# {t.function} {t.mode} {t.dtype} {t.shape}: ratio {t.ratio:.2f} "
                          f"({t.ratio_q25:.2f}-{t.ratio_q75:.2f}), {t.reps} reps",
                          file=sys.stderr, flush=True)
    acc = accuracy(*((8, 128) if args.quick else (64, 1024)))
    edges = edge_cases.run_edge_cases()
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["copies_per_call"] = copies
    info["wall_seconds"] = round(time.perf_counter() - started, 1)

    missed = [t for t in timings if not t.meets_target]
    print("## Machine\n")
    for k, v in info.items():
        print(f"- {k}: {v}")
    print("\n## Speed and memory (ratio = jsoftmax time / reference time, median of "
          "interleaved pairs; target: ratio <= 1.05 and temp bytes no larger, forward + "
          "backward against the reference given the same guarantee, where=x > -inf)\n")
    print(timing_table(timings))
    print(f"\nTargets met on {len(timings) - len(missed)}/{len(timings)} cases.")
    print("\n## Accuracy (max error in ulps of the output dtype vs float64: "
          "jsoftmax / jax.nn)\n")
    print(accuracy_table(acc))
    print("\n## Edge battery\n")
    print(edge_table(edges))

    result = {
        "machine": info,
        "timing": [asdict(t) for t in timings],
        "accuracy": [asdict(a) for a in acc],
        "edges": [asdict(e) for e in edges],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
