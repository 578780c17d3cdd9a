"""Backends: the ``Method`` enum, the registry (``select_backend``), the geometry contract of the
pure Array API plugin (dense "tensorized" and chunked "online" geometries), the ground cost, and
autograd through the p=1 cost at coincident points.

The geometry contract is checked against dense NumPy / SciPy formulas computed independently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.helpers import TOL, to_lib, to_numpy
from scipy.special import logsumexp, softmax

import ot_agnostic as ota
from ot_agnostic import backends
from ot_agnostic.backends import Method, PluginId, parse_backend, select_backend
from ot_agnostic.backends.array_api import DENSE_MAX_ENTRIES, ArrayAPIPlugin, OnlineGeometry
from ot_agnostic.costs import EXACT_DIFFERENCE_MAX_DIM, Cost, Kernel

# ----------------------------------------------------------------------------------------
# Method.parse
# ----------------------------------------------------------------------------------------

OPTIONS = "'auto', 'tensorized', 'online', 'multiscale'"


@pytest.mark.parametrize("member", list(Method))
def test_method_parse_accepts_members_and_their_strings(member):
    assert Method.parse(member) is member
    assert Method.parse(member.value) is member
    assert Method.parse(str(member.value)) is member


@pytest.mark.parametrize("value", ["AUTO", "Online", "gpu", "", " auto", None, 3, 1.0, [1], b"auto", PluginId.KEOPS])
def test_method_parse_rejects_anything_else_listing_the_options(value):
    with pytest.raises(ValueError, match=r"^unknown backend ") as info:
        Method.parse(value)
    message = str(info.value)
    assert repr(value) in message
    assert f"choose one of {OPTIONS}" in message
    assert all(repr(m.value) in message for m in Method)


# ----------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------


def _namespace(lib, dtype="float64"):
    import array_api_compat

    x = to_lib(np.zeros((1, 3, 2)), lib, dtype)
    return array_api_compat.array_namespace(x), x


@pytest.fixture
def array_api_only(monkeypatch):
    """Only the pure Array API plugin is registered (a NumPy fast path may otherwise come first)."""
    monkeypatch.setattr(backends, "PLUGINS", [ArrayAPIPlugin()])


def test_the_array_api_plugin_closes_the_registry():
    assert isinstance(backends.PLUGINS[-1], ArrayAPIPlugin)
    assert backends.PLUGINS[-1].id is PluginId.ARRAY_API


@pytest.mark.parametrize("backend", ["tensorized", Method.TENSORIZED])
def test_tensorized_is_served_by_the_array_api_plugin_for_every_library(lib, backend):
    xp, x = _namespace(lib)
    selection = select_backend(xp, x, backend, (1, 3, 3, 2))
    assert selection.plugin.id is PluginId.ARRAY_API
    assert selection.method is Method.TENSORIZED
    assert str(selection) == "array_api/tensorized"


@pytest.mark.parametrize("backend", ["auto", "online", "tensorized"])
def test_registry_picks_the_first_plugin_that_runs_the_concrete_method(lib, backend):
    """The first plugin that supports the request resolves "auto"; if it cannot run the method it
    resolved to (KeOps leaves small problems to the dense geometry), the next plugin that can does."""
    xp, x = _namespace(lib)
    selection = select_backend(xp, x, backend, (1, 3, 3, 2))
    method = Method.parse(backend)
    first = next(p for p in backends.PLUGINS if p.supports(xp, x, method))
    concrete = first.resolve(method, (1, 3, 3, 2))
    assert selection.method is concrete in (Method.TENSORIZED, Method.ONLINE)
    assert selection.plugin is next(p for p in backends.PLUGINS if p.supports(xp, x, concrete))
    assert selection.plugin.supports(xp, x, selection.method)
    assert backend == "auto" or selection.method is method


class _PicksyPlugin:
    """A fast path that resolves "auto" to "tensorized" but only runs "online" itself."""

    id = PluginId.KEOPS

    def supports(self, xp, x, method):
        return method in (Method.AUTO, Method.ONLINE)

    def unsupported_error(self, xp, x, method):
        return None if self.supports(xp, x, method) else ValueError("picksy: online only")

    def resolve(self, method, shape):
        return Method.TENSORIZED if method is Method.AUTO else method


def test_auto_hands_a_method_the_plugin_cannot_run_to_the_next_plugin(monkeypatch):
    picksy = _PicksyPlugin()
    monkeypatch.setattr(backends, "PLUGINS", [picksy, ArrayAPIPlugin()])
    xp, x = _namespace("numpy")
    assert str(select_backend(xp, x, "auto", (1, 3, 3, 2))) == "array_api/tensorized"
    assert select_backend(xp, x, "online", (1, 3, 3, 2)).plugin is picksy
    # named explicitly, the plugin runs the problem with the method it can run
    assert select_backend(xp, x, "keops", (1, 3, 3, 2)).method is Method.ONLINE
    with pytest.raises(ValueError, match="picksy: online only"):
        select_backend(xp, x, "keops/tensorized", (1, 3, 3, 2))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", (None, Method.AUTO)),
        ("online", (None, Method.ONLINE)),
        (Method.TENSORIZED, (None, Method.TENSORIZED)),
        ("numba", (PluginId.NUMBA, Method.AUTO)),
        ("keops", (PluginId.KEOPS, Method.AUTO)),
        (PluginId.ARRAY_API, (PluginId.ARRAY_API, Method.AUTO)),
        ("array_api/tensorized", (PluginId.ARRAY_API, Method.TENSORIZED)),
        ("keops/online", (PluginId.KEOPS, Method.ONLINE)),
        ("numba_cuda/multiscale", (PluginId.NUMBA_CUDA, Method.MULTISCALE)),
    ],
)
def test_parse_backend_accepts_methods_plugins_and_plugin_slash_method(value, expected):
    assert parse_backend(value) == expected


@pytest.mark.parametrize(
    "value, match",
    [
        ("gpu", r"unknown backend 'gpu': choose a method .*'auto'.*, a plugin .*'keops'.* or 'plugin/method'"),
        ("keops/fast", r"unknown backend 'keops/fast'"),
        ("torch/online", r"the part before '/' must be a plugin, one of 'array_api', 'keops'"),
        ("/online", r"unknown backend '/online': the part before '/' must be a plugin"),
        ("Keops", r"unknown backend 'Keops'"),
    ],
)
def test_parse_backend_rejects_anything_else(value, match):
    with pytest.raises(ValueError, match=match):
        parse_backend(value)


@pytest.mark.parametrize("value", [None, 3, b"auto", ["auto"]])
def test_parse_backend_rejects_non_strings(value):
    with pytest.raises(ValueError, match=r"unknown backend .*: choose a method"):
        parse_backend(value)


def test_array_api_by_name_runs_any_library(lib):
    xp, x = _namespace(lib)
    assert str(select_backend(xp, x, "array_api", (1, 3, 3, 2))) == "array_api/tensorized"
    assert str(select_backend(xp, x, "array_api/online", (1, 3, 3, 2))) == "array_api/online"
    assert str(select_backend(xp, x, "array_api/multiscale", (1, 3, 3, 2))) == "array_api/multiscale"


@pytest.mark.parametrize("backend", ["auto", "online", "tensorized"])
def test_generic_array_api_arrays_use_the_array_api_plugin(backend):
    """array-api-strict stands for "any other Array API library": only the fallback serves it."""
    pytest.importorskip("array_api_strict")
    xp, x = _namespace("array_api_strict")
    selection = select_backend(xp, x, backend, (1, 3, 3, 2))
    assert selection.plugin.id is PluginId.ARRAY_API
    assert selection.method is (Method.TENSORIZED if backend == "auto" else Method.parse(backend))


def _largest_square_side(entries):
    side = math.isqrt(entries)
    assert side * side <= entries < (side + 1) ** 2
    return side


@pytest.mark.parametrize("B", [1, 2, 5])
def test_auto_is_tensorized_up_to_dense_max_entries_then_online(lib, B, array_api_only):
    xp, x = _namespace(lib)
    side = _largest_square_side(DENSE_MAX_ENTRIES // B)
    small = select_backend(xp, x, "auto", (B, side, side, 3))
    large = select_backend(xp, x, "auto", (B, side + 1, side + 1, 3))
    assert B * side * side <= DENSE_MAX_ENTRIES < B * (side + 1) ** 2
    assert (small.plugin.id, small.method) == (PluginId.ARRAY_API, Method.TENSORIZED)
    assert (large.plugin.id, large.method) == (PluginId.ARRAY_API, Method.ONLINE)
    assert select_backend(xp, x, "auto", (B, 10, 10, 3)).method is Method.TENSORIZED


def test_auto_counts_the_batch():
    side = _largest_square_side(DENSE_MAX_ENTRIES)
    plugin = ArrayAPIPlugin()
    assert plugin.resolve(Method.AUTO, (1, side, side, 2)) is Method.TENSORIZED
    assert plugin.resolve(Method.AUTO, (2, side, side, 2)) is Method.ONLINE


@pytest.mark.parametrize("method", [Method.TENSORIZED, Method.ONLINE])
def test_explicit_methods_are_kept_whatever_the_size(method):
    plugin = ArrayAPIPlugin()
    assert plugin.resolve(method, (1, 2, 2, 1)) is method
    assert plugin.resolve(method, (8, 10**6, 10**6, 3)) is method


def test_array_api_plugin_supports_every_method(lib):
    xp, x = _namespace(lib)
    plugin = ArrayAPIPlugin()
    assert all(plugin.supports(xp, x, m) for m in Method)


@pytest.mark.parametrize("backend", ["multiscale", "numba/multiscale", "array_api/multiscale"])
def test_multiscale_refuses_more_than_three_dimensions(lib, backend):
    xp, x = _namespace(lib)
    with pytest.raises(ValueError, match=r"supports D <= 3, got D=4; use backend='online'"):
        select_backend(xp, x, backend, (1, 3, 3, 4))


def test_an_empty_registry_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "PLUGINS", [])
    xp, x = _namespace("numpy")
    with pytest.raises(ValueError, match=r"no backend supports method 'auto' for ndarray arrays"):
        select_backend(xp, x, "auto", (1, 3, 3, 2))


# ----------------------------------------------------------------------------------------
# The geometry contract
# ----------------------------------------------------------------------------------------

B_, N_, M_ = 2, 9, 7
#: cover both branches of costs.squared_distances (exact differences / |x|^2 + |y|^2 - 2 x.y)
DIMS = sorted({1, 2, 3, EXACT_DIFFERENCE_MAX_DIM, EXACT_DIFFERENCE_MAX_DIM + 1, 20, EXACT_DIFFERENCE_MAX_DIM + 4})
GEOMETRIES = ["tensorized", "online"]


def make_geometry(kind, x, y, cost, xp):
    if kind == "tensorized":
        return ArrayAPIPlugin().geometry(x, y, cost, Method.TENSORIZED, xp=xp)
    B, _, _ = x.shape
    geom = OnlineGeometry(x, y, cost, xp=xp, block_entries=B * y.shape[1] * 2)  # two rows per block
    assert geom.block_rows == 2
    return geom


def np_cost(x, y, p):
    dist = np.sqrt(np.sum((x[:, :, None, :] - y[:, None, :, :]) ** 2, axis=-1))
    return dist**p / p


def np_cost_grad(x, y, p):
    """grad_x C(x_i, y_j), shape (B, N, M, D); 0 at x = y for p=1."""
    diff = x[:, :, None, :] - y[:, None, :, :]
    if p == 2:
        return diff
    dist = np.sqrt(np.sum(diff**2, axis=-1, keepdims=True))
    return np.divide(diff, dist, out=np.zeros_like(diff), where=dist > 0)


@pytest.fixture(params=GEOMETRIES)
def geometry_kind(request):
    return request.param


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("D", DIMS)
def test_geometry_contract(lib, dtype, geometry_kind, p, D):
    import array_api_compat

    rng = np.random.default_rng(D + 100 * p)
    x_np = rng.random((B_, N_, D))
    y_np = rng.random((B_, M_, D)) + 0.2
    y_np[:, 0] = x_np[:, 0]  # one coincident pair (C = 0)
    x_np, y_np = x_np.astype(dtype).astype(np.float64), y_np.astype(dtype).astype(np.float64)
    x, y = to_lib(x_np, lib, dtype), to_lib(y_np, lib, dtype)
    xp = array_api_compat.array_namespace(x)
    geom = make_geometry(geometry_kind, x, y, Cost(p), xp)
    C = np_cost(x_np, y_np, p)
    scale = float(C.max())
    eps = 0.1**p
    h_y = rng.normal(size=(B_, M_))
    h_x = rng.normal(size=(B_, N_))
    tol = TOL[dtype]
    # Above EXACT_DIFFERENCE_MAX_DIM, |x|^2 + |y|^2 - 2 x.y carries an absolute rounding error
    # of about eps_mach * (|x|^2 + |y|^2) on |x - y|^2, i.e. its square root on |x - y| (p=1).
    # Softmin and kernel sums are Lipschitz in C, so this bounds their extra error too.
    if D <= EXACT_DIFFERENCE_MAX_DIM:
        cost_err = 0.0
    else:
        sq_err = 10 * np.finfo(dtype).eps * float((x_np**2).sum(-1).max() + (y_np**2).sum(-1).max())
        cost_err = sq_err / 2 if p == 2 else np.sqrt(sq_err)

    def close(actual, expected, atol_scale, lipschitz=1.0):
        actual = to_numpy(actual)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(
            actual, expected, rtol=10 * tol, atol=10 * tol * atol_scale + lipschitz * cost_err
        )

    assert tuple(geom.shape) == (B_, N_, M_)
    # cost_rows slices the cost matrix
    for start, stop in [(0, N_), (0, 1), (3, 8), (N_ - 1, N_)]:
        close(geom.cost_rows(start, stop), C[:, start:stop, :], scale)
    coincident = to_numpy(geom.cost_rows(0, 1))[:, 0, 0]
    if D <= EXACT_DIFFERENCE_MAX_DIM:  # exact by construction: x - x is 0
        assert np.all(coincident == 0.0)
    else:
        assert np.all((coincident >= 0.0) & (coincident <= cost_err))
    # softmin_i = -eps log sum_j exp(h_j - C_ij / eps)
    expected = -eps * logsumexp(h_y[:, None, :] - C / eps, axis=2)
    close(geom.softmin(eps, to_lib(h_y, lib, dtype)), expected, scale)
    # kernel_sum_i = sum_j k(x_i, y_j) v_j (kernels that live on this cost)
    kernels = [("energy", 1.0), ("laplacian", 0.3)] if p == 1 else [("gaussian", 0.3)]
    dist = C if p == 1 else np.sqrt(2 * C)
    for name, blur in kernels:
        K = {"energy": -dist, "laplacian": np.exp(-dist / blur), "gaussian": np.exp(-(dist**2) / (2 * blur**2))}[name]
        # |dk/dC| <= 1 (energy), 1/blur (laplacian), 1/blur^2 (gaussian), times sum_j |v_j|
        lipschitz = {"energy": 1.0, "laplacian": 1 / blur, "gaussian": 1 / blur**2}[name] * np.abs(h_y).sum(1).max()
        close(geom.kernel_sum(Kernel(name, blur), to_lib(h_y, lib, dtype)), np.einsum("bij,bj->bi", K, h_y),
              float(np.abs(K).sum(axis=2).max() * np.abs(h_y).max()), lipschitz)
    # transpose swaps the roles of x and y
    tr = geom.transpose()
    assert tuple(tr.shape) == (B_, M_, N_)
    close(tr.cost_rows(0, M_), np.swapaxes(C, 1, 2), scale)
    expected_t = -eps * logsumexp(h_x[:, None, :] - np.swapaxes(C, 1, 2) / eps, axis=2)
    close(tr.softmin(eps, to_lib(h_x, lib, dtype)), expected_t, scale)
    close(tr.transpose().softmin(eps, to_lib(h_y, lib, dtype)), expected, scale)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("D", [2, EXACT_DIFFERENCE_MAX_DIM + 4])
def test_geometry_softmax_reductions(lib, dtype, geometry_kind, p, D):
    """softmax_weighted_sum and softmin_grad (the geometry protocol's gradient helpers)."""
    import array_api_compat

    rng = np.random.default_rng(7 + D)
    x_np = rng.random((B_, N_, D)).astype(dtype).astype(np.float64)
    y_np = (rng.random((B_, M_, D)) + 0.2).astype(dtype).astype(np.float64)
    y_np[:, 2] = x_np[:, 4]  # a coincident pair: grad of |x - y| is taken as 0 there
    x, y = to_lib(x_np, lib, dtype), to_lib(y_np, lib, dtype)
    xp = array_api_compat.array_namespace(x)
    geom = make_geometry(geometry_kind, x, y, Cost(p), xp)
    if not (hasattr(geom, "softmax_weighted_sum") and hasattr(geom, "softmin_grad")):
        pytest.skip("this geometry has no softmax reductions")
    eps = 0.2**p
    h = rng.normal(size=(B_, M_))
    v = rng.normal(size=(B_, M_, 3))
    W = softmax(h[:, None, :] - np_cost(x_np, y_np, p) / eps, axis=2)
    tol = 20 * TOL[dtype]
    np.testing.assert_allclose(
        to_numpy(geom.softmax_weighted_sum(eps, to_lib(h, lib, dtype), to_lib(v, lib, dtype))),
        np.einsum("bij,bjk->bik", W, v), rtol=tol, atol=tol * np.abs(v).max(),
    )
    expected_grad = np.einsum("bij,bijd->bid", W, np_cost_grad(x_np, y_np, p))
    grad = to_numpy(geom.softmin_grad(eps, to_lib(h, lib, dtype)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, expected_grad, rtol=tol, atol=tol * 2 * np.sqrt(D))


def test_online_geometry_block_size(lib):
    import array_api_compat

    x = to_lib(np.random.default_rng(0).random((3, 10, 2)), lib)
    y = to_lib(np.random.default_rng(1).random((3, 4, 2)), lib)
    xp = array_api_compat.array_namespace(x)
    assert OnlineGeometry(x, y, Cost(2), xp=xp, block_entries=3 * 4 * 3).block_rows == 3
    assert OnlineGeometry(x, y, Cost(2), xp=xp, block_entries=1).block_rows == 1  # at least one row
    assert OnlineGeometry(x, y, Cost(2), xp=xp, block_entries=10**9).block_rows == 10  # at most N
    tr = OnlineGeometry(x, y, Cost(2), xp=xp, block_entries=3 * 10 * 2).transpose()
    assert tr.block_rows == 2 and tuple(tr.shape) == (3, 4, 10)


# ----------------------------------------------------------------------------------------
# The ground cost
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", range(1, EXACT_DIFFERENCE_MAX_DIM + 1))
@pytest.mark.parametrize("p", [1, 2])
def test_cost_has_an_exactly_zero_diagonal_in_low_dimension(lib, dtype, D, p):
    import array_api_compat

    x_np = np.random.default_rng(D).normal(size=(2, 12, D)) * 10.0 + 3.0
    x = to_lib(x_np, lib, dtype)
    xp = array_api_compat.array_namespace(x)
    C = to_numpy(Cost(p).matrix(x, x, xp=xp))
    assert C.shape == (2, 12, 12)
    assert np.all(np.diagonal(C, axis1=1, axis2=2) == 0.0)
    off = ~np.eye(12, dtype=bool)
    assert np.all(C[:, off] > 0)
    np.testing.assert_allclose(C, np_cost(x_np.astype(dtype).astype(np.float64), x_np.astype(dtype).astype(np.float64), p),
                               rtol=TOL[dtype])


@pytest.mark.parametrize("D", [EXACT_DIFFERENCE_MAX_DIM + 1, EXACT_DIFFERENCE_MAX_DIM + 10])
def test_cost_in_high_dimension_is_non_negative_and_accurate(lib, dtype, D):
    import array_api_compat

    x_np = np.random.default_rng(D).normal(size=(1, 12, D)) + 3.0
    x = to_lib(x_np, lib, dtype)
    xp = array_api_compat.array_namespace(x)
    C2 = to_numpy(Cost(2).matrix(x, x, xp=xp))
    C1 = to_numpy(Cost(1).matrix(x, x, xp=xp))
    assert np.all(C2 >= 0) and np.all(C1 >= 0) and np.all(np.isfinite(C1))
    x64 = x_np.astype(dtype).astype(np.float64)
    # |x|^2 + |y|^2 - 2 x.y loses about eps * |x|^2 in absolute terms
    atol = 10 * np.finfo(dtype).eps * float(np.sum(x64**2, axis=-1).max())
    np.testing.assert_allclose(C2, np_cost(x64, x64, 2), rtol=TOL[dtype], atol=atol)


def test_kernel_uses_the_matching_cost():
    assert Kernel("energy").cost == Cost(1)
    assert Kernel("laplacian", 0.5).cost == Cost(1)
    assert Kernel("gaussian", 0.5).cost == Cost(2)


# ----------------------------------------------------------------------------------------
# Autograd through the p=1 cost at coincident points
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [3, EXACT_DIFFERENCE_MAX_DIM + 4])
def test_torch_autograd_through_p1_cost_matrix_is_finite(D):
    torch = pytest.importorskip("torch")
    import array_api_compat

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 6, D))).requires_grad_(True)
    y = torch.cat([x.detach()[:, :3], torch.ones(1, 2, D, dtype=x.dtype)], dim=1)  # 3 coincident pairs
    xp = array_api_compat.array_namespace(x)
    Cost(1).matrix(x, x, xp=xp).sum().backward()
    assert torch.isfinite(x.grad).all()
    x.grad = None
    C = Cost(1).matrix(x, y, xp=xp)
    C.sum().backward()
    assert torch.isfinite(x.grad).all()
    # sum_j (x_i - y_j) / |x_i - y_j| over the non-coincident pairs (0 at the coincident ones)
    expected = np.sum(np_cost_grad(x.detach().numpy(), y.numpy(), 1), axis=2)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        # tol=None: GeomLoss's schedule keeps x = y exactly symmetric (refined to a tol, the
        # cross and self problems take different iterations: 0 only to the refinement's error)
        ("sinkhorn_divergence", {"p": 1, "blur": 0.1, "tol": None}),
        ("sinkhorn_divergence", {"p": 1, "blur": 0.1, "reach": 1.0, "tol": None}),
        ("energy_distance", {}),
        ("laplacian_mmd", {"blur": 0.5}),
        ("hausdorff_divergence", {"p": 1, "blur": 0.1}),
    ],
)
@pytest.mark.parametrize("backend", ["tensorized", "online"])
def test_torch_autograd_at_coincident_points_gives_zero_not_nan(name, kwargs, backend):
    """x = y is the minimum of every divergence (value 0): the gradient must be 0, not NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(10, 3))).requires_grad_(True)
    value = getattr(ota, name)(x, x.detach().clone(), backend=backend, **kwargs)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-10)
    (grad,) = torch.autograd.grad(value, [x])
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(grad.numpy(), 0.0, atol=1e-8)
