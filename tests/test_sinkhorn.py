"""The Sinkhorn engine and :class:`SinkhornResult`: value, potentials, schedule, plans, batching,
agreement of the dense ("tensorized") and chunked ("online") geometries, output types, and
cross-checks against independent implementations (GeomLoss, optimal assignment, 1-D sorting).
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import TOL, library_of, to_lib, to_numpy

import ot_agnostic as ota
from ot_agnostic import backends
from ot_agnostic.backends import Method, array_api
from ot_agnostic.costs import Cost, Kernel

PUBLIC = {
    "sinkhorn": lambda *args, **kw: ota.sinkhorn(*args, **kw).value,
    "sinkhorn_divergence": ota.sinkhorn_divergence,
    "energy_distance": ota.energy_distance,
    "gaussian_mmd": ota.gaussian_mmd,
    "laplacian_mmd": ota.laplacian_mmd,
    "hausdorff_divergence": ota.hausdorff_divergence,
}
#: keyword arguments that make each function non-trivial on unit-scale data
PUBLIC_KWARGS = {
    "sinkhorn": {"blur": 0.2},
    "sinkhorn_divergence": {"blur": 0.2},
    "energy_distance": {},
    "gaussian_mmd": {"blur": 0.5},
    "laplacian_mmd": {"blur": 0.5},
    "hausdorff_divergence": {"blur": 0.2},
}


def problem(N=12, M=9, D=2, B=None, seed=0, uniform=False, mass_b=1.0):
    """Points in the unit cube (``y`` shifted) and positive weights, as float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    lead = () if B is None else (B,)
    x = rng.random(lead + (N, D))
    y = rng.random(lead + (M, D)) * 0.8
    y[..., 0] += 0.3
    if uniform:
        a, b = np.full(lead + (N,), 1.0 / N), np.full(lead + (M,), 1.0 / M)
    else:
        a = rng.uniform(0.5, 1.5, lead + (N,))
        b = rng.uniform(0.5, 1.5, lead + (M,))
    a = a / a.sum(axis=-1, keepdims=True)
    b = mass_b * b / b.sum(axis=-1, keepdims=True)
    return x, y, a, b


def as_lib(lib, *arrays, dtype="float64"):
    return tuple(None if arr is None else to_lib(arr, lib, dtype) for arr in arrays)


def bbox_diagonal(x, y):
    """Independent NumPy version of the default diameter (all batches together)."""
    pts = np.concatenate([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    return float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))


def cost_matrix(x, y, p):
    """Independent NumPy ``|x - y|^p / p``, for (N, D) or (B, N, D) inputs."""
    dist = np.sqrt(np.sum((x[..., :, None, :] - y[..., None, :, :]) ** 2, axis=-1))
    return dist**p / p


def generalized_kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    positive = p > 0
    return float(np.sum(p[positive] * np.log(p[positive] / q[positive])) - p.sum() + q.sum())


def assert_close(actual, expected, dtype, scale=1.0, factor=1.0):
    tol = factor * TOL[dtype]
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------
# The result object
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("debias", [True, False])
def test_value_equals_sinkhorn_divergence(lib, dtype, p, reach, debias):
    x, y, a, b = as_lib(lib, *problem(), dtype=dtype)
    kwargs = dict(p=p, blur=0.1, reach=reach, debias=debias)
    result = ota.sinkhorn(x, y, a, b, **kwargs)
    value = ota.sinkhorn_divergence(x, y, a, b, **kwargs)
    assert np.isfinite(to_numpy(value))
    assert_close(result.value, value, dtype)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("debias", [True, False])
def test_dirac_masses_cost_exactly_c(lib, dtype, p, blur, debias):
    """Between two Dirac masses the only plan is the product: OT_eps = C(x, y) and OT_eps(a, a) = 0,
    so S_eps = OT_eps = |x - y|^p / p for every blur."""
    rng = np.random.default_rng(p)
    x, y = rng.normal(size=(1, 3)), rng.normal(size=(1, 3))
    x, y = x.astype(dtype).astype(np.float64), y.astype(dtype).astype(np.float64)
    value = ota.sinkhorn_divergence(*as_lib(lib, x, y, dtype=dtype), p=p, blur=blur, debias=debias)
    expected = np.linalg.norm(x - y) ** p / p
    assert_close(value, expected, dtype, scale=expected)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("debias", [True, False])
def test_potential_shapes(lib, batched, debias):
    B = 3 if batched else None
    x, y, a, b = as_lib(lib, *problem(N=7, M=5, B=B))
    result = ota.sinkhorn(x, y, a, b, blur=0.1, debias=debias)
    lead = (3,) if batched else ()
    assert tuple(result.value.shape) == lead
    assert tuple(result.f.shape) == lead + (7,)
    assert tuple(result.g.shape) == lead + (5,)
    if debias:
        assert tuple(result.f_aa.shape) == lead + (7,)
        assert tuple(result.g_bb.shape) == lead + (5,)
    else:
        assert result.f_aa is None and result.g_bb is None
    assert result.plan_shape == lead + (7, 5)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("scaling", [0.5, 0.7, 0.93])
@pytest.mark.parametrize("blur", [0.013, 0.1])
def test_eps_schedule_is_geometric_from_diameter_to_blur(p, scaling, blur):
    x, y, _, _ = problem()
    diameter = 1.7
    result = ota.sinkhorn(x, y, p=p, blur=blur, scaling=scaling, diameter=diameter, tol=None)
    schedule = np.asarray(result.eps_schedule)
    # Exact: the same function of the same Python floats (no array, no reduction).
    assert result.eps_schedule == ota.epsilon_schedule(p, diameter, blur, scaling)
    # updates: the initialisation, one per temperature, the final one
    assert result.n_iter == len(result.eps_schedule) + 2
    assert result.eps == pytest.approx(blur**p, rel=1e-12)
    # starts at diameter**p (twice: initialisation, then the first loop temperature) ...
    assert schedule[0] == pytest.approx(diameter**p, rel=1e-12)
    assert schedule[1] == pytest.approx(diameter**p, rel=1e-12)
    # ... decreases geometrically with ratio scaling**p ...
    np.testing.assert_allclose(schedule[2:-1] / schedule[1:-2], scaling**p, rtol=1e-10)
    # ... and ends at blur**p, with a last ratio no larger than one step.
    assert schedule[-1] == pytest.approx(blur**p, rel=1e-12)
    last_ratio = schedule[-1] / schedule[-2]
    assert scaling**p * (1 - 1e-10) <= last_ratio <= 1.0
    expected_steps = np.ceil(np.log(blur / diameter) / np.log(scaling))
    assert len(schedule) == expected_steps + 2


def test_eps_schedule_when_blur_exceeds_the_diameter():
    """GeomLoss's schedule: initialise at diameter**p, then one loop step at blur**p."""
    x, y, _, _ = problem()
    result = ota.sinkhorn(x, y, p=2, blur=3.0, diameter=1.0, tol=None)
    assert result.eps_schedule == pytest.approx((1.0, 9.0))
    assert result.n_iter == 4


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("p", [1, 2])
def test_default_diameter_is_the_bounding_box_diagonal(lib, batched, p):
    x, y, a, b = problem(B=3 if batched else None, D=3)
    diameter = bbox_diagonal(x, y)
    xl, yl, al, bl = as_lib(lib, x, y, a, b)
    default = ota.sinkhorn(xl, yl, al, bl, p=p, blur=0.05)
    explicit = ota.sinkhorn(xl, yl, al, bl, p=p, blur=0.05, diameter=diameter)
    assert default.eps_schedule[0] == pytest.approx(diameter**p, rel=1e-6)
    assert default.eps_schedule == pytest.approx(explicit.eps_schedule, rel=1e-6)
    assert_close(default.value, explicit.value, "float64")


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_change_decreases_with_slower_eps_scaling(p, seed):
    x, y, a, b = problem(N=40, M=30, seed=seed)
    coarse = ota.sinkhorn(x, y, a, b, p=p, blur=0.1, scaling=0.5)
    fine = ota.sinkhorn(x, y, a, b, p=p, blur=0.1, scaling=0.9)
    assert isinstance(coarse.max_change, float) and isinstance(fine.max_change, float)
    assert fine.n_iter > coarse.n_iter
    assert 0.0 < fine.max_change < coarse.max_change


@pytest.mark.parametrize(
    "backend, expected",
    [("auto", "array_api/tensorized"), ("tensorized", "array_api/tensorized"), ("online", "array_api/online"),
     (ota.Method.ONLINE, "array_api/online")],
)
def test_backend_string_of_the_array_api_plugin(lib, backend, expected, array_api_only):
    x, y, _, _ = as_lib(lib, *problem())
    assert ota.sinkhorn(x, y, backend=backend).backend == expected


@pytest.mark.parametrize("backend", ["auto", "tensorized", "online"])
def test_backend_string_names_the_selected_plugin_and_method(lib, backend):
    import array_api_compat

    x, y, _, _ = as_lib(lib, *problem())
    result = ota.sinkhorn(x, y, backend=backend)
    selection = backends.select_backend(array_api_compat.array_namespace(x), x, backend, (1, 12, 9, 2))
    assert result.backend == f"{selection.plugin.id.value}/{selection.method.value}"
    plugin, method = result.backend.split("/")
    assert plugin in {member.value for member in ota.PluginId}
    assert method in {"tensorized", "online"} and (backend == "auto" or method == backend)


# ----------------------------------------------------------------------------------------
# Transport plans
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("scaling", [0.5, 0.9])
def test_plan_marginals_are_within_the_bound_given_by_max_change(lib, dtype, p, scaling):
    """Row i of the plan sums to a_i * S(g_new) / S(g_old) with S(g) = sum_j b_j exp((g_j - C_ij)/eps),
    because f is the exact softmin of the previous g: so row_i / a_i lies within
    exp(+-max_change / eps), and likewise for the columns."""
    x, y, a, b = problem(N=30, M=20)
    result = ota.sinkhorn(*as_lib(lib, x, y, a, b, dtype=dtype), p=p, blur=0.1, scaling=scaling, debias=False)
    plan = to_numpy(result.plan())
    assert plan.shape == (30, 20)
    assert np.all(plan >= 0)
    bound = np.expm1(result.max_change / result.eps) + 10 * TOL[dtype]
    np.testing.assert_array_less(np.abs(plan.sum(axis=1) / a - 1.0), bound)
    np.testing.assert_array_less(np.abs(plan.sum(axis=0) / b - 1.0), bound)


@pytest.mark.parametrize("p", [1, 2])
def test_plan_marginals_match_the_weights_when_converged(lib, p):
    """blur = 0.5 (about a third of the diameter) and scaling = 0.9: the plan's rows sum to a and
    its columns to b within 1% (relative to each weight)."""
    x, y, a, b = problem(N=30, M=20)
    result = ota.sinkhorn(*as_lib(lib, x, y, a, b), p=p, blur=0.5, scaling=0.9)
    plan = to_numpy(result.plan())
    np.testing.assert_allclose(plan.sum(axis=1), a, rtol=1e-2)
    np.testing.assert_allclose(plan.sum(axis=0), b, rtol=1e-2)


@pytest.mark.parametrize("batched", [False, True])
def test_plan_rows_and_blocks_equal_the_dense_plan(lib, dtype, batched):
    N, M = 11, 7
    x, y, a, b = as_lib(lib, *problem(N=N, M=M, B=2 if batched else None), dtype=dtype)
    result = ota.sinkhorn(x, y, a, b, blur=0.2)
    plan = to_numpy(result.plan())
    assert plan.shape == ((2,) if batched else ()) + (N, M)
    # Same formula, other shapes: not bit for bit, as the libraries may run exp and the cost's
    # sums through SIMD or scalar loops (or other reduction orders) by shape. A cost ulp
    # becomes |C| / eps = O(10) ulp of the plan; rows shifted by one would be off by O(1).
    tol = {"rtol": {"float32": 1e-4, "float64": 1e-10}[dtype], "atol": 1e-30}  # atol: subnormals
    for start, stop in [(0, 3), (4, 9), (N - 1, N), (5, 5), (0, N)]:
        rows = to_numpy(result.plan_rows(start, stop))
        assert rows.shape == plan[..., start:stop, :].shape
        np.testing.assert_allclose(rows, plan[..., start:stop, :], **tol)
    np.testing.assert_allclose(to_numpy(result.plan_rows(6)), plan[..., 6:, :], **tol)
    for size in [1, 3, 4, N, N + 5]:
        blocks = list(result.plan_blocks(rows=size))
        assert [start for start, _, _ in blocks] == list(range(0, N, size))
        assert all(stop == min(N, start + size) for start, stop, _ in blocks)
        stacked = np.concatenate([to_numpy(block) for _, _, block in blocks], axis=-2)
        np.testing.assert_allclose(stacked, plan, **tol)
    default_blocks = np.concatenate([to_numpy(block) for _, _, block in result.plan_blocks()], axis=-2)
    np.testing.assert_allclose(default_blocks, plan, **tol)


@pytest.mark.parametrize("batched", [False, True])
def test_dense_plan_refuses_too_many_entries(lib, batched):
    x, y, a, b = as_lib(lib, *problem(N=6, M=5, B=3 if batched else None))
    result = ota.sinkhorn(x, y, a, b, blur=0.2)
    entries = (3 if batched else 1) * 6 * 5
    with pytest.raises(MemoryError, match=r"the dense plan would have") as info:
        result.plan(max_entries=entries - 1)
    assert "plan_blocks()" in str(info.value) and "plan_rows()" in str(info.value)
    assert to_numpy(result.plan(max_entries=entries)).size == entries


def test_plan_blocks_refuses_a_negative_block_size(lib):
    """``rows=-1`` must not silently yield no block at all (an empty plan)."""
    x, y, _, _ = as_lib(lib, *problem(N=6, M=5))
    result = ota.sinkhorn(x, y, blur=0.2)
    with pytest.raises(ValueError, match=r"rows"):
        list(result.plan_blocks(rows=-1))


@pytest.mark.parametrize("start, stop", [(-1, 2), (0, 7), (4, 2), (7, None), (3, -1)])
def test_plan_rows_out_of_range(lib, start, stop):
    x, y, _, _ = as_lib(lib, *problem(N=6, M=5))
    result = ota.sinkhorn(x, y, blur=0.2)
    with pytest.raises(IndexError, match=r"out of range for N=6"):
        result.plan_rows(start, stop)


def test_zero_weights_give_zero_rows_and_columns(lib, dtype):
    x, y, a, b = problem(N=10, M=8)
    a[[2, 7]] = 0.0
    b[[0, 5]] = 0.0
    a, b = a / a.sum(), b / b.sum()
    result = ota.sinkhorn(*as_lib(lib, x, y, a, b, dtype=dtype), blur=0.2)
    plan = to_numpy(result.plan())
    assert np.all(np.isfinite(plan))
    # Exact zeros: a zero weight is a log-weight of -inf (or LOG_ZERO), whose exp is 0.
    assert np.all(plan[[2, 7], :] == 0.0)
    assert np.all(plan[:, [0, 5]] == 0.0)
    assert plan.sum() == pytest.approx(1.0, rel=0.05)


@pytest.mark.filterwarnings("ignore:this (gradient|plan) comes from potentials:UserWarning")  # tol=None on purpose
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_plan_and_raw_ot_value_satisfy_the_primal_formula(p, reach):
    """OT_eps = <pi, C> + eps KL(pi | a x b) [+ rho KL(pi 1 | a) + rho KL(pi^T 1 | b) if unbalanced]
    at the optimum, where the primal value of the plan equals the dual ``value``.

    The gap is first order in the convergence error: with GeomLoss's schedule (tol=None) at
    scaling 0.9 it is ~1e-3 relative; refined to tol=1e-9 it must vanish (below 1e-7, measured
    ~1e-10). A wrong mass term or sign would be off by ~eps = 0.25**p whatever the convergence."""
    x, y, a, b = problem(N=30, M=20, seed=3, mass_b=1.0 if reach is None else 1.3)
    C = cost_matrix(x, y, p)

    def gap(scaling, tol):
        result = ota.sinkhorn(x, y, a, b, p=p, blur=0.5, reach=reach, scaling=scaling, debias=False, tol=tol)
        plan, eps = to_numpy(result.plan()), result.eps
        primal = np.sum(plan * C) + eps * generalized_kl(plan, np.outer(a, b))
        if reach is not None:
            assert result.rho == pytest.approx(reach**p)
            primal += result.rho * (generalized_kl(plan.sum(axis=1), a) + generalized_kl(plan.sum(axis=0), b))
        else:
            assert result.rho is None
        value = float(result.value)
        return (primal - value) / value

    coarse, converged = gap(0.9, None), gap(0.5, 1e-9)
    assert abs(converged) <= 1e-7
    assert abs(converged) <= abs(coarse) / 100


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_batched_sinkhorn_equals_each_slice(lib, p, reach):
    B = 3
    x, y, a, b = problem(N=8, M=6, B=B, seed=4)
    x[1] *= 2.0  # batches of different sizes: the default diameter sees all of them
    diameter = bbox_diagonal(x, y)
    batched = ota.sinkhorn(*as_lib(lib, x, y, a, b), p=p, blur=0.1, reach=reach)
    assert tuple(batched.value.shape) == (B,)
    for k in range(B):
        single = ota.sinkhorn(*as_lib(lib, x[k], y[k], a[k], b[k]), p=p, blur=0.1, reach=reach,
                              diameter=diameter)
        assert tuple(single.value.shape) == ()
        for name in ["value", "f", "g", "f_aa", "g_bb"]:
            assert_close(getattr(batched, name)[k, ...], getattr(single, name), "float64", scale=diameter**p)
        np.testing.assert_allclose(to_numpy(batched.plan()[k, ...]), to_numpy(single.plan()), rtol=1e-6,
                                   atol=1e-12)


@pytest.mark.parametrize("name", ["energy_distance", "gaussian_mmd", "laplacian_mmd", "hausdorff_divergence"])
def test_batched_kernel_norms_equal_each_slice(lib, name):
    B = 3
    x, y, a, b = problem(N=8, M=6, B=B, seed=5)
    batched = PUBLIC[name](*as_lib(lib, x, y, a, b), **PUBLIC_KWARGS[name])
    assert tuple(batched.shape) == (B,)
    for k in range(B):
        single = PUBLIC[name](*as_lib(lib, x[k], y[k], a[k], b[k]), **PUBLIC_KWARGS[name])
        assert_close(batched[k, ...], single, "float64")


# ----------------------------------------------------------------------------------------
# Tensorized and online geometries agree
# ----------------------------------------------------------------------------------------

SMALL_BLOCK = 40  # cost entries per block: two to four rows at a time here


@pytest.fixture
def array_api_only(monkeypatch):
    """Route every call to the pure Array API plugin (other plugins, e.g. Numba for NumPy, may
    otherwise take "auto" and "online")."""
    monkeypatch.setattr(backends, "PLUGINS", [array_api.ArrayAPIPlugin()])


@pytest.fixture
def small_online_blocks(monkeypatch, array_api_only):
    """Make the online geometry work on blocks of ``SMALL_BLOCK`` entries; record the instances.

    (``ONLINE_BLOCK_ENTRIES`` is bound as a default argument when the module is imported, so
    patching the constant alone would not reach ``OnlineGeometry``.)
    """
    created = []

    class SmallBlocks(array_api.OnlineGeometry):
        def __init__(self, x, y, cost, *, xp, block_entries=SMALL_BLOCK):
            super().__init__(x, y, cost, xp=xp, block_entries=min(block_entries, SMALL_BLOCK))
            created.append(self)

    monkeypatch.setattr(array_api, "ONLINE_BLOCK_ENTRIES", SMALL_BLOCK)
    monkeypatch.setattr(array_api, "OnlineGeometry", SmallBlocks)
    return created


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("batched", [False, True])
def test_tensorized_and_online_sinkhorn_agree(lib, dtype, p, reach, batched, small_online_blocks):
    x, y, a, b = as_lib(lib, *problem(N=13, M=9, B=2 if batched else None), dtype=dtype)
    kwargs = dict(p=p, blur=0.1, reach=reach)
    dense = ota.sinkhorn(x, y, a, b, backend="tensorized", **kwargs)
    online = ota.sinkhorn(x, y, a, b, backend="online", **kwargs)
    assert dense.backend == "array_api/tensorized" and online.backend == "array_api/online"
    assert small_online_blocks and all(g.block_rows < g.shape[1] for g in small_online_blocks)
    scale = 2.0**p
    for name in ["value", "f", "g", "f_aa", "g_bb"]:
        assert_close(getattr(online, name), getattr(dense, name), dtype, scale=scale, factor=10)
    assert_close(online.plan(), dense.plan(), dtype, factor=10)
    assert_close(online.plan_rows(3, 8), dense.plan_rows(3, 8), dtype, factor=10)


@pytest.mark.parametrize("name", ["energy_distance", "gaussian_mmd", "laplacian_mmd", "hausdorff_divergence"])
def test_tensorized_and_online_kernel_norms_agree(lib, dtype, name, small_online_blocks):
    x, y, a, b = as_lib(lib, *problem(N=13, M=9), dtype=dtype)
    dense = PUBLIC[name](x, y, a, b, backend="tensorized", **PUBLIC_KWARGS[name])
    online = PUBLIC[name](x, y, a, b, backend="online", **PUBLIC_KWARGS[name])
    assert small_online_blocks and all(g.block_rows < g.shape[1] for g in small_online_blocks)
    assert_close(online, dense, dtype, factor=10)


@pytest.mark.parametrize("p", [1, 2])
def test_online_geometry_with_small_blocks_matches_the_dense_one(lib, dtype, p):
    import array_api_compat

    x_np, y_np, _, _ = problem(N=10, M=7, B=2, D=3)
    x, y = as_lib(lib, x_np, y_np, dtype=dtype)
    xp = array_api_compat.array_namespace(x)
    cost = Cost(p)
    dense = array_api.ArrayAPIPlugin().geometry(x, y, cost, Method.TENSORIZED, xp=xp)
    online = array_api.OnlineGeometry(x, y, cost, xp=xp, block_entries=2 * 7 * 3)  # 3 rows per block
    assert online.block_rows == 3 and online.shape == dense.shape == (2, 10, 7)
    h = to_lib(np.random.default_rng(0).normal(size=(2, 7)), lib, dtype)
    assert_close(online.softmin(0.05, h), dense.softmin(0.05, h), dtype, factor=10)
    kernel = Kernel("laplacian" if p == 1 else "gaussian", 0.3)
    assert_close(online.kernel_sum(kernel, h), dense.kernel_sum(kernel, h), dtype, factor=10)
    assert_close(online.cost_rows(2, 9), dense.cost_rows(2, 9), dtype)
    h_x = to_lib(np.random.default_rng(1).normal(size=(2, 10)), lib, dtype)
    assert_close(online.transpose().softmin(0.05, h_x), dense.transpose().softmin(0.05, h_x), dtype, factor=10)


# ----------------------------------------------------------------------------------------
# Output types
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLIC))
@pytest.mark.parametrize("batched", [False, True])
def test_output_library_and_dtype_equal_the_input(lib, dtype, name, batched):
    x, y, a, b = as_lib(lib, *problem(N=6, M=5, B=2 if batched else None), dtype=dtype)
    value = PUBLIC[name](x, y, a, b, **PUBLIC_KWARGS[name])
    assert library_of(value) == lib
    assert value.dtype == x.dtype
    assert tuple(value.shape) == ((2,) if batched else ())
    assert np.all(np.isfinite(to_numpy(value)))


def test_sinkhorn_result_arrays_keep_library_and_dtype(lib, dtype):
    x, y, a, b = as_lib(lib, *problem(N=6, M=5), dtype=dtype)
    result = ota.sinkhorn(x, y, a, b, blur=0.2)
    arrays = [result.value, result.f, result.g, result.f_aa, result.g_bb, result.plan(), result.plan_rows(1, 3)]
    arrays += [block for _, _, block in result.plan_blocks(rows=2)]
    for arr in arrays:
        assert library_of(arr) == lib
        assert arr.dtype == x.dtype


# ----------------------------------------------------------------------------------------
# Independent implementations
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("debias", [True, False])
def test_agrees_with_geomloss(p, reach, debias):
    """Same algorithm as GeomLoss's tensorized backend. GeomLoss clamps distances at sqrt(1e-8) = 1e-4
    for p=1 (so its self-distances are not 0), which shifts the debiasing terms by O(1e-4)."""
    torch = pytest.importorskip("torch")
    geomloss = pytest.importorskip("geomloss")
    x, y, a, b = problem(N=30, M=25, seed=6)
    kwargs = dict(p=p, blur=0.1, scaling=0.7, diameter=2.0, reach=reach, debias=debias)
    loss = geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kwargs)
    tensors = [torch.from_numpy(arr) for arr in (x, y, a, b)]
    expected = float(loss(tensors[2], tensors[0], tensors[3], tensors[1]))
    value = float(ota.sinkhorn_divergence(x, y, a, b, tol=None, **kwargs))
    atol = 3e-4 if (p == 1 and debias) else 1e-12
    assert value == pytest.approx(expected, rel=1e-10, abs=atol)


@pytest.mark.parametrize("p", [1, 2])
def test_small_blur_approaches_exact_ot(p):
    """S_eps -> W_p^p / p as blur -> 0. For N = M uniform weights, exact OT is an optimal
    assignment (SciPy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    x, y, _, _ = problem(N=25, M=25, seed=7, uniform=True)
    C = cost_matrix(x, y, p)
    rows, cols = linear_sum_assignment(C)
    exact = C[rows, cols].mean()
    # blur = 1e-3 (diameter ~1.2), slow eps-scaling: within 1% (measured: <0.1% for p=1, 1e-12 for p=2)
    value = float(ota.sinkhorn_divergence(x, y, p=p, blur=0.001, scaling=0.98))
    assert value == pytest.approx(exact, rel=1e-2)


def test_small_blur_approaches_sorted_matching_in_1d():
    x, y, _, _ = problem(N=30, M=30, D=1, seed=8, uniform=True)
    exact = np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2) / 2
    value = float(ota.sinkhorn_divergence(x, y, p=2, blur=0.01, scaling=0.9))
    assert value == pytest.approx(exact, rel=1e-2)
