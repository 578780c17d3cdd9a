"""The Numba CUDA kernels (``ot_agnostic.kernels.numba_cuda``), run by Numba's CUDA simulator.

Every reduction is compared with the dense float64 NumPy geometry of the pure Array API
backend, for ``p`` in {1, 2}, float32 and float64, ``B = 2``, ``D`` in {1, 2, 3, 5}, ``N``
not a multiple of the block, ``M`` below one tile and over several, with zero weights
(``LOG_ZERO``); then the hard cases: tiny ``eps``, rows of zero weights, coincident points,
far-apart clouds, a growing maximum, tiles narrower than the blocks, block-sparse ranges,
strided and empty inputs, bad arguments.

The simulator runs the kernels' Python code (``math.sqrt``/``math.exp`` in float64), so
float32 rounding is not reproduced exactly; the numbers, the tiling, the synchronisation
and the indexing are.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ot_agnostic._array_api import LOG_ZERO
from ot_agnostic.backends.array_api import DenseGeometry
from ot_agnostic.costs import Cost, Kernel
from ot_agnostic.kernels import numba_cuda as nk

DTYPES = (np.float32, np.float64)
#: Tolerances relative to the size of the reference (max |value|, or the largest norm).
RTOL = {np.float32: 1e-4, np.float64: 1e-10}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------
# References, data, calls
# --------------------------------------------------------------------------------------


def dense(x, y, p):
    """The float64 reference geometry."""
    return DenseGeometry(np.asarray(x, np.float64), np.asarray(y, np.float64), Cost(p), xp=np)


def ref_softmin(x, y, h, eps, p):
    return dense(x, y, p).softmin(eps, np.asarray(h, np.float64))


def ref_grad(x, y, h, eps, p):
    return dense(x, y, p).softmin_grad(eps, np.asarray(h, np.float64))


def ref_weighted_sum(x, y, h, eps, p, v):
    return dense(x, y, p).softmax_weighted_sum(eps, np.asarray(h, np.float64), np.asarray(v, np.float64))


KINDS = {nk.KERNEL_ENERGY: "energy", nk.KERNEL_GAUSSIAN: "gaussian", nk.KERNEL_LAPLACIAN: "laplacian"}


def ref_kernel_sum(x, y, v, kind, scale):
    kernel = Kernel(KINDS[kind], scale)
    return dense(x, y, kernel.cost.p).kernel_sum(kernel, np.asarray(v, np.float64))


def rel_err(out, ref):
    """Largest error relative to the largest reference value (vectors: to the largest norm)."""
    out = np.asarray(out, np.float64)
    if ref.ndim == 3:
        return np.max(np.linalg.norm(out - ref, axis=-1)) / np.max(np.linalg.norm(ref, axis=-1))
    return np.max(np.abs(out - ref)) / np.max(np.abs(ref))


def make(rng, B, N, M, D, dtype, *, zero_weights=True):
    x = rng.random((B, N, D)).astype(dtype)
    y = (rng.random((B, M, D)) * 0.8 + 0.1).astype(dtype)
    h = (-np.log(M) + rng.standard_normal((B, M))).astype(dtype)
    if zero_weights:
        h[:, 1::5] = LOG_ZERO
    return x, y, h


def run(kernel, shape, dtype, *args, **kw):
    """``kernel(*args, out, **kw)`` into a NaN-filled ``out``, returned."""
    out = np.full(shape, np.nan, dtype)
    assert kernel(*args, out, **kw) is None
    return out


def softmin(x, y, h, eps, p, **kw):
    return run(nk.softmin, x.shape[:2], x.dtype, x, y, h, eps, p, **kw)


def grad(x, y, h, eps, p, **kw):
    return run(nk.softmin_grad, x.shape, x.dtype, x, y, h, eps, p, **kw)


def weighted_sum(x, y, h, eps, p, v, **kw):
    return run(nk.softmax_weighted_sum, x.shape[:2] + v.shape[2:], x.dtype, x, y, h, eps, p, v, **kw)


def kernel_sum(x, y, v, kind, scale, **kw):
    return run(nk.kernel_sum, x.shape[:2], x.dtype, x, y, v, kind, scale, **kw)


# --------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------

#: N = 13 rows: two blocks of 8, the second one partial. M = 21 columns: three tiles, the
#: last one partial; M = 5: less than one tile.
GRID = [
    pytest.param(dtype, p, D, M, id=f"{dtype.__name__}-p{p}-D{D}-M{M}")
    for dtype in DTYPES
    for p in (1, 2)
    for D, M in ((1, 21), (2, 5), (3, 21), (5, 5))
]


@pytest.mark.parametrize("dtype, p, D, M", GRID)
def test_reductions_match_dense(rng, dtype, p, D, M):
    x, y, h = make(rng, 2, 13, M, D, dtype)
    v = rng.standard_normal((2, M, 3)).astype(dtype)
    eps = 0.1**p
    out = softmin(x, y, h, eps, p)
    assert out.dtype == dtype
    assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
    assert rel_err(grad(x, y, h, eps, p), ref_grad(x, y, h, eps, p)) < RTOL[dtype]
    assert rel_err(weighted_sum(x, y, h, eps, p, v), ref_weighted_sum(x, y, h, eps, p, v)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS.values()))
def test_kernel_sum_matches_dense(rng, dtype, kind):
    x, y, _ = make(rng, 2, 11, 19, 3, dtype)
    v = rng.random((2, 19)).astype(dtype)  # positive: no cancellation in the sum
    out = kernel_sum(x, y, v, kind, 0.3)
    assert out.dtype == dtype
    assert rel_err(out, ref_kernel_sum(x, y, v, kind, 0.3)) < RTOL[dtype]


# --------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_tiny_eps_is_finite_and_correct(rng, dtype, p):
    x, y, h = make(rng, 2, 9, 17, 3, dtype)
    for eps in (1e-6, 1e-8):
        out = softmin(x, y, h, eps, p)
        assert np.all(np.isfinite(out))
        assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
        g = grad(x, y, h, eps, p)
        assert np.all(np.isfinite(g))
        assert rel_err(g, ref_grad(x, y, h, eps, p)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_zero_weights_drop_out(rng, dtype):
    """LOG_ZERO columns never dominate, even next to tiny eps; -inf rows give +inf and 0."""
    x, y, h = make(rng, 2, 10, 12, 2, dtype, zero_weights=False)
    y[:, :6] = x[:, :6]  # zero-weight columns right on top of rows 0-5
    h[:, :6] = LOG_ZERO
    for eps in (1e-8, 0.1):
        keep = slice(6, None)
        expected = ref_softmin(x, y[:, keep], h[:, keep], eps, 2)
        assert rel_err(softmin(x, y, h, eps, 2), expected) < RTOL[dtype]
        expected = ref_grad(x, y[:, keep], h[:, keep], eps, 1)
        assert rel_err(grad(x, y, h, eps, 1), expected) < RTOL[dtype]
    # A row of zero weights: finite (huge), as in the reference.
    h[1] = LOG_ZERO
    out = softmin(x, y, h, 0.1, 2)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_softmin(x, y, h, 0.1, 2)) < RTOL[dtype]
    # -inf log-weights: a row of them gives +inf (softmin) and zeros (weighted sums).
    h[1] = -np.inf
    h[0, ::2] = -np.inf
    out = softmin(x, y, h, 0.1, 2)
    assert np.all(out[1] == np.inf)  # exact (and g[1] == 0 below): every term is exp(-inf) = 0
    assert rel_err(out[:1], ref_softmin(x[:1], y[:1], h[:1], 0.1, 2)) < RTOL[dtype]
    g = grad(x, y, h, 0.1, 2)
    assert np.all(g[1] == 0)
    assert rel_err(g[:1], ref_grad(x[:1], y[:1], h[:1], 0.1, 2)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_coincident_points(rng, dtype, p):
    """x_i = y_i: zero costs, and for p = 1 the coincident point contributes no gradient."""
    x = rng.random((2, 11, 3)).astype(dtype)
    h = np.full((2, 11), -np.log(11), dtype)
    eps = 0.01**p
    assert rel_err(softmin(x, x, h, eps, p), ref_softmin(x, x, h, eps, p)) < RTOL[dtype]
    g = grad(x, x, h, eps, p)
    assert np.all(np.isfinite(g))  # ~0: each row's weight sits on its own point
    assert np.max(np.abs(g - ref_grad(x, x, h, eps, p))) < RTOL[dtype]
    # A single point on top of x: zero cost, zero gradient. Exact: x - x is 0, and one
    # term of log-weight 0 gives -eps * log(exp(0)) = 0 in any order of operations.
    one = x[:, :1].copy()
    assert np.all(softmin(one, one, np.zeros((2, 1), dtype), eps, p) == 0)
    assert np.all(grad(one, one, np.zeros((2, 1), dtype), eps, p) == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_far_apart_clouds_underflow_without_the_shift(rng, dtype, p):
    x, y, h = make(rng, 1, 9, 13, 2, dtype)
    y = y + dtype(300.0)
    eps = 0.01**p
    out = softmin(x, y, h, eps, p)
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
    assert rel_err(weighted_sum(x, y, h, eps, p, y), ref_weighted_sum(x, y, h, eps, p, y)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_max_grows_across_tiles(rng, dtype):
    """Increasing log-weights over five tiles: the running sums get rescaled again and again."""
    x, y, h = make(rng, 1, 5, 37, 3, dtype)
    h[0] = np.linspace(-60.0, 0.0, 37).astype(dtype)
    for p in (1, 2):
        eps = 0.02**p
        assert rel_err(softmin(x, y, h, eps, p), ref_softmin(x, y, h, eps, p)) < RTOL[dtype]
        assert rel_err(grad(x, y, h, eps, p), ref_grad(x, y, h, eps, p)) < RTOL[dtype]


def test_tiles_narrower_than_blocks(rng, monkeypatch):
    """Little shared memory: tiles of 3 (2) columns for blocks of 8 rows."""
    monkeypatch.setattr(nk, "SHARED_BYTES", 3 * (3 + 1 + 1) * 8)
    assert nk._tile_columns(3, 1, 8, 8) == 3 and nk._tile_columns(3, 2, 8, 8) == 2
    x, y, h = make(rng, 2, 10, 11, 3, np.float64)
    v = rng.standard_normal((2, 11, 2))
    assert rel_err(softmin(x, y, h, 0.1, 2), ref_softmin(x, y, h, 0.1, 2)) < 1e-10
    assert rel_err(weighted_sum(x, y, h, 0.1, 1, v), ref_weighted_sum(x, y, h, 0.1, 1, v)) < 1e-10


# --------------------------------------------------------------------------------------
# Block-sparse ranges, layouts, empty sets
# --------------------------------------------------------------------------------------


def test_block_sparse_ranges_match_masked_dense(rng):
    """Row block k reduces over its column ranges only: dense with the other weights zeroed."""
    N, M, rows = 20, 30, nk.ROWS_PER_BLOCK  # three row blocks of 8
    assert rows == 8
    x, y, h = make(rng, 2, N, M, 2, np.float64, zero_weights=False)
    v = rng.random((2, M))
    blocks = [[(0, 10), (20, 25)], [(5, 30)], []]
    row_ptr = np.cumsum([0] + [len(b) for b in blocks]).astype(np.int32)
    col_ranges = np.array([r for b in blocks for r in b], dtype=np.int32)
    ranges = (row_ptr, col_ranges)
    out = softmin(x, y, h, 0.1, 2, ranges=ranges)
    g = grad(x, y, h, 0.1, 1, ranges=ranges)
    k = kernel_sum(x, y, v, nk.KERNEL_ENERGY, 1.0, ranges=ranges)
    for block, cols in enumerate(blocks):
        sel = slice(block * rows, (block + 1) * rows)
        mask = np.zeros(M, bool)
        for start, stop in cols:
            mask[start:stop] = True
        if not mask.any():  # exact: an empty sum gives the kernels' initial +inf / 0
            assert np.all(out[:, sel] == np.inf) and np.all(g[:, sel] == 0) and np.all(k[:, sel] == 0)
            continue
        hm = np.where(mask, h, -np.inf)
        xr = x[:, sel]
        assert rel_err(out[:, sel], ref_softmin(xr, y, hm, 0.1, 2)) < 1e-10
        assert rel_err(g[:, sel], ref_grad(xr, y, hm, 0.1, 1)) < 1e-10
        assert rel_err(k[:, sel], ref_kernel_sum(xr, y, v * mask, nk.KERNEL_ENERGY, 1.0)) < 1e-10
    with pytest.raises(ValueError, match="row_ptr of shape"):
        softmin(x, y, h, 0.1, 2, ranges=(row_ptr[:-1], col_ranges))


def test_strided_inputs_and_output(rng):
    x, y, h = make(rng, 2, 22, 30, 6, np.float64)
    xs, ys, hs = x[:, ::2, ::2], y[:, ::3, 1::2], h[:, ::3]
    assert not (xs.flags.c_contiguous or ys.flags.c_contiguous or hs.flags.c_contiguous)
    out = np.full((2, 22), np.nan)[:, ::2]
    nk.softmin(xs, ys, hs, 0.05, 2, out)
    assert rel_err(out, ref_softmin(xs, ys, hs, 0.05, 2)) < 1e-10


def test_empty_sets(rng):
    x, y, h = make(rng, 1, 4, 6, 2, np.float64)
    # Exact: an empty sum gives the kernels' initial values, +inf (softmin) and 0 (sums).
    assert np.all(softmin(x, y[:, :0], h[:, :0], 0.1, 2) == np.inf)
    assert np.all(grad(x, y[:, :0], h[:, :0], 0.1, 2) == 0)
    assert np.all(kernel_sum(x, y[:, :0], h[:, :0], nk.KERNEL_GAUSSIAN, 1.0) == 0)
    assert softmin(x[:, :0], y, h, 0.1, 2).shape == (1, 0)


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
    with pytest.raises(ValueError, match="1 to 64 coordinates"):
        wide = np.zeros((1, 4, 65))
        nk.softmin(wide, wide, np.zeros((1, 4)), 0.1, 2, out)
    with pytest.raises(ValueError, match="v must be"):
        nk.softmax_weighted_sum(x, y, h, 0.1, 2, np.zeros((1, 6, 65)), np.empty((1, 4, 65)))
    with pytest.raises(ValueError, match="kind must be"):
        nk.kernel_sum(x, y, h, 7, 1.0, out)
    with pytest.raises(ValueError, match="scale must be"):
        nk.kernel_sum(x, y, h, nk.KERNEL_GAUSSIAN, 0.0, out)
    with pytest.raises(TypeError, match="float32 or both float64"):
        nk.softmin(x.astype(np.float32), y, h, 0.1, 2, out)
    with pytest.raises(TypeError, match="float32 or both float64"):
        nk.softmin(x.astype(np.float16), y.astype(np.float16), h, 0.1, 2, out)
    with pytest.raises(TypeError, match="h must be"):
        nk.softmin(x, y, h.astype(np.float32), 0.1, 2, out)
    with pytest.raises(TypeError, match="CUDA array"):
        nk.softmin(x, y, h.tolist(), 0.1, 2, out)
    with pytest.raises(TypeError, match="x must be a CUDA array"):
        nk.softmin(x.tolist(), y, h, 0.1, 2, out)
    with pytest.raises(ValueError, match="65535 batch entries"):
        many = np.zeros((65536, 1, 1))
        nk.softmin(many, many, np.zeros((65536, 1)), 0.1, 2, np.empty((65536, 1)))


def test_module_imports_only_numpy_math_functools():
    tree = ast.parse(inspect.getsource(nk))
    top = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert top <= {"__future__", "functools", "math", "numpy"}


def test_importing_the_plugin_loads_no_cuda():
    """The plugin module and the kernel module import neither numba nor numba.cuda."""
    code = (
        "import json, sys\n"
        "import ot_agnostic.backends.numba_cuda, ot_agnostic.kernels.numba_cuda\n"
        "print(json.dumps(sorted(m for m in ('numba', 'numba.cuda', 'cupy') if m in sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
