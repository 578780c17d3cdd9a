r"""
Speed against the number of points
==================================

Wall-clock time of the debiased Sinkhorn divergence **and its gradient** against
``N = M``, from the benchmark runs recorded in the README and in :doc:`/backends`
(``benchmarks_scripts/*.py``, CPU only, two-core Xeon). The numbers are read from
``docs/benchmark_results.json``, which also records the date, machine, settings and
script of each run; this example does not re-run the benchmarks (some take hours).
No GPU has been available to the project yet, so there are no GPU timings.

* Left: NumPy arrays through the Numba CPU kernels against GeomLoss 0.3.1 on torch CPU
  tensors (its KeOps "online" and dense "tensorized" backends), and ``ot_agnostic`` on
  torch CPU tensors (KeOps, and ``backend="auto"``, which stays dense up to
  :math:`2^{23}` cost entries). On a CPU, NumPy arrays are 20-30x faster than torch tensors.
* Right: multiscale (coarse-to-fine, block-sparse) Sinkhorn on 3-D clouds against the
  online kernels and GeomLoss's multiscale backend, for two blurs.
"""

# %%
# The recorded numbers
# --------------------

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

try:
    ROOT = Path(__file__).resolve().parents[2]
except NameError:  # sphinx-gallery runs the script from examples/gallery, without __file__
    ROOT = Path.cwd().resolve().parents[1]
results = json.loads((ROOT / "docs" / "benchmark_results.json").read_text())

for name in ("numpy_numba_vs_geomloss", "torch_keops_vs_geomloss", "multiscale_vs_geomloss"):
    run = results[name]
    print(f"{name}: {run['source']}, {run['date']}, {run['machine']}")

# %%
# The figure
# ----------

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))

numpy_run, torch_run = results["numpy_numba_vs_geomloss"], results["torch_keops_vs_geomloss"]
styles = {
    "ot_agnostic (NumPy, Numba)": dict(color="tab:blue", marker="o", lw=2),
    "GeomLoss online (KeOps CPU)": dict(color="tab:orange", marker="s"),
    "GeomLoss tensorized": dict(color="tab:green", marker="^"),
    "ot_agnostic backend='keops' (torch)": dict(color="tab:purple", marker="D", ls="--"),
    "ot_agnostic backend='auto' (torch)": dict(color="tab:red", marker="v", ls="--"),
}
for label, times in numpy_run["series"].items():
    left.loglog(numpy_run["N"], times, label=label, **styles[label])
for label, times in torch_run["series"].items():
    if label.startswith("GeomLoss"):
        continue  # the same GeomLoss backend as in the NumPy run, re-measured in this run
    left.loglog(torch_run["N"], times, label=label, **styles[label])
n = np.array(numpy_run["N"], dtype=float)
left.loglog(n, 6.09 * (n / n[-1]) ** 2, color="gray", lw=0.8, ls=":", label=r"$\propto N^2$")
left.set_title("float32, D=3, p=2, blur=0.05, scaling=0.5")
left.set_xlabel("N = M")
left.set_ylabel("seconds (divergence + gradient)")
left.legend(fontsize=8)

multiscale = results["multiscale_vs_geomloss"]["rows"]
columns = {
    "ours_multiscale": ("ot_agnostic multiscale (NumPy)", "tab:blue", "o"),
    "ours_online": ("ot_agnostic online (NumPy)", "tab:cyan", "s"),
    "geomloss_multiscale": ("GeomLoss multiscale (torch CPU)", "tab:orange", "^"),
}
for blur, ls in ((0.05, "-"), (0.01, "--")):
    rows = [r for r in multiscale if r["blur"] == blur]
    for key, (label, colour, marker) in columns.items():
        pts = [(r["N"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            right.loglog(*zip(*pts), ls=ls, marker=marker, color=colour, label=f"{label}, blur={blur}")
right.set_title("multiscale, float32, D=3, p=2, scaling=0.5")
right.set_xlabel("N = M")
right.set_ylabel("seconds (divergence + gradient)")
right.legend(fontsize=7)

for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
fig.suptitle("Recorded CPU timings (2-core Xeon, 2026-11-22); see docs/benchmark_results.json")
fig.tight_layout()
plt.show()
