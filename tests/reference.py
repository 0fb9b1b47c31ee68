"""float64 NumPy and mpmath references for the tests of entropy, KL and the
segment functions. Written from the definitions, sharing no code with the
library: a slice is a 1-D float64 row, excluded entries are given by a
boolean row (or -inf)."""

from __future__ import annotations

import mpmath
import numpy as np

INF = np.inf


def probabilities(row, keep=None, t=1.0):
    """softmax(row / t) over the kept, non -inf entries; all 0 if none.
    t = 0 is uniform over the maxima and t = inf uniform over the kept."""
    row = np.asarray(row, np.float64)
    keep = np.ones(row.shape, bool) if keep is None else np.asarray(keep, bool)
    keep = keep & (row > -INF)
    out = np.zeros(row.shape)
    if not keep.any():
        return out
    if np.isnan(row[keep]).any() or np.isnan(t):
        return np.full(row.shape, np.nan)
    kept = row[keep]
    m = kept.max()
    if m == INF or t == 0:
        top = kept == m
        out[keep] = top / top.sum()
    elif t == INF:
        out[keep] = 1.0 / keep.sum()
    else:
        e = np.exp((kept - m) / t)
        out[keep] = e / e.sum()
    return out


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


def segment_apply(fn, x, ids, num_segments, keep=None, t=None):
    """Applies a row function ``fn(row, keep, t) -> row`` to each segment
    and each trailing index of ``x`` ([E, ...]): the dense softmax of the
    segment's entries (entries of other segments are simply not in the row).
    ``t`` is None or an array broadcastable to [num_segments, ...]."""
    x = np.asarray(x, np.float64)
    ids = np.asarray(ids)
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(keep, x.shape)
    trailing = x.shape[1:]
    temps = np.broadcast_to(
        np.ones(()) if t is None else np.asarray(t, np.float64), (num_segments, *trailing)
    )
    out = np.full(x.shape, np.nan)
    for g in range(num_segments):
        members = ids == g
        for idx in np.ndindex(*trailing):
            sl = (members, *idx)
            out[sl] = fn(x[sl], keep[sl], float(temps[(g, *idx)]))
    return out


def segment_logsumexp(x, ids, num_segments, keep=None, t=None):
    """t log sum exp(x / t) per segment and trailing index, -inf if empty."""
    x = np.asarray(x, np.float64)
    ids = np.asarray(ids)
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(keep, x.shape)
    trailing = x.shape[1:]
    temps = np.broadcast_to(
        np.ones(()) if t is None else np.asarray(t, np.float64), (num_segments, *trailing)
    )
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
