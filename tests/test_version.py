"""``facedistill.__version__``: the installed distribution's version (setup.py's), with a source-tree fallback."""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest

import facedistill
from tests.conftest import REPO_ROOT


def _setup_py_version() -> str:
    """The ``version=`` keyword of the ``setup(...)`` call in the repository's setup.py, read without running it."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "version":
                    return ast.literal_eval(keyword.value)
    raise AssertionError("setup.py has no setup(version=...)")


def test_version_is_setup_py_version() -> None:
    # A stale editable install (setup.py bumped, not reinstalled) fails here: run pip install -e . again.
    assert facedistill.__version__ == _setup_py_version() == metadata.version("facedistill")


def test_uninstalled_source_tree_reads_setup_py(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(facedistill.metadata, "version", not_installed)
    assert facedistill._version() == _setup_py_version()

    package = tmp_path / "repo" / "plugin" / "facedistill"
    package.mkdir(parents=True)
    monkeypatch.setattr(facedistill, "__file__", str(package / "__init__.py"))
    assert facedistill._version() == facedistill.UNKNOWN_VERSION
    (tmp_path / "repo" / "setup.py").write_text('setup(\n    name="facedistill",\n    version="9.8.7",\n)\n')
    assert facedistill._version() == "9.8.7"
