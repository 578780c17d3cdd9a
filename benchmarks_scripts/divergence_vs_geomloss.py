"""Debiased Sinkhorn divergence + gradient: ot_agnostic (NumPy/Numba) vs GeomLoss (torch CPU).

Same data, same settings, same run: D=3 uniform clouds in the unit cube, p=2, blur=0.05,
scaling=0.5, float32. Prints one row per N=M with wall times (best of ``--repeat``),
speed-up ratios and the relative difference of the values. GeomLoss runs only up to
``--geomloss-max`` points (its CPU backends take minutes beyond that).

    python benchmarks_scripts/divergence_vs_geomloss.py --sizes 1000 5000 20000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import ot_agnostic as ota


def best_time(fun, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fun()
        best = min(best, time.perf_counter() - start)
    return best, out


def ours(x, y):
    value, grads = ota.value_and_grad(x, y, p=2, blur=0.05, scaling=0.5)
    return float(value)


def geomloss(x, y, backend):
    import torch
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, backend=backend)
    xt = torch.from_numpy(x).requires_grad_()
    value = loss(xt, torch.from_numpy(y))
    value.backward()
    return value.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 20000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--geomloss-max", type=int, default=20000)
    parser.add_argument("--tensorized-max", type=int, default=10000)
    args = parser.parse_args()

    from ot_agnostic.backends.numba_cpu import warmup

    start = time.perf_counter()
    warmup(dtypes=("float32",), ps=(2,))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"numba warm-up {time.perf_counter() - start:.2f} s")
    rng = np.random.default_rng(0)
    small = rng.random((200, 3), dtype=np.float32)
    geomloss(small, small, "online")  # KeOps compiles its formulas once
    header = f"{'N=M':>8} {'ours [s]':>9} {'GL online [s]':>14} {'ratio':>7} {'GL tensor [s]':>14} {'ratio':>7} {'rel diff':>9}"
    print(header)
    for n in args.sizes:
        x = rng.random((n, 3), dtype=np.float32)
        y = rng.random((n, 3), dtype=np.float32)
        t_ours, v_ours = best_time(lambda: ours(x, y), args.repeat)
        row = f"{n:>8} {t_ours:>9.3f}"
        ref = None
        for backend, limit in (("online", args.geomloss_max), ("tensorized", args.tensorized_max)):
            if n <= limit:
                t_gl, ref = best_time(lambda: geomloss(x, y, backend), args.repeat)
                row += f" {t_gl:>14.3f} {t_gl / t_ours:>7.1f}"
            else:
                row += f" {'-':>14} {'-':>7}"
        row += f" {abs(v_ours - ref) / abs(ref):>9.1e}" if ref is not None else f" {'-':>9}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
