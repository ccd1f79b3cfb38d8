"""Pairs verification: load a pairs set, embed its images with flip test, score and compute the metrics.

One evaluation path serves students (PyTorch backbones), teachers (any ``Teacher``) and exported models: all are
an ``Embedder``, a callable from a uint8 RGB batch [B, 3, 112, 112] to embeddings [B, d].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from facedistill.data.images import decode_image, normalise, to_chw_tensor
from facedistill.data.verification import PairList, read_bin_pairs, read_lfw_pairs, read_pairs_tsv
from facedistill.eval.metrics import VerificationResult, verification_metrics

Embedder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PairsSet:
    """A pairs list plus a way to read each image's encoded bytes by its key."""

    name: str
    pairs: PairList
    images: dict[str, bytes] | None = None  # .bin packs carry their images; others are files

    def read(self, key: str) -> tuple[bytes, str]:
        if self.images is not None:
            return self.images[key], f"{self.name} {key}"
        try:
            return Path(key).read_bytes(), key
        except OSError as error:
            raise FileNotFoundError(f"{key}: cannot read image of pairs set {self.name} ({error})") from None


def load_pairs_set(pairs: str | Path, images: str | Path | None = None, name: str | None = None) -> PairsSet:
    """LFW ``pairs.txt`` (needs the image root), a ``.bin`` pack, or a TSV of ``left right label [fold]``."""
    pairs = Path(pairs)
    name = name or pairs.stem
    if pairs.suffix == ".bin":
        blobs, pair_list = read_bin_pairs(pairs)
        return PairsSet(name, pair_list, {f"bin:{i}": blob for i, blob in enumerate(blobs)})
    if pairs.suffix in (".tsv", ".csv"):
        return PairsSet(name, read_pairs_tsv(pairs, images))
    if images is None:
        raise ValueError(f"{pairs}: an LFW-style pairs file needs the image folder (--images)")
    return PairsSet(name, read_lfw_pairs(pairs, images, check_exists=True))


class _KeyedImages(Dataset):
    def __init__(self, pairs_set: PairsSet, keys: Sequence[str]) -> None:
        self.pairs_set = pairs_set
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        data, source = self.pairs_set.read(self.keys[index])
        return to_chw_tensor(decode_image(data, source))


def student_embedder(
    model: nn.Module, device: torch.device | str = "cpu", amp: str = "none", chunk_size: int | None = None
) -> Embedder:
    """Wrap a backbone: uint8 RGB -> (x - 127.5) / 127.5 -> raw embeddings (float32, on CPU).

    On CPU the batch runs through the model in chunks of ``chunk_size`` (default 16): MobileFaceNet's activations
    at batch 256 overflow the CPU caches and run about 2x slower per image than at batch 16. Each image's
    embedding does not depend on its batch-mates in eval mode, so chunking changes nothing but speed."""
    device = torch.device(device)
    if chunk_size is None:
        chunk_size = 16 if device.type == "cpu" else 1 << 30
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    # The input follows the model's memory format; the model is not converted here, because the caller may be
    # training it (``load_student`` hands out channels_last models for inference).
    channels_last = any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )

    @torch.inference_mode()
    def embed(images: torch.Tensor) -> torch.Tensor:
        batch = normalise(images.to(device, non_blocking=True))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return torch.cat([model(chunk).float().cpu() for chunk in batch.split(chunk_size)])

    return embed


def embed_keys(
    embedder: Embedder,
    pairs_set: PairsSet,
    keys: Sequence[str],
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """L2-normalised embeddings [len(keys), d]; with ``flip`` the sum of image and mirror embeddings."""
    loader = DataLoader(_KeyedImages(pairs_set, keys), batch_size=batch_size, num_workers=num_workers)
    chunks = []
    for images in tqdm(loader, desc=f"embed {pairs_set.name}", unit="batch", disable=not progress, leave=False):
        if flip:
            both = embedder(torch.cat([images, images.flip(-1)]))
            features = both[: len(images)] + both[len(images) :]
        else:
            features = embedder(images)
        chunks.append(F.normalize(features.float(), dim=1))
    return torch.cat(chunks).numpy()


def evaluate_pairs(
    embedder: Embedder,
    pairs_set: PairsSet,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[VerificationResult, np.ndarray]:
    """The standard 10-fold verification protocol; returns the metrics and the cosine score of every pair."""
    pairs = pairs_set.pairs
    keys = sorted(set(pairs.left) | set(pairs.right))
    position = {key: i for i, key in enumerate(keys)}
    embeddings = embed_keys(embedder, pairs_set, keys, flip, batch_size, num_workers, progress)
    left = embeddings[[position[key] for key in pairs.left]]
    right = embeddings[[position[key] for key in pairs.right]]
    scores = (left * right).sum(axis=1)
    return verification_metrics(scores, pairs.issame, pairs.folds), scores
