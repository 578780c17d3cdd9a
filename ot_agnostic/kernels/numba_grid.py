"""Numba CPU kernels for regular grids: the 1-D log-domain Gaussian convolution of a line.

On a grid the cost is separable, ``C(x_i, y_j) = sum_k (x^k_i - y^k_j)**2 / 2``, so the
softmin ``-eps log sum_j exp(h_j - C_ij / eps)`` is one 1-D pass per axis:

    out[l, i] = log sum_j exp(h[l, j] - kappa (x_i - y_j)**2),    kappa = 1 / (2 eps),

over the lines ``l`` of the array with that axis last, ``x_i = x0 + i dx`` (``m`` outputs)
and ``y_j = y0 + j dy`` (``n`` inputs). Everything is computed in base 2 with the
vectorised ``2**u`` of :mod:`ot_agnostic.kernels.numba_cpu` (callers pass
``log2(e)``-scaled inputs and get base-2 logarithms back), the maximum subtracted first,
so any ``eps`` is safe. A log-weight below ``-1e29`` (an empty voxel) contributes 0.

**Banding, exact to a stated precision.** Per line, a quadratic ``q(y)`` is fitted to ``h``
by least squares (over its non-empty entries) and ``r_j = h_j - q(y_j)``. Then
``h_j - kappa (x_i - y_j)**2 = r_j - K (y_j - mu_i)**2 + c_i``: a Gaussian in ``y`` centred at
``mu_i`` (``K >= kappa / 4`` by construction) times ``2**r_j``. With ``j0`` the non-empty
entry nearest to ``mu_i``, a block of ``_BLOCK`` entries whose largest residual ``r_max``
satisfies ``r_max - K dist(mu_i, block)**2 < r_j0 - K (y_j0 - mu_i)**2 - cutoff`` holds only
terms below ``2**-cutoff`` times the term ``j0``, hence times the largest one; the search
walks out from ``mu_i`` block by block and stops where the running maximum of ``r_max``
over all the blocks beyond passes that test, so everything skipped is negligible. The
``n`` skipped terms change the sum by less than ``n 2**-cutoff`` relatively; ``cutoff``
(:func:`cutoff_bits`) makes that smaller than the dtype's rounding. When ``h`` is nearly
quadratic along the line (translations and dilations of smooth densities) a line costs
``O(sqrt(eps) / dy)`` per output instead of ``O(n)``; in the worst case the band is the
whole line and the pass is the exact ``O(m n)`` one.

This module imports nothing from ``ot_agnostic`` outside :mod:`ot_agnostic.kernels`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_cpu import _FASTMATH, _as, _exp2m, _fadd, _fmax, _wide_vectors

__all__ = ["log2_gauss_lines", "cutoff_bits"]

#: Base-2 log-weights below this are empty voxels (``log2(e) * LOG_ZERO`` is about -1.4e30).
EMPTY = -1e29


def cutoff_bits(dtype, n: int) -> float:
    """The base-2 cutoff of the band: ``n`` terms below ``2**-cutoff`` are below rounding."""
    mantissa = 24 if np.dtype(dtype) == np.float32 else 53
    return float(mantissa + 2 + math.log2(max(n, 1)))


@njit(fastmath=_FASTMATH, cache=True)
def _fit(line, n):
    """``(beta0, beta1, beta2, count)``: the least-squares quadratic ``beta0 + beta1 u + beta2 u**2``
    in ``u = (j - (n - 1) / 2) / n`` through the ``count`` non-empty entries of ``line``."""
    s0 = s1 = s2 = s3 = s4 = 0.0
    t0 = t1 = t2 = 0.0
    count = 0
    centre = 0.5 * (n - 1)
    for j in range(n):
        v = float(line[j])
        if v > EMPTY:
            u = (j - centre) / n
            u2 = u * u
            s0 += 1.0
            s1 += u
            s2 += u2
            s3 += u2 * u
            s4 += u2 * u2
            t0 += v
            t1 += v * u
            t2 += v * u2
            count += 1
    b0 = b1 = b2 = 0.0
    if count >= 3:
        # Cramer's rule on the 3 x 3 normal equations [[s0 s1 s2] [s1 s2 s3] [s2 s3 s4]]
        det = s0 * (s2 * s4 - s3 * s3) - s1 * (s1 * s4 - s3 * s2) + s2 * (s1 * s3 - s2 * s2)
        if abs(det) > 1e-12 * (s0 * s2 * s4 + 1e-300):
            b0 = (t0 * (s2 * s4 - s3 * s3) - s1 * (t1 * s4 - s3 * t2) + s2 * (t1 * s3 - s2 * t2)) / det
            b1 = (s0 * (t1 * s4 - s3 * t2) - t0 * (s1 * s4 - s3 * s2) + s2 * (s1 * t2 - t1 * s2)) / det
            b2 = (s0 * (s2 * t2 - t1 * s3) - s1 * (s1 * t2 - t1 * s2) + t0 * (s1 * s3 - s2 * s2)) / det
    elif count > 0:
        b0 = t0 / count
    return b0, b1, b2, count


#: Entries per block of the band search (block maxima of the residual bound whole blocks).
_BLOCK = 16


@njit(fastmath=_FASTMATH, cache=True)
def _residuals(line, n, b0, b1, b2, residual, nearest_left, nearest_right, block_max):
    """Fill ``residual = line - q`` (``-inf`` where empty), the nearest non-empty entry on
    each side of every index (-1: none) and the maximum residual of every block."""
    last = -1
    for j in range(n):
        v = float(line[j])
        if v > EMPTY:
            u = (j - 0.5 * (n - 1)) / n
            residual[j] = v - (b0 + b1 * u + b2 * u * u)
            last = j
        else:
            residual[j] = -np.inf
        nearest_left[j] = last
    last = -1
    for j in range(n - 1, -1, -1):
        if residual[j] > -np.inf:
            last = j
        nearest_right[j] = last
    for k in range(block_max.size):
        top = -np.inf
        for j in range(k * _BLOCK, min(n, (k + 1) * _BLOCK)):
            top = max(top, residual[j])
        block_max[k] = top


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gauss_lines(h2, x0, dx, m, y0, dy, kappa2, cutoff, ramp, out):
    """``out[l, i] = log2 sum_j 2**(h2[l, j] - kappa2 (x0 + i dx - y0 - j dy)**2)``, banded
    (``ramp[j] = j dy`` in the dtype of ``h2``)."""
    _wide_vectors()
    L, n = h2.shape
    blocks = (n + _BLOCK - 1) // _BLOCK
    for l in prange(L):
        line = h2[l]
        b0, b1, b2, count = _fit(line, n)
        if count == 0:
            for i in range(m):
                out[l, i] = line[0]
            continue
        scale = 1.0 / (n * dy)  # u = (y - yc) * scale
        yc = y0 + 0.5 * (n - 1) * dy
        # keep the Gaussian in y at least kappa / 4 wide: q(y)'s y**2 coefficient <= 3 kappa / 4
        b2 = min(b2, 0.75 * kappa2 / (scale * scale))
        width = kappa2 - b2 * scale * scale  # K
        slope = b1 * scale - 2.0 * b2 * scale * scale * yc  # q(y)'s y coefficient
        residual = np.empty(n, dtype=np.float64)
        nearest_left = np.empty(n, dtype=np.int64)
        nearest_right = np.empty(n, dtype=np.int64)
        block_max = np.empty(blocks, dtype=np.float64)
        terms = np.empty(n, dtype=line.dtype)
        curvature = _as(line, kappa2)
        _residuals(line, n, b0, b1, b2, residual, nearest_left, nearest_right, block_max)
        prefix_max = block_max.copy()  # max over blocks <= k
        suffix_max = block_max.copy()  # max over blocks >= k
        for k in range(1, blocks):
            prefix_max[k] = max(prefix_max[k], prefix_max[k - 1])
        for k in range(blocks - 2, -1, -1):
            suffix_max[k] = max(suffix_max[k], suffix_max[k + 1])
        for i in range(m):
            xi = x0 + i * dx
            mu = (slope + 2.0 * kappa2 * xi) / (2.0 * width)
            p = int(round(min(max((mu - y0) / dy, 0.0), n - 1.0)))
            left, right = nearest_left[p], nearest_right[p]
            if left < 0 or (right >= 0 and abs(y0 + right * dy - mu) < abs(y0 + left * dy - mu)):
                j0 = right
            else:
                j0 = left
            d0 = y0 + j0 * dy - mu
            # a term j is negligible once residual_max - K (y_j - mu)**2 < threshold
            threshold = residual[j0] - width * d0 * d0 - cutoff
            centre = p // _BLOCK
            first = centre
            while first > 0:
                gap = max(mu - (y0 + (first * _BLOCK - 1) * dy), 0.0)  # to the end of block first - 1
                if prefix_max[first - 1] - width * gap * gap < threshold:
                    break
                first -= 1
            last = centre
            while last < blocks - 1:
                gap = max(y0 + (last + 1) * _BLOCK * dy - mu, 0.0)  # to the start of block last + 1
                if suffix_max[last + 1] - width * gap * gap < threshold:
                    break
                last += 1
            start, stop = first * _BLOCK, min(n, (last + 1) * _BLOCK)
            # the band in the line's dtype: t_j = h_j - kappa (x_i - y_j)**2, then sum 2**(t_j - max)
            offset = _as(line, xi - y0 - start * dy)
            top = _as(line, -np.inf)
            for j in range(stop - start):
                diff = offset - ramp[j]
                t = line[start + j] - curvature * diff * diff
                terms[j] = t
                top = _fmax(top, t)
            total = top - top
            for j in range(stop - start):
                total = _fadd(total, _exp2m(terms[j] - top))
            out[l, i] = top + np.log2(total)


def log2_gauss_lines(h2, x_axis, y_axis, kappa2: float, cutoff: float | None = None):
    """``log2 sum_j 2**(h2[..., j] - kappa2 (x_i - y_j)**2)`` over the last axis of ``h2``.

    ``h2``: a float32/float64 NumPy array ``(..., n)`` of base-2 log-weights on
    ``y_axis = (y0, dy, n)``; ``x_axis = (x0, dx, m)``; ``kappa2 = log2(e) / (2 eps)``.
    Returns ``(..., m)``. ``cutoff``: the band's base-2 cutoff (default :func:`cutoff_bits`).
    """
    y0, dy, n = y_axis
    x0, dx, m = x_axis
    if h2.shape[-1] != n:
        raise ValueError(f"h2 has {h2.shape[-1]} entries per line, y_axis says {n}")
    if cutoff is None:
        cutoff = cutoff_bits(h2.dtype, n)
    lines = np.ascontiguousarray(h2).reshape(-1, n)
    out = np.empty((lines.shape[0], m), dtype=h2.dtype)
    ramp = (np.arange(n, dtype=np.float64) * dy).astype(h2.dtype)
    _gauss_lines(lines, float(x0), float(dx), int(m), float(y0), float(dy), float(kappa2), float(cutoff), ramp, out)
    return out.reshape(h2.shape[:-1] + (m,))
