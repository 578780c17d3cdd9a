"""Time and peak memory of ``sinkhorn_divergence`` on NumPy and torch, with GeomLoss as anchor.

Every benchmark solves the same problem: two float32 point clouds of N = M points in D = 3
(N in 1000, 5000), p = 2, blur = 0.05, default scaling 0.5. ``ot_agnostic`` runs its pure
Array API plugin with ``backend="tensorized"`` (dense cost matrix) and ``"online"`` (cost
recomputed block by block); GeomLoss's ``SamplesLoss("sinkhorn", backend="tensorized")`` on
the same torch tensors is the reference point that makes timings comparable across machines.
Benchmarks whose library is missing are skipped (``NotImplementedError`` in ``setup``).
"""

import numpy as np

import ot_agnostic as ota

SIZES = [1000, 5000]
METHODS = ["tensorized", "online"]
D, P, BLUR = 3, 2, 0.05


def point_clouds(n, seed=0):
    """Two float32 clouds: a unit Gaussian blob and a shifted, anisotropic one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (rng.normal(size=(n, D)) * [1.0, 0.5, 0.8] + [1.0, 0.0, 0.0]).astype(np.float32)
    return x, y


def import_or_skip(name):
    """The module ``name``, or ``NotImplementedError`` (asv's "skip this benchmark")."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise NotImplementedError(f"{name} is not installed: {err}") from None


class _Base:
    timeout = 600
    # Each call takes from 0.1 s to several seconds on a 2-core machine: a few repeats suffice.
    number = 1
    repeat = (1, 5, 30.0)
    warmup_time = 0.0


class SinkhornNumPy(_Base):
    """``ota.sinkhorn_divergence`` on NumPy float32 arrays."""

    params = (METHODS, SIZES)
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        self.x, self.y = point_clouds(n)
        ota.sinkhorn_divergence(self.x[:10], self.y[:10], blur=BLUR, backend=backend)  # warm-up

    def time_sinkhorn_divergence(self, backend, n):
        ota.sinkhorn_divergence(self.x, self.y, p=P, blur=BLUR, backend=backend)

    def peakmem_sinkhorn_divergence(self, backend, n):
        ota.sinkhorn_divergence(self.x, self.y, p=P, blur=BLUR, backend=backend)


class SinkhornTorch(_Base):
    """``ota.sinkhorn_divergence`` on torch float32 CPU tensors (the array_api plugin)."""

    params = (METHODS, SIZES)
    param_names = ["backend", "n"]

    def setup(self, backend, n):
        torch = import_or_skip("torch")
        x, y = point_clouds(n)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        ota.sinkhorn_divergence(self.x[:10], self.y[:10], blur=BLUR, backend=backend)  # warm-up

    def time_sinkhorn_divergence(self, backend, n):
        ota.sinkhorn_divergence(self.x, self.y, p=P, blur=BLUR, backend=backend)

    def peakmem_sinkhorn_divergence(self, backend, n):
        ota.sinkhorn_divergence(self.x, self.y, p=P, blur=BLUR, backend=backend)


class GeomLossAnchor(_Base):
    """GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=0.05, backend="tensorized")``: same data, same numbers."""

    params = ([1000, 5000],)
    param_names = ["n"]

    def setup(self, n):
        torch = import_or_skip("torch")
        geomloss = import_or_skip("geomloss")
        x, y = point_clouds(n)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.loss = geomloss.SamplesLoss("sinkhorn", p=P, blur=BLUR, backend="tensorized")
        self.loss(self.x[:10], self.y[:10])  # warm-up

    def time_samplesloss_tensorized(self, n):
        self.loss(self.x, self.y)

    def peakmem_samplesloss_tensorized(self, n):
        self.loss(self.x, self.y)
