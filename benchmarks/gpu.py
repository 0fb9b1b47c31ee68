"""One command that measures jsoftmax on a GPU and writes the results to a folder.

On a lent GPU machine, whose image already has JAX with CUDA, optax and
scikit-learn and which reaches no network (so nothing is installed: the
script imports the repository it sits in), from the repository root::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT --commit HASH

(``--commit``: the commit to record, since a copied tree has no ``.git``.)
On any other machine with an NVIDIA GPU::

    pip install -e ".[demo]" "jax[cuda13]" && python benchmarks/gpu.py --out gpu-results

It is sized to finish in under 8 minutes on one H100 or H200 (every part
stops at its own limit, all of them within ``--budget`` seconds, 450 by
default) and writes ``gpu.json`` (every number), ``gpu.md`` (the tables) and
``gpu.log`` (the progress lines) into ``--out``; the tables without the long
one of the cases are printed at the end too. The plan, one part at a time,
each in a process of its own with a time limit, so that a part that
fails, hangs or runs out of memory is recorded in the output and the other
parts still run:

* ``env``: the device, the jax, jaxlib, optax and jsoftmax versions, and the
  git commit (when the tree has its ``.git``).
* ``bandwidth``: softmax and log_softmax forward on a (1024, 262144) array in
  float32 and bfloat16: the achieved bandwidth (bytes read plus bytes written
  once, over the median time) of jsoftmax, jax.nn and ``jnp.exp`` on the same
  array, beside the device's peak from a table of known devices; a negation
  (a device-to-device copy) is measured too and stands in for the peak on a
  device the table does not know.
* ``fused``: ``jsoftmax.fused_linear_cross_entropy`` against the unfused
  formula (optax's and jsoftmax's loss of ``hidden @ weight``) at N=8192,
  D=4096, V=128256 in bfloat16: forward + backward time (interleaved calls)
  and device memory (``memory_stats()['peak_bytes_in_use']``, and the
  compiled temporaries), with a sweep over ``chunk_size`` whose fastest
  size is the suggested GPU default. The fused divergence
  (``fused_linear_kl_divergence``) joins when the package has it.
* ``train``: the training example (``jsoftmax-train``) once on the GPU and
  once on the CPU of the same machine: accuracy, NLL, ECE and time.
* ``cases``: the cases of ``benchmarks/run.py`` (every function, shape, dtype
  and mode against its reference, interleaved, as ratios), with short
  timings, and its accuracy table and edge battery.

``--quick`` runs the same plan at tiny sizes on the CPU in well under a
minute, with the cases of one function only (the test suite runs it, so this
script keeps working between GPU runs); ``--parts`` picks some of the parts.
No number here is a pass or a fail: the targets are read off the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "bandwidth", "fused", "train", "cases")
# The longest each part may take (seconds), within what is left of --budget.
PART_LIMITS = {"env": 90, "bandwidth": 150, "fused": 240, "train": 150, "cases": 330}
QUICK_PART_LIMITS = dict.fromkeys(PARTS, 120)

# Peak memory bandwidth (TB/s) of known devices, matched on the words of
# ``device_kind`` (case-insensitive; every word of an entry must appear, and
# the first entry that matches wins).
PEAK_BANDWIDTH: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("gh200", "144gb"), 4.9, "GH200 144GB"),
    (("gh200",), 4.0, "GH200 96GB"),
    (("h200",), 4.8, "H200"),
    (("h100", "pcie"), 2.0, "H100 PCIe"),
    (("h100", "nvl"), 3.9, "H100 NVL"),
    (("h100",), 3.35, "H100 SXM"),
    (("h20",), 4.0, "H20"),
    (("b200",), 8.0, "B200"),
    (("a100", "80gb", "pcie"), 1.935, "A100 80GB PCIe"),
    (("a100", "80gb"), 2.039, "A100 80GB SXM"),
    (("a100",), 1.555, "A100 40GB"),
    (("a10g",), 0.6, "A10G"),
    (("a10",), 0.6, "A10"),
    (("l40s",), 0.864, "L40S"),
    (("l40",), 0.864, "L40"),
    (("l4",), 0.3, "L4"),
    (("v100",), 0.9, "V100"),
    (("t4",), 0.32, "T4"),
    (("a6000",), 0.768, "RTX A6000"),
    (("4090",), 1.008, "GeForce RTX 4090"),
)

# Seconds are counted from the parent's start, in the children too.
_START = float(os.environ.get("JSOFTMAX_GPU_BENCH_START", time.time()))


def log(message: str) -> None:
    """A progress line on stderr: wall-clock time, seconds since start, message."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_bandwidth(device_kind: str) -> tuple[float, str] | None:
    """The known peak bandwidth (TB/s) and name of a device, or None."""
    words = set(re.split(r"[^a-z0-9]+", device_kind.lower()))
    for needed, tbps, name in PEAK_BANDWIDTH:
        if all(w in words for w in needed):
            return tbps, name
    return None


# --------------------------------------------------------------------------
# The parts. Each runs in a child process, imports JAX there, and reports
# through ``record`` (a dict that is written to disk after every update, so
# that a part stopped at its time limit still leaves what it had measured).
# --------------------------------------------------------------------------


class Record(dict):
    """A part's results, saved to ``path`` as JSON on every :meth:`save`."""

    def __init__(self, path: Path) -> None:
        super().__init__(errors=[])
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Records an exception raised inside as an error of ``what`` and goes on."""
        try:
            yield
        except Exception as err:  # one failed step must not lose the others
            log(f"{what}: FAILED: {type(err).__name__}: {err}")
            self["errors"].append(f"{what}: {type(err).__name__}: {str(err)[:2000]}")
        self.save()


def _git_commit() -> dict[str, Any]:
    given = os.environ.get("JSOFTMAX_GPU_BENCH_COMMIT")
    if given:  # --commit: a copied working tree has no .git
        return {"commit": given, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(),
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def part_env(record: Record, quick: bool) -> None:
    import platform

    import jax
    import jaxlib
    import optax

    import jsoftmax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    known = peak_bandwidth(kind) if dev.platform == "gpu" else None
    stats = dev.memory_stats() or {}
    record.update(
        backend=jax.default_backend(),
        platform=dev.platform,
        device_kind=kind,
        device_count=jax.device_count(),
        device_memory_bytes=stats.get("bytes_limit"),
        peak_bandwidth_tbps=known[0] if known else None,
        peak_bandwidth_source=known[1] if known else None,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        optax=optax.__version__,
        jsoftmax=jsoftmax.__version__,
        python=platform.python_version(),
        host=platform.platform(),
        cores=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        **_git_commit(),
    )
    record.save()
    with record.guard("environment info"):
        record["environment_info"] = jax.print_environment_info(return_string=True)


def _pipelined_seconds(fn: Callable, arg: Any, calls: int) -> float:
    """Seconds per call of ``calls`` calls queued back to back, blocked on the last
    (the device runs them in order; no host round trip between them)."""
    import jax

    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn(arg)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def part_bandwidth(record: Record, quick: bool) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jsoftmax

    shape = (64, 4096) if quick else (1024, 262144)
    seconds = 0.2 if quick else 2.0
    dev = jax.devices()[0]
    known = peak_bandwidth(dev.device_kind) if dev.platform == "gpu" else None
    programs = {
        ("softmax", "jsoftmax"): lambda x: jsoftmax.softmax(x, axis=-1),
        ("softmax", "jax.nn"): lambda x: jax.nn.softmax(x, axis=-1),
        ("log_softmax", "jsoftmax"): lambda x: jsoftmax.log_softmax(x, axis=-1),
        ("log_softmax", "jax.nn"): lambda x: jax.nn.log_softmax(x, axis=-1),
        ("exp", "jnp.exp"): jnp.exp,
        ("copy", "negation"): jnp.negative,
    }
    record.update(shape=list(shape), rows=[])
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        with record.guard(f"bandwidth {name}"):
            log(f"bandwidth: {name} {shape}")
            x = jax.jit(lambda k, dtype=dtype: (jax.random.normal(k, shape, jnp.float32) * 2.0)
                        .astype(dtype))(jax.random.key(0))
            moved = 2 * x.size * x.dtype.itemsize  # read once, write once
            compiled = {}
            for key, fn in programs.items():
                compiled[key] = jax.jit(fn).lower(x).compile()
                jax.block_until_ready(compiled[key](x))  # warm-up
            slowest = max(_pipelined_seconds(c, x, 1) for c in compiled.values())
            # Queued calls keep their outputs until they run: at most 16 in flight.
            calls = max(1, min(16, round(0.01 / max(slowest, 1e-7))))
            times: dict[tuple[str, str], list[float]] = {k: [] for k in compiled}
            keys = list(compiled)
            start, reps = time.perf_counter(), 0
            while reps < 5 or (time.perf_counter() - start < seconds and reps < 200):
                for i in rng.permutation(len(keys)):
                    times[keys[i]].append(_pipelined_seconds(compiled[keys[i]], x, calls))
                reps += 1
            copy_gbps = moved / statistics.median(times[("copy", "negation")]) / 1e9
            for (function, library), ts in times.items():
                median = statistics.median(ts)
                row = {
                    "function": function, "library": library, "dtype": name,
                    "shape": list(shape), "bytes": moved, "median_ms": median * 1e3,
                    "best_ms": min(ts) * 1e3, "reps": reps, "calls_per_rep": calls,
                    "gbps": moved / median / 1e9,
                }
                if library == "jsoftmax":  # the median of the same repetition's ratios
                    row["ratio_vs_jax_nn"] = statistics.median(
                        a / b for a, b in zip(ts, times[(function, "jax.nn")], strict=True))
                record["rows"].append(row)
            record.setdefault("copy_gbps", {})[name] = copy_gbps
            log(f"bandwidth: {name}: copy {copy_gbps:.0f} GB/s, " + ", ".join(
                f"{f} {lib} {moved / statistics.median(ts) / 1e9:.0f}"
                for (f, lib), ts in times.items() if f != "copy"))
            del x
    # The peak: the table's, else the fastest copy measured (a lower bound of it).
    copies = record.get("copy_gbps", {})
    peak = known[0] * 1e3 if known else max(copies.values(), default=None)
    record.update(peak_gbps=peak,
                  peak_source=f"table: {known[1]}" if known else "measured copy (negation)")
    for row in record["rows"]:
        row["fraction_of_peak"] = row["gbps"] / peak if peak else None


def _host_normal(shape: tuple[int, ...], scale: float, dtype: Any, seed: int) -> Any:
    """A random normal array made on the host and put on the device as it is, so
    that making it leaves no device-memory peak above its own size."""
    import jax
    import numpy as np

    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    x *= scale
    return jax.device_put(x.astype(dtype))


def _memory(dev: Any) -> tuple[int, int] | None:
    stats = dev.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"]), int(stats["bytes_in_use"])


def _measure_steps(record: Record, table: str, variants: dict[str, Callable], args: tuple,
                   base: str, repeats: int) -> dict[str, dict[str, Any]]:
    """Compiles ``jit(value_and_grad(mean loss))`` of every variant in the hidden
    state and the weight; runs each once in increasing order of compiled
    temporaries (so that each new peak of device memory is its own); then
    times them, interleaved."""
    import jax

    dev = jax.devices()[0]
    rows: dict[str, dict[str, Any]] = {}
    record[table] = rows
    compiled = {}
    for name, loss in variants.items():
        with record.guard(f"{table}: compile {name}"):
            start = time.perf_counter()
            step = jax.jit(jax.value_and_grad(lambda *a, f=loss: f(*a).mean(), argnums=(0, 1)))
            compiled[name] = step.lower(*args).compile()
            stats = compiled[name].memory_analysis()
            rows[name] = {
                "variant": name,
                "compile_s": time.perf_counter() - start,
                "temp_bytes": int(stats.temp_size_in_bytes) if stats else None,
                "output_bytes": int(stats.output_size_in_bytes) if stats else None,
            }
            log(f"{table}: compiled {name} in {rows[name]['compile_s']:.1f} s, "
                f"temporaries {rows[name]['temp_bytes']:,} B")
    order = sorted(compiled, key=lambda n: rows[n]["temp_bytes"] or 0)
    for name in order:
        with record.guard(f"{table}: first call {name}"):
            before = _memory(dev)
            out = jax.block_until_ready(compiled[name](*args))
            after = _memory(dev)
            rows[name]["loss"] = float(out[0])
            del out  # the gradients too: nothing of this call stays resident
            if before is not None and after is not None:
                rows[name]["peak_bytes_in_use"] = after[0]
                # Above what was resident before the call: temporaries and outputs.
                rows[name]["peak_bytes"] = (after[0] - before[1] if after[0] > before[0]
                                            else None)  # under an earlier peak: unknown
            else:
                rows[name]["peak_bytes"] = None
    ran = [n for n in order if "loss" in rows[n]]
    times: dict[str, list[float]] = {n: [] for n in ran}
    for rep in range(repeats):
        for name in ran:
            with record.guard(f"{table}: timed call {rep} of {name}"):
                start = time.perf_counter()
                jax.block_until_ready(compiled[name](*args))
                times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        if ts:
            rows[name].update(median_ms=statistics.median(ts) * 1e3, best_ms=min(ts) * 1e3,
                              calls=len(ts))
    if base in rows and rows[base].get("median_ms"):
        for row in rows.values():
            if row.get("median_ms"):
                row["median_vs_base"] = row["median_ms"] / rows[base]["median_ms"]
    record.save()
    return rows


def part_fused(record: Record, quick: bool) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jsoftmax

    n, d, v = (64, 32, 1000) if quick else (8192, 4096, 128256)
    sweep = (128, 256, 512) if quick else (256, 512, 1024, 2048, 4096, 8192)
    repeats = 2 if quick else 5
    dtype = jnp.bfloat16
    record.update(n=n, d=d, v=v, dtype="bfloat16", sweep=list(sweep), repeats=repeats)
    log(f"fused: N={n}, D={d}, V={v}, bfloat16; making the inputs")
    hidden = _host_normal((n, d), 0.5, dtype, 1)
    weight = _host_normal((d, v), d**-0.5, dtype, 2)
    labels = jax.device_put(np.random.default_rng(3).integers(0, v, n).astype(np.int32))

    fused = jsoftmax.fused_linear_cross_entropy
    optax_ce = optax.losses.softmax_cross_entropy_with_integer_labels
    ours_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
    default = None
    with record.guard("default chunk size"):
        from jsoftmax._vocab import default_chunk_size

        default = default_chunk_size(n, v)
    record["default_chunk_size"] = default
    base = "unfused, optax"
    variants: dict[str, Callable] = {
        base: lambda h, w, y: optax_ce(h @ w, y),
        "unfused, jsoftmax": lambda h, w, y: ours_ce(h @ w, y),
    }
    if default is None:
        variants["fused, default chunk_size"] = lambda h, w, y: fused(h, w, y)
    chunks = {}
    for c in sorted({c for c in (default, *sweep) if c is not None and c <= v}):
        chunks[c] = f"fused, chunk_size={c}" + (" (default)" if c == default else "")
        variants[chunks[c]] = lambda h, w, y, c=c: fused(h, w, y, chunk_size=c)
    rows = _measure_steps(record, "cross_entropy", variants, (hidden, weight, labels), base,
                          repeats)
    swept = {c: rows[name].get("median_ms") for c, name in chunks.items() if name in rows}
    swept = {c: t for c, t in swept.items() if t}
    if swept:
        fastest = min(swept, key=swept.get)
        # The smallest chunk (least memory) within 5% of the fastest: the default to pick.
        suggested = min(c for c, t in swept.items() if t <= 1.05 * swept[fastest])
        record.update(fastest_chunk_size=fastest, suggested_chunk_size=suggested)
        log(f"fused: fastest chunk_size={fastest}, suggested {suggested}")
    record.save()

    if not hasattr(jsoftmax, "fused_linear_kl_divergence"):
        record["kl_divergence"] = None
        return
    with record.guard("kl_divergence"):
        _fused_kl(record, hidden, weight, repeats)


def _fused_kl(record: Record, hidden: Any, weight: Any, repeats: int) -> None:
    """The fused divergence against the unfused formula, the student's gradients
    only (the teacher under stop_gradient, as distillation runs it)."""
    import jax
    import jax.numpy as jnp

    import jsoftmax

    n, d = hidden.shape
    v = weight.shape[1]
    teacher_hidden = _host_normal((n, d), 0.5, hidden.dtype, 4)
    teacher_weight = _host_normal((d, v), d**-0.5, hidden.dtype, 5)
    fused_kl = jsoftmax.fused_linear_kl_divergence
    sg = jax.lax.stop_gradient

    def plain_kl(h: Any, w: Any, th: Any, tw: Any) -> Any:
        logp = jax.nn.log_softmax((sg(th) @ sg(tw)).astype(jnp.float32), axis=-1)
        logq = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)

    base = "unfused, jax.nn formula"
    variants: dict[str, Callable] = {
        base: plain_kl,
        "unfused, jsoftmax.kl_divergence": (
            lambda h, w, th, tw: jsoftmax.kl_divergence(sg(th) @ sg(tw), h @ w)),
        "fused, default chunk_size": lambda h, w, th, tw: fused_kl(h, w, sg(th), sg(tw)),
    }
    _measure_steps(record, "kl_divergence", variants,
                   (hidden, weight, teacher_hidden, teacher_weight), base, repeats)


def part_train(record: Record, quick: bool) -> None:
    import jax

    from jsoftmax_demo import train

    platforms = ["cpu"] if quick or jax.default_backend() == "cpu" else ["gpu", "cpu"]
    epochs = 3 if quick else 60
    record["runs"] = []
    for platform in platforms:
        with record.guard(f"train on {platform}"):
            log(f"train: {epochs} epochs on {platform}")
            args = train.build_parser().parse_args(
                ["--platform", platform, "--epochs", str(epochs), "--quiet"])
            start = time.perf_counter()
            metrics = train.run(args)
            metrics.pop("history", None)
            metrics["wall_s"] = time.perf_counter() - start
            record["runs"].append(metrics)


def part_cases(record: Record, quick: bool) -> None:
    from benchmarks import run

    # Quick: one function's cases (the machinery is the same for every function).
    argv = (["--quick", "--seconds", "0.01", "--only", "logsumexp"] if quick
            else ["--seconds", "0.2"])
    record.update(argv=argv, timing=[])
    measure = run.bench_case

    def bench_case(*args: Any, **kwargs: Any) -> Any:  # keeps each case as it comes
        t = measure(*args, **kwargs)
        record["timing"].append(asdict(t))
        record.save()
        return t

    tables = io.StringIO()
    with contextlib.ExitStack() as stack:
        if callable(measure):
            run.bench_case = bench_case
            stack.callback(setattr, run, "bench_case", measure)
        stack.enter_context(contextlib.redirect_stdout(tables))
        result = run.main(argv)
    record.update(result)
    record["markdown"] = tables.getvalue()


PART_FUNCTIONS: dict[str, Callable[[Record, bool], None]] = {
    "env": part_env, "bandwidth": part_bandwidth, "fused": part_fused, "train": part_train,
    "cases": part_cases,
}


def run_part(name: str, path: Path, quick: bool) -> None:
    """The child process: runs one part and leaves its record at ``path``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    record = Record(path)
    record.save()
    start = time.perf_counter()
    PART_FUNCTIONS[name](record, quick)
    record["seconds"] = time.perf_counter() - start
    record.save()


# --------------------------------------------------------------------------
# The parent: runs each part in a child process, with a time limit.
# --------------------------------------------------------------------------


def _child(name: str, path: Path, quick: bool, limit: float, log_file: Any,
           commit: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["JSOFTMAX_GPU_BENCH_START"] = repr(_START)
    if commit:
        env["JSOFTMAX_GPU_BENCH_COMMIT"] = commit
    if quick:
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(path)]
    if quick:
        cmd.append("--quick")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-60]
            text = f"  {name}| {line}"
            print(text, file=sys.stderr, flush=True)
            log_file.write(text + "\n")
            log_file.flush()

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(limit, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    reader.join(timeout=10)
    seconds = time.monotonic() - start
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = None
    errors = (result or {}).get("errors", [])
    if code is None:
        status, error = "timeout", f"stopped at its limit of {limit:.0f} s"
    elif code != 0:
        status, error = "failed", "\n".join(tail[-25:])
    elif errors:
        status, error = "errors", "; ".join(errors)
    else:
        status, error = "ok", None
    return {"status": status, "seconds": round(seconds, 1), "error": error, "result": result}


def run_parts(parts: Iterable[str], out: Path, quick: bool, budget: float,
              commit: str | None = None) -> dict[str, Any]:
    """Runs ``parts`` in order and writes ``gpu.json`` and ``gpu.md`` after each."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".parts"
    work.mkdir(exist_ok=True)
    limits = QUICK_PART_LIMITS if quick else PART_LIMITS
    report: dict[str, Any] = {
        "quick": quick, "budget_s": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": {},
    }
    deadline = time.monotonic() + budget
    with open(out / "gpu.log", "w") as log_file:
        for name in parts:
            left = deadline - time.monotonic()
            if left < 5:
                report["parts"][name] = {"status": "skipped", "seconds": 0.0, "result": None,
                                         "error": "no time left in --budget"}
                log(f"{name}: skipped (no time left)")
                continue
            limit = min(limits[name], left)
            log(f"{name}: starting (limit {limit:.0f} s)")
            path = work / f"{name}.json"
            path.unlink(missing_ok=True)
            report["parts"][name] = entry = _child(name, path, quick, limit, log_file, commit)
            log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
                + (f": {entry['error'].splitlines()[-1][:300]}" if entry["error"] else ""))
            platform = (entry["result"] or {}).get("platform") if name == "env" else None
            if platform and platform != "gpu" and not quick:
                log(f"warning: JAX runs on {platform}, not a GPU; the full sizes are a GPU's")
            report["wall_s"] = round(time.time() - _START, 1)
            write_report(report, out)
    for path in work.glob("*"):
        path.unlink()
    work.rmdir()
    return report


# --------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def _mib(x: Any) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def _env_md(r: dict[str, Any]) -> list[str]:
    commit = r.get("commit") or "unknown (no git repository)"
    if r.get("dirty"):
        commit += " (with uncommitted changes)"
    peak = r.get("peak_bandwidth_tbps")
    peak_text = (f"{peak} TB/s ({r.get('peak_bandwidth_source')})" if peak
                 else "not in the table")
    return [
        f"- device: {r.get('device_kind')} ({r.get('platform')}, {r.get('device_count')} "
        f"device(s), {_mib(r.get('device_memory_bytes'))} usable)",
        f"- peak bandwidth: {peak_text}",
        f"- jax {r.get('jax')}, jaxlib {r.get('jaxlib')}, optax {r.get('optax')}, "
        f"jsoftmax {r.get('jsoftmax')}, Python {r.get('python')}",
        f"- commit: {commit}",
        f"- host: {r.get('host')}, {r.get('cores')} cores; "
        f"XLA_FLAGS: {r.get('xla_flags') or '(none)'}",
    ]


def _bandwidth_md(r: dict[str, Any]) -> list[str]:
    rows = r.get("rows", [])
    peak = r.get("peak_gbps")
    lines = [
        f"Shape {'x'.join(map(str, r.get('shape', [])))}, forward; GB/s = (bytes read + bytes "
        f"written once) / median time; peak {_num(peak, ',.0f')} GB/s ({r.get('peak_source')}); "
        f"a negation (device-to-device copy) reached "
        + ", ".join(f"{_num(g, ',.0f')} GB/s in {dt}" for dt, g in r.get("copy_gbps", {}).items())
        + ".",
        "",
        "| function | dtype | jsoftmax ms | jax.nn ms | ratio (median of interleaved pairs) "
        "| jsoftmax GB/s | % of peak | "
        "jax.nn GB/s | % of peak | exp GB/s | % of peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def pct(row: dict[str, Any]) -> str:
        fraction = row.get("fraction_of_peak")
        return "n/a" if fraction is None else f"{100 * fraction:.1f}%"

    get = {(x["function"], x["library"], x["dtype"]): x for x in rows}
    for dtype in dict.fromkeys(x["dtype"] for x in rows):
        exp = get.get(("exp", "jnp.exp", dtype), {})
        for fn in ("softmax", "log_softmax"):
            ours, ref = get.get((fn, "jsoftmax", dtype)), get.get((fn, "jax.nn", dtype))
            if not ours or not ref:
                continue
            lines.append(
                f"| {fn} | {dtype} | {ours['median_ms']:.3f} | {ref['median_ms']:.3f} | "
                f"**{_num(ours.get('ratio_vs_jax_nn'), '.2f')}** | {ours['gbps']:,.0f} | "
                f"{pct(ours)} | {ref['gbps']:,.0f} | {pct(ref)} | "
                f"{_num(exp.get('gbps'), ',.0f')} | {pct(exp)} |")
    return lines


def _steps_md(rows: dict[str, Any], base: str) -> list[str]:
    lines = [
        f"| variant | median ms | best ms | median vs {base} | peak device memory | "
        "compiled temporaries | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {_num(row.get('median_ms'))} | {_num(row.get('best_ms'))} | "
            f"{_num(row.get('median_vs_base'), '.2f')} | {_mib(row.get('peak_bytes'))} | "
            f"{_mib(row.get('temp_bytes'))} | {_num(row.get('loss'), '.6f')} |")
    return lines


def _fused_md(r: dict[str, Any]) -> list[str]:
    lines = [
        f"`jit(value_and_grad(mean loss))` in hidden and weight, N={r.get('n')}, "
        f"D={r.get('d')}, V={r.get('v')}, {r.get('dtype')}, {r.get('repeats')} interleaved "
        "calls each. Peak device memory: `peak_bytes_in_use` after the variant's first call "
        "less the bytes in use before it (temporaries and outputs; n/a where an earlier peak "
        "was higher or the backend keeps no statistics).",
        "",
        *_steps_md(r.get("cross_entropy") or {}, "unfused, optax"),
        "",
        f"Chunk-size sweep: fastest `chunk_size={r.get('fastest_chunk_size')}`; suggested GPU "
        f"default (the smallest within 5% of the fastest): `chunk_size="
        f"{r.get('suggested_chunk_size')}` (the current default here: "
        f"{r.get('default_chunk_size')}).",
    ]
    if r.get("kl_divergence"):
        lines += ["", "Fused divergence against the unfused formula (same shapes, the teacher "
                  "under stop_gradient):", "",
                  *_steps_md(r["kl_divergence"], "unfused, jax.nn formula")]
    elif "kl_divergence" in r:
        lines += ["", "No `fused_linear_kl_divergence` in this version of the package."]
    return lines


def _train_md(r: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | device | epochs | test accuracy | NLL before -> after | "
        "ECE before -> after | temperature | training s (compile included) | wall s |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for m in r.get("runs", []):
        lines.append(
            f"| {m.get('backend')} | {m.get('device_kind')} | {m.get('epochs')} | "
            f"{_num(m.get('test_accuracy'), '.4f')} | {_num(m.get('test_nll_before'), '.4f')} "
            f"-> {_num(m.get('test_nll_after'), '.4f')} | {_num(m.get('ece_before'), '.4f')} "
            f"-> {_num(m.get('ece_after'), '.4f')} | {_num(m.get('temperature'), '.4f')} | "
            f"{_num(m.get('train_seconds'), '.1f')} | {_num(m.get('wall_s'), '.1f')} |")
    return lines


def _cases_md(r: dict[str, Any]) -> list[str]:
    text = r.get("markdown")
    if text:  # run.py's own tables, one heading level down
        return [re.sub(r"^(#+) ", r"#\1 ", line) for line in text.rstrip().splitlines()]
    timing = r.get("timing", [])
    lines = [f"Cases measured before the part stopped: {len(timing)} (all their numbers are in "
             "gpu.json):", "",
             "| function | vs | mode | dtype | shape | jsoftmax ms | reference ms | ratio | "
             "ratio vs guarded |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for t in timing:
        lines.append(f"| {t.get('function')} | {t.get('reference')} | {t.get('mode')} | "
                     f"{t.get('dtype')} | {'x'.join(map(str, t.get('shape', [])))} | "
                     f"{_num(t.get('ours_ms'))} | {_num(t.get('ref_ms'))} | "
                     f"**{_num(t.get('ratio'), '.2f')}** | {_num(t.get('guard_ratio'), '.2f')} |")
    return lines


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "env": ("Machine", _env_md),
    "bandwidth": ("Bandwidth: softmax and log_softmax forward", _bandwidth_md),
    "fused": ("Fused linear cross-entropy", _fused_md),
    "train": ("Training example (jsoftmax-train)", _train_md),
    "cases": ("Cases of benchmarks/run.py", _cases_md),
}


def to_markdown(report: dict[str, Any], brief: bool = False) -> str:
    """The report's tables as Markdown; ``brief`` leaves out the cases' long table
    (their summary line stays)."""
    parts = report["parts"]
    lines = [
        "# jsoftmax on " + str((parts.get("env", {}).get("result") or {}).get("device_kind",
                                                                           "an unknown device")),
        "",
        f"`python benchmarks/gpu.py{' --quick' if report['quick'] else ''}`, started "
        f"{report['started']}, {report.get('wall_s', 0):.0f} s in all.",
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in parts.items():
        lines_of_error = (entry.get("error") or "").strip().splitlines()
        note = lines_of_error[-1].replace("|", "/")[:300] if lines_of_error else ""
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {note} |")
    for name, entry in parts.items():
        title, render = SECTIONS[name]
        lines += ["", f"## {title}", ""]
        if entry.get("result"):
            try:
                body = render(entry["result"])
                if brief and name == "cases":
                    body = [x for x in body if x.startswith(("Targets met", "Cases measured"))]
                lines += body
            except Exception as err:  # a report with a broken table beats no report
                lines.append(f"(could not render: {type(err).__name__}: {err})")
        else:
            lines.append(f"No result ({entry['status']}).")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu.md").write_text(to_markdown(report))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="DIR", help="where gpu.json, gpu.md and gpu.log go")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes on the CPU (under a minute): the suite's smoke test")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all the parts together (default 450, quick 300)")
    parser.add_argument("--commit", help="the commit to record where the tree has no .git "
                        "(a copied working tree); by default `git rev-parse HEAD`")
    parser.add_argument("--child", nargs=2, metavar=("PART", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_part(args.child[0], Path(args.child[1]), args.quick)
        return {}
    if not args.out:
        parser.error("--out DIR is required")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    budget = args.budget if args.budget is not None else (300.0 if args.quick else 450.0)
    out = Path(args.out)
    log(f"gpu.py: parts {', '.join(parts)}{' (quick)' if args.quick else ''}, "
        f"budget {budget:.0f} s, writing to {out}")
    report = run_parts(parts, out, args.quick, budget, args.commit)
    print(to_markdown(report, brief=True), flush=True)
    statuses = ", ".join(f"{n} {e['status']}" for n, e in report["parts"].items())
    log(f"gpu.py: done in {report.get('wall_s', 0):.0f} s: {statuses}; wrote {out / 'gpu.md'}")
    return report


if __name__ == "__main__":
    main()
