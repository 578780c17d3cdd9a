"""The torch plugin (KeOps) against the pure Array API reference.

Same data, same settings: the geometry reductions agree to rounding, and ``sinkhorn``
values, the four potentials and the autograd gradients agree to 1e-5 (float64) / 1e-4
(float32) relative, for p in {1, 2}, balanced and unbalanced, debiased or not, batched or
not, with zero weights. Also: the kernel losses, the soft Hausdorff divergence, a float64
``gradcheck``, the logged fallback when KeOps is unusable, and no CUDA context for CPU tensors.

Every problem here has ``D = 3`` so that the KeOps formulas are few (each is compiled once,
10-20 s, then loaded from ``KEOPS_CACHE_FOLDER``, which ``conftest.py`` points at
``<repo>/.keops_cache``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("pykeops", reason="pykeops is not installed")

import array_api_compat  # noqa: E402

import ot_agnostic as ota  # noqa: E402
from tests.helpers import skip_unless_keops_works  # noqa: E402
from ot_agnostic import backends  # noqa: E402
from ot_agnostic.backends import PluginId, select_backend  # noqa: E402
from ot_agnostic.backends import keops as keops_plugin  # noqa: E402
from ot_agnostic.backends.array_api import ArrayAPIPlugin, DenseGeometry  # noqa: E402
from ot_agnostic.backends.keops import KEOPS_MIN_ENTRIES, KeOpsGeometry, KeOpsPlugin  # noqa: E402
from ot_agnostic.costs import Cost, Kernel  # noqa: E402

RTOL = {"float32": 1e-4, "float64": 1e-5}
DTYPES = ["float32", "float64"]
#: Each kernel is a KeOps formula to compile (~15 s in CI): the energy one runs by default,
#: the Gaussian and Laplacian ones with the slow tests (``bash scripts/test.sh -m slow``).
KERNELS_ONE_FAST = [
    Kernel("energy"),
    pytest.param(Kernel("gaussian", 0.3), marks=pytest.mark.slow),
    pytest.param(Kernel("laplacian", 0.3), marks=pytest.mark.slow),
]
D = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def keops_works():
    """Skip the module (with the reason) when KeOps cannot compile or run here."""
    skip_unless_keops_works(D)


def _close(mine, ref, dtype, factor=1.0):
    mine = mine.detach().double().numpy() if hasattr(mine, "detach") else np.asarray(mine, np.float64)
    ref = ref.detach().double().numpy() if hasattr(ref, "detach") else np.asarray(ref, np.float64)
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).max() <= factor * RTOL[dtype] * max(np.abs(ref).max(), 1e-12)


def _data(dtype, batched, unbalanced=False, N=40, M=30, seed=0):
    rng = np.random.default_rng(seed)
    shape = (3,) if batched else ()
    x = rng.random(shape + (N, D))
    y = rng.random(shape + (M, D)) + 0.2
    y[..., 0, :] = x[..., 0, :]  # a coincident pair: grad |x - y| is taken as 0 there
    a = rng.random(shape + (N,)) + 0.1
    b = rng.random(shape + (M,)) + 0.1
    a[..., 1:3] = 0.0  # zero weights must drop out on both paths
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.4 if unbalanced else 1.0)
    return tuple(torch.from_numpy(t.astype(dtype)) for t in (x, y, a, b))


def _geometries(x, y, cost):
    xp = array_api_compat.array_namespace(x)
    return KeOpsGeometry(x, y, cost, xp=xp), DenseGeometry(x, y, cost, xp=xp)


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------


def test_registered_after_numba_cpu_and_before_numba_cuda():
    """torch CPU tensors go to the Numba CPU kernels first; CUDA tensors to KeOps, then to
    the Numba CUDA kernels (see ot_agnostic.backends)."""
    ids = [plugin.id for plugin in backends.PLUGINS]
    assert ids == [PluginId.NUMBA, PluginId.KEOPS, PluginId.NUMBA_CUDA, PluginId.ARRAY_API]


@pytest.fixture
def keops_first(monkeypatch):
    """The registry a torch CUDA tensor sees (no Numba CPU plugin in front of KeOps)."""
    monkeypatch.setattr(backends, "PLUGINS", [KeOpsPlugin(), ArrayAPIPlugin()])


def test_keops_takes_online_and_large_auto_when_first(keops_first):
    x = torch.zeros(1, 4, D)
    xp = array_api_compat.array_namespace(x)
    assert str(select_backend(xp, x, "online", (1, 4, 4, D))) == "keops/online"
    assert str(select_backend(xp, x, "tensorized", (1, 4, 4, D))) == "array_api/tensorized"
    side = int(KEOPS_MIN_ENTRIES**0.5)
    # small problems under "auto": KeOps hands them to the dense Array API geometry
    assert str(select_backend(xp, x, "auto", (1, side, side, D))) == "array_api/tensorized"
    assert str(select_backend(xp, x, "auto", (1, side + 1, side, D))) == "keops/online"
    assert str(select_backend(xp, x, "auto", (4, side // 2 + 1, 10, D))) == "keops/online"  # B counts


@pytest.mark.parametrize("backend", ["keops", "keops/online", "keops/auto"])
def test_keops_by_name_runs_keops_at_any_size(backend):
    x = torch.zeros(1, 4, D)
    xp = array_api_compat.array_namespace(x)
    assert str(select_backend(xp, x, backend, (1, 4, 4, D))) == "keops/online"
    data = _data("float64", batched=False)
    res = ota.sinkhorn(*data, backend=backend)
    assert res.backend == "keops/online"
    _close(res.value, ota.sinkhorn(*data, backend="tensorized").value, "float64")
    # the reported backend can be passed back in
    assert ota.sinkhorn(*data, backend=res.backend).backend == "keops/online"


@pytest.mark.parametrize(
    "x, backend, match",
    [
        (np.zeros((5, D)), "keops", "runs torch float32/float64 tensors on cpu or cuda, not numpy float64"),
        (torch.zeros(5, D), "keops/tensorized", "runs 'online' or 'multiscale', not 'tensorized'"),
        (torch.zeros(5, D), "keops/multi", "unknown backend 'keops/multi'"),
        (torch.zeros(5, D), "keop/online", "the part before '/' must be a plugin"),
    ],
)
def test_keops_by_name_refuses_what_it_cannot_run(x, backend, match):
    with pytest.raises(ValueError, match=match):
        ota.sinkhorn(x, x + 1.0, backend=backend)


def test_float16_tensors_run_in_float32_on_keops():
    x, y, _, _ = _data("float32", batched=False)
    res = ota.sinkhorn(x.half(), y.half(), backend="keops")
    assert res.backend == "keops/online" and res.value.dtype == torch.float16
    ref = ota.sinkhorn(x.half().float(), y.half().float(), backend="tensorized").value
    assert abs(float(res.value) - float(ref)) <= 1e-3 * abs(float(ref))


# ----------------------------------------------------------------------------------------
# The geometry against the dense Array API geometry
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
@pytest.mark.parametrize("p", [1, 2])
def test_geometry_reductions_match_dense(dtype, p):
    x, y, _, _ = _data(dtype, batched=True)
    rng = np.random.default_rng(p)
    eps = 0.1**p
    fast, ref = _geometries(x, y, Cost(p))
    assert fast.shape == ref.shape == (3, x.shape[1], y.shape[1])
    for fast, ref in [(fast, ref), (fast.transpose(), ref.transpose())]:  # both directions
        B, N, M = ref.shape
        h = torch.from_numpy(rng.normal(size=(B, M)).astype(dtype))
        v = torch.from_numpy(rng.normal(size=(B, M, D)).astype(dtype))  # K = D: one formula less
        assert fast.shape == ref.shape
        out = fast.softmin(eps, h)
        assert out.dtype == x.dtype and out.shape == (B, N)
        _close(out, ref.softmin(eps, h), dtype)
        grad = fast.softmin_grad(eps, h)
        assert torch.isfinite(grad).all() and grad.shape == (B, N, D)
        _close(grad, ref.softmin_grad(eps, h), dtype)
        _close(fast.softmax_weighted_sum(eps, h, v), ref.softmax_weighted_sum(eps, h, v), dtype)
        _close(fast.cost_rows(2, 7), ref.cost_rows(2, 7), dtype)


# Kernel sums in float64 only: each (kernel, dtype) is one more KeOps formula to compile in CI
# (~8 s each); float32 goes through the same formula text, and the softmin tests cover it.
@pytest.mark.parametrize("dtype", ["float64"])
@pytest.mark.parametrize("kernel", KERNELS_ONE_FAST)
def test_kernel_sum_matches_dense(dtype, kernel):
    x, y, _, _ = _data(dtype, batched=True)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=y.shape[:2]).astype(dtype))
    fast, ref = _geometries(x, y, kernel.cost)
    expected = ref.kernel_sum(kernel, v)
    scale = float((ref.kernel_sum(kernel, v.abs()).abs()).max())  # sum_j |k_ij v_j|: the rounding scale
    out = fast.kernel_sum(kernel, v)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert float((out - expected).abs().max()) <= RTOL[dtype] * scale


@pytest.mark.parametrize("p", [1, 2])
def test_softmin_autograd_in_points_and_h_matches_dense(p):
    x, y, _, _ = _data("float64", batched=True)
    h = torch.from_numpy(np.random.default_rng(2).normal(size=y.shape[:2]))
    weights = torch.from_numpy(np.random.default_rng(3).normal(size=x.shape[:2]))
    grads = []
    for geometry in (KeOpsGeometry, DenseGeometry):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, h)]
        geom = geometry(leaves[0], leaves[1], Cost(p), xp=array_api_compat.array_namespace(x))
        grads.append(torch.autograd.grad((weights * geom.softmin(0.1**p, leaves[2])).sum(), leaves))
    for mine, ref in zip(*grads):
        assert torch.isfinite(mine).all()
        _close(mine, ref, "float64", factor=0.01)


@pytest.mark.parametrize("kernel", KERNELS_ONE_FAST)
def test_kernel_sum_autograd_in_points_and_weights_matches_dense(kernel):
    x, y, _, _ = _data("float64", batched=True)
    v = torch.from_numpy(np.random.default_rng(4).normal(size=y.shape[:2]))
    weights = torch.from_numpy(np.random.default_rng(5).normal(size=x.shape[:2]))
    grads = []
    for geometry in (KeOpsGeometry, DenseGeometry):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, v)]
        geom = geometry(leaves[0], leaves[1], kernel.cost, xp=array_api_compat.array_namespace(x))
        grads.append(torch.autograd.grad((weights * geom.kernel_sum(kernel, leaves[2])).sum(), leaves))
    for mine, ref in zip(*grads):
        assert torch.isfinite(mine).all()
        _close(mine, ref, "float64", factor=0.01)


def test_softmin_with_the_same_points_on_both_sides():
    """geometry(x, x) with x tracked (soft Hausdorff, debiasing): both slots get gradients."""
    x, _, _, _ = _data("float64", batched=True)
    grads = []
    for geometry in (KeOpsGeometry, DenseGeometry):
        leaf = x.clone().requires_grad_(True)
        geom = geometry(leaf, leaf, Cost(1), xp=array_api_compat.array_namespace(x))
        (grad,) = torch.autograd.grad(geom.softmin(0.1, torch.zeros_like(leaf[:, :, 0])).sum(), [leaf])
        grads.append(grad)
    _close(*grads, "float64", factor=0.01)


# ----------------------------------------------------------------------------------------
# Public functions: keops/online against array_api/tensorized
# ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None on purpose
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.3])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_sinkhorn_values_potentials_and_autograd_match_tensorized(dtype, p, reach, debias, batched):
    data = _data(dtype, batched, unbalanced=reach is not None, seed=p)
    kw = dict(p=p, reach=reach, debias=debias, blur=0.05, scaling=0.7, tol=None)  # same schedule: same numbers
    results, grads = [], []
    for backend in ("keops/online", "tensorized"):
        leaves = [t.clone().requires_grad_(True) for t in data]
        res = ota.sinkhorn(*leaves, backend=backend, **kw)
        res.value.sum().backward()
        results.append(res)
        grads.append([leaf.grad for leaf in leaves])
    fast, ref = results
    assert fast.backend == "keops/online" and ref.backend == "array_api/tensorized"
    assert fast.value.dtype == data[0].dtype and fast.value.shape == ref.value.shape
    _close(fast.value, ref.value, dtype)
    for name in ("f", "g", "f_aa", "g_bb"):
        if getattr(ref, name) is not None:
            _close(getattr(fast, name), getattr(ref, name), dtype)
    for mine, expected in zip(*grads):
        _close(mine, expected, dtype)
    # the autograd-free gradients (envelope theorem) agree with autograd
    for mine, expected in zip(fast.gradient(), grads[1]):
        _close(mine, expected, dtype)


@pytest.mark.parametrize("dtype", ["float64"])
@pytest.mark.parametrize(
    "loss, kw",
    [
        (ota.energy_distance, {}),
        (ota.gaussian_mmd, {"blur": 0.3}),
        (ota.laplacian_mmd, {"blur": 0.3}),
        (ota.hausdorff_divergence, {"blur": 0.1, "p": 1}),
        (ota.hausdorff_divergence, {"blur": 0.1, "p": 2}),
    ],
)
def test_kernel_losses_and_hausdorff_match_tensorized(dtype, loss, kw):
    data = _data(dtype, batched=True)
    values, grads = [], []
    for backend in ("keops/online", "tensorized"):
        leaves = [t.clone().requires_grad_(dtype == "float64") for t in data]
        values.append(loss(*leaves, backend=backend, **kw))
        if dtype == "float64":  # autograd through kernel_sum / softmin in points and weights
            values[-1].sum().backward()
            grads.append([leaf.grad for leaf in leaves])
    fast, ref = values
    assert fast.dtype == data[0].dtype and fast.shape == (3,)
    # Kernel norms are differences of O(1) sums: compare at the scale of those sums.
    scale = max(float(ref.detach().abs().max()), RTOL[dtype])
    assert float((fast - ref).detach().abs().max()) <= RTOL[dtype] * scale
    for mine, expected in zip(*grads):
        _close(mine, expected, dtype)


def test_transport_map_matches_the_dense_plan():
    x, y, a, b = _data("float64", batched=False)
    res = ota.sinkhorn(x, y, a, b, backend="keops/online")
    assert res.backend == "keops/online"
    state = res._state
    mapped = state.geoms.xy.softmax_weighted_sum(res.eps, state.log_b + state.pot.g_ab / res.eps, state.measures.y)
    plan = ota.sinkhorn(x, y, a, b, backend="tensorized").plan()
    keep = a > 0
    expected = (plan @ y)[keep] / plan.sum(1, keepdim=True)[keep]
    np.testing.assert_allclose(mapped[0][keep].numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)


def test_gradcheck_float64():
    """``torch.autograd.gradcheck`` (fast mode: random projections of the Jacobian) in float64.

    Autograd differentiates the final extrapolation step only (envelope theorem): that is the
    derivative of the computed function only once the loop has converged, and differs from it
    by O(1 - scaling) otherwise. So we take a large blur (a strongly contracting Sinkhorn map)
    reached slowly: ``scaling=0.99`` from ``diameter=3`` to ``blur=2``, 40 iterations. The
    balanced error is then ~1e-5 relative (p=1, p=2). Unbalanced OT converges more slowly
    (same on the tensorized path: ~5e-3 relative at scaling=0.9, ~6e-4 at 0.99), hence its
    looser tolerance; a wrong gradient would be off by O(1).
    """
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.random((5, D))).requires_grad_(True)
    y = torch.from_numpy(rng.random((5, D)) + 0.3).requires_grad_(True)
    a = torch.from_numpy(rng.random(5) + 0.5).requires_grad_(True)
    b = torch.from_numpy(rng.random(5) + 0.5).requires_grad_(True)
    kw = dict(blur=2.0, diameter=3.0, scaling=0.99, backend="keops/online")
    assert ota.sinkhorn(x, y, **kw).backend == "keops/online"
    check = dict(eps=1e-6, fast_mode=True)
    for p in (1, 2):  # balanced: weights stay fixed (a single weight cannot move alone)
        assert torch.autograd.gradcheck(
            lambda x, y: ota.sinkhorn_divergence(x, y, p=p, **kw), (x, y), atol=1e-5, rtol=1e-4, **check
        )
    assert torch.autograd.gradcheck(
        lambda x, y, a, b: ota.sinkhorn_divergence(x, y, a, b, p=1, reach=2.0, **kw),
        (x, y, a, b), atol=2e-3, rtol=1e-3, **check,
    )


def test_coincident_points_give_zero_gradient():
    x, _, _, _ = _data("float64", batched=False)
    leaf = x.clone().requires_grad_(True)
    for loss, kw in [(ota.sinkhorn_divergence, {"p": 1, "blur": 0.1, "tol": None}), (ota.energy_distance, {})]:
        value = loss(leaf, x.clone(), backend="keops/online", **kw)
        (grad,) = torch.autograd.grad(value, [leaf])
        assert abs(float(value.detach())) < 1e-12
        assert torch.isfinite(grad).all() and float(grad.abs().max()) < 1e-10


# ----------------------------------------------------------------------------------------
# Fallback and side effects
# ----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A registry with a KeOps plugin that has not tried to load yet, first for torch tensors
    (as for CUDA tensors without the Numba CUDA kernels)."""
    plugin = KeOpsPlugin()
    monkeypatch.setattr(backends, "PLUGINS", [plugin, ArrayAPIPlugin()])
    return plugin


def _fallback_checks(caplog, expected_reason, level=logging.WARNING):
    """One message at ``level`` (INFO: pykeops not installed; WARNING: installed but broken)."""
    x, y, _, _ = _data("float64", batched=False)
    with caplog.at_level(logging.INFO, logger="ot_agnostic"):
        auto = ota.sinkhorn(x, y, backend="auto")
        online = ota.sinkhorn(x, y, backend="online")
        ota.energy_distance(x, y, backend="online")
    assert auto.backend == "array_api/tensorized" and online.backend == "array_api/online"
    records = [r for r in caplog.records if r.name == "ot_agnostic" and r.levelno >= logging.INFO]
    warnings = [r for r in records if r.levelno == level]
    assert len(records) == len(warnings) == 1, [r.getMessage() for r in records]
    message = warnings[0].getMessage()
    for part in (expected_reason, "pip install pykeops", "g++", "backend='tensorized'", "Falling back"):
        assert part in message
    ref = ota.sinkhorn(x, y, backend="tensorized")
    # Same tensorized float64 path, same data: torch's reduction orders only, 1e-12 relative.
    assert float(auto.value) == pytest.approx(float(ref.value), rel=1e-12)
    _close(online.value, ref.value, "float64")


@pytest.fixture
def no_pykeops(monkeypatch):
    """``import pykeops.torch`` fails as if pykeops were not installed (None in sys.modules)."""
    from ot_agnostic.kernels import keops_torch

    keops_torch._deps.cache_clear()
    monkeypatch.setitem(sys.modules, "pykeops.torch", None)
    yield
    keops_torch._deps.cache_clear()


def test_missing_pykeops_falls_back_with_one_info_message(fresh_plugins, no_pykeops, caplog):
    """Not installing pykeops is a choice: an INFO message, not a warning at every start."""
    _fallback_checks(caplog, "the KeOps backend is unavailable (ModuleNotFoundError: import of pykeops.torch", logging.INFO)
    assert fresh_plugins._errors["cpu"]  # remembered: the import is not retried


def test_keops_by_name_without_pykeops_raises_and_does_not_fall_back(fresh_plugins, no_pykeops, caplog):
    x, y, _, _ = _data("float64", batched=False)
    with caplog.at_level(logging.WARNING, logger="ot_agnostic"):
        with pytest.raises(ImportError, match=r"KeOps backend is unavailable .*pip install pykeops"):
            ota.sinkhorn(x, y, backend="keops")
        with pytest.raises(ImportError, match="pip install pykeops"):
            ota.energy_distance(x, y, backend="keops/online")
    assert not [r for r in caplog.records if r.name == "ot_agnostic"]  # no "Falling back" message


def test_failed_self_test_falls_back_with_one_warning(fresh_plugins, monkeypatch, caplog):
    def broken():
        module = type(sys)("broken_keops")
        module.self_test = lambda device, dtype, dim: float("nan")
        return module

    monkeypatch.setattr(keops_plugin, "load_kernels", broken)
    _fallback_checks(caplog, "failed its self-test (RuntimeError: KeOps' self-test on cpu (float64) is off by nan")


def test_a_working_keops_logs_nothing(fresh_plugins, caplog):
    x, y, _, _ = _data("float64", batched=False)
    with caplog.at_level(logging.DEBUG, logger="ot_agnostic"):
        assert ota.sinkhorn(x, y, backend="online").backend == "keops/online"
    assert not [r for r in caplog.records if r.name == "ot_agnostic"]


def test_cpu_tensors_never_initialise_cuda():
    code = textwrap.dedent(
        """
        import torch, ot_agnostic as ota
        x = torch.rand(30, 3, requires_grad=True)
        for backend in ("keops", "auto"):
            res = ota.sinkhorn(x, torch.rand(20, 3), backend=backend)
            res.value.backward()
            ota.energy_distance(x, torch.rand(20, 3), backend=backend).backward()
            print(res.backend, torch.cuda.is_initialized())
        """
    )
    env = dict(os.environ, KEOPS_CACHE_FOLDER=os.environ["KEOPS_CACHE_FOLDER"])
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["keops/online False", "numba/online False"]


def _keops_binaries():
    import glob

    return set(glob.glob(os.path.join(os.environ["KEOPS_CACHE_FOLDER"], "**", "*.so"), recursive=True))


def test_warmup_compiles_what_a_call_then_uses():
    """After ``warmup``, calls on that dtype, D and p build no new KeOps binary."""
    ota.warmup(dtypes=("float64",), ps=(1,), backend="keops", dims=(D,))
    before = _keops_binaries()
    assert before
    x, y, a, b = (t.clone().requires_grad_(True) for t in _data("float64", batched=False))
    ota.sinkhorn_divergence(x, y, a, b, p=1, backend="keops").backward()
    for loss in (ota.energy_distance, ota.laplacian_mmd):
        loss(x, y, a, b, backend="keops").backward()
    assert _keops_binaries() == before


def test_warmup_rejects_other_backends():
    with pytest.raises(ValueError, match="warmup knows backend='numba' and backend='keops', not 'array_api'"):
        ota.warmup(backend="array_api")


@pytest.mark.parametrize("reach", [None, 0.4])
def test_multiscale_with_keops_ranges_matches_numpy(reach):
    """KeOps block-sparse reductions (``ranges``) inside the multiscale solver: same value and
    gradients as the NumPy (Numba) multiscale path on the same data, autograd included."""
    rng = np.random.default_rng(4)
    x, y = rng.random((300, D)), rng.random((250, D)) + 0.1
    b = np.full(250, (1.3 if reach else 1.0) / 250)
    kw = dict(blur=0.05, scaling=0.7, cluster_scale=0.15, reach=reach)
    value, grads = ota.value_and_grad(x, y, b=b, backend="multiscale", **kw)
    leaves = [torch.tensor(t, requires_grad=True) for t in (x, y, b)]
    res = ota.sinkhorn(leaves[0], leaves[1], b=leaves[2], backend="keops/multiscale", **kw)
    assert res.backend == "keops/multiscale" and 0 < res.kept_fraction < 1
    res.value.backward()
    _close(res.value, value, "float64")
    for leaf, expected in zip(leaves, (grads.x, grads.y, grads.b)):
        _close(leaf.grad, expected, "float64")
    for mine, expected in zip(res.gradient(), grads):
        _close(mine, expected, "float64")


@pytest.mark.parametrize("p", [1, 2])
def test_float32_hausdorff_matches_tensorized(p):
    data = _data("float32", batched=True)
    fast = ota.hausdorff_divergence(*data, blur=0.1, p=p, backend="online")
    ref = ota.hausdorff_divergence(*data, blur=0.1, p=p, backend="tensorized")
    scale = max(float(ref.abs().max()), RTOL["float32"])
    assert float((fast - ref).abs().max()) <= RTOL["float32"] * scale
