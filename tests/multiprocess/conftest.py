"""Scripts that tests/test_multiprocess.py runs as separate processes.

``worker.py`` joins JAX's multi-controller runtime when it starts, so pytest
must not import it (``--doctest-modules`` would).
"""

collect_ignore = ["worker.py"]
