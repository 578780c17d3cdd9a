"""Sphinx configuration for the ot_agnostic documentation (build: bash scripts/docs.sh)."""

import os
import sys

import ot_agnostic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

project = "ot_agnostic"
author = "the ot_agnostic developers"
copyright = "2026, the ot_agnostic developers"
version = release = ot_agnostic.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
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
html_static_path = ["_static"]


def _example_figures(app):
    """Render the figures of the example scripts into _static/generated (not in git)."""
    out = os.path.join(ROOT, "docs", "_static", "generated")
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, ROOT)
    from examples import colour_transfer

    colour_transfer.main(os.path.join(out, "colour_transfer.png"))


def setup(app):
    app.connect("builder-inited", _example_figures)
nitpicky = False
