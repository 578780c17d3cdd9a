"""The CUDA plugin: Numba CUDA kernels for CuPy arrays and torch CUDA tensors, O(N + M) memory.

Runs CuPy arrays and torch CUDA tensors (float32/float64, up to ``MAX_DIM = 64``
coordinates) through the kernels of :mod:`ot_agnostic.kernels.numba_cuda` ("online" and
"multiscale"). Outputs are arrays of the inputs' library allocated on their device; the
kernels read and write that memory in place (zero copy, ``__cuda_array_interface__``) and
run on the inputs' device, on the library's current stream (CuPy's, or
``torch.cuda.current_stream()``), without any host copy or synchronisation. torch tensors
get autograd through the ``torch.autograd.Function`` of
:mod:`ot_agnostic.backends._torch_bridge`, whose backward passes run in the same kernels.

Which plugin ``backend="auto"`` picks on a GPU: CuPy arrays always come here; torch CUDA
tensors go to KeOps when pykeops imports and passes its self-test on that device (KeOps'
CUDA reductions), and come here otherwise (no compiler needed); ``backend="numba_cuda"``
insists on this plugin. ``numba.cuda`` is imported on first use only, and a one-time
self-test per device (a tiny softmin: it compiles a kernel, so it also catches a missing
libNVVM) guards against a broken installation; if it fails, ``backend="auto"`` falls back
to the pure Array API backend with one logged warning on the ``"ot_agnostic"`` logger,
and ``backend="numba_cuda"`` raises the ``ImportError`` with the fix.

Kernels are compiled for each reduction, ``p``, dimension ``D`` and dtype when first used
in a process (about a second each; they are not cached on disk).

``NumbaCudaPlugin(host_arrays=True)`` also takes NumPy arrays and torch CPU tensors (Numba
copies them to the GPU and back around every launch): under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) they run on the CPU, which is how the tests check this
plugin end to end, torch's autograd Function included, without a GPU.

Examples
--------
>>> import cupy, ot_agnostic as ota                              # doctest: +SKIP
>>> x, y = cupy.random.rand(20_000, 3), cupy.random.rand(20_000, 3)  # doctest: +SKIP
>>> ota.sinkhorn(x, y, backend="numba_cuda").backend           # doctest: +SKIP
'numba_cuda/online'
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math

import array_api_compat
import numpy as np

from .._array_api import device_of, to_float
from ..costs import Cost, Kernel
from ..kernels.numba_cuda import MAX_DIM  # plain constants: imports neither numba nor CUDA
from ._base import (
    Method, PluginId, describe_arrays, dtype_name, log_fallback_once, method_error, prefers_multiscale,
)

logger = logging.getLogger("ot_agnostic")

#: The self-test's tolerance on the relative error of a tiny softmin, by dtype name.
SELF_TEST_RTOL = {"float32": 1e-5, "float64": 1e-12}

_FIX = (
    "It needs an NVIDIA driver and the CUDA compiler library libNVVM: install them with "
    "`pip install \"numba-cuda[cu12]\"` (or `conda install -c conda-forge cuda-nvcc`), or pass "
    "backend='tensorized' to silence this message."
)


def load_kernels():
    """The CUDA kernel module; raises ``ImportError`` with a fix when ``numba.cuda`` is unusable."""
    try:
        kernels = importlib.import_module("ot_agnostic.kernels.numba_cuda")
        if not kernels._cuda().is_available():
            raise RuntimeError("numba.cuda.is_available() is False: no usable GPU or driver")
        return kernels
    except Exception as err:  # numba missing, no driver, ...
        raise ImportError(
            f"the Numba CUDA backend is unavailable ({type(err).__name__}: {err}). {_FIX}"
        ) from err


class NumbaCudaGeometry:
    """Point clouds ``x (B, N, D)``, ``y (B, M, D)`` (CuPy, detached torch CUDA tensors, or NumPy
    under the simulator) whose reductions run in CUDA kernels (no autograd: see
    :class:`~._torch_bridge.TorchGeometry`)."""

    def __init__(self, x, y, cost, *, xp, kernels=None):
        self.xp, self.cost = xp, cost
        self.x, self.y = x, y
        self.kernels = kernels or load_kernels()
        B, N, _ = x.shape
        self.shape = (B, N, y.shape[1])

    @contextlib.contextmanager
    def _launch(self, shape):
        """On the inputs' device: a new ``out`` of ``shape`` and the stream to launch on.

        CuPy arrays: their device is made current (array_api_compat's CuPy ``empty`` ignores
        ``device=``) and the stream is CuPy's current one. torch tensors: their device and
        ``torch.cuda.current_stream()``. NumPy arrays (tests): the default.
        """
        dtype = self.x.dtype
        if array_api_compat.is_torch_array(self.x):
            import torch

            device = self.x.device
            with torch.cuda.device(device):
                stream = self.kernels._cuda().external_stream(torch.cuda.current_stream(device).cuda_stream)
                yield torch.empty(shape, dtype=dtype, device=device), stream
            return
        if not array_api_compat.is_cupy_array(self.x):
            yield self.xp.empty(shape, dtype=dtype), 0
            return
        import cupy

        with self.x.device:
            stream = self.kernels._cuda().external_stream(cupy.cuda.get_current_stream().ptr)
            yield self.xp.empty(shape, dtype=dtype), stream

    def _cast(self, a):
        return a if a.dtype == self.x.dtype else self.xp.astype(a, self.x.dtype)

    def softmin(self, eps, h):
        with self._launch(self.shape[:2]) as (out, stream):
            self.kernels.softmin(self.x, self.y, self._cast(h), eps, self.cost.p, out, stream=stream)
        return out

    def softmin_grad(self, eps, h):
        with self._launch(self.x.shape) as (out, stream):
            self.kernels.softmin_grad(self.x, self.y, self._cast(h), eps, self.cost.p, out, stream=stream)
        return out

    def softmax_weighted_sum(self, eps, h, v):
        with self._launch(self.shape[:2] + (v.shape[2],)) as (out, stream):
            self.kernels.softmax_weighted_sum(
                self.x, self.y, self._cast(h), eps, self.cost.p, self._cast(v), out, stream=stream
            )
        return out

    def kernel_sum(self, kernel: Kernel, v):
        kind = getattr(self.kernels, f"KERNEL_{kernel.name.upper()}")
        with self._launch(self.shape[:2]) as (out, stream):
            self.kernels.kernel_sum(self.x, self.y, self._cast(v), kind, kernel.blur, out, stream=stream)
        return out

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return NumbaCudaGeometry(self.y, self.x, self.cost, xp=self.xp, kernels=self.kernels)


class NumbaCudaBlockSparseGeometry(NumbaCudaGeometry):
    """:class:`NumbaCudaGeometry` over the kept cluster pairs of ``sparsity`` (multiscale).

    The kernels take their column ranges per block of ``ROWS_PER_BLOCK`` rows: a block that
    straddles several row clusters reduces over the union of their kept clusters, a
    superset of each row's own pairs (never fewer pairs than the CPU plugins).
    """

    def __init__(self, x, y, cost, sparsity, *, xp, kernels=None):
        super().__init__(x, y, cost, xp=xp, kernels=kernels)
        self.sparsity = sparsity
        self._ranges = None

    def ranges(self):
        """``(row_ptr, col_ranges)`` per block of rows, on the inputs' device (built once)."""
        if self._ranges is None:
            per_block = rows_per_block_sparsity(self.sparsity, self.kernels.ROWS_PER_BLOCK)
            self._ranges = tuple(
                a if isinstance(self.x, np.ndarray) else self.xp.asarray(a, device=device_of(self.x))
                for a in (per_block.col_ptr, per_block.col_ranges)
            )
        return self._ranges

    def softmin(self, eps, h):
        with self._launch(self.shape[:2]) as (out, stream):
            self.kernels.softmin(
                self.x, self.y, self._cast(h), eps, self.cost.p, out, stream=stream, ranges=self.ranges()
            )
        return out

    def softmin_grad(self, eps, h):
        with self._launch(self.x.shape) as (out, stream):
            self.kernels.softmin_grad(
                self.x, self.y, self._cast(h), eps, self.cost.p, out, stream=stream, ranges=self.ranges()
            )
        return out

    def softmax_weighted_sum(self, eps, h, v):
        with self._launch(self.shape[:2] + (v.shape[2],)) as (out, stream):
            self.kernels.softmax_weighted_sum(
                self.x, self.y, self._cast(h), eps, self.cost.p, self._cast(v), out,
                stream=stream, ranges=self.ranges(),
            )
        return out

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms have no block-sparse form: use backend='online'.")

    def transpose(self):
        return NumbaCudaBlockSparseGeometry(
            self.y, self.x, self.cost, self.sparsity.transpose(), xp=self.xp, kernels=self.kernels
        )


def rows_per_block_sparsity(sparsity, rows: int):
    """The cluster pattern regrouped by blocks of ``rows`` rows: each block keeps the union
    of the kept column clusters of the row clusters it overlaps."""
    from ._base import BlockSparsity

    N = int(sparsity.row_ranges[-1, 1])
    starts = np.arange(0, N, rows)
    blocks = np.stack([starts, np.minimum(starts + rows, N)], axis=1)
    first = np.searchsorted(sparsity.row_ranges[:, 1], blocks[:, 0], side="right")
    last = np.searchsorted(sparsity.row_ranges[:, 0], blocks[:, 1], side="left")
    keep = np.zeros((len(blocks), sparsity.keep.shape[1]), dtype=bool)
    for k, (i0, i1) in enumerate(zip(first, last)):
        keep[k] = sparsity.keep[i0:i1].any(axis=0)
    return BlockSparsity(blocks, sparsity.col_clusters, keep)


class NumbaCudaPlugin:
    """Runs CuPy arrays and torch CUDA tensors (float32/float64, ``D <= 64``) through Numba CUDA
    kernels ("online" and "multiscale").

    ``host_arrays=True`` also accepts NumPy arrays and torch CPU tensors (see the module
    notes: for tests).
    """

    id = PluginId.NUMBA_CUDA

    def __init__(self, *, host_arrays: bool = False):
        self.host_arrays = host_arrays
        self._errors = {}  # device -> None (usable) or the ImportError saying why not
        self._warned = set()

    def supports(self, xp, x, method):
        error = self.unsupported_error(xp, x, method)
        if isinstance(error, ImportError):
            log_fallback_once(self._warned, str(device_of(x)), error, logger)
        return error is None

    def unsupported_error(self, xp, x, method):
        if method not in (Method.AUTO, Method.ONLINE, Method.MULTISCALE):
            return method_error(self.id, method, (Method.ONLINE, Method.MULTISCALE))
        if not self._takes(x) or dtype_name(x) not in SELF_TEST_RTOL:
            return ValueError(
                f"the 'numba_cuda' backend runs CuPy arrays and torch CUDA tensors (float32, "
                f"float64), not "
                f"{describe_arrays(x)}; pass backend='auto' (or 'online') to let ot_agnostic "
                "pick the plugin."
            )
        if not 1 <= x.shape[-1] <= MAX_DIM:
            return ValueError(
                f"the 'numba_cuda' backend runs points with 1 to {MAX_DIM} coordinates, not "
                f"{x.shape[-1]}; pass backend='auto' to let ot_agnostic pick the plugin."
            )
        device = str(device_of(x))
        if device not in self._errors:
            self._errors[device] = self._check(x, xp)
        return self._errors[device]

    def _takes(self, x) -> bool:
        """Whether ``x`` is an array this plugin runs (GPU arrays; host arrays for tests)."""
        if array_api_compat.is_cupy_array(x):
            return True
        if array_api_compat.is_torch_array(x):
            return x.device.type == "cuda" or (self.host_arrays and x.device.type == "cpu")
        return self.host_arrays and isinstance(x, np.ndarray)

    def _check(self, x, xp) -> ImportError | None:
        """``None`` when the kernels compile and pass a tiny softmin on ``x``'s device, else why not."""
        dtype = dtype_name(x)
        try:
            kernels = load_kernels()
            D = x.shape[-1]
            points = np.zeros((1, 2, D))
            points[0, 1, 0] = 1.0  # y = (0, e_1), x = 0, uniform weights, eps = 1, p = 2
            y = xp.asarray(points.astype(dtype), device=device_of(x))
            h = xp.asarray(np.full((1, 2), math.log(0.5), dtype=dtype), device=device_of(x))
            geom = self.geometry(y[:, :1, :], y, Cost(2), Method.ONLINE, xp=xp, kernels=kernels)
            value = to_float(geom.softmin(1.0, h)[0, 0])
            expected = -math.log(0.5 + 0.5 * math.exp(-0.5))
            error = abs(value - expected) / expected
            if not error <= SELF_TEST_RTOL[dtype]:
                raise RuntimeError(
                    f"a tiny softmin on {device_of(x)} ({dtype}) is off by {error:.2e} relative"
                )
        except ImportError as err:
            return err
        except Exception as err:  # no libNVVM (compilation fails), wrong numbers, ...
            return ImportError(
                f"the Numba CUDA backend failed its self-test ({type(err).__name__}: {err}). {_FIX}"
            )
        return None

    def resolve(self, method, shape):
        if method is not Method.AUTO:
            return method
        return Method.MULTISCALE if prefers_multiscale(shape) else Method.ONLINE

    def geometry(self, x, y, cost, method, *, xp, kernels=None):
        if not array_api_compat.is_torch_array(x):
            return NumbaCudaGeometry(x, y, cost, xp=xp, kernels=kernels)
        return _torch_geometry(x, y, cost, lambda xr, yr, rxp: NumbaCudaGeometry(xr, yr, cost, xp=rxp, kernels=kernels), xp=xp)

    def block_sparse_geometry(self, x, y, cost, sparsity, *, xp):
        if not array_api_compat.is_torch_array(x):
            return NumbaCudaBlockSparseGeometry(x, y, cost, sparsity, xp=xp)
        return _torch_geometry(
            x, y, cost, lambda xr, yr, rxp: NumbaCudaBlockSparseGeometry(xr, yr, cost, sparsity, xp=rxp), xp=xp)


def _torch_geometry(x, y, cost, make_raw, *, xp):
    """A differentiable geometry of torch tensors over the raw CUDA geometry
    ``make_raw(x_raw, y_raw, raw_xp)``: detached CUDA tensors, or NumPy views of CPU
    tensors (the simulator)."""
    import torch

    from ._torch_bridge import TorchGeometry
    from .numba_cpu import numpy_view

    if x.device.type == "cpu":  # host arrays under the simulator
        raw = make_raw(numpy_view(x), numpy_view(y), np)
        return TorchGeometry(x, y, cost, raw, xp=xp, to_raw=numpy_view, from_raw=torch.from_numpy)
    raw = make_raw(x.detach(), y.detach(), xp)
    return TorchGeometry(x, y, cost, raw, xp=xp, to_raw=_same, from_raw=_same)


def _same(t):
    return t
