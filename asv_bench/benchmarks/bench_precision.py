"""The cost of a precision (issue #13): ours at ``tol``, and GeomLoss's fixed schedule at scaling 0.9.

Same data as the suite (``common.clouds``: float32 uniform cube, D = 3, p = 2, blur = 0.05),
N = M = 5000 (the largest of ``common.SIZES``). Each class times the call and tracks the
softmin passes it made (reductions over the N x M or N x N pairs) and its relative error
against the converged value (ours in float64 with ``tol=1e-7``, computed in the track method
only). ``benchmarks_scripts/precision_vs_anchors.py`` runs the full comparison (GeomLoss ladders, POT,
OTT-JAX, N = 10^4).

* ``ConvergedDivergence``: ``ota.sinkhorn(x, y, blur=0.05, scaling=0.5, tol=tol)`` on NumPy
  (Numba CPU), tol in (1e-2, 1e-3); ``track_passes`` is ``result.n_softmin``.
* ``GeomLossScaling09``: GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.9,
  backend="online")`` on torch CPU float32 (KeOps); passes ``4 * (len(epsilon_schedule) + 2)``
  (an initial step, one averaged update per temperature, the final extrapolation).
"""

import functools
import warnings

import numpy as np

import ot_agnostic as ota
from ot_agnostic.sinkhorn import epsilon_schedule, max_diameter

from .common import BLUR, P, SCALING, SIZES, Base, clouds, require, require_numba, torch_clouds

PRECISION_N = SIZES[-1]
GEOMLOSS_SCALING = 0.9


@functools.lru_cache(maxsize=2)
def converged_value(n):
    """The converged ``S_eps`` on ``clouds(n)`` (float64, ``tol=1e-7``): the reference of the errors."""
    x, y = clouds(n)
    res = ota.sinkhorn(x.astype(np.float64), y.astype(np.float64), p=P, blur=BLUR, scaling=SCALING,
                       tol=1e-7, max_iter=20000)
    assert bool(res.converged), res.marginal_error
    return float(res.value)


def relative_error(value, n):
    ref = converged_value(n)
    return abs(float(value) - ref) / abs(ref)


def ours(x, y, tol):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ota.ConvergenceWarning)
        return ota.sinkhorn(x, y, p=P, blur=BLUR, scaling=SCALING, tol=tol)


class ConvergedDivergence(Base):
    """Ours to a precision: ``ota.sinkhorn(x, y, blur=0.05, tol=tol)``, NumPy float32, Numba CPU."""

    params = ([1e-2, 1e-3], [PRECISION_N])
    param_names = ["tol", "n"]
    unit = "passes"

    def setup(self, tol, n):
        require_numba()
        self.x, self.y = clouds(n)
        ours(self.x[:200], self.y[:200], tol)  # compiles the kernels (or loads NUMBA_CACHE_DIR)

    def time_sinkhorn(self, tol, n):
        ours(self.x, self.y, tol)

    def track_passes(self, tol, n):
        return ours(self.x, self.y, tol).n_softmin

    def track_relative_error(self, tol, n):
        return relative_error(ours(self.x, self.y, tol).value, n)

    track_relative_error.unit = "relative error"


class GeomLossScaling09(Base):
    """Anchor: GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.9, backend="online")``, same data."""

    params = ([PRECISION_N],)
    param_names = ["n"]
    unit = "passes"

    def setup(self, n):
        require("torch")
        geomloss = require("geomloss")
        require("pykeops")

        self.loss = geomloss.SamplesLoss("sinkhorn", p=P, blur=BLUR, scaling=GEOMLOSS_SCALING, backend="online")
        self.x, self.y = torch_clouds(n)
        self.loss(self.x[:200], self.y[:200])  # KeOps compiles its formulas on the first call

    def time_divergence(self, n):
        self.loss(self.x, self.y)

    def track_passes(self, n):
        x, y = clouds(n)
        diameter = max_diameter(x[None], y[None], xp=np)  # GeomLoss's estimate (bounding box)
        return 4 * (len(epsilon_schedule(P, diameter, BLUR, GEOMLOSS_SCALING)) + 2)

    def track_relative_error(self, n):
        return relative_error(self.loss(self.x, self.y).item(), n)

    track_relative_error.unit = "relative error"
