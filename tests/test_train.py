"""Tests for the training example (jsoftmax_demo.train) and jsoftmax.calibration.

The end-to-end runs use tiny configurations; the 4-device and the
2-process runs are subprocesses because XLA_FLAGS must be set before JAX
initialises. Both are compared with the 1-process run.
"""

import contextlib
import io
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from processes import LOCAL_DEVICES, NUM_PROCESSES, ROOT, cpu_env, free_port, launch, read_logs

import jsoftmax
from jsoftmax.calibration import mean_nll
from jsoftmax_demo import train

# One worker runs this file: its module fixtures (whole runs) are made once.
pytestmark = pytest.mark.xdist_group("train")

TINY = {
    "digits": ["--epochs", "5", "--hidden", "32"],
    "spirals": ["--dataset", "spirals", "--epochs", "12", "--hidden", "32", "--lr", "0.02"],
}
CHANCE = {"digits": 0.1, "spirals": 1 / 3}
KEYS = {
    "dataset", "backend", "devices", "epochs", "test_accuracy", "test_nll_before",
    "test_nll_after", "ece_before", "ece_after", "temperature", "train_seconds",
}


# --------------------------------------------------------------------------
# Calibration: ECE and reliability bins against hand-computed cases
# --------------------------------------------------------------------------

# Top confidences 0.95, 0.95, 0.55, 0.35 fall in 15-bin bins 15, 15, 9, 6.
# The first and third are right, the second and fourth wrong, so
# ECE = 2/4 |1/2 - 0.95| + 1/4 |1 - 0.55| + 1/4 |0 - 0.35| = 0.425.
HAND_PROBS = np.float32(
    [[0.95, 0.03, 0.02], [0.02, 0.95, 0.03], [0.25, 0.20, 0.55], [0.35, 0.33, 0.32]]
)
HAND_LABELS = np.array([0, 0, 2, 1])


@pytest.mark.parametrize("jit", [False, True])
def test_ece_hand_computed(jit):
    ece = jsoftmax.expected_calibration_error
    if jit:
        ece = jax.jit(ece, static_argnums=2)
    assert float(ece(HAND_PROBS, HAND_LABELS, 15)) == pytest.approx(0.425, abs=1e-6)


def test_reliability_bins_hand_computed():
    bins = jsoftmax.reliability_bins(HAND_PROBS, HAND_LABELS)
    counts = np.zeros(15, int)
    counts[[5, 8, 14]] = [1, 1, 2]
    np.testing.assert_array_equal(bins.counts, counts)
    expected_conf = np.zeros(15)
    expected_conf[[5, 8, 14]] = [0.35, 0.55, 0.95]
    expected_acc = np.zeros(15)
    expected_acc[[5, 8, 14]] = [0.0, 1.0, 0.5]
    np.testing.assert_allclose(bins.confidence, expected_conf, atol=1e-6)
    np.testing.assert_allclose(bins.accuracy, expected_acc, atol=1e-6)
    np.testing.assert_allclose(bins.edges, np.linspace(0, 1, 16), atol=1e-6)


def test_ece_is_zero_when_confidence_matches_accuracy():
    # Ten examples at confidence 0.7, seven of them right: perfectly calibrated.
    probs = np.tile(np.float32([0.7, 0.3]), (10, 1))
    labels = np.array([0] * 7 + [1] * 3)
    assert float(jsoftmax.expected_calibration_error(probs, labels)) == pytest.approx(0, abs=1e-6)
    # Confidence 1 goes in the last bin; all wrong gives ECE 1.
    worst = jsoftmax.expected_calibration_error(np.float32([[1, 0]]), [1])
    assert float(worst) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("probs", "labels", "num_bins", "error"),
    [
        (np.ones(3, np.float32) / 3, np.array([0]), 15, ValueError),  # not (N, K)
        (HAND_PROBS, HAND_LABELS.astype(float), 15, TypeError),
        (HAND_PROBS, HAND_LABELS[:3], 15, ValueError),
        (HAND_PROBS, HAND_LABELS, 0, ValueError),
    ],
)
def test_ece_bad_input(probs, labels, num_bins, error):
    with pytest.raises(error, match="expected_calibration_error"):
        jsoftmax.expected_calibration_error(probs, labels, num_bins)


# --------------------------------------------------------------------------
# Temperature fitting
# --------------------------------------------------------------------------


def test_fit_temperature_closed_form():
    # Logits +-4, three of four right: the NLL is minimal where the
    # confidence sigmoid(4 / t) equals the accuracy 3/4, so t = 4 / log 3.
    logits = np.float32([[4, 0], [4, 0], [0, 4], [0, 4]])
    t = float(jsoftmax.fit_temperature(logits, np.array([0, 1, 1, 1])))
    assert t == pytest.approx(4 / math.log(3), rel=1e-4)


def test_fit_temperature_bad_labels_give_nan():
    logits = np.float32([[4, 0], [0, 4]])
    assert math.isnan(float(jsoftmax.fit_temperature(logits, np.array([0, 2]))))


def _nll64(logits, labels, t):
    z = logits / t
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("scale", [0.3, 4.0])  # under- and over-confident logits
def test_fit_temperature_matches_float64_minimiser(scale):
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=200)
    logits = rng.normal(size=(200, 5)) + 2.0 * np.eye(5)[labels]
    logits *= scale
    ref = minimize_scalar(lambda u: _nll64(logits, labels, math.exp(u)),
                          bounds=(-4, 4), method="bounded", options={"xatol": 1e-9})
    t = float(jsoftmax.fit_temperature(logits.astype(np.float32), labels))
    assert t == pytest.approx(math.exp(ref.x), rel=2e-3)
    assert _nll64(logits, labels, t) <= _nll64(logits, labels, 1.0)


def test_mean_nll_temperature_gradient(x64):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(6, 4)) * 3)
    labels = jnp.asarray(rng.integers(0, 4, size=6))
    check_grads(lambda t: mean_nll(logits, labels, t), (jnp.float64(1.7),), order=1)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def test_splits_are_disjoint_seeded_and_standardised():
    a = train.load_dataset("spirals", seed=3)
    b = train.load_dataset("spirals", seed=3)
    c = train.load_dataset("spirals", seed=4)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_train, c.y_train)
    n = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (0.6 * n, 0.2 * n, 0.2 * n)
    rows = {tuple(r) for r in np.concatenate([a.x_train, a.x_val, a.x_test])}
    assert len(rows) == n  # no example in two splits
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(axis=0), 1, atol=1e-4)


# --------------------------------------------------------------------------
# The command line, end to end
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny in-process run per dataset: (metrics, out dir, stdout, stderr)."""
    results = {}
    for name, argv in TINY.items():
        out = tmp_path_factory.mktemp(name)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = train.main([*argv, "--out", str(out)])
        assert status == 0, stderr.getvalue()
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = (metrics, out, stdout.getvalue(), stderr.getvalue())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_end_to_end(runs, name):
    metrics, out, stdout, stderr = runs[name]
    assert KEYS <= set(metrics)
    assert metrics["dataset"] == name
    assert metrics["backend"] == jax.local_devices()[0].platform
    assert metrics["devices"] == len(jax.local_devices())
    assert metrics["test_accuracy"] >= CHANCE[name] + 0.5
    for key in ("test_nll_before", "test_nll_after", "ece_before", "ece_after", "train_seconds"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert metrics["temperature"] > 0
    for png in ("curves.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test NLL" in stdout and "temperature" in stdout
    assert stderr == ""  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "-1"],
        ["--epochs", "0"],
        ["--epochs", "ten"],
        ["--dataset", "mnist"],
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--seed", "-3"],
        ["--batch-size", "100000"],
        ["--platform", "tpu"],
        ["--out", "UNWRITABLE"],
    ],
)
def test_bad_flags_give_one_line_error(argv, tmp_path, capsys):
    if argv == ["--out", "UNWRITABLE"]:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        argv = ["--out", str(blocker / "sub")]  # a directory under a file
    _assert_one_line_error(argv, capsys)


def _assert_one_line_error(argv, capsys):
    try:
        status = train.main([*argv, "--quiet"])
    except SystemExit as exc:
        status = exc.code
    assert status not in (0, None)
    err = capsys.readouterr().err
    assert err.startswith("jsoftmax-train: error:") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-processes", "2"],  # without the other two process flags
        ["--coordinator-address", "127.0.0.1:1234", "--process-id", "0"],
        ["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
        ["--coordinator-address", "no-port", "--num-processes", "2", "--process-id", "0"],
        ["--coordinator-address", "host:99999", "--num-processes", "2", "--process-id", "0"],
        ["--num-processes", "0"],
        ["--process-id", "-1"],
    ],
)
def test_bad_process_flags_give_one_line_error(argv, capsys):
    """Caught before joining any other process (nothing listens on port 1234)."""
    _assert_one_line_error(argv, capsys)
    assert jax.process_count() == 1


def test_missing_gpu_is_a_clear_error(capsys):
    try:
        jax.devices("gpu")
        pytest.skip("this machine has a GPU")
    except RuntimeError:
        pass
    assert train.main(["--platform", "gpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--platform gpu" in err and "--platform cpu" in err


@pytest.mark.slow
def test_four_devices_agree_with_one(runs, tmp_path):
    metrics, *_ = runs["digits"]
    proc = subprocess.run(
        [sys.executable, "-m", "jsoftmax_demo.train", *TINY["digits"], "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=cpu_env(4),
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 devices" in proc.stdout
    sharded = json.loads((tmp_path / "metrics.json").read_text())
    assert sharded["devices"] == 4
    assert abs(sharded["test_accuracy"] - metrics["test_accuracy"]) <= 0.01
    assert sharded["temperature"] == pytest.approx(metrics["temperature"], rel=0.05)


@pytest.mark.slow
def test_training_across_processes_agrees_with_one(runs, tmp_path):
    """jsoftmax-train in 2 processes x 2 devices (JAX's multi-controller
    runtime, one global batch over 4 devices) reaches the test accuracy and
    temperature of the 1-process run."""
    expected = runs["digits"][0]
    out = tmp_path / "multi"  # the same --out for both; only process 0 writes it
    logs = tmp_path / "logs"
    logs.mkdir()
    flags = [*TINY["digits"], "--quiet", "--out", str(out), "--coordinator-address",
             f"127.0.0.1:{free_port()}", "--num-processes", str(NUM_PROCESSES)]
    commands = [[sys.executable, "-m", "jsoftmax_demo.train", *flags, "--process-id", str(i)]
                for i in range(NUM_PROCESSES)]
    codes = launch(commands, logs)
    assert codes == [0] * NUM_PROCESSES, read_logs(logs)
    stdout = [(logs / f"{i}.out").read_text() for i in range(NUM_PROCESSES)]
    assert "process 0 of 2, 4 devices in all, 2 here" in stdout[0]
    assert "process 1 of 2" in stdout[1]
    assert "test accuracy" in stdout[0] and "test accuracy" not in stdout[1]
    got = json.loads((out / "metrics.json").read_text())
    assert (got["processes"], got["devices"]) == (NUM_PROCESSES, NUM_PROCESSES * LOCAL_DEVICES)
    assert (expected["processes"], got["batch_size"]) == (1, expected["batch_size"])
    assert abs(got["test_accuracy"] - expected["test_accuracy"]) <= 0.01
    assert got["temperature"] == pytest.approx(expected["temperature"], rel=0.05)


def test_import_jsoftmax_needs_no_demo_extras():
    code = (
        "import sys, jsoftmax; "
        "print([m for m in ('sklearn', 'matplotlib', 'tqdm', 'optax', 'jsoftmax_demo') "
        "if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=cpu_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
