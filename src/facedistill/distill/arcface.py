"""ArcFace (Deng et al., CVPR'19, arXiv 1801.07698): the baseline without a teacher.

loss = CE(s * [cos(theta_y + m), cos(theta_j != y)]) with learnable class centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facedistill.distill.base import DistillMethod, MethodContext, register_method
from facedistill.heads import MarginHead


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
    Params = ArcFaceParams

    def __init__(self, params: ArcFaceParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = MarginHead(
            context.num_classes, context.embedding_size, params.scale, params.m1, params.margin, params.m3
        )

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {"arcface": F.cross_entropy(self.head(embeddings, labels), labels)}
