"""GeomLoss's own gallery (``examples/`` of its repository) on ``ot_agnostic.torch.SamplesLoss``.

GeomLoss 0.3.1 has no tests of ``SamplesLoss``: its gallery is the real usage. These tests
run the computations of its scripts, at their CPU sizes or smaller, on data generated the
same way (the scripts' PNG files are replaced by similar synthetic images), with both
libraries on the same data in the same run. They run in float64 (the scripts use
float32) so that the comparisons can be tight.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ot_agnostic.torch import SamplesLoss  # noqa: E402


def _relative(ours, ref):
    return float((ours - ref).norm() / ref.norm())


# -- sinkhorn_multiscale/plot_optimal_transport_cluster.py ---------------------------------


def _spiral_and_sphere(N, M, generator):
    """The script's data: a noisy 4-D spiral against points on a shifted 4-D sphere."""
    t = torch.linspace(0, 2 * np.pi, N, dtype=torch.float64)
    x = torch.stack((t * (2 * t).cos() / 7, t * (2 * t).sin() / 7, t / 7, t**2 / 50)).t().contiguous()
    x = x + 0.05 * torch.randn(N, 4, dtype=torch.float64, generator=generator)
    y = torch.randn(M, 4, dtype=torch.float64, generator=generator)
    y[:, 0] += 2
    return x, y / (1e-4 + y.norm(dim=1, keepdim=True))


def _kmeans(x, K, iterations=10):
    """The script's K-means (nearest centroid, then class means), with plain torch."""
    c = x[:K, :].clone()
    for _ in range(iterations):
        labels = torch.cdist(x, c).argmin(dim=1)
        counts = torch.bincount(labels, minlength=K).to(x.dtype)
        for d in range(x.shape[1]):
            c[:, d] = torch.bincount(labels, weights=x[:, d], minlength=K) / counts
    return labels, c


@pytest.mark.parametrize("N, K", [(10, 10), pytest.param(30, 4, marks=pytest.mark.slow)])
def test_cluster_script_labels_in_four_dimensions(keops, N, K):
    """K-means labels in D=4: with one point per cluster (the script's CPU size, N = K = 10)
    the cluster spread, hence ``cluster_scale``, is a 0-d tensor equal to 0."""
    generator = torch.Generator().manual_seed(N)
    x, y = _spiral_and_sphere(N, N, generator)
    kw = dict(p=2, blur=0.05, scaling=0.8)
    plain = [L("sinkhorn", **kw)(x, y) for L in (keops.SamplesLoss, SamplesLoss)]
    # same algorithm (dense), same data: float64 rounding only
    assert plain[1].item() == pytest.approx(plain[0].item(), rel=1e-10)

    lab_x, c_x = _kmeans(x, K)
    lab_y, c_y = _kmeans(y, K)
    std_x = ((x - c_x[lab_x, :]) ** 2).sum(1).mean().sqrt()
    std_y = ((y - c_y[lab_y, :]) ** 2).sum(1).mean().sqrt()
    scale = torch.maximum(std_x, std_y)
    if N == K:  # exact: each centroid is its one point (a sum of one term over a count of 1)
        assert scale.item() == 0.0
    a = torch.ones(N, dtype=torch.float64) / N
    b = torch.ones(N, dtype=torch.float64) / N
    args = (lab_x, a, x, lab_y, b, y)
    ref = keops.SamplesLoss("sinkhorn", cluster_scale=scale, **kw)(*args)
    ours = SamplesLoss("sinkhorn", cluster_scale=scale, **kw)(*args)
    # same clusters, schedule, jump and final extrapolation; KeOps and our kernels sum in
    # different orders: float64 agreement to 1e-9 (measured: 1e-12 to 1e-10)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)


# -- sinkhorn_multiscale/plot_kernel_truncation.py ------------------------------------------


def _ell_image(kind):
    """A 200 x 200 grey-level image in the spirit of the script's ``ell_a.png`` / ``ell_b.png``."""
    image = np.zeros((200, 200))
    if kind == "a":
        image[20:70, 10:130] = 1.0
        image[20:120, 10:40] = 1.0
    else:
        image[120:170, 40:140] = np.linspace(0.3, 1.0, 100)
        image[40:100, 130:170] = 1.0
        image[50:90, 145:170] = 0.0
    return image


def _draw_samples(image, sampling):
    """The script's ``draw_samples``: pixel centres of the subsampled image, as weights.

    The points get a third coordinate, 0: the costs, grid cells and clusters are those of
    the 2-D script, and both libraries reuse the D=3 KeOps formulas that the other tests
    compile (a D=2 set costs about 40 s of compilation on a cold cache).
    """
    A = image[::sampling, ::sampling].copy()
    A[A <= 0] = 1e-8
    a = A.ravel() / A.sum()
    u, v = np.meshgrid(np.linspace(0, 1, A.shape[0]), np.linspace(0, 1, A.shape[1]), indexing="xy")
    u += 0.5 / A.shape[0]
    v += 0.5 / A.shape[1]
    return torch.tensor(a), torch.tensor(np.vstack((u.ravel(), v.ravel(), 0 * u.ravel())).T.copy())


def _value_and_grads(loss, A, X, B, Y):
    a, x, b = A.clone().requires_grad_(), X.clone().requires_grad_(), B.clone().requires_grad_()
    value = loss(a, x, b, Y)
    return [value.detach(), *torch.autograd.grad(value, [a, b, x])]


@pytest.mark.slow
def test_kernel_truncation_script(keops):
    """Blurs 1, 1/2, ..., 1/256 with ``cluster_scale=0.2``: for blur >= 0.25 the loop never
    leaves the clusters and, as in GeomLoss, the final step is the extrapolation itself."""
    A, X = _draw_samples(_ell_image("a"), 20)
    B, Y = _draw_samples(_ell_image("b"), 20)
    for i in range(9):
        kw = dict(p=2, blur=0.5**i, diameter=1.0, cluster_scale=0.2, scaling=0.5, backend="multiscale")
        ref = _value_and_grads(keops.SamplesLoss("sinkhorn", **kw), A, X, B, Y)
        ours = _value_and_grads(SamplesLoss("sinkhorn", **kw), A, X, B, Y)
        # values: float64, different summation orders (measured <= 5e-9 relative; an extra
        # step after the extrapolation, as before the fix, gave 3e-6 to 8e-3)
        assert ours[0].item() == pytest.approx(ref[0].item(), rel=5e-8), kw
        # gradients (a, b, x): our truncation keeps a superset of GeomLoss's cluster pairs
        # (never all the partners of a cluster), which moves the potentials of the
        # 1e-8-weight pixels slightly (measured <= 3e-5 for a, 1.4e-6 for b, 2e-7 for x)
        for k, tol in ((1, 2e-4), (2, 1e-5), (3, 1e-5)):
            assert _relative(ours[k], ref[k]) < tol, (kw, k)


def test_truncate_none_and_multiscale_potentials_like_geomloss(keops):
    A, X = _draw_samples(_ell_image("a"), 10)
    B, Y = _draw_samples(_ell_image("b"), 10)
    kw = dict(p=2, blur=0.03, diameter=1.0, cluster_scale=0.1, scaling=0.5, backend="multiscale")
    values = {}
    for truncate in (None, 5, 1e3):
        ref = keops.SamplesLoss("sinkhorn", truncate=truncate, **kw)(A, X, B, Y)
        values[truncate] = SamplesLoss("sinkhorn", truncate=truncate, **kw)(A, X, B, Y).item()
        # pykeops computes GeomLoss's cluster centroids to about 1e-7 (float32-like
        # accuracy) even in float64; on this 20 x 20 grid that moves GeomLoss's value by
        # 2.3e-6 relative (measured, any truncate): hence 1e-5 here
        assert values[truncate] == pytest.approx(ref.item(), rel=1e-5)
    # None keeps every pair: the same as a truncation that drops nothing (rounding only)
    assert values[None] == pytest.approx(values[1e3], rel=1e-12)
    F_ref, G_ref = keops.SamplesLoss("sinkhorn", potentials=True, **kw)(A, X, B, Y)
    F, G = SamplesLoss("sinkhorn", potentials=True, **kw)(A, X, B, Y)
    assert F.shape == F_ref.shape == (len(X),) and G.shape == G_ref.shape == (len(Y),)
    # pointwise, the empty pixels (weight 1e-10) far from the mass amplify the centroid
    # gap (measured up to 1e-2 there); weighted by the measures, 1.4e-5 and 1.8e-5 measured
    for w, P, P_ref in ((A, F, F_ref), (B, G, G_ref)):
        assert float((w * (P - P_ref).abs()).sum() / (w * P_ref.abs()).sum()) < 1e-4


# -- eps-scaling schedules --------------------------------------------------------------------


@pytest.mark.parametrize("diameter", [1.0, None])
def test_blur_above_the_diameter_follows_geomloss(geomloss, diameter):
    """GeomLoss's schedule is then ``(diameter**p, blur**p)``, not ``(blur**p, blur**p)``."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(40, 2, dtype=torch.float64, generator=generator)
    y = torch.rand(30, 2, dtype=torch.float64, generator=generator) * 0.5
    # p=2 only: GeomLoss's tensorized p=1 distances are clamped (a known departure, README)
    for p, blur in ((2, 1.5), (2, 3.0)):
        kw = dict(p=p, blur=blur, diameter=diameter, backend="tensorized")
        ref = geomloss.SamplesLoss("sinkhorn", **kw)(x, y)
        ours = SamplesLoss("sinkhorn", **kw)(x, y)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-10)


def test_value_is_continuous_in_blur_at_the_diameter():
    """A relative change of 1e-15 in ``blur`` around ``diameter`` changes nothing (it used to
    add one eps-scaling step: 0.11310 vs 0.11184)."""
    import ot_agnostic as ota

    rng = np.random.default_rng(4)
    x, y = rng.random((50, 2)), rng.random((40, 2)) * 0.5
    values = [
        float(ota.sinkhorn_divergence(x, y, blur=blur, diameter=1.0, backend="tensorized"))
        for blur in (1.0 - 1e-15, 1.0, 1.0 + 1e-15)
    ]
    # same schedule up to 1e-15 in eps: the values agree to rounding
    np.testing.assert_allclose(values, values[1], rtol=1e-12)
