"""ot_agnostic demo: divergences between point clouds that look like real shapes.

Run it with ``bash scripts/demo.sh`` (sets up ``.venv`` first) or, in an environment where
ot_agnostic is installed, ``python examples/demo.py [--n 2000]``.

For each pair of shapes it computes, on NumPy arrays and (if torch is importable) on torch
tensors holding the same float32 data:

* the debiased Sinkhorn divergence ``S_eps`` (balanced, and unbalanced with a finite reach),
* the energy distance, the Gaussian kernel norm (MMD) and the soft Hausdorff divergence,

and prints one table row per computation: the case, the divergence, the array library, the
value, the backend that ran and the wall time. NumPy and torch rows should agree to float32
precision: the same engine runs on both. If POT is installed, an exact ``ot.emd2`` value is
printed next to a small-blur Sinkhorn divergence on a small problem.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import array_api_compat
import numpy as np

import ot_agnostic as ota
from ot_agnostic.backends import select_backend

BLUR = 0.05  # the length scale of the Sinkhorn divergences, Hausdorff and Gaussian MMD
REACH = 0.5  # the unbalanced divergence tolerates mass changes over this distance


# --------------------------------------------------------------------------- shapes


def sphere_surface(n, rng, radius=1.0):
    """``n`` points uniformly distributed on a sphere of radius ``radius`` in 3-D."""
    v = rng.normal(size=(n, 3))
    return radius * v / np.linalg.norm(v, axis=1, keepdims=True)


def torus_surface(n, rng, major=1.0, minor=0.35):
    """``n`` points uniformly distributed (by area, via rejection) on a torus in 3-D."""
    points = []
    while sum(len(p) for p in points) < n:
        theta = rng.uniform(0, 2 * np.pi, size=2 * n)  # around the tube
        phi = rng.uniform(0, 2 * np.pi, size=2 * n)  # around the axis
        keep = rng.uniform(0, 1, size=2 * n) < (major + minor * np.cos(theta)) / (major + minor)
        theta, phi = theta[keep], phi[keep]
        ring = major + minor * np.cos(theta)
        points.append(np.stack([ring * np.cos(phi), ring * np.sin(phi), minor * np.sin(theta)], 1))
    return np.concatenate(points)[:n]


def rotation(axis, angle):
    """The 3 x 3 rotation of ``angle`` radians around ``axis`` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def deformed(x, rng, noise=0.02):
    """``x`` squashed along z, rotated by 30 degrees and jittered by Gaussian noise."""
    squash = np.diag([1.1, 1.0, 0.8])
    return x @ squash @ rotation([1, 1, 0], math.radians(30)).T + noise * rng.normal(size=x.shape)


def gaussian_blob(n, rng, center, scales, angle):
    """A 2-D Gaussian blob with axes ``scales`` rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return rng.normal(size=(n, 2)) * scales @ np.array([[c, s], [-s, c]]) + center


def cases(n, rng):
    """``(name, x, y, divergences, note)`` test pairs, as float32 NumPy arrays."""
    sphere = sphere_surface(n, rng)
    shift = np.array([0.3, 0.0, 0.0])
    pairs = [
        # A translation is an exact check: S_eps(a, a + v) = |v|^2 / 2 for p = 2.
        ("sphere vs translated sphere", sphere, sphere + shift, DIVERGENCES[:1],
         f"expected S_eps = |v|^2 / 2 = {shift @ shift / 2:.6f}"),
        ("sphere vs deformed sphere", sphere, deformed(sphere_surface(n, rng), rng), DIVERGENCES, ""),
        ("torus vs sphere", torus_surface(n, rng), sphere_surface(n, rng), DIVERGENCES, ""),
        ("two 2-D Gaussian blobs",
         gaussian_blob(n, rng, [0.0, 0.0], [0.5, 0.2], 0.0),
         gaussian_blob(n, rng, [0.8, 0.4], [0.3, 0.3], 0.7), DIVERGENCES, ""),
    ]
    return [(name, x.astype(np.float32), y.astype(np.float32), divs, note)
            for name, x, y, divs, note in pairs]


# --------------------------------------------------------------------------- divergences


def auto_backend(x, y):
    """The plugin/method that ``backend="auto"`` picks for ``x`` and ``y``."""
    xp = array_api_compat.array_namespace(x, y)
    B, (N, D), M = 1, x.shape, y.shape[0]
    return str(select_backend(xp, x, "auto", (B, N, M, D)))


def run_sinkhorn(x, y, **kwargs):
    result = ota.sinkhorn(x, y, blur=BLUR, **kwargs)
    return result.value, result.backend


def run_unbalanced(x, y):
    # y carries 1.5 times the mass of x: only unbalanced OT (finite reach) accepts that.
    b = 1.5 * np.full(y.shape[0], 1.0 / y.shape[0], dtype=np.float32)
    if not isinstance(y, np.ndarray):
        b = array_api_compat.array_namespace(y).asarray(b)
    result = ota.sinkhorn(x, y, b=b, blur=BLUR, reach=REACH)
    return result.value, result.backend


DIVERGENCES = [
    (f"sinkhorn_divergence(blur={BLUR})", run_sinkhorn),
    (f"unbalanced S_eps(reach={REACH}, m_b=1.5)", run_unbalanced),
    ("energy_distance", lambda x, y: (ota.energy_distance(x, y), auto_backend(x, y))),
    (f"gaussian_mmd(blur={10 * BLUR:g})",
     lambda x, y: (ota.gaussian_mmd(x, y, blur=10 * BLUR), auto_backend(x, y))),
    (f"hausdorff_divergence(blur={BLUR})",
     lambda x, y: (ota.hausdorff_divergence(x, y, blur=BLUR), auto_backend(x, y))),
]


def libraries():
    """``(name, convert)`` for NumPy and, when it can be imported, torch."""
    libs = [("numpy", lambda a: a)]
    if importlib.util.find_spec("torch") is not None:
        import torch

        libs.append(("torch", torch.from_numpy))
    else:
        print("torch is not installed: showing NumPy only.\n")
    return libs


def warm_up(libs):
    """One tiny call per library, so that imports and first-call costs are not timed."""
    tiny = np.random.default_rng(0).random((8, 3)).astype(np.float32)
    for _, convert in libs:
        for _, fn in DIVERGENCES:
            fn(convert(tiny), convert(tiny[::-1].copy()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="points per cloud (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    libs = libraries()
    warm_up(libs)
    print(f"ot_agnostic {ota.__version__}: N = M = {args.n} points per cloud, float32, p = 2\n")
    header = f"{'case':<28} {'divergence':<40} {'library':<7} {'value':>12}  {'backend':<22} {'time':>8}"
    print(header)
    print("-" * len(header))
    total = time.perf_counter()
    for name, x_np, y_np, divergences, note in cases(args.n, rng):
        if note:
            print(f"{name:<28} ({note})")
        for div_name, fn in divergences:
            for lib, convert in libs:
                x, y = convert(x_np), convert(y_np)
                start = time.perf_counter()
                value, backend = fn(x, y)
                value = float(value)
                elapsed = time.perf_counter() - start
                print(
                    f"{name:<28} {div_name:<40} {lib:<7} {value:>12.6f}  {backend:<22} "
                    f"{elapsed:>7.2f}s"
                )
        print()
    print(f"total compute time: {time.perf_counter() - total:.1f} s\n")
    exact_ot_check(rng)


def exact_ot_check(rng, n=300):
    """Compare ``S_eps`` at a small blur with POT's exact ``ot.emd2`` (when POT is installed)."""
    if importlib.util.find_spec("ot") is None:
        print("POT is not installed: skipping the exact OT comparison (pip install pot).")
        return
    import ot

    x, y = torus_surface(n, rng), sphere_surface(n, rng)
    a = b = np.full(n, 1.0 / n)
    cost = ot.dist(x, y, metric="sqeuclidean") / 2  # C(x, y) = |x - y|^2 / 2
    start = time.perf_counter()
    exact = ot.emd2(a, b, cost)
    t_exact = time.perf_counter() - start
    print(f"Exact OT check, torus vs sphere, N = M = {n}, float64, C = |x - y|^2 / 2:")
    print(f"  POT ot.emd2 (exact W_2^2 / 2)                {exact:.6f}   ({t_exact:.2f}s)")
    for blur in (0.05, 0.01):
        start = time.perf_counter()
        value = float(ota.sinkhorn_divergence(x, y, blur=blur, scaling=0.9))
        print(
            f"  ot_agnostic sinkhorn_divergence(blur={blur:<4})  {value:.6f}   "
            f"({time.perf_counter() - start:.2f}s, relative gap {abs(value - exact) / exact:.1%})"
        )


if __name__ == "__main__":
    main()
