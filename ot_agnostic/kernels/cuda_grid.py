"""Numba CUDA kernel for regular grids: one 1-D log-domain Gaussian convolution per axis.

The GPU twin of :mod:`ot_agnostic.kernels.numba_grid` (without its banding). On a grid the
cost is separable, ``C(x_i, y_j) = sum_k (x^k_i - y^k_j)**2 / 2``, so the softmin
``-eps log sum_j exp(h_j - C_ij / eps)`` is one 1-D pass per axis. One pass, for an array
viewed as ``h (P, n, Q)`` (the axis in the middle: ``P`` the product of the axes before it,
batch included, ``Q`` of those after it; a C-contiguous array is that view without a copy),
writes ``out (P, m, Q)``:

    out[p, i, q] = log sum_j exp(h[p, j, q] - kappa (x_i - y_j)**2),    kappa = 1 / (2 eps),

with ``x_i = x0 + i dx`` (``m`` outputs) and ``y_j = y0 + j dy`` (``n`` inputs).

Layout
------
One thread per output entry ``(p, i, q)``, ``q`` fastest: a 1-D grid of blocks of
:data:`THREADS_PER_BLOCK` threads over the ``P m Q`` entries. Consecutive threads read
consecutive ``h[p, j, q]`` (coalesced) for an inner axis, or the same ``h[p, j]`` (one
broadcast load) for the last axis (``Q = 1``). No shared memory and no synchronisation.
The cost ``kappa (x_i - y_j)**2`` is computed on the fly from the axes' origins and
spacings (no cost table); memory is the output only, ``O(P m Q)``: no ``m x n`` array.

Each thread does a two-pass log-sum-exp over ``j``: the maximum ``top`` of the exponents
``t_j = h_j - kappa (x_i - y_j)**2``, then ``sum_j exp(t_j - top)`` (every term at most 1:
no overflow, for any ``eps``), accumulated in the compute dtype over chunks of
:data:`CHUNK` terms and in float64 across chunks. A log-weight of ``LOG_ZERO = -1e30`` (an
empty voxel) thus drops out unless its whole line is empty; a line of ``-inf`` gives
``-inf``, a ``NaN`` exponent gives ``NaN`` (as the pure Array API ``logsumexp``). The
exponents are computed in the dtype of ``h`` (float32 or float64): ``x_i - y0`` once per
thread in float64, then ``(x_i - y0) - j dy`` in the dtype, as the CPU kernel does.

Arrays and streams
------------------
:func:`log_gauss_axis` takes arrays with ``__cuda_array_interface__`` (CuPy, detached torch
CUDA tensors), viewed zero-copy with ``numba.cuda.as_cuda_array`` in any layout (strides
are honoured), writes into ``out``, launches on ``stream`` and returns without
synchronising. NumPy arrays are accepted too (Numba copies them to the GPU and back around
the launch): under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) they run on the CPU,
which is how the tests check this kernel without a GPU. One kernel is compiled per dtype
on first use (not cached on disk).

This module imports nothing from ``ot_agnostic``; ``numba.cuda`` is imported on first use.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["log_gauss_axis", "THREADS_PER_BLOCK", "CHUNK"]

#: Threads per block (one output entry each).
THREADS_PER_BLOCK = 128
#: Terms summed in the compute dtype before they are added to the float64 total.
CHUNK = 32

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


@functools.cache
def _build(dtype_name):
    """The one-axis kernel for float32 or float64."""
    _cuda()
    dtype = np.dtype(dtype_name).type
    zero = dtype(0.0)
    neg_inf, pos_inf = dtype(-math.inf), dtype(math.inf)
    nan = dtype(math.nan)
    chunk = CHUNK

    @cuda.jit
    def kernel(h, out, x0, dx, y0, dy, kappa):
        t = cuda.grid(1)
        P, m, Q = out.shape
        n = h.shape[1]
        if t >= P * m * Q:
            return
        q = t % Q
        rest = t // Q
        i = rest % m
        p = rest // m
        offset = dtype(x0 + i * dx - y0)  # x_i - y0, in float64 then rounded once
        top = neg_inf
        bad = False
        for j in range(n):
            d = offset - dtype(j) * dy
            v = h[p, j, q] - kappa * d * d
            if v > top:
                top = v
            elif not v <= top:  # NaN
                bad = True
        if bad:
            out[p, i, q] = nan
            return
        if top == neg_inf or top == pos_inf:
            out[p, i, q] = top
            return
        total = 0.0
        for j0 in range(0, n, chunk):
            j1 = j0 + chunk if j0 + chunk < n else n  # (min() of mixed ints may not compile)
            part = zero
            for j in range(j0, j1):
                d = offset - dtype(j) * dy
                part += math.exp(h[p, j, q] - kappa * d * d - top)
            total += part
        out[p, i, q] = top + math.log(total)

    return kernel


def _on_device(a):
    """A zero-copy Numba view of a CUDA array (any strides); NumPy arrays are made contiguous,
    for Numba to copy them to the GPU and back."""
    if hasattr(a, "__cuda_array_interface__"):
        # sync=False: the caller orders work by launching on the arrays' stream.
        return _cuda().as_cuda_array(a, sync=False)
    return np.ascontiguousarray(a)


def _require_array(name, a):
    if not hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a CUDA array (e.g. CuPy) or a NumPy array, not {type(a).__name__}")


def log_gauss_axis(h, out, x_axis, y_axis, eps, *, stream=0):
    """``out[p, i, q] = log sum_j exp(h[p, j, q] - (x_i - y_j)**2 / (2 eps))``.

    Parameters
    ----------
    h : (P, n, Q) float32 or float64 CUDA array (or NumPy, see the module notes):
        log-weights on the axis ``y_j = y0 + j dy`` (``LOG_ZERO`` or ``-inf``: a zero weight).
    out : (P, m, Q) array of the same dtype, overwritten.
    x_axis, y_axis : ``(x0, dx, m)`` and ``(y0, dy, n)``: origin, spacing and length.
    eps : positive float, the temperature.
    stream : the Numba stream to launch on (``0``: the default stream).

    Returns ``None``, without waiting for the GPU.
    """
    _require_array("h", h)
    _require_array("out", out)
    dtype = np.dtype(h.dtype)
    if dtype not in (np.float32, np.float64) or np.dtype(out.dtype) != dtype:
        raise TypeError(f"h and out must both be float32 or both float64, not {h.dtype} and {out.dtype}")
    x0, dx, m = float(x_axis[0]), float(x_axis[1]), int(x_axis[2])
    y0, dy, n = float(y_axis[0]), float(y_axis[1]), int(y_axis[2])
    if len(h.shape) != 3 or len(out.shape) != 3:
        raise ValueError(f"h and out must be (P, n, Q) and (P, m, Q) arrays, not {tuple(h.shape)} and {tuple(out.shape)}")
    P, Q = int(h.shape[0]), int(h.shape[2])
    if tuple(h.shape) != (P, n, Q) or tuple(out.shape) != (P, m, Q):
        raise ValueError(
            f"h must be (P, {n}, Q) and out (P, {m}, Q) for these axes, not {tuple(h.shape)} and {tuple(out.shape)}"
        )
    eps = float(eps)
    if not 0.0 < eps < math.inf:
        raise ValueError(f"eps must be positive and finite, not {eps!r}")
    if not all(math.isfinite(v) for v in (x0, dx, y0, dy)):
        raise ValueError("the axes' origins and spacings must be finite")
    entries = P * m * Q
    if entries == 0:
        return
    if n == 0:
        raise ValueError("h has no entries along the axis (n = 0)")
    kernel = _build(dtype.name)
    threads = THREADS_PER_BLOCK
    blocks = -(-entries // threads)
    res = _on_device(out)
    kernel[blocks, threads, stream](
        _on_device(h), res, x0, dx, y0, dtype.type(dy), dtype.type(0.5 / eps)
    )
    if isinstance(out, np.ndarray) and res is not out:  # a strided NumPy array
        out[...] = res
