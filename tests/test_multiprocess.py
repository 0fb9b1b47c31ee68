"""Two local processes x two CPU devices: JAX's multi-controller runtime.

Each test starts its processes on 127.0.0.1 (CPU collectives over gloo), with
a timeout on every process, and kills whatever is still running when it
ends, passed or not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess" / "worker.py"
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT = 180  # seconds for each process, compilation included


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict[str, str]:
    """The environment of each process: the CPU only, LOCAL_DEVICES devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def launch(commands: list[list[str]], logs: Path, timeout: float = TIMEOUT) -> list[int]:
    """Runs ``commands`` at once and returns their exit statuses.

    Output goes to ``logs/<i>.out`` and ``logs/<i>.err`` (files, so that no
    pipe fills up). When one process fails, the others would wait for it in
    a collective until the timeout, so they are killed at once; whatever
    still runs at the timeout, or when this function is left, is killed too.
    """
    procs = []
    try:
        for i, cmd in enumerate(commands):
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=process_env(),
                                              stdout=out, stderr=err))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    return [p.returncode for p in procs]


def read_logs(logs: Path) -> str:
    """Every process's stderr (its last lines), for an assertion message."""
    return "\n".join(
        f"--- process {i} stderr ---\n{(logs / f'{i}.err').read_text()[-3000:]}"
        for i in range(NUM_PROCESSES)
    )


@pytest.mark.slow
def test_vocab_parallel_across_processes(tmp_path):
    """The fused loss and softmax, vocabulary sharded over 4 devices in 2
    processes, equal the unsharded calls (tests/multiprocess/worker.py)."""
    address = f"127.0.0.1:{free_port()}"
    results = [tmp_path / f"result{i}.json" for i in range(NUM_PROCESSES)]
    commands = [
        [sys.executable, str(WORKER), address, str(NUM_PROCESSES), str(i), str(results[i])]
        for i in range(NUM_PROCESSES)
    ]
    codes = launch(commands, tmp_path)
    for i, path in enumerate(results):
        assert path.exists(), f"process {i} wrote no result (exit {codes[i]})\n" + read_logs(
            tmp_path
        )
        result = json.loads(path.read_text())
        assert result["passed"], json.dumps(result, indent=2)
        assert result["process_id"] == i
        assert result["process_count"] == NUM_PROCESSES
        assert result["local_device_count"] == LOCAL_DEVICES
        assert result["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
        assert set(result["errors"]) == {
            "fused_loss", "fused_grad_hidden", "fused_grad_weight", "fused_grad_bias",
            "softmax", "softmax_grad",
        }
    assert codes == [0] * NUM_PROCESSES, read_logs(tmp_path)


# The digits configuration of tests/test_train.py's end-to-end runs, shorter.
TINY_DIGITS = ["--epochs", "2", "--hidden", "32", "--quiet"]


@pytest.mark.slow
def test_training_across_processes_agrees_with_one(tmp_path):
    """jsoftmax-train in 2 processes x 2 devices (one global batch over 4
    devices) reaches the test accuracy of the 1-process run."""
    import contextlib
    import io

    from jsoftmax_demo import train

    single = tmp_path / "single"
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main([*TINY_DIGITS, "--out", str(single)]) == 0
    expected = json.loads((single / "metrics.json").read_text())

    out = tmp_path / "multi"  # the same --out for both; only process 0 writes it
    logs = tmp_path / "logs"
    logs.mkdir()
    flags = [*TINY_DIGITS, "--out", str(out), "--coordinator-address",
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
