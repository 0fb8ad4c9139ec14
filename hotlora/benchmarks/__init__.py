"""Benchmarks behind ``hotlora bench``: each records machine, commit and command beside its numbers."""
