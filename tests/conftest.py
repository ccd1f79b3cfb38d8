"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores, and so does every process a test
# starts (OMP_NUM_THREADS is inherited): two workers each running torch on every core, spinning in OpenMP, run several
# times slower than one. A variable the user set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real benchmark data lives beside the repo and must never be copied into it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared face data not found at {SHARED_DATA} (expected beside the repository)")
    return SHARED_DATA
