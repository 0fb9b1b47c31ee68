"""Vocab-parallel fused KL divergence on 4 CPU devices: both weights (and
biases) sharded over the vocabulary give the unsharded call's values and
gradients, the teacher's included, with a class excluded on one shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoftmax

pytestmark = pytest.mark.skipif(jax.device_count() != 4, reason="needs 4 devices")

N, D, DT, V = 8, 5, 3, 28  # 7 vocabulary columns per shard: chunks of 3 leave 1


def _close(actual, expected):
    # The hidden states' gradients sum V terms of size 1 that nearly cancel:
    # the order of the shards' sums moves them by a few float32 ulps of 1.
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=5e-6, equal_nan=True)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(9)
    bt = rng.normal(size=V).astype(np.float32)
    bt[[3, 4, 5, 6]] = -np.inf  # the teacher excludes most of shard 0
    return (
        rng.normal(size=(N, D)).astype(np.float32),
        (1.5 * rng.normal(size=(D, V))).astype(np.float32),
        rng.normal(size=V).astype(np.float32),
        rng.normal(size=(N, DT)).astype(np.float32),
        (1.5 * rng.normal(size=(DT, V))).astype(np.float32),
        bt,
        np.linspace(0.7, 1.4, N).astype(np.float32),
    )


@pytest.mark.parametrize(("chunk_size", "reduction"), [(3, "none"), (None, "mean")])
def test_fused_kl_matches_unsharded(inputs, chunk_size, reduction):
    mesh = Mesh(np.array(jax.devices()), ("v",))
    where = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    weights = np.linspace(0.5, 2.0, N).astype(np.float32)

    def f(h, w, b, ht, wt, bt, t, axis_name=None):
        return jsoftmax.fused_linear_kl_divergence(
            h, w, ht, wt, bias=b, teacher_bias=bt, temperature=t, where=where,
            weights=weights, reduction=reduction, chunk_size=chunk_size, axis_name=axis_name,
        )

    expected, vjp = jax.vjp(f, *inputs)
    vocab = P(None, "v")
    sharded = jax.jit(jax.shard_map(
        lambda *a: f(*a, axis_name="v"), mesh=mesh,
        in_specs=(P(), vocab, P("v"), P(), vocab, P("v"), P()), out_specs=P(),
    ))
    got, vjp2 = jax.vjp(sharded, *inputs)
    _close(got, expected)
    cot = np.linspace(0.5, 1.5, N).astype(np.float32) if reduction == "none" else jnp.float32(1.3)
    for actual, want in zip(vjp2(cot), vjp(cot), strict=True):
        _close(actual, want)


def test_fused_kl_data_and_vocab_parallel_with_a_frozen_teacher(inputs):
    """Batch over one mesh axis, vocabulary over the other, the teacher under
    stop_gradient and capped logits."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "v"))
    h, w, b, ht, wt, _, t = inputs

    def f(h, w, b, ht, wt, t, axis_name=None):
        sg = jax.lax.stop_gradient
        return jsoftmax.fused_linear_kl_divergence(
            h, w, sg(ht), sg(wt), bias=b, temperature=t, logit_soft_cap=3.0, chunk_size=3,
            axis_name=axis_name,
        )

    args = (h, w, b, ht, wt, t)
    expected, vjp = jax.vjp(f, *args)
    rows, vocab = P("data"), P(None, "v")
    sharded = jax.shard_map(
        lambda *a: f(*a, axis_name="v"), mesh=mesh,
        in_specs=(rows, vocab, P("v"), rows, vocab, rows), out_specs=rows,
    )
    got, vjp2 = jax.vjp(sharded, *args)
    _close(got, expected)
    cot = np.linspace(0.5, 1.5, N).astype(np.float32)
    for actual, want in zip(vjp2(cot), vjp(cot), strict=True):
        _close(actual, want)


def test_fused_kl_replicated_teacher_weight_is_an_error(inputs):
    mesh = Mesh(np.array(jax.devices()), ("v",))
    h, w, _, ht, wt, _, _ = inputs
    sharded = jax.shard_map(
        lambda h, w, ht, wt: jsoftmax.fused_linear_kl_divergence(h, w, ht, wt, axis_name="v"),
        mesh=mesh, in_specs=(P(), P(None, "v"), P(), P()), out_specs=P(),
    )
    # One shard's worth of columns, the same on every shard.
    with pytest.raises(ValueError, match="teacher_weight does not vary over that mesh axis"):
        sharded(h, w, ht, wt[:, : V // 4])
