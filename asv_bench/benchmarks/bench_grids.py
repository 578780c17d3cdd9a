"""Sinkhorn on grids (issue #15): image pairs and barycenters, with POT as the anchor.

* ``GridDivergence``: ``grids.sinkhorn(a, b, blur=2, tol=tol)`` on a float32 ``n x n`` image
  pair (two smooth random fields, blur 2 pixels, debiased); tracks the updates made.
* ``GridBarycenter`` / ``PotConvolutionalBarycenter``: 4 images of ``n x n``, blur 2
  pixels, ours (``grids.barycenter``, tol 1e-3) against POT's
  ``ot.bregman.convolutional_barycenter2d`` at the same eps (``reg = 2 (blur / (n - 1))**2``
  on the unit square) and its default ``stopThr``.
"""

import functools
import warnings

import numpy as np

from ot_agnostic import grids

from .common import Base, require, require_numba

BLUR = 2.0


@functools.lru_cache(maxsize=4)
def images(k, n, seed=0):
    """``k`` float32 smooth positive ``n x n`` densities of mass 1 (read-only: shared)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((k, n // 8 + 2, n // 8 + 2))
    coarse = np.kron(noise, np.ones((8, 8)))[:, :n, :n] ** 3 + 1e-3
    out = (coarse / coarse.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    out.flags.writeable = False
    return out


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


class GridDivergence(Base):
    """Ours: ``grids.sinkhorn(a, b, blur=2, tol=tol)``, float32 ``n x n`` images, Numba CPU."""

    params = ([1e-1, 1e-2], [256, 512])
    param_names = ["tol", "n"]
    unit = "updates"

    def setup(self, tol, n):
        require_numba()
        self.a, self.b = images(2, n)
        quiet(grids.sinkhorn, self.a[:32, :32] / self.a[:32, :32].sum(), self.b[:32, :32] / self.b[:32, :32].sum(),
              blur=BLUR, tol=tol)

    def time_sinkhorn(self, tol, n):
        quiet(grids.sinkhorn, self.a, self.b, blur=BLUR, tol=tol)

    def track_updates(self, tol, n):
        return int(quiet(grids.sinkhorn, self.a, self.b, blur=BLUR, tol=tol).n_iter)


class GridBarycenter(Base):
    """Ours: ``grids.barycenter`` of 4 float32 ``n x n`` images, blur 2 pixels, tol 1e-3."""

    params = ([64, 128],)
    param_names = ["n"]

    def setup(self, n):
        require_numba()
        self.images = images(4, n)
        quiet(grids.barycenter, images(4, 16), blur=BLUR, max_iter=2)

    def time_barycenter(self, n):
        quiet(grids.barycenter, self.images, blur=BLUR, tol=1e-3)


class PotConvolutionalBarycenter(Base):
    """Anchor: POT ``convolutional_barycenter2d`` on the same images at the same eps."""

    params = ([64, 128],)
    param_names = ["n"]

    def setup(self, n):
        self.ot = require("ot")
        self.images = images(4, n).astype(np.float64)
        self.reg = 2 * (BLUR / (n - 1)) ** 2

    def time_barycenter(self, n):
        quiet(self.ot.bregman.convolutional_barycenter2d, self.images, self.reg)
