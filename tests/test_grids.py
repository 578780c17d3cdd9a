"""ot_agnostic.grids: densities on regular grids through the separable geometry.

References: a plain dense NumPy solver on the voxel centres (``tests/dense_reference.py``),
our own point-cloud solver on the same weighted points, SciPy's 1-D Wasserstein distance
(sorting), closed forms (translations), finite differences, SciPy's log-sum-exp for the
banded kernel.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

import ot_agnostic as ota
from ot_agnostic import grids
from ot_agnostic.kernels.numba_grid import log2_gauss_lines

from .dense_reference import dense_divergence

BACKENDS = ["numba", "array_api"]


def _densities(rng, shape, *, zeros=0.3, equal_mass=True):
    a, b = rng.random(shape), rng.random(shape)
    a[rng.random(shape) < zeros] = 0.0
    a, b = a / a.sum(), b / b.sum()
    return (a, b) if equal_mass else (a, 1.7 * b)


def _blob(shape, centre, width):
    axes = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    blob = np.exp(-sum((ax - c) ** 2 for ax, c in zip(axes, centre)) / (2 * width**2))
    return blob / blob.sum()


# ----------------------------------------------------------------------------------------
# The banded 1-D kernel against SciPy's log-sum-exp
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["noise", "affine", "quadratic", "sparse"])
def test_banded_kernel_matches_full_logsumexp(rng, dtype, kind):
    """Every output against the full sum. float64: 1e-12 relative to the terms' magnitude
    (the band drops terms below 2**-55 of the largest); float32: 1e-6 (its rounding of
    ``h - kappa d**2``, whose two parts are each up to that magnitude)."""
    for _ in range(12):
        n, m = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        y0, dy, x0, dx = rng.normal(), rng.uniform(0.1, 2), rng.normal(), rng.uniform(0.1, 2)
        eps = 10 ** rng.uniform(-2, 2)
        j = np.arange(n)
        if kind == "noise":
            h = rng.normal(size=(4, n)) * 10
        elif kind == "affine":  # a translation's potential: the band is narrow
            h = 40 * j[None] * rng.normal(size=(4, 1)) + rng.normal(size=(4, n))
        elif kind == "quadratic":
            h = -((j[None] - n / 2) ** 2) * rng.uniform(0, 3, (4, 1)) + 25 * j[None]
        else:  # empty voxels
            h = rng.normal(size=(4, n)) * 3
            h[rng.random((4, n)) < 0.7] = -1.4e30
        h = h.astype(dtype)
        kappa2 = math.log2(math.e) / (2 * eps)
        out = log2_gauss_lines(h, (x0, dx, m), (y0, dy, n), kappa2)
        x, y = x0 + dx * np.arange(m), y0 + dy * np.arange(n)
        terms = h.astype(np.float64)[:, None, :] - kappa2 * (x[:, None] - y[None, :]) ** 2
        ref = logsumexp(terms * math.log(2), axis=2) / math.log(2)
        filled = ref > -1e29
        assert (out[~filled] < -1e29).all()
        magnitude = max(1.0, float(np.abs(terms[np.isfinite(terms) & (terms > -1e29)]).max(initial=1.0)))
        rtol = 1e-6 if dtype == "float32" else 1e-12
        assert np.abs(out[filled] - ref[filled]).max(initial=0) <= rtol * magnitude


# ----------------------------------------------------------------------------------------
# Same numbers as the point-cloud solvers on the voxel centres
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, spacing", [((23,), 0.5), ((9, 7), (1.0, 0.6)), ((5, 4, 6), (0.8, 1.0, 1.3))])
@pytest.mark.parametrize("reach", [None, 2.0])
@pytest.mark.parametrize("debias", [True, False])
def test_matches_the_dense_reference_on_voxel_centres(rng, backend, shape, spacing, reach, debias):
    """Converged (tol=1e-11, float64): the value equals a dense NumPy solver's on the
    voxel centres to 1e-9 relative (both converged to ~1e-11 on the marginals)."""
    a, b = _densities(rng, shape, equal_mass=reach is None)
    res = grids.sinkhorn(a, b, blur=1.0, reach=reach, spacing=spacing, debias=debias, tol=1e-11,
                         max_iter=20000, backend=backend)
    grid = grids.Grid(shape, spacing if isinstance(spacing, tuple) else (spacing,) * len(shape), (0.0,) * len(shape))
    pts = grid.points()
    ref = dense_divergence(pts, pts, a.ravel(), b.ravel(), 2, 1.0, reach=reach, debias=debias)
    assert res.backend == f"{backend}/grid" and res.converged
    assert abs(float(res.value) - ref) <= 1e-9 * abs(ref)
    assert res.f.shape == shape


@pytest.mark.parametrize("pyramid", [False, True])
def test_same_updates_as_the_point_cloud_solver(rng, pyramid):
    """Without the pyramid, the grid run is the point-cloud run (same schedule, same
    updates: 1e-12 on the value and the potentials); with it, the same converged value
    from another start (1e-9; the balanced potentials may differ by a constant)."""
    a, b = _densities(rng, (12, 9))
    spacing = (1.0, 0.7)
    pts = grids.Grid((12, 9), spacing, (0.0, 0.0)).points()
    res = grids.sinkhorn(a, b, blur=0.7, spacing=spacing, tol=1e-10, max_iter=20000, pyramid=pyramid)
    ref = ota.sinkhorn(pts, pts, a.ravel(), b.ravel(), blur=0.7, tol=1e-10, max_iter=20000)
    assert abs(float(res.value) - float(ref.value)) <= (1e-9 if pyramid else 1e-12) * abs(float(ref.value))
    if not pyramid:
        assert res.n_iter == ref.n_iter and res.n_softmin == ref.n_softmin
        assert np.abs(res.f - ref.f.reshape(12, 9)).max() <= 1e-10
    else:
        shift = np.mean(res.f - ref.f.reshape(12, 9))
        assert np.abs(res.f - ref.f.reshape(12, 9) - shift).max() <= 1e-6


def test_batches_stop_separately_and_match_separate_calls(rng):
    items = [_densities(rng, (10, 8)) for _ in range(3)]
    a, b = np.stack([i[0] for i in items]), np.stack([i[1] for i in items])
    res = grids.sinkhorn(a, b, blur=0.8, batch=True, tol=1e-9, max_iter=20000)
    assert res.value.shape == (3,) and res.f.shape == (3, 10, 8) and res.converged.shape == (3,)
    for k, (ak, bk) in enumerate(items):
        single = grids.sinkhorn(ak, bk, blur=0.8, tol=1e-9, max_iter=20000)
        assert abs(float(res.value[k]) - float(single.value)) <= 1e-8 * abs(float(single.value))


def test_torch_cpu_runs_numba_with_autograd_on_the_densities(rng):
    """torch float64 tensors: the NumPy numbers (1e-12) and autograd equal to
    value_and_grad's envelope gradients (1e-10)."""
    torch = pytest.importorskip("torch")
    a, b = _densities(rng, (9, 7))
    value, grads = grids.value_and_grad(a, b, blur=0.8, tol=1e-10, max_iter=20000)
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    res = grids.sinkhorn(at, bt, blur=0.8, tol=1e-10, max_iter=20000)
    assert res.backend == "numba/grid" and isinstance(res.value, torch.Tensor)
    res.value.backward()
    assert abs(float(res.value.detach()) - float(value)) <= 1e-12 * abs(float(value))
    assert np.abs(at.grad.numpy() - grads.a).max() <= 1e-10 * np.abs(grads.a).max()
    assert np.abs(bt.grad.numpy() - grads.b).max() <= 1e-10 * np.abs(grads.b).max()


def test_array_api_strict_and_float32(rng):
    xps = pytest.importorskip("array_api_strict")
    a, b = _densities(rng, (8, 6))
    ref = float(grids.sinkhorn_divergence(a, b, blur=1.0, tol=1e-9))
    strict = grids.sinkhorn_divergence(xps.asarray(a), xps.asarray(b), blur=1.0, tol=1e-9)
    assert abs(float(strict) - ref) <= 1e-9 * abs(ref)
    # float32 in, float32 out; the value to float32 rounding of potentials ~1e4 times eps
    single = grids.sinkhorn_divergence(a.astype(np.float32), b.astype(np.float32), blur=1.0, tol=1e-4)
    assert single.dtype == np.float32 and abs(float(single) - ref) <= 1e-4 * abs(ref)


# ----------------------------------------------------------------------------------------
# Exact identities
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_of_a_density_with_itself_is_zero(rng, backend):
    a, _ = _densities(rng, (11, 9))
    value = float(grids.sinkhorn_divergence(a, a, blur=1.0, tol=1e-10, backend=backend))
    assert abs(value) <= 1e-10


@pytest.mark.parametrize("shape, shift", [((48, 40), (5, -3)), ((24, 22, 20), (3, 2, -2))])
def test_translation_inside_the_grid_costs_half_the_squared_shift(shape, shift):
    """S_eps(a, a translated by v) = |v|**2 / 2 for p = 2: a blob well inside the grid
    (width 1.2 voxels, 8.5 or more from the edges: tails below 1e-10), spacing 0.5."""
    centre = [n / 2 - s / 2 for n, s in zip(shape, shift)]
    a = _blob(shape, centre, 1.2)
    b = _blob(shape, [c + s for c, s in zip(centre, shift)], 1.2)
    value = float(grids.sinkhorn_divergence(a, b, blur=0.75, spacing=0.5, tol=1e-8))
    expected = sum((0.5 * s) ** 2 for s in shift) / 2
    assert abs(value - expected) <= 1e-6 * expected


def test_transport_map_of_a_translation_moves_the_mass_by_the_shift():
    """The barycentric map of the entropic plan between a blob and its translate: its
    a-weighted mean displacement is exactly the shift (the plan's marginals, tol=1e-10),
    and at the blob's centre (a symmetry point) so is the displacement itself. Elsewhere
    the entropic plan shrinks towards the centre (an O(eps / width**2) effect)."""
    shape, shift = (40, 36), (4, -3)
    a = _blob(shape, (18, 19), 2.5)
    b = _blob(shape, (22, 16), 2.5)
    res = grids.sinkhorn(a, b, blur=0.5, tol=1e-10)
    mapped = res.transport_map()
    displacement = mapped - res.grid.points().reshape(*shape, 2)
    assert mapped.shape == (*shape, 2)
    mean = np.tensordot(a, displacement, axes=([0, 1], [0, 1]))
    assert np.abs(mean - np.array(shift, dtype=float)).max() <= 1e-8
    assert np.abs(displacement[18, 19] - np.array(shift, dtype=float)).max() <= 1e-8


def test_one_dimensional_grids_approach_sorting():
    """Small blur: S_eps tends to W_2**2 / 2, which in 1-D is the quantile (sorting) formula;
    SciPy has only W_1, so W_2 comes from the quantile functions directly. blur = 0.2
    voxel: the entropic bias of S_eps is O(eps) = 0.04 voxel**2 against W_2**2 / 2 ~ 100."""
    rng = np.random.default_rng(3)
    n = 120
    a, b = np.zeros(n), np.zeros(n)
    a[10:40], b[50:100] = rng.random(30), rng.random(50)
    a, b = a / a.sum(), b / b.sum()
    value = float(grids.sinkhorn_divergence(a, b, blur=0.2, tol=1e-9, max_iter=50000))
    levels = np.linspace(0, 1, 20001)[1:-1]
    qa = np.searchsorted(np.cumsum(a), levels)
    qb = np.searchsorted(np.cumsum(b), levels)
    w2 = np.mean((qa - qb) ** 2.0)
    assert abs(value - w2 / 2) <= 2e-3 * (w2 / 2)


def test_wasserstein_distance_in_one_dimension_via_pot():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(4)
    n = 80
    a, b = rng.random(n) ** 4, rng.random(n) ** 4
    a, b = a / a.sum(), b / b.sum()
    x = np.arange(n, dtype=np.float64)
    exact = ot.emd2_1d(x, x, a, b, metric="sqeuclidean") / 2
    value = float(grids.sinkhorn_divergence(a, b, blur=0.1, tol=1e-10, max_iter=100000))
    assert abs(value - exact) <= 0.01 * exact + 0.02  # eps = 0.01 voxel**2: O(eps) bias


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reach", [None, 3.0])
def test_gradients_match_finite_differences(rng, reach):
    """Directional derivatives along zero-mass directions (balanced) or any (unbalanced),
    central differences with step 1e-6 on converged solves (tol=1e-12): 1e-6 relative."""
    a, b = _densities(rng, (7, 6), zeros=0.0, equal_mass=reach is None)
    kw = dict(blur=0.9, reach=reach, tol=1e-12, max_iter=50000)
    _, grads = grids.value_and_grad(a, b, **kw)
    for which in ("a", "b"):
        direction = rng.normal(size=a.shape)
        if reach is None:
            direction -= direction.mean()
        step = 1e-6
        shifted = [dict(a=a, b=b) for _ in range(2)]
        shifted[0][which] = shifted[0][which] + step * direction
        shifted[1][which] = shifted[1][which] - step * direction
        plus, minus = (float(grids.sinkhorn_divergence(s["a"], s["b"], **kw)) for s in shifted)
        numeric = (plus - minus) / (2 * step)
        analytic = float(np.sum(getattr(grads, which) * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


# ----------------------------------------------------------------------------------------
# Pyramid, precision
# ----------------------------------------------------------------------------------------


def test_pyramid_levels_and_schedule():
    grid = grids.Grid((100, 37), (1.0, 2.0), (0.0, 0.0))
    a = np.ones((1, grid.size)) / grid.size
    levels = grids.pyramid(a, a, grid, xp=np)
    assert [lvl[0].shape for lvl in levels] == [(100, 37), (50, 19), (25, 10), (13, 5), (7, 3)]
    for g, la, _ in levels:  # mass kept, centres between the merged voxels
        assert abs(float(la.sum()) - 1.0) <= 1e-12 and la.shape == (1, g.size)
    assert levels[1][0].origin == (0.5, 1.0) and levels[1][0].spacing == (2.0, 4.0)
    groups = grids.level_schedule(levels, [1e4, 1e3, 100.0, 10.0, 1.0])
    chosen = [lvl for lvl, eps in groups for _ in eps]
    assert chosen == sorted(chosen, reverse=True) and groups[-1][0] == 0
    assert groups[0][0] == len(levels) - 1  # the largest temperature on the coarsest grid


def test_precision_is_reported_and_warned():
    rng = np.random.default_rng(5)
    a, b = _densities(rng, (16, 16))
    with pytest.warns(ota.ConvergenceWarning, match="max_iter"):
        res = grids.sinkhorn(a, b, blur=0.3, tol=1e-9, max_iter=2)
    assert not res.converged and res.marginal_error > 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = grids.sinkhorn(a, b, blur=1.0, tol=1e-6)
    assert done.converged and done.marginal_error <= 1e-6


def test_plan_rows_are_images_with_the_right_marginals(rng):
    a, b = _densities(rng, (6, 5))
    res = grids.sinkhorn(a, b, blur=1.0, tol=1e-10)
    plan = res.plan()
    assert plan.shape == (30, 6, 5)
    assert np.abs(plan.sum(axis=(1, 2)) - a.ravel()).sum() <= 1e-9
    assert np.abs(plan.sum(axis=0) - b).sum() <= 1e-9
    rows = res.plan_rows(3, 7)
    assert np.allclose(rows, plan[3:7], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda a, b: (-a, b), ValueError, "negative"),
        (lambda a, b: (np.where(a > 0.5 * a.max(), np.nan, a), b), ValueError, "NaN"),
        (lambda a, b: (np.zeros_like(a), b), ValueError, "all zero"),
        (lambda a, b: (a, b[:-1]), ValueError, "one grid"),
        (lambda a, b: (a, 2 * b), ValueError, "equal total masses"),
        (lambda a, b: (a + 0j, b), TypeError, "real"),
    ],
)
def test_bad_densities_say_what_is_wrong(rng, make, error, match):
    a, b = _densities(rng, (6, 5), zeros=0.0)
    with pytest.raises(error, match=match):
        grids.sinkhorn(*make(a, b), blur=1.0)


def test_bad_arguments_say_what_is_wrong(rng):
    a, b = _densities(rng, (6, 5))
    with pytest.raises(ValueError, match="spacing has 3 entries"):
        grids.sinkhorn(a, b, blur=1.0, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        grids.sinkhorn(a, b, blur=1.0, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="no grid axis"):
        grids.sinkhorn(a[0], b[0], blur=1.0, batch=True)
    with pytest.raises(ValueError, match="unknown grid backend"):
        grids.sinkhorn(a, b, blur=1.0, backend="keops")
    with pytest.raises(ValueError, match="blur"):
        grids.sinkhorn(a, b, blur=0.0)
    with pytest.raises(ValueError, match="batch item 1"):
        bad = np.stack([a, 0 * a])
        grids.sinkhorn(bad, np.stack([b, b]), blur=1.0, batch=True)


def test_a_grid_too_large_for_memory_is_refused():
    """A lazily broadcast view: no memory is touched before the size check."""
    huge = np.broadcast_to(np.float32(1.0), (4096, 4096, 4096))
    with pytest.raises(MemoryError, match="GiB"):
        grids.sinkhorn(huge, huge, blur=1.0)


# ----------------------------------------------------------------------------------------
# Barycenters
# ----------------------------------------------------------------------------------------


def _images(rng, k, shape):
    images = rng.random((k, *shape)) ** 3 + 1e-3
    return images / images.sum(axis=tuple(range(1, images.ndim)), keepdims=True)


def _dense_log_barycenter(images, weights, spacing, eps, iters=100_000, stop=1e-13):
    """Plain dense log-domain IBP on the flattened grid (full cost matrix), a reference
    written here: log c = sum_k w_k log K(a_k / K^T v_k), ``iters`` updates or until
    ``log c`` moves by less than ``stop``."""
    shape = images.shape[1:]
    axes = np.meshgrid(*(np.arange(n) * h for n, h in zip(shape, spacing)), indexing="ij")
    points = np.stack([ax.reshape(-1) for ax in axes], axis=1)
    log_k = -0.5 * ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1) / eps
    log_a = np.log(images.reshape(len(images), -1))
    conv = lambda h: logsumexp(log_k[None] + h[:, None, :], axis=2)  # noqa: E731
    g = np.zeros_like(log_a)
    log_c = np.zeros(log_a.shape[1])
    for _ in range(iters):
        log_ku = conv(log_a - conv(g))
        log_c, previous = (weights[:, None] * log_ku).sum(0), log_c
        g = log_c[None] - log_ku
        if np.abs(log_c - previous).max() < stop:
            break
    return np.exp(log_c).reshape(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
@pytest.mark.parametrize("accelerate", [True, False])
def test_barycenter_matches_pot_convolutional_barycenters(rng, backend, weights, accelerate):
    """POT's log-domain solvers on the unit square: spacing 1/(n-1) per axis and
    reg = 2 blur**2. Both sides converged (1e-9 and POT's 1e-12): 1e-6 of the peak. The
    accelerated path (pyramid, eps-scaling, mixing) reaches the same fixed point."""
    ot = pytest.importorskip("ot")
    images = _images(rng, 3, (14, 11))
    spacing = (1 / 13, 1 / 10)
    blur = 0.08
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ot.bregman.convolutional_barycenter2d(images, 2 * blur**2, weights=None if weights is None else np.array(weights),
                          method="sinkhorn_log", stopThr=1e-12, numItermax=20000)
    result = grids.barycenter(images, weights, blur=blur, spacing=spacing, tol=1e-9,
                              max_iter=20000, accelerate=accelerate, backend=backend)
    assert result.converged and result.marginal_error <= 1e-9
    assert result.density.shape == (14, 11)
    np.testing.assert_allclose(result.density, expected, atol=1e-6 * expected.max(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_debiased_barycenter_makes_the_updates_of_pot(rng, backend):
    """The debiased form converges slowly on rough images: compare the same 60 updates
    with POT's debiased sinkhorn_log (stopThr=0 runs them all): 1e-9 of the peak, the
    round-off of 60 x 11 float64 log convolutions computed in a different order."""
    ot = pytest.importorskip("ot")
    images = _images(rng, 3, (10, 9))
    blur, updates = 0.1, 60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ot.bregman.convolutional_barycenter2d_debiased(
            images, 2 * blur**2, method="sinkhorn_log", stopThr=0.0, numItermax=updates)
        result = grids.barycenter(images, blur=blur, spacing=(1 / 9, 1 / 8), debiased=True, tol=1e-14,
                                  max_iter=updates, accelerate=False, backend=backend)
    assert result.n_iter == updates
    np.testing.assert_allclose(result.density, expected, atol=1e-9 * expected.max(), rtol=0)


@pytest.mark.parametrize("accelerate", [True, False])
def test_volume_barycenter_matches_a_dense_reference(rng, accelerate):
    """3-D grids have no POT reference: a dense IBP on the 60 voxels, both converged (tol
    1e-12 and a reference moving by < 1e-13): 1e-9 of the peak."""
    images = _images(rng, 2, (4, 3, 5))
    weights = np.array([0.7, 0.3])
    spacing = (1.0, 0.7, 1.2)
    result = grids.barycenter(images, weights, blur=0.9, spacing=spacing, tol=1e-12, max_iter=20000,
                              accelerate=accelerate)
    expected = _dense_log_barycenter(images, weights, spacing, 0.81)
    assert result.converged
    np.testing.assert_allclose(result.density, expected, atol=1e-9 * expected.max(), rtol=0)


def test_barycenter_keeps_the_array_type(rng):
    torch = pytest.importorskip("torch")
    images = _images(rng, 2, (9, 8))
    expected = grids.barycenter(images, blur=0.8).density
    result = grids.barycenter(torch.from_numpy(images).float(), blur=0.8)
    assert isinstance(result.density, torch.Tensor) and result.density.dtype == torch.float32
    np.testing.assert_allclose(result.density.numpy(), expected, atol=1e-4 * expected.max())  # float32 sums


def test_barycenter_warns_when_it_stops_early(rng):
    images = _images(rng, 2, (12, 10))
    with pytest.warns(ota.ConvergenceWarning, match="marginal error"):
        result = grids.barycenter(images, blur=0.3, max_iter=3)
    assert not result.converged and result.n_iter == 3 and result.marginal_error > 1e-5


def test_barycenter_bad_input_says_what_is_wrong(rng):
    images = _images(rng, 2, (6, 5))
    with pytest.raises(ValueError, match="empty"):
        grids.barycenter([], blur=1.0)
    with pytest.raises(ValueError, match="equal masses"):
        grids.barycenter([images[0], 2 * images[1]], blur=1.0)
    with pytest.raises(ValueError, match="weights must be 2"):
        grids.barycenter(images, [1.0, 2.0, 3.0], blur=1.0)
    with pytest.raises(ValueError, match="weights must be 2"):
        grids.barycenter(images, [1.0, -1.0], blur=1.0)
    with pytest.raises(ValueError, match="needs a tol"):
        grids.barycenter(images, blur=1.0, tol=None)
    with pytest.raises(ValueError, match="negative"):
        grids.barycenter(-images, blur=1.0)


def test_accelerated_debiased_barycenter_minimises_the_same_objective():
    """Pyramid and eps-scaling change the path, not the debiased barycenter: on smooth 16 x 14
    images (blur 2 voxels, tol 1e-6) both reach ``sum_k w_k S_eps(a_k, c)`` within 1e-5 of
    each other (measured 6e-7), well below the entropic barycenter's (6% higher). The
    objective is nearly flat for patterns finer than ``blur``, so the densities themselves
    agree only to a few % of the peak (measured 2.2%; 12% when the pyramid carried a blocky
    ``d``)."""
    x, y = np.meshgrid(np.arange(16.0), np.arange(14.0), indexing="ij")
    centres = [(4, 4), (11, 10), (5, 10)]
    images = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 10) + 1e-4 for cx, cy in centres])
    images /= images.sum(axis=(1, 2), keepdims=True)

    def objective(c):
        return np.mean([grids.sinkhorn_divergence(a, c / c.sum(), blur=2.0, tol=1e-9, max_iter=100_000)
                        for a in images])

    plain = grids.barycenter(images, blur=2.0, debiased=True, tol=1e-6, accelerate=False)
    fast = grids.barycenter(images, blur=2.0, debiased=True, tol=1e-6)
    entropic = grids.barycenter(images, blur=2.0, tol=1e-6)
    assert plain.converged and fast.converged
    assert objective(fast.density) == pytest.approx(objective(plain.density), rel=1e-5)
    assert objective(entropic.density) > objective(plain.density) * (1 + 1e-2)
    np.testing.assert_allclose(fast.density, plain.density, atol=0.05 * plain.density.max(), rtol=0)
