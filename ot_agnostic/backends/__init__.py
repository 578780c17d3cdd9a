"""Backend plugins and the registry that picks one per call from the input arrays.

The registry asks each registered plugin, in priority order, whether it supports the
arrays and the requested method; the pure Array API plugin closes the list, so every
array library has a working path. The order makes the rules of ``backend="auto"``: NumPy
arrays and torch CPU tensors run the Numba CPU kernels; torch CUDA tensors run KeOps when
it imports and passes its self-test, else the Numba CUDA kernels; CuPy arrays run the
Numba CUDA kernels; a KeOps formula cost runs KeOps, a cost function the Array API plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._array_api import device_memory
from ._base import MULTISCALE_MAX_DIM, Geometry, Method, Plugin, PluginId
from .array_api import ArrayAPIPlugin
from .keops import KeOpsPlugin
from .numba_cpu import NumbaPlugin
from .numba_cuda import NumbaCudaPlugin

__all__ = [
    "Geometry", "Method", "Plugin", "PluginId", "Selection", "parse_backend", "select_backend",
    "warmup", "PLUGINS",
]

#: Plugins in priority order: faster, library-specific plugins go before the fallback.
PLUGINS: list[Plugin] = [NumbaPlugin(), KeOpsPlugin(), NumbaCudaPlugin(), ArrayAPIPlugin()]


@dataclass(frozen=True)
class Selection:
    """The plugin and the concrete method chosen for one call."""

    plugin: Plugin
    method: Method

    def __str__(self) -> str:
        return f"{self.plugin.id.value}/{self.method.value}"


def parse_backend(value) -> tuple[PluginId | None, Method]:
    """Split a ``backend=`` value into an optional plugin and a method.

    Accepted: a method (``"auto"``, ``"tensorized"``, ``"online"``, ``"multiscale"``), a
    plugin (``"numba"``, ``"keops"``, ``"array_api"``, ``"numba_cuda"``: that plugin, its
    own choice of method), or both as ``"plugin/method"``, the form that results report
    (e.g. ``"keops/online"``).
    """
    if isinstance(value, Method):
        return None, value
    if isinstance(value, PluginId):
        return value, Method.AUTO
    plugin_ids = sorted(plugin.value for plugin in PluginId)
    methods = ", ".join(repr(m.value) for m in Method)
    unknown = ValueError(
        f"unknown backend {value!r}: choose a method ({methods}), a plugin "
        f"({', '.join(map(repr, plugin_ids))}) or 'plugin/method' such as 'keops/online'."
    )
    if not isinstance(value, str):
        raise unknown
    plugin_part, slash, method_part = value.rpartition("/")
    if not slash and value in plugin_ids:
        return PluginId(value), Method.AUTO
    if slash and plugin_part not in plugin_ids:
        raise ValueError(
            f"unknown backend {value!r}: the part before '/' must be a plugin, one of "
            f"{', '.join(map(repr, plugin_ids))}."
        )
    try:
        method = Method.parse(method_part)
    except ValueError:
        raise unknown from None
    return (PluginId(plugin_part) if slash else None), method


def select_backend(xp, x, backend, shape, cost=None, *, labelled=False) -> Selection:
    """Pick the plugin for arrays like ``x`` (namespace ``xp``) and the method for ``backend``;
    see :func:`_select_backend`. A dense (``"tensorized"``) method whose ``(B, N, M)`` cost
    matrix alone would not fit in the device's memory is refused up front."""
    selection = _select_backend(xp, x, backend, shape, cost, labelled=labelled)
    if selection.method is Method.TENSORIZED:
        _check_dense_memory(x, shape)
    return selection


def _check_dense_memory(x, shape) -> None:
    """Raise ``MemoryError`` when the largest dense matrix of a tensorized solve, ``B *
    max(N, M)**2`` entries, exceeds the memory of ``x``'s device (a lower bound of the need)."""
    B, N, M, _ = shape
    needed = B * max(N, M) ** 2 * x.dtype.itemsize if hasattr(x.dtype, "itemsize") else B * max(N, M) ** 2 * 4
    available = device_memory(x)
    if available is not None and needed > available:
        raise MemoryError(
            f"backend='tensorized' would build dense (B, N, M) = {(B, N, M)} cost matrices: at "
            f"least {needed / 2**30:,.1f} GiB, above the {available / 2**30:,.1f} GiB of memory of "
            "this device. Use backend='online' (O(N + M) memory) or 'multiscale' (D <= 3), or "
            "backend='auto', which picks for you."
        )


def _select_backend(xp, x, backend, shape, cost=None, *, labelled=False) -> Selection:
    """Pick the plugin for arrays like ``x`` (namespace ``xp``) and the method for ``backend``.

    ``shape`` is ``(B, N, M, D)``; it lets ``"auto"`` choose between dense and online. A
    plugin resolves ``"auto"`` to a concrete method; if it cannot run that method itself
    (KeOps leaves small problems to the dense geometry), the next plugin that can does.
    A plugin named explicitly runs the problem or raises why it cannot: no fallback.
    ``cost`` (default: the built-in ``|x - y|^p / p``) narrows the choice to the plugins
    that run it: a custom cost function runs on the pure Array API plugin, a KeOps formula
    on the KeOps plugin. ``labelled``: multiscale clusters come from the user's labels, not
    from a grid, so any dimension works.
    """
    plugin_id, method = parse_backend(backend)
    if method is Method.MULTISCALE and shape[3] > MULTISCALE_MAX_DIM and not labelled:
        raise ValueError(
            f"backend='multiscale' clusters the points on a grid and supports D <= "
            f"{MULTISCALE_MAX_DIM}, got D={shape[3]}; use backend='online' (O(N + M) memory), or "
            "give your own clusters (cluster_labels=, e.g. from K-means)."
        )
    if plugin_id is not None:
        return _select_explicit(xp, x, plugin_id, method, shape, cost)
    plugins = [p for p in PLUGINS if accepts_cost(p, cost)]
    requested = method
    for k, plugin in enumerate(plugins):
        if plugin.supports(xp, x, method):
            concrete = plugin.resolve(method, shape)
            if plugin.supports(xp, x, concrete):
                return Selection(plugin, concrete)
            if requested is Method.AUTO and len(plugins) == k + 1 and plugin.supports(xp, x, Method.ONLINE):
                return Selection(plugin, Method.ONLINE)  # nobody after it runs this cost densely
            method = concrete
    if cost is not None and cost.custom:
        raise _custom_cost_error(xp, x, requested, cost, plugins)
    raise ValueError(f"no backend supports method {method.value!r} for {type(x).__name__} arrays.")


def accepts_cost(plugin, cost) -> bool:
    """Whether ``plugin`` runs ``cost`` (``None``: the built-in cost, which every plugin runs)."""
    if cost is None or not cost.custom:
        return True
    accepts = getattr(plugin, "accepts_cost", None)
    return bool(accepts and accepts(cost))


def _custom_cost_error(xp, x, method, cost, plugins) -> Exception:
    """Why no plugin runs this custom cost on these arrays, and what to do."""
    for plugin in plugins:  # a plugin that takes the cost but cannot run here says why
        error = plugin.unsupported_error(xp, x, method)
        if isinstance(error, ImportError):
            return error
    if cost.function is None:
        return ValueError(
            f"the cost is a KeOps formula ({cost.formula!r}): it runs on torch tensors with "
            f"pykeops, with backend='online' or 'multiscale', not {method.value!r} on "
            f"{type(x).__module__.split('.')[0]} arrays. Pass a function cost(x, y) returning "
            "the (B, N, M) cost matrix (or a (formula, function) pair) for the other cases."
        )
    return ValueError(
        f"no backend runs the custom cost with method {method.value!r} on "
        f"{type(x).__module__.split('.')[0]} arrays."
    )


def _select_explicit(xp, x, plugin_id, method, shape, cost=None) -> Selection:
    plugin = next((p for p in PLUGINS if p.id is plugin_id), None)
    if plugin is None:
        raise NotImplementedError(f"the {plugin_id.value!r} backend is not available in this version.")
    if not accepts_cost(plugin, cost):
        runs = "a KeOps formula" if cost.function is None else "a custom cost function"
        where = "'keops' (torch tensors)" if cost.function is None else "'array_api'"
        raise ValueError(
            f"the {plugin_id.value!r} backend computes the built-in costs |x - y|^p / p only, "
            f"not {runs}; {runs} runs on the {where} backend: pass backend='auto' or a method "
            "('tensorized', 'online', 'multiscale')."
        )
    error = plugin.unsupported_error(xp, x, method)
    if error is not None:
        raise error
    concrete = plugin.resolve(method, shape)
    if not plugin.supports(xp, x, concrete):  # e.g. KeOps under "auto" on a small problem
        concrete = Method.ONLINE
    return Selection(plugin, concrete)


def warmup(dtypes=("float32", "float64"), ps=(1, 2), *, backend="numba", dims=(3,), device="cpu") -> None:
    """Compile (or load from the disk cache) a plugin's kernels now, out of your timed code.

    ``backend="numba"`` (NumPy; every ``D`` shares one build per dtype) or ``"keops"``
    (torch; one build per dtype, ``D`` in ``dims``, ``p`` or kernel, on ``device``).

    Examples
    --------
    >>> import ot_agnostic as ota
    >>> ota.warmup(dtypes=("float64",), ps=(2,))                               # doctest: +SKIP
    >>> ota.warmup(dtypes=("float32",), backend="keops", dims=(2, 3))        # doctest: +SKIP
    """
    plugin_id, _ = parse_backend(backend)
    if plugin_id is PluginId.NUMBA:
        from .numba_cpu import warmup as numba_warmup

        return numba_warmup(dtypes=dtypes, ps=ps)
    if plugin_id is PluginId.KEOPS:
        from .keops import warmup as keops_warmup

        return keops_warmup(dtypes=dtypes, ps=ps, dims=dims, device=device)
    raise ValueError(f"warmup knows backend='numba' and backend='keops', not {backend!r}.")
