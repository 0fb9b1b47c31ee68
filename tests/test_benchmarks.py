"""The benchmark scripts and the edge battery (benchmarks/).

The quick benchmark runs once per module (in-process, through ``main``); its
edge battery is the one the README table comes from. Timings are never
asserted: only that every case ran and produced sane numbers.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import edge_cases, family, overhead, run

# One worker runs this file: its module fixtures (whole runs) are made once.
pytestmark = pytest.mark.xdist_group("benchmarks")


def _once(tmp_path_factory, name, make):
    """The JSON that ``make(path)`` writes, made once per test run: xdist may
    tear a module fixture down between this file's tests and set it up again."""
    path = tmp_path_factory.getbasetemp() / f"bench-{name}.json"
    if not path.exists():
        partial = path.with_suffix(".partial")
        make(partial)
        partial.replace(path)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory, edge_tables):
    def make(path):
        # The edge battery is run once for the whole test run (the docs build
        # publishes the same table); run.main reports it as usual.
        battery = edge_tables.rows("edge_cases")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(edge_cases, "run_edge_cases", lambda: battery)
            # Two of the functions time (the accuracy table and the edge
            # battery are whole): the timing code is the same for every pair.
            run.main(["--quick", "--json", str(path), "--only", "log"])

    return _once(tmp_path_factory, "quick", make)


@pytest.mark.slow
def test_jsoftmax_passes_every_edge(quick):
    failed = [(e["name"], e["call"], e["values"]["jsoftmax"]) for e in quick["edges"]
              if not e["ok"]["jsoftmax"]]
    assert not failed


@pytest.mark.slow
def test_edge_battery_can_fail(quick):
    # The checks bite: jax.nn returns NaN on +inf entries and on rows of -inf.
    by_call = {e["call"]: e for e in quick["edges"]}
    assert not by_call["softmax([1, inf, 2, inf])"]["ok"]["jax.nn"]
    assert not by_call["softmax([-inf, -inf, -inf])"]["ok"]["jax.nn"]
    assert by_call["softmax([1, inf, 2, inf])"]["values"]["jax.nn"] == "[nan, nan, nan, nan]"


@pytest.mark.slow
def test_quick_run_covers_every_case(quick):
    names = {t["function"] for t in quick["timing"]}
    assert names == {"log_softmax", "logsumexp"}
    combos = {(t["function"], t["mode"], t["dtype"]) for t in quick["timing"]}
    assert len(combos) == len(names) * 2 * 2  # modes x dtypes
    for t in quick["timing"]:
        for key in ("ours_ms", "ref_ms", "floor_ms", "ratio"):
            assert math.isfinite(t[key]) and t[key] > 0, (key, t)
        assert t["ratio_q25"] <= t["ratio"] <= t["ratio_q75"]
        assert t["ours_temp_bytes"] >= 0 and t["ref_temp_bytes"] >= 0
        # Forward + backward is timed against the guarded reference too.
        guarded = t["mode"] == "fwd+bwd"
        for key in ("guard_ms", "guard_ratio"):
            assert (math.isfinite(t[key]) and t[key] > 0) if guarded else t[key] is None, t
        assert (t["guard_temp_bytes"] >= 0) if guarded else t["guard_temp_bytes"] is None
    assert quick["machine"]["jax"]


@pytest.mark.slow
def test_quick_accuracy_is_within_a_few_ulps(quick):
    # Against the independent float64 reference: logsumexp within a few ulps
    # everywhere. softmax's tiny entries inherit the rounding of x - max
    # (relative error ~ |x - max| eps, for any implementation), and the top
    # entry of log_softmax (-1e-13 on a confident row) is accurate to an ulp
    # of 1 with jax.nn's single sum; there jsoftmax must be no worse than jax.nn.
    for a in quick["accuracy"]:
        if a["function"] == "softmax":
            assert a["ours_ulp"] <= max(8.0, a["ref_ulp"]), a
        elif a["function"] == "log_softmax":
            assert a["ours_ulp"] <= max(4.0, a["ref_ulp"]), a
        else:
            assert a["ours_ulp"] <= 4.0, a


def test_this_module_runs_on_one_worker(request):
    # xdist's loadgroup marks a grouped test's id with its group; when it
    # stops doing so (pytest-dev/pytest-xdist#1386), each worker sets up
    # this module's whole benchmark runs again.
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@benchmarks"), request.node.nodeid


def test_ulp_error_counts_spacings():
    one = np.float64(1.0)
    assert run.ulp_error(np.array([1 + 2.0**-23]), np.array([one]), jnp.float32) == 1.0
    assert run.ulp_error(np.array([1 + 2.0**-7]), np.array([one]), jnp.bfloat16) == 1.0
    assert run.ulp_error(np.array([np.inf]), np.array([np.inf]), jnp.float32) == 0.0
    assert run.ulp_error(np.array([np.nan]), np.array([1.0]), jnp.float32) == math.inf
    # A flushed subnormal is one unit (the smallest normal), not millions.
    assert run.ulp_error(np.array([0.0]), np.array([2.0**-127]), jnp.float32) == 0.5


def test_reference_matches_hand_values():
    x = np.array([[0.0, math.log(3.0)]])
    np.testing.assert_allclose(run._ref64("softmax", x), [[0.25, 0.75]], rtol=1e-15)
    np.testing.assert_allclose(run._ref64("logsumexp", x), [math.log(4.0)], rtol=1e-15)


def test_edge_values_are_formatted_compactly():
    assert edge_cases.format_value([0.0, -math.inf, math.nan, 0.5]) == "[0, -inf, nan, 0.5]"


# --------------------------------------------------------------------------
# benchmarks/overhead.py: eager and compile overhead, in --quick mode.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overhead_quick(tmp_path_factory):
    """Eager rows of every function; compile rows (cold compiles, the slow
    part) of one function only."""
    eager, compiled = (
        _once(tmp_path_factory, f"overhead-{i}",
              lambda path, argv=argv: overhead.main(["--quick", "--json", str(path), *argv]))
        for i, argv in enumerate((["--eager-only"], ["--compile-only", "--only", "logsumexp"]))
    )
    return {"machine": eager["machine"],
            "rows": eager["rows"] + [r for r in compiled["rows"] if r["kind"] == "compile"]}


@pytest.mark.slow
def test_overhead_has_rows_for_every_function(overhead_quick):
    rows = overhead_quick["rows"]
    for name in overhead.FUNCTIONS:
        kinds = {(r["kind"], r["variant"]) for r in rows if r["function"] == name}
        assert ("eager", "plain") in kinds or ("eager", "t=0.7") in kinds, name
    # Each replacement of a jax.nn or optax function: four eager variants;
    # compile times at t = 1 and with a temperature (measured for one).
    for name in overhead.FUNCTIONS[:8]:
        kinds = {(r["kind"], r["variant"]) for r in rows if r["function"] == name}
        assert {("eager", v) for v in ("plain", "t=0.7", "t=array", "mask")} <= kinds, name
    kinds = {(r["kind"], r["variant"]) for r in rows if r["function"] == "logsumexp"}
    assert {("compile", "plain"), ("compile", "t=0.7")} <= kinds
    for r in rows:  # sane numbers, never a timing target
        for key in ("ours", "ref", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        if r["kind"] == "compile":  # the XLA part of the compile time
            assert 0 < r["ours_xla"] < r["ours"] and 0 < r["ref_xla"] < r["ref"], r
        else:
            assert r["ours_xla"] is None and r["ref_xla"] is None, r
    assert overhead_quick["machine"]["jax"]


@pytest.mark.slow
def test_overhead_table_has_a_line_per_variant(overhead_quick):
    rows = [overhead.Row(**r) for r in overhead_quick["rows"]]
    lines = overhead.table(rows).splitlines()
    assert len(lines) == 2 + len({(r.function, r.variant) for r in rows})


# --------------------------------------------------------------------------
# benchmarks/family.py: entropy, KL and segment_softmax, in --quick mode.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_family_benchmark_has_every_case():
    timings = family.main(["--quick", "--seconds", "0.01"])
    names = {t.function.split(" ")[0] for t in timings}
    assert names == {"entropy", "kl_divergence", "segment_softmax"}
    # 2 functions x 1 shape x 2 dtypes x 2 modes, and 2 id orders x 2 modes.
    assert len(timings) == 12
    for t in timings:  # sane numbers, never a timing target
        assert t.ours_ms > 0 and t.ref_ms > 0 and math.isfinite(t.ratio)
        assert t.ours_temp_bytes >= 0 and t.ref_temp_bytes >= 0

