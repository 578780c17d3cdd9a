"""Numba CPU kernels: softmin, softmax-weighted sums and kernel sums over point clouds.

Every kernel streams over the ``N x M`` pairs row by row and never stores an ``N x M``
array: memory is ``O(B (N + M) (D + K))`` for transposed copies of the inputs plus three
``_BLOCK``-long buffers per thread. The public functions (:func:`softmin`,
:func:`softmin_grad`, :func:`softmax_weighted_sum`, :func:`kernel_sum`) check their
arguments and prepare the columns with NumPy, then run one ``@njit(parallel=True,
cache=True)`` engine, parallel over the rows (``prange``), which every kernel shares: it
compiles once per dtype (float32 / float64), in a few seconds, and ``cache=True`` keeps
the machine code on disk (``NUMBA_CACHE_DIR`` or ``__pycache__``) for later processes.

Inputs are batched: ``x (B, N, D)``, ``y (B, M, D)``, ``h (B, M)``, ``v (B, M)`` or
``(B, M, K)``, all of one floating dtype, which is also the compute dtype (sums over a
block of at most ``_BLOCK`` columns are accumulated in that dtype, sums of blocks in
float64). The ground cost is ``C(x, y) = |x - y|**p / p`` for ``p`` in ``{1, 2}``, always
computed from coordinate differences (never ``|x|^2 + |y|^2 - 2 x.y``, which loses float32
accuracy for data away from the origin). Any ``D >= 1`` works; ``D = 2, 3`` have fused
loops.

How the softmin is made fast (about 0.2-0.3 ns per pair on two AVX-512 cores in float32):

* everything is computed in base 2: ``t_j = log2(e) * (h_j - C_ij / eps)`` and
  ``sum_j exp(...) = 2**m * sum_j 2**(t_j - m)``;
* ``y`` is transposed to ``(B, D, Mp)`` once per call, zero-padded to ``Mp``, a multiple of
  ``_PAD`` (with zero weights), so that the loops over ``j`` are unit-stride and have no
  remainder iterations; ``j`` goes by blocks of ``_BLOCK`` columns: one pass stores the
  block's ``t_j`` into a per-thread buffer and takes its maximum, a second one sums
  ``2**(t_j - m)``. The shift ``m`` (an integer, the running maximum rounded up) only
  grows; when it does, the partial sums are rescaled, so every cost is computed once and
  nothing overflows or underflows to NaN, for any ``eps``;
* ``2**u`` for ``u <= 0`` is computed inline, so that LLVM vectorises it (there is no
  vector ``exp`` without SVML): ``u`` is rounded to an integer ``k`` by adding
  ``1.5 * 2**23 + 127`` (the "magic number" trick), ``2**k`` is built by shifting the bits
  of that sum into the exponent field, and ``2**(u - k)`` is a degree-5 (float32) or
  degree-10 (float64) minimax polynomial (relative error 2.4e-7, resp. 4.5e-16); terms
  below ``2**-64`` (``2**-512``) are flushed to 0;
* the reductions (maximum and sum) go through LLVM intrinsics that allow reassociation on
  those two operations only, so they vectorise while the rest of the arithmetic keeps IEEE
  semantics (the rounding trick above would be folded away by a global ``reassoc``);
* the compiled loops ask LLVM for 512-bit vectors where the CPU has them (LLVM prefers
  256-bit vectors on Intel server CPUs otherwise; 512-bit ones are ~20% faster here).

Block-sparse variants (multiscale Sinkhorn: points sorted by cluster, kernel truncation):
:func:`softmin_ranges`, :func:`softmin_grad_ranges`, :func:`softmax_weighted_sum_ranges`
reduce each cluster of rows over some column ranges only (a CSR list of ranges per row
cluster). The endpoints of all the ranges cut the columns into segments, each zero-padded
to a multiple of ``_PAD`` (``_blocks``), so that every range is a padded range without
remainder; a second engine runs the same ``_row`` over a row's ranges, whose running shift
and sums carry over from one range to the next (an exact log-sum-exp merge). Memory:
``O(B (N + Mp) (D + K) + nnz)``, ``Mp < M + _PAD * (number of segments)``; time: the kept
(padded) pairs, plus some 50 ns per range visited by a row.

This module imports nothing from ``ot_agnostic`` and nothing from ``numba.cuda``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads, set_parallel_chunksize, types
from numba.extending import intrinsic, overload

__all__ = [
    "softmin",
    "softmin_grad",
    "softmax_weighted_sum",
    "kernel_sum",
    "softmin_ranges",
    "softmin_grad_ranges",
    "softmax_weighted_sum_ranges",
    "KERNEL_ENERGY",
    "KERNEL_GAUSSIAN",
    "KERNEL_LAPLACIAN",
]

#: ``kind`` values of :func:`kernel_sum`.
KERNEL_ENERGY = 0
KERNEL_GAUSSIAN = 1
KERNEL_LAPLACIAN = 2

#: Columns per block: the per-thread buffers hold this many values (a few KiB, in L1).
_BLOCK = 1024
#: ``M`` is padded to a multiple of this (zero-weight columns), see ``_columns``.
_PAD = 64
#: Rows per parallel task.
_ROWS_PER_TASK = 16
#: Below this many (i, j) pairs a call runs on one thread: the work (< 0.2 ms) is then
#: smaller than what waking the other threads costs, especially on a busy machine.
_SERIAL_PAIRS = 2**18

#: Fast-math flags of all kernels. No ``reassoc`` (it would fold ``(u + c) - c`` into ``u``
#: and break the rounding trick of ``_exp2m``) and no ``nnan``/``ninf`` (``-inf`` is a valid
#: log-weight); reductions get their own flags through ``_fadd``/``_fmax``.
_FASTMATH = {"nsz", "arcp", "contract", "afn"}

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# --------------------------------------------------------------------------------------
# LLVM-level helpers
# --------------------------------------------------------------------------------------


def _fn_type(builder, ret, args):
    """An LLVM function type, built from the class of the function being lowered."""
    return type(builder.function.ftype)(ret, args)


@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum(a, b)``: vectorises as a max-reduction (``max()`` does not)."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], _fn_type(builder, ty, [ty, ty]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


@intrinsic
def _fadd(typingctx, a, b):
    """``a + b`` with ``reassoc``: lets LLVM vectorise sum reductions, and only those."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=("reassoc", "nsz", "contract"))

    return a(a, b), codegen


@intrinsic
def _exponent_bits(typingctx, kf):
    """Reinterpret ``kf`` as an integer, shift it into the exponent field, reinterpret back.

    With ``kf = u + 1.5 * 2**23 + 127`` (float32; ``1.5 * 2**52 + 1023`` for float64) and an
    integer ``-126 <= u <= 127``, the low bits of ``kf`` hold ``u + 127``: the result is
    ``2.0**u``.
    """
    if kf == types.float32:
        ity, shift = types.int32, 23
    elif kf == types.float64:
        ity, shift = types.int64, 52
    else:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[0], context.get_value_type(ity))
        bits = builder.shl(bits, context.get_constant(ity, shift))
        return builder.bitcast(bits, args[0].type)

    return kf(kf), codegen


@intrinsic
def _as(typingctx, like, value):
    """``value`` converted to the float type of ``like`` (a float, an array or a dtype)."""
    target = like.dtype if isinstance(like, (types.Array, types.DType)) else like
    if target not in (types.float32, types.float64) or not isinstance(value, types.Number):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[1], sig.args[1], target)

    return target(like, value), codegen


@intrinsic
def _wide_vectors(typingctx):
    """Ask LLVM for 512-bit vectors in the function being compiled (a no-op without AVX-512).

    LLVM's default on Intel server CPUs is 256-bit vectors; the exp-heavy loops here run
    ~20% faster with 512-bit ones. The string attributes are added to llvmlite's attribute
    set directly (it only validates names it knows); if that ever fails, nothing is added.
    """

    def codegen(context, builder, sig, args):
        try:
            attributes = builder.function.attributes
            set.add(attributes, '"prefer-vector-width"="512"')
            set.add(attributes, '"min-legal-vector-width"="512"')
        except Exception:  # pragma: no cover - depends on llvmlite internals
            pass
        return context.get_dummy_value()

    return types.none(), codegen


# --------------------------------------------------------------------------------------
# 2**u for u <= 0, vectorisable
# --------------------------------------------------------------------------------------

_F32 = np.float32
_F64 = np.float64
# Minimax polynomials of 2**r on [-1/2, 1/2] (mpmath.chebyfit), highest degree first.
_P32 = tuple(
    _F32(c)
    for c in (
        0.0013390863364671234,
        0.009676031918322054,
        0.05550357114219078,
        0.2402210748530834,
        0.6931471880262288,
        1.0000000754548972,
    )
)
_P64 = tuple(
    _F64(c)
    for c in (
        7.072585949269223e-09,
        1.0208690299958306e-07,
        1.321544258792169e-06,
        1.5252657260200837e-05,
        0.0001540353044173605,
        0.0013333558230164974,
        0.009618129107606888,
        0.05550410866444772,
        0.24022650695910097,
        0.69314718055995,
        1.0,
    )
)
_MAGIC32 = _F32(1.5 * 2**23 + 127)
_MAGIC64 = _F64(1.5 * 2**52 + 1023)
# 2**u is flushed to 0 below these exponents: 2**-64 (2**-512) is negligible next to the
# largest term (>= 1/2) at float32 (float64) precision; products of the weights with data
# then stay far above the subnormal range, whose arithmetic is ~100x slower on x86; and
# zero weights (-inf, padding) give exact zeros.
_LOW32 = _F32(-64.0)
_LOW64 = _F64(-512.0)


def _exp2m(u):
    """``2.0**u`` for ``u <= 0``, 0 for ``u < -64`` (float32; ``-512`` in float64)."""
    raise NotImplementedError("only callable from jitted code")


def _exp2m_f32(u):
    v = _fmax(u, _LOW32)
    kf = v + _MAGIC32
    r = v - (kf - _MAGIC32)
    c5, c4, c3, c2, c1, c0 = _P32
    q = ((((c5 * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
    return q * _exponent_bits(kf) if u >= _LOW32 else _F32(0.0)


def _exp2m_f64(u):
    v = _fmax(u, _LOW64)
    kf = v + _MAGIC64
    r = v - (kf - _MAGIC64)
    c10, c9, c8, c7, c6, c5, c4, c3, c2, c1, c0 = _P64
    q = (((((c10 * r + c9) * r + c8) * r + c7) * r + c6) * r + c5) * r + c4
    q = ((((q * r + c3) * r + c2) * r + c1) * r) + c0
    return q * _exponent_bits(kf) if u >= _LOW64 else _F64(0.0)


@overload(_exp2m, jit_options={"fastmath": _FASTMATH})
def _ol_exp2m(u):
    if u == types.float32:
        return _exp2m_f32
    if u == types.float64:
        return _exp2m_f64
    return None


# --------------------------------------------------------------------------------------
# One row against all columns
# --------------------------------------------------------------------------------------

_MODE_SOFTMIN = 0
_MODE_GRAD = 1
_MODE_WEIGHTED = 2
_MODE_KERNEL_EXP = 3
_MODE_ENERGY = 4


@njit(fastmath=_FASTMATH, inline="always")
def _rescaling(old, new):
    """``2**(old - new)`` in float64, 0 when ``old`` is ``-inf`` (no finite term yet)."""
    if old == -np.inf:
        return 0.0
    return 2.0 ** (float(old) - float(new))


@njit(fastmath=_FASTMATH, cache=True)
def _row(xi, yTb, h2b, fac, p, vTb, mode, spans, r0, r1, sq, tb, eb, acc):
    """Row ``i`` against the columns of the ranges ``spans[r0:r1]``, by blocks of at most
    ``_BLOCK`` columns.

    With ``t_j = h2_j - fac |x_i - y_j|**p`` (base-2 exponents) over the columns
    ``spans[r, 0] <= j < spans[r, 1]``, ``r0 <= r < r1``, returns ``(shift, total)`` such
    that ``sum_j 2**t_j = 2**shift * total``, and sets
    ``acc[k] = sum_j 2**(t_j - shift) (z_k - v_jk)`` where ``z = x_i`` for ``_MODE_GRAD``
    (with the weights divided by ``|x_i - y_j|`` for ``p = 1``, 0 where it is 0) and
    ``z = 0`` otherwise (``v = vTb``). ``_MODE_ENERGY``: ``total = sum_j |x_i - y_j| v_j``.

    The shift (an integer: the running maximum rounded up) only grows, from block to block
    and from range to range; ``total`` and ``acc`` are rescaled when it does (an exact
    log-sum-exp merge). The ranges must be multiples of ``_PAD`` long (their tails are
    skipped otherwise). ``sq``, ``tb``, ``eb``: ``_BLOCK``-long buffers.
    """
    _wide_vectors()
    D = yTb.shape[0]
    K = acc.shape[0]
    shift = _as(tb, -np.inf)
    total = 0.0
    for k in range(K):
        acc[k] = 0.0
    for ri in range(r0, r1):
        stop = spans[ri, 1]
        for j0 in range(spans[ri, 0], stop, _BLOCK):
            n = min(_BLOCK, stop - j0) & -_PAD  # a multiple of _PAD: no remainder loops
            # 1. Exponents t_j = h2_j - fac |x_i - y_j|**p and their maximum, from coordinate
            # differences (fused loops for D = 2, 3). For p = 1, sq keeps the distances.
            hb = h2b[j0 : j0 + n]
            bmax = _as(tb, -np.inf)
            if D == 3 and mode != _MODE_ENERGY:
                x0, x1, x2 = xi[0], xi[1], xi[2]
                a0 = yTb[0, j0 : j0 + n]
                a1 = yTb[1, j0 : j0 + n]
                a2 = yTb[2, j0 : j0 + n]
                if p == 2:
                    for jj in range(n):
                        d0 = x0 - a0[jj]
                        d1 = x1 - a1[jj]
                        d2 = x2 - a2[jj]
                        t = hb[jj] - fac * (d0 * d0 + d1 * d1 + d2 * d2)
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
                else:
                    for jj in range(n):
                        d0 = x0 - a0[jj]
                        d1 = x1 - a1[jj]
                        d2 = x2 - a2[jj]
                        r = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
                        sq[jj] = r
                        t = hb[jj] - fac * r
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
            elif D == 2 and mode != _MODE_ENERGY:
                x0, x1 = xi[0], xi[1]
                a0 = yTb[0, j0 : j0 + n]
                a1 = yTb[1, j0 : j0 + n]
                if p == 2:
                    for jj in range(n):
                        d0 = x0 - a0[jj]
                        d1 = x1 - a1[jj]
                        t = hb[jj] - fac * (d0 * d0 + d1 * d1)
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
                else:
                    for jj in range(n):
                        d0 = x0 - a0[jj]
                        d1 = x1 - a1[jj]
                        r = math.sqrt(d0 * d0 + d1 * d1)
                        sq[jj] = r
                        t = hb[jj] - fac * r
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
            else:
                x0 = xi[0]
                a0 = yTb[0, j0 : j0 + n]
                for jj in range(n):
                    d0 = x0 - a0[jj]
                    sq[jj] = d0 * d0
                for d in range(1, D):
                    xd = xi[d]
                    ad = yTb[d, j0 : j0 + n]
                    for jj in range(n):
                        dd = xd - ad[jj]
                        sq[jj] += dd * dd
                if mode == _MODE_ENERGY:
                    w = vTb[0, j0 : j0 + n]
                    s = _as(sq, 0.0)
                    for jj in range(n):
                        s = _fadd(s, math.sqrt(sq[jj]) * w[jj])
                    total += s
                    continue
                if p == 2:
                    for jj in range(n):
                        t = hb[jj] - fac * sq[jj]
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
                else:
                    for jj in range(n):
                        r = math.sqrt(sq[jj])
                        sq[jj] = r
                        t = hb[jj] - fac * r
                        tb[jj] = t
                        bmax = _fmax(bmax, t)
            # 3. A larger maximum: new shift, rescaled sums.
            if bmax > shift:
                new = np.ceil(bmax)
                scale = _rescaling(shift, new)
                total *= scale
                for k in range(K):
                    acc[k] *= scale
                shift = new
            if not shift > -np.inf:
                continue  # no finite exponent yet
            # 4. 2**(t - shift) <= 1.
            s = _as(tb, 0.0)
            for jj in range(n):
                e = _exp2m(tb[jj] - shift)
                eb[jj] = e
                s = _fadd(s, e)
            total += s
            if K == 0:
                continue
            # 5. Weighted sums.
            if mode == _MODE_GRAD and p == 1:
                zero = _as(eb, 0.0)
                for jj in range(n):
                    d = sq[jj]  # the distance |x_i - y_j|, see step 1
                    eb[jj] = eb[jj] / d if d > zero else zero
            for k in range(K):
                z = xi[k] if mode == _MODE_GRAD else _as(xi, 0.0)
                vk = vTb[k, j0 : j0 + n]
                a = _as(eb, 0.0)
                for jj in range(n):
                    a = _fadd(a, eb[jj] * (z - vk[jj]))
                acc[k] += a
    return shift, total


# --------------------------------------------------------------------------------------
# The parallel engine: one compiled parallel loop per dtype serves every kernel
# --------------------------------------------------------------------------------------


@njit(fastmath=_FASTMATH, inline="always")
def _accumulators(mode, K):
    """The length of ``acc`` for ``mode``, ``K = out.shape[2]``."""
    if mode == _MODE_SOFTMIN or mode == _MODE_ENERGY:
        return 0
    if mode == _MODE_KERNEL_EXP:
        return 1
    return K


@njit(fastmath=_FASTMATH, inline="always")
def _finish(out, b, i, mode, eps, shift, total, acc):
    """Write ``out[b, i]`` from the sums of :func:`_row` over the row's columns."""
    K = out.shape[2]
    if mode == _MODE_SOFTMIN:
        if total > 0.0:
            out[b, i, 0] = -eps * (_LN2 * float(shift) + math.log(total))
        else:
            out[b, i, 0] = np.inf
    elif mode == _MODE_ENERGY:
        out[b, i, 0] = -total
    elif mode == _MODE_KERNEL_EXP:
        out[b, i, 0] = -acc[0] * 2.0 ** float(shift)
    else:
        scale = 1.0 / total if total > 0.0 else 0.0
        if mode == _MODE_WEIGHTED:
            scale = -scale
        for k in range(K):
            out[b, i, k] = acc[k] * scale


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _engine(x, yT, h2, vT, fac, eps, p, mode, out):
    """All rows of one kernel in parallel, ``x (B, N, D)`` against ``yT (B, D, Mp)``.

    ``h2 (B, Mp)``: base-2 log-weights; ``vT (B, K, Mp)``; ``out (B, N, K)``. See
    :func:`_row` for ``mode``; ``_MODE_SOFTMIN``, ``_MODE_KERNEL_EXP`` and ``_MODE_ENERGY``
    write ``out[:, :, 0]``.
    """
    B, N, _ = x.shape
    full = np.empty((1, 2), dtype=np.int64)  # one range: all the columns
    full[0, 0] = 0
    full[0, 1] = yT.shape[2]
    nacc = _accumulators(mode, out.shape[2])
    tasks = (N + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(B * tasks):
        _wide_vectors()
        b = task // tasks
        start = (task % tasks) * _ROWS_PER_TASK
        stop = min(N, start + _ROWS_PER_TASK)
        sq = np.empty(_BLOCK, dtype=x.dtype)
        tb = np.empty(_BLOCK, dtype=x.dtype)
        eb = np.empty(_BLOCK, dtype=x.dtype)
        acc = np.empty(nacc, dtype=np.float64)
        for i in range(start, stop):
            shift, total = _row(
                x[b, i], yT[b], h2[b], fac, p, vT[b], mode, full, 0, 1, sq, tb, eb, acc
            )
            _finish(out, b, i, mode, eps, shift, total, acc)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _engine_ranges(x, yT, h2, vT, fac, eps, p, mode, row_stop, col_ptr, col_span, out):
    """:func:`_engine` restricted to blocks of pairs: row ``i`` of cluster ``I`` (rows
    ``row_stop[I - 1] <= i < row_stop[I]``) reduces over the padded column ranges
    ``col_span[col_ptr[I]:col_ptr[I + 1]]`` (their lengths multiples of ``_PAD``).
    """
    B, N, _ = x.shape
    nacc = _accumulators(mode, out.shape[2])
    tasks = (N + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(B * tasks):
        _wide_vectors()
        b = task // tasks
        start = (task % tasks) * _ROWS_PER_TASK
        stop = min(N, start + _ROWS_PER_TASK)
        sq = np.empty(_BLOCK, dtype=x.dtype)
        tb = np.empty(_BLOCK, dtype=x.dtype)
        eb = np.empty(_BLOCK, dtype=x.dtype)
        acc = np.empty(nacc, dtype=np.float64)
        cluster = np.searchsorted(row_stop, start + 1)  # the first I with row_stop[I] > start
        for i in range(start, stop):
            while row_stop[cluster] <= i:
                cluster += 1
            r0, r1 = col_ptr[cluster], col_ptr[cluster + 1]
            shift, total = _row(
                x[b, i], yT[b], h2[b], fac, p, vT[b], mode, col_span, r0, r1, sq, tb, eb, acc
            )
            _finish(out, b, i, mode, eps, shift, total, acc)


# --------------------------------------------------------------------------------------
# Public kernels: checks and per-call preparation in NumPy, then the engine
# --------------------------------------------------------------------------------------


def _points(x, y):
    """``x``, ``y`` as C-contiguous ``(B, N, D)``, ``(B, M, D)`` arrays of one float dtype."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError("x and y must be NumPy arrays")
    if x.dtype != y.dtype or x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"x and y must both be float32 or both float64, not {x.dtype} and {y.dtype}"
        )
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must be (B, N, D) and (B, M, D) arrays, not {x.shape} and {y.shape}"
        )
    if x.shape[2] < 1:
        raise ValueError("the points must have at least one coordinate (D >= 1)")
    return np.ascontiguousarray(x), y


def _columns(a, dtype, layout=None):
    """``a (B, M, K)`` as a C-contiguous ``(B, K, Mp)`` array, zero-padded to ``Mp`` columns.

    ``Mp`` is ``M`` rounded up to a multiple of ``_PAD``: every block of columns is then a
    multiple of ``_PAD`` long and LLVM compiles the vectorised loops without remainder
    loops. The padding columns get zero weights (``-inf`` log-weights). ``layout``: the
    ``(pos, Mp)`` of :func:`_blocks`, column ``j`` going to ``pos[j]``.
    """
    B, M, K = a.shape
    pos, Mp = (slice(0, M), -(-M // _PAD) * _PAD) if layout is None else layout
    aT = np.zeros((B, K, Mp), dtype=dtype)
    aT[:, :, pos] = a.transpose(0, 2, 1)
    return aT


def _log2_weights(h, shape, dtype, pos=None):
    """``log2(e) h`` as a C-contiguous ``(B, Mp)`` array, ``-inf`` in the padding columns."""
    B, M, Mp = shape
    if not isinstance(h, np.ndarray) or h.dtype != dtype:
        raise TypeError(f"h must be a {dtype} NumPy array")
    if h.shape != (B, M):
        raise ValueError(f"h must be a (B, M) = {(B, M)} array, not {h.shape}")
    h2 = np.full((B, Mp), -np.inf, dtype=dtype)
    h2[:, slice(0, M) if pos is None else pos] = h * dtype.type(_LOG2E)
    return h2


def _indices(a, name):
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer (int64) NumPy array")
    return a.astype(np.int64, copy=False)


def _blocks(row_ranges, col_ptr, col_ranges, N, M):
    """Check a block-sparsity pattern and lay the columns out for :func:`_engine_ranges`.

    The endpoints of the ``col_ranges`` (and 0, ``M``) cut ``[0, M)`` into segments; each
    one is zero-padded to a multiple of ``_PAD`` columns, so that every range is a padded
    range of such a length. Returns ``(row_stop, ptr, span, pairs), (pos, Mp)``: the padded
    ranges ``span (nnz', 2)`` (those of a row cluster that touch merged) and their CSR
    pointer ``ptr``, the (row, padded column) pairs of one batch item, and the position
    ``pos (M,)`` of each column in the ``Mp``-column layout.
    """
    row_ranges = _indices(row_ranges, "row_ranges")
    col_ptr = _indices(col_ptr, "col_ptr")
    col_ranges = _indices(col_ranges, "col_ranges")
    if row_ranges.ndim != 2 or row_ranges.shape[1] != 2:
        raise ValueError(f"row_ranges must be a (Kx, 2) array, not {row_ranges.shape}")
    start, stop = row_ranges.T
    Kx = len(row_ranges)
    if not (
        np.all(stop > start)
        and np.array_equal(start[1:], stop[:-1])
        and (start[0] == 0 and stop[-1] == N if Kx else N == 0)
    ):
        raise ValueError(
            f"row_ranges must cut [0, N) = [0, {N}) into consecutive non-empty [start, stop) ranges"
        )
    if col_ptr.shape != (Kx + 1,):
        raise ValueError(f"col_ptr must be a (Kx + 1,) = {(Kx + 1,)} array, not {col_ptr.shape}")
    if col_ranges.ndim != 2 or col_ranges.shape[1] != 2:
        raise ValueError(f"col_ranges must be a (nnz, 2) array, not {col_ranges.shape}")
    nnz = len(col_ranges)
    counts = np.diff(col_ptr)
    if col_ptr[0] != 0 or col_ptr[-1] != nnz or np.any(counts < 0):
        raise ValueError(f"col_ptr must be non-decreasing from 0 to len(col_ranges) = {nnz}")
    a, z = col_ranges.T
    if np.any(a < 0) or np.any(z > M) or np.any(z <= a):
        raise ValueError(
            f"col_ranges must be non-empty [start, stop) ranges within [0, M) = [0, {M})"
        )
    same = np.repeat(np.arange(Kx), counts)
    same = same[1:] == same[:-1]  # ranges r - 1 and r belong to one row cluster
    if np.any(same & (a[1:] < z[:-1])):
        raise ValueError("the col_ranges of a row cluster must be sorted and must not overlap")
    # The padded layout: endpoint e[s] goes to offset[s].
    ends = np.unique(np.concatenate(([0, M], col_ranges.ravel())))
    lengths = np.diff(ends)
    offset = np.concatenate(([0], np.cumsum(-(-lengths // _PAD) * _PAD)))
    segment = np.repeat(np.arange(len(lengths)), lengths)
    pos = offset[segment] + (np.arange(M) - ends[segment])
    span = offset[np.searchsorted(ends, col_ranges)]
    # Merge the runs of touching ranges of a row cluster.
    opens = np.ones(nnz, dtype=bool)  # range r opens a run
    opens[1:] = ~same | (span[1:, 0] != span[:-1, 1])
    closes = np.ones(nnz, dtype=bool)
    closes[:-1] = opens[1:]
    ptr = np.searchsorted(np.flatnonzero(opens), col_ptr)
    span = np.stack([span[opens, 0], span[closes, 1]], axis=1)
    width = np.concatenate(([0], np.cumsum(span[:, 1] - span[:, 0])))
    pairs = int(np.sum((stop - start) * (width[ptr[1:]] - width[ptr[:-1]])))
    return (np.ascontiguousarray(stop), ptr, span, pairs), (pos, int(offset[-1]))


def _output(out, shape, dtype):
    """``out`` itself if it is a C-contiguous array of ``shape``, else a new array to copy back."""
    if not isinstance(out, np.ndarray) or out.dtype != dtype:
        raise TypeError(f"out must be a {dtype} NumPy array")
    if out.shape != shape:
        raise ValueError(f"out must be a {shape} array, not {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    return out if out.flags.c_contiguous else np.empty(shape, dtype)


def _run(x, yT, h2, vT, fac, eps, p, mode, out, shape, blocks=None):
    """Run the engine into ``out`` (of ``shape``: ``(B, N)`` or ``(B, N, K)``).

    ``blocks``: ``(row_stop, ptr, span, pairs)`` from :func:`_blocks`, for the block-sparse
    engine.
    """
    res = _output(out, shape, x.dtype)
    B, N = shape[0], shape[1]
    K = shape[2] if len(shape) == 3 else 1
    pairs = N * yT.shape[-1] if blocks is None else blocks[3]
    # Hand the tasks (``_ROWS_PER_TASK`` rows each) out one at a time: a thread slowed down
    # by other processes then does fewer of them instead of making the whole call wait.
    chunksize = set_parallel_chunksize(1)
    threads = get_num_threads()
    if B * pairs < _SERIAL_PAIRS:
        set_num_threads(1)
    try:
        args = (x, yT, h2, vT, x.dtype.type(fac), float(eps), int(p), mode)
        if blocks is None:
            _engine(*args, res.reshape((B, N, K)))
        else:
            _engine_ranges(*args, *blocks[:3], res.reshape((B, N, K)))
    finally:
        set_parallel_chunksize(chunksize)
        set_num_threads(threads)
    if res is not out:
        out[...] = res


def _temperature(eps, p):
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, not {p!r}")
    eps = float(eps)
    if not 0.0 < eps < math.inf:
        raise ValueError(f"eps must be positive and finite, not {eps!r}")
    return eps


def softmin(x, y, h, eps, p, out):
    """``out[b, i] = -eps * log sum_j exp(h[b, j] - C(x[b, i], y[b, j]) / eps)``.

    Parameters
    ----------
    x : (B, N, D) float32 or float64 array.
    y : (B, M, D) array of the same dtype.
    h : (B, M) array of the same dtype: log-weights plus potential / eps (``-inf``, or a
        large negative number such as ``-1e5``, for a zero weight).
    eps : positive float, the temperature.
    p : 1 or 2: ``C(x, y) = |x - y|**p / p``.
    out : (B, N) array of the same dtype, overwritten. A row where every ``h`` is ``-inf``
        (or ``M = 0``) gives ``+inf``.

    Stable for any ``eps`` (max-shifted; each cost is computed once). Returns ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((1, 1, 2)); y = np.array([[[0.0, 0.0], [1.0, 0.0]]])
    >>> out = np.empty((1, 1))
    >>> softmin(x, y, np.log(np.full((1, 2), 0.5)), 1.0, 2, out)
    >>> bool(np.isclose(out[0, 0], -np.log(0.5 + 0.5 * np.exp(-0.5))))
    True
    """
    x, y = _points(x, y)
    eps = _temperature(eps, p)
    yT = _columns(y, x.dtype)
    h2 = _log2_weights(h, (*y.shape[:2], yT.shape[2]), x.dtype)
    _run(x, yT, h2, yT, _LOG2E / (p * eps), eps, p, _MODE_SOFTMIN, out, x.shape[:2])


def softmin_grad(x, y, h, eps, p, out):
    """``out[b, i, :] = sum_j w_ij grad_x C(x_i, y_j)``, ``w_ij = softmax_j(h_j - C_ij / eps)``.

    The gradient of :func:`softmin` in ``x`` (envelope theorem): ``p=2`` gives
    ``x_i - sum_j w_ij y_j`` (computed as ``sum_j w_ij (x_i - y_j)``); ``p=1`` gives
    ``sum_j w_ij (x_i - y_j) / |x_i - y_j|``, with 0 for coincident points. Same inputs as
    :func:`softmin`; ``out`` is ``(B, N, D)`` (zeros for a row where every ``h`` is ``-inf``).
    Returns ``None``.
    """
    x, y = _points(x, y)
    eps = _temperature(eps, p)
    yT = _columns(y, x.dtype)
    h2 = _log2_weights(h, (*y.shape[:2], yT.shape[2]), x.dtype)
    _run(x, yT, h2, yT, _LOG2E / (p * eps), eps, p, _MODE_GRAD, out, x.shape)


def softmax_weighted_sum(x, y, h, eps, p, v, out):
    """``out[b, i, :] = sum_j w_ij v[b, j, :]``, ``w_ij = softmax_j(h_j - C_ij / eps)``.

    E.g. the barycentric transport map ``T(x_i) = sum_j w_ij y_j`` (``v = y``). Same inputs
    as :func:`softmin` plus ``v (B, M, K)``; ``out`` is ``(B, N, K)`` (zeros for a row where
    every ``h`` is ``-inf``). Returns ``None``.
    """
    x, y = _points(x, y)
    eps = _temperature(eps, p)
    if not isinstance(v, np.ndarray) or v.dtype != x.dtype:
        raise TypeError(f"v must be a {x.dtype} NumPy array")
    if v.ndim != 3 or v.shape[:2] != y.shape[:2]:
        raise ValueError(f"v must be a (B, M, K) array with (B, M) = {y.shape[:2]}, not {v.shape}")
    yT = _columns(y, x.dtype)
    h2 = _log2_weights(h, (*y.shape[:2], yT.shape[2]), x.dtype)
    shape = (*x.shape[:2], v.shape[2])
    _run(x, yT, h2, _columns(v, x.dtype), _LOG2E / (p * eps), eps, p, _MODE_WEIGHTED, out, shape)


def kernel_sum(x, y, v, kind, scale, out):
    """``out[b, i] = sum_j k(x[b, i], y[b, j]) v[b, j]``.

    ``kind``: ``KERNEL_ENERGY`` (0) ``k = -|x - y|`` (``scale`` unused),
    ``KERNEL_GAUSSIAN`` (1) ``k = exp(-|x - y|**2 / (2 scale**2))``,
    ``KERNEL_LAPLACIAN`` (2) ``k = exp(-|x - y| / scale)``.
    ``x (B, N, D)``, ``y (B, M, D)``, ``v (B, M)``, ``out (B, N)``, all of one dtype.
    Returns ``None``.

    The exponential kernels are computed like the softmin (max-shifted, base 2): kernel
    values more than ``2**64`` (float32; ``2**512`` in float64) times smaller than a row's
    largest one count as 0.
    """
    x, y = _points(x, y)
    if not isinstance(v, np.ndarray) or v.dtype != x.dtype:
        raise TypeError(f"v must be a {x.dtype} NumPy array")
    if v.shape != y.shape[:2]:
        raise ValueError(f"v must be a (B, M) = {y.shape[:2]} array, not {v.shape}")
    if kind == KERNEL_ENERGY:
        fac, p, mode = 0.0, 2, _MODE_ENERGY
    elif kind in (KERNEL_GAUSSIAN, KERNEL_LAPLACIAN):
        scale = float(scale)
        if not 0.0 < scale < math.inf:
            raise ValueError(f"scale must be positive and finite, not {scale!r}")
        if kind == KERNEL_GAUSSIAN:
            fac, p = _LOG2E / (2.0 * scale * scale), 2
        else:
            fac, p = _LOG2E / scale, 1
        mode = _MODE_KERNEL_EXP
    else:
        raise ValueError(f"kind must be 0 (energy), 1 (gaussian) or 2 (laplacian), not {kind!r}")
    yT = _columns(y, x.dtype)
    vT = _columns(v[:, :, None], x.dtype)
    h2 = np.zeros((y.shape[0], yT.shape[2]), dtype=x.dtype)
    h2[:, y.shape[1] :] = -np.inf
    _run(x, yT, h2, vT, fac, 1.0, p, mode, out, x.shape[:2])


# --------------------------------------------------------------------------------------
# Block-sparse kernels (multiscale Sinkhorn): each cluster of rows reduces over some ranges
# of columns only
# --------------------------------------------------------------------------------------


def _prepare_ranges(x, y, h, eps, p, row_ranges, col_ptr, col_ranges):
    x, y = _points(x, y)
    eps = _temperature(eps, p)
    blocks, layout = _blocks(row_ranges, col_ptr, col_ranges, x.shape[1], y.shape[1])
    yT = _columns(y, x.dtype, layout)
    h2 = _log2_weights(h, (*y.shape[:2], layout[1]), x.dtype, layout[0])
    return x, y, eps, yT, h2, blocks, layout


def softmin_ranges(x, y, h, eps, p, row_ranges, col_ptr, col_ranges, out):
    """:func:`softmin` over the kept pairs only: ``out[b, i] = -eps * log sum_j exp(h[b, j]
    - C(x[b, i], y[b, j]) / eps)``, ``j`` in the column ranges of the cluster of row ``i``.

    The rows and columns are sorted by cluster. ``row_ranges (Kx, 2)``: the ``[start,
    stop)`` rows of each row cluster, consecutive, non-empty, covering ``[0, N)``.
    ``col_ranges (nnz, 2)``: non-empty ``[start, stop)`` column ranges within ``[0, M)``;
    the rows of cluster ``I`` reduce over ``col_ranges[col_ptr[I]:col_ptr[I + 1]]``
    (sorted, non-overlapping), ``col_ptr (Kx + 1,)`` a CSR pointer; all integer arrays
    (int64), the same pattern for every batch item. A row cluster without columns gives
    ``+inf``. Other arguments as in :func:`softmin`; the cost is that of the kept pairs
    (plus the padding of each range to a multiple of ``_PAD`` columns). Returns ``None``.
    """
    x, y, eps, yT, h2, blocks, _ = _prepare_ranges(x, y, h, eps, p, row_ranges, col_ptr, col_ranges)
    _run(x, yT, h2, yT, _LOG2E / (p * eps), eps, p, _MODE_SOFTMIN, out, x.shape[:2], blocks)


def softmin_grad_ranges(x, y, h, eps, p, row_ranges, col_ptr, col_ranges, out):
    """:func:`softmin_grad` over the kept pairs only, see :func:`softmin_ranges` (zeros for a
    row cluster without columns). Returns ``None``."""
    x, y, eps, yT, h2, blocks, _ = _prepare_ranges(x, y, h, eps, p, row_ranges, col_ptr, col_ranges)
    _run(x, yT, h2, yT, _LOG2E / (p * eps), eps, p, _MODE_GRAD, out, x.shape, blocks)


def softmax_weighted_sum_ranges(x, y, h, eps, p, v, row_ranges, col_ptr, col_ranges, out):
    """:func:`softmax_weighted_sum` over the kept pairs only, see :func:`softmin_ranges`
    (zeros for a row cluster without columns). Returns ``None``."""
    x, y, eps, yT, h2, blocks, layout = _prepare_ranges(
        x, y, h, eps, p, row_ranges, col_ptr, col_ranges
    )
    if not isinstance(v, np.ndarray) or v.dtype != x.dtype:
        raise TypeError(f"v must be a {x.dtype} NumPy array")
    if v.ndim != 3 or v.shape[:2] != y.shape[:2]:
        raise ValueError(f"v must be a (B, M, K) array with (B, M) = {y.shape[:2]}, not {v.shape}")
    vT = _columns(v, x.dtype, layout)
    shape = (*x.shape[:2], v.shape[2])
    _run(x, yT, h2, vT, _LOG2E / (p * eps), eps, p, _MODE_WEIGHTED, out, shape, blocks)
