"""Shared data, settings, availability checks and warm-up for the asv suite.

Every benchmark of the suite solves a problem built here, so that ours and the anchors
(GeomLoss, POT) run on the same arrays in the same run:

* ``clouds(n)``: two seeded float32 clouds of ``n`` points in D = 3, uniform in the unit
  cube (the problem of ``benchmarks_scripts/``), p = 2, blur = 0.05, scaling = 0.5.
* ``SIZES`` (1,000 and 5,000) are the defaults; ``OT_ASV_LARGE=1`` in the environment adds
  ``LARGE_SIZES`` (100,000 and 1,000,000) to the classes that can run them (online and
  multiscale). ``asv run --quick`` runs every parameter once, so the large sizes stay off
  unless asked for.

A benchmark whose library (or GPU) is missing raises ``NotImplementedError`` in ``setup``:
asv reports it as skipped (``n/a``), it does not fail the run.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

D, P, BLUR, SCALING = 3, 2, 0.05, 0.5
#: Default sizes N = M (feasible on every path, dense ones included).
SIZES = [1000, 5000]
#: ``OT_ASV_LARGE=1``: sizes for the O(N + M)-memory paths (online, multiscale).
LARGE = os.environ.get("OT_ASV_LARGE", "0") not in ("", "0")
LARGE_SIZES = [100_000, 1_000_000] if LARGE else []
#: Long enough for one N = 10^6 multiscale or 10^5 online call on a 2-core machine.
LARGE_TIMEOUT = 3600 if LARGE else 600


class Base:
    """asv timing settings shared by the suite: calls take 10 ms to seconds each."""

    number = 1  # one call per sample: every call is long enough to time on its own
    repeat = (1, 3, 30.0)  # min repeats, max repeats, max seconds spent repeating
    warmup_time = 0.0  # warm-up happens explicitly in ``setup``
    timeout = 600


@functools.lru_cache(maxsize=4)
def clouds(n, seed=0):
    """Two float32 ``(n, 3)`` clouds, uniform in the unit cube (read-only: shared)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, D), dtype=np.float32)
    y = rng.random((n, D), dtype=np.float32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def require(name):
    """The module ``name``, or ``NotImplementedError`` (asv's "skip this benchmark")."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # ImportError, or a library broken at import time
        raise NotImplementedError(f"{name} is unavailable: {type(err).__name__}: {err}") from None


def require_numba():
    """The Numba CPU plugin's kernels (compiled or loaded from ``NUMBA_CACHE_DIR``), or skip."""
    require("numba")
    import ot_agnostic as ota

    try:
        ota.warmup(dtypes=("float32",), ps=(P,))
    except ImportError as err:
        raise NotImplementedError(str(err)) from None


def require_keops():
    """torch + pykeops with this plugin's formulas compiled (``KEOPS_CACHE_FOLDER``), or skip."""
    torch = require("torch")
    require("pykeops")
    import ot_agnostic as ota

    try:
        ota.warmup(backend="keops", dtypes=("float32",), ps=(P,), dims=(D,))
    except Exception as err:  # no compiler, broken install: skip rather than fail
        raise NotImplementedError(f"KeOps is unusable here: {type(err).__name__}: {err}") from None
    return torch


def require_cupy_gpu():
    """CuPy with a visible CUDA device and Numba CUDA, or skip."""
    cupy = require("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        from numba import cuda

        if not cuda.is_available():
            raise RuntimeError("numba.cuda is not available")
    except Exception as err:
        raise NotImplementedError(f"no usable GPU: {type(err).__name__}: {err}") from None
    return cupy


def torch_clouds(n):
    """``clouds(n)`` as torch CPU tensors (copies: torch wants writeable memory)."""
    torch = require("torch")
    x, y = clouds(n)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def warm(fun, *args, n=200):
    """Call ``fun`` once on the first ``n`` points of ``args``: compiles, caches, imports."""
    return fun(*(a[:n] for a in args))
