# Ported from jax-ml/jax@jax-v0.10.2 (990e6a0b8413) tests/nn_test.py, tests/lax_scipy_test.py.
"""jax's own softmax, log_softmax and logsumexp cases, run on jsoftmax.

Every case runs in the default mode and under x64 (the ``mode`` fixture).
jax's ``testLogSumExp`` samples 10 cases of its product per run; here every
(shapes, axis) configuration runs in the floating dtype of each mode and every
fourth in the complex and integer ones, (keepdims, return_sign) rotating. To
keep compiles few, one ``jax.jit`` per (mode, shapes, dtype) evaluates the
group's cases, each its own pytest item compared against scipy.
"""

import functools
import itertools
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as osp_special
from jax._src import ad_checkpoint
from jax._src import public_test_util as ptu
from jax.test_util import check_grads

import jsoftmax

MODES = ["default", "x64"]


@pytest.fixture
def mode(request):
    with jax.enable_x64(request.param == "x64"):
        yield request.param


def with_modes(names="", values=None):
    """Parametrize over both modes (and the given per-mode values)."""
    if values is None:
        return pytest.mark.parametrize("mode", MODES, indirect=True)
    cases = []
    for m in MODES:
        for v in values(m):
            marks = getattr(v, "marks", ())
            v = getattr(v, "values", v)
            cases.append(pytest.param(m, *v, marks=marks, id=f"{m}-{_id(v)}"))
    return pytest.mark.parametrize(f"mode,{names}", cases, indirect=["mode"])


def _id(v):
    return "-".join(getattr(x, "__name__", str(x)).replace(" ", "") for x in v)


# jtu.dtypes.floating / complex / integer: the 64-bit ones only under x64.
def floating(m):
    return [np.float32, np.float64] if m == "x64" else [np.float32]


def complex_(m):
    return [np.complex64, np.complex128] if m == "x64" else [np.complex64]


def integer(m):
    return [np.int32, np.int64] if m == "x64" else [np.int32]


# ---- jtu helpers, ported: rand_default, rand_bool, assertAllClose --------


def rand_default(rng, shape, dtype, scale=3):
    r = lambda: np.asarray(scale * rng.randn(*shape)).astype(dtype)
    vals = r() + 1j * r() if np.issubdtype(dtype, np.complexfloating) else r()
    return np.asarray(vals, dtype)


def rand_bool(rng, shape):
    return np.asarray(rng.rand(*shape) < 0.5, dtype=bool)


def _rng(*key):
    return np.random.RandomState(zlib.crc32(repr(key).encode()))


def _tol(dtype, tol=None):
    return ptu.tolerance(np.dtype(dtype), tol)


def assert_all_close(actual, desired, check_dtypes=True, atol=None, rtol=None):
    """jtu.JaxTestCase.assertAllClose: tuples elementwise; dtypes canonicalized
    outside x64 and exact under x64; default tolerances by dtype."""
    if isinstance(actual, tuple):
        assert isinstance(desired, tuple) and len(actual) == len(desired)
        for a, d in zip(actual, desired, strict=True):
            assert_all_close(a, d, check_dtypes, atol, rtol)
        return
    if check_dtypes:
        da, dd = jnp.result_type(actual), np.asarray(desired).dtype
        if not jax.config.jax_enable_x64:
            da, dd = jax.dtypes.canonicalize_dtype(da), jax.dtypes.canonicalize_dtype(dd)
        assert da == dd, (da, dd)
    a, d = np.asarray(actual), np.asarray(desired)
    assert a.shape == d.shape, (a.shape, d.shape)
    atol = max(_tol(a.dtype, atol), _tol(d.dtype, atol))
    rtol = max(_tol(a.dtype, rtol), _tol(d.dtype, rtol))
    kw = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v}
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(a, d, **kw)


# ==========================================================================
# tests/nn_test.py
# ==========================================================================

FNS = [jsoftmax.softmax, jsoftmax.log_softmax]
fn_values = lambda m: [(f,) for f in FNS]


@with_modes("fn", fn_values)
def test_softmax_empty_array(mode, fn):
    x = jnp.array([], dtype=float)
    out = fn(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, x)


@with_modes("fn", fn_values)
def test_softmax_empty_mask(mode, fn):
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    m = jnp.zeros_like(x, dtype=bool)
    expected = jnp.full_like(x, 0.0 if fn is jsoftmax.softmax else -jnp.inf)
    out = fn(x, where=m)
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


@with_modes("fn", fn_values)
def test_softmax_where_mask(mode, fn):
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    m = jnp.array([True, False, True, True])
    out = fn(x, where=m)
    assert_all_close(out[m], fn(x[m]))
    probs = out if fn is jsoftmax.softmax else jnp.exp(out)
    assert_all_close(probs.sum(), jnp.asarray(1.0, probs.dtype))
    # jax runs this only under softmax_custom_jvp (off by default at 0.10.2);
    # jsoftmax always has a custom JVP. `initial=-inf` dropped: neither
    # jax.nn.softmax 0.10.2 nor jsoftmax takes it.
    if fn is jsoftmax.softmax:
        g_fun = lambda x: jnp.take(fn(x, where=m), jnp.array([0, 2, 3]))
        check_grads(g_fun, (x,), order=2)


@with_modes("fn", fn_values)
def test_softmax_where_grad(mode, fn):
    # regression test for https://github.com/jax-ml/jax/issues/19490
    x = jnp.array([36.0, 10000.0])
    mask = x < 1000
    f = lambda x, mask: fn(x, where=mask)[0]
    assert_all_close(jax.grad(f)(x, mask), jnp.zeros_like(x))


@with_modes()
def test_softmax_grad(mode):
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    check_grads(jsoftmax.softmax, (x,), order=2, atol=5e-3)


@with_modes()
def test_softmax_grad_residuals(mode):
    # jax skips this unless softmax_custom_jvp is on; jsoftmax's JVP is always custom.
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    res = ad_checkpoint.saved_residuals(jsoftmax.softmax, x)
    assert len(res) == 1


FLAG_FALSE_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="jsoftmax ignores jax.softmax_custom_jvp(False) and always uses its custom JVP: "
    "1 saved residual of size 4, where jax.nn saves 3 of total size 6",
)


@with_modes(
    "flag,n_res,size",
    lambda m: [pytest.param(False, 3, 6, marks=FLAG_FALSE_XFAIL), (True, 1, 4)],
)
def test_softmax_grad_flag(mode, flag, n_res, size):
    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    with jax.softmax_custom_jvp(flag):
        res = ad_checkpoint.saved_residuals(jsoftmax.softmax, x)
    assert len(res) == n_res
    assert sum(a.size for a, _ in res) == size


# ==========================================================================
# tests/lax_scipy_test.py
# ==========================================================================

COMPATIBLE_SHAPES = [
    [(), ()],  # no axis in range(0, 0): this group yields no case, as in jax
    [(4,), (3, 4)],
    [(3, 1), (1, 4)],
    [(2, 3, 4), (2, 1, 4)],
]


def _lse_configs():
    for group in COMPATIBLE_SHAPES:
        for use_b in (False, True):
            for shapes in itertools.product(*((group, group) if use_b else (group,))):
                nd = max(len(s) for s in shapes)
                for axis in range(-nd, nd):
                    yield shapes, axis


LSE_CONFIGS = list(_lse_configs())  # 80 (shapes, axis) configurations
FLAGS = list(itertools.product([False, True], [False, True]))  # keepdims, return_sign


def _lse_values(m):
    # Every configuration in the floating dtypes; the complex and integer
    # dtypes take every fourth (rotating), to keep the compile count small.
    # Under x64 the 32-bit dtypes repeat the default mode, so they are left out.
    dtypes = floating(m) + complex_(m) + integer(m)
    if m == "x64":
        dtypes = [np.float64, np.complex128, np.int64]
    for ci, (shapes, axis) in enumerate(LSE_CONFIGS):
        for di, dtype in enumerate(dtypes):
            if dtype in complex_(m) + integer(m) and (ci + di) % 4:
                continue
            keepdims, return_sign = FLAGS[(ci + di) % len(FLAGS)]
            yield shapes, axis, dtype, keepdims, return_sign


LSE_CASES = {m: list(_lse_values(m)) for m in MODES}


def _sh(shapes):
    return "_".join("x".join(map(str, s)) or "s" for s in shapes)


# These fail jax's own 1e-15 float64 tolerance against scipy by 1-3 ulp (e.g.
# -2.22e-15 for an exact 0); jsoftmax is bitwise equal to jax.nn.logsumexp on
# each, and jax.nn fails them the same way (jax samples 10 cases, not these).
ULP_XFAIL = {
    "x64-3x4_3x4-ax-2-float64-kd0-rs1",
    "x64-3x4_3x4-ax0-float64-kd1-rs1",
    "x64-2x3x4-ax1-complex128-kd1-rs1",
    "x64-2x1x4_2x1x4-ax-1-int64-kd0-rs1",
    "x64-2x1x4_2x1x4-ax2-int64-kd0-rs0",
}


def _lse_param(m, shapes, axis, dtype, keepdims, return_sign):
    ident = f"{m}-{_sh(shapes)}-ax{axis}-{dtype.__name__}-kd{int(keepdims)}-rs{int(return_sign)}"
    marks = ()
    if ident in ULP_XFAIL:
        reason = "float64 off scipy by 1-3 ulp > jax's 1e-15 tolerance; jax.nn gives the same bits"
        marks = pytest.mark.xfail(strict=True, reason=reason)
    return pytest.param(m, shapes, axis, dtype, keepdims, return_sign, marks=marks, id=ident)


@functools.cache
def _lse_group(m, shapes, dtype):
    """Inputs of one (mode, shapes, dtype) group and jsoftmax's result for
    every (axis, keepdims, return_sign) of it, from one jax.jit."""
    rng = _rng(m, shapes, dtype.__name__)
    args = tuple(rand_default(rng, s, dtype) for s in shapes)
    keys = sorted({(ax, kd, rs) for s, ax, d, kd, rs in LSE_CASES[m] if (s, d) == (shapes, dtype)})
    keys.append((0, False, True))  # for test_logsumexp_eager_matches_jit

    @jax.jit
    def run(*args):
        b = args[1] if len(args) > 1 else None
        return [
            jsoftmax.logsumexp(args[0], ax, keepdims=kd, return_sign=rs, b=b)
            for ax, kd, rs in keys
        ]

    return args, dict(zip(keys, jax.device_get(run(*args)), strict=True))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:divide by zero encountered")
@pytest.mark.parametrize(
    "mode,shapes,axis,dtype,keepdims,return_sign",
    [_lse_param(m, *v) for m in MODES for v in LSE_CASES[m]],
    indirect=["mode"],
)
def test_logsumexp(mode, shapes, axis, dtype, keepdims, return_sign):
    args, results = _lse_group(mode, shapes, dtype)
    b = args[1] if len(args) > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = osp_special.logsumexp(
            args[0], axis, keepdims=keepdims, return_sign=return_sign, b=b
        )
    if dtype == np.int32:
        expected = jax.tree.map(lambda x: np.asarray(x).astype("float32"), expected)
    actual = results[(axis, keepdims, return_sign)]
    assert_all_close(actual, expected)


def _eager_values(m):
    dtypes = floating(m) + complex_(m)[:1] + integer(m)
    return [((g[0], g[1]), d) for g in COMPATIBLE_SHAPES[1:] for d in dtypes]


@with_modes("shapes,dtype", _eager_values)
def test_logsumexp_eager_matches_jit(mode, shapes, dtype):
    # _CompileAndCheck of testLogSumExp, once per (shape group, dtype) with b
    # (axis 0, return_sign): the eager call against the jitted group above.
    args, results = _lse_group(mode, shapes, dtype)
    b = args[1] if len(args) > 1 else None
    eager = jsoftmax.logsumexp(args[0], 0, b=b, return_sign=True)
    tol = {np.float32: 1e-6, np.float64: 1e-14}
    assert_all_close(eager, tuple(results[(0, False, True)]), atol=tol, rtol=tol)


@with_modes()
def test_logsumexp_complex_sign(mode):
    # Tests behavior of complex sign, which changed in SciPy 1.13
    x = jnp.array([1 + 1j, 2 - 1j, -2 + 3j])
    lse, sign = jsoftmax.logsumexp(x, return_sign=True)
    expected_sumexp = jnp.exp(x).sum()
    expected_sign = expected_sumexp / abs(expected_sumexp).astype(x.dtype)
    assert lse.dtype == sign.real.dtype
    assert_all_close(sign, expected_sign, rtol=1e-6)
    assert_all_close(sign * np.exp(lse).astype(x.dtype), expected_sumexp, rtol=1e-6)


@with_modes()
def test_logsumexp_zeros(mode):
    # Regression test for https://github.com/jax-ml/jax/issues/5370
    a, b = np.array([-1000, -2]), np.array([1, 0])
    f = lambda a, b: jsoftmax.logsumexp(a, b=b)
    assert_all_close(f(a, b), osp_special.logsumexp(a, b=b))
    assert_all_close(jax.jit(f)(a, b), f(a, b))


@with_modes()
def test_logsumexp_ones(mode):
    # Regression test for https://github.com/jax-ml/jax/issues/7390
    a = np.ones(4, dtype="float32")
    with jax.debug_infs(True):
        assert_all_close(jsoftmax.logsumexp(a), osp_special.logsumexp(a))
        assert_all_close(jax.jit(jsoftmax.logsumexp)(a), jsoftmax.logsumexp(a))


@with_modes("kwargs", lambda m: [({},), ({"b": 1.0},)])
def test_logsumexp_nans(mode, kwargs):
    # Regression test for https://github.com/jax-ml/jax/issues/7634
    with jax.debug_nans(True), jax.disable_jit():
        assert jsoftmax.logsumexp(1.0, **kwargs) == 1.0


@with_modes()
def test_logsumexp_infs(mode):
    out, sign = jsoftmax.logsumexp(jnp.array([1.0, np.inf]), return_sign=True)
    assert out == np.inf
    assert sign == 1.0


@with_modes("shape,dtype", lambda m: [((n,), d) for n in range(6) for d in floating(m)])
def test_logsumexp_where(mode, shape, dtype):
    rng = _rng(mode, shape, dtype.__name__)
    x = rand_default(rng, shape, dtype)
    mask = rand_bool(rng, shape)
    y_expected = osp_special.logsumexp(x[mask]) if mask.any() else -jnp.inf
    y_actual = jsoftmax.logsumexp(x, where=mask)
    assert_all_close(y_actual, y_expected, check_dtypes=False)


@with_modes()
def test_logsumexp_where_grad(mode):
    x = jnp.array([0.0, 0.0, 0.0, 0.0, 100.0])
    g = jax.grad(lambda x: jsoftmax.logsumexp(x, where=jnp.arange(5) < 4))(x)
    assert_all_close(g, jnp.array([0.25, 0.25, 0.25, 0.25, 0.0]))


# The result dtype with weights: jax.nn.logsumexp promotes a and b together
# (promote_args_inexact), so a bool or integer b keeps a 16-bit a's dtype and
# a 64-bit integer b does not widen a float32 a under x64.
LSE_WEIGHT_DTYPES = [
    ("bfloat16", "bool"),
    ("float16", "int32"),
    ("float16", "int8"),
    ("bfloat16", "float32"),
    ("int8", "float16"),
    ("int32", "int32"),
    ("float32", "int64"),
    ("float32", "python int"),
    ("bfloat16", "python float"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("a_dtype, b_dtype", LSE_WEIGHT_DTYPES)
def test_logsumexp_result_dtype_with_weights_matches_jax(mode, a_dtype, b_dtype):
    with jax.enable_x64(mode == "x64"):
        a = jnp.asarray([[1, 2, 3], [0, 1, 1]], a_dtype)
        b = {"python int": 2, "python float": 0.5}.get(b_dtype)
        b = jnp.asarray([[1, 0, 1], [1, 1, 1]], b_dtype) if b is None else b
        want = jax.nn.logsumexp(a, axis=1, b=b)
        got = jsoftmax.logsumexp(a, axis=1, b=b)
        assert got.dtype == want.dtype
        got_sign = jsoftmax.logsumexp(a, axis=1, b=b, return_sign=True)
        assert all(v.dtype == want.dtype for v in got_sign)
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                   rtol=1e-2 if want.dtype.itemsize == 2 else 1e-6)
