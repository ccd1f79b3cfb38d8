"""A facedistill method behind PartialFC_V2's call contract: ``loss = head(local_embeddings, local_labels, ...)``.

The patched ``train_v2.py`` builds its margin head with ``hooks.build_head``. For a facedistill method it gets a
:class:`DistillHead`: the method's own module (MarginDistillation's frozen, normalised teacher centres, sharded
over the ranks exactly as PartialFC_V2 splits its classes, with the distributed cross-entropy of
``facedistill.heads.sharded``), fed with the teacher cache's row of every sample, image or mirror. The math lives
once, in ``facedistill.distill`` and ``facedistill.heads``; this module only adapts it to the framework.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from facedistill.arcface_torch.data import open_framework_dataset
from facedistill.arcface_torch.recipe import RecipeError, method_name, method_params, teacher_cache_dir
from facedistill.arcface_torch.teacher import recipe_teacher_id
from facedistill.distill.base import DistillMethod, MethodContext
from facedistill.teachers.cache import TeacherCache, class_centres


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
    if dataset.num_classes != int(cfg.num_classes):
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
    centres, _ = class_centres(cache, labels, int(cfg.num_classes), cfg.get("teacher_centres") or "auto")
    if centres.shape[0] != int(cfg.num_classes):
        raise RecipeError(
            f"the teacher's head has {centres.shape[0]} classes but config.num_classes = {cfg.num_classes}"
        )
    steps_per_epoch = int(cfg.num_image) // (int(cfg.batch_size) * world_size)
    context = MethodContext(
        num_classes=int(cfg.num_classes),
        embedding_size=int(cfg.embedding_size),
        centres=centres,
        typicality=cache.typicality(centres, labels),
        steps_per_epoch=steps_per_epoch,
        shard_heads=world_size > 1 and method_cls.head_can_shard(params),
    )
    method = method_cls(params, context)
    if world_size > 1:
        from facedistill.train.distributed import check_replicated_parameters

        check_replicated_parameters(method, name or "")
    return DistillHead(method, cache, steps_per_epoch)
