"""The pure Array API backend: the fallback for every array library and the reference.

Two geometries share one implementation of the reductions, written block by block:

* :class:`DenseGeometry` ("tensorized") computes the ``(B, N, M)`` cost matrix once and
  reuses it at every Sinkhorn iteration: fastest for small problems;
* :class:`OnlineGeometry` ("online") recomputes the cost on blocks of rows, so that at most
  ``block_entries`` cost entries exist at once: memory is ``O(N + M)`` plus one block.
"""

from __future__ import annotations

from .._array_api import logsumexp
from ._base import Method, PluginId

#: "auto" uses the dense geometry while ``B * N * M`` is at most this many entries.
DENSE_MAX_ENTRIES = 2**24
#: The online geometry computes about this many cost entries per block.
ONLINE_BLOCK_ENTRIES = 2**20


class _BlockReductions:
    """Reductions over row blocks of the cost matrix; subclasses provide ``_blocks``."""

    def softmin(self, eps, h):
        xp = self.xp
        parts = [
            -eps * logsumexp(h[:, None, :] - cost / eps, axis=2, xp=xp) for cost in self._blocks()
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def kernel_sum(self, kernel, v):
        xp = self.xp
        parts = [
            xp.matmul(kernel.apply(cost, xp=xp), v[:, :, None])[:, :, 0] for cost in self._blocks()
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


class DenseGeometry(_BlockReductions):
    """Stores the full ``(B, N, M)`` cost matrix."""

    def __init__(self, cost_matrix, *, xp):
        self.xp = xp
        self.matrix = cost_matrix
        self.shape = tuple(cost_matrix.shape)

    @classmethod
    def from_points(cls, x, y, cost, *, xp):
        return cls(cost.matrix(x, y, xp=xp), xp=xp)

    def _blocks(self):
        yield self.matrix

    def cost_rows(self, start, stop):
        return self.matrix[:, start:stop, :]

    def transpose(self):
        return DenseGeometry(self.xp.matrix_transpose(self.matrix), xp=self.xp)


class OnlineGeometry(_BlockReductions):
    """Recomputes the cost on blocks of rows; never holds the ``N x M`` matrix."""

    def __init__(self, x, y, cost, *, xp, block_entries=ONLINE_BLOCK_ENTRIES):
        self.xp, self.x, self.y, self.cost = xp, x, y, cost
        B, N, _ = x.shape
        M = y.shape[1]
        self.shape = (B, N, M)
        self.block_rows = max(1, min(N, block_entries // max(1, B * M)))
        self.block_entries = block_entries

    def _blocks(self):
        N = self.shape[1]
        for start in range(0, N, self.block_rows):
            yield self.cost_rows(start, min(N, start + self.block_rows))

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return OnlineGeometry(self.y, self.x, self.cost, xp=self.xp, block_entries=self.block_entries)


class ArrayAPIPlugin:
    """Runs on any Array API namespace (NumPy, torch, CuPy, array-api-strict, ...)."""

    id = PluginId.ARRAY_API

    def supports(self, xp, x, method):
        return method in (Method.AUTO, Method.TENSORIZED, Method.ONLINE)

    def resolve(self, method, shape):
        if method is not Method.AUTO:
            return method
        B, N, M, _ = shape
        return Method.TENSORIZED if B * max(N, M) ** 2 <= DENSE_MAX_ENTRIES else Method.ONLINE

    def geometry(self, x, y, cost, method, *, xp):
        if method is Method.TENSORIZED:
            return DenseGeometry.from_points(x, y, cost, xp=xp)
        return OnlineGeometry(x, y, cost, xp=xp)
