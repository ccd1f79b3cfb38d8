"""A facedistill method behind PartialFC_V2's call contract: ``loss = head(local_embeddings, local_labels, ...)``.

The patched ``train_v2.py`` builds its margin head with ``hooks.build_head``. For a facedistill method it gets a
:class:`DistillHead`: the method's own module (for MarginDistillation, ``facedistill.heads.partial_fc.
FrozenPartialFC``: the teacher's frozen, normalised centres sharded over the ranks exactly as PartialFC_V2 splits
its classes and sampled at ``config.sample_rate`` as it samples), fed with the teacher cache's row of every sample,
image or mirror. The DataLoader workers read those rows with the samples (``facedistill.arcface_torch.data.
TeacherRows``) and the batch brings them, already on the GPU: a step neither copies indices back to the host nor
reads the cache. The math lives once, in ``facedistill.distill`` and ``facedistill.heads``; this module only
adapts it to the framework: it loads this rank's block of the teacher's centres and checks the recipe against the
teacher and its cache before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facedistill.arcface_torch.data import open_framework_dataset
from facedistill.arcface_torch.recipe import (
    CACHE_COMMAND,
    RECIPE_TEACHER_KEYS,
    Recipe,
    RecipeError,
    check_training_set,
    method_name,
    recipe_method,
    teacher_cache_dir,
)
from facedistill.arcface_torch.teacher import recipe_teacher_id, teacher_head_shards
from facedistill.distill.base import DistillMethod, MethodContext
from facedistill.distill.context import TeacherSide, TeacherSpec, build_teacher_side, check_centre_source
from facedistill.teachers.cache import TeacherCache, centre_rows
from facedistill.teachers.centres import load_centre_shard


class DistillHead(nn.Module):
    """The margin head of a run with ``config.loss`` set to a facedistill method.

    ``forward(local_embeddings, local_labels, teacher_rows)`` returns the scalar loss, the sum of the method's
    terms; ``teacher_rows`` [B, 2, d] are the batch's rows from ``TeacherRows.row`` (original image, view shown).
    Its state (frozen centres included, as PartialFC_V2 saves its own shard) goes into the framework's
    ``checkpoint_gpu_{rank}.pt`` like PartialFC_V2's.
    """

    def __init__(self, method: DistillMethod, steps_per_epoch: int, teacher_offset: torch.Tensor | None = None) -> None:
        super().__init__()
        self.method = method
        # Subtracted from every teacher row (config.teacher_subtract_mean), as from the centres' rows. A buffer,
        # so that `.to(device)` puts it beside the rows; not persistent, so checkpoints hold what they held.
        self.register_buffer("teacher_offset", teacher_offset, persistent=False)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step = 0
        # What the run distils, in one line (method, preset, centres and their files, cache), for the start-up log.
        self.summary = ""

    def forward(
        self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, teacher_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if teacher_rows is None:
            raise RuntimeError(
                "the batch carries no teacher rows: the dataset was not built with a teacher (is dataset.py "
                "patched? `facedistill arcface-torch patch PATH`)"
            )
        labels = local_labels.view(-1).long()
        # A no-op when the framework's loader already moved the batch to this device.
        rows = teacher_rows.to(local_embeddings.device, non_blocking=True)
        # Row 1 is the view the sample shows; a method without mirror rows reads the original image's (row 0).
        view = rows[:, 1] if self.method.mirror_rows else rows[:, 0]
        # Contiguous, as the rows read on the host were: the method's kernels see the layout they saw before.
        teacher = centre_rows(view.float().contiguous(), self.teacher_offset)
        if self.training:
            self.method.set_progress(self.step, self.step / self.steps_per_epoch)
            self.step += 1
        terms = self.method(local_embeddings, labels, teacher)
        return sum(terms.values())  # type: ignore[return-value]


def check_teacher(
    cfg: Recipe, embedding_size: int, rank: int = 0, world_size: int = 1, read_head: bool = False
) -> list[Path]:
    """The recipe's teacher against the recipe, from the teacher's files alone: its embedding size, its head's shard
    files (``teacher_head_shards``) and where the centres come from (``config.teacher_centres``,
    ``config.teacher_subtract_mean``). Training runs it before it reads the cache, ``cache-teacher`` before it embeds
    a single image (with ``read_head``: this rank's block of the head, read as training will read it, so a head of
    another class count is refused before hours of embedding). Returns the head's shard files, in rank order."""
    if embedding_size != int(cfg.embedding_size):
        raise RecipeError(
            f"the teacher gives {embedding_size}-d embeddings but config.embedding_size = {cfg.embedding_size}: "
            f"{method_name(cfg)} trains the student against the teacher's centres, so set config.embedding_size = "
            f"{embedding_size}"
        )
    shards = teacher_head_shards(cfg)
    centres = cfg.get("teacher_centres") or "auto"
    subtract_mean = bool(cfg.get("teacher_subtract_mean", False))
    try:
        head = check_centre_source(centres, subtract_mean, shards, teacher_cache_dir(cfg), RECIPE_TEACHER_KEYS)
        if read_head and head is not None and shards:
            load_centre_shard(shards, int(cfg.num_classes), embedding_size, rank, world_size)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return shards


def build_distill_head(cfg: Recipe, rank: int, world_size: int) -> DistillHead:
    """The ``DistillHead`` of the recipe's method, after checking its teacher, cache, classes and embedding size
    against the recipe; every refusal names both numbers or both sources and says what to do. The teacher side
    (centres, normaliser, ``config.teacher_subtract_mean``) is built by ``facedistill.distill.context``, as for
    facedistill's own loop."""
    name = method_name(cfg)
    method_cls, params = recipe_method(cfg)
    dataset = open_framework_dataset(cfg.rec)
    check_training_set(cfg, dataset)
    num_classes = int(cfg.num_classes)
    cache_dir = teacher_cache_dir(cfg)
    try:
        cache = TeacherCache(cache_dir, CACHE_COMMAND)
    except FileNotFoundError:
        raise RecipeError(
            f"no teacher cache at {cache_dir}; build it first: {CACHE_COMMAND} "
            "(under torchrun, each rank embeds a share)"
        ) from None
    cache.check(dataset, recipe_teacher_id(cfg))
    head_shards = check_teacher(cfg, cache.embedding_size)
    steps_per_epoch = int(cfg.num_image) // (int(cfg.batch_size) * world_size)
    shard = world_size > 1 and method_cls.head_can_shard(params)
    context = MethodContext(num_classes, int(cfg.embedding_size), steps_per_epoch=steps_per_epoch, shard_heads=shard)
    # Millions of identities: a method that takes local centres gets this rank's block of them only, and the
    # dataset-level normaliser from each rank's own classes, combined with one all-reduce.
    spec = TeacherSpec(
        cache,
        np.asarray(dataset.labels, dtype=np.int64),
        num_classes,
        centres=cfg.get("teacher_centres") or "auto",
        subtract_mean=bool(cfg.get("teacher_subtract_mean", False)),
        head_shards=head_shards,
        local=method_cls.takes_local_centres,
        rank=rank if shard else 0,
        world_size=world_size if shard else 1,
        keys=RECIPE_TEACHER_KEYS,
    )
    try:
        side = build_teacher_side(spec)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    method = method_cls(params, side.fill(context))
    if world_size > 1:
        from facedistill.train.distributed import check_replicated_parameters

        check_replicated_parameters(method, name or "")
    head = DistillHead(method, steps_per_epoch, side.offset)
    head.summary = _summary(cfg, params, side, head_shards, cache)
    return head


def _summary(cfg: Recipe, params: Any, side: TeacherSide, head_shards: list[Path], cache: TeacherCache) -> str:
    """``facedistill: METHOD (preset P) from teacher T; centres: SOURCE; teacher cache DIR``: what the run distils,
    where the centres come from (which files), and which cache it reads, so a log says which run it was."""
    preset = getattr(params, "preset", None)
    method = f"{method_name(cfg)} (preset {preset})" if preset else str(method_name(cfg))
    if side.source == "head" and head_shards:
        names = head_shards[0].name if len(head_shards) == 1 else f"{head_shards[0].name} .. {head_shards[-1].name}"
        centres = f"the teacher's head, {len(head_shards)} PartialFC shard file(s) in {head_shards[0].parent} ({names})"
    elif side.source == "head":
        centres = f"the teacher's head, {cache.directory / 'head_centres.npy'}"
    else:
        centred = ", centred (config.teacher_subtract_mean)" if side.offset is not None else ""
        centres = f"per-class means of the cached teacher embeddings{centred}"
    teacher = f"{cfg.teacher} ({cache.teacher_id})"
    return f"facedistill: {method} from teacher {teacher}; centres: {centres}; teacher cache {cache.directory}"
