"""Peak memory of the debiased Sinkhorn divergence + gradient on NumPy (Numba, online).

Samples the resident set size (``VmRSS``) every few milliseconds in a thread while
``value_and_grad`` runs, and prints the peak above what the process held just before
(inputs allocated, kernels compiled). Linux only (reads ``/proc/self/status``).

    python benchmarks_scripts/peak_memory.py --n 200000
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

import ot_agnostic as ota


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self, period=0.005):
        super().__init__(daemon=True)
        self.period, self.peak, self.running = period, rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200000)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.n, 3)).astype(args.dtype)
    y = rng.random((args.n, 3)).astype(args.dtype)
    ota.warmup(dtypes=(args.dtype,), ps=(2,))
    ota.value_and_grad(x[:1000], y[:1000])  # every code path once, on small data
    baseline = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    value, grads = ota.value_and_grad(x, y, p=2, blur=0.05, scaling=0.5)
    elapsed = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    inputs = x.nbytes + y.nbytes
    print(f"N=M={args.n} {args.dtype}: value {float(value):.6g}, {elapsed:.1f} s, "
          f"inputs {inputs / 2**20:.1f} MiB, peak above baseline {(sampler.peak - baseline) / 2**20:.1f} MiB "
          f"(a dense N x M float32 matrix would be {args.n**2 * 4 / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
