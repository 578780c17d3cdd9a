"""Shared fixtures: every test runs on each available array library and dtype.

``lib`` is one of "numpy", "torch", "array_api_strict" (skipped with a reason when the
library is missing); ``dtype`` is "float32" or "float64". The helpers that are not fixtures
(``to_lib`` / ``to_numpy`` to move data in and out, ``TOL[dtype]`` for library-independent
tolerances, ...) are in ``tests/helpers.py``: ``from tests.helpers import TOL, to_lib``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import DTYPES, LIBRARIES, load_library

os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(os.path.dirname(__file__), "..", ".keops_cache"))

# tests/cuda_sim runs on Numba's CUDA simulator, which Numba reads from NUMBA_ENABLE_CUDASIM
# when it is first imported: it runs in a process of its own, after the main suite
# (scripts/test.sh: `NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim`).
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") else ["cuda_sim"]


@pytest.fixture(params=LIBRARIES)
def lib(request):
    load_library(request.param)
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


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
