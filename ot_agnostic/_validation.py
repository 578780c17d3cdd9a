"""Input checks shared by every public function: one place, clear messages.

Conventions enforced here (documented in the user guide):

* points are ``(N, D)`` or batched ``(B, N, D)``; weights are ``(N,)`` or ``(B, N)``;
* float32 and float64 are computed as given; integer and boolean points/weights are cast
  to the library's default floating dtype; float16/bfloat16 are computed in float32 and
  the result is cast back to the input dtype;
* weights must be finite, non-negative, with a positive total mass per measure.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ._array_api import array_namespace, check_same_device, device_of, first_order_only, stop_gradient
from ._jax import check_concrete

#: Relative tolerance on ``|m(a) - m(b)|`` for balanced OT, by compute dtype width (in bytes);
#: low-precision weights (float16) get ``4 * finfo.eps`` of their own dtype.
BALANCE_RTOL = {4: 1e-4, 8: 1e-6}


@dataclass(frozen=True)
class Measures:
    """Two validated, batched measures: ``x (B, N, D)``, ``a (B, N)``, ``y (B, M, D)``, ``b (B, M)``."""

    xp: Any
    x: Any
    y: Any
    a: Any
    b: Any
    batched: bool
    out_dtype: Any

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, N, M, D)``."""
        B, N, D = self.x.shape
        return B, N, self.y.shape[1], D

    def unbatch(self, value):
        """Drop the leading batch axis for unbatched inputs and cast to the output dtype."""
        value = self.xp.astype(value, self.out_dtype) if value.dtype != self.out_dtype else value
        return value if self.batched else value[0, ...]


def _compute_dtypes(xp, *arrays):
    """Return ``(compute_dtype, out_dtype)`` for the points, following the module rules."""
    float_dtypes = []
    for arr in arrays:
        dtype = arr.dtype
        if xp.isdtype(dtype, "complex floating"):
            raise TypeError(
                f"complex arrays are not supported (got {dtype}); pass real coordinates, "
                "e.g. stack the real and imaginary parts as two columns."
            )
        if xp.isdtype(dtype, "real floating"):
            float_dtypes.append(dtype)
        elif not (xp.isdtype(dtype, "integral") or xp.isdtype(dtype, "bool")):
            raise TypeError(f"unsupported dtype {dtype}: use float32 or float64 arrays.")
    if not float_dtypes:
        info = xp.__array_namespace_info__()
        default = info.default_dtypes(device=device_of(arrays[0]))["real floating"]
        return default, default
    out = float_dtypes[0]
    for dtype in float_dtypes[1:]:
        out = xp.result_type(out, dtype)
    if out in (xp.float32, xp.float64):
        return out, out
    # float16, bfloat16 and friends: compute in float32, give the result back in ``out``.
    return xp.float32, out


def _check_finite(xp, arr, name: str) -> None:
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(
            f"{name} contains NaN or infinite values; remove or impute them before computing OT."
        )


def _check_points(x, name: str) -> None:
    if x.ndim not in (2, 3):
        hint = " Reshape 1-D data to (N, 1)." if x.ndim == 1 else ""
        raise ValueError(
            f"{name} must have shape (N, D) or (B, N, D), got an array with shape {tuple(x.shape)}.{hint}"
        )
    if x.shape[-2] == 0:
        raise ValueError(f"{name} is an empty point cloud (shape {tuple(x.shape)}): give at least one point.")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has zero coordinates per point (shape {tuple(x.shape)}).")


def _weights(xp, w, points, name: str, pname: str, dtype, batched: bool):
    """Validated ``(B, N)`` weights for ``points (B, N, D)``; uniform ``1/N`` when ``w`` is None."""
    B, N, _ = points.shape
    if w is None:
        return xp.full((B, N), 1.0 / N, dtype=dtype, device=device_of(points))
    expected = (B, N) if batched else (N,)
    if tuple(w.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)} but {pname} has shape "
            f"{(B, N, points.shape[2]) if batched else (N, points.shape[2])}: "
            f"expected weights of shape {expected}."
        )
    if not xp.isdtype(w.dtype, ("real floating", "integral", "bool")):
        raise TypeError(f"{name} has dtype {w.dtype}: weights must be real numbers.")
    w = xp.astype(w, dtype) if w.dtype != dtype else w
    _check_finite(xp, w, name)
    if bool(xp.any(w < 0)):
        raise ValueError(f"{name} has negative entries: weights must be non-negative masses.")
    w = xp.reshape(w, (B, N))
    if bool(xp.any(xp.sum(w, axis=1) <= 0)):
        raise ValueError(f"{name} has zero total mass: give at least one positive weight.")
    return w


def validate_measures(x, y, a=None, b=None, *, balanced: bool = False) -> Measures:
    """Check and normalise ``(x, y, a, b)``; see the module docstring for the rules.

    ``balanced=True`` additionally requires ``m(a) == m(b)`` (up to rounding). JAX tracers
    are checked through their values (eager ``jax.grad``); abstract ones (``jax.jit``) are
    refused with a clear error, since these checks and the solvers need values.
    """
    xp = array_namespace(x, y, a, b)
    check_concrete(x, y, a, b)
    check_same_device(x, y, a, b)
    _check_points(x, "x")
    _check_points(y, "y")
    if x.ndim != y.ndim:
        raise ValueError(
            f"x and y must both be (N, D) or both be batched (B, N, D), got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must live in the same dimension D, got D={x.shape[-1]} for x and "
            f"D={y.shape[-1]} for y."
        )
    if x.ndim == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different batch sizes: {x.shape[0]} and {y.shape[0]}.")
    compute, out = _compute_dtypes(xp, x, y)
    batched = x.ndim == 3
    x3, y3 = (x, y) if batched else (x[None, ...], y[None, ...])
    x3 = xp.astype(x3, compute) if x3.dtype != compute else x3
    y3 = xp.astype(y3, compute) if y3.dtype != compute else y3
    _check_finite(xp, x3, "x")
    _check_finite(xp, y3, "y")
    a3 = _weights(xp, a, x3, "a", "x", compute, batched)
    b3 = _weights(xp, b, y3, "b", "y", compute, batched)
    if balanced:
        given = [w.dtype for w in (a, b) if w is not None and xp.isdtype(w.dtype, "real floating")]
        resolution = max((float(xp.finfo(dt).eps) for dt in given), default=0.0)
        _check_balanced(xp, a3, b3, max(BALANCE_RTOL[8 if a3.dtype == xp.float64 else 4], 4 * resolution))
    x3, y3, a3, b3 = first_order_only(x3, y3, a3, b3)
    return Measures(xp=xp, x=x3, y=y3, a=a3, b=b3, batched=batched, out_dtype=out)


def check_extent(measures: Measures, p: int, blur: float | None = None) -> float:
    """The diameter of the points' bounding box, after checking that the built-in costs and
    ``C / eps`` stay in the floating-point range of the compute dtype.

    Squared distances up to ``diameter**2`` are formed (p=1 takes their square root), and
    the softmins scale ``C`` by ``1 / eps = blur**-p``: both must stay 16 times below the
    dtype's largest number, otherwise the result would be ``inf`` or NaN.
    """
    from .sinkhorn import max_diameter

    xp = measures.xp
    diameter = max_diameter(stop_gradient(measures.x), stop_gradient(measures.y), xp=xp)
    largest = float(xp.finfo(measures.x.dtype).max) / 16
    dtype = str(measures.x.dtype).rsplit(".", 1)[-1]
    if not diameter < math.sqrt(largest):
        raise ValueError(
            f"the points span a diameter of {diameter:.3g}: squared distances (up to "
            f"{diameter:.3g}**2) overflow {dtype}. Rescale the points (divide x, y, blur and reach by one length "
            f"L: S_eps then scales by L**p) or compute in float64."
        )
    if blur is not None and diameter > 0 and p * math.log(diameter / blur) - math.log(p) >= math.log(largest):
        raise ValueError(
            f"blur={blur:.3g} is too small for points that span {diameter:.3g}: the costs over "
            f"eps = blur**{p} reach ({diameter:.3g} / {blur:.3g})**{p} / {p} and overflow {dtype}. "
            f"Use a larger blur, rescale the points, or compute in float64."
        )
    return diameter


def _check_balanced(xp, a, b, rtol) -> None:
    mass_a, mass_b = xp.sum(a, axis=1), xp.sum(b, axis=1)
    gap = xp.abs(mass_a - mass_b) > rtol * xp.maximum(mass_a, mass_b)
    if bool(xp.any(gap)):
        raise ValueError(
            f"balanced OT (reach=None) needs equal total masses, got m(a)={float(xp.max(mass_a)):.6g} "
            f"and m(b)={float(xp.max(mass_b)):.6g}. Normalise the weights (a / a.sum(), b / b.sum()) "
            "or use unbalanced OT with a finite `reach`."
        )


def check_positive(value, name: str, *, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    """Return ``float(value)`` after checking it is a finite positive (or zero) number."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}.") from None
    if not (math.isfinite(number) and (number > 0 or (allow_zero and number == 0))):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}.")
    return number


def check_power(length: float | None, p: int, name: str, power_name: str) -> None:
    """``length**p`` (eps from blur, rho from reach) must be a positive, finite float."""
    if length is None:
        return
    try:
        power = length**p
    except OverflowError:
        power = math.inf
    if not (0 < power < math.inf and math.isfinite(1 / power)):
        raise ValueError(
            f"{name}={length!r} gives {power_name} = {name}**{p} outside the floating-point range; "
            "rescale your data so that lengths are of order 1e-100 to 1e100."
        )


def check_scaling(scaling) -> float:
    """``scaling`` must lie strictly between 0 and 1 (the eps ratio per iteration is scaling**p)."""
    try:
        number = float(scaling)
    except (TypeError, ValueError):
        raise TypeError(f"scaling must be a number in (0, 1), got {scaling!r}.") from None
    if not 0.0 < number < 1.0:
        raise ValueError(
            f"scaling must be in (0, 1), got {scaling!r}: 0.5 is fast, 0.9 to 0.99 is more accurate."
        )
    return number


def check_p(p) -> int:
    """The exponent of the ground cost: 1 or 2."""
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p must be 1 or 2 (cost |x - y|^p / p), got {p!r}.")
    return int(p)


def check_cluster_labels(labels, measures):
    """``(labels_x (B, N), labels_y (B, M))``: integer arrays of the points' library and device,
    shaped like the weights (``(N,)`` / ``(M,)``, or batched ``(B, N)`` / ``(B, M)``)."""
    if not (isinstance(labels, (tuple, list)) and len(labels) == 2):
        raise TypeError(
            "cluster_labels must be a pair (labels_x, labels_y) of integer arrays of shapes (N,) "
            f"and (M,), not {type(labels).__name__}."
        )
    xp = measures.xp
    out = []
    for name, lab, points in (("labels_x", labels[0], measures.x), ("labels_y", labels[1], measures.y)):
        array_namespace(points, lab)
        check_same_device(points, lab)
        expected = tuple(points.shape[1:2]) if not measures.batched else tuple(points.shape[:2])
        if tuple(lab.shape) != expected or not xp.isdtype(lab.dtype, "integral"):
            raise ValueError(
                f"{name} must be an integer array of shape {expected} (one cluster label per "
                f"point), got {lab.dtype} of shape {tuple(lab.shape)}."
            )
        out.append(lab if measures.batched else lab[None, ...])
    return tuple(out)


def check_tol(tol) -> float | None:
    """``tol``: None (GeomLoss's fixed schedule) or a positive finite number below 1."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(
            f"tol must be None or a positive number (the marginal error to reach, e.g. 1e-3), got {tol!r}."
        )
    number = float(tol)
    if not (math.isfinite(number) and 0 < number < 1):
        raise ValueError(
            f"tol must be a number in (0, 1) (the relative marginal error to reach, e.g. 1e-3), got "
            f"{tol!r}; tol=None runs GeomLoss's fixed eps-scaling schedule instead."
        )
    return number


def check_max_iter(max_iter) -> int:
    """``max_iter``: a positive integer."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral):
        raise TypeError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}.")
    return int(max_iter)
