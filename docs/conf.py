"""Sphinx configuration for scanpy-canal."""

import os
from datetime import datetime
from importlib.metadata import metadata

# -- Project information ----------------------------------------------------------------------------------------------
info = metadata("scanpy-canal")
project = info["Name"]
author = info.get("Author") or info.get("Maintainer") or "scanpy-canal developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version
urls = dict(url.split(", ", 1) for url in info.get_all("Project-URL") or [])
repository_url = urls.get("Source", "https://github.com/scanpy-canal/scanpy-canal")

# -- General configuration --------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_copybutton",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_static/*.py"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
default_role = "literal"

# autodoc / autosummary / napoleon
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # defaults as written in the source (``lr=2e-4``, not ``0.0002``)
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True

# MyST and notebooks
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_output_stderr = "remove"

# Intersphinx inventories are fetched over the network, so they are used only on Read the Docs
# (the offline build with -W must not warn about unreachable inventories).
if os.environ.get("READTHEDOCS"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
    }
    intersphinx_timeout = 30

# -- HTML output ------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = project
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
html_show_sphinx = False


def _dataclass_factory_defaults(app, what, name, obj, options, signature, return_annotation):
    """Show dataclass ``default_factory`` defaults as ``...``: Sphinx cannot parse ``<factory>`` in a signature."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def setup(app):
    """Hooks local to this project."""
    app.connect("autodoc-process-signature", _dataclass_factory_defaults)
