"""``ot_agnostic.OTTransformer`` (``ot_agnostic/transformer.py``).

* scikit-learn's own estimator checks (``parametrize_with_checks``; with
  ``SCIPY_ARRAY_API=1``, which ``scripts/test.sh`` sets, they include its Array API checks
  on array-api-strict and torch);
* the map against POT's ``ot.da.SinkhornTransport`` on the training points (same plan:
  POT's cost ``|x - y|^2`` with ``reg_e = 2 eps`` is ours, ``|x - y|^2 / 2`` with ``eps``) and
  against the closed-form Gaussian map;
* workflows: Pipeline, clone, GridSearchCV (score), set_output, pickle;
* Array API dispatch: torch and array-api-strict in, the same library out; mixing libraries
  raises;
* small versions of the two documented examples (colour transfer, domain shift).
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="OTTransformer needs scikit-learn")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import ot_agnostic as ota  # noqa: E402
from ot_agnostic import OTTransformer  # noqa: E402


@parametrize_with_checks([OTTransformer(), OTTransformer(target="uniform", p=1, blur=0.2, reach=1.0)])
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        check(estimator)


def _skewed(seed, n, d=2):
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, size=(n, d)) * [1.0, 0.5]


def test_training_points_map_like_pot_sinkhorn_transport():
    pot = pytest.importorskip("ot", reason="POT is not installed")
    X = _skewed(0, 200)
    Y = np.random.default_rng(1).normal(size=(150, 2)) + 2.0
    blur = 0.3
    ours = OTTransformer(target=Y, blur=blur, tol=1e-6, max_iter=20_000).fit(X)
    ref = pot.da.SinkhornTransport(reg_e=2 * blur**2, max_iter=100_000, tol=1e-12).fit(Xs=X, Xt=Y)
    moved, expected = ours.transform(X), ref.transform(Xs=X)
    assert np.abs(moved - expected).max() <= 1e-3 * np.abs(expected).max()
    back, expected_back = ours.inverse_transform(Y), ref.inverse_transform(Xt=Y)
    assert np.abs(back - expected_back).max() <= 1e-3 * np.abs(expected_back).max()


def test_gaussian_to_standard_normal_is_the_affine_map():
    """Between Gaussians N(m, s^2 I) and N(0, I) the OT map is x -> (x - m) / s; the entropic
    map of samples approaches it (blur small, many samples), also on points not seen in fit."""
    rng = np.random.default_rng(2)
    m, s = np.array([3.0, -1.0]), 2.0
    X = m + s * rng.normal(size=(3000, 2))
    model = OTTransformer(blur=0.1, random_state=0, n_target_samples=3000).fit(X)
    fresh = m + s * rng.normal(size=(500, 2)) * 0.7  # unseen points, inside the bulk
    error = np.abs(model.transform(fresh) - (fresh - m) / s)
    # measured: median 0.033, 95th percentile 0.085 (sampling noise: 3000 points); the identity,
    # or a map that forgets the 1/s, is off by more than 1
    assert np.median(error) < 0.06 and np.quantile(error, 0.95) < 0.2
    assert np.median(np.abs(model.inverse_transform(model.transform(fresh)) - fresh)) < 0.15


def test_transport_brings_the_samples_to_the_target():
    X = _skewed(3, 400)
    model = OTTransformer(random_state=0).fit(X)
    before = float(ota.sinkhorn_divergence(X, model.target_, blur=0.1))
    after = -model.score(X)
    assert 0 <= after < 0.05 * before
    assert model.n_iter_ > 1 and model.backend_ == "numba/online"


def test_fit_keeps_the_parameters_and_sets_underscored_attributes():
    Y = np.random.default_rng(4).random((80, 2))
    model = OTTransformer(target=Y, blur=0.2)
    params = model.get_params()
    model.fit(_skewed(4, 100))
    assert model.get_params()["target"] is Y and {k: v for k, v in model.get_params().items() if k != "target"} == {
        k: v for k, v in params.items() if k != "target"
    }
    assert model.source_.shape == (100, 2) and model.target_.shape == (80, 2)
    assert model.f_.shape == (100,) and model.g_.shape == (80,) and model.eps_ == pytest.approx(0.04)


def test_pipeline_clone_gridsearch_pickle_and_set_output():
    X = _skewed(5, 300)
    pipe = make_pipeline(StandardScaler(), OTTransformer(random_state=0))
    Z = pipe.fit_transform(X)
    assert Z.shape == X.shape
    np.testing.assert_allclose(clone(pipe).fit(X).transform(X), Z, rtol=1e-10)
    restored = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_allclose(restored.transform(X[:7]), Z[:7], rtol=1e-12)
    # one score_blur for every candidate: a sharper map lands closer to the target
    search = GridSearchCV(OTTransformer(random_state=0, score_blur=0.1), {"blur": [0.1, 0.5]}, cv=3)
    search.fit(StandardScaler().fit_transform(X))
    assert search.best_params_["blur"] == 0.1
    assert search.cv_results_["mean_test_score"][0] > search.cv_results_["mean_test_score"][1]
    pd = pytest.importorskip("pandas")
    frame = OTTransformer(random_state=0).set_output(transform="pandas").fit_transform(
        pd.DataFrame(X, columns=["height", "width"])
    )
    assert list(frame.columns) == ["height", "width"] and frame.shape == X.shape


@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
def test_array_api_dispatch_keeps_the_library(library):
    xp = pytest.importorskip(library)
    X = _skewed(6, 120)
    ref = OTTransformer(random_state=0).fit(X)
    Xl = xp.asarray(X)
    with sklearn.config_context(array_api_dispatch=True):
        model = OTTransformer(random_state=0).fit(Xl)
        Z = model.transform(Xl)
        back = model.inverse_transform(Z)
        with pytest.raises(ValueError, match="must use the same namespace"):
            model.transform(X)
    assert type(Z) is type(Xl) and type(back) is type(Xl) and type(model.g_) is type(Xl)
    # Two code paths (Numba, Array API) refined to tol=1e-3 stop after different updates:
    # the maps agree to the refinement's error (measured <= 3e-4 of the data's spread).
    np.testing.assert_allclose(np.asarray(Z), ref.transform(X), rtol=0, atol=2e-3 * np.ptp(X))
    with pytest.raises(ValueError, match="numpy array .* works on"):
        model.transform(X)  # without dispatch, numpy input to a fitted torch model: clear error


def test_bad_settings_and_targets_raise_clearly():
    X = _skewed(7, 50)
    with pytest.raises(ValueError, match="unknown target 'gaussian'"):
        OTTransformer(target="gaussian").fit(X)
    with pytest.raises(ValueError, match=r"target must be an \(M, 2\) array"):
        OTTransformer(target=np.zeros((10, 3))).fit(X)
    with pytest.raises(ValueError, match="NaN or infinite"):
        OTTransformer(target=np.full((10, 2), np.nan)).fit(X)
    with pytest.raises(TypeError, match="target must be 'normal', 'uniform' or an"):
        OTTransformer(target=[[0.0, 1.0]]).fit(X)
    for kwargs, match in [(dict(p=3), "p must be 1 or 2"), (dict(blur=0), "blur"), (dict(tol=-1), "tol"),
                          (dict(max_iter=-1), "max_iter"), (dict(n_target_samples=0), "n_target_samples"),
                          (dict(backend="gpu"), "unknown backend")]:
        with pytest.raises(ValueError, match=match):
            OTTransformer(**kwargs).fit(X)


def test_too_few_iterations_warn():
    with pytest.warns(sklearn.exceptions.ConvergenceWarning, match="max_iter=2"):
        OTTransformer(blur=0.05, max_iter=2, random_state=0).fit(_skewed(8, 100))


def test_colour_transfer_example_small():
    """The documented example on 300-pixel samples: the recoloured photograph's colours are
    much closer (Sinkhorn divergence) to the target photograph's than the original's."""
    pytest.importorskip("PIL", reason="load_sample_image needs Pillow")
    from examples.colour_transfer import pixels, recolour

    source, target = pixels("china.jpg"), pixels("flower.jpg")
    rng = np.random.default_rng(0)
    src, tgt = source[rng.choice(len(source), 300)], target[rng.choice(len(target), 300)]
    recoloured = recolour(src, tgt, fit_pixels=300, seed=0)
    before = float(ota.sinkhorn_divergence(src, tgt, blur=0.05))
    after = float(ota.sinkhorn_divergence(recoloured, tgt, blur=0.05))
    assert recoloured.shape == src.shape and recoloured.min() >= 0 and recoloured.max() <= 1
    assert after < 0.2 * before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_domain_shift_example(seed):
    """The documented example: miscalibrated features cost the classifier 25-40 points of
    accuracy; transport onto the source samples (no labels) gives them back."""
    from examples.domain_shift import accuracies

    plain, adapted, reference = accuracies(seed=seed)
    assert reference > 0.9 and plain < 0.75
    assert adapted > 0.9 and adapted > plain + 0.2


def test_missing_scikit_learn_is_a_clear_import_error():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import ot_agnostic\n"
        "try:\n    ot_agnostic.OTTransformer\nexcept ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install scikit-learn" in out.stdout and "ot_agnostic[sklearn]" in out.stdout
