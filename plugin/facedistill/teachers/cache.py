"""The teacher cache: every training image's teacher embedding, and its mirror image's, computed once.

Layout of a cache directory (a ``facedistill.data.rowstore`` store)::

    embeddings.f16   float16 memory map [N, 2, d]: row (i, 0) image i, row (i, 1) its horizontal mirror
    chunks.done      one byte per chunk of rows: set once that chunk's embeddings are on disk
    manifest.json    teacher id, preprocessing, dataset fingerprint, N, d, classes, the store's layout
    head_centres.npy the teacher's own class centres [C, d], when the teacher has a margin head
    mean_embedding.npy / .json   the mean teacher embedding (``teacher.subtract_mean``), computed on first use and
                     stored with the digest of the manifest it belongs to

Distillation reads rows from the cache, so a distillation step costs no teacher forward. A cache whose teacher or
dataset differ from the run's is refused. Building is resumable chunk by chunk and can be split over several
processes (``rank``/``world_size``, e.g. one per GPU under torchrun).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.data.datasets import FaceDataset, ordered_loader
from facedistill.data.rowstore import (
    MANIFEST,
    RowLayout,
    RowStore,
    StaleCacheError,
    open_for_writing,
)

__all__ = [
    "CACHE_FORMAT",
    "EMBEDDINGS",
    "HEAD_CENTRES",
    "KIND",
    "MANIFEST",
    "StaleCacheError",
    "TeacherCache",
    "build_teacher_cache",
    "class_centres",
]

# Format 2: completion tracked by per-chunk markers (format 1 counted completed rows and is refused).
CACHE_FORMAT = 2
KIND = "teacher-embeddings"
EMBEDDINGS = "embeddings.f16"
HEAD_CENTRES = "head_centres.npy"
MEAN_EMBEDDING = "mean_embedding.npy"
MEAN_EMBEDDING_INFO = "mean_embedding.json"
# Rows per chunk, the unit a killed build redoes: SFace (int8 weights, fp32 compute) embeds about 7 images a
# second (image + mirror) on one AVX2 core, so a chunk is about 35 s of one process's work; on a GPU the marker
# of a chunk costs a flush of 128 KiB, nothing next to the forward passes.
TEACHER_CHUNK_ROWS = 256
WHAT = "teacher cache"
COMMAND = "facedistill cache-teacher"


class TeacherCache:
    """A teacher cache opened for reading; ``check``/``check_source`` refuse it for another dataset or teacher, or
    while it is unfinished (unwritten rows read as zeros)."""

    def __init__(self, directory: str | Path, command: str = COMMAND) -> None:
        # ``command`` is what the user runs to build this cache, named in every refusal: the toolkit's
        # ``facedistill cache-teacher`` or the plugin's ``facedistill arcface-torch cache-teacher CONFIG``.
        self.directory = Path(directory)
        self.command = command
        self.store = RowStore(self.directory, WHAT, command, {"kind": KIND, "format": CACHE_FORMAT})
        self.manifest: dict[str, Any] = self.store.manifest
        expected = (self.num_images, 2, self.embedding_size)
        if self.store.layout.shape != expected or self.store.layout.dtype != "float16":
            raise StaleCacheError(
                f"{self.directory / MANIFEST}: rows {self.store.layout.shape} of {self.store.layout.dtype} do not "
                f"match {expected} of float16; rebuild it with `{command} --overwrite`"
            )
        self.embeddings = self.store.data()

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
        return self.store.complete

    def check(self, dataset: FaceDataset, teacher_id: str | None = None) -> None:
        """Refuse a cache that is incomplete or belongs to another dataset or teacher, saying what to do."""
        self.check_source(dataset.fingerprint(), len(dataset), teacher_id)

    def check_source(self, fingerprint: str, num_images: int, teacher_id: str | None = None) -> None:
        """``check`` for callers that know the dataset by its fingerprint and size rather than hold it."""
        where = self.directory
        self.store.require_complete()
        if self.manifest["dataset_fingerprint"] != fingerprint or self.num_images != num_images:
            raise StaleCacheError(
                f"teacher cache {where} was built for another dataset ({self.manifest['dataset_fingerprint']}, "
                f"{self.num_images} images) than this one ({fingerprint}, {num_images} images); "
                f"rebuild it with `{self.command} --overwrite`"
            )
        if teacher_id is not None and teacher_id != self.teacher_id:
            raise StaleCacheError(
                f"teacher cache {where} holds embeddings of teacher '{self.teacher_id}', not '{teacher_id}'; "
                f"rebuild it with `{self.command} --overwrite`"
            )

    def rows(
        self, indices: torch.Tensor, mirrored: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 teacher embeddings [B, d] of the given images; mirror rows where ``mirrored`` is True. With
        ``offset`` (the mean embedding, ``subtract_mean``), L2-normalised and centred: ``normalize(t) - offset``,
        as the centres were built."""
        index = indices.cpu().numpy()
        view = np.zeros(len(index), dtype=np.int64) if mirrored is None else mirrored.cpu().numpy().astype(np.int64)
        return centre_rows(torch.from_numpy(np.asarray(self.embeddings[index, view], dtype=np.float32)), offset)

    def head_centres(self) -> torch.Tensor | None:
        path = self.directory / HEAD_CENTRES
        return torch.from_numpy(np.load(path)).float() if path.exists() else None

    def manifest_digest(self) -> str:
        return hashlib.sha256((self.directory / MANIFEST).read_bytes()).hexdigest()

    def stored_mean_embedding(self) -> torch.Tensor | None:
        """The stored mean embedding, or None; refused when it was computed for another cache."""
        path, info_path = self.directory / MEAN_EMBEDDING, self.directory / MEAN_EMBEDDING_INFO
        if not (path.exists() and info_path.exists()):
            return None
        stored = json.loads(info_path.read_text()).get("manifest_sha256", "")
        if stored != self.manifest_digest():
            raise StaleCacheError(
                f"{path} is the mean embedding of another teacher cache (manifest {stored[:12] or 'unknown'}, this "
                f"one's {self.manifest_digest()[:12]}); delete {path.name} and {info_path.name} (they are recomputed)"
            )
        mean = torch.from_numpy(np.load(path)).float()
        if mean.shape != (self.embedding_size,):
            raise StaleCacheError(f"{path} holds {tuple(mean.shape)} values, not {self.embedding_size}; delete it")
        return mean

    def mean_embedding(self, rank: int = 0, world_size: int = 1, chunk: int = 65536) -> torch.Tensor:
        """Mean of the L2-normalised teacher embeddings over every image and mirror, [d]: the direction that all
        of them share (for SFace on CelebA-299 its norm is 0.40, and mean centres sit at cosine 0.16 to each
        other because of it).

        Computed once and stored beside the cache. With ``world_size`` > 1 (a collective: every rank calls it)
        each rank sums its own share of the rows and one all-reduce adds them, so no rank reads the whole cache.
        """
        stored = self.stored_mean_embedding()
        if stored is not None:
            return stored
        total = torch.zeros(self.embedding_size, dtype=torch.float64)
        first, last = self.num_images * rank // world_size, self.num_images * (rank + 1) // world_size
        for start in range(first, last, chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start : min(start + chunk, last)], dtype=np.float32))
            total += F.normalize(block, dim=2).sum(dim=(0, 1)).double()
        if world_size > 1:
            total = all_reduce_sum(total)
        mean = (total / (2 * self.num_images)).float()
        if rank == 0:
            self._store_mean(mean)
        return mean

    def _store_mean(self, mean: torch.Tensor) -> None:
        tmp = self.directory / f"mean_embedding.{os.getpid()}.tmp.npy"
        np.save(tmp, mean.numpy())
        os.replace(tmp, self.directory / MEAN_EMBEDDING)
        info = {"manifest_sha256": self.manifest_digest(), "teacher_id": self.teacher_id, "rows": 2 * self.num_images}
        info_tmp = self.directory / f"mean_embedding.{os.getpid()}.tmp.json"
        info_tmp.write_text(json.dumps(info))
        os.replace(info_tmp, self.directory / MEAN_EMBEDDING_INFO)

    def mean_centres(
        self, labels: np.ndarray, num_classes: int, chunk: int = 65536, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-class mean of the L2-normalised teacher embeddings (images and mirrors), L2-normalised [C, d];
        with ``offset``, of the embeddings minus ``offset`` (see :meth:`mean_embedding`)."""
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
        if offset is not None:
            sums -= counts[:, None] * offset.double()[None, :]
        return F.normalize(sums.float(), dim=1)

    def typicality(
        self, centres: torch.Tensor, labels: np.ndarray, chunk: int = 65536, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """cos(teacher embedding, centre of its class) for every image and mirror, [N, 2]; with ``offset``, of
        the embedding minus ``offset``."""
        centres = F.normalize(centres.float(), dim=1)
        out = torch.empty(self.num_images, 2)
        for start in range(0, self.num_images, chunk):
            block = F.normalize(torch.from_numpy(np.asarray(self.embeddings[start : start + chunk], np.float32)), dim=2)
            if offset is not None:
                block = F.normalize(block - offset.float(), dim=2)
            own = centres[torch.from_numpy(labels[start : start + chunk])]
            out[start : start + len(block)] = (block * own[:, None, :]).sum(dim=2)
        return out


def centre_rows(rows: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Teacher rows as a method sees them: unchanged, or with ``offset`` (``subtract_mean``) L2-normalised and
    centred, ``normalize(t) - offset``, as the mean centres were built."""
    return rows if offset is None else F.normalize(rows, dim=1) - offset


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the default process group, on the device its backend needs (NCCL: the current GPU)."""
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def class_centres(
    cache: TeacherCache,
    labels: np.ndarray,
    num_classes: int,
    source: str = "auto",
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """The frozen class centres for distillation and where they came from ("head" or "mean"). ``offset`` (the
    mean teacher embedding, subtracted first) applies to mean centres only: a trained head has its own."""
    head = cache.head_centres()
    if offset is not None:
        if source == "head" or (source == "auto" and head is not None):
            raise ValueError(
                f"teacher.subtract_mean centres the mean class centres, but teacher cache {cache.directory} "
                "holds the teacher's head and teacher.centres would take it; set teacher.centres=mean, or "
                "teacher.subtract_mean=false"
            )
        return cache.mean_centres(labels, num_classes, offset=offset), "mean-centred"
    if source == "head" and head is None:
        raise ValueError(f"teacher cache {cache.directory} holds no head centres; use teacher.centres=mean")
    if head is not None and source in ("auto", "head"):
        check_head_rows(head.shape[0], num_classes)
        return F.normalize(head, dim=1), "head"
    return cache.mean_centres(labels, num_classes), "mean"


def check_head_rows(rows: int, num_classes: int, key: str = "teacher.centres") -> None:
    """A teacher head's centres apply to the dataset it was trained on only (``key``: the front end's name of the
    centre-source key, which the refusal tells the user to set)."""
    if rows != num_classes:
        raise ValueError(
            f"the teacher's head has {rows} classes but the dataset has {num_classes}: its centres only apply to "
            f"the dataset it was trained on; set {key} = 'mean'"
        )


def _forget_derived(directory: Path) -> None:
    """A new store drops what was derived from the rows of the one it replaces."""
    for name in (MEAN_EMBEDDING, MEAN_EMBEDDING_INFO):
        (directory / name).unlink(missing_ok=True)


def _save_head_centres(teacher: Any, directory: Path) -> None:
    """The teacher's own centres, or none: a replaced cache must not keep the centres of its former teacher."""
    path = directory / HEAD_CENTRES
    head = teacher.class_centres()
    if head is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, head.float().numpy())
    os.replace(tmp, path)


def _non_finite_rows(rows: np.ndarray, indices: np.ndarray, teacher_id: str) -> str:
    """Why a batch of teacher rows cannot be stored: a row that is not finite, or beyond float16's range (which the
    cache stores), would train every method on NaN without a word; name the first such record."""
    bad = ~np.isfinite(rows.astype(np.float16)).reshape(len(rows), -1).all(axis=1)
    first = int(indices[np.flatnonzero(bad)[0]])
    finite = np.isfinite(rows[bad]).all()
    what = (
        f"values up to {np.abs(rows[bad]).max():.3g}, beyond float16's range (65504) that the cache stores"
        if finite
        else "values that are not finite"
    )
    return (
        f"teacher {teacher_id} gave {what} for {int(bad.sum())} record(s) of this batch, the first #{first}: check the "
        "teacher's weights (an untrained or diverged model, BatchNorm statistics) or its preprocessing"
    )


def build_teacher_cache(
    teacher: Any,
    dataset: FaceDataset,
    directory: str | Path,
    batch_size: int = 64,
    num_workers: int = 2,
    overwrite: bool = False,
    chunk_images: int = TEACHER_CHUNK_ROWS,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    command: str = COMMAND,
) -> TeacherCache:
    """Embed every image and its mirror with ``teacher``; resumes a partial cache of the same teacher/dataset.
    ``command`` is the user's command that builds it, named in refusals (:class:`TeacherCache`).

    Process ``rank`` of ``world_size`` embeds only its share of the unfinished chunks (``chunk_images`` rows each,
    fixed when the cache is created) and writes ``head_centres.npy`` when it is rank 0. The returned cache is
    checked against ``dataset`` and ``teacher`` when every chunk is done; when other ranks are still writing it is
    returned unchecked (``complete`` is False): the caller waits for them (a barrier), then ``check``s it.
    """
    directory = Path(directory)
    fingerprint = dataset.fingerprint()
    identity = {
        "format": CACHE_FORMAT,
        "kind": KIND,
        "teacher_id": teacher.teacher_id,
        "preprocessing": teacher.preprocessing.describe(),
        "dataset_fingerprint": fingerprint,
        "num_images": len(dataset),
        "num_classes": int(dataset.num_classes),
        "embedding_size": int(teacher.embedding_size),
        "dtype": "float16",
        "rows": ["image", "mirror"],
    }
    layout = RowLayout(EMBEDDINGS, len(dataset), (2, int(teacher.embedding_size)), "float16", chunk_images)
    # A token per store made: the stored mean embedding names the manifest it was computed from.
    extra = {"store_id": uuid.uuid4().hex}
    with open_for_writing(
        directory, identity, layout, WHAT, command, overwrite=overwrite, rank=rank, world_size=world_size,
        extra=extra, on_create=_forget_derived,
    ) as store:  # fmt: skip
        if rank == 0:
            _save_head_centres(teacher, directory)
        with store.writer(rank, world_size, desc="teacher cache", progress=progress) as writer:
            if len(writer.rows):
                loader = ordered_loader(dataset, writer.rows.tolist(), batch_size, num_workers)
                for batch in loader:
                    if batch.skipped:
                        raise ValueError(
                            "the teacher cache needs every image; fix the unreadable ones (run without skip)"
                        )
                    count = len(batch.indices)
                    both = teacher.embed(torch.cat([batch.images, batch.images.flip(-1)]))
                    rows = torch.stack([both[:count], both[count:]], dim=1).numpy()
                    stored = rows.astype(np.float16)
                    if not np.isfinite(stored).all():
                        raise ValueError(_non_finite_rows(rows, batch.indices.numpy(), teacher.teacher_id))
                    writer.data[batch.indices.numpy()] = stored
                    writer.advance(count)
        complete = store.complete
    cache = TeacherCache(directory, command)
    if complete:
        cache.check_source(fingerprint, len(dataset), teacher.teacher_id)
    return cache
