"""Multiscale Sinkhorn: ours (NumPy, Numba block-sparse kernels) vs GeomLoss multiscale (torch CPU).

Same data, same settings, same run: D = 3 uniform clouds (``x`` in [0, 0.8]^3, ``y`` in
[0.1, 0.9]^3), float32, p = 2, scaling = 0.5, debiased divergence + gradient with respect
to ``x``. For each N = M and blur: wall time and peak resident memory above the inputs
(sampled every 5 ms) of ours with ``backend="multiscale"``, optionally of ours online and of
GeomLoss ``SamplesLoss("sinkhorn", backend="multiscale")`` (``.backward()``), the value
relative difference and the share of pairs the fine iterations visit.

    python benchmarks_scripts/multiscale_vs_geomloss.py --sizes 10000 100000 --blurs 0.05 0.01
    python benchmarks_scripts/multiscale_vs_geomloss.py --sizes 1000000 --no-geomloss --no-online
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import ot_agnostic as ota

sys.path.insert(0, os.path.dirname(__file__))
from peak_memory import PeakSampler  # noqa: E402

P, SCALING = 2, 0.5


def measured(fun):
    """``(seconds, peak bytes above the start, result)`` of ``fun()``."""
    sampler = PeakSampler()
    start_rss = sampler.peak
    sampler.start()
    start = time.perf_counter()
    out = fun()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    return seconds, sampler.peak - start_rss, out


def ours(x, y, blur, backend):
    res = ota.sinkhorn(x, y, p=P, blur=blur, scaling=SCALING, backend=backend)
    res.gradient()
    return float(res.value), getattr(res, "kept_fraction", 1.0)


def geomloss(x, y, blur):
    import torch
    from geomloss import SamplesLoss

    tx = torch.from_numpy(x).requires_grad_()
    value = SamplesLoss("sinkhorn", p=P, blur=blur, scaling=SCALING, backend="multiscale")(tx, torch.from_numpy(y))
    value.backward()
    return value.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--blurs", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--no-geomloss", action="store_true")
    parser.add_argument("--no-online", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    warm = rng.random((300, 3)).astype(np.float32)
    ota.warmup(dtypes=("float32",), ps=(P,))
    ours(warm, warm + 0.1, 0.05, "multiscale")
    if not args.no_geomloss:
        geomloss(warm, warm + 0.1, 0.05)  # KeOps compiles (or loads) its formulas
    print(f"# {os.cpu_count()} cores; float32, D=3, p={P}, scaling={SCALING}; times include the gradient")
    print(f"{'N=M':>9} {'blur':>5} {'ours ms [s]':>11} {'peak MiB':>8} {'kept':>6} "
          f"{'online [s]':>10} {'GeomLoss ms [s]':>15} {'GL peak MiB':>11} {'GL/ours':>7} {'rel diff':>9}")
    for n in args.sizes:
        x = (rng.random((n, 3)) * 0.8).astype(np.float32)
        y = (rng.random((n, 3)) * 0.8 + 0.1).astype(np.float32)
        for blur in args.blurs:
            t_ms, mem_ms, (v_ms, kept) = measured(lambda: ours(x, y, blur, "multiscale"))
            t_on = v_on = float("nan")
            if not args.no_online:
                t_on, _, (v_on, _) = measured(lambda: ours(x, y, blur, "online"))
            t_gl = mem_gl = v_gl = float("nan")
            if not args.no_geomloss:
                t_gl, mem_gl, v_gl = measured(lambda: geomloss(x, y, blur))
            ref = v_gl if not args.no_geomloss else v_on
            print(f"{n:>9} {blur:>5} {t_ms:>11.2f} {mem_ms / 2**20:>8.1f} {kept:>6.3f} {t_on:>10.2f} "
                  f"{t_gl:>15.2f} {mem_gl / 2**20:>11.1f} {t_gl / t_ms:>7.2f} {abs(v_ms - ref) / abs(ref):>9.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
