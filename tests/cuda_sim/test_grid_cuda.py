"""The Numba CUDA grid kernel and convolver (``ot_agnostic.kernels.cuda_grid``,
``ot_agnostic.backends.grid_cuda``), on Numba's CUDA simulator.

References: a dense NumPy log-sum-exp written here (the kernel), and the pure Array API
grid path (``backend="array_api"``) for whole solves, which computes the same schedule
with a different summation order: values, potentials and gradients agree to 1e-10
(float64) / 1e-4 (float32), the float32 bound being a few hundred ulps of the value.
CuPy is not needed: ``CudaGridBackend(host_arrays=True)`` takes NumPy arrays and torch
CPU tensors, which the simulator runs on the CPU.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from ot_agnostic import grids
from ot_agnostic._array_api import LOG_ZERO
from ot_agnostic.backends import grid_cuda
from ot_agnostic.kernels import cuda_grid

RTOL = {"float32": 1e-4, "float64": 1e-10}


@pytest.fixture(autouse=True)
def small_grid_blocks(monkeypatch):
    """16 threads per block: the simulator runs each thread as a Python thread."""
    monkeypatch.setattr(cuda_grid, "THREADS_PER_BLOCK", 16)


@pytest.fixture
def host_backend(monkeypatch):
    backend = grid_cuda.CudaGridBackend(host_arrays=True)
    monkeypatch.setattr(grid_cuda, "BACKEND", backend)
    return backend


def _dense_log_gauss(h, x, y, eps):
    """``log sum_j exp(h[p, j, q] - (x_i - y_j)**2 / (2 eps))`` by a dense float64 NumPy sum."""
    h = h.astype(np.float64)
    t = h[:, None, :, :] - ((x[:, None] - y[None, :]) ** 2 / (2 * eps))[None, :, :, None]
    top = t.max(axis=2)
    with np.errstate(invalid="ignore"):  # a line of -inf: top - top
        return top + np.log(np.exp(t - top[:, :, None, :]).sum(axis=2))


def _close(mine, ref, dtype):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(mine))
    assert np.abs(mine - ref).max() <= RTOL[dtype] * max(np.abs(ref).max(), 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("Q", [1, 3])
def test_kernel_matches_a_dense_log_sum_exp(dtype, Q):
    rng = np.random.default_rng(0)
    P, n, m = 2, 7, 5
    h = rng.normal(size=(P, n, Q)).astype(dtype)
    h[0, 2] = LOG_ZERO  # empty voxels drop out
    x_axis, y_axis = (0.3, 0.5, m), (-0.2, 0.4, n)
    out = np.empty((P, m, Q), dtype)
    cuda_grid.log_gauss_axis(h, out, x_axis, y_axis, 0.3)
    x = 0.3 + 0.5 * np.arange(m)
    y = -0.2 + 0.4 * np.arange(n)
    _close(out, _dense_log_gauss(h, x, y, 0.3), dtype)


def test_kernel_is_stable_at_tiny_temperatures_and_propagates_empty_lines_and_nan():
    h = np.zeros((3, 4, 1))
    h[1] = -np.inf  # an empty line: -inf, not NaN
    h[2, 1] = np.nan
    out = np.empty((3, 2, 1))
    # eps = 1e-6: the exponents reach -4e5; a plain exp-sum would underflow to log(0)
    cuda_grid.log_gauss_axis(h, out, (0.5, 1.0, 2), (0.0, 1.0, 4), 1e-6)
    expected = _dense_log_gauss(h[:1], np.array([0.5, 1.5]), np.arange(4.0), 1e-6)
    assert np.allclose(out[0], expected[0], rtol=1e-12)
    assert np.all(out[1] == -np.inf)
    assert np.all(np.isnan(out[2]))


def test_kernel_rejects_bad_arguments_with_a_fix():
    h = np.zeros((1, 4, 1))
    with pytest.raises(TypeError, match="float32 or both float64"):
        cuda_grid.log_gauss_axis(h, np.empty((1, 2, 1), np.float32), (0, 1, 2), (0, 1, 4), 1.0)
    with pytest.raises(ValueError, match=r"\(P, 3, Q\)"):
        cuda_grid.log_gauss_axis(h, np.empty((1, 2, 1)), (0, 1, 2), (0, 1, 3), 1.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        cuda_grid.log_gauss_axis(h, np.empty((1, 2, 1)), (0, 1, 2), (0, 1, 4), 0.0)
    with pytest.raises(TypeError, match="CUDA array"):
        cuda_grid.log_gauss_axis([[[0.0]]], np.empty((1, 1, 1)), (0, 1, 1), (0, 1, 1), 1.0)


def _densities(rng, shape, dtype, batch=None):
    full = (batch, *shape) if batch else shape
    a = rng.random(full) ** 3 + 1e-3
    b = np.roll(rng.random(full) ** 3, 2, axis=-1) + 1e-3
    a[..., 0, :] = 0.0  # empty voxels
    norm = tuple(range(-len(shape), 0))
    a /= a.sum(axis=norm, keepdims=True)
    b /= b.sum(axis=norm, keepdims=True)
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize(
    "shape, dtype, batch, reach, spacing",
    [
        ((6, 5), "float64", None, None, 1.0),
        ((5, 4, 3), "float64", 2, 3.0, (1.0, 0.5, 2.0)),
        ((6, 5), "float32", 2, None, (0.5, 1.0)),
    ],
)
def test_solve_matches_the_array_api_path(host_backend, shape, dtype, batch, reach, spacing):
    rng = np.random.default_rng(1)
    a, b = _densities(rng, shape, dtype, batch)
    # tol=None: the same fixed schedule on both paths, so the same numbers
    common = dict(blur=1.0, reach=reach, spacing=spacing, tol=None, batch=batch is not None)
    mine = grids.sinkhorn(a, b, backend="numba_cuda", **common)
    ref = grids.sinkhorn(a, b, backend="array_api", **common)
    assert mine.backend == "numba_cuda/grid"
    _close(mine.value, ref.value, dtype)
    for name in ("f", "g", "f_aa", "g_bb"):
        _close(getattr(mine, name), getattr(ref, name), dtype)


def test_divergence_and_its_gradient_on_torch_tensors_match_the_array_api_path(host_backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a, b = _densities(rng, (6, 5), "float64")
    values, grads = [], []
    for backend in ("numba_cuda", "array_api"):
        ta = torch.tensor(a, requires_grad=True)
        value = grids.sinkhorn_divergence(ta, torch.tensor(b), blur=1.0, tol=None, backend=backend)
        value.backward()
        values.append(value.item())
        grads.append(ta.grad.numpy())
    assert abs(values[0] - values[1]) <= 1e-10 * abs(values[1])
    _close(grads[0], grads[1], "float64")


def test_barycenter_matches_the_array_api_path(host_backend):
    rng = np.random.default_rng(3)
    A = np.stack(_densities(rng, (8, 7), "float64"))
    mine = grids.barycenter(A, blur=1.5, tol=1e-6, backend="numba_cuda")
    ref = grids.barycenter(A, blur=1.5, tol=1e-6, backend="array_api")
    # both converged to tol 1e-6 on the marginals: the densities agree to that order
    assert np.abs(np.asarray(mine.density) - np.asarray(ref.density)).sum() <= 1e-5


def test_numba_cuda_backend_refuses_host_arrays_without_the_test_switch():
    a = np.full((4, 4), 1 / 16)
    with pytest.raises(ValueError, match="CuPy arrays and torch CUDA tensors"):
        grids.sinkhorn_divergence(a, a, blur=1.0, backend="numba_cuda")


def test_a_failing_self_test_raises_when_asked_and_falls_back_once_on_auto(host_backend, monkeypatch, caplog):
    def broken():
        raise ImportError("the Numba CUDA grid kernel is unavailable (no libNVVM). install it")

    monkeypatch.setattr(grid_cuda, "load_kernels", broken)
    monkeypatch.setattr(grid_cuda, "is_gpu_array", lambda x: True)  # as a CuPy array would be
    a, b = _densities(np.random.default_rng(4), (6, 5), "float64")
    with pytest.raises(ImportError, match="no libNVVM"):
        grids.sinkhorn_divergence(a, b, blur=1.0, backend="numba_cuda")
    with caplog.at_level(logging.WARNING, logger="ot_agnostic"):
        auto = grids.sinkhorn(a, b, blur=1.0, tol=None)
        grids.sinkhorn(a, b, blur=1.0, tol=None)
    assert auto.backend == "array_api/grid"
    assert sum("no libNVVM" in r.getMessage() for r in caplog.records) == 1
    ref = grids.sinkhorn(a, b, blur=1.0, tol=None, backend="array_api")
    assert math.isclose(float(auto.value), float(ref.value), rel_tol=1e-12)
