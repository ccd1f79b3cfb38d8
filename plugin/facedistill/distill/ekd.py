"""Evaluation-oriented knowledge distillation (EKD), plus ArcFace.

Huang, Wu, Xu & Ding, "Evaluation-oriented Knowledge Distillation for Deep Face Recognition", CVPR'22
(arXiv 2206.02325); official code: Tencent/TFace, ``recognition/tasks/ekd/distillation/ekd.py`` (the loss) and
``recognition/tasks/ekd/train.py`` / ``dataset.py`` (how it is trained). Verification is decided by thresholds on
cosine similarity set at false-positive rates; EKD asks the student to place the critical pairs relative to its own
FPR thresholds as the teacher places them relative to the teacher's::

    S^s, S^t: cosine similarities of every pair i < j of the batch (L2-normalised embeddings)
    thresholds: for each FPR anchor f (1e-1 .. 1e-6) the negative similarity at rank floor(f * N_neg) (0-based,
        descending) - the threshold at which a fraction f of the batch's negative pairs would be accepted - tracked
        per network by an EMA with momentum 0.01:  tau <- 0.01 * tau_batch + 0.99 * tau
    rank(x, tau) = sum_f sigmoid((x - tau_f) / 0.01)          a soft count of the thresholds that x passes
    L_pos = mean over positive pairs of (rank(S^s_ij, tau^s) - rank(S^t_ij, tau^t))^2
    L_neg = the same over the 2000 hardest negative pairs by student similarity (the same pairs for the teacher)
    loss = CE(s * [cos(theta_y + m), cos(theta_j)]) + 0.02 * L_pos + 0.01 * L_neg

All constants above are the reference's (``topk``, ``t``, ``anchor``, ``momentum``, the 0.02 / 0.01 weights);
thresholds are not differentiated, and both are updated before the loss is computed, as in the reference (in
training mode only: ``eval()`` freezes them).

Differences from the reference, on purpose:

- Anchors the batch cannot resolve (``floor(f * N_neg) == 0``: fewer than 1/f negative pairs) are skipped: their
  thresholds are neither updated nor used. The reference then indexes rank 0, the hardest negative, so all of them
  duplicate one threshold (8 GPUs x 64 images resolve 1e-1..1e-5; one 128-image batch 1e-1..1e-3).
- ``warm_start: true`` starts each threshold at its first batch value; the reference starts the EMAs at 0, so for
  the first few hundred steps its thresholds sit far below the real ones (``warm_start: false`` reproduces it).
- Pairs come from this process's batch. The reference all-gathers the features of every GPU first and builds its
  batches as 32 random + 32 identity-balanced images (8 identities x 4) per GPU, with the softmax loss on the random
  half only; here the margin loss sees the whole batch. Use ``IdentityBalancedSampler`` so that the batch has
  positive pairs: without any, L_pos is an exact zero (and L_neg still applies).
- The margin loss defaults to facedistill's ArcFace m = 0.5 (TFace's ``train.yaml`` sets scale 64, margin 0.4).
- ``sigmoid`` is ``torch.sigmoid``; the reference clamps its exponent to +-50, which changes values by < 2e-22.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from facedistill.config import ParamError
from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive, check_unit_interval

# Guards floor(f * n) against f * n landing just below an integer in floating point (e.g. 0.1 * 30).
_FLOOR_SLACK = 1e-9


def rank_counts(similarities: torch.Tensor, thresholds: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_f sigmoid((x - tau_f) / T)`` for every similarity x: [P]."""
    return torch.sigmoid((similarities[:, None] - thresholds[None, :]) / temperature).sum(dim=1)


def relative_rank_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_thresholds: torch.Tensor,
    teacher_thresholds: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """MSE between the student's and the teacher's soft threshold counts over the same pairs; 0 for no pairs."""
    if student.numel() == 0 or student_thresholds.numel() == 0:
        return student.sum() * 0.0
    return F.mse_loss(
        rank_counts(student, student_thresholds, temperature),
        rank_counts(teacher, teacher_thresholds, temperature),
    )


def threshold_ranks(num_negatives: int, fprs: list[float]) -> list[int]:
    """0-based rank (descending) of each FPR anchor's threshold among ``num_negatives`` negatives; 0 = unresolved."""
    return [math.floor(num_negatives * fpr + _FLOOR_SLACK) for fpr in fprs]


@dataclass
class EKDParams:
    fprs: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    momentum: float = 0.01
    temperature: float = 0.01
    topk: int = 2000
    positive_weight: float = 0.02
    negative_weight: float = 0.01
    warm_start: bool = True
    head: Literal["frozen", "learnable"] = "learnable"
    scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        if not self.fprs or not all(0.0 < fpr < 1.0 for fpr in self.fprs):
            raise ParamError("fprs", f"must be a non-empty list of rates in (0, 1), got {self.fprs}")
        check_unit_interval("momentum", self.momentum)
        check_positive("temperature", self.temperature, allow_zero=False)
        if self.topk < 1:
            raise ParamError("topk", f"must be >= 1, got {self.topk}")
        check_positive("positive_weight", self.positive_weight)
        check_positive("negative_weight", self.negative_weight)


@register_method
class EKD(DistillMethod):
    name = "ekd"
    needs_identity_balanced_batches = True
    shards_head = True
    Params = EKDParams

    def __init__(self, params: EKDParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, params.head)
        anchors = len(params.fprs)
        self.register_buffer("student_thresholds", torch.zeros(anchors))
        self.register_buffer("teacher_thresholds", torch.zeros(anchors))
        self.register_buffer("thresholds_seen", torch.zeros(anchors, dtype=torch.bool))

    @torch.no_grad()
    def update_thresholds(self, student_negatives: torch.Tensor, teacher_negatives: torch.Tensor) -> torch.Tensor:
        """EMA-update the thresholds of the anchors this batch resolves; returns their mask [K]."""
        ranks = torch.tensor(threshold_ranks(len(student_negatives), self.params.fprs))
        active = (ranks >= 1).to(self.thresholds_seen.device)
        if not bool(active.any()):
            return active
        ranks = ranks.clamp(0, len(student_negatives) - 1).to(student_negatives.device)
        student_now = student_negatives.sort(descending=True).values[ranks]
        teacher_now = teacher_negatives.sort(descending=True).values[ranks]
        keep = 1.0 - self.params.momentum
        for now, buffer in ((student_now, self.student_thresholds), (teacher_now, self.teacher_thresholds)):
            blended = self.params.momentum * now + keep * buffer
            if self.params.warm_start:
                blended = torch.where(self.thresholds_seen, blended, now)
            buffer.copy_(torch.where(active, blended, buffer))
        self.thresholds_seen |= active
        return active

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        p = self.params
        first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        student = F.normalize(embeddings.float(), dim=1)
        # Index the Gram matrix: gathering row pairs first would cost B^2 / 2 x d memory.
        student_sim = (student @ student.T)[first, second]
        with torch.no_grad():
            target = F.normalize(teacher.float(), dim=1)
            teacher_sim = (target @ target.T)[first, second]
        positive = labels[first] == labels[second]
        student_neg, teacher_neg = student_sim[~positive], teacher_sim[~positive]

        if self.training:
            active = self.update_thresholds(student_neg.detach(), teacher_neg)
        else:
            active = self.thresholds_seen.clone()
        student_tau, teacher_tau = self.student_thresholds[active], self.teacher_thresholds[active]
        hardest = student_neg.detach().argsort(descending=True)[: p.topk]
        positive_loss = relative_rank_loss(
            student_sim[positive], teacher_sim[positive], student_tau, teacher_tau, p.temperature
        )
        negative_loss = relative_rank_loss(
            student_neg[hardest], teacher_neg[hardest], student_tau, teacher_tau, p.temperature
        )
        return {
            "arcface": self.head(embeddings, labels)["margin"],
            "ekd_positive": p.positive_weight * positive_loss,
            "ekd_negative": p.negative_weight * negative_loss,
        }
