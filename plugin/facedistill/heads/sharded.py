"""Model-parallel margin softmax: the class centres are split over the ranks of a process group.

With C classes and N ranks each rank holds only its block of ~C/N centres, so a head too large for one device
(millions of identities, or the teacher's frozen W next to a student) fits. Every rank then computes the loss of the
*global* batch against its own centres, and a distributed cross-entropy combines the shards::

    E, y, m     = all_gather(local embeddings, labels, margins)       the global batch, B = sum of local batches
    z           = s * [cos(E_i, W_j) for j in this rank's classes]   margin on z_{i, y_i} where y_i lives here
    M_i         = all_reduce_max(max_j z_ij)                          for numerical stability only
    S_i         = all_reduce_sum(sum_j exp(z_ij - M_i))
    t_i         = all_reduce_sum(z_{i, y_i} if y_i lives here else 0)
    loss        = mean_i (log S_i + M_i - t_i)                        = F.cross_entropy on the full logits
    dloss/dz_ij = (exp(z_ij - M_i) / S_i - [j == y_i]) / B

The gradient of the gathered embeddings on each rank holds only the contribution of its own centres; the backward
of the all-gather sums them over ranks (reduce-scatter), giving every rank the exact gradient of its local
embeddings. The loss value and the gradients of every rank's embeddings and centres are those of ``MarginHead`` +
``F.cross_entropy`` on the concatenated batch in one process; with world size 1 (or no process group) the head runs
exactly that computation and makes no distributed call.

The sharding follows insightface's arcface_torch ``PartialFC_V2`` (recognition/arcface_torch/partial_fc_v2.py, with
sample_rate 1), so its per-rank head files concatenate in rank order into the full [C, d] matrix and vice versa.
Unlike it, the loss is the exact log-sum-exp cross-entropy (arcface_torch clamps the probability at 1e-30), and the
embedding gradient is not multiplied by the world size unless ``undo_ddp_average`` asks for it (see there).

Every method here that touches other ranks is a collective: all ranks of the group must call it, in the same order,
with local batches of the same size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facedistill.heads.margin import check_margins, margin_target_logit

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# The *_single names replace the *_tensor ones (deprecated in recent torch), which torch >= 2.2 still needs; builds
# without distributed support have neither, and then only the world-size-1 path, which needs none, can run.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


_Pass = TypeVar("_Pass", bound=Callable[..., Any])


def without_autocast(autograd_pass: _Pass) -> _Pass:
    """Run a custom autograd Function's ``forward`` or ``backward`` (under ``@staticmethod``) with autocast off on
    the device of its first tensor argument. The heads compute in float32 on purpose (logits at s = 64 overflow
    float16), and a backward runs under whatever autocast state its caller has: without this, a backward called
    inside ``torch.autocast`` would do its matrix products in half precision. ``torch.amp.custom_bwd`` would need
    the device type when the class is defined."""

    @functools.wraps(autograd_pass)
    def run(ctx: Any, *args: Any) -> Any:
        device = next(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return autograd_pass(ctx, *args)

    return run  # type: ignore[return-value]


class _Float32Linear(torch.autograd.Function):
    """``F.linear(a, b)`` whose backward also runs with autocast off. It computes the products autograd's own
    backward of ``F.linear`` computes (``grad @ b``, ``grad^T @ a``): on the CPU the gradients equal ``MarginHead``'s
    bit for bit."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.linear(a, b)

    @staticmethod
    @without_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad.mm(b) if ctx.needs_input_grad[0] else None
        grad_b = grad.t().mm(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, end)`` held by ``rank``: contiguous blocks in rank order, of ``num_classes // world_size``
    classes each, the first ``num_classes % world_size`` ranks one more. This is arcface_torch PartialFC's split
    (``num_local``/``class_start``), so shards from either code concatenate in rank order into the full matrix."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + int(rank < extra)


def group_rank_and_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_tensor(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a full [C, ...] tensor, as a copy (a view would keep the whole tensor alive)."""
    start, end = shard_range(full.shape[0], rank, world_size)
    return full[start:end].clone()


def gather_shards(
    local: torch.Tensor, num_classes: int, group: ProcessGroup | None = None, dst: int | None = 0
) -> torch.Tensor | None:
    """Reassemble the full [C, ...] tensor from every rank's shard (collective).

    ``dst`` is the group rank that receives it (the others get None); ``dst=None`` gives it to every rank. With
    world size 1 this returns ``local`` itself, detached, without a copy.
    """
    rank, world = group_rank_and_size(group)
    local = local.detach()
    if world == 1:
        return local
    start, end = shard_range(num_classes, rank, world)
    if local.shape[0] != end - start:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, but its shard of {num_classes} is {end - start}")
    # Collectives need equal shapes: pad every shard to the largest one, then drop the padding.
    rows = shard_range(num_classes, 0, world)[1]
    padded = local.contiguous()
    if end - start < rows:
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: end - start] = local
    if dst is None:
        buffer = local.new_empty((world * rows, *local.shape[1:]))
        _all_gather_single(buffer, padded, group=group)
    else:
        buffer = local.new_empty((world * rows, *local.shape[1:])) if rank == dst else None
        pieces = list(buffer.chunk(world)) if buffer is not None else None
        global_dst = dst if group is None else dist.get_global_rank(group, dst)
        dist.gather(padded, pieces, dst=global_dst, group=group)
        if buffer is None:
            return None
    if num_classes == world * rows:
        return buffer
    parts = buffer.view(world, rows, *local.shape[1:])
    sizes = [end - start for start, end in (shard_range(num_classes, r, world) for r in range(world))]
    return torch.cat([parts[r, :size] for r, size in enumerate(sizes)])


def optimizer_param_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """The key of ``param`` in ``optimizer.state_dict()["state"]`` (parameters are numbered across groups)."""
    index = 0
    for group in optimizer.param_groups:
        for candidate in group["params"]:
            if candidate is param:
                return index
            index += 1
    raise ValueError("the parameter is not optimised by this optimizer")


def unshard_optimizer_state(
    state_dict: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    num_classes: int,
    group: ProcessGroup | None = None,
    dst: int | None = 0,
) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with the per-row state of the sharded ``param`` (SGD momentum, Adam moments)
    gathered into full [C, d] tensors, so the checkpoint does not depend on the world size (collective; None on
    ranks other than ``dst``)."""
    key = optimizer_param_index(optimizer, param)
    local_state = state_dict["state"].get(key, {})
    full_state: dict[str, Any] = {}
    # Same keys in the same order on every rank, or the gathers would pair up the wrong tensors.
    for name in sorted(local_state):
        value = local_state[name]
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape == param.shape:
            full_state[name] = gather_shards(value, num_classes, group, dst)
        else:
            full_state[name] = value
    rank, _ = group_rank_and_size(group)
    if dst is not None and rank != dst:
        return None
    result = {**state_dict, "state": dict(state_dict["state"])}
    if local_state:
        result["state"][key] = full_state
    return result


def shard_optimizer_state(
    state_dict: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    num_classes: int,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """The inverse of ``unshard_optimizer_state``: this rank's rows of the full per-row state of ``param``, ready
    for ``optimizer.load_state_dict`` (local, no communication)."""
    key = optimizer_param_index(optimizer, param)
    result = {**state_dict, "state": dict(state_dict["state"])}
    if key in result["state"]:
        result["state"][key] = {
            name: shard_tensor(value, rank, world_size)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_classes
            else value
            for name, value in result["state"][key].items()
        }
    return result


def clip_grad_norm_sharded_(
    replicated: Iterable[torch.Tensor],
    sharded: Iterable[torch.Tensor],
    max_norm: float,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """``clip_grad_norm_`` (2-norm) over parameters of which some are identical on every rank (the DDP backbone,
    after its gradient all-reduce) and some are sharded (the centres): the norm of the sharded part is summed over
    ranks, so every rank clips by the same, global norm (collective)."""
    replicated = [p for p in replicated if p.grad is not None]
    sharded = [p for p in sharded if p.grad is not None]
    params = replicated + sharded
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    zero = torch.zeros((), device=device)
    squares = sum((p.grad.detach().float().pow(2).sum() for p in sharded), zero)
    _, world = group_rank_and_size(group)
    if world > 1:
        dist.all_reduce(squares, group=group)
    squares = squares + sum((p.grad.detach().float().pow(2).sum() for p in replicated), zero)
    total = squares.sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coefficient.to(p.grad.dtype))
    return total


@torch.no_grad()
def true_class_cosine(
    vectors: torch.Tensor,
    labels: torch.Tensor,
    local_weight: torch.Tensor,
    class_start: int,
    group: ProcessGroup | None,
    world_size: int,
) -> torch.Tensor:
    """``cos(vectors_i, W_{labels_i})`` for the local batch when each rank holds the unit centres ``local_weight``
    of classes ``[class_start, class_start + len)`` (collective): every rank scores the gathered rows whose class it
    holds, and a reduce-scatter hands each rank its own rows back. ``local_weight`` may be stored in half precision."""
    unit = F.normalize(vectors.float(), dim=1)
    if world_size == 1:
        return (unit * local_weight[labels].float()).sum(dim=1)
    all_vectors = unit.new_empty((world_size * unit.shape[0], unit.shape[1]))
    all_labels = labels.new_empty(world_size * labels.shape[0])
    _all_gather_single(all_vectors, unit.contiguous(), group=group)
    _all_gather_single(all_labels, labels.contiguous(), group=group)
    class_end = class_start + local_weight.shape[0]
    owned = (all_labels >= class_start) & (all_labels < class_end)
    contribution = unit.new_zeros(all_labels.shape[0])
    if local_weight.shape[0]:
        # Every row reads a centre (row 0 stands in where the class lives elsewhere) and keeps it only where it is
        # this rank's: selecting the rows with nonzero would sync the host with the device.
        centres = local_weight[torch.where(owned, all_labels - class_start, 0)].float()
        contribution = torch.where(owned, (all_vectors * centres).sum(dim=1), 0.0)
    local = unit.new_empty(labels.shape[0])
    _reduce_scatter_single(local, contribution, op=dist.ReduceOp.SUM, group=group)
    return local


class _GatherWithGradient(torch.autograd.Function):
    """All-gather of the local embeddings whose backward sums every rank's gradient of the global batch and
    returns this rank's part: each rank's loss graph only reaches its own centres' logits."""

    @staticmethod
    @without_autocast
    def forward(ctx, local: torch.Tensor, group: ProcessGroup | None, world: int, grad_scale: float) -> torch.Tensor:
        ctx.group, ctx.world, ctx.grad_scale = group, world, grad_scale
        gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local.contiguous(), group=group)
        return gathered

    @staticmethod
    @without_autocast
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        local = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.grad_scale != 1.0:
            local.mul_(ctx.grad_scale)
        return local, None, None, None


class _DistributedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the global batch from each rank's columns of the logits; ``local_labels`` is the
    column of the true class on this rank, -1 where it lives elsewhere."""

    @staticmethod
    @without_autocast
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        owned = local_labels >= 0
        rows = owned.nonzero().squeeze(1)
        peak = logits.max(dim=1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        probabilities = (logits - peak[:, None]).exp_()
        total = probabilities.sum(dim=1)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        # The true logit and an ownership count share one all-reduce; a count other than 1 is a label outside
        # [0, C), which no rank holds and which would otherwise give a silently wrong loss.
        target = logits.new_zeros((logits.shape[0], 2))
        target[rows, 0] = logits[rows, local_labels[rows]]
        target[rows, 1] = 1.0
        dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        if not bool((target[:, 1] == 1.0).all()):
            raise ValueError("a label is outside [0, num_classes): no rank holds its class centre")
        loss = (total.log() + peak - target[:, 0]).mean()
        probabilities.div_(total[:, None])
        ctx.save_for_backward(probabilities, rows, local_labels)
        return loss

    @staticmethod
    @without_autocast
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        probabilities, rows, local_labels = ctx.saved_tensors
        # A copy, not in place: a second backward (retain_graph=True) must find the probabilities intact.
        result = probabilities.clone()
        result[rows, local_labels[rows]] -= 1.0
        result.mul_(grad / result.shape[0])
        return result, None, None


class ShardedMarginHead(nn.Module):
    """``MarginHead`` + ``F.cross_entropy`` with the class centres sharded over the ranks of ``group``.

    ``forward`` returns the loss (a scalar, the same on every rank), not logits: the full logits never exist on
    one rank. Give the centres either in full (``centres`` [C, d], each rank keeps its slice) or as this rank's
    shard (``local_centres`` [C_r, d], so no rank materialises the full matrix); learnable centres without either
    start as N(0, 0.01) like ``MarginHead``'s (a different draw per rank). Frozen centres are L2-normalised.

    ``undo_ddp_average``: DistributedDataParallel averages the backbone's gradients over ranks, but each rank's
    embedding gradient is already its exact share of the gradient of the global loss, so the average would be
    1/world of the single-process gradient. When the embeddings come from a DDP-wrapped backbone, set it to
    multiply the embedding gradient by the world size (what arcface_torch's AllGather does unconditionally).
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
        *,
        local_centres: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        undo_ddp_average: bool = False,
        target_form: str = "continue",
    ) -> None:
        super().__init__()
        check_margins(m1, m2, m3, target_form)
        self.target_form = target_form
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.learnable = learnable
        self.undo_ddp_average = undo_ddp_average
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        num_local = self.class_end - self.class_start
        if centres is not None and local_centres is not None:
            raise ValueError("give the class centres either in full (centres) or as this rank's shard, not both")
        if centres is not None:
            if tuple(centres.shape) != (num_classes, embedding_size):
                raise ValueError(
                    f"class centres have shape {tuple(centres.shape)}, expected ({num_classes}, {embedding_size}): "
                    "the number of classes must match the dataset and the dimension the student's embedding size"
                )
            local_centres = centres[self.class_start : self.class_end]
        if local_centres is None:
            if not learnable:
                raise ValueError("frozen centres need a centres tensor (e.g. the teacher's class centres)")
            local_centres = torch.randn(num_local, embedding_size) * 0.01
        if tuple(local_centres.shape) != (num_local, embedding_size):
            raise ValueError(
                f"rank {self.rank} of {self.world_size} holds classes [{self.class_start}, {self.class_end}) of "
                f"{num_classes}: its centres must be ({num_local}, {embedding_size}), got {tuple(local_centres.shape)}"
            )
        if learnable:
            self.weight = nn.Parameter(local_centres.detach().float().clone())
        else:
            self.register_buffer("weight", F.normalize(local_centres.detach().float(), dim=1))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _normalised_weight(self) -> torch.Tensor:
        return F.normalize(self.weight.float(), dim=1)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        margin: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        temperature: float = 4.0,
    ) -> dict[str, torch.Tensor]:
        """The head's loss terms, as every head returns them: ``margin``, the mean margin cross-entropy over the
        global batch (``margin`` [B_local] replaces ``m2`` per sample; all ranks pass one or none). Its centres are
        learnt, not a teacher's, so it has no ``kd`` term (``FrozenPartialFC`` distils over sharded centres)."""
        if teacher is not None:
            raise ValueError(
                "ShardedMarginHead learns its own centres: it has no teacher centres to distil over (temperature "
                f"{temperature}); use FrozenPartialFC"
            )
        return {"margin": self._margin_loss(embeddings, labels, margin)}

    def _margin_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
        if not self.distributed:
            return self._single_process_loss(embeddings, labels, margin)
        grad_scale = float(self.world_size) if self.undo_ddp_average else 1.0
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            gathered = _GatherWithGradient.apply(embeddings.float(), self.group, self.world_size, grad_scale)
            all_labels = self._gather(labels)
            owned = (all_labels >= self.class_start) & (all_labels < self.class_end)
            # Rows whose class lives elsewhere read (and write back unchanged) column 0, keeping the ops dense.
            column = torch.where(owned, all_labels - self.class_start, torch.zeros_like(all_labels))
            cos = _Float32Linear.apply(F.normalize(gathered, dim=1), self._normalised_weight())
            true_cos = cos.gather(1, column[:, None]).squeeze(1)
            m2 = self.m2 if margin is None else self._gather(margin.detach().float())
            target = torch.where(owned, margin_target_logit(true_cos, self.m1, m2, self.m3, self.target_form), true_cos)
            logits = cos.scatter(1, column[:, None], target[:, None]) * self.scale
            local_labels = torch.where(owned, column, torch.full_like(column, -1))
            return _DistributedCrossEntropy.apply(logits, local_labels, self.group)

    def _single_process_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor | None
    ) -> torch.Tensor:
        # Op for op what MarginHead.forward does, so world size 1 gives identical numbers (the linear's backward
        # runs with autocast off too: _Float32Linear).
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = _Float32Linear.apply(F.normalize(embeddings.float(), dim=1), self._normalised_weight())
        true_cos = cos.gather(1, labels[:, None]).squeeze(1)
        m2 = self.m2 if margin is None else margin.float()
        target = margin_target_logit(true_cos, self.m1, m2, self.m3, self.target_form)
        logits = cos.scatter(1, labels[:, None], target[:, None])
        return F.cross_entropy(logits * self.scale, labels)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        gathered = local.new_empty((self.world_size * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local.contiguous(), group=self.group)
        return gathered

    @torch.no_grad()
    def true_class_cosine(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos(vectors_i, W_{labels_i})`` for the local batch, wherever the centre lives (collective): what
        MarginDistillation's typicality needs (``vectors`` = teacher embeddings) when a rank lacks most centres."""
        weight = self._normalised_weight() if self.learnable else self.weight
        return true_class_cosine(vectors, labels, weight, self.class_start, self.group, self.world_size)

    def full_state(self, dst: int | None = 0) -> torch.Tensor | None:
        """The full [C, d] centres on group rank ``dst`` (None elsewhere; ``dst=None``: on every rank), for
        checkpoints that load at any world size (collective)."""
        return gather_shards(self.weight, self.num_classes, self.group, dst)

    @torch.no_grad()
    def load_full_state(self, full: torch.Tensor) -> None:
        """Take this rank's rows of full [C, d] centres (from ``full_state``, at any world size); local."""
        if tuple(full.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"full centres have shape {tuple(full.shape)}, expected ({self.num_classes}, {self.embedding_size})"
            )
        self.weight.copy_(full[self.class_start : self.class_end])

    def held_bytes(self) -> int:
        """Bytes of class-centre storage on this rank: the shard, plus its gradient once one exists."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight.grad) if t is not None)

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes} (rank {self.rank} of {self.world_size}: [{self.class_start}, "
            f"{self.class_end})), dim={self.embedding_size}, s={self.scale}, m=({self.m1}, {self.m2}, {self.m3}), "
            f"learnable={self.learnable}"
        )
