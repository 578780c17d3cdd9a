"""Grid (voxel) clustering of point clouds, written against the Array API.

Multiscale Sinkhorn solves a coarse problem on cluster centroids, then refines on the
points, keeping only the pairs of clusters whose coupling is not negligible. It needs
each cluster as a contiguous range of points: :func:`grid_clusters` sorts the points by
the cubic cell of side ``scale`` that contains them and returns the permutation, the
ranges, and the clusters' centroids and masses (segment sums of the sorted arrays).
Cells are ordered lexicographically, so neighbouring clusters tend to be neighbours in
memory and the kept column ranges of a row cluster merge into few contiguous runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._array_api import to_host

#: GeomLoss's default cluster size: the bounding box diagonal cut into about 2000**(1/D)
#: cells per axis (about 2000 cells for a cloud that fills its box).
CELLS_PER_DIAMETER = 2000


@dataclass(frozen=True)
class Clusters:
    """Points grouped by grid cell: ``x[perm]`` lists cluster 0, then cluster 1, ...

    ``ranges (K, 2)``: ``[start, stop)`` of each cluster in the sorted order (host NumPy
    int64); ``centroids (K, D)``: weighted means (plain means for clusters of zero mass);
    ``masses (K,)``: summed weights; ``perm (N,)``: the sorting permutation (``xp`` array).
    """

    perm: Any
    ranges: Any
    centroids: Any
    masses: Any

    @property
    def count(self) -> int:
        return int(self.ranges.shape[0])


#: The default cluster size aims at no fewer points per occupied cell, on average.
POINTS_PER_CELL = 100


def geomloss_cluster_scale(diameter: float, dim: int) -> float:
    """GeomLoss's rule: ``diameter / (sqrt(D) * 2000**(1/D))``, about 2000 cells in the box."""
    return diameter / (math.sqrt(dim) * CELLS_PER_DIAMETER ** (1.0 / dim))


def default_cluster_scale(diameter: float, dim: int, blur: float, n_points: int) -> float:
    """``min(geomloss, max(blur, crowded))``: the default side of the grid cells.

    ``geomloss = diameter / (sqrt(D) * 2000**(1/D))`` (GeomLoss's default, never exceeded);
    below it, cells as small as the ``blur``, which lets the loop stay on the clusters
    longer and keeps fewer cluster pairs after truncation (about 7% instead of 26% of the
    pairs for uniform data at ``blur = 0.05``), but no smaller than
    ``crowded = diameter / sqrt(D) * (100 / n_points)**(1/D)``, the size of cells that
    hold about 100 points each for a cloud that fills its box (smaller ones cost more per
    kept pair than they save).

    Examples
    --------
    >>> diameter = 3**0.5  # the unit cube
    >>> round(default_cluster_scale(diameter, 3, 0.05, 1_000_000), 4)  # the blur
    0.05
    >>> round(default_cluster_scale(diameter, 3, 0.05, 20_000), 4)  # GeomLoss's, for small N
    0.0794
    """
    crowded = diameter / math.sqrt(dim) * (POINTS_PER_CELL / max(n_points, 1)) ** (1.0 / dim)
    return min(geomloss_cluster_scale(diameter, dim), max(blur, crowded))


def grid_clusters(x, a, scale: float, *, xp) -> Clusters:
    """Cluster ``x (N, D)`` with weights ``a (N,)`` into cubic cells of side ``scale``.

    ``cell(x_i) = floor((x_i - min_k x_k) / scale)``; clusters are the non-empty cells in
    lexicographic order of their integer coordinates.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.1], [2.5], [0.2], [2.9]]); a = np.full(4, 0.25)
    >>> c = grid_clusters(x, a, 1.0, xp=np)
    >>> c.perm.tolist(), c.ranges.tolist(), c.centroids[:, 0].round(2).tolist(), c.masses.tolist()
    ([0, 2, 1, 3], [[0, 2], [2, 4]], [0.15, 2.7], [0.5, 0.5])
    """
    N, D = x.shape
    if not scale > 0:
        raise ValueError(f"cluster_scale must be positive, got {scale!r}.")
    lowest = xp.min(x, axis=0)
    cells = xp.astype(xp.floor((x - lowest) / scale), xp.int64)
    extent = [int(v) + 1 for v in to_host(xp.max(cells, axis=0))]
    if math.prod(extent) >= 2**62:
        raise ValueError(
            f"cluster_scale={scale!r} cuts the bounding box into {extent} cells, too many to "
            "index: pick a larger cluster_scale."
        )
    key = cells[:, 0]
    for d in range(1, D):
        key = key * extent[d] + cells[:, d]
    return keyed_clusters(x, a, key, xp=xp)


def label_clusters(x, a, labels, *, xp) -> Clusters:
    """Cluster ``x (N, D)`` with weights ``a (N,)`` by integer ``labels (N,)`` (GeomLoss's
    ``L(l_x, a, x, l_y, b, y)``): one cluster per distinct label, in increasing label order.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [1.0], [4.0]]); a = np.full(3, 1 / 3)
    >>> c = label_clusters(x, a, np.array([7, 2, 7]), xp=np)
    >>> c.perm.tolist(), c.ranges.tolist(), c.centroids[:, 0].tolist()
    ([1, 0, 2], [[0, 1], [1, 3]], [1.0, 2.0])
    """
    return keyed_clusters(x, a, labels, xp=xp)


def keyed_clusters(x, a, key, *, xp) -> Clusters:
    """The clusters of the points that share a value of the integer ``key (N,)``, sorted by key."""
    import numpy as np

    N = x.shape[0]
    perm = xp.argsort(key, stable=True)
    sorted_key = to_host(xp.take(key, perm))
    starts = np.flatnonzero(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]]))
    ranges = np.stack([starts, np.append(starts[1:], N)], axis=1).astype(np.int64)
    x_sorted, a_sorted = xp.take(x, perm, axis=0), xp.take(a, perm)
    masses = segment_sums(a_sorted[:, None], ranges, xp=xp)[:, 0]
    sums = segment_sums(a_sorted[:, None] * x_sorted, ranges, xp=xp)
    counts = xp.asarray(ranges[:, 1] - ranges[:, 0], dtype=x.dtype, device=_device(x))
    means = segment_sums(x_sorted, ranges, xp=xp) / counts[:, None]
    positive = masses > 0
    safe = xp.where(positive, masses, xp.ones_like(masses))
    centroids = xp.where(positive[:, None], sums / safe[:, None], means)
    return Clusters(perm=perm, ranges=ranges, centroids=centroids, masses=masses)


def segment_sums(values, ranges, *, xp):
    """``out[k] = sum(values[ranges[k, 0]:ranges[k, 1]], axis=0)`` for ``values (N, C)``.

    Differences of one cumulative sum, accumulated in float64 where the library has it
    (so that a million float32 terms still sum to ~1e-10 relative).
    """
    wide = _widest_float(xp, values)
    cumsum = xp.cumulative_sum(xp.astype(values, wide), axis=0, include_initial=True)
    starts = xp.asarray(ranges[:, 0], device=_device(values))
    stops = xp.asarray(ranges[:, 1], device=_device(values))
    out = xp.take(cumsum, stops, axis=0) - xp.take(cumsum, starts, axis=0)
    return xp.astype(out, values.dtype)


def _widest_float(xp, like):
    try:
        xp.zeros(1, dtype=xp.float64, device=_device(like))
        return xp.float64
    except Exception:  # e.g. torch on Apple MPS has no float64
        return like.dtype


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)
