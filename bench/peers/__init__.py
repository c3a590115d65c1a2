"""Side-by-side comparison of tether with supervisord, circus and plain Python.

Entry point: ``python bench/compare.py [--quick]`` (see bench/peers/README.md).
"""
