"""ArcDistill / CosDistill (AMLDistill): the teacher's frozen head with a constant margin.

Boutros et al., "AdaDistill: Adaptive Knowledge Distillation for Deep Face Recognition", ECCV'24, arXiv 2407.01332;
official code: fdbtrs/AdaDistill (``train/train_AMLDistill.py`` + ``utils/losses.py``). The ablation baseline of
that paper: the student is trained with ArcFace (or CosFace) against the teacher's class centres W, which are
loaded from the teacher and never trained (the reference keeps the head out of the optimiser)::

    arc:  loss = CE(s * [cos(theta_y + m), cos(theta_j)_{j != y}])      m = 0.5
    cos:  loss = CE(s * [cos(theta_y) - m, cos(theta_j)_{j != y}])      m = 0.35

It is MarginDistillation (``margin_distillation``) with one margin for every sample instead of a margin per sample.
The reference's config uses s = 64 and m = 0.45; we default to the ArcFace / CosFace margins of their papers.

This module also holds what the other distillation methods share: the hard-label margin head (frozen teacher
centres or learnable ones) and the validation of its hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss


def loss_name(variant: Literal["arc", "cos"]) -> str:
    return "arcface" if variant == "arc" else "cosface"


@dataclass
class ArcDistillParams:
    scale: float = 64.0
    # None: 0.5 for arc, 0.35 for cos.
    margin: float | None = None
    variant: Literal["arc", "cos"] = "arc"

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)


@register_method
class ArcDistill(DistillMethod):
    name = "arcdistill"
    shards_head = True
    Params = ArcDistillParams

    def __init__(self, params: ArcDistillParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, "frozen", params.variant)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {loss_name(self.params.variant): self.head(embeddings, labels)["margin"]}
