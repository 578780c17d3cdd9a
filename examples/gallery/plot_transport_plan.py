r"""
Transport plans and the entropic (Brenier) map in 2-D
=====================================================

For two small clouds, :func:`ot_agnostic.sinkhorn` returns the potentials of entropic OT,
and :meth:`SinkhornResult.plan() <ot_agnostic.SinkhornResult.plan>` the plan
:math:`\pi_{ij} = a_i b_j \exp\big((f_i + g_j - C(x_i, y_j)) / \varepsilon\big)` with
:math:`\varepsilon = \mathrm{blur}^p`. Each pair is drawn as a segment whose opacity is its
mass (top row). Its barycentric projection
:math:`T(x_i) = \sum_j \pi_{ij} \, y_j / a_i` approximates the Brenier (optimal) map for
``p=2``; :class:`~ot_agnostic.transformer.OTTransformer` computes the same map, out of sample, as
:math:`T(x) = \sum_j w_j(x) \, y_j` (bottom row, arrows). A small ``blur`` gives a nearly
one-to-one plan and a map close to the optimal one; a large ``blur`` spreads each point
over many partners and shrinks the map towards the mean of the target.
"""

# %%
# Two clouds
# ----------

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection

import ot_agnostic as ota

rng = np.random.default_rng(1)
N, M = 30, 40
x = rng.normal(size=(N, 2)) * [0.25, 0.08] + [0.0, -0.45]            # an elongated blob
t = 2 * np.pi * rng.random(M)
y = 0.3 * np.stack([np.cos(t), np.sin(t)], axis=1) + [0.0, 0.35]     # a ring
y += 0.02 * rng.normal(size=(M, 2))

# %%
# Plans and maps for two blurs
# ----------------------------
# :func:`~ot_agnostic.sinkhorn` runs eps-scaling, then iterates at the final temperature
# until the plan's L1 marginal error is below ``tol``: here ``tol=1e-6``, so the plan is a
# coupling (its marginals equal the weights) to that precision. (With ``tol=None``, GeomLoss's
# schedule alone, the marginals at ``scaling=0.5`` and ``blur=0.05`` would be off by a
# factor of several.) The arrows of the bottom row come from
# ``OTTransformer(target=y, blur=blur).fit(x).transform(x)``, the same loop at the default
# ``tol``, and the script prints how far they are from the barycentric projection of the plan.

blurs = (0.05, 0.3)
fig, axes = plt.subplots(2, len(blurs), figsize=(4.2 * len(blurs), 8.4), sharex=True, sharey=True)
for col, blur in enumerate(blurs):
    res = ota.sinkhorn(x, y, blur=blur, tol=1e-6, debias=False)
    plan = np.asarray(res.plan())                          # (N, M), sums to 1
    a = plan.sum(axis=1)
    barycentric = plan @ y / a[:, None]                    # T(x_i) = sum_j pi_ij y_j / a_i

    mapped = ota.OTTransformer(target=y, blur=blur).fit(x).transform(x)
    gap = np.abs(mapped - barycentric).max()

    ax = axes[0, col]
    i, j = np.nonzero(plan > 1e-4 * plan.max())
    segments = np.stack([x[i], y[j]], axis=1)
    colours = np.zeros((len(i), 4))
    colours[:, 3] = 0.6 * plan[i, j] / plan.max()          # opacity = mass
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.6))
    ax.scatter(*x.T, s=25, c="tab:blue", zorder=3, label=r"$x_i$ (source)")
    ax.scatter(*y.T, s=25, c="tab:red", zorder=3, label=r"$y_j$ (target)")
    ax.set_title(f"plan, blur = {blur}  ({len(i)} pairs drawn)")

    ax = axes[1, col]
    ax.scatter(*y.T, s=25, c="tab:red", alpha=0.4, zorder=1)
    ax.scatter(*x.T, s=25, c="tab:blue", zorder=3)
    ax.quiver(*x.T, *(mapped - x).T, angles="xy", scale_units="xy", scale=1, width=0.004,
              color="tab:green", zorder=2)
    ax.set_title(f"map $x \\mapsto T(x)$, blur = {blur}")
    marginal_error = max(np.abs(a * N - 1).max(), np.abs(plan.sum(axis=0) * M - 1).max())
    print(f"blur={blur}: {res.n_iter} Sinkhorn updates ({res.n_softmin} softmin passes), marginals within "
          f"{100 * marginal_error:.1f}% of the weights, "
          f"|OTTransformer map - barycentric projection| <= {gap:.3f}")

for ax in axes.ravel():
    ax.set_aspect("equal")
axes[0, 0].legend(loc="center", fontsize=8)
fig.tight_layout()
plt.show()
