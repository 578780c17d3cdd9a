"""Sphinx configuration for the ot_agnostic documentation (build: bash scripts/docs.sh)."""

import contextlib
import io
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The gallery imports ``examples.colour_transfer`` (and ot_agnostic from the checkout).
sys.path.insert(0, ROOT)

import ot_agnostic  # noqa: E402

project = "ot_agnostic"
author = "the ot_agnostic developers"
copyright = "2026, the ot_agnostic developers"
version = release = ot_agnostic.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

# autodoc / autosummary: document what ``ot_agnostic.__all__`` exports; no stub files.
autosummary_generate = False
autodoc_typehints = "none"  # numpydoc renders the documented types
autodoc_member_order = "bysource"

# numpydoc: SinkhornResult's fields are documented in its "Attributes" section, so do not
# list its members a second time; no cross-reference guessing on free-text types.
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"ot_agnostic {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}

exclude_patterns = ["_build"]

# sphinx-gallery: every examples/gallery/plot_*.py runs at build time (NumPy + Numba on
# the CPU, no network) and its matplotlib figures go into docs/auto_examples/ (generated,
# not in git, like docs/sg_execution_times.rst). An example that fails breaks the build.
sphinx_gallery_conf = {
    "examples_dirs": os.path.join("..", "examples", "gallery"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"plot_",
    "within_subsection_order": "FileNameSortKey",  # a string: the config stays picklable
    "download_all_examples": False,  # no zip archives of the sources
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "image_scrapers": ("matplotlib",),
    "remove_config_comments": True,
}

# pykeops prints a banner when first imported ("CUDA libraries not found ... CPU only" on
# CPU machines); POT imports it, so import it once here, quietly, rather than let the banner
# land in the output of the first gallery example that imports POT.
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        import pykeops  # noqa: F401
    except Exception:  # not installed, or broken: the examples do not need it
        pass

# Examples run under matplotlib's non-interactive Agg backend: plt.show() is a no-op there.
warnings.filterwarnings(
    "ignore",
    category=UserWarning,
    message="(Matplotlib is currently using agg|FigureCanvasAgg is non-interactive)",
)

nitpicky = False
