"""Images and volumes on grids (issue #15): time to a stated precision, and peak memory.

Two settings, each a pair of densities (float32, debiased, p = 2, blur = 2 voxels):

* ``image``: 512 x 512 (``--image-size``), a disc and a ring with soft edges, moved and resized;
* ``volume``: 128**3 (``--volume-size``), a ball and a shifted ellipsoid.

For each, the reference is ``grids.sinkhorn`` in float64 with ``tol=1e-6``; then a ladder of
``tol`` values in float32 reports the time, softmin passes and the relative error of the
value. "Converged to 1%" is the first rung within 1% of the reference. Each timed run is a
fresh subprocess (after a warm-up call in it), so that its peak memory (``VmHWM`` minus the
resident size before the solve) is its own.

    python benchmarks_scripts/grids_benchmark.py --out grid_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LADDER = (0.3, 0.1, 0.03, 0.01)


def make_pair(kind: str, n: int):
    """Two densities of total mass 1 on an ``n``-voxel-wide grid (2-D image or 3-D volume)."""
    d = 2 if kind == "image" else 3
    axes = np.meshgrid(*(np.linspace(0, 1, n) for _ in range(d)), indexing="ij")

    def soft(inside):  # a soft edge about two voxels wide
        return 1 / (1 + np.exp(-inside * n / 2))

    r1 = np.sqrt(sum((ax - 0.38) ** 2 for ax in axes))
    scales = (1.0, 0.7, 1.3)[:d]
    r2 = np.sqrt(sum(((ax - c) / s) ** 2 for ax, c, s in zip(axes, (0.6, 0.55, 0.5), scales)))
    a = soft(0.18 - r1)
    b = soft(0.2 - r2) if kind == "volume" else soft(0.22 - r2) * (1 - 0.7 * soft(0.1 - r2))
    return a / a.sum(), b / b.sum()


def _proc_status_kib(field: str) -> int:
    """A memory figure of this process (``VmHWM``: peak resident, ``VmRSS``: now) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(kind, n, dtype, tol):
    """One timed solve (after a small warm-up), printed as JSON."""
    sys.path.insert(0, ROOT)
    from ot_agnostic import grids

    a, b = (t.astype(dtype) for t in make_pair(kind, n))
    small = (slice(0, 16),) * a.ndim
    warm = a[small] + 1e-3
    grids.sinkhorn(warm, warm[::-1].copy(), blur=2.0, tol=0.1)
    before = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    res = grids.sinkhorn(a, b, blur=2.0, tol=tol, max_iter=10000)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(
        value=float(res.value), seconds=seconds, passes=res.n_softmin, updates=res.n_iter,
        marginal_error=float(res.marginal_error), backend=res.backend,
        peak_mib_above_inputs=(_proc_status_kib("VmHWM") - before) / 1024, inputs_mib=2 * a.nbytes / 2**20,
    )))


def run_child(kind, n, dtype, tol):
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n), dtype, repr(tol)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--volume-size", type=int, default=128)
    ap.add_argument("--skip", nargs="*", default=[], choices=["image", "volume"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, n, dtype, tol = args.child
        child(kind, int(n), dtype, float(tol))
        return
    results = {"about": {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "issue": 15, "cpu_count": os.cpu_count(),
                         "blur_voxels": 2.0, "dtype": "float32", "reference": "float64, tol=1e-6"}}
    for kind, n in (("image", args.image_size), ("volume", args.volume_size)):
        if kind in args.skip:
            continue
        ref = run_child(kind, n, "float64", 1e-6)
        print(f"{kind} {n}: reference {ref['value']:.8g} in {ref['seconds']:.1f} s ({ref['passes']} passes)", flush=True)
        rungs = []
        for tol in LADDER:
            rung = run_child(kind, n, "float32", tol)
            rung["tol"] = tol
            rung["error"] = abs(rung["value"] - ref["value"]) / abs(ref["value"])
            rungs.append(rung)
            print(f"  tol={tol:g}: {rung['seconds']:.2f} s, {rung['passes']} passes, error {rung['error']:.1e}, "
                  f"peak {rung['peak_mib_above_inputs']:.0f} MiB above the inputs ({rung['inputs_mib']:.0f} MiB)", flush=True)
        first = next((r for r in rungs if r["error"] <= 0.01), None)
        results[kind] = dict(n=n, reference=ref, ladder=rungs, one_percent=first)
        if first:
            print(f"  -> 1%: tol={first['tol']:g}, {first['seconds']:.2f} s", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
