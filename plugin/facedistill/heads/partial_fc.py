"""Partial FC over frozen teacher centres: MarginDistillation's head at millions of identities.

MarginDistillation (Svitov & Alyamkin 2020) trains the student against the teacher's class centres W, frozen and
L2-normalised. At WebFace42M's 2,059,906 identities that matrix is 4.2 GB in float32, and arcface_torch trains its
own (learnable) head with PartialFC_V2 (An et al., "Killing Two Birds with One Stone", CVPR'22): centres sharded
over the ranks, a sampled subset of each shard scored per step. This head keeps that contract for frozen centres
and drops everything a frozen matrix does not need:

- **Sharding** as PartialFC_V2 (``facedistill.heads.sharded.shard_range``): rank r holds the contiguous block of
  ``C // W + (r < C % W)`` classes; each rank scores the *global* batch (embeddings all-gathered) against its block.
- **Sampling** as PartialFC_V2 with ``sample_rate < 1``: every class that is positive in the global batch, plus
  ``int(sample_rate * C_r) - #positives`` random others of the shard (``topk`` of uniform draws with the positives
  set to 2), sorted; only positives when they alone exceed the budget. The uniforms come from the global CPU
  generator, as PartialFC_V2's ``torch.rand(...).cuda()`` does, and only when it draws them: the same seed samples
  the same classes as PartialFC_V2 on any device, and a restored CPU RNG state resumes the sampling.
- **Host syncs**: a step reads nothing back from the device but the label check (see ``_ChunkedMarginCrossEntropy``)
  and, only when the global batch could hold more of a shard's classes than its budget, the number of positives
  (which sizes the sample). PartialFC_V2 reads more: ``torch.unique``, ``nonzero``, boolean-mask indexing, blocking
  copies of host tensors and ``.item()``. The uniforms are drawn into pinned memory and copied without blocking;
  rows are picked by masked arithmetic (``torch.where``, ``scatter``), never by ``nonzero``.
- **Storage**: unit vectors in float16 by default (half the bytes of float32; no gradient and no optimiser state,
  which PartialFC_V2's learnable float32 head needs three times over). A float16 unit vector's components carry a
  relative error of at most 2^-11, so each cosine is off by at most ~1e-3 · |x|_1 / sqrt(d) in the worst case and
  ~1e-4 typically; at s = 64 that moves logits by ~1e-2 at most, well below the per-sample margins (0.2..0.5 rad).
  ``dtype=torch.float32`` keeps full precision (and is exact against the single-process reference).
- **Scoring in chunks** of classes with an online log-sum-exp: the centres are read and widened to float32 one chunk
  at a time, so no float32 copy of a shard exists. The margin loss keeps its [B, S] logits for the backward pass
  (as PartialFC_V2 does); the angle term recomputes its logits there instead of keeping two more such matrices.
  Both passes run with autocast off (``without_autocast``), whatever the caller's autocast state.

Losses (B = global batch, S = this step's sampled classes over all ranks, z_ij = s cos(x_i, W_j)):

    margin:  mean_i [ logsumexp_j z'_ij - z'_{i,y_i} ],   z'_{i,y_i} = s (cos(m1 theta + m_i) - m3), else z'_ij = z_ij
    kd:      T^2 mean_i KL( softmax_j(z^t_ij / T) || softmax_j(z_ij / T) ),  z^t_ij = s cos(t_i, W_j)

``kd`` is MarginDistillation's angle term (``kd_weight``): the teacher's and the student's angles to the same
sampled, sharded centres matched as soft logits. Maxima and sums run over ranks (all-reduce), so neither loss ever
needs a full head on one rank. With one process and ``sample_rate=1`` both equal ``MarginHead`` + cross-entropy
and ``MarginHead``'s ``kd`` term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facedistill.heads.margin import check_margins, margin_target_logit
from facedistill.heads.sharded import (
    _all_gather_single,
    _GatherWithGradient,
    gather_shards,
    group_rank_and_size,
    shard_range,
    true_class_cosine,
    without_autocast,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DEFAULT_CHUNK = 32768


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunks(columns: torch.Tensor, chunk: int, rows: int) -> list[tuple[int, int, torch.Tensor | slice]]:
    """(start, stop, rows of the weight) of each chunk of ``columns``: a slice, which reads the weight in place,
    when every row is scored (sample_rate 1), else the sampled row indices."""
    every = columns.shape[0] == rows
    return [
        (
            start,
            min(start + chunk, columns.shape[0]),
            slice(start, start + chunk) if every else columns[start : start + chunk],
        )
        for start in range(0, columns.shape[0], chunk)
    ]


def _global_logsumexp(
    local_max: torch.Tensor, local_sum: torch.Tensor, group: ProcessGroup | None, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(z - max)) over every rank's columns, from each rank's running max and sum."""
    peak = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group, world)
    total = _all_reduce(local_sum * torch.exp(local_max - peak), dist.ReduceOp.SUM, group, world)
    return peak, total


def _host_uniforms(count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniforms in [0, 1) from the global CPU generator, on ``device``: PartialFC_V2's
    ``torch.rand(...).cuda()`` (the same draws for the same seed, on any device), but drawn into pinned memory and
    copied with ``non_blocking``. A copy from pageable memory synchronises the CUDA stream; one from pinned memory
    is queued like a kernel, and the caching host allocator keeps the buffer until the copy is done."""
    return torch.rand(count, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _true_centres(weight: torch.Tensor, columns: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The float32 centre [B, d] of each row's true class where this rank scores it (``target >= 0``), zero
    elsewhere: every row reads a centre (column 0 stands in), so no ``nonzero`` picks the rows."""
    if columns.numel() == 0:  # nothing sampled on this rank, so no row's class is scored here either
        return weight.new_zeros((target.shape[0], weight.shape[1]), dtype=torch.float32)
    centres = weight[columns[target.clamp(min=0)]].float()
    return torch.where((target >= 0)[:, None], centres, 0.0)


def _true_column(target: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column [B, 1] of each row's true class in the chunk of columns ``[start, start + width)``, 0 where it is
    not there; whether it is there [B, 1]), for a ``gather``/``scatter`` of one entry per row."""
    local = target - start  # negative for rows whose class lives on another rank (target -1)
    inside = (local >= 0) & (local < width)
    return torch.where(inside, local, 0)[:, None], inside[:, None]


def _online_update(z: torch.Tensor, peak: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    new_peak = torch.maximum(peak, z.max(dim=1).values)
    total = total * torch.exp(peak - new_peak) + torch.exp(z - new_peak[:, None]).sum(dim=1)
    return new_peak, total


class _ChunkedMarginCrossEntropy(torch.autograd.Function):
    """Mean margin cross-entropy of unit embeddings ``x`` [B, d] against this rank's ``columns`` of the frozen
    ``weight``; ``target`` [B] is the position of the true class in ``columns`` (-1 where it lives elsewhere)."""

    @staticmethod
    @without_autocast
    def forward(ctx, x, weight, columns, target, margin, scale, m1, m3, target_form, chunk, group, world):  # type: ignore[override]
        owned = target >= 0
        true_cos = (x * _true_centres(weight, columns, target)).sum(dim=1)  # 0 where the class lives elsewhere
        true_logit = scale * margin_target_logit(true_cos, m1, margin, m3, target_form)
        peak = x.new_full((x.shape[0],), -torch.inf)
        total = x.new_zeros(x.shape[0])
        # The scaled logits [B, S] are kept for the backward pass (as PartialFC_V2 keeps its own), written chunk by
        # chunk; the centres are read in chunks, so no float32 copy of the shard ever exists.
        logits = x.new_empty((x.shape[0], columns.shape[0]))
        for start, stop, block in _chunks(columns, chunk, weight.shape[0]):
            z = logits[:, start:stop]
            torch.matmul(x, weight[block].float().T, out=z)
            z.mul_(scale)
            # The margin logit replaces the true class's where it lies in this chunk; other rows write back their own.
            column, inside = _true_column(target, start, stop - start)
            z.scatter_(1, column, torch.where(inside, true_logit[:, None], z.gather(1, column)))
            peak, total = _online_update(z, peak, total)
        peak, total = _global_logsumexp(peak, total, group, world)
        # The true logit and an ownership count share one all-reduce.
        picked = torch.stack((torch.where(owned, true_logit, 0.0), owned.to(x.dtype)), dim=1)
        _all_reduce(picked, dist.ReduceOp.SUM, group, world)
        # The one host sync of a step (beside the count in ``FrozenPartialFC.sample`` when the budget is below the
        # batch size): a label that no rank holds has no true logit anywhere and would give a silently wrong loss,
        # so it must raise here, on every rank alike. PartialFC_V2 syncs more often than this (nonzero, unique).
        if not bool((picked[:, 1] == 1.0).all()):
            raise ValueError("a label is outside [0, num_classes): no rank holds its class centre")
        ctx.save_for_backward(x, columns, target, margin, true_cos, true_logit, peak, total, logits)
        ctx.weight, ctx.scale, ctx.m1, ctx.m3, ctx.target_form, ctx.chunk = weight, scale, m1, m3, target_form, chunk
        return (total.log() + peak - picked[:, 0]).mean()

    @staticmethod
    @without_autocast
    def backward(ctx, grad):  # type: ignore[override]
        x, columns, target, margin, true_cos, true_logit, peak, total, logits = ctx.saved_tensors
        weight, scale = ctx.weight, ctx.scale
        coefficient = grad / x.shape[0]
        grad_x = torch.zeros_like(x)
        for start, stop, block in _chunks(columns, ctx.chunk, weight.shape[0]):
            # In place: the saved logits become this chunk's softmax gradient (a second backward is not supported).
            g = logits[:, start:stop]
            g.sub_(peak[:, None]).exp_().div_(total[:, None])
            column, inside = _true_column(target, start, stop - start)
            g.scatter_(1, column, g.gather(1, column) - inside.to(g.dtype))
            grad_x += g @ weight[block].float()
        grad_x.mul_(scale)
        # The true logit is s * f(cos), not s * cos: correct its column by f'(cos) - 1 (every row computes it, the
        # rows whose class lives elsewhere add nothing).
        with torch.enable_grad():
            cos = true_cos.detach().requires_grad_(True)
            target_logit = margin_target_logit(cos, ctx.m1, margin, ctx.m3, ctx.target_form)
            (slope,) = torch.autograd.grad(target_logit.sum(), cos)
        probability = torch.exp(true_logit - peak) / total
        correction = torch.where(target >= 0, scale * (probability - 1.0) * (slope - 1.0), 0.0)
        grad_x += correction[:, None] * _true_centres(weight, columns, target)
        return grad_x * coefficient, None, None, None, None, None, None, None, None, None, None, None


class _ChunkedSoftKL(torch.autograd.Function):
    """``T^2 mean_i KL(softmax(z^t_i / T) || softmax(z_i / T))`` over this rank's ``columns`` of ``weight``, with
    ``z = s x W^T`` (student, differentiable) and ``z^t = s t W^T`` (teacher, constant)."""

    @staticmethod
    @without_autocast
    def forward(ctx, x, teacher, weight, columns, scale, temperature, chunk, group, world):  # type: ignore[override]
        factor = scale / temperature
        batch = x.shape[0]
        peak_s, total_s = x.new_full((batch,), -torch.inf), x.new_zeros(batch)
        peak_t, total_t = x.new_full((batch,), -torch.inf), x.new_zeros(batch)
        for _, _, block in _chunks(columns, chunk, weight.shape[0]):
            centres = weight[block].float()
            peak_s, total_s = _online_update(factor * (x @ centres.T), peak_s, total_s)
            peak_t, total_t = _online_update(factor * (teacher @ centres.T), peak_t, total_t)
        peak_s, total_s = _global_logsumexp(peak_s, total_s, group, world)
        peak_t, total_t = _global_logsumexp(peak_t, total_t, group, world)
        lse_s, lse_t = peak_s + total_s.log(), peak_t + total_t.log()
        cross = x.new_zeros(batch)
        for _, _, block in _chunks(columns, chunk, weight.shape[0]):
            centres = weight[block].float()
            a, b = factor * (x @ centres.T), factor * (teacher @ centres.T)
            cross += (torch.exp(b - lse_t[:, None]) * (b - a)).sum(dim=1)
        _all_reduce(cross, dist.ReduceOp.SUM, group, world)
        ctx.save_for_backward(x, teacher, columns, lse_s, lse_t)
        ctx.weight, ctx.factor, ctx.temperature, ctx.chunk = weight, factor, temperature, chunk
        return temperature**2 * (cross - lse_t + lse_s).mean()

    @staticmethod
    @without_autocast
    def backward(ctx, grad):  # type: ignore[override]
        x, teacher, columns, lse_s, lse_t = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        for _, _, block in _chunks(columns, ctx.chunk, ctx.weight.shape[0]):
            centres = ctx.weight[block].float()
            q = torch.exp(ctx.factor * (x @ centres.T) - lse_s[:, None])
            p = torch.exp(ctx.factor * (teacher @ centres.T) - lse_t[:, None])
            grad_x += (q - p) @ centres
        # d/dx of T^2 KL = T^2 (q - p) d(z/T)/dx = T^2 (q - p) (s / T) W
        return (
            grad_x * (grad * ctx.temperature**2 * ctx.factor / x.shape[0]),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class FrozenPartialFC(nn.Module):
    """PartialFC_V2's sharding and sampling over frozen, unit-norm centres stored in ``dtype``.

    ``local_centres`` is this rank's block [C_r, d] of the full [C, d] matrix (see ``shard_range``); no rank ever
    holds more. ``forward(embeddings, labels, margin, teacher)`` returns ``{"margin": loss}`` and, with
    ``teacher`` (the teacher's embeddings of the same images), ``{"kd": T^2 KL}`` over the same sampled centres.
    Every rank must call it with local batches of one size (a collective). Like ``ShardedMarginHead`` it gives the
    full matrix to checkpoints (``full_state``), so a run's checkpoints do not depend on its number of processes.

    ``undo_ddp_average``: the embedding gradient is each rank's exact share of the global loss's gradient, which
    DistributedDataParallel would then average; multiply by the world size to undo that (as arcface_torch's
    ``AllGather`` does).
    """

    def __init__(
        self,
        num_classes: int,
        local_centres: torch.Tensor,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        sample_rate: float = 1.0,
        dtype: torch.dtype = torch.float16,
        chunk: int = DEFAULT_CHUNK,
        group: ProcessGroup | None = None,
        undo_ddp_average: bool = False,
        target_form: str = "continue",
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        check_margins(m1, m2, m3, target_form)
        self.target_form = target_form
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.num_classes = num_classes
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        num_local = self.class_end - self.class_start
        if local_centres.ndim != 2 or local_centres.shape[0] != num_local:
            raise ValueError(
                f"rank {self.rank} of {self.world_size} holds classes [{self.class_start}, {self.class_end}) of "
                f"{num_classes}: its centres must be ({num_local}, d), got {tuple(local_centres.shape)}"
            )
        self.embedding_size = int(local_centres.shape[1])
        self.scale, self.m1, self.m2, self.m3 = scale, m1, m2, m3
        self.sample_rate = sample_rate
        self.num_sample = int(sample_rate * num_local)
        self.chunk = chunk
        self.undo_ddp_average = undo_ddp_average
        self.learnable = False
        # Normalised block by block: no float32 copy of a million-row shard is ever made.
        unit = torch.empty(local_centres.shape, dtype=dtype, device=local_centres.device)
        for start in range(0, num_local, chunk):
            block = local_centres[start : start + chunk].detach().float()
            unit[start : start + chunk] = F.normalize(block, dim=1).to(dtype)
        self.register_buffer("weight", unit)
        # This step's sampled columns of the shard (all of them at sample_rate 1), for inspection and tests.
        self.last_columns: torch.Tensor | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return local
        gathered = local.new_empty((self.world_size * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local.contiguous(), group=self.group)
        return gathered

    @torch.no_grad()
    def sample(self, batch_columns: torch.Tensor) -> torch.Tensor:
        """Sorted columns of the shard to score, by PartialFC_V2's rule: every positive, then random others up to
        the budget (only the positives when they alone exceed it). ``batch_columns`` [B] is the column of each row's
        class in this shard, -1 where it lives on another rank."""
        num_local = self.class_end - self.class_start
        device = self.weight.device
        if self.num_sample >= num_local:
            return torch.arange(num_local, device=device)
        # Mark the positives densely: rows held elsewhere mark a spare last entry (a mask index would sync).
        positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device)
        positive[torch.where(batch_columns >= 0, batch_columns, num_local)] = True
        positive = positive[:num_local]
        if self.num_sample < batch_columns.shape[0]:
            # The batch could hold more of this shard's classes than the budget, and then only they are scored: how
            # many there are sizes every tensor after this, so it is read on the host (a sync, which PartialFC_V2
            # makes in torch.unique). With a budget of at least the global batch, as at scale, it cannot happen.
            count = int(positive.sum().item())
            if count > self.num_sample:
                return torch.topk(positive.float(), k=count)[1].sort()[0]
        draw = _host_uniforms(num_local, device)
        draw.masked_fill_(positive, 2.0)
        return torch.topk(draw, k=self.num_sample)[1].sort()[0]

    def true_class_cosine(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos(vectors_i, W_{labels_i})`` for the local batch, wherever the centre lives (collective):
        MarginDistillation's typicality c_i of the teacher embeddings."""
        return true_class_cosine(vectors, labels, self.weight, self.class_start, self.group, self.world_size)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        margin: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        temperature: float = 4.0,
    ) -> dict[str, torch.Tensor]:
        grad_scale = float(self.world_size) if self.undo_ddp_average else 1.0
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if self.distributed:
                gathered = _GatherWithGradient.apply(embeddings.float(), self.group, self.world_size, grad_scale)
            else:
                gathered = embeddings.float()
            x = F.normalize(gathered, dim=1)
            all_labels = self._gather(labels.long())
            owned = (all_labels >= self.class_start) & (all_labels < self.class_end)
            column = torch.where(owned, all_labels - self.class_start, torch.full_like(all_labels, -1))
            columns = self.sample(column)
            self.last_columns = columns
            target = torch.where(owned, torch.searchsorted(columns, column.clamp(min=0)), column)
            fixed = torch.full_like(x[:, 0], self.m2)
            row_margin = fixed if margin is None else self._gather(margin.detach().float())
            terms = {
                "margin": _ChunkedMarginCrossEntropy.apply(
                    x, self.weight, columns, target, row_margin, self.scale, self.m1, self.m3, self.target_form,
                    self.chunk, self.group, self.world_size,
                )
            }  # fmt: skip
            if teacher is not None:
                teacher_unit = self._gather(F.normalize(teacher.detach().float(), dim=1))
                terms["kd"] = _ChunkedSoftKL.apply(
                    x, teacher_unit, self.weight, columns, self.scale, temperature, self.chunk, self.group,
                    self.world_size,
                )  # fmt: skip
        return terms

    def full_state(self, dst: int | None = 0) -> torch.Tensor | None:
        """The full [C, d] centres on group rank ``dst`` (None elsewhere; ``dst=None``: every rank) (collective)."""
        return gather_shards(self.weight, self.num_classes, self.group, dst)

    def held_bytes(self) -> int:
        """Bytes of class-centre storage on this rank (frozen: no gradient, no optimiser state)."""
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes} (rank {self.rank} of {self.world_size}: [{self.class_start}, "
            f"{self.class_end})), dim={self.embedding_size}, s={self.scale}, m=({self.m1}, {self.m2}, {self.m3}), "
            f"sample_rate={self.sample_rate}, dtype={self.weight.dtype}"
        )
