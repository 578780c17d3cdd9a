"""Anchors: GeomLoss and POT on the same data (``common.clouds``), in the same run as ours.

Read a ratio as (anchor time) / (our time) from one ``asv run``: same machine, same load,
same arrays, same settings. Pairs (anchor class -> ours):

* ``GeomLossSinkhorn`` (tensorized / online) -> ``bench_divergence.*`` (same p, blur, scaling)
* ``GeomLossMultiscale`` -> ``bench_divergence.Multiscale``
* ``GeomLossGradient`` (value + ``backward()``) -> ``bench_gradient.*``
* ``GeomLossKernel`` (energy / gaussian) -> ``bench_kernels.KernelLoss``
* ``POTSinkhorn.time_sinkhorn2`` (one OT_eps at fixed eps = blur^2 on the dense cost
  ``|x - y|^2 / 2``, float64, POT defaults: at most 1000 iterations, no eps-scaling) and
  ``time_emd2`` (exact OT, network simplex) -> ``bench_divergence.*``: not the same number (the
  divergence is three debiased OT_eps problems solved by eps-scaling), the usual POT call for it
* ``POTSinkhornTransport`` (``reg_e = 2 blur^2`` on ``|x - y|^2``: the plan of ``OTTransformer``
  with eps = blur^2 on ``|x - y|^2 / 2``) -> ``bench_transformer.OTTransformerFitTransform``
* ``RatioVsGeomLoss.track_speedup``: the ratio GeomLoss online / ours for value + gradient at
  N = 5000, measured inside one call (best of 2 each): the figure of issue #3.

GeomLoss runs on torch CPU float32 tensors (``online`` and ``multiscale`` through KeOps,
compiled in ``setup``); POT on NumPy float64 arrays (its default dtype).
"""

import time

import numpy as np

import ot_agnostic as ota

from .bench_transformer import TRANSFORMER_BLUR
from .common import (
    BLUR, LARGE_SIZES, LARGE_TIMEOUT, P, SCALING, SIZES, Base, clouds, require, require_numba,
    torch_clouds,
)


def samples_loss(loss="sinkhorn", backend="tensorized", **kwargs):
    """A GeomLoss ``SamplesLoss`` (skip without torch, geomloss, or pykeops for KeOps backends)."""
    require("torch")
    geomloss = require("geomloss")
    if backend in ("online", "multiscale"):
        require("pykeops")
    if loss == "sinkhorn":
        kwargs = dict(p=P, blur=BLUR, scaling=SCALING, **kwargs)
    return geomloss.SamplesLoss(loss, backend=backend, **kwargs)


class GeomLossSinkhorn(Base):
    """GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, backend=...)(x, y)``, value only."""

    params = (["tensorized", "online"], SIZES)
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        self.loss = samples_loss(backend=backend)
        self.x, self.y = torch_clouds(n)
        self.loss(self.x[:200], self.y[:200])  # KeOps compiles its formulas on the first call

    def time_divergence(self, backend, n):
        self.loss(self.x, self.y)

    def peakmem_divergence(self, backend, n):
        self.loss(self.x, self.y)


class GeomLossMultiscale(GeomLossSinkhorn):
    """GeomLoss ``backend="multiscale"`` at the sizes of ``bench_divergence.Multiscale`` (10^6 left out: hours on a CPU)."""

    params = ([10_000] + LARGE_SIZES[:1],)
    param_names = ["n"]
    timeout = LARGE_TIMEOUT

    def setup(self, n):
        super().setup("multiscale", n)
        self.loss(self.x[:2000], self.y[:2000])

    def time_divergence(self, n):
        self.loss(self.x, self.y)

    def peakmem_divergence(self, n):
        self.loss(self.x, self.y)


class GeomLossGradient(Base):
    """GeomLoss ``SamplesLoss("sinkhorn")(x, y).backward()``: the anchor of ``bench_gradient``."""

    params = (["tensorized", "online"], SIZES)
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        self.loss = samples_loss(backend=backend)
        self.x, self.y = torch_clouds(n)
        self._run(self.x[:200], self.y[:200])

    def _run(self, x, y):
        x = x.clone().requires_grad_()
        self.loss(x, y).backward()
        return x.grad

    def time_value_and_grad(self, backend, n):
        self._run(self.x, self.y)

    def peakmem_value_and_grad(self, backend, n):
        self._run(self.x, self.y)


class GeomLossKernel(Base):
    """GeomLoss ``SamplesLoss("energy")`` and ``SamplesLoss("gaussian", blur=0.05)``: the anchor of ``bench_kernels.KernelLoss``."""

    params = (["energy", "gaussian"], ["tensorized", "online"], SIZES)
    param_names = ["kernel", "backend", "n"]

    def setup(self, kernel, backend, n):
        kwargs = {"blur": BLUR} if kernel == "gaussian" else {}
        self.loss = samples_loss(kernel, backend, **kwargs)
        self.x, self.y = torch_clouds(n)
        self.loss(self.x[:200], self.y[:200])

    def time_kernel_loss(self, kernel, backend, n):
        self.loss(self.x, self.y)

    def peakmem_kernel_loss(self, kernel, backend, n):
        self.loss(self.x, self.y)


class POTSinkhorn(Base):
    """POT on the dense float64 cost ``M = |x - y|^2 / 2``: ``ot.sinkhorn2(a, b, M, blur**2)`` and ``ot.emd2``.

    ``M`` is built in ``setup`` (not timed). ``emd2`` gets ``numItermax=10**7`` (the default
    10^5 stops before the optimum at N = 5000).
    """

    params = (SIZES,)
    param_names = ["n"]

    def setup(self, n):
        self.ot = require("ot")
        x, y = clouds(n)
        self.M = self.ot.dist(x.astype(np.float64), y.astype(np.float64)) / 2
        self.a = np.full(n, 1.0 / n)
        self.ot.sinkhorn2(self.a[:10] * 100, self.a[:10] * 100, self.M[:10, :10], BLUR**2)

    def time_sinkhorn2(self, n):
        self.ot.sinkhorn2(self.a, self.a, self.M, BLUR**2)

    def peakmem_sinkhorn2(self, n):
        self.ot.sinkhorn2(self.a, self.a, self.M, BLUR**2)

    def time_emd2(self, n):
        self.ot.emd2(self.a, self.a, self.M, numItermax=10**7)


class POTSinkhornTransport(Base):
    """``ot.da.SinkhornTransport(reg_e=2 * 0.1**2).fit(Xs=x, Xt=y).transform(Xs=x)``, float64.

    ``method="sinkhorn"`` and ``out_of_sample_map="ferradans"`` (the barycentric map of the
    plan on the training points, as ``OTTransformer.transform(x)``): POT's default log-domain
    solver and "continuous" map take about 15x longer here (over a minute at N = 5000).
    """

    params = (SIZES,)
    param_names = ["n"]

    def setup(self, n):
        self.ot = require("ot")
        x, y = clouds(n)
        self.x, self.y = x.astype(np.float64), y.astype(np.float64)
        self._run(self.x[:200], self.y[:200])

    def _run(self, x, y):
        transport = self.ot.da.SinkhornTransport(
            reg_e=2 * TRANSFORMER_BLUR**2, method="sinkhorn", out_of_sample_map="ferradans"
        )
        return transport.fit(Xs=x, Xt=y).transform(Xs=x)

    def time_fit_transform(self, n):
        self._run(self.x, self.y)

    def peakmem_fit_transform(self, n):
        self._run(self.x, self.y)


class RatioVsGeomLoss:
    """GeomLoss time / our time for divergence + gradient (higher is better for us), one run.

    Ours: ``ota.value_and_grad`` on NumPy (Numba online). GeomLoss: ``SamplesLoss("sinkhorn",
    backend="online")(x, y).backward()`` on the same points as torch tensors. Best of 2 each.
    """

    params = ([5000],)
    param_names = ["n"]
    unit = "ratio"
    timeout = 600

    def setup(self, n):
        require_numba()
        self.gl = GeomLossGradient()
        self.gl.setup("online", n)
        self.x, self.y = clouds(n)
        ota.value_and_grad(self.x[:200], self.y[:200], p=P, blur=BLUR, scaling=SCALING)

    @staticmethod
    def _best(fun, repeat=2):
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fun()
            best = min(best, time.perf_counter() - start)
        return best

    def track_speedup(self, n):
        ours = self._best(lambda: ota.value_and_grad(self.x, self.y, p=P, blur=BLUR, scaling=SCALING))
        geomloss = self._best(lambda: self.gl._run(self.gl.x, self.gl.y))
        return geomloss / ours
