"""Build-time content for the jsoftmax docs.

Before Sphinx reads any page, this writes into docs/_generated/:

* the three edge tables, by the same functions the tests run
  (benchmarks/edge_cases.py, loss_edge_cases.py, family_edge_cases.py), so
  the published tables are what the installed jsoftmax returns today. When
  ``JSOFTMAX_DOCS_EDGE_TABLES`` names a directory, the tables are read from
  its ``<script>.md`` files instead (tests/test_docs.py passes the ones the
  test run computed with those functions);
* copies of notebooks/*.ipynb, because Sphinx reads sources only under docs/.

After reading, it warns (an error under -W) if a public name in
``jsoftmax.__all__`` has no entry in the API reference.
"""

from __future__ import annotations

import os
from pathlib import Path

from sphinx.util import logging

import jsoftmax

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"


def _write(path: Path, text: str) -> None:
    # Unchanged files keep their mtime, so Sphinx does not re-read the pages that include them.
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _computed_tables() -> tuple[str, str, str]:
    from benchmarks import edge_cases, family_edge_cases, loss_edge_cases

    return (
        edge_cases.to_markdown(edge_cases.run_edge_cases()),
        loss_edge_cases.format_table(loss_edge_cases.edge_case_table()),
        family_edge_cases.format_table(family_edge_cases.edge_case_table()),
    )


def _edge_tables() -> dict[str, str]:
    import jax
    import optax

    precomputed = os.environ.get("JSOFTMAX_DOCS_EDGE_TABLES")
    if precomputed:
        core, losses, family = (
            (Path(precomputed) / f"{name}.md").read_text()
            for name in ("edge_cases", "loss_edge_cases", "family_edge_cases")
        )
    else:
        core, losses, family = _computed_tables()
    versions = f"jax {jax.__version__}, optax {optax.__version__}, jsoftmax {jsoftmax.__version__}"
    return {
        "edge_cases.md": core + "\n",
        "loss_edge_cases.md": losses + "\n",
        "family_edge_cases.md": family + "\n",
        "edge_versions.md": f"Generated when these pages were built, with {versions}.\n",
    }


def generate(app, config) -> None:
    for name, text in _edge_tables().items():
        _write(GENERATED / name, text)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        _write(GENERATED / "notebooks" / notebook.name, notebook.read_text())
    stale = {p.name for p in (GENERATED / "notebooks").glob("*.ipynb")}
    for name in stale - {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}:
        (GENERATED / "notebooks" / name).unlink()


def check_api_coverage(app, env) -> None:
    documented = set(env.get_domain("py").objects)
    for name in jsoftmax.__all__:
        if name.startswith("__"):
            continue
        if f"jsoftmax.{name}" not in documented:
            logger.warning("jsoftmax.%s is public but missing from docs/api.md", name)


def setup(app):
    app.connect("config-inited", generate)
    app.connect("env-check-consistency", check_api_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
