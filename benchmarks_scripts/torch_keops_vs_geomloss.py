"""Debiased Sinkhorn divergence + backward on torch CPU: ot_agnostic (KeOps) vs GeomLoss (KeOps).

Same data, same settings, same run: D=3 uniform clouds in the unit cube, p=2, blur=0.05,
scaling=0.5, float32 torch tensors, ``x.requires_grad_()`` and ``value.backward()``.
Ours runs ``backend="keops"`` (KeOps online) and ``backend="auto"`` (what a torch user gets
by default: the dense path on small problems, KeOps above), GeomLoss
``SamplesLoss("sinkhorn", backend="online")``: both reduce with KeOps, so the first ratio
measures the overhead of each library around the same kernels. Prints one row per N=M with wall
times (best of ``--repeat``), the ratios GeomLoss / ours and the largest relative difference
of our values from GeomLoss's. Both libraries' KeOps formulas are compiled (or loaded from ``KEOPS_CACHE_FOLDER``)
in a warm-up before timing.

    KEOPS_CACHE_FOLDER=.keops_cache python benchmarks_scripts/torch_keops_vs_geomloss.py --sizes 1000 5000 20000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import ot_agnostic as ota

SETTINGS = dict(p=2, blur=0.05, scaling=0.5)


def best_time(fun, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fun()
        best = min(best, time.perf_counter() - start)
    return best, out


def ours(x, y, backend="keops"):
    x = x.clone().requires_grad_()
    value = ota.sinkhorn_divergence(x, y, backend=backend, **SETTINGS)
    value.backward()
    return value.item()


def geomloss(x, y):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", backend="online", **SETTINGS)
    x = x.clone().requires_grad_()
    value = loss(x, y)
    value.backward()
    return value.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    small = torch.rand(200, 3, generator=gen)
    start = time.perf_counter()
    backend = ota.sinkhorn(small, small + 0.1, backend="keops", **SETTINGS).backend
    ours(small, small + 0.1)
    ours(small, small + 0.1, "auto")
    geomloss(small, small + 0.1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; ours = {backend}; "
          f"warm-up (KeOps compile or cache load) {time.perf_counter() - start:.1f} s")
    print(f"{'N=M':>8} {'ours keops [s]':>15} {'GeomLoss [s]':>13} {'GL/ours':>8} "
          f"{'ours auto [s]':>14} {'auto ran':>21} {'GL/auto':>8} {'rel diff':>9}")
    for n in args.sizes:
        x = torch.rand(n, 3, generator=gen)
        y = torch.rand(n, 3, generator=gen)
        t_ours, v_ours = best_time(lambda: ours(x, y), args.repeat)
        t_auto, v_auto = best_time(lambda: ours(x, y, "auto"), args.repeat)
        auto_ran = ota.sinkhorn(x, y, backend="auto", **SETTINGS).backend
        t_gl, v_gl = best_time(lambda: geomloss(x, y), args.repeat)
        diff = max(abs(v_ours - v_gl), abs(v_auto - v_gl)) / abs(v_gl)
        print(f"{n:>8} {t_ours:>15.3f} {t_gl:>13.3f} {t_gl / t_ours:>8.2f} {t_auto:>14.3f} "
              f"{auto_ran:>21} {t_gl / t_auto:>8.2f} {diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
