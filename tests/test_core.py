"""Tests for softmax, log_softmax and logsumexp (the edge contract).

References are float64 NumPy or mpmath, never the functions under test.
"""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import jsoftmax

INF = np.inf
FUNCS = [jsoftmax.softmax, jsoftmax.log_softmax]
EPS32 = float(np.finfo(np.float32).eps)


def maybe_jit(fn, use_jit, **static):
    g = lambda x: fn(x, **static)
    return jax.jit(g) if use_jit else g


# ---------------------------------------------------------------- 1. max shift


@pytest.mark.parametrize("use_jit", [False, True])
def test_max_shift_article_example(use_jit):
    x = jnp.array([10.0, 2.0, 10000.0, 4.0])
    np.testing.assert_array_equal(maybe_jit(jsoftmax.softmax, use_jit)(x), [0, 0, 1, 0])
    np.testing.assert_array_equal(
        maybe_jit(jsoftmax.log_softmax, use_jit)(x), [-9990, -9998, 0, -9996]
    )
    assert float(maybe_jit(jsoftmax.logsumexp, use_jit)(x)) == 10000.0


@pytest.fixture(scope="module")
def accuracy_batches():
    rng = np.random.default_rng(1234)
    out = {}
    for scale in [1.0, 30.0, 1e4, 1e30]:
        x = (rng.standard_normal((6, 48)) * scale).astype(np.float32)
        refs = [ref.mp_row(row) for row in x]
        out[scale] = (x, refs)
    return out


@pytest.mark.codegen
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4, 1e30])
def test_float32_accuracy_against_mpmath(accuracy_batches, scale):
    """Within 4 eps: softmax in absolute terms (its values lie in [0, 1] and its
    relative error is limited by the rounding of x - max, cond ~ |x| eps), and
    log_softmax and logsumexp relative to the reference."""
    x, refs = accuracy_batches[scale]
    s = np.asarray(jsoftmax.softmax(x), np.float64)
    ls = np.asarray(jsoftmax.log_softmax(x), np.float64)
    lse = np.asarray(jsoftmax.logsumexp(x, axis=-1), np.float64)
    for i, (rs, rl, rlse) in enumerate(refs):
        assert np.max(np.abs(s[i] - rs)) <= 4 * EPS32
        # The contract: 4 eps max(1, |value|) (jax.nn's single sum; the top
        # entry of a confident row is accurate in absolute terms).
        err = np.abs(ls[i] - rl) / np.maximum(1.0, np.abs(rl))
        assert np.max(err) <= 4 * EPS32, np.max(err) / EPS32
        assert abs(lse[i] - rlse) <= 4 * EPS32 * abs(rlse)


def test_top_entry_of_log_softmax_keeps_tiny_values_in_float64():
    # The largest entry is -log1p(sum of the rest); with the rest ~1e-17 a plain
    # log(1 + rest) would round to 0. float64 splits the normaliser at the max.
    with jax.enable_x64(True):
        x = np.array([40.0, 0.0, 1.0], np.float64)
        _, rl, _ = ref.mp_row(x)
        got = float(jsoftmax.log_softmax(x)[0])
    assert got != 0.0
    assert abs(got - rl[0]) <= 2 * np.finfo(np.float64).eps * abs(rl[0])


# ---------------------------------------------------------------- 2-3. dtypes


@pytest.mark.codegen
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("fn", FUNCS)
def test_low_precision_is_float32_rounded(dtype, fn):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 33)) * 4, dtype)
    got = fn(x)
    assert got.dtype == dtype
    ref_fn = ref.softmax if fn is jsoftmax.softmax else ref.log_softmax
    want = ref_fn(np.asarray(x.astype(jnp.float32)))
    ref_rounded = np.asarray(jnp.asarray(want, jnp.float32).astype(dtype), np.float64)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    # Within one ulp of the float64 reference rounded to the dtype.
    ulp = np.spacing(np.abs(ref_rounded).astype(np.float32)) * 2.0 ** (23 - jnp.finfo(dtype).nmant)
    assert np.all(np.abs(got - ref_rounded) <= ulp)


@pytest.mark.codegen
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("general", [False, True], ids=["fast", "masked"])
def test_low_precision_logsumexp_and_gradients(dtype, general):
    # Low-precision inputs reach the computations as they are (the max is
    # taken before upcasting); results are still the float32 results
    # rounded once, and gradients come back in the input dtype.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 33)) * 4, dtype)
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    where = np.ones(x.shape, bool)
    where[:, ::3] = False
    kw = {"where": jnp.asarray(where), "temperature": 0.5} if general else {}
    z = np.where(where, x32, -INF) / 0.5 if general else x32
    t = 0.5 if general else 1.0
    got = jsoftmax.logsumexp(x, axis=-1, **kw)
    assert got.dtype == dtype
    want = t * ref.logsumexp(z, axis=-1)
    ulp = np.spacing(np.abs(want).astype(np.float32)) * 2.0 ** (23 - jnp.finfo(dtype).nmant)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= ulp)
    w = rng.standard_normal(4)
    g = jax.grad(lambda x: jnp.sum(jsoftmax.logsumexp(x, axis=-1, **kw) * w))(x)
    assert g.dtype == dtype
    p = ref.softmax(z)
    np.testing.assert_allclose(np.asarray(g, np.float64), p * w[:, None], rtol=2e-2, atol=1e-3)
    for fn in FUNCS:
        gs = jax.grad(lambda x: jnp.sum(fn(x, **kw).astype(jnp.float32)[:, 0]))(x)  # noqa: B023
        assert gs.dtype == dtype and bool(jnp.all(jnp.isfinite(gs)))


@pytest.mark.codegen
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("general", [False, True], ids=["fast", "tempered_masked"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_low_precision_gradients_are_rounded_once(dtype, general, name):
    # The gradient is computed in float32 and rounded once to the input dtype:
    # within 1 ulp of the float64 gradient (a tangent used several times in
    # float32 once rounded each use separately: up to 2000 ulp). Rows of 2048
    # also exercise XLA:CPU's fused kernels.
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 2048)) * 3, dtype)
    # The cotangent of a low-precision output is itself rounded to its dtype.
    w = np.asarray(jnp.asarray(rng.standard_normal((4, 2048)), dtype).astype(jnp.float32))
    where = np.ones(x.shape, bool)
    t = 1.0
    kw = {}
    if general:
        where[:, ::3] = False
        t = 0.5
        kw = {"where": jnp.asarray(where), "temperature": t}
    fn = getattr(jsoftmax, name)
    if name == "logsumexp":
        w = w[:, 0]

        def loss(x):
            return jnp.sum(fn(x, axis=-1, **kw).astype(jnp.float32) * w)
    else:

        def loss(x):
            out = fn(x, **kw).astype(jnp.float32)
            return jnp.sum(jnp.where(jnp.asarray(where), out, 0.0) * w)

    got = np.asarray(jax.grad(loss)(x).astype(jnp.float32), np.float64)
    p = ref.softmax(np.asarray(x.astype(jnp.float32)), where=where, t=t)
    if name == "softmax":
        want = p * (w - np.sum(p * w, -1, keepdims=True)) / t
    elif name == "log_softmax":
        wk = np.where(where, w, 0.0)
        want = np.where(where, wk - p * wk.sum(-1, keepdims=True), 0.0) / t
    else:
        want = p * w[:, None]
    rounded = np.asarray(jnp.asarray(want, jnp.float32).astype(dtype).astype(jnp.float32))
    ulp = np.spacing(np.abs(rounded)) * 2.0 ** (23 - jnp.finfo(dtype).nmant)
    slack = 8 * EPS32 * np.max(np.abs(want))  # float32's own error before rounding
    assert np.all(np.abs(got - want) <= ulp + slack)


@pytest.mark.codegen
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_logsumexp_keeps_no_input_sized_temporary(dtype):
    # The max is taken in the input dtype and the value needs no stored
    # logits, so XLA reads the input in each pass: no float32 copy of a
    # bfloat16 input (16 MiB here), nothing input-sized for float32.
    rows = 4096
    x = jax.ShapeDtypeStruct((rows, 1024), dtype)

    def temp(f):
        return jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes

    ours = temp(lambda x: jsoftmax.logsumexp(x, axis=-1))
    assert ours < rows * 1024 * 4 // 100
    if jax.default_backend() == "cpu":  # measured on XLA:CPU, where CI runs
        # A margin of two per-row vectors (the shift and the sign).
        assert ours <= temp(lambda x: jax.nn.logsumexp(x, axis=-1)) + 2 * rows * 4


@pytest.mark.codegen
def test_logsumexp_learned_temperature_keeps_no_input_sized_temporary():
    # d lse / dt is the entropy of the softmax: its sums come from one pass,
    # so differentiating in t keeps what differentiating in x keeps, up to a
    # few per-row vectors.
    rows, cols = 512, 8192
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    t = jax.ShapeDtypeStruct((rows,), jnp.float32)

    def temp(argnums):
        f = jax.grad(lambda x, t: jnp.sum(jsoftmax.logsumexp(x, axis=-1, temperature=t)), argnums)
        return jax.jit(f).lower(x, t).compile().memory_analysis().temp_size_in_bytes

    x_only = temp(0)
    assert x_only < rows * cols * 4 // 100
    for argnums in (1, (0, 1)):
        assert temp(argnums) <= x_only + 8 * rows * 4, argnums


@pytest.mark.codegen
@pytest.mark.parametrize("fn", [jsoftmax.softmax, jsoftmax.log_softmax], ids=lambda f: f.__name__)
def test_gradient_keeps_one_input_sized_temporary(fn):
    # Reverse mode keeps the one residual of the rule (the checkpointed
    # output) and computes the rest from it: one input-sized buffer, and a
    # few per-row vectors.
    rows, cols = 4096, 1024
    x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    grad = jax.grad(lambda x, w: jnp.sum(w * fn(x)))
    temp = jax.jit(grad).lower(x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp <= rows * cols * 4 + 16 * rows * 4


_LSE_EDGE_ROWS = np.array(
    [[0, 1, 2, 3], [INF, 1, INF, 0], [-INF] * 4, [np.nan, 1, 2, 3], [INF, -INF, np.nan, 0],
     [1e30, 1e30, -1e30, 0], [INF, -INF, -INF, -INF], [-3.0, -INF, -INF, -INF]]
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize(
    "kw", [{}, {"where": _LSE_EDGE_ROWS != 1}, {"return_sign": True}, {"keepdims": True}],
    ids=["plain", "where", "sign", "keepdims"],
)
def test_logsumexp_value_equals_its_jvp_rule_value(dtype, kw, x64):
    """At t = 1 without weights the value takes a shorter path than the JVP
    rule (per-slice limits instead of per-entry ones); both give the same bits
    on every edge row."""
    x = jnp.asarray(_LSE_EDGE_ROWS, dtype)
    f = lambda x: jsoftmax.logsumexp(x, axis=-1, **kw)
    for got in (f(x), jax.jit(f)(x)):
        want = jax.jvp(f, (x,), (jnp.zeros_like(x),))[0]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    lse = np.asarray(jax.tree.leaves(f(x))[0], np.float64).reshape(-1)
    assert lse[1] == INF and lse[2] == -INF and np.isnan(lse[3]) and lse[6] == INF


def test_bfloat16_long_row_sums_to_one():
    x = jax.random.normal(jax.random.key(0), (50000,)).astype(jnp.bfloat16) * 3
    s = jsoftmax.softmax(x)
    assert s.dtype == jnp.bfloat16
    total = float(jnp.sum(s.astype(jnp.float32)))
    # Each entry is rounded once to bf16 (relative error <= 2^-9), so the sum
    # is within 2^-9 of 1; the f32 sum of 50000 terms adds far less.
    assert abs(total - 1.0) <= 2.0**-8


@pytest.mark.parametrize(
    "dtype,big", [(jnp.float16, 65000.0), (jnp.bfloat16, 2.0**17), (jnp.float16, 2.0**17)]
)
@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp])
def test_low_precision_gradients_finite_at_large_inputs(dtype, big, fn):
    # 2^17 does not fit float16 (max 65504): it becomes +inf, which must still
    # give finite gradients (the +inf entries share the mass).
    with np.errstate(over="ignore"):
        x = jnp.asarray(np.array([big, big * 0.999, -big, 1.0]).astype(dtype))
    w = jnp.asarray([0.3, -1.0, 0.5, 2.0], dtype)

    def loss(x):
        out = fn(x)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0) * w)

    g = jax.grad(loss)(x)
    assert g.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp])
def test_integer_inputs_promote_to_default_float(fn):
    got = fn(jnp.array([1, 2, 3]))
    assert got.dtype == jnp.result_type(float)
    want = {
        jsoftmax.softmax: ref.softmax,
        jsoftmax.log_softmax: ref.log_softmax,
        jsoftmax.logsumexp: ref.logsumexp,
    }[fn](np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------- 4. exclusion


def _grad_of_weighted_sum(fn, x, **kwargs):
    w = jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape)

    def loss(x):
        out = fn(x, **kwargs)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * w)

    return jax.grad(loss)(x), jax.jacfwd(lambda x: fn(x, **kwargs))(x)


@pytest.mark.parametrize("use_jit", [False, True])
def test_excluded_entries_values_and_zero_derivatives(use_jit):
    x = jnp.array([[1.0, -INF, 3.0, 0.5], [2.0, 1.0, -INF, 7.0]])
    mask = jnp.array([[True, True, True, False], [True, False, True, True]])
    excluded = np.array([[False, True, False, True], [False, True, True, False]])
    sm = maybe_jit(jsoftmax.softmax, use_jit, where=mask)
    lsm = maybe_jit(jsoftmax.log_softmax, use_jit, where=mask)
    np.testing.assert_array_equal(np.asarray(sm(x))[excluded], 0.0)
    np.testing.assert_array_equal(np.asarray(lsm(x))[excluded], -INF)
    want = ref.softmax(np.asarray(x), where=~excluded)
    np.testing.assert_allclose(sm(x), want, rtol=1e-6, atol=1e-7)
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        g, jac = _grad_of_weighted_sum(fn, x, where=mask)
        np.testing.assert_array_equal(np.asarray(g)[excluded], 0.0)
        jac = np.asarray(jac)  # [2, 4, 2, 4]: output index, then input index
        assert np.all(jac[excluded] == 0.0)  # excluded outputs do not move
        assert np.all(jac[..., excluded] == 0.0)  # excluded inputs move nothing
        assert np.all(np.isfinite(jac))


@pytest.mark.parametrize("use_where", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_fully_excluded_slice(use_where, use_jit):
    x = jnp.array([[1.0, 2.0, 3.0], [-INF, -INF, -INF]])
    kwargs = {}
    if use_where:
        x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        kwargs["where"] = jnp.array([[True, True, True], [False, False, False]])
    s = maybe_jit(jsoftmax.softmax, use_jit, **kwargs)(x)
    ls = maybe_jit(jsoftmax.log_softmax, use_jit, **kwargs)(x)
    lse = maybe_jit(jsoftmax.logsumexp, use_jit, axis=-1, **kwargs)(x)
    np.testing.assert_array_equal(s[1], 0.0)
    np.testing.assert_array_equal(ls[1], -INF)
    assert float(lse[1]) == -INF
    np.testing.assert_allclose(s[0], ref.softmax(np.array([1.0, 2.0, 3.0])), rtol=1e-6)
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        g, jac = _grad_of_weighted_sum(fn, x, **kwargs)
        np.testing.assert_array_equal(g[1], 0.0)
        assert np.all(np.isfinite(jac))
    g = jax.grad(lambda x: jnp.sum(jsoftmax.logsumexp(x, axis=-1, **kwargs)[1]))(x)
    np.testing.assert_array_equal(g, 0.0)


def test_where_gradient_trap_does_not_occur():
    # The classic trap: a select after a NaN-producing branch gives NaN grads.
    x = jnp.array([[0.0, 0.0], [3.0, 1.0]])
    mask = jnp.array([[False, False], [True, True]])

    def loss(x):
        ls = jsoftmax.log_softmax(x, where=mask)
        return jnp.sum(jnp.where(mask, ls, 0.0))

    g = jax.grad(loss)(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[0], 0.0)


# ---------------------------------------------------------------- 5. inf and nan


def test_positive_infinity_is_the_limit():
    x = jnp.array([[1.0, INF, 3.0, INF], [INF, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(jsoftmax.softmax(x), [[0, 0.5, 0, 0.5], [1, 0, 0, 0]])
    ls = np.asarray(jsoftmax.log_softmax(x))
    np.testing.assert_allclose(ls[0], [-INF, -np.log(2), -INF, -np.log(2)], rtol=1e-7)
    np.testing.assert_array_equal(jsoftmax.logsumexp(x, axis=-1), [INF, INF])


def test_nan_poisons_only_its_slice():
    x = jnp.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]])
    for fn in FUNCS:
        out = np.asarray(fn(x))
        assert np.all(np.isnan(out[0]))
        assert np.all(np.isfinite(out[1]))
    lse = np.asarray(jsoftmax.logsumexp(x, axis=-1))
    assert np.isnan(lse[0]) and np.isfinite(lse[1])
    for t in (0.0, 0.5, INF):  # the limits must not hide a NaN either
        for fn in FUNCS:
            out = np.asarray(fn(x, temperature=t))
            assert np.all(np.isnan(out[0])) and not np.any(np.isnan(out[1])), (fn, t)
    # Gradients too, also on an excluded entry of the NaN slice (its value is
    # NaN there: -inf - NaN), and only there.
    with_excluded = x.at[0, 2].set(-INF)
    w = jnp.arange(3.0)
    for fn in FUNCS:
        g = np.asarray(jax.grad(lambda v, fn=fn: jnp.sum(w * fn(v)))(with_excluded))
        assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1])), fn
    # A NaN that is masked out is excluded like any other entry.
    s = jsoftmax.softmax(x, where=~jnp.isnan(x))
    np.testing.assert_allclose(s[0], [ref.softmax(np.array([1.0, 3.0]))[0], 0, 0.8807971], 1e-6)


# ---------------------------------------------------------------- 6. temperature


def test_traced_temperature_one_is_exactly_the_plain_function():
    # A traced t = 1 takes the tempered arithmetic (z / t and its limits); it
    # must give the untempered result bit for bit. (A concrete 1.0 is the
    # untempered call itself, so it is not compared.)
    x = jax.random.normal(jax.random.key(1), (3, 17)) * 5
    for fn in FUNCS:
        plain = fn(x)
        traced = jax.jit(lambda x, t, fn=fn: fn(x, temperature=t))(x, 1.0)
        np.testing.assert_array_equal(traced, plain)
    traced = jax.jit(lambda x, t: jsoftmax.logsumexp(x, axis=-1, temperature=t))(x, 1.0)
    np.testing.assert_array_equal(traced, jsoftmax.logsumexp(x, axis=-1))


def test_temperature_values_against_float64():
    x = np.array([38.0, 20.0, 40.0, 39.0], np.float32)
    got = jsoftmax.softmax(x, temperature=100.0)
    np.testing.assert_allclose(got, ref.softmax(x, t=100.0), rtol=1e-6)
    np.testing.assert_allclose(got, [0.2587, 0.2161, 0.2639, 0.2613], atol=1e-4)
    np.testing.assert_array_equal(jsoftmax.softmax(x, temperature=0.001), [0, 0, 1, 0])
    lse = jsoftmax.logsumexp(x, temperature=3.0)
    np.testing.assert_allclose(lse, ref.logsumexp(x, t=3.0), rtol=1e-6)


def test_per_example_temperature():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 2, 6)).astype(np.float32)
    t = np.array([[0.5, 1.0], [2.0, 3.0], [0.1, 7.0], [1.5, 0.9]], np.float32)
    got = jsoftmax.log_softmax(x, temperature=t)
    np.testing.assert_allclose(got, ref.log_softmax(x, t=t[..., None]), rtol=2e-6, atol=1e-6)
    # Reducing over axis 1: the batch shape is (4, 6).
    t1 = rng.uniform(0.5, 2.0, (4, 6)).astype(np.float32)
    got = jsoftmax.softmax(x, axis=1, temperature=t1)
    np.testing.assert_allclose(got, ref.softmax(x, axis=1, t=t1[:, None, :]), rtol=2e-6)
    lse = jsoftmax.logsumexp(x, axis=-1, temperature=t)
    np.testing.assert_allclose(lse, ref.logsumexp(x, axis=-1, t=t[..., None]), rtol=2e-6)


def test_zero_temperature_is_the_hard_max():
    x = jnp.array([[1.0, 3.0, 3.0, -2.0], [5.0, 1.0, -INF, 0.0]])
    np.testing.assert_array_equal(
        jsoftmax.softmax(x, temperature=0.0), [[0, 0.5, 0.5, 0], [1, 0, 0, 0]]
    )
    ls = np.asarray(jsoftmax.log_softmax(x, temperature=0.0))
    np.testing.assert_allclose(ls[0], [-INF, -np.log(2), -np.log(2), -INF])
    np.testing.assert_array_equal(ls[1], [0, -INF, -INF, -INF])
    np.testing.assert_array_equal(jsoftmax.logsumexp(x, axis=-1, temperature=0.0), [3.0, 5.0])
    # Masked maximum, and the gradient in x is the (shared) indicator.
    mask = jnp.array([[True, False, True, True], [False, True, True, True]])
    np.testing.assert_array_equal(
        jsoftmax.logsumexp(x, axis=-1, where=mask, temperature=0.0), [3.0, 1.0]
    )
    g = jax.grad(lambda x: jnp.sum(jsoftmax.logsumexp(x, axis=-1, temperature=0.0)))(x)
    np.testing.assert_array_equal(g, [[0, 0.5, 0.5, 0], [1, 0, 0, 0]])
    g = jax.grad(lambda x: jnp.sum(jsoftmax.softmax(x, temperature=0.0)[:, 0]))(x)
    np.testing.assert_array_equal(g, 0.0)


def test_smooth_maximum_tends_to_the_max():
    x = jnp.array([1.0, 4.0, 3.5, -2.0])
    for t in [1e-1, 1e-2, 1e-3]:
        lse = float(jsoftmax.logsumexp(x, temperature=t))
        assert 4.0 <= lse <= 4.0 + t * np.log(4) + 1e-6


def test_infinite_temperature_is_uniform_over_included():
    x = jnp.array([[1.0, -INF, 30.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    mask = jnp.array([True, True, True, False])
    s = jsoftmax.softmax(x, where=mask, temperature=INF)
    np.testing.assert_allclose(s, [[0.5, 0, 0.5, 0], [1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-7)
    ls = jsoftmax.log_softmax(x, where=mask, temperature=INF)
    np.testing.assert_allclose(ls[1], [-np.log(3)] * 3 + [-INF], rtol=1e-7)
    assert float(jsoftmax.logsumexp(x[1], temperature=INF)) == INF
    single = jnp.array([-INF, 2.5, -INF])
    assert float(jsoftmax.logsumexp(single, temperature=INF)) == 2.5


@pytest.mark.parametrize("bad", [-1.0, np.nan, -np.inf])
@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp])
def test_concrete_bad_temperature_raises(bad, fn):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        fn(jnp.ones(3), temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        fn(jnp.ones((2, 3)), temperature=np.array([1.0, bad]))
    # A device array is not read back to the host (that would block every
    # call): it is checked inside the computation, as a traced one is.
    last = {"axis": -1} if fn is jsoftmax.logsumexp else {}
    out = np.asarray(fn(jnp.ones((2, 3)), temperature=jnp.array([1.0, bad]), **last))
    assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()


@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp])
def test_traced_bad_temperature_gives_nan(fn):
    out = jax.jit(lambda x, t: fn(x, temperature=t))(jnp.ones(3), -1.0)
    assert np.all(np.isnan(np.asarray(out)))


def test_temperature_shape_must_match_batch():
    with pytest.raises(ValueError, match="does not broadcast against the batch shape"):
        jsoftmax.softmax(jnp.ones((4, 5)), temperature=jnp.ones(5))
    # One per slice, with or without the reduced axis kept.
    a = jsoftmax.softmax(jnp.ones((4, 5)), temperature=jnp.ones(4) * 2)
    b = jsoftmax.softmax(jnp.ones((4, 5)), temperature=jnp.ones((4, 1)) * 2)
    np.testing.assert_array_equal(a, b)


def test_temperature_gradient_against_float64_derivative(x64):
    # d/dt softmax(x / t) = -s * (z - sum(s z)) / t with z = x / t.
    x = np.array([0.3, -1.2, 2.0, 0.7])
    t = 0.8
    s = ref.softmax(x, t=t)
    z = x / t
    expected = -s * (z - np.sum(s * z)) / t
    got = jax.jacfwd(lambda t: jsoftmax.softmax(jnp.asarray(x), temperature=t))(t)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got = jax.jacrev(lambda t: jsoftmax.softmax(jnp.asarray(x), temperature=t))(t)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # d/dt [t log sum exp(x / t)] is the entropy of s.
    entropy = -np.sum(s * np.log(s))
    got = jax.grad(lambda t: jsoftmax.logsumexp(jnp.asarray(x), temperature=t))(t)
    np.testing.assert_allclose(got, entropy, rtol=1e-12)


# ---------------------------------------------------------------- 7. derivatives


X_SMALL = np.array([[0.3, -1.2, 2.0, 0.1], [0.5, 0.1, -0.7, 1.4]])
T_SMALL = np.array([0.7, 1.9])
MASK_SMALL = np.array([[True, False, True, True], [True, True, True, False]])


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("masked", [False, True])
def test_check_grads_order_two(x64, fn, masked):
    x = jnp.asarray(X_SMALL)
    x_inf = x.at[1, 1].set(-INF)
    mask = jnp.asarray(MASK_SMALL) if masked else None
    # Both modes and their mixtures (jax.hessian is forward over reverse) at
    # t = 1, with a temperature and at a -inf entry; reverse over reverse on
    # the other axis.
    check_grads(lambda x: fn(x, where=mask), (x,), order=2, modes=["fwd", "rev"])
    check_grads(
        lambda x, t: fn(x, where=mask, temperature=t),
        (x, jnp.asarray(T_SMALL)),
        order=2,
        modes=["fwd", "rev"],
    )
    # With a -inf entry held fixed: differentiate in the other entries and t.
    check_grads(
        lambda d, t: fn(x_inf + d, where=mask, temperature=t),
        (jnp.zeros_like(x), jnp.asarray(T_SMALL)),
        order=2,
        modes=["fwd", "rev"],
    )
    check_grads(lambda x: fn(x, axis=0), (x,), order=2, modes=["rev"])


def test_check_grads_logsumexp(x64):
    x = jnp.asarray(X_SMALL)
    t = jnp.asarray(T_SMALL)
    mask = jnp.asarray(MASK_SMALL)
    modes = ["fwd", "rev"]
    # Mixed modes at t = 1 and with a temperature; reverse over reverse with weights.
    check_grads(lambda x: jsoftmax.logsumexp(x), (x,), order=2, modes=modes)
    check_grads(
        lambda x, t: jsoftmax.logsumexp(x, axis=-1, where=mask, temperature=t),
        (x, t),
        order=2,
        modes=modes,
    )
    check_grads(
        lambda x, t, b: jsoftmax.logsumexp(x, axis=1, b=b, temperature=t),
        (x, t, jnp.abs(x) + 0.5),
        order=2,
        modes=["rev"],
    )
    check_grads(
        lambda x, b: jsoftmax.logsumexp(x, axis=-1, b=b, return_sign=True)[0],
        (x, x),
        order=2,
        modes=["rev"],
    )


def _residuals(fn, x):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(fn, x)
    return buf.getvalue().strip().splitlines()


@pytest.mark.parametrize(
    "fn",
    [
        jsoftmax.softmax,
        jsoftmax.log_softmax,
        lambda x: jsoftmax.logsumexp(x, axis=-1),
        lambda x: jsoftmax.softmax(x, temperature=jnp.array([0.5, 2.0, 3.0])),
        lambda x: jsoftmax.log_softmax(x, where=x > 0),
    ],
)
def test_reverse_mode_saves_one_input_sized_residual(fn):
    x = jnp.ones((3, 7))
    full = [line for line in _residuals(fn, x) if "[3,7]" in line]
    assert len(full) == 1, full


def test_small_gradient_components_survive(x64):
    z = jnp.array([37.42994775023705, 0.0])
    g = jax.grad(lambda z: jsoftmax.log_softmax(z)[0])(z)
    # d log_softmax_0 / d z_1 = -softmax_1 = -exp(-37.43...) / (1 + exp(-37.43...)).
    expected = -np.exp(-37.42994775023705) / (1 + np.exp(-37.42994775023705))
    np.testing.assert_allclose(float(g[1]), expected, rtol=1e-12)
    assert abs(float(g[1])) > 5e-17
    # d log_softmax_0 / d z_0 = 1 - softmax_0 = softmax_1: below eps, so it
    # survives only if it is not computed as 1 - (1 - 5.55e-17).
    np.testing.assert_allclose(float(g[0]), -expected, rtol=1e-12)


# ---------------------------------------------------------------- 9. errors


@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp])
def test_bad_arguments_raise_clear_errors(fn):
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fn(x, 2)
    with pytest.raises(ValueError, match="names the same dimension twice"):
        fn(x, (1, -1))
    with pytest.raises(TypeError, match="axis must be an int"):
        fn(x, 1.5)
    with pytest.raises(ValueError, match="where has shape"):
        fn(x, -1, where=jnp.ones(2, bool))
    bad = [jnp.ones(3, bool), np.array(["a", "b"])]
    if fn is not jsoftmax.logsumexp:  # jax.nn.logsumexp takes complex input; so does ours
        bad.append(jnp.ones(3, jnp.complex64))
    for b in bad:
        with pytest.raises(TypeError, match="not a real number type"):
            fn(b)


@pytest.mark.parametrize("fn", [*FUNCS, jsoftmax.logsumexp, jsoftmax.entropy])
def test_numpy_axes_and_python_sequences_are_taken_as_arrays(fn):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3)), jnp.float32)
    np.testing.assert_array_equal(fn(x, np.int64(1)), fn(x, 1))
    np.testing.assert_array_equal(fn(x, (np.int32(0), 1)), fn(x, (0, 1)))
    # A list of temperatures is an array of them, one per slice.
    np.testing.assert_array_equal(fn(x, 1, temperature=[0.5, 2.0]),
                                  fn(x, 1, temperature=np.array([0.5, 2.0])))
    with pytest.raises(TypeError, match="axis must be an int"):
        fn(x, True)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        fn(x, 1, temperature=True)
    with pytest.raises(TypeError, match="must be an array of real numbers"):
        fn([[1.0, 2.0], [3.0]])


def test_logsumexp_weights_shape_error():
    with pytest.raises(ValueError, match="b has shape"):
        jsoftmax.logsumexp(jnp.ones((2, 3)), b=jnp.ones(2))


# ---------------------------------------------------------------- API and transforms


def test_positional_signature_matches_jax_nn():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 4, 5)) > 0.3)
    for ours, theirs in [
        (jsoftmax.softmax, jax.nn.softmax),
        (jsoftmax.log_softmax, jax.nn.log_softmax),
    ]:
        for axis in (-1, 1, (0, 2), None):
            np.testing.assert_allclose(ours(x, axis), theirs(x, axis), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(ours(x, 1, mask), theirs(x, 1, mask), rtol=2e-6, atol=1e-7)
    b = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    for args in [(None,), (1, b, True, True, mask), ((0, 2), None, False, False, mask)]:
        ours = jsoftmax.logsumexp(x, *args)
        theirs = jax.nn.logsumexp(x, *args)
        for o, t in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(o, t, rtol=2e-6, atol=1e-6)


def test_axes_against_float64_reference():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for axis in [0, (0, 2), None, ()]:
        ax = tuple(range(3)) if axis is None else axis
        np.testing.assert_allclose(
            jsoftmax.softmax(x, axis), ref.softmax(x, axis=ax), rtol=2e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            jsoftmax.logsumexp(x, axis), ref.logsumexp(x, axis=ax), rtol=2e-6
        )


def test_vmap_any_in_axes_and_higher_derivatives():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    for in_axes in (0, 1):
        got = jax.vmap(jsoftmax.softmax, in_axes=in_axes, out_axes=in_axes)(x)
        axis = -1 if in_axes == 0 else 0
        np.testing.assert_allclose(got, ref.softmax(np.asarray(x), axis=axis), rtol=2e-6)
    ts = jnp.array([0.5, 1.0, 2.0])
    got = jax.vmap(lambda row, t: jsoftmax.log_softmax(row, temperature=t))(x, ts)
    np.testing.assert_allclose(got, ref.log_softmax(np.asarray(x), t=ts[:, None]), rtol=2e-6)
    row = x[0]
    s = ref.softmax(np.asarray(row))
    jac_expected = np.diag(s) - np.outer(s, s)
    np.testing.assert_allclose(jax.jacfwd(jsoftmax.softmax)(row), jac_expected, atol=1e-6)
    np.testing.assert_allclose(jax.jacrev(jsoftmax.softmax)(row), jac_expected, atol=1e-6)
    np.testing.assert_allclose(jax.hessian(jsoftmax.logsumexp)(row), jac_expected, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((0,), -1), ((3, 0), -1), ((0, 4), -1), ((2, 0), 0)])
def test_empty_arrays(shape, axis):
    x = jnp.zeros(shape)
    for fn in FUNCS:
        out = fn(x, axis)
        assert out.shape == shape
        assert jax.grad(lambda x, fn=fn: jnp.sum(fn(x, axis)))(x).shape == shape
    lse = jsoftmax.logsumexp(x, axis)
    np.testing.assert_array_equal(lse, np.full(lse.shape, -INF))


# ---------------------------------------------------------------- properties

ROWS = hnp.arrays(
    np.float32,
    (3, 8),
    elements=st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None)
@given(x=ROWS, shift=st.floats(-1e3, 1e3, width=32))
def test_property_shift_invariance_and_normalisation(x, shift):
    s = np.asarray(jsoftmax.softmax(x), np.float64)
    s_shifted = np.asarray(jsoftmax.softmax(x + np.float32(shift)), np.float64)
    # x + shift is rounded, so the shifted input differs by up to |x| eps.
    tol = 4 * EPS32 * (1 + np.max(np.abs(x)) + abs(shift))
    np.testing.assert_allclose(s, s_shifted, atol=tol)
    np.testing.assert_allclose(np.sum(s, axis=-1), 1.0, atol=8 * 8 * EPS32)
    assert np.all(s >= 0)


@settings(max_examples=40, deadline=None)
@given(x=ROWS)
def test_property_log_softmax_is_log_of_softmax(x):
    ls = np.asarray(jsoftmax.log_softmax(x), np.float64)
    s = np.asarray(jsoftmax.softmax(x), np.float64)
    normal = s > np.finfo(np.float32).tiny * 1e6
    np.testing.assert_allclose(ls[normal], np.log(s[normal]), atol=4 * EPS32, rtol=4 * EPS32)
    assert np.all(ls <= 0)


def test_float64_numpy_input_without_x64_is_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jsoftmax.softmax(np.array([1.0, 2.0]))
        lse = jsoftmax.logsumexp(np.array([1.0, 2.0]), b=np.array([1.0, 1.0]))
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, ref.softmax(np.array([1.0, 2.0])), rtol=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.5, 3.0])
def test_weighted_logsumexp_hessian_at_ties(x64, t):
    # All entries equal (a tie at the max): the Hessian of t * lse(x / t, b)
    # is (diag(p) - p p^T) / t with p = b / sum(b). It once vanished for t != 1
    # because the tied maxima were a constant 0 in the shifted logits.
    x = np.zeros(3)
    b = np.array([1.0, 2.0, 5.0])
    p = b / b.sum()
    want = (np.diag(p) - np.outer(p, p)) / t
    got = jax.hessian(lambda x: jsoftmax.logsumexp(x, b=b, temperature=t))(x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # And a tie between two of three entries, against jax.nn on x / t.
    x = np.array([1.0, 1.0, -0.5])
    want = jax.hessian(lambda x: t * jax.nn.logsumexp(x / t, b=b))(x)
    np.testing.assert_allclose(jax.hessian(lambda x: jsoftmax.logsumexp(x, b=b, temperature=t))(x),
                               want, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- constants under jit

# Every edge in one array: ordinary rows, -inf, a fully excluded row, +inf,
# +inf next to NaN, NaN, a tie, a dominant entry.
EDGE_ROWS = np.array(
    [
        [1.0, 2.0, 3.0, 0.5],
        [0.5, -1.0, 4.0, -INF],
        [-INF, -INF, -INF, -INF],
        [INF, 0.0, INF, 1.0],
        [INF, np.nan, 0.0, 1.0],
        [np.nan, 1.0, 2.0, 3.0],
        [2.0, 2.0, -1.0, 2.0],
        [40.0, 0.0, 1.0, -3.0],
    ],
    np.float32,
)


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.5}, {"where": EDGE_ROWS > 0}])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_constants_under_jit_give_the_same_result(name, kwargs):
    # An input passed as an argument, closed over as a constant, or built
    # inside the jitted function (XLA constant-folds the last two).
    fn = getattr(jsoftmax, name)
    f = (lambda x: fn(x, axis=-1, **kwargs)) if name == "logsumexp" else (lambda x: fn(x, **kwargs))
    want = np.asarray(f(jnp.asarray(EDGE_ROWS)))
    # The same values (XLA's constant folder may round exp and log once
    # differently) and the same infinities and NaNs.
    same = lambda got, want: np.testing.assert_allclose(
        np.asarray(got), want, rtol=4 * EPS32, atol=4 * EPS32
    )
    same(jax.jit(f)(EDGE_ROWS), want)
    same(jax.jit(lambda: f(EDGE_ROWS))(), want)
    built = lambda: jnp.where(jnp.isnan(jnp.asarray(EDGE_ROWS)), jnp.nan, jnp.asarray(EDGE_ROWS))
    same(jax.jit(lambda: f(built()))(), want)
    if "where" not in kwargs:
        same(jax.jit(lambda: f(jnp.full((2, 5), 3.0)))(), np.asarray(f(jnp.full((2, 5), 3.0))))
        ramp = lambda: jnp.arange(12.0).reshape(3, 4) * 10.0
        same(jax.jit(lambda: f(ramp()))(), np.asarray(f(ramp())))


def test_constant_logits_match_mpmath():
    c = np.array([[1, 2, 3], [0.5, -1, 4]], np.float32)
    for i, row in enumerate(c):
        rs, rl, rlse = ref.mp_row(row)
        np.testing.assert_allclose(jax.jit(lambda: jsoftmax.log_softmax(c))()[i], rl, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(lambda: jsoftmax.softmax(c))()[i], rs, atol=1e-7)
        np.testing.assert_allclose(
            jax.jit(lambda: jsoftmax.logsumexp(c, axis=-1))()[i], rlse, rtol=1e-6
        )


def test_nan_next_to_inf_is_nan_at_every_width():
    for width in (3, 1024, 4096):
        x = np.zeros((2, width), np.float32)
        x[:, 0], x[:, 1] = INF, np.nan
        w = np.ones_like(x, bool)
        for out in (
            jsoftmax.softmax(x), jsoftmax.softmax(x, where=w),
            jsoftmax.softmax(x, temperature=0.5), jsoftmax.log_softmax(x),
            jsoftmax.logsumexp(x, axis=-1), jsoftmax.logsumexp(x, axis=-1, where=w),
        ):
            assert np.isnan(np.asarray(out)).all(), width


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_negative_zero_temperature_is_the_hard_max(name):
    fn = getattr(jsoftmax, name)
    x = jnp.array([1.0, 3.0, 3.0, -2.0])
    # By hand: the hard max shares the two maxima.
    want = {
        "softmax": [0.0, 0.5, 0.5, 0.0],
        "log_softmax": [-INF, -np.log(2.0), -np.log(2.0), -INF],
        "logsumexp": 3.0,
    }[name]
    for t in (-0.0, 0.0):
        np.testing.assert_allclose(fn(x, temperature=t), want, rtol=1e-6)


def test_weighted_logsumexp_second_derivative_in_t_with_excluded_weights(x64):
    # d2/dt2 of t log(1 e^{0/t} + 2 e^{0.5/t}) at t = 1 (the third entry is
    # excluded by where although b = 3): by hand, with p the weighted softmax
    # of x / t, d2/dt2 = Var_p(x) / t^3.
    x, b = np.array([0.0, 0.5]), np.array([1.0, 2.0])
    p = b * np.exp(x) / np.sum(b * np.exp(x))
    want = np.sum(p * x**2) - np.sum(p * x) ** 2
    g = lambda t: jsoftmax.logsumexp(
        jnp.array([0.0, 0.5, 1.0]), b=jnp.array([1.0, 2.0, 3.0]),
        where=jnp.array([True, True, False]), temperature=t,
    )
    np.testing.assert_allclose(jax.grad(jax.grad(g))(1.0), want, rtol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(jax.grad(g))(1.0), want, rtol=1e-9)
    mixed = jax.jacfwd(jax.grad(g), argnums=0)
    assert np.isfinite(mixed(1.0))
    # and the mixed d/dt d/dx is finite
    h = lambda x, t: jsoftmax.logsumexp(
        x, b=jnp.array([1.0, 2.0, 3.0]), where=jnp.array([True, True, False]), temperature=t
    )
    mixed_x_t = jax.jacfwd(jax.grad(h, 0), 1)(jnp.array([0.0, 0.5, 1.0]), 1.0)
    assert np.isfinite(np.asarray(mixed_x_t)).all()


def test_temperature_derivative_keeps_the_entropy_of_a_confident_slice():
    # d/dt [t lse(x / t)] = entropy of softmax(x / t); for [0, -20] at t = 1
    # it is log(1 + e^-20) + 20 e^-20 / (1 + e^-20) (mpmath).
    with mpmath.workdps(40):
        e = mpmath.exp(-20)
        want = float(mpmath.log(1 + e) + 20 * e / (1 + e))
    got = jax.grad(lambda t: jsoftmax.logsumexp(jnp.array([0.0, -20.0]), temperature=t))(1.0)
    np.testing.assert_allclose(got, want, rtol=4e-6)


def test_bool_weights_in_logsumexp_are_zero_one_as_in_jax_nn():
    a = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    b = np.array([[True, False, True], [False, True, True]])
    np.testing.assert_allclose(
        jsoftmax.logsumexp(a, axis=-1, b=b),
        np.log(np.sum(np.exp(np.asarray(a, np.float64)) * b, axis=-1)), rtol=1e-6,
    )
    np.testing.assert_allclose(
        jsoftmax.logsumexp(a, axis=-1, b=b), jax.nn.logsumexp(a, axis=-1, b=b), rtol=1e-6
    )


# --------------------------------------------------------------------------
# Wide rows: t = 1, no mask, no weights against float64 NumPy on arrays large
# enough for XLA's fused CPU kernels, which compile large reductions
# differently from small arrays (their fused max has dropped NaN at some
# widths), so the edge handling is checked where it runs fused.
# --------------------------------------------------------------------------

_BIG32 = float(np.finfo(np.float32).max)


def _wide_edge_rows(width):
    """Nine rows: ordinary ones and every edge, at a width XLA fuses."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, width)).astype(np.float32) * 3
    x[1, ::5] = -INF  # -inf entries
    x[2, :] = -INF  # nothing included
    x[3, [3, 50]] = INF  # +inf entries share the mass; float32 max does not
    x[3, 70] = _BIG32
    x[4, width // 2] = np.nan  # NaN poisons its row only
    x[5, [0, 7, width - 1]] = x[5].max() + 1.0  # a three-way tie on top
    x[6] *= 10.0  # a dominant top entry: rest summing to ~1e-13
    x[6, 0] = x[6].max() + 30.0
    x[7] *= 1e29
    x[8] = 0.0  # uniform
    return jnp.asarray(x)


_WIDE_FUNCS = {
    "softmax": lambda x, **k: jsoftmax.softmax(x, **k),
    "log_softmax": lambda x, **k: jsoftmax.log_softmax(x, **k),
    "logsumexp": lambda x, **k: jsoftmax.logsumexp(x, axis=-1, **k),
}


_WIDE_ORDINARY = [0, 1, 5, 6, 7, 8]  # rows with a finite max and no NaN


# Widths at which XLA:CPU has chosen different kernels for these reductions.
@pytest.fixture(
    scope="module", params=[1024, 2048, 40000], ids=["rows1024", "rows2048", "rows40000"]
)
def wide_rows(request):
    return _wide_edge_rows(request.param)


@pytest.mark.parametrize("name", sorted(_WIDE_FUNCS))
def test_wide_rows_values_against_float64(wide_rows, name):
    x = wide_rows
    got = np.asarray(jax.jit(_WIDE_FUNCS[name])(x), np.float64)[_WIDE_ORDINARY]
    want = ref.split_at_max(name, np.asarray(x)[_WIDE_ORDINARY])
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    ok = np.isfinite(want)
    if name == "softmax":  # absolute, as in test_core: tiny entries inherit x - max rounding
        np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=4 * EPS32)
    else:  # the contract: 8 eps max(1, |value|)
        err = np.abs(got[ok] - want[ok]) / np.maximum(1.0, np.abs(want[ok]))
        assert np.max(err) <= 8 * EPS32, np.max(err) / EPS32


@pytest.mark.parametrize("name", sorted(_WIDE_FUNCS))
def test_wide_rows_gradients_against_float64(wide_rows, name):
    x = wide_rows
    fn = _WIDE_FUNCS[name]
    w = np.asarray(jax.random.normal(jax.random.key(3), jax.eval_shape(fn, x).shape))

    def loss(x):
        out = fn(x)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0) * w)

    got = np.asarray(jax.jit(jax.grad(loss))(x), np.float64)
    rows = np.asarray(x, np.float64)[_WIDE_ORDINARY]
    p, _ = ref.softmax_and_max(rows)
    w = np.asarray(w, np.float64)[_WIDE_ORDINARY]
    included = np.isfinite(rows)
    if name == "softmax":
        want = p * (w - np.sum(p * w, -1, keepdims=True))
    elif name == "log_softmax":
        g = np.where(included, w, 0.0)  # the loss drops the -inf outputs
        want = np.where(included, g - p * g.sum(-1, keepdims=True), 0.0)
    else:
        want = p * w[:, None]
    scale = np.max(np.abs(w)) * (1 if name != "log_softmax" else rows.shape[-1] ** 0.5)
    np.testing.assert_allclose(got[_WIDE_ORDINARY], want, rtol=0, atol=1e-5 * scale)
    # Excluded entries (-inf, and the finite ones of a +inf row) move nothing.
    assert np.all(got[1, ::5] == 0) and np.all(got[2] == 0)
    assert np.all(got[3, [0, 70]] == 0)
    assert np.all(np.isnan(got[4]))  # the NaN row


@pytest.mark.codegen
def test_wide_rows_edge_values(wide_rows):
    x = wide_rows
    s = np.asarray(jax.jit(jsoftmax.softmax)(x))
    ls = np.asarray(jax.jit(jsoftmax.log_softmax)(x))
    lse = np.asarray(jax.jit(lambda x: jsoftmax.logsumexp(x, axis=-1))(x))
    assert np.all(s[2] == 0) and np.all(ls[2] == -INF) and lse[2] == -INF
    np.testing.assert_array_equal(s[3][[3, 50]], 0.5)
    assert np.sum(s[3]) == 1.0 and s[3, 70] == 0 and ls[3, 70] == -INF and lse[3] == INF
    assert np.all(np.isnan(s[4])) and np.all(np.isnan(ls[4])) and np.isnan(lse[4])
    assert s[5, 0] == s[5, 7] == s[5, -1] == s[5].max()  # ties share equally
    # The top entry of the dominant row is -log1p(rest) ~ -1e-13, to within
    # an ulp of 1 (float32 takes jax.nn's single sum).
    rest = np.exp(np.asarray(x[6], np.float64) - float(x[6, 0]))[1:].sum()
    assert abs(ls[6, 0] + np.log1p(rest)) <= EPS32


def test_wide_logsumexp_nan_next_to_inf_is_nan():
    # A NaN poisons its slice also next to a +inf (the fused max alone would
    # drop the NaN and return +inf). Hand reference: any NaN term -> NaN.
    x = np.zeros((3, 4096), np.float32)
    x[0, [5, 9]] = [INF, np.nan]
    x[1, 7] = np.nan
    x[2, 3] = INF
    lse = np.asarray(jax.jit(lambda x: jsoftmax.logsumexp(x, axis=-1))(jnp.asarray(x)))
    assert np.isnan(lse[0]) and np.isnan(lse[1]) and lse[2] == INF
