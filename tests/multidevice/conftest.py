"""Tests that need several devices; tests/test_multidevice.py runs them.

They run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4
(set before JAX starts), so the main test run keeps its single device.
Collected only when JSOFTMAX_MULTIDEVICE=1, which that subprocess sets; to run
them by hand:

    JSOFTMAX_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python -m pytest tests/multidevice
"""

import os

if os.environ.get("JSOFTMAX_MULTIDEVICE") != "1":
    collect_ignore_glob = ["test_*.py"]
