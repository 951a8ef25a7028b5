"""Benchmarks: the pipeline measured against this machine's own ceilings (``python -m bench``).

Never part of the test suite's pass/fail: they print absolute figures and ratios. See
docs/performance.md for a run, the machine it ran on, and what each figure means.
"""
