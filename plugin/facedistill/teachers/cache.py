"""The teacher cache: every training image's teacher embedding, and its mirror image's, computed once.

Layout of a cache directory::

    embeddings.f16   float16 memory map [N, 2, d]: row (i, 0) image i, row (i, 1) its horizontal mirror
    manifest.json    teacher id, preprocessing, dataset fingerprint, N, d, classes, rows completed
    head_centres.npy the teacher's own class centres [C, d], when the teacher has a margin head

Distillation reads rows from the cache, so a distillation step costs no teacher forward. A cache whose teacher or
dataset differ from the run's is refused. Building is resumable: rows are flushed chunk by chunk and the manifest
records how many are complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from facedistill.data.datasets import FaceDataset, collate_faces

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.f16"
HEAD_CENTRES = "head_centres.npy"


class StaleCacheError(ValueError):
    """The cache was built for another teacher or dataset, or is incomplete."""


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class TeacherCache:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"{self.directory} is not a teacher cache (no {MANIFEST}); build one with `facedistill cache-teacher`"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise StaleCacheError(f"{manifest_path}: unsupported cache format {self.manifest.get('format')}")
        shape = (self.num_images, 2, self.embedding_size)
        self.embeddings = np.memmap(self.directory / EMBEDDINGS, dtype=np.float16, mode="r", shape=shape)

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def embedding_size(self) -> int:
        return int(self.manifest["embedding_size"])

    @property
    def teacher_id(self) -> str:
        return str(self.manifest["teacher_id"])

    @property
    def complete(self) -> bool:
        return int(self.manifest["completed"]) >= self.num_images

    def check(self, dataset: FaceDataset, teacher_id: str | None = None) -> None:
        """Refuse a cache that is incomplete or belongs to another dataset or teacher, saying what to do."""
        where = self.directory
        if not self.complete:
            raise StaleCacheError(
                f"teacher cache {where} is incomplete ({self.manifest['completed']}/{self.num_images} images); "
                "run `facedistill cache-teacher` again to finish it"
            )
        fingerprint = dataset.fingerprint()
        if self.manifest["dataset_fingerprint"] != fingerprint or self.num_images != len(dataset):
            raise StaleCacheError(
                f"teacher cache {where} was built for another dataset ({self.manifest['dataset_fingerprint']}, "
                f"{self.num_images} images) than this one ({fingerprint}, {len(dataset)} images); "
                "rebuild it with `facedistill cache-teacher --overwrite`"
            )
        if teacher_id is not None and teacher_id != self.teacher_id:
            raise StaleCacheError(
                f"teacher cache {where} holds embeddings of teacher '{self.teacher_id}', not '{teacher_id}'; "
                "rebuild it with `facedistill cache-teacher --overwrite`"
            )

    def rows(self, indices: torch.Tensor, mirrored: torch.Tensor | None = None) -> torch.Tensor:
        """float32 teacher embeddings [B, d] of the given images; mirror rows where ``mirrored`` is True."""
        index = indices.cpu().numpy()
        view = np.zeros(len(index), dtype=np.int64) if mirrored is None else mirrored.cpu().numpy().astype(np.int64)
        return torch.from_numpy(np.asarray(self.embeddings[index, view], dtype=np.float32))

    def head_centres(self) -> torch.Tensor | None:
        path = self.directory / HEAD_CENTRES
        return torch.from_numpy(np.load(path)).float() if path.exists() else None

    def mean_centres(self, labels: np.ndarray, num_classes: int, chunk: int = 65536) -> torch.Tensor:
        """Per-class mean of the L2-normalised teacher embeddings (images and mirrors), L2-normalised [C, d]."""
        sums = torch.zeros(num_classes, self.embedding_size, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for start in range(0, self.num_images, chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start : start + chunk], dtype=np.float32))
            block = F.normalize(block, dim=2).sum(dim=1).double()
            block_labels = torch.from_numpy(labels[start : start + chunk])
            sums.index_add_(0, block_labels, block)
            counts.index_add_(0, block_labels, torch.full((len(block_labels),), 2.0, dtype=torch.float64))
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            raise ValueError(f"classes without images cannot get a centre: {empty[:10].tolist()}")
        return F.normalize(sums.float(), dim=1)

    def typicality(self, centres: torch.Tensor, labels: np.ndarray, chunk: int = 65536) -> torch.Tensor:
        """cos(teacher embedding, centre of its class) for every image and mirror, [N, 2]."""
        centres = F.normalize(centres.float(), dim=1)
        out = torch.empty(self.num_images, 2)
        for start in range(0, self.num_images, chunk):
            block = F.normalize(torch.from_numpy(np.asarray(self.embeddings[start : start + chunk], np.float32)), dim=2)
            own = centres[torch.from_numpy(labels[start : start + chunk])]
            out[start : start + len(block)] = (block * own[:, None, :]).sum(dim=2)
        return out


def class_centres(
    cache: TeacherCache, labels: np.ndarray, num_classes: int, source: str = "auto"
) -> tuple[torch.Tensor, str]:
    """The frozen class centres for distillation and where they came from ("head" or "mean")."""
    head = cache.head_centres()
    if source == "head" and head is None:
        raise ValueError(f"teacher cache {cache.directory} holds no head centres; use teacher.centres=mean")
    if head is not None and source in ("auto", "head"):
        if head.shape[0] != num_classes:
            raise ValueError(
                f"the teacher's head has {head.shape[0]} classes but the dataset has {num_classes}: its centres "
                "only apply to the dataset it was trained on; use teacher.centres=mean"
            )
        return F.normalize(head, dim=1), "head"
    return cache.mean_centres(labels, num_classes), "mean"


def build_teacher_cache(
    teacher: Any,
    dataset: FaceDataset,
    directory: str | Path,
    batch_size: int = 64,
    num_workers: int = 2,
    overwrite: bool = False,
    chunk_images: int = 2048,
    progress: bool = True,
) -> TeacherCache:
    """Embed every image and its mirror with ``teacher``; resumes a partial cache of the same teacher/dataset."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset.fingerprint()
    manifest_path = directory / MANIFEST
    expected = {
        "format": CACHE_FORMAT,
        "teacher_id": teacher.teacher_id,
        "preprocessing": teacher.preprocessing.describe(),
        "dataset_fingerprint": fingerprint,
        "num_images": len(dataset),
        "num_classes": int(dataset.num_classes),
        "embedding_size": int(teacher.embedding_size),
        "dtype": "float16",
        "rows": ["image", "mirror"],
    }
    completed = 0
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        if {key: old.get(key) for key in expected} != expected:
            raise StaleCacheError(
                f"{directory} holds a cache of another teacher or dataset ({old.get('teacher_id')}, "
                f"{old.get('dataset_fingerprint')}); pass --overwrite to replace it or choose another directory"
            )
        completed = int(old["completed"])
    shape = (len(dataset), 2, int(teacher.embedding_size))
    mode = "r+" if completed > 0 and (directory / EMBEDDINGS).exists() else "w+"
    if mode == "w+":
        completed = 0
    store = np.memmap(directory / EMBEDDINGS, dtype=np.float16, mode=mode, shape=shape)
    head = teacher.class_centres()
    if head is not None:
        np.save(directory / HEAD_CENTRES, head.float().numpy())
    _write_json_atomic(manifest_path, {**expected, "completed": completed})

    remaining = Subset(dataset, range(completed, len(dataset)))
    loader = DataLoader(
        remaining, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_faces, shuffle=False
    )
    bar = tqdm(total=len(dataset), initial=completed, desc="teacher cache", unit="img", disable=not progress)
    since_flush = 0
    for batch in loader:
        if batch.skipped:
            raise ValueError("the teacher cache needs every image; fix the unreadable ones (run without skip)")
        count = len(batch.indices)
        both = teacher.embed(torch.cat([batch.images, batch.images.flip(-1)]))
        rows = torch.stack([both[:count], both[count:]], dim=1)
        store[batch.indices.numpy()] = rows.numpy().astype(np.float16)
        completed += count
        since_flush += count
        bar.update(count)
        if since_flush >= chunk_images or completed == len(dataset):
            store.flush()
            _write_json_atomic(manifest_path, {**expected, "completed": completed})
            since_flush = 0
    bar.close()
    store.flush()
    del store
    cache = TeacherCache(directory)
    cache.check(dataset, teacher.teacher_id)
    return cache
