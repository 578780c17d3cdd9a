"""ot_agnostic: scalable optimal transport on the arrays you already have.

Importing this package imports no array framework: torch, CuPy, pykeops and
numba.cuda are only loaded by the plugins that need them.
"""

from .backends import Method, PluginId, warmup
from .divergences import (
    energy_distance,
    gaussian_mmd,
    hausdorff_divergence,
    laplacian_mmd,
    sinkhorn,
    sinkhorn_divergence,
    value_and_grad,
)
from .sinkhorn import ConvergenceWarning, Gradients, SinkhornResult, epsilon_schedule

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "Gradients",
    "Method",
    "OTTransformer",
    "PluginId",
    "SinkhornResult",
    "energy_distance",
    "epsilon_schedule",
    "gaussian_mmd",
    "hausdorff_divergence",
    "laplacian_mmd",
    "sinkhorn",
    "sinkhorn_divergence",
    "value_and_grad",
    "warmup",
]


def __getattr__(name):
    """``OTTransformer`` imports scikit-learn, so it is loaded on first use only."""
    if name == "OTTransformer":
        try:
            from .transformer import OTTransformer
        except ImportError as err:
            raise ImportError(
                f"ot_agnostic.OTTransformer needs scikit-learn ({err}); install it with "
                "`pip install scikit-learn` or `pip install ot_agnostic[sklearn]`."
            ) from err
        return OTTransformer
    raise AttributeError(f"module 'ot_agnostic' has no attribute {name!r}")
