"""Local processes for the multi-controller tests: each joins JAX's runtime on
127.0.0.1 (CPU collectives over gloo), with a timeout on every process; the
ones still running when a test ends are killed, passed or not."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    # Added to the suite's own flags (tests/conftest.py).
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={LOCAL_DEVICES}").strip()
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
