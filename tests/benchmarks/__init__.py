"""Benchmarks: run by hand (`python -m tests.benchmarks.run`), never collected by pytest."""
