"""The edge battery: what jsoftmax and jax.nn return at each edge of the contract.

Every row names an edge, the call, the value the contract asks for (derived by
hand or in float64 NumPy, never from the function under test), and what each
library actually returns, with a pass/fail verdict. ``jax.nn`` has no
temperature, so its column uses what a user would write instead: ``f(x / t)``.

Used by the README "Edge cases" table, by the accuracy section of
``benchmarks/run.py`` and by ``tests/test_benchmarks.py``, which asserts that
jsoftmax passes every row.

Run ``python benchmarks/edge_cases.py`` to print the table as markdown.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsoftmax

INF = math.inf
NAN = math.nan
LIBRARIES = ("jsoftmax", "jax.nn")


# --------------------------------------------------------------------------
# The two libraries behind one interface.
# --------------------------------------------------------------------------


def _module(lib: str):
    return jsoftmax if lib == "jsoftmax" else jax.nn


def _tempered(lib: str, name: str, x, t, **kwargs):
    """jsoftmax's keyword temperature, or ``f(x / t)`` (``t * lse(x / t)``) for jax.nn."""
    fn = getattr(_module(lib), name)
    if lib == "jsoftmax":
        return fn(x, temperature=t, **kwargs)
    out = fn(x / t, **kwargs)
    return t * out if name == "logsumexp" else out


# --------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """One edge: ``compute(lib)`` returns what ``lib`` gives, ``check`` judges it."""

    name: str
    call: str
    expected_text: str
    compute: Callable[[str], np.ndarray]
    check: Callable[[np.ndarray], bool]


@dataclass(frozen=True)
class EdgeResult:
    """What one library returned on one edge, and whether that meets the contract."""

    name: str
    call: str
    expected: str
    values: dict[str, str]
    ok: dict[str, bool]


def _close(expected, rtol=1e-6, atol=0.0) -> Callable[[np.ndarray], bool]:
    """A check: equal shapes, the same infinities and NaNs, finite values close."""
    want = np.asarray(expected, np.float64)

    def check(got: np.ndarray) -> bool:
        got = np.asarray(got, np.float64)
        return got.shape == want.shape and bool(
            np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        )

    return check


def _at_most(bound: float) -> Callable[[np.ndarray], bool]:
    return lambda got: bool(np.all(np.asarray(got, np.float64) <= bound))


def _np(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float64) if x.dtype == jnp.bfloat16 else x)


def _softmax64(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _grad(fn, x):
    return jax.grad(fn)(x)


W3 = jnp.array([1.0, 2.0, 3.0])  # the cotangent ("random projection") for gradient rows


def _edges() -> list[Edge]:
    big = jnp.array([10.0, 2.0, 10000.0, 4.0])
    neg = jnp.array([0.0, -INF, 1.0])
    s_neg = _softmax64([0.0, 1.0])
    s_neg3 = np.array([s_neg[0], 0.0, s_neg[1]])
    all_neg = jnp.full((3,), -INF)
    x3 = jnp.array([1.0, 2.0, 3.0])
    off = jnp.zeros(3, bool)
    pinf = jnp.array([1.0, INF, 2.0, INF])
    with_nan = jnp.array([[1.0, NAN, 2.0], [1.0, 2.0, 3.0]])
    ties = jnp.array([1.0, 3.0, 3.0, 2.0])
    uni = jnp.array([1.0, 2.0, -INF, 3.0])
    log2 = math.log(2.0)
    trap_x = jnp.array([[1.0, 2.0, 3.0], [-INF, -INF, -INF]])
    trap_valid = jnp.array([[True], [False]])
    s123 = _softmax64([1.0, 2.0, 3.0])
    # d/dx sum(w * log_softmax(x)) = w - softmax(x) * sum(w), row by row.
    lsm_grad_123 = np.arange(3.0) - s123 * 3.0
    z = np.array([37.42994775023705, 0.0])
    s_z = _softmax64(z)

    def m(lib):
        return _module(lib)

    def bf16_row_sum(lib):
        x = jax.random.normal(jax.random.key(0), (50_000,), jnp.float32) * 3.0
        s = m(lib).softmax(x.astype(jnp.bfloat16))
        return np.abs(np.sum(np.asarray(s.astype(jnp.float32), np.float64)) - 1.0)

    def small_gradient(lib):
        with jax.enable_x64(True):
            zz = jnp.asarray(z, jnp.float64)
            return np.asarray(jax.grad(lambda v: m(lib).log_softmax(v)[0])(zz))

    def trap(lib):
        def loss(x):
            return jnp.sum(jnp.where(trap_valid, m(lib).log_softmax(x), 0.0) * jnp.arange(3.0))

        return _grad(loss, trap_x)

    return [
        Edge("Overflow (max shift)", "softmax([10, 2, 10000, 4])", "[0, 0, 1, 0]",
             lambda lib: m(lib).softmax(big), _close([0, 0, 1, 0])),
        Edge("Overflow (max shift)", "log_softmax([10, 2, 10000, 4])",
             "[-9990, -9998, 0, -9996]",
             lambda lib: m(lib).log_softmax(big), _close([-9990, -9998, 0, -9996])),
        Edge("-inf entry", "softmax([0, -inf, 1])", "[0.2689, 0, 0.7311]",
             lambda lib: m(lib).softmax(neg), _close(s_neg3)),
        Edge("-inf entry", "log_softmax([0, -inf, 1])", "[-1.313, -inf, -0.3133]",
             lambda lib: m(lib).log_softmax(neg), _close([math.log(s_neg[0]), -INF,
                                                          math.log(s_neg[1])])),
        Edge("-inf entry, gradient", "grad sum(w * softmax(x)), x = [0, -inf, 1]",
             "[-0.3932, 0, 0.3932]",
             lambda lib: _grad(lambda x: jnp.sum(W3 * m(lib).softmax(x)), neg),
             _close(s_neg3 * (np.asarray(W3) - np.dot(s_neg3, W3)), atol=1e-6)),
        Edge("Row of -inf", "softmax([-inf, -inf, -inf])", "[0, 0, 0]",
             lambda lib: m(lib).softmax(all_neg), _close([0, 0, 0])),
        Edge("Row of -inf", "log_softmax([-inf, -inf, -inf])", "[-inf, -inf, -inf]",
             lambda lib: m(lib).log_softmax(all_neg), _close([-INF] * 3)),
        Edge("Row of -inf", "logsumexp([-inf, -inf, -inf])", "-inf",
             lambda lib: m(lib).logsumexp(all_neg), _close(-INF)),
        Edge("Row of -inf, gradient", "grad sum(w * log_softmax(x)), x = [-inf] * 3",
             "[0, 0, 0]",
             lambda lib: _grad(lambda x: jnp.sum(W3 * m(lib).log_softmax(x)), all_neg),
             _close([0, 0, 0])),
        Edge("Fully masked row", "softmax([1, 2, 3], where=[F, F, F])", "[0, 0, 0]",
             lambda lib: m(lib).softmax(x3, where=off), _close([0, 0, 0])),
        Edge("Fully masked row", "log_softmax([1, 2, 3], where=[F, F, F])",
             "[-inf, -inf, -inf]",
             lambda lib: m(lib).log_softmax(x3, where=off), _close([-INF] * 3)),
        Edge("Fully masked row", "logsumexp([1, 2, 3], where=[F, F, F])", "-inf",
             lambda lib: m(lib).logsumexp(x3, where=off), _close(-INF)),
        Edge("Fully masked row, gradient",
             "grad sum(w * softmax(x, where=[F, F, F]))", "[0, 0, 0]",
             lambda lib: _grad(lambda x: jnp.sum(W3 * m(lib).softmax(x, where=off)), x3),
             _close([0, 0, 0])),
        Edge("Fully masked row, gradient",
             "grad logsumexp(x, where=[F, F, F])", "[0, 0, 0]",
             lambda lib: _grad(lambda x: m(lib).logsumexp(x, where=off), x3),
             _close([0, 0, 0])),
        Edge("+inf entries", "softmax([1, inf, 2, inf])", "[0, 0.5, 0, 0.5]",
             lambda lib: m(lib).softmax(pinf), _close([0, 0.5, 0, 0.5])),
        Edge("+inf entries", "log_softmax([1, inf, 2, inf])",
             "[-inf, -0.6931, -inf, -0.6931]",
             lambda lib: m(lib).log_softmax(pinf), _close([-INF, -log2, -INF, -log2])),
        Edge("+inf entries", "logsumexp([1, inf, 2, inf])", "inf",
             lambda lib: m(lib).logsumexp(pinf), _close(INF)),
        Edge("NaN in one row", "softmax([[1, nan, 2], [1, 2, 3]])",
             "[[nan, nan, nan], [0.09003, 0.2447, 0.6652]]",
             lambda lib: m(lib).softmax(with_nan),
             _close([[NAN] * 3, list(s123)])),
        Edge("NaN in one row, gradient",
             "grad sum(w * log_softmax(x)), w = [0, 1, 2], same x",
             "[[nan, nan, nan], [-0.2701, 0.2658, 0.004277]]",
             lambda lib: _grad(
                 lambda x: jnp.sum(jnp.arange(3.0) * m(lib).log_softmax(x)), with_nan),
             _close([[NAN] * 3, list(lsm_grad_123)], atol=1e-6)),
        Edge("t = 0 (hard max, ties shared)", "softmax([1, 3, 3, 2], t=0)",
             "[0, 0.5, 0.5, 0]",
             lambda lib: _tempered(lib, "softmax", ties, 0.0), _close([0, 0.5, 0.5, 0])),
        Edge("t = 0 (hard max, ties shared)", "log_softmax([1, 3, 3, 2], t=0)",
             "[-inf, -0.6931, -0.6931, -inf]",
             lambda lib: _tempered(lib, "log_softmax", ties, 0.0),
             _close([-INF, -log2, -log2, -INF])),
        Edge("t = 0 (hard max, ties shared)", "logsumexp([1, 3, 3, 2], t=0)", "3",
             lambda lib: _tempered(lib, "logsumexp", ties, 0.0), _close(3.0)),
        Edge("t = inf (uniform over included)", "softmax([1, 2, -inf, 3], t=inf)",
             "[0.3333, 0.3333, 0, 0.3333]",
             lambda lib: _tempered(lib, "softmax", uni, INF),
             _close([1 / 3, 1 / 3, 0, 1 / 3])),
        Edge("bfloat16 long row", "abs(sum(softmax(bf16 row of 50000)) - 1)",
             "<= 2^-9 = 0.001953",
             bf16_row_sum, _at_most(2.0**-9)),
        Edge("float64 small gradient (jax-ml/jax#40384)",
             "grad log_softmax(z)[0], z = [37.42994775023705, 0]",
             "[5.551e-17, -5.551e-17]",
             small_gradient, _close([s_z[1], -s_z[1]], rtol=1e-9)),
        Edge("jnp.where gradient trap",
             "grad sum(where([[T], [F]], log_softmax(x), 0) * [0, 1, 2]), "
             "x = [[1, 2, 3], [-inf] * 3]",
             "[[-0.2701, 0.2658, 0.004277], [0, 0, 0]]",
             trap, _close([list(lsm_grad_123), [0, 0, 0]], atol=1e-6)),
    ]


# --------------------------------------------------------------------------
# Running and printing.
# --------------------------------------------------------------------------


def _fmt_scalar(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return f"{v:.4g}"


def format_value(value) -> str:
    """Compact text for a scalar or a (nested) array: 4 significant digits."""
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        return _fmt_scalar(float(arr))
    return "[" + ", ".join(format_value(v) for v in arr) + "]"


def run_edge_cases() -> list[EdgeResult]:
    """Runs every edge for every library; returns one result per edge."""
    results = []
    for edge in _edges():
        values, ok = {}, {}
        for lib in LIBRARIES:
            try:
                got = edge.compute(lib)
                got = _np(jnp.asarray(got)) if not isinstance(got, np.ndarray) else got
                values[lib] = format_value(got)
                ok[lib] = edge.check(got)
            except Exception as err:  # a library that raises fails the row
                values[lib] = f"raises {type(err).__name__}"
                ok[lib] = False
        results.append(EdgeResult(edge.name, edge.call, edge.expected_text, values, ok))
    return results


def to_markdown(results: list[EdgeResult]) -> str:
    """A markdown table: edge, call, expected, then value and verdict per library."""
    head = "| Edge | Call | Expected | " + " | ".join(LIBRARIES) + " |"
    rule = "|" + "---|" * (3 + len(LIBRARIES))
    lines = [head, rule]
    for r in results:
        cells = [
            f"{'pass' if r.ok[lib] else '**FAIL**'}: `{r.values[lib]}`" for lib in LIBRARIES
        ]
        lines.append(f"| {r.name} | `{r.call}` | `{r.expected}` | " + " | ".join(cells) + " |")
    passed = {lib: sum(r.ok[lib] for r in results) for lib in LIBRARIES}
    lines.append("")
    lines.append(
        "Passed: "
        + ", ".join(f"{lib} {passed[lib]}/{len(results)}" for lib in LIBRARIES)
        + f" (jax {jax.__version__}; jax.nn has no temperature, so its t rows use "
        "`f(x / t)`)."
    )
    return "\n".join(lines)


def main() -> None:
    print(to_markdown(run_edge_cases()))


if __name__ == "__main__":
    main()
