"""The NumPy plugin (Numba CPU kernels) against the pure Array API reference.

Same data, same settings: values, the four potentials and the gradients agree to 1e-5
(float64) / 1e-4 (float32) relative, for every public function, p in {1, 2}, balanced and
unbalanced, batched or not, with weights.
"""

import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic.backends import PLUGINS, PluginId, select_backend

pytest.importorskip("numba")

RTOL = {"float32": 1e-4, "float64": 1e-5}


def _data(rng, dtype, batched, unbalanced=False, N=70, M=55, D=3):
    shape = (3,) if batched else ()
    x = rng.random(shape + (N, D)).astype(dtype)
    y = (rng.random(shape + (M, D)) + 0.2).astype(dtype)
    a = rng.random(shape + (N,)) + 0.1
    b = rng.random(shape + (M,)) + 0.1
    a[..., :3] = 0.0  # zero weights must drop out on both paths
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True) / (1.4 if unbalanced else 1.0)
    return x, y, a.astype(dtype), b.astype(dtype)


def _close(mine, ref, dtype):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    assert np.abs(mine - ref).max() <= RTOL[dtype] * max(np.abs(ref).max(), 1e-12)


def test_numpy_goes_to_numba_for_auto_and_online():
    x = np.zeros((4, 2))
    for backend in ("auto", "online"):
        assert select_backend(np, x, backend, (1, 4, 4, 2)).plugin.id is PluginId.NUMBA
    assert select_backend(np, x, "tensorized", (1, 4, 4, 2)).plugin.id is PluginId.ARRAY_API
    assert PLUGINS[-1].id is PluginId.ARRAY_API  # the fallback closes the list


@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None on purpose
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.3])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_sinkhorn_matches_the_array_api_reference(rng, dtype, p, reach, debias, batched):
    x, y, a, b = _data(rng, dtype, batched, unbalanced=reach is not None)
    kw = dict(p=p, reach=reach, debias=debias, blur=0.05, scaling=0.7, tol=None)  # same schedule: same numbers
    fast = ota.sinkhorn(x, y, a, b, backend="online", **kw)
    ref = ota.sinkhorn(x, y, a, b, backend="tensorized", **kw)
    assert fast.backend == "numba/online" and ref.backend == "array_api/tensorized"
    assert fast.value.dtype == np.dtype(dtype)
    _close(fast.value, ref.value, dtype)
    for name in ("f", "g", "f_aa", "g_bb"):
        if getattr(ref, name) is not None:
            _close(getattr(fast, name), getattr(ref, name), dtype)
    for mine, expected in zip(fast.gradient(), ref.gradient()):
        _close(mine, expected, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
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
def test_kernel_losses_match_the_array_api_reference(rng, dtype, loss, kw):
    x, y, a, b = _data(rng, dtype, batched=True)
    fast = loss(x, y, a, b, backend="online", **kw)
    ref = loss(x, y, a, b, backend="tensorized", **kw)
    assert fast.dtype == np.dtype(dtype) and fast.shape == (3,)
    # Kernel norms are differences of O(1) sums: compare at the scale of those sums.
    scale = max(np.abs(ref).max(), RTOL[dtype])
    assert np.abs(np.asarray(fast, np.float64) - ref).max() <= RTOL[dtype] * scale


def test_transport_map_reduction_matches_dense(rng):
    x, y, a, b = _data(rng, "float64", batched=False)
    res = ota.sinkhorn(x, y, a, b, backend="online")
    geom = res._state.geoms.xy
    h = res._state.log_b + res._state.pot.g_ab / res.eps  # the g that the plan uses
    mapped = geom.softmax_weighted_sum(res.eps, h, res._state.measures.y)
    plan = ota.sinkhorn(x, y, a, b, backend="tensorized").plan()
    rows = plan.sum(axis=1, keepdims=True)
    keep = a > 0
    expected = (plan @ y)[keep] / rows[keep]
    np.testing.assert_allclose(mapped[0][keep], expected, rtol=1e-8, atol=1e-10)


def test_one_thread_gives_the_same_numbers(rng):
    numba = pytest.importorskip("numba")
    x, y, a, b = _data(rng, "float64", batched=False)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = ota.value_and_grad(x, y, a, b)
    finally:
        numba.set_num_threads(before)
    multi = ota.value_and_grad(x, y, a, b)
    np.testing.assert_allclose(single[0], multi[0], rtol=1e-12)
    for s, m in zip(single[1], multi[1]):
        np.testing.assert_allclose(s, m, rtol=1e-10, atol=1e-15)


def test_large_problem_stays_online_and_matches_chunked_reference(rng):
    # Big enough that "auto" on the Array API path would go online (chunked) too.
    x = rng.random((3000, 2))
    y = rng.random((2500, 2))
    fast = ota.sinkhorn_divergence(x, y, blur=0.1)
    ref = ota.sinkhorn_divergence(x, y, blur=0.1, backend="tensorized")
    assert float(fast) == pytest.approx(float(ref), rel=1e-9)
