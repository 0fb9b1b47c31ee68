"""benchmarks/gpu.py, the one-command GPU benchmark, in its --quick mode on the CPU.

The GPU is lent rarely and briefly, so the script must work the first time it
meets one: the suite runs its whole plan at tiny sizes. Timings are never
asserted, only that every part ran and wrote sane numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks import gpu
from tests.processes import ROOT, cpu_env

# One worker runs this file, so that its module fixture (the whole run) is made once.
pytestmark = pytest.mark.xdist_group("gpu_script")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-quick")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, json.loads((out / "gpu.json").read_text()), proc.stderr


@pytest.mark.slow
def test_every_part_runs_and_is_reported(quick):
    out, report, stderr = quick
    assert report["quick"] is True
    assert list(report["parts"]) == list(gpu.PARTS)
    failed = {name: (e["status"], e["error"]) for name, e in report["parts"].items()
              if e["status"] != "ok"}
    assert not failed, (failed, stderr[-5000:])
    markdown = (out / "gpu.md").read_text()
    for title, _ in gpu.SECTIONS.values():
        assert f"## {title}" in markdown
    assert "No result" not in markdown and "could not render" not in markdown
    assert "train| " in (out / "gpu.log").read_text()  # the parts' output is kept
    assert not (out / ".parts").exists()


@pytest.mark.slow
def test_environment_is_recorded(quick):
    env = quick[1]["parts"]["env"]["result"]
    for key in ("device_kind", "platform", "jax", "jaxlib", "optax", "jsoftmax", "commit"):
        assert key in env, key
    assert env["platform"] == "cpu" and env["jax"] and env["jsoftmax"]


@pytest.mark.slow
def test_bandwidth_numbers_are_positive(quick):
    bw = quick[1]["parts"]["bandwidth"]["result"]
    got = {(r["function"], r["library"], r["dtype"]) for r in bw["rows"]}
    for dtype in ("float32", "bfloat16"):
        for fn in ("softmax", "log_softmax"):
            assert {(fn, "jsoftmax", dtype), (fn, "jax.nn", dtype)} <= got
        assert {("exp", "jnp.exp", dtype), ("copy", "negation", dtype)} <= got
    for r in bw["rows"]:
        assert r["bytes"] == 2 * math.prod(bw["shape"]) * (4 if r["dtype"] == "float32" else 2)
        keys = ("median_ms", "gbps", "fraction_of_peak")
        for key in keys + (("ratio_vs_jax_nn",) if r["library"] == "jsoftmax" else ()):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    # No peak is known for a CPU: the measured copy stands in.
    assert bw["peak_gbps"] > 0 and bw["peak_source"].startswith("measured")


@pytest.mark.slow
def test_fused_loss_and_chunk_sweep(quick):
    fused = quick[1]["parts"]["fused"]["result"]
    rows = fused["cross_entropy"]
    assert {"unfused, optax", "unfused, jsoftmax"} <= set(rows)
    chunks = [name for name in rows if name.startswith("fused, chunk_size=")]
    assert len(chunks) >= len(fused["sweep"])
    losses = [row["loss"] for row in rows.values()]
    assert max(losses) - min(losses) <= 1e-2 * abs(losses[0]), losses  # one loss, bfloat16
    for row in rows.values():
        assert row["median_ms"] > 0 and row["temp_bytes"] >= 0, row
        # XLA:CPU keeps no memory statistics (jax 0.10): None there, bytes on a GPU.
        assert row["peak_bytes"] is None or row["peak_bytes"] > 0, row
    assert fused["suggested_chunk_size"] in {fused["default_chunk_size"], *fused["sweep"]}
    if fused["kl_divergence"] is not None:  # when the package has the fused divergence
        assert all(row["median_ms"] > 0 for row in fused["kl_divergence"].values())


@pytest.mark.slow
def test_training_and_cases(quick):
    parts = quick[1]["parts"]
    (run,) = parts["train"]["result"]["runs"]
    assert run["backend"] == "cpu" and 0 <= run["test_accuracy"] <= 1
    for key in ("test_nll_before", "test_nll_after", "ece_before", "ece_after", "train_seconds"):
        assert math.isfinite(run[key]) and run[key] >= 0, key
    cases = parts["cases"]["result"]
    assert cases["timing"] and all(t["ratio"] > 0 for t in cases["timing"])
    assert "| function | vs | mode |" in cases["markdown"]


def test_peak_bandwidth_table():
    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3") == (3.35, "H100 SXM")
    assert gpu.peak_bandwidth("NVIDIA H100 PCIe")[0] == 2.0
    assert gpu.peak_bandwidth("NVIDIA H200")[0] == 4.8
    assert gpu.peak_bandwidth("NVIDIA GH200 480GB")[0] == 4.0
    assert gpu.peak_bandwidth("NVIDIA A100-SXM4-40GB")[0] == 1.555
    assert gpu.peak_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.039
    assert gpu.peak_bandwidth("NVIDIA A100 80GB PCIe")[0] == 1.935
    assert gpu.peak_bandwidth("NVIDIA L4")[0] == 0.3
    assert gpu.peak_bandwidth("NVIDIA L40S")[0] == 0.864
    assert gpu.peak_bandwidth("cpu") is None


def test_failed_and_stopped_parts_are_reported():
    report = {
        "quick": False, "started": "now", "wall_s": 3.0,
        "parts": {
            "env": {"status": "failed", "seconds": 1.0, "result": None,
                    "error": "Traceback (most recent call last):\nRuntimeError: no GPU"},
            "cases": {"status": "timeout", "seconds": 2.0, "error": "stopped at its limit",
                      "result": {"errors": [], "timing": [
                          {"function": "softmax", "reference": "jax.nn", "mode": "fwd",
                           "dtype": "float32", "shape": [4, 8], "ours_ms": 1.0, "ref_ms": 2.0,
                           "ratio": 0.5}]}},
        },
    }
    markdown = gpu.to_markdown(report)
    assert "| env | failed | 1.0 | RuntimeError: no GPU |" in markdown
    assert "| cases | timeout | 2.0 |" in markdown
    assert "Cases measured before the part stopped: 1 " in markdown
    assert "| softmax | jax.nn | fwd | float32 | 4x8 | 1.000 | 2.000 | **0.50** |" in markdown


def test_unknown_parts_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path), "--parts", "env,nope"])
    assert "unknown part(s) nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
