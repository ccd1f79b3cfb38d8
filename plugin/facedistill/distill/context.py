"""The teacher side of a run, built once for both front ends (facedistill's loop and the arcface_torch plugin).

A method with a teacher trains against class centres and reads the cached teacher row of every image. What it
needs besides its hyper-parameters is built here from a :class:`TeacherSpec`, whichever front end read the
config:

- the class centres: the teacher's own head (a cached ``head_centres.npy``, or an arcface_torch teacher run's
  PartialFC shards, of which only those overlapping this rank's block are opened), else the L2-normalised per-class
  means of the cached embeddings;
- ``subtract_mean``: the mean teacher embedding of the training set (stored with the cache; reduced over ranks
  when each holds a block), subtracted from every teacher row and from the rows the mean centres are built from.
  A head's centres are the teacher's own and are never centred: asking for both is refused;
- MarginDistillation's dataset normaliser, the max of ``cos(t_i, W_{y_i})`` over every cached image and mirror;
- at scale (``local``), this rank's block of the centres only (PartialFC's split) and that max from each rank's
  own classes with one all-reduce, so no rank holds the full matrix or reads the whole cache.

Errors name the front end's own keys (:class:`TeacherKeys`): ``teacher.centres`` for a facedistill config,
``config.teacher_centres`` for an arcface_torch recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill.base import MethodContext
from facedistill.heads.sharded import shard_range
from facedistill.teachers.cache import TeacherCache, check_head_rows
from facedistill.teachers.centres import load_centre_shard, mean_centre_shard, typicality_max_shard

CENTRE_SOURCES = ("auto", "head", "mean")


@dataclass(frozen=True)
class TeacherKeys:
    """How a front end spells the teacher keys, so that a refusal names the key the user can edit."""

    centres: str = "teacher.centres"
    subtract_mean: str = "teacher.subtract_mean"


@dataclass
class TeacherSpec:
    """Everything the teacher side depends on, read from a config once by its front end."""

    cache: TeacherCache
    # The training set's integer label of every cached image, [N].
    labels: np.ndarray
    num_classes: int
    centres: str = "auto"
    subtract_mean: bool = False
    # An arcface_torch teacher run's PartialFC head files (checkpoint_gpu_{r}.pt); empty for other teachers.
    head_shards: Sequence[Path] = ()
    # Build this rank's block of the centres only (methods with ``takes_local_centres``, at scale).
    local: bool = False
    rank: int = 0
    world_size: int = 1
    keys: TeacherKeys = field(default_factory=TeacherKeys)


@dataclass
class TeacherSide:
    """The built teacher side: what goes into the ``MethodContext``, plus the row offset and a summary."""

    offset: torch.Tensor | None
    source: str
    centres: torch.Tensor | None = None
    typicality: torch.Tensor | None = None
    local_centres: torch.Tensor | None = None
    typicality_max: float | None = None

    def fill(self, context: MethodContext) -> MethodContext:
        context.centres, context.typicality = self.centres, self.typicality
        context.local_centres = self.local_centres
        context.typicality_max = self.typicality_max
        return context

    def info(self, cache: TeacherCache) -> dict[str, Any]:
        peak = self.typicality_max if self.typicality is None else float(self.typicality.max())
        return {"teacher_id": cache.teacher_id, "centres": self.source, "typicality_max": peak}


def build_teacher_side(spec: TeacherSpec) -> TeacherSide:
    """The centres, typicalities (or their max) and row offset of ``spec``; refusals name ``spec.keys``."""
    head_kind = check_centre_source(spec.centres, spec.subtract_mean, spec.head_shards, spec.cache.directory, spec.keys)
    rank, world = (spec.rank, spec.world_size) if spec.local else (0, 1)
    offset = spec.cache.mean_embedding(rank, world) if spec.subtract_mean else None
    source = ("mean-centred" if offset is not None else "mean") if head_kind is None else "head"
    if not spec.local:
        centres = _centre_block(spec, head_kind, offset, 0, 1)
        typicality = spec.cache.typicality(centres, spec.labels, offset=offset)
        return TeacherSide(offset, source, centres=centres, typicality=typicality)
    local = _centre_block(spec, head_kind, offset, rank, world)
    start, _ = shard_range(spec.num_classes, rank, world)
    peak = typicality_max_shard(spec.cache, spec.labels, local, start, offset=offset)
    return TeacherSide(offset, source, local_centres=local, typicality_max=_global_max(peak, world))


def check_centre_source(
    centres: str, subtract_mean: bool, head_shards: Sequence[Path], cache_directory: Path, keys: TeacherKeys
) -> str | None:
    """Where the teacher's own head comes from under ``centres`` (None: mean centres), after refusing a centre
    source the teacher cannot give and ``subtract_mean`` with a head. Needs only the teacher's files, not its cache
    rows, so a front end can check a config before the cache is built (arcface_torch's ``cache-teacher``)."""
    if centres not in CENTRE_SOURCES:
        raise ConfigError(f"{keys.centres} = {centres!r} is not one of {', '.join(CENTRE_SOURCES)}")
    head_kind = _head_kind(centres, head_shards, cache_directory)
    if subtract_mean and head_kind is not None:
        raise ConfigError(
            f"{keys.subtract_mean} centres the mean class centres, but the teacher has its own head "
            f"({head_kind}) and {keys.centres} = {centres!r} takes it; set {keys.centres} = 'mean' "
            f"or turn {keys.subtract_mean} off"
        )
    if centres == "head" and head_kind is None:
        raise ConfigError(
            f"{keys.centres} = 'head' but the teacher has no head (no head_centres.npy in teacher cache "
            f"{cache_directory}, no checkpoint_gpu_*.pt of a run saved with save_all_states = True); use "
            "'mean' or 'auto'"
        )
    return head_kind


def _head_kind(centres: str, head_shards: Sequence[Path], cache_directory: Path) -> str | None:
    """Where the teacher's own head would come from under ``centres``, or None for mean centres."""
    if centres == "mean":
        return None
    if head_shards:
        return f"{len(head_shards)} PartialFC shard file(s) of its run"
    if (cache_directory / "head_centres.npy").exists():
        return f"head_centres.npy in teacher cache {cache_directory}"
    return None


def _centre_block(
    spec: TeacherSpec, head_kind: str | None, offset: torch.Tensor | None, rank: int, world: int
) -> torch.Tensor:
    """Rows ``shard_range(C, rank, world)`` of the L2-normalised centres (all of them with world 1)."""
    if head_kind is None:
        return mean_centre_shard(spec.cache, spec.labels, spec.num_classes, rank, world, offset=offset)
    if spec.head_shards:
        block = load_centre_shard(spec.head_shards, spec.num_classes, spec.cache.embedding_size, rank, world)
        return F.normalize(block, dim=1)
    head = spec.cache.head_centres()
    assert head is not None
    check_head_rows(head.shape[0], spec.num_classes, spec.keys.centres)
    start, end = shard_range(spec.num_classes, rank, world)
    return F.normalize(head[start:end], dim=1)


def _global_max(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
