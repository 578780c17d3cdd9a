r"""
Colour transfer between two photographs
=======================================

Each pixel of scikit-learn's ``china.jpg`` is a point of the RGB cube :math:`[0, 1]^3`.
:class:`~ot_agnostic.transformer.OTTransformer` fits entropic optimal transport between 4,000 random
pixels of it and 4,000 random pixels of ``flower.jpg``, then moves **every** pixel of the
photograph (273,280 of them, out of sample) with the entropic map
:math:`T(x) = \sum_j w_j(x) \, y_j`, a weighted mean of the flower's colours. The picture
keeps its content and takes the palette of the other one.

The functions come from ``examples/colour_transfer.py`` (``python
examples/colour_transfer.py`` writes the same figure to a PNG file); see also
:doc:`/transformer`.
"""

# %%
# Fit on samples, transform every pixel
# -------------------------------------

import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
from sklearn.datasets import load_sample_image

try:
    ROOT = Path(__file__).resolve().parents[2]
except NameError:  # sphinx-gallery runs the script from examples/gallery, without __file__
    ROOT = Path.cwd().resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for ``examples.colour_transfer`` when run as a script

from examples.colour_transfer import pixels, recolour  # noqa: E402

china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
start = time.perf_counter()
after = recolour(pixels("china.jpg"), pixels("flower.jpg"), fit_pixels=4000, blur=0.05)
print(f"{china.shape[0] * china.shape[1]:,} pixels recoloured in {time.perf_counter() - start:.1f} s")

# %%
# Before, palette, after
# ----------------------

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
images = (china, flower, after.reshape(china.shape))
titles = ("china.jpg", "palette: flower.jpg", "china.jpg, recoloured")
for ax, image, title in zip(axes, images, titles):
    ax.imshow(image)
    ax.set_title(title)
    ax.axis("off")
fig.tight_layout()
plt.show()
