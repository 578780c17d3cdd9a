"""``SamplesLoss``: a drop-in replacement for GeomLoss's ``geomloss.SamplesLoss`` (torch).

Migration: replace ``from geomloss import SamplesLoss`` by
``from ot_agnostic.torch import SamplesLoss``. The constructor, the call forms
``L(x, y)``, ``L(a, x, b, y)`` (also batched ``(B, N, D)`` points with ``(B, N)`` weights),
the outputs (a 0-d or ``(B,)`` tensor; ``(F, G)`` with ``potentials=True``) and the
numbers are those of GeomLoss 0.3.1, with these differences:

* ``loss="hausdorff"`` works (GeomLoss 0.3.1 raises ``KeyError``), for ``p=1`` and ``p=2``.
* Unbalanced OT (``reach`` not None): the values and potentials are GeomLoss's, the
  gradients are the true ones. GeomLoss's are ``(rho + eps/2) / (rho + eps)`` times
  smaller (``eps = blur**p``, ``rho = reach**p``), because its backward weight
  ``rho + eps`` (Sejourne et al. 2019, Prop. 12) is never applied.
* ``debias=False`` with total masses other than 1: we return ``OT_eps`` with its mass
  term ``-eps <a x b, exp((f + g - C) / eps) - 1>``. GeomLoss leaves that term out.
  With unit masses (the default uniform weights) the values are the same.
* Custom costs take GeomLoss' forms: a function ``cost(x, y)`` returning the ``(B, N, M)``
  cost matrix, a KeOps formula string in ``X`` and ``Y``, or a ``(formula, function)``
  pair for multiscale. GeomLoss runs a function with ``"tensorized"`` only and a formula
  with ``"online"``/``"multiscale"`` only; here a function also runs ``"online"`` (by
  blocks of rows, ``O(N + M)`` memory) and ``"multiscale"``, on any device.
  ``kernel=`` (energy, gaussian, laplacian losses) is GeomLoss' kernel function
  ``kernel(x, y, blur=..., use_keops=..., ranges=None)`` returning a ``(B, N, M)`` tensor
  (or a KeOps ``LazyTensor`` when ``use_keops`` is True, i.e. ``backend="online"`` or a
  large ``"auto"`` problem).
* ``backend="multiscale"`` runs ``loss="sinkhorn"`` (D <= 3) with ``truncate`` and
  ``cluster_scale`` as in GeomLoss; the other losses refuse it. The cluster-label call
  ``L(l_x, a, x, l_y, b, y)`` (integer labels ``(N,)``, ``(M,)``, or ``(B, N)``, ``(B, M)``)
  uses the given clusters instead of a grid, with ``backend="auto"`` or ``"multiscale"``
  as in GeomLoss (and batches, which GeomLoss refuses).
* ``verbose=True`` logs what ran (backend, iterations, last change of the potentials; for
  multiscale the clusters and the share of pairs kept) on the ``"ot_agnostic"`` logger at
  level INFO, and shows those messages on stderr if that logger has no handler yet.

Every input is validated: bad weights (negative, NaN, zero mass), mismatched shapes or
devices and unequal masses for balanced OT raise errors. ``p``, the lengths and the
backend are checked when the module is built.
"""

from __future__ import annotations

import logging

import torch

from ._array_api import safe_log
from ._validation import check_max_iter, check_p, check_positive, check_power, check_scaling, check_tol
from .backends import Method, parse_backend
from .costs import Kernel, make_cost
from .divergences import _pairwise_setup, kernel_frame
from .sinkhorn import DEFAULT_MAX_ITER, _largest
from .divergences import (
    energy_distance,
    gaussian_mmd,
    hausdorff_divergence,
    laplacian_mmd,
    sinkhorn,
)

__all__ = ["SamplesLoss"]

logger = logging.getLogger("ot_agnostic")

#: The losses that ``SamplesLoss(loss=...)`` accepts.
LOSSES = ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian")


class SamplesLoss(torch.nn.Module):
    r"""Distances between sampled measures: a drop-in replacement for ``geomloss.SamplesLoss``.

    ``L(x, y)`` compares ``alpha = 1/N sum_i delta_{x_i}`` with ``beta = 1/M sum_j delta_{y_j}``.
    ``L(a, x, b, y)`` uses the weights ``a``, ``b`` (``(N,)``/``(M,)``, or ``(B, N)``/``(B, M)`` for
    batched ``(B, N, D)``/``(B, M, D)`` points; GeomLoss's ``(N, 1)`` and ``(B, N, 1)`` work too).
    The result is a 0-d tensor, or ``(B,)`` for batched inputs, with the dtype and device of
    the points. Gradients with respect to the points and weights flow through autograd.

    Parameters
    ----------
    loss : "sinkhorn", "hausdorff", "energy", "gaussian" or "laplacian".
        ``"sinkhorn"`` is :func:`ot_agnostic.sinkhorn_divergence` (``S_eps``, or ``OT_eps`` with
        ``debias=False``); ``"hausdorff"`` is :func:`ot_agnostic.hausdorff_divergence`;
        the kernel norms are :func:`ot_agnostic.energy_distance` (``k = -|x - y|``),
        :func:`ot_agnostic.gaussian_mmd` (``exp(-|x - y|^2 / 2 blur^2)``) and
        :func:`ot_agnostic.laplacian_mmd` (``exp(-|x - y| / blur)``).
    p : 1 or 2, the ground cost ``C(x, y) = |x - y|^p / p`` (sinkhorn and hausdorff).
    blur : length scale; ``eps = blur**p`` (sinkhorn, hausdorff), kernel width (gaussian,
        laplacian). The energy distance ignores it.
    reach : None (balanced OT) or a length, ``rho = reach**p`` (unbalanced sinkhorn only).
        The kernel losses ignore it, as GeomLoss does.
    diameter : the largest distance in the problem, the start of eps-scaling (None: estimated).
    scaling : eps-scaling ratio in (0, 1) (sinkhorn).
    truncate, cluster_scale : multiscale settings (see :func:`ot_agnostic.sinkhorn`).
    cost : None (``|x - y|^p / p``), a function ``cost(x, y)`` of ``(B, N, D)``, ``(B, M, D)``
        tensors returning the ``(B, N, M)`` cost matrix, a KeOps formula in ``X`` and ``Y``
        (e.g. ``"SqDist(X,Y) / IntCst(2)"``), or a ``(formula, function)`` pair; see
        :func:`ot_agnostic.sinkhorn` (sinkhorn and hausdorff).
    kernel : None, or a function ``kernel(x, y, blur=..., use_keops=..., ranges=None)``
        returning the ``(B, N, M)`` kernel matrix (a KeOps ``LazyTensor`` when ``use_keops``)
        that replaces the kernel of ``loss="energy"``, ``"gaussian"`` or ``"laplacian"``.
    debias : sinkhorn only: the debiased ``S_eps`` (True) or the raw ``OT_eps`` (False).
    tol, max_iter : sinkhorn only, not in GeomLoss: None (the default) runs GeomLoss's fixed
        eps-scaling schedule and gives its numbers; a float iterates at the final ``eps``
        until the marginal error is below ``tol`` (see :func:`ot_agnostic.sinkhorn`).
    potentials : return the dual potentials ``(F, G)`` on ``x`` and ``y`` instead of the value:
        ``(f_ba - f_aa, g_ab - g_bb)`` (sinkhorn, debias), ``(f_ba, g_ab)`` (sinkhorn, no debias),
        ``(K a - K b on x, K b - K a on y)`` (kernel losses) and
        ``(s_b - s_a on x, s_a - s_b on y)`` with the soft distances ``s`` of
        :func:`ot_agnostic.hausdorff_divergence` (hausdorff). The value is
        ``1/2 (<a, F> + <b, G>)`` for hausdorff and the kernel losses, and ``<a, F> + <b, G>``
        for balanced sinkhorn with unit masses.
        As in GeomLoss 0.3.1, ``F`` and ``G`` have shape ``(1, N)`` and ``(1, M)`` for unbatched
        inputs (``(N,)`` and ``(M,)`` when multiscale Sinkhorn ran), and ``(B, N)`` and
        ``(B, M)`` for batched inputs.
    verbose : log what ran (see the module notes) on the ``"ot_agnostic"`` logger.
    backend : "auto", "tensorized", "online" or "multiscale" (sinkhorn, D <= 3), as in
        GeomLoss. "auto" and "online" run our Numba kernels on CPU tensors (10-30x faster
        than KeOps on a CPU, same numbers) and, on CUDA tensors, KeOps when it works, else
        the Numba CUDA kernels; the chunked pure Array API path (with one logged warning)
        when none of them can. ``"keops"`` (or ``"keops/online"``) insists on KeOps and
        raises if it is unusable; see :ref:`how-auto-chooses`.

    Examples
    --------
    >>> import torch
    >>> from ot_agnostic.torch import SamplesLoss
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.rand(100, 2, dtype=torch.float64, generator=gen).requires_grad_()
    >>> y = x.detach() + torch.tensor([0.1, 0.0], dtype=torch.float64)
    >>> loss = SamplesLoss("sinkhorn", p=2, blur=0.05)
    >>> value = loss(x, y)
    >>> round(value.item(), 6)  # |v|^2 / 2
    0.005
    >>> value.backward()
    >>> bool(torch.allclose(x.grad.sum(dim=0), torch.tensor([-0.1, 0.0], dtype=torch.float64), atol=1e-3))
    True
    """

    def __init__(
        self,
        loss="sinkhorn",
        p=2,
        blur=0.05,
        reach=None,
        diameter=None,
        scaling=0.5,
        truncate=5,
        cost=None,
        kernel=None,
        cluster_scale=None,
        debias=True,
        potentials=False,
        verbose=False,
        backend="auto",
        tol=None,
        max_iter=DEFAULT_MAX_ITER,
    ):
        super().__init__()
        if loss not in LOSSES:
            options = ", ".join(repr(name) for name in LOSSES)
            raise ValueError(f"unknown loss {loss!r}: choose one of {options}.")
        p = check_p(p)
        if cost is not None:
            if loss not in ("sinkhorn", "hausdorff"):
                raise ValueError(
                    f"cost= applies to loss='sinkhorn' and 'hausdorff'; loss={loss!r} takes a "
                    "kernel function (kernel=) instead."
                )
            make_cost(p, cost)  # checks its form now
        if kernel is not None:
            if loss not in ("energy", "gaussian", "laplacian"):
                raise ValueError(
                    f"kernel= applies to loss='energy', 'gaussian' and 'laplacian', not "
                    f"loss={loss!r}; the OT losses take a cost (cost=) instead."
                )
            if not callable(kernel):
                raise TypeError(
                    "kernel must be a function kernel(x, y, blur=..., use_keops=..., ranges=None) "
                    f"returning the (B, N, M) kernel matrix, not {type(kernel).__name__}."
                )
        _, method = parse_backend(backend)
        if method is Method.MULTISCALE and loss != "sinkhorn":
            raise NotImplementedError(
                f"backend='multiscale' runs loss='sinkhorn' only, not loss={loss!r}; use "
                "backend='online' (O(N + M) memory) or 'auto'."
            )
        truncate = check_positive(truncate, "truncate", allow_none=True)
        cluster_scale = check_positive(cluster_scale, "cluster_scale", allow_none=True, allow_zero=True)
        if loss != "energy":
            blur = check_positive(blur, "blur")
        if loss in ("sinkhorn", "hausdorff"):
            check_power(blur, p, "blur", "eps")
        if loss == "sinkhorn":
            reach = check_positive(reach, "reach", allow_none=True)
            check_power(reach, p, "reach", "rho")
            diameter = check_positive(diameter, "diameter", allow_none=True)
            scaling = check_scaling(scaling)
            tol, max_iter = check_tol(tol), check_max_iter(max_iter)
        elif loss == "hausdorff" and reach is not None:
            raise NotImplementedError(
                "unbalanced Hausdorff divergences (loss='hausdorff' with a reach) are not "
                "supported yet: use reach=None, or loss='sinkhorn' with a reach."
            )
        self.loss = loss
        self.backend = backend
        self.p = p
        self.blur = blur
        self.reach = reach
        self.truncate = truncate
        self.diameter = diameter
        self.scaling = scaling
        self.cost = cost
        self.kernel = kernel
        self.cluster_scale = cluster_scale
        self.debias = bool(debias)
        self.potentials = bool(potentials)
        self.verbose = verbose
        self.tol = tol
        self.max_iter = max_iter

    def extra_repr(self) -> str:
        keys = ["loss", "p", "blur", "reach", "diameter", "scaling", "debias", "potentials", "backend", "tol"]
        return ", ".join(f"{key}={getattr(self, key)!r}" for key in keys)

    def forward(self, *args):
        """``L(x, y)``, ``L(a, x, b, y)`` or ``L(l_x, a, x, l_y, b, y)``: the loss (0-d or
        ``(B,)``), or ``(F, G)``."""
        labels, a, x, b, y = _parse_args(args)
        if labels is not None and self.loss != "sinkhorn":
            raise NotImplementedError(
                f"cluster labels define the clusters of multiscale Sinkhorn (loss='sinkhorn'), "
                f"not of loss={self.loss!r}: call L(a, x, b, y)."
            )
        if self.potentials:
            F, G, multiscale = self._potentials(x, y, a, b, labels)
            if x.ndim == 2 and not multiscale:
                # GeomLoss 0.3.1 returns (1, N) and (1, M) for unbatched inputs, except from
                # its multiscale backend, which returns (N,) and (M,)
                F, G = F[None, :], G[None, :]
            return F, G
        return self._value(x, y, a, b, labels)

    # -- the two outputs ------------------------------------------------------------------

    def _value(self, x, y, a, b, labels=None):
        backend = self.backend
        if self.loss == "sinkhorn":
            return self._sinkhorn(x, y, a, b, labels).value
        if self.loss == "hausdorff":
            return hausdorff_divergence(x, y, a, b, p=self.p, blur=self.blur, backend=backend, cost=self.cost)
        if self.kernel is not None:
            return _custom_kernel(self.kernel, x, y, a, b, blur=self.blur, backend=backend)[0]
        if self.loss == "energy":
            return energy_distance(x, y, a, b, backend=backend)
        if self.loss == "gaussian":
            return gaussian_mmd(x, y, a, b, blur=self.blur, backend=backend)
        return laplacian_mmd(x, y, a, b, blur=self.blur, backend=backend)

    def _sinkhorn(self, x, y, a, b, labels=None):
        res = sinkhorn(
            x, y, a, b, p=self.p, blur=self.blur, reach=self.reach, diameter=self.diameter,
            scaling=self.scaling, debias=self.debias, backend=self.backend,
            truncate=self.truncate, cluster_scale=self.cluster_scale, cost=self.cost,
            cluster_labels=labels, tol=self.tol, max_iter=self.max_iter,
        )
        if self.verbose:
            _report(res)
        return res

    def _potentials(self, x, y, a, b, labels=None):
        """``(F, G, multiscale)``: the potentials, and whether multiscale Sinkhorn ran."""
        if self.loss == "sinkhorn":
            res = self._sinkhorn(x, y, a, b, labels)
            multiscale = res.backend.endswith("/multiscale")
            if self.debias:  # Feydy's thesis, Eq. (3.209); GeomLoss returns it for reach too
                return res.f - res.f_aa, res.g - res.g_bb, multiscale
            return res.f, res.g, multiscale
        if self.loss == "hausdorff":
            F, G = _hausdorff_potentials(x, y, a, b, p=self.p, blur=self.blur, backend=self.backend, cost=self.cost)
        elif self.kernel is not None:
            F, G = _custom_kernel(self.kernel, x, y, a, b, blur=self.blur, backend=self.backend)[1:]
        else:
            kernel = Kernel(self.loss, 1.0 if self.loss == "energy" else self.blur)
            F, G = _kernel_potentials(kernel, x, y, a, b, backend=self.backend)
        return F, G, False


def _parse_args(args):
    """``(labels, a, x, b, y)`` from GeomLoss's call forms; ``a``, ``b`` are None for
    ``L(x, y)``, ``labels`` is ``(l_x, l_y)`` for ``L(l_x, a, x, l_y, b, y)``, else None."""
    labels = None
    if len(args) == 2:
        (x, y), a, b = args, None, None
    elif len(args) == 4:
        a, x, b, y = args
    elif len(args) == 6:
        l_x, a, x, l_y, b, y = args
        labels = (l_x, l_y)
    else:
        raise ValueError(
            f"SamplesLoss takes two (x, y), four (a, x, b, y) or six (l_x, a, x, l_y, b, y) "
            f"tensors, got {len(args)} arguments."
        )
    named = [("a", a), ("x", x), ("b", b), ("y", y)] + ([] if labels is None else [("l_x", labels[0]), ("l_y", labels[1])])
    for name, value in named:
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}; for NumPy or CuPy "
                "arrays, call the functions of ot_agnostic (e.g. ot_agnostic.sinkhorn_divergence)."
            )
    return labels, _squeeze_weights(a, x), x, _squeeze_weights(b, y), y


def _squeeze_weights(w, points):
    """GeomLoss accepts ``(N, 1)`` / ``(B, N, 1)`` weights: drop that trailing axis."""
    if w is not None and w.ndim == points.ndim and w.ndim >= 2 and w.shape[-1] == 1:
        return w[..., 0]
    return w


def _report(res) -> None:
    """``verbose=True``: what a Sinkhorn call ran, on the ``"ot_agnostic"`` logger (INFO)."""
    if not logger.handlers:  # make the messages visible, once, like GeomLoss' prints
        logger.addHandler(logging.StreamHandler())
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    message = (
        f"SamplesLoss: {res.backend}, {res.n_iter} Sinkhorn updates ({res.n_softmin} softmin passes) "
        f"down to eps={res.eps:.3g}, marginal error {_largest(res.marginal_error):.3g}, "
        f"last change of the potentials {res.max_change:.3g}"
    )
    if hasattr(res, "kept_fraction") and res.extrapolated:
        message += "; multiscale: the loop stayed on the clusters, extrapolated to the points at the end"
    elif hasattr(res, "kept_fraction"):
        message += f"; multiscale: kept {100 * res.kept_fraction:.1f}% of the point pairs of OT(a, b)"
    logger.info(message)


#: GeomLoss' "auto": kernel matrices are dense up to this many entries, KeOps above.
DENSE_KERNEL_MAX_ENTRIES = 5000**2


def _custom_kernel(kernel, x, y, a, b, *, blur, backend):
    """GeomLoss' kernel loss with the user's ``kernel``: ``(value, F, G)`` with
    ``value = 1/2 <a, K_xx a> + 1/2 <b, K_yy b> - <a, K_xy b>``, ``F = K_xx a - K_xy b``,
    ``G = K_yy b - K_yx a``; dense kernel matrices, or KeOps LazyTensors with ``use_keops``."""
    m, sel = _pairwise_setup(x, y, a, b, backend)
    B, N, M, _ = m.shape
    use_keops = sel.method is Method.ONLINE or (sel.method is not Method.TENSORIZED and N * M > DENSE_KERNEL_MAX_ENTRIES)

    def apply(p1, p2, w):
        k = kernel(p1, p2, blur=blur, use_keops=use_keops, ranges=None)
        return (k @ w[:, :, None])[:, :, 0]

    a_x, b_y, b_x, a_y = apply(m.x, m.x, m.a), apply(m.y, m.y, m.b), apply(m.x, m.y, m.b), apply(m.y, m.x, m.a)
    value = 0.5 * (m.a * a_x).sum(1) + 0.5 * (m.b * b_y).sum(1) - (m.a * b_x).sum(1)
    return m.unbatch(value), m.unbatch(a_x - b_x), m.unbatch(b_y - a_y)


def _geometry_factory(x, y, a, b, backend, cost=None):
    """Validated measures and a function ``(x1, x2, cost) -> Geometry`` on the chosen plugin."""
    m, sel = _pairwise_setup(x, y, a, b, backend, cost)

    def geometry(x1, x2, cost):
        return sel.plugin.geometry(x1, x2, cost, sel.method, xp=m.xp)

    return m, geometry


def _kernel_potentials(kernel: Kernel, x, y, a, b, *, backend):
    """``(K_xx a - K_xy b, K_yy b - K_yx a)``: GeomLoss's kernel "potentials" (``k * (a - b)``)."""
    m, geometry = _geometry_factory(x, y, a, b, backend)
    px, py, kernel, factor = kernel_frame(m, kernel)
    xy = geometry(px, py, kernel.cost)
    F = geometry(px, px, kernel.cost).kernel_sum(kernel, m.a) - xy.kernel_sum(kernel, m.b)
    G = geometry(py, py, kernel.cost).kernel_sum(kernel, m.b) - xy.transpose().kernel_sum(kernel, m.a)
    return m.unbatch(F * factor), m.unbatch(G * factor)


def _hausdorff_potentials(x, y, a, b, *, p, blur, backend, cost=None):
    """``(s_b - s_a on x, s_a - s_b on y)`` with the soft distances of ``hausdorff_divergence``."""
    cost = make_cost(p, cost)
    m, geometry = _geometry_factory(x, y, a, b, backend, cost)
    xp, eps = m.xp, blur**p
    log_a, log_b = safe_log(m.a, xp=xp), safe_log(m.b, xp=xp)
    xy = geometry(m.x, m.y, cost)
    F = xy.softmin(eps, log_b) - geometry(m.x, m.x, cost).softmin(eps, log_a)
    G = xy.transpose().softmin(eps, log_a) - geometry(m.y, m.y, cost).softmin(eps, log_b)
    return m.unbatch(F), m.unbatch(G)
