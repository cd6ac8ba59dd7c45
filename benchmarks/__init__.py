"""Benchmarks: ``python -m benchmarks [names] [--quick]`` from the repository root."""
