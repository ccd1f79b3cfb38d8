"""A facedistill method behind PartialFC_V2's call contract: ``loss = head(local_embeddings, local_labels, ...)``.

The patched ``train_v2.py`` builds its margin head with ``hooks.build_head``. For a facedistill method it gets a
:class:`DistillHead`: the method's own module (for MarginDistillation, ``facedistill.heads.partial_fc.
FrozenPartialFC``: the teacher's frozen, normalised centres sharded over the ranks exactly as PartialFC_V2 splits
its classes and sampled at ``config.sample_rate`` as it samples), fed with the teacher cache's row of every sample,
image or mirror. The math lives once, in ``facedistill.distill`` and ``facedistill.heads``; this module only
adapts it to the framework: it loads this rank's block of the teacher's centres and checks the recipe against the
teacher and its cache before training starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facedistill.arcface_torch.data import open_framework_dataset
from facedistill.arcface_torch.recipe import RecipeError, method_name, method_params, teacher_cache_dir
from facedistill.arcface_torch.teacher import recipe_teacher_id, teacher_head_shards
from facedistill.distill.base import DistillMethod, MethodContext
from facedistill.heads.sharded import shard_range
from facedistill.teachers.cache import TeacherCache, class_centres
from facedistill.teachers.centres import load_centre_shard, mean_centre_shard, typicality_max_shard


class DistillHead(nn.Module):
    """The margin head of a run with ``config.loss`` set to a facedistill method.

    ``forward(local_embeddings, local_labels, index, mirrored)`` returns the scalar loss, the sum of the method's
    terms. Its state (frozen centres included, as PartialFC_V2 saves its own shard) goes into the framework's
    ``checkpoint_gpu_{rank}.pt`` like PartialFC_V2's.
    """

    def __init__(self, method: DistillMethod, cache: TeacherCache, steps_per_epoch: int) -> None:
        super().__init__()
        self.method = method
        self.cache = cache
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step = 0

    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        index: torch.Tensor | None = None,
        mirrored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if index is None:
            raise RuntimeError(
                "the batch carries no record index: the dataset was not built with sample_info (is dataset.py "
                "patched? `facedistill arcface-torch patch PATH`)"
            )
        labels = local_labels.view(-1).long()
        teacher = self.cache.rows(index.view(-1), mirrored.view(-1) if mirrored is not None else None)
        teacher = teacher.to(local_embeddings.device, non_blocking=True)
        if self.training:
            self.method.set_progress(self.step, self.step / self.steps_per_epoch)
            self.step += 1
        terms = self.method(local_embeddings, labels, teacher)
        return sum(terms.values())  # type: ignore[return-value]


def build_distill_head(cfg: Any, rank: int, world_size: int) -> DistillHead:
    """The ``DistillHead`` of the recipe's method, after checking its teacher, cache, classes and embedding size
    against the recipe; every refusal names both numbers or both sources and says what to do."""
    name = method_name(cfg)
    method_cls, params = method_params(cfg)
    dataset = open_framework_dataset(cfg.rec)
    num_classes = int(cfg.num_classes)
    if dataset.num_classes != num_classes:
        raise RecipeError(
            f"config.num_classes = {cfg.num_classes} but {cfg.rec} holds {dataset.num_classes} identities; set "
            "config.num_classes to the training set's"
        )
    cache_dir = teacher_cache_dir(cfg)
    try:
        cache = TeacherCache(cache_dir)
    except FileNotFoundError:
        raise RecipeError(
            f"no teacher cache at {cache_dir}; build it first: facedistill arcface-torch cache-teacher CONFIG "
            "(under torchrun, each rank embeds a share)"
        ) from None
    cache.check(dataset, recipe_teacher_id(cfg))
    if cache.embedding_size != int(cfg.embedding_size):
        raise RecipeError(
            f"the teacher gives {cache.embedding_size}-d embeddings but config.embedding_size = {cfg.embedding_size}: "
            f"{name} trains the student against the teacher's centres, so set config.embedding_size = "
            f"{cache.embedding_size}"
        )
    labels = np.asarray(dataset.labels, dtype=np.int64)
    steps_per_epoch = int(cfg.num_image) // (int(cfg.batch_size) * world_size)
    shard = world_size > 1 and method_cls.head_can_shard(params)
    context = MethodContext(num_classes, int(cfg.embedding_size), steps_per_epoch=steps_per_epoch, shard_heads=shard)
    if method_cls.takes_local_centres:
        # Millions of identities: this rank's block of the centres only, and the dataset-level normaliser from
        # each rank's own classes, combined with one all-reduce.
        rank_in_split, split = (rank, world_size) if shard else (0, 1)
        local = _local_centres(cfg, cache, labels, num_classes, rank_in_split, split)
        start, _ = shard_range(num_classes, rank_in_split, split)
        context.local_centres = local
        context.typicality_max = _global_max(typicality_max_shard(cache, labels, local, start), split)
    else:
        centres = _full_centres(cfg, cache, labels, num_classes)
        context.centres = centres
        context.typicality = cache.typicality(centres, labels)
    method = method_cls(params, context)
    if world_size > 1:
        from facedistill.train.distributed import check_replicated_parameters

        check_replicated_parameters(method, name or "")
    return DistillHead(method, cache, steps_per_epoch)


def _centre_source(cfg: Any) -> str:
    return cfg.get("teacher_centres") or "auto"


def _head_rows_check(rows: int, num_classes: int) -> None:
    if rows != num_classes:
        raise RecipeError(
            f"the teacher's head has {rows} classes but config.num_classes = {num_classes}: its centres only apply "
            "to the dataset it was trained on; set config.teacher_centres = 'mean'"
        )


def _local_centres(
    cfg: Any, cache: TeacherCache, labels: np.ndarray, num_classes: int, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's block of the L2-normalised centres: from the teacher run's own PartialFC shards (only those
    that overlap it are opened), a small teacher's head in the cache, or the per-class means of the cache."""
    source = _centre_source(cfg)
    shards = teacher_head_shards(cfg)
    if source in ("auto", "head"):
        if shards:
            return F.normalize(load_centre_shard(shards, num_classes, cache.embedding_size, rank, world_size), dim=1)
        head = cache.head_centres()
        if head is not None:
            _head_rows_check(head.shape[0], num_classes)
            start, end = shard_range(num_classes, rank, world_size)
            return F.normalize(head[start:end], dim=1)
        if source == "head":
            raise RecipeError(
                f"config.teacher_centres = 'head' but the teacher {cfg.teacher!r} has no head (no checkpoint_gpu_*.pt "
                "from a run with save_all_states = True); use 'mean' or 'auto'"
            )
    return mean_centre_shard(cache, labels, num_classes, rank, world_size)


def _full_centres(cfg: Any, cache: TeacherCache, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """The whole [C, d] matrix, for methods that read every class on every rank (small and medium datasets)."""
    shards = teacher_head_shards(cfg)
    if shards and _centre_source(cfg) in ("auto", "head"):
        return F.normalize(load_centre_shard(shards, num_classes, cache.embedding_size, 0, 1), dim=1)
    # class_centres refuses a cached head of another class count itself.
    centres, _ = class_centres(cache, labels, num_classes, _centre_source(cfg))
    return centres


def _global_max(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
