"""float64 NumPy and mpmath references shared by the tests, written from the
definitions and sharing no code with the library. Row functions take a 1-D
slice, excluded entries given by a boolean row (or -inf); the others take
arrays with an axis, as NumPy does."""

from __future__ import annotations

import mpmath
import numpy as np

INF = np.inf


def probabilities(row, keep=None, t=1.0):
    """exp of :func:`log_probabilities` (all 0 where nothing is kept)."""
    row = np.asarray(row, np.float64)
    keep = np.ones(row.shape, bool) if keep is None else np.asarray(keep, bool)
    return np.exp(log_probabilities(row, keep, t))


def entropy(row, keep=None, t=1.0):
    """-sum p log p of :func:`probabilities`, 0 log 0 = 0."""
    p = probabilities(row, keep, t)
    if np.isnan(p).any():
        return np.nan
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(p[nz])))


def kl_divergence(row_p, row_q, keep=None, t=1.0):
    """sum p (log p - log q) with p and q from :func:`probabilities`."""
    p, q = probabilities(row_p, keep, t), probabilities(row_q, keep, t)
    if np.isnan(p).any() or np.isnan(q).any():
        return np.nan
    nz = p > 0
    if (q[nz] == 0).any():
        return INF
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def mp_entropy(row):
    """The entropy of softmax(row) to 50 digits (finite rows)."""
    with mpmath.workdps(50):
        xs = [mpmath.mpf(float(v)) for v in row]
        m = max(xs)
        s = mpmath.fsum(mpmath.exp(v - m) for v in xs)
        ps = [mpmath.exp(v - m) / s for v in xs]
        return float(-mpmath.fsum(p * mpmath.log(p) for p in ps if p > 0))


def _mp_point(*rows_and_t):
    return [mpmath.mpf(float(v)) for r in rows_and_t for v in np.ravel(r)]


def _mp_log_softmax(xs, t):
    zs = [x / t for x in xs]
    m = max(zs)
    log_s = mpmath.log(mpmath.fsum(mpmath.exp(z - m) for z in zs))
    return [z - m - log_s for z in zs]


def _mp_derivatives(f, point, n):
    """The gradient of ``f`` at ``point`` (all its variables) and the Hessian
    in its first ``n`` variables, by mpmath's numerical differentiation."""
    k = len(point)
    unit = lambda *idx: tuple(sum(i == j for j in idx) for i in range(k))
    grad = [mpmath.diff(f, point, unit(i)) for i in range(k)]
    hess = [[mpmath.diff(f, point, unit(i, j)) for j in range(n)] for i in range(n)]
    return np.array(grad, np.float64), np.array(hess, np.float64)


def mp_entropy_derivatives(row, t=1.0):
    """``(grad, hess)`` of the entropy of softmax(row / t) to 30 digits,
    independent of any closed form: ``grad`` in (row..., t), ``hess`` in row
    (finite rows, t > 0)."""
    n = len(row)

    def h(*v):
        log_p = _mp_log_softmax(v[:n], v[n])
        return -mpmath.fsum(mpmath.exp(lp) * lp for lp in log_p)

    with mpmath.workdps(60):
        return _mp_derivatives(h, _mp_point(row, [t]), n)


def mp_kl_gradients(row_p, row_q, t=1.0):
    """The gradient of KL(softmax(row_p / t) || softmax(row_q / t)) in
    (row_p..., row_q..., t), to 30 digits by numerical differentiation."""
    n = len(row_p)

    def kl(*v):
        log_p, log_q = _mp_log_softmax(v[:n], v[2 * n]), _mp_log_softmax(v[n : 2 * n], v[2 * n])
        return mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))

    with mpmath.workdps(60):
        return _mp_derivatives(kl, _mp_point(row_p, row_q, [t]), 0)[0]


def _segment_inputs(x, ids, num_segments, keep, t):
    """float64 ``x``, the ids, the keep mask of ``x``'s shape, the trailing
    shape and the temperature per segment and trailing index."""
    x = np.asarray(x, np.float64)
    ids = np.asarray(ids)
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(keep, x.shape)
    trailing = x.shape[1:]
    temps = np.broadcast_to(
        np.ones(()) if t is None else np.asarray(t, np.float64), (num_segments, *trailing)
    )
    return x, ids, keep, trailing, temps


def segment_apply(fn, x, ids, num_segments, keep=None, t=None):
    """Applies a row function ``fn(row, keep, t) -> row`` to each segment
    and each trailing index of ``x`` ([E, ...]): the dense softmax of the
    segment's entries (entries of other segments are simply not in the row).
    ``t`` is None or an array broadcastable to [num_segments, ...]."""
    x, ids, keep, trailing, temps = _segment_inputs(x, ids, num_segments, keep, t)
    out = np.full(x.shape, np.nan)
    for g in range(num_segments):
        members = ids == g
        for idx in np.ndindex(*trailing):
            sl = (members, *idx)
            out[sl] = fn(x[sl], keep[sl], float(temps[(g, *idx)]))
    return out


def segment_logsumexp(x, ids, num_segments, keep=None, t=None):
    """t log sum exp(x / t) per segment and trailing index, -inf if empty."""
    x, ids, keep, trailing, temps = _segment_inputs(x, ids, num_segments, keep, t)
    out = np.full((num_segments, *trailing), -INF)
    for g in range(num_segments):
        for idx in np.ndindex(*trailing):
            row = x[(ids == g, *idx)][keep[(ids == g, *idx)]]
            row = row[row > -INF]
            tt = float(temps[(g, *idx)])
            if row.size == 0:
                continue
            m = row.max()
            if tt == 0 or m == INF:
                out[(g, *idx)] = m
            else:
                out[(g, *idx)] = m + tt * np.log(np.sum(np.exp((row - m) / tt)))
    return out


# ------------------------------------------------- softmax, log_softmax, logsumexp


def log_softmax(x, axis=-1, where=None, t=1.0):
    """float64 NumPy log_softmax for t > 0 and finite, non-empty included sets."""
    x = np.asarray(x, np.float64)
    if where is not None:
        x = np.where(where, x, -INF)
    z = x / np.asarray(t, np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - m - np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))


def softmax(x, axis=-1, where=None, t=1.0):
    return np.exp(log_softmax(x, axis, where, t))


def logsumexp(x, axis=None, t=1.0):
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    out = m + t * np.log(np.sum(np.exp((x - m) / t), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def mp_row(row):
    """mpmath (50 digits) softmax, log_softmax and logsumexp of one row."""
    with mpmath.workdps(50):
        xs = [mpmath.mpf(float(v)) for v in row]
        m = max(xs)
        lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in xs))
        return (
            np.array([float(mpmath.exp(v - lse)) for v in xs]),
            np.array([float(v - lse) for v in xs]),
            float(lse),
        )


def log_probabilities(x, mask, t):
    """log_softmax(x / t) of one 1-D slice, excluded classes -inf."""
    x = np.asarray(x, np.float64)
    kept = mask & (x != -INF)
    out = np.full(x.shape, -INF)
    if not kept.any():
        return out
    if np.isnan(x[kept]).any():
        return np.full(x.shape, np.nan)
    m = x[kept].max()
    if m == INF or t == 0:
        top = kept & (x == m)
        out[top] = -np.log(top.sum())
    elif t == INF:
        out[kept] = -np.log(kept.sum())
    else:
        z = (x[kept] - m) / t
        out[kept] = z - np.log(np.exp(z).sum())
    return out


def _times(a, b):
    """a * b with 0 * inf = 0 (a term of weight 0 is absent)."""
    return 0.0 if a == 0 else a * b


def integer_cross_entropy(x, labels, mask, t, alpha):
    x = np.asarray(x, np.float64)
    n, v = x.shape
    out = np.empty(n)
    for i in range(n):
        kept = mask[i] & (x[i] != -INF)
        if not kept.any():
            out[i] = 0.0
            continue
        if not 0 <= labels[i] < v:
            out[i] = np.nan
            continue
        lp = log_probabilities(x[i], mask[i], t[i])
        ce = -lp[labels[i]]
        smooth = np.mean(-lp[mask[i]])
        out[i] = _times(1 - alpha, ce) + _times(alpha, smooth)
    return out


def dense_cross_entropy(x, labels, mask, t, alpha):
    x = np.asarray(x, np.float64)
    n, v = x.shape
    out = np.empty(n)
    for i in range(n):
        lp = log_probabilities(x[i], mask[i], t[i])
        if (lp == -INF).all():
            out[i] = 0.0
            continue
        y = (1 - alpha) * labels[i] + alpha / max(mask[i].sum(), 1)
        out[i] = -sum(_times(y[j], lp[j]) for j in range(v) if mask[i, j])
    return out


def integer_cross_entropy_gradient(x, labels):
    """d loss / d x per row in float64, by hand: softmax - onehot where the
    loss moves with x (a valid label on a finite logit, in a row without
    +inf), 0 where it is a constant limit (+inf included), NaN for a row
    with a NaN."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for i, (row, label) in enumerate(zip(x, labels, strict=True)):
        if np.isnan(row).any():
            out[i] = np.nan
            continue
        if not 0 <= label < row.size or not np.isfinite(row[label]):
            continue
        if np.isposinf(row).any():  # the label has probability 0: loss +inf
            continue
        else:
            e = np.exp(row - row.max())
            p = e / e.sum()
        out[i] = p - np.eye(row.size)[label]
    return out


def softmax_and_max(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True), m


def split_at_max(name, x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    # Split at the max so that log(1 + tiny) keeps its digits in float64 too.
    top = np.sum(x == m, -1, keepdims=True)
    below = np.sum(np.where(x == m, 0.0, np.exp(x - m)), -1, keepdims=True)
    log_total = np.log(top) + np.log1p(below / top)
    if name == "softmax":
        return np.exp(x - m - log_total)
    if name == "log_softmax":
        return x - m - log_total
    return (m + log_total)[:, 0]


def fused_linear_cross_entropy(h, w, labels, g=None, *, bias=None, cap=None, t=1.0, alpha=0.0,
                               z=0.0, mask=None, weights=None, reduction="none"):
    """The fused loss of ``hidden @ weight`` on materialised float64 logits,
    and the gradients of ``sum(g * loss)`` derived by hand.

    Per example: logits L = h @ w + bias, capped C = cap * tanh(L / cap),
    y = C / t, lse = logsumexp(y), smoothed labels q = (1 - alpha) onehot +
    alpha / V, loss = -q . (y - lse) + z lse² (NaN with zero gradient for a
    label outside [0, V), 0 where ``mask`` is False), times ``weights``;
    ``reduction`` "sum" adds the examples and "mean" divides that by the
    included examples' total weight (0 with zero gradients when it is 0).
    Gradients: d loss / d y = (1 + 2 z lse) softmax(y) - q, d / d C = that / t,
    d / d t = -(d loss / d y) . y / t, d C / d L = 1 - tanh²(L / cap), and
    d C / d cap = tanh(L / cap) - (L / cap) (1 - tanh²(L / cap)).

    Returns (loss, grads) with grads "hidden", "weight", "bias", "weights",
    "cap" and "temperature" (one per example; sum them for a scalar t)."""
    h = np.asarray(h, np.float64)
    w = np.asarray(w, np.float64)
    labels = np.asarray(labels)
    n, v = h.shape[0], w.shape[1]
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    wts = np.broadcast_to(np.asarray(1.0 if weights is None else weights, np.float64), (n,))
    t = np.broadcast_to(np.asarray(t, np.float64), (n,))[:, None]
    logits = h @ w + (0.0 if bias is None else np.asarray(bias, np.float64))
    if cap:
        capped = cap * np.tanh(logits / cap)
    else:
        capped = logits
    y = capped / t
    top = y.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(y - top).sum(axis=1, keepdims=True))
    probs = np.exp(y - lse)
    valid = (labels >= 0) & (labels < v)
    onehot = np.zeros((n, v))
    onehot[np.flatnonzero(valid), labels[valid]] = 1.0
    q = (1 - alpha) * onehot + alpha / v
    per_example = -(q * (y - lse)).sum(axis=1) + z * lse[:, 0] ** 2
    per_example[~valid] = np.nan
    per_example[~keep] = 0.0
    weighted = wts * per_example

    if reduction == "none":
        loss = weighted
        cot = np.ones(n) if g is None else np.asarray(g, np.float64).copy()
        d_weights = cot * per_example
    else:
        g = 1.0 if g is None else float(g)
        total = weighted.sum()
        if reduction == "sum":
            loss = total
            cot = np.full(n, g)
            d_weights = cot * per_example
        else:
            count = (wts * keep).sum()
            loss = 0.0 if count == 0 else total / count
            cot = np.full(n, 0.0 if count == 0 else g / count)
            d_weights = np.where(keep, cot * (per_example - loss), 0.0)
    cot = np.where(keep & valid, cot * wts, 0.0)  # NaN loss, zero gradient
    dy = cot[:, None] * ((1 + 2 * z * lse) * probs - q)
    d_capped = dy / t
    if cap:
        u = np.tanh(logits / cap)
        d_logits = d_capped * (1 - u**2)
        d_cap = (d_capped * (u - logits / cap * (1 - u**2))).sum()
    else:
        d_logits, d_cap = d_capped, 0.0
    grads = {
        "hidden": d_logits @ w.T,
        "weight": np.where((keep & valid)[:, None], h, 0.0).T @ d_logits,
        "bias": d_logits.sum(axis=0),
        "weights": d_weights,
        "cap": d_cap,
        "temperature": -(dy * y).sum(axis=1) / t[:, 0],
    }
    return loss, grads
