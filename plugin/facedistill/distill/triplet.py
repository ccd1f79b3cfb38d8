"""Triplet distillation: a triplet loss whose margin per triplet comes from the teacher, plus ArcFace.

Feng et al., "Triplet Distillation for Deep Face Recognition", ICIP'20, arXiv 1905.04457. The implementation we
follow is the MarginDistillation authors' comparison, david-svitov/margindistillation, ``train/train.py``
(``triplet_distillation_L2`` / ``triplet_distillation_cos``) and ``train/config.py``. For a triplet k = (a, p, n)
(anchor, positive of the anchor's identity, negative of another identity) on L2-normalised embeddings::

    g_k = max(0, D_t(a, n) - D_t(a, p))                       the teacher's separation of the triplet
    m_k = (m_max - m_min) * g_k / max_k' g_k' + m_min          max over the batch's triplets; 0.2, 0.5
    triplet = mean_k max(0, D_s(a, p) - D_s(a, n) + m_k)
    loss = arcface_weight * CE(s * [cos(theta_y + m), cos(theta_j)]) + triplet_weight * triplet

``distance: l2`` is the squared Euclidean distance (``2 - 2 cos`` on unit vectors, as the reference computes it);
``distance: cosine`` is the angle ``arccos(cos)``, which is what the reference's ``_cos`` variant uses.

Differences from the reference, on purpose:

- Mining is online, inside the batch: ``mining: hardest`` takes, for every anchor with a positive and a negative in
  the batch, its farthest positive and nearest negative under the student's distances ("batch hard", Hermans et al.,
  arXiv 1703.07737); ``mining: all`` uses every valid (a, p, n) of the batch (B^3 memory: keep batches modest).
  The reference selects FaceNet semi-hard triplets offline from a bag of 7,200 images embedded by the student.
- When every g_k is 0 the reference divides by zero (NaN margins); we use m_min for every triplet.
- The reference trains the triplet loss alone, fine-tuning its ArcFace-trained student (``README.md``:
  ``--pretrained ./models/y1-arcface-emore/model``) at lr 0.001; ``arcface_weight: 0`` does the same from a
  pretrained student. The default adds ArcFace (learnable centres, or the teacher's with ``head: frozen``) so the
  method can train a student from scratch like the others.

Triplets need identity-balanced batches (``facedistill.data.samplers.IdentityBalancedSampler``): a batch without a
positive pair (or without a negative) yields no triplet, and the triplet term is then an exact zero - no error, so
a shuffled batch only loses its triplet signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from facedistill.config import ParamError
from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive
from facedistill.heads.margin import COS_EPS


def pairwise_distances(embeddings: torch.Tensor, kind: Literal["l2", "cosine"]) -> torch.Tensor:
    """[B, B] distances between L2-normalised rows: squared Euclidean or angle."""
    unit = F.normalize(embeddings.float(), dim=1)
    cos = unit @ unit.T
    if kind == "l2":
        return (2.0 - 2.0 * cos).clamp_min(0.0)
    return torch.acos(cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))


def mine_triplets(
    distances: torch.Tensor, labels: torch.Tensor, mining: Literal["hardest", "all"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor, positive and negative indices (each [K]) of the batch's triplets; K = 0 when there are none."""
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    if mining == "all":
        valid = positive[:, :, None] & negative[:, None, :]
        anchor, pos, neg = valid.nonzero(as_tuple=True)
        return anchor, pos, neg
    distances = distances.detach()
    anchor = (positive.any(dim=1) & negative.any(dim=1)).nonzero(as_tuple=True)[0]
    pos = distances.masked_fill(~positive, float("-inf"))[anchor].argmax(dim=1)
    neg = distances.masked_fill(~negative, float("inf"))[anchor].argmin(dim=1)
    return anchor, pos, neg


def teacher_margins(teacher_gap: torch.Tensor, m_min: float, m_max: float) -> torch.Tensor:
    """``m_k = (m_max - m_min) * g_k / max g + m_min`` with ``g = max(0, gap)``; m_min everywhere when max g = 0."""
    gap = teacher_gap.clamp_min(0.0)
    peak = gap.max()
    if not bool(peak > 0):
        return torch.full_like(gap, m_min)
    return (m_max - m_min) * gap / peak + m_min


def triplet_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    m_min: float = 0.2,
    m_max: float = 0.5,
    distance: Literal["l2", "cosine"] = "l2",
    mining: Literal["hardest", "all"] = "hardest",
) -> torch.Tensor:
    """The triplet term (a scalar; exactly 0 when the batch has no triplet)."""
    student_d = pairwise_distances(student, distance)
    anchor, pos, neg = mine_triplets(student_d, labels, mining)
    if anchor.numel() == 0:
        # Zero but still attached to the graph, so a run with arcface_weight=0 can call backward on it.
        return student.float().sum() * 0.0
    with torch.no_grad():
        teacher_d = pairwise_distances(teacher, distance)
        margins = teacher_margins(teacher_d[anchor, neg] - teacher_d[anchor, pos], m_min, m_max)
    return F.relu(student_d[anchor, pos] - student_d[anchor, neg] + margins).mean()


@dataclass
class TripletParams:
    m_min: float = 0.2
    m_max: float = 0.5
    distance: Literal["l2", "cosine"] = "l2"
    mining: Literal["hardest", "all"] = "hardest"
    triplet_weight: float = 1.0
    arcface_weight: float = 1.0
    head: Literal["frozen", "learnable"] = "learnable"
    scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("triplet_weight", self.triplet_weight)
        check_positive("arcface_weight", self.arcface_weight)
        if not 0.0 <= self.m_min <= self.m_max:
            raise ParamError("m_min", f"must satisfy 0 <= m_min <= m_max, got m_min={self.m_min}, m_max={self.m_max}")


@register_method
class TripletDistillation(DistillMethod):
    name = "triplet"
    needs_identity_balanced_batches = True
    shards_head = True
    Params = TripletParams

    def __init__(self, params: TripletParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, params.head)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        p = self.params
        terms = {
            "triplet": p.triplet_weight
            * triplet_distillation(embeddings, teacher, labels, p.m_min, p.m_max, p.distance, p.mining)
        }
        if p.arcface_weight > 0:
            terms["arcface"] = p.arcface_weight * self.head(embeddings, labels)["margin"]
        return terms
