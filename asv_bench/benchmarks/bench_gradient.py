"""Divergence + gradient with respect to ``x``: NumPy ``value_and_grad`` and torch ``backward()``.

Same problem as ``bench_divergence`` (``common.clouds``, p = 2, blur = 0.05, scaling = 0.5).
Anchor on the same data: ``bench_anchors.GeomLossGradient`` (``SamplesLoss(...)(x, y).backward()``).
"""

import ot_agnostic as ota

from .common import (
    BLUR, LARGE_SIZES, LARGE_TIMEOUT, P, SCALING, SIZES, Base, clouds, require_keops,
    require_numba, torch_clouds, warm,
)


def value_and_grad(x, y):
    return ota.value_and_grad(x, y, p=P, blur=BLUR, scaling=SCALING)


class ValueAndGradNumPy(Base):
    """``ota.value_and_grad`` on NumPy float32, ``backend="auto"`` (Numba online at these sizes).

    ``OT_ASV_LARGE=1`` adds N = 100,000.
    """

    params = (SIZES + LARGE_SIZES[:1],)
    param_names = ["n"]
    timeout = LARGE_TIMEOUT

    def setup(self, n):
        require_numba()
        self.x, self.y = clouds(n)
        warm(value_and_grad, self.x, self.y)

    def time_value_and_grad(self, n):
        value_and_grad(self.x, self.y)

    def peakmem_value_and_grad(self, n):
        value_and_grad(self.x, self.y)


class BackwardTorchNumba(Base):
    """``ota.sinkhorn_divergence(x, y).backward()`` on torch CPU float32: ``"auto"`` runs the
    Numba kernels through the autograd Function (``"numba/online"``); compare with
    ``ValueAndGradNumPy`` (issue #14: within 1.3x)."""

    params = (SIZES,)
    param_names = ["n"]
    backend = "auto"

    def setup(self, n):
        require_numba()
        self.x, self.y = torch_clouds(n)
        self._run(self.x[:200], self.y[:200])

    def _run(self, x, y):
        x = x.clone().requires_grad_()
        ota.sinkhorn_divergence(x, y, p=P, blur=BLUR, scaling=SCALING, backend=self.backend).backward()
        return x.grad

    def time_backward(self, n):
        self._run(self.x, self.y)

    def peakmem_backward(self, n):
        self._run(self.x, self.y)


class BackwardKeOps(BackwardTorchNumba):
    """``ota.sinkhorn_divergence(x, y, backend="keops/online").backward()`` on torch CPU float32."""

    backend = "keops/online"

    def setup(self, n):
        require_keops()
        self.x, self.y = torch_clouds(n)
        self._run(self.x[:200], self.y[:200])
