"""Angular distillation (ShrinkTeaNet), as the MarginDistillation paper's comparison implements it.

Duong et al., "ShrinkTeaNet: Million-scale Lightweight Face Recognition via Shrinking Teacher-Student Networks",
arXiv 1905.10620 (no official code). The comparison we reproduce is in the official MarginDistillation code,
david-svitov/margindistillation, ``train/train.py`` (``loss_name == 'angular_distillation'``) and
``train/config.py`` (``loss.angular_distillation``)::

    loss = CE(s * [cos(theta_y + m), cos(theta_j)_{j != y}]) + alpha * mean_i (1 - cos(f_s,i, f_t,i))
    s = 64, m = 0.5, alpha = 1.0

with the ArcFace centres learnable and randomly initialised (``Normal(0, 0.01)``), i.e. the student does not
inherit the teacher's classifier. ShrinkTeaNet itself also distils intermediate blocks through adapters; the
comparison (and this method) distils the final embedding only. The same loss is ``embedding`` with
``loss: cosine, head: learnable``; this module exists so the comparison runs under its own name and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive
from facedistill.distill.embedding import embedding_distance


@dataclass
class AngularParams:
    scale: float = 64.0
    margin: float = 0.5
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("alpha", self.alpha)


@register_method
class AngularDistillation(DistillMethod):
    name = "angular"
    shards_head = True
    Params = AngularParams

    def __init__(self, params: AngularParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, "learnable")

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {
            "arcface": self.head(embeddings, labels)["margin"],
            "angular": self.params.alpha * embedding_distance(embeddings, teacher, "cosine").mean(),
        }
