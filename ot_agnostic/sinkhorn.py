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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._array_api import requires_grad, safe_log, stop_gradient, to_float


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


def sinkhorn_loop(geoms: Geometries, final: Geometries, log_a, log_b, eps_list, rho, *, xp, progress=None):
    """Run eps-scaling on ``geoms``, then extrapolate once on ``final``.

    ``geoms`` hold gradient-free points; ``final`` holds the points that autograd tracks
    (each geometry tracks its first argument only, cf. the envelope theorem).
    ``progress(done, total)``, if given, is called after each of the ``len(eps_list) + 1``
    steps. Returns ``(potentials, last, max_change)``: the extrapolated potentials, the last
    loop iterate they were computed from, and the largest change between the two.
    """
    zeros_x = xp.zeros_like(log_a)
    zeros_y = xp.zeros_like(log_b)
    start = Potentials(zeros_x, zeros_y, *((zeros_x, zeros_y) if geoms.xx is not None else ()))
    pot = _sinkhorn_step(geoms, start, log_a, log_b, eps_list[0], dampening(eps_list[0], rho))
    total = len(eps_list) + 1
    for i, eps in enumerate(eps_list):
        pot = _average(pot, _sinkhorn_step(geoms, pot, log_a, log_b, eps, dampening(eps, rho)))
        if progress is not None:
            progress(i + 1, total)
    eps = eps_list[-1]
    last = Potentials(*(None if v is None else stop_gradient(v) for v in pot))
    out = _sinkhorn_step(final, last, stop_gradient(log_a), stop_gradient(log_b), eps, dampening(eps, rho))
    if progress is not None:
        progress(total, total)
    return out, last, _max_change(last, out, xp=xp)


def refine_potentials(result: "SinkhornResult", *, tol: float, max_iter: int):
    """Alternating Sinkhorn updates of ``OT(a, b)`` at the final ``eps``, from ``result``'s potentials.

    ``g <- d softmin_x(log a + f / eps)``, then ``f <- d softmin_y(log b + g / eps)`` (``d``:
    the unbalanced damping, 1 if balanced), until no potential moves by more than
    ``tol * eps`` or after ``max_iter`` rounds: the marginals of the plan then match ``a``
    and ``b`` to about ``tol`` (relative). The eps-scaling loop alone does one update per
    temperature, which leaves a few percent there. Returns ``(f, g, rounds, change)``
    (``f``, ``g`` shaped like ``result.f``, ``result.g``), ``change`` being the last move over ``eps``.
    """
    state = result._state
    xp, geoms, eps = state.measures.xp, state.geoms, result.eps
    damping = dampening(eps, result.rho)
    f, g = stop_gradient(state.pot.f_ba), stop_gradient(state.pot.g_ab)
    change, rounds = math.inf, 0
    while rounds < max_iter and change > tol:
        g_new = damping * geoms.yx.softmin(eps, state.log_a + f / eps)
        f_new = damping * geoms.xy.softmin(eps, state.log_b + g_new / eps)
        change = max(to_float(xp.max(xp.abs(f_new - f))), to_float(xp.max(xp.abs(g_new - g)))) / eps
        f, g, rounds = f_new, g_new, rounds + 1
    return state.measures.unbatch(f), state.measures.unbatch(g), rounds, change


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
    return Gradients(grad_x, grad_y, grad_a, grad_b)


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
    n_iter : the number of eps-scaling iterations (one final extrapolation step follows).
    max_change : the largest change of a potential during the final step (a convergence measure).
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
    _state: _SolverState = field(repr=False)

    @property
    def plan_shape(self) -> tuple[int, ...]:
        """Shape of the transport plan: ``(N, M)`` or ``(B, N, M)``."""
        B, N, M = self._state.geoms.xy.shape
        return (B, N, M) if self._state.measures.batched else (N, M)

    def plan_rows(self, start: int = 0, stop: int | None = None):
        """Rows ``start:stop`` of the plan ``pi_ij = a_i b_j exp((f_i + g_j - C(x_i, y_j)) / eps)``.

        Computed from the potentials; costs ``O((stop - start) * M)`` memory. The potentials
        come from one final update at ``eps``, so the marginals of the plan match ``a`` and
        ``b`` only up to a factor ``exp(+-max_change / eps)``: use ``scaling`` closer to 1
        for tighter marginals.
        """
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
        torch autograd gives on ``value``.
        """
        state = self._state
        m, xp = state.measures, state.measures.xp
        grads = envelope_gradients(
            state.geoms, state.last, state.pot, state.log_a, state.log_b,
            stop_gradient(m.a), stop_gradient(m.b), self.eps, self.rho, debias=state.debias, xp=xp,
        )
        return Gradients(*(m.unbatch(stop_gradient(g)) for g in grads))


def solve(measures, selection, cost, *, blur, reach, diameter, scaling, debias, progress=None) -> SinkhornResult:
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
    pot, last, change = sinkhorn_loop(loop, final, log_a, log_b, eps_list, rho, xp=xp, progress=progress)
    value = sinkhorn_cost(eps, rho, a, b, pot, debias=debias, xp=xp)

    def out(v):
        return None if v is None else measures.unbatch(v)

    return SinkhornResult(
        value=out(value),
        f=out(pot.f_ba),
        g=out(pot.g_ab),
        f_aa=out(pot.f_aa),
        g_bb=out(pot.g_bb),
        eps_schedule=eps_list,
        n_iter=len(eps_list),
        max_change=change,
        eps=eps,
        rho=rho,
        backend=str(selection),
        _state=_SolverState(
            measures, loop, last, Potentials(*(None if v is None else stop_gradient(v) for v in pot)),
            log_a, log_b, debias,
        ),
    )
