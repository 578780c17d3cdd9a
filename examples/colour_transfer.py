"""Colour transfer between the two photographs that ship with scikit-learn.

Each pixel of ``china.jpg`` is a point of the RGB cube ``[0, 1]^3``; ``OTTransformer`` learns
the entropic optimal transport map from a random sample of its colours onto a sample of the
colours of ``flower.jpg``, then maps every pixel of the photograph, out of sample, to the
weighted mean ``T(x) = sum_j w_j(x) y_j`` of the flower's colours. The result keeps the
picture and takes the palette. The figure (before, palette, after) goes to a PNG file:
``examples/output/colour_transfer.png`` (the folder is created if missing), or the path
given on the command line.

Run: ``python examples/colour_transfer.py [PATH.png]`` (needs the ``examples`` extra:
``pip install -e ".[examples]"`` for matplotlib, scikit-learn and Pillow; about 10 s on two
CPU cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_sample_image

from ot_agnostic import OTTransformer

#: Where the examples write their figures (ignored by git), whatever the current directory.
OUTPUT = Path(__file__).resolve().parent / "output"


def pixels(name):
    """The ``(H * W, 3)`` RGB colours of a scikit-learn sample image, in ``[0, 1]``."""
    return load_sample_image(name).reshape(-1, 3) / 255.0


def recolour(source, target, *, fit_pixels=4000, blur=0.05, seed=0):
    """``source`` colours moved onto the palette of ``target`` (both ``(n, 3)`` in ``[0, 1]``)."""
    rng = np.random.default_rng(seed)
    palette = target[rng.choice(len(target), fit_pixels, replace=False)]
    sample = source[rng.choice(len(source), fit_pixels, replace=False)]
    model = OTTransformer(target=palette, blur=blur).fit(sample)
    return np.clip(model.transform(source), 0.0, 1.0)


def main(path=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    after = recolour(pixels("china.jpg"), pixels("flower.jpg")).reshape(china.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, image, title in zip(axes, (china, flower, after), ("china.jpg", "palette: flower.jpg", "china.jpg, recoloured")):
        ax.imshow(image)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path) if path is not None else OUTPUT / "colour_transfer.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
