"""What the engine needs from a backend: ids, the algorithm enum, and the geometry contract."""

from __future__ import annotations

import logging

from enum import Enum
from typing import Any, Protocol

import numpy as np


class Method(str, Enum):
    """The algorithm a user selects with ``backend=``."""

    AUTO = "auto"
    TENSORIZED = "tensorized"
    ONLINE = "online"
    MULTISCALE = "multiscale"

    @classmethod
    def parse(cls, value) -> "Method":
        """Map a user string (or a ``Method``) onto the enum, with a clear error otherwise."""
        try:
            return cls(value)
        except ValueError:
            options = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown backend {value!r}: choose one of {options}.") from None


#: Multiscale clusters points on a grid: up to this dimension.
MULTISCALE_MAX_DIM = 3
#: "auto" switches to multiscale (D <= 3) once ``B * N * M`` reaches this many pairs.
MULTISCALE_MIN_PAIRS = 2**32


def prefers_multiscale(shape) -> bool:
    """Whether "auto" should run multiscale on a ``(B, N, M, D)`` problem."""
    B, N, M, D = shape
    return D <= MULTISCALE_MAX_DIM and B * N * M >= MULTISCALE_MIN_PAIRS


class PluginId(str, Enum):
    """The compute plugins; one is picked per call from the input array type."""

    ARRAY_API = "array_api"
    NUMBA = "numba"
    NUMBA_CUDA = "numba_cuda"
    KEOPS = "keops"


class Geometry(Protocol):
    """Two batched point clouds ``x (B, N, D)``, ``y (B, M, D)`` and a cost, ready for reductions."""

    shape: tuple[int, int, int]  # (B, N, M)

    def softmin(self, eps: float, h) -> Any:
        """``-eps * log sum_j exp(h_j - C(x_i, y_j) / eps)``, a ``(B, N)`` array."""

    def kernel_sum(self, kernel, v) -> Any:
        """``sum_j k(x_i, y_j) v_j``, a ``(B, N)`` array."""

    def softmin_grad(self, eps: float, h) -> Any:
        """``sum_j w_ij grad_x C(x_i, y_j)`` with ``w_ij = softmax_j(h_j - C_ij / eps)``: ``(B, N, D)``."""

    def softmax_weighted_sum(self, eps: float, h, v) -> Any:
        """``sum_j w_ij v_j`` for ``v (B, M, K)``: a ``(B, N, K)`` array (e.g. transport maps)."""

    def cost_rows(self, start: int, stop: int) -> Any:
        """The ``(B, stop - start, M)`` block ``C(x_i, y_j)`` for ``start <= i < stop``."""

    def transpose(self) -> "Geometry":
        """The same geometry with the roles of ``x`` and ``y`` swapped."""


class Plugin(Protocol):
    """A compute backend: builds geometries for the arrays it supports."""

    id: PluginId

    def supports(self, xp, x, method: Method) -> bool:
        """Whether this plugin can run ``method`` on arrays like ``x`` (it may log a fallback)."""

    def unsupported_error(self, xp, x, method: Method) -> Exception | None:
        """``None`` if this plugin can run ``method`` on arrays like ``x``, else the error to raise
        when a user asked for this plugin by name (``ImportError`` for a missing dependency)."""

    def resolve(self, method: Method, shape: tuple[int, int, int, int]) -> Method:
        """The concrete method (``TENSORIZED``/``ONLINE``) used for ``AUTO`` at this ``(B, N, M, D)``."""

    def geometry(self, x, y, cost, method: Method, *, xp) -> Geometry:
        """A :class:`Geometry` for ``x``, ``y`` under ``cost`` with a concrete ``method``."""


def dtype_name(x) -> str:
    """``"float32"`` for any library's float32 array."""
    return str(x.dtype).rsplit(".", 1)[-1]


def describe_arrays(x) -> str:
    """``"torch float32 arrays on cpu"``: the words error messages use for a user's arrays."""
    library = type(x).__module__.split(".")[0]
    return f"{library} {dtype_name(x)} arrays on {getattr(x, 'device', 'cpu')}"


def method_error(plugin_id: PluginId, method: Method, methods: tuple[Method, ...]) -> ValueError:
    """The error for a plugin asked for a method it does not run."""
    names = " or ".join(repr(m.value) for m in methods)
    return ValueError(
        f"the {plugin_id.value!r} backend runs {names}, not {method.value!r}; pass "
        f"backend={method.value!r} to let ot_agnostic pick the plugin."
    )


def log_fallback_once(warned: set, key, error: Exception, logger) -> None:
    """Log (once per ``key``) that a plugin is unusable and the next one takes over (the pure
    Array API path, or the Numba CUDA kernels for torch CUDA tensors when KeOps fails).

    An optional dependency that is simply not installed is the user's choice: INFO. One
    that is installed but broken (fails to import or its self-test): WARNING.
    """
    if key not in warned:
        warned.add(key)
        level = logging.INFO if isinstance(error.__cause__, ModuleNotFoundError) else logging.WARNING
        logger.log(level, "%s Falling back to the next backend (the result's .backend says which).", error)


class BlockSparsity:
    """Which pairs a block-sparse geometry reduces over: clusters and kept cluster pairs.

    Rows come in clusters ``row_clusters[I] = [start, stop)`` that partition ``[0, N)`` in
    order, columns likewise (``col_clusters``), and ``keep[I, J]`` says whether the rows
    of cluster ``I`` interact with the columns of cluster ``J``. Kernels read the CSR form:
    the rows of cluster ``I`` reduce over the column ranges
    ``col_ranges[col_ptr[I]:col_ptr[I + 1]]`` (sorted, disjoint ``[start, stop)``; kept
    clusters that are neighbours in memory merge into one range). Host NumPy int64 arrays.
    """

    def __init__(self, row_clusters, col_clusters, keep):
        self.row_ranges = np.asarray(row_clusters, dtype=np.int64)
        self.col_clusters = np.asarray(col_clusters, dtype=np.int64)
        self.keep = np.asarray(keep, dtype=bool)
        if self.keep.shape != (len(self.row_ranges), len(self.col_clusters)):
            raise ValueError(
                f"keep must be ({len(self.row_ranges)}, {len(self.col_clusters)}), not {self.keep.shape}"
            )
        self.n_cols = int(self.col_clusters[-1, 1]) if len(self.col_clusters) else 0
        self.col_ptr, self.col_ranges = self._csr()

    def _csr(self):
        ptr, runs = [0], []
        for row in self.keep:
            kept = np.flatnonzero(row)
            if kept.size:
                # a new run starts where a kept cluster does not follow the previous one
                starts = np.flatnonzero(np.concatenate([[True], kept[1:] != kept[:-1] + 1]))
                stops = np.append(starts[1:], kept.size) - 1
                runs.append(np.stack(
                    [self.col_clusters[kept[starts], 0], self.col_clusters[kept[stops], 1]], axis=1
                ))
                ptr.append(ptr[-1] + starts.size)
            else:
                ptr.append(ptr[-1])
        ranges = np.concatenate(runs) if runs else np.zeros((0, 2), dtype=np.int64)
        return np.asarray(ptr, dtype=np.int64), ranges.astype(np.int64)

    def columns_of(self, cluster: int) -> np.ndarray:
        """The ``(k, 2)`` column ranges of row cluster ``cluster``."""
        return self.col_ranges[self.col_ptr[cluster]:self.col_ptr[cluster + 1]]

    def transpose(self) -> "BlockSparsity":
        """The same pairs seen from the columns."""
        return BlockSparsity(self.col_clusters, self.row_ranges, self.keep.T)

    @property
    def kept_pairs(self) -> int:
        """How many ``(i, j)`` pairs are reduced over."""
        widths = np.concatenate([[0], np.cumsum(self.col_ranges[:, 1] - self.col_ranges[:, 0])])
        per_cluster = widths[self.col_ptr[1:]] - widths[self.col_ptr[:-1]]
        return int(np.sum((self.row_ranges[:, 1] - self.row_ranges[:, 0]) * per_cluster))
