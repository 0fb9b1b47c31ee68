"""Packaging: what ``import jsoftmax`` needs, and the built sdist and wheel.

The library needs only jax and numpy; the training example (``jsoftmax_demo``)
brings optax and the rest of the ``demo`` extra. The slow test builds the
distribution from a copy of the source tree, checks it with twine and installs
the wheel into a fresh virtual environment.
"""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import jsoftmax

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "jsoftmax"
DEMO_ONLY = ("optax", "sklearn", "matplotlib", "tqdm")
# What a build needs from the tree: caches and earlier builds stay behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "dist", ".hypothesis", ".pytest_cache",
    ".ruff_cache", ".venv", ".ci-venv", ".ipynb_checkpoints", "out",
)


def _clean_env(**extra):
    """The environment minus PYTHONPATH, so a subprocess sees only what it installs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run(args, **kwargs):
    """Runs ``args``; fails the test with its output when it exits non-zero."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _imported_top_level(path: Path) -> set[str]:
    """The top-level names of the absolute imports in one source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_only_jax_numpy_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"jax", "numpy", "jsoftmax"}
    for path in sorted(LIBRARY.glob("*.py")):
        assert _imported_top_level(path) <= allowed, path.name


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "0.7.2rc1" -> (0, 7, 2)."""
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def test_installed_jax_meets_the_declared_floor():
    # docs/tests.md runs the suite on the floor itself; this keeps every other
    # environment at or above it, and the floor stated once, without a cap.
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    jax_specs = re.findall(r'"jax([^"]*)"', deps)
    assert len(jax_specs) == 1, jax_specs
    floor = re.fullmatch(r">=([\d.]+)", jax_specs[0])
    assert floor, f"jax{jax_specs[0]}: give one lower bound, no upper pin"
    assert _release(importlib.metadata.version("jax")) >= _release(floor.group(1))
    assert _release(importlib.metadata.version("jaxlib")) >= _release(floor.group(1))


def test_import_jsoftmax_without_optax():
    # None in sys.modules makes an import raise ImportError, as if not installed.
    code = f"""
import sys
for name in {DEMO_ONLY!r}:
    sys.modules[name] = None
import jsoftmax, jax.numpy as jnp
print(*jsoftmax.softmax(jnp.array([0.0, jnp.log(3.0)])).tolist())
loss = jsoftmax.softmax_cross_entropy_with_integer_labels(jnp.zeros((1, 4)), jnp.array([1]))
print(loss[0].item())
try:
    import jsoftmax_demo.train
except ImportError as err:
    print(err)
"""
    proc = _run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env())
    probs, loss, error = proc.stdout.splitlines()
    assert [float(p) for p in probs.split()] == pytest.approx([0.25, 0.75])
    assert float(loss) == pytest.approx(1.3862944)  # log 4
    assert "needs optax" in error and "demo" in error


def _site_packages(python: Path | str) -> str:
    """The purelib directory of the interpreter ``python``."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return _run([str(python), "-c", code]).stdout.strip()


@pytest.mark.slow
def test_wheel_builds_checks_and_installs(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    # --no-isolation: offline, with the setuptools of the test extra.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
         env=_clean_env())
    version = jsoftmax.__version__
    wheel = dist / f"jsoftmax-{version}-py3-none-any.whl"
    sdist = dist / f"jsoftmax-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])
    _run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)])

    names = zipfile.ZipFile(wheel).namelist()
    print("wheel:", *names, sep="\n  ")
    library = {f"jsoftmax/{p.name}" for p in LIBRARY.glob("*.py")} | {"jsoftmax/py.typed"}
    assert library <= set(names)
    assert {"jsoftmax_demo/__init__.py", "jsoftmax_demo/train.py"} <= set(names)
    top = {name.split("/")[0] for name in names}
    assert top == {"jsoftmax", "jsoftmax_demo", f"jsoftmax-{version}.dist-info"}, top
    info = f"jsoftmax-{version}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    optax = [r for r in requires if "optax" in r]
    assert 'Requires-Dist: optax>=0.2.4; extra == "demo"' in optax
    assert all("; extra ==" in r for r in optax), optax  # never a plain dependency
    assert "jsoftmax-train = jsoftmax_demo.train:main" in (
        zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    )
    with tarfile.open(sdist) as tar:
        assert f"jsoftmax-{version}/jsoftmax/py.typed" in tar.getnames()

    # A fresh environment with the wheel installed; jax, numpy and optax come
    # from this one's site-packages through a .pth line, not downloaded again.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_site_packages(python))
    (site / "_host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--no-cache-dir", "--quiet", str(wheel)], env=_clean_env())
    code = (
        "import jsoftmax, jsoftmax_demo.train, jax.numpy as jnp; "
        "print(jsoftmax.__file__); print(jsoftmax.__version__); "
        "print(jsoftmax.logsumexp(jnp.zeros(4)).item())"
    )
    where, installed, lse = _run([str(python), "-I", "-c", code], cwd=tmp_path,
                                 env=_clean_env()).stdout.splitlines()
    assert Path(where).is_relative_to(site)
    assert installed == version
    assert float(lse) == pytest.approx(1.3862944)
    usage = _run([str(venv / "bin" / "jsoftmax-train"), "--help"], cwd=tmp_path,
                 env=_clean_env()).stdout
    assert usage.startswith("usage: jsoftmax-train")
