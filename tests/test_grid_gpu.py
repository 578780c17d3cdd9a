"""The grid solvers on a real GPU: CuPy arrays and torch CUDA tensors through the Numba CUDA
grid kernel (``backend="numba_cuda"``), against the Numba CPU kernel on NumPy copies.

Skipped (with the reason) without a usable GPU or under Numba's CUDA simulator
(``tests/cuda_sim/test_grid_cuda.py`` covers the kernel there). Run by
``scripts/gpu_check.sh``. Tolerances: 1e-9 (float64) / 1e-4 (float32) relative, the two
kernels summing in different orders (the CPU one banded at the float's precision).
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")
if numba.config.ENABLE_CUDASIM:
    pytest.skip("under Numba's CUDA simulator: see tests/cuda_sim", allow_module_level=True)

from ot_agnostic import grids  # noqa: E402

RTOL = {"float32": 1e-4, "float64": 1e-9}


def _libraries():
    found = []
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            found.append("cupy")
    except Exception:  # not installed, no driver
        pass
    try:
        import torch

        if torch.cuda.is_available():
            found.append("torch")
    except Exception:
        pass
    return found


LIBRARIES = _libraries()
if not LIBRARIES:
    pytest.skip("neither CuPy nor torch sees a CUDA device here", allow_module_level=True)


def _to_gpu(library, a):
    if library == "cupy":
        import cupy

        return cupy.asarray(a)
    import torch

    return torch.as_tensor(a, device="cuda")


def _to_host(x):
    return x.get() if hasattr(x, "get") else x.detach().cpu().numpy()


def _pair(dtype, shape=(40, 36, 12)):
    rng = np.random.default_rng(0)
    a = rng.random(shape) ** 4
    b = np.roll(rng.random(shape) ** 4, 5, axis=0)
    return (a / a.sum()).astype(dtype), (b / b.sum()).astype(dtype)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_grid_solve_matches_the_cpu_kernel(library, dtype):
    a, b = _pair(dtype)
    common = dict(blur=2.0, spacing=(1.0, 1.0, 2.0), tol=None)
    ref = grids.sinkhorn(a, b, backend="numba", **common)
    mine = grids.sinkhorn(_to_gpu(library, a), _to_gpu(library, b), backend="auto", **common)
    assert mine.backend == "numba_cuda/grid"
    assert abs(float(mine.value) - float(ref.value)) <= RTOL[dtype] * abs(float(ref.value))
    for name in ("f", "g"):
        got, want = _to_host(getattr(mine, name)), np.asarray(getattr(ref, name))
        assert np.abs(got - want).max() <= RTOL[dtype] * np.abs(want).max()


@pytest.mark.parametrize("library", LIBRARIES)
def test_gpu_barycenter_matches_the_cpu_kernel(library):
    rng = np.random.default_rng(1)
    A = rng.random((3, 64, 64)) ** 4
    A /= A.sum(axis=(1, 2), keepdims=True)
    ref = grids.barycenter(A, blur=2.0, tol=1e-6, backend="numba")
    mine = grids.barycenter(_to_gpu(library, A), blur=2.0, tol=1e-6)
    # both converged to 1e-6 on the marginals
    assert np.abs(_to_host(mine.density) - ref.density).sum() <= 1e-5
