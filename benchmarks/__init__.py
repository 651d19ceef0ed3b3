"""Benchmarks: `make bench` runs them side by side and writes benchmarks/RESULTS.md."""
