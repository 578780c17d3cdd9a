"""The pure Array API backend: the fallback for every array library and the reference.

Two geometries share one implementation of the reductions, written block by block:

* :class:`DenseGeometry` ("tensorized") computes the ``(B, N, M)`` cost matrix once and
  reuses it at every Sinkhorn iteration: fastest for small problems;
* :class:`OnlineGeometry` ("online") recomputes the cost on blocks of rows, so that at most
  ``block_entries`` cost entries exist at once: memory is ``O(N + M)`` plus one block.
"""

from __future__ import annotations

from .._array_api import logsumexp
from ._base import Method, PluginId, method_error, prefers_multiscale

#: "auto" uses the dense geometry while ``B * max(N, M)**2`` (the largest of the four cost
#: matrices of a debiased problem) is at most this many entries.
DENSE_MAX_ENTRIES = 2**24
#: The online geometry computes about this many cost entries per block.
ONLINE_BLOCK_ENTRIES = 2**20


class _BlockReductions:
    """Reductions over row blocks of the cost matrix.

    Subclasses provide ``xp``, ``x (B, N, D)``, ``y (B, M, D)``, ``cost`` and ``_blocks()``,
    which yields ``(start, stop, C[:, start:stop, :])``.
    """

    def _concat(self, parts):
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)

    def softmin(self, eps, h):
        xp = self.xp
        return self._concat(
            [-eps * logsumexp(h[:, None, :] - c / eps, axis=2, xp=xp) for _, _, c in self._blocks()]
        )

    def kernel_sum(self, kernel, v):
        xp = self.xp
        return self._concat(
            [xp.matmul(kernel.apply(c, xp=xp), v[:, :, None])[:, :, 0] for _, _, c in self._blocks()]
        )

    def softmax_weighted_sum(self, eps, h, v):
        """``sum_j w_ij v_j`` with ``w_ij = softmax_j(h_j - C_ij / eps)``; ``v`` is ``(B, M, K)``."""
        return self._concat([self.xp.matmul(self._softmax(eps, h, c), v) for _, _, c in self._blocks()])

    def softmin_grad(self, eps, h):
        """``sum_j w_ij grad_x C(x_i, y_j)``, a ``(B, N, D)`` array (the gradient of ``softmin``)."""
        xp = self.xp
        if self.cost.custom:
            rows = getattr(self, "block_rows", self.shape[1])
            return self._concat([
                _custom_cost_grad(self.cost, self.x[:, i:i + rows, :], self.y, h, eps, xp=xp)
                for i in range(0, self.shape[1], rows)
            ])
        parts = []
        for start, stop, c in self._blocks():
            w = self._softmax(eps, h, c)
            if self.cost.p == 1:  # grad |x - y| = (x - y) / |x - y|, and 0 at x = y
                positive = c > 0
                w = xp.where(positive, w / xp.where(positive, c, xp.ones_like(c)), xp.zeros_like(c))
            row_mass = xp.sum(w, axis=2)[:, :, None]
            parts.append(self.x[:, start:stop, :] * row_mass - xp.matmul(w, self.y))
        return self._concat(parts)

    def _softmax(self, eps, h, c):
        return _softmax(self.xp, eps, h, c)


class DenseGeometry(_BlockReductions):
    """Stores the full ``(B, N, M)`` cost matrix."""

    def __init__(self, x, y, cost, *, xp, matrix=None):
        self.xp, self.x, self.y, self.cost = xp, x, y, cost
        self.matrix = cost.matrix(x, y, xp=xp) if matrix is None else matrix
        self.shape = tuple(self.matrix.shape)

    def _blocks(self):
        yield 0, self.shape[1], self.matrix

    def cost_rows(self, start, stop):
        return self.matrix[:, start:stop, :]

    def transpose(self):
        return DenseGeometry(
            self.y, self.x, self.cost, xp=self.xp, matrix=self.xp.matrix_transpose(self.matrix)
        )


class OnlineGeometry(_BlockReductions):
    """Recomputes the cost on blocks of rows; never holds the ``N x M`` matrix."""

    def __init__(self, x, y, cost, *, xp, block_entries=None):
        self.xp, self.x, self.y, self.cost = xp, x, y, cost
        block_entries = ONLINE_BLOCK_ENTRIES if block_entries is None else block_entries
        B, N, _ = x.shape
        M = y.shape[1]
        self.shape = (B, N, M)
        self.block_rows = max(1, min(N, block_entries // max(1, B * M)))
        self.block_entries = block_entries

    def _blocks(self):
        N = self.shape[1]
        for start in range(0, N, self.block_rows):
            stop = min(N, start + self.block_rows)
            yield start, stop, self.cost_rows(start, stop)

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return OnlineGeometry(self.y, self.x, self.cost, xp=self.xp, block_entries=self.block_entries)


class BlockSparseGeometry:
    """Reduces row cluster ``I`` over its kept column ranges only (multiscale Sinkhorn).

    ``sparsity`` is a :class:`~ot_agnostic.backends._base.BlockSparsity`. One Python step
    per row cluster, each on a dense ``(B, rows, kept columns)`` block: the reference
    implementation, and the fallback for array libraries without a compiled one. Rows
    with nothing kept give ``+inf`` (softmin) and zeros (the weighted sums).
    """

    def __init__(self, x, y, cost, sparsity, *, xp):
        self.xp, self.x, self.y, self.cost, self.sparsity = xp, x, y, cost, sparsity
        self.shape = (x.shape[0], x.shape[1], y.shape[1])

    def _gather(self, t, ranges):
        parts = [t[:, int(c0):int(c1), ...] for c0, c1 in ranges]
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)

    def _clusters(self):
        """Yield ``(start, stop, column ranges, C block)`` for each row cluster with kept columns."""
        for cluster, (start, stop) in enumerate(self.sparsity.row_ranges):
            ranges = self.sparsity.columns_of(cluster)
            start, stop = int(start), int(stop)
            if len(ranges):
                c = self.cost.matrix(self.x[:, start:stop, :], self._gather(self.y, ranges), xp=self.xp)
                yield start, stop, ranges, c
            else:
                yield start, stop, ranges, None

    def softmin(self, eps, h):
        xp = self.xp
        parts = []
        for start, stop, ranges, c in self._clusters():
            if c is None:
                parts.append(xp.full((self.shape[0], stop - start), float("inf"), dtype=h.dtype, device=_dev(h)))
            else:
                hk = self._gather(h, ranges)
                parts.append(-eps * logsumexp(hk[:, None, :] - c / eps, axis=2, xp=xp))
        return xp.concat(parts, axis=1)

    def softmax_weighted_sum(self, eps, h, v):
        xp = self.xp
        parts = []
        for start, stop, ranges, c in self._clusters():
            if c is None:
                parts.append(xp.zeros((self.shape[0], stop - start, v.shape[2]), dtype=v.dtype, device=_dev(v)))
            else:
                parts.append(xp.matmul(_softmax(xp, eps, self._gather(h, ranges), c), self._gather(v, ranges)))
        return xp.concat(parts, axis=1)

    def softmin_grad(self, eps, h):
        xp = self.xp
        parts = []
        for start, stop, ranges, c in self._clusters():
            if c is None:
                parts.append(xp.zeros((self.shape[0], stop - start, self.x.shape[2]), dtype=h.dtype, device=_dev(h)))
                continue
            if self.cost.custom:
                parts.append(_custom_cost_grad(
                    self.cost, self.x[:, start:stop, :], self._gather(self.y, ranges),
                    self._gather(h, ranges), eps, xp=xp,
                ))
                continue
            w = _softmax(xp, eps, self._gather(h, ranges), c)
            if self.cost.p == 1:
                positive = c > 0
                w = xp.where(positive, w / xp.where(positive, c, xp.ones_like(c)), xp.zeros_like(c))
            row_mass = xp.sum(w, axis=2)[:, :, None]
            parts.append(self.x[:, start:stop, :] * row_mass - xp.matmul(w, self._gather(self.y, ranges)))
        return xp.concat(parts, axis=1)

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms have no block-sparse form: use backend='online'.")

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return BlockSparseGeometry(self.y, self.x, self.cost, self.sparsity.transpose(), xp=self.xp)


def _custom_cost_grad(cost, x, y, h, eps, *, xp):
    """``sum_j w_ij grad_x C(x_i, y_j)`` for a user's cost function: torch autograd on one block
    (``softmin_i`` depends on ``x_i`` only, so the gradient of their sum gives every row)."""
    import array_api_compat

    if not array_api_compat.is_torch_array(x):
        raise NotImplementedError(
            "gradients with respect to the points need the derivative of the cost: for a custom "
            "cost function they come from autograd, so pass torch tensors (and call .backward()), "
            "or use the default costs (cost=None), whose gradients are explicit on every library."
        )
    import torch

    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        c = cost.matrix(x, y.detach(), xp=xp)
        softmin = -eps * logsumexp(h.detach()[:, None, :] - c / eps, axis=2, xp=xp)
        (grad,) = torch.autograd.grad(softmin.sum(), x)
    return grad


def _softmax(xp, eps, h, c):
    logits = h[:, None, :] - c / eps
    return xp.exp(logits - logsumexp(logits, axis=2, xp=xp)[:, :, None])


def _dev(x):
    import array_api_compat

    return array_api_compat.device(x)


class ArrayAPIPlugin:
    """Runs on any Array API namespace (NumPy, torch, CuPy, array-api-strict, ...)."""

    id = PluginId.ARRAY_API

    def supports(self, xp, x, method):
        return self.unsupported_error(xp, x, method) is None

    def accepts_cost(self, cost):
        """The built-in costs, and custom costs that come with a function of the points."""
        return not cost.custom or cost.function is not None

    def unsupported_error(self, xp, x, method):
        return None if isinstance(method, Method) else method_error(self.id, method, tuple(Method)[1:])

    def resolve(self, method, shape):
        if method is not Method.AUTO:
            return method
        B, N, M, _ = shape
        if B * max(N, M) ** 2 <= DENSE_MAX_ENTRIES:
            return Method.TENSORIZED
        return Method.MULTISCALE if prefers_multiscale(shape) else Method.ONLINE

    def geometry(self, x, y, cost, method, *, xp):
        if method is Method.TENSORIZED:
            return DenseGeometry(x, y, cost, xp=xp)
        return OnlineGeometry(x, y, cost, xp=xp)

    def block_sparse_geometry(self, x, y, cost, sparsity, *, xp):
        return BlockSparseGeometry(x, y, cost, sparsity, xp=xp)
