"""Cost of a given precision of the Sinkhorn divergence: ours (``tol``) against GeomLoss, POT, OTT-JAX.

Issue #13. For N = M points in D = 3 ("cube": x, y uniform in [0, 1]^3; "blobs": two
Gaussian blobs), p = 2 (cost ``|x - y|^2 / 2``), each blur (``eps = blur**2``) and each target
relative error (1e-2, 1e-3) of the value, this script finds the cheapest setting of each
library that reaches the target, and reports its softmin passes and wall time:

* ours: ``ota.sinkhorn(x, y, blur=blur, scaling=0.5, tol=tol)`` on float32 NumPy arrays (Numba
  CPU kernels), the largest ``tol`` of a ladder that reaches the target;
* GeomLoss: ``SamplesLoss("sinkhorn", p=2, blur=blur, scaling=s, backend="online")`` on torch
  float32 CPU tensors (KeOps), the smallest ``scaling`` of a ladder that reaches the target;
* POT: ``ot.bregman.empirical_sinkhorn_divergence(..., isLazy=True)``, the largest ``stopThr``
  (POT returns the *linear part* of the debiased cost, not S_eps: see below);
* OTT-JAX: ``ott.tools.sinkhorn_divergence.sinkhorn_divergence`` with ``Sinkhorn(threshold=t)``
  (dense geometry: ``batch_size`` fails with the installed jax), the largest ``threshold``.

The error of a run is ``|value - reference| / |reference|``. The reference is the converged
value on the same (float32) points, computed once per (dataset, blur) by ours in float64
with ``tol=1e-7, max_iter=20000``. Conventions are mapped onto ours (cost ``|x - y|^2 / 2``,
``eps = blur**2``): POT and OTT use ``|x - y|^2``, so they get ``2 eps`` and their value is
halved. POT's number is ``<P_xy, C> - (<P_xx, C> + <P_yy, C>) / 2`` (no entropic term), a
different quantity: its reference is that expression on the plans of our converged float64
potentials. ``mapping_checks`` (small N, recorded in the JSON) verifies these mappings.

Each library climbs its ladder from the cheapest setting and stops at the first setting that
reaches the finest target; a run that took more than ``--cap`` seconds, or stopped at its
iteration cap, ends its ladder (POT and OTT get an iteration cap worth about ``--cap`` seconds
per OT problem; GeomLoss rungs predicted to take longer than ``--cap`` are skipped): the
targets left are recorded as not reached. Times are the
best of ``--repeat`` calls after a warm-up call (Numba, KeOps and XLA compile on first use).

Run (from the repository root; set ``KEOPS_CACHE_FOLDER`` and ``NUMBA_CACHE_DIR`` to keep
the compiled kernels)::

    .venv/bin/python benchmarks_scripts/precision_vs_anchors.py --quick             # smoke run, N = 1000, cap 60 s
    .venv/bin/python benchmarks_scripts/precision_vs_anchors.py                     # N = 10,000 (hours with POT)
    .venv/bin/python benchmarks_scripts/precision_vs_anchors.py --skip pot --blurs 0.05 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ot_agnostic as ota  # noqa: E402
from ot_agnostic.sinkhorn import epsilon_schedule, max_diameter  # noqa: E402

TARGETS = (1e-2, 1e-3)
OUR_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
OUR_SCALING = 0.5
GEOMLOSS_SCALINGS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
POT_THRESHOLDS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
OTT_THRESHOLDS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
REFERENCE_TOL, REFERENCE_MAX_ITER = 1e-7, 20000
BLOB_CENTRES = ((0.3, 0.5, 0.5), (0.7, 0.5, 0.5))  # first D coordinates are used
BLOB_STD = 0.1

PASSES = (
    "passes = softmin (log-sum-exp) reductions over the N x M (or N x N, M x M) pairs made by the "
    "Sinkhorn updates of the three problems xy, xx, yy. Ours: result.n_softmin. GeomLoss: "
    "4 * (len(epsilon_schedule) + 2) (an initial step, one averaged update per temperature, the "
    "final extrapolation; 4 softmins each). POT: 2 * iterations per problem (log['niter'] + 1). "
    "OTT-JAX: 2 * n_iters per problem. passes_total adds the reductions spent measuring the error "
    "(POT, OTT: one per 10 iterations per problem) and POT's final evaluation of <P, M> (one per "
    "problem); ours measures its error on the updates themselves (no extra pass)."
)


@dataclass
class Run:
    """One call of one library at one setting."""

    setting: float
    value: float | None = None
    error: float | None = None
    passes: int | None = None
    passes_total: int | None = None
    seconds: float | None = None
    converged: bool | None = None
    note: str = ""


# --------------------------------------------------------------------------- data, reference


def make_data(name: str, n: int, dim: int, seed: int):
    """Seeded float32 clouds ``x``, ``y`` of ``n`` points (uniform weights are implied)."""
    rng = np.random.default_rng(seed)
    if name == "cube":
        x, y = rng.random((n, dim)), rng.random((n, dim))
    elif name == "blobs":  # not clipped
        c1, c2 = (np.array(c[:dim] + (0.5,) * (dim - len(c))) for c in BLOB_CENTRES)
        x = c1 + BLOB_STD * rng.standard_normal((n, dim))
        y = c2 + BLOB_STD * rng.standard_normal((n, dim))
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return x.astype(np.float32), y.astype(np.float32)


def linear_part(x, y, f, g, eps, rows=500):
    """``<P, C>`` for ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, uniform weights, float64."""
    total = 0.0
    log_b = g / eps - math.log(len(y))
    for start in range(0, len(x), rows):
        xs = x[start:start + rows]
        C = 0.5 * ((xs[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        log_p = (f[start:start + rows, None] / eps - math.log(len(x))) + log_b[None, :] - C / eps
        total += float((np.exp(log_p) * C).sum())
    return total


def reference(x32, y32, blur, tol=REFERENCE_TOL):
    """The converged S_eps (float64, same points) and the linear part that POT returns."""
    x, y = x32.astype(np.float64), y32.astype(np.float64)
    start = time.perf_counter()
    res = ota.sinkhorn(x, y, p=2, blur=blur, scaling=OUR_SCALING, tol=tol, max_iter=REFERENCE_MAX_ITER)
    seconds = time.perf_counter() - start
    assert bool(res.converged), f"reference did not converge: error {res.marginal_error}"
    eps = blur**2
    f, g, f_aa, g_bb = (np.asarray(v, dtype=np.float64) for v in (res.f, res.g, res.f_aa, res.g_bb))
    linear = linear_part(x, y, f, g, eps) - 0.5 * (linear_part(x, x, f_aa, f_aa, eps)
                                                    + linear_part(y, y, g_bb, g_bb, eps))
    return {
        "S_eps": float(res.value), "linear_part": linear, "marginal_error": float(res.marginal_error),
        "n_softmin": res.n_softmin, "n_iter": res.n_iter, "seconds": seconds, "backend": res.backend,
        "tol": tol, "max_iter": REFERENCE_MAX_ITER, "dtype": "float64",
    }


def best_of(fun, repeat):
    """``(output of the last call, best wall time)`` over ``repeat`` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fun()
        best = min(best, time.perf_counter() - start)
    return out, best


# --------------------------------------------------------------------------- contenders


class Contender:
    """A library: a ladder of settings (cheapest first) and ``run(setting)`` on the current problem."""

    name = label = setting_name = ""
    ladder: tuple = ()
    quantity = "S_eps"  # or "linear_part": which reference the value is compared with

    def prepare(self, x, y, blur, cap):
        """Convert the data, compile (warm-up); called once per (dataset, blur)."""

    def run(self, setting, repeat) -> Run:
        raise NotImplementedError

    def predicted_seconds(self, setting):
        """A run's time known before running it (None: unknown)."""
        return None


class Ours(Contender):
    name, label, setting_name, ladder = "ours", "ours", "tol", OUR_TOLS

    def __init__(self, backend="auto"):
        self.backend = backend

    def prepare(self, x, y, blur, cap):
        self.x, self.y, self.blur = x, y, blur
        self._call(1e-1, x[:200], y[:200])  # compiles the Numba kernels (or loads their cache)

    def _call(self, tol, x=None, y=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ota.ConvergenceWarning)
            return ota.sinkhorn(self.x if x is None else x, self.y if y is None else y, p=2,
                                blur=self.blur, scaling=OUR_SCALING, tol=tol, backend=self.backend)

    def run(self, setting, repeat):
        res, seconds = best_of(lambda: self._call(setting), repeat)
        return Run(setting, float(res.value), passes=res.n_softmin, passes_total=res.n_softmin,
                   seconds=seconds, converged=bool(res.converged), note=res.backend)


class GeomLoss(Contender):
    name, label, setting_name, ladder = "geomloss", "GeomLoss", "scaling", GEOMLOSS_SCALINGS

    def __init__(self):
        import geomloss
        import pykeops  # noqa: F401  (the online backend)
        import torch

        self.geomloss, self.torch = geomloss, torch

    def prepare(self, x, y, blur, cap):
        self.x, self.y = self.torch.from_numpy(x.copy()), self.torch.from_numpy(y.copy())
        self.blur, self.cap = blur, cap
        self.diameter = max_diameter(x[None], y[None], xp=np)  # GeomLoss's estimate
        self.seconds_per_pass = None
        self._loss(0.5)(self.x[:200], self.y[:200])  # KeOps compiles its formulas on first use

    def _loss(self, scaling):
        return self.geomloss.SamplesLoss("sinkhorn", p=2, blur=self.blur, scaling=scaling, backend="online")

    def passes(self, scaling):
        return 4 * (len(epsilon_schedule(2, self.diameter, self.blur, scaling)) + 2)

    def predicted_seconds(self, setting):
        return None if self.seconds_per_pass is None else self.seconds_per_pass * self.passes(setting)

    def run(self, setting, repeat):
        loss = self._loss(setting)
        value, seconds = best_of(lambda: float(loss(self.x, self.y)), repeat)
        passes = self.passes(setting)
        self.seconds_per_pass = seconds / passes
        return Run(setting, value, passes=passes, passes_total=passes, seconds=seconds, converged=None)


class POT(Contender):
    name, label, setting_name, ladder = "pot", "POT", "stopThr", POT_THRESHOLDS
    quantity = "linear_part"

    def __init__(self, max_iter=10000, batch_size=1000, dtype="float32"):
        import ot

        self.ot, self.max_iter, self.batch_size, self.dtype = ot, max_iter, batch_size, dtype

    def prepare(self, x, y, blur, cap):
        self.x, self.y = x.astype(self.dtype), y.astype(self.dtype)
        self.reg = 2 * blur**2  # POT's cost is |x - y|^2
        # time 10 iterations (3 problems) to turn the time cap into an iteration cap per problem
        _, seconds = best_of(lambda: self._call(0.0, 10), 1)
        per_iter = seconds / (3 * 10)
        self.iter_cap = int(min(self.max_iter, max(10, cap / per_iter)))

    def _call(self, threshold, max_iter):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.ot.bregman.empirical_sinkhorn_divergence(
                self.x, self.y, self.reg, metric="sqeuclidean", numIterMax=max_iter,
                stopThr=threshold, isLazy=True, batchSize=self.batch_size, log=True,
            )

    def run(self, setting, repeat):
        (value, log), seconds = best_of(lambda: self._call(setting, self.iter_cap), repeat)
        logs = [log[k] for k in ("log_sinkhorn_ab", "log_sinkhorn_a", "log_sinkhorn_b")]
        iters = [int(lg["niter"]) + 1 for lg in logs]
        converged = all(bool(lg["err"]) and float(lg["err"][-1]) <= setting for lg in logs)
        note = f"iterations {iters} (cap {self.iter_cap})"
        return Run(setting, float(value) / 2, passes=2 * sum(iters),
                   passes_total=sum(2 * i + i // 10 + 1 for i in iters), seconds=seconds,
                   converged=converged, note=note)


class OTT(Contender):
    name, label, setting_name, ladder = "ott", "OTT-JAX", "threshold", OTT_THRESHOLDS

    def __init__(self, max_iter=10000):
        import jax
        import jax.numpy as jnp
        from ott.geometry import costs, pointcloud
        from ott.tools import sinkhorn_divergence

        self.jax, self.jnp, self.max_iter = jax, jnp, max_iter
        self.costs, self.pointcloud, self.sd = costs, pointcloud, sinkhorn_divergence
        self.solve = jax.jit(self._divergence, static_argnums=(3, 4))

    def _divergence(self, x, y, threshold, eps, max_iter):
        """Debiased divergence on the dense geometry, cost |x - y|^2 with epsilon = 2 eps, halved."""
        div, out = self.sd.sinkhorn_divergence(
            self.pointcloud.PointCloud, x, y, cost_fn=self.costs.SqEuclidean(), epsilon=2 * eps,
            solve_kwargs=dict(threshold=threshold, max_iterations=max_iter),
        )
        return div / 2, self.jnp.stack(out.n_iters), self.jnp.stack(out.converged)

    def _call(self, threshold, max_iter):
        out = self.solve(self.x, self.y, self.jnp.float32(threshold), self.eps, max_iter)
        return self.jax.block_until_ready(out)

    def prepare(self, x, y, blur, cap):
        self.x, self.y, self.eps = self.jnp.asarray(x), self.jnp.asarray(y), blur**2
        self._call(1e9, 10)  # compile; a huge threshold stops after the first 10 iterations
        _, seconds = best_of(lambda: self._call(1e9, 10), 1)
        per_iter = seconds / (3 * 10)
        self.iter_cap = int(min(self.max_iter, max(10, cap / per_iter))) // 10 * 10 or 10
        self._call(1e9, self.iter_cap)  # compile for this iteration cap

    def run(self, setting, repeat):
        (value, n_iters, converged), seconds = best_of(lambda: self._call(setting, self.iter_cap), repeat)
        iters = [int(i) for i in n_iters]
        return Run(setting, float(value), passes=2 * sum(iters),
                   passes_total=sum(2 * i + i // 10 for i in iters), seconds=seconds,
                   converged=bool(np.all(np.asarray(converged))),
                   note=f"n_iters {iters} (cap {self.iter_cap}), dense")


def make_contenders(args):
    """The contenders that can run here, and ``{name: reason}`` for those that cannot."""
    makers = {
        "ours": lambda: Ours(args.backend),
        "geomloss": GeomLoss,
        "pot": lambda: POT(args.anchor_max_iter, dtype=args.pot_dtype),
        "ott": lambda: OTT(args.anchor_max_iter),
    }
    contenders, skipped = [], {}
    for name, make in makers.items():
        if name in args.skip:
            skipped[name] = "skipped on the command line (--skip)"
            continue
        try:
            contenders.append(make())
        except Exception as err:  # not installed, or broken at import
            skipped[name] = f"unavailable: {type(err).__name__}: {err}"
    return contenders, skipped


# --------------------------------------------------------------------------- the ladders


def climb(contender, ref_value, cap, repeat):
    """Run the ladder, cheapest first, until the finest target is met or the time cap is hit."""
    runs, stop_reason = [], ""
    for setting in contender.ladder:
        if stop_reason:
            runs.append(Run(setting, note=f"not run: {stop_reason}"))
            continue
        predicted = contender.predicted_seconds(setting)
        if predicted is not None and predicted > cap:
            stop_reason = f"predicted {predicted:.0f} s > cap {cap:.0f} s"
            runs.append(Run(setting, note=f"not run: {stop_reason}"))
            continue
        try:
            run = contender.run(setting, repeat)
        except Exception as err:
            runs.append(Run(setting, note=f"failed: {type(err).__name__}: {err}"))
            stop_reason = "a previous rung failed"
            continue
        run.error = abs(run.value - ref_value) / abs(ref_value)
        runs.append(run)
        print(f"    {contender.label:9s} {contender.setting_name}={setting:<7g} error={run.error:.2e} "
              f"passes={run.passes} {run.seconds:.3f}s {run.note}", flush=True)
        if run.error <= min(TARGETS):
            break
        if run.seconds > cap:
            stop_reason = f"a previous rung took {run.seconds:.0f} s > cap {cap:.0f} s"
        elif run.converged is False:  # a tighter setting would hit the same iteration cap
            stop_reason = "a previous rung stopped at its iteration cap"
    return runs


def pick(runs, target):
    """The cheapest run (first of the ladder) that reaches ``target``, or None."""
    return next((r for r in runs if r.error is not None and r.error <= target), None)


def row(contender, runs, target):
    best = pick(runs, target)
    if best is None:
        return {"reached": False, "setting": None, "passes": None, "seconds": None,
                "error": min((r.error for r in runs if r.error is not None), default=None),
                "note": "did not reach the target within the ladder / time cap"}
    return {"reached": True, "setting_name": contender.setting_name, "setting": best.setting,
            "passes": best.passes, "passes_total": best.passes_total, "seconds": best.seconds,
            "error": best.error, "converged": best.converged, "note": best.note}


# --------------------------------------------------------------------------- checks, report


def mapping_checks(contenders, n=200, blur=0.05, seed=1):
    """Each anchor's value at a tight setting vs ours, small N: verifies the convention mapping."""
    x, y = make_data("cube", n, 3, seed)
    ref = reference(x, y, blur)
    checks = {"n": n, "blur": blur, "dataset": "cube", "reference": ref}
    tight = {"ours": 1e-6, "geomloss": 0.5, "pot": 1e-6, "ott": 1e-6}
    for c in contenders:
        c.prepare(x, y, blur, cap=30.0)
        if c.name == "geomloss":  # same numbers as ours with tol=None at the same scaling
            ours = ota.sinkhorn(x, y, p=2, blur=blur, scaling=0.5, tol=None)
            run = c.run(0.5, 1)
            checks["geomloss"] = {"geomloss": run.value, "ours_tol_None": float(ours.value),
                                  "relative_difference": abs(run.value - float(ours.value)) / abs(float(ours.value)),
                                  "passes": run.passes, "ours_n_softmin": ours.n_softmin}
            continue
        run = c.run(tight[c.name], 1)
        target = ref[c.quantity]
        checks[c.name] = {"setting": tight[c.name], "value": run.value, "reference": target,
                          "quantity": c.quantity, "relative_difference": abs(run.value - target) / abs(target),
                          "note": run.note}
    return checks


def versions():
    out = {"python": sys.version.split()[0], "ot_agnostic": ota.__version__}
    for dist in ("numpy", "numba", "torch", "pykeops", "geomloss", "POT", "jax", "jaxlib", "ott-jax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def threads():
    out = {}
    try:
        import numba

        out["numba"] = numba.get_num_threads()
    except Exception:
        pass
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except Exception:
        pass
    return out


def fmt(cell, with_setting=True):
    if cell is None:
        return "skipped"
    if not cell["reached"]:
        return "not reached" + (f" (best {cell['error']:.1e})" if cell.get("error") is not None else "")
    head = f"{cell['setting']:g}: " if with_setting else ""
    return f"{head}{cell['passes']} / {cell['seconds']:.2f} s"


def markdown(rows, names):
    labels = {"ours": "ours tol: passes / time", "geomloss": "GeomLoss scaling: passes / time",
              "pot": "POT stopThr: passes / time", "ott": "OTT-JAX threshold: passes / time"}
    cols = ["dataset", "blur", "target"] + [labels[n] for n in names] + ["speed-up vs fastest anchor"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["dataset"], f"{r['blur']:g}", f"{r['target']:g}"]
        cells += [fmt(r["contenders"].get(n)) for n in names]
        lines.append("| " + " | ".join(cells + [speedup(r)]) + " |")
    return "\n".join(lines)


def speedup(r):
    ours = r["contenders"].get("ours")
    anchors = [(c["seconds"], n) for n, c in r["contenders"].items() if n != "ours" and c and c["reached"]]
    if not ours or not ours["reached"]:
        return "n/a (ours did not reach)"
    if not anchors:
        return "n/a (no anchor reached)"
    seconds, name = min(anchors)
    return f"{seconds / ours['seconds']:.1f}x ({name})"


# --------------------------------------------------------------------------- main


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="N = M points (default 10000)")
    ap.add_argument("--dim", type=int, default=3)
    ap.add_argument("--blurs", type=float, nargs="+", default=[0.05, 0.01])
    ap.add_argument("--datasets", nargs="+", default=["cube", "blobs"], choices=["cube", "blobs"])
    ap.add_argument("--out", default="docs/precision_results.json")
    ap.add_argument("--repeat", type=int, default=1, help="best of REPEAT timed calls (default 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ours", "geomloss", "pot", "ott"])
    ap.add_argument("--quick", action="store_true", help="smoke run: n = 1000, --cap 60 unless given")
    ap.add_argument("--cap", type=float, default=None,
                    help="seconds per run before a ladder stops (default 300; 60 with --quick)")
    ap.add_argument("--anchor-max-iter", type=int, default=10000, help="iteration cap of POT and OTT (default 10000)")
    ap.add_argument("--pot-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--backend", default="auto", help="our backend (default auto)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of Numba, torch and OpenMP (KeOps), and XLA if 1; default: theirs")
    ap.add_argument("--reference-tol", type=float, default=REFERENCE_TOL,
                    help=f"tol of the float64 reference (default {REFERENCE_TOL:g}; it dominates the run at blur 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-checks", action="store_true", help="skip the small-N mapping checks")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 1000
    if args.cap is None:
        args.cap = 60.0 if args.quick else 300.0
    return args


def limit_threads(n):
    """Ask every library for ``n`` CPU threads (before they are imported, where it matters; XLA: n = 1 only)."""
    os.environ.update(OMP_NUM_THREADS=str(n), NUMBA_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n),
                      OPENBLAS_NUM_THREADS=str(n))
    if n == 1:  # XLA has no thread-count flag: only single- or multi-threaded Eigen
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    for module, setter in (("numba", "set_num_threads"), ("torch", "set_num_threads")):
        try:
            getattr(importlib.import_module(module), setter)(n)
        except ImportError:
            pass


def main(argv=None):
    args = parse(argv)
    if args.threads:
        limit_threads(args.threads)
    contenders, skipped = make_contenders(args)
    names = [c.name for c in contenders]
    print(f"N = M = {args.n}, D = {args.dim}; contenders {names}; skipped {skipped}", flush=True)
    checks = None if args.no_checks else mapping_checks(contenders)
    if checks:
        print("mapping checks:", json.dumps({k: v.get("relative_difference") for k, v in checks.items()
                                              if isinstance(v, dict) and "relative_difference" in v}))
    references, rows, ladders = [], [], []
    for dataset in args.datasets:
        x, y = make_data(dataset, args.n, args.dim, args.seed)
        for blur in args.blurs:
            ref = reference(x, y, blur, args.reference_tol)
            references.append({"dataset": dataset, "blur": blur, **ref})
            print(f"{dataset} blur={blur}: S_eps = {ref['S_eps']:.8g}, linear part = {ref['linear_part']:.8g} "
                  f"({ref['n_softmin']} passes, {ref['seconds']:.1f} s)", flush=True)
            results = {}
            for c in contenders:
                try:
                    c.prepare(x, y, blur, args.cap)
                    results[c.name] = climb(c, ref[c.quantity], args.cap, args.repeat)
                except Exception as err:
                    results[c.name] = [Run(float("nan"), note=f"failed: {type(err).__name__}: {err}")]
                    print(f"    {c.label} failed: {err}", flush=True)
                ladders.append({"dataset": dataset, "blur": blur, "contender": c.name,
                                "setting_name": c.setting_name, "quantity": c.quantity,
                                "runs": [asdict(r) for r in results[c.name]]})
            for target in TARGETS:
                rows.append({"dataset": dataset, "blur": blur, "target": target, "contenders": {
                    c.name: row(c, results[c.name], target) for c in contenders}})
    table = markdown(rows, names)
    print("\n" + table)
    about = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "issue": 13,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "threads": threads()},
        "versions": versions(),
        "settings": {"n": args.n, "m": args.n, "dim": args.dim, "p": 2, "blurs": args.blurs,
                     "datasets": args.datasets, "targets": TARGETS, "repeat": args.repeat,
                     "cap_seconds": args.cap, "anchor_max_iter": args.anchor_max_iter,
                     "seed": args.seed, "threads": args.threads, "dtype": "float32 (timed runs)", "pot_dtype": args.pot_dtype,
                     "our_scaling": OUR_SCALING, "our_backend": args.backend, "ladders": {
                         "ours_tol": OUR_TOLS, "geomloss_scaling": GEOMLOSS_SCALINGS,
                         "pot_stopThr": POT_THRESHOLDS, "ott_threshold": OTT_THRESHOLDS}},
        "definitions": {
            "cost": "C(x, y) = |x - y|^2 / 2, eps = blur^2; uniform weights",
            "cube": "x, y independent, uniform in [0, 1]^D",
            "blobs": f"x ~ N({BLOB_CENTRES[0]}, {BLOB_STD}^2 I), y ~ N({BLOB_CENTRES[1]}, {BLOB_STD}^2 I), not clipped",
            "error": "|value - reference| / |reference|",
            "reference": f"ours, float64 on the same float32 points, tol={args.reference_tol:g}, "
                         f"max_iter={REFERENCE_MAX_ITER}, scaling={OUR_SCALING}",
            "S_eps": "OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2 (ours, GeomLoss, OTT-JAX halved)",
            "linear_part": "<P_xy, C> - (<P_xx, C> + <P_yy, C>)/2 on the converged plans: what POT's "
                           "empirical_sinkhorn_divergence returns (halved, with reg = 2 eps on |x - y|^2); "
                           "POT's number converges to this, not to S_eps",
            "passes": PASSES,
            "pick": "ours/POT/OTT: the largest tol/stopThr/threshold whose error meets the target; "
                    "GeomLoss: the smallest scaling (ladders climbed cheapest first)",
            "time": "wall seconds of one call, best of --repeat, after a warm-up (compilation) call",
            "ott": "dense PointCloud geometry (batch_size fails with the installed jax), default Sinkhorn "
                   "(no eps-scaling, no Anderson) for xy; OTT's own symmetric solver settings for xx, yy",
        },
        "skipped": skipped,
        "mapping_checks": checks,
    }
    out = {"about": about, "references": references, "rows": rows, "ladders": ladders, "table": table}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, default=float)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
