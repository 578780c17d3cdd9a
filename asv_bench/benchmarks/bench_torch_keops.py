"""The torch path (KeOps plugin, and "auto") against GeomLoss on torch CPU, same data, same run.

Problem of issue #4: debiased Sinkhorn divergence + ``backward()``, D = 3 uniform clouds in
the unit cube, p = 2, blur = 0.05, scaling = 0.5, float32 torch CPU tensors. The anchor is
``GeomLossDivergenceAndGradient`` in ``bench_numpy_numba.py`` (same data and settings). The
larger sizes live in ``benchmarks_scripts/torch_keops_vs_geomloss.py``.
"""

import ot_agnostic as ota

from .bench_divergence import import_or_skip
from .bench_numpy_numba import BLUR, D, P, SCALING, unit_cube_clouds


class TorchDivergenceAndGradient:
    """``ota.sinkhorn_divergence(...).backward()`` on torch CPU float32."""

    params = (["keops", "auto"], [1000, 5000])
    param_names = ["backend", "n"]
    number, repeat, warmup_time, timeout = 1, (1, 3, 60.0), 0.0, 900

    def setup(self, backend, n):
        self.torch = import_or_skip("torch")
        import_or_skip("pykeops")
        ota.warmup(dtypes=("float32",), ps=(P,), backend="keops", dims=(D,))
        x, y = unit_cube_clouds(n)
        self.x, self.y = self.torch.from_numpy(x), self.torch.from_numpy(y)
        self.backend = backend

    def _run(self):
        x = self.x.clone().requires_grad_()
        ota.sinkhorn_divergence(x, self.y, p=P, blur=BLUR, scaling=SCALING, backend=self.backend).backward()

    def time_value_and_grad(self, backend, n):
        self._run()

    def peakmem_value_and_grad(self, backend, n):
        self._run()
