"""Densities on regular grids (images, volumes): separable Sinkhorn on the one engine.

A density ``a`` on a grid of shape ``(n_1, ..., n_d)`` with voxel sizes ``spacing`` is the
measure ``sum_i a_i delta_{x_i}`` on the voxel centres ``x_i = i * spacing``. With the cost
``C(x, y) = |x - y|**2 / 2`` (p = 2) the kernel is separable,
``exp(-C(x_i, y_j) / eps) = prod_k exp(-(x_i^k - y_j^k)**2 / (2 eps))``, so that the softmin

    softmin_i(h) = -eps log sum_j exp(h_j - C(x_i, y_j) / eps)

is ``d`` exact 1-D log-domain convolutions, one per axis: ``O(n (n_1 + ... + n_d))``
operations per pass instead of ``O(n**2)``, ``O(n)`` memory. :class:`GridGeometry` is that
softmin as a *geometry* of the one Sinkhorn engine (:mod:`ot_agnostic.sinkhorn`): same
loop, eps-scaling, debiasing, unbalanced damping, precision (``tol``) and result object as
the point clouds. The 1-D passes run in Numba kernels for NumPy arrays and torch CPU
tensors (:mod:`ot_agnostic.kernels.numba_grid`) and on the pure Array API path otherwise
(torch CUDA, CuPy, JAX, ...: log-sum-exps over bounded chunks).

Coarse-to-fine: eps-scaling starts on a pyramid of grids (each level sums ``2**d`` voxels
into one, twice the spacing), and a temperature ``eps`` runs on the coarsest level whose
voxels are at most ``blur / PYRAMID_VOXELS_PER_BLUR`` wide (``sqrt(eps) >= 2`` voxels);
moving to a finer level extrapolates the four potentials by one softmin from the coarse
grid (as GeomLoss's multiscale jump). The final temperature and the refinement to ``tol``
always run on the full grid, so the pyramid changes the starting point, not the answer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._array_api import (
    array_namespace, check_same_device, device_memory, device_of, logsumexp, safe_log, stop_gradient,
    to_float,
)
from ._validation import BALANCE_RTOL, _compute_dtypes, check_max_iter, check_positive, check_power, check_scaling, check_tol
from .sinkhorn import (
    Anderson, DEFAULT_MAX_ITER, DEFAULT_TOL, ConvergenceWarning, Geometries, Potentials, Precision, SinkhornResult, _sinkhorn_step, anneal,
    convergence_report, dampening, epsilon_schedule, sinkhorn_cost, sinkhorn_loop, warn_if_not_converged,
    user_stacklevel, weight_gradients,
)

__all__ = [
    "Grid", "GridGeometry", "GridResult", "GridBarycenter", "sinkhorn", "sinkhorn_divergence", "value_and_grad",
    "barycenter",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
#: A temperature runs on the coarsest pyramid level whose voxels are at most blur / this wide.
PYRAMID_VOXELS_PER_BLUR = 2.0
#: The pyramid stops once the largest axis has at most this many voxels.
PYRAMID_MIN_SIZE = 8
#: The pure Array API path reduces at most this many (line, i, j) entries at once.
_CHUNK_ENTRIES = 2**22


@dataclass(frozen=True)
class Grid:
    """A regular grid: ``shape`` voxels, ``spacing`` apart, the first centred at ``origin``."""

    shape: tuple
    spacing: tuple
    origin: tuple

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def diameter(self) -> float:
        """The distance between the first and the last voxel centres."""
        return math.hypot(*((n - 1) * s for n, s in zip(self.shape, self.spacing)))

    def axis(self, k: int) -> np.ndarray:
        """The ``n_k`` voxel coordinates along axis ``k`` (float64)."""
        return self.origin[k] + self.spacing[k] * np.arange(self.shape[k], dtype=np.float64)

    def points(self) -> np.ndarray:
        """The ``(size, d)`` voxel centres in C order (float64)."""
        mesh = np.meshgrid(*(self.axis(k) for k in range(self.ndim)), indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def coarser(self) -> "Grid":
        """Pairs of voxels merged along every axis longer than 1 (an odd last voxel is paired
        with an empty one): twice the spacing, the centre between the two."""
        shape, spacing, origin = [], [], []
        for n, s, o in zip(self.shape, self.spacing, self.origin):
            merge = n > 1
            shape.append((n + 1) // 2 if merge else n)
            spacing.append(2 * s if merge else s)
            origin.append(o + s / 2 if merge else o)
        return Grid(tuple(shape), tuple(spacing), tuple(origin))


def axis_costs(x_grid: Grid, y_grid: Grid, eps: float) -> list:
    """Per axis, the ``(n_k(x), n_k(y))`` table ``(x^k_i - y^k_j)**2 / (2 eps)`` (float64)."""
    return [
        (x_grid.axis(k)[:, None] - y_grid.axis(k)[None, :]) ** 2 / (2 * eps) for k in range(x_grid.ndim)
    ]


class NumbaConvolver:
    """The 1-D log-convolutions in Numba CPU kernels, for NumPy arrays and torch CPU tensors
    (read through NumPy views; at most ``torch.get_num_threads()`` threads for torch)."""

    name = "numba"

    def __init__(self, like):
        from .backends.numba_cpu import is_torch_cpu
        from .kernels import numba_grid

        self.kernels = numba_grid
        self.torch = is_torch_cpu(like)
        self.max_threads = None
        if self.torch:
            import torch

            self.max_threads = torch.get_num_threads()

    def log_convolve(self, h, x_grid, y_grid, eps):
        """``log sum_j exp(h[b, j] - C(x_i, y_j) / eps)``: a ``(B, *x_grid.shape)`` array."""
        from .backends.numba_cpu import limited_threads, numpy_view

        host = numpy_view(h) if self.torch else np.asarray(h)
        dtype = host.dtype.type
        h2 = host * dtype(_LOG2E)
        kappa2 = _LOG2E / (2 * eps)
        with limited_threads(self.max_threads):
            for k in range(x_grid.ndim):
                lines = np.moveaxis(h2, k + 1, -1)
                out = self.kernels.log2_gauss_lines(
                    lines, (x_grid.origin[k], x_grid.spacing[k], x_grid.shape[k]),
                    (y_grid.origin[k], y_grid.spacing[k], y_grid.shape[k]), kappa2)
                h2 = np.moveaxis(out, -1, k + 1)
        out = np.ascontiguousarray(h2 * dtype(_LN2))
        if self.torch:
            import torch

            return torch.from_numpy(out)
        return out


class ArrayAPIConvolver:
    """The 1-D log-convolutions on the pure Array API path (any library, any device): each
    axis moved last, log-sum-exps over chunks of at most ``_CHUNK_ENTRIES`` entries."""

    name = "array_api"

    def __init__(self, xp):
        self.xp = xp

    def log_convolve(self, h, x_grid, y_grid, eps):
        xp = self.xp
        for k, table in enumerate(axis_costs(x_grid, y_grid, eps)):
            axis = k + 1
            cost = xp.asarray(table, dtype=h.dtype, device=device_of(h))
            m, n = cost.shape
            order = [i for i in range(h.ndim) if i != axis] + [axis]
            moved = xp.permute_dims(h, tuple(order))
            lead = moved.shape[:-1]
            lines = xp.reshape(moved, (-1, n))
            rows = max(1, _CHUNK_ENTRIES // (m * n))
            total = lines.shape[0]
            parts = [
                logsumexp(lines[start:min(start + rows, total), None, :] - cost[None, :, :], axis=2, xp=xp)
                for start in range(0, total, rows)
            ]
            out = xp.reshape(xp.concat(parts, axis=0), (*lead, m))
            h = xp.permute_dims(out, tuple(int(i) for i in np.argsort(order)))
        return h


class GridGeometry:
    """The cost ``|x - y|**2 / 2`` between the voxels of ``x_grid`` (rows) and ``y_grid``
    (columns), for a batch of ``B`` densities: a :class:`~ot_agnostic.backends.Geometry`
    whose softmin is separable (see the module docstring). Arrays are ``(B, size)``."""

    def __init__(self, x_grid: Grid, y_grid: Grid, batch: int, convolver, *, xp, like):
        self.x_grid, self.y_grid, self.convolver, self.xp = x_grid, y_grid, convolver, xp
        self.like = like  # an array of the library, dtype and device to compute with
        self.shape = (batch, x_grid.size, y_grid.size)

    def _log_convolve(self, eps, h):
        B = h.shape[0]
        out = self.convolver.log_convolve(self.xp.reshape(h, (B, *self.y_grid.shape)), self.x_grid, self.y_grid, eps)
        return self.xp.reshape(out, (B, self.x_grid.size))

    def softmin(self, eps, h):
        return -eps * self._log_convolve(eps, h)

    def softmax_weighted_sum(self, eps, h, v):
        """``sum_j w_ij v_j``, ``w_ij = softmax_j(h_j - C_ij / eps)``: positive and negative
        parts of each column of ``v (B, M, K)`` as log-weights of two more softmins."""
        xp = self.xp
        norm = self._log_convolve(eps, h)
        columns = []
        for k in range(v.shape[2]):
            parts = []
            for part in (xp.where(v[:, :, k] > 0, v[:, :, k], 0), xp.where(v[:, :, k] < 0, -v[:, :, k], 0)):
                parts.append(xp.exp(self._log_convolve(eps, h + safe_log(part, xp=xp)) - norm))
            columns.append(parts[0] - parts[1])
        return xp.stack(columns, axis=2)

    def _points(self, grid):
        xp = self.xp
        pts = xp.asarray(grid.points(), dtype=self.like.dtype, device=device_of(self.like))
        return xp.broadcast_to(pts[None, ...], (self.shape[0], *pts.shape))

    def softmin_grad(self, eps, h):
        """``sum_j w_ij (x_i - y_j)``: the displacement to the barycentric image of voxel ``i``."""
        return self._points(self.x_grid) - self.softmax_weighted_sum(eps, h, self._points(self.y_grid))

    def cost_rows(self, start, stop):
        xp = self.xp
        x = self._points(self.x_grid)[:, start:stop, :]
        y = self._points(self.y_grid)
        return xp.sum((x[:, :, None, :] - y[:, None, :, :]) ** 2, axis=3) / 2

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms on grids are not implemented; use the point-cloud functions.")

    def transpose(self):
        return GridGeometry(self.y_grid, self.x_grid, self.shape[0], self.convolver, xp=self.xp, like=self.like)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


class _Densities(NamedTuple):
    xp: Any
    a: Any  # (B, n), compute dtype; autograd-tracked if the input is
    b: Any
    grid: Grid
    batched: bool
    out_dtype: Any


def _check_density(xp, w, name, dtype):
    if not xp.isdtype(w.dtype, ("real floating", "integral", "bool")):
        raise TypeError(f"{name} has dtype {w.dtype}: densities must be real numbers (float32 or float64).")
    w = xp.astype(w, dtype) if w.dtype != dtype else w
    detached = stop_gradient(w)
    if not bool(xp.all(xp.isfinite(detached))):
        raise ValueError(f"{name} contains NaN or infinite values; replace them (e.g. by 0) before computing OT.")
    if bool(xp.any(detached < 0)):
        raise ValueError(
            f"{name} has negative values (min {float(xp.min(detached)):.3g}): densities must be "
            "non-negative masses; clip them (e.g. xp.clip(a, 0)) or shift them."
        )
    return w


def _check_spacing(spacing, d):
    values = spacing if isinstance(spacing, (tuple, list)) else (spacing,) * d
    if len(values) != d:
        raise ValueError(
            f"spacing has {len(values)} entries but the grid has {d} axes: give one voxel size per "
            "axis, or a single number."
        )
    return tuple(check_positive(s, "spacing") for s in values)


def validate_densities(a, b, *, batch: bool, spacing, balanced: bool) -> _Densities:
    """Check and batch two densities on one grid (see :func:`sinkhorn` for the rules)."""
    xp = array_namespace(a, b)
    check_same_device(a, b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"a has shape {tuple(a.shape)} and b has shape {tuple(b.shape)}: the grid functions compare "
            "two densities on one grid; resample one of them onto the other's grid (or pad it)."
        )
    d = a.ndim - (1 if batch else 0)
    if d < 1:
        raise ValueError(
            f"densities of shape {tuple(a.shape)} with batch={batch} leave no grid axis: pass (H, W), "
            "(H, W, L) or, with batch=True, (B, H, W[, L])."
        )
    if any(n == 0 for n in a.shape):
        raise ValueError(f"the densities have an empty axis (shape {tuple(a.shape)}).")
    dtype, out_dtype = _compute_dtypes(xp, a, b)
    grid_shape = tuple(int(n) for n in a.shape[a.ndim - d:])
    grid = Grid(grid_shape, _check_spacing(spacing, d), (0.0,) * d)
    B = int(a.shape[0]) if batch else 1
    _check_memory(a, B, grid, 8 if dtype == xp.float64 else 4)
    a, b = _check_density(xp, a, "a", dtype), _check_density(xp, b, "b", dtype)
    a, b = xp.reshape(a, (B, grid.size)), xp.reshape(b, (B, grid.size))
    mass_a, mass_b = xp.sum(stop_gradient(a), axis=1), xp.sum(stop_gradient(b), axis=1)
    for name, mass in (("a", mass_a), ("b", mass_b)):
        empty = [k for k in range(B) if not float(mass[k]) > 0]
        if empty:
            where = f" (batch item {empty[0]})" if batch else ""
            raise ValueError(f"{name} is all zero{where}: a density needs some positive mass.")
    if balanced:
        rtol = BALANCE_RTOL[8 if dtype == xp.float64 else 4]
        for k in range(B):
            ma, mb = float(mass_a[k]), float(mass_b[k])
            if abs(ma - mb) > rtol * max(ma, mb):
                where = f" in batch item {k}" if batch else ""
                raise ValueError(
                    f"balanced OT (reach=None) needs equal total masses, got m(a)={ma:.6g} and "
                    f"m(b)={mb:.6g}{where}. Normalise the densities (a / a.sum(), b / b.sum()) or "
                    "use unbalanced OT with a finite `reach` (a length, like blur)."
                )
    return _Densities(xp, a, b, grid, batch, out_dtype)


#: Arrays of B * n values that a debiased solve holds at once (potentials, iterates,
#: log-weights, Anderson's memory, kernel temporaries), with the pyramid's levels.
_LIVE_ARRAYS = 40


def _check_memory(a, B, grid, itemsize):
    needed = _LIVE_ARRAYS * B * grid.size * itemsize
    available = device_memory(a)
    if available is not None and needed > available // 2:
        raise MemoryError(
            f"a grid of shape {grid.shape} (batch of {B}) needs about {needed / 2**30:.1f} GiB "
            f"during the solve, more than half of the device's {available / 2**30:.1f} GiB. Crop or "
            "downsample the densities, use float32, or pass smaller batches."
        )


def _convolver(backend, like, xp):
    """The convolver for ``backend`` in ``"auto"``, ``"numba"``, ``"numba_cuda"``, ``"array_api"``.

    ``"auto"``: NumPy arrays and torch CPU tensors (float32/float64) run the Numba CPU kernel,
    CuPy arrays and torch CUDA tensors the Numba CUDA kernel when it passes its self-test on
    their device (:mod:`ot_agnostic.backends.grid_cuda`; else one logged warning), everything
    else the pure Array API path."""
    from .backends import grid_cuda
    from .backends.numba_cpu import is_torch_cpu

    if backend not in ("auto", "numba", "numba_cuda", "array_api"):
        raise ValueError(
            f"unknown grid backend {backend!r}: choose 'auto', 'numba' (NumPy arrays, torch CPU "
            "tensors), 'numba_cuda' (CuPy arrays, torch CUDA tensors) or 'array_api' (any array "
            "library and device)."
        )
    if backend == "numba_cuda" or (backend == "auto" and grid_cuda.is_gpu_array(like)):
        convolver = grid_cuda.BACKEND.convolver(like, xp, required=backend == "numba_cuda")
        return convolver if convolver is not None else ArrayAPIConvolver(xp)
    numba_takes = (isinstance(like, np.ndarray) or is_torch_cpu(like)) and str(like.dtype).endswith(
        ("float32", "float64"))
    if backend == "numba" and not numba_takes:
        raise ValueError(
            f"the 'numba' grid backend runs NumPy arrays and torch CPU tensors (float32/float64), not "
            f"{type(like).__module__.split('.')[0]} {like.dtype} arrays; pass backend='auto'."
        )
    if backend == "array_api" or not numba_takes:
        return ArrayAPIConvolver(xp)
    try:
        return NumbaConvolver(like)
    except ImportError:
        if backend == "numba":
            raise
        return ArrayAPIConvolver(xp)


# --------------------------------------------------------------------------------------
# The solve: pyramid, then the engine's loop on the full grid
# --------------------------------------------------------------------------------------


def _coarsen(w, grid: Grid, xp):
    """Sum ``2**d`` voxels into one (``w``: ``(B, size)``), as :meth:`Grid.coarser`."""
    B = w.shape[0]
    img = xp.reshape(w, (B, *grid.shape))
    for k, n in enumerate(grid.shape):
        if n == 1:
            continue
        axis = k + 1
        if n % 2:
            pad_shape = list(img.shape)
            pad_shape[axis] = 1
            img = xp.concat([img, xp.zeros(tuple(pad_shape), dtype=img.dtype, device=device_of(img))], axis=axis)
        shape = list(img.shape)
        img = xp.sum(xp.reshape(img, (*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1:])), axis=axis + 1)
    return xp.reshape(img, (B, -1))


def pyramid(a, b, grid: Grid, *, xp, min_size: int = PYRAMID_MIN_SIZE):
    """``[(grid, a, b), (coarser grid, a', b'), ...]`` down to ``min_size`` voxels per axis."""
    levels = [(grid, a, b)]
    while max(levels[-1][0].shape) > min_size:
        g, la, lb = levels[-1]
        levels.append((g.coarser(), _coarsen(la, g, xp), _coarsen(lb, g, xp)))
    return levels


def level_schedule(levels, eps_list, voxels_per_blur: float = PYRAMID_VOXELS_PER_BLUR) -> list:
    """``[(level, [eps, ...]), ...]``, coarse to fine: each temperature on the coarsest level
    whose voxels are at most ``sqrt(eps) / voxels_per_blur`` wide; the last on level 0."""
    def level_of(eps):
        blur = math.sqrt(eps)
        fits = [k for k, (g, _, _) in enumerate(levels) if max(g.spacing) * voxels_per_blur <= blur]
        return max(fits) if fits else 0

    chosen = [level_of(eps) for eps in eps_list[:-1]] + [0]
    for i in range(len(chosen) - 2, -1, -1):  # never back to a coarser level
        chosen[i] = max(chosen[i], chosen[i + 1])
    groups = []
    for level, eps in zip(chosen, eps_list):
        if groups and groups[-1][0] == level:
            groups[-1][1].append(eps)
        else:
            groups.append((level, [eps]))
    return groups


def _geometries(grid, B, convolver, xp, like, debias):
    geom = GridGeometry(grid, grid, B, convolver, xp=xp, like=like)
    return Geometries(geom, geom, *((geom, geom) if debias else ()))


def _upsample(pot: Potentials, coarse, fine, B, convolver, xp, like, eps, rho) -> Potentials:
    """The four potentials on the ``fine`` level from those on ``coarse``: one softmin each
    from the coarse voxels (``coarse``, ``fine``: ``(grid, a, b)`` levels)."""
    cross = GridGeometry(fine[0], coarse[0], B, convolver, xp=xp, like=like)
    log_a, log_b = safe_log(coarse[1], xp=xp), safe_log(coarse[2], xp=xp)
    damping = dampening(eps, rho)
    f_ba = damping * cross.softmin(eps, log_b + pot.g_ab / eps)
    g_ab = damping * cross.softmin(eps, log_a + pot.f_ba / eps)
    if pot.f_aa is None:
        return Potentials(f_ba, g_ab)
    f_aa = damping * cross.softmin(eps, log_a + pot.f_aa / eps)
    g_bb = damping * cross.softmin(eps, log_b + pot.g_bb / eps)
    return Potentials(f_ba, g_ab, f_aa, g_bb)


def solve_grid(dens: _Densities, convolver, *, blur, reach, scaling, debias, precision, use_pyramid=True):
    """The Sinkhorn solve on validated densities; returns a :class:`GridResult`."""
    xp, grid = dens.xp, dens.grid
    a, b = stop_gradient(dens.a), stop_gradient(dens.b)
    B = a.shape[0]
    eps_list = epsilon_schedule(2, grid.diameter, blur, scaling)
    eps, rho = eps_list[-1], None if reach is None else reach**2
    levels = pyramid(a, b, grid, xp=xp) if use_pyramid else [(grid, a, b)]
    groups = level_schedule(levels, eps_list)
    per_step = 4 if debias else 2
    pot, counts, previous = None, (0, 0), None
    for index, (level, eps_group) in enumerate(groups):
        g, la, lb = levels[level]
        geoms = _geometries(g, B, convolver, xp, a, debias)
        log_a, log_b = safe_log(la, xp=xp), safe_log(lb, xp=xp)
        if previous is not None:
            pot = _upsample(pot, levels[previous[0]], levels[level], B, convolver, xp, a, previous[1], rho)
            counts = (counts[0] + 1, counts[1] + per_step)
        if index == len(groups) - 1:
            run = sinkhorn_loop(geoms, geoms, log_a, log_b, a, b, eps_group, rho, xp=xp,
                                precision=precision, start=pot, counts=counts)
            break
        if pot is None:
            zeros = xp.zeros_like(log_a)
            pot = _sinkhorn_step(geoms, Potentials(*([zeros] * (4 if debias else 2))), log_a, log_b,
                                 eps_group[0], dampening(eps_group[0], rho))
            counts = (counts[0] + 1, counts[1] + per_step)
        pot = anneal(geoms, pot, log_a, log_b, eps_group, rho)
        counts = (counts[0] + len(eps_group), counts[1] + per_step * len(eps_group))
        previous = (level, eps_group[-1])
    value = sinkhorn_cost(eps, rho, dens.a, dens.b, run.pot, debias=debias, xp=xp)
    marginal_error, converged = convergence_report(run.errors, precision, batched=dens.batched)
    state = _GridState(dens, geoms.xy, Potentials(*(None if v is None else stop_gradient(v) for v in run.pot)),
                       safe_log(a, xp=xp), safe_log(b, xp=xp), debias, len(levels) if use_pyramid else 1)

    def out(v):
        return None if v is None else _unbatch(dens, v)

    pot = run.pot
    return GridResult(
        value=out(value), f=out(pot.f_ba), g=out(pot.g_ab), f_aa=out(pot.f_aa), g_bb=out(pot.g_bb),
        eps_schedule=eps_list, n_iter=run.n_iter, max_change=run.change, eps=eps, rho=rho,
        backend=f"{convolver.name}/grid", marginal_error=marginal_error, converged=converged,
        n_softmin=run.n_softmin, tol=None if precision is None else precision.tol, _state=state,
    )


def _unbatch(dens: _Densities, v):
    """``(B,)`` values or ``(B, size)`` fields back to the input's layout and dtype."""
    xp = dens.xp
    v = xp.astype(v, dens.out_dtype) if v.dtype != dens.out_dtype else v
    if v.ndim == 2:
        v = xp.reshape(v, (v.shape[0], *dens.grid.shape))
    return v if dens.batched else v[0, ...]


class _GridState(NamedTuple):
    dens: _Densities
    geom: GridGeometry
    pot: Potentials
    log_a: Any
    log_b: Any
    debias: bool
    levels: int


class GridGradients(NamedTuple):
    """Gradients of a grid loss with respect to the densities ``a`` and ``b`` (their shapes)."""

    a: Any
    b: Any


@dataclass(frozen=True)
class GridResult(SinkhornResult):
    """What :func:`ot_agnostic.grids.sinkhorn` computed: the attributes of
    :class:`~ot_agnostic.sinkhorn.SinkhornResult`, potentials shaped like the densities
    (``f``, ``g``, ``f_aa``, ``g_bb``), ``backend`` ``"numba/grid"`` or ``"array_api/grid"``.
    Plan rows are images: ``plan_rows(i0, i1)`` has shape ``(i1 - i0, *grid_shape)``
    (flat voxel index ``i`` in C order, ``(B, i1 - i0, *grid_shape)`` for batches)."""

    @property
    def grid(self) -> Grid:
        """The grid (shape, spacing; origin 0)."""
        return self._state.dens.grid

    @property
    def plan_shape(self):
        dens = self._state.dens
        B, n = dens.a.shape
        return ((B,) if dens.batched else ()) + (n, *dens.grid.shape)

    def plan_rows(self, start: int = 0, stop: int | None = None):
        """Rows ``start:stop`` of ``pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, as images."""
        self._warn_if_unconverged("plan")
        state, xp = self._state, self._state.dens.xp
        B, n = state.dens.a.shape
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"plan rows {start}:{stop} are out of range for {n} voxels.")
        f, g = state.pot.f_ba, state.pot.g_ab
        log_pi = ((state.log_a[:, start:stop] + f[:, start:stop] / self.eps)[:, :, None]
                  + (state.log_b + g / self.eps)[:, None, :] - state.geom.cost_rows(start, stop) / self.eps)
        rows = xp.reshape(xp.exp(log_pi), (B, stop - start, *state.dens.grid.shape))
        rows = xp.astype(rows, state.dens.out_dtype) if rows.dtype != state.dens.out_dtype else rows
        return rows if state.dens.batched else rows[0, ...]

    def plan_blocks(self, rows: int | None = None):
        """Iterate over ``(start, stop, plan_rows(start, stop))`` in blocks of ``rows`` rows."""
        B, n = self._state.dens.a.shape
        rows = rows or max(1, 2**20 // max(1, B * n))
        for start in range(0, n, rows):
            yield start, min(n, start + rows), self.plan_rows(start, min(n, start + rows))

    def gradient(self) -> GridGradients:
        """``dS/da``, ``dS/db`` (the densities' shapes): ``f_ba - f_aa``, ``g_ab - g_bb`` when
        balanced and debiased (see ``ot_agnostic.sinkhorn.weight_gradients``)."""
        self._warn_if_unconverged("gradient")
        state = self._state
        xp = state.dens.xp
        grads = weight_gradients(state.pot, stop_gradient(state.dens.a), stop_gradient(state.dens.b),
                                 self.eps, self.rho, debias=state.debias, xp=xp)
        return GridGradients(*(_unbatch(state.dens, stop_gradient(g)) for g in grads))

    def transport_map(self):
        """The barycentric image ``T(x_i) = sum_j pi_ij y_j / sum_j pi_ij`` of every voxel of
        ``a``: a ``(*grid_shape, d)`` array (``(B, *grid_shape, d)``) in the units of ``spacing``."""
        self._warn_if_unconverged("transport map")
        state, xp = self._state, self._state.dens.xp
        geom = state.geom
        h = state.log_b + state.pot.g_ab / self.eps
        mapped = geom.softmax_weighted_sum(self.eps, h, geom._points(geom.y_grid))
        B, d = mapped.shape[0], state.dens.grid.ndim
        mapped = xp.reshape(mapped, (B, *state.dens.grid.shape, d))
        mapped = xp.astype(mapped, state.dens.out_dtype) if mapped.dtype != state.dens.out_dtype else mapped
        return mapped if state.dens.batched else mapped[0, ...]


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def sinkhorn(a, b, *, blur, reach=None, scaling=0.5, debias=True, spacing=1.0, batch=False,
             tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER, backend="auto", pyramid=True) -> GridResult:
    r"""Entropic OT between two densities on one regular grid (images, volumes), separably.

    ``OT_eps(a, b) = max_{f, g} <a, f> + <b, g> - eps <a x b, exp((f + g - C) / eps) - 1>`` on
    the voxel centres ``x_i = i * spacing``, ``C(x, y) = |x - y|**2 / 2``, ``eps = blur**2``;
    with ``debias`` the value is ``S_eps = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2``.
    The same numbers as :func:`ot_agnostic.sinkhorn` on the weighted voxel centres, in
    ``O(n (n_1 + ... + n_d))`` time per pass and ``O(n)`` memory.

    Parameters
    ----------
    a, b : non-negative densities of one shape: ``(n_1,)``, ``(H, W)``, ``(H, W, L)``, or with
        ``batch=True`` ``(B, H, W[, L])`` (items solved together, each stops at its own tol).
        Any Array API library (NumPy and torch CPU run Numba kernels).
    blur : the entropic length scale, in the units of ``spacing``; ``eps = blur**2``.
    reach : None (balanced: equal masses required) or a length: unbalanced OT, ``rho = reach**2``.
    scaling : eps-scaling ratio in (0, 1).
    debias : True for ``S_eps``, False for ``OT_eps``.
    spacing : the voxel size, one number or one per axis (e.g. millimetres).
    batch : whether the first axis indexes a batch of densities.
    tol, max_iter : the precision asked for and the cap on refinement updates, as in
        :func:`ot_agnostic.sinkhorn` (``tol=None``: the fixed eps-scaling schedule).
    backend : "auto", "numba" (NumPy arrays, torch CPU tensors), "numba_cuda" (CuPy arrays,
        torch CUDA tensors) or "array_api" (any library).
    pyramid : run the large temperatures on coarser grids (see the module docstring).

    Returns
    -------
    GridResult
        ``value``, potentials shaped like ``a``, ``gradient()`` (``dS/da``, ``dS/db``),
        ``transport_map()``, ``plan_rows()``, ``marginal_error``, ``converged``, ...

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:32, :32]
    >>> blob = np.exp(-((xx - 12.0) ** 2 + (yy - 14.0) ** 2) / 8)
    >>> moved = np.exp(-((xx - 16.0) ** 2 + (yy - 14.0) ** 2) / 8)
    >>> res = sinkhorn(blob / blob.sum(), moved / moved.sum(), blur=1.0)
    >>> round(float(res.value), 2)  # |v|**2 / 2 for a translation by v = (0, 4)
    8.0
    >>> res.f.shape, res.backend
    ((32, 32), 'numba/grid')
    """
    blur = check_positive(blur, "blur")
    reach = check_positive(reach, "reach", allow_none=True)
    check_power(blur, 2, "blur", "eps")
    check_power(reach, 2, "reach", "rho")
    scaling = check_scaling(scaling)
    tol, max_iter = check_tol(tol), check_max_iter(max_iter)
    dens = validate_densities(a, b, batch=bool(batch), spacing=spacing, balanced=reach is None)
    convolver = _convolver(backend, dens.a, dens.xp)
    result = solve_grid(
        dens, convolver, blur=blur, reach=reach, scaling=scaling, debias=bool(debias),
        precision=None if tol is None else Precision(tol, max_iter), use_pyramid=bool(pyramid),
    )
    warn_if_not_converged(result)
    return result


def sinkhorn_divergence(a, b, *, blur, reach=None, scaling=0.5, debias=True, spacing=1.0, batch=False,
                        tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER, backend="auto", pyramid=True):
    r"""The debiased Sinkhorn divergence ``S_eps(a, b)`` between two densities on one grid.

    ``S_eps = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2 >= 0`` with ``C = |x - y|**2 / 2``
    on the voxel centres, ``eps = blur**2``; a density translated by ``v`` (well inside the
    grid) is at ``|v|**2 / 2``. torch inputs give autograd gradients with respect to the
    densities. Arguments as in :func:`sinkhorn`.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros(64); a[10:20] = 0.1
    >>> b = np.zeros(64); b[30:40] = 0.1
    >>> round(float(sinkhorn_divergence(a, b, blur=0.5)), 1)  # shift of 20 voxels: 20**2 / 2
    200.0
    """
    return sinkhorn(a, b, blur=blur, reach=reach, scaling=scaling, debias=debias, spacing=spacing,
                    batch=batch, tol=tol, max_iter=max_iter, backend=backend, pyramid=pyramid).value


def value_and_grad(a, b, *, blur, reach=None, scaling=0.5, debias=True, spacing=1.0, batch=False,
                   tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER, backend="auto", pyramid=True):
    r"""``(S_eps(a, b), GridGradients(dS/da, dS/db))`` without autograd (NumPy, CuPy, ...).

    Balanced and debiased: ``dS/da = f_ba - f_aa``, ``dS/db = g_ab - g_bb`` (envelope theorem;
    defined up to an additive constant, since the masses are fixed). Arguments as in :func:`sinkhorn`.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros(32); a[4:8] = 0.25
    >>> b = np.zeros(32); b[20:24] = 0.25
    >>> value, grads = value_and_grad(a, b, blur=0.5)
    >>> grads.a.shape
    (32,)
    """
    result = sinkhorn(a, b, blur=blur, reach=reach, scaling=scaling, debias=debias, spacing=spacing,
                      batch=batch, tol=tol, max_iter=max_iter, backend=backend, pyramid=pyramid)
    return result.value, result.gradient()


# --------------------------------------------------------------------------------------
# Barycenters
# --------------------------------------------------------------------------------------


class GridBarycenter(NamedTuple):
    """What :func:`barycenter` computed: the ``density`` (the grid's shape), the measured
    ``marginal_error`` of its last update, the number of updates ``n_iter`` and ``converged``."""

    density: Any
    marginal_error: float
    n_iter: int
    converged: bool


def _barycenter_weights(weights, K):
    if weights is None:
        return [1.0 / K] * K
    values = [float(w) for w in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if len(values) != K or not all(math.isfinite(w) and w >= 0 for w in values) or not sum(values) > 0:
        raise ValueError(
            f"weights must be {K} non-negative numbers with a positive sum (one per density), got {weights!r}."
        )
    return [w / sum(values) for w in values]


def barycenter(densities, weights=None, *, blur, spacing=1.0, debiased=False, tol=1e-5, max_iter=5000,
               scaling=0.5, accelerate=True, backend="auto") -> GridBarycenter:
    r"""Entropic Wasserstein barycenter of ``K`` densities on one grid (convolutional).

    ``argmin_c sum_k w_k OT_eps(c, a_k)``, ``C = |x - y|**2 / 2`` on the voxel centres,
    ``eps = blur**2``, by iterative Bregman projections in the log domain (Benamou et al. 2015;
    Solomon et al. 2015, "Convolutional Wasserstein distances"): with ``conv(h)_i =
    log sum_j exp(h_j - C_ij / eps)`` (the separable softmin of ``GridGeometry``),

        log c = sum_k w_k conv(F_k),   G_k = log c - conv(F_k),   F_k = log a_k - conv(G_k).

    ``debiased=True``: Janati et al. 2020's debiased barycenter, ``log c`` plus ``log d`` with
    ``d`` the fixed point of ``d = sqrt(d c / K d)`` (ten updates per iteration): sharper, it
    removes the entropic blur. Stops when every plan's marginals match ``a_k`` and ``c`` to
    ``tol`` (L1, relative to the mass; debiased: and ``d K d = c`` to ``tol``), at most
    ``max_iter`` updates at the final ``eps`` (then a ConvergenceWarning).

    ``accelerate=True``: eps-scaling (``blur`` times ``scaling`` per step) on a pyramid of
    coarser grids first, then Anderson-mixed updates (the same fixed point, far fewer
    updates; debiased: plain updates after the pyramid, mixing makes its ``d`` oscillate);
    ``False``: the plain updates from zero, as POT. ``n_iter`` counts the updates on the full
    grid at the final ``eps`` (those ``max_iter`` bounds), not the coarse levels'. ``densities``: a ``(K, *grid_shape)``
    array (or a list of arrays) of equal masses; POT's ``convolutional_barycenter2d(A, reg)``
    on ``(K, H, W)`` images is ``spacing=(1 / (H - 1), 1 / (W - 1))``, ``blur = sqrt(reg / 2)`` here.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((2, 40)); a[0, 5:10] = 0.2; a[1, 25:30] = 0.2
    >>> bar = barycenter(a, blur=1.0, debiased=True)
    >>> round(float((np.arange(40) * bar.density).sum()), 1)  # the mean moves half way
    17.0
    """
    if isinstance(densities, (list, tuple)):
        if not densities:
            raise ValueError("densities is empty: give at least one density.")
        xp = array_namespace(*densities)
        densities = xp.stack(list(densities), axis=0)
    blur = check_positive(blur, "blur")
    check_power(blur, 2, "blur", "eps")
    tol, max_iter = check_tol(tol), check_max_iter(max_iter)
    if tol is None:
        raise ValueError("barycenter needs a tol (the marginal error to reach, e.g. 1e-5).")
    scaling = check_scaling(scaling)
    dens = validate_densities(densities, densities, batch=True, spacing=spacing, balanced=False)
    xp, grid = dens.xp, dens.grid
    A = stop_gradient(dens.a)
    masses = [to_float(m) for m in xp.sum(A, axis=1)]
    rtol = BALANCE_RTOL[8 if A.dtype == xp.float64 else 4]
    for k, m in enumerate(masses):
        if abs(m - masses[0]) > rtol * max(m, masses[0]):
            raise ValueError(
                f"the densities must have equal masses: density 0 has {masses[0]:.6g}, density {k} has "
                f"{m:.6g}. Normalise them (a / a.sum()) first."
            )
    ibp = _IBP(A, _barycenter_weights(weights, A.shape[0]), debiased, _convolver(backend, A, xp), xp)
    eps = blur**2
    if accelerate:
        state = ibp.anneal(grid, epsilon_schedule(2, grid.diameter, blur, scaling), tol)
    else:
        state = ibp.start(grid, A, eps)
    state, error, updates = ibp.refine(state, grid, A, eps, tol, max_iter, mix=accelerate and not debiased)
    converged = error <= tol
    if not converged:
        warnings.warn(
            f"barycenter stopped at max_iter={max_iter} with a marginal error of {error:.3g} (tol={tol:g}); "
            "raise max_iter, use a larger blur, or a larger tol.", ConvergenceWarning, stacklevel=user_stacklevel(),
        )
    density = xp.reshape(xp.exp(state.log_c[0]), grid.shape)
    density = xp.astype(density, dens.out_dtype) if density.dtype != dens.out_dtype else density
    return GridBarycenter(density, float(error), updates, bool(converged))


#: The accelerated barycenter refines each temperature before the last with at most this
#: many updates, to this error (the last temperature of a coarse level: to ``tol``).
COARSE_MAX_ITER = 200
INTERMEDIATE_TOL = 0.1
#: ... and solves the final ``eps`` first on voxels up to ``blur / this`` wide (2 blur): a
#: coarse grid's solution at the final eps is a far better start than one at a larger eps.
BARYCENTER_VOXELS_PER_BLUR = 0.5


class _IBPState(NamedTuple):
    """Iterative Bregman projections on one level: ``F`` (``(K, n)``, ``-inf`` off the supports),
    ``G`` and ``log c`` of the last update, ``log d`` (debiased; else None)."""

    F: Any
    G: Any
    log_c: Any
    log_d: Any


class _IBP:
    """The updates of :func:`barycenter` on any level of the pyramid of the densities ``A``."""

    def __init__(self, A, lam, debiased, convolver, xp):
        self.A, self.lam, self.debiased, self.convolver, self.xp = A, lam, debiased, convolver, xp

    def conv(self, x_grid, y_grid, eps, h):
        geom = GridGeometry(x_grid, y_grid, h.shape[0], self.convolver, xp=self.xp, like=self.A)
        return geom._log_convolve(eps, h)

    def step(self, state: _IBPState, grid, log_a, eps) -> _IBPState:
        """``F -> (log c, G) -> F_new``: one update of all ``K`` plans (and of ``d``)."""
        log_ku = self.conv(grid, grid, eps, state.F)
        log_c = sum(w * log_ku[k:k + 1] for k, w in enumerate(self.lam))
        log_d = state.log_d
        if self.debiased:
            log_c = log_c + log_d
            for _ in range(10):
                log_d = 0.5 * (log_d + log_c - self.conv(grid, grid, eps, log_d))
        G = log_c - log_ku
        return _IBPState(log_a - self.conv(grid, grid, eps, G), G, log_c, log_d)

    def start(self, grid, a, eps) -> _IBPState:
        """The first half-update from ``G = 0`` (and ``log d = 0``), as POT."""
        xp = self.xp
        log_a = safe_log(a, xp=xp)
        zeros = xp.zeros_like(log_a)
        return _IBPState(log_a - self.conv(grid, grid, eps, zeros), zeros, None,
                         zeros[:1] if self.debiased else None)

    def anneal(self, grid, eps_list, tol) -> _IBPState:
        """eps-scaling coarse to fine on the pyramid of the densities; each temperature is
        refined (to ``INTERMEDIATE_TOL``; the last one of a level to ``tol``), and the final
        ``eps`` is solved first on the coarsest level whose voxels are at most ``2 blur``
        wide, then on every finer one. A new level starts from ``F = log a - conv(G)``, ``G``
        on the coarser grid (one softmin). Returns the start of the full grid's refinement."""
        levels = pyramid(self.A, self.A, grid, xp=self.xp)
        eps = eps_list[-1]
        groups = level_schedule(levels, [*eps_list, eps], BARYCENTER_VOXELS_PER_BLUR)
        finest_coarse = groups[-2][0] if len(groups) > 1 else 0
        groups = groups[:-1] + [(level, [eps]) for level in range(finest_coarse - 1, 0, -1)] + groups[-1:]
        state, previous = None, None
        for index, (level, eps_group) in enumerate(groups):
            g, a = levels[level][0], levels[level][1]
            if state is None:
                state = self.start(g, a, eps_group[0])
            else:
                coarse, last_eps = previous
                F = safe_log(a, xp=self.xp) - self.conv(g, coarse, last_eps, state.G)
                log_d = None if state.log_d is None else _spread(state.log_d, coarse, g, self.xp)
                state = _IBPState(F, None, None, log_d)
            final_level = index == len(groups) - 1
            temperatures = eps_group[:-1] if final_level else eps_group
            for i, t in enumerate(temperatures):
                level_tol = tol if i == len(temperatures) - 1 and not final_level else max(tol, INTERMEDIATE_TOL)
                state = self.refine(state, g, a, t, level_tol, COARSE_MAX_ITER, mix=not self.debiased)[0]
            previous = (g, eps_group[-1])
        return state

    def refine(self, state: _IBPState, grid, a, eps, tol, max_iter, *, mix):
        """Updates at ``eps`` on the full grid until the error is below ``tol``; with ``mix``,
        Anderson-mixed (see :class:`~ot_agnostic.sinkhorn.Anderson`) on ``(F, log d)``.
        Returns ``(state, error, updates)``: ``state.log_c`` is the barycenter of plans
        ``(F, G)`` whose ``c``-marginals are exact and whose ``a_k``-marginals are off by ``error``."""
        xp = self.xp
        log_a = safe_log(a, xp=xp)
        support = a > 0
        lam = xp.asarray(self.lam, dtype=a.dtype, device=device_of(a))[:, None]
        weights = xp.reshape(a * lam, (1, -1)) / xp.sum(a[0])
        anderson, error, updates, current = None, math.inf, 0, state
        while updates < max_iter:
            updates += 1
            new = self.step(current, grid, log_a, eps)
            error = self.error(current, new, grid, a, eps)
            if error <= tol or updates == max_iter:
                return _IBPState(current.F, new.G, new.log_c, new.log_d), error, updates
            if not mix:
                current = new
                continue
            if anderson is None:
                mass = to_float(xp.sum(xp.exp(new.log_c)))
                extra = () if new.log_d is None else (xp.exp(new.log_c) / mass,)
                anderson = Anderson(xp.concat([weights, *extra], axis=1), xp=xp)
            mixed, _ = anderson.mix(self.pack(current, support), self.pack(new, support), [True])
            current = self.unpack(mixed, new, support, log_a)
        return current, error, updates

    def error(self, before: _IBPState, after: _IBPState, grid, a, eps) -> float:
        """L1 error of the ``a_k``-marginals of the plans ``(F, G_new)`` (relative to the mass),
        and (debiased) of ``d K d = c``: the residual ``exp(F - F_new) - 1`` weighted by ``a``."""
        xp = self.xp
        errors = _relative_l1(a, xp.where(a > 0, before.F - after.F, xp.zeros_like(a)), xp)
        error = to_float(xp.max(errors))
        if self.debiased:
            residual = after.log_d + self.conv(grid, grid, eps, after.log_d) - after.log_c
            error = max(error, to_float(_relative_l1(xp.exp(after.log_c), residual, xp)[0]))
        return error

    def pack(self, state: _IBPState, support):
        xp = self.xp
        parts = [xp.reshape(xp.where(support, state.F, xp.zeros_like(state.F)), (1, -1))]
        return xp.concat(parts + ([] if state.log_d is None else [state.log_d]), axis=1)

    def unpack(self, z, template: _IBPState, support, log_a) -> _IBPState:
        xp = self.xp
        K, n = support.shape
        F = xp.where(support, xp.reshape(z[:, :K * n], (K, n)), log_a)
        return _IBPState(F, template.G, template.log_c, None if template.log_d is None else z[:, K * n:])


def _relative_l1(w, log_ratio, xp):
    """``(B,)`` values ``sum_i w_i |exp(log_ratio_i) - 1| / sum_i w_i`` (ratios capped at ``e**50``)."""
    capped = xp.where(log_ratio > 50.0, xp.asarray(50.0, dtype=log_ratio.dtype, device=device_of(w)), log_ratio)
    return xp.sum(w * xp.abs(xp.expm1(capped)), axis=1) / xp.sum(w, axis=1)


def _spread(v, coarse: Grid, fine: Grid, xp):
    """``log d`` from a coarse level to the finer one: linear interpolation between the
    coarse voxel centres (a fine voxel ``i`` sits at coarse coordinate ``(i - 1/2) / 2``),
    minus ``log 2`` per merged axis (the parent's mass shared by its children). Smooth on
    purpose: a blocky ``d`` would survive in the debiased barycenter, whose objective hardly
    sees patterns finer than ``blur``."""
    B = v.shape[0]
    img = xp.reshape(v, (B, *coarse.shape))
    merged = 0
    for k, (nc, nf) in enumerate(zip(coarse.shape, fine.shape)):
        if nc == nf:
            continue
        merged += 1
        t = np.clip((np.arange(nf) - 0.5) / 2, 0, nc - 1)
        low = np.minimum(np.floor(t).astype(np.int64), max(nc - 2, 0))
        frac = t - low
        shape = [1] * img.ndim
        shape[k + 1] = nf
        w = xp.reshape(xp.asarray(frac, dtype=v.dtype, device=device_of(v)), tuple(shape))
        below = xp.take(img, xp.asarray(low, device=device_of(v)), axis=k + 1)
        above = xp.take(img, xp.asarray(np.minimum(low + 1, nc - 1), device=device_of(v)), axis=k + 1)
        img = below + w * (above - below)
    return xp.reshape(img, (B, -1)) - merged * _LN2
