"""Helpers shared by the tests (not fixtures: those live in ``conftest.py``).

Import them as ``from tests.helpers import TOL, to_lib, to_numpy``: ``tests/`` and
``tests/cuda_sim/`` are packages (``__init__.py``), so pytest's default import mode puts the
repository root on ``sys.path`` and the two ``conftest.py`` files get distinct module names
(``tests.conftest``, ``tests.cuda_sim.conftest``). Never import from ``conftest``: which of
the two a bare ``import conftest`` finds depends on the folders collected.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

LIBRARIES = ("numpy", "torch", "array_api_strict")
DTYPES = ("float32", "float64")
#: Relative tolerance for "same algorithm, same data" comparisons, by dtype.
TOL = {"float32": 1e-4, "float64": 1e-6}


def load_library(name):
    """The module for ``name``, or a pytest skip if it is not installed."""
    if name == "numpy":
        return np
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed")


def to_lib(array, lib, dtype=None):
    """``array`` (NumPy or nested lists) as an array of library ``lib`` with ``dtype``."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    if lib == "numpy":
        return array
    module = load_library(lib)
    if lib == "torch":
        return module.from_numpy(np.ascontiguousarray(array))
    return module.asarray(array)


def to_numpy(array):
    """Any array (torch with grad included) as a NumPy float64 array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def library_of(array):
    """The library name an array belongs to, as in ``LIBRARIES``."""
    module = type(array).__module__.split(".")[0]
    return {"numpy": "numpy", "torch": "torch", "array_api_strict": "array_api_strict"}.get(module, module)


def skip_unless_keops_works(dim=3):
    """Skip the calling test (module, in an autouse fixture) when KeOps cannot compile or run here."""
    import array_api_compat
    import torch

    from ot_agnostic.backends import Method
    from ot_agnostic.backends.keops import KeOpsPlugin

    x = torch.zeros(1, 2, dim, dtype=torch.float64)
    plugin = KeOpsPlugin()
    if not plugin.supports(array_api_compat.array_namespace(x), x, Method.ONLINE):
        pytest.skip(f"KeOps is unusable here: {plugin._errors['cpu']}")


def random_measures(rng, shape=(), N=25, M=20, D=3, shift=0.1, floor=0.2, unbalanced=False):
    """Points in the unit cube (``y`` shifted by ``shift``) and random weights above ``floor``,
    normalised to mass 1 (``b`` to 1.3 when ``unbalanced``); ``shape`` is a batch shape."""
    x = rng.random(shape + (N, D))
    y = rng.random(shape + (M, D)) + shift
    a = rng.random(shape + (N,)) + floor
    b = rng.random(shape + (M,)) + floor
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.3 if unbalanced else 1.0)
    return x, y, a, b
