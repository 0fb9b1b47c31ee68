"""What the hand-written formulas and jsoftmax return for entropy, KL and
segment softmax on masked, -inf and empty-segment inputs.

Run ``python benchmarks/family_edge_cases.py`` to print the Markdown table in
the README; ``tests/test_family_edge_cases.py`` runs ``edge_case_table`` so
the table cannot go stale silently. The hand-written formulas are
``-sum(softmax * log_softmax)``, ``sum(p * (log_p - log_q))`` and jraph's
segment_softmax (segment_max, exp, segment_sum, gather).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsoftmax
from benchmarks.edge_cases import format_value
from benchmarks.loss_edge_cases import describe_grad, format_table

INF = float("inf")
SEGMENT_IDS = (0, 0, 1, 1)  # two segments of two entries, plus an empty one
NUM_SEGMENTS = 3


def _hand_entropy(x, where):
    p = jax.nn.softmax(x, where=where)
    return -jnp.sum(p * jax.nn.log_softmax(x, where=where))


def _hand_kl(p_logits, q_logits, where):
    p = jax.nn.softmax(p_logits, where=where)
    log_p = jax.nn.log_softmax(p_logits, where=where)
    return jnp.sum(p * (log_p - jax.nn.log_softmax(q_logits, where=where)))


def _jraph_segment_softmax(x, ids):
    maxs = jax.ops.segment_max(x, ids, NUM_SEGMENTS)
    e = jnp.exp(x - maxs[ids])
    return e / jax.ops.segment_sum(e, ids, NUM_SEGMENTS)[ids]


def _cases():
    """(name, hand-written fn, jsoftmax fn, args); each fn maps args to an array,
    differentiated in its first argument."""
    q = jnp.array([0.0, 1.0, 2.0])
    ids = jnp.array(SEGMENT_IDS)
    seg = lambda x: jsoftmax.segment_softmax(x, ids, NUM_SEGMENTS)
    return [
        ("entropy, an action masked by a -inf logit", _hand_entropy,
         lambda x, w: jsoftmax.entropy(x, where=w), (jnp.array([0.0, 1.0, -INF]), None)),
        ("entropy, every action masked by `where`", _hand_entropy,
         lambda x, w: jsoftmax.entropy(x, where=w),
         (jnp.array([0.5, 1.0, 2.0]), jnp.array([False, False, False]))),
        ("entropy, two logits +inf", _hand_entropy, lambda x, w: jsoftmax.entropy(x, where=w),
         (jnp.array([INF, INF, 0.0]), None)),
        ("KL, a -inf logit in p (grad in q)", lambda q, p, w: _hand_kl(p, q, w),
         lambda q, p, w: jsoftmax.kl_divergence(p, q, where=w),
         (q, jnp.array([0.0, 0.0, -INF]), None)),
        ("KL, the same -inf logit in p and q (grad in q)", lambda q, p, w: _hand_kl(p, q, w),
         lambda q, p, w: jsoftmax.kl_divergence(p, q, where=w),
         (jnp.array([0.0, 1.0, -INF]), jnp.array([0.0, 0.0, -INF]), None)),
        ("KL, q -inf where p > 0 (grad in q)", lambda q, p, w: _hand_kl(p, q, w),
         lambda q, p, w: jsoftmax.kl_divergence(p, q, where=w),
         (jnp.array([0.0, -INF, 2.0]), jnp.array([0.0, 0.0, 1.0]), None)),
        ("KL, every entry masked by `where` (grad in q)", lambda q, p, w: _hand_kl(p, q, w),
         lambda q, p, w: jsoftmax.kl_divergence(p, q, where=w),
         (q, jnp.array([0.0, 0.0, 1.0]), jnp.array([False, False, False]))),
        ("segment_softmax, a segment of -inf logits", lambda x: _jraph_segment_softmax(x, ids),
         seg, (jnp.array([0.0, 1.0, -INF, -INF]),)),
        ("segment_softmax, a +inf logit", lambda x: _jraph_segment_softmax(x, ids), seg,
         (jnp.array([0.0, INF, 1.0, 2.0]),)),
        ("segment_softmax, id -1 (in no segment)",
         lambda x: _jraph_segment_softmax(x, jnp.array([0, 0, 1, -1])),
         lambda x: jsoftmax.segment_softmax(x, jnp.array([0, 0, 1, -1]), NUM_SEGMENTS),
         (jnp.array([0.0, 1.0, 2.0, 3.0]),)),
    ]


def _projection(out):
    """A weighted sum of the output: the sum of a softmax is constant, so its
    gradient would be 0 however well it is defined."""
    return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))


def edge_case_table() -> list[dict[str, str]]:
    """Value and gradient (in the first argument, of :func:`_projection`) of
    both, under jit."""
    rows = []
    for name, hand, ours, args in _cases():
        row = {"case": name}
        for lib, fn in (("hand-written", hand), ("jsoftmax", ours)):
            grad = jax.jit(jax.grad(lambda *a, fn=fn: _projection(fn(*a))))(*args)
            row[f"{lib} value"] = format_value(jax.jit(fn)(*args))
            row[f"{lib} grad"] = describe_grad(grad)
        rows.append(row)
    return rows


def main() -> None:
    print(f"jax {jax.__version__}, jsoftmax {jsoftmax.__version__}")
    print(format_table(edge_case_table()))


if __name__ == "__main__":
    main()
