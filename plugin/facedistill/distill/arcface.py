"""ArcFace (Deng et al., CVPR'19, arXiv 1801.07698): the baseline without a teacher.

loss = CE(s * [cos(theta_y + m), cos(theta_j != y)]) with learnable class centres.

``gradient`` chooses how the margin is differentiated:

- ``exact`` (default): the gradient of the loss as written, through arccos, ``+ m`` and cos; past theta + m > pi
  the target logit keeps falling (``facedistill.heads.margin``);
- ``framework``: insightface arcface_torch's CombinedMarginLoss (``losses.py``), which applies the margin in place
  under ``no_grad``: the same loss value (plain cos(theta + m) everywhere), but the gradient passes straight
  through the margin as if the logit were cos(theta). This is "ArcFace as the framework trains it".

The default stays ``exact``: it is the paper's loss, and every ArcFace row the toolkit has reported was trained with
it; ``framework`` is there to compare against the framework's own baseline inside facedistill's loop (the
arcface_torch plugin's ArcFace is the framework's own head, untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from facedistill.distill.base import (
    DistillMethod,
    MethodContext,
    build_margin_head,
    register_method,
)


@dataclass
class ArcFaceParams:
    scale: float = 64.0
    margin: float = 0.5
    m1: float = 1.0
    m3: float = 0.0
    gradient: Literal["exact", "framework"] = "exact"


@register_method
class ArcFace(DistillMethod):
    name = "arcface"
    needs_teacher = False
    shards_head = True
    Params = ArcFaceParams

    def __init__(self, params: ArcFaceParams, context: MethodContext) -> None:
        super().__init__(params, context)
        form = "framework" if params.gradient == "framework" else "continue"
        self.head = build_margin_head(context, params.scale, params.m1, params.margin, params.m3, target_form=form)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {"arcface": self.head(embeddings, labels)["margin"]}
