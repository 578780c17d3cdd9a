"""Sphinx configuration for the ot_agnostic documentation (build: bash scripts/docs.sh)."""

import ot_agnostic

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
nitpicky = False
