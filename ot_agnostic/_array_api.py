"""Namespace, device and small numerical helpers over ``array_api_compat``.

Nothing here imports a framework: array types are recognised through
``array_api_compat``, which only looks at modules that are already imported.
"""

from __future__ import annotations

import functools
import math
import sys

import array_api_compat

from ._jax import is_jax_tracer


def array_namespace(*arrays):
    """Return the Array API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises a ``TypeError`` that names the offending types when the inputs are not
    arrays or come from different array libraries.
    """
    present = [arr for arr in arrays if arr is not None]
    for arr in present:
        if not array_api_compat.is_array_api_obj(arr):
            raise TypeError(
                f"expected an array (NumPy, torch, CuPy or any Array API library), got "
                f"{type(arr).__name__}. Wrap lists and scalars first, e.g. numpy.asarray(...)."
            )
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as err:
        kinds = sorted({f"{type(arr).__module__}.{type(arr).__name__}" for arr in present})
        raise TypeError(
            f"all arrays must come from the same array library, got {', '.join(kinds)}. "
            "Convert them to one library first (e.g. torch.as_tensor or numpy.asarray)."
        ) from err


def device_of(x):
    """Device of ``x`` as reported by ``array_api_compat.device``."""
    return array_api_compat.device(x)


def check_same_device(*arrays) -> None:
    """Raise ``ValueError`` if the arrays do not all live on one device.

    JAX tracers report no device: those inside an eager ``jax.grad`` are compared through
    their values; abstract ones (under ``jax.jit``) are skipped (JAX places them itself).
    """
    present = [stop_gradient(arr) for arr in arrays if arr is not None]
    present = [arr for arr in present if not is_jax_tracer(arr)]
    devices = [device_of(arr) for arr in present]
    if any(dev != devices[0] for dev in devices[1:]):
        raise ValueError(
            f"all arrays must be on the same device, got {sorted({str(d) for d in devices})}. "
            "Move them to one device first (e.g. tensor.to(device))."
        )


def device_memory(x) -> int | None:
    """Total memory in bytes of the device that holds ``x`` (host RAM for CPU arrays), or
    None when it cannot be told. Never imports a framework that ``x`` does not come from."""
    import os

    if array_api_compat.is_torch_array(x) and x.device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(x.device).total_memory)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return int(cupy.cuda.Device(x.device.id).mem_info[1])
    if array_api_compat.is_torch_array(x) and x.device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def to_host(x):
    """A NumPy copy of ``x`` (for small bookkeeping arrays: cluster ranges, masks)."""
    import numpy as np

    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    try:
        return np.asarray(x)
    except RuntimeError:  # e.g. array-api-strict's non-default devices: via the default one
        default = array_api_compat.array_namespace(x).__array_namespace_info__().default_device()
        return np.asarray(x.to_device(default))


def requires_grad(x) -> bool:
    """True when ``x`` is an autograd array that records gradients (torch today)."""
    return bool(getattr(x, "requires_grad", False)) and array_api_compat.is_torch_array(x)


def stop_gradient(x):
    """``x`` cut from the autograd graph (a no-op for libraries without autograd).

    A JAX tracer gives ``jax.lax.stop_gradient(x)``: its concrete value inside an eager
    ``jax.grad`` (still a tracer under ``jax.jit``).
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if is_jax_tracer(x):
        return sys.modules["jax"].lax.stop_gradient(x)
    return x


SECOND_ORDER_MESSAGE = (
    "ot_agnostic computes first derivatives only, so a second backward pass (create_graph=True, "
    "then backward through the gradient: Hessians, gradient penalties) is refused: the Sinkhorn "
    "losses' gradients come from the final Sinkhorn update (envelope theorem), whose own "
    "derivative is not the loss's, and the KeOps reductions are first order. Use finite "
    "differences of the gradient instead."
)


def first_order_only(*arrays):
    """``arrays`` unchanged, but a second derivative through the torch tensors among them raises.

    A no-op for tensors that do not require gradients and for other libraries.
    """
    tracked = [i for i, x in enumerate(arrays) if requires_grad(x)]
    if not tracked:
        return arrays
    guarded = _first_order_guard()(*(arrays[i] for i in tracked))
    out = list(arrays)
    for i, x in zip(tracked, guarded):
        out[i] = x
    return tuple(out)


@functools.cache
def _first_order_guard():
    import torch

    class _Refuse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, grad, *inputs):
            return grad.clone()

        @staticmethod
        def backward(ctx, *_):
            raise RuntimeError(SECOND_ORDER_MESSAGE)

    class _Guard(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return tuple(x.view_as(x) for x in inputs)

        @staticmethod
        def backward(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual first-order backward
                return grads
            # create_graph=True: each gradient becomes a node, tied to every input, whose
            # backward raises, whichever input a second derivative is then taken against.
            inputs = ctx.saved_tensors
            return tuple(_Refuse.apply(grad, *inputs) for grad in grads)

    return _Guard.apply


def logsumexp(values, *, axis: int, xp):
    """Stable ``log(sum(exp(values), axis))``; rows that are all ``-inf`` give ``-inf``."""
    vmax = xp.max(values, axis=axis, keepdims=True)
    all_minus_inf = vmax == -math.inf
    vmax = xp.where(xp.isfinite(vmax), vmax, xp.zeros_like(vmax))
    # Terms below exp(floor) are clipped up to it: they add at most N * 1e-38 (float32) to a
    # sum >= 1, and no denormal number is ever produced (they make CPU arithmetic ~10x slower).
    floor = _DENORMAL_FREE_LOG[8 if values.dtype == xp.float64 else 4]
    total = xp.sum(xp.exp(xp.clip(values - vmax, min=floor)), axis=axis, keepdims=True)
    lse = xp.log(total) + vmax
    lse = xp.where(all_minus_inf, xp.full_like(lse, -math.inf), lse)
    return xp.squeeze(lse, axis=axis)


#: log of (a little above) the smallest normal float: exp() of anything above it is normal.
_DENORMAL_FREE_LOG = {4: -87.0, 8: -708.0}


#: log-weight of an empty bin: low enough that ``floor - C / eps`` never beats a real term
#: (GeomLoss uses -1e5, which leaks once ``C / eps > 1e5``), finite so that no NaN appears.
LOG_ZERO = -1e30


def safe_log(w, *, xp, floor: float = LOG_ZERO):
    """``log(w)`` where ``w > 0`` and ``floor`` where ``w == 0`` (no warning, no ``-inf``).

    Zero weights thus drop out of every log-sum-exp.
    """
    positive = w > 0
    return xp.where(positive, xp.log(xp.where(positive, w, xp.ones_like(w))), floor)


def safe_sqrt(z, *, xp):
    """``sqrt(max(z, 0))`` whose autograd derivative is 0 (not ``inf``/NaN) at ``z <= 0``."""
    positive = z > 0
    return xp.where(positive, xp.sqrt(xp.where(positive, z, xp.ones_like(z))), xp.zeros_like(z))


def to_float(x) -> float:
    """A 0-d array (any library, any device) as a Python float."""
    return float(stop_gradient(x))
