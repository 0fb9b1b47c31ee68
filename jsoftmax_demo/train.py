"""``jsoftmax-train``: an MLP classifier trained with optax, then calibrated.

Trains a small multi-layer perceptron in plain JAX with Adam and jsoftmax's
cross-entropy, on scikit-learn's handwritten digits (default) or a synthetic
spiral set, on CPU or GPU, data parallel over every local device, or over
every device of several processes (``--coordinator-address``,
``--num-processes``, ``--process-id``: JAX's multi-controller runtime, one
command per process). It then fits
one temperature on the validation split (temperature scaling, Guo et al. 2017)
and reports the test NLL and 15-bin expected calibration error before and
after. Run ``jsoftmax-train --help`` for the flags.

The pieces are importable for notebooks: :func:`load_dataset`,
:func:`init_mlp`, :func:`mlp_apply`, :func:`make_train_step`,
:func:`select_devices`, :func:`mesh_devices`, :func:`train`, :func:`predict_logits`,
:func:`calibrate`. optax comes with the ``demo`` extra, as do scikit-learn,
matplotlib and tqdm, which are imported only inside the functions that need
them. Also runnable as ``python -m jsoftmax_demo.train``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

try:
    import optax
except ImportError as err:  # optax left the library's dependencies for the demo extra
    raise ImportError(
        'jsoftmax_demo needs optax; install the demo extra: pip install "jsoftmax[demo]"'
    ) from err

from jsoftmax.calibration import (
    expected_calibration_error,
    fit_temperature,
    mean_nll,
    reliability_bins,
)
from jsoftmax.core import softmax
from jsoftmax.losses import softmax_cross_entropy_with_integer_labels

__all__ = [
    "Splits",
    "calibrate",
    "init_mlp",
    "load_dataset",
    "main",
    "make_spirals",
    "make_train_step",
    "mesh_devices",
    "mlp_apply",
    "predict_logits",
    "select_devices",
    "train",
]

DATASETS = ("digits", "spirals")
PLATFORMS = ("auto", "cpu", "gpu")
NUM_BINS = 15
_DEMO_HINT = 'install the demo extra: pip install -e ".[demo]"'


class DemoError(Exception):
    """A problem the command line reports as one line, without a traceback."""


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


class Splits(NamedTuple):
    """Train / validation / test arrays (float32 features, int32 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def make_spirals(
    num_classes: int = 3, points_per_class: int = 1000, noise: float = 0.4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved spiral arms in the plane, one class per arm.

    Arm k is ``r (cos a, sin a)`` with ``a = 2 pi k / K + 3 pi r`` plus Gaussian
    noise of ``noise`` radians on the angle, for radii r uniform in (0.05, 1].
    Not linearly separable; a small MLP separates it.

    Returns:
      ``(x, y)``: float32 points of shape (K * n, 2) and int32 labels.

    Examples:
      >>> from jsoftmax_demo.train import make_spirals
      >>> x, y = make_spirals(num_classes=3, points_per_class=5)
      >>> x.shape, np.bincount(y).tolist()
      ((15, 2), [5, 5, 5])
    """
    rng = np.random.default_rng(seed)
    radius = rng.uniform(0.05, 1.0, size=(num_classes, points_per_class))
    arm = 2 * np.pi * np.arange(num_classes)[:, None] / num_classes
    angle = arm + 3 * np.pi * radius + noise * rng.standard_normal(radius.shape)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1).reshape(-1, 2)
    y = np.repeat(np.arange(num_classes), points_per_class)
    return x.astype(np.float32), y.astype(np.int32)


def load_dataset(name: str = "digits", seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> Splits:
    """Loads a dataset and splits it into train / validation / test by ``seed``.

    ``digits`` is scikit-learn's bundled 8x8 handwritten digits (1797 images,
    10 classes, no download); ``spirals`` is :func:`make_spirals` (3 classes).
    The split is a seeded permutation; the features are standardised with the
    training split's mean and standard deviation.
    """
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise DemoError(f"--dataset digits needs scikit-learn; {_DEMO_HINT}") from err
        bunch = load_digits()
        x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int32)
    elif name == "spirals":
        x, y = make_spirals(seed=seed)
    else:
        raise DemoError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_train = round(fractions[0] * len(y))
    n_val = round(fractions[1] * len(y))
    train, val, test = np.split(order, [n_train, n_train + n_val])
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant pixels (digit borders) stay 0
    x = ((x - mean) / std).astype(np.float32)
    return Splits(x[train], y[train], x[val], y[val], x[test], y[test], int(y.max()) + 1)


# --------------------------------------------------------------------------
# Model and training step
# --------------------------------------------------------------------------

Params = list[tuple[jax.Array, jax.Array]]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-normal weights and zero biases for layers ``sizes[0] -> ... -> sizes[-1]``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            jax.random.normal(k, (n_in, n_out), jnp.float32) * math.sqrt(2.0 / n_in),
            jnp.zeros(n_out, jnp.float32),
        )
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU hidden layers, a linear last layer.

    Examples:
      >>> from jsoftmax_demo.train import init_mlp, mlp_apply
      >>> params = init_mlp(jax.random.key(0), [4, 8, 3])
      >>> mlp_apply(params, jnp.ones((2, 4))).shape
      (2, 3)
    """
    *hidden, (w_out, b_out) = params
    for w, b in hidden:
        x = jax.nn.relu(x @ w + b)
    return x @ w_out + b_out


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of the batch, and its logits."""
    logits = mlp_apply(params, x)
    return jnp.mean(softmax_cross_entropy_with_integer_labels(logits, y)), logits


def make_train_step(optimizer: optax.GradientTransformation) -> Callable:
    """The jitted step ``(params, opt_state, x, y) -> (params, opt_state, loss, accuracy)``.

    With a batch sharded over devices and replicated parameters, XLA partitions
    the step and all-reduces the gradients (data parallelism).
    """

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    return step


_jit_apply = jax.jit(lambda params, x: mlp_apply(params, x))  # no docstring copy for doctest


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def select_devices(platform: str = "auto") -> list[jax.Device]:
    """The local devices to train on: all of the default backend's for ``auto``
    (a GPU when JAX sees one), else all of the named platform's."""
    if platform == "auto":
        return jax.local_devices()
    if platform not in PLATFORMS:
        raise DemoError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
    try:
        return jax.local_devices(backend=platform)
    except RuntimeError as err:
        available = ", ".join(sorted({d.platform for d in jax.devices()}))
        raise DemoError(
            f"--platform {platform}: JAX sees no {platform.upper()} (it has: {available}); "
            "install a CUDA build of jax (pip install -U 'jax[cuda12]') or use --platform cpu"
        ) from err


def mesh_devices(local: Sequence[jax.Device]) -> list[jax.Device]:
    """The devices to shard over: ``local``, or with several processes every
    process's devices of the same platform (the mesh must span them all)."""
    if jax.process_count() == 1:
        return list(local)
    return jax.devices(local[0].platform)


def _shardings(devices: Sequence[jax.Device]) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings over a 1-d mesh of ``devices``."""
    mesh = Mesh(np.asarray(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (the same in every process) placed with ``sharding``.

    A sharding over other processes' devices takes each local device's part
    only: every process holds the whole batch, and sends its own rows.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(put, tree)


def predict_logits(params: Params, x: np.ndarray, devices: Sequence[jax.Device]) -> np.ndarray:
    """The model's logits for ``x``, the rows sharded over ``devices``."""
    _, batch = _shardings(devices)
    pad = -len(x) % len(devices)
    padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    logits = _jit_apply(params, _put(padded, batch))
    if not logits.is_fully_addressable:  # some rows are on other processes: fetch them
        logits = multihost_utils.process_allgather(logits, tiled=True)
    return np.asarray(logits)[: len(x)]


# --------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------


def train(
    data: Splits,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    hidden: int = 128,
    seed: int = 0,
    devices: Sequence[jax.Device] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[Params, list[dict[str, float]]]:
    """Trains the MLP with Adam at a constant learning rate.

    Every epoch visits the training set in a fresh seeded order, in batches of
    ``batch_size`` (the remainder is dropped so the step compiles once). The
    batch is sharded over ``devices`` (default: all devices of the default
    backend, those of every process when there are several), so
    ``batch_size`` must be a multiple of their number. With several
    processes, each calls this with the same ``data`` and arguments.

    Returns:
      ``(params, history)``: the trained parameters and one dict per epoch
      with ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
      ``val_accuracy``; ``on_epoch`` is called with each.
    """
    devices = list(devices or jax.devices())
    if batch_size % len(devices):
        raise DemoError(
            f"--batch-size {batch_size} does not split over {len(devices)} devices; "
            f"use a multiple of {len(devices)}"
        )
    steps_per_epoch = len(data.y_train) // batch_size
    if steps_per_epoch == 0:
        raise DemoError(
            f"--batch-size {batch_size} is larger than the {len(data.y_train)} training examples"
        )
    replicated, batch = _shardings(devices)
    optimizer = optax.adam(learning_rate)
    sizes = [data.x_train.shape[1], hidden, hidden, data.num_classes]
    host_params = jax.device_get(init_mlp(jax.random.key(seed), sizes))
    params = _put(host_params, replicated)
    opt_state = _put(jax.device_get(optimizer.init(host_params)), replicated)
    step = make_train_step(optimizer)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(data.y_train))[: steps_per_epoch * batch_size]
        losses, accuracies = [], []
        for idx in order.reshape(steps_per_epoch, batch_size):
            x = _put(data.x_train[idx], batch)
            y = _put(data.y_train[idx], batch)
            params, opt_state, loss, accuracy = step(params, opt_state, x, y)
            losses.append(loss)
            accuracies.append(accuracy)
        val_logits = predict_logits(params, data.x_val, devices)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(jax.device_get(losses))),
            "train_accuracy": float(np.mean(jax.device_get(accuracies))),
            "val_loss": float(mean_nll(val_logits, data.y_val)),
            "val_accuracy": float(np.mean(val_logits.argmax(-1) == data.y_val)),
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return params, history


def calibrate(
    val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Fits the temperature on validation logits; test NLL, ECE and reliability
    bins before (t = 1) and after (fitted t)."""
    t = float(fit_temperature(val_logits, y_val))
    out: dict[str, Any] = {"temperature": t}
    for when, temp in (("before", 1.0), ("after", t)):
        probs = softmax(test_logits, temperature=temp)
        out[f"test_nll_{when}"] = float(mean_nll(test_logits, y_test, temp))
        out[f"ece_{when}"] = float(expected_calibration_error(probs, y_test, NUM_BINS))
        out[f"bins_{when}"] = reliability_bins(probs, y_test, NUM_BINS)
    return out


# --------------------------------------------------------------------------
# Plots (matplotlib, only with --out)
# --------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise DemoError(f"--out writes plots with matplotlib; {_DEMO_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: list[dict[str, float]], path: str) -> None:
    """Loss and accuracy per epoch, train and validation, to a PNG."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in history], label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(cal: dict[str, Any], path: str) -> None:
    """Reliability diagrams of the test set before and after calibration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, when in zip(axes, ("before", "after"), strict=True):
        bins = jax.device_get(cal[f"bins_{when}"])
        filled = bins.counts > 0
        left, width = bins.edges[:-1][filled], np.diff(bins.edges)[filled]
        acc, conf = bins.accuracy[filled], bins.confidence[filled]
        ax.bar(left, acc, width=width, align="edge", edgecolor="black", label="accuracy")
        ax.bar(left, np.abs(conf - acc), bottom=np.minimum(conf, acc), width=width,
               align="edge", facecolor="none", edgecolor="tab:red", hatch="//",
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        t = 1.0 if when == "before" else cal["temperature"]
        ax.set(xlabel="confidence", title=f"{when}: t = {t:.3f}, ECE = {cal[f'ece_{when}']:.4f}",
               xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize="small", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(
    kind: type, minimum: float, strict: bool = False, maximum: float = math.inf
) -> Callable[[str], Any]:
    """An argparse type: ``kind`` in [minimum, maximum] (minimum excluded if strict)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        too_low = value < minimum or (strict and value == minimum)
        if not math.isfinite(value) or too_low or value > maximum:
            low = f"> {minimum}" if strict else f">= {minimum}"
            high = "" if maximum == math.inf else f" and <= {maximum}"
            raise argparse.ArgumentTypeError(f"{text} is out of range; it must be {low}{high}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jsoftmax-train",
        description="Train a small MLP classifier with optax and jsoftmax, then calibrate "
        "it with temperature scaling; prints test accuracy, NLL and ECE.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits; spirals: synthetic (default: digits)")
    p.add_argument("--epochs", type=_number(int, 1), default=60,
                   help="passes over the training split (default: 60)")
    p.add_argument("--batch-size", type=_number(int, 1), default=64,
                   help="global batch, split over the devices; rounded up to a multiple of "
                   "their number (default: 64)")
    p.add_argument("--lr", type=_number(float, 0, True), default=3e-3,
                   help="Adam learning rate (default: 3e-3)")
    p.add_argument("--hidden", type=_number(int, 1), default=128,
                   help="width of the two hidden layers (default: 128)")
    p.add_argument("--seed", type=_number(int, 0, maximum=2**32 - 1), default=0,
                   help="seeds the data split, initialisation and batch order (default: 0)")
    p.add_argument("--platform", choices=PLATFORMS, default="auto",
                   help="auto: a GPU if JAX sees one, else the CPU (default: auto)")
    p.add_argument("--out", metavar="DIR",
                   help="write metrics.json, curves.png and reliability.png to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    procs = p.add_argument_group(
        "several processes",
        "JAX's multi-controller runtime: run the same command once per process (one per "
        "host, or several on one), each with its own --process-id; the batch is split "
        "over every process's devices, and process 0 prints the summary and writes --out",
    )
    procs.add_argument("--coordinator-address", metavar="HOST:PORT", type=_address,
                       help="where process 0 listens for the others (the same in every process)")
    procs.add_argument("--num-processes", metavar="N", type=_number(int, 1),
                       help="how many processes take part")
    procs.add_argument("--process-id", metavar="I", type=_number(int, 0),
                       help="this process's id, 0 to N - 1")
    return p


def _address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` with a port in 1..65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def join_processes(args: argparse.Namespace) -> bool:
    """Joins JAX's multi-controller runtime when the process flags are given.

    Must run before anything touches a device. Returns whether it joined.
    """
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if all(flag is None for flag in flags):
        return False
    if any(flag is None for flag in flags):
        raise DemoError("--coordinator-address, --num-processes and --process-id go together")
    if args.process_id >= args.num_processes:
        raise DemoError(f"--process-id {args.process_id} is not below "
                        f"--num-processes {args.num_processes}")
    if args.platform != "gpu":
        # Without gloo, CPU devices of different processes have no collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DemoError(f"--coordinator-address {args.coordinator_address}: "
                        f"could not join the other processes ({reason})") from err
    return True


def _prepare_out(path: str) -> str:
    """Creates ``path`` and checks that it is writable, before any training."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".jsoftmax-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise DemoError(f"--out {path}: cannot write there ({err.strerror or err})") from err
    return path


def _progress(epochs: int, enabled: bool):
    """A tqdm bar over epochs, or a no-op when disabled."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise DemoError(f"the progress bar needs tqdm; {_DEMO_HINT} (or pass --quiet)") from err
    return tqdm(total=epochs, desc="training", unit="epoch")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the whole example for parsed ``args`` and returns the metrics.

    With the process flags, every process returns the metrics, and process 0
    alone prints the summary and writes ``--out``.
    """
    joined = join_processes(args)
    lead = jax.process_index() == 0
    out = None
    if args.out and lead:
        out = _prepare_out(args.out)
        _pyplot()  # fail now, not after training, when matplotlib is missing
    local = select_devices(args.platform)
    devices = mesh_devices(local)
    backend = devices[0].platform
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    where = f"{len(devices)} device{'s' * (len(devices) > 1)}"
    if jax.process_count() > 1:
        where = (f"process {jax.process_index()} of {jax.process_count()}, "
                 f"{where} in all, {len(local)} here")
    print(f"jsoftmax-train: {args.dataset} on {backend} ({where}: {kinds})", flush=True)
    if args.batch_size % len(devices):
        rounded = -(-args.batch_size // len(devices)) * len(devices)
        if lead:
            print(f"batch size {args.batch_size} rounded up to {rounded} to split over "
                  f"{len(devices)} devices")
        args.batch_size = rounded
    data = load_dataset(args.dataset, args.seed)
    bar = _progress(args.epochs, lead and not args.quiet and sys.stderr.isatty())

    def on_epoch(record):
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            acc=f"{record['train_accuracy']:.3f}",
                            val_acc=f"{record['val_accuracy']:.3f}")
            bar.update()

    start = time.perf_counter()
    with jax.default_device(local[0]):
        try:
            params, history = train(
                data, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                hidden=args.hidden, seed=args.seed, devices=devices, on_epoch=on_epoch,
            )
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - start
        val_logits = predict_logits(params, data.x_val, devices)
        test_logits = predict_logits(params, data.x_test, devices)
        cal = calibrate(val_logits, data.y_val, test_logits, data.y_test)
    metrics = {
        "dataset": args.dataset,
        "backend": backend,
        "devices": len(devices),
        "processes": jax.process_count(),
        "device_kind": kinds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "hidden": args.hidden,
        "seed": args.seed,
        "num_classes": data.num_classes,
        "split_sizes": [len(data.y_train), len(data.y_val), len(data.y_test)],
        "val_accuracy": history[-1]["val_accuracy"],
        "test_accuracy": float(np.mean(test_logits.argmax(-1) == data.y_test)),
        **{k: v for k, v in cal.items() if not k.startswith("bins_")},
        "train_seconds": train_seconds,
        "history": history,
    }
    if lead:
        _print_summary(metrics)
    if out is not None:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        plot_training_curves(history, os.path.join(out, "curves.png"))
        plot_reliability(cal, os.path.join(out, "reliability.png"))
        print(f"wrote metrics.json, curves.png, reliability.png to {out}")
    if joined:
        # A barrier: process 0 hosts the coordinator, so it must not exit first.
        jax.distributed.shutdown()
    return metrics


def _print_summary(m: dict[str, Any]) -> None:
    n_train, n_val, n_test = m["split_sizes"]
    rows = [
        ("test accuracy", f"{m['test_accuracy']:.4f}", f"{m['test_accuracy']:.4f}"),
        ("test NLL", f"{m['test_nll_before']:.4f}", f"{m['test_nll_after']:.4f}"),
        (f"test ECE ({NUM_BINS} bins)", f"{m['ece_before']:.4f}", f"{m['ece_after']:.4f}"),
        ("temperature", "1", f"{m['temperature']:.4f}"),
    ]
    print(f"{m['epochs']} epochs in {m['train_seconds']:.1f} s (compilation included); "
          f"split {n_train}/{n_val}/{n_test}, temperature fitted on validation")
    print(f"{'':22}{'before':>10}{'after':>10}")
    for name, before, after in rows:
        print(f"{name:22}{before:>10}{after:>10}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``jsoftmax-train`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except DemoError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
