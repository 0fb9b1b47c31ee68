"""The README's table of entropy, KL and segment softmax edge cases is measured
by benchmarks/family_edge_cases.py; this keeps it from going stale."""

from benchmarks import family_edge_cases


def test_family_edge_case_table_runs_and_agrees(edge_tables):
    rows = edge_tables.rows("family_edge_cases")  # edge_case_table(), once per test run
    assert family_edge_cases.format_table(rows).count("\n") == len(rows) + 1
    ours = {row["case"]: (row["jsoftmax value"], row["jsoftmax grad"]) for row in rows}
    assert ours == {
        "entropy, an action masked by a -inf logit": ("0.5822", "finite"),
        "entropy, every action masked by `where`": ("0", "0"),
        "entropy, two logits +inf": ("0.6931", "0"),
        "KL, a -inf logit in p (grad in q)": ("1.214", "finite"),
        "KL, the same -inf logit in p and q (grad in q)": ("0.1201", "finite"),
        "KL, q -inf where p > 0 (grad in q)": ("inf", "0"),
        "KL, every entry masked by `where` (grad in q)": ("0", "0"),
        "segment_softmax, a segment of -inf logits": ("[0.2689, 0.7311, 0, 0]", "finite"),
        "segment_softmax, a +inf logit": ("[0, 1, 0.2689, 0.7311]", "finite"),
        "segment_softmax, id -1 (in no segment)": ("[0.2689, 0.7311, 1, 0]", "finite"),
    }
    # What the formulas users write give on the same inputs.
    hand = {row["case"]: row["hand-written value"] for row in rows}
    assert hand["entropy, an action masked by a -inf logit"] == "nan"
    assert hand["segment_softmax, a segment of -inf logits"].endswith("nan, nan]")
