"""The torch plugin: KeOps (pykeops) reductions on CPU and CUDA tensors, O(N + M) memory.

Picked for torch float32/float64 tensors by ``backend="online"``, and by ``backend="auto"``
once the problem is large (``B * max(N, M)**2 > KEOPS_MIN_ENTRIES``; below that, "auto"
hands the problem to the dense Array API geometry, which is faster there: the result's
``backend`` reads ``"array_api/tensorized"``), and always by ``backend="keops"`` (or
``"keops/online"``), which raises instead of falling back when KeOps is unusable. The formulas live in
:mod:`ot_agnostic.kernels.keops_torch`; they, torch and pykeops are imported on first use
only, and a one-time self-test (a tiny softmin compared with dense torch, per device type)
guards against a broken installation (it runs at the first call on torch tensors, whatever
their size: importing pykeops takes about a second, and the very first time on a machine
the self-test compiles its formula). If pykeops is missing or fails, the pure Array API
backend takes over ("online" then means its chunked geometry) with one logged warning on
the ``"ot_agnostic"`` logger.

Compilation and the cache folder
--------------------------------
KeOps compiles each distinct formula (per dtype, dimension ``D``, ``p`` or kernel, and
device type) the first time it is used: 10-20 s with ``g++`` on a CPU (a C++ compiler must
be on the ``PATH``), a few seconds with ``nvrtc`` on a GPU. The binaries are kept in KeOps'
cache folder, so later processes load them in milliseconds. The folder is
``$KEOPS_CACHE_FOLDER`` if that environment variable is set when pykeops is first imported
(``keopscore.config`` reads it with ``os.getenv``), else ``~/.cache/keops<version>``.
Set ``PYKEOPS_VERBOSE=0`` to silence KeOps' compilation messages.

Threads and single points
-------------------------
pykeops is not thread-safe (a call stores its pointers on an object shared by every call of
the same compiled formula): every KeOps reduction holds the re-entrant lock
:data:`ot_agnostic.kernels.keops_torch.LOCK`, so concurrent calls from several threads give
the single-threaded values (their reductions run one at a time). ``N = 1`` and ``M = 1``
run the formulas of any other size.

Examples
--------
>>> import torch, ot_agnostic as ota                              # doctest: +SKIP
>>> x, y = torch.rand(20_000, 3), torch.rand(20_000, 3)           # doctest: +SKIP
>>> ota.sinkhorn(x, y, backend="online").backend                  # doctest: +SKIP
'keops/online'
"""

from __future__ import annotations

import importlib
import logging

import array_api_compat

from ._base import (
    Method, PluginId, describe_arrays, dtype_name, log_fallback_once, method_error, prefers_multiscale,
)

logger = logging.getLogger("ot_agnostic")

#: "auto" uses KeOps once ``B * max(N, M)**2`` (the largest of the four cost matrices of a
#: debiased problem) exceeds this many entries; below, the dense Array API geometry runs.
#: Measured on torch CPU (2 cores, float32, D=3, divergence + backward): dense and KeOps
#: break even at about 2**22 entries for p=2 and 2**23 for p=1; at 2**23 dense is 1.3x
#: slower for p=2, at 2**22 it is 2.4x faster for p=1.
KEOPS_MIN_ENTRIES = 2**23

#: The self-test's tolerance on the relative error of a tiny softmin, by dtype name.
SELF_TEST_RTOL = {"float32": 1e-5, "float64": 1e-12}

_FIX = (
    "Install or repair it with `pip install pykeops` (it compiles its formulas with g++ on "
    "the CPU, nvrtc on CUDA: a C++ compiler must be on the PATH), or pass "
    "backend='tensorized' to silence this message."
)


def load_kernels():
    """The KeOps reduction module; raises ``ImportError`` with a fix when pykeops is unusable."""
    try:
        kernels = importlib.import_module("ot_agnostic.kernels.keops_torch")
        kernels.require()  # imports torch and pykeops
        return kernels
    except Exception as err:  # pykeops/keopscore missing, or broken against this torch
        raise ImportError(
            f"the KeOps backend is unavailable ({type(err).__name__}: {err}). {_FIX}"
        ) from err


class KeOpsGeometry:
    """Torch point clouds ``x (B, N, D)``, ``y (B, M, D)`` whose reductions run in KeOps.

    ``softmin`` and ``kernel_sum`` are differentiable by torch autograd with respect to the
    points, ``h`` and ``v`` (first order); ``softmin_grad`` and ``softmax_weighted_sum``
    are too, through pykeops' own autograd.
    """

    def __init__(self, x, y, cost, *, xp, kernels=None):
        self.xp, self.cost = xp, cost
        self.x, self.y = x, y
        self.kernels = kernels or load_kernels()
        B, N, _ = x.shape
        self.shape = (B, N, y.shape[1])

    def softmin(self, eps, h):
        return self.kernels.softmin(self.x, self.y, h, eps, self.cost.p)

    def softmin_grad(self, eps, h):
        return self.kernels.softmin_grad(self.x, self.y, h, eps, self.cost.p)

    def softmax_weighted_sum(self, eps, h, v):
        return self.kernels.softmax_weighted_sum(self.x, self.y, h, v, eps, self.cost.p)

    def kernel_sum(self, kernel, v):
        return self.kernels.kernel_sum(self.x, self.y, v, kernel.name, kernel.blur)

    def cost_rows(self, start, stop):
        return self.cost.matrix(self.x[:, start:stop, :], self.y, xp=self.xp)

    def transpose(self):
        return KeOpsGeometry(self.y, self.x, self.cost, xp=self.xp, kernels=self.kernels)


class KeOpsBlockSparseGeometry(KeOpsGeometry):
    """:class:`KeOpsGeometry` over the kept cluster pairs of ``sparsity`` (multiscale, ``B = 1``):
    KeOps' block-sparse reductions (``ranges``)."""

    def __init__(self, x, y, cost, sparsity, *, xp, kernels=None):
        super().__init__(x, y, cost, xp=xp, kernels=kernels)
        if x.shape[0] != 1:
            raise ValueError("block-sparse KeOps geometries take one batch item at a time")
        self.sparsity = sparsity
        t = sparsity.transpose()
        self.ranges = self.kernels.keops_ranges(
            sparsity.row_ranges, sparsity.col_ptr, sparsity.col_ranges,
            t.row_ranges, t.col_ptr, t.col_ranges, x.device,
        )

    def softmin(self, eps, h):
        return self.kernels.softmin_ranges(self.x[0], self.y[0], h[0], eps, self.cost.p, self.ranges)[None, :]

    def softmin_grad(self, eps, h):
        return self.kernels.softmin_grad_ranges(self.x[0], self.y[0], h[0], eps, self.cost.p, self.ranges)[None, ...]

    def softmax_weighted_sum(self, eps, h, v):
        return self.kernels.softmax_weighted_sum_ranges(
            self.x[0], self.y[0], h[0], v[0], eps, self.cost.p, self.ranges
        )[None, ...]

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms have no block-sparse form: use backend='online'.")

    def transpose(self):
        return KeOpsBlockSparseGeometry(
            self.y, self.x, self.cost, self.sparsity.transpose(), xp=self.xp, kernels=self.kernels
        )


class KeOpsFormulaGeometry(KeOpsGeometry):
    """:class:`KeOpsGeometry` for a custom cost given as a KeOps formula in ``X`` and ``Y``."""

    def softmin(self, eps, h):
        return self.kernels.formula_softmin(self.x, self.y, h, eps, self.cost.formula)

    def softmin_grad(self, eps, h):
        return self.kernels.formula_softmin_grad(self.x, self.y, h, eps, self.cost.formula)

    def softmax_weighted_sum(self, eps, h, v):
        return self.kernels.formula_softmax_weighted_sum(self.x, self.y, h, v, eps, self.cost.formula)

    def kernel_sum(self, kernel, v):
        raise NotImplementedError("kernel norms use their own kernels, not a custom cost.")

    def transpose(self):
        return KeOpsFormulaGeometry(self.y, self.x, self.cost, xp=self.xp, kernels=self.kernels)


class KeOpsFormulaBlockSparseGeometry(KeOpsBlockSparseGeometry):
    """:class:`KeOpsBlockSparseGeometry` for a custom cost given as a KeOps formula."""

    def softmin(self, eps, h):
        f = self.kernels.formula_softmin
        return f(self.x[0], self.y[0], h[0], eps, self.cost.formula, ranges=self.ranges)[None, :]

    def softmin_grad(self, eps, h):
        f = self.kernels.formula_softmin_grad
        return f(self.x[0], self.y[0], h[0], eps, self.cost.formula, ranges=self.ranges)[None, ...]

    def softmax_weighted_sum(self, eps, h, v):
        f = self.kernels.formula_softmax_weighted_sum
        return f(self.x[0], self.y[0], h[0], v[0], eps, self.cost.formula, ranges=self.ranges)[None, ...]

    def transpose(self):
        return KeOpsFormulaBlockSparseGeometry(
            self.y, self.x, self.cost, self.sparsity.transpose(), xp=self.xp, kernels=self.kernels
        )


class KeOpsPlugin:
    """Runs torch float32/float64 tensors (CPU, CUDA) through KeOps ("online" and large "auto")."""

    id = PluginId.KEOPS

    def __init__(self):
        self._errors = {}  # device type -> None (usable) or the ImportError saying why not
        self._warned = set()

    def supports(self, xp, x, method):
        error = self.unsupported_error(xp, x, method)
        if isinstance(error, ImportError):
            log_fallback_once(self._warned, x.device.type, error, logger)
        return error is None

    def accepts_cost(self, cost):
        """The built-in costs, and custom costs that come with a KeOps formula."""
        return not cost.custom or cost.formula is not None

    def unsupported_error(self, xp, x, method):
        if method not in (Method.AUTO, Method.ONLINE, Method.MULTISCALE):
            return method_error(self.id, method, (Method.ONLINE, Method.MULTISCALE))
        supported = (
            array_api_compat.is_torch_array(x)
            and dtype_name(x) in SELF_TEST_RTOL
            and x.device.type in ("cpu", "cuda")
        )
        if not supported:
            return ValueError(
                f"the 'keops' backend runs torch float32/float64 tensors on cpu or cuda, not "
                f"{describe_arrays(x)}; pass backend='auto' (or 'online') to let ot_agnostic "
                "pick the plugin."
            )
        device = x.device.type
        if device not in self._errors:
            self._errors[device] = self._check(x)
        return self._errors[device]

    def _check(self, x) -> ImportError | None:
        """``None`` when KeOps loads and passes the self-test on ``x``'s device, else why not."""
        dtype = dtype_name(x)
        try:
            kernels = load_kernels()
            error = kernels.self_test(x.device, x.dtype, int(x.shape[-1]))
            if not error <= SELF_TEST_RTOL[dtype]:
                raise RuntimeError(
                    f"KeOps' self-test on {x.device.type} ({dtype}) is off by {error:.2e} "
                    f"relative (tolerance {SELF_TEST_RTOL[dtype]:.0e})"
                )
        except ImportError as err:
            return err
        except Exception as err:  # compilation failed (no compiler, ...), wrong numbers
            return ImportError(
                f"the KeOps backend failed its self-test ({type(err).__name__}: {err}). {_FIX}"
            )
        return None

    def resolve(self, method, shape):
        if method is not Method.AUTO:
            return method
        B, N, M, _ = shape
        if B * max(N, M) ** 2 <= KEOPS_MIN_ENTRIES:
            return Method.TENSORIZED
        return Method.MULTISCALE if prefers_multiscale(shape) else Method.ONLINE

    def geometry(self, x, y, cost, method, *, xp):
        if cost.custom:
            return KeOpsFormulaGeometry(x, y, cost, xp=xp)
        return KeOpsGeometry(x, y, cost, xp=xp)

    def block_sparse_geometry(self, x, y, cost, sparsity, *, xp):
        if cost.custom:
            return KeOpsFormulaBlockSparseGeometry(x, y, cost, sparsity, xp=xp)
        return KeOpsBlockSparseGeometry(x, y, cost, sparsity, xp=xp)


def warmup(dtypes=("float32", "float64"), ps=(1, 2), dims=(3,), device="cpu") -> None:
    """Compile (or load from ``KEOPS_CACHE_FOLDER``) every KeOps formula for these settings.

    One formula per reduction, dtype, dimension ``D``, ``p`` (or kernel) and device type:
    10-20 s each the first time on a CPU, milliseconds once cached.

    Examples
    --------
    >>> warmup(dtypes=("float32",), ps=(2,), dims=(3,))  # doctest: +SKIP
    """
    kernels = load_kernels()
    torch = kernels._deps()[0]
    for dtype in dtypes:
        for dim in dims:
            x = torch.zeros(1, 2, dim, dtype=getattr(torch, dtype), device=device, requires_grad=True)
            h = torch.zeros(1, 2, dtype=x.dtype, device=device, requires_grad=True)
            for p in ps:
                kernels.softmin(x, x, h, 1.0, p).sum().backward()  # forward and backward
                kernels.softmax_weighted_sum(x.detach(), x.detach(), h.detach(), x.detach(), 1.0, p)
            for name in ("energy", "gaussian", "laplacian"):
                kernels.kernel_sum(x, x, h, name, 1.0).sum().backward()
