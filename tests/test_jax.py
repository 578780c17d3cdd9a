"""JAX arrays on the generic (pure Array API) path, under ``jax.grad`` (``ot_agnostic/_jax.py``).

The Sinkhorn losses go through one ``jax.custom_vjp`` whose gradients are the envelope ones
(the final Sinkhorn update, never the eps-scaling loop): they must equal our NumPy
``value_and_grad`` on the same data and, for converged problems, central finite differences
of the value. The kernel norms and the soft Hausdorff divergence are traced by JAX.
Everything runs in float64 (``jax_enable_x64``, restored after the module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import ot_agnostic as ota
from tests.helpers import random_measures

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

N, M, D = 20, 24, 2


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 JAX arrays for this module only (the flags are global: restore them).

    Eager JAX compiles every operation once per shape (~100 small XLA programs per loss, 3-5 s
    on 2 cores): a persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR``, else in the
    temporary directory) makes the later runs of this module about 3x faster.
    """
    options = {
        "jax_enable_x64": True,
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir
        or os.path.join(tempfile.gettempdir(), "ot_agnostic_jax_cache"),
        "jax_persistent_cache_min_compile_time_secs": 0,
    }
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)


def _problem(seed=0, batch=None, unbalanced=False):
    shape = () if batch is None else (batch,)
    return random_measures(np.random.default_rng(seed), shape, N, M, D, 0.2, 0.5, unbalanced)


def _rel(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# Same engine, same formulas in float64 on both sides (NumPy runs the Numba kernels, JAX the
# pure Array API path): only the order of the reductions differs, ~1e-16 per operation, which
# the contracting Sinkhorn updates do not amplify (measured: 1e-14 at worst).
SAME_ENGINE_RTOL = 1e-10

CASES = {
    "balanced-p2": dict(),
    "balanced-p1": dict(p=1),
    "unbalanced": dict(reach=0.5),
    "no-debias": dict(debias=False),
    "unbalanced-no-debias-p1": dict(reach=0.5, debias=False, p=1),
    "multiscale": dict(backend="multiscale"),
}


# Batched (B, N, D) inputs: one setting, since every new shape costs JAX compilations.
@pytest.mark.parametrize(
    "case, batch", [(case, None) for case in CASES] + [("unbalanced", 2)],
    ids=list(CASES) + ["unbalanced-batched"],
)
def test_grad_matches_numpy_envelope_gradients(case, batch):
    setting = dict(blur=0.2, **CASES[case])
    data = _problem(batch=batch, unbalanced="reach" in setting)

    def loss(*arrays):
        return jnp.sum(ota.sinkhorn_divergence(*arrays, **setting))

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, data))
    ref_value, ref_grads = ota.value_and_grad(*data, **setting)
    assert _rel(value, np.sum(ref_value)) < SAME_ENGINE_RTOL
    for name, got, ref in zip("xyab", grads, ref_grads):
        assert got.dtype == jnp.float64
        assert _rel(got, ref) < SAME_ENGINE_RTOL, name


FD_CASES = {
    "balanced-p2": dict(),
    "balanced-p1": dict(p=1),
    "unbalanced": dict(reach=0.5),
    "no-debias": dict(debias=False),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_grad_matches_finite_differences(case):
    """Directional derivatives along random directions, one argument at a time.

    The envelope gradient is the derivative of the converged loss; the computed value comes
    from one update per temperature, so the two agree to the loop's convergence, measured by
    ``q = max_change / eps`` (how far the potentials sit from their fixed point, relative to
    eps: 7e-4 to 5e-3 here, with a large blur and ``scaling=0.95``). The tolerance is
    ``|fd - <grad, d>| <= q |grad| |d|``; measured errors are 0.02 q to 0.17 q (and shrink
    with q as scaling -> 1). ``diameter`` is fixed: the estimated one moves with the points,
    and so would the eps schedule, which the envelope gradient rightly leaves out.
    """
    setting = dict(blur=1.0, scaling=0.95, diameter=2.0, **FD_CASES[case])
    data = [jnp.asarray(t) for t in _problem(unbalanced="reach" in setting)]
    result = ota.sinkhorn(*data, **setting)
    q = result.max_change / result.eps
    assert q < 1e-2
    grads = jax.grad(lambda *t: ota.sinkhorn(*t, **setting).value, argnums=(0, 1, 2, 3))(*data)
    rng = np.random.default_rng(1)
    h = 1e-5
    for k, name in enumerate("xyab"):
        direction = rng.standard_normal(data[k].shape)
        if k >= 2 and "reach" not in setting:
            direction -= direction.mean()  # balanced OT: keep the masses equal
        plus, minus = list(data), list(data)
        plus[k], minus[k] = data[k] + h * direction, data[k] - h * direction
        fd = (float(ota.sinkhorn(*plus, **setting).value) - float(ota.sinkhorn(*minus, **setting).value)) / (2 * h)
        envelope = float(jnp.sum(grads[k] * direction))
        scale = float(jnp.linalg.norm(grads[k]) * np.linalg.norm(direction))
        assert abs(fd - envelope) <= q * scale, (name, fd, envelope, q * scale)


def test_sinkhorn_result_under_grad():
    """``sinkhorn(...).value`` is differentiable; the other fields are concrete arrays."""
    x, y, a, b = map(jnp.asarray, _problem())

    def loss(x):
        result = ota.sinkhorn(x, y, a, b, blur=0.2)
        return result.value, result

    (value, result), grad_x = jax.value_and_grad(loss, has_aux=True)(x)
    assert not isinstance(result.f, jax.core.Tracer) and result.f.shape == (N,)
    plain = ota.sinkhorn(x, y, a, b, blur=0.2)
    assert _rel(value, plain.value) < SAME_ENGINE_RTOL
    assert _rel(grad_x, plain.gradient().x) < SAME_ENGINE_RTOL
    assert _rel(grad_x, result.gradient().x) < SAME_ENGINE_RTOL


def test_gradients_keep_each_input_dtype():
    """float32 x with float64 y: computed in float64, each gradient in its input's dtype."""
    x, y, _, _ = _problem()
    grad_x, grad_y = jax.grad(lambda x, y: ota.sinkhorn_divergence(x, y, blur=0.2), argnums=(0, 1))(
        jnp.asarray(x, dtype=jnp.float32), jnp.asarray(y)
    )
    assert grad_x.dtype == jnp.float32 and grad_y.dtype == jnp.float64
    _, ref = ota.value_and_grad(np.float32(x).astype(np.float64), y, blur=0.2)
    assert _rel(grad_x, ref.x) < 1e-6  # float32 rounding of the gradient itself
    assert _rel(grad_y, ref.y) < SAME_ENGINE_RTOL


KERNEL_LOSSES = {
    "energy": lambda *t: ota.energy_distance(*t),
    "gaussian": lambda *t: ota.gaussian_mmd(*t, blur=0.5),
    "laplacian": lambda *t: ota.laplacian_mmd(*t, blur=0.5),
    "hausdorff-p2": lambda *t: ota.hausdorff_divergence(*t, blur=0.5),
    "hausdorff-p1": lambda *t: ota.hausdorff_divergence(*t, p=1, blur=0.5),
}


@pytest.mark.parametrize("name", list(KERNEL_LOSSES))
def test_kernel_losses_grad_matches_finite_differences(name):
    """Closed-form losses traced by JAX: exact derivatives, so central differences agree
    to their O(h^2) error and rounding (measured below 1e-8 relative; tolerance 1e-6)."""
    loss = KERNEL_LOSSES[name]
    data = [jnp.asarray(t) for t in _problem(unbalanced=True)]
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*data)
    assert _rel(value, loss(*(np.asarray(t) for t in data))) < SAME_ENGINE_RTOL
    rng = np.random.default_rng(2)
    h = 1e-5
    for k, arg in enumerate("xyab"):
        direction = rng.standard_normal(data[k].shape)
        plus, minus = list(data), list(data)
        plus[k], minus[k] = data[k] + h * direction, data[k] - h * direction
        fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * h)
        exact = float(jnp.sum(grads[k] * direction))
        assert abs(fd - exact) <= 1e-6 * max(abs(exact), 1e-3), (arg, fd, exact)


def test_jit_is_refused_clearly():
    x, y, _, _ = map(jnp.asarray, _problem())
    with pytest.raises(NotImplementedError, match="outside jax.jit"):
        jax.jit(lambda x: ota.sinkhorn_divergence(x, y))(x)
    with pytest.raises(NotImplementedError, match="outside jax.jit"):
        jax.jit(jax.grad(lambda x: ota.sinkhorn_divergence(x, y)))(x)
    with pytest.raises(NotImplementedError, match="outside jax.jit"):
        jax.jit(lambda x: ota.energy_distance(x, y))(x)


def test_vmap_and_second_derivatives_are_refused_clearly():
    x, y, _, _ = map(jnp.asarray, _problem())
    with pytest.raises(NotImplementedError, match=r"\(B, N, D\) arrays instead of jax.vmap"):
        jax.vmap(lambda x: ota.sinkhorn_divergence(x, y))(jnp.stack([x, x]))
    with pytest.raises(NotImplementedError, match="first derivatives"):
        jax.grad(lambda x: jnp.sum(jax.grad(lambda x: ota.sinkhorn_divergence(x, y))(x)))(x)
    with pytest.raises(NotImplementedError, match="first derivatives"):
        jax.hessian(lambda x: ota.sinkhorn_divergence(x, y))(x)


def test_import_does_not_import_jax():
    """Neither ``import ot_agnostic``, its JAX module nor a NumPy computation imports JAX."""
    code = (
        "import json, sys, numpy as np, ot_agnostic as ota, ot_agnostic._jax\n"
        "x = np.random.default_rng(0).random((5, 2))\n"
        "ota.sinkhorn_divergence(x, x + 1.0, backend='array_api'); ota.energy_distance(x, x)\n"
        "print(json.dumps('jax' in sys.modules))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
