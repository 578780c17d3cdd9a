"""KeOps (pykeops) reductions on torch tensors, CPU and CUDA, with torch autograd.

Every reduction is a KeOps formula over the ``N x M`` pairs: nothing of size ``N x M`` is
ever stored, memory is ``O(B (N + M) (D + K))``. Inputs are batched: ``x (B, N, D)``,
``y (B, M, D)``, ``h (B, M)``, ``v (B, M)`` or ``(B, M, K)``, of one floating dtype
(float32 or float64), on one device. The ground cost is ``C(x, y) = |x - y|**p / p`` for
``p`` in ``{1, 2}``, computed in the formula from coordinate differences (so ``C(x, x) = 0``
exactly); its gradient at ``x = y`` is taken as 0 for ``p = 1`` (KeOps' ``Rsqrt(0) = 0``).

Formulas are always built in KeOps' "batch mode" (``(B, N, 1, D)`` LazyTensors, even for
``B = 1``), so that a batched and an unbatched call share one compiled binary. Temperatures
and kernel widths are KeOps *parameters* (not constants): changing ``eps`` never recompiles.
Each distinct formula (per dtype, dimension ``D``, ``p``, device type) is compiled once,
10-20 s with g++ on a CPU, then loaded from KeOps' cache folder (``KEOPS_CACHE_FOLDER``).
The formulas used, per dtype and ``D``:

* ``softmin`` (forward): ``log sum_j exp(h_j - C_ij / eps)`` (``logsumexp`` reduction);
* ``softmin`` (backward) and ``softmin_grad``: one ``Sum`` reduction
  ``sum_j exp(a_i + h_j - C_ij / eps) u_j [1, grad_1 C(x_i, y_j)]`` that gives the gradient
  with respect to ``x`` (``a = -lse``, ``u = 1``) and, run on the transposed pair, the
  gradients with respect to ``y`` and ``h`` (``a = h``, ``h = -lse``, ``u =`` the incoming
  gradient);
* ``kernel_sum`` (forward): ``sum_j k(x_i, y_j) v_j``; (backward): one ``Sum`` reduction
  ``sum_j v_j [k(x_i, y_j), k'(x_i, y_j)]`` that gives the gradient with respect to
  ``x`` and, run on the transposed pair, those with respect to ``y`` and ``v``;
* ``softmax_weighted_sum``: a ``sumsoftmaxweight`` reduction (differentiated by pykeops'
  own autograd if asked to).

This module imports nothing from ``ot_agnostic``. It imports torch and pykeops on first use
(:func:`require` does it at once), so that importing it never fails, e.g. when pytest
collects doctests on a machine without them.
"""

from __future__ import annotations

import functools
import threading

__all__ = [
    "KERNELS", "formula_softmax_weighted_sum", "formula_softmin", "formula_softmin_grad",
    "keops_ranges", "kernel_sum", "require", "self_test", "softmax_weighted_sum",
    "softmax_weighted_sum_ranges", "softmin", "softmin_grad", "softmin_grad_ranges", "softmin_ranges",
]

#: The radial kernels ``k(x, y) = phi(|x - y|)`` that :func:`kernel_sum` knows.
KERNELS = ("energy", "gaussian", "laplacian")


# ----------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------


#: Held around every KeOps reduction. pykeops keeps one shared object per compiled formula
#: and a call stores its argument, output and shape pointers on that object before it
#: launches the kernel (``LoadKeOps.genred``): two threads running the same formula at once
#: can swap pointers, so that one writes into the other's output and leaves its own
#: uninitialised (wrong values, no error). Reentrant: our reductions take it and pykeops'
#: reductions, which :func:`_guard_pykeops` makes take it too, run inside them. It is never
#: held while autograd runs a backward (which, for CUDA tensors, runs on another thread).
LOCK = threading.RLock()


@functools.cache
def _deps():
    import torch
    from pykeops.torch import LazyTensor

    _guard_pykeops()
    return torch, LazyTensor


def _guard_pykeops() -> None:
    """Make every pykeops torch reduction hold :data:`LOCK`, also those that pykeops' own
    autograd runs in a backward pass (``softmax_weighted_sum`` and the formula costs are
    differentiated by pykeops), and the compilation of a new formula. It wraps
    ``GenredAutograd_base._forward``, the one function through which pykeops (2.x) runs a
    reduction; if a later pykeops has no such function, only the reductions called from this
    module are locked."""
    try:
        from pykeops.torch.generic.generic_red import GenredAutograd_base as base
    except ImportError:  # pragma: no cover - another pykeops layout
        return
    with LOCK:  # two threads' first calls: wrap once
        forward = base.__dict__.get("_forward")
        if not isinstance(forward, staticmethod) or getattr(forward.__func__, "_ot_agnostic_lock", False):
            return
        forward = forward.__func__

        @functools.wraps(forward)
        def locked_forward(*args, **kwargs):
            with LOCK:
                return forward(*args, **kwargs)

        locked_forward._ot_agnostic_lock = True
        base._forward = staticmethod(locked_forward)


def require() -> None:
    """Import torch and pykeops now; raises ``ImportError`` (or pykeops' own error) if unusable."""
    _deps()


def _lazy(t):
    """``pykeops.torch.LazyTensor(t)``."""
    return _deps()[1](t)


def _var(t, axis):
    """A ``(B, n, K)`` tensor as a batched ``i``- (``axis = 0``) or ``j``-indexed (``axis = 1``)
    LazyTensor, whatever ``n``.

    pykeops infers the kind of a variable from its shape, and reads ``(B, 1, 1, K)`` as a
    *parameter*: a single point (``N = 1`` or ``M = 1``) would silently change the formula
    (and crash on the output's shape). It cannot be told the axis in batch mode, so a size-1
    axis is built on a 2-point stand-in (a broadcast view of ``t``) whose data is then
    swapped for ``t``: the formula text is that of any other ``n``, so is its compiled binary.
    """
    t = t.contiguous()
    view = (lambda u: u[:, :, None, :]) if axis == 0 else (lambda u: u[:, None, :, :])
    if t.shape[1] != 1:
        return _lazy(view(t))
    B, _, K = t.shape
    lazy = _lazy(view(t.expand(B, 2, K)))
    (stand_in,) = lazy.variables
    data = t.view(B, 1, K)  # a new object: KeOps tells variables apart by id()
    tag = f"Var({id(stand_in)},{K},{axis})"
    if lazy.formula != tag:  # pragma: no cover - a pykeops whose LazyTensor is built otherwise
        raise RuntimeError(f"unexpected pykeops LazyTensor {lazy.formula!r} for a single point")
    lazy.variables = (data,)
    lazy.formula = f"Var({id(data)},{K},{axis})"
    if axis == 0:
        lazy.ni = 1
    else:
        lazy.nj = 1
    return lazy


def _rows(t):
    """A ``(B, N)`` or ``(B, N, D)`` tensor as an ``i``-indexed LazyTensor."""
    return _var(t if t.dim() == 3 else t[:, :, None], 0)


def _cols(t):
    """A ``(B, M)`` or ``(B, M, D)`` tensor as a ``j``-indexed LazyTensor."""
    return _var(t if t.dim() == 3 else t[:, :, None], 1)


def _param(value, like):
    """A KeOps parameter (never a Python float: pykeops folds ``* 1.0`` and ``* -1.0`` into the
    formula, which would compile a new formula for ``eps = 1``)."""
    torch, _ = _deps()
    return _lazy(torch.tensor([value], dtype=like.dtype, device=like.device))


def _cost(x, y, p):
    """The symbolic ``C(x_i, y_j)`` and ``grad_x C(x_i, y_j)`` (0 at ``x = y`` for ``p = 1``)."""
    diff = _rows(x) - _cols(y)
    sq = (diff**2).sum(-1)
    if p == 2:
        return sq / 2, diff
    return sq.sqrt(), diff * sq.rsqrt()


def _lse(x, y, h, eps, p):
    """``log sum_j exp(h_j - C(x_i, y_j) / eps)``, a ``(B, N)`` tensor."""
    cost, _ = _cost(x, y, p)
    lazy = _cols(h) - cost * _param(1.0 / eps, x)
    with LOCK:
        return lazy.logsumexp(dim=2)[:, :, 0]


def _weighted_cost_grads(x, y, a, h, u, eps, p):
    """``sum_j exp(a_i + h_j - C_ij / eps) u_j [1, grad_x C(x_i, y_j)]``, a ``(B, N, 1 + D)`` tensor."""
    cost, grad = _cost(x, y, p)
    w = (_rows(a) + _cols(h) - cost * _param(1.0 / eps, x)).exp() * _cols(u)
    lazy = w.concat(w * grad)
    with LOCK:
        return lazy.sum(dim=2)


def _kernel(x, y, name, blur):
    """The symbolic ``k(x_i, y_j)`` and ``grad_x k(x_i, y_j)`` of a radial kernel."""
    diff = _rows(x) - _cols(y)
    sq = (diff**2).sum(-1)
    if name == "energy":  # -|x - y|
        return -sq.sqrt(), -(diff * sq.rsqrt())
    if name == "gaussian":  # exp(-|x - y|^2 / (2 blur^2))
        k = (sq * _param(-0.5 / blur**2, x)).exp()
        return k, (k * _param(-1.0 / blur**2, x)) * diff
    if name == "laplacian":  # exp(-|x - y| / blur)
        rate = _param(-1.0 / blur, x)
        k = (sq.sqrt() * rate).exp()
        return k, (k * rate) * (diff * sq.rsqrt())
    raise ValueError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}.")


def _kernel_sum(x, y, v, name, blur):
    k, _ = _kernel(x, y, name, blur)
    lazy = k * _cols(v)
    with LOCK:
        return lazy.sum(dim=2)[:, :, 0]


def _kernel_values_and_grads(x, y, v, name, blur):
    """``sum_j v_j [k(x_i, y_j), grad_x k(x_i, y_j)]``, a ``(B, N, 1 + D)`` tensor."""
    k, grad = _kernel(x, y, name, blur)
    vj = _cols(v)
    lazy = (k * vj).concat(grad * vj)
    with LOCK:
        return lazy.sum(dim=2)


# ----------------------------------------------------------------------------------------
# Block-sparse ("ranges") formulas: unbatched (N, D) and (M, D) points, KeOps' 2-D mode
# ----------------------------------------------------------------------------------------


def _i(t):
    """A ``(N,)`` or ``(N, D)`` tensor as an ``i``-indexed 2-D LazyTensor (axis given: a
    ``(1, 1, D)`` tensor would be read as a parameter)."""
    t = t if t.dim() == 2 else t[:, None]
    return _deps()[1](t.contiguous()[:, :], axis=0)  # a new view: KeOps tells variables apart by id()


def _j(t):
    """A ``(M,)`` or ``(M, D)`` tensor as a ``j``-indexed 2-D LazyTensor."""
    t = t if t.dim() == 2 else t[:, None]
    return _deps()[1](t.contiguous(), axis=1)  # pykeops makes a new view for axis=1


def _cost2(x, y, p):
    diff = _i(x) - _j(y)
    sq = (diff**2).sum(-1)
    if p == 2:
        return sq / 2, diff
    return sq.sqrt(), diff * sq.rsqrt()


def _lse_ranges(x, y, h, eps, p, ranges):
    cost, _ = _cost2(x, y, p)
    lazy = _j(h) - cost * _param(1.0 / eps, x)
    with LOCK:
        return lazy.logsumexp(dim=1, ranges=ranges)[:, 0]


def _weighted_cost_grads_ranges(x, y, a, h, u, eps, p, ranges):
    cost, grad = _cost2(x, y, p)
    w = (_i(a) + _j(h) - cost * _param(1.0 / eps, x)).exp() * _j(u)
    lazy = w.concat(w * grad)
    with LOCK:
        return lazy.sum(dim=1, ranges=ranges)


def keops_ranges(row_ranges, col_ptr, col_ranges, t_row_ranges, t_col_ptr, t_col_ranges, device):
    """KeOps' 6-tuple of int32 index tensors from two CSR patterns (a pattern and its transpose)."""
    torch, _ = _deps()

    def it(a):
        return torch.as_tensor(a, dtype=torch.int32, device=device).contiguous()

    return (
        it(row_ranges), it(col_ptr[1:]), it(col_ranges),
        it(t_row_ranges), it(t_col_ptr[1:]), it(t_col_ranges),
    )


def _swap(ranges):
    """The same 6-tuple seen from the columns."""
    return (*ranges[3:], *ranges[:3])


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------


@functools.cache
def _autograd():
    """The ``torch.autograd.Function`` classes (built on first use: torch is imported lazily)."""
    torch, _ = _deps()
    from torch.autograd.function import once_differentiable

    class _Softmin(torch.autograd.Function):
        """``-eps * log sum_j exp(h_j - C(x_i, y_j) / eps)``, differentiable in ``x``, ``y``, ``h``."""

        @staticmethod
        def forward(ctx, x, y, h, eps, p):
            lse = _lse(x, y, h, eps, p)
            ctx.save_for_backward(x, y, h, lse)
            ctx.eps, ctx.p = eps, p
            return -eps * lse

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            x, y, h, lse = ctx.saved_tensors
            eps, p = ctx.eps, ctx.p
            grad_x = grad_y = grad_h = None
            if ctx.needs_input_grad[0]:
                # d out_i / d x_i = sum_j w_ij grad_x C(x_i, y_j),
                # with w_ij = exp(h_j - C_ij / eps - lse_i)
                sums = _weighted_cost_grads(x, y, -lse, h, torch.ones_like(h), eps, p)
                grad_x = grad_out[:, :, None] * sums[:, :, 1:]
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                # d out_i / d h_j = -eps w_ij and d out_i / d y_j = w_ij grad_y C(x_i, y_j):
                # the same reduction over i on the transposed pair, weighted by grad_out.
                sums = _weighted_cost_grads(y, x, h, -lse, grad_out, eps, p)
                grad_h = -eps * sums[:, :, 0]
                grad_y = sums[:, :, 1:]
            return grad_x, grad_y, grad_h, None, None

    class _KernelSum(torch.autograd.Function):
        """``sum_j k(x_i, y_j) v_j``, differentiable in ``x``, ``y`` and ``v``."""

        @staticmethod
        def forward(ctx, x, y, v, name, blur):
            ctx.save_for_backward(x, y, v)
            ctx.name, ctx.blur = name, blur
            return _kernel_sum(x, y, v, name, blur)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            x, y, v = ctx.saved_tensors
            grad_x = grad_y = grad_v = None
            if ctx.needs_input_grad[0]:
                sums = _kernel_values_and_grads(x, y, v, ctx.name, ctx.blur)
                grad_x = grad_out[:, :, None] * sums[:, :, 1:]
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                # k is symmetric: grad_y k(x_i, y_j) = grad_1 k(y_j, x_i), so the transposed
                # reduction weighted by grad_out gives sum_i grad_out_i k_ij and the y-gradient.
                sums = _kernel_values_and_grads(y, x, grad_out, ctx.name, ctx.blur)
                grad_v = sums[:, :, 0]
                grad_y = v[:, :, None] * sums[:, :, 1:]
            return grad_x, grad_y, grad_v, None, None

    class _SoftminRanges(torch.autograd.Function):
        """Block-sparse ``_Softmin`` on unbatched points; ``ranges``: KeOps' 6-tuple."""

        @staticmethod
        def forward(ctx, x, y, h, eps, p, ranges):
            lse = _lse_ranges(x, y, h, eps, p, ranges)
            ctx.save_for_backward(x, y, h, lse)
            ctx.eps, ctx.p, ctx.ranges = eps, p, ranges
            return -eps * lse

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            x, y, h, lse = ctx.saved_tensors
            eps, p, ranges = ctx.eps, ctx.p, ctx.ranges
            grad_x = grad_y = grad_h = None
            # rows with nothing kept have lse = -inf: they carry no weight
            lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            if ctx.needs_input_grad[0]:
                sums = _weighted_cost_grads_ranges(x, y, -lse, h, torch.ones_like(h), eps, p, ranges)
                grad_x = grad_out[:, None] * sums[:, 1:]
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                sums = _weighted_cost_grads_ranges(y, x, h, -lse, grad_out, eps, p, _swap(ranges))
                grad_h = -eps * sums[:, 0]
                grad_y = sums[:, 1:]
            return grad_x, grad_y, grad_h, None, None, None

    return _Softmin, _KernelSum, _SoftminRanges


# ----------------------------------------------------------------------------------------
# Public reductions
# ----------------------------------------------------------------------------------------


def softmin(x, y, h, eps: float, p: int):
    """``-eps * log sum_j exp(h_j - C(x_i, y_j) / eps)``: ``(B, N)``; autograd in ``x``, ``y``, ``h``."""
    return _autograd()[0].apply(x, y, h, float(eps), int(p))


def softmin_grad(x, y, h, eps: float, p: int):
    """``sum_j w_ij grad_x C(x_i, y_j)``, ``w_ij = softmax_j(h_j - C_ij / eps)``: ``(B, N, D)``."""
    torch, _ = _deps()
    eps, p = float(eps), int(p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, h)):
        lse = -softmin(x, y, h, eps, p) / eps  # differentiable (first order)
    else:
        lse = _lse(x, y, h, eps, p)
    return _weighted_cost_grads(x, y, -lse, h, torch.ones_like(h), eps, p)[:, :, 1:]


def softmax_weighted_sum(x, y, h, v, eps: float, p: int):
    """``sum_j w_ij v_j`` for ``v (B, M, K)``, ``w_ij = softmax_j(h_j - C_ij / eps)``: ``(B, N, K)``."""
    cost, _ = _cost(x, y, int(p))
    lazy, vj = _cols(h) - cost * _param(1.0 / float(eps), x), _cols(v)
    with LOCK:
        return lazy.sumsoftmaxweight(vj, dim=2)


def softmin_ranges(x, y, h, eps: float, p: int, ranges):
    """:func:`softmin` over the kept pairs of ``ranges`` (KeOps' 6-tuple, see :func:`keops_ranges`),
    for unbatched ``x (N, D)``, ``y (M, D)``, ``h (M,)``: ``(N,)``, ``+inf`` where nothing is kept."""
    return _autograd()[2].apply(x, y, h, float(eps), int(p), ranges)


def softmin_grad_ranges(x, y, h, eps: float, p: int, ranges):
    """:func:`softmin_grad` over the kept pairs, unbatched: ``(N, D)`` (zeros where nothing is kept)."""
    torch, _ = _deps()
    lse = -softmin_ranges(x, y, h, eps, p, ranges) / float(eps)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return _weighted_cost_grads_ranges(x, y, -lse, h, torch.ones_like(h), float(eps), int(p), ranges)[:, 1:]


def softmax_weighted_sum_ranges(x, y, h, v, eps: float, p: int, ranges):
    """:func:`softmax_weighted_sum` over the kept pairs, unbatched: ``(N, K)``."""
    cost, _ = _cost2(x, y, int(p))
    lazy, vj = _j(h) - cost * _param(1.0 / float(eps), x), _j(v)
    with LOCK:
        return lazy.sumsoftmaxweight(vj, dim=1, ranges=ranges)


# ----------------------------------------------------------------------------------------
# A user's cost, as a KeOps formula in X and Y (GeomLoss' "online" custom costs)
# ----------------------------------------------------------------------------------------


@functools.cache
def _formula_routine(formula: str, D: int, K: int):
    """A ``Genred`` for ``h_j - P * C(x_i, y_j)``: ``LogSumExp`` (``K = 0``) or a softmax-weighted
    sum of a ``K``-vector ``V_j``. pykeops differentiates it (first order) itself."""
    from pykeops.torch import Genred

    aliases = [f"X = Vi({D})", f"Y = Vj({D})", "H = Vj(1)", "P = Pm(1)"]
    expression = f"(H - P * ({formula}))"
    if K == 0:
        return Genred(expression, aliases, reduction_op="LogSumExp", axis=1)
    return Genred(expression, aliases + [f"V = Vj({K})"], reduction_op="SumSoftMaxWeight", axis=1, formula2="V")


def _formula_call(formula, x, y, h, eps, *extra, ranges=None):
    torch, _ = _deps()
    K = 0 if not extra else int(extra[0].shape[-1])
    routine = _formula_routine(formula, int(x.shape[-1]), K)
    rate = torch.tensor([1.0 / float(eps)], dtype=x.dtype, device=x.device)
    args = (x.contiguous(), y.contiguous(), h[..., None].contiguous(), rate, *(e.contiguous() for e in extra))
    with LOCK:
        return routine(*args) if ranges is None else routine(*args, ranges=ranges)


def formula_softmin(x, y, h, eps: float, formula: str, ranges=None):
    """``-eps * log sum_j exp(h_j - C(x_i, y_j) / eps)`` with ``C`` the KeOps ``formula`` in ``X``, ``Y``.

    Batched ``x (B, N, D)``, ``y (B, M, D)``, ``h (B, M)`` (or unbatched, with KeOps'
    ``ranges`` 6-tuple for block-sparse reductions); differentiable in ``x``, ``y``, ``h``.
    """
    return -float(eps) * _formula_call(formula, x, y, h, eps, ranges=ranges)[..., 0]


def formula_softmin_grad(x, y, h, eps: float, formula: str, ranges=None):
    """``sum_j w_ij grad_x C(x_i, y_j)`` for a formula cost: the gradient of :func:`formula_softmin`
    (row ``i`` depends on ``x_i`` only), by pykeops' autograd; ``(B, N, D)``."""
    torch, _ = _deps()
    with torch.enable_grad():
        xt = x.detach().requires_grad_(True)
        out = formula_softmin(xt, y.detach(), h.detach(), eps, formula, ranges=ranges)
        (grad,) = torch.autograd.grad(out.sum(), xt)
    return grad


def formula_softmax_weighted_sum(x, y, h, v, eps: float, formula: str, ranges=None):
    """``sum_j w_ij v_j`` with ``w_ij = softmax_j(h_j - C(x_i, y_j) / eps)`` for a formula cost."""
    return _formula_call(formula, x, y, h, eps, v, ranges=ranges)


def kernel_sum(x, y, v, name: str, blur: float):
    """``sum_j k(x_i, y_j) v_j`` for ``v (B, M)``: ``(B, N)``; autograd in ``x``, ``y``, ``v``."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}.")
    return _autograd()[1].apply(x, y, v, name, float(blur))


def self_test(device, dtype, dim: int) -> float:
    """Compare a tiny KeOps ``softmin`` (``p = 2``) with dense torch; return the relative error.

    Compiles (or loads from the cache) the ``p = 2`` softmin formula for ``dtype`` and
    ``dim`` on ``device``: the one an actual call on such data uses next.
    """
    torch, _ = _deps()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 4, dim, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 3, dim, generator=gen, dtype=torch.float64)
    h = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    eps = 0.1
    cost = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / 2
    expected = -eps * torch.logsumexp(h[:, None, :] - cost / eps, dim=2)
    with torch.no_grad():
        got = softmin(*(t.to(device=device, dtype=dtype) for t in (x, y, h)), eps, 2)
    got = got.to(device="cpu", dtype=torch.float64)
    return float((got - expected).abs().max() / expected.abs().max())
