"""Tests on Numba's CUDA simulator (a package: see ``tests/helpers.py``)."""
