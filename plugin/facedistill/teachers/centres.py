"""Per-rank teacher class centres for heads too large for one process (millions of identities on many GPUs).

``torch_teacher.load_head_centres`` reads every head shard whole into one process: with 2M classes of 512-d that is
4 GB of centres per process, and arcface_torch's ``checkpoint_gpu_{r}.pt`` files also hold the whole backbone and
optimiser state. Here each student rank builds only its own block of centres, the rows ``shard_range(num_classes,
rank, world_size)`` (arcface_torch PartialFC_V2's split), whatever number of teacher ranks wrote the head:

* :func:`load_centre_shard` memory-maps only the teacher shards whose class block overlaps this rank's, checks
  them against the configured class count and embedding size, and copies only the overlapping rows;
* :func:`mean_centre_shard` gives a teacher without a head its per-class mean centres, reading only the cached
  embedding rows of this rank's classes;
* :func:`typicality_max_shard` is this rank's part of MarginDistillation's dataset-level normaliser.

The results equal the matching rows of ``load_head_centres``, ``TeacherCache.mean_centres`` and the maximum of
``TeacherCache.typicality``, which stay the reference single-process computations.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facedistill.heads.sharded import shard_range
from facedistill.teachers.cache import TeacherCache
from facedistill.teachers.torch_teacher import (
    _SHARD_NAMES,
    _SHARD_PATTERNS,
    _centres_from,
    _shard_rank,
    order_shard_files,
)

__all__ = ["load_centre_shard", "mean_centre_shard", "teacher_shard_files", "typicality_max_shard"]


PathLike = str | os.PathLike[str]


def teacher_shard_files(source: PathLike | Sequence[PathLike]) -> list[Path]:
    """The teacher's per-rank margin-head files in rank order: file ``r`` holds teacher rank ``r``'s class block.

    ``source`` is a run directory, a list of shard files, or one file: a file named like a shard stands for all its
    sibling shards of the same scheme (one rank alone holds only a slice of the classes); any other single file is
    a whole head written by one process. The files must follow one naming scheme with ranks exactly ``0..N-1``:
    a missing or doubled rank would silently shift every later class block onto the wrong classes.
    """
    if isinstance(source, (list, tuple)):
        return order_shard_files([Path(p) for p in source], "the given head files")
    path = Path(source)  # type: ignore[arg-type]
    if path.is_dir():
        by_scheme = [[p for p in path.iterdir() if pattern.match(p.name)] for pattern in _SHARD_PATTERNS]
        found = [files for files in by_scheme if files]
        if not found:
            raise FileNotFoundError(f"no teacher head shards ({_SHARD_NAMES}) in {path}: point at the run directory")
        if len(found) > 1:
            names = ", ".join(sorted(p.name for files in found for p in files))
            raise ValueError(
                f"{path} holds head shards of several naming schemes ({names}), which may come from different "
                "runs: pass the list of one run's shard files instead of the directory"
            )
        return order_shard_files(found[0], str(path))
    if not path.is_file():
        raise FileNotFoundError(f"teacher head not found: {path}")
    parsed = _shard_rank(path)
    if parsed is None:
        return [path]
    pattern = _SHARD_PATTERNS[parsed[0]]
    return order_shard_files([p for p in path.parent.iterdir() if pattern.match(p.name)], str(path.parent))


def _map_shard(path: Path) -> Any:
    """The file's content with its tensors memory-mapped, not read: a ``checkpoint_gpu_{r}.pt`` also holds the
    backbone and optimiser state, of which nothing is wanted here. Files in torch's pre-1.6 (non-zip) format cannot
    be mapped and are read whole; they come from old arcface_torch versions that saved only the centres."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (it pickles Python objects, not just "
            f"tensors), and teacher files are never unpickled unsafely: {exc}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?); copy it again: {exc}") from None


def load_centre_shard(
    source: PathLike | Sequence[PathLike],
    num_classes: int,
    embedding_size: int,
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """float32 rows ``[start, end)`` of the teacher's full ``[num_classes, embedding_size]`` head, where
    ``(start, end) = shard_range(num_classes, rank, world_size)`` is student rank ``rank``'s block.

    The teacher's head may have been written by any number of ranks T (the number of shard files, see
    :func:`teacher_shard_files`); teacher rank ``t`` holds ``shard_range(num_classes, t, T)``. Only the shards whose
    block overlaps ``[start, end)`` are opened, memory-mapped, and only the overlapping rows are copied (a shard not
    stored as float32, which PartialFC does not write, is converted whole by ``_centres_from``). Each opened
    shard must hold exactly its block's row count and ``embedding_size`` columns: anything else means the teacher
    was trained on another class list or embedding size, and its rows would be the centres of the wrong classes.
    """
    if num_classes < 1 or embedding_size < 1:
        raise ValueError(f"num_classes ({num_classes}) and embedding_size ({embedding_size}) must be positive")
    start, end = shard_range(num_classes, rank, world_size)
    files = teacher_shard_files(source)
    teachers = len(files)
    if teachers > num_classes:
        raise ValueError(
            f"the teacher head has {teachers} shard files ({files[0].name} .. {files[-1].name}) but "
            f"config.num_classes = {num_classes}: a PartialFC split would leave ranks without classes, so the "
            "teacher was trained on another number of classes"
        )
    out = torch.empty(end - start, embedding_size, dtype=torch.float32)
    for teacher_rank, path in enumerate(files):
        t_start, t_end = shard_range(num_classes, teacher_rank, teachers)
        lo, hi = max(start, t_start), min(end, t_end)
        if lo >= hi:
            continue
        weight = _centres_from(_map_shard(path), path)
        ranks = f"{teachers} teacher rank{'s' if teachers > 1 else ''}"
        if weight.shape[0] != t_end - t_start:
            raise ValueError(
                f"{path} holds {weight.shape[0]} centres but a PartialFC split of config.num_classes = {num_classes} "
                f"over {ranks} gives it {t_end - t_start}: the teacher was trained on another number of classes "
                "(or its shard files come from different runs)"
            )
        if weight.shape[1] != embedding_size:
            raise ValueError(
                f"{path} holds {weight.shape[1]}-d centres but config.embedding_size = {embedding_size}: the "
                "teacher's head belongs to a model of another embedding size"
            )
        rows = out[lo - start : hi - start]
        rows.copy_(weight[lo - t_start : hi - t_start])
        del weight  # unmaps the file once nothing else refers to it
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten()[:10] + lo
            raise ValueError(f"{path} holds non-finite centres (classes {bad.tolist()}): the teacher had diverged")
    return out


def _labels_in(cache: TeacherCache, labels: np.ndarray, start: int, end: int) -> np.ndarray:
    """Sorted cache row indices of the images whose label lies in ``[start, end)``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != cache.num_images or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels are {labels.dtype} of shape {labels.shape} but teacher cache {cache.directory} holds "
            f"{cache.num_images} images: pass the training set's integer labels, one per cached image"
        )
    return np.flatnonzero((labels >= start) & (labels < end))


def _blocks(
    cache: TeacherCache, labels: np.ndarray, rows: np.ndarray, chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(L2-normalised float32 embeddings [n, 2, d], labels [n]) of ``rows`` in sorted chunks, read from the memmap
    by index so that no other row is touched."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for first in range(0, len(rows), chunk):
        index = rows[first : first + chunk]
        block = torch.from_numpy(np.asarray(cache.embeddings[index], dtype=np.float32))
        yield F.normalize(block, dim=2), torch.from_numpy(labels[index].astype(np.int64))


def mean_centre_shard(
    cache: TeacherCache,
    labels: np.ndarray,
    num_classes: int,
    rank: int,
    world_size: int,
    chunk: int = 65536,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's rows of ``cache.mean_centres(labels, num_classes)``: the L2-normalised mean of the L2-normalised
    teacher embeddings (image and mirror) of each class in ``shard_range(num_classes, rank, world_size)``; with
    ``offset`` (the mean teacher embedding, ``subtract_mean``), of the embeddings minus ``offset``.

    For a teacher without a margin head. Only the cache rows of this rank's classes are read, so the ranks together
    read the cache once instead of each reading all of it.
    """
    start, end = shard_range(num_classes, rank, world_size)
    labels = np.asarray(labels)
    rows = _labels_in(cache, labels, start, end)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range over [{labels.min()}, {labels.max()}] but num_classes = {num_classes}: pass the training "
            f"set's class count (teacher cache {cache.directory})"
        )
    sums = torch.zeros(end - start, cache.embedding_size, dtype=torch.float64)
    counts = torch.zeros(end - start, dtype=torch.float64)
    for block, block_labels in _blocks(cache, labels, rows, chunk):
        local = block_labels - start
        sums.index_add_(0, local, block.sum(dim=1).double())
        counts.index_add_(0, local, torch.full((len(local),), 2.0, dtype=torch.float64))
    empty = (counts == 0).nonzero().flatten() + start
    if len(empty):
        shown = ", ".join(str(c) for c in empty[:10].tolist()) + (" ..." if len(empty) > 10 else "")
        raise ValueError(
            f"{len(empty)} class(es) of rank {rank}'s block [{start}, {end}) have no image in teacher cache "
            f"{cache.directory} and so no mean centre: {shown}; check num_classes ({num_classes}) against the labels"
        )
    if offset is not None:
        sums -= counts[:, None] * offset.double()[None, :]
    return F.normalize(sums.float(), dim=1)


def typicality_max_shard(
    cache: TeacherCache,
    labels: np.ndarray,
    local_centres: torch.Tensor,
    class_start: int,
    chunk: int = 65536,
    offset: torch.Tensor | None = None,
) -> float:
    """Max of cos(teacher embedding, centre of its class) over the images (and mirrors) of this rank's classes
    ``[class_start, class_start + len(local_centres))``: the rank's part of MarginDistillation's dataset-level
    normaliser, i.e. of ``cache.typicality(centres, labels).max()``; the caller all-reduces it with max.

    Only the cache rows of these classes are read. A rank whose classes have no image returns ``-inf``, which the
    max over ranks ignores. With ``offset`` the embeddings are centred first, as the training step centres them.
    """
    if local_centres.ndim != 2 or local_centres.shape[1] != cache.embedding_size:
        raise ValueError(
            f"local centres have shape {list(local_centres.shape)} but teacher cache {cache.directory} holds "
            f"{cache.embedding_size}-d embeddings: pass this rank's [classes, {cache.embedding_size}] centres"
        )
    if class_start < 0:
        raise ValueError(f"class_start must be >= 0, got {class_start}")
    centres = F.normalize(local_centres.detach().float().cpu(), dim=1)
    labels = np.asarray(labels)
    rows = _labels_in(cache, labels, class_start, class_start + centres.shape[0])
    peak = float("-inf")
    for block, block_labels in _blocks(cache, labels, rows, chunk):
        if offset is not None:
            block = F.normalize(block - offset.float(), dim=2)
        own = centres[block_labels - class_start]
        peak = max(peak, float((block * own[:, None, :]).sum(dim=2).max()))
    return peak
