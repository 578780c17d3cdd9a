"""torch tensors through the Numba kernels: zero-copy views and the autograd Functions.

:class:`TorchGeometry` wraps a *raw* geometry (a :class:`~.numba_cpu.NumbaGeometry` over
NumPy views of CPU tensors, or a :class:`~.numba_cuda.NumbaCudaGeometry` over CUDA
tensors) whose reductions do not know autograd, and makes its ``softmin`` and
``kernel_sum`` differentiable with respect to both point clouds and to the log-weights
or weights, through one ``torch.autograd.Function`` each. Their backward passes are
reductions of the same raw geometry (and of its transpose), so they run in the same
kernels and keep ``O(N + M)`` memory:

* softmin ``s_i = -eps log sum_j exp(h_j - C_ij / eps)``, with ``w_ij = exp(h_j + (s_i -
  C_ij) / eps)`` (rows sum to 1) and an incoming gradient ``u``:
  ``ds/dx_i = u_i sum_j w_ij grad_x C_ij`` (``softmin_grad``);
  ``ds/dh_j = -eps m_j`` and ``ds/dy_j = m_j G_j``, where, for each sign part ``u^+``,
  ``u^-`` of ``u``, ``m_j = sum_i u_i w_ij = exp(h_j - S_j / eps)`` with the transposed
  softmin ``S = softmin_yx(s / eps + log u)`` and ``G = softmin_grad_yx(s / eps + log u)``;
* kernel sum ``k_i = sum_j k(x_i, y_j) v_j``: ``dk/dv = K^T u`` (a transposed kernel
  sum), and the point gradients ``sum_j v_j grad k(x_i, y_j)`` from a softmin and its
  gradient at the kernel's temperature (``k = exp(-C / eps)``: Gaussian ``C = |x - y|^2 /
  2``, ``eps = blur^2``; Laplacian ``C = |x - y|``, ``eps = blur``; energy ``k = -|x -
  y|``, a softmin gradient at ``eps = 1e30`` whose weights are ``v_j / sum v``).

The Sinkhorn loop only ever differentiates the first point cloud of its final update
(with gradient-free potentials): that is one ``softmin_grad`` pass per geometry, the
envelope gradients of :meth:`ot_agnostic.SinkhornResult.gradient`. ``softmin_grad`` and
``softmax_weighted_sum`` themselves are first order: they refuse tracked inputs with a
clear error. Second derivatives are refused by the inputs' guard (see
:func:`ot_agnostic._array_api.first_order_only`).

This module imports torch: the plugins import it when torch tensors arrive, never before.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .._array_api import LOG_ZERO

#: The temperature at which a softmin gradient's weights are ``v_j / sum v`` to the last
#: bit for any distance below 1e20 (the energy kernel's point gradients).
FLAT_EPS = 1e30


class TorchGeometry:
    """torch tensors ``x (B, N, D)``, ``y (B, M, D)`` whose reductions run in ``raw``.

    ``to_raw(t)`` turns a (detached) tensor into what ``raw`` reads (a NumPy view of a CPU
    tensor; the tensor itself on CUDA), ``from_raw(a)`` turns its outputs back into
    tensors (``torch.from_numpy``: no copy).
    """

    def __init__(self, x, y, cost, raw, *, xp, to_raw, from_raw):
        self.x, self.y, self.cost, self.raw, self.xp = x, y, cost, raw, xp
        self.to_raw, self.from_raw = to_raw, from_raw
        self.shape = raw.shape

    def transpose(self):
        return TorchGeometry(
            self.y, self.x, self.cost, self.raw.transpose(), xp=self.xp,
            to_raw=self.to_raw, from_raw=self.from_raw,
        )

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    # -- differentiable reductions ------------------------------------------------------

    def softmin(self, eps, h):
        if _tracked(self.x, self.y, h):
            return _Softmin.apply(self.x, self.y, h, self, float(eps))
        return self.raw_call(self.raw.softmin, eps, h)

    def kernel_sum(self, kernel, v):
        if _tracked(self.x, self.y, v):
            return _KernelSum.apply(self.x, self.y, v, self, kernel)
        return self.raw_call(self.raw.kernel_sum, kernel, v)

    # -- first-order reductions ---------------------------------------------------------

    def softmin_grad(self, eps, h):
        self._refuse_tracked("softmin_grad", h)
        return self.raw_call(self.raw.softmin_grad, eps, h)

    def softmax_weighted_sum(self, eps, h, v):
        self._refuse_tracked("softmax_weighted_sum", h, v)
        return self.raw_call(self.raw.softmax_weighted_sum, eps, h, v)

    # -- plumbing -----------------------------------------------------------------------

    def raw_call(self, method, *args):
        """``method`` of a raw geometry on ``args`` (tensors become raw views), as a tensor."""
        raw_args = [self.to_raw(a.detach()) if isinstance(a, torch.Tensor) else a for a in args]
        return self.from_raw(method(*raw_args))

    def _refuse_tracked(self, name, *tensors):
        if _tracked(self.x, self.y, *tensors):
            raise RuntimeError(
                f"{name} on the {self.raw_name} backend is not differentiable (transport maps, "
                "plan-weighted sums): call it under torch.no_grad() or on detached tensors, or "
                "pass backend='keops' (KeOps differentiates it)."
            )

    @property
    def raw_name(self) -> str:
        return "'numba_cuda'" if self.x.is_cuda else "'numba'"


def _tracked(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _parts(u):
    """The non-negative parts ``(sign, |u| on that sign)`` of ``u`` that are not all zero."""
    parts = []
    for sign in (1.0, -1.0):
        part = torch.clamp(sign * u, min=0)
        if bool(torch.any(part > 0)):
            parts.append((sign, part))
    return parts


def _log(w):
    """``log(w)``, ``LOG_ZERO`` where ``w == 0`` (``w >= 0``)."""
    positive = w > 0
    return torch.where(positive, torch.log(torch.where(positive, w, torch.ones_like(w))), LOG_ZERO)


def _weighted_column_sums(geom_t, eps, s, h, u, *, moments: bool):
    """``(m, G)`` with ``m_j = sum_i u_i w_ij`` and ``G_j = sum_i u_i w_ij grad_y C(x_i, y_j)``
    (None unless ``moments``), for the softmin weights ``w_ij = exp(h_j + (s_i - C_ij) / eps)``
    of the geometry whose transpose is ``geom_t`` (sign parts of ``u`` separately)."""
    mass = torch.zeros_like(h)
    moment = None
    for sign, part in _parts(u):
        h_t = s / eps + _log(part)
        log_m = h - geom_t.raw_call(geom_t.raw.softmin, eps, h_t) / eps
        m = torch.exp(torch.clamp(log_m, max=math.log(torch.finfo(h.dtype).max) - 1))
        mass = mass + sign * m
        if moments:
            term = sign * m[..., None] * geom_t.raw_call(geom_t.raw.softmin_grad, eps, h_t)
            moment = term if moment is None else moment + term
    if moments and moment is None:
        moment = torch.zeros(h.shape + (geom_t.x.shape[-1],), dtype=h.dtype, device=h.device)
    return mass, moment


class _Softmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h, geom, eps):
        s = geom.raw_call(geom.raw.softmin, eps, h)
        ctx.geom, ctx.eps = geom, eps
        ctx.save_for_backward(x, y, h, s)
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        x, y, h, s = ctx.saved_tensors
        geom, eps = ctx.geom, ctx.eps
        grad_x = grad_y = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = u[..., None] * geom.raw_call(geom.raw.softmin_grad, eps, h)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mass, moment = _weighted_column_sums(
                geom.transpose(), eps, s, h, u, moments=ctx.needs_input_grad[1])
            grad_h = -eps * mass if ctx.needs_input_grad[2] else None
            grad_y = moment
        return grad_x, grad_y, grad_h, None, None


def _kernel_temperature(kernel, cost) -> float:
    """The ``eps`` with ``k = exp(-C / eps)`` (Gaussian, Laplacian), or :data:`FLAT_EPS` (energy)."""
    if kernel.name == "energy":
        return FLAT_EPS
    return kernel.blur**2 if cost.p == 2 else kernel.blur


def _kernel_point_grad(geom, kernel, v):
    """``sum_j v_j grad_x k(x_i, y_j)``, a ``(B, N, D)`` tensor, for ``v (B, M)`` of any sign."""
    eps = _kernel_temperature(kernel, geom.cost)
    out = torch.zeros(geom.x.shape, dtype=geom.x.dtype, device=geom.x.device)
    for sign, part in _parts(v):
        log_v = _log(part)
        grad = geom.raw_call(geom.raw.softmin_grad, eps, log_v)  # sum_j w_ij grad C, rows sum to 1
        if kernel.name == "energy":  # k = -C: sum_j v_j grad k = -(sum v) * grad
            scale = -torch.sum(part, dim=1)[:, None]
        else:  # k = exp(-C / eps): sum_j v_j grad k = -(1 / eps) (sum_j v_j k_ij) * grad
            scale = -torch.exp(-geom.raw_call(geom.raw.softmin, eps, log_v) / eps) / eps
        out = out + sign * scale[..., None] * grad
    return out


class _KernelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, v, geom, kernel):
        ctx.geom, ctx.kernel = geom, kernel
        ctx.save_for_backward(x, y, v)
        return geom.raw_call(geom.raw.kernel_sum, kernel, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        x, y, v = ctx.saved_tensors
        geom, kernel = ctx.geom, ctx.kernel
        grad_x = grad_y = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = u[..., None] * _kernel_point_grad(geom, kernel, v)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            geom_t = geom.transpose()
            if ctx.needs_input_grad[1]:
                grad_y = v[..., None] * _kernel_point_grad(geom_t, kernel, u)
            if ctx.needs_input_grad[2]:
                grad_v = geom_t.raw_call(geom_t.raw.kernel_sum, kernel, u)
        return grad_x, grad_y, grad_v, None, None
