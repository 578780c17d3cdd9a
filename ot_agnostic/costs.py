"""Ground costs: ``C(x, y) = |x - y|^p / p`` for ``p`` in {1, 2}, or a user's own.

A :class:`Cost` is a small immutable tag: backends specialise on ``cost.p`` (compiled
kernels) and the pure Array API backend calls :meth:`Cost.matrix` on blocks of points.
A :class:`CustomCost` carries a user's function of the points (run by the pure Array API
backend) and/or a KeOps formula (run by the KeOps backend); :func:`make_cost` turns what a
user passes as ``cost=`` into one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    #: Built-in costs run on every plugin.
    custom = False

    def matrix(self, x, y, *, xp):
        """Dense ``(B, N, M)`` block ``C(x_i, y_j)`` for ``x (B, N, D)``, ``y (B, M, D)``."""
        sq = squared_distances(x, y, xp=xp)
        return sq / 2 if self.p == 2 else safe_sqrt(sq, xp=xp)


@dataclass(frozen=True, eq=False)
class CustomCost:
    """A user's ground cost, as GeomLoss takes it: a function, a KeOps formula, or both.

    ``function(x, y)`` maps batched points ``x (B, N, D)``, ``y (B, M, D)`` (arrays of the
    input library) to the ``(B, N, M)`` cost matrix; the pure Array API backend calls it on
    the whole problem ("tensorized"), on blocks of rows ("online", ``O(N + M)`` plus one
    block) or on pairs of clusters ("multiscale"). ``formula`` is a KeOps formula in the
    variables ``X`` and ``Y`` (e.g. ``"SqDist(X,Y) / IntCst(2)"``), run by the KeOps backend
    on torch tensors without any ``N x M`` matrix. ``p`` only sets the temperatures:
    ``eps = blur**p``, eps-scaling from ``diameter**p``.

    Examples
    --------
    >>> import numpy as np
    >>> l1 = CustomCost(1, function=lambda x, y: np.abs(x[:, :, None, :] - y[:, None, :, :]).sum(-1))
    >>> l1.matrix(np.zeros((1, 1, 2)), np.ones((1, 1, 2)), xp=np)
    array([[[2.]]])
    """

    p: int = 2
    function: Callable[[Any, Any], Any] | None = None
    formula: str | None = None
    custom = True

    def matrix(self, x, y, *, xp):
        """``function(x, y)``, checked: a ``(B, N, M)`` array."""
        if self.function is None:
            raise ValueError(
                f"the cost is the KeOps formula {self.formula!r} only: it has no dense form for "
                "this operation. Pass cost=(formula, function), with function(x, y) returning the "
                "(B, N, M) cost matrix of (B, N, D) and (B, M, D) points."
            )
        c = self.function(x, y)
        expected = (x.shape[0], x.shape[1], y.shape[1])
        if tuple(getattr(c, "shape", ())) != expected:
            raise ValueError(
                f"the cost function must return a (B, N, M) = {expected} array for points of "
                f"shapes {tuple(x.shape)} and {tuple(y.shape)}, not {getattr(c, 'shape', type(c).__name__)}"
                "; it is called on batched (B, N, D) and (B, M, D) points."
            )
        if bool(xp.any(xp.isnan(c))):  # +inf is allowed: a forbidden pair
            raise ValueError(
                "the cost function returned NaN values; every entry must be a number "
                "(+inf marks a pair that may not be matched)."
            )
        return c


def make_cost(p: int, cost=None):
    """The cost object for ``cost=``: None (``|x - y|^p / p``), a function ``cost(x, y)``,
    a KeOps formula string, a ``(formula, function)`` pair (GeomLoss' multiscale form) or a
    :class:`CustomCost`.

    Examples
    --------
    >>> make_cost(2)
    Cost(p=2)
    >>> make_cost(1, "Norm2(X-Y)").formula
    'Norm2(X-Y)'
    """
    if cost is None:
        return Cost(p)
    if isinstance(cost, (Cost, CustomCost)):
        return cost
    if isinstance(cost, str):
        return CustomCost(p, formula=cost)
    if callable(cost):
        return CustomCost(p, function=cost)
    if isinstance(cost, tuple) and len(cost) == 2:
        formula, function = cost
        if isinstance(formula, str) and callable(function):
            return CustomCost(p, function=function, formula=formula)
    raise TypeError(
        f"cost must be None, a function cost(x, y) returning the (B, N, M) cost matrix, a KeOps "
        f"formula string in X and Y, or a (formula, function) pair; got {type(cost).__name__}."
    )


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
