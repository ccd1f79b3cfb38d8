"""What the training loop needs to run as one of several processes (``torchrun``): the process group, the rank's
slice of each global batch, and checkpoints that do not depend on the number of processes.

The design keeps a run on N processes equal to a run on one process with the same global batch:

- every rank draws the same global batch (the same per-epoch order) and the same flip mask, and takes its
  contiguous ``batch_size / N`` rows of both;
- the backbone is wrapped in ``DistributedDataParallel``, whose gradient average over ranks of per-rank means is
  the mean over the global batch; BatchNorm layers become ``SyncBatchNorm`` on GPUs (``train.sync_batchnorm``), so
  their statistics are those of the global batch too (PyTorch has no SyncBatchNorm on CPUs);
- margin-softmax heads are ``ShardedMarginHead``: each rank holds a block of the class centres and the loss is the
  exact cross-entropy of the global batch (see ``facedistill.heads.sharded``);
- checkpoints hold full tensors (the whole head, unsharded optimiser state), written by rank 0, and every rank
  shards them again on resume, so a run started on N processes resumes on any number.

Nothing here changes a run on one process: with ``WORLD_SIZE`` unset or 1 and no process group, ``Distributed``
is inert.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facedistill.data.datasets import Batch
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import (
    ShardedMarginHead,
    shard_optimizer_state,
    shard_range,
    unshard_optimizer_state,
)

# Rank 0 validates and writes checkpoints while the others wait in their next collective; the default timeout
# (10 min for NCCL) would abort a run whose validation set or checkpoint write on a network filesystem is slow.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Distributed:
    """This process's place in the run; ``world_size == 1`` means one process and no collective."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Whether ``train`` created the process group (and so destroys it at the end).
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's ``values`` on every rank (what rank 0 alone computed, e.g. a validation accuracy)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        return bool(self.broadcast_floats([float(flag)], device)[0])

    def reduce_step(self, values: torch.Tensor, skipped: int) -> tuple[torch.Tensor, int]:
        """The loss terms averaged over ranks (each rank's are means over its equal share of the global batch,
        so this is their mean over the global batch) and the skipped images summed: one small all-reduce."""
        if not self.enabled:
            return values, skipped
        packed = torch.cat([values.float(), values.new_tensor([float(skipped)], dtype=torch.float32)])
        dist.all_reduce(packed)
        return packed[:-1] / self.world_size, int(round(float(packed[-1])))

    def close(self) -> None:
        """Destroy the process group ``init_distributed`` created. DDP's reducer and sharded heads hold it, and
        gloo aborts the process when one outlives it ("terminate called without an active exception"): the caller
        lets go of them first, and a collection here frees those that sit in reference cycles."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the run's process group, from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE`` > 1, or the group a caller already initialised; NCCL on
    GPUs, gloo on CPUs. On GPUs each process takes device ``LOCAL_RANK``. Returns the device this rank trains on."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1:
            return Distributed(), device
        env = Distributed(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        return env, rank_device(device, env.local_rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world}, but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True), device


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """GPU ``local_rank`` made the current device (so nothing that follows falls back to GPU 0) when ``device`` is a
    GPU, else ``device``; a rank beyond the node's GPUs is refused in one line."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but this node has {count} GPU(s): start at most {count} processes per node "
            "(torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def local_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the number of processes "
            f"({world_size}): each process takes batch_size / {world_size} rows of every batch"
        )
    return batch_size // world_size


def local_indices(global_indices: list[int], batch_size: int, env: Distributed) -> list[int]:
    """This rank's contiguous slice of every global batch in ``global_indices`` (consecutive runs of
    ``batch_size``), in order, so a loader with batch size ``batch_size / world`` yields the rank's rows."""
    if not env.enabled:
        return global_indices
    share = batch_size // env.world_size
    start = env.rank * share
    return [
        index
        for offset in range(0, len(global_indices) - batch_size + 1, batch_size)
        for index in global_indices[offset + start : offset + start + share]
    ]


def pad_batch(batch: Batch, size: int) -> Batch:
    """Top a batch that lost unreadable images (``data.skip_bad_images``) up to ``size`` rows with repeats of its
    readable ones: every rank must bring the same number of rows to the sharded head's collectives."""
    missing = size - len(batch.labels)
    if missing <= 0:
        return batch
    repeat = torch.arange(missing) % len(batch.labels)
    return Batch(
        torch.cat([batch.images, batch.images[repeat]]),
        torch.cat([batch.labels, batch.labels[repeat]]),
        torch.cat([batch.indices, batch.indices[repeat]]),
        batch.skipped,
    )


def wrap_backbone(
    model: nn.Module, env: Distributed, device: torch.device, sync_batchnorm: bool
) -> tuple[nn.Module, bool]:
    """The backbone under ``DistributedDataParallel`` (the model itself on one process), and whether its
    BatchNorm layers were made ``SyncBatchNorm``. Call before building the optimiser: the conversion makes new
    modules."""
    if not env.enabled:
        return model, False
    synced = sync_batchnorm and device.type == "cuda"
    if synced:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        reason = "PyTorch has no SyncBatchNorm on CPUs" if device.type != "cuda" else "train.sync_batchnorm=false"
        print(
            f"note: BatchNorm statistics are per process ({reason}): results differ slightly from one process "
            "with the same global batch"
        )
    return model, synced


def ddp(model: nn.Module, device: torch.device) -> nn.Module:
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sharded_heads(method: nn.Module) -> dict[str, ShardedMarginHead | FrozenPartialFC]:
    """The method's sharded heads by module name (``head`` for every method here)."""
    return {
        name: module
        for name, module in method.named_modules()
        if isinstance(module, (ShardedMarginHead, FrozenPartialFC))
    }


def check_replicated_parameters(method: nn.Module, method_name: str) -> None:
    """A trainable parameter outside a sharded head would get each rank's own gradient (the method is not under
    DDP) and drift apart between ranks: refuse rather than train different models."""
    sharded = {id(head.weight) for head in sharded_heads(method).values()}
    stray = [name for name, p in method.named_parameters() if p.requires_grad and id(p) not in sharded]
    if stray:
        raise ValueError(
            f"method '{method_name}' trains parameters that would be replicated across processes "
            f"({', '.join(stray)}); it runs on one process only"
        )


def checkpointed_bytes(method: nn.Module) -> int:
    """Bytes of the method's state in a checkpoint, where sharded heads are whole."""
    total = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    for head in sharded_heads(method).values():
        total += (head.num_classes - head.weight.shape[0]) * head.embedding_size * head.weight.element_size()
    return total


def sync_overflow_(heads: list[ShardedMarginHead]) -> None:
    """fp16 loss scaling: make every rank see an overflow when any rank's centre gradients overflowed, so all
    ranks skip the same steps (the backbone's gradients are already equal after DDP's all-reduce)."""
    grads = [head.weight.grad for head in heads if head.learnable and head.weight.grad is not None]
    if not grads:
        return
    overflow = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()
    dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
    if overflow.item():
        for grad in grads:
            grad.fill_(float("inf"))


def gather_training_state(
    method: nn.Module, optimizer: torch.optim.Optimizer, env: Distributed
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The method's and optimiser's state dicts with every sharded head (and its optimiser state) gathered in full
    on rank 0, so checkpoints are those of one process (collective; None on the other ranks)."""
    method_state = method.state_dict()
    optimizer_state: dict[str, Any] | None = optimizer.state_dict()
    if not env.enabled:
        return method_state, optimizer_state
    for name, head in sharded_heads(method).items():
        full = head.full_state(dst=0)
        if env.is_main:
            method_state[f"{name}.weight"] = full.cpu()
        if head.learnable:
            optimizer_state = unshard_optimizer_state(
                optimizer_state if env.is_main else optimizer.state_dict(),
                optimizer,
                head.weight,
                head.num_classes,
                dst=0,
            )
    if not env.is_main:
        return None
    assert optimizer_state is not None
    return method_state, optimizer_state


def shard_training_state(
    method: nn.Module, optimizer: torch.optim.Optimizer, method_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of ``gather_training_state``: this rank's rows of full heads and their optimiser state, ready to
    load (local; a no-op without sharded heads)."""
    method_state = dict(method_state)
    for name, head in sharded_heads(method).items():
        key = f"{name}.weight"
        full = method_state[key]
        if full.shape[0] != head.num_classes:
            raise ValueError(f"checkpoint {key} has {full.shape[0]} classes, the dataset {head.num_classes}")
        start, end = shard_range(head.num_classes, head.rank, head.world_size)
        method_state[key] = full[start:end]
        if head.learnable:
            optimizer_state = shard_optimizer_state(
                optimizer_state, optimizer, head.weight, head.num_classes, head.rank, head.world_size
            )
    return method_state, optimizer_state
