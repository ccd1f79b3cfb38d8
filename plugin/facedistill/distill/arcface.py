"""ArcFace (Deng et al., CVPR'19, arXiv 1801.07698): the baseline without a teacher.

loss = CE(s * [cos(theta_y + m), cos(theta_j != y)]) with learnable class centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facedistill.distill.base import (
    DistillMethod,
    MethodContext,
    build_margin_head,
    margin_cross_entropy,
    register_method,
)


@dataclass
class ArcFaceParams:
    scale: float = 64.0
    margin: float = 0.5
    m1: float = 1.0
    m3: float = 0.0


@register_method
class ArcFace(DistillMethod):
    name = "arcface"
    needs_teacher = False
    shards_head = True
    Params = ArcFaceParams

    def __init__(self, params: ArcFaceParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = build_margin_head(context, params.scale, params.m1, params.margin, params.m3)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {"arcface": margin_cross_entropy(self.head, embeddings, labels)}
