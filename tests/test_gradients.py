"""Gradients without autograd (``value_and_grad``, ``SinkhornResult.gradient``).

References: torch autograd on the same data (which differentiates the final extrapolation
step only) and central finite differences of the value.
"""

import numpy as np
import pytest

import ot_agnostic as ota
from tests.helpers import TOL, library_of, load_library, random_measures, to_lib, to_numpy

SETTINGS = [
    dict(p=p, reach=reach, debias=debias)
    for p in (1, 2)
    for reach in (None, 0.4)
    for debias in (True, False)
]


def _problem(rng, batched=False, unbalanced=False, N=25, M=20, D=3):
    return random_measures(rng, (2,) if batched else (), N, M, D, 0.1, 0.2, unbalanced)


@pytest.mark.parametrize("backend", ["tensorized", "online"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_matches_torch_autograd(rng, setting, backend):
    torch = load_library("torch")
    x, y, a, b = _problem(rng, batched=True, unbalanced=setting["reach"] is not None)
    leaves = [torch.tensor(t, requires_grad=True) for t in (x, y, a, b)]
    value_t = ota.sinkhorn_divergence(*leaves, backend=backend, **setting)
    value_t.sum().backward()
    value, grads = ota.value_and_grad(x, y, a, b, backend=backend, **setting)
    np.testing.assert_allclose(value, to_numpy(value_t), rtol=1e-12)
    for mine, leaf in zip(grads, leaves):
        ref = leaf.grad.numpy()
        assert np.abs(mine - ref).max() <= 1e-10 * np.abs(ref).max()


def _central_difference(fun, t, direction, h=1e-6):
    return (fun(t + h * direction) - fun(t - h * direction)) / (2 * h)


def _fd_check(rng, setting, scaling, names, rel):
    x, y, a, b = _problem(rng, unbalanced=setting["reach"] is not None, N=6, M=5, D=2)
    kw = dict(blur=0.5, scaling=scaling, diameter=1.0, **setting)
    _, grads = ota.value_and_grad(x, y, a, b, **kw)
    inputs = dict(x=x, y=y, a=a, b=b)
    for name in names:
        direction = rng.standard_normal(inputs[name].shape)
        if name in "ab" and setting["reach"] is None:  # balanced OT: keep the masses equal
            direction -= direction.mean()

        def value(t):
            return float(ota.sinkhorn_divergence(**{**inputs, name: t}, **kw))

        fd = _central_difference(value, inputs[name], direction)
        assert fd == pytest.approx(np.sum(getattr(grads, name) * direction), rel=rel, abs=1e-9), name


# The envelope gradient is the derivative of the *converged* value. eps-scaling lags behind the
# fixed point by O(1 - scaling) (measured: relative gap 2e-2, 2e-3, 2e-4 for scaling 0.99, 0.999,
# 0.9999), so finite differences agree to a tolerance that shrinks with 1 - scaling.
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_matches_finite_differences(rng, setting):
    _fd_check(rng, setting, scaling=0.999, names="xa", rel=1e-2)


def test_matches_finite_differences_when_converged(rng):
    _fd_check(rng, dict(p=2, reach=None, debias=True), scaling=0.9999, names="x", rel=1e-3)


def test_every_library_gives_its_own_arrays(lib, dtype, rng):
    x, y, a, b = _problem(rng)
    ref_value, ref = ota.value_and_grad(x, y, a, b)
    args = [to_lib(t, lib, dtype) for t in (x, y, a, b)]
    value, grads = ota.value_and_grad(*args)
    assert library_of(value) == lib
    assert float(value) == pytest.approx(float(ref_value), rel=10 * TOL[dtype])
    for mine, expected, given in zip(grads, ref, args):
        assert library_of(mine) == lib and mine.dtype == given.dtype
        assert tuple(mine.shape) == tuple(given.shape)
        scale = np.abs(expected).max()
        assert np.abs(to_numpy(mine) - expected).max() <= 100 * TOL[dtype] * scale


def test_gradient_step_decreases_the_divergence(rng):
    x, y, _, _ = _problem(rng, N=60, M=50)
    value, grads = ota.value_and_grad(x, y)
    # S has a gradient of size ~ a_i: a step of 1/a_i moves each point by its displacement.
    moved = x - 0.5 * x.shape[0] * grads.x
    assert float(ota.sinkhorn_divergence(moved, y)) < 0.5 * float(value)


def test_translation_gradient_is_the_displacement(rng):
    # S(x, x + v) = |v|^2 / 2 for p=2, so dS/dx sums to -v (each point pulled by a_i v).
    x, _, _, _ = _problem(rng, N=80)
    v = np.array([0.1, -0.05, 0.02])
    _, grads = ota.value_and_grad(x, x + v, blur=0.01)
    np.testing.assert_allclose(grads.x.sum(axis=0), -v, atol=1e-4)
    np.testing.assert_allclose(grads.y.sum(axis=0), v, atol=1e-4)


@pytest.mark.parametrize("backend", ["tensorized", "online", "array_api/online"])
@pytest.mark.parametrize(
    "loss", [ota.sinkhorn_divergence, ota.hausdorff_divergence, ota.energy_distance, ota.gaussian_mmd]
)
def test_second_derivatives_raise_a_clear_error(rng, backend, loss):
    """First derivatives with create_graph=True are the usual ones; differentiating them raises."""
    torch = load_library("torch")
    x, y, a, b = (torch.tensor(t) for t in _problem(rng))
    x.requires_grad_(True)
    a.requires_grad_(True)
    (plain_x, plain_a) = torch.autograd.grad(loss(x, y, a, b, backend=backend), [x, a])
    grad_x, grad_a = torch.autograd.grad(loss(x, y, a, b, backend=backend), [x, a], create_graph=True)
    # Two runs of the same float64 computation: equal but for the order of torch's (possibly
    # multi-threaded) reductions, ~1e-16 relative; 1e-12 is far below a wrong derivative.
    torch.testing.assert_close(grad_x, plain_x, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_a, plain_a, rtol=1e-12, atol=1e-15)
    for penalty in (grad_x.square().sum(), grad_a.sum()):  # Hessian-vector products, gradient penalty
        with pytest.raises(RuntimeError, match=r"first derivatives only.*finite differences"):
            torch.autograd.grad(penalty, [x])
    # inputs that do not require gradients are not wrapped: nothing changes for them
    assert loss(x.detach(), y, a.detach(), b, backend=backend).grad_fn is None
