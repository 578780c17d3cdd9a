"""
Wasserstein gradient flow: registering a disc onto a letter
===========================================================

The classic toy problem of GeomLoss: move the points :math:`x_i` of a source shape so as
to minimise the Sinkhorn divergence :math:`S_\\varepsilon(\\alpha, \\beta)` to a fixed
target shape :math:`\\beta`, by plain gradient descent on the positions,

.. math::

   x_i \\leftarrow x_i - \\mathrm{lr} \\cdot N \\, \\nabla_{x_i} S_\\varepsilon(\\alpha, \\beta).

The gradient of :math:`S_\\varepsilon` with respect to :math:`x_i` is :math:`a_i = 1/N`
times a displacement field (for ``p=2``, :math:`x_i` minus a weighted mean of the target
points it is matched with, corrected by the debiasing term), hence the factor :math:`N`:
with ``lr = 1`` one step moves the points (about) all the way. With NumPy arrays,
:func:`ot_agnostic.value_and_grad` returns the value and the gradients without any
autograd library, from the potentials of the final Sinkhorn update.
"""

# %%
# Two shapes
# ----------
# The source is a uniform disc; the target a thick letter "S" made of two arcs.

import time

import matplotlib.pyplot as plt
import numpy as np

import ot_agnostic as ota

rng = np.random.default_rng(0)


def disc(n, centre, radius):
    r = radius * np.sqrt(rng.random(n))
    t = 2 * np.pi * rng.random(n)
    return np.asarray(centre) + np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def letter_s(n, centre, radius, width=0.02):
    """Points along a letter "S": two stacked arcs of 270 degrees, with some thickness."""
    top = rng.random(n) < 0.5
    t = 1.5 * np.pi * rng.random(n)
    angle = np.where(top, t, np.pi / 2 - t)        # top: 0 -> 270 deg, bottom: 90 -> -180 deg
    cy = np.where(top, radius, -radius)
    r = radius + width * rng.standard_normal(n)
    return np.asarray(centre) + np.stack([r * np.cos(angle), cy + r * np.sin(angle)], axis=1)


x0 = disc(400, centre=(0.22, 0.32), radius=0.17)
y = letter_s(500, centre=(0.7, 0.5), radius=0.12)

# %%
# The flow
# --------
# ``blur=0.01`` is small compared with the shapes, so the flow matches fine details;
# ``lr=0.05`` makes small steps, so that the intermediate states are visible.

blur, lr, n_steps = 0.01, 0.05, 120
snapshots = {0, 5, 15, 40, n_steps}
x = x0.copy()
states, values = {}, []
start = time.perf_counter()
for step in range(n_steps + 1):
    if step in snapshots:
        states[step] = x.copy()
    if step == n_steps:
        values.append(float(ota.sinkhorn_divergence(x, y, blur=blur)))
        break
    value, grads = ota.value_and_grad(x, y, blur=blur)
    values.append(float(value))
    x = x - lr * len(x) * grads.x
elapsed = time.perf_counter() - start
print(f"{n_steps} steps in {elapsed:.1f} s; S_eps: {values[0]:.4f} -> {values[-1]:.2e}")

# %%
# Snapshots, and the divergence along the flow
# --------------------------------------------

fig, axes = plt.subplots(1, len(states), figsize=(2.6 * len(states), 2.6), sharex=True, sharey=True)
for ax, (step, pts) in zip(axes, sorted(states.items())):
    ax.scatter(y[:, 0], y[:, 1], s=3, c="tab:red", alpha=0.35, label="target")
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:blue", label="moving points")
    ax.set_title(f"step {step}, t = {lr * step:.2f}")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
axes[0].legend(loc="upper left", fontsize=8, markerscale=3)
fig.tight_layout()

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(np.arange(len(values)), values)
ax.set_xlabel("gradient step")
ax.set_ylabel(r"$S_\varepsilon(\alpha_t, \beta)$")
ax.set_title(f"Sinkhorn divergence along the flow (p=2, blur={blur}, lr={lr})")
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
plt.show()
