"""Mathematical invariants on generated point clouds (hypothesis, NumPy float64).

Clouds have N, M in 1..30 points in D in 1..5 dimensions, on a grid of step ``scale / 1000``
(duplicates, collinear and single-point clouds included) with ``scale`` spanning four orders of
magnitude; weights are positive (normalised when the invariant needs equal masses); ``blur`` is
between 5% and 100% of the data's diameter. Absolute tolerances are relative to ``diameter**p``,
the size of every cost in the problem.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ot_agnostic as ota

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: symmetric algorithms on identical data: only summation order differs
EXACT = 1e-9
#: identities that hold at convergence (translation), at the default tol
CONVERGED = 1e-4
#: symmetric identities after refinement to the default tol, in units of eps
REFINED = 1e-3


def bbox_diameter(*clouds):
    pts = np.concatenate(clouds)
    return float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))


@st.composite
def problems(draw, equal_masses=True):
    N = draw(st.integers(1, 30))
    M = draw(st.integers(1, 30))
    D = draw(st.integers(1, 5))
    scale = draw(st.sampled_from([0.01, 0.3, 1.0, 7.0, 100.0]))
    grid = st.integers(-1000, 1000)
    x = np.array(draw(st.lists(st.lists(grid, min_size=D, max_size=D), min_size=N, max_size=N)), float)
    y = np.array(draw(st.lists(st.lists(grid, min_size=D, max_size=D), min_size=M, max_size=M)), float)
    x, y = x * (scale / 1000), y * (scale / 1000)
    weight = st.floats(0.05, 1.0, allow_nan=False)
    a = np.array(draw(st.lists(weight, min_size=N, max_size=N)))
    b = np.array(draw(st.lists(weight, min_size=M, max_size=M)))
    if equal_masses:
        a, b = a / a.sum(), b / b.sum()
    p = draw(st.sampled_from([1, 2]))
    diameter = bbox_diameter(x, y)
    length = diameter if diameter > 0 else scale
    blur = draw(st.floats(0.05, 1.0)) * length
    return dict(x=x, y=y, a=a, b=b, p=p, blur=blur, diameter=diameter, length=length)


def S(x, y, a, b, **kwargs):
    value = float(ota.sinkhorn_divergence(x, y, a, b, **kwargs))
    assert np.isfinite(value)
    return value


# ----------------------------------------------------------------------------------------
# Sinkhorn divergence
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(problems())
def test_divergence_of_a_measure_with_itself_is_zero(pb):
    value = S(pb["x"], pb["x"], pb["a"], pb["a"], p=pb["p"], blur=pb["blur"], tol=None)
    assert abs(value) <= EXACT * pb["length"] ** pb["p"]
    # refined to tol, OT(a, a) is solved twice by different iterations: 0 to the refinement's
    # error, which is below tol * eps (the value's error is first order in the marginal error
    # times eps at most)
    value = S(pb["x"], pb["x"], pb["a"], pb["a"], p=pb["p"], blur=pb["blur"])
    assert abs(value) <= REFINED * pb["blur"] ** pb["p"] + EXACT * pb["length"] ** pb["p"]


@SETTINGS
@given(problems(), st.sampled_from([None, 1.0]))
def test_divergence_is_non_negative(pb, reach_factor):
    reach = None if reach_factor is None else reach_factor * pb["length"]
    value = S(pb["x"], pb["y"], pb["a"], pb["b"], p=pb["p"], blur=pb["blur"], reach=reach)
    assert value >= -1e-6 * pb["length"] ** pb["p"]


@SETTINGS
@given(problems())
def test_divergence_is_symmetric(pb):
    kwargs = dict(p=pb["p"], blur=pb["blur"], tol=None)
    forward = S(pb["x"], pb["y"], pb["a"], pb["b"], **kwargs)
    backward = S(pb["y"], pb["x"], pb["b"], pb["a"], **kwargs)
    assert forward == pytest.approx(backward, rel=EXACT, abs=EXACT * pb["length"] ** pb["p"])
    # refined to tol: the alternating updates start from the other side (see above)
    kwargs.pop("tol")
    forward = S(pb["x"], pb["y"], pb["a"], pb["b"], **kwargs)
    backward = S(pb["y"], pb["x"], pb["b"], pb["a"], **kwargs)
    assert abs(forward - backward) <= REFINED * pb["blur"] ** pb["p"] + EXACT * pb["length"] ** pb["p"]


@SETTINGS
@given(problems(), st.data())
def test_translation_gives_half_the_squared_shift_for_p2(pb, data):
    """S(a, a shifted by v) = |v|^2 / 2 for the quadratic cost, same weights (balanced)."""
    x, a = pb["x"], pb["a"]
    D = x.shape[1]
    v = np.array(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=D, max_size=D))) * pb["length"]
    y = x + v
    length = bbox_diameter(x, y) or pb["length"]
    blur = pb["blur"] / pb["length"] * length
    value = S(x, y, a, a, p=2, blur=blur)
    assert value == pytest.approx(float(v @ v) / 2, rel=CONVERGED, abs=CONVERGED * length**2)


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_points_with_their_weights_changes_nothing(pb, random):
    perm_x = list(range(len(pb["x"])))
    perm_y = list(range(len(pb["y"])))
    random.shuffle(perm_x)
    random.shuffle(perm_y)
    kwargs = dict(p=pb["p"], blur=pb["blur"])
    value = S(pb["x"], pb["y"], pb["a"], pb["b"], **kwargs)
    permuted = S(pb["x"][perm_x], pb["y"][perm_y], pb["a"][perm_x], pb["b"][perm_y], **kwargs)
    assert permuted == pytest.approx(value, rel=EXACT, abs=EXACT * pb["length"] ** pb["p"])


@SETTINGS
@given(problems(), st.sampled_from([0.01, 0.5, 2.0, 3.7, 1000.0]))
def test_scaling_covariance(pb, lam):
    """C and eps = blur**p both scale by lam**p: S(lam x, lam y; lam blur, lam diam) = lam**p S(x, y)."""
    p, blur, diameter = pb["p"], pb["blur"], pb["length"]
    # the number of eps steps is a ceil() of a ratio of logs: skip the rare ties broken by rounding
    assume(len(ota.epsilon_schedule(p, diameter, blur, 0.5))
           == len(ota.epsilon_schedule(p, lam * diameter, lam * blur, 0.5)))
    value = S(pb["x"], pb["y"], pb["a"], pb["b"], p=p, blur=blur, diameter=diameter)
    scaled = S(lam * pb["x"], lam * pb["y"], pb["a"], pb["b"], p=p, blur=lam * blur, diameter=lam * diameter)
    assert scaled == pytest.approx(lam**p * value, rel=EXACT, abs=EXACT * (lam * diameter) ** p)


# ----------------------------------------------------------------------------------------
# Kernel norms and the Hausdorff divergence
# ----------------------------------------------------------------------------------------

KERNEL_NORMS = ["energy_distance", "gaussian_mmd", "laplacian_mmd"]


def kernel_norm(name, x, y, a, b, blur):
    kwargs = {} if name == "energy_distance" else {"blur": blur}
    value = float(getattr(ota, name)(x, y, a, b, **kwargs))
    assert np.isfinite(value)
    return value


@SETTINGS
@given(problems(equal_masses=False), st.sampled_from(KERNEL_NORMS))
def test_kernel_norms_are_non_negative(pb, name):
    a, b = pb["a"], pb["b"]
    if name == "energy_distance":  # -|x - y| is only conditionally positive: equal masses
        a, b = a / a.sum(), b / b.sum()
    value = kernel_norm(name, pb["x"], pb["y"], a, b, pb["blur"])
    # every kernel value is at most max(1, diameter): rounding of sums of a few hundred terms
    size = max(1.0, pb["diameter"]) * (a.sum() + b.sum()) ** 2
    assert value >= -1e-12 * size


@SETTINGS
@given(problems(equal_masses=False), st.sampled_from(KERNEL_NORMS))
def test_kernel_norms_vanish_on_identical_inputs(pb, name):
    value = kernel_norm(name, pb["x"], pb["x"], pb["a"], pb["a"], pb["blur"])
    assert abs(value) <= 1e-12 * max(1.0, pb["diameter"]) * pb["a"].sum() ** 2


@SETTINGS
@given(problems(equal_masses=False))
def test_hausdorff_is_symmetric_and_vanishes_on_identical_inputs(pb):
    kwargs = dict(p=pb["p"], blur=pb["blur"])
    forward = float(ota.hausdorff_divergence(pb["x"], pb["y"], pb["a"], pb["b"], **kwargs))
    backward = float(ota.hausdorff_divergence(pb["y"], pb["x"], pb["b"], pb["a"], **kwargs))
    same = float(ota.hausdorff_divergence(pb["x"], pb["x"], pb["a"], pb["a"], **kwargs))
    size = pb["length"] ** pb["p"] * (pb["a"].sum() + pb["b"].sum())
    assert np.isfinite(forward)
    assert forward == pytest.approx(backward, rel=EXACT, abs=EXACT * size)
    assert abs(same) <= EXACT * size
