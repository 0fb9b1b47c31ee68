"""One process of the multi-process vocab-parallel check.

Usage (one command per process, the same coordinator for all)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
        python tests/multiprocess/worker.py 127.0.0.1:PORT NUM_PROCESSES PROCESS_ID OUT.json

Every process joins JAX's multi-controller runtime (CPU collectives over
gloo), builds one mesh over all the processes' devices with the vocabulary
axis sharded across every device, and compares the vocab-parallel
``fused_linear_cross_entropy`` (value and gradients of hidden, weight and
bias) and ``softmax`` (value and gradient) with the unsharded calls on the
full arrays, computed here on this process's first device from the same
seeded inputs. It writes ``{"passed": ..., "errors": {...}, ...}`` to
OUT.json and exits 0 only when everything matched.
"""

from __future__ import annotations

import json
import sys
import traceback
from functools import partial

import numpy as np

RTOL, ATOL = 2e-5, 1e-6
N, D = 8, 5  # examples and hidden size of the fused loss
B = 6  # rows of the softmax input
PER_DEVICE = 8  # vocabulary columns per device: chunks of 3 leave a remainder of 2
CHUNK = 3


def inputs(num_devices: int) -> dict[str, np.ndarray]:
    """Seeded inputs, identical in every process."""
    v = PER_DEVICE * num_devices
    rng = np.random.default_rng(0)
    x = (3 * rng.normal(size=(B, v))).astype(np.float32)
    x[1, 3] = -np.inf  # an excluded entry
    x[2, v - 2] = 40.0  # the row's maximum on the last device (another process)
    return {
        "h": rng.normal(size=(N, D)).astype(np.float32),
        "w": (1.5 * rng.normal(size=(D, v))).astype(np.float32),
        "b": rng.normal(size=v).astype(np.float32),
        # Labels on every device, so most rows' label logit lives on another process.
        "labels": ((np.arange(N) * 5 + 1) % v).astype(np.int32),
        "g": rng.uniform(0.5, 1.5, size=N).astype(np.float32),
        "x": x,
        "x_ct": rng.normal(size=(B, v)).astype(np.float32),
    }


def fused(h, w, b, labels, axis_name=None):
    """The loss under test; the same options sharded and unsharded."""
    import jsoftmax

    return jsoftmax.fused_linear_cross_entropy(
        h, w, labels, axis_name=axis_name, bias=b, chunk_size=CHUNK, label_smoothing=0.1
    )


def softmax(x, axis_name=None):
    import jsoftmax

    return jsoftmax.softmax(x, axis_name=axis_name)


def value_and_vjp(fn, num_diff):
    """A jitted ``(*args, cotangent) -> (fn(*args), vjp(cotangent))`` that
    differentiates the first ``num_diff`` arguments."""
    import jax

    @jax.jit
    def run(*args):
        *args, ct = args
        diff, rest = args[:num_diff], args[num_diff:]
        out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return out, vjp(ct)

    return run


def max_errors(actual, expected: np.ndarray) -> tuple[float, float]:
    """(max abs error, max of |error| / (ATOL + RTOL |expected|)) over this
    process's shards of the global array ``actual``."""
    worst_abs = worst_scaled = 0.0
    for shard in actual.addressable_shards:
        got = np.asarray(shard.data, np.float64)
        want = np.asarray(expected, np.float64)[shard.index]
        same = (got == want) | (np.isnan(got) & np.isnan(want))  # also equal infinities
        err = np.where(same, 0.0, np.abs(got - want))
        worst_abs = max(worst_abs, float(np.max(err)))
        worst_scaled = max(worst_scaled, float(np.max(err / (ATOL + RTOL * np.abs(want)))))
    return worst_abs, worst_scaled


def check() -> dict[str, dict[str, float]]:
    """Sharded vs unsharded; {name: {"max_abs": ..., "max_scaled": ...}}."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("v",))
    data = inputs(jax.device_count())

    def global_array(name, spec):
        x = data[name]
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    vocab = P(None, "v")
    sharded_fused = jax.shard_map(
        partial(fused, axis_name="v"), mesh=mesh,
        in_specs=(P(), vocab, P("v"), P()), out_specs=P(),
    )
    sharded_softmax = jax.shard_map(
        partial(softmax, axis_name="v"), mesh=mesh, in_specs=(vocab,), out_specs=vocab
    )
    fused_args = ("h", "w", "b", "labels", "g")
    specs = {"h": P(), "w": vocab, "b": P("v"), "labels": P(), "g": P()}
    got_loss, got_grads = value_and_vjp(sharded_fused, 3)(
        *(global_array(k, specs[k]) for k in fused_args)
    )
    got_sm, (got_sm_grad,) = value_and_vjp(sharded_softmax, 1)(
        global_array("x", vocab), global_array("x_ct", vocab)
    )
    # The reference: plain calls on this process's first device, nothing sharded.
    with jax.default_device(jax.local_devices()[0]):
        want_loss, want_grads = value_and_vjp(fused, 3)(*(data[k] for k in fused_args))
        want_sm, (want_sm_grad,) = value_and_vjp(softmax, 1)(data["x"], data["x_ct"])
    pairs = {
        "fused_loss": (got_loss, want_loss),
        "fused_grad_hidden": (got_grads[0], want_grads[0]),
        "fused_grad_weight": (got_grads[1], want_grads[1]),
        "fused_grad_bias": (got_grads[2], want_grads[2]),
        "softmax": (got_sm, want_sm),
        "softmax_grad": (got_sm_grad, want_sm_grad),
    }
    errors = {}
    for name, (got, want) in pairs.items():
        abs_err, scaled = max_errors(got, np.asarray(want))
        errors[name] = {"max_abs": abs_err, "max_scaled": scaled}
    return errors


def main(argv: list[str]) -> int:
    address, num_processes, process_id, out = argv
    result: dict = {"process_id": int(process_id), "passed": False}
    try:
        import jax

        # CPU devices of different processes talk over gloo (the default has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=int(num_processes),
            process_id=int(process_id), initialization_timeout=60,
        )
        result.update(
            process_count=jax.process_count(), device_count=jax.device_count(),
            local_device_count=jax.local_device_count(),
        )
        result["errors"] = check()
        result["passed"] = all(e["max_scaled"] <= 1.0 for e in result["errors"].values())
        jax.distributed.shutdown()
    except Exception:
        result["exception"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
