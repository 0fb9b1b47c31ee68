"""Shared fixtures for the test suite, and the XLA flags it runs under."""

import os
import pickle
from pathlib import Path

# Compiling is most of this suite's time, and XLA:CPU's loop emitters compile
# about twice as fast as its fusion emitters (the default). So the suite runs
# with the loop emitters; the tests whose results depend on code generation
# (marked ``codegen``: compiled memory, ulp-level accuracy) run again under
# XLA's defaults in tests/test_codegen.py. JSOFTMAX_TEST_XLA_DEFAULTS=1 runs
# everything under the defaults. Set before JAX creates its backend (an XLA
# that no longer knows the flag stops at startup on it: drop it here then).
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("JSOFTMAX_TEST_XLA_DEFAULTS") == "1":
    FAST_COMPILE = False
elif "xla_cpu_use_fusion_emitters" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {FAST_COMPILE_FLAG}".strip()
    FAST_COMPILE = True
else:  # set already: by the user, or inherited (xdist's workers, subprocesses)
    FAST_COMPILE = FAST_COMPILE_FLAG in _flags

import jax  # noqa: E402
import pytest  # noqa: E402

try:
    import fcntl
except ImportError:  # no lock: two workers may each compute a table, with the same result
    fcntl = None


def pytest_configure(config):
    # The flag this run added to XLA_FLAGS, or None (tests/test_codegen.py).
    config.jsoftmax_fast_compile = FAST_COMPILE_FLAG if FAST_COMPILE else None


def pytest_collection_modifyitems(config, items):
    if not FAST_COMPILE:
        return
    skip = pytest.mark.skip(reason="runs under XLA's default flags in tests/test_codegen.py")
    for item in items:
        if item.get_closest_marker("codegen"):
            item.add_marker(skip)


@pytest.fixture
def x64():
    """Runs the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


def _core_table():
    from benchmarks import edge_cases

    rows = edge_cases.run_edge_cases()
    return rows, edge_cases.to_markdown(rows)


def _loss_table():
    from benchmarks import loss_edge_cases

    rows = loss_edge_cases.edge_case_table()
    return rows, loss_edge_cases.format_table(rows)


def _family_table():
    from benchmarks import family_edge_cases

    rows = family_edge_cases.edge_case_table()
    return rows, family_edge_cases.format_table(rows)


# benchmarks/<name>.py: the function giving (rows, markdown table).
EDGE_TABLES = {
    "edge_cases": _core_table,
    "loss_edge_cases": _loss_table,
    "family_edge_cases": _family_table,
}


class EdgeTables:
    """The edge tables of benchmarks/*edge_cases.py, each computed once per
    test run: by the first xdist worker that asks, shared with the others
    (and with the docs build) through files in ``directory``.

    ``directory / "<name>.md"`` is the markdown table the docs include.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def rows(self, name: str):
        """The table's rows, as the benchmark script's function returns them."""
        path = self.directory / f"{name}.pickle"
        with open(self.directory / f"{name}.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                rows, markdown = EDGE_TABLES[name]()
                (self.directory / f"{name}.md").write_text(markdown)
                # Written last and whole (a rename), so it marks a finished table.
                partial = path.with_suffix(f".{os.getpid()}.partial")
                partial.write_bytes(pickle.dumps(rows))
                partial.replace(path)
        return pickle.loads(path.read_bytes())

    def markdown_directory(self) -> Path:
        """The directory with every table's markdown, computed where it was not."""
        for name in EDGE_TABLES:
            self.rows(name)
        return self.directory


@pytest.fixture(scope="module")
def edge_tables(tmp_path_factory):
    # Per module: the tables themselves live in files, shared by every module
    # and worker of the run.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, which every worker shares
    return EdgeTables(root / "edge_tables")
