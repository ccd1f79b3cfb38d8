"""Grouped knowledge distillation (GKD): KD on the teacher's primary classes and on primary-vs-rest, plus ArcFace.

Zhao, Zhu, Guo, Zhang & Lei, "Grouped Knowledge Distillation for Deep Face Recognition", AAAI'23, arXiv 2304.04462
(we found no official code). Logits of both networks are scaled cosines to the teacher's frozen class centres W,
as in ``kd``. Per sample, softened at temperature T::

    p = softmax(s * cos(f_t, W) / T),  q = softmax(s * cos(f_s, W) / T)
    primary group P = the smallest set of the teacher's most probable classes whose p sums to >= 0.93;
    secondary group = the rest
    b^p = (p(P), 1 - p(P)),  b^q = (q(P), 1 - q(P))              binary (primary vs secondary) distributions
    p^P = p restricted to P and renormalised, likewise q^P (and p^S, q^S on the secondary group)

KL(p || q) = KL(b^p || b^q) + p(P) KL(p^P || q^P) + p(S) KL(p^S || q^S) exactly: Binary-KD, Primary-KD and
Secondary-KD. GKD keeps the first two and drops Secondary-KD, which the paper finds restricts the small student::

    gkd  = T^2 * mean_i [binary_weight * KL(b^p || b^q) + primary_weight * KL(p^P || q^P)]
    loss = CE(s * [cos(theta_y + m), cos(theta_j)]) + kd_weight * min(1, epoch / warmup_epochs) * gkd

T = 4 and the 0.93 cumulative threshold follow the paper. Not verified against code: whether Primary-KD keeps the
decomposition's factor p(P) (we drop it, as DKD does for its terms; p(P) lies in [0.93, 1] so the difference is
at most 7%), the relative weights (we use 1 and 1), and the warm-up length (``warmup_epochs``, our default 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss, check_positive, check_unit_interval

# Masks logits out of a group: exp(-1e9 - x) is exactly 0 in float32 for any cosine logit, yet it stays finite, so
# an empty group gives finite values and gradients where a -inf would give NaN.
_MASKED = -1e9


def primary_mask(teacher_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, C] bool: the smallest set of most probable classes whose probabilities reach ``threshold``."""
    sorted_probs, order = teacher_probs.sort(dim=1, descending=True)
    before = sorted_probs.cumsum(dim=1) - sorted_probs
    return torch.zeros_like(teacher_probs, dtype=torch.bool).scatter(1, order, before < threshold)


def _group_log_mass(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the probability mass of the masked classes, [B]."""
    return log_probs.masked_fill(~mask, _MASKED).logsumexp(dim=1)


def _kl(teacher_log: torch.Tensor, student_log: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Per-row sum over ``include`` of p_t (log p_t - log p_s), with 0 log 0 = 0."""
    teacher_prob = teacher_log.exp()
    terms = teacher_prob * (teacher_log - student_log)
    return torch.where(include & (teacher_prob > 0), terms, torch.zeros_like(terms)).sum(dim=1)


def grouped_kd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, threshold: float
) -> dict[str, torch.Tensor]:
    """Per-sample Binary-, Primary- and Secondary-KD (without T^2) and the teacher's primary mass p(P), each [B]."""
    teacher_log = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    student_log = F.log_softmax(student_logits.float() / temperature, dim=1)
    primary = primary_mask(teacher_log.exp(), threshold)
    secondary = ~primary

    teacher_binary = torch.stack([_group_log_mass(teacher_log, primary), _group_log_mass(teacher_log, secondary)], 1)
    student_binary = torch.stack([_group_log_mass(student_log, primary), _group_log_mass(student_log, secondary)], 1)
    everything = torch.ones_like(teacher_binary, dtype=torch.bool)
    terms = {"binary": _kl(teacher_binary, student_binary, everything), "primary_mass": teacher_binary[:, 0].exp()}
    for name, group in (("primary", primary), ("secondary", secondary)):
        teacher_in = F.log_softmax(teacher_log.masked_fill(~group, _MASKED), dim=1)
        student_in = F.log_softmax(student_log.masked_fill(~group, _MASKED), dim=1)
        terms[name] = _kl(teacher_in, student_in, group)
    return terms


@dataclass
class GKDParams:
    temperature: float = 4.0
    threshold: float = 0.93
    kd_weight: float = 1.0
    binary_weight: float = 1.0
    primary_weight: float = 1.0
    warmup_epochs: float = 1.0
    scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)
        check_positive("temperature", self.temperature, allow_zero=False)
        check_unit_interval("threshold", self.threshold)
        for key in ("kd_weight", "binary_weight", "primary_weight", "warmup_epochs"):
            check_positive(key, getattr(self, key))


@register_method
class GKD(DistillMethod):
    name = "gkd"
    Params = GKDParams

    def __init__(self, params: GKDParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.head = margin_head(context, params.scale, params.margin, "frozen")
        self.epoch = 0.0

    def set_progress(self, step: int, epoch: float) -> None:
        self.epoch = epoch

    def warmup_factor(self) -> float:
        if self.params.warmup_epochs <= 0:
            return 1.0
        return min(1.0, self.epoch / self.params.warmup_epochs)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        p = self.params
        terms = grouped_kd_terms(
            p.scale * self.head.cosine(embeddings), p.scale * self.head.cosine(teacher), p.temperature, p.threshold
        )
        weight = p.kd_weight * self.warmup_factor() * p.temperature**2
        return {
            "arcface": self.head(embeddings, labels)["margin"],
            "gkd_binary": weight * p.binary_weight * terms["binary"].mean(),
            "gkd_primary": weight * p.primary_weight * terms["primary"].mean(),
        }
