"""Sphinx configuration: MyST pages plus a reference generated from the code.

Build strict (as CI does) with ``scripts/build-docs``, or by hand::

    python3 -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document *this* checkout, even when another copy of the package is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

project = "pytest-smolvm"
author = "the pytest-smolvm developers"
copyright = "the pytest-smolvm developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "smolvm_reference",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
root_doc = "index"

# Links to a heading in another page: [text](networking.md#egress-caps).
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

nitpicky = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"

html_theme = "alabaster"
html_title = "pytest-smolvm"
html_static_path: list[str] = []

# Targets the code's docstrings name that these docs do not document: the standard library
# (intersphinx would fetch Python's inventory over the network, which CI does not have) and
# internal modules outside the public API.
nitpick_ignore = [
    ("py:mod", "subprocess"),
    ("py:meth", "subprocess.Popen.wait"),
    ("py:mod", "pytest_smolvm.transfer"),
    ("py:mod", "volumes"),
    ("py:class", "pytest_smolvm.drivers.Driver"),
]
