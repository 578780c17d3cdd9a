"""``OTTransformer``: entropic optimal transport as a scikit-learn transformer.

``fit(X)`` solves ``OT_eps`` between the source samples ``X`` and a target (samples, or a
named reference distribution); ``transform`` applies the entropic transport map to any
points, ``inverse_transform`` the reverse map. Works on NumPy arrays, and on torch, CuPy or
any Array API arrays when ``sklearn.set_config(array_api_dispatch=True)``: the maps run on
the plugins of :mod:`ot_agnostic.backends`, on the arrays' own library and device.

This module imports scikit-learn; ``ot_agnostic.OTTransformer`` imports it on first use.
"""

from __future__ import annotations

import math
import warnings

import array_api_compat
import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._array_api import check_same_namespace, get_namespace
from sklearn.utils.validation import check_is_fitted, validate_data

from ._array_api import device_of, to_float
from ._validation import (
    check_max_iter, check_p, check_positive, check_power, check_scaling, check_tol, validate_measures,
)
from .backends import Method, Selection, parse_backend, select_backend
from .costs import Cost
from .divergences import sinkhorn, sinkhorn_divergence
from .sinkhorn import DEFAULT_MAX_ITER, DEFAULT_TOL
from .sinkhorn import ConvergenceWarning as SinkhornConvergenceWarning

__all__ = ["OTTransformer", "REFERENCES"]

#: The named reference distributions ``target=`` accepts.
REFERENCES = ("normal", "uniform")


class OTTransformer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    r"""Move samples with entropic optimal transport, out of sample.

    ``fit(X)`` solves ``OT_eps`` (cost ``|x - y|^p / p``, ``eps = blur**p``) between the
    uniform measure on the rows of ``X`` and the target, and keeps the dual potentials
    ``f`` (on ``X``) and ``g`` (on the target samples ``y_j``). ``transform`` applies the
    entropic map ``T(x) = sum_j w_j(x) y_j`` with
    ``w_j(x) = softmax_j(log b_j + (g_j - C(x, y_j)) / eps)`` to any points, seen or not;
    ``inverse_transform`` the reverse map ``S(y) = sum_i softmax_i(log a_i + (f_i - C(y, x_i)) / eps) x_i``.

    Parameters
    ----------
    target : "normal" (standard Gaussian in the dimension of ``X``), "uniform" (the unit
        cube), or an ``(M, D)`` array of target samples (same array library as ``X``).
        With the default, ``OTTransformer()`` is a multivariate quantile-style normaliser.
    p : 1 or 2, the exponent of the ground cost.
    blur : the entropic length scale, in the units of the data: ``eps = blur**p``. Smaller
        is closer to the exact (Monge) map, and slower (Sinkhorn needs about
        ``diameter**p / eps`` iterations); the map averages the target over about ``blur``.
        The default suits standardised data (unit spread) and the "normal" target.
    reach : None (balanced OT) or a length: unbalanced OT, ``rho = reach**p``.
    scaling : eps-scaling ratio in (0, 1), for the warm start.
    tol, max_iter : then Sinkhorn iterations at ``eps`` until the plan's marginal error is below
        ``tol`` (L1, relative to the mass; see :func:`ot_agnostic.sinkhorn`), at most
        ``max_iter`` of them (a scikit-learn ``ConvergenceWarning`` says when that was not enough).
    backend : as in :func:`ot_agnostic.sinkhorn` ("auto", "tensorized", "online", a plugin).
    n_target_samples : how many samples a named ``target`` draws (default: as many as ``X``
        has rows). Ignored for an array target.
    random_state : seed of the named target's samples (int, ``RandomState`` or None).
    score_blur : the ``blur`` of the divergence that :meth:`score` computes (None: ``blur``).
        Fix it when ``GridSearchCV`` compares different ``blur`` values: ``S_eps`` itself
        shrinks as ``blur`` grows, so scores at different blurs do not compare.

    Attributes
    ----------
    source_ : ``(N, D)`` array, the fitted source samples.
    target_ : ``(M, D)`` array, the target samples.
    f_, g_ : ``(N,)`` and ``(M,)`` arrays, the dual potentials on ``source_`` and ``target_``.
    eps_ : float, the temperature ``blur**p``.
    n_iter_ : int, Sinkhorn updates run (eps-scaling, then at ``eps``; ``SinkhornResult.n_iter``).
    backend_ : str, the plugin and method that solved the problem (e.g. "numba/online").
    n_features_in_, feature_names_in_ : as in scikit-learn.

    Examples
    --------
    >>> import numpy as np
    >>> from ot_agnostic import OTTransformer
    >>> X = np.random.default_rng(0).exponential(size=(500, 2))     # skewed data
    >>> Z = OTTransformer(random_state=0).fit_transform(X)           # -> about N(0, I)
    >>> bool(np.all(np.abs(Z.mean(axis=0)) < 0.1)), bool(np.all(np.abs(Z.std(axis=0) - 1) < 0.15))
    (True, True)
    """

    def __init__(self, target="normal", *, p=2, blur=0.1, reach=None, scaling=0.5, tol=DEFAULT_TOL,
                 max_iter=DEFAULT_MAX_ITER, backend="auto", n_target_samples=None, random_state=None,
                 score_blur=None):
        self.target = target
        self.p = p
        self.blur = blur
        self.reach = reach
        self.scaling = scaling
        self.tol = tol
        self.max_iter = max_iter
        self.backend = backend
        self.n_target_samples = n_target_samples
        self.random_state = random_state
        self.score_blur = score_blur

    # -- scikit-learn API ---------------------------------------------------------------------

    def fit(self, X, y=None):
        """Solve entropic OT between the rows of ``X`` and the target; returns ``self``."""
        p, blur, reach, scaling, tol, max_iter = self._check_params()
        X = self._validate(X, reset=True)
        target = self._target_samples(X)
        with warnings.catch_warnings():  # re-issued below as scikit-learn's ConvergenceWarning
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            res = sinkhorn(X, target, p=p, blur=blur, reach=reach, scaling=scaling, debias=False,
                           backend=self.backend, tol=tol, max_iter=max_iter)
        if not res.converged:
            warnings.warn(
                f"OTTransformer: the marginal error is still {res.marginal_error:.2e} after max_iter="
                f"{max_iter} Sinkhorn iterations at eps (tol={self.tol}); raise max_iter, or blur.",
                ConvergenceWarning, stacklevel=2,
            )
        self.source_, self.target_ = X, target
        self.f_, self.g_ = res.f, res.g
        self.eps_ = float(res.eps)
        self.n_iter_ = res.n_iter
        self.backend_ = res.backend
        return self

    def transform(self, X):
        """``T(x) = sum_j w_j(x) y_j``: the entropic transport map of every row of ``X``."""
        check_is_fitted(self)
        X = self._validate(X, reset=False, method="transform")
        return self._barycentric_map(X, self.target_, self.g_)

    def inverse_transform(self, X):
        """``S(y) = sum_i softmax_i(log a_i + (f_i - C(y, x_i)) / eps) x_i``: target side back to source."""
        check_is_fitted(self)
        X = self._validate(X, reset=False, method="inverse_transform")
        return self._barycentric_map(X, self.source_, self.f_)

    def score(self, X, y=None):
        """``-S_eps(T(X), target)``: minus the Sinkhorn divergence between the transported ``X``
        and the target samples (``p``, ``reach`` of the model, ``blur = score_blur`` or
        ``blur``); higher is better, 0 at best."""
        moved = self.transform(X)
        blur = self.blur if self.score_blur is None else check_positive(self.score_blur, "score_blur")
        value = sinkhorn_divergence(
            moved, self._same_dtype(self.target_, moved), p=self.p, blur=blur,
            reach=self.reach, scaling=self.scaling, backend=self.backend,
        )
        return -to_float(value)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.array_api_support = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        return tags

    # -- helpers -------------------------------------------------------------------------------

    def _check_params(self):
        p = check_p(self.p)
        blur = check_positive(self.blur, "blur")
        reach = check_positive(self.reach, "reach", allow_none=True)
        check_power(blur, p, "blur", "eps")
        check_power(reach, p, "reach", "rho")
        parse_backend(self.backend)
        if self.tol is None:
            raise ValueError("tol must be a positive number: OTTransformer needs converged potentials.")
        tol, max_iter = check_tol(self.tol), check_max_iter(self.max_iter)
        if self.n_target_samples is not None and (
            isinstance(self.n_target_samples, bool) or not isinstance(self.n_target_samples, (int, np.integer))
            or self.n_target_samples < 1
        ):
            raise ValueError(f"n_target_samples must be a positive integer or None, got {self.n_target_samples!r}.")
        return p, blur, reach, check_scaling(self.scaling), tol, max_iter

    def _validate(self, X, *, reset, method="fit"):
        """scikit-learn's checks, in ``X``'s namespace; on later calls, ``X`` must come from the
        library and device of the fitted arrays."""
        if not reset:
            check_same_namespace(X, self, attribute="source_", method=method)
        xp, _ = get_namespace(X)
        X = validate_data(self, X, reset=reset, dtype=[xp.float64, xp.float32], ensure_all_finite=True)
        if not reset:
            _check_same_place(X, self.source_)
        return X

    def _target_samples(self, X):
        """The ``(M, D)`` target samples, in the library, device and dtype of ``X``."""
        xp = array_api_compat.array_namespace(X)
        N, D = X.shape
        target = self.target
        if isinstance(target, str):
            if target not in REFERENCES:
                raise ValueError(
                    f"unknown target {target!r}: pass 'normal', 'uniform' or an (M, D) array of samples."
                )
            rng = check_random_state(self.random_state)
            M = N if self.n_target_samples is None else int(self.n_target_samples)
            draws = rng.standard_normal((M, D)) if target == "normal" else rng.random_sample((M, D))
            return xp.asarray(draws, dtype=X.dtype, device=device_of(X))
        if not array_api_compat.is_array_api_obj(target):
            raise TypeError(
                f"target must be 'normal', 'uniform' or an (M, D) array, not {type(target).__name__}; "
                "wrap lists with numpy.asarray (or the library of X)."
            )
        _check_same_place(target, X, what="target")
        if target.ndim != 2 or target.shape[1] != D or target.shape[0] < 1:
            raise ValueError(
                f"target must be an (M, {D}) array of samples (X has {D} features), got shape {tuple(target.shape)}."
            )
        validate_measures(target, target)  # finite, real
        return self._same_dtype(target, X)

    @staticmethod
    def _same_dtype(a, like):
        xp = array_api_compat.array_namespace(like)
        return a if a.dtype == like.dtype else xp.astype(a, like.dtype)

    def _barycentric_map(self, points, support, potential):
        """``sum_j softmax_j(log(1/M) + (potential_j - C(x, s_j)) / eps) s_j`` for each row ``x``."""
        xp = array_api_compat.array_namespace(points)
        support, potential = self._same_dtype(support, points), self._same_dtype(potential, points)
        m = validate_measures(points, support)
        M = support.shape[0]
        selection = select_backend(xp, m.x, self.backend, m.shape)
        if selection.method is Method.MULTISCALE:  # a map has no block-sparse form: stream it
            selection = Selection(selection.plugin, Method.ONLINE)
        geometry = selection.plugin.geometry(m.x, m.y, Cost(check_p(self.p)), selection.method, xp=xp)
        h = (potential / self.eps_ - math.log(M))[None, :]
        return m.unbatch(geometry.softmax_weighted_sum(self.eps_, h, m.y))


def _check_same_place(X, fitted, what="X"):
    """``X`` must come from the library and live on the device of ``fitted``."""
    library, expected = type(X).__module__.split(".")[0], type(fitted).__module__.split(".")[0]
    if library != expected or str(device_of(X)) != str(device_of(fitted)):
        raise ValueError(
            f"{what} is a {library} array on {device_of(X)}, but this OTTransformer works on "
            f"{expected} arrays on {device_of(fitted)} (those it was fitted on, or X): convert "
            f"{what} first (e.g. torch.asarray(..., device=...) or numpy.asarray), or fit again."
        )
