"""Fixtures of the arcface_torch plugin tests: a patched copy of upstream and a tiny real training set in it.

The upstream snapshot and the faces live in ../shared beside the repository and are never copied into it; the
tests copy them into pytest's temporary directory and skip, saying so, when ../shared is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.arcface_torch.helpers import FACES, LFW, SHARED, UPSTREAM, copy_upstream, facedistill, run, torchrun

TINY_IDENTITIES = 6
TINY_PAIRS = 40


@pytest.fixture(scope="session")
def upstream() -> Path:
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream arcface_torch snapshot not found at {UPSTREAM} (expected in ../shared beside the repo)")
    return UPSTREAM


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# The shipped CPU-protocol recipes, shrunk to the tiny set: later assignments override the recipe's own.
TINY_OVERRIDES = """
config.rec = "data/tiny"
config.num_classes = {classes}
config.num_image = {images}
config.num_epoch = {epochs}
config.batch_size = 8
config.lr = 0.05
config.warmup_epoch = 0
config.verbose = {verbose}
config.frequent = 1
config.num_workers = 0
config.val_targets = ["tinylfw"]
"""


@pytest.fixture(scope="session")
def patched_checkout(upstream: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patched copy of upstream with a tiny packed CelebA subset (``data/tiny``: train.rec, tinylfw.bin) and the
    SFace teacher cache of it, built by ``facedistill arcface-torch cache-teacher`` under a 2-process torchrun."""
    if not FACES.is_dir() or not LFW.is_dir():
        pytest.skip(f"shared face data not found at {FACES.parent} (expected in ../shared beside the repo)")
    root = copy_upstream(tmp_path_factory.mktemp("arcface") / "arcface_torch")
    run(facedistill("arcface-torch", "patch", str(root)), cwd=root)
    faces = tmp_path_factory.mktemp("tiny_faces")
    for identity in sorted(p.name for p in FACES.iterdir())[:TINY_IDENTITIES]:
        (faces / identity).symlink_to(FACES / identity)
    run(facedistill("pack", str(faces), "data/tiny"), cwd=root)
    # LFW's 10 folds, a few pairs of each kind per fold (the framework's k-fold split needs both in every fold).
    pairs = faces.parent / "tiny_pairs.txt"
    lines = (SHARED / "data" / "lfw_pairs.txt").read_text().splitlines()
    per_fold = TINY_PAIRS // 20
    chosen = []
    for fold in range(10):
        start = 1 + 600 * fold
        chosen += lines[start : start + per_fold] + lines[start + 300 : start + 300 + per_fold]
    pairs.write_text("\n".join([f"10 {per_fold}", *chosen]) + "\n")
    run(facedistill("pack", str(LFW), "data/tiny/tinylfw.bin", "--pairs", str(pairs)), cwd=root)
    images = sum(1 for _ in faces.glob("*/*.jpg"))
    overrides = TINY_OVERRIDES.format(verbose=16, classes=TINY_IDENTITIES, images=images, epochs=2)
    (root / "configs" / "tiny.py").write_text((RECIPES / "celeba299_mbf.py").read_text() + overrides)
    # Only the distillation recipe names the cache: on the framework's own loss a teacher key is a leftover (warned).
    cache = 'config.teacher_cache = "data/tiny/teacher_cache"\n'
    (root / "configs" / "tiny_md.py").write_text((RECIPES / "celeba299_mbf_md.py").read_text() + overrides + cache)
    run(torchrun(2, "-m", "facedistill.cli", "arcface-torch", "cache-teacher", "configs/tiny_md"), cwd=root)
    return root
