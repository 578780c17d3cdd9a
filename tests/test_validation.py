"""Input validation: every bad input fails early with the right exception and a helpful message.

Each error test checks the exception type, the key words of the message (what is wrong) and the
part that says what to do. Every public function is covered where the argument applies, on every
array library of the ``lib`` fixture. The documented non-errors (integer and float16 inputs,
zero weights) are checked against independent computations on float data.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from tests.helpers import TOL, library_of, load_library, to_lib, to_numpy

import ot_agnostic as ota


def _sinkhorn_value(x, y, a=None, b=None, **kwargs):
    return ota.sinkhorn(x, y, a, b, **kwargs).value


#: name -> (function, keyword arguments it accepts beyond ``backend``)
FUNCTIONS = {
    "sinkhorn": (_sinkhorn_value, {"p", "blur", "reach", "diameter", "scaling"}),
    "sinkhorn_divergence": (ota.sinkhorn_divergence, {"p", "blur", "reach", "diameter", "scaling"}),
    "energy_distance": (ota.energy_distance, set()),
    "gaussian_mmd": (ota.gaussian_mmd, {"blur"}),
    "laplacian_mmd": (ota.laplacian_mmd, {"blur"}),
    "hausdorff_divergence": (ota.hausdorff_divergence, {"p", "blur"}),
}
ALL = sorted(FUNCTIONS)


def functions_with(keyword):
    return [name for name in ALL if keyword in FUNCTIONS[name][1]]


def call(name, *args, **kwargs):
    return FUNCTIONS[name][0](*args, **kwargs)


def clouds(N=5, M=4, D=2, B=None, seed=0):
    """Float64 NumPy points and normalised positive weights (batched when B is given)."""
    rng = np.random.default_rng(seed)
    lead = () if B is None else (B,)
    x = rng.normal(size=lead + (N, D))
    y = rng.normal(size=lead + (M, D)) + 0.5
    a = rng.uniform(0.5, 1.5, size=lead + (N,))
    b = rng.uniform(0.5, 1.5, size=lead + (M,))
    a /= a.sum(axis=-1, keepdims=True)
    b /= b.sum(axis=-1, keepdims=True)
    return x, y, a, b


def as_lib(lib, *arrays, dtype="float64"):
    return tuple(None if arr is None else to_lib(arr, lib, dtype) for arr in arrays)


# ----------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["x", "y", "a", "b"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_are_refused(lib, name, where, bad):
    arrays = dict(zip("xyab", clouds()))
    arrays[where] = arrays[where].copy()
    arrays[where].flat[1] = bad
    x, y, a, b = as_lib(lib, *(arrays[k] for k in "xyab"))
    with pytest.raises(ValueError, match=rf"^{where} contains NaN or infinite values") as info:
        call(name, x, y, a, b)
    assert "remove or impute" in str(info.value)


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", ["x", "y"])
def test_one_dimensional_points_are_refused_with_a_reshape_hint(lib, name, which):
    x, y, _, _ = clouds()
    x1, y1 = (x[:, 0], y) if which == "x" else (x, y[:, 0])
    x1, y1 = as_lib(lib, x1, y1)
    with pytest.raises(ValueError, match=rf"^{which} must have shape \(N, D\) or \(B, N, D\)") as info:
        call(name, x1, y1)
    assert "Reshape 1-D data to (N, 1)" in str(info.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", ["x", "y"])
def test_four_dimensional_points_are_refused(lib, name, which):
    x, y, _, _ = clouds(B=2)
    x4, y4 = (x[None], y) if which == "x" else (x, y[None])
    shape = (x4 if which == "x" else y4).shape
    x4, y4 = as_lib(lib, x4, y4)
    with pytest.raises(ValueError, match=rf"^{which} must have shape \(N, D\) or \(B, N, D\)") as info:
        call(name, x4, y4)
    assert f"got an array with shape {shape}" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_batched_and_unbatched_points_cannot_be_mixed(lib, name):
    x, _, _, _ = clouds()
    _, y3, _, _ = clouds(B=2)
    x, y3 = as_lib(lib, x, y3)
    with pytest.raises(ValueError, match=r"x and y must both be \(N, D\) or both be batched") as info:
        call(name, x, y3)
    assert "(5, 2)" in str(info.value) and "(2, 4, 2)" in str(info.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batched", [False, True])
def test_dimension_mismatch_is_refused(lib, name, batched):
    B = 2 if batched else None
    x, _, _, _ = clouds(D=2, B=B)
    _, y, _, _ = clouds(D=3, B=B)
    x, y = as_lib(lib, x, y)
    with pytest.raises(ValueError, match=r"same dimension D, got D=2 for x and D=3 for y"):
        call(name, x, y)


@pytest.mark.parametrize("name", ALL)
def test_batch_size_mismatch_is_refused(lib, name):
    x, _, _, _ = clouds(B=2)
    _, y, _, _ = clouds(B=3)
    x, y = as_lib(lib, x, y)
    with pytest.raises(ValueError, match=r"different batch sizes: 2 and 3"):
        call(name, x, y)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("batched", [False, True])
def test_empty_point_clouds_are_refused(lib, name, which, batched):
    B = 2 if batched else None
    x, y, _, _ = clouds(N=0 if which == "x" else 5, M=0 if which == "y" else 4, B=B)
    x, y = as_lib(lib, x, y)
    with pytest.raises(ValueError, match=rf"^{which} is an empty point cloud") as info:
        call(name, x, y)
    assert "give at least one point" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_zero_dimensional_points_are_refused(lib, name):
    x, y = as_lib(lib, np.zeros((5, 0)), np.zeros((4, 0)))
    with pytest.raises(ValueError, match=r"^x has zero coordinates per point \(shape \(5, 0\)\)"):
        call(name, x, y)


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["a", "b"])
def test_negative_weights_are_refused(lib, name, where):
    arrays = dict(zip("xyab", clouds()))
    arrays[where] = arrays[where].copy()
    arrays[where][0] = -0.1
    x, y, a, b = as_lib(lib, *(arrays[k] for k in "xyab"))
    with pytest.raises(ValueError, match=rf"^{where} has negative entries") as info:
        call(name, x, y, a, b)
    assert "must be non-negative" in str(info.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("batched", [False, True])
def test_zero_total_mass_is_refused(lib, name, where, batched):
    arrays = dict(zip("xyab", clouds(B=2 if batched else None)))
    arrays[where] = arrays[where].copy()
    if batched:
        arrays[where][1] = 0.0  # only the second measure of the batch is empty
    else:
        arrays[where][:] = 0.0
    x, y, a, b = as_lib(lib, *(arrays[k] for k in "xyab"))
    with pytest.raises(ValueError, match=rf"^{where} has zero total mass") as info:
        call(name, x, y, a, b)
    assert "give at least one positive weight" in str(info.value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "where, shape, expected",
    [
        ("a", (6,), "(5,)"),  # one too many
        ("a", (5, 1), "(5,)"),  # column vector
        ("b", (3,), "(4,)"),  # one too few
        ("b", (1, 4), "(4,)"),  # batched weights for unbatched points
    ],
)
def test_weights_of_the_wrong_shape_are_refused(lib, name, where, shape, expected):
    arrays = dict(zip("xyab", clouds()))
    arrays[where] = np.full(shape, 1.0 / shape[-1])
    x, y, a, b = as_lib(lib, *(arrays[k] for k in "xyab"))
    with pytest.raises(ValueError, match=rf"^{where} has shape {re.escape(str(shape))}") as info:
        call(name, x, y, a, b)
    assert f"expected weights of shape {expected}" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_unbatched_weights_for_batched_points_are_refused(lib, name):
    x, y, a, b = clouds(B=2)
    x, y, a = as_lib(lib, x, y, a[0])
    with pytest.raises(ValueError, match=r"^a has shape \(5,\)") as info:
        call(name, x, y, a)
    assert "expected weights of shape (2, 5)" in str(info.value)


@pytest.mark.parametrize("name", ["sinkhorn", "sinkhorn_divergence"])
@pytest.mark.parametrize("batched", [False, True])
def test_balanced_ot_refuses_unequal_masses_and_says_what_to_do(lib, name, batched):
    x, y, a, b = clouds(B=2 if batched else None)
    b = b.copy()
    if batched:
        b[1] *= 2.0  # only one measure of the batch is unbalanced
    else:
        b *= 2.0
    x, y, a, b = as_lib(lib, x, y, a, b)
    with pytest.raises(ValueError, match=r"balanced OT \(reach=None\) needs equal total masses") as info:
        call(name, x, y, a, b)
    message = str(info.value)
    assert "m(a)=1" in message and "m(b)=2" in message
    assert "Normalise the weights" in message and "`reach`" in message
    # Unbalanced OT accepts the same input and returns a finite value.
    value = to_numpy(call(name, x, y, a, b, reach=0.5))
    assert np.all(np.isfinite(value))
    assert value.shape == ((2,) if batched else ())


# ----------------------------------------------------------------------------------------
# Scalar parameters
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", functions_with("blur"))
@pytest.mark.parametrize("blur", [0.0, -0.1, math.nan, math.inf])
def test_blur_must_be_finite_and_positive(lib, name, blur):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(ValueError, match=r"^blur must be a finite positive number, got"):
        call(name, x, y, blur=blur)


@pytest.mark.parametrize("name", functions_with("blur"))
@pytest.mark.parametrize("blur", ["abc", None, [0.1]])
def test_blur_must_be_a_number(lib, name, blur):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(TypeError, match=rf"^blur must be a positive number, got {re.escape(repr(blur))}"):
        call(name, x, y, blur=blur)


@pytest.mark.parametrize("name", functions_with("scaling"))
@pytest.mark.parametrize("scaling", [0, 1, 1.5, -0.1, math.nan])
def test_scaling_must_lie_strictly_between_zero_and_one(lib, name, scaling):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(ValueError, match=r"^scaling must be in \(0, 1\)") as info:
        call(name, x, y, scaling=scaling)
    assert "0.5 is fast, 0.9 to 0.99 is more accurate" in str(info.value)


@pytest.mark.parametrize("name", functions_with("scaling"))
def test_scaling_must_be_a_number(lib, name):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(TypeError, match=r"^scaling must be a number in \(0, 1\), got 'fast'"):
        call(name, x, y, scaling="fast")


@pytest.mark.parametrize("name", functions_with("reach"))
@pytest.mark.parametrize("param", ["reach", "diameter"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_reach_and_diameter_must_be_positive(lib, name, param, value):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(ValueError, match=rf"^{param} must be a finite positive number, got"):
        call(name, x, y, **{param: value})


@pytest.mark.parametrize("name", functions_with("p"))
@pytest.mark.parametrize("p", [3, 0, 1.5, True, False, "2"])
def test_p_must_be_one_or_two(lib, name, p):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(ValueError, match=rf"^p must be 1 or 2 \(cost \|x - y\|\^p / p\), got {re.escape(repr(p))}"):
        call(name, x, y, p=p)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["gpu", "Online", "", None])
def test_unknown_backend_lists_the_options(lib, name, backend):
    x, y, _, _ = as_lib(lib, *clouds())
    with pytest.raises(ValueError, match=rf"^unknown backend {re.escape(repr(backend))}") as info:
        call(name, x, y, backend=backend)
    message = str(info.value)
    assert "choose a method ('auto', 'tensorized', 'online', 'multiscale')" in message
    assert "a plugin ('array_api', 'keops', 'numba', 'numba_cuda')" in message


@pytest.mark.parametrize("name", ALL)
def test_multiscale_backend_is_for_sinkhorn_losses_only(lib, name):
    x, y, _, _ = as_lib(lib, *clouds())
    if name in ("sinkhorn", "sinkhorn_divergence", "value_and_grad"):
        call(name, x, y, backend="multiscale")  # runs (its accuracy: tests/test_multiscale.py)
        return
    with pytest.raises(NotImplementedError, match=r"backend='multiscale' applies to the Sinkhorn losses") as info:
        call(name, x, y, backend="multiscale")
    assert "use backend='online'" in str(info.value)


# ----------------------------------------------------------------------------------------
# Array types, libraries, devices
# ----------------------------------------------------------------------------------------

MIXED = [("numpy", "torch"), ("torch", "numpy"), ("numpy", "array_api_strict"), ("array_api_strict", "torch")]
TYPE_NAMES = {"numpy": "numpy.ndarray", "torch": "torch.Tensor", "array_api_strict": "array_api_strict"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lib_x, lib_other", MIXED)
@pytest.mark.parametrize("where", ["y", "a", "b"])
def test_mixed_array_libraries_are_refused_naming_both(name, lib_x, lib_other, where):
    arrays = dict(zip("xyab", clouds()))
    converted = {k: to_lib(v, lib_other if k == where else lib_x) for k, v in arrays.items()}
    with pytest.raises(TypeError, match=r"all arrays must come from the same array library") as info:
        call(name, *(converted[k] for k in "xyab"))
    message = str(info.value)
    assert TYPE_NAMES[lib_x] in message and TYPE_NAMES[lib_other] in message
    assert "Convert them to one library first" in message


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["x", "y", "a"])
def test_python_lists_are_refused_with_an_asarray_hint(name, where):
    arrays = dict(zip("xyab", clouds()))
    arrays[where] = arrays[where].tolist()
    with pytest.raises(TypeError, match=r"expected an array .* got list") as info:
        call(name, *(arrays[k] for k in "xyab"))
    assert "numpy.asarray" in str(info.value)


COMPLEX = {"numpy": "complex128", "torch": "complex64", "array_api_strict": "complex128"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", ["x", "y"])
def test_complex_points_are_refused(lib, name, which):
    x, y, _, _ = clouds()
    if which == "x":
        x, y = to_lib(x + 1j * x, lib, COMPLEX[lib]), to_lib(y, lib)
    else:
        x, y = to_lib(x, lib), to_lib(y + 1j * y, lib, COMPLEX[lib])
    with pytest.raises(TypeError, match=r"^complex arrays are not supported") as info:
        call(name, x, y)
    assert "stack the real and imaginary parts" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_complex_weights_are_refused(lib, name):
    x, y, a, b = clouds()
    x, y, b = as_lib(lib, x, y, b)
    a = to_lib(a + 0j, lib, COMPLEX[lib])
    with pytest.raises(TypeError, match=r"^a has dtype .*complex.*: weights must be real numbers"):
        call(name, x, y, a, b)


def _meta_device_or_skip():
    torch = load_library("torch")
    import array_api_compat

    try:
        device = array_api_compat.device(torch.zeros(1, device="meta"))
    except Exception as err:  # pragma: no cover - depends on the installed versions
        pytest.skip(f"array_api_compat.device does not work on torch meta tensors: {err!r}")
    if str(device) != "meta":  # pragma: no cover
        pytest.skip(f"array_api_compat.device reports {device!r} for a meta tensor")
    return torch


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["y", "a", "b"])
def test_mixed_devices_are_refused(name, where):
    """No GPU here: torch's "meta" device stands in for a second device."""
    torch = _meta_device_or_skip()
    arrays = {k: torch.from_numpy(v) for k, v in zip("xyab", clouds())}
    arrays[where] = arrays[where].to("meta")
    with pytest.raises(ValueError, match=r"all arrays must be on the same device") as info:
        call(name, *(arrays[k] for k in "xyab"))
    message = str(info.value)
    assert "cpu" in message and "meta" in message
    assert "Move them to one device first" in message


# ----------------------------------------------------------------------------------------
# Documented non-errors
# ----------------------------------------------------------------------------------------

INTEGER_CASES = [("numpy", "int64", "float64"), ("torch", "int32", "float32"), ("array_api_strict", "int64", "float64")]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lib_name, int_dtype, default_float", INTEGER_CASES)
def test_integer_points_are_cast_to_the_default_float(name, lib_name, int_dtype, default_float):
    load_library(lib_name)
    rng = np.random.default_rng(3)
    x, y = rng.integers(-3, 4, size=(7, 2)), rng.integers(-3, 4, size=(6, 2))
    kwargs = {"blur": 1.0} if "blur" in FUNCTIONS[name][1] else {}
    value = call(name, to_lib(x, lib_name, int_dtype), to_lib(y, lib_name, int_dtype), **kwargs)
    reference = call(name, to_lib(x, lib_name, default_float), to_lib(y, lib_name, default_float), **kwargs)
    assert library_of(value) == lib_name
    assert value.dtype == reference.dtype
    assert str(value.dtype).endswith(default_float)
    np.testing.assert_allclose(to_numpy(value), to_numpy(reference), rtol=TOL[default_float], atol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("lib_name", ["numpy", "torch"])
def test_float16_is_computed_in_float32_and_returned_as_float16(name, lib_name):
    rng = np.random.default_rng(4)
    x16 = rng.normal(size=(9, 2)).astype("float16")
    y16 = (rng.normal(size=(8, 2)) + 1.0).astype("float16")
    kwargs = {"blur": 0.5} if "blur" in FUNCTIONS[name][1] else {}
    value = call(name, to_lib(x16, lib_name), to_lib(y16, lib_name), **kwargs)
    # the float32 computation on the same (exactly representable) coordinates
    reference = call(name, to_lib(x16, lib_name, "float32"), to_lib(y16, lib_name, "float32"), **kwargs)
    assert library_of(value) == lib_name
    assert str(value.dtype).endswith("float16")
    assert str(reference.dtype).endswith("float32")
    ref = to_numpy(reference)
    # only the final cast to float16 differs: half a float16 ulp, relative 2**-11
    np.testing.assert_allclose(to_numpy(value), ref, rtol=2.0**-10, atol=1e-7)
    # ... so the value is the float32 reference rounded to float16, within one float16 ulp
    # (2**-10 relative at most): the two float32 runs may differ by a float32 ulp (parallel
    # sums), which can flip a rounding to float16.
    rounded = ref.astype("float16").astype("float64")
    np.testing.assert_allclose(to_numpy(value), rounded, rtol=2.0**-10, atol=1e-7)


def _zero_weight_problem(B=None):
    rng = np.random.default_rng(5)
    lead = () if B is None else (B,)
    x = rng.normal(size=lead + (8, 2))
    y = rng.normal(size=lead + (6, 2)) + 0.5
    a = rng.uniform(0.5, 1.5, size=lead + (8,))
    b = rng.uniform(0.5, 1.5, size=lead + (6,))
    keep_x = np.array([True, False, True, True, False, True, True, True])
    keep_y = np.array([True, True, False, True, True, True])
    a[..., ~keep_x] = 0.0
    b[..., ~keep_y] = 0.0
    a /= a.sum(axis=-1, keepdims=True)
    b /= b.sum(axis=-1, keepdims=True)
    # place dropped points far away so that they would change every value if they counted
    x[..., ~keep_x, :] += 5.0
    y[..., ~keep_y, :] -= 5.0
    return x, y, a, b, keep_x, keep_y


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batched", [False, True])
def test_zero_weights_are_the_same_as_dropping_the_points(lib, dtype, name, batched):
    x, y, a, b, keep_x, keep_y = _zero_weight_problem(B=2 if batched else None)
    kwargs = {"blur": 0.5} if "blur" in FUNCTIONS[name][1] else {}
    if "diameter" in FUNCTIONS[name][1]:
        kwargs["diameter"] = 20.0  # the default diameter would see the dropped points
    full = call(name, *as_lib(lib, x, y, a, b, dtype=dtype), **kwargs)
    dropped = call(
        name,
        *as_lib(lib, x[..., keep_x, :], y[..., keep_y, :], a[..., keep_x], b[..., keep_y], dtype=dtype),
        **kwargs,
    )
    full, dropped = to_numpy(full), to_numpy(dropped)
    assert np.all(np.isfinite(full))
    scale = max(1.0, float(np.max(np.abs(dropped))))
    np.testing.assert_allclose(full, dropped, rtol=10 * TOL[dtype], atol=10 * TOL[dtype] * scale)


@pytest.mark.parametrize("name", ["sinkhorn_divergence", "energy_distance"])
def test_boolean_weights_are_cast_like_integers(lib, name):
    """The module docstring of ``_validation`` documents that boolean weights are cast to float."""
    x, y, _, _, keep_x, keep_y = _zero_weight_problem()
    kwargs = {"reach": 1.0} if "reach" in FUNCTIONS[name][1] else {}  # masses 6 and 5 differ
    as_float = call(name, *as_lib(lib, x, y, keep_x.astype("float64"), keep_y.astype("float64")), **kwargs)
    as_bool = call(name, *as_lib(lib, x, y), to_lib(keep_x, lib), to_lib(keep_y, lib), **kwargs)
    np.testing.assert_allclose(to_numpy(as_bool), to_numpy(as_float), rtol=TOL["float64"])


@pytest.mark.parametrize("name", ["sinkhorn_divergence", "hausdorff_divergence"])
@pytest.mark.parametrize("blur", [0.01, 0.001])
def test_zero_weights_drop_out_at_small_blur(lib, name, blur):
    """A zero-weight point right next to x must not count, however small blur is (here the
    positive-weight point of y is at distance 1, so C / eps = 1 / (2 blur^2) is up to 5e5)."""
    x, a = np.array([[0.0]]), np.array([1.0])
    y, b = np.array([[0.0], [1.0]]), np.array([0.0, 1.0])
    kwargs = {"blur": blur, **({"diameter": 1.0} if name == "sinkhorn_divergence" else {})}
    full = call(name, *as_lib(lib, x, y, a, b), **kwargs)
    dropped = call(name, *as_lib(lib, x, y[1:], a, b[1:]), **kwargs)
    # both measures are Dirac masses at distance 1: every divergence here equals C = 1/2
    np.testing.assert_allclose(to_numpy(dropped), 0.5, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(full), to_numpy(dropped), rtol=1e-12)


@pytest.mark.parametrize("lib_name", ["numpy", "torch"])
def test_float16_normalised_weights_pass_the_balance_check(lib_name):
    """Weights normalised in float16 carry float16 rounding (1/3 * 3 = 0.99976 there): the
    balance check must not refuse float16 input that is as normalised as float16 allows."""
    x = np.zeros((1, 2), dtype="float16")
    y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype="float16")
    a = np.ones(1, dtype="float16")
    b = np.full(3, 1 / 3, dtype="float16")
    assert float(b.astype(np.float64).sum()) != 1.0  # the float16 rounding this test is about
    value = ota.sinkhorn_divergence(*(to_lib(v, lib_name) for v in (x, y, a, b)), blur=0.5)
    assert str(value.dtype).endswith("float16")
    exact_weights = np.full(3, 1 / 3, dtype="float32")
    reference = ota.sinkhorn_divergence(x.astype("float32"), y.astype("float32"), a.astype("float32"),
                                        exact_weights, blur=0.5)
    np.testing.assert_allclose(to_numpy(value), to_numpy(reference), rtol=2e-3)
