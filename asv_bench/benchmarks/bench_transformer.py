"""``OTTransformer(target=y, blur=0.1).fit(x).transform(x)`` (scikit-learn estimator), NumPy float32.

Same clouds as the rest of the suite: the source ``x`` is moved onto the target samples ``y``
(cost ``|x - y|^2 / 2``, eps = blur^2 = 0.01, entropic map). Anchor on the same data:
``bench_anchors.POTSinkhornTransport`` (``ot.da.SinkhornTransport(reg_e=2 * blur**2)``, the same plan).
"""

import ot_agnostic as ota

from .common import SIZES, Base, clouds, require, require_numba

TRANSFORMER_BLUR = 0.1


def fit_transform(x, y):
    return ota.OTTransformer(target=y, blur=TRANSFORMER_BLUR, random_state=0).fit(x).transform(x)


class OTTransformerFitTransform(Base):
    """``fit`` (eps-scaling, then Sinkhorn at eps to ``tol=1e-2``) + ``transform`` of the training points."""

    params = (SIZES,)
    param_names = ["n"]

    def setup(self, n):
        require("sklearn")
        require_numba()
        self.x, self.y = clouds(n)
        fit_transform(self.x[:200], self.y[:200])

    def time_fit_transform(self, n):
        fit_transform(self.x, self.y)

    def peakmem_fit_transform(self, n):
        fit_transform(self.x, self.y)
