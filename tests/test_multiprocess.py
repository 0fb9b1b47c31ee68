"""Two local processes x two CPU devices: JAX's multi-controller runtime
(tests/processes.py starts them). The training example's 2-process run is in
tests/test_train.py, beside the 1-process run it is compared with.
"""

from __future__ import annotations

import json
import sys

import pytest
from processes import LOCAL_DEVICES, NUM_PROCESSES, ROOT, free_port, launch, read_logs

WORKER = ROOT / "tests" / "multiprocess" / "worker.py"


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
