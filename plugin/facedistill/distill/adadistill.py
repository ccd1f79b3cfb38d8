"""AdaDistill: AdaArcDistill / AdaCosDistill, a margin loss whose class centres follow the teacher's embeddings.

Boutros, Struc & Damer, "AdaDistill: Adaptive Knowledge Distillation for Deep Face Recognition", ECCV'24,
arXiv 2407.01332; official code: fdbtrs/AdaDistill, ``utils/losses.py`` (``AdaptiveAArcFace``,
``AdaptiveACosFace``) and ``train/train_AdaDistill.py``. Before the loss of every step, with t_i, s_i the
L2-normalised teacher and student embeddings of sample i of class y_i and W the (unnormalised) centres::

    alpha_i = clamp(clamp(cos(s_i, t_i), -1, 1) * clamp(cos(W_{y_i}, t_i), 1e-6, 1), 1e-6, 1)   (weighted_alpha)
    alpha_i = clamp(cos(s_i, t_i), 1e-6, 1)                                                  (weighted_alpha=false)
    W_y <- mean over the batch's samples i of class y of [alpha_i W_y + (1 - alpha_i) t_i]
    loss = CE(s * [cos(theta_y + m), cos(theta_j)])   (arc, m = 0.5)   or   CE(s * [cos(theta_y) - m, ...])  (cos)

so a student that already agrees with the teacher (alpha near 1) keeps its centres, one that does not gets centres
pulled onto the teacher's embeddings: easy knowledge first, harder later, with no schedule to tune. What the
reference does, and we do too: alpha is computed and the centres updated under ``no_grad`` before the logits, so
the loss of this step uses the updated centres; the centres get no gradient (the reference keeps the head out of
the optimiser; here they are a buffer); the update is applied to the raw centres, which are normalised only to
compute cosines; s = 64.

Differences from the reference, on purpose:

- Centres start from the teacher's L2-normalised class centres. The reference starts from ``Normal(0, 0.01)``
  (it never loads a teacher head for AdaDistill); then cos(W_y, t_i) ~ 0, alpha ~ 1e-6, so each centre becomes
  the teacher embedding of the first sample of its class, and only then starts averaging.
- Several samples of one class in a batch: the reference writes ``kernel[:, label] = ...`` with repeated indices,
  so one sample's update survives (which one is unspecified; on GPU it is nondeterministic). We average the
  per-sample updates, each computed from the same old centre, which equals the reference when a class has one sample.
- Several processes: the reference updates the centres of each GPU from that GPU's batch and, after DDP's initial
  broadcast, never synchronises them, so the GPUs train against drifting, different heads. We gather the union of
  the batch's classes over all ranks, compute per-class sums of (count, alpha_i, (1 - alpha_i) t_i) with
  ``_class_sums``, ``all_reduce`` them and apply one update from the union of all ranks' samples, identical on every
  rank (and equal to the single-process update on the concatenated batch). Three small collectives per step: label
  counts, labels, sums.
- ``weighted_alpha=false``: the reference's branch uses ``self.t_alpha``, which it never defines (and the training
  script passes ``adaptive_alpha=``, which its heads do not accept); we take t_alpha = 0, i.e. alpha = cos(s_i, t_i).
- The reference's config uses m = 0.45 for ArcFace; we default to ArcFace's 0.5 and CosFace's 0.35 like the rest
  of facedistill. Margins use ``MarginHead`` (an acos guard at cos = +-1 the reference lacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.distill.arcdistill import loss_name
from facedistill.distill.base import DistillMethod, MethodContext, margin_head, register_method
from facedistill.distill.checks import check_margin_loss

ALPHA_MIN = 1e-6


def adaptive_alpha(
    student: torch.Tensor, teacher: torch.Tensor, class_centres: torch.Tensor, weighted: bool = True
) -> torch.Tensor:
    """Per-sample alpha_i [B] from student and teacher embeddings and the current centres of their classes."""
    agreement = F.cosine_similarity(student.float(), teacher.float(), dim=1).clamp(-1.0, 1.0)
    if weighted:
        typicality = F.cosine_similarity(class_centres.float(), teacher.float(), dim=1).clamp(ALPHA_MIN, 1.0)
        agreement = agreement * typicality
    return agreement.clamp(ALPHA_MIN, 1.0)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _union_classes(labels: torch.Tensor) -> torch.Tensor:
    """Sorted classes present in this batch on any rank (this batch's classes without a process group)."""
    if not _is_distributed():
        return torch.unique(labels)
    world = dist.get_world_size()
    count = torch.tensor([labels.numel()], dtype=torch.int64, device=labels.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(torch.cat(counts).max())
    # all_gather needs equal shapes: pad with -1, which no label takes.
    padded = labels.new_full((longest,), -1)
    padded[: labels.numel()] = labels
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    everything = torch.cat(gathered)
    return torch.unique(everything[everything >= 0])


def _class_sums(
    labels: torch.Tensor, alpha: torch.Tensor, teacher: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Per-class sums over this rank's samples, [len(classes), 2 + d]: count, sum alpha_i, sum (1 - alpha_i) t_i.

    ``classes`` is sorted and contains every label. Sums (not means) so that adding them over ranks gives the sums
    over the union of all ranks' samples.
    """
    rows = torch.searchsorted(classes, labels)
    alpha = alpha.float()
    values = torch.cat([torch.ones_like(alpha)[:, None], alpha[:, None], (1.0 - alpha)[:, None] * teacher.float()], 1)
    sums = values.new_zeros((len(classes), values.shape[1]))
    return sums.index_add_(0, rows, values)


@torch.no_grad()
def update_centres(
    centres: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weighted: bool = True,
) -> None:
    """In place: ``W_y <- mean_i [alpha_i W_y + (1 - alpha_i) t_i]`` over class y's samples on every rank."""
    student = F.normalize(student.float(), dim=1)
    teacher = F.normalize(teacher.float(), dim=1)
    alpha = adaptive_alpha(student, teacher, centres[labels], weighted)
    classes = _union_classes(labels)
    sums = _class_sums(labels, alpha, teacher, classes)
    if _is_distributed():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    count = sums[:, :1]
    mean_alpha, mean_pull = sums[:, 1:2] / count, sums[:, 2:] / count
    centres[classes] = mean_alpha * centres[classes] + mean_pull.to(centres.dtype)


@dataclass
class AdaDistillParams:
    variant: Literal["arc", "cos"] = "arc"
    weighted_alpha: bool = True
    scale: float = 64.0
    # None: 0.5 for arc, 0.35 for cos.
    margin: float | None = None

    def __post_init__(self) -> None:
        check_margin_loss(self.scale, self.margin)


@register_method
class AdaDistill(DistillMethod):
    name = "adadistill"
    Params = AdaDistillParams

    def __init__(self, params: AdaDistillParams, context: MethodContext) -> None:
        super().__init__(params, context)
        # A frozen head keeps the centres in a buffer: no gradient, no optimiser, but saved with the method.
        self.head = margin_head(context, params.scale, params.margin, "frozen", params.variant)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        if self.training:
            update_centres(self.head.weight, embeddings.detach(), teacher, labels, self.params.weighted_alpha)
        return {loss_name(self.params.variant): self.head(embeddings, labels)["margin"]}
