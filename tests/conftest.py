"""Shared fixtures: every test runs on each available array library and dtype.

``lib`` is one of "numpy", "torch", "array_api_strict" (skipped with a reason when the
library is missing); ``dtype`` is "float32" or "float64". Use ``to_lib`` / ``to_numpy``
to move data in and out, and ``TOL[dtype]`` for library-independent tolerances.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

LIBRARIES = ("numpy", "torch", "array_api_strict")
DTYPES = ("float32", "float64")
#: Relative tolerance for "same algorithm, same data" comparisons, by dtype.
TOL = {"float32": 1e-4, "float64": 1e-6}

os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(os.path.dirname(__file__), "..", ".keops_cache"))

# tests/cuda_sim runs on Numba's CUDA simulator, which Numba reads from NUMBA_ENABLE_CUDASIM
# when it is first imported: it runs in a process of its own, after the main suite
# (scripts/test.sh: `NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim`).
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") else ["cuda_sim"]


def load_library(name):
    """The module for ``name``, or a pytest skip if it is not installed."""
    if name == "numpy":
        return np
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed")


@pytest.fixture(params=LIBRARIES)
def lib(request):
    load_library(request.param)
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


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


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture(scope="module")
def geomloss():
    pytest.importorskip("torch", reason="GeomLoss needs torch")
    return pytest.importorskip("geomloss", reason="GeomLoss is not installed")


@pytest.fixture(scope="module")
def keops(geomloss):
    """GeomLoss's KeOps ("online") backend, skipped when KeOps cannot compile here."""
    pytest.importorskip("pykeops", reason="pykeops is not installed")
    import torch

    try:
        x = torch.rand(5, 2, dtype=torch.float64)
        geomloss.SamplesLoss("sinkhorn", p=1, backend="online")(x, x + 1)
    except Exception as err:  # pragma: no cover - depends on the machine's compiler
        pytest.skip(f"KeOps cannot run here: {err}")
    return geomloss
