"""Benchmarks: timing scripts that write JSON results with machine info."""
