"""MarginDistillation (Svitov & Alyamkin, arXiv 2003.02586; official code: david-svitov/margindistillation).

The student is trained with an ArcFace loss against the teacher's class centres W, L2-normalised and frozen, with
a margin per sample set by how typical the image is for its class in the teacher's eyes::

    c_i = cos(t_i, W_{y_i})                           t_i: teacher embedding of image i
    m_i = (m_max - m_min) * c_i / max_j c_j + m_min   m_min = 0.2, m_max = 0.5
    loss = CE(s * [cos(theta_i + m_i), cos(theta_ij)_{j != y_i}])   s = 64

The official code takes ``max_j`` over the current batch on one GPU and does nothing else. Options that fix its
weaknesses (``official`` reproduces the reference exactly: ``clamp=False, normaliser="batch", guard=False``):

- ``clamp``: clip ``c_i / max_j c_j`` to [0, 1], so ``m_i`` stays in [m_min, m_max]; without it a negative
  ``c_i`` (an image the teacher places nearer another class) gives a margin below ``m_min``, even negative.
- ``guard``: when the normaliser is <= 0 (every c_i in the batch negative or zero), use ``m_min`` for every
  sample instead of dividing by a non-positive number (the reference's margins then flip sign or become inf/NaN).
- ``normaliser="dataset"``: ``max_j`` over every cached image and mirror of the training set, computed once from
  the teacher cache, so the margin of an image no longer depends on batch size, batch composition or GPU count.
- mirrored images get the teacher embedding of the mirror image (``teacher.mirror_rows`` in the training loop),
  which lets the student train with flip augmentation; the reference cannot, as it stores one embedding per image.

A refinement of ours, off by default (``embedding_weight=0``): ``embedding_weight * mean_i (1 - cos(f_s,i, t_i))``
added to the loss. The student already lives in the teacher's space (its classifier is the teacher's centres), so
pulling each embedding towards the teacher's own embedding of the same image is consistent with the margin loss
and gives a dense per-image signal where the margin loss only sees the class centre.

A second refinement, off by default (``kd_weight=0``): Hinton's soft-logit term over the same frozen centres,
``kd_weight * T^2 * mean_i KL(softmax(s cos(t_i, W) / T) || softmax(s cos(f_s,i, W) / T))`` (as in ``kd``). The
margin loss says how far from its own centre each image may sit; the soft term adds where the teacher places it
among all the other classes.

Centred teacher space (``teacher.subtract_mean``, a teacher option that every method sees): the mean teacher
embedding is subtracted before the centres, ``c_i`` and the angle term are computed. On CelebA-299 SFace's mean
centres sit at cosine 0.16 to each other (0.00 centred); on the validation split centring raised MD's AUC from
67.8 to 72.3 (``benchmarks/results/validation_study_2ep_2026-11-29.md``).

At scale (several processes, ``sample_rate < 1`` or ``centre_dtype="float16"``) the head is
``facedistill.heads.partial_fc.FrozenPartialFC``: the frozen centres sharded over the ranks as PartialFC_V2 splits
them, sampled like it (every positive of the global batch plus random others of each shard), stored in half
precision if asked, and both terms computed over the same sampled shards with distributed maxima and sums. With
one process, ``sample_rate=1`` and float32 centres it computes what ``MarginHead`` does, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.config import ConfigError
from facedistill.distill.arcdistill import check_margin_loss, check_positive
from facedistill.distill.base import (
    DistillMethod,
    MethodContext,
    build_margin_head,
    margin_cross_entropy,
    register_method,
)
from facedistill.distill.embedding import embedding_distance
from facedistill.distill.kd import centre_kd
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import ShardedMarginHead, group_rank_and_size, shard_tensor


@dataclass
class MarginDistillationParams:
    scale: float = 64.0
    m_min: float = 0.2
    m_max: float = 0.5
    normaliser: Literal["batch", "dataset"] = "dataset"
    clamp: bool = True
    guard: bool = True
    embedding_weight: float = 0.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    # PartialFC_V2's share of each shard's negatives scored per step (positives always are); 1 scores them all.
    sample_rate: float = 1.0
    # Storage of the frozen unit centres: float16 halves it at millions of identities (see heads.partial_fc).
    centre_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        check_positive("embedding_weight", self.embedding_weight)
        check_positive("kd_weight", self.kd_weight)
        check_positive("temperature", self.temperature, allow_zero=False)
        check_margin_loss(self.scale, None)
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"method.sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0.0 <= self.m_min <= self.m_max:
            raise ConfigError(f"method: need 0 <= m_min <= m_max, got m_min={self.m_min}, m_max={self.m_max}")


def per_sample_margins(
    typicality: torch.Tensor,
    m_min: float,
    m_max: float,
    normaliser: torch.Tensor | float | None = None,
    clamp: bool = True,
    guard: bool = True,
) -> torch.Tensor:
    """``m_i = (m_max - m_min) * c_i / max c + m_min``; ``normaliser`` is the max (batch max when None)."""
    typicality = typicality.float()
    peak = typicality.max() if normaliser is None else torch.as_tensor(normaliser, dtype=torch.float32)
    peak = peak.to(typicality.device)
    ratio = typicality / peak
    if clamp:
        ratio = ratio.clamp(0.0, 1.0)
    margins = (m_max - m_min) * ratio + m_min
    if guard:
        # A select, not a Python branch on the peak: no device-to-host sync in the training step.
        margins = torch.where(peak > 0, margins, torch.full_like(margins, m_min))
    return margins


@register_method
class MarginDistillation(DistillMethod):
    name = "margin_distillation"
    shards_head = True
    takes_local_centres = True
    Params = MarginDistillationParams

    def __init__(self, params: MarginDistillationParams, context: MethodContext) -> None:
        super().__init__(params, context)
        at_scale = context.shard_heads or params.sample_rate < 1.0 or params.centre_dtype == "float16"
        if at_scale or context.local_centres is not None:
            self.head = FrozenPartialFC(
                context.num_classes,
                _local_centres(context),
                params.scale,
                1.0,
                params.m_min,
                0.0,
                sample_rate=params.sample_rate,
                dtype=getattr(torch, params.centre_dtype),
                undo_ddp_average=context.shard_heads,
            )
            # The head holds its own (possibly half-precision) copy; at millions of identities the context's
            # float32 block would double the memory for nothing.
            context.local_centres = None
        else:
            assert context.centres is not None
            self.head = build_margin_head(
                context, params.scale, 1.0, params.m_min, 0.0, learnable=False, centres=context.centres
            )
        dataset_max = None
        if params.normaliser == "dataset":
            if context.typicality_max is not None:
                dataset_max = torch.tensor(float(context.typicality_max))
            elif context.typicality is not None:
                dataset_max = context.typicality.float().max()
            else:
                raise ValueError("method.normaliser=dataset needs the teacher cache's typicality of every image")
        self.register_buffer("dataset_max", dataset_max, persistent=False)

    def margins(self, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        normaliser = self.dataset_max
        if isinstance(self.head, (ShardedMarginHead, FrozenPartialFC)):
            # This rank holds only some centres; and "batch" means the global batch, as on one process.
            typicality = self.head.true_class_cosine(teacher, labels)
            if normaliser is None and self.head.distributed:
                normaliser = typicality.max()
                dist.all_reduce(normaliser, op=dist.ReduceOp.MAX, group=self.head.group)
        else:
            centres = self.head.weight[labels]
            typicality = (F.normalize(teacher.float(), dim=1) * centres).sum(dim=1)
        return per_sample_margins(
            typicality,
            self.params.m_min,
            self.params.m_max,
            normaliser,
            self.params.clamp,
            self.params.guard,
        )

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        assert teacher is not None
        margin = self.margins(teacher, labels)
        kd: torch.Tensor | None = None
        if isinstance(self.head, FrozenPartialFC):
            with_kd = teacher if self.params.kd_weight > 0 else None
            terms = self.head(embeddings, labels, margin, with_kd, self.params.temperature)
            losses = {"margin_arcface": terms["margin"]}
            kd = terms.get("kd")
        else:
            losses = {"margin_arcface": margin_cross_entropy(self.head, embeddings, labels, margin)}
            if self.params.kd_weight > 0:
                kd = centre_kd(self.head, embeddings, teacher, self.params.scale, self.params.temperature)
        if self.params.embedding_weight > 0:
            distance = embedding_distance(embeddings, teacher, "cosine").mean()
            losses["embedding"] = self.params.embedding_weight * distance
        if kd is not None:
            losses["kd"] = self.params.kd_weight * kd
        return losses


def _local_centres(context: MethodContext) -> torch.Tensor:
    """This rank's block of the frozen centres: given (at scale), or cut from the full matrix."""
    if context.local_centres is not None:
        return context.local_centres
    if context.centres is None:
        raise ValueError("margin_distillation needs the teacher's class centres")
    rank, world_size = group_rank_and_size() if context.shard_heads else (0, 1)
    return shard_tensor(context.centres, rank, world_size)
