"""Shared fixtures for the test suite."""

import os
import pickle
from pathlib import Path

import jax
import pytest

try:
    import fcntl
except ImportError:  # no lock: two workers may each compute a table, with the same result
    fcntl = None


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
