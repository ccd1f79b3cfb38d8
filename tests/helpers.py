"""Small shared builders for tests (generated data, a deterministic stand-in teacher)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from facedistill.data.synthetic import write_identity_folders, write_pairs_tsv
from facedistill.teachers.base import Preprocessing, Teacher


class ProjectionTeacher(Teacher):
    """A fixed random projection of downsampled pixels: deterministic, cheap, and sensitive to mirroring."""

    def __init__(self, embedding_size: int = 16, seed: int = 0, fail_after_batches: int | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3 * 8 * 8, embedding_size, generator=generator)
        self.embedding_size = embedding_size
        self.preprocessing = Preprocessing("RGB", 127.5, 127.5)
        self.teacher_id = f"projection-{embedding_size}-{seed}"
        self.fail_after_batches = fail_after_batches
        self.calls = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after_batches is not None and self.calls >= self.fail_after_batches:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        x = F.adaptive_avg_pool2d(self.preprocessing.apply(images), 8).flatten(1)
        return x @ self.projection

    def class_centres(self) -> torch.Tensor | None:
        return None


def make_face_folders(root: Path, identities: int = 6, images: int = 6, test_identities: int = 6) -> tuple[Path, Path]:
    train = write_identity_folders(root / "train", identities, images)
    test = write_identity_folders(root / "test", test_identities, 4, first_identity=1000)
    pairs = write_pairs_tsv(test, root / "pairs.tsv", pairs_per_fold=3)
    return train, pairs
