"""The CuPy plugin (``ot_agnostic.backends.numba_cuda``) end to end, on Numba's CUDA simulator.

CuPy is not needed: ``NumbaCudaPlugin(host_arrays=True)`` also takes NumPy arrays, which
the simulator runs on the CPU. The ``cuda_plugin`` fixture puts it in front of the
registry (``ot_agnostic.backends.PLUGINS``, restored after each test), so that
``backend="online"`` runs it and ``backend="tensorized"`` the pure Array API reference:
values, the four potentials and the gradients agree to 1e-10 (float64) / 1e-4 (float32).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic import backends
from ot_agnostic.backends import Method, PluginId, select_backend
from ot_agnostic.backends.array_api import ArrayAPIPlugin
from ot_agnostic.backends.numba_cuda import NumbaCudaGeometry, NumbaCudaPlugin
from ot_agnostic.costs import Cost, Kernel

RTOL = {"float32": 1e-4, "float64": 1e-10}


@pytest.fixture
def cuda_plugin(monkeypatch):
    plugin = NumbaCudaPlugin(host_arrays=True)
    monkeypatch.setattr(backends, "PLUGINS", [plugin, ArrayAPIPlugin()])
    return plugin


def _data(rng, dtype, batched, unbalanced=False, N=10, M=7, D=2):
    shape = (2,) if batched else ()
    x = rng.random(shape + (N, D)).astype(dtype)
    y = (rng.random(shape + (M, D)) + 0.2).astype(dtype)
    a = rng.random(shape + (N,)) + 0.1
    b = rng.random(shape + (M,)) + 0.1
    a[..., :2] = 0.0  # zero weights must drop out on both paths
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.4 if unbalanced else 1.0)
    return x, y, a.astype(dtype), b.astype(dtype)


def _close(mine, ref, dtype):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    assert np.abs(mine - ref).max() <= RTOL[dtype] * max(np.abs(ref).max(), 1e-12)


# Fewer temperatures than the defaults: each one costs four kernel launches. tol=None: the
# same schedule on both paths, so the same numbers (the refinement is tested below).
SOLVER = dict(blur=0.1, scaling=0.5, tol=None)


@pytest.mark.parametrize(
    "dtype, p, reach, batched",
    [("float64", 1, None, False), ("float64", 2, 0.5, True), ("float32", 2, None, True), ("float32", 1, 0.5, False)],
)
@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None
def test_sinkhorn_matches_the_array_api_reference(cuda_plugin, rng, dtype, p, reach, batched):
    x, y, a, b = _data(rng, dtype, batched, unbalanced=reach is not None)
    kw = dict(p=p, reach=reach, **SOLVER)
    fast = ota.sinkhorn(x, y, a, b, backend="online", **kw)
    ref = ota.sinkhorn(x, y, a, b, backend="tensorized", **kw)
    assert fast.backend == "numba_cuda/online" and ref.backend == "array_api/tensorized"
    assert type(fast.value) is type(ref.value) and fast.value.dtype == np.dtype(dtype)
    for name in ("value", "f", "g", "f_aa", "g_bb"):
        _close(getattr(fast, name), getattr(ref, name), dtype)
    for mine, expected in zip(fast.gradient(), ref.gradient()):
        assert mine.dtype == np.dtype(dtype)
        _close(mine, expected, dtype)


@pytest.mark.parametrize("reach, batched", [(None, False), (0.5, True)])
def test_refinement_to_tol_matches_the_dense_reference(cuda_plugin, rng, reach, batched):
    """tol=1e-9 on the CUDA kernels: converged, and equal to a dense NumPy solver (float64;
    measured gaps ~1e-12 on the CPU paths, see tests/test_precision.py)."""
    from tests.dense_reference import dense_divergence

    x, y, a, b = _data(rng, "float64", batched, unbalanced=reach is not None)
    res = ota.sinkhorn(x, y, a, b, backend="online", blur=0.1, reach=reach, tol=1e-9, max_iter=2000)
    assert res.backend == "numba_cuda/online" and np.all(res.converged)
    values = np.atleast_1d(np.asarray(res.value))
    for k in range(len(values)):
        item = (x, y, a, b) if not batched else (x[k], y[k], a[k], b[k])
        ref = dense_divergence(*item, 2, 0.1, reach)
        assert abs(values[k] - ref) <= 1e-7 * abs(ref)


@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None
def test_value_and_grad_matches_the_array_api_reference(cuda_plugin, rng):
    x, y, a, b = _data(rng, "float64", batched=False)
    value, grads = ota.value_and_grad(x, y, a, b, backend="online", **SOLVER)
    ref_value, ref_grads = ota.value_and_grad(x, y, a, b, backend="tensorized", **SOLVER)
    _close(value, ref_value, "float64")
    for mine, expected in zip(grads, ref_grads):
        _close(mine, expected, "float64")


@pytest.mark.parametrize(
    "loss, kw",
    [
        (ota.energy_distance, {}),
        (ota.gaussian_mmd, {"blur": 0.3}),
        (ota.laplacian_mmd, {"blur": 0.3}),
        (ota.hausdorff_divergence, {"blur": 0.1}),
    ],
)
def test_kernel_losses_match_the_array_api_reference(cuda_plugin, rng, loss, kw):
    x, y, a, b = _data(rng, "float64", batched=True)
    fast = loss(x, y, a, b, backend="online", **kw)
    ref = loss(x, y, a, b, backend="tensorized", **kw)
    assert fast.shape == (2,)
    _close(fast, ref, "float64")


def test_geometry_transport_map_cost_rows_and_transpose(rng):
    x, y, _, b = _data(rng, "float64", batched=True)
    geom = NumbaCudaGeometry(x, y, Cost(1), xp=np)
    ref = backends.array_api.DenseGeometry(x, y, Cost(1), xp=np)
    h = np.log(b)
    _close(geom.softmax_weighted_sum(0.05, h, y), ref.softmax_weighted_sum(0.05, h, y), "float64")
    _close(geom.kernel_sum(Kernel("laplacian", 0.2), b), ref.kernel_sum(Kernel("laplacian", 0.2), b), "float64")
    np.testing.assert_allclose(geom.cost_rows(3, 8), ref.cost_rows(3, 8), rtol=1e-12)
    back = geom.transpose()
    assert back.shape == (2, 7, 10)
    log_a = np.zeros((2, 10))
    _close(back.softmin(0.1, log_a), ref.transpose().softmin(0.1, log_a), "float64")
    # h of another dtype is cast to the points' dtype; the output keeps the points' dtype.
    assert geom.softmin(0.1, h.astype(np.float32)).dtype == np.float64


# --------------------------------------------------------------------------------------
# Selection, errors, fallback
# --------------------------------------------------------------------------------------


def test_selection(cuda_plugin):
    x = np.zeros((4, 2))
    for backend in ("auto", "online", "numba_cuda", "numba_cuda/online"):
        selection = select_backend(np, x, backend, (1, 4, 4, 2))
        assert selection.plugin is cuda_plugin and selection.method is Method.ONLINE
    assert select_backend(np, x, "tensorized", (1, 4, 4, 2)).plugin.id is PluginId.ARRAY_API
    with pytest.raises(ValueError, match="runs 'online'"):
        select_backend(np, x, "numba_cuda/tensorized", (1, 4, 4, 2))
    # More than 64 coordinates: "auto" moves on, the named plugin explains.
    wide = np.zeros((4, 65))
    assert select_backend(np, wide, "auto", (1, 4, 4, 65)).plugin.id is PluginId.ARRAY_API
    with pytest.raises(ValueError, match="1 to 64 coordinates"):
        select_backend(np, wide, "numba_cuda", (1, 4, 4, 65))


def test_only_gpu_arrays_by_default():
    plugin = NumbaCudaPlugin()
    error = plugin.unsupported_error(np, np.zeros((3, 2)), Method.AUTO)
    assert isinstance(error, ValueError) and "CuPy arrays and torch CUDA tensors" in str(error)
    assert not plugin.supports(np, np.zeros((3, 2)), Method.ONLINE)
    error = NumbaCudaPlugin(host_arrays=True).unsupported_error(np, np.zeros((3, 2), np.float16), Method.AUTO)
    assert isinstance(error, ValueError)


def test_broken_cuda_falls_back_once_with_the_fix(monkeypatch, rng, caplog):
    from ot_agnostic.kernels import numba_cuda as kernels

    class NoGPU:
        @staticmethod
        def is_available():
            return False

    monkeypatch.setattr(kernels, "_cuda", lambda: NoGPU)
    plugin = NumbaCudaPlugin(host_arrays=True)
    monkeypatch.setattr(backends, "PLUGINS", [plugin, ArrayAPIPlugin()])
    x, y, a, b = _data(rng, "float64", batched=False)
    with caplog.at_level(logging.WARNING, logger="ot_agnostic"):
        first = ota.sinkhorn(x, y, a, b, backend="online", **SOLVER)
        ota.sinkhorn(x, y, a, b, backend="online", **SOLVER)
    assert first.backend == "array_api/online"
    warnings = [r for r in caplog.records if "Numba CUDA backend is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "numba-cuda" in warnings[0].getMessage()
    with pytest.raises(ImportError, match="is_available"):
        ota.sinkhorn(x, y, a, b, backend="numba_cuda")


def test_failed_self_test_is_an_import_error(monkeypatch):
    from ot_agnostic.kernels import numba_cuda as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("libNVVM cannot be found")

    monkeypatch.setattr(kernels, "softmin", broken)
    error = NumbaCudaPlugin(host_arrays=True).unsupported_error(np, np.zeros((3, 2)), Method.AUTO)
    assert isinstance(error, ImportError) and "self-test" in str(error) and "libNVVM" in str(error)


@pytest.mark.parametrize("p", [1, 2])
def test_multiscale_matches_the_array_api_multiscale(cuda_plugin, rng, p):
    """Block-sparse CUDA kernels inside the multiscale solver. With a generous ``truncate``
    every row block keeps the same clusters as its rows, so the per-block union of the CUDA
    layout changes nothing and the two solvers agree to rounding."""
    x, y, a, b = _data(rng, "float64", batched=False, N=40, M=30)
    kw = dict(p=p, blur=0.05, scaling=0.5, cluster_scale=0.3, truncate=60.0)
    mine = ota.sinkhorn(x, y, a, b, backend="multiscale", **kw)
    ref = ota.sinkhorn(x, y, a, b, backend="array_api/multiscale", **kw)
    assert mine.backend == "numba_cuda/multiscale" and ref.backend == "array_api/multiscale"
    _close(mine.value, ref.value, "float64")
    for got, expected in zip(mine.gradient(), ref.gradient()):
        _close(got, expected, "float64")
