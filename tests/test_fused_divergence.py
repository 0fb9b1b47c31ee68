"""Tests for fused_linear_kl_divergence against a float64 NumPy reference on
materialised logits, with gradients derived by hand, and against the
library's unfused kl_divergence.

Reference, per example: y = cap tanh((h w + b) / cap) / t for both sides,
p = softmax(y_teacher), q = softmax(y_student), KL = sum p (log p - log q)
(0 where p = 0, +inf where p > 0 = q); d KL / d y_s = q - p and
d KL / d y_t = p (log p - log q - KL), zero where KL is +inf; then through
the temperature (d y / d t = -y / t) and the cap as for the fused loss.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import fused_linear_kl_divergence

N, D, DT, V = 6, 5, 7, 11  # V is prime: chunks of 3 and 4 leave a remainder
MASK = np.array([True, True, False, True, True, True])


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "h": rng.normal(size=(N, D)).astype(np.float32),
        "w": (1.5 * rng.normal(size=(D, V))).astype(np.float32),
        "b": rng.normal(size=V).astype(np.float32),
        "ht": rng.normal(size=(N, DT)).astype(np.float32),
        "wt": (1.5 * rng.normal(size=(DT, V))).astype(np.float32),
        "bt": rng.normal(size=V).astype(np.float32),
        "weights": rng.uniform(0.2, 2.0, size=N).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, size=N).astype(np.float32),
    }


def _side(h, w, b, cap, t):
    """Raw logits, capped logits and the scaled y, float64."""
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        z = z + np.asarray(b, np.float64)
    capped = cap * np.tanh(z / cap) if cap else z
    return z, capped / t


def _log_softmax(y):
    top = np.max(y, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return y - top - np.log(np.sum(np.exp(y - top), axis=1, keepdims=True))


def reference(h, w, ht, wt, g=None, *, b=None, bt=None, cap=None, t=1.0, mask=None,
              weights=None, reduction="none"):
    """(value, grads) of the fused divergence and of sum(g * value), float64."""
    n = np.shape(h)[0]
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    t_col = np.broadcast_to(np.asarray(t, np.float64), (n,))[:, None]
    wts = np.broadcast_to(np.asarray(1.0 if weights is None else weights, np.float64), (n,))
    z_s, y_s = _side(h, w, b, cap, t_col)
    z_t, y_t = _side(ht, wt, bt, cap, t_col)
    log_p, log_q = _log_softmax(y_t), _log_softmax(y_s)
    p, q = np.exp(log_p), np.exp(log_q)
    inc = p > 0
    with np.errstate(invalid="ignore"):
        terms = np.where(inc, p * (np.where(inc, log_p, 0) - log_q), 0.0)
    kl = np.where(np.any(inc & (q == 0), axis=1), np.inf, terms.sum(axis=1))
    kl = np.where(keep, kl, 0.0)
    weighted = wts * kl
    if reduction == "none":
        value, cot = weighted, (np.ones(n) if g is None else np.asarray(g, np.float64))
    else:
        g = 1.0 if g is None else float(g)
        count = (wts * keep).sum() if reduction == "mean" else 1.0
        value = weighted.sum() / count
        cot = np.full(n, g / count)
    cot = np.where(keep & np.isfinite(kl), cot * wts, 0.0)[:, None]
    finite_kl = np.where(np.isfinite(kl), kl, 0.0)[:, None]
    dy_s = cot * (q - p)
    with np.errstate(invalid="ignore"):
        dy_t = np.where(inc, cot * p * (np.where(inc, log_p, 0)
                                        - np.where(inc, log_q, 0) - finite_kl), 0.0)
    grads, d_t, d_cap = {}, 0.0, 0.0
    for name, dy, z, y, (hh, ww) in (("", dy_s, z_s, y_s, (h, w)),
                                     ("teacher_", dy_t, z_t, y_t, (ht, wt))):
        d_capped = dy / t_col
        d_t = d_t - (dy * np.where(np.isfinite(y), y, 0.0)).sum(axis=1) / t_col[:, 0]
        if cap:
            u = np.tanh(z / cap)
            d_z = d_capped * (1 - u**2)
            d_cap += (d_capped * (u - z / cap * (1 - u**2))).sum()
        else:
            d_z = d_capped
        hh = np.where(keep[:, None], np.asarray(hh, np.float64), 0.0)
        grads[name + "hidden"] = d_z @ np.asarray(ww, np.float64).T
        grads[name + "weight"] = hh.T @ d_z
        grads[name + "bias"] = d_z.sum(axis=0)
    grads["temperature"], grads["cap"] = d_t, d_cap
    return value, grads


NAMES = ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias",
         "temperature", "cap")


@partial(jax.jit, static_argnums=(0, 1, 2))
def _vjp(chunk_size, reduction, masked, args, weights, cot):
    def f(h, w, b, ht, wt, bt, t, cap):
        return fused_linear_kl_divergence(
            h, w, ht, wt, bias=b, teacher_bias=bt, temperature=t, logit_soft_cap=cap,
            where=MASK if masked else None, weights=weights, reduction=reduction,
            chunk_size=chunk_size,
        )

    value, vjp = jax.vjp(f, *args)
    return value, vjp(cot)


CASES = {
    # chunk_size, reduction, masked, per-example temperature, cap
    "plain": (4, "none", False, False, None),
    "everything": (3, "mean", True, True, 2.5),
    "default_chunk": (None, "sum", True, False, 30.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients(data, case):
    chunk_size, reduction, masked, per_example, cap = CASES[case]
    t = np.linspace(0.6, 1.7, N).astype(np.float32) if per_example else np.float32(0.8)
    args = (data["h"], data["w"], data["b"], data["ht"], data["wt"], data["bt"], t,
            np.float32(cap or 0.0))
    cot = np.float32(1.3) if reduction != "none" else data["g"]
    value, grads = _vjp(chunk_size, reduction, masked, args, data["weights"], cot)
    ref, want = reference(data["h"], data["w"], data["ht"], data["wt"], cot, b=data["b"],
                          bt=data["bt"], cap=cap, t=t, mask=MASK if masked else None,
                          weights=data["weights"], reduction=reduction)
    np.testing.assert_allclose(value, ref, rtol=2e-5, atol=2e-6)
    if not per_example:
        want["temperature"] = want["temperature"].sum()
    for name, actual in zip(NAMES, grads, strict=True):
        np.testing.assert_allclose(actual, want[name], rtol=2e-4, atol=2e-5, err_msg=name)
    if masked:
        assert not np.any(np.asarray(grads[0])[~MASK]) and not np.any(np.asarray(grads[3])[~MASK])


def test_equals_the_unfused_kl_divergence(data):
    """The library's kl_divergence on the materialised logits, by autodiff:
    values and the gradients of every argument, the teacher's included."""

    def fused(h, w, b, ht, wt, bt, t):
        return fused_linear_kl_divergence(h, w, ht, wt, bias=b, teacher_bias=bt,
                                          temperature=t, logit_soft_cap=4.0, chunk_size=4)

    def unfused(h, w, b, ht, wt, bt, t):
        cap = lambda z: 4.0 * jnp.tanh(z / 4.0)
        return jsoftmax.kl_divergence(cap(ht @ wt + bt), cap(h @ w + b),
                                      temperature=t[:, None])

    args = (data["h"], data["w"], data["b"], data["ht"], data["wt"], data["bt"],
            np.linspace(0.5, 2.0, N).astype(np.float32))
    got, vjp = jax.vjp(fused, *args)
    want, vjp_ref = jax.vjp(unfused, *args)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for name, a, b in zip(NAMES[:7], vjp(data["g"]), vjp_ref(data["g"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=name)


def test_edges_of_kl_divergence(data):
    """A class the teacher excludes adds 0 whatever the student gives it (even
    -inf, or a huge logit); a class only the student excludes gives +inf with
    zero gradients; a teacher with nothing included gives 0. The gradients
    are finite everywhere."""
    h, w, ht, wt = data["h"], data["w"], data["ht"], data["wt"]
    bt = np.zeros(V, np.float32)
    bt[[2, 7]] = -np.inf
    b = np.zeros(V, np.float32)
    b[7] = -np.inf  # excluded in both: 0
    b[2] = 50.0  # a huge logit where the teacher has none: finite
    f = lambda h, w, ht, wt, b, bt: fused_linear_kl_divergence(
        h, w, ht, wt, bias=b, teacher_bias=bt, chunk_size=3, temperature=0.9)
    got, grads = jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1, 2, 3))(h, w, ht, wt, b, bt)
    ref, want = reference(h, w, ht, wt, b=b, bt=bt, t=0.9)
    np.testing.assert_allclose(got, ref.sum(), rtol=2e-5)
    for actual, name in zip(grads, NAMES[:2] + NAMES[3:5], strict=True):
        assert np.isfinite(actual).all(), name
        np.testing.assert_allclose(actual, want[name], rtol=2e-4, atol=2e-5, err_msg=name)
    # The student excludes a class the teacher includes: +inf, zero gradients.
    b_inf = np.zeros(V, np.float32)
    b_inf[4] = -np.inf
    kl = f(h, w, ht, wt, b_inf, bt)
    assert np.all(np.isinf(kl)) and np.all(kl > 0)
    grads = jax.grad(lambda *a: f(*a).sum(), (0, 1, 2, 3))(h, w, ht, wt, b_inf, bt)
    assert all(not np.any(np.asarray(x)) for x in grads)
    # Nothing included in the teacher: 0 with zero gradients.
    nothing = np.full(V, -np.inf, np.float32)
    kl, grads = jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1))(h, w, ht, wt, b, nothing)
    assert kl == 0 and not np.any(grads[0]) and not np.any(grads[1])


def test_excluded_examples_and_nan_rows(data):
    h, ht = data["h"].copy(), data["ht"].copy()
    h[2], ht[2] = np.nan, np.inf  # an excluded row's garbage must not leak
    f = lambda h, w, ht: fused_linear_kl_divergence(
        h, w, ht, data["wt"], where=MASK, chunk_size=4)
    got, grads = jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1, 2))(h, data["w"], ht)
    ref, want = reference(np.nan_to_num(h), data["w"], np.nan_to_num(ht, posinf=0.0),
                          data["wt"], mask=MASK)
    np.testing.assert_allclose(got, ref.sum(), rtol=2e-5)
    assert f(h, data["w"], ht)[2] == 0
    for actual, name in zip(grads, ("hidden", "weight", "teacher_hidden"), strict=True):
        np.testing.assert_allclose(actual, want[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_distillation_skips_the_teacher_gradient(data):
    """Under stop_gradient the teacher's gradient matmuls are not traced at
    all, and the student's gradients are those with the teacher's computed."""

    def loss(h, w, ht, wt):
        return fused_linear_kl_divergence(h, w, ht, wt, chunk_size=4).sum()

    def distill(h, w, ht, wt):
        return loss(h, w, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(wt))

    args = (data["h"], data["w"], data["ht"], data["wt"])
    student = jax.make_jaxpr(jax.grad(distill, (0, 1)))(*args)
    both = jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(*args)
    # Each pass runs its matmuls in the loop and in the remainder: forward 2
    # + 2, backward (recompute 2, student 2, teacher 2) twice.
    assert str(student).count("dot_general") == 4 + 8
    assert str(both).count("dot_general") == 4 + 12
    got = jax.grad(distill, (0, 1))(*args)
    want = jax.grad(loss, (0, 1, 2, 3))(*args)[:2]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_check_grads_float64(x64):
    rng = np.random.default_rng(3)
    bt = rng.normal(size=7)
    bt[5] = -np.inf  # an excluded class, held fixed
    mask = np.array([True, True, False, True])

    def f(h, w, ht, wt, b, t, cap, weights):
        kl = fused_linear_kl_divergence(
            h, w, ht, wt, bias=b, teacher_bias=bt, temperature=t, logit_soft_cap=cap,
            where=mask, weights=weights, chunk_size=3)
        return jnp.sum(kl * jnp.array([1.0, 0.5, 2.0, -1.0]))

    args = (rng.normal(size=(4, 3)), 2 * rng.normal(size=(3, 7)), rng.normal(size=(4, 2)),
            2 * rng.normal(size=(2, 7)), rng.normal(size=7), rng.uniform(0.5, 2, 4), 2.0,
            rng.uniform(0.5, 2, 4))
    check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    # The teacher's bias too, where it is finite.
    g = lambda bt: fused_linear_kl_divergence(
        args[0], args[1], args[2], args[3], teacher_bias=bt, chunk_size=3).sum()
    check_grads(g, (rng.normal(size=7),), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_bfloat16_accumulates_in_float32(data):
    rng = np.random.default_rng(1)
    v = 700
    w = rng.normal(size=(D, v)) * D**-0.5
    wt = rng.normal(size=(DT, v)) * DT**-0.5
    lo = [jnp.asarray(x, jnp.bfloat16) for x in (data["h"], w, data["ht"], wt)]
    value, grads = jax.value_and_grad(
        lambda h, w: fused_linear_kl_divergence(h, w, lo[2], lo[3], chunk_size=256).astype(
            jnp.float32).sum(), (0, 1))(lo[0], lo[1])
    per_example = fused_linear_kl_divergence(*lo, chunk_size=256)
    assert per_example.dtype == jnp.bfloat16 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
    ref, want = reference(*(np.asarray(x, np.float64) for x in lo))
    np.testing.assert_allclose(np.asarray(per_example, np.float64), ref, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(float(value), ref.sum(), rtol=1e-2)
    for got, name in zip(grads, ("hidden", "weight"), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want[name], rtol=3e-2,
                                   atol=3e-2 * np.abs(want[name]).max(), err_msg=name)


def test_batch_axes_and_reductions(data):
    args = (data["h"], data["w"], data["ht"], data["wt"])
    per_example = fused_linear_kl_divergence(*args, chunk_size=4)
    batched = fused_linear_kl_divergence(
        data["h"].reshape(2, 3, D), data["w"], data["ht"].reshape(2, 3, DT), data["wt"],
        chunk_size=4)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched.reshape(N), per_example, rtol=1e-6)
    ref, _ = reference(*args, weights=data["weights"], mask=MASK, reduction="mean")
    got = fused_linear_kl_divergence(*args, weights=data["weights"], where=MASK,
                                     reduction="mean")
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert fused_linear_kl_divergence(*args, where=np.zeros(N, bool), reduction="mean") == 0


def test_traced_invalid_temperature_is_nan(data):
    args = (data["h"], data["w"], data["ht"], data["wt"])
    kl = jax.jit(lambda t: fused_linear_kl_divergence(*args, temperature=t))(0.0)
    assert np.all(np.isnan(kl))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"teacher_hidden": np.zeros((N + 1, DT))}, ValueError, "the same batch shape"),
        ({"teacher_weight": np.zeros((DT, V + 1))}, ValueError, "share the vocabulary"),
        ({"teacher_weight": np.zeros((DT + 1, V))}, ValueError, "teacher_hidden's last axis"),
        ({"teacher_bias": np.zeros(V + 1)}, ValueError, "teacher_bias has shape"),
        ({"teacher_hidden": np.zeros((N, DT), np.complex64)}, TypeError, "teacher_hidden"),
        ({"temperature": 0.0}, ValueError, "finite and > 0"),
        ({"logit_soft_cap": -1.0}, ValueError, "logit_soft_cap"),
        ({"chunk_size": 0}, ValueError, "positive"),
        ({"where": np.ones(N + 1, bool)}, ValueError, "does not broadcast"),
        ({"where": np.ones((N, V), bool)}, ValueError, "one per example"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ],
)
def test_errors(data, kwargs, error, match):
    args = {"hidden": data["h"], "weight": data["w"], "teacher_hidden": data["ht"],
            "teacher_weight": data["wt"], **kwargs}
    with pytest.raises(error, match=match):
        fused_linear_kl_divergence(args.pop("hidden"), args.pop("weight"),
                                   args.pop("teacher_hidden"), args.pop("teacher_weight"),
                                   **args)


def test_exported_at_top_level():
    import jsoftmax.fused_divergence

    assert jsoftmax.fused_linear_kl_divergence is (
        jsoftmax.fused_divergence.fused_linear_kl_divergence)
    assert "fused_linear_kl_divergence" in jsoftmax.__all__


def _distill_temp_bytes(n, d, dt, v, dtype, kl_fn):
    """Temporaries of jit(value_and_grad(mean KL)) in the student's hidden and
    weight, the teacher under stop_gradient, from shapes only."""
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v), (n, dt), (dt, v))]
    sg = jax.lax.stop_gradient
    step = jax.jit(jax.value_and_grad(
        lambda h, w, ht, wt: kl_fn(h, w, sg(ht), sg(wt)).mean(), (0, 1)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def _unfused(h, w, ht, wt):
    return jsoftmax.kl_divergence(ht @ wt, h @ w)


@pytest.mark.codegen
@pytest.mark.parametrize(
    ("n", "d", "dt", "v", "dtype"),
    [(4096, 512, 768, 32768, jnp.float32), (8192, 4096, 4096, 128256, jnp.bfloat16)],
)
def test_memory_is_a_thirtieth_of_the_unfused_formula(n, d, dt, v, dtype):
    fused = _distill_temp_bytes(n, d, dt, v, dtype, fused_linear_kl_divergence)
    unfused = _distill_temp_bytes(n, d, dt, v, dtype, _unfused)
    assert unfused >= 2 * n * v * jnp.dtype(dtype).itemsize
    assert fused * 30 <= unfused, (fused, unfused)


@pytest.mark.codegen
def test_memory_against_optax():
    """optax's formula on the logits (softmax_cross_entropy with the teacher's
    probabilities, minus the teacher's entropy) keeps more still."""
    n, d, dt, v = 1024, 64, 96, 8192

    def optax_kl(h, w, ht, wt):
        p = jax.nn.softmax(ht @ wt)
        return optax.losses.softmax_cross_entropy(h @ w, p) - jsoftmax.entropy(ht @ wt)

    fused = _distill_temp_bytes(n, d, dt, v, jnp.float32, fused_linear_kl_divergence)
    assert fused * 8 <= _distill_temp_bytes(n, d, dt, v, jnp.float32, optax_kl)
