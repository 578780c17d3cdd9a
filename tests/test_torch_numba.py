"""torch CPU tensors through the Numba CPU kernels (``ot_agnostic.backends._torch_bridge``).

References: the NumPy path on the same data (``value_and_grad``: the same kernels, without
torch), the dense pure Array API path on the same tensors (autograd through torch's own
ops), and ``torch.autograd.gradcheck`` (finite differences). Float64 comparisons with the
NumPy path allow 1e-10 relative: the same kernels, but the loop's elementwise arithmetic
(Anderson mixing included) runs in torch instead of NumPy, a different order of rounding.
"""

from __future__ import annotations

import itertools
import warnings

import array_api_compat
import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic import backends
from ot_agnostic.backends import PluginId, select_backend
from tests.helpers import random_measures

torch = pytest.importorskip("torch")

UNCONVERGED = "ignore:this (gradient|plan) comes from potentials:UserWarning"


def _numpy_and_torch(rng, shape=(), N=40, M=30, unbalanced=False, dtype="float64"):
    arrays = [t.astype(dtype) for t in random_measures(rng, shape, N=N, M=M, unbalanced=unbalanced)]
    return arrays, [torch.tensor(t, requires_grad=True) for t in arrays]


def _rel(mine, ref):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    return np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-300)


# ----------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, expected", [
    ("auto", "numba/online"), ("online", "numba/online"), ("numba", "numba/online"),
    ("multiscale", "numba/multiscale"), ("tensorized", "array_api/tensorized"),
])
def test_cpu_tensors_run_the_numba_kernels(backend, expected):
    x = torch.zeros(1, 50, 3)
    xp = array_api_compat.array_namespace(x)
    assert str(select_backend(xp, x, backend, (1, 50, 50, 3))) == expected


def test_keops_formulas_and_cost_functions_keep_their_plugins():
    x = torch.zeros(1, 5, 2)
    xp = array_api_compat.array_namespace(x)
    formula = ota.costs.make_cost(2, "SqDist(X,Y) / IntCst(2)")
    function = ota.costs.make_cost(2, lambda x, y: ((x[:, :, None] - y[:, None]) ** 2).sum(-1))
    assert select_backend(xp, x, "auto", (1, 5, 5, 2), formula).plugin.id is PluginId.KEOPS
    assert select_backend(xp, x, "auto", (1, 5, 5, 2), function).plugin.id is PluginId.ARRAY_API


def test_views_share_the_tensors_memory():
    """Zero copy: the kernels read the tensors' own memory (contiguous inputs)."""
    x, y = torch.rand(1, 20, 3), torch.rand(1, 10, 3)
    plugin = backends.PLUGINS[0]
    geom = plugin.geometry(x, y, ota.costs.Cost(2), backends.Method.ONLINE, xp=None)
    assert geom.raw.x.__array_interface__["data"][0] == x.data_ptr()
    assert geom.raw.y.__array_interface__["data"][0] == y.data_ptr()
    out = geom.softmin(0.1, torch.zeros(1, 10))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# Sinkhorn: values and autograd equal the NumPy path
# ----------------------------------------------------------------------------------------

CASES = [
    # (batched, reach, debias, backend, tol)
    (b, r, d, m, t)
    for b, r, d, m, t in itertools.product([False, True], [None, 0.5], [True, False], ["auto", "multiscale"], [1e-6, None])
    if not (b and m == "multiscale")
]


@pytest.mark.parametrize("batched, reach, debias, backend, tol", CASES)
@pytest.mark.filterwarnings(UNCONVERGED)
def test_autograd_equals_the_numpy_gradients(rng, batched, reach, debias, backend, tol):
    shape = (2,) if batched else ()
    arrays, tensors = _numpy_and_torch(rng, shape, unbalanced=reach is not None)
    kw = dict(blur=0.05, reach=reach, debias=debias, backend=backend, tol=tol, cluster_scale=0.2)
    value, grads = ota.value_and_grad(*arrays, **kw)
    res = ota.sinkhorn(*tensors, **kw)
    assert res.backend == ("numba/multiscale" if backend == "multiscale" else "numba/online")
    assert isinstance(res.value, torch.Tensor) and res.value.dtype == torch.float64
    res.value.sum().backward()
    assert _rel(res.value.detach(), value) <= 1e-10
    for tensor, expected in zip(tensors, grads):
        assert _rel(tensor.grad, expected) <= 1e-10


def test_float32_values_and_gradients_equal_the_numpy_path(rng):
    """Same kernels in float32, but the two paths may sum in other orders (thread counts).

    The value agrees to 1e-5 relative. A gradient a_i (x_i - T(x_i)) is a small difference of
    O(1) coordinates: float32 potentials carry an absolute error of ~1e-7 * max cost, i.e. a
    relative error of ~1e-7 * max cost / eps ~ 1e-4 in the plan's weights, so the transport map
    moves by ~1e-4 of the diameter against displacements of ~0.1: 1e-3 relative.
    """
    arrays, tensors = _numpy_and_torch(rng, N=200, M=150, dtype="float32")
    value, grads = ota.value_and_grad(*arrays, blur=0.05)
    out = ota.sinkhorn_divergence(*tensors, blur=0.05)
    out.backward()
    assert out.dtype == torch.float32 and _rel(out.detach(), value) <= 1e-5
    for tensor, expected in zip(tensors, grads):
        assert tensor.grad.dtype == torch.float32 and _rel(tensor.grad, expected) <= 1e-3


@pytest.mark.parametrize("reach", [None, 0.7])
def test_gradcheck_converged(rng, reach):
    """Finite differences of the converged value (float64, tol=1e-12, scaling 0.5): points and
    weights (balanced weights move along the simplex's tangent, where the gradient is defined)."""
    _, (x, y, a, b) = _numpy_and_torch(rng, N=7, M=6, unbalanced=reach is not None)
    kw = dict(blur=0.3, reach=reach, tol=1e-12, scaling=0.5)
    assert torch.autograd.gradcheck(lambda x, y: ota.sinkhorn_divergence(x, y, a.detach(), b.detach(), **kw),
                                    (x, y), eps=1e-6, atol=1e-6)
    if reach is not None:
        assert torch.autograd.gradcheck(lambda a, b: ota.sinkhorn_divergence(x.detach(), y.detach(), a, b, **kw),
                                        (a, b), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Kernel losses and Hausdorff: every argument differentiable
# ----------------------------------------------------------------------------------------

LOSSES = [
    (ota.energy_distance, {}),
    (ota.gaussian_mmd, {"blur": 0.3}),
    (ota.laplacian_mmd, {"blur": 0.3}),
    (ota.hausdorff_divergence, {"blur": 0.2}),
    (ota.hausdorff_divergence, {"blur": 0.2, "p": 1}),
]


@pytest.mark.parametrize("loss, kw", LOSSES)
def test_kernel_losses_and_hausdorff_autograd_equal_the_dense_path(rng, loss, kw):
    """The backward passes (signed incoming gradients split in parts) against torch's own
    autograd through the dense path: float64, 1e-10 relative."""
    _, tensors = _numpy_and_torch(rng, (2,), N=25, M=20, unbalanced=True)
    fast, ref = loss(*tensors, backend="numba", **kw), loss(*tensors, backend="tensorized", **kw)
    assert _rel(fast.detach(), ref.detach()) <= 1e-10
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)  # an incoming gradient of both signs
    mine = torch.autograd.grad((fast * weights).sum(), tensors)
    expected = torch.autograd.grad((ref * weights).sum(), tensors)
    for g, e in zip(mine, expected):
        assert _rel(g, e) <= 1e-10


@pytest.mark.parametrize("loss, kw", LOSSES[:4])
def test_kernel_losses_and_hausdorff_gradcheck(rng, loss, kw):
    _, tensors = _numpy_and_torch(rng, N=6, M=5, unbalanced=True)
    assert torch.autograd.gradcheck(lambda *t: loss(*t, backend="numba", **kw), tensors, eps=1e-6, atol=1e-6)


def test_samplesloss_potentials_are_differentiable(rng):
    """``SamplesLoss(potentials=True)`` on the Numba kernels: F depends on x through autograd,
    as with the dense path (same schedule: 1e-10)."""
    from ot_agnostic.torch import SamplesLoss

    _, (x, y, a, b) = _numpy_and_torch(rng, N=20, M=15)
    grads = []
    for backend in ("online", "tensorized"):
        F, G = SamplesLoss("sinkhorn", blur=0.2, potentials=True, backend=backend)(a, x, b, y)
        grads.append(torch.autograd.grad((F ** 2).sum() + G.sum(), [x, y]))
    for g, e in zip(*grads):
        assert _rel(g, e) <= 1e-10


# ----------------------------------------------------------------------------------------
# Inputs: layouts, dtypes, weights, threads, refusals
# ----------------------------------------------------------------------------------------


def test_non_contiguous_and_expanded_views_give_the_same_numbers(rng):
    arrays, _ = _numpy_and_torch(rng, N=30, M=30)
    x, y = torch.tensor(arrays[0]), torch.tensor(arrays[1])
    ref = ota.sinkhorn_divergence(x, y, blur=0.1)
    wide = torch.cat([x, torch.zeros_like(x)], dim=1)[:, :3]  # strided columns
    transposed = y.t().contiguous().t()  # column-major
    assert not wide.is_contiguous() and not transposed.is_contiguous()
    # 1e-12: the same float64 numbers in another layout (the kernels make them contiguous)
    assert abs(float(ota.sinkhorn_divergence(wide, transposed, blur=0.1)) - float(ref)) <= 1e-12 * float(ref)
    one = torch.tensor(arrays[0][:1]).expand(30, 3)  # stride 0: 30 copies of one point
    value = ota.sinkhorn_divergence(one, y, blur=0.1)
    assert abs(float(value) - float(ota.sinkhorn_divergence(one.contiguous(), y, blur=0.1))) <= 1e-12 * float(value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(rng, dtype):
    arrays, _ = _numpy_and_torch(rng, N=30, M=25, dtype="float32")
    x = torch.tensor(arrays[0]).to(dtype).requires_grad_()
    y = torch.tensor(arrays[1]).to(dtype)
    value = ota.sinkhorn_divergence(x, y, blur=0.1)
    ref = ota.sinkhorn_divergence(x.detach().float(), y.float(), blur=0.1)
    assert value.dtype == dtype
    # the float32 result rounded to the input dtype: its resolution
    assert abs(float(value.detach()) - float(ref)) <= 2 * torch.finfo(dtype).eps * abs(float(ref))
    value.backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())


def test_weights_that_require_grad(rng):
    """Gradients reach weights given as non-leaf tensors (a softmax of parameters)."""
    arrays, _ = _numpy_and_torch(rng, N=30, M=25)
    logits = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    x, y = torch.tensor(arrays[0]), torch.tensor(arrays[1])
    a = torch.softmax(logits, 0)
    ota.sinkhorn_divergence(x, y, a, blur=0.1, tol=1e-9).backward()
    _, grads = ota.value_and_grad(arrays[0], arrays[1], np.full(30, 1 / 30), blur=0.1, tol=1e-9)
    # chain rule of the softmax at uniform logits: (g - mean g) / N
    expected = (grads.a - grads.a.mean()) / 30
    assert _rel(logits.grad, expected) <= 1e-8


def test_torch_set_num_threads_limits_the_numba_kernels(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a Numba pool of 2 threads or more")
    from ot_agnostic.kernels import numba_cpu as kernels

    seen = []
    original = kernels.softmin

    def recording(*args):
        seen.append(numba.get_num_threads())
        return original(*args)

    monkeypatch.setattr(kernels, "softmin", recording)
    x, y = torch.rand(40, 2), torch.rand(30, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ota.sinkhorn_divergence(x, y, blur=0.2, tol=None)
        assert seen and set(seen) == {1}
        seen.clear()
        torch.set_num_threads(2)
        ota.sinkhorn_divergence(x, y, blur=0.2, tol=None)
        assert set(seen) == {min(2, numba.get_num_threads())}
    finally:
        torch.set_num_threads(before)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # restored


def test_first_order_reductions_refuse_tracked_inputs():
    x = torch.rand(1, 10, 2, requires_grad=True)
    y = torch.rand(1, 8, 2)
    geom = backends.PLUGINS[0].geometry(x, y, ota.costs.Cost(2), backends.Method.ONLINE, xp=None)
    h = torch.zeros(1, 8)
    for call in (lambda: geom.softmin_grad(0.1, h), lambda: geom.softmax_weighted_sum(0.1, h, y)):
        with pytest.raises(RuntimeError, match="not differentiable.*torch.no_grad.*keops"):
            call()
    with torch.no_grad():
        assert geom.softmin_grad(0.1, h).shape == (1, 10, 2)
    with pytest.raises(RuntimeError, match="not differentiable"):  # tracked as the second cloud too
        geom.transpose().softmin_grad(0.1, torch.zeros(1, 10))
    assert geom.transpose().softmin(0.1, torch.zeros(1, 10)).requires_grad


def test_unconverged_warning_and_plan_on_torch(rng):
    """The Numba path reports its precision like every backend; the plan's marginals match."""
    _, (x, y, a, b) = _numpy_and_torch(rng, N=30, M=25)
    res = ota.sinkhorn(x, y, a, b, blur=0.1, tol=1e-8)
    assert res.converged and res.marginal_error <= 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = res.plan()
    assert isinstance(plan, torch.Tensor)
    assert float((plan.sum(1) - a).detach().abs().sum()) <= 1e-7
