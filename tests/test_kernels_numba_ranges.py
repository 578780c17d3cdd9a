"""The block-sparse ("ranges") Numba CPU kernels against masked dense float64 references.

Points are sorted by cluster; the rows of cluster ``I`` reduce over the column ranges
``col_ranges[col_ptr[I]:col_ptr[I + 1]]`` only. Each kernel is compared with a NumPy/SciPy
computation on the full cost matrix where the dropped pairs get a ``-inf`` log-weight, for
random cluster partitions (clusters of one point, sizes that are not multiples of
``_PAD``, one big cluster), random keep patterns (a row cluster that keeps nothing,
arbitrary ranges that overlap from one row cluster to the next, everything kept), ``p`` in
{1, 2}, ``D`` in {1, 2, 3, 5}, float32 and float64, ``B`` in {1, 2}.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
special = pytest.importorskip("scipy.special")

from ot_agnostic.kernels import numba_cpu as nk  # noqa: E402

DTYPES = (np.float32, np.float64)
#: Tolerances relative to the largest reference value (vectors: the largest norm).
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
ZERO = -1e30  # a zero weight


# --------------------------------------------------------------------------------------
# Patterns and masked dense references
# --------------------------------------------------------------------------------------


def partition(rng, n, big=False):
    """Consecutive ``[start, stop)`` ranges covering ``[0, n)``, of mixed sizes."""
    if big:  # one big cluster between small ones
        cuts = [0, 1, 4, n - 2, n]
    else:
        sizes = rng.choice([1, 1, 2, 5, 13, 31, 64, 70], size=n)
        cuts = np.concatenate(([0], np.cumsum(sizes)))
        cuts = np.append(cuts[cuts < n], n)
    cuts = np.unique(np.clip(cuts, 0, n))
    return np.stack([cuts[:-1], cuts[1:]], axis=1).astype(np.int64)


def pattern(rng, rows, M, style):
    """``col_ptr``, ``col_ranges`` for the row clusters ``rows``.

    ``clusters``: whole column clusters kept at random (touching ranges included);
    ``random``: random sorted disjoint ranges per row cluster; ``all``: every column of
    every row cluster, in several touching ranges. Row cluster 0 keeps nothing, except for
    ``all``.
    """
    cols = partition(rng, M)
    lists = []
    for I in range(len(rows)):
        if style == "all":
            ranges = cols
        elif I == 0:
            ranges = np.zeros((0, 2), np.int64)
        elif style == "clusters":
            ranges = cols[rng.random(len(cols)) < 0.4]
        else:
            cuts = np.unique(rng.integers(0, M + 1, size=2 * rng.integers(1, 6)))
            if len(cuts) % 2:
                cuts = cuts[:-1]
            ranges = cuts.reshape(-1, 2)
        lists.append(ranges)
    col_ptr = np.concatenate(([0], np.cumsum([len(r) for r in lists]))).astype(np.int64)
    return col_ptr, np.concatenate(lists).reshape(-1, 2).astype(np.int64)


def mask(row_ranges, col_ptr, col_ranges, N, M):
    keep = np.zeros((N, M), bool)
    for I, (r0, r1) in enumerate(row_ranges):
        for c0, c1 in col_ranges[col_ptr[I] : col_ptr[I + 1]]:
            keep[r0:r1, c0:c1] = True
    return keep


def ref_logits(x, y, h, eps, p, keep):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cost = np.sqrt(((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)) ** p / p
    logits = np.asarray(h, np.float64)[:, None, :] - cost / eps
    return np.where(keep, logits, -np.inf)


def ref_softmin(x, y, h, eps, p, keep):
    with np.errstate(divide="ignore"):
        return -eps * special.logsumexp(ref_logits(x, y, h, eps, p, keep), axis=2)


def ref_weights(x, y, h, eps, p, keep):
    """Softmax over the kept columns, zeros for a row without any."""
    logits = ref_logits(x, y, h, eps, p, keep)
    top = logits.max(axis=2, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(axis=2, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def ref_grad(x, y, h, eps, p, keep):
    diff = np.asarray(x, np.float64)[:, :, None, :] - np.asarray(y, np.float64)[:, None, :, :]
    if p == 1:
        norm = np.sqrt((diff**2).sum(-1, keepdims=True))
        diff = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
    return (ref_weights(x, y, h, eps, p, keep)[..., None] * diff).sum(2)


def ref_weighted_sum(x, y, h, eps, p, v, keep):
    return ref_weights(x, y, h, eps, p, keep) @ np.asarray(v, np.float64)


def check(out, ref, rtol):
    """Same infinities; finite values within ``rtol`` of the largest one (vectors: norms)."""
    out = np.asarray(out, np.float64)
    assert np.array_equal(np.isinf(out), np.isinf(ref)) and not np.any(np.isnan(out))
    fin = np.isfinite(ref)
    if ref.ndim == 3:
        err = np.linalg.norm(out - ref, axis=-1).max(initial=0.0)
        scale = np.linalg.norm(ref, axis=-1).max(initial=0.0)
    else:
        err = np.abs(out[fin] - ref[fin]).max(initial=0.0)
        scale = np.abs(ref[fin]).max(initial=0.0)
    assert err <= rtol * scale, (err, scale)


# --------------------------------------------------------------------------------------
# Data and calls
# --------------------------------------------------------------------------------------


def make(rng, B, N, M, D, dtype):
    x = rng.random((B, N, D)).astype(dtype)
    y = (rng.random((B, M, D)) * 0.8 + 0.1).astype(dtype)
    h = (-np.log(M) + rng.standard_normal((B, M))).astype(dtype)
    return x, y, h


def run_softmin(x, y, h, eps, p, sparsity):
    out = np.full(x.shape[:2], np.nan, x.dtype)
    assert nk.softmin_ranges(x, y, h, float(eps), int(p), *sparsity, out) is None
    return out


def run_grad(x, y, h, eps, p, sparsity):
    out = np.full(x.shape, np.nan, x.dtype)
    nk.softmin_grad_ranges(x, y, h, float(eps), int(p), *sparsity, out)
    return out


def run_weighted_sum(x, y, h, eps, p, v, sparsity):
    out = np.full(x.shape[:2] + v.shape[2:], np.nan, x.dtype)
    nk.softmax_weighted_sum_ranges(x, y, h, float(eps), int(p), v, *sparsity, out)
    return out


def check_all(rng, x, y, h, eps, p, sparsity, rtol):
    """The three kernels against their references; returns the softmin."""
    B, N, _ = x.shape
    M = y.shape[1]
    keep = mask(*sparsity, N, M)
    out = run_softmin(x, y, h, eps, p, sparsity)
    assert out.dtype == x.dtype
    check(out, ref_softmin(x, y, h, eps, p, keep), rtol)
    check(run_grad(x, y, h, eps, p, sparsity), ref_grad(x, y, h, eps, p, keep), rtol)
    v = rng.standard_normal((B, M, 3)).astype(x.dtype)
    tmap = run_weighted_sum(x, y, h, eps, p, v, sparsity)
    check(tmap, ref_weighted_sum(x, y, h, eps, p, v, keep), rtol)
    return out


# --------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------

GRID = [
    pytest.param(dtype, p, D, B, id=f"{dtype.__name__}-p{p}-D{D}-B{B}")
    for dtype in DTYPES
    for p in (1, 2)
    for D in (1, 2, 3, 5)
    for B in (1, 2)
]


@pytest.mark.parametrize("dtype, p, D, B", GRID)
def test_ranges_match_masked_dense(rng, dtype, p, D, B):
    N, M = 101, 157
    x, y, h = make(rng, B, N, M, D, dtype)
    eps = 0.1**p
    for big, style in ((False, "clusters"), (False, "random"), (True, "random"), (False, "all")):
        rows = partition(rng, N, big)
        check_all(rng, x, y, h, eps, p, (rows, *pattern(rng, rows, M, style)), RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_everything_kept_is_the_dense_kernel(rng, dtype):
    """One range [0, M) per row cluster: the dense layout and sums, to a few ulp; touching
    ranges (a padded layout): the dense kernel to rounding.

    Not bit for bit: under load, Numba's parallel threads may split and order the sums of
    the 150 terms differently from one call to the next (float32: seen 1 ulp off on 2 of
    140 values). ``ULP_RTOL`` (relative to the largest value, as in ``check``) is about
    8 ulp in float32 and 90 ulp in float64: far below any layout or indexing error.
    """
    ULP_RTOL = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    N, M = 70, 150
    x, y, h = make(rng, 2, N, M, 3, dtype)
    v = rng.standard_normal((2, M, 2)).astype(dtype)
    rows = partition(rng, N)
    whole = (rows, np.arange(len(rows) + 1), np.tile([[0, M]], (len(rows), 1)))
    pieces = (rows, *pattern(rng, rows, M, "all"))
    for p in (1, 2):
        dense = np.empty((2, N), dtype)
        nk.softmin(x, y, h, 0.05, p, dense)
        check(run_softmin(x, y, h, 0.05, p, whole), dense.astype(np.float64), ULP_RTOL)
        np.testing.assert_allclose(run_softmin(x, y, h, 0.05, p, pieces), dense, rtol=RTOL[dtype])
        dense = np.empty((2, N, 3), dtype)
        nk.softmin_grad(x, y, h, 0.05, p, dense)
        check(run_grad(x, y, h, 0.05, p, whole), dense.astype(np.float64), ULP_RTOL)
        dense = np.empty((2, N, 2), dtype)
        nk.softmax_weighted_sum(x, y, h, 0.05, p, v, dense)
        check(run_weighted_sum(x, y, h, 0.05, p, v, whole), dense.astype(np.float64), ULP_RTOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_parallel_and_long_ranges(rng, dtype):
    """Enough pairs for the threads; ranges longer than a block; the maximum grows (then
    shrinks) from one range to the next, so the running sums are rescaled."""
    N, M = 600, 2 * nk._BLOCK + 150
    x, y, h = make(rng, 1, N, M, 2, dtype)
    rows = partition(rng, N)
    sparsity = (rows, *pattern(rng, rows, M, "random"))
    assert nk._blocks(*sparsity, N, M)[0][3] >= nk._SERIAL_PAIRS  # the parallel path
    for ramp in (np.linspace(-60.0, 0.0, M), np.linspace(0.0, -60.0, M)):
        h[0] = ramp.astype(dtype)
        for p in (1, 2):
            check_all(rng, x, y, h, 0.02**p, p, sparsity, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("p", [1, 2])
def test_tiny_eps_is_finite_and_correct(rng, dtype, p):
    N, M = 60, 90
    x, y, h = make(rng, 2, N, M, 3, dtype)
    rows = partition(rng, N)
    sparsity = (rows, *pattern(rng, rows, M, "random"))
    out = check_all(rng, x, y, h, 1e-6, p, sparsity, RTOL[dtype])
    kept = mask(*sparsity, N, M).any(axis=1)
    # == inf is exact: rows that keep no column reduce over nothing.
    assert np.all(np.isfinite(out[:, kept])) and np.all(out[:, ~kept] == np.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_zero_weights_drop_out(rng, dtype):
    """``h = -1e30`` is a zero weight: the same results as without these columns."""
    N, M = 60, 120
    x, y, h = make(rng, 2, N, M, 3, dtype)
    rows = partition(rng, N)
    sparsity = (rows, *pattern(rng, rows, M, "clusters"))
    zero = rng.random(M) < 0.3
    h[:, zero] = ZERO
    keep = mask(*sparsity, N, M)
    dropped = keep & ~zero
    live = dropped.any(axis=1)  # rows with a kept nonzero weight
    out = run_softmin(x, y, h, 0.01, 2, sparsity)
    check(out[:, live], ref_softmin(x, y, h, 0.01, 2, dropped)[:, live], RTOL[dtype])
    grad = run_grad(x, y, h, 0.01, 2, sparsity)
    check(grad[:, live], ref_grad(x, y, h, 0.01, 2, dropped)[:, live], RTOL[dtype])


def test_no_pairs_at_all(rng):
    x, y, h = make(rng, 1, 5, 8, 2, np.float64)
    rows = np.array([[0, 2], [2, 5]])
    sparsity = (rows, np.zeros(3, np.int64), np.zeros((0, 2), np.int64))
    # Exact by construction: an empty sum gives the +inf / 0 of the kernels' initial values.
    assert np.all(run_softmin(x, y, h, 0.1, 2, sparsity) == np.inf)
    assert np.all(run_grad(x, y, h, 0.1, 2, sparsity) == 0)
    empty = (np.zeros((0, 2), np.int64), np.zeros(1, np.int64), np.zeros((0, 2), np.int64))
    assert run_softmin(x[:, :0], y, h, 0.1, 2, empty).shape == (1, 0)


def test_layout_pads_segments_and_merges_touching_ranges():
    rows = np.array([[0, 3], [3, 4]])
    col_ptr = np.array([0, 2, 4])
    col_ranges = np.array([[0, 10], [10, 100], [5, 10], [100, 130]])
    (row_stop, ptr, span, pairs), (pos, Mp) = nk._blocks(rows, col_ptr, col_ranges, 4, 130)
    # Segments [0, 5) [5, 10) [10, 100) [100, 130) padded to 64, 64, 128, 64 columns.
    assert Mp == 64 + 64 + 128 + 64
    assert pos[[0, 4, 5, 9, 10, 99, 100, 129]].tolist() == [0, 4, 64, 68, 128, 217, 256, 285]
    assert row_stop.tolist() == [3, 4] and ptr.tolist() == [0, 1, 3]
    assert span.tolist() == [[0, 256], [64, 128], [256, 320]]
    assert pairs == 3 * 256 + 1 * 128


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_bad_sparsity_raises(rng):
    x, y, h = make(rng, 1, 10, 20, 2, np.float64)
    out = np.empty((1, 10))
    rows = np.array([[0, 4], [4, 10]])
    ptr, cols = np.array([0, 1, 2]), np.array([[0, 5], [3, 20]])

    def call(rows=rows, ptr=ptr, cols=cols):
        nk.softmin_ranges(x, y, h, 0.1, 2, rows, ptr, cols, out)

    call()  # valid
    for bad in ([[0, 4], [4, 9]], [[0, 4], [5, 10]], [[0, 4], [4, 4], [4, 10]], [[1, 4], [4, 10]]):
        with pytest.raises(ValueError, match=r"row_ranges must cut \[0, N\) = \[0, 10\)"):
            call(rows=np.array(bad), ptr=np.arange(len(bad) + 1))
    with pytest.raises(ValueError, match=r"row_ranges must be a \(Kx, 2\)"):
        call(rows=np.array([0, 10]))
    with pytest.raises(ValueError, match=r"col_ptr must be a \(Kx \+ 1,\) = \(3,\)"):
        call(ptr=np.array([0, 2]))
    for bad in ([0, 2, 1], [1, 1, 2], [0, 1, 1]):
        with pytest.raises(ValueError, match="col_ptr must be non-decreasing"):
            call(ptr=np.array(bad))
    for bad in ([[0, 5], [3, 21]], [[-1, 5], [3, 20]], [[0, 5], [3, 3]]):
        with pytest.raises(ValueError, match=r"within \[0, M\) = \[0, 20\)"):
            call(cols=np.array(bad))
    with pytest.raises(ValueError, match="sorted and must not overlap"):
        call(ptr=np.array([0, 2, 2]), cols=np.array([[0, 5], [3, 20]]))
    with pytest.raises(ValueError, match="sorted and must not overlap"):
        call(ptr=np.array([0, 2, 2]), cols=np.array([[6, 9], [0, 5]]))
    with pytest.raises(TypeError, match="row_ranges must be an integer"):
        call(rows=rows.astype(np.float64))
    with pytest.raises(TypeError, match="col_ranges must be an integer"):
        call(cols=cols.tolist())
    with pytest.raises(TypeError, match="float32 or both float64"):
        nk.softmin_ranges(x.astype(np.float32), y, h, 0.1, 2, rows, ptr, cols, out)
    with pytest.raises(TypeError, match="out must be"):
        nk.softmin_ranges(x, y, h, 0.1, 2, rows, ptr, cols, out.astype(np.float32))
    with pytest.raises(ValueError, match="h must be"):
        nk.softmin_ranges(x, y, h[:, :5], 0.1, 2, rows, ptr, cols, out)
    with pytest.raises(ValueError, match="p must be"):
        nk.softmin_grad_ranges(x, y, h, 0.1, 3, rows, ptr, cols, np.empty((1, 10, 2)))
    with pytest.raises(ValueError, match="v must be"):
        nk.softmax_weighted_sum_ranges(x, y, h, 0.1, 2, y[:, :5], rows, ptr, cols, out[..., None])
