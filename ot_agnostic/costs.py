"""Ground costs ``C(x, y) = |x - y|^p / p`` for ``p`` in {1, 2}.

A :class:`Cost` is a small immutable tag: backends specialise on ``cost.p`` (compiled
kernels) and the pure Array API backend calls :meth:`Cost.matrix` on blocks of points.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._array_api import safe_sqrt

#: Up to this dimension, squared distances are summed coordinate by coordinate (exact,
#: ``C(x, x) == 0``); above it, the faster ``|x|^2 + |y|^2 - 2 x.y`` expansion is used.
EXACT_DIFFERENCE_MAX_DIM = 16


def squared_distances(x, y, *, xp):
    """``|x_i - y_j|^2`` for ``x (B, N, D)`` and ``y (B, M, D)``, as a ``(B, N, M)`` array."""
    D = x.shape[-1]
    if D <= EXACT_DIFFERENCE_MAX_DIM:
        total = None
        for d in range(D):
            diff = x[:, :, None, d] - y[:, None, :, d]
            total = diff * diff if total is None else total + diff * diff
        return total
    center = xp.mean(y, axis=1, keepdims=True)  # shrinks |x|^2 + |y|^2 and the cancellation
    x, y = x - center, y - center
    x_sq = xp.sum(x * x, axis=-1)[:, :, None]
    y_sq = xp.sum(y * y, axis=-1)[:, None, :]
    cross = xp.matmul(x, xp.matrix_transpose(y))
    return xp.clip(x_sq + y_sq - 2 * cross, min=0)


@dataclass(frozen=True)
class Cost:
    """The ground cost ``C(x, y) = |x - y|^p / p``.

    Examples
    --------
    >>> import numpy as np
    >>> Cost(2).matrix(np.zeros((1, 1, 2)), np.ones((1, 1, 2)), xp=np)
    array([[[1.]]])
    """

    p: int = 2

    def matrix(self, x, y, *, xp):
        """Dense ``(B, N, M)`` block ``C(x_i, y_j)`` for ``x (B, N, D)``, ``y (B, M, D)``."""
        sq = squared_distances(x, y, xp=xp)
        return sq / 2 if self.p == 2 else safe_sqrt(sq, xp=xp)


@dataclass(frozen=True)
class Kernel:
    """A radial kernel ``k(x, y) = phi(C(x, y))`` for the kernel norms (MMDs).

    ``name`` is one of ``"energy"`` (``-|x - y|``), ``"gaussian"``
    (``exp(-|x - y|^2 / 2 blur^2)``) and ``"laplacian"`` (``exp(-|x - y| / blur)``).
    """

    name: str
    blur: float = 1.0

    @property
    def cost(self) -> Cost:
        """The ground cost that ``phi`` is applied to."""
        return Cost(2 if self.name == "gaussian" else 1)

    def apply(self, cost_matrix, *, xp):
        """``phi(C)`` elementwise."""
        if self.name == "energy":
            return -cost_matrix
        if self.name == "gaussian":
            return xp.exp(-cost_matrix / self.blur**2)
        return xp.exp(-cost_matrix / self.blur)
