"""Hinton knowledge distillation over the teacher's class centres, plus ArcFace on the same frozen centres.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531 (no official code).
A face teacher's logits are its cosines to its class centres W, so both networks are scored against the same
frozen, L2-normalised W (the teacher's head, or its per-class mean embeddings)::

    z_s = s * cos(f_s, W)    z_t = s * cos(f_t, W)                    [B, C]
    kd  = T^2 * mean_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))
    loss = CE(s * [cos(theta_y + m), cos(theta_j)_{j != y}]) + kd_weight * kd

The T^2 factor keeps the gradient of the soft term comparable across temperatures (Hinton et al., section 2).
The logits carry no margin: the margin shapes the hard-label loss only, the teacher's distribution is its plain
cosine softmax. The KL divergence is summed over classes and averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive
from facedistill.heads.margin import soft_kd

__all__ = ["KD", "KDParams", "soft_kd"]


@dataclass
class KDParams:
    scale: float = 64.0
    margin: float = 0.5
    temperature: float = 4.0
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("temperature", self.temperature, allow_zero=False)
        check_positive("kd_weight", self.kd_weight)


@register_method
class KD(DistillMethod):
    name = "kd"
    Params = KDParams

    def __init__(self, params: KDParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, "frozen")

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        terms = self.head(embeddings, labels, teacher=teacher, temperature=self.params.temperature)
        return {"arcface": terms["margin"], "kd": self.params.kd_weight * terms["kd"]}
