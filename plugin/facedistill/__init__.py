"""facedistill: distil face-recognition models into small, fast students.

``__version__`` is the installed distribution's version (``setup.py`` is its one source): exported ONNX files carry
it in their metadata, so it must not drift from what ``pip`` installed.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

# What a source tree that was never installed reports when its setup.py cannot be read either (PEP 440 local).
UNKNOWN_VERSION = "0+unknown"


def _source_tree_version() -> str:
    """The ``version="..."`` of the ``setup.py`` two folders up (``<repo>/plugin/facedistill``), for a checkout used
    without ``pip install`` (e.g. ``PYTHONPATH=plugin``); ``UNKNOWN_VERSION`` if there is none."""
    setup_py = Path(__file__).resolve().parents[2] / "setup.py"
    try:
        found = re.search(r"""^\s*version\s*=\s*["']([^"']+)["']""", setup_py.read_text(encoding="utf-8"), re.M)
    except OSError:
        return UNKNOWN_VERSION
    return found.group(1) if found else UNKNOWN_VERSION


def _version() -> str:
    """The version of the installed ``facedistill`` distribution, else of the source tree."""
    try:
        return metadata.version("facedistill")
    except metadata.PackageNotFoundError:
        return _source_tree_version()


__version__ = _version()
