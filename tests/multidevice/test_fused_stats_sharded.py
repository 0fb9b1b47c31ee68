"""Vocab-parallel statistics of the fused loss on 4 CPU devices: the
logsumexp, entropy and argmax of a sharded call, and the gradients of the
first two, equal the unsharded call's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoftmax

pytestmark = pytest.mark.skipif(jax.device_count() != 4, reason="needs 4 devices")

N, D, V = 8, 5, 28  # 7 vocabulary columns per shard: chunks of 3 leave 1


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()), ("v",))


@pytest.mark.parametrize("chunk_size", [3, None])
def test_fused_stats_match_unsharded(mesh, chunk_size):
    rng = np.random.default_rng(8)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (1.5 * rng.normal(size=(D, V))).astype(np.float32)
    bias = rng.normal(size=V).astype(np.float32)
    labels = rng.integers(0, V, size=N).astype(np.int32)
    labels[5] = V  # out of range: NaN loss, defined statistics
    where = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    t = np.linspace(0.7, 1.4, N).astype(np.float32)
    cots = tuple(rng.normal(size=(3, N)).astype(np.float32))

    def f(h, w, b, t, cap, axis_name=None):
        loss, stats = jsoftmax.fused_linear_cross_entropy(
            h, w, labels, where=where, bias=b, temperature=t, logit_soft_cap=cap,
            label_smoothing=0.1, chunk_size=chunk_size, axis_name=axis_name,
            return_stats=True,
        )
        return (loss, stats.logsumexp, stats.entropy), stats.argmax

    args = (h, w, bias, t, jnp.float32(2.5))
    expected, vjp, argmax = jax.vjp(f, *args, has_aux=True)
    sharded = jax.jit(jax.shard_map(
        lambda *a: f(*a, axis_name="v"), mesh=mesh,
        in_specs=(P(), P(None, "v"), P("v"), P(), P()), out_specs=P(),
    ))
    got, vjp2, argmax2 = jax.vjp(sharded, *args, has_aux=True)
    for actual, want in zip(got, expected, strict=True):
        _close(actual, want)
    np.testing.assert_array_equal(argmax2, argmax)
    assert np.all(np.asarray(argmax2)[~where] == -1)
    cots = (np.where(np.arange(N) == 5, 0.0, cots[0]).astype(np.float32), *cots[1:])
    for actual, want in zip(vjp2(cots), vjp(cots), strict=True):
        _close(actual, want)


def test_fused_stats_argmax_tie_across_shards(mesh):
    """Equal maxima on shards 1 and 3 (and twice on shard 3): the lowest
    global index wins; a row whose maximum is on the last shard only gets it."""
    w = np.zeros((2, V), np.float32)
    w[0, [9, 22, 25]] = 3.0
    w[1, 27] = 1.0
    h = np.eye(2, dtype=np.float32)
    labels = np.zeros(2, np.int32)
    sharded = jax.shard_map(
        lambda h, w: jsoftmax.fused_linear_cross_entropy(
            h, w, labels, axis_name="v", chunk_size=3, return_stats=True)[1].argmax,
        mesh=mesh, in_specs=(P(), P(None, "v")), out_specs=P(),
    )
    np.testing.assert_array_equal(sharded(h, w), [9, 27])
