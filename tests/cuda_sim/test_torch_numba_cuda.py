"""torch tensors through the Numba CUDA plugin, on Numba's CUDA simulator.

``NumbaCudaPlugin(host_arrays=True)`` takes torch CPU tensors under the simulator: the same
``TorchGeometry`` and autograd Functions as for CUDA tensors (the only difference on a GPU
is that the kernels read the tensors through ``__cuda_array_interface__`` on torch's
current stream, which ``tests/test_torch_cuda.py`` checks on a real device). The reference is the
dense pure Array API path on the same tensors (autograd through torch's own ops): values and
gradients agree to 1e-10 in float64 (two summation orders of the same float64 sums).
"""

from __future__ import annotations

import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic import backends
from ot_agnostic.backends.array_api import ArrayAPIPlugin
from ot_agnostic.backends.numba_cuda import NumbaCudaPlugin

torch = pytest.importorskip("torch")

RTOL = 1e-10


@pytest.fixture
def cuda_plugin(monkeypatch):
    plugin = NumbaCudaPlugin(host_arrays=True)
    monkeypatch.setattr(backends, "PLUGINS", [plugin, ArrayAPIPlugin()])
    return plugin


def _tensors(rng, batched=False, unbalanced=False, N=10, M=7, D=2):
    shape = (2,) if batched else ()
    x = rng.random(shape + (N, D))
    y = rng.random(shape + (M, D)) + 0.2
    a = rng.random(shape + (N,)) + 0.1
    b = rng.random(shape + (M,)) + 0.1
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.4 if unbalanced else 1.0)
    return [torch.tensor(t, requires_grad=True) for t in (x, y, a, b)]


def _grads(value, inputs):
    return torch.autograd.grad(value.sum(), inputs)


def _close(mine, ref):
    mine, ref = np.asarray(mine.detach(), np.float64), np.asarray(ref.detach(), np.float64)
    assert np.abs(mine - ref).max() <= RTOL * max(np.abs(ref).max(), 1e-12)


@pytest.mark.parametrize("reach, batched, debias", [(None, False, True), (0.5, True, True), (None, True, False)])
@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None
def test_sinkhorn_autograd_matches_the_dense_reference(cuda_plugin, rng, reach, batched, debias):
    inputs = _tensors(rng, batched, unbalanced=reach is not None)
    kw = dict(blur=0.1, reach=reach, debias=debias, tol=None)
    fast = ota.sinkhorn(*inputs, backend="online", **kw)
    ref = ota.sinkhorn(*inputs, backend="tensorized", **kw)
    assert fast.backend == "numba_cuda/online" and isinstance(fast.value, torch.Tensor)
    _close(fast.value, ref.value)
    for mine, expected in zip(_grads(fast.value, inputs), _grads(ref.value, inputs)):
        _close(mine, expected)


def test_converged_multiscale_autograd(cuda_plugin, rng):
    """tol on the block-sparse CUDA kernels with torch autograd: the gradients are those of
    the dense reference converged to the same tol (float64, 1e-6: both within tol=1e-9 of
    the same fixed point; gradcheck of the Function runs in tests/test_torch_numba.py). Balanced weight gradients are defined up to a constant (the
    potentials are): they are compared centred."""
    inputs = _tensors(rng, N=20, M=16)
    kw = dict(blur=0.1, tol=1e-9, cluster_scale=0.3, truncate=60.0)
    fast = ota.sinkhorn(*inputs, backend="multiscale", **kw)
    ref = ota.sinkhorn(*inputs, backend="tensorized", **kw)
    assert fast.backend == "numba_cuda/multiscale" and fast.converged
    _close(fast.value, ref.value)
    for k, (mine, expected) in enumerate(zip(_grads(fast.value, inputs), _grads(ref.value, inputs))):
        if k >= 2:
            mine, expected = mine - mine.mean(), expected - expected.mean()
        assert float((mine - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


@pytest.mark.parametrize(
    "loss, kw",
    [(ota.energy_distance, {}), (ota.gaussian_mmd, {"blur": 0.3}), (ota.hausdorff_divergence, {"blur": 0.1})],
)
def test_kernel_losses_and_hausdorff_autograd(cuda_plugin, rng, loss, kw):
    x, y, a, b = _tensors(rng, batched=True)
    fast, ref = loss(x, y, a, b, backend="online", **kw), loss(x, y, a, b, backend="tensorized", **kw)
    _close(fast, ref)
    for mine, expected in zip(_grads(fast, (x, y, a, b)), _grads(ref, (x, y, a, b))):
        _close(mine, expected)
