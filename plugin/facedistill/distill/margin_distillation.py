"""MarginDistillation (Svitov & Alyamkin, arXiv 2003.02586; official code: david-svitov/margindistillation).

The student is trained with an ArcFace loss against the teacher's class centres W, L2-normalised and frozen, with
a margin per sample set by how typical the image is for its class in the teacher's eyes::

    c_i = cos(t_i, W_{y_i})                           t_i: teacher embedding of image i
    m_i = (m_max - m_min) * c_i / max_j c_j + m_min   m_min = 0.2, m_max = 0.5
    loss = CE(s * [cos(theta_i + m_i), cos(theta_ij)_{j != y_i}])   s = 64

Two presets (``method.preset``; in an arcface_torch recipe ``config.loss_params["preset"]``), explicit keys
overriding either:

- ``official`` reproduces the official code exactly: s 64, m 0.2..0.5, ``max_j`` over each process's own share of
  the batch (``normaliser="local_batch"``), no clamp, no guard, plain ``cos(theta + m)`` even past pi
  (``past_pi="cos"``), and a mirrored image reads the teacher row of the original (``mirror_rows=False``: the
  official code stores one embedding per image, and its recipe does not mirror: turn the run's flip off to match).
- ``facedistill`` (the default) is our validated recipe, the fixes below plus the angle term (``kd_weight`` 1, T 4);
  on small training sets also s 32 and ``teacher.subtract_mean`` (``recipes/celeba299_mbf_md.py``).

The fixes, each a key of its own:

- ``clamp``: clip ``c_i / max_j c_j`` to [0, 1], so ``m_i`` stays in [m_min, m_max]; without it a negative
  ``c_i`` (an image the teacher places nearer another class) gives a margin below ``m_min``, even negative.
- ``guard``: when the normaliser is <= 0 (every c_i in the batch negative or zero), use ``m_min`` for every
  sample instead of dividing by a non-positive number (the reference's margins then flip sign or become inf/NaN).
- ``normaliser="dataset"``: ``max_j`` over every cached image and mirror of the training set, computed once from
  the teacher cache, so the margin of an image no longer depends on batch size, batch composition or GPU count
  (``"batch"``: over the global batch, the same on any number of processes).
- ``past_pi="continue"``: past ``theta + m > pi`` the target logit keeps falling with theta (``heads.margin``)
  instead of turning back up and rewarding a larger angle.
- ``mirror_rows``: mirrored images get the teacher embedding of the mirror image, which lets the student train with
  flip augmentation.

A refinement of ours, off in both presets (``embedding_weight=0``): ``embedding_weight * mean_i (1 - cos(f_s,i,
t_i))`` added to the loss. The student already lives in the teacher's space (its classifier is the teacher's
centres), so pulling each embedding towards the teacher's own embedding of the same image is consistent with the
margin loss and gives a dense per-image signal where the margin loss only sees the class centre.

A second refinement, on in ``facedistill`` (``kd_weight=1``; off in ``official``): Hinton's soft-logit term over
the same frozen centres, ``kd_weight * T^2 * mean_i KL(softmax(s cos(t_i, W) / T) || softmax(s cos(f_s,i, W) / T))``
(as in ``kd``). The margin loss says how far from its own centre each image may sit; the soft term adds where the
teacher places it among all the other classes.

Centred teacher space (``teacher.subtract_mean``; ``config.teacher_subtract_mean`` in a recipe; a teacher option
every method sees, built in ``facedistill.distill.context``): the mean teacher embedding is subtracted before the
centres, ``c_i`` and the angle term are computed; mean centres only (a teacher's head is its own). On CelebA-299
SFace's mean centres sit at cosine 0.16 to each other (0.00 centred); on the validation split centring raised MD's
AUC from 67.8 to 72.3 (``benchmarks/results/validation_study_2ep_2026-11-29.md``).

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

from facedistill.config import ParamError
from facedistill.distill.base import (
    DistillMethod,
    MethodContext,
    register_method,
)
from facedistill.distill.checks import check_margin_loss, check_positive, check_unit_interval
from facedistill.distill.embedding import embedding_distance
from facedistill.heads import MarginHead
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import group_rank_and_size, shard_tensor

# The two ways to run MarginDistillation. Explicit keys override the preset's.
PRESETS: dict[str, dict[str, object]] = {
    # The official code (david-svitov/margindistillation, train/train.py) exactly: the max of c over each process's
    # own share of the batch, no clamp, no guard, plain cos(theta + m) past pi, one teacher row per image.
    "official": dict(
        scale=64.0, m_min=0.2, m_max=0.5, normaliser="local_batch", clamp=False, guard=False, past_pi="cos",
        mirror_rows=False, embedding_weight=0.0, kd_weight=0.0, temperature=4.0,
    ),
    # facedistill's validated recipe (benchmarks/results/validation_study_*_2026-11-29.md): margins that do not
    # depend on the batch, clamped, guarded and monotone past pi, mirror rows for mirrored images, and the angle term
    # over the frozen centres. Small training sets also want s = 32 and the centred teacher space (see the recipes).
    "facedistill": dict(
        scale=64.0, m_min=0.2, m_max=0.5, normaliser="dataset", clamp=True, guard=True, past_pi="continue",
        mirror_rows=True, embedding_weight=0.0, kd_weight=1.0, temperature=4.0,
    ),
}  # fmt: skip


@dataclass
class MarginDistillationParams:
    """Hyper-parameters; every ``None`` is filled from ``preset`` (``PRESETS``) when the params are built."""

    preset: Literal["facedistill", "official"] = "facedistill"
    scale: float | None = None
    m_min: float | None = None
    m_max: float | None = None
    # dataset: max of c over the whole cached training set; batch: over the global batch; local_batch: over this
    # process's share of it (the official code's per-GPU max; on one process the same as batch).
    normaliser: Literal["batch", "local_batch", "dataset"] | None = None
    clamp: bool | None = None
    guard: bool | None = None
    # Past theta + m > pi: "continue" keeps the target logit decreasing, "cos" is plain cos(theta + m).
    past_pi: Literal["continue", "cos"] | None = None
    # A mirrored image reads the teacher row of the mirror (True) or of the original image (False).
    mirror_rows: bool | None = None
    embedding_weight: float | None = None
    kd_weight: float | None = None
    temperature: float | None = None
    # PartialFC_V2's share of each shard's negatives scored per step (positives always are); 1 scores them all.
    sample_rate: float = 1.0
    # Storage of the frozen unit centres: float16 halves it at millions of identities (see heads.partial_fc).
    centre_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ParamError("preset", f": {self.preset!r} is not one of {', '.join(map(repr, PRESETS))}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_positive("embedding_weight", self.embedding_weight)
        check_positive("kd_weight", self.kd_weight)
        check_positive("temperature", self.temperature, allow_zero=False)
        check_margin_loss(self.scale, None)
        check_unit_interval("sample_rate", self.sample_rate)
        if not 0.0 <= self.m_min <= self.m_max:
            raise ParamError("m_min", f"must satisfy 0 <= m_min <= m_max, got m_min={self.m_min}, m_max={self.m_max}")


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
                target_form=params.past_pi,
            )
            # The head holds its own (possibly half-precision) copy; at millions of identities the context's
            # float32 block would double the memory for nothing.
            context.local_centres = None
        else:
            assert context.centres is not None
            self.head = MarginHead(
                context.num_classes,
                context.embedding_size,
                params.scale,
                1.0,
                params.m_min,
                0.0,
                learnable=False,
                centres=context.centres,
                target_form=params.past_pi,
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

    @property
    def mirror_rows(self) -> bool:
        """Whether a mirrored image reads the teacher row of the mirror (the front end asks before each step)."""
        return bool(self.params.mirror_rows)

    def margins(self, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        normaliser = self.dataset_max
        typicality = self.head.true_class_cosine(teacher, labels)
        if self.params.normaliser == "batch" and self.head.distributed:
            # A rank holds only some centres; "batch" means the global batch, as on one process, and
            # "local_batch" this process's share of it, as the official code takes it per GPU.
            normaliser = typicality.max()
            dist.all_reduce(normaliser, op=dist.ReduceOp.MAX, group=self.head.group)
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
        with_kd = teacher if self.params.kd_weight > 0 else None
        terms = self.head(embeddings, labels, margin, with_kd, self.params.temperature)
        losses = {"margin_arcface": terms["margin"]}
        kd = terms.get("kd")
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
