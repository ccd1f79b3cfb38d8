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

import math
from dataclasses import dataclass
from typing import Literal

import torch

from facedistill.config import ConfigError
from facedistill.distill.base import (
    DistillMethod,
    MethodContext,
    build_margin_head,
    margin_cross_entropy,
    register_method,
)
from facedistill.heads import MarginHead
from facedistill.heads.sharded import ShardedMarginHead

DEFAULT_MARGINS = {"arc": 0.5, "cos": 0.35}


def check_margin_loss(scale: float, margin: float | None) -> None:
    """Clear errors for the hard-label loss hyper-parameters every method shares."""
    if scale <= 0:
        raise ConfigError(f"method.scale must be > 0, got {scale}")
    if margin is not None and not 0.0 <= margin < math.pi:
        raise ConfigError(f"method.margin must be in [0, pi), got {margin}")


def check_positive(key: str, value: float, allow_zero: bool = True) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"method.{key} must be {bound}, got {value}")


def margin_head(
    context: MethodContext,
    scale: float,
    margin: float | None,
    head: Literal["frozen", "learnable"] = "frozen",
    variant: Literal["arc", "cos"] = "arc",
) -> MarginHead | ShardedMarginHead:
    """ArcFace (``arc``) or CosFace (``cos``) head; ``frozen`` uses the teacher's centres, ``learnable`` starts
    from small random centres like the ArcFace baseline."""
    margin = DEFAULT_MARGINS[variant] if margin is None else margin
    m2, m3 = (margin, 0.0) if variant == "arc" else (0.0, margin)
    if head == "frozen":
        if context.centres is None:
            raise ValueError("method.head=frozen needs the teacher's class centres (set teacher.cache)")
        return build_margin_head(context, scale, 1.0, m2, m3, learnable=False, centres=context.centres)
    return build_margin_head(context, scale, 1.0, m2, m3)


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
        return {loss_name(self.params.variant): margin_cross_entropy(self.head, embeddings, labels)}
