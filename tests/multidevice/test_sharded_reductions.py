"""Vocab-parallel reductions: axis_name under jax.shard_map on 4 CPU devices.

Each sharded call must give the values and the gradients of the unsharded
call on the whole array (the reference, itself checked elsewhere against
mpmath / float64 NumPy), including excluded (-inf or masked) entries, slices
whose included entries all live on one shard, and fully excluded slices.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoftmax

pytestmark = pytest.mark.skipif(jax.device_count() != 4, reason="needs 4 devices")

B, V = 6, 16  # 4 shards of 4 classes


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()), ("v",))


@pytest.fixture(scope="module")
def mesh2d():
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "v"))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = (3 * rng.normal(size=(B, V))).astype(np.float32)
    x[1, :] = -np.inf  # a slice excluded by -inf
    x[2, 3] = -np.inf  # one -inf entry
    x[2, 9] = 40.0  # a large entry on another shard
    mask = rng.uniform(size=(B, V)) > 0.3
    mask[3, :] = False  # a fully masked slice
    mask[4, :] = False
    mask[4, 5:7] = True  # included entries on a single shard
    t = np.array([1.0, 0.5, 2.0, 1.0, 0.7, 1.3], np.float32)
    b = rng.uniform(-0.2, 1.0, size=(B, V)).astype(np.float32)
    return {"x": x, "mask": mask, "t": t, "b": b, "rng": rng}


def _functions(axis_name):
    kw = {"axis_name": axis_name}
    return {
        "softmax": lambda x, t, m, b: jsoftmax.softmax(x, where=m, temperature=t, **kw),
        "log_softmax": lambda x, t, m, b: jsoftmax.log_softmax(x, where=m, temperature=t, **kw),
        "logsumexp": lambda x, t, m, b: jsoftmax.logsumexp(
            x, axis=-1, where=m, temperature=t, **kw
        ),
        "logsumexp_b": lambda x, t, m, b: jsoftmax.logsumexp(
            x, axis=-1, b=jnp.abs(b), where=m, temperature=t, **kw
        ),
        "logsumexp_sign": lambda x, t, m, b: jsoftmax.logsumexp(
            x, axis=-1, b=b, where=m, temperature=t, return_sign=True, **kw
        )[0],
        "softmax_t1": lambda x, t, m, b: jsoftmax.softmax(x, where=m, **kw),
        "logsumexp_keepdims": lambda x, t, m, b: jsoftmax.logsumexp(
            x, axis=1, where=m, keepdims=True, **kw
        ),
        "entropy": lambda x, t, m, b: jsoftmax.entropy(x, where=m, temperature=t, **kw),
        "kl_divergence": lambda x, t, m, b: jsoftmax.kl_divergence(
            x, 4 * b, where=m, temperature=t, **kw
        ),
    }


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("name", "jit"),
    [(name, True) for name in sorted(_functions(None))] + [("log_softmax", False)],
)
def test_core_matches_unsharded(mesh, inputs, name, jit):
    x, t, m, b = inputs["x"], inputs["t"], inputs["mask"], inputs["b"]
    reference = _functions(None)[name]
    sharded_fn = _functions("v")[name]
    out, vjp = jax.vjp(lambda x, t: reference(x, t, m, b), x, t)
    rng = np.random.default_rng(1)
    cotangent = np.where(np.isfinite(out), rng.normal(size=out.shape), 0).astype(np.float32)
    expected_dx, expected_dt = vjp(cotangent)

    vocab = P(None, "v")
    spec_out = vocab if out.shape[-1] == V else P()
    sharded = jax.shard_map(
        sharded_fn, mesh=mesh, in_specs=(vocab, P(), vocab, vocab), out_specs=spec_out
    )
    if jit:
        sharded = jax.jit(sharded)
    got, vjp2 = jax.vjp(lambda x, t: sharded(x, t, m, b), x, t)
    dx, dt = vjp2(cotangent)
    _close(got, out)
    _close(dx, expected_dx)
    _close(dt, expected_dt)
    assert not np.any(np.isnan(dx)), "excluded entries must not produce NaN gradients"
    # Forward mode goes through the same custom JVP rules.
    tangent = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    _, jvp_expected = jax.jvp(lambda x: reference(x, t, m, b), (x,), (tangent,))
    _, jvp_got = jax.jvp(lambda x: sharded(x, t, m, b), (x,), (tangent,))
    _close(jvp_got, jvp_expected)


def test_core_nan_stays_in_its_slice(mesh, inputs):
    x = inputs["x"].copy()
    x[0, 13] = np.nan
    sharded = jax.shard_map(
        lambda x: jsoftmax.log_softmax(x, axis_name="v"),
        mesh=mesh, in_specs=P(None, "v"), out_specs=P(None, "v"),
    )
    got = np.asarray(sharded(x))
    assert np.all(np.isnan(got[0]))
    _close(got[1:], jsoftmax.log_softmax(x[1:]))


def test_core_hard_max_and_uniform_limits(mesh, inputs):
    x = np.round(inputs["x"]).astype(np.float32)
    x[5, 2] = x[5, 14] = 50.0  # a tie across shards
    for t in (0.0, np.inf):
        sharded = jax.shard_map(
            lambda x, t=t: jsoftmax.softmax(x, temperature=t, axis_name="v"),
            mesh=mesh, in_specs=P(None, "v"), out_specs=P(None, "v"),
        )
        _close(sharded(x), jsoftmax.softmax(x, temperature=t))


def test_core_second_order(mesh, inputs):
    x = inputs["x"][[0, 2, 5]]

    def loss(fn):
        return lambda x: jnp.sum(jnp.sin(fn(x)))

    sharded = jax.shard_map(
        lambda x: jsoftmax.log_softmax(x, axis_name="v"),
        mesh=mesh, in_specs=P(None, "v"), out_specs=P(None, "v"),
    )
    v = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    hvp = lambda f: jax.jvp(jax.grad(loss(f)), (x,), (v,))[1]
    np.testing.assert_allclose(hvp(sharded), hvp(jsoftmax.log_softmax), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# The fused loss.
# --------------------------------------------------------------------------

N, D, VF = 8, 5, 28  # 7 vocabulary columns per shard: chunks of 3 leave 1


@pytest.fixture(scope="module")
def fused_inputs():
    rng = np.random.default_rng(4)
    return {
        "h": rng.normal(size=(N, D)).astype(np.float32),
        "w": (1.5 * rng.normal(size=(D, VF))).astype(np.float32),
        "labels": rng.integers(0, VF, size=N).astype(np.int32),
        "mask": np.array([1, 1, 0, 1, 1, 1, 0, 1], bool),
        "g": rng.uniform(0.5, 1.5, size=N).astype(np.float32),
    }


OPTIONS = {
    "plain": {},
    "everything": {"temperature": 0.8, "label_smoothing": 0.1, "z_loss": 0.01},
}


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("chunk_size", [3, None])
def test_fused_matches_unsharded(mesh, fused_inputs, options, chunk_size):
    h, w, y, m, g = (fused_inputs[k] for k in ("h", "w", "labels", "mask", "g"))
    opts = dict(OPTIONS[options])
    t = opts.pop("temperature", 1.0)

    def loss(h, w, t, axis_name=None):
        return jsoftmax.fused_linear_cross_entropy(
            h, w, y, where=m, chunk_size=chunk_size, temperature=t, axis_name=axis_name,
            **opts,
        )

    expected, vjp = jax.vjp(loss, h, w, jnp.float32(t))
    expected_grads = vjp(g)
    sharded = jax.jit(jax.shard_map(
        lambda h, w, t: loss(h, w, t, "v"), mesh=mesh,
        in_specs=(P(), P(None, "v"), P()), out_specs=P(),
    ))
    got, vjp2 = jax.vjp(sharded, h, w, jnp.float32(t))
    _close(got, expected)
    for actual, want in zip(vjp2(g), expected_grads, strict=True):
        _close(actual, want)


def test_fused_data_and_vocab_parallel(mesh2d, fused_inputs):
    """Batch sharded over one mesh axis, vocabulary over the other."""
    h, w, y, m, g = (fused_inputs[k] for k in ("h", "w", "labels", "mask", "g"))
    kw = {"chunk_size": 3, "label_smoothing": 0.2, "z_loss": 0.02}

    def loss(h, w, t, y, m, axis_name=None):
        return jsoftmax.fused_linear_cross_entropy(
            h, w, y, where=m, temperature=t, axis_name=axis_name, **kw
        )

    expected, vjp = jax.vjp(lambda h, w, t: loss(h, w, t, y, m), h, w, jnp.float32(1.2))
    expected_grads = vjp(g)
    rows = P("data")
    sharded = jax.shard_map(
        lambda h, w, t, y, m: loss(h, w, t, y, m, "v"), mesh=mesh2d,
        in_specs=(rows, P(None, "v"), P(), rows, rows), out_specs=rows,
    )
    got, vjp2 = jax.vjp(lambda h, w, t: sharded(h, w, t, y, m), h, w, jnp.float32(1.2))
    _close(got, expected)
    for actual, want in zip(vjp2(g), expected_grads, strict=True):
        _close(actual, want)


@pytest.mark.parametrize(("reduction", "chunk_size"), [("none", 3), ("mean", None), ("sum", 3)])
def test_fused_options_match_unsharded(mesh, fused_inputs, reduction, chunk_size):
    """bias (sharded with weight's columns), a soft cap, per-example weights
    and the reductions: values and gradients of every input, cap included."""
    h, w, y, m, g = (fused_inputs[k] for k in ("h", "w", "labels", "mask", "g"))
    rng = np.random.default_rng(5)
    bias = rng.normal(size=VF).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, size=N).astype(np.float32)

    def loss(h, w, b, wt, t, cap, axis_name=None):
        return jsoftmax.fused_linear_cross_entropy(
            h, w, y, where=m, chunk_size=chunk_size, temperature=t, label_smoothing=0.1,
            z_loss=0.01, bias=b, logit_soft_cap=cap, weights=wt, reduction=reduction,
            axis_name=axis_name,
        )

    args = (h, w, bias, weights, jnp.float32(0.8), jnp.float32(2.0))
    expected, vjp = jax.vjp(loss, *args)
    cotangent = g if reduction == "none" else jnp.float32(1.3)
    sharded = jax.jit(jax.shard_map(
        lambda *a: loss(*a, axis_name="v"), mesh=mesh,
        in_specs=(P(), P(None, "v"), P("v"), P(), P(), P()), out_specs=P(),
    ))
    got, vjp2 = jax.vjp(sharded, *args)
    _close(got, expected)
    for actual, want in zip(vjp2(cotangent), vjp(cotangent), strict=True):
        _close(actual, want)


def test_fused_options_data_and_vocab_parallel(mesh2d, fused_inputs):
    """The bias's gradient is summed over the data-parallel axis."""
    h, w, y, m, g = (fused_inputs[k] for k in ("h", "w", "labels", "mask", "g"))
    bias = np.random.default_rng(6).normal(size=VF).astype(np.float32)
    weights = np.linspace(0.5, 2.0, N).astype(np.float32)

    def loss(h, w, b, y, m, wt, axis_name=None):
        return jsoftmax.fused_linear_cross_entropy(
            h, w, y, where=m, chunk_size=3, bias=b, logit_soft_cap=2.0, weights=wt,
            axis_name=axis_name,
        )

    expected, vjp = jax.vjp(lambda h, w, b: loss(h, w, b, y, m, weights), h, w, bias)
    rows = P("data")
    sharded = jax.shard_map(
        lambda h, w, b, y, m, wt: loss(h, w, b, y, m, wt, "v"), mesh=mesh2d,
        in_specs=(rows, P(None, "v"), P("v"), rows, rows, rows), out_specs=rows,
    )
    got, vjp2 = jax.vjp(lambda h, w, b: sharded(h, w, b, y, m, weights), h, w, bias)
    _close(got, expected)
    for actual, want in zip(vjp2(g), vjp(g), strict=True):
        _close(actual, want)


def test_fused_out_of_range_label_is_nan(mesh, fused_inputs):
    h, w = fused_inputs["h"], fused_inputs["w"]
    y = fused_inputs["labels"].copy()
    y[[1, 4]] = [VF, -1]
    sharded = jax.shard_map(
        lambda h, w: jsoftmax.fused_linear_cross_entropy(h, w, y, axis_name="v"),
        mesh=mesh, in_specs=(P(), P(None, "v")), out_specs=P(),
    )
    got = np.asarray(sharded(h, w))
    assert np.isnan(got[1]) and np.isnan(got[4])
    keep = np.isfinite(got)
    _close(got[keep], np.asarray(jsoftmax.fused_linear_cross_entropy(h, w, y))[keep])


def test_fused_replicated_weight_is_an_error(mesh2d, fused_inputs):
    h, w, y = fused_inputs["h"], fused_inputs["w"], fused_inputs["labels"]
    sharded = jax.shard_map(
        lambda h, w, y: jsoftmax.fused_linear_cross_entropy(h, w, y, axis_name="v"),
        mesh=mesh2d, in_specs=(P("data"), P(), P("data")), out_specs=P("data"),
    )
    with pytest.raises(ValueError, match="does not vary over that mesh axis"):
        sharded(h, w, y)


def test_fused_gradient_without_vma_is_an_error(mesh, fused_inputs):
    h, w, y = fused_inputs["h"], fused_inputs["w"], fused_inputs["labels"]
    sharded = jax.shard_map(
        lambda h, w: jsoftmax.fused_linear_cross_entropy(h, w, y, axis_name="v"),
        mesh=mesh, in_specs=(P(), P(None, "v")), out_specs=P(), check_vma=False,
    )
    # The forward pass is right without the types...
    _close(sharded(h, w), jsoftmax.fused_linear_cross_entropy(h, w, y))
    # ...but the gradient would not be, so it is refused.
    with pytest.raises(ValueError, match="check_vma=True"):
        jax.grad(lambda w: sharded(h, w).sum())(w)


# --------------------------------------------------------------------------
# The cross-entropies.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.7, "label_smoothing": 0.1}, {"temperature": 0.0},
     {"temperature": np.inf, "label_smoothing": 0.2}],
    ids=["plain", "tempered_smoothed", "hard_max", "uniform_smoothed"],
)
def test_integer_cross_entropy_matches_unsharded(mesh, inputs, options):
    x, m = inputs["x"], inputs["mask"]
    labels = np.array([0, 5, 9, 2, 6, 15], np.int32)  # on every shard; masked, -inf, kept
    labels_oob = labels.copy()
    labels_oob[5] = V  # out of range on every shard: NaN

    def loss(x, y, m, axis_name=None):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, y, where=m, axis_name=axis_name, **options
        )

    sharded = jax.jit(jax.shard_map(
        lambda x, y, m: loss(x, y, m, "v"), mesh=mesh,
        in_specs=(P(None, "v"), P(), P(None, "v")), out_specs=P(),
    ))
    for y in (labels, labels_oob):
        expected, vjp = jax.vjp(lambda x, y=y: loss(x, y, m), x)
        cotangent = np.where(np.isfinite(expected), 1.0, 0.0).astype(np.float32)
        got, vjp2 = jax.vjp(lambda x, y=y: sharded(x, y, m), x)
        _close(got, expected)
        _close(vjp2(cotangent)[0], vjp(cotangent)[0])


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_cross_entropy_matches_unsharded(mesh, inputs, smoothing, masked):
    x, t = inputs["x"], inputs["t"]
    m = inputs["mask"] if masked else np.ones((B, V), bool)
    labels = np.abs(inputs["b"]) / np.abs(inputs["b"]).sum(axis=1, keepdims=True)

    def loss(x, y, t, m, axis_name=None):
        return jsoftmax.softmax_cross_entropy(
            x, y, where=m if masked else None, temperature=t, label_smoothing=smoothing,
            axis_name=axis_name,
        )

    vocab = P(None, "v")
    sharded = jax.jit(jax.shard_map(
        lambda x, y, t, m: loss(x, y, t, m, "v"), mesh=mesh,
        in_specs=(vocab, vocab, P(), vocab), out_specs=P(),
    ))
    expected, vjp = jax.vjp(lambda x, y, t: loss(x, y, t, m), x, labels, t)
    cotangent = np.where(np.isfinite(expected), 1.0, 0.0).astype(np.float32)
    got, vjp2 = jax.vjp(lambda x, y, t: sharded(x, y, t, m), x, labels, t)
    _close(got, expected)
    for actual, want in zip(vjp2(cotangent), vjp(cotangent), strict=True):
        _close(actual, want)


def test_integer_cross_entropy_needs_one_class_axis():
    with pytest.raises(ValueError, match="one axis"):
        jsoftmax.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3, 4)), jnp.zeros(2, jnp.int32), axis=(1, 2), axis_name="v"
        )


def test_readme_shard_map_example():
    """The README's vocab-parallel example runs and agrees with the unsharded loss."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Vocab-parallel softmax and losses", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"jax": jax, "jnp": jnp, "jsoftmax": jsoftmax}
    exec(code, namespace)
    hidden, weight, labels = (namespace[k] for k in ("hidden", "weight", "labels"))
    expected, (dh, dw) = jax.value_and_grad(
        lambda h, w: jsoftmax.fused_linear_cross_entropy(h, w, labels).mean(), (0, 1)
    )(hidden, weight)
    _close(namespace["loss"], expected)
    _close(namespace["d_hidden"], dh)
    _close(namespace["d_weight"], dw)
    _close(namespace["probs"], jsoftmax.softmax(hidden @ weight))
