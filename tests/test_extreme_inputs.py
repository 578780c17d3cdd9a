"""Inputs at the edges of the floating-point range: the right number or a clear error.

Each case here came out of fuzzing: huge finite coordinates, blurs far below the data's
scale, dense problems far above the machine's memory, files whose values overflow the
requested dtype.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic import cli


def _clouds(scale=1.0, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((30, 3)) * scale).astype(dtype), (rng.random((20, 3)) * scale).astype(dtype)


# -- huge coordinates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "compute",
    [
        lambda x, y: ota.sinkhorn_divergence(x, y),
        lambda x, y: ota.sinkhorn_divergence(x, y, p=1, reach=1e20),
        lambda x, y: ota.value_and_grad(x, y, backend="multiscale"),
        lambda x, y: ota.hausdorff_divergence(x, y, p=1),
    ],
)
def test_float32_coordinates_whose_squares_overflow_are_refused(compute):
    x, y = _clouds(1e20, "float32")
    with pytest.raises(ValueError, match=r"diameter of 1\.\d+e\+20: squared distances .* overflow float32"):
        compute(x, y)


def test_the_same_huge_points_in_float64_are_computed():
    x, y = _clouds(1e20, "float64")
    value = float(ota.sinkhorn_divergence(x, y, blur=0.05 * 1e20))
    reference = float(ota.sinkhorn_divergence(x / 1e20, y / 1e20, blur=0.05)) * 1e40  # p=2: L**2
    assert value == pytest.approx(reference, rel=1e-9)  # the same problem, rescaled exactly


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_energy_distance_of_huge_float32_points_is_computed_in_a_safe_frame(lib):
    """The energy distance is 1-homogeneous: computed on the points divided by a power of two."""
    x, y = _clouds(1e20, "float32")
    reference = float(ota.energy_distance(x.astype("float64"), y.astype("float64")))
    if lib == "torch":
        torch = pytest.importorskip("torch")
        x, y = torch.from_numpy(x).requires_grad_(), torch.from_numpy(y)
        value = ota.energy_distance(x, y)
        value.backward()
        assert bool(torch.isfinite(x.grad).all())
        value = value.item()
    else:
        value = float(ota.energy_distance(x, y))
    assert value == pytest.approx(reference, rel=1e-5)  # float32 sums of 600 distances


def test_blur_too_small_for_the_extent_is_refused_in_float32():
    x, y = _clouds(1.0, "float32")
    with pytest.raises(ValueError, match="blur=1e-19 is too small .* overflow float32"):
        ota.sinkhorn_divergence(x, y, blur=1e-19)
    # the same problem in float64 is fine (the costs over eps stay in range)
    assert np.isfinite(float(ota.sinkhorn_divergence(x.astype("float64"), y.astype("float64"), blur=1e-19)))


# -- kernel widths far below the data's scale ---------------------------------------------------


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype, blur", [("float64", 1e-200), ("float64", 1e-20), ("float32", 1e-20), ("float32", 1e-30)])
@pytest.mark.parametrize("name", ["gaussian_mmd", "laplacian_mmd"])
def test_kernel_norms_with_tiny_blurs_are_the_diagonal_terms(lib, dtype, blur, name):
    """For distinct points and blur -> 0, k(x_i, y_j) -> [x_i = y_j]: the norm is
    1/2 (sum a_i^2 + sum b_j^2) (it used to be ZeroDivisionError, NaN, or 0.0 silently)."""
    x, y = _clouds(1.0, dtype)
    exact = 0.5 * (1 / 30 + 1 / 20)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    for backend in ("auto", "tensorized", "online"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no overflow warning on the way
            value = float(getattr(ota, name)(x, y, blur=blur, backend=backend))
        assert value == pytest.approx(exact, rel=1e-6), backend  # float32 sums of ~50 terms


def test_kernel_norms_in_the_blur_frame_keep_their_values_and_gradients():
    torch = pytest.importorskip("torch")
    x, y = _clouds(1.0, "float64")
    for name, kernel in (("gaussian_mmd", lambda d2, s: np.exp(-d2 / (2 * s**2))),
                         ("laplacian_mmd", lambda d2, s: np.exp(-np.sqrt(d2) / s))):
        def dense(x, y, s=0.3):
            def k(p, q):
                return kernel(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1), s)
            a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
            return 0.5 * a @ k(x, x) @ a + 0.5 * b @ k(y, y) @ b - a @ k(x, y) @ b

        tx = torch.from_numpy(x).requires_grad_()
        value = getattr(ota, name)(tx, torch.from_numpy(y), blur=0.3)
        value.backward()
        assert value.item() == pytest.approx(dense(x, y), rel=1e-12)  # a plain NumPy formula
        direction = np.random.default_rng(1).normal(size=x.shape)
        h = 1e-6
        fd = (dense(x + h * direction, y) - dense(x - h * direction, y)) / (2 * h)
        # central differences: O(h^2) truncation and 1e-16 / h rounding, 1e-7 relative
        assert float((tx.grad.numpy() * direction).sum()) == pytest.approx(fd, rel=1e-7)


# -- dense problems far above the memory ----------------------------------------------------------


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_tensorized_refuses_a_cost_matrix_larger_than_the_memory(lib):
    x = np.zeros((200_000, 3), dtype="float32")
    if lib == "torch":
        torch = pytest.importorskip("torch")
        x = torch.from_numpy(x)
    for compute in (ota.sinkhorn_divergence, ota.energy_distance, ota.hausdorff_divergence):
        with pytest.raises(MemoryError, match=r"149\.0 GiB, above .* backend='online'"):
            compute(x, x, backend="tensorized")


# -- the command line ---------------------------------------------------------------------------------


def test_cli_float32_overflowing_file_is_one_clean_error_line(tmp_path, capsys):
    path = tmp_path / "big.txt"
    path.write_text("0 0 0\n1e39 1 1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning before our message
        code = cli.main(["divergence", str(path), str(path), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "big.txt: coordinates of size up to 1e+39 overflow float32" in err


def test_cli_huge_float32_points_are_one_clean_error_line(tmp_path, capsys):
    path = tmp_path / "huge.txt"
    path.write_text("0 0 0\n1e20 1 1\n2 2 2\n")
    code = cli.main(["divergence", str(path), str(path), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "overflow float32" in err and "Traceback" not in err
