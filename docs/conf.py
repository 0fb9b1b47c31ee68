"""Sphinx configuration for the jsoftmax documentation site.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The repository root for jsoftmax and benchmarks/ (the edge tables), _ext/ for the local extension.
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

import jsoftmax  # noqa: E402

project = "jsoftmax"
author = "the jsoftmax authors"
copyright = "the jsoftmax authors"
release = version = jsoftmax.__version__

extensions = [
    "myst_nb",  # registers myst_parser too; Markdown pages and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx-mathjax-offline",  # MathJax from the built site, not a CDN
    "jsoftmax_docs",
]

# The generated tables are pieces included by edge-cases.md, not pages of their own.
exclude_patterns = ["_build", "_generated/*.md", "Thumbs.db", ".DS_Store"]

# The notebooks are committed with their outputs (tests/test_notebooks.py executes them).
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
# Anchors for "#heading" links inside BENCHMARKS.md and CHANGELOG.md.
myst_heading_anchors = 3

# The docstrings' Args say what each argument may be. The annotations are mostly
# jax's ArrayLike, which autodoc expands into an eight-way Union (or, as an alias,
# prints as TypeAliasForwardRef(...) inside Optional).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"jsoftmax {release}"
html_static_path: list[str] = []
