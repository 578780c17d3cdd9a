"""The one Sinkhorn loop: eps-scaling, debiasing, unbalanced damping, final extrapolation.

Written once against the Array API. It never imports a framework and never branches on a
library name: all the heavy lifting goes through ``Geometry.softmin``, provided by a
backend plugin. The algorithm follows GeomLoss's ``sinkhorn_loop`` (Feydy's thesis,
Sec. 3.3) so that both libraries give the same numbers:

* symmetric (averaged) updates ``f <- (f + softmin(g)) / 2`` at each temperature of the
  geometric schedule ``diameter**p, ..., blur**p``;
* one final, non-averaged "extrapolation" update at ``eps = blur**p``: it is the only
  step that sees autograd-tracked inputs, so gradients follow from the envelope theorem
  and never from differentiating through the loop.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._array_api import device_of, requires_grad, safe_log, stop_gradient, to_float, to_host


class Potentials(NamedTuple):
    """Dual potentials of ``OT(a, b)`` (``f_ba`` on x, ``g_ab`` on y) and of the debiasing terms."""

    f_ba: Any
    g_ab: Any
    f_aa: Any = None
    g_bb: Any = None


class Geometries(NamedTuple):
    """The four cost "kernels" of the debiased problem (``xx``, ``yy`` are ``None`` without debias)."""

    xy: Any
    yx: Any
    xx: Any = None
    yy: Any = None


def max_diameter(x, y, *, xp) -> float:
    """Length of the diagonal of the bounding box of ``x`` and ``y`` (all batches together).

    Computed in Python floats from the box's corners, so that it never overflows the
    arrays' dtype (float32 points of size 1e20 have a diameter of 1e20, not inf).
    """
    lo = xp.minimum(xp.min(x, axis=(0, 1)), xp.min(y, axis=(0, 1)))
    hi = xp.maximum(xp.max(x, axis=(0, 1)), xp.max(y, axis=(0, 1)))
    return math.hypot(*(to_float(hi[d]) - to_float(lo[d]) for d in range(hi.shape[0])))


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> tuple[float, ...]:
    """Temperatures ``diameter**p, diameter**p, (diameter * scaling)**p, ..., blur**p``.

    Same list as GeomLoss (``diameter**p`` appears twice: once to initialise, once in the
    loop; a ``blur`` above ``diameter`` gives ``(diameter**p, blur**p)``), except that a
    number of steps within ``1e-9`` of an integer is rounded to it: GeomLoss's
    ``np.arange`` lets rounding errors decide there, so that a relative change of ``1e-15``
    in ``blur`` (e.g. ``blur = diameter``) could add a temperature.

    Examples
    --------
    >>> [round(e, 4) for e in epsilon_schedule(2, 1.0, 0.25, 0.5)]
    [1.0, 1.0, 0.25, 0.0625]
    >>> epsilon_schedule(2, 1.0, 2.0, 0.5)  # blur > diameter: GeomLoss's two temperatures
    (1.0, 4.0)
    """
    if not diameter > 0:  # every point at one place: nothing to anneal
        diameter = blur
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    steps = (stop - start) / step
    nearest = round(steps)
    count = max(0, nearest if abs(steps - nearest) < 1e-9 else math.ceil(steps))
    return (diameter**p, *(math.exp(start + i * step) for i in range(count)), blur**p)


def dampening(eps: float, rho: float | None) -> float:
    """Unbalanced OT shrinks each softmin by ``1 / (1 + eps / rho)``; balanced OT (rho=None) by 1."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def _sinkhorn_step(geoms: Geometries, pot: Potentials, log_a, log_b, eps, damping) -> Potentials:
    """One parallel update of the (up to) four potentials at temperature ``eps``."""
    f_ba = damping * geoms.xy.softmin(eps, log_b + pot.g_ab / eps)
    g_ab = damping * geoms.yx.softmin(eps, log_a + pot.f_ba / eps)
    if geoms.xx is None:
        return Potentials(f_ba, g_ab)
    f_aa = damping * geoms.xx.softmin(eps, log_a + pot.f_aa / eps)
    g_bb = damping * geoms.yy.softmin(eps, log_b + pot.g_bb / eps)
    return Potentials(f_ba, g_ab, f_aa, g_bb)


def _average(old: Potentials, new: Potentials) -> Potentials:
    return Potentials(*(None if o is None else 0.5 * (o + n) for o, n in zip(old, new)))


def _max_change(old: Potentials, new: Potentials, *, xp) -> float:
    return max(to_float(xp.max(xp.abs(n - o))) for o, n in zip(old, new) if o is not None)


class ConvergenceWarning(UserWarning):
    """A Sinkhorn result is less precise than asked (``tol``) or than the default precision."""


#: The precision the native functions aim for by default: ``marginal_error <= DEFAULT_TOL``.
DEFAULT_TOL = 1e-3
#: The default cap on the Sinkhorn updates at the final ``eps`` (after eps-scaling).
DEFAULT_MAX_ITER = 2000


class Precision(NamedTuple):
    """What the loop does after eps-scaling: iterate at the final ``eps`` until every batch
    item's error is below ``tol``, at most ``max_iter`` updates (see :func:`refine`)."""

    tol: float
    max_iter: int


def scaling_error(w, f, f_new, eps, *, xp):
    """``(B,)`` errors ``sum_i w_i |exp((f_i - f_new_i) / eps) - 1| / sum_i w_i``.

    With ``f_new = softmin(g)`` (balanced OT) this is the L1 violation of the marginal
    ``pi 1 = w`` by the plan of ``(f, g)``, relative to the mass; for unbalanced OT
    (``f_new`` the damped softmin) it is the fixed-point residual of the scalings
    ``exp(f / eps)``, i.e. about ``<w, |f - f_new|> / (eps m(w))``.
    """
    ratio = (stop_gradient(f) - stop_gradient(f_new)) / eps
    ratio = xp.where(ratio > 50.0, xp.asarray(50.0, dtype=ratio.dtype, device=device_of(ratio)), ratio)
    return xp.sum(w * xp.abs(xp.expm1(ratio)), axis=1) / xp.sum(w, axis=1)


def step_errors(before: Potentials, after: Potentials, a, b, eps, *, xp) -> list[float]:
    """Per batch item, the largest :func:`scaling_error` of the update ``before -> after``
    over the potentials (f on ``a``, g on ``b``, f_aa on ``a``, g_bb on ``b``)."""
    weights = (a, b, a, b)
    errors = [
        to_host(scaling_error(w, o, n, eps, xp=xp))
        for w, o, n in zip(weights, before, after) if o is not None
    ]
    return [max(float(e[k]) for e in errors) for k in range(len(errors[0]))]


def refine(geoms: Geometries, pot: Potentials, log_a, log_b, a, b, eps, rho, precision: Precision,
           *, xp, progress=None, anderson: Anderson | None = None):
    """Sinkhorn updates at the final ``eps`` until every error is below ``precision.tol``.

    ``OT(a, b)`` alternates ``g <- d softmin_x(log a + f / eps)``, ``f <- d softmin_y(log b + g / eps)``
    (``d``: the unbalanced damping, 1 if balanced), so that the plan's rows are exact and its
    column error is :func:`scaling_error` of ``g``. The map ``f -> f_new`` is accelerated by
    :class:`Anderson` mixing while the error is above ``tol`` (the last update is a plain one,
    so that the measured error is the plan's). The symmetric potentials of ``OT(a, a)``,
    ``OT(b, b)`` take the averaged update ``f <- (f + d softmin(f)) / 2``. Each of the three
    problems, in each batch item, stops when its own error is below ``tol`` (items stop
    separately). ``anderson``: the mixing state to continue from (a caller that refines
    in chunks on the same geometries passes the same one each time, so that the mixing
    keeps its history), else a fresh one. Returns ``(potentials, updates, softmin_passes)``.
    """
    tol, damping = precision.tol, dampening(eps, rho)
    B = log_a.shape[0]
    f, g, f_aa, g_bb = pot
    active_cross = [True] * B
    active_self = [f_aa is not None] * B
    anderson = Anderson(a, xp=xp) if anderson is None else anderson
    updates = passes = 0
    while updates < precision.max_iter and (any(active_cross) or any(active_self)):
        updates += 1
        if any(active_cross):
            g_new = damping * geoms.yx.softmin(eps, log_a + f / eps)
            col = to_host(scaling_error(b, g, g_new, eps, xp=xp))
            f_new = damping * geoms.xy.softmin(eps, log_b + g_new / eps)
            passes += 2
            mixing = [bool(active and col[k] > tol) for k, active in enumerate(active_cross)]
            # Balanced: <a, f> + <b, T(f)> is the dual objective at (f, T(f)), which plain
            # alternating updates never decrease: the safeguard of the mixed steps.
            objective = None if rho is not None else to_host(xp.sum(a * f, axis=1) + xp.sum(b * g_new, axis=1))
            f_new, rejected = anderson.mix(f, f_new, mixing, objective)
            mask = _mask(active_cross, xp=xp, like=f)
            # a rejected item goes back to (F(f_k), g_k = T(f_k)): its previous g
            keep_g = _mask([bool(r) for r in rejected], xp=xp, like=f)
            g, f = xp.where(mask & ~keep_g, g_new, g), xp.where(mask, f_new, f)
            active_cross = [bool(m or r) for m, r in zip(mixing, rejected)]
        if any(active_self):
            aa = damping * geoms.xx.softmin(eps, log_a + f_aa / eps)
            bb = damping * geoms.yy.softmin(eps, log_b + g_bb / eps)
            passes += 2
            err = [max(u, v) for u, v in zip(to_host(scaling_error(a, f_aa, aa, eps, xp=xp)),
                                               to_host(scaling_error(b, g_bb, bb, eps, xp=xp)))]
            mask = _mask(active_self, xp=xp, like=f)
            f_aa, g_bb = xp.where(mask, 0.5 * (f_aa + aa), f_aa), xp.where(mask, 0.5 * (g_bb + bb), g_bb)
            active_self = [bool(active and err[k] > tol) for k, active in enumerate(active_self)]
        if progress is not None:
            progress(updates, precision.max_iter)
    return Potentials(anderson.validated(f), g, f_aa, g_bb), updates, passes


class Anderson:
    """Safeguarded Anderson mixing (type II, ``memory`` past iterates) for ``f = F(f)``.

    With the residuals ``r_k = F(f_k) - f_k`` and their differences ``dR``, ``dF`` over the
    last ``memory`` steps, the next iterate is ``F(f_k) - dF gamma`` where ``gamma``
    minimises ``|r_k - dR gamma|`` in the ``a``-weighted norm (a tiny ridge keeps it
    well posed). Per batch item. The safeguard: a mixed iterate whose residual is larger
    than ``growth`` times that of the iterate it came from is rejected: the item goes back
    to the plain update ``F(f_k)`` and forgets its history (far from the fixed point, or
    when the least-squares problem is ill-conditioned, a mixed step can jump far off; plain
    Sinkhorn then keeps the iteration convergent). An item that does not mix
    (``mixing[k]`` False) takes the plain update and forgets its history too.
    """

    def __init__(self, weights, *, xp, memory: int = 5, growth: float = 2.0):
        self.w, self.xp, self.memory, self.growth = weights, xp, memory, growth
        self.images, self.residuals = [], []
        self.fallback = self.f_before = self.last_norm = self.last_objective = self.mixed = None

    def mix(self, f, image, mixing, objective=None):
        """The next iterate after ``f`` (``image = F(f)``) and the ``(B,)`` rejected flags.

        ``objective``: optionally, ``(B,)`` values at ``f`` of a function that plain updates
        never decrease (the balanced dual): a mixed iterate that lowers it is rejected too.
        """
        import numpy as np

        xp = self.xp
        norm = to_host(xp.sum(self.w * (image - f) ** 2, axis=1))
        reject = np.zeros(norm.shape, dtype=bool)
        if self.last_norm is not None:
            reject = self.mixed & (norm > self.growth**2 * self.last_norm)
            if objective is not None and self.last_objective is not None:
                slack = 64 * np.finfo(np.dtype(str(f.dtype).split(".")[-1])).eps * (np.abs(objective) + np.abs(self.last_objective))
                reject |= self.mixed & (objective < self.last_objective - slack)
        if reject.any():  # back to F(f_k); f_k's residual (and objective) stay the reference
            back = _mask(reject.tolist(), xp=xp, like=f)
            image = xp.where(back, self.fallback, image)
            f = xp.where(back, self.f_before, f)
            norm = np.where(reject, self.last_norm, norm)
            if objective is not None:
                objective = np.where(reject, self.last_objective, objective)
        self.last_objective = objective
        residual = image - f
        restart = reject | ~np.asarray(mixing, dtype=bool)
        if restart.any() and self.residuals:
            keep = _mask((~restart).tolist(), xp=xp, like=f)
            self.images = [xp.where(keep, v, image) for v in self.images]
            self.residuals = [xp.where(keep, v, residual) for v in self.residuals]
        self.images = (self.images + [image])[-(self.memory + 1):]
        self.residuals = (self.residuals + [residual])[-(self.memory + 1):]
        self.fallback, self.f_before, self.last_norm = image, f, norm
        self.mixed = ~restart & (len(self.residuals) >= 3)
        if len(self.residuals) < 3:
            return image, reject
        return xp.where(_mask(self.mixed.tolist(), xp=xp, like=f), self._extrapolate(image, residual), image), reject

    def validated(self, f):
        """``f``, where the last iterate was a mixed one that no update has checked yet: the
        plain update it was mixed from (the loop stopped at ``max_iter``)."""
        if self.mixed is None or not self.mixed.any():
            return f
        return self.xp.where(_mask(self.mixed.tolist(), xp=self.xp, like=f), self.fallback, f)

    def _extrapolate(self, image, residual):
        """``F(f_k) - dF gamma`` for every item (see the class docstring)."""
        import numpy as np

        xp = self.xp
        dR = xp.stack([r1 - r0 for r0, r1 in zip(self.residuals[:-1], self.residuals[1:])], axis=1)
        dF = xp.stack([v1 - v0 for v0, v1 in zip(self.images[:-1], self.images[1:])], axis=1)
        weighted = dR * self.w[:, None, :]
        gram = to_host(xp.matmul(weighted, xp.permute_dims(dR, (0, 2, 1)))).astype(np.float64)
        rhs = to_host(xp.sum(weighted * residual[:, None, :], axis=2)).astype(np.float64)
        usable = np.isfinite(gram).all(axis=(1, 2)) & np.isfinite(rhs).all(axis=1)
        gram[~usable], rhs[~usable] = np.eye(gram.shape[1]), 0.0
        ridge = 1e-10 * np.trace(gram, axis1=1, axis2=2)[:, None, None] + 1e-300
        gamma = np.linalg.solve(gram + ridge * np.eye(gram.shape[1]), rhs[:, :, None])[:, :, 0]
        gamma[~np.isfinite(gamma).all(axis=1)] = 0.0
        gamma = xp.asarray(gamma, dtype=image.dtype, device=device_of(image))
        return image - xp.sum(gamma[:, :, None] * dF, axis=1)


def _mask(active, *, xp, like):
    """``(B, 1)`` boolean array, on ``like``'s device, of the batch items still iterating."""
    return xp.asarray(active, device=device_of(like))[:, None]


class LoopOutput(NamedTuple):
    """What :func:`sinkhorn_loop` returns: the final potentials ``pot``, the iterate ``last``
    they were computed from, the largest change ``change`` between the two, the ``(B,)``
    ``errors`` of that final update (see :func:`step_errors`), and the counts of updates
    (``n_iter``) and softmin reductions (``n_softmin``) over the whole run."""

    pot: Potentials
    last: Potentials
    change: float
    errors: list
    n_iter: int
    n_softmin: int


def anneal(geoms: Geometries, pot: Potentials, log_a, log_b, eps_list, rho, progress=None) -> Potentials:
    """The averaged updates ``f <- (f + softmin(g)) / 2`` (all potentials), one per temperature."""
    for i, eps in enumerate(eps_list):
        pot = _average(pot, _sinkhorn_step(geoms, pot, log_a, log_b, eps, dampening(eps, rho)))
        if progress is not None:
            progress(i + 1, len(eps_list) + 1)
    return pot


def sinkhorn_loop(geoms: Geometries, final: Geometries, log_a, log_b, a, b, eps_list, rho, *, xp,
                  progress=None, precision: Precision | None = None, start: Potentials | None = None,
                  counts: tuple[int, int] = (0, 0)) -> LoopOutput:
    """Run eps-scaling on ``geoms``, refine at the last ``eps`` if ``precision`` asks, then
    update once more on ``final``.

    ``geoms`` hold gradient-free points; ``final`` holds the points that autograd tracks
    (each geometry tracks its first argument only, cf. the envelope theorem).
    ``progress(done, total)``, if given, is called after each step. ``a``, ``b``: the
    weights (gradient-free), to measure the errors. ``start``: potentials to begin from
    (e.g. upsampled from a coarser grid) instead of one update from zero at
    ``eps_list[0]``; ``counts``: the ``(updates, softmin passes)`` already spent on them.
    """
    per_step = 2 if geoms.xx is None else 4
    updates, passes = counts
    if start is None:
        zeros_x = xp.zeros_like(log_a)
        zeros_y = xp.zeros_like(log_b)
        start = Potentials(zeros_x, zeros_y, *((zeros_x, zeros_y) if geoms.xx is not None else ()))
        start = _sinkhorn_step(geoms, start, log_a, log_b, eps_list[0], dampening(eps_list[0], rho))
        updates, passes = updates + 1, passes + per_step
    total = len(eps_list) + 1
    pot = anneal(geoms, start, log_a, log_b, eps_list, rho, progress)
    eps = eps_list[-1]
    updates, passes = updates + len(eps_list), passes + per_step * len(eps_list)
    budget = 0 if precision is None else precision.max_iter
    while True:
        if budget > 0:
            report = None if progress is None else (
                lambda done, cap, base=total: progress(base - 1 + done, base + cap))
            pot, refined, refine_passes = refine(
                geoms, pot, log_a, log_b, a, b, eps, rho, Precision(precision.tol, budget), xp=xp, progress=report)
            updates, passes, total, budget = updates + refined, passes + refine_passes, total + refined, budget - refined
        last = Potentials(*(None if v is None else stop_gradient(v) for v in pot))
        out = _sinkhorn_step(final, last, stop_gradient(log_a), stop_gradient(log_b), eps, dampening(eps, rho))
        errors = step_errors(last, out, a, b, eps, xp=xp)
        updates, passes = updates + 1, passes + per_step
        # The final update may still see an error above tol (refine's test is on the last
        # update it made): then refine again, within the budget.
        if budget <= 0 or max(errors) <= precision.tol:
            break
        pot = last
    if progress is not None:
        progress(total, total)
    return LoopOutput(out, last, _max_change(last, out, xp=xp), errors, updates, passes)


def sinkhorn_cost(eps, rho, a, b, pot: Potentials, *, debias: bool, xp):
    """The ``(B,)`` values of ``S_eps`` (``debias=True``) or ``OT_eps`` from the potentials.

    Balanced: ``S = <a, f_ba - f_aa> + <b, g_ab - g_bb>``;
    ``OT = <a, f_ba> + <b, g_ab> - eps (m_a - m_a m_b)``.
    Unbalanced (Sejourne et al. 2019, Prop. 12), with ``w = rho + eps / 2``:
    ``S = w <a, e^{-f_aa/rho} - e^{-f_ba/rho}> + w <b, e^{-g_bb/rho} - e^{-g_ab/rho}>``
    (their definition, which includes ``+ eps/2 (m_a - m_b)^2``);
    ``OT = w <a, 1 - e^{-f_ba/rho}> + w <b, 1 - e^{-g_ab/rho}> + eps (m_a m_b - (m_a + m_b) / 2)``.
    Autograd sees the envelope-theorem gradient: without debias, that of
    ``<a, f_ba> + <b, g_ab> + eps (m_a m_b - m_a - m_b)`` (balanced), and in the unbalanced case
    the expression above with ``w = rho + eps`` and ``eps (m_a m_b - m_a - m_b)``.
    """
    if rho is None and debias:
        return _dot(a, pot.f_ba - pot.f_aa, xp) + _dot(b, pot.g_ab - pot.g_bb, xp)
    if rho is None:
        mass_a, mass_b = xp.sum(a, axis=1), xp.sum(b, axis=1)
        dual = _dot(a, pot.f_ba, xp) + _dot(b, pot.g_ab, xp)
        value = dual - eps * (mass_a - mass_a * mass_b)
        gradient_form = dual + eps * (mass_a * mass_b - mass_a - mass_b)
    else:
        value = _unbalanced_cost(rho + eps / 2, 0.5, eps, rho, a, b, pot, debias, xp)
        gradient_form = _unbalanced_cost(rho + eps, 1.0, eps, rho, a, b, pot, debias, xp)
    if not any(requires_grad(t) for t in (a, b, pot.f_ba, pot.g_ab)):
        return value
    return stop_gradient(value) + (gradient_form - stop_gradient(gradient_form))


def _dot(w, f, xp):
    return xp.sum(w * f, axis=1)


def _unbalanced_cost(weight, mass_coef, eps, rho, a, b, pot, debias, xp):
    if debias:
        return weight * (
            _dot(a, xp.exp(-pot.f_aa / rho) - xp.exp(-pot.f_ba / rho), xp)
            + _dot(b, xp.exp(-pot.g_bb / rho) - xp.exp(-pot.g_ab / rho), xp)
        )
    mass_a, mass_b = xp.sum(a, axis=1), xp.sum(b, axis=1)
    return weight * (
        _dot(a, 1 - xp.exp(-pot.f_ba / rho), xp) + _dot(b, 1 - xp.exp(-pot.g_ab / rho), xp)
    ) + eps * (mass_a * mass_b - mass_coef * (mass_a + mass_b))


class Gradients(NamedTuple):
    """Gradients of a loss with respect to the points ``x``, ``y`` and the weights ``a``, ``b``."""

    x: Any
    y: Any
    a: Any
    b: Any


def envelope_gradients(geoms: Geometries, last: Potentials, pot: Potentials, log_a, log_b, a, b,
                       eps, rho, *, debias: bool, xp) -> Gradients:
    """Gradients of ``sinkhorn_cost`` from the potentials (envelope theorem), batched.

    With ``G^{ba}_i = sum_j w_ij grad_x C(x_i, y_j)``, ``w_ij = softmax_j(log b_j + g_j / eps - C_ij / eps)``
    (the softmin of the final step, ``g`` = last loop iterate):
    ``dS/dx_i = a_i (u^{ba}_i G^{ba}_i - u^{aa}_i G^{aa}_i)`` with ``u = 1`` (balanced) or
    ``u = exp(-f / rho)`` (unbalanced); ``dS/da_i = f^{ba}_i - f^{aa}_i`` (balanced) or
    ``(rho + eps)(e^{-f^{aa}_i/rho} - e^{-f^{ba}_i/rho})`` (unbalanced); the same with the roles
    of ``(x, a)`` and ``(y, b)`` swapped. Without debias the ``aa`` terms are dropped and the
    mass terms of ``sinkhorn_cost`` are differentiated.
    """

    def point_grad(geom, h, mass, f_new):
        scale = mass if rho is None else mass * xp.exp(-f_new / rho)
        return scale[:, :, None] * geom.softmin_grad(eps, h)

    grad_x = point_grad(geoms.xy, log_b + last.g_ab / eps, a, pot.f_ba)
    grad_y = point_grad(geoms.yx, log_a + last.f_ba / eps, b, pot.g_ab)
    if debias:
        grad_x = grad_x - point_grad(geoms.xx, log_a + last.f_aa / eps, a, pot.f_aa)
        grad_y = grad_y - point_grad(geoms.yy, log_b + last.g_bb / eps, b, pot.g_bb)
    return Gradients(grad_x, grad_y, *weight_gradients(pot, a, b, eps, rho, debias=debias, xp=xp))


def weight_gradients(pot: Potentials, a, b, eps, rho, *, debias: bool, xp):
    """``(dS/da, dS/db)``, ``(B, N)`` and ``(B, M)``: the weights' part of :func:`envelope_gradients`."""
    mass_a, mass_b = xp.sum(a, axis=1)[:, None], xp.sum(b, axis=1)[:, None]
    if rho is None and debias:
        grad_a, grad_b = pot.f_ba - pot.f_aa, pot.g_ab - pot.g_bb
    elif rho is None:
        grad_a = pot.f_ba - eps * (1 - mass_b)
        grad_b = pot.g_ab - eps * (1 - mass_a)
    elif debias:
        grad_a = (rho + eps) * (xp.exp(-pot.f_aa / rho) - xp.exp(-pot.f_ba / rho))
        grad_b = (rho + eps) * (xp.exp(-pot.g_bb / rho) - xp.exp(-pot.g_ab / rho))
    else:
        grad_a = (rho + eps) * (1 - xp.exp(-pot.f_ba / rho)) + eps * (mass_b - 1)
        grad_b = (rho + eps) * (1 - xp.exp(-pot.g_ab / rho)) + eps * (mass_a - 1)
    return grad_a, grad_b


#: ``SinkhornResult.plan()`` refuses to build dense plans with more entries than this.
DENSE_PLAN_MAX_ENTRIES = 10**8


class _SolverState(NamedTuple):
    """What a :class:`SinkhornResult` keeps to build plans and gradients later (batched arrays)."""

    measures: Any
    geoms: Geometries
    last: Potentials
    pot: Potentials
    log_a: Any
    log_b: Any
    debias: bool


@dataclass(frozen=True)
class SinkhornResult:
    """What :func:`ot_agnostic.sinkhorn` computed.

    Attributes
    ----------
    value : the divergence ``S_eps`` (``debias=True``) or ``OT_eps``, 0-d or ``(B,)``.
    f, g : the potentials ``f_ba`` (on x) and ``g_ab`` (on y) of ``OT_eps(a, b)``.
    f_aa, g_bb : the potentials of ``OT_eps(a, a)`` and ``OT_eps(b, b)`` (``None`` without debias).
    eps_schedule : the temperatures used, from ``diameter**p`` down to ``eps = blur**p``.
    n_iter : the number of Sinkhorn updates: eps-scaling, then those at ``eps`` (``tol``), and the final one.
    n_softmin : the number of softmin reductions these updates ran (2 per update of
        ``OT(a, b)``, 2 more per update of the debiasing terms).
    marginal_error : the measured error of the last update, per batch item the largest of
        :func:`~ot_agnostic.sinkhorn.scaling_error` over the potentials: for balanced OT, the L1 violation of the
        marginals by the plan, relative to the mass (float, or ``(B,)`` NumPy array).
    converged : ``marginal_error <= tol`` (``DEFAULT_TOL`` when ``tol=None``); bool or ``(B,)``.
    tol : the requested precision (None: GeomLoss's fixed schedule).
    max_change : the largest change of a potential during the final step.
    eps, rho : the final temperature and the marginal penalty (``None`` for balanced OT).
    backend : the plugin and the method that ran, e.g. ``"array_api/tensorized"``.
    """

    value: Any
    f: Any
    g: Any
    f_aa: Any
    g_bb: Any
    eps_schedule: tuple
    n_iter: int
    max_change: float
    eps: float
    rho: float | None
    backend: str
    marginal_error: Any
    converged: Any
    n_softmin: int
    tol: float | None
    _state: _SolverState = field(repr=False)

    def _warn_if_unconverged(self, what: str) -> None:
        if bool(_all(self.converged)):
            return
        warnings.warn(
            f"this {what} comes from potentials with a marginal error of "
            f"{_largest(self.marginal_error):.2g} (above tol={self.tol if self.tol is not None else DEFAULT_TOL:g}); "
            f"{_advice(self)}", ConvergenceWarning, stacklevel=user_stacklevel(),
        )

    @property
    def plan_shape(self) -> tuple[int, ...]:
        """Shape of the transport plan: ``(N, M)`` or ``(B, N, M)``."""
        B, N, M = self._state.geoms.xy.shape
        return (B, N, M) if self._state.measures.batched else (N, M)

    def plan_rows(self, start: int = 0, stop: int | None = None):
        """Rows ``start:stop`` of the plan ``pi_ij = a_i b_j exp((f_i + g_j - C(x_i, y_j)) / eps)``.

        Computed from the potentials; costs ``O((stop - start) * M)`` memory. Its marginals
        match ``a`` and ``b`` to ``marginal_error`` (L1, relative to the mass; balanced OT);
        a :class:`ConvergenceWarning` says when that is above ``tol``.
        """
        self._warn_if_unconverged("plan")
        state = self._state
        xp, geom = state.measures.xp, state.geoms.xy
        N = geom.shape[1]
        stop = N if stop is None else stop
        if not 0 <= start <= stop <= N:
            raise IndexError(f"plan rows {start}:{stop} are out of range for N={N}.")
        f, g = stop_gradient(state.pot.f_ba), stop_gradient(state.pot.g_ab)
        log_pi = (
            (state.log_a[:, start:stop] + f[:, start:stop] / self.eps)[:, :, None]
            + (state.log_b + g / self.eps)[:, None, :]
            - stop_gradient(geom.cost_rows(start, stop)) / self.eps
        )
        return state.measures.unbatch(xp.exp(log_pi))

    def plan_blocks(self, rows: int | None = None):
        """Iterate over ``(start, stop, plan_rows(start, stop))`` in blocks of ``rows`` rows."""
        B, N, M = self._state.geoms.xy.shape
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rows must be a positive integer (rows per block), got {rows!r}.")
        rows = rows or max(1, 2**20 // max(1, B * M))
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            yield start, stop, self.plan_rows(start, stop)

    def plan(self, max_entries: int = DENSE_PLAN_MAX_ENTRIES):
        """The dense transport plan, refused with a clear error above ``max_entries`` entries."""
        entries = math.prod(self.plan_shape)
        if entries > max_entries:
            raise MemoryError(
                f"the dense plan would have {entries:,} entries (shape {self.plan_shape}), above "
                f"max_entries={max_entries:,}. Use plan_blocks() or plan_rows() to stream it, or "
                "raise max_entries if you have the memory."
            )
        return self.plan_rows(0, None)

    def gradient(self) -> Gradients:
        """Gradients of ``value`` with respect to ``x``, ``y``, ``a``, ``b`` (envelope theorem).

        No autograd needed: they come from the converged potentials (see
        ``envelope_gradients``), so NumPy and CuPy users get them too. They equal what
        torch autograd gives on ``value``. A ``ConvergenceWarning`` says when the potentials
        are less converged than asked (their error is first order in ``marginal_error``).
        """
        self._warn_if_unconverged("gradient")
        state = self._state
        m, xp = state.measures, state.measures.xp
        grads = envelope_gradients(
            state.geoms, state.last, state.pot, state.log_a, state.log_b,
            stop_gradient(m.a), stop_gradient(m.b), self.eps, self.rho, debias=state.debias, xp=xp,
        )
        return Gradients(*(m.unbatch(stop_gradient(g)) for g in grads))


def solve(measures, selection, cost, *, blur, reach, diameter, scaling, debias, progress=None,
          precision: Precision | None = None) -> SinkhornResult:
    """Run the debiased (or not) Sinkhorn algorithm on validated measures; see ``ot_agnostic.sinkhorn``."""
    xp = measures.xp
    x, y, a, b = measures.x, measures.y, measures.a, measures.b
    p = cost.p
    if diameter is None:
        diameter = max_diameter(stop_gradient(x), stop_gradient(y), xp=xp)
    eps_list = epsilon_schedule(p, diameter, blur, scaling)
    eps = eps_list[-1]
    rho = None if reach is None else reach**p

    plugin, method = selection.plugin, selection.method

    def build(x1, x2):
        return plugin.geometry(x1, x2, cost, method, xp=xp)

    x0, y0 = stop_gradient(x), stop_gradient(y)
    xy0 = build(x0, y0)
    loop = Geometries(xy0, xy0.transpose(), *((build(x0, x0), build(y0, y0)) if debias else ()))
    if any(requires_grad(t) for t in (x, y)):
        final = Geometries(
            build(x, y0), build(y, x0), *((build(x, x0), build(y, y0)) if debias else ())
        )
    else:
        final = loop
    log_a = safe_log(stop_gradient(a), xp=xp)
    log_b = safe_log(stop_gradient(b), xp=xp)
    run = sinkhorn_loop(loop, final, log_a, log_b, stop_gradient(a), stop_gradient(b), eps_list, rho,
                        xp=xp, progress=progress, precision=precision)
    pot = run.pot
    value = sinkhorn_cost(eps, rho, a, b, pot, debias=debias, xp=xp)
    marginal_error, converged = convergence_report(run.errors, precision, batched=measures.batched)

    def out(v):
        return None if v is None else measures.unbatch(v)

    return SinkhornResult(
        value=out(value),
        f=out(pot.f_ba),
        g=out(pot.g_ab),
        f_aa=out(pot.f_aa),
        g_bb=out(pot.g_bb),
        eps_schedule=eps_list,
        n_iter=run.n_iter,
        max_change=run.change,
        eps=eps,
        rho=rho,
        backend=str(selection),
        marginal_error=marginal_error,
        converged=converged,
        n_softmin=run.n_softmin,
        tol=None if precision is None else precision.tol,
        _state=_SolverState(
            measures, loop, run.last, Potentials(*(None if v is None else stop_gradient(v) for v in pot)),
            log_a, log_b, debias,
        ),
    )


def convergence_report(errors, precision: Precision | None, *, batched: bool):
    """``(marginal_error, converged)`` for a result: floats, or ``(B,)`` NumPy arrays if batched."""
    import numpy as np

    tol = DEFAULT_TOL if precision is None else precision.tol
    errors = np.asarray(errors, dtype=float)
    converged = errors <= tol
    if batched:
        return errors, converged
    return float(errors[0]), bool(converged[0])


def _all(flags) -> bool:
    return bool(flags) if isinstance(flags, bool) else bool(flags.all())


def _largest(errors) -> float:
    return float(errors) if isinstance(errors, float) else float(errors.max())


def _advice(result) -> str:
    """What to change when a result is not converged."""
    if result.tol is None:
        return (
            "tol=None runs GeomLoss's fixed eps-scaling schedule; pass tol= (e.g. 1e-3) to iterate "
            "until the marginals are right, or use scaling closer to 1."
        )
    return (
        f"raise max_iter (it stopped after {result.n_iter} updates), or use a larger blur (eps "
        "relative to the squared diameter sets the speed of Sinkhorn), or a larger tol."
    )


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised by the caller, pointing past ot_agnostic's frames
    at the user's line."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("ot_agnostic"):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_not_converged(result: SinkhornResult) -> None:
    """The ``ConvergenceWarning`` of a result that asked for ``tol`` and stopped at ``max_iter``."""
    if result.tol is None or _all(result.converged):
        return
    warnings.warn(
        f"Sinkhorn stopped at max_iter before reaching tol={result.tol:g}: the measured marginal "
        f"error is {_largest(result.marginal_error):.3g} ({result.n_iter} updates, "
        f"{result.n_softmin} softmin passes); {_advice(result)}",
        ConvergenceWarning, stacklevel=user_stacklevel(),
    )
