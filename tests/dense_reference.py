"""A plain dense NumPy (float64) entropic OT solver: the converged reference of the tests.

It shares no code with ``ot_agnostic``: exact distances (``scipy.spatial.distance.cdist``),
``scipy.special.logsumexp``, and alternating log-domain Sinkhorn iterated to ``tol``.
Conventions (DESIGN.md): ``C(x, y) = |x - y|^p / p``, ``eps = blur**p``, ``rho = reach**p``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist
from scipy.special import logsumexp


def cost_matrix(x, y, p):
    """Exact ``|x_i - y_j|^p / p`` in float64."""
    d = cdist(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return d**2 / 2 if p == 2 else d


def _alternating(C, log_a, log_b, eps, damp, f, g, tol, max_iter):
    """Alternating log-domain Sinkhorn from ``(f, g)`` until converged; returns ``(f, g, converged)``.

    Balanced (``damp = 1``): until the plan's row marginal is ``a`` to ``tol`` in L1 (its
    columns are exact after each ``g`` update; the potentials themselves drift along
    ``(f + c, g - c)``, which changes no plan). Unbalanced: until the potentials move by
    less than ``tol``.
    """
    for _ in range(max_iter):
        f_new = -damp * eps * logsumexp(log_b[None, :] + (g[None, :] - C) / eps, axis=1)
        g_new = -damp * eps * logsumexp(log_a[:, None] + (f_new[:, None] - C) / eps, axis=0)
        if damp == 1.0:
            rows = logsumexp(log_b[None, :] + (f_new[:, None] + g_new[None, :] - C) / eps, axis=1)
            change = np.sum(np.exp(log_a) * np.abs(np.expm1(rows)))
        else:
            change = max(np.abs(f_new - f).max(), np.abs(g_new - g).max())
        f, g = f_new, g_new
        if change < tol:
            return f, g, True
    return f, g, False


def _symmetric(C, log_a, eps, damp, f, tol, max_iter):
    """``f <- (f + T(f)) / 2`` for ``OT(a, a)`` until ``T(f) = f`` to ``tol`` (the row
    marginal's L1 error when balanced, the potential's change when not)."""
    a = np.exp(log_a)
    for _ in range(max_iter):
        image = -damp * eps * logsumexp(log_a[None, :] + (f[None, :] - C) / eps, axis=1)
        error = np.sum(a * np.abs(np.expm1((f - image) / eps))) if damp == 1.0 else np.abs(image - f).max()
        if error < tol:
            return image, True
        f = (f + image) / 2
    return f, False


def dense_entropic_ot(x, y, a, b, p, eps, rho=None, tol=1e-13, max_iter=200_000):
    """Fully converged (un)balanced entropic OT on dense float64 matrices.

    Alternating log-domain Sinkhorn ``f = -d eps log sum_j b_j exp((g_j - C_ij) / eps)``
    with ``d = 1`` (balanced) or ``d = rho / (rho + eps)`` (KL marginal penalty ``rho``),
    warm-started by halving eps from ``max C`` (each level to a coarse ``1e-3``), then run
    at ``eps`` to ``tol`` (see :func:`_alternating`). Returns
    ``(value, f, g, plan)`` where ``value`` is the dual functional of DESIGN.md (its
    maximum at convergence):
    ``-rho <a, e^{-f/rho} - 1> - rho <b, e^{-g/rho} - 1> - eps <a x b, e^{(f+g-C)/eps} - 1>``
    (``<a, f> + <b, g> - ...`` when balanced).
    """
    C = cost_matrix(x, y, p)
    with np.errstate(divide="ignore"):  # zero weights: log 0 = -inf drops them from the sums
        log_a, log_b = np.log(a), np.log(b)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    level = max(C.max(), eps)
    while level > eps:
        damp = 1.0 if rho is None else rho / (rho + level)
        f, g, _ = _alternating(C, log_a, log_b, level, damp, f, g, 1e-3, 2000)
        level /= 2
    damp = 1.0 if rho is None else rho / (rho + eps)
    if x is y and a is b:  # OT(a, a): the symmetric iteration, which has no slow gauge mode
        f, converged = _symmetric(C, log_a, eps, damp, (f + g) / 2, tol, max_iter)
        g = f
    else:
        f, g, converged = _alternating(C, log_a, log_b, eps, damp, f, g, tol, max_iter)
    if not converged:  # pragma: no cover - the reference itself must converge
        raise AssertionError("the dense reference Sinkhorn did not converge")
    plan = np.exp(log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - C) / eps)
    penalty = eps * (plan.sum() - a.sum() * b.sum())
    if rho is None:
        return a @ f + b @ g - penalty, f, g, plan
    value = -rho * (a @ (np.exp(-f / rho) - 1)) - rho * (b @ (np.exp(-g / rho) - 1)) - penalty
    return value, f, g, plan


def cost_gradient(x, y, plan, p):
    """``sum_j plan_ij grad_x C(x_i, y_j)`` (float64), with ``grad |x - y| = 0`` at ``x = y``."""
    diff = x[:, None, :] - y[None, :, :]
    if p == 1:
        norm = np.linalg.norm(diff, axis=2, keepdims=True)
        diff = np.where(norm > 0, diff / np.where(norm > 0, norm, 1.0), 0.0)
    return np.einsum("ij,ijd->id", plan, diff)


def dense_divergence(x, y, a, b, p, blur, reach=None, debias=True):
    """Converged ``S_eps = OT(a,b) - OT(a,a)/2 - OT(b,b)/2 + eps/2 (m_a - m_b)^2`` (the mass
    term only when unbalanced), or ``OT_eps(a, b)`` when ``debias=False``."""
    eps, rho = blur**p, None if reach is None else reach**p
    value = dense_entropic_ot(x, y, a, b, p, eps, rho)[0]
    if not debias:
        return value
    value -= dense_entropic_ot(x, x, a, a, p, eps, rho)[0] / 2
    value -= dense_entropic_ot(y, y, b, b, p, eps, rho)[0] / 2
    if rho is not None:
        value += eps / 2 * (a.sum() - b.sum()) ** 2
    return value
