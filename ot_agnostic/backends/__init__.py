"""Backend plugins and the registry that picks one per call from the input arrays.

The registry asks each registered plugin, in priority order, whether it supports the
arrays and the requested method; the pure Array API plugin supports everything but
``"multiscale"`` and closes the list, so every array library has a working path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._base import Geometry, Method, Plugin, PluginId
from .array_api import ArrayAPIPlugin
from .numba_cpu import NumbaPlugin

__all__ = ["Geometry", "Method", "Plugin", "PluginId", "Selection", "select_backend", "PLUGINS"]

#: Plugins in priority order: faster, library-specific plugins go before the fallback.
PLUGINS: list[Plugin] = [NumbaPlugin(), ArrayAPIPlugin()]


@dataclass(frozen=True)
class Selection:
    """The plugin and the concrete method chosen for one call."""

    plugin: Plugin
    method: Method

    def __str__(self) -> str:
        return f"{self.plugin.id.value}/{self.method.value}"


def select_backend(xp, x, backend, shape) -> Selection:
    """Pick the plugin for arrays like ``x`` (namespace ``xp``) and the method for ``backend``.

    ``shape`` is ``(B, N, M, D)``; it lets ``"auto"`` choose between dense and online.
    """
    method = Method.parse(backend)
    if method is Method.MULTISCALE:
        raise NotImplementedError(
            "backend='multiscale' is not implemented yet; use backend='online' (O(N + M) memory) "
            "or 'auto' in the meantime."
        )
    for plugin in PLUGINS:
        if plugin.supports(xp, x, method):
            return Selection(plugin, plugin.resolve(method, shape))
    raise ValueError(f"no backend supports method {method.value!r} for {type(x).__name__} arrays.")
