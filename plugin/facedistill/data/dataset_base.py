"""What every facedistill training dataset shares: the ``FaceDataset`` base, the collated ``Batch`` and the loaders.

A module of its own so that the datasets (:mod:`facedistill.data.datasets`) and the decoded-image cache that stands
in for them (:mod:`facedistill.data.decoded_cache`) both build on it while importing each other only one way:
``datasets`` imports ``decoded_cache``, which imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from facedistill.data.images import ImageDecodeError, decode_image, to_chw_tensor
from facedistill.data.recordio import RecordIOError

__all__ = ["Batch", "FaceDataset", "collate_faces", "ordered_loader"]


class FaceDataset(Dataset):
    """Base: ``labels`` (int64, one per image), ``num_classes``, ``fingerprint()`` and ``read_bytes(i)``.

    ``__getitem__`` returns ``(image uint8 [3,H,W], label, index)``; the index finds the image's row in a teacher
    cache. With ``skip_bad=True`` an unreadable image yields ``None`` (counted by ``collate_faces``) instead of
    stopping the run.
    """

    labels: np.ndarray
    num_classes: int

    def __init__(self, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.labels)

    def read_bytes(self, index: int) -> tuple[bytes, str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        try:
            data, source = self.read_bytes(index)
            image = decode_image(data, source)
        except (ImageDecodeError, RecordIOError):
            if self.skip_bad:
                return None
            raise
        return to_chw_tensor(image), int(self.labels[index]), index


class Batch:
    """A collated training batch; ``skipped`` counts unreadable images dropped under ``skip_bad``."""

    __slots__ = ("images", "labels", "indices", "skipped")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, skipped: int) -> None:
        self.images = images
        self.labels = labels
        self.indices = indices
        self.skipped = skipped

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate_faces(samples: Sequence[tuple[torch.Tensor, int, int] | None]) -> Batch:
    """Stack ``FaceDataset`` items into a :class:`Batch`, dropping (and counting) the ``None`` of unreadable images;
    a batch with no readable image at all is an error, since a skipped batch would hide a broken dataset."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        raise ImageDecodeError("every image of a batch was unreadable; check the dataset")
    images = torch.stack([sample[0] for sample in kept])
    labels = torch.tensor([sample[1] for sample in kept], dtype=torch.int64)
    indices = torch.tensor([sample[2] for sample in kept], dtype=torch.int64)
    return Batch(images, labels, indices, len(samples) - len(kept))


def ordered_loader(dataset: FaceDataset, rows: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    """Batches of ``dataset``'s ``rows``, in that order (what the caches that write rows by index read through)."""
    return DataLoader(
        Subset(dataset, list(rows)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_faces,
        shuffle=False,
    )
