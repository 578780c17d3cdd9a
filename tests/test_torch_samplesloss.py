"""``ot_agnostic.torch.SamplesLoss`` against ``geomloss.SamplesLoss`` (GeomLoss 0.3.1, torch CPU).

Same calls through both modules: values, potentials and autograd gradients with respect to
``x``, ``y``, ``a``, ``b`` agree to ``TOL[dtype]`` (1e-6 relative in float64, 1e-4 in
float32). The reference is always GeomLoss in float64. Potentials and gradients are compared
in max norm, relative to the largest entry of the reference.

* p=2 sinkhorn and the gaussian kernel: against GeomLoss ``backend="tensorized"``.
* p=1 sinkhorn, energy and laplacian: against ``backend="online"`` (KeOps). GeomLoss's
  tensorized backend computes ``sqrt(max(|x - y|^2, 1e-8))``, which is not exact on the
  diagonals of ``C_xx`` and ``C_yy``. Few cases, D=2, float64 only on the GeomLoss side:
  each new KeOps formula takes about 15 s to compile (cached in ``KEOPS_CACHE_FOLDER``).
* Unbalanced OT (``reach`` not None): values and potentials are equal. GeomLoss's gradients
  are ``(rho + eps/2) / (rho + eps)`` times ours, and ours are the true ones
  (``ot_agnostic.sinkhorn.sinkhorn_cost``). The tests check that ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import TOL

torch = pytest.importorskip("torch", reason="SamplesLoss needs torch")

import ot_agnostic as ota  # noqa: E402
from ot_agnostic.torch import LOSSES, SamplesLoss  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}




# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_data(seed, weighted, batched=False, n=40, m=30, d=2, B=3):
    """NumPy float64 points and weights (unit mass): ``x`` in [0, 1]^d, ``y`` in [0.3, 1.1]^d."""
    rng = np.random.default_rng(seed)
    shape = (B,) if batched else ()
    x = rng.random((*shape, n, d))
    y = 0.8 * rng.random((*shape, m, d)) + 0.3
    if not weighted:
        return x, y, None, None
    a = rng.random((*shape, n)) + 0.2
    b = rng.random((*shape, m)) + 0.2
    return x, y, a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)


def run(layer, data, dtype, potentials=False):
    """Call ``layer`` like GeomLoss: ``L(x, y)`` or ``L(a, x, b, y)``.

    Returns ``(out, grads)``: the value (backpropagated) or the potentials, and the gradients
    of the value with respect to the inputs by name, in float64 NumPy.
    """
    x, y, a, b = (
        None if v is None else torch.tensor(v, dtype=DTYPES[dtype], requires_grad=True)
        for v in data
    )
    out = layer(x, y) if a is None else layer(a, x, b, y)
    if potentials:
        return tuple(o.detach().double().numpy() for o in out), {}
    out.sum().backward()
    named = {"x": x, "y": y, "a": a, "b": b}
    grads = {k: v.grad.double().numpy() for k, v in named.items() if v is not None}
    return out.detach().double().numpy(), grads


def assert_close(ours, ref, rtol, what=""):
    """Max-norm agreement relative to the largest entry of the reference."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(np.abs(ref).max(), 1e-300)
    err = np.abs(ours - ref).max() / scale
    assert err <= rtol, f"{what}: relative max error {err:.2e} > {rtol:.0e}"


def compare(ours_layer, ref_layer, data, dtype, grad_factor=1.0, skip_grads=()):
    """Values, gradients and potentials of ``ours_layer`` (``dtype``) vs ``ref_layer`` (float64).

    ``grad_factor``: the reference gradients are ``grad_factor`` times ours.
    """
    rtol = TOL[dtype]
    ours, ours_grads = run(ours_layer, data, dtype)
    ref, ref_grads = run(ref_layer, data, "float64")
    assert_close(ours, ref, rtol, "value")
    assert ours_grads.keys() == ref_grads.keys()
    for name in ours_grads:
        if name not in skip_grads:
            assert_close(grad_factor * ours_grads[name], ref_grads[name], rtol, f"grad {name}")
    ours_layer.potentials = ref_layer.potentials = True
    try:
        (F, G), _ = run(ours_layer, data, dtype, potentials=True)
        (F_ref, G_ref), _ = run(ref_layer, data, "float64", potentials=True)
    finally:
        ours_layer.potentials = ref_layer.potentials = False
    scale = max(np.abs(F_ref).max(), np.abs(G_ref).max())
    assert F.shape == F_ref.shape and G.shape == G_ref.shape
    assert np.abs(F - F_ref).max() <= rtol * scale, "potential F"
    assert np.abs(G - G_ref).max() <= rtol * scale, "potential G"


def unbalanced_ratio(p, blur, reach):
    """GeomLoss's unbalanced gradients over the true ones: ``(rho + eps/2) / (rho + eps)``."""
    eps, rho = blur**p, reach**p
    return (rho + eps / 2) / (rho + eps)


# ------------------------------------------------------------------------------------------
# 1. Sinkhorn against GeomLoss
# ------------------------------------------------------------------------------------------

# (debias, reach, blur, scaling, weighted, batched)
SETTINGS = [
    (True, None, 0.05, 0.5, True, False),
    (True, None, 0.01, 0.8, False, False),
    (False, None, 0.05, 0.8, True, False),
    (False, None, 0.01, 0.5, False, False),
    (True, 0.3, 0.05, 0.5, True, False),
    (True, 0.3, 0.01, 0.8, False, False),
    (False, 0.3, 0.05, 0.8, True, False),
    (False, 0.3, 0.01, 0.5, False, False),
    (True, None, 0.05, 0.5, True, True),
    (False, None, 0.01, 0.8, False, True),
    (True, 0.3, 0.01, 0.8, True, True),
]


def setting_id(s):
    debias, reach, blur, scaling, weighted, batched = s
    return (
        f"debias={debias}-reach={reach}-blur={blur}-scaling={scaling}"
        f"-{'weighted' if weighted else 'uniform'}{'-batched' if batched else ''}"
    )


def raw_balanced_b_gradient_is_off(debias, reach, weighted):
    """The known library bug of test_raw_balanced_ot_b_gradient (only seen when b is given)."""
    return not debias and reach is None and weighted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_sinkhorn_p2_matches_geomloss_tensorized(geomloss, dtype, setting):
    debias, reach, blur, scaling, weighted, batched = setting
    data = make_data(1, weighted, batched)
    kw = dict(p=2, blur=blur, reach=reach, scaling=scaling, debias=debias)
    compare(
        SamplesLoss("sinkhorn", **kw),
        geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw),
        data, dtype,
        grad_factor=1.0 if reach is None else unbalanced_ratio(2, blur, reach),
        skip_grads=("b",) if raw_balanced_b_gradient_is_off(debias, reach, weighted) else (),
    )


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[2], SETTINGS[4], SETTINGS[8]], ids=setting_id)
def test_keops_values_potentials_and_gradients_match_geomloss(geomloss, setting):
    """Our KeOps path (backend="keops") against GeomLoss, p=2, float64."""
    pytest.importorskip("pykeops")
    debias, reach, blur, scaling, weighted, batched = setting
    data = make_data(1, weighted, batched, d=3)  # D = 3: the KeOps formulas of the other tests
    kw = dict(p=2, blur=blur, reach=reach, scaling=scaling, debias=debias)
    compare(
        SamplesLoss("sinkhorn", backend="keops", **kw),
        geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw),
        data, "float64",
        grad_factor=1.0 if reach is None else unbalanced_ratio(2, blur, reach),
        skip_grads=("b",) if raw_balanced_b_gradient_is_off(debias, reach, weighted) else (),
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "setting", [SETTINGS[0], SETTINGS[6]], ids=setting_id
)
def test_sinkhorn_p1_matches_geomloss_online(keops, dtype, setting):
    debias, reach, blur, scaling, weighted, batched = setting
    data = make_data(2, weighted, batched)
    kw = dict(p=1, blur=blur, reach=reach, scaling=scaling, debias=debias)
    compare(
        SamplesLoss("sinkhorn", **kw),
        keops.SamplesLoss("sinkhorn", backend="online", **kw),
        data, dtype,
        grad_factor=1.0 if reach is None else unbalanced_ratio(1, blur, reach),
    )


def test_raw_balanced_ot_b_gradient(geomloss):
    """Balanced OT_eps: d/db = g_ab - eps (1 - m(a)), the envelope gradient GeomLoss gives too."""
    data = make_data(3, weighted=True)
    kw = dict(p=2, blur=0.05, debias=False)
    _, ours = run(SamplesLoss("sinkhorn", **kw), data, "float64")
    _, ref = run(geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw), data, "float64")
    assert_close(ours["b"], ref["b"], TOL["float64"], "grad b")


def test_unbalanced_gradients_are_the_true_ones():
    """Ours (not GeomLoss's) match finite differences of the value: a check of the ratio's side.

    Along a random direction ``(dx, da)``. The envelope theorem holds at the optimum only, so
    blur, scaling and a fixed diameter (the schedule must not move with x) make the
    potentials converge: measured gap 5e-4. GeomLoss's gradient is 13% smaller here.
    """
    x, y, a, b = make_data(4, weighted=True, n=12, m=10)
    rng = np.random.default_rng(5)
    dx, da = rng.normal(size=x.shape), 0.1 * a * rng.normal(size=a.shape)
    blur, reach = 0.3, 0.5
    layer = SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=0.995, diameter=3.0)

    def value(t):
        return layer(*(torch.tensor(v) for v in (a + t * da, x + t * dx, b, y))).item()

    h = 1e-5
    finite_difference = (value(h) - value(-h)) / (2 * h)
    _, grads = run(layer, (x, y, a, b), "float64")
    directional = np.sum(grads["x"] * dx) + np.sum(grads["a"] * da)
    assert abs(directional - finite_difference) <= 5e-3 * abs(finite_difference)
    geomloss_directional = unbalanced_ratio(2, blur, reach) * directional
    assert abs(geomloss_directional - finite_difference) > 0.1 * abs(finite_difference)


# ------------------------------------------------------------------------------------------
# 2. Kernel norms against GeomLoss
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted, batched", [(True, False), (False, False), (True, True)])
def test_gaussian_matches_geomloss_tensorized(geomloss, dtype, weighted, batched):
    data = make_data(6, weighted, batched)
    compare(
        SamplesLoss("gaussian", blur=0.3),
        geomloss.SamplesLoss("gaussian", blur=0.3, backend="tensorized"),
        data, dtype,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss, blur", [("energy", 0.05), ("laplacian", 0.3)])
def test_energy_laplacian_match_geomloss_online(keops, dtype, loss, blur):
    data = make_data(7, weighted=True)
    compare(
        SamplesLoss(loss, blur=blur),
        keops.SamplesLoss(loss, blur=blur, backend="online"),
        data, dtype,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss, p", [("sinkhorn", 2), ("hausdorff", 2), ("energy", 1)]
)
def test_online_backend_matches_tensorized(loss, p):
    """backend="online" (KeOps plugin when it runs, else chunked) = "tensorized", potentials too.

    Covers the geometry calls of ``_kernel_potentials`` and ``_hausdorff_potentials``
    (transposed geometries) on the online plugin. Three cases, to limit KeOps compilations.
    """
    data = make_data(15, weighted=True)
    online = SamplesLoss(loss, p=p, blur=0.1, backend="online")
    compare(online, SamplesLoss(loss, p=p, blur=0.1, backend="tensorized"), data, "float64")


# ------------------------------------------------------------------------------------------
# 3. Migration: the same optimisation trajectory
# ------------------------------------------------------------------------------------------


def test_gradient_descent_trajectory_matches_geomloss(geomloss):
    """Ten gradient steps moving x towards y give the same points with either module."""
    x0, y, _, _ = make_data(8, weighted=False, n=50, m=40)
    y = torch.tensor(y)

    def trajectory(layer):
        x = torch.tensor(x0, requires_grad=True)
        points = []
        for _ in range(10):
            loss = layer(x, y)
            (grad,) = torch.autograd.grad(loss, [x])
            with torch.no_grad():
                x -= 0.5 * x.shape[0] * grad  # grad is O(1 / N): a step of half the displacement
            points.append(x.detach().clone().numpy())
        return np.stack(points), loss.item()

    kw = dict(p=2, blur=0.05, scaling=0.5)
    ours, last = trajectory(SamplesLoss("sinkhorn", **kw))
    ref, ref_last = trajectory(geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    assert abs(last - ref_last) <= TOL["float64"] * abs(ref_last)
    first_loss = SamplesLoss("sinkhorn", **kw)(torch.tensor(x0), y).item()
    assert last < 0.1 * first_loss  # the loop did move x towards y


# ------------------------------------------------------------------------------------------
# 4. Construction and call errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(loss="wasserstein"), ValueError, "'sinkhorn', 'hausdorff', 'energy'"),
        (dict(backend="gpu"), ValueError, "'auto', 'tensorized', 'online'"),
        (dict(p=3), ValueError, "p must be 1 or 2"),
        (dict(p=1.5), ValueError, "p must be 1 or 2"),
        (dict(loss="energy", cost="SqDist(X,Y)"), ValueError, "cost= applies to loss='sinkhorn'"),
        (dict(cost=3.0), TypeError, "cost must be None, a function"),
        (dict(loss="gaussian", kernel="Exp(-SqDist(X,Y))"), TypeError, "kernel must be a function"),
        (dict(loss="sinkhorn", kernel=lambda x, y, **kw: x @ y.T), ValueError, "kernel= applies to"),
        (dict(loss="energy", backend="multiscale"), NotImplementedError, "runs loss='sinkhorn' only"),
        (dict(backend="multiscale", truncate=0), ValueError, "truncate"),
        (dict(backend="multiscale", cluster_scale=-0.1), ValueError, "cluster_scale"),
        (dict(loss="hausdorff", reach=0.5), NotImplementedError, "unbalanced Hausdorff"),
        (dict(blur=0), ValueError, "blur"),
        (dict(blur=-1.0), ValueError, "blur"),
        (dict(reach=0.0), ValueError, "reach"),
        (dict(scaling=1.0), ValueError, "scaling"),
        (dict(diameter=-1.0), ValueError, "diameter"),
    ],
)
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplesLoss(**kwargs)


def test_accepted_settings_are_stored_like_geomloss():
    layer = SamplesLoss("sinkhorn", p=1.0, truncate=3, cluster_scale=0.2, verbose=True)
    assert isinstance(layer, torch.nn.Module)
    assert (layer.loss, layer.p, layer.truncate, layer.cluster_scale, layer.verbose) == (
        "sinkhorn", 1, 3, 0.2, True
    )
    assert layer.state_dict() == {} and "loss='sinkhorn'" in repr(layer)
    # The energy distance ignores blur (as in GeomLoss); kernel losses ignore reach and debias.
    SamplesLoss("energy", blur=None)
    SamplesLoss("gaussian", reach=0.3, debias=False, scaling=0.99)


def test_call_errors():
    x, y = torch.rand(5, 2), torch.rand(4, 2)
    layer = SamplesLoss()
    with pytest.raises(ValueError, match="two .*, four .* or six"):
        layer(x, y, x)
    with pytest.raises(ValueError, match="integer array"):  # float labels
        layer(torch.zeros(5), torch.ones(5) / 5, x, torch.zeros(4), torch.ones(4) / 4, y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(x.numpy(), y.numpy())
    with pytest.raises(ValueError, match="equal total masses"):
        layer(torch.ones(5), x, torch.ones(4), y)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.ones(4) / 4, x, torch.ones(4) / 4, y)


# ------------------------------------------------------------------------------------------
# 5. Call forms, potentials, dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtype_device_and_shapes(loss, dtype):
    x, y, a, b = (torch.tensor(v, dtype=DTYPES[dtype]) for v in make_data(9, True))
    xb, yb, ab, bb = (torch.tensor(v, dtype=DTYPES[dtype]) for v in make_data(9, True, batched=True))
    layer = SamplesLoss(loss, blur=0.1)
    for out, shape in [(layer(x, y), ()), (layer(a, x, b, y), ()), (layer(ab, xb, bb, yb), (3,))]:
        assert out.dtype == DTYPES[dtype] and out.device == x.device and out.shape == shape
    layer.potentials = True
    for (F, G), shapes in [
        (layer(x, y), ((1, 40), (1, 30))),
        (layer(a, x, b, y), ((1, 40), (1, 30))),
        (layer(a[:, None], x, b[:, None], y), ((1, 40), (1, 30))),
        (layer(ab, xb, bb, yb), ((3, 40), (3, 30))),
        (layer(ab[..., None], xb, bb[..., None], yb), ((3, 40), (3, 30))),
    ]:
        assert (F.shape, G.shape) == shapes
        assert F.dtype == G.dtype == DTYPES[dtype] and F.device == x.device


@pytest.mark.parametrize("loss", ["sinkhorn", "energy", "gaussian"])
def test_potential_shapes_are_geomloss_shapes(geomloss, loss):
    x, y, a, b = (torch.tensor(v) for v in make_data(10, True))
    xb, yb, ab, bb = (torch.tensor(v) for v in make_data(10, True, batched=True))
    ours = SamplesLoss(loss, potentials=True)
    ref = geomloss.SamplesLoss(loss, potentials=True, backend="tensorized")
    for args in [(x, y), (a, x, b, y), (a[:, None], x, b[:, None], y), (ab, xb, bb, yb)]:
        assert [t.shape for t in ours(*args)] == [t.shape for t in ref(*args)]


def test_column_weights_give_the_same_value():
    x, y, a, b = (torch.tensor(v) for v in make_data(11, True))
    layer = SamplesLoss()
    # The same float64 computation after a reshape: rounding of reduction orders only.
    assert layer(a[:, None], x, b[:, None], y).item() == pytest.approx(layer(a, x, b, y).item(), rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batched", [False, True])
def test_value_from_potentials(loss, batched):
    """``<a, F> + <b, G>`` (balanced sinkhorn) or half of it (the others) is the value."""
    x, y, a, b = (torch.tensor(v) for v in make_data(12, True, batched=batched))
    layer = SamplesLoss(loss, blur=0.1)
    value = layer(a, x, b, y)
    layer.potentials = True
    F, G = layer(a, x, b, y)
    dual = (a * F.reshape(a.shape)).sum(-1) + (b * G.reshape(b.shape)).sum(-1)
    expected = dual if loss == "sinkhorn" else dual / 2
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-14)


def test_hausdorff_works():
    """GeomLoss 0.3.1 raises KeyError for loss="hausdorff"; ours is ot_agnostic's divergence."""
    import ot_agnostic as oa

    x, y, a, b = (torch.tensor(v) for v in make_data(13, True))
    for p in (1, 2):
        layer = SamplesLoss("hausdorff", p=p, blur=0.05)
        # The same float64 computation through two entry points: reduction orders only.
        torch.testing.assert_close(
            layer(a, x, b, y), oa.hausdorff_divergence(x, y, a, b, p=p, blur=0.05), rtol=1e-12, atol=1e-15
        )
        assert abs(layer(x, x).item()) <= 1e-15
        xg = x.clone().requires_grad_()
        layer(a, xg, b, y).backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().max() > 0


def test_potentials_carry_gradients_through_the_points():
    x = torch.tensor(make_data(14, False)[0], requires_grad=True)
    y = torch.tensor(make_data(14, False)[1])
    for loss in LOSSES:
        F, G = SamplesLoss(loss, potentials=True)(x, y)
        (grad,) = torch.autograd.grad(F.sum() + G.sum(), [x])
        assert torch.isfinite(grad).all()


def test_import_does_not_shadow_torch():
    """``ot_agnostic.torch`` imports the real torch; ``import ot_agnostic`` still imports none."""
    code = (
        "import sys, ot_agnostic\n"
        "assert 'torch' not in sys.modules, 'import ot_agnostic imported torch'\n"
        "from ot_agnostic.torch import SamplesLoss\n"
        "import torch, ot_agnostic.torch as t\n"
        "assert t.torch is torch and hasattr(torch, 'nn') and issubclass(SamplesLoss, torch.nn.Module)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


@pytest.mark.parametrize("loss", ["sinkhorn", "energy"])
def test_keops_by_name_matches_tensorized(loss):
    """backend="keops" insists on KeOps (no silent fallback) and gives the dense numbers."""
    pytest.importorskip("pykeops")
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(30, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(20, 3, generator=gen, dtype=torch.float64)
    mine = SamplesLoss(loss, backend="keops")(x, y)
    ref = SamplesLoss(loss, backend="tensorized")(x, y)
    torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="runs 'online' or 'multiscale', not 'tensorized'"):
        SamplesLoss(loss, backend="keops/tensorized")(x, y)


# ------------------------------------------------------------------------------------------
# 5. Custom costs and kernels (GeomLoss' forms) against GeomLoss
# ------------------------------------------------------------------------------------------


def anisotropic(x, y):
    """``|W (x - y)|^2 / 2`` with ``W = diag(1, 3)``: a cost no built-in plugin knows."""
    weights = torch.tensor([1.0, 9.0], dtype=x.dtype)
    return (((x[:, :, None, :] - y[:, None, :, :]) ** 2) * weights).sum(-1) / 2


def cityblock(x, y):
    return (x[:, :, None, :] - y[:, None, :, :]).abs().sum(-1)


def inverse_multiquadric(x, y, blur=0.05, use_keops=False, ranges=None):
    """GeomLoss' kernel signature: ``(B, N, M)`` dense tensor, or a KeOps LazyTensor."""
    if use_keops:
        from pykeops.torch import LazyTensor

        sq = ((LazyTensor(x[:, :, None, :]) - LazyTensor(y[:, None, :, :])) ** 2).sum(-1)
        return (1 + sq / blur**2).rsqrt()
    sq = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return (1 + sq / blur**2).rsqrt()


@pytest.mark.parametrize("backend", ["tensorized", "online"])
@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[4], SETTINGS[8]], ids=setting_id)
def test_cost_function_matches_geomloss_tensorized(geomloss, setting, backend):
    """GeomLoss runs a cost function densely only; ours also online, by blocks of rows."""
    debias, reach, blur, scaling, weighted, batched = setting
    kw = dict(p=2, blur=blur, reach=reach, scaling=scaling, debias=debias, cost=anisotropic)
    compare(
        SamplesLoss("sinkhorn", backend=backend, **kw),
        geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw),
        make_data(6, weighted, batched), "float64",
        grad_factor=1.0 if reach is None else unbalanced_ratio(2, blur, reach),
    )


@pytest.mark.slow
def test_keops_formula_cost_matches_geomloss_online(keops):
    formula = "Sum(Abs(X-Y))"  # the l1 distance, as a KeOps formula
    data = make_data(7, weighted=True)
    kw = dict(p=1, blur=0.1, scaling=0.8)
    ours = SamplesLoss("sinkhorn", cost=formula, backend="online", **kw)
    compare(ours, keops.SamplesLoss("sinkhorn", cost=formula, backend="online", **kw), data, "float64")
    # the same cost as a function, on the Array API path
    value, grads = run(ours, data, "float64")
    ref_value, ref_grads = run(SamplesLoss("sinkhorn", cost=cityblock, **kw), data, "float64")
    assert_close(value, ref_value, 1e-10, "formula vs function")
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-8, f"grad {name}")


def test_formula_and_function_pair_runs_multiscale_on_keops():
    """GeomLoss' multiscale form ``cost=(formula, function)``: KeOps block-sparse reductions
    of the formula, the function for the truncation; the built-in numbers."""
    pytest.importorskip("pykeops")
    x, y, _, _ = (torch.tensor(v) if v is not None else None for v in make_data(8, False, n=300, m=250, d=2))
    half_squared = ("SqDist(X,Y) / IntCst(2)", lambda x, y: ((x[:, :, None] - y[:, None]) ** 2).sum(-1) / 2)
    kw = dict(p=2, blur=0.05, scaling=0.7, cluster_scale=0.15, backend="multiscale")
    xt = x.clone().requires_grad_(True)
    mine = SamplesLoss("sinkhorn", cost=half_squared, **kw)(xt, y)
    mine.backward()
    xr = x.clone().requires_grad_(True)
    ref = SamplesLoss("sinkhorn", **kw)(xr, y)
    ref.backward()
    assert abs(mine.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert_close(xt.grad, xr.grad, 1e-8, "grad x")


@pytest.mark.parametrize("backend", ["tensorized", pytest.param("online", marks=pytest.mark.slow)])
@pytest.mark.parametrize("weighted, batched", [(True, False), (False, True)])
def test_kernel_function_matches_geomloss(geomloss, backend, weighted, batched):
    if backend == "online":
        pytest.importorskip("pykeops")
    kw = dict(blur=0.2, kernel=inverse_multiquadric)
    compare(
        SamplesLoss("gaussian", backend=backend, **kw),
        geomloss.SamplesLoss("gaussian", backend="tensorized", **kw),
        make_data(9, weighted, batched), "float64",
    )


def test_a_kernel_function_of_the_builtin_kernel_gives_the_builtin_numbers():
    def gaussian(x, y, blur=0.05, use_keops=False, ranges=None):
        return (-((x[:, :, None] - y[:, None]) ** 2).sum(-1) / (2 * blur**2)).exp()

    data = make_data(10, weighted=True)
    ours, grads = run(SamplesLoss("gaussian", blur=0.3, kernel=gaussian), data, "float64")
    ref, ref_grads = run(SamplesLoss("gaussian", blur=0.3), data, "float64")
    assert_close(ours, ref, 1e-12, "value")
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-10, f"grad {name}")


def test_cost_function_with_a_wrong_shape_says_so():
    x, y, _, _ = make_data(11, False)
    layer = SamplesLoss("sinkhorn", cost=lambda x, y: (x[:, :, None] - y[:, None]).sum(-1)[0])
    with pytest.raises(ValueError, match=r"must return a \(B, N, M\)"):
        layer(torch.tensor(x), torch.tensor(y))


def test_verbose_logs_what_ran(caplog):
    x, y, _, _ = (torch.tensor(v) if v is not None else None for v in make_data(12, False, n=300, m=250))
    with caplog.at_level("INFO", logger="ot_agnostic"):
        SamplesLoss("sinkhorn", verbose=True, backend="tensorized")(x, y)
        SamplesLoss("sinkhorn", verbose=True, backend="array_api/multiscale", cluster_scale=0.1)(x, y)
        SamplesLoss("sinkhorn", backend="tensorized")(x, y)  # verbose=False: nothing
    messages = [r.getMessage() for r in caplog.records if r.name == "ot_agnostic"]
    assert len(messages) == 2
    assert "array_api/tensorized" in messages[0] and "Sinkhorn updates" in messages[0] and "marginal error" in messages[0]
    kept = float(messages[1].split("kept ")[1].split("%")[0])
    assert "array_api/multiscale" in messages[1] and 0 < kept < 100


def test_cluster_label_call_and_its_errors():
    x, y, a, b = (torch.tensor(v) for v in make_data(13, True, n=200, m=150))
    l_x, l_y = (torch.as_tensor((p[:, 0] * 4).floor().long() * 10 + (p[:, 1] * 4).floor().long()) for p in (x, y))
    kw = dict(blur=0.05, scaling=0.7, cluster_scale=0.25)
    labelled = SamplesLoss("sinkhorn", **kw)(l_x, a, x, l_y, b, y)
    ref = ota.sinkhorn_divergence(x, y, a, b, cluster_labels=(l_x, l_y), backend="multiscale", tol=None, **kw)
    assert labelled.item() == pytest.approx(ref.item(), rel=1e-12)
    with pytest.raises(ValueError, match="cluster_labels define the clusters"):
        SamplesLoss("sinkhorn", backend="tensorized", **kw)(l_x, a, x, l_y, b, y)
    with pytest.raises(NotImplementedError, match="not of loss='energy'"):
        SamplesLoss("energy")(l_x, a, x, l_y, b, y)
    with pytest.raises(TypeError, match="l_x must be a torch.Tensor"):
        SamplesLoss("sinkhorn")(l_x.numpy(), a, x, l_y, b, y)
