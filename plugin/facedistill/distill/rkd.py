"""Relational knowledge distillation (RKD): distances and angles between the batch's embeddings, plus ArcFace.

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR'19, arXiv 1904.05068; official code: lenscloth/RKD
(``metric/loss.py``: ``RkdDistance``, ``RKdAngle``; ``metric/utils.py``: ``pdist``). The same losses, with the
paper's weights 25 and 50, are TFace's face-recognition RKD baseline (Tencent/TFace,
``recognition/tasks/ekd/distillation/rkd.py``). With x the student's and y the teacher's embeddings of a batch::

    psi_D(i, j) = |x_i - x_j| / mu,   mu = mean of |x_k - x_l| over pairs with a positive distance
    distance = mean over all B x B pairs (i, j) of huber(psi_D^s(i, j) - psi_D^t(i, j))
    psi_A(i, j, k) = < (x_j - x_i) / |x_j - x_i|, (x_k - x_i) / |x_k - x_i| >    cos of the angle at i
    angle = mean over all B x B x B triples of huber(psi_A^s - psi_A^t)
    loss = CE(s * [cos(theta_y + m), cos(theta_j)]) + 25 * distance + 50 * angle

``huber`` is ``smooth_l1`` with delta 1, as in the reference; like the reference, the means include the diagonal
(zero) pairs and degenerate triples (zero vectors), which only rescale the terms by a constant for a fixed batch
size. ``normalize: true`` (default) L2-normalises both embeddings first, so the relations are those of the
hypersphere on which faces are compared; TFace uses raw features, lenscloth/RKD's face-free example a normalised
teacher and a raw student. The angle term costs B^2 * d memory and B^3 time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive

PDIST_EPS = 1e-12


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """[B, B] Euclidean distances, exactly 0 on the diagonal; squared distances are clamped before the square root
    so that coincident rows give a finite (zero) gradient."""
    squared = x.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2.0 * x @ x.T).clamp_min(PDIST_EPS).sqrt()
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return distances * off_diagonal


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher_d = pairwise_euclidean(teacher)
        teacher_d = teacher_d / teacher_d[teacher_d > 0].mean()
    student_d = pairwise_euclidean(student)
    student_d = student_d / student_d[student_d > 0].mean()
    return F.smooth_l1_loss(student_d, teacher_d)


def angle_cosines(x: torch.Tensor) -> torch.Tensor:
    """[B, B, B]: entry (i, j, k) is the cosine of the angle at x_i between x_j and x_k."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher_a = angle_cosines(teacher)
    return F.smooth_l1_loss(angle_cosines(student), teacher_a)


@dataclass
class RKDParams:
    distance_weight: float = 25.0
    angle_weight: float = 50.0
    normalize: bool = True
    head: Literal["frozen", "learnable"] = "learnable"
    scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("distance_weight", self.distance_weight)
        check_positive("angle_weight", self.angle_weight)


@register_method
class RKD(DistillMethod):
    name = "rkd"
    shards_head = True
    Params = RKDParams

    def __init__(self, params: RKDParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, params.head)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        if len(labels) < 2:
            raise ValueError("rkd needs batches of at least 2 images (it distils relations between them)")
        student, target = embeddings.float(), teacher.detach().float()
        if self.params.normalize:
            student, target = F.normalize(student, dim=1), F.normalize(target, dim=1)
        return {
            "arcface": self.head(embeddings, labels)["margin"],
            "rkd_distance": self.params.distance_weight * rkd_distance(student, target),
            "rkd_angle": self.params.angle_weight * rkd_angle(student, target),
        }
