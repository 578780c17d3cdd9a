"""The grid softmin in a Numba CUDA kernel, for CuPy arrays and torch CUDA tensors.

:class:`CudaConvolver` is the convolver of :class:`ot_agnostic.grids.GridGeometry` (name
``"numba_cuda"``, results' ``backend`` ``"numba_cuda/grid"``): one launch of
:func:`ot_agnostic.kernels.cuda_grid.log_gauss_axis` per axis. The density array is viewed
as ``(P, n_k, Q)`` (a reshape, no copy), each pass writes a new array of the input's
library, dtype and device, ``O(B n)`` memory, and runs on that device and on the library's
current stream (CuPy's, or ``torch.cuda.current_stream()``) without any host copy or
synchronisation.

torch tensors are read detached: like the torch CPU Numba convolver, the grid solve never
differentiates through the softmin (its potentials are computed on detached densities, and
the gradients with respect to the densities come from the envelope theorem in the value's
formula), so ``requires_grad`` densities keep their autograd.

Selection (:func:`ot_agnostic.grids._convolver`): ``backend="auto"`` gives CuPy arrays and
torch CUDA tensors (float32/float64) to :data:`BACKEND` when ``numba.cuda`` is usable on
their device, the pure Array API convolver otherwise; ``backend="numba_cuda"`` insists. As
the point-cloud plugin (:mod:`ot_agnostic.backends.numba_cuda`): ``numba.cuda`` is
imported on first use only, a one-time self-test per device (a tiny 1-D convolution: it
compiles the kernel, so it also catches a missing libNVVM) guards against a broken
installation; if it fails, ``backend="auto"`` falls back with one logged warning on the
``"ot_agnostic"`` logger, and ``backend="numba_cuda"`` raises the ``ImportError`` with the fix.

``CudaGridBackend(host_arrays=True)`` also takes NumPy arrays and torch CPU tensors
(Numba copies them to the GPU and back around every launch): under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) they run on the CPU, which is how the tests check the
convolver end to end without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math

import array_api_compat
import numpy as np

from .._array_api import device_of, to_float
from ._base import describe_arrays, dtype_name, log_fallback_once

logger = logging.getLogger("ot_agnostic")

#: The self-test's tolerance on the relative error of a tiny convolution, by dtype name.
SELF_TEST_RTOL = {"float32": 1e-5, "float64": 1e-12}

_FIX = (
    "It needs an NVIDIA driver and the CUDA compiler library libNVVM: install them with "
    "`pip install \"numba-cuda[cu12]\"` (or `conda install -c conda-forge cuda-nvcc`), or pass "
    "backend='array_api' to silence this message."
)


def is_gpu_array(x) -> bool:
    """Whether ``x`` is a CuPy array or a torch CUDA tensor (without importing either)."""
    if array_api_compat.is_cupy_array(x):
        return True
    return array_api_compat.is_torch_array(x) and x.device.type == "cuda"


def load_kernels():
    """The CUDA grid kernel module; raises ``ImportError`` with a fix when ``numba.cuda`` is unusable."""
    try:
        kernels = importlib.import_module("ot_agnostic.kernels.cuda_grid")
        if not kernels._cuda().is_available():
            raise RuntimeError("numba.cuda.is_available() is False: no usable GPU or driver")
        return kernels
    except Exception as err:  # numba missing, no driver, ...
        raise ImportError(
            f"the Numba CUDA grid kernel is unavailable ({type(err).__name__}: {err}). {_FIX}"
        ) from err


class CudaConvolver:
    """The 1-D log-convolutions of a grid in a Numba CUDA kernel (see the module notes), for
    CuPy arrays and torch CUDA tensors; NumPy arrays and torch CPU tensors under the simulator."""

    name = "numba_cuda"

    def __init__(self, kernels=None):
        self.kernels = kernels or load_kernels()

    @contextlib.contextmanager
    def _launch(self, h):
        """``(raw, empty, stream, wrap)`` on ``h``'s device: ``raw`` the array the kernel reads,
        ``empty(shape)`` a new output, ``stream`` to launch on, ``wrap`` the result back to
        ``h``'s library."""
        if array_api_compat.is_torch_array(h):
            import torch

            raw = h.detach()
            if raw.device.type == "cpu":  # host arrays under the simulator
                from .numba_cpu import numpy_view

                view = numpy_view(raw)
                yield view, lambda shape: np.empty(shape, dtype=view.dtype), 0, torch.from_numpy
                return
            device = raw.device
            with torch.cuda.device(device):
                stream = self.kernels._cuda().external_stream(torch.cuda.current_stream(device).cuda_stream)
                yield raw, lambda shape: torch.empty(shape, dtype=raw.dtype, device=device), stream, _same
            return
        if not array_api_compat.is_cupy_array(h):  # NumPy (tests)
            raw = np.asarray(h)
            yield raw, lambda shape: np.empty(shape, dtype=raw.dtype), 0, _same
            return
        import cupy

        with h.device:  # CuPy allocates on the current device
            stream = self.kernels._cuda().external_stream(cupy.cuda.get_current_stream().ptr)
            yield h, lambda shape: cupy.empty(shape, dtype=h.dtype), stream, _same

    def log_convolve(self, h, x_grid, y_grid, eps):
        """``log sum_j exp(h[b, j] - C(x_i, y_j) / eps)``: a ``(B, *x_grid.shape)`` array."""
        B = int(h.shape[0])
        if tuple(h.shape[1:]) != tuple(y_grid.shape):
            raise ValueError(f"h has shape {tuple(h.shape)}, expected (B, *{tuple(y_grid.shape)})")
        with self._launch(h) as (raw, empty, stream, wrap):
            current = raw
            for k in range(x_grid.ndim):
                m, n = x_grid.shape[k], y_grid.shape[k]
                P = B * math.prod(x_grid.shape[:k])  # axes before k are already on x_grid
                Q = math.prod(y_grid.shape[k + 1:])
                out = empty((P, m, Q))
                self.kernels.log_gauss_axis(
                    current.reshape((P, n, Q)), out, (x_grid.origin[k], x_grid.spacing[k], m),
                    (y_grid.origin[k], y_grid.spacing[k], n), eps, stream=stream,
                )
                current = out
            return wrap(current.reshape((B, *x_grid.shape)))


def _same(a):
    return a


class CudaGridBackend:
    """Which arrays run :class:`CudaConvolver`, with the one-time self-test per device.

    ``host_arrays=True`` also accepts NumPy arrays and torch CPU tensors (see the module
    notes: for tests).
    """

    name = "numba_cuda"

    def __init__(self, *, host_arrays: bool = False):
        self.host_arrays = host_arrays
        self._errors = {}  # device -> None (usable) or the ImportError saying why not
        self._warned = set()

    def takes(self, x) -> bool:
        """Whether ``x`` is an array this backend runs (GPU arrays; host arrays for tests)."""
        if is_gpu_array(x):
            return True
        if not self.host_arrays:
            return False
        return isinstance(x, np.ndarray) or (array_api_compat.is_torch_array(x) and x.device.type == "cpu")

    def unsupported_error(self, x, xp):
        """``None`` when ``x`` runs here; a ``ValueError`` (wrong arrays) or ``ImportError``
        (``numba.cuda`` unusable on ``x``'s device) otherwise."""
        if not self.takes(x) or dtype_name(x) not in SELF_TEST_RTOL:
            return ValueError(
                f"the 'numba_cuda' grid backend runs CuPy arrays and torch CUDA tensors (float32/"
                f"float64), not {describe_arrays(x)}; pass backend='auto'."
            )
        device = str(device_of(x))
        if device not in self._errors:
            self._errors[device] = self._check(x, xp)
        return self._errors[device]

    def _check(self, x, xp) -> ImportError | None:
        """``None`` when the kernel compiles and passes a tiny convolution on ``x``'s device."""
        from ..grids import Grid

        dtype = dtype_name(x)
        try:
            convolver = CudaConvolver(load_kernels())
            # y = (0, 1), x = 0, uniform weights, eps = 1: log(0.5 + 0.5 exp(-1/2))
            h = xp.asarray(np.full((1, 2), math.log(0.5), dtype=dtype), device=device_of(x))
            out = convolver.log_convolve(h, Grid((1,), (1.0,), (0.0,)), Grid((2,), (1.0,), (0.0,)), 1.0)
            value = to_float(out[0, 0])
            expected = math.log(0.5 + 0.5 * math.exp(-0.5))
            error = abs(value - expected) / abs(expected)
            if not error <= SELF_TEST_RTOL[dtype]:
                raise RuntimeError(f"a tiny convolution on {device_of(x)} ({dtype}) is off by {error:.2e} relative")
        except ImportError as err:
            return err
        except Exception as err:  # no libNVVM (compilation fails), wrong numbers, ...
            return ImportError(f"the Numba CUDA grid kernel failed its self-test ({type(err).__name__}: {err}). {_FIX}")
        return None

    def convolver(self, x, xp, *, required: bool):
        """A :class:`CudaConvolver` for ``x``; ``None`` (``backend="auto"`` falls back, logged
        once per device when ``numba.cuda`` is unusable) or the error when ``required``."""
        error = self.unsupported_error(x, xp)
        if error is None:
            return CudaConvolver()
        if required:
            raise error
        if isinstance(error, ImportError):
            log_fallback_once(self._warned, str(device_of(x)), error, logger)
        return None


#: The instance :func:`ot_agnostic.grids._convolver` asks (tests swap in ``host_arrays=True``).
BACKEND = CudaGridBackend()
