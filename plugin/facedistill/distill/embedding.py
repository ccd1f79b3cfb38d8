"""Embedding distillation: pull each student embedding onto the teacher's embedding of the same image.

The oldest feature-level KD for faces (e.g. "mimic" / feature regression, Luo et al. AAAI'16; Romero et al.,
FitNets, arXiv 1412.6550, for hidden layers); here on the final, L2-normalised embeddings, which is what face
verification compares::

    l2:      d_i = || f_s,i / |f_s,i| - f_t,i / |f_t,i| ||^2
    cosine:  d_i = 1 - cos(f_s,i, f_t,i)
    loss = CE(s * [cos(theta_y + m), cos(theta_j)_{j != y}]) + weight * mean_i d_i

On unit vectors ``l2 = 2 * cosine`` exactly, so the two choices differ only by a factor 2 of the weight; both are
offered because papers report either. ``head: frozen`` scores the margin loss against the teacher's frozen class
centres (the student inherits the teacher's classifier, as in MarginDistillation and ProxylessKD, arXiv
2011.00265); ``head: learnable`` trains its own centres from a random start, like the ArcFace baseline - with
``loss: cosine`` that is the angular distillation of ``angular``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["l2", "cosine"]) -> torch.Tensor:
    """Per-sample distance [B] between L2-normalised student and teacher embeddings."""
    student = F.normalize(student.float(), dim=1)
    teacher = F.normalize(teacher.detach().float(), dim=1)
    if kind == "l2":
        return (student - teacher).pow(2).sum(dim=1)
    return 1.0 - (student * teacher).sum(dim=1)


@dataclass
class EmbeddingParams:
    loss: Literal["l2", "cosine"] = "cosine"
    weight: float = 1.0
    head: Literal["frozen", "learnable"] = "frozen"
    scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("weight", self.weight)


@register_method
class EmbeddingDistillation(DistillMethod):
    name = "embedding"
    shards_head = True
    Params = EmbeddingParams

    def __init__(self, params: EmbeddingParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, params.head)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        distance = embedding_distance(embeddings, teacher, self.params.loss).mean()
        return {
            "arcface": self.head(embeddings, labels)["margin"],
            "embedding": self.params.weight * distance,
        }
