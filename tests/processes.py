"""Subprocesses of the tests: JAX on the CPU with simulated devices, pytest
runs under other flags, and the local processes of the multi-controller tests
(each joins JAX's runtime on 127.0.0.1, CPU collectives over gloo, with a
timeout on every process; the ones still running when a test ends are
killed, passed or not)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a JAX subprocess on the CPU: the suite's
    XLA flags (tests/conftest.py) with ``devices`` simulated devices added,
    the repository importable, and ``extra``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    if devices is not None:
        count = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {count}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_pytest(args: list[str], env: dict[str, str], timeout: float = 900):
    """pytest in a subprocess, in one process (``-n 0``): the calling test's
    worker waits for it, so it takes that worker's core."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


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
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(LOCAL_DEVICES),
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
