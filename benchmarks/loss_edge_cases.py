"""What optax and jsoftmax return on the cross-entropy edge cases.

Run ``python benchmarks/loss_edge_cases.py`` to print the Markdown table in
the README; ``tests/test_losses.py`` runs ``edge_case_table`` so the table
cannot go stale silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax

INF = float("inf")


def _cases():
    """(name, kind, logits, labels, where)."""
    x3 = [0.0, -INF, 1.0]
    return [
        ("logit -inf, label 0 (probability labels)", "dense", x3, [0.0, 0.0, 1.0], None),
        ("logit -inf elsewhere (integer label)", "int", x3, 2, None),
        ("positive label on a -inf logit", "dense", x3, [0.0, 1.0, 0.0], None),
        ("integer label on a -inf logit", "int", x3, 1, None),
        ("every logit -inf", "int", [-INF, -INF, -INF], 0, None),
        ("every class masked by `where`", "dense", [0.5, 1.0, 2.0], [1.0, 0.0, 0.0],
         [False, False, False]),
        ("integer label on a masked class", "int", [0.5, 1.0, 2.0], 0,
         [False, True, True]),
        ("integer label 3 of 3 classes, under jit", "int", [0.5, 1.0, 2.0], 3, None),
        ("integer label -1, under jit", "int", [0.5, 1.0, 2.0], -1, None),
        ("masked example with padding label -1", "int", [0.5, 1.0, 2.0], -1,
         [False, False, False]),
        ("label smoothing 0.1 with a -inf logit", "smooth", x3, 2, None),
    ]


def _optax(kind, x, y, where):
    if kind == "dense":
        return optax.softmax_cross_entropy(x, y, where=where)
    if kind == "int":
        return optax.softmax_cross_entropy_with_integer_labels(x, y, where=where)
    labels = optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(x, labels, where=where)


def _ours(kind, x, y, where):
    if kind == "dense":
        return jsoftmax.softmax_cross_entropy(x, y, where=where)
    if kind == "int":
        return jsoftmax.softmax_cross_entropy_with_integer_labels(x, y, where=where)
    return jsoftmax.softmax_cross_entropy_with_integer_labels(
        x, y, where=where, label_smoothing=0.1
    )


def describe_value(value) -> str:
    value = float(value)
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def describe_grad(grad) -> str:
    grad = np.asarray(grad)
    if np.isnan(grad).any():
        return "NaN"
    if not np.isfinite(grad).all():
        return "inf"
    if (grad == 0).all():
        return "0"
    return "finite"


def edge_case_table() -> list[dict[str, str]]:
    """Measures loss and gradient (in the logits) of both libraries, under jit."""
    rows = []
    for name, kind, logits, labels, where in _cases():
        x = jnp.asarray(logits, jnp.float32)
        y = jnp.asarray(labels, jnp.float32 if kind == "dense" else jnp.int32)
        w = None if where is None else jnp.asarray(where)
        row = {"case": name}
        for lib, loss in (("optax", _optax), ("jsoftmax", _ours)):
            value, grad = jax.jit(
                jax.value_and_grad(lambda x, y, w, loss=loss, kind=kind: loss(kind, x, y, w))
            )(x, y, w)
            row[f"{lib} loss"] = describe_value(value)
            row[f"{lib} grad"] = describe_grad(grad)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    """The rows as a Markdown table."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    print(f"optax {optax.__version__}, jax {jax.__version__}, jsoftmax {jsoftmax.__version__}")
    print(format_table(edge_case_table()))


if __name__ == "__main__":
    main()
