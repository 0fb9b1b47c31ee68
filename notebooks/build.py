"""Builds the tutorial notebooks from notebooks/_src/*.py and executes them.

Each source file is a plain Python script split into cells by "# %%" lines
("# %% [markdown]" cells hold prose as comment lines). Run from the repository
root: ``python notebooks/build.py [name ...]``. The executed notebooks, with
their outputs, are what gets committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
TARGETS = {
    "nb01": "01_softmax_numerics.ipynb",
    "nb02": "02_temperature.ipynb",
    "nb03": "03_classifier.ipynb",
}


def cells_from_source(text: str) -> list:
    cells = []
    kind, lines = None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(name: str) -> Path:
    source = (HERE / "_src" / f"{name}.py").read_text()
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_from_source(source)
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding changes only real output
        cell.id = f"{name}-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:  # execution counts and timings only add churn to diffs
        cell.metadata.pop("execution", None)
    out = HERE / TARGETS[name]
    nbformat.write(nb, out)
    return out


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(TARGETS):
        if (HERE / "_src" / f"{name}.py").exists():
            print("built", build(name))
