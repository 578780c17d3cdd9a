"""The Numba CPU kernels (``ot_agnostic.kernels.numba_cpu``) against dense float64 references.

Every kernel is compared with a NumPy/SciPy computation on the full cost matrix, for
``p`` in {1, 2}, ``D`` in {1, 2, 3, 5, 8}, float32 and float64, ``B`` in {1, 3}, ``N != M``
and non-uniform log-weights with zero weights (``-1e5``); then the hard cases: tiny
``eps``, identical points, far-apart clouds where every term underflows without the
max-shift, ``-inf`` log-weights, several column blocks whose maximum grows.

The kernels share one compiled parallel engine per dtype (a few seconds each, cold;
``cache=True`` keeps the machine code on disk for later runs).
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest

pytest.importorskip("numba")
special = pytest.importorskip("scipy.special")

from ot_agnostic.kernels import numba_cpu as nk  # noqa: E402

DTYPES = (np.float32, np.float64)
#: Tolerances relative to the size of the reference (max |value|, or the norm of vectors).
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


# --------------------------------------------------------------------------------------
# Dense float64 references
# --------------------------------------------------------------------------------------


def cost(x, y, p):
    """``|x_i - y_j|**p / p`` as a ``(B, N, M)`` float64 array."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dist = np.sqrt(((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1))
    return dist**p / p


def ref_logits(x, y, h, eps, p):
    return np.asarray(h, np.float64)[:, None, :] - cost(x, y, p) / eps


def ref_softmin(x, y, h, eps, p):
    return -eps * special.logsumexp(ref_logits(x, y, h, eps, p), axis=2)


def ref_weights(x, y, h, eps, p):
    return special.softmax(ref_logits(x, y, h, eps, p), axis=2)


def ref_grad(x, y, h, eps, p):
    w = ref_weights(x, y, h, eps, p)
    diff = np.asarray(x, np.float64)[:, :, None, :] - np.asarray(y, np.float64)[:, None, :, :]
    if p == 1:
        norm = np.sqrt((diff**2).sum(-1, keepdims=True))
        diff = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
    return (w[..., None] * diff).sum(2)


def ref_weighted_sum(x, y, h, eps, p, v):
    return ref_weights(x, y, h, eps, p) @ np.asarray(v, np.float64)


def ref_kernel_sum(x, y, v, kind, scale):
    dist = cost(x, y, 1)
    if kind == nk.KERNEL_ENERGY:
        k = -dist
    elif kind == nk.KERNEL_GAUSSIAN:
        k = np.exp(-(dist**2) / (2 * scale**2))
    else:
        k = np.exp(-dist / scale)
    return (k @ np.asarray(v, np.float64)[:, :, None])[:, :, 0]


def rel_err(out, ref):
    """Largest error relative to the largest reference value (vectors: to the largest norm)."""
    out = np.asarray(out, np.float64)
    if ref.ndim == 3:
        return np.max(np.linalg.norm(out - ref, axis=-1)) / np.max(np.linalg.norm(ref, axis=-1))
    return np.max(np.abs(out - ref)) / np.max(np.abs(ref))


# --------------------------------------------------------------------------------------
# Data and calls
# --------------------------------------------------------------------------------------


def make(rng, B, N, M, D, dtype, *, zero_weights=True):
    x = rng.random((B, N, D)).astype(dtype)
    y = (rng.random((B, M, D)) * 0.8 + 0.1).astype(dtype)
    h = (-np.log(M) + rng.standard_normal((B, M))).astype(dtype)
    if zero_weights:
        h[:, ::7] = -1e5
    return x, y, h


def run_softmin(x, y, h, eps, p):
    out = np.full(x.shape[:2], np.nan, x.dtype)
    assert nk.softmin(x, y, h, float(eps), int(p), out) is None
    return out


def run_grad(x, y, h, eps, p):
    out = np.full(x.shape, np.nan, x.dtype)
    nk.softmin_grad(x, y, h, float(eps), int(p), out)
    return out


def run_weighted_sum(x, y, h, eps, p, v):
    out = np.full(x.shape[:2] + v.shape[2:], np.nan, x.dtype)
    nk.softmax_weighted_sum(x, y, h, float(eps), int(p), v, out)
    return out


def run_kernel_sum(x, y, v, kind, scale):
    out = np.full(x.shape[:2], np.nan, x.dtype)
    nk.kernel_sum(x, y, v, int(kind), float(scale), out)
    return out


# --------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------

GRID = [
    pytest.param(dtype, p, D, B, id=f"{dtype.__name__}-p{p}-D{D}-B{B}")
    for dtype in DTYPES
    for p in (1, 2)
    for D in (1, 2, 3, 5, 8)
    for B in (1, 3)
]


@pytest.mark.parametrize("dtype, p, D, B", GRID)
def test_softmin_matches_dense(rng, dtype, p, D, B):
    x, y, h = make(rng, B, 37, 83, D, dtype)
    for eps in (0.05, 0.5):
        eps = eps**p
        out = run_softmin(x, y, h, eps, p)
        assert out.dtype == dtype
        assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]


@pytest.mark.parametrize("dtype, p, D, B", GRID)
def test_softmin_grad_matches_dense(rng, dtype, p, D, B):
    x, y, h = make(rng, B, 41, 70, D, dtype)
    eps = 0.1**p
    out = run_grad(x, y, h, eps, p)
    assert out.dtype == dtype
    assert rel_err(out, ref_grad(x, y, h, eps, p)) < RTOL[dtype]


@pytest.mark.parametrize("dtype, p, D, B", GRID)
def test_softmax_weighted_sum_matches_dense(rng, dtype, p, D, B):
    x, y, h = make(rng, B, 29, 66, D, dtype)
    eps = 0.1**p
    # The transport map (v = y) and an arbitrary signed (B, M, 4) field.
    for v in (y, rng.standard_normal((B, 66, 4)).astype(dtype)):
        out = run_weighted_sum(x, y, h, eps, p, v)
        assert out.dtype == dtype
        assert rel_err(out, ref_weighted_sum(x, y, h, eps, p, v)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("kind", [nk.KERNEL_ENERGY, nk.KERNEL_GAUSSIAN, nk.KERNEL_LAPLACIAN])
@pytest.mark.parametrize("D, B", [(1, 1), (2, 3), (3, 1), (5, 3), (8, 1)])
def test_kernel_sum_matches_dense(rng, dtype, kind, D, B):
    x, y, _ = make(rng, B, 45, 77, D, dtype)
    v = rng.random((B, 77)).astype(dtype)  # positive: no cancellation in the sum
    for scale in (0.1, 1.0):
        out = run_kernel_sum(x, y, v, kind, scale)
        assert out.dtype == dtype
        assert rel_err(out, ref_kernel_sum(x, y, v, kind, scale)) < RTOL[dtype]


def test_the_grad_of_softmin_is_its_finite_difference(rng):
    """Envelope theorem: d softmin_i / d x_i = softmin_grad_i (float64, p = 2)."""
    x, y, h = make(rng, 1, 5, 40, 3, np.float64)
    eps, step = 0.05, 1e-6
    grad = run_grad(x, y, h, eps, 2)
    for k in range(3):
        shift = np.zeros_like(x)
        shift[..., k] = step
        up, down = run_softmin(x + shift, y, h, eps, 2), run_softmin(x - shift, y, h, eps, 2)
        fd = (up - down) / (2 * step)
        np.testing.assert_allclose(grad[..., k], fd, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("eps", [1e-6, 1e-8])
def test_tiny_eps_is_finite_and_correct(rng, dtype, p, eps):
    x, y, h = make(rng, 2, 33, 90, 3, dtype)
    out = run_softmin(x, y, h, eps, p)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
    grad = run_grad(x, y, h, eps, p)
    assert np.all(np.isfinite(grad))
    assert rel_err(grad, ref_grad(x, y, h, eps, p)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_identical_points(rng, dtype, p):
    """x_i = y_i: zero costs, and for p = 1 the coincident point contributes no gradient."""
    x = rng.random((2, 50, 3)).astype(dtype)
    y = x.copy()
    h = np.full((2, 50), -np.log(50), dtype)
    eps = 0.01**p
    out = run_softmin(x, y, h, eps, p)
    assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
    grad = run_grad(x, y, h, eps, p)
    assert np.all(np.isfinite(grad))
    assert rel_err(grad, ref_grad(x, y, h, eps, p)) < RTOL[dtype]
    # A single point on top of x: zero cost, zero gradient.
    first = x[:, :1].copy()
    one = run_grad(first, first, np.zeros((2, 1), dtype), eps, p)
    assert np.all(one == 0)  # exact: x - x is 0 in any order of operations


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_far_apart_clouds_underflow_without_the_shift(rng, dtype, p):
    x, y, h = make(rng, 1, 31, 75, 2, dtype)
    y = y + dtype(300.0)
    eps = 0.01**p
    assert np.all(ref_logits(x, y, h, eps, p) < -700)  # every exp(...) is 0 in float64
    out = run_softmin(x, y, h, eps, p)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
    tmap = run_weighted_sum(x, y, h, eps, p, y)
    assert rel_err(tmap, ref_weighted_sum(x, y, h, eps, p, y)) < RTOL[dtype]


@pytest.mark.parametrize("p", [1, 2])
def test_float32_data_away_from_the_origin(rng, p):
    """Costs from coordinate differences: no |x|^2 + |y|^2 - 2 x.y cancellation in float32."""
    x, y, h = make(rng, 1, 40, 64, 3, np.float32)
    x, y = x * np.float32(0.05) + np.float32(1000.0), y * np.float32(0.05) + np.float32(1000.0)
    eps = 0.002**p
    assert rel_err(run_softmin(x, y, h, eps, p), ref_softmin(x, y, h, eps, p)) < 1e-4
    assert rel_err(run_grad(x, y, h, eps, p), ref_grad(x, y, h, eps, p)) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_max_grows_across_blocks(rng, dtype):
    """Several column blocks, the best column last: the partial sums get rescaled."""
    M = 3 * nk._BLOCK + 77
    x, y, h = make(rng, 1, 12, M, 3, dtype)
    h[0] = np.linspace(-60.0, 0.0, M).astype(dtype)  # increasing log-weights
    for p in (1, 2):
        eps = 0.02**p
        out = run_softmin(x, y, h, eps, p)
        assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
        grad = run_grad(x, y, h, eps, p)
        assert rel_err(grad, ref_grad(x, y, h, eps, p)) < RTOL[dtype]
    v = rng.random((1, M)).astype(dtype)
    for kind in (nk.KERNEL_ENERGY, nk.KERNEL_GAUSSIAN, nk.KERNEL_LAPLACIAN):
        out = run_kernel_sum(x, y, v, kind, 0.05)
        assert rel_err(out, ref_kernel_sum(x, y, v, kind, 0.05)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_infinite_log_weights(rng, dtype):
    """-inf log-weights are zero weights; a row of them gives +inf (softmin) and 0 (grad)."""
    x, y, h = make(rng, 2, 10, 20, 3, dtype, zero_weights=False)
    h[0, ::2] = -np.inf
    h[1] = -np.inf
    out = run_softmin(x, y, h, 0.1, 2)
    assert rel_err(out[:1], ref_softmin(x[:1], y[:1], h[:1], 0.1, 2)) < RTOL[dtype]
    assert np.all(out[1] == np.inf)  # exact: every term is exp(-inf) = 0
    grad = run_grad(x, y, h, 0.1, 2)
    assert np.all(grad[1] == 0)
    assert rel_err(grad[:1], ref_grad(x[:1], y[:1], h[:1], 0.1, 2)) < RTOL[dtype]


def test_non_contiguous_arrays(rng):
    """Strided views work (copied to C order: the compiled engine is reused)."""
    x, y, h = make(rng, 2, 60, 90, 6, np.float64)
    xs, ys, hs = x[:, ::2, ::2], y[:, ::3, 1::2], h[:, ::3]
    assert not (xs.flags.c_contiguous or ys.flags.c_contiguous or hs.flags.c_contiguous)
    out = np.full((2, 60), np.nan)[:, ::2]
    engines = len(nk._engine.signatures)
    nk.softmin(xs, ys, hs, 0.05, 2, out)
    assert rel_err(out, ref_softmin(xs, ys, hs, 0.05, 2)) < RTOL[np.float64]
    assert len(nk._engine.signatures) == engines


def test_empty_sets(rng):
    x, y, h = make(rng, 1, 4, 6, 2, np.float64)
    # Exact: an empty sum gives the +inf / 0 of the kernels' initial values.
    assert np.all(run_softmin(x, y[:, :0], h[:, :0], 0.1, 2) == np.inf)
    assert np.all(run_grad(x, y[:, :0], h[:, :0], 0.1, 2) == 0)
    assert run_softmin(x[:, :0], y, h, 0.1, 2).shape == (1, 0)


# --------------------------------------------------------------------------------------
# Errors and module hygiene
# --------------------------------------------------------------------------------------


def test_bad_arguments_raise(rng):
    x, y, h = make(rng, 1, 4, 6, 2, np.float64)
    out = np.empty((1, 4))
    with pytest.raises(ValueError, match="p must be"):
        nk.softmin(x, y, h, 0.1, 3, out)
    with pytest.raises(ValueError, match="eps must be"):
        nk.softmin(x, y, h, 0.0, 2, out)
    with pytest.raises(ValueError, match="h must be"):
        nk.softmin(x, y, h[:, :5], 0.1, 2, out)
    with pytest.raises(ValueError, match=r"\(B, N, D\) and \(B, M, D\)"):
        nk.softmin(x, y[..., :1], h, 0.1, 2, out)
    with pytest.raises(ValueError, match="out must be"):
        nk.softmin(x, y, h, 0.1, 2, np.empty((1, 5)))
    with pytest.raises(ValueError, match="v must be"):
        nk.softmax_weighted_sum(x, y, h, 0.1, 2, y[:, :5], np.empty((1, 4, 2)))
    with pytest.raises(ValueError, match="kind must be"):
        nk.kernel_sum(x, y, h, 7, 1.0, out)
    with pytest.raises(ValueError, match="scale must be"):
        nk.kernel_sum(x, y, h, nk.KERNEL_GAUSSIAN, 0.0, out)


def test_mixed_or_unsupported_dtypes_raise(rng):
    x, y, h = make(rng, 1, 4, 6, 2, np.float64)
    out = np.zeros((1, 4))
    with pytest.raises(TypeError, match="float32 or both float64"):
        nk.softmin(x.astype(np.float32), y, h, 0.1, 2, out)
    with pytest.raises(TypeError, match="float32 or both float64"):
        nk.softmin(x.astype(np.float16), y.astype(np.float16), h, 0.1, 2, out)
    with pytest.raises(TypeError, match="h must be"):
        nk.softmin(x, y, h.astype(np.float32), 0.1, 2, out)
    with pytest.raises(TypeError, match="out must be"):
        nk.softmin(x, y, h, 0.1, 2, out.astype(np.float32))
    with pytest.raises(TypeError, match="NumPy arrays"):
        nk.softmin(x.tolist(), y, h, 0.1, 2, out)


def test_module_imports_only_numpy_numba_math():
    tree = ast.parse(inspect.getsource(nk))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
            assert not any(alias.name.startswith("numba.cuda") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
            assert not node.module.startswith("numba.cuda")
    assert roots <= {"__future__", "math", "numpy", "numba"}
