"""``sinkhorn_divergence``: time and peak memory on every backend, same data (``common.clouds``).

Debiased Sinkhorn divergence, D = 3 float32 clouds in the unit cube, p = 2, blur = 0.05,
scaling = 0.5. Each class pins one plugin and method with ``backend="plugin/method"``, so a
regression cannot hide behind a change of the ``"auto"`` choice. The anchors on the same data
are in ``bench_anchors.py`` (GeomLoss ``SamplesLoss("sinkhorn")``, POT ``sinkhorn2``).
"""

import ot_agnostic as ota

from .common import (
    BLUR, LARGE_SIZES, LARGE_TIMEOUT, P, SCALING, SIZES, Base, clouds, require_cupy_gpu,
    require_keops, require_numba, torch_clouds, warm,
)


def divergence(x, y, backend):
    return ota.sinkhorn_divergence(x, y, p=P, blur=BLUR, scaling=SCALING, backend=backend)


class _Divergence(Base):
    backend = None

    def time_divergence(self, *params):
        divergence(self.x, self.y, self.backend)

    def peakmem_divergence(self, *params):
        divergence(self.x, self.y, self.backend)


class NumbaOnline(_Divergence):
    """NumPy arrays, Numba CPU kernels, ``backend="numba/online"`` (O(N + M) memory).

    ``OT_ASV_LARGE=1`` adds N = 100,000 (N = 10^6 online is hours of CPU: see ``Multiscale``).
    """

    params = (SIZES + LARGE_SIZES[:1],)
    param_names = ["n"]
    timeout = LARGE_TIMEOUT
    backend = "numba/online"

    def setup(self, n):
        require_numba()
        self.x, self.y = clouds(n)
        warm(divergence, self.x, self.y, self.backend)


class ArrayAPINumPy(_Divergence):
    """NumPy arrays on the pure Array API plugin: ``"array_api/tensorized"`` (dense N x M) and ``"array_api/online"``."""

    params = (["tensorized", "online"], SIZES)
    param_names = ["method", "n"]

    def setup(self, method, n):
        self.x, self.y = clouds(n)
        self.backend = f"array_api/{method}"
        warm(divergence, self.x, self.y, self.backend)


class ArrayAPITorch(_Divergence):
    """torch CPU tensors on the pure Array API plugin, ``"array_api/tensorized"``."""

    params = (SIZES,)
    param_names = ["n"]
    backend = "array_api/tensorized"

    def setup(self, n):
        self.x, self.y = torch_clouds(n)
        warm(divergence, self.x, self.y, self.backend)


class KeOpsOnline(_Divergence):
    """torch CPU tensors, KeOps formulas (compiled in ``setup``), ``"keops/online"``."""

    params = (SIZES,)
    param_names = ["n"]
    backend = "keops/online"

    def setup(self, n):
        require_keops()
        self.x, self.y = torch_clouds(n)
        warm(divergence, self.x, self.y, self.backend)


class Multiscale(_Divergence):
    """NumPy arrays, Numba block-sparse kernels, ``"numba/multiscale"``: N = 10^4 (and 10^5, 10^6
    with ``OT_ASV_LARGE=1``). GeomLoss ``backend="multiscale"`` on the same data: ``bench_anchors.GeomLossMultiscale``.
    """

    params = ([10_000] + LARGE_SIZES,)
    param_names = ["n"]
    timeout = LARGE_TIMEOUT
    backend = "numba/multiscale"

    def setup(self, n):
        require_numba()
        self.x, self.y = clouds(n)
        warm(divergence, self.x, self.y, self.backend, n=2000)  # big enough to cluster


class CuPyNumbaCuda(_Divergence):
    """CuPy arrays on the GPU, Numba CUDA kernels, ``"numba_cuda/online"`` and ``"numba_cuda/multiscale"``.

    Skipped without CuPy and a CUDA device. Times include a device synchronisation
    (``float()`` of the result).
    """

    params = (["online", "multiscale"], SIZES + LARGE_SIZES)
    param_names = ["method", "n"]
    timeout = LARGE_TIMEOUT

    def setup(self, method, n):
        cupy = require_cupy_gpu()
        x, y = clouds(n)
        self.x, self.y = cupy.asarray(x), cupy.asarray(y)
        self.backend = f"numba_cuda/{method}"
        try:
            float(warm(divergence, self.x, self.y, self.backend, n=2000))
        except ImportError as err:  # the plugin's GPU self-test failed (no libNVVM, ...)
            raise NotImplementedError(str(err)) from None

    def time_divergence(self, method, n):
        float(divergence(self.x, self.y, self.backend))

    def peakmem_divergence(self, method, n):  # host memory only: GPU memory is not measured
        float(divergence(self.x, self.y, self.backend))
