"""Time one softmin pass of the Numba CPU kernel and check it against a dense reference.

Prints ns per (i, j) pair for N = M in (5000, 20000), float32 and float64, D = 3, p = 1 and
p = 2, after a warm-up call (which includes the JIT compilation or the cache load), and the
largest relative error against a float64 dense NumPy/SciPy ``logsumexp`` on a subset of
rows. ``wall`` is the best wall-clock time over the repeats; ``cpu`` is the best process
CPU time divided by the number of threads: on a busy machine (other processes sharing the
cores) it estimates the wall time the kernel would take on idle cores.

Usage::

    python benchmarks_scripts/softmin_pass.py [--sizes 5000 20000] [--eps 0.01]
        [--repeat 5] [--threads 2] [--rows 256] [--kernels]

``--kernels`` also times ``softmin_grad``, ``softmax_weighted_sum`` (K = D) and
``kernel_sum`` (gaussian) at the same sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def reference_softmin(x, y, h, eps, p):
    """Dense float64 ``-eps * logsumexp(h - C / eps)`` for ``x (N, D)``, ``y (M, D)``, ``h (M,)``."""
    from scipy.special import logsumexp

    x, y, h = (np.asarray(a, dtype=np.float64) for a in (x, y, h))
    cost = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1) ** p / p
    return -eps * logsumexp(h[None, :] - cost / eps, axis=1)


def make_data(n, m, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((1, n, d)).astype(dtype)
    y = rng.random((1, m, d)).astype(dtype)
    # log-weights -log M plus a potential-like perturbation, some zero weights.
    h = (-math.log(m) + 0.5 * rng.standard_normal((1, m))).astype(dtype)
    h[:, ::97] = -1e5
    return x, y, h


def timed(fn, repeat):
    walls, cpus = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=256, help="rows checked against the reference")
    parser.add_argument("--kernels", action="store_true", help="also time the other kernels")
    args = parser.parse_args()

    import numba

    t0 = time.perf_counter()
    from ot_agnostic.kernels import numba_cpu as kernels

    print(f"import: {time.perf_counter() - t0:.2f} s")
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    print(f"numba {numba.__version__}, threads {threads}, eps {args.eps}, D 3, "
          f"load average {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    header = f"{'kernel':<22}{'dtype':<9}{'p':>2}{'N=M':>7}{'warm-up s':>11}{'wall ns/pair':>14}{'cpu ns/pair':>13}{'max rel err':>13}"
    print(header)
    print("-" * len(header))
    for dtype in (np.float32, np.float64):
        for p in (2, 1):
            for n in args.sizes:
                x, y, h = make_data(n, n, 3, dtype)
                out = np.empty((1, n), dtype)
                eps = args.eps
                w0 = time.perf_counter()
                kernels.softmin(x, y, h, eps, p, out)
                warm = time.perf_counter() - w0
                wall, cpu = timed(lambda: kernels.softmin(x, y, h, eps, p, out), args.repeat)
                pairs = float(n) * n
                rows = min(args.rows, n)
                ref = reference_softmin(x[0, :rows], y[0], h[0], eps, p)
                err = np.max(np.abs(out[0, :rows] - ref) / np.abs(ref))
                print(f"{'softmin':<22}{dtype.__name__:<9}{p:>2}{n:>7}{warm:>11.2f}"
                      f"{wall / pairs * 1e9:>14.3f}{cpu / threads / pairs * 1e9:>13.3f}{err:>13.2e}")
                if not args.kernels:
                    continue
                others = {
                    "softmin_grad": (kernels.softmin_grad, (x, y, h, eps, p), (1, n, 3)),
                    "softmax_weighted_sum": (kernels.softmax_weighted_sum, (x, y, h, eps, p, y), (1, n, 3)),
                }
                if p == 2:
                    others["kernel_sum gaussian"] = (
                        kernels.kernel_sum, (x, y, np.exp(h).astype(dtype), kernels.KERNEL_GAUSSIAN, 0.1), (1, n))
                for name, (fn, fargs, shape) in others.items():
                    o = np.empty(shape, dtype)
                    w0 = time.perf_counter()
                    fn(*fargs, o)
                    warm = time.perf_counter() - w0
                    wall, cpu = timed(lambda: fn(*fargs, o), args.repeat)
                    print(f"{name:<22}{dtype.__name__:<9}{p:>2}{n:>7}{warm:>11.2f}"
                          f"{wall / pairs * 1e9:>14.3f}{cpu / threads / pairs * 1e9:>13.3f}{'':>13}")


if __name__ == "__main__":
    main()
