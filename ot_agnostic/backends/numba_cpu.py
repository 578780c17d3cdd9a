"""The CPU plugin: Numba CPU kernels for NumPy arrays and torch CPU tensors, O(N + M) memory.

Picked for NumPy arrays and torch float32/float64 CPU tensors by ``backend="auto"``,
``"online"`` and ``"multiscale"`` (and by ``backend="numba"``). The kernels live in
:mod:`ot_agnostic.kernels.numba_cpu` and are imported (and compiled, or loaded from the
on-disk cache) on first use only.

torch CPU tensors are read in place through NumPy views (``Tensor.numpy()``: no copy of
``x``, ``y``, ``a``, ``b``; non-contiguous views are made contiguous by the kernels, as
for NumPy), and the outputs become tensors without a copy (``torch.from_numpy``).
Autograd goes through the ``torch.autograd.Function`` of
:mod:`ot_agnostic.backends._torch_bridge`, whose backward passes run in the same kernels.

Threads: Numba's pool, i.e. ``NUMBA_NUM_THREADS`` or ``numba.set_num_threads``; on torch
tensors, at most ``torch.get_num_threads()`` of them, so that ``torch.set_num_threads(k)``
limits a torch program to ``k`` cores whichever library computes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import array_api_compat
import numpy as np

from ..costs import Kernel
from ._base import Method, PluginId, describe_arrays, log_fallback_once, method_error, prefers_multiscale

logger = logging.getLogger("ot_agnostic")


def load_kernels():
    """The compiled kernel module; raises ``ImportError`` with a fix when Numba is unusable."""
    try:
        return importlib.import_module("ot_agnostic.kernels.numba_cpu")
    except Exception as err:  # numba missing, or broken against this numpy/llvmlite
        raise ImportError(
            f"the Numba CPU backend is unavailable ({type(err).__name__}: {err}). "
            "Reinstall it with `pip install --upgrade numba`, or pass backend='tensorized'."
        ) from err


@contextlib.contextmanager
def limited_threads(max_threads):
    """At most ``max_threads`` Numba threads (None: Numba's own count) inside the block."""
    if max_threads is None:
        yield
        return
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(before, max_threads)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


class NumbaGeometry:
    """Point clouds ``x (B, N, D)``, ``y (B, M, D)`` (NumPy) whose reductions run in Numba kernels."""

    def __init__(self, x, y, cost, *, xp, kernels=None, max_threads=None):
        self.xp, self.cost = xp, cost
        self.x, self.y = x, y
        self.kernels = kernels or load_kernels()
        self.max_threads = max_threads
        B, N, _ = self.x.shape
        self.shape = (B, N, self.y.shape[1])

    def _threads(self):
        return limited_threads(self.max_threads)

    def _h(self, h):
        return np.ascontiguousarray(h, dtype=self.x.dtype)

    def _kernel_kind(self, kernel: Kernel) -> int:
        return getattr(self.kernels, f"KERNEL_{kernel.name.upper()}")

    def softmin(self, eps, h):
        out = np.empty(self.shape[:2], dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmin(self.x, self.y, self._h(h), float(eps), self.cost.p, out)
        return out

    def softmin_grad(self, eps, h):
        out = np.empty(self.x.shape, dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmin_grad(self.x, self.y, self._h(h), float(eps), self.cost.p, out)
        return out

    def softmax_weighted_sum(self, eps, h, v):
        v = np.ascontiguousarray(v, dtype=self.x.dtype)
        out = np.empty(self.shape[:2] + (v.shape[2],), dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmax_weighted_sum(self.x, self.y, self._h(h), float(eps), self.cost.p, v, out)
        return out

    def kernel_sum(self, kernel: Kernel, v):
        out = np.empty(self.shape[:2], dtype=self.x.dtype)
        with self._threads():
            self.kernels.kernel_sum(self.x, self.y, self._h(v), self._kernel_kind(kernel), float(kernel.blur), out)
        return out

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return NumbaGeometry(self.y, self.x, self.cost, xp=self.xp, kernels=self.kernels, max_threads=self.max_threads)


class NumbaBlockSparseGeometry(NumbaGeometry):
    """Like :class:`NumbaGeometry`, over the kept cluster pairs of ``sparsity`` only (multiscale)."""

    def __init__(self, x, y, cost, sparsity, *, xp, kernels=None, max_threads=None):
        super().__init__(x, y, cost, xp=xp, kernels=kernels, max_threads=max_threads)
        self.sparsity = sparsity

    def _ranges(self):
        s = self.sparsity
        return s.row_ranges, s.col_ptr, s.col_ranges

    def softmin(self, eps, h):
        out = np.empty(self.shape[:2], dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmin_ranges(self.x, self.y, self._h(h), float(eps), self.cost.p, *self._ranges(), out)
        return out

    def softmin_grad(self, eps, h):
        out = np.empty(self.x.shape, dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmin_grad_ranges(self.x, self.y, self._h(h), float(eps), self.cost.p, *self._ranges(), out)
        return out

    def softmax_weighted_sum(self, eps, h, v):
        v = np.ascontiguousarray(v, dtype=self.x.dtype)
        out = np.empty(self.shape[:2] + (v.shape[2],), dtype=self.x.dtype)
        with self._threads():
            self.kernels.softmax_weighted_sum_ranges(
                self.x, self.y, self._h(h), float(eps), self.cost.p, v, *self._ranges(), out
            )
        return out

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms have no block-sparse form: use backend='online'.")

    def transpose(self):
        return NumbaBlockSparseGeometry(
            self.y, self.x, self.cost, self.sparsity.transpose(), xp=self.xp, kernels=self.kernels,
            max_threads=self.max_threads,
        )


class NumbaPlugin:
    """Runs NumPy arrays and torch CPU tensors (float32/float64) through the Numba CPU kernels
    ("online" and "multiscale")."""

    id = PluginId.NUMBA

    def __init__(self):
        self._load_error = None  # ImportError, once a load failed
        self._loaded = False
        self._warned = set()

    def supports(self, xp, x, method):
        error = self.unsupported_error(xp, x, method)
        if isinstance(error, ImportError):
            log_fallback_once(self._warned, "cpu", error, logger)
        return error is None

    def unsupported_error(self, xp, x, method):
        if method not in (Method.AUTO, Method.ONLINE, Method.MULTISCALE):
            return method_error(self.id, method, (Method.ONLINE, Method.MULTISCALE))
        if not (isinstance(x, np.ndarray) or is_torch_cpu(x)):
            return ValueError(
                f"the 'numba' backend runs NumPy arrays and torch CPU tensors, not "
                f"{describe_arrays(x)}; pass backend='auto' (or 'online') to let ot_agnostic "
                "pick the plugin."
            )
        if not self._loaded and self._load_error is None:
            try:
                load_kernels()
                self._loaded = True
            except ImportError as err:
                self._load_error = err
        return self._load_error

    def resolve(self, method, shape):
        if method is not Method.AUTO:
            return method
        return Method.MULTISCALE if prefers_multiscale(shape) else Method.ONLINE

    def geometry(self, x, y, cost, method, *, xp):
        if isinstance(x, np.ndarray):
            return NumbaGeometry(x, y, cost, xp=xp)
        return torch_geometry(x, y, cost, lambda xv, yv, **kw: NumbaGeometry(xv, yv, cost, xp=np, **kw), xp=xp)

    def block_sparse_geometry(self, x, y, cost, sparsity, *, xp):
        if isinstance(x, np.ndarray):
            return NumbaBlockSparseGeometry(x, y, cost, sparsity, xp=xp)
        return torch_geometry(
            x, y, cost, lambda xv, yv, **kw: NumbaBlockSparseGeometry(xv, yv, cost, sparsity, xp=np, **kw), xp=xp)


def is_torch_cpu(x) -> bool:
    """Whether ``x`` is a torch tensor on the CPU (without importing torch)."""
    return array_api_compat.is_torch_array(x) and x.device.type == "cpu"


def numpy_view(t):
    """A NumPy array sharing the memory of the CPU tensor ``t`` (detached)."""
    return t.detach().resolve_conj().resolve_neg().numpy()


def torch_geometry(x, y, cost, make_raw, *, xp):
    """A differentiable geometry of CPU tensors over the raw Numba geometry
    ``make_raw(x_view, y_view, max_threads=...)`` of their NumPy views."""
    import torch

    from ._torch_bridge import TorchGeometry

    raw = make_raw(numpy_view(x), numpy_view(y), max_threads=torch.get_num_threads())
    return TorchGeometry(x, y, cost, raw, xp=xp, to_raw=numpy_view, from_raw=torch.from_numpy)


def warmup(dtypes=("float32", "float64"), ps=(1, 2)) -> None:
    """Compile (or load from the disk cache) every Numba CPU kernel for ``dtypes`` and ``ps``.

    Call it once at start-up to move the first-call latency out of your timed code.

    Examples
    --------
    >>> warmup(dtypes=("float64",), ps=(2,))  # doctest: +SKIP
    """
    from ..costs import Cost

    for dtype in dtypes:
        x = np.zeros((1, 2, 3), dtype=dtype)
        h = np.zeros((1, 2), dtype=dtype)
        for p in ps:
            geom = NumbaGeometry(x, x, Cost(p), xp=np)
            geom.softmin(1.0, h)
            geom.softmin_grad(1.0, h)
            geom.softmax_weighted_sum(1.0, h, x)
        for name in ("energy", "gaussian", "laplacian"):
            geom.kernel_sum(Kernel(name, 1.0), h)
