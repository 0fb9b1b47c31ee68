"""Benchmarks and the edge battery for jsoftmax (see BENCHMARKS.md)."""
