"""The NumPy fast path (Numba CPU kernels) against GeomLoss on torch CPU, same data, same run.

Problem of issue #3: debiased Sinkhorn divergence + gradient, D = 3 uniform clouds in the
unit cube, p = 2, blur = 0.05, scaling = 0.5, float32. GeomLoss's "online" (KeOps CPU) and
"tensorized" backends compute the same value and ``x.grad``; the ratio of the two times is
the figure to track. ``SoftminPass.track_ns_per_pair`` is the speed of one kernel pass.
The larger sizes (up to 200,000) live in ``benchmarks_scripts/divergence_vs_geomloss.py``
and ``benchmarks_scripts/peak_memory.py``: they take minutes per call.
"""

import time

import numpy as np

import ot_agnostic as ota

from .bench_divergence import import_or_skip

D, P, BLUR, SCALING = 3, 2, 0.05, 0.5


def unit_cube_clouds(n, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, D)).astype(dtype), rng.random((n, D)).astype(dtype)


class DivergenceAndGradient:
    """``ota.value_and_grad`` on NumPy float32 (Numba plugin)."""

    params = ([1000, 5000, 20000],)
    param_names = ["n"]
    number, repeat, warmup_time, timeout = 1, (1, 3, 60.0), 0.0, 900

    def setup(self, n):
        self.x, self.y = unit_cube_clouds(n)
        ota.warmup(dtypes=("float32",), ps=(P,))

    def time_value_and_grad(self, n):
        ota.value_and_grad(self.x, self.y, p=P, blur=BLUR, scaling=SCALING)

    def peakmem_value_and_grad(self, n):
        ota.value_and_grad(self.x, self.y, p=P, blur=BLUR, scaling=SCALING)


class GeomLossDivergenceAndGradient:
    """GeomLoss ``SamplesLoss("sinkhorn")`` value + ``backward()`` on torch CPU float32."""

    params = (["online", "tensorized"], [1000, 5000])
    param_names = ["backend", "n"]
    number, repeat, warmup_time, timeout = 1, (1, 3, 60.0), 0.0, 900

    def setup(self, backend, n):
        self.torch = import_or_skip("torch")
        geomloss = import_or_skip("geomloss")
        if backend == "online":
            import_or_skip("pykeops")
        x, y = unit_cube_clouds(n)
        self.x, self.y = self.torch.from_numpy(x), self.torch.from_numpy(y)
        self.loss = geomloss.SamplesLoss("sinkhorn", p=P, blur=BLUR, scaling=SCALING, backend=backend)
        self._run(self.x[:50], self.y[:50])  # KeOps compiles its formulas on the first call

    def _run(self, x, y):
        x = x.clone().requires_grad_()
        self.loss(x, y).backward()

    def time_value_and_grad(self, backend, n):
        self._run(self.x, self.y)

    def peakmem_value_and_grad(self, backend, n):
        self._run(self.x, self.y)


class SoftminPass:
    """One ``softmin`` kernel pass, in nanoseconds per (i, j) pair (lower is better)."""

    params = (["float32", "float64"], [5000, 20000])
    param_names = ["dtype", "n"]
    unit = "ns/pair"
    timeout = 300

    def setup(self, dtype, n):
        from ot_agnostic.kernels import numba_cpu

        self.kernels = numba_cpu
        x, y = unit_cube_clouds(n, dtype)
        self.x, self.y = x[None], y[None]
        self.h = np.full((1, n), -np.log(n), dtype=dtype)
        self.out = np.empty((1, n), dtype=dtype)
        self.kernels.softmin(self.x, self.y, self.h, 0.01, P, self.out)  # compile / load cache

    def track_ns_per_pair(self, dtype, n):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            self.kernels.softmin(self.x, self.y, self.h, 0.01, P, self.out)
            best = min(best, time.perf_counter() - start)
        return best / n**2 * 1e9
