"""CuPy arrays through the Numba CUDA plugin, on a real GPU.

Skipped (with the reason) without CuPy, without a usable GPU, or under Numba's CUDA
simulator (whose ``numba.cuda`` cannot read CuPy memory; ``tests/cuda_sim`` covers the
kernels there). Checks, against the pure Array API reference on NumPy copies: values,
the four potentials, gradients (``value_and_grad``) and kernel losses; CuPy outputs on
the inputs' device; no host copy inside the kernels' calls; launches on CuPy's current
stream; strided CuPy views; the kernels against the Numba CPU kernels at sizes spanning
many tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
numba = pytest.importorskip("numba")

if numba.config.ENABLE_CUDASIM:
    pytest.skip("Numba's CUDA simulator cannot run CuPy arrays", allow_module_level=True)
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no CUDA device")
except Exception as err:  # no driver, no device
    pytest.skip(f"CuPy has no usable GPU ({err})", allow_module_level=True)

import ot_agnostic as ota  # noqa: E402
from ot_agnostic import backends  # noqa: E402
from ot_agnostic.backends import PluginId  # noqa: E402
from ot_agnostic.backends.numba_cuda import NumbaCudaPlugin  # noqa: E402
from ot_agnostic.kernels import numba_cpu, numba_cuda  # noqa: E402

RTOL = {"float32": 1e-4, "float64": 1e-9}


@pytest.fixture
def plugin(monkeypatch):
    """The registered Numba CUDA plugin, or a fresh one put first in the registry."""
    for registered in backends.PLUGINS:
        if registered.id is PluginId.NUMBA_CUDA:
            return registered
    fresh = NumbaCudaPlugin()
    monkeypatch.setattr(backends, "PLUGINS", [fresh, *backends.PLUGINS])
    return fresh


def _data(rng, dtype, batched, unbalanced=False, N=300, M=250, D=3):
    shape = (2,) if batched else ()
    x = rng.random(shape + (N, D)).astype(dtype)
    y = (rng.random(shape + (M, D)) + 0.2).astype(dtype)
    a = rng.random(shape + (N,)) + 0.1
    b = rng.random(shape + (M,)) + 0.1
    a[..., :3] = 0.0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.4 if unbalanced else 1.0)
    return x, y, a.astype(dtype), b.astype(dtype)


def _close(mine, ref, dtype):
    assert isinstance(mine, cupy.ndarray)
    mine, ref = cupy.asnumpy(mine).astype(np.float64), np.asarray(ref, np.float64)
    assert np.abs(mine - ref).max() <= RTOL[dtype] * max(np.abs(ref).max(), 1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.3])
@pytest.mark.parametrize("batched", [False, True])
def test_sinkhorn_matches_the_numpy_reference(plugin, rng, dtype, p, reach, batched):
    x, y, a, b = _data(rng, dtype, batched, unbalanced=reach is not None)
    kw = dict(p=p, reach=reach, blur=0.05, scaling=0.7)
    fast = ota.sinkhorn(*(cupy.asarray(t) for t in (x, y, a, b)), backend="online", **kw)
    ref = ota.sinkhorn(x, y, a, b, backend="tensorized", **kw)
    assert fast.backend == "numba_cuda/online"
    assert fast.value.dtype == np.dtype(dtype)
    for name in ("value", "f", "g", "f_aa", "g_bb"):
        _close(getattr(fast, name), getattr(ref, name), dtype)
    for mine, expected in zip(fast.gradient(), ref.gradient()):
        _close(mine, expected, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_value_and_grad(plugin, rng, dtype):
    x, y, a, b = _data(rng, dtype, batched=True)
    value, grads = ota.value_and_grad(*(cupy.asarray(t) for t in (x, y, a, b)))
    ref_value, ref_grads = ota.value_and_grad(x, y, a, b, backend="tensorized")
    _close(value, ref_value, dtype)
    for mine, expected in zip(grads, ref_grads):
        _close(mine, expected, dtype)


@pytest.mark.parametrize(
    "loss, kw",
    [
        (ota.energy_distance, {}),
        (ota.gaussian_mmd, {"blur": 0.3}),
        (ota.laplacian_mmd, {"blur": 0.3}),
        (ota.hausdorff_divergence, {"blur": 0.1}),
    ],
)
def test_kernel_losses(plugin, rng, loss, kw):
    x, y, a, b = _data(rng, "float64", batched=True)
    fast = loss(*(cupy.asarray(t) for t in (x, y, a, b)), backend="online", **kw)
    _close(fast, loss(x, y, a, b, backend="tensorized", **kw), "float64")


def test_outputs_stay_on_the_inputs_device(plugin, rng):
    device = cupy.cuda.runtime.getDeviceCount() - 1  # the last GPU: not the default one if several
    with cupy.cuda.Device(device):
        x, y, a, b = (cupy.asarray(t) for t in _data(rng, "float32", batched=False))
        res = ota.sinkhorn(x, y, a, b, backend="online")
        outputs = (res.value, res.f, res.g, *res.gradient())
    for out in outputs:
        assert isinstance(out, cupy.ndarray) and out.device.id == device


def test_no_host_copy(plugin, rng, monkeypatch):
    """The kernels get CUDA arrays only, and Numba never copies an array to or from the host."""
    from numba.cuda.cudadrv import devicearray

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a host <-> device copy")

    auto_device = devicearray.auto_device

    def device_only(obj, *args, **kwargs):
        if isinstance(obj, np.ndarray):
            raise AssertionError("a NumPy array went to a kernel")
        return auto_device(obj, *args, **kwargs)

    seen = []
    for name in ("softmin", "softmin_grad", "kernel_sum"):
        kernel = getattr(numba_cuda, name)

        def spy(*args, kernel=kernel, **kwargs):
            seen.extend(type(arg) for arg in args if hasattr(arg, "shape"))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(numba_cuda, name, spy)
    monkeypatch.setattr(devicearray, "auto_device", device_only)
    monkeypatch.setattr(devicearray.DeviceNDArray, "copy_to_host", no_host_copy)
    x, y, a, b = (cupy.asarray(t) for t in _data(rng, "float32", batched=False))
    ota.value_and_grad(x, y, a, b, backend="online")
    ota.energy_distance(x, y, a, b, backend="online")
    assert seen and set(seen) == {cupy.ndarray}


def test_runs_on_the_current_stream(plugin, rng, monkeypatch):
    ptrs = []
    external_stream = numba.cuda.external_stream
    monkeypatch.setattr(numba.cuda, "external_stream", lambda ptr: ptrs.append(ptr) or external_stream(ptr))
    x, y, a, b = _data(rng, "float64", batched=False)
    ref = ota.sinkhorn_divergence(x, y, a, b, backend="tensorized")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        value = ota.sinkhorn_divergence(*(cupy.asarray(t) for t in (x, y, a, b)), backend="online")
        assert set(ptrs) == {stream.ptr}
    stream.synchronize()
    _close(value, ref, "float64")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("p", [1, 2])
def test_kernels_match_the_cpu_kernels(rng, dtype, p):
    """Many tiles (M = 2000), several blocks, tiny eps, zero weights; strided CuPy views."""
    B, N, M, D = 2, 777, 2000, 5
    x = rng.random((B, N, D)).astype(dtype)
    y = rng.random((B, M, D)).astype(dtype)
    h = (-np.log(M) + rng.standard_normal((B, M))).astype(dtype)
    h[:, ::7] = -1e30
    v = rng.standard_normal((B, M, 4)).astype(dtype)
    gx, gy, gh, gv = (cupy.asarray(t) for t in (x, y, h, v))
    tol = RTOL[np.dtype(dtype).name]
    for eps in (0.1**p, 1e-6):
        for name, shape, args in [
            ("softmin", (B, N), (h, eps, p)),
            ("softmin_grad", (B, N, D), (h, eps, p)),
            ("softmax_weighted_sum", (B, N, 4), (h, eps, p, v)),
        ]:
            expected = np.empty(shape, dtype)
            getattr(numba_cpu, name)(x, y, *args, expected)
            out = cupy.empty(shape, dtype)
            gargs = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
            getattr(numba_cuda, name)(gx, gy, *gargs, out)
            assert np.abs(cupy.asnumpy(out) - expected).max() <= tol * np.abs(expected).max(), name
    for kind in (numba_cuda.KERNEL_ENERGY, numba_cuda.KERNEL_GAUSSIAN, numba_cuda.KERNEL_LAPLACIAN):
        w = np.abs(v[:, :, 0])
        expected = np.empty((B, N), dtype)
        numba_cpu.kernel_sum(x, y, w, kind, 0.2, expected)
        out = cupy.empty((B, N), dtype)
        numba_cuda.kernel_sum(gx, gy, cupy.asarray(w), kind, 0.2, out)
        assert np.abs(cupy.asnumpy(out) - expected).max() <= tol * np.abs(expected).max()
    # Strided views, read in place.
    out = cupy.full((B, 2 * N), cupy.nan, dtype)[:, ::2]
    numba_cuda.softmin(gx[:, :, ::2], gy[:, ::3, 1::2], gh[:, ::3], 0.1, p, out)
    expected = np.empty((B, N), dtype)
    numba_cpu.softmin(x[:, :, ::2], y[:, ::3, 1::2], h[:, ::3], 0.1, p, expected)
    assert np.abs(cupy.asnumpy(out) - expected).max() <= tol * np.abs(expected).max()
