"""The README: its commands, its links, and its Python examples run as written
(the shard_map one needs 4 devices and runs in tests/multidevice instead)."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "shard_map" not in b]


def test_readme_has_examples():
    assert len(BLOCKS) >= 1
    assert 'pip install -e ".[test]" && pytest' in README
    assert README.index('pip install -e ".[demo]" && jsoftmax-train') < README.index("## Install")
    # One screen to start: the rest of the material belongs in docs/.
    assert README.count("\n") <= 150


def test_readme_links_resolve():
    # The material that left the README lives in docs/; a renamed page must not leave a dead link.
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in t]
    assert any(t.startswith("docs/") for t in links)
    for target in links:
        assert (ROOT / target).exists(), target


def test_readme_examples_run_in_order():
    # Later blocks use the imports and arrays of earlier ones, as a reader would.
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README block {index}", "exec"), namespace)
