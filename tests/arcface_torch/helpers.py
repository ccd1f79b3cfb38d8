"""Helpers of the arcface_torch plugin tests: where ../shared is, running commands under torchrun."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from easydict import EasyDict as edict

from tests.multiprocess import run_command

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
UPSTREAM = SHARED / "upstream" / "arcface_torch"
FACES = SHARED / "data" / "celeba299"
LFW = SHARED / "data" / "lfw"
TINY_IDENTITIES = 6
TINY_PAIRS = 40


def run(args: list[str], cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command in ``cwd`` with the test's Python first on PATH (torchrun, facedistill), through
    ``tests.multiprocess.run_command``: on a timeout, every process it started dumps its stacks into the failure."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return run_command(args, cwd=cwd, timeout=timeout, env=env, check=check)


def facedistill(*args: str) -> list[str]:
    return [sys.executable, "-m", "facedistill.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """torchrun on one machine; ``--standalone`` binds its rendezvous store on port 0 and holds it, so no port is
    probed and taken by another process before the launcher binds it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def copy_upstream(destination: Path) -> Path:
    shutil.copytree(UPSTREAM, destination)
    for path in [destination, *destination.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the shared snapshot is read-only
    return destination


def tiny_md_recipe(root: Path, **changes: object) -> edict:
    """The tiny MD recipe of a patched checkout as the framework loads it (base.py merged with the job file), with
    ``changes``."""
    namespace: dict[str, object] = {}
    exec((root / "configs" / "base.py").read_text(), namespace)
    cfg = namespace["config"]
    job: dict[str, object] = {}
    exec((root / "configs" / "tiny_md.py").read_text(), job)
    cfg.update(job["config"])
    cfg.update(changes)
    return cfg


def import_patched_dataset(root: Path, name: str) -> ModuleType:
    """The ``dataset.py`` of the (patched) checkout ``root``, imported as module ``name``; the checkout's ``utils``
    package it imports is dropped from ``sys.modules`` afterwards, so it cannot shadow another checkout's."""
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(name, root / "dataset.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
        for loaded in set(sys.modules) - before:
            if loaded == "utils" or loaded.startswith("utils."):
                del sys.modules[loaded]
    return module
