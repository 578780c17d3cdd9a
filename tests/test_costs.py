"""Custom ground costs (``cost=``, :mod:`ot_agnostic.costs`) on every array library.

* A cost function that recomputes ``|x - y|^2 / 2`` gives the built-in numbers on every
  method (tensorized, online by row blocks, multiscale by cluster pairs).
* A cost that no built-in plugin knows (the l1 "cityblock" distance) against POT's
  converged entropic OT on the same cost matrix (``ot.sinkhorn`` with ``ot.dist(...,
  metric="cityblock")``), and its torch gradients against finite differences.
* Wrong forms and unsupported combinations raise clear errors.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from scipy.special import xlogy

import ot_agnostic as ota
from tests.helpers import TOL, to_lib, to_numpy
from ot_agnostic.costs import Cost, CustomCost, make_cost


def half_squared(x, y):
    xp = array_api_compat.array_namespace(x, y)
    return xp.sum((x[:, :, None, :] - y[:, None, :, :]) ** 2, axis=-1) / 2


def cityblock(x, y):
    xp = array_api_compat.array_namespace(x, y)
    return xp.sum(xp.abs(x[:, :, None, :] - y[:, None, :, :]), axis=-1)


def data(seed=0, n=40, m=30, d=2, batched=False):
    rng = np.random.default_rng(seed)
    shape = (3,) if batched else ()
    x, y = rng.random((*shape, n, d)), 0.8 * rng.random((*shape, m, d)) + 0.3
    a, b = rng.random((*shape, n)) + 0.2, rng.random((*shape, m)) + 0.2
    return x, y, a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)


def relative(mine, ref):
    mine, ref = to_numpy(mine), to_numpy(ref)
    return np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-300)


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale", "auto"])
@pytest.mark.parametrize("reach, batched", [(None, False), (0.3, False), (None, True)])
def test_a_function_of_the_builtin_cost_gives_the_builtin_numbers(lib, dtype, backend, reach, batched):
    x, y, a, b = (to_lib(v, lib, dtype) for v in data(batched=batched))
    kw = dict(p=2, blur=0.05, reach=reach, backend=backend, tol=None)  # same schedule: same numbers
    ref = ota.sinkhorn(x, y, a, b, **kw)
    mine = ota.sinkhorn(x, y, a, b, cost=half_squared, **kw)
    assert mine.backend.startswith("array_api/")
    assert relative(mine.value, ref.value) <= TOL[dtype]
    for name in ("f", "g", "f_aa", "g_bb"):
        assert relative(getattr(mine, name), getattr(ref, name)) <= 10 * TOL[dtype], name
    assert type(mine.value) is type(ref.value) and mine.value.dtype == ref.value.dtype


def test_online_calls_the_function_on_blocks_of_rows(monkeypatch):
    """O(N + M) memory: "online" never asks the function for more than one block of rows."""
    from ot_agnostic.backends import array_api

    monkeypatch.setattr(array_api, "ONLINE_BLOCK_ENTRIES", 64)
    x, y, a, b = data(n=50, m=20)
    shapes = []

    def recording(x1, x2):
        shapes.append((x1.shape[1], x2.shape[1]))
        return half_squared(x1, x2)

    mine = ota.sinkhorn(x, y, a, b, cost=recording, backend="online")
    ref = ota.sinkhorn(x, y, a, b, backend="tensorized")
    assert relative(mine.value, ref.value) <= 1e-12
    assert max(rows * cols for rows, cols in shapes) <= 64


# POT solves the same entropic problem on any cost matrix (see test_references.py for the
# derivation of OT_eps from its plan). Measured over seeds 0-5 at scaling=0.97, blur=0.1
# (eps = 0.1), float32 as float64: value gap <= 4.5e-4 relative (seed 3: 1.3e-4), plan L1
# distance <= 0.042 (one averaged iteration per temperature, as for the built-in costs).
def test_cityblock_cost_matches_pot_entropic_ot(lib, dtype):
    pot = pytest.importorskip("ot", reason="POT is not installed")
    x, y, a, b = data(seed=3)
    eps = 0.1
    C = pot.dist(x, y, metric="cityblock")
    opts = dict(method="sinkhorn_log", numItermax=100_000, stopThr=1e-12)
    plan = pot.sinkhorn(a, b, C, eps, **opts)
    expected = np.sum(plan * C) + eps * np.sum(xlogy(plan, plan / np.outer(a, b)))
    res = ota.sinkhorn(
        *(to_lib(v, lib, dtype) for v in (x, y, a, b)), p=1, blur=eps, scaling=0.97,
        debias=False, cost=cityblock,
    )
    assert relative(res.value, expected) < 3e-3
    assert np.abs(to_numpy(res.plan()) - plan).sum() < 0.15


def test_torch_gradients_of_a_custom_cost_match_finite_differences():
    torch = pytest.importorskip("torch")
    x, y, a, b = (torch.tensor(v) for v in data(seed=4, n=12, m=9))
    kw = dict(p=1, blur=0.3, scaling=0.999, cost=cityblock)
    xt = x.clone().requires_grad_(True)
    ota.sinkhorn_divergence(xt, y, a, b, **kw).backward()
    step, k, d = 1e-5, 3, 1
    shift = torch.zeros_like(x)
    shift[k, d] = step
    finite = (
        ota.sinkhorn_divergence(x + shift, y, a, b, **kw) - ota.sinkhorn_divergence(x - shift, y, a, b, **kw)
    ) / (2 * step)
    assert abs(float(xt.grad[k, d]) - float(finite)) <= 1e-2 * float(xt.grad.abs().max())
    # gradient() (no autograd call by the user) gives the same as backward()
    grads = ota.sinkhorn(x, y, a, b, **kw).gradient()
    assert torch.allclose(grads.x, xt.grad, rtol=1e-8, atol=1e-12)


def test_weight_gradients_need_no_derivative_of_the_cost():
    x, y, a, b = data()
    mine = ota.sinkhorn(x, y, a, b, cost=half_squared)
    ref = ota.sinkhorn(x, y, a, b)
    with pytest.raises(NotImplementedError, match="pass torch tensors"):
        mine.gradient()
    np.testing.assert_allclose(mine.f - mine.f_aa, ref.gradient().a, rtol=1e-10)


def test_hausdorff_takes_a_cost_too(lib):
    x, y, a, b = (to_lib(v, lib, "float64") for v in data())
    ref = ota.hausdorff_divergence(x, y, a, b, p=2, blur=0.1)
    mine = ota.hausdorff_divergence(x, y, a, b, p=2, blur=0.1, cost=half_squared)
    assert relative(mine, ref) <= 1e-10


def test_make_cost_forms():
    assert make_cost(1) == Cost(1)
    custom = CustomCost(2, function=half_squared)
    assert make_cost(2, custom) is custom
    pair = make_cost(1, ("Norm2(X-Y)", cityblock))
    assert (pair.p, pair.formula, pair.function) == (1, "Norm2(X-Y)", cityblock)
    with pytest.raises(TypeError, match="cost must be None, a function"):
        make_cost(2, 3.0)
    with pytest.raises(TypeError, match="cost must be None, a function"):
        make_cost(2, ("SqDist(X,Y)", "not callable"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cost=lambda x, y: x[..., 0]), ValueError, r"must return a \(B, N, M\)"),
        (dict(cost=lambda x, y: half_squared(x, y) * np.nan), ValueError, "returned NaN values"),
        (dict(cost=half_squared, backend="numba"), ValueError, "built-in costs .* only"),
        (dict(cost=half_squared, backend="numba/online"), ValueError, "runs on the 'array_api'"),
        (dict(cost="SqDist(X,Y) / IntCst(2)"), ValueError, "KeOps formula .* torch tensors"),
        (dict(cost="SqDist(X,Y) / IntCst(2)", backend="array_api"), ValueError, "'keops'"),
    ],
)
def test_errors(kwargs, error, match):
    x, y, a, b = data()
    with pytest.raises(error, match=match):
        ota.sinkhorn(x, y, a, b, **kwargs)


def test_multiscale_with_a_formula_alone_says_what_it_needs():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pykeops")
    x, y, a, b = (torch.tensor(v) for v in data())
    with pytest.raises(ValueError, match=r"cost=\(formula, function\)"):
        ota.sinkhorn(x, y, a, b, cost="SqDist(X,Y) / IntCst(2)", backend="multiscale")
