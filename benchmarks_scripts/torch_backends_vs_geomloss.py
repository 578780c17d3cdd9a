"""Divergence + gradient on torch tensors (CPU or CUDA) and CuPy: our backends against GeomLoss.

Issue #14. Same data, same settings, same run: D = 3 uniform clouds in the unit cube,
float32, p = 2, blur = 0.05, scaling = 0.5, ``tol=None`` (GeomLoss's fixed eps-scaling
schedule on both sides: the same computation, so the values agree to float32 rounding),
debiased divergence and its gradient with respect to ``x``.

``--device cpu`` (torch CPU tensors):
  * ``numpy``: ours on NumPy arrays, ``ota.value_and_grad`` (Numba CPU kernels), the anchor;
  * ``torch``: ours on torch CPU tensors, ``backend="auto"`` (the Numba kernels through the
    autograd Function), ``value.backward()``;
  * ``torch-keops`` (``--keops``): ours with ``backend="keops"``;
  * ``geomloss``: GeomLoss ``SamplesLoss("sinkhorn", backend="online")`` (KeOps CPU).
``--device cuda``:
  * ``cupy``: ours on CuPy arrays (Numba CUDA kernels; ``auto``: multiscale from N = M = 65,536);
  * ``torch-keops``: ours on CUDA tensors, ``backend="keops"`` (multiscale likewise);
  * ``torch-numba_cuda``: ours on CUDA tensors, ``backend="numba_cuda"`` (multiscale likewise);
  * ``geomloss``, ``geomloss-multiscale``: GeomLoss ``"online"`` and ``"multiscale"``.

``--load K`` runs K busy-looping processes during the timings (a competing CPU load).
A contender whose time at one size, times the growth of the pair count, would exceed
``--cap`` seconds is skipped at the next sizes (multiscale contenders grow like N).
Times: best of ``--repeat`` after one warm-up call (JIT and KeOps compilation, caches).

    python benchmarks_scripts/torch_backends_vs_geomloss.py --device cpu --sizes 5000 20000
    python benchmarks_scripts/torch_backends_vs_geomloss.py --device cpu --sizes 5000 --load 1
    python benchmarks_scripts/torch_backends_vs_geomloss.py --device cuda --sizes 10000 100000 1000000 --out gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ot_agnostic as ota  # noqa: E402

SETTINGS = dict(p=2, blur=0.05, scaling=0.5)
MULTISCALE_FROM = 65536  # ours under "auto" (B N M >= 2**32), and GeomLoss multiscale: cost ~ N


def _busy():
    while True:
        pass


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _torch_run(backend, device):
    def run(x, y):
        import torch

        xt = torch.as_tensor(x, device=device).requires_grad_()
        yt = torch.as_tensor(y, device=device)
        value = ota.sinkhorn_divergence(xt, yt, backend=backend, tol=None, **SETTINGS)
        value.backward()
        _sync(device)
        return float(value.detach()), xt.grad
    return run


def _numpy_run(x, y):
    value, grads = ota.value_and_grad(x, y, tol=None, **SETTINGS)
    return float(value), grads.x


def _cupy_run(x, y):
    import cupy

    xc, yc = cupy.asarray(x), cupy.asarray(y)
    value, grads = ota.value_and_grad(xc, yc, tol=None, **SETTINGS)
    cupy.cuda.get_current_stream().synchronize()
    return float(value), grads.x


def _geomloss_run(backend, device):
    def run(x, y):
        import torch
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", backend=backend, **SETTINGS)
        xt = torch.as_tensor(x, device=device).requires_grad_()
        value = loss(xt, torch.as_tensor(y, device=device))
        value.backward()
        _sync(device)
        return float(value.detach()), xt.grad
    return run


def contenders(device, keops):
    """``[(name, run, grows_like_n_above)]``: ``run(x, y) -> (value, grad_x)``."""
    if device == "cpu":
        out = [("numpy", _numpy_run, None), ("torch", _torch_run("auto", "cpu"), None)]
        if keops:
            out.append(("torch-keops", _torch_run("keops", "cpu"), None))
        out.append(("geomloss", _geomloss_run("online", "cpu"), None))
        return out
    return [
        ("cupy", _cupy_run, MULTISCALE_FROM),
        ("torch-keops", _torch_run("keops", "cuda"), MULTISCALE_FROM),
        ("torch-numba_cuda", _torch_run("numba_cuda", "cuda"), MULTISCALE_FROM),
        ("geomloss", _geomloss_run("online", "cuda"), None),
        ("geomloss-multiscale", _geomloss_run("multiscale", "cuda"), 0),
    ]


def best_of(run, x, y, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = run(x, y)
        best = min(best, time.perf_counter() - start)
    return best, out


def growth(n_old, n_new, linear_from):
    """How much longer a run gets from ``n_old`` to ``n_new`` points (pairs, or points once
    multiscale)."""
    if linear_from is not None and n_old >= linear_from:
        return n_new / n_old
    return (n_new / n_old) ** 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cap", type=float, default=120.0, help="skip a contender predicted above this many seconds")
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes during the timings")
    ap.add_argument("--keops", action="store_true", help="CPU: also ours with backend='keops'")
    ap.add_argument("--skip", nargs="*", default=[], help="contender names to leave out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results (JSON) there")
    args = ap.parse_args(argv)
    # tol=None on purpose (GeomLoss's schedule on both sides): no warning about it
    warnings.filterwarnings("ignore", category=ota.ConvergenceWarning)
    warnings.filterwarnings("ignore", message="this (gradient|plan) comes from potentials")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU/driver).")
    table = [(n, r, g) for n, r, g in contenders(args.device, args.keops) if n not in args.skip]
    rng = np.random.default_rng(args.seed)
    small = rng.random((300, 3)).astype(np.float32)
    runnable = []
    for name, run, grow in table:  # warm-up: compilation, caches, CUDA contexts
        try:
            run(small, small + np.float32(0.1))
            runnable.append((name, run, grow))
        except Exception as err:  # a missing library: recorded, not fatal
            print(f"# {name}: unavailable ({type(err).__name__}: {str(err)[:200]})", flush=True)
    load = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for proc in load:
        proc.start()
    about = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "issue": 14,
        "device": args.device, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "numba_threads": __import__("numba").get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "settings": {**SETTINGS, "tol": None, "dtype": "float32", "D": 3, "repeat": args.repeat,
                     "cap": args.cap, "competing_processes": args.load},
    }
    print(f"# {about}", flush=True)
    rows, last = [], {}
    try:
        for n in args.sizes:
            x = rng.random((n, 3)).astype(np.float32)
            y = rng.random((n, 3)).astype(np.float32)
            row = {"n": n}
            ref = None
            for name, run, grow in runnable:
                if name in last:
                    n_old, seconds = last[name]
                    if seconds * growth(n_old, n, grow) > args.cap:
                        row[name] = {"skipped": f"predicted {seconds * growth(n_old, n, grow):.0f} s > cap"}
                        continue
                try:
                    seconds, (value, grad) = best_of(run, x, y, args.repeat)
                except Exception as err:
                    row[name] = {"failed": f"{type(err).__name__}: {str(err)[:200]}"}
                    continue
                grad = np.asarray(grad.detach().cpu() if hasattr(grad, "detach") else
                                  (grad.get() if hasattr(grad, "get") else grad), np.float64)
                if ref is None:
                    ref = (value, grad)
                cell = {"seconds": seconds, "value": value,
                        "value_rel_diff": abs(value - ref[0]) / abs(ref[0]),
                        "grad_rel_diff": float(np.abs(grad - ref[1]).max() / np.abs(ref[1]).max())}
                row[name] = cell
                last[name] = (n, seconds)
                print(f"{n:>9} {name:>20} {seconds:9.3f} s  value {value:.7g}  "
                      f"vs first: {cell['value_rel_diff']:.1e} (grad {cell['grad_rel_diff']:.1e})", flush=True)
            rows.append(row)
            save(args.out, about, rows, [name for name, _, _ in runnable])  # after each size: a kill keeps them
    finally:
        for proc in load:
            proc.terminate()
    print("\n" + markdown(rows, [name for name, _, _ in runnable]))
    if args.out:
        print(f"wrote {args.out}")


def markdown(rows, names):
    lines = ["| N = M | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            cell = row.get(name, {})
            cells.append(f"{cell['seconds']:.3g} s" if "seconds" in cell else cell.get("skipped", cell.get("failed", "")))
        lines.append(f"| {row['n']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(path, about, rows, names):
    if path:
        with open(path, "w") as fh:
            json.dump({"about": about, "rows": rows, "table": markdown(rows, names)}, fh, indent=1)


if __name__ == "__main__":
    main()
