"""Margin-based softmax heads: ArcFace, CosFace, SphereFace-style and their combination.

Combined margin (insightface, "CombinedMarginLoss"): the true-class logit is ``s * (cos(m1 * theta + m2) - m3)``,
every other logit ``s * cos(theta_j)``, where ``theta`` is the angle between the L2-normalised embedding and the
L2-normalised class centre. ArcFace is (1, m, 0), CosFace (1, 0, m), SphereFace-style (m, 0, 0).

``m2`` may be given per sample (MarginDistillation gives every image its own margin).

Numerical safety: cosines are computed in float32 outside autocast and clamped to [-1 + eps, 1 - eps] before
``acos``, so neither the value nor the gradient is NaN at cos = +-1.

When ``m1 * theta + m2 > pi``, ``cos`` would turn back up and reward a larger angle. Beyond that boundary
``theta_b = (pi - m2) / m1`` the target logit instead continues as ``cos(theta) - cos(theta_b) - 1 - m3``: equal
to the margin curve at the boundary (``-1 - m3``), and monotonically decreasing in ``theta`` like it. (insightface
uses ``cos(theta) - m sin(m)`` there, which is monotone but jumps at the boundary.)

``target_form`` chooses among three forms of the true-class logit:

- ``continue`` (default): the above, with the exact gradient;
- ``cos``: plain ``cos(m1 theta + m2) - m3`` everywhere, exact gradient (the official MarginDistillation code);
- ``framework``: arcface_torch's CombinedMarginLoss, which applies arccos, ``+ m2`` and cos in place under
  ``no_grad``: the value is plain ``cos(theta + m2) - m3`` but the gradient passes straight through the margin, as
  if the logit were ``cos(theta)``. The losses agree; the gradients do not (by ~0.4-1.2 in embedding-gradient norm
  on random batches), so a baseline "as the framework trains it" needs this form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

COS_EPS = 1e-6
# The forms of the true-class logit (see the module docstring).
TARGET_FORMS = ("continue", "cos", "framework")


def margin_target_logit(
    cos_theta: torch.Tensor, m1: float, m2: torch.Tensor | float, m3: float, target_form: str = "continue"
) -> torch.Tensor:
    """Margin-adjusted cosine of the true class (unscaled); ``m2`` is a scalar or one margin per sample."""
    m2 = torch.as_tensor(m2, dtype=cos_theta.dtype, device=cos_theta.device)
    if target_form == "framework":
        # The value of the margin, the gradient of the plain cosine (a straight-through margin); no gradient flows
        # through arccos, so it needs no guard at +-1 and takes arccos of the clamped cosine, as upstream does.
        with torch.no_grad():
            value = torch.cos(m1 * torch.acos(cos_theta.clamp(-1.0, 1.0)) + m2) - m3
        return cos_theta + (value - cos_theta.detach())
    theta = torch.acos(cos_theta.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
    angle = m1 * theta + m2
    with_margin = torch.cos(angle) - m3
    if target_form == "cos":
        return with_margin
    boundary = (math.pi - m2) / m1
    beyond = cos_theta - torch.cos(boundary) - 1.0 - m3
    return torch.where(angle <= math.pi, with_margin, beyond)


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (arXiv 1503.02531): ``T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))``; the ``T^2``
    keeps the soft term's gradient comparable across temperatures."""
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def check_margins(m1: float, m2: float, m3: float, target_form: str = "continue") -> None:
    """The one check of a head's combined margin (every margin head calls it)."""
    if m1 < 1.0 or m2 < 0.0 or m3 < 0.0:
        raise ValueError(f"margins must satisfy m1 >= 1, m2 >= 0, m3 >= 0; got {m1}, {m2}, {m3}")
    if target_form not in TARGET_FORMS:
        raise ValueError(f"target_form must be one of {', '.join(TARGET_FORMS)}, got {target_form!r}")


class MarginHead(nn.Module):
    """Scaled cosine classifier with a combined margin on the true class.

    ``centres`` (C x d) initialises the class centres; with ``learnable=False`` they are a frozen, L2-normalised
    buffer (MarginDistillation's teacher centres), otherwise a trainable parameter.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        learnable: bool = True,
        centres: torch.Tensor | None = None,
        target_form: str = "continue",
    ) -> None:
        super().__init__()
        check_margins(m1, m2, m3, target_form)
        self.target_form = target_form
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.learnable = learnable
        if centres is None:
            if not learnable:
                raise ValueError("frozen centres need a centres tensor (e.g. the teacher's class centres)")
            centres = torch.randn(num_classes, embedding_size) * 0.01
        if tuple(centres.shape) != (num_classes, embedding_size):
            raise ValueError(
                f"class centres have shape {tuple(centres.shape)}, expected ({num_classes}, {embedding_size}): "
                "the number of classes must match the dataset and the dimension the student's embedding size"
            )
        centres = centres.detach().float().clone()
        if learnable:
            self.weight = nn.Parameter(centres)
        else:
            self.register_buffer("weight", F.normalize(centres, dim=1))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    @property
    def distributed(self) -> bool:
        """One process holds every centre (the sharded heads answer True when they span several ranks)."""
        return False

    @torch.no_grad()
    def true_class_cosine(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos(vectors_i, W_{labels_i})``: MarginDistillation's typicality of the teacher embeddings."""
        weight = F.normalize(self.weight.float(), dim=1) if self.learnable else self.weight
        return (F.normalize(vectors.float(), dim=1) * weight[labels]).sum(dim=1)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        margin: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        temperature: float = 4.0,
    ) -> dict[str, torch.Tensor]:
        """The head's loss terms, as every head returns them: ``margin``, the mean margin cross-entropy of the
        batch (``margin`` [B] replaces ``m2`` per sample), and with ``teacher`` embeddings ``kd``, Hinton's
        distillation over these centres (:func:`soft_kd` of both networks' scaled cosines)."""
        terms = {"margin": F.cross_entropy(self.logits(embeddings, labels, margin), labels)}
        if teacher is not None:
            student, target = self.scale * self.cosine(embeddings), self.scale * self.cosine(teacher)
            terms["kd"] = soft_kd(student, target, temperature)
        return terms

    def logits(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled logits [B, C]; ``margin`` (shape [B]) replaces ``m2`` per sample when given."""
        cos = self.cosine(embeddings)
        true_cos = cos.gather(1, labels[:, None]).squeeze(1)
        m2 = self.m2 if margin is None else margin.float()
        target = margin_target_logit(true_cos, self.m1, m2, self.m3, self.target_form)
        logits = cos.scatter(1, labels[:, None], target[:, None])
        return logits * self.scale

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, dim={self.embedding_size}, s={self.scale}, "
            f"m=({self.m1}, {self.m2}, {self.m3}), learnable={self.learnable}"
        )
