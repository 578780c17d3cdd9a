"""torch CUDA tensors on a real GPU: the Numba CUDA kernels (``backend="numba_cuda"``) and KeOps.

Skipped (with the reason) without a CUDA device for torch, or under Numba's CUDA simulator
(``tests/cuda_sim/test_torch_numba_cuda.py`` runs the same autograd Function there on CPU
tensors). References: the NumPy path on host copies (``value_and_grad``; float64, 1e-9
relative: the same algorithm in another library's rounding) and the dense pure Array API
path on the same CUDA tensors. Also checked: outputs on the inputs' device, zero-copy
reads (``__cuda_array_interface__``), launches on torch's current stream, the ``auto``
rule on CUDA (KeOps when it passes its self-test, else the Numba CUDA kernels), and the
refusals (CPU and CUDA tensors mixed, two GPUs).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
numba = pytest.importorskip("numba")

if numba.config.ENABLE_CUDASIM:
    pytest.skip("under Numba's CUDA simulator: see tests/cuda_sim", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("torch has no CUDA device here", allow_module_level=True)

import ot_agnostic as ota  # noqa: E402
from ot_agnostic import backends  # noqa: E402
from ot_agnostic.backends import Method, PluginId  # noqa: E402
from tests.helpers import random_measures  # noqa: E402

RTOL = {"float32": 1e-4, "float64": 1e-9}


def _data(rng, dtype="float64", shape=(), N=300, M=250, unbalanced=False):
    arrays = [t.astype(dtype) for t in random_measures(rng, shape, N=N, M=M, unbalanced=unbalanced)]
    return arrays, [torch.tensor(t, device="cuda", requires_grad=True) for t in arrays]


def _rel(mine, ref):
    mine = mine.detach().cpu().numpy() if isinstance(mine, torch.Tensor) else np.asarray(mine)
    ref = np.asarray(ref, np.float64)
    return np.abs(mine.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-300)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reach, shape, backend", [
    (None, (), "numba_cuda"), (0.5, (2,), "numba_cuda"), (None, (), "numba_cuda/multiscale"),
])
def test_numba_cuda_autograd_equals_the_numpy_path(rng, dtype, reach, shape, backend):
    arrays, tensors = _data(rng, dtype, shape, unbalanced=reach is not None)
    kw = dict(blur=0.05, reach=reach, tol=1e-6)
    value, grads = ota.value_and_grad(*arrays, **kw)
    res = ota.sinkhorn(*tensors, backend=backend, **kw)
    assert res.backend.startswith("numba_cuda/") and res.value.device.type == "cuda"
    res.value.sum().backward()
    assert _rel(res.value, value) <= RTOL[dtype]
    for tensor, expected in zip(tensors, grads):
        assert tensor.grad.device.type == "cuda" and _rel(tensor.grad, expected) <= 10 * RTOL[dtype]


@pytest.mark.parametrize("backend", ["keops", "keops/multiscale"])
def test_keops_on_cuda_equals_the_numpy_path(rng, backend):
    import array_api_compat

    from ot_agnostic.backends.keops import KeOpsPlugin

    arrays, tensors = _data(rng, "float32")
    error = KeOpsPlugin().unsupported_error(array_api_compat.array_namespace(tensors[0]), tensors[0], Method.ONLINE)
    if error is not None:
        pytest.skip(f"KeOps is unusable on this GPU: {error}")
    value, grads = ota.value_and_grad(*arrays, blur=0.05, tol=1e-6)
    res = ota.sinkhorn(*tensors, backend=backend, blur=0.05, tol=1e-6)
    assert res.backend.startswith("keops/")
    res.value.backward()
    assert _rel(res.value, value) <= RTOL["float32"]
    for tensor, expected in zip(tensors, grads):
        assert _rel(tensor.grad, expected) <= 10 * RTOL["float32"]


@pytest.mark.parametrize("loss, kw", [
    (ota.energy_distance, {}), (ota.gaussian_mmd, {"blur": 0.3}), (ota.hausdorff_divergence, {"blur": 0.2}),
])
def test_kernel_losses_and_hausdorff_on_numba_cuda(rng, loss, kw):
    _, tensors = _data(rng, "float64", (2,), N=200, M=150, unbalanced=True)
    fast, ref = loss(*tensors, backend="numba_cuda", **kw), loss(*tensors, backend="tensorized", **kw)
    assert _rel(fast, ref.detach().cpu().numpy()) <= 1e-9
    for g, e in zip(torch.autograd.grad(fast.sum(), tensors), torch.autograd.grad(ref.sum(), tensors)):
        assert _rel(g, e.cpu().numpy()) <= 1e-9


def test_zero_copy_and_current_stream(rng):
    """The raw geometry reads the tensors' own memory, and the kernels launch on torch's current
    stream: work queued on a side stream is ordered after what torch queued there."""
    _, (x, y, a, b) = _data(rng, "float32", N=2000, M=2000)
    plugin = next(p for p in backends.PLUGINS if p.id is PluginId.NUMBA_CUDA)
    geom = plugin.geometry(x[None], y[None], ota.costs.Cost(2), Method.ONLINE, xp=None)
    assert geom.raw.x.data_ptr() == x.data_ptr()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        h = torch.zeros(1, 2000, device="cuda").add_(1.0)  # queued on the side stream
        out = geom.softmin(0.1, h)
    side.synchronize()
    with torch.no_grad():
        ref = geom.softmin(0.1, torch.ones(1, 2000, device="cuda"))
    torch.cuda.synchronize()
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_auto_on_cuda_prefers_keops_when_it_works(rng):
    from ot_agnostic.backends.keops import KeOpsPlugin

    _, (x, y, _, _) = _data(rng, "float32", N=5000, M=5000)
    import array_api_compat

    works = KeOpsPlugin().unsupported_error(array_api_compat.array_namespace(x), x, Method.ONLINE) is None
    assert ota.sinkhorn(x, y, blur=0.05).backend == ("keops/online" if works else "numba_cuda/online")


def test_mixed_devices_are_refused(rng):
    _, (x, y, _, _) = _data(rng, "float32", N=20, M=20)
    with pytest.raises((ValueError, TypeError), match="device"):
        ota.sinkhorn_divergence(x, y.detach().cpu(), backend="numba_cuda")
    if torch.cuda.device_count() > 1:
        with pytest.raises((ValueError, TypeError), match="device"):
            ota.sinkhorn_divergence(x, y.detach().to("cuda:1"), backend="numba_cuda")
