"""Kernel losses (energy distance, Gaussian MMD) and the soft Hausdorff divergence.

Same data as the rest of the suite (``common.clouds``), blur = 0.05. ``backend="numba"`` runs
NumPy arrays through the Numba CPU kernels, ``"keops"`` torch CPU tensors through KeOps.
Anchor on the same data: ``bench_anchors.GeomLossKernel`` (``SamplesLoss("energy" | "gaussian")``).
"""

import ot_agnostic as ota

from .common import BLUR, P, SIZES, Base, clouds, require_keops, require_numba, torch_clouds, warm


def kernel_loss(kernel, x, y, backend):
    if kernel == "energy":
        return ota.energy_distance(x, y, backend=backend)
    return ota.gaussian_mmd(x, y, blur=BLUR, backend=backend)


def hausdorff(x, y, backend):
    return ota.hausdorff_divergence(x, y, p=P, blur=BLUR, backend=backend)


def backend_data(backend, n):
    """``clouds(n)`` as NumPy (``"numba"``) or torch (``"keops"``) arrays, kernels warmed up."""
    if backend == "numba":
        require_numba()
        return clouds(n)
    require_keops()
    return torch_clouds(n)


class KernelLoss(Base):
    """``ota.energy_distance`` and ``ota.gaussian_mmd`` (debiased kernel norms, O(N + M) memory)."""

    params = (["energy", "gaussian"], ["numba", "keops"], SIZES)
    param_names = ["kernel", "backend", "n"]

    def setup(self, kernel, backend, n):
        self.x, self.y = backend_data(backend, n)
        warm(lambda x, y: kernel_loss(kernel, x, y, backend), self.x, self.y)

    def time_kernel_loss(self, kernel, backend, n):
        kernel_loss(kernel, self.x, self.y, backend)

    def peakmem_kernel_loss(self, kernel, backend, n):
        kernel_loss(kernel, self.x, self.y, backend)


class Hausdorff(Base):
    """``ota.hausdorff_divergence`` (soft Hausdorff, p = 2, blur = 0.05)."""

    params = (["numba", "keops"], SIZES)
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        self.x, self.y = backend_data(backend, n)
        warm(hausdorff, self.x, self.y, backend)

    def time_hausdorff(self, backend, n):
        hausdorff(self.x, self.y, backend)

    def peakmem_hausdorff(self, backend, n):
        hausdorff(self.x, self.y, backend)
