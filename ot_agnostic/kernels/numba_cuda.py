"""Numba CUDA kernels: softmin, softmax-weighted sums and kernel sums over point clouds.

The GPU twin of :mod:`ot_agnostic.kernels.numba_cpu`: same four reductions, same
conventions. Inputs are batched, ``x (B, N, D)``, ``y (B, M, D)``, ``h (B, M)``,
``v (B, M)`` or ``(B, M, K)``, all of one floating dtype (float32 or float64), which is
also the compute dtype. The ground cost is ``C(x, y) = |x - y|**p / p`` for ``p`` in
``{1, 2}``, computed from coordinate differences (``C(x, x) = 0`` exactly, and the ``p = 1``
gradient of a coincident point is 0). Memory is ``O(B (N + M))``: no ``N x M`` array.

Tiling
------
One thread per row ``i``; a block holds :data:`ROWS_PER_BLOCK` consecutive rows of one
batch entry (grid: ``(row blocks, B)``). The block walks over the columns by tiles: its
threads copy ``cols`` points ``y_j`` (``D`` coordinates), their ``h_j`` and ``v_j`` to shared
memory, synchronise, and each thread folds the tile into its own row. ``cols`` is
``ROWS_PER_BLOCK``, or fewer when a tile would not fit in 48 KiB of shared memory.

Each row keeps one streaming ("online") log-sum-exp: a running maximum ``m`` of the
exponents ``t_j = h_j - C_ij / eps`` and the sum ``sum_j exp(t_j - m)``, rescaled on the
rare occasions when ``m`` grows: one ``exp`` per pair. Every term is at most 1, so nothing
overflows, for any ``eps`` (``1e-8`` included), and a log-weight of ``LOG_ZERO = -1e30``
only wins when every weight of the row is zero. The kernel sums need no shift (their
terms are at most ``|v_j|``). Within a tile, sums are accumulated in the compute dtype;
tiles are added in float64 (as the CPU kernels do with their blocks of columns).

``D`` and ``K`` (the columns of ``v``) are compile-time constants, so that the point
``x_i`` and the accumulators live in registers: one kernel is compiled per reduction,
``p``, ``D``, ``K`` and dtype (about a second each, on first use), for
``1 <= D, K <=`` :data:`MAX_DIM`; larger dimensions raise a ``ValueError``.

Block-sparse reductions
-----------------------
The device function ``reduce_columns`` folds the column range ``[j_start, j_stop)`` into
the rows of a block; a kernel calls it once with ``[0, M)``, or, given ``ranges =
(row_ptr, col_ranges)`` (integer device arrays), once per range ``col_ranges[r]`` for
``row_ptr[k] <= r < row_ptr[k + 1]``, where ``k`` is the row block (rows ``k *
ROWS_PER_BLOCK`` to ``(k + 1) * ROWS_PER_BLOCK - 1``; the same ranges for every batch
entry). That is the CSR layout that the multiscale (kernel truncation) solver needs: sort
the points by cluster, then list, for each block of rows, the column ranges of the
clusters that interact with it. A row with no range gets the value of an empty sum.

Arrays and streams
------------------
The public functions take arrays with ``__cuda_array_interface__`` (CuPy, ...), viewed
zero-copy with ``numba.cuda.as_cuda_array``, in any layout (strides are honoured), and
write into ``out``; they launch on ``stream`` (a Numba stream, e.g.
``numba.cuda.external_stream(cupy_stream.ptr)``; ``0``: the default stream) and return
without synchronising. NumPy arrays are accepted too (made contiguous; Numba copies them
to the GPU and back around the launch, synchronously): under Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) they run on the CPU, which is how the tests check these
kernels without a GPU.

This module imports nothing from ``ot_agnostic``; ``numba.cuda`` is imported on first use.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "softmin",
    "softmin_grad",
    "softmax_weighted_sum",
    "kernel_sum",
    "KERNEL_ENERGY",
    "KERNEL_GAUSSIAN",
    "KERNEL_LAPLACIAN",
    "MAX_DIM",
    "ROWS_PER_BLOCK",
]

#: ``kind`` values of :func:`kernel_sum`.
KERNEL_ENERGY = 0
KERNEL_GAUSSIAN = 1
KERNEL_LAPLACIAN = 2

#: The largest ``D`` (and ``K``, the columns of ``v``) the kernels are compiled for.
MAX_DIM = 64
#: Threads (rows) per block; a tile has at most as many columns.
ROWS_PER_BLOCK = 128
#: Shared memory per block for a tile of columns (the static limit of every CUDA GPU).
SHARED_BYTES = 48 * 1024

_SOFTMIN, _GRAD, _WEIGHTED, _KERNEL_EXP, _ENERGY = range(5)

#: ``numba.cuda`` once :func:`_cuda` has imported it. A module global, not a closure
#: variable, because Numba's simulator swaps the kernels' global ``cuda`` for its own.
cuda = None


def _cuda():
    """``numba.cuda``, imported on first use (importing it creates no CUDA context)."""
    global cuda
    if cuda is None:
        from numba import cuda as module

        cuda = module
    return cuda


def _tile_columns(D, KV, itemsize, rows):
    """Columns per tile: ``rows``, or fewer so that the tile fits in ``SHARED_BYTES``."""
    return max(1, min(rows, SHARED_BYTES // ((D + 1 + KV) * itemsize)))


def _staged(mode, K):
    """Values of ``v`` staged in shared memory per column."""
    return K if mode == _WEIGHTED else 1


@functools.cache
def _build(mode, p, D, K, dtype_name, rows, cols):
    """The kernel for one reduction ``mode``, ``p``, ``D``, ``K`` (0: no ``v``), dtype, and
    ``rows`` threads per block folding tiles of ``cols`` columns."""
    _cuda()
    dtype = np.dtype(dtype_name).type
    zero, one, neg_inf = dtype(0.0), dtype(1.0), dtype(-math.inf)
    KV = _staged(mode, K)
    NACC = max(K, 1)  # accumulators per row

    @cuda.jit(device=True)
    def reduce_columns(xi, active, y, h, v, b, j_start, j_stop, fac, m, total, acc, part, ys, hs, vs):
        """Fold the columns ``[j_start, j_stop)`` into this thread's row; all threads call it.

        ``m``: the running maximum of the exponents, ``total`` (float64): ``sum exp(t_j - m)``
        so far (the kernel sum for the kernel modes), ``acc`` (float64): the weighted sums
        relative to ``m``; returns the new ``(m, total)``. ``part``, ``ys``, ``hs``, ``vs``:
        per-thread and shared scratch.
        """
        tid = cuda.threadIdx.x
        for j0 in range(j_start, j_stop, cols):
            n = j_stop - j0 if j_stop - j0 < cols else cols  # (min() does not compile here)
            cuda.syncthreads()  # every thread is done with the previous tile
            for jj in range(tid, n, rows):
                for d in range(D):
                    ys[jj, d] = y[b, j0 + jj, d]
                if mode == _WEIGHTED:
                    for k in range(K):
                        vs[jj, k] = v[b, j0 + jj, k]
                elif mode == _KERNEL_EXP or mode == _ENERGY:
                    vs[jj, 0] = v[b, j0 + jj]
                if mode != _KERNEL_EXP and mode != _ENERGY:
                    hs[jj] = h[b, j0 + jj]
            cuda.syncthreads()
            if not active:
                continue
            s = zero
            for k in range(NACC):
                part[k] = zero
            for jj in range(n):
                c = zero  # |x_i - y_j|**2, then |x_i - y_j| for p = 1
                for d in range(D):
                    diff = xi[d] - ys[jj, d]
                    c += diff * diff
                if p == 1:
                    c = math.sqrt(c)
                if mode == _ENERGY:
                    s -= c * vs[jj, 0]
                    continue
                if mode == _KERNEL_EXP:
                    s += math.exp(-fac * c) * vs[jj, 0]
                    continue
                t = hs[jj] - fac * c
                if t > m:  # a new maximum: rescale what is there (exp(-inf) = 0 at the start)
                    e = math.exp(m - t)
                    m = t
                    total *= e
                    s = s * e + one
                    for k in range(K):
                        acc[k] *= e
                        part[k] *= e
                    e = one
                elif t > neg_inf:
                    e = math.exp(t - m)
                    s += e
                else:
                    continue  # a zero weight (-inf), or NaN
                if mode == _GRAD:
                    if p == 1:
                        e = e / c if c > zero else zero
                    for k in range(K):
                        part[k] += e * (xi[k] - ys[jj, k])
                elif mode == _WEIGHTED:
                    for k in range(K):
                        part[k] += e * vs[jj, k]
            total += s
            for k in range(K):
                acc[k] += part[k]
        return m, total

    @cuda.jit
    def kernel(x, y, h, v, fac, eps, out, row_ptr, col_ranges):
        ys = cuda.shared.array((cols, D), dtype)
        hs = cuda.shared.array(cols, dtype)
        vs = cuda.shared.array((cols, KV), dtype)
        xi = cuda.local.array(D, dtype)
        part = cuda.local.array(NACC, dtype)
        acc = cuda.local.array(NACC, np.float64)
        block = cuda.blockIdx.x
        b = cuda.blockIdx.y
        i = block * rows + cuda.threadIdx.x
        active = i < x.shape[1]
        if active:
            for d in range(D):
                xi[d] = x[b, i, d]
        for k in range(NACC):
            acc[k] = 0.0
        m = neg_inf
        total = 0.0
        if row_ptr is None:
            m, total = reduce_columns(
                xi, active, y, h, v, b, 0, y.shape[1], fac, m, total, acc, part, ys, hs, vs
            )
        else:
            for r in range(row_ptr[block], row_ptr[block + 1]):
                m, total = reduce_columns(
                    xi, active, y, h, v, b, col_ranges[r, 0], col_ranges[r, 1], fac, m, total,
                    acc, part, ys, hs, vs,
                )
        if not active:
            return
        if mode == _SOFTMIN:
            out[b, i] = -eps * (m + math.log(total)) if total > 0.0 else math.inf
        elif mode == _KERNEL_EXP or mode == _ENERGY:
            out[b, i] = total
        else:
            scale = 1.0 / total if total > 0.0 else 0.0
            for k in range(K):
                out[b, i, k] = acc[k] * scale

    return kernel


# --------------------------------------------------------------------------------------
# Host side: checks, then one launch
# --------------------------------------------------------------------------------------


def _require_array(name, a):
    if not hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a CUDA array (e.g. CuPy) or a NumPy array")


def _check(name, a, shape, dtype):
    """``a`` must be an array (CUDA or NumPy) of ``shape`` and ``dtype``."""
    _require_array(name, a)
    if np.dtype(a.dtype) != dtype:
        raise TypeError(f"{name} must be a {dtype} array, not {a.dtype}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must be a {shape} array, not {tuple(a.shape)}")


def _points(x, y):
    """``(B, N, M, D, dtype)`` of ``x (B, N, D)``, ``y (B, M, D)`` (float32 or float64)."""
    _require_array("x", x)
    _require_array("y", y)
    if len(x.shape) != 3 or len(y.shape) != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must be (B, N, D) and (B, M, D) arrays, not {tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = np.dtype(x.dtype)
    if np.dtype(y.dtype) != dtype or dtype not in (np.float32, np.float64):
        raise TypeError(f"x and y must both be float32 or both float64, not {x.dtype} and {y.dtype}")
    B, N, D = (int(n) for n in x.shape)
    if not 1 <= D <= MAX_DIM:
        raise ValueError(f"the points must have 1 to {MAX_DIM} coordinates (D), not {D}")
    return B, N, int(y.shape[1]), D, dtype


def _temperature(eps, p):
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, not {p!r}")
    eps = float(eps)
    if not 0.0 < eps < math.inf:
        raise ValueError(f"eps must be positive and finite, not {eps!r}")
    return eps


def _on_device(a):
    """A zero-copy Numba view of a CUDA array (any strides); NumPy arrays are made contiguous,
    for Numba to copy them to the GPU and back."""
    if hasattr(a, "__cuda_array_interface__"):
        # sync=False: the caller orders work by launching on the arrays' stream.
        return _cuda().as_cuda_array(a, sync=False)
    return np.ascontiguousarray(a)


def _launch(mode, p, K, shape, x, y, h, v, fac, eps, out, stream, ranges):
    """Compile (once) and launch the kernel of ``mode`` on a ``(row blocks, B)`` grid."""
    B, N, M, D = shape
    if B == 0 or N == 0:
        return
    if B > 65535:  # the grid's second dimension
        raise ValueError(f"the CUDA kernels take at most 65535 batch entries (B), not {B}")
    rows = ROWS_PER_BLOCK
    blocks = -(-N // rows)
    row_ptr = col_ranges = None
    if ranges is not None:
        row_ptr, col_ranges = ranges
        if tuple(row_ptr.shape) != (blocks + 1,) or len(col_ranges.shape) != 2 or col_ranges.shape[1] != 2:
            raise ValueError(
                f"ranges must be (row_ptr, col_ranges) with row_ptr of shape ({blocks + 1},) "
                f"(row blocks of {rows} rows, plus one) and col_ranges of shape (R, 2)"
            )
        row_ptr, col_ranges = _on_device(row_ptr), _on_device(col_ranges)
    dtype = np.dtype(x.dtype)
    cols = _tile_columns(D, _staged(mode, K), dtype.itemsize, rows)
    kernel = _build(mode, p, D, K, dtype.name, rows, cols)
    args = [_on_device(a) for a in (x, y, h, v)]
    res = _on_device(out)
    kernel[(blocks, B), rows, stream](
        *args, dtype.type(fac), float(eps), res, row_ptr, col_ranges
    )
    if isinstance(out, np.ndarray) and res is not out:  # a strided NumPy array
        out[...] = res


def softmin(x, y, h, eps, p, out, *, stream=0, ranges=None):
    """``out[b, i] = -eps * log sum_j exp(h[b, j] - C(x[b, i], y[b, j]) / eps)``.

    Parameters
    ----------
    x : (B, N, D) float32 or float64 CUDA array (or NumPy, see the module notes); D <= 64.
    y : (B, M, D) array of the same dtype.
    h : (B, M) array of the same dtype: log-weights plus potential / eps (``LOG_ZERO`` or
        ``-inf`` for a zero weight).
    eps : positive float, the temperature.
    p : 1 or 2: ``C(x, y) = |x - y|**p / p``.
    out : (B, N) array of the same dtype, overwritten. A row without any weight gives ``+inf``.
    stream : the Numba stream to launch on (``0``: the default stream).
    ranges : ``None`` (every column), or ``(row_ptr, col_ranges)`` (block-sparse, see the
        module notes).

    Stable for any ``eps`` (streaming, max-shifted log-sum-exp). Returns ``None``, without
    waiting for the GPU.
    """
    B, N, M, D, dtype = _points(x, y)
    eps = _temperature(eps, p)
    _check("h", h, (B, M), dtype)
    _check("out", out, (B, N), dtype)
    _launch(_SOFTMIN, p, 0, (B, N, M, D), x, y, h, h, 1.0 / (p * eps), eps, out, stream, ranges)


def softmin_grad(x, y, h, eps, p, out, *, stream=0, ranges=None):
    """``out[b, i, :] = sum_j w_ij grad_x C(x_i, y_j)``, ``w_ij = softmax_j(h_j - C_ij / eps)``.

    ``grad_x C = x_i - y_j`` for ``p = 2``, ``(x_i - y_j) / |x_i - y_j|`` (0 at ``x_i = y_j``)
    for ``p = 1``: the gradient of :func:`softmin` in ``x``. Same arguments as
    :func:`softmin`; ``out`` is ``(B, N, D)`` (zeros for a row without any weight).
    """
    B, N, M, D, dtype = _points(x, y)
    eps = _temperature(eps, p)
    _check("h", h, (B, M), dtype)
    _check("out", out, (B, N, D), dtype)
    _launch(_GRAD, p, D, (B, N, M, D), x, y, h, h, 1.0 / (p * eps), eps, out, stream, ranges)


def softmax_weighted_sum(x, y, h, eps, p, v, out, *, stream=0, ranges=None):
    """``out[b, i, :] = sum_j w_ij v[b, j, :]``, ``w_ij = softmax_j(h_j - C_ij / eps)``.

    E.g. the barycentric transport map (``v = y``). Same arguments as :func:`softmin`, plus
    ``v (B, M, K)`` with ``K <= 64``; ``out`` is ``(B, N, K)`` (zeros for a row without any
    weight).
    """
    B, N, M, D, dtype = _points(x, y)
    eps = _temperature(eps, p)
    _check("h", h, (B, M), dtype)
    if len(v.shape) != 3 or not 1 <= v.shape[2] <= MAX_DIM:
        raise ValueError(f"v must be a (B, M, K) array with 1 <= K <= {MAX_DIM}, not {tuple(v.shape)}")
    K = int(v.shape[2])
    _check("v", v, (B, M, K), dtype)
    _check("out", out, (B, N, K), dtype)
    _launch(_WEIGHTED, p, K, (B, N, M, D), x, y, h, v, 1.0 / (p * eps), eps, out, stream, ranges)


def kernel_sum(x, y, v, kind, scale, out, *, stream=0, ranges=None):
    """``out[b, i] = sum_j k(x[b, i], y[b, j]) v[b, j]``.

    ``kind``: ``KERNEL_ENERGY`` (0) ``k = -|x - y|`` (``scale`` unused),
    ``KERNEL_GAUSSIAN`` (1) ``k = exp(-|x - y|**2 / (2 scale**2))``,
    ``KERNEL_LAPLACIAN`` (2) ``k = exp(-|x - y| / scale)``.
    ``x (B, N, D)``, ``y (B, M, D)``, ``v (B, M)``, ``out (B, N)``, all of one dtype;
    ``stream`` and ``ranges`` as in :func:`softmin`.
    """
    B, N, M, D, dtype = _points(x, y)
    _check("v", v, (B, M), dtype)
    _check("out", out, (B, N), dtype)
    if kind == KERNEL_ENERGY:
        mode, p, fac = _ENERGY, 1, 0.0
    elif kind in (KERNEL_GAUSSIAN, KERNEL_LAPLACIAN):
        scale = float(scale)
        if not 0.0 < scale < math.inf:
            raise ValueError(f"scale must be positive and finite, not {scale!r}")
        mode = _KERNEL_EXP
        p, fac = (2, 0.5 / scale**2) if kind == KERNEL_GAUSSIAN else (1, 1.0 / scale)
    else:
        raise ValueError(f"kind must be 0 (energy), 1 (gaussian) or 2 (laplacian), not {kind!r}")
    _launch(mode, p, 0, (B, N, M, D), x, y, v, v, fac, 1.0, out, stream, ranges)
