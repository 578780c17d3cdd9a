"""Multiscale Sinkhorn: eps-scaling on cluster centroids, then block-sparse on the points.

The algorithm of GeomLoss (Feydy 2020, Algorithm 3.6), run on any plugin:

1. both clouds are cut into grid cells of side ``cluster_scale`` and sorted by cell
   (:mod:`ot_agnostic.clustering`): each cluster is a contiguous range of points with a
   centroid and a mass;
2. the eps-scaling loop runs on the cluster measures while ``eps`` is larger than
   ``cluster_scale**p`` (the clusters are then finer than the blur of the transport plan);
3. at the jump, the four potentials are extrapolated to the points by one softmin against
   the centroids, and the cluster pairs whose coupling is negligible,
   ``f_I + g_J - C(x_I, y_J) < -truncate * eps`` (coarse potentials and centroids), are
   dropped, except those within ``truncate * eps`` of the best pair of their row or column
   (see :func:`truncation`): each cluster of ``x`` keeps a few contiguous column ranges of ``y``;
4. the loop goes on with block-sparse softmins on the points, down to ``eps = blur**p``,
   and the final extrapolation (which carries the gradients) is block-sparse too.

The jump happens at the last temperature that is still above ``cluster_scale**p``. When
there is none (clusters finer than the blur), the loop stays on the clusters to the end
and, as in GeomLoss, the final step *is* the extrapolation to the points (a softmin
against the centroids, which carries the gradients): no truncation, no block-sparse step.
Memory: ``O(N + M)`` for the points plus ``O(Kx * Ky)`` booleans for the kept cluster
pairs. Batches are solved one item after the other (each item has its own clusters).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._array_api import device_of, requires_grad, safe_log, stop_gradient, to_host
from .backends import Method
from .backends._base import BlockSparsity
from .clustering import default_cluster_scale, geomloss_cluster_scale, grid_clusters, label_clusters
from .sinkhorn import (
    Anderson,
    Geometries,
    Gradients,
    Potentials,
    Precision,
    SinkhornResult,
    _average,
    _max_change,
    _sinkhorn_step,
    dampening,
    envelope_gradients,
    epsilon_schedule,
    convergence_report,
    max_diameter,
    refine,
    sinkhorn_cost,
    step_errors,
)

#: GeomLoss's default: keep the cluster pairs whose coupling is above ``exp(-truncate)``.
DEFAULT_TRUNCATE = 5.0
#: Multiscale works on grids: up to this dimension.
MAX_DIM = 3


def jump_index(eps_list, cluster_scale: float, p: int) -> int:
    """The iteration after which the loop leaves the clusters for the points.

    As GeomLoss: the iteration before the first temperature (from the third on) that is
    below ``cluster_scale**p``; the last iteration if there is none.
    """
    for i, eps in enumerate(eps_list[2:]):
        if cluster_scale**p > eps:
            return i + 1
    return len(eps_list) - 1


def truncation(coarse_f, coarse_g, centroids_x, centroids_y, cost, eps, truncate, *, xp):
    """The kept cluster pairs, a host boolean array (all of them if ``truncate`` is None): with ``s = f_I + g_J - C(x_I, y_J)``,
    ``keep[I, J] = s >= -truncate * eps`` (GeomLoss' rule) or ``s`` within ``truncate * eps``
    of the largest ``s`` of row ``I`` or of column ``J``.

    The second part only matters when a whole row (or column) falls below the first
    threshold, e.g. an isolated cluster in unbalanced OT, whose damped potentials lower
    every ``s``: it would otherwise keep no partner at all and get an infinite potential.
    """
    if truncate is None:  # GeomLoss's truncate=None: keep every pair
        return to_host(xp.ones((centroids_x.shape[0], centroids_y.shape[0]), dtype=xp.bool))
    c = cost.matrix(centroids_x[None, ...], centroids_y[None, ...], xp=xp)[0, ...]
    s = coarse_f[:, None] + coarse_g[None, :] - c
    margin = truncate * eps
    row_best = xp.max(s, axis=1, keepdims=True)
    col_best = xp.max(s, axis=0, keepdims=True)
    keep = (s >= -margin) | (s >= row_best - margin) | (s >= col_best - margin)
    return to_host(keep)


class MultiscaleProblem:
    """One batch item: sorted points, their clusters, and the geometries at both scales."""

    def __init__(self, x, y, a, b, cost, plugin, cluster_scale, *, xp, labels=None):
        self.xp, self.cost, self.plugin = xp, cost, plugin
        if labels is None:
            self.cx = grid_clusters(stop_gradient(x), stop_gradient(a), cluster_scale, xp=xp)
            self.cy = grid_clusters(stop_gradient(y), stop_gradient(b), cluster_scale, xp=xp)
        else:
            self.cx = label_clusters(stop_gradient(x), stop_gradient(a), labels[0], xp=xp)
            self.cy = label_clusters(stop_gradient(y), stop_gradient(b), labels[1], xp=xp)
        take = xp.take
        # sorted points, batch axis of 1 for the plugins; x and y keep autograd
        self.x = take(x, self.cx.perm, axis=0)[None, ...]
        self.y = take(y, self.cy.perm, axis=0)[None, ...]
        self.a = take(a, self.cx.perm)[None, :]
        self.b = take(b, self.cy.perm)[None, :]
        self.xc, self.yc = self.cx.centroids[None, ...], self.cy.centroids[None, ...]
        self.log_ac = safe_log(self.cx.masses, xp=xp)[None, :]
        self.log_bc = safe_log(self.cy.masses, xp=xp)[None, :]

    def dense(self, x1, x2):
        """A plugin geometry (online: no N x M matrix) between two point sets."""
        return self.plugin.geometry(x1, x2, self.cost, Method.ONLINE, xp=self.xp)

    def coarse_geometries(self, debias):
        xy = self.dense(self.xc, self.yc)
        extra = (self.dense(self.xc, self.xc), self.dense(self.yc, self.yc)) if debias else ()
        return Geometries(xy, xy.transpose(), *extra)

    def fine_geometries(self, keeps, x, y):
        """Block-sparse geometries from the kept cluster pairs (``x``, ``y``: rows tracked or not)."""
        build = self.plugin.block_sparse_geometry
        rx, ry = self.cx.ranges, self.cy.ranges
        xy = build(x, stop_gradient(self.y), self.cost, BlockSparsity(rx, ry, keeps[0]), xp=self.xp)
        yx = build(y, stop_gradient(self.x), self.cost, BlockSparsity(ry, rx, keeps[0].T), xp=self.xp)
        if len(keeps) == 1:
            return Geometries(xy, yx)
        xx = build(x, stop_gradient(self.x), self.cost, BlockSparsity(rx, rx, keeps[1]), xp=self.xp)
        yy = build(y, stop_gradient(self.y), self.cost, BlockSparsity(ry, ry, keeps[2]), xp=self.xp)
        return Geometries(xy, yx, xx, yy)

    def extrapolation_geometries(self, debias, x, y):
        """Points against centroids (``x``, ``y``: the points, tracked or not): one
        ``_sinkhorn_step`` on them, with the clusters' log-weights, carries the coarse
        potentials to the points."""
        xc, yc = stop_gradient(self.xc), stop_gradient(self.yc)
        extra = (self.dense(x, xc), self.dense(y, yc)) if debias else ()
        return Geometries(self.dense(x, yc), self.dense(y, xc), *extra)

    def extrapolate(self, pot: Potentials, eps, damping) -> Potentials:
        """The coarse potentials carried to the points: one softmin against the centroids."""
        geoms = self.extrapolation_geometries(pot.f_aa is not None, stop_gradient(self.x), stop_gradient(self.y))
        return _sinkhorn_step(geoms, pot, self.log_ac, self.log_bc, eps, damping)

    def seen_from_centroids(self, pot: Potentials, eps, damping) -> Potentials:
        """Point potentials carried to the centroids (their c-transforms at ``x_I``, ``y_J``:
        ``f_I = d softmin_j(log b_j + g_j / eps)`` on ``C(x_I, y_j)``, ...), to re-truncate."""
        xp = self.xp
        x, y = stop_gradient(self.x), stop_gradient(self.y)
        log_a, log_b = safe_log(stop_gradient(self.a), xp=xp), safe_log(stop_gradient(self.b), xp=xp)
        f = damping * self.dense(self.xc, y).softmin(eps, log_b + pot.g_ab / eps)
        g = damping * self.dense(self.yc, x).softmin(eps, log_a + pot.f_ba / eps)
        if pot.f_aa is None:
            return Potentials(f, g)
        f_aa = damping * self.dense(self.xc, x).softmin(eps, log_a + pot.f_aa / eps)
        g_bb = damping * self.dense(self.yc, y).softmin(eps, log_b + pot.g_bb / eps)
        return Potentials(f, g, f_aa, g_bb)

    def widen(self, keeps, pot: Potentials, eps, damping, truncate):
        """``keeps`` plus the pairs the refined point potentials ``pot`` ask for (None if none)."""
        wanted = self.keeps(self.seen_from_centroids(pot, eps, damping), eps, truncate)
        if all(not (new & ~old).any() for old, new in zip(keeps, wanted)):
            return None
        return [old | new for old, new in zip(keeps, wanted)]

    def on_points(self, coarse: Potentials) -> Potentials:
        """Each point gets the coarse potential of its cluster (to measure a change)."""
        import numpy as np

        xp = self.xp

        def spread(v, clusters):
            counts = clusters.ranges[:, 1] - clusters.ranges[:, 0]
            index = xp.asarray(np.repeat(np.arange(clusters.count), counts), device=device_of(v))
            return xp.take(v, index, axis=1)

        fx = (coarse.f_ba, coarse.f_aa)
        gy = (coarse.g_ab, coarse.g_bb)
        return Potentials(
            spread(fx[0], self.cx), spread(gy[0], self.cy),
            *(() if fx[1] is None else (spread(fx[1], self.cx), spread(gy[1], self.cy))),
        )

    def keeps(self, pot: Potentials, eps, truncate):
        """The kept cluster pairs of OT(a, b) (and of OT(a, a), OT(b, b) when debiased)."""
        xp = self.xp
        keeps = [truncation(pot.f_ba[0, ...], pot.g_ab[0, ...], self.xc[0, ...], self.yc[0, ...], self.cost, eps, truncate, xp=xp)]
        if pot.f_aa is not None:
            keeps.append(truncation(pot.f_aa[0, ...], pot.f_aa[0, ...], self.xc[0, ...], self.xc[0, ...], self.cost, eps, truncate, xp=xp))
            keeps.append(truncation(pot.g_bb[0, ...], pot.g_bb[0, ...], self.yc[0, ...], self.yc[0, ...], self.cost, eps, truncate, xp=xp))
        return keeps


class ItemSolution(NamedTuple):
    """The solution of one batch item, sorted by cluster (batch axis of 1).

    ``pot``: the final potentials on the points; ``last``: the loop iterate the final step
    started from (on the clusters if the final step was the extrapolation); ``geoms``,
    ``log_a``, ``log_b``: the geometries and log-weights of the final step (its envelope
    gradients); ``keeps``: the kept cluster pairs (None when the loop never left the clusters);
    ``error``: the measured error of the final step; ``n_iter``, ``n_softmin``: the counts.
    """

    pot: Potentials
    last: Potentials
    change: float
    geoms: Geometries
    log_a: Any
    log_b: Any
    keeps: Any
    error: float
    n_iter: int
    n_softmin: int


#: Multiscale refinement checks the kept cluster pairs every so many updates.
RETRUNCATE_EVERY = 50


def solve_item(problem: MultiscaleProblem, eps_list, rho, jump, truncate, debias, progress=None,
               precision: Precision | None = None) -> ItemSolution:
    """Run the two-scale loop on one item (then, with ``precision``, refine on the points)."""
    xp = problem.xp
    per_step = 4 if debias else 2
    geoms = problem.coarse_geometries(debias)
    log_a, log_b = problem.log_ac, problem.log_bc
    zeros_x, zeros_y = xp.zeros_like(log_a), xp.zeros_like(log_b)
    start = Potentials(zeros_x, zeros_y, *((zeros_x, zeros_y) if debias else ()))
    pot = _sinkhorn_step(geoms, start, log_a, log_b, eps_list[0], dampening(eps_list[0], rho))
    keeps = None
    final_index = len(eps_list) - 1
    updates = 1 + len(eps_list)
    total = len(eps_list) + 1

    def jump_to_points(pot, eps, damping):
        nonlocal keeps, geoms, log_a, log_b
        keeps = problem.keeps(pot, eps, truncate)
        pot = problem.extrapolate(pot, eps, damping)
        geoms = problem.fine_geometries(keeps, stop_gradient(problem.x), stop_gradient(problem.y))
        log_a = safe_log(stop_gradient(problem.a), xp=xp)
        log_b = safe_log(stop_gradient(problem.b), xp=xp)
        return pot

    for i, eps in enumerate(eps_list):
        damping = dampening(eps, rho)
        pot = _average(pot, _sinkhorn_step(geoms, pot, log_a, log_b, eps, damping))
        if i == jump and i < final_index:
            pot = jump_to_points(pot, eps, damping)
        if progress is not None:
            progress(i + 1, total)
    eps = eps_list[-1]
    passes = per_step * updates
    if precision is not None and keeps is None:  # refine on the points, not on the clusters
        pot = jump_to_points(pot, eps, dampening(eps, rho))
        updates, passes = updates + 1, passes + per_step
    a, b = stop_gradient(problem.a), stop_gradient(problem.b)
    budget = 0 if precision is None else precision.max_iter
    anderson = Anderson(a, xp=xp)  # one mixing history per geometry: chunks continue it
    while True:
        while budget > 0:
            # Refine on the kept pairs in chunks; after each, keep the pairs the refined
            # potentials ask for: those chosen from the unconverged potentials of the jump
            # may not carry the converged plan (Sinkhorn on them would not converge).
            chunk = Precision(precision.tol, min(budget, RETRUNCATE_EVERY))
            report = None if progress is None else (
                lambda done, cap, base=total, left=budget: progress(base - 1 + done, base + left))
            pot, refined, refine_passes = refine(geoms, pot, log_a, log_b, a, b, eps, rho, chunk, xp=xp,
                                                 progress=report, anderson=anderson)
            updates, passes, total, budget = updates + refined, passes + refine_passes, total + refined, budget - refined
            wider = None if truncate is None else problem.widen(keeps, pot, eps, dampening(eps, rho), truncate)
            if wider is None and refined < chunk.max_iter:
                break
            if wider is not None:
                keeps = wider
                geoms = problem.fine_geometries(keeps, stop_gradient(problem.x), stop_gradient(problem.y))
                anderson = Anderson(a, xp=xp)
        last = Potentials(*(None if v is None else stop_gradient(v) for v in pot))
        tracked = any(requires_grad(t) for t in (problem.x, problem.y))
        if keeps is None:  # GeomLoss: the extrapolation from the clusters is the final step
            geoms = problem.extrapolation_geometries(debias, stop_gradient(problem.x), stop_gradient(problem.y))
            final = problem.extrapolation_geometries(debias, problem.x, problem.y) if tracked else geoms
            before = problem.on_points(last)
        else:
            final = problem.fine_geometries(keeps, problem.x, problem.y) if tracked else geoms
            before = last
        out = _sinkhorn_step(final, last, log_a, log_b, eps, dampening(eps, rho))
        error = step_errors(before, out, a, b, eps, xp=xp)[0]
        updates, passes = updates + 1, passes + per_step
        # The final update may still see an error above tol: refine again, within the budget.
        if budget <= 0 or error <= precision.tol:
            break
        pot = last
    if progress is not None:
        progress(total, total)
    return ItemSolution(out, last, _max_change(before, out, xp=xp), geoms, log_a, log_b, keeps,
                        error, updates, passes)


def solve_multiscale(measures, selection, cost, *, blur, reach, diameter, scaling, debias,
                     truncate=DEFAULT_TRUNCATE, cluster_scale=None, progress=None,
                     labels=None, precision: Precision | None = None) -> SinkhornResult:
    """Multiscale counterpart of :func:`ot_agnostic.sinkhorn.solve` (same result fields).

    ``labels``: None (grid clusters of side ``cluster_scale``) or validated batched integer
    labels ``(labels_x (B, N), labels_y (B, M))`` that define the clusters instead (any D;
    ``cluster_scale`` then only places the jump, 0 meaning "after the last iteration", and
    defaults to GeomLoss's ``diameter / (sqrt(D) * 2000**(1/D))``). ``truncate=None`` keeps
    every cluster pair.
    """
    xp = measures.xp
    B, N, M, D = measures.shape
    if D > MAX_DIM and labels is None:
        raise ValueError(
            f"backend='multiscale' clusters the points on a grid and supports D <= {MAX_DIM}, "
            f"got D={D}; give your own clusters (cluster_labels=, e.g. from K-means) or use "
            "backend='online' (O(N + M) memory) instead."
        )
    if labels is None and cluster_scale is not None and not cluster_scale > 0:
        raise ValueError(
            f"cluster_scale must be positive to cut the points into grid cells, got {cluster_scale!r} "
            "(0 is accepted with cluster_labels, where it only places the jump to the points)."
        )
    if cost.custom and cost.function is None:
        raise ValueError(
            "backend='multiscale' with a custom cost needs the cost matrix between cluster "
            "centroids (for the truncation): pass cost=(formula, function) as in GeomLoss, with "
            "function(x, y) returning the (B, N, M) cost matrix."
        )
    p = cost.p
    if diameter is None:
        diameter = max_diameter(stop_gradient(measures.x), stop_gradient(measures.y), xp=xp)
    eps_list = epsilon_schedule(p, diameter, blur, scaling)
    eps = eps_list[-1]
    rho = None if reach is None else reach**p
    if cluster_scale is None and labels is not None:  # GeomLoss's default jump
        scale = geomloss_cluster_scale(diameter, D)
    elif cluster_scale is None:
        scale = default_cluster_scale(diameter, D, blur, max(N, M))
    else:
        scale = float(cluster_scale)
    jump = jump_index(eps_list, scale, p)

    items, finished = [], [0]
    for k in range(B):
        problem = MultiscaleProblem(
            measures.x[k, ...], measures.y[k, ...], measures.a[k, ...], measures.b[k, ...], cost,
            selection.plugin, scale, xp=xp, labels=None if labels is None else (labels[0][k, ...], labels[1][k, ...]),
        )
        report = _item_progress(progress, k, B, finished)
        items.append((problem, solve_item(problem, eps_list, rho, jump, truncate, debias, report, precision)))
        if report is not None:
            finished[0] += report.last[1]
    values = [sinkhorn_cost(eps, rho, problem.a, problem.b, sol.pot, debias=debias, xp=xp) for problem, sol in items]
    value = xp.concat(values, axis=0)

    def unsorted(name):
        parts = []
        for problem, sol in items:
            v = getattr(sol.pot, name)
            if v is None:
                return None
            perm = problem.cx.perm if name in ("f_ba", "f_aa") else problem.cy.perm
            parts.append(xp.take(v[0, ...], _inverse(perm, xp), axis=0)[None, :])
        return measures.unbatch(xp.concat(parts, axis=0))

    change = max(sol.change for _, sol in items)
    marginal_error, converged = convergence_report([sol.error for _, sol in items], precision, batched=measures.batched)
    state = _MultiscaleState(measures, items, eps, rho, debias)
    return MultiscaleResult(
        value=measures.unbatch(value),
        f=unsorted("f_ba"), g=unsorted("g_ab"), f_aa=unsorted("f_aa"), g_bb=unsorted("g_bb"),
        eps_schedule=eps_list, n_iter=max(sol.n_iter for _, sol in items), max_change=change,
        eps=eps, rho=rho, backend=f"{selection.plugin.id.value}/multiscale",
        marginal_error=marginal_error, converged=converged,
        n_softmin=sum(sol.n_softmin for _, sol in items), tol=None if precision is None else precision.tol,
        _state=state,
    )


class _MultiscaleState:
    def __init__(self, measures, items, eps, rho, debias):
        self.measures, self.items, self.eps, self.rho, self.debias = measures, items, eps, rho, debias

    @property
    def kept_fraction(self) -> float:
        """The fraction of the ``N x M`` pairs of OT(a, b) that the fine iterations reduce over."""
        kept = total = 0
        for problem, sol in self.items:
            if sol.keeps is not None:  # else: no step on the points but the extrapolation
                kept += BlockSparsity(problem.cx.ranges, problem.cy.ranges, sol.keeps[0]).kept_pairs
            total += problem.x.shape[1] * problem.y.shape[1]
        return kept / total


class MultiscaleResult(SinkhornResult):
    """A :class:`~ot_agnostic.sinkhorn.SinkhornResult` from ``backend="multiscale"``.

    ``gradient()`` works as for the other backends; the dense plan helpers are not
    available (use ``backend="online"`` for plans). ``kept_fraction``: the share of the
    ``N x M`` pairs the fine iterations visited.
    """

    @property
    def kept_fraction(self) -> float:
        """The share of the ``N x M`` pairs of ``OT(a, b)`` that the fine iterations visit
        (0 when the loop never left the clusters, see ``extrapolated``)."""
        return self._state.kept_fraction

    @property
    def extrapolated(self) -> bool:
        """True when the loop stayed on the clusters (``cluster_scale <= blur``) and the final
        step was the extrapolation from the clusters to the points (as GeomLoss)."""
        return any(sol.keeps is None for _, sol in self._state.items)

    @property
    def plan_shape(self):
        raise NotImplementedError(
            "transport plans are not available from backend='multiscale' results; "
            "run backend='online' (or 'tensorized') for plan(), plan_rows(), plan_blocks()."
        )

    def plan_rows(self, start=0, stop=None):
        return self.plan_shape

    def plan_blocks(self, rows=None):
        return self.plan_shape

    def plan(self, max_entries=None):
        return self.plan_shape

    def gradient(self) -> Gradients:
        """Gradients with respect to ``x``, ``y``, ``a``, ``b`` (envelope theorem), in the input order.

        From the block-sparse geometries of the final step, as torch autograd gives them.
        """
        self._warn_if_unconverged("gradient")
        state = self._state
        m, xp = state.measures, state.measures.xp
        parts = []
        for problem, sol in state.items:
            sorted_grads = envelope_gradients(
                sol.geoms, sol.last, Potentials(*(None if v is None else stop_gradient(v) for v in sol.pot)),
                sol.log_a, sol.log_b, stop_gradient(problem.a), stop_gradient(problem.b),
                state.eps, state.rho, debias=state.debias, xp=xp,
            )
            inv_x, inv_y = _inverse(problem.cx.perm, xp), _inverse(problem.cy.perm, xp)
            parts.append(Gradients(
                xp.take(sorted_grads.x[0, ...], inv_x, axis=0)[None, ...],
                xp.take(sorted_grads.y[0, ...], inv_y, axis=0)[None, ...],
                xp.take(sorted_grads.a[0, ...], inv_x, axis=0)[None, ...],
                xp.take(sorted_grads.b[0, ...], inv_y, axis=0)[None, ...],
            ))
        return Gradients(*(m.unbatch(stop_gradient(xp.concat(g, axis=0))) for g in zip(*parts)))


def _item_progress(progress, k, B, finished):
    """``progress(done, total)`` over the whole batch, from item ``k``'s own count.

    ``finished``: a one-element list, the steps of the items already done (their totals
    vary when refining to ``tol``); the items still to come are counted like this one.
    """
    if progress is None:
        return None

    def report(done, total):
        progress(finished[0] + done, finished[0] + (B - k) * total)
        report.last = (done, total)

    report.last = (0, 0)
    return report


def _inverse(perm, xp):
    return xp.argsort(perm)

