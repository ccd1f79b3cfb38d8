"""``config.resume = True`` in the patched ``train_v2.py``, on the number of processes that saved the run or another.

Upstream reads ``checkpoint_gpu_{rank}.pt`` into each rank. Those files are replicated but for the margin head:
PartialFC_V2 (and facedistill's sharded heads) keep classes ``[class_start, class_start + num_local)`` on each rank,
``num_classes // world_size`` each and one more on the first ``num_classes % world_size`` ranks
(``facedistill.heads.sharded.shard_range``), and the optimiser keeps the head's momentum / Adam moments per row
likewise. On another number of processes a rank's own file holds other classes, or does not exist, and upstream
stopped with a 53-line ``size mismatch`` traceback.

``restore`` keeps upstream's reading where every rank's own file fits its head and the files are of as many ranks as
this run has (one all-reduce decides, so that every rank takes the same path). Otherwise every rank reads all saved
files (all but the first memory-mapped: only its rows of theirs are read), rebuilds its block of each class-split
tensor (the head's, and the optimiser's per-row state of a trainable head) from the old blocks in class order, and
takes everything else (backbone, optimiser, scheduler, epoch) from the first file, as they are replicated. A frozen
head (facedistill's teacher centres) is recut the same way, into the values it was rebuilt with. The saved world's
steps are not this run's (its global batch differs): the run continues at the first step of the saved epoch in its
own steps, ``epoch * (num_image // global batch)``, the scheduler there with this run's warm-up and total, as a run
of this size would have been. The grad scaler was never saved by upstream and starts afresh, as when upstream
resumes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import distributed, nn

from facedistill.config import ConfigError
from facedistill.heads.sharded import optimizer_param_index, shard_range

CHECKPOINT = "checkpoint_gpu_{rank}.pt"
_CHECKPOINT = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
HEAD_KEY = "state_dict_softmax_fc"
OPTIMIZER_KEY = "state_optimizer"


class ResumeError(ConfigError):
    """A run directory ``config.resume`` cannot continue from; the message names the file and what to do."""


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Rows of each rank's block of ``num_classes`` classes (PartialFC_V2's split)."""
    return [end - start for start, end in (shard_range(num_classes, r, world_size) for r in range(world_size))]


def reshard_rows(shards: Sequence[torch.Tensor], num_classes: int, rank: int, world_size: int) -> torch.Tensor:
    """``rank``'s block of ``world_size`` blocks, cut from the blocks ``shards`` of ``len(shards)`` ranks (rank
    order, each ``[rows, ...]``); a new tensor, so memory-mapped shards are read only where the rows are."""
    old_world = len(shards)
    sizes = shard_sizes(num_classes, old_world)
    held = [int(shard.shape[0]) for shard in shards]
    if held != sizes:
        raise ValueError(f"blocks of {held} rows are not {num_classes} classes split over {old_world} ranks ({sizes})")
    start, end = shard_range(num_classes, rank, world_size)
    pieces = []
    for old_rank, shard in enumerate(shards):
        old_start, old_end = shard_range(num_classes, old_rank, old_world)
        low, high = max(start, old_start), min(end, old_end)
        if low < high:
            pieces.append(shard[low - old_start : high - old_start])
    if not pieces:
        return shards[0].new_empty((0, *shards[0].shape[1:]))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def _saved_files(output: Path) -> dict[int, Path]:
    """rank -> ``checkpoint_gpu_{rank}.pt`` of ``output``."""
    if not output.is_dir():
        return {}
    matches = ((_CHECKPOINT.match(path.name), path) for path in output.iterdir())
    return {int(match.group(1)): path for match, path in matches if match}


def checkpoint_files(output: Path) -> list[Path]:
    """``checkpoint_gpu_0.pt`` .. ``checkpoint_gpu_{N-1}.pt`` of ``output``, refusing none at all or a gap."""
    found = _saved_files(output)
    if not found:
        raise ResumeError(
            f"config.resume = True but {output} holds no checkpoint_gpu_*.pt: a run writes them at the end of each "
            "epoch with config.save_all_states = True; set config.resume = False to start afresh"
        )
    for rank in range(max(found) + 1):
        if rank not in found:
            raise ResumeError(
                f"{output / CHECKPOINT.format(rank=rank)} is missing, beside {len(found)} other checkpoint_gpu_*.pt "
                f"of ranks up to {max(found)}: on another number of processes every rank reads every rank's file "
                "(each holds a block of the head); copy it there"
            )
    return [found[rank] for rank in range(len(found))]


def _load(path: Path, mmap: bool = False) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated, corrupt or unsafe files
        message = f"{path} cannot be loaded ({type(error).__name__}: {error}); resume from intact files"
        raise ResumeError(" ".join(message.split())) from None


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def _fits(checkpoint: Mapping[str, Any], head: nn.Module) -> bool:
    """Whether a checkpoint's head state has this head's keys and shapes (upstream's ``load_state_dict`` works)."""
    saved = checkpoint.get(HEAD_KEY)
    return isinstance(saved, Mapping) and _shapes(saved) == _shapes(head.state_dict())


def _is_block(value: Any, rows: int, like: torch.Tensor) -> bool:
    """Whether ``value`` is a block of ``rows`` rows of a tensor shaped like ``like`` along its first dimension."""
    return isinstance(value, torch.Tensor) and like.ndim >= 1 and tuple(value.shape) == (rows, *like.shape[1:])


def _class_sharded(
    saved: Sequence[torch.Tensor], now: torch.Tensor, num_classes: int, rank: int, world_size: int
) -> bool | None:
    """Whether a head tensor is split by class (True), replicated (False), or neither (None), by its shapes in the
    saved files and in this run's head. Both fit only when a block has as many rows in either split, which takes
    fewer classes than ranks: then tensors that differ between files are blocks."""
    start, end = shard_range(num_classes, rank, world_size)
    sizes = shard_sizes(num_classes, len(saved))
    replicated = all(tuple(t.shape) == tuple(now.shape) for t in saved)
    blocks = _is_block(now, end - start, now) and all(_is_block(t, n, now) for t, n in zip(saved, sizes, strict=True))
    if replicated and blocks:
        return not all(torch.equal(saved[0], t) for t in saved[1:])
    if replicated or blocks:
        return blocks
    return None


def _missing_files(files: Sequence[Path], rows: Sequence[int], num_classes: int) -> str | None:
    """The refusal for a run whose last files are missing: blocks that fit ``num_classes`` over more ranks."""
    held = len(files)
    for world in range(held + 1, num_classes + 1):
        if list(rows) == shard_sizes(num_classes, world)[:held]:
            missing = files[0].parent / CHECKPOINT.format(rank=held)
            return (
                f"{missing} is missing: the head blocks of {files[0].parent}/checkpoint_gpu_*.pt are {num_classes} "
                f"classes split over {world} processes, and only the files of ranks 0..{held - 1} are there; copy "
                f"the files of ranks {held}..{world - 1} back"
            )
    return None


def reshard_checkpoint(
    checkpoints: Sequence[Mapping[str, Any]],
    files: Sequence[Path],
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_classes: int,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint ``rank`` of ``world_size`` would have saved, from the ``checkpoints`` (rank order) that
    ``len(checkpoints)`` processes saved: the same keys; the head's class-split tensors and the optimiser's per-row
    state of them recut by class; the rest from the first file. Local (no communication)."""
    old_world = len(checkpoints)
    for path, checkpoint in zip(files, checkpoints, strict=True):
        for key in (HEAD_KEY, OPTIMIZER_KEY, "epoch", "global_step"):
            if key not in checkpoint:
                raise ResumeError(f"{path} has no {key!r}: it is not a checkpoint that train_v2.py saved")
    progress = [(int(c["epoch"]), int(c["global_step"])) for c in checkpoints]
    for path, (epoch, step) in zip(files, progress, strict=True):
        if (epoch, step) != progress[0]:
            raise ResumeError(
                f"{path} is of epoch {epoch}, step {step}, {files[0]} of epoch {progress[0][0]}, step {progress[0][1]}:"
                f" the checkpoint_gpu_*.pt of {files[0].parent} are of different runs or an interrupted save; "
                "remove those of the other run"
            )
    saved_heads = [c[HEAD_KEY] for c in checkpoints]
    current = head.state_dict()
    head_state: dict[str, torch.Tensor] = {}
    sharded: set[str] = set()
    extra = sorted(set(saved_heads[0]) - set(current))
    if extra:
        raise ResumeError(
            f"{files[0]} holds {HEAD_KEY}[{extra[0]!r}], which this run's head has not: it was saved with another "
            "config.loss or head; resume with the recipe that saved it"
        )
    for key, now in current.items():
        for path, saved in zip(files, saved_heads, strict=True):
            if key not in saved:
                raise ResumeError(
                    f"{path} has no {HEAD_KEY}[{key!r}]: it was saved with another config.loss or head; resume "
                    "with the recipe that saved it"
                )
        tensors = [saved[key] for saved in saved_heads]
        kind = _class_sharded(tensors, now, num_classes, rank, world_size)
        if kind is None:
            rows = [int(t.shape[0]) if t.ndim else 0 for t in tensors]
            raise ResumeError(
                _missing_files(files, rows, num_classes)
                or f"{HEAD_KEY}[{key!r}] is {[tuple(t.shape) for t in tensors]} in the {old_world} checkpoint_gpu_*.pt "
                f"of {files[0].parent}, and {tuple(now.shape)} in rank {rank}'s head of {num_classes} classes over "
                f"{world_size} processes: they were saved with another config.num_classes, embedding size or head; "
                "resume with the recipe that saved them"
            )
        if kind:
            sharded.add(key)
            head_state[key] = reshard_rows(tensors, num_classes, rank, world_size)
        else:
            head_state[key] = tensors[0].clone()
    return {
        **checkpoints[0],
        HEAD_KEY: head_state,
        OPTIMIZER_KEY: _reshard_optimizer(checkpoints, files, head, optimizer, sharded, num_classes, rank, world_size),
    }


def _reshard_optimizer(
    checkpoints: Sequence[Mapping[str, Any]],
    files: Sequence[Path],
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    sharded: set[str],
    num_classes: int,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """The first file's optimiser state, with the per-row state (SGD momentum, AdamW's moments) of every
    class-split head parameter recut by class; its step counts are replicated."""
    base = checkpoints[0][OPTIMIZER_KEY]
    saved_counts = [len(group["params"]) for group in base["param_groups"]]
    counts = [len(group["params"]) for group in optimizer.param_groups]
    if saved_counts != counts:
        raise ResumeError(
            f"the optimiser state in {files[0]} has parameter groups of {saved_counts} parameters, this run's "
            f"{counts}: it was saved with another config.network, config.loss or config.optimizer; resume with the "
            "recipe that saved it"
        )
    state = {**base, "state": dict(base["state"])}
    old_sizes = shard_sizes(num_classes, len(checkpoints))
    for name, param in head.named_parameters():
        if name not in sharded:
            continue
        index = optimizer_param_index(optimizer, param)
        per_file = [checkpoint[OPTIMIZER_KEY]["state"].get(index) for checkpoint in checkpoints]
        if all(entry is None for entry in per_file):
            continue
        if any(entry is None or set(entry) != set(per_file[0]) for entry in per_file):
            raise ResumeError(
                f"the optimiser state of the head's {name!r} differs in kind between the checkpoint_gpu_*.pt of "
                f"{files[0].parent}: they are not of one run; resume from the files of one run"
            )
        merged = {}
        for field, value in per_file[0].items():
            values = [entry[field] for entry in per_file]
            per_row = all(_is_block(v, n, param) for v, n in zip(values, old_sizes, strict=True))
            merged[field] = reshard_rows(values, num_classes, rank, world_size) if per_row else value
        state["state"][index] = merged
    return state


def _convert_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], step: int) -> None:
    """Load the saved scheduler state, keep this run's ``warmup_iters``/``total_iters`` (its steps) and put it at
    ``step``, with the learning rate the schedule has there."""
    total, warmup = getattr(scheduler, "total_iters", None), getattr(scheduler, "warmup_iters", None)
    if total is None or warmup is None or not hasattr(scheduler, "_get_closed_form_lr"):
        raise ResumeError(
            f"the learning-rate scheduler {type(scheduler).__name__} has no total_iters/warmup_iters to convert to "
            "another number of processes; resume on the number of processes that saved the checkpoint"
        )
    scheduler.load_state_dict(saved)
    scheduler.total_iters, scheduler.warmup_iters, scheduler.last_epoch = total, warmup, step
    if step > 0 or warmup > 0:
        lrs = scheduler._get_closed_form_lr()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)


def _agree(own_fits: bool, step: int, saved_ranks: int, device: torch.device) -> tuple[bool, int, int, int]:
    """Over all ranks (one all-reduce): whether every rank's own file fits its head, the lowest and highest saved
    step, and the most saved ranks any rank sees (each node may hold only its own ranks' files)."""
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return own_fits, step, step, saved_ranks
    flags = torch.tensor([int(own_fits), step, -step, -saved_ranks], dtype=torch.int64, device=device)
    distributed.all_reduce(flags, op=distributed.ReduceOp.MIN)
    fits, lowest, highest, ranks = (int(value) for value in flags.tolist())
    return bool(fits), lowest, -highest, -ranks


def restore(
    cfg: Mapping[str, Any],
    rank: int,
    world_size: int,
    backbone: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
) -> tuple[int, int]:
    """Upstream's resume block: load ``cfg.output``'s checkpoints into the backbone, head, optimiser and scheduler;
    return ``(start_epoch, global_step)``. Collective (one all-reduce) when a process group is initialised."""
    output = Path(str(cfg["output"]))
    own_path = output / CHECKPOINT.format(rank=rank)
    own = None
    if own_path.is_file():
        try:
            own = torch.load(own_path, map_location="cpu", weights_only=True)
        except Exception:  # refused below, naming the file, on the path every rank takes
            own = None
    own_fits = own is not None and _fits(own, head)
    own_step = int(own.get("global_step", 0)) if own_fits else 0
    device = next(backbone.parameters()).device
    fits, lowest, highest, saved_ranks = _agree(own_fits, own_step, max(_saved_files(output), default=-1) + 1, device)
    if fits and saved_ranks == world_size:  # upstream's resume: each rank its own file
        if lowest != highest:
            raise ResumeError(
                f"the checkpoint_gpu_*.pt of {output} are of steps {lowest} to {highest}: a save was interrupted or "
                "they are of different runs; resume from the files of one save"
            )
        assert own is not None
        backbone.load_state_dict(own["state_dict_backbone"])
        head.load_state_dict(own[HEAD_KEY])
        optimizer.load_state_dict(own[OPTIMIZER_KEY])
        lr_scheduler.load_state_dict(own["state_lr_scheduler"])
        epoch, step = int(own["epoch"]), int(own["global_step"])
        if rank == 0:
            logging.info(
                "resumed from the checkpoint_gpu_*.pt of %s, saved by %d processes as this run has: epoch %d, step %d",
                output, world_size, epoch, step,
            )  # fmt: skip
    else:
        files = checkpoint_files(output)
        # The first file in full (the optimiser keeps its tensors), the others memory-mapped: only this rank's rows
        # of their head blocks are read.
        checkpoints = [_load(path, mmap=index > 0) for index, path in enumerate(files)]
        checkpoint = reshard_checkpoint(checkpoints, files, head, optimizer, int(cfg["num_classes"]), rank, world_size)
        backbone.load_state_dict(checkpoint["state_dict_backbone"])
        head.load_state_dict(checkpoint[HEAD_KEY])
        optimizer.load_state_dict(checkpoint[OPTIMIZER_KEY])
        # This run's global batch differs, and so do its steps per epoch: it continues at the saved epoch's first
        # step of its own schedule (train_v2.py's units: num_image // global batch steps per epoch).
        epoch, saved_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        step = epoch * (int(cfg["num_image"]) // (int(cfg["batch_size"]) * world_size))
        _convert_schedule(lr_scheduler, optimizer, checkpoint["state_lr_scheduler"], step)
        if rank == 0:
            logging.info(
                "resumed from the checkpoint_gpu_*.pt of %s, saved by %d processes, on %d: epoch %d, their step %d "
                "is this run's step %d; the head's classes and their optimiser state were recut by class",
                output, len(files), world_size, epoch, saved_step, step,
            )  # fmt: skip
    if hasattr(head, "steps_per_epoch") and hasattr(head, "step"):
        head.step = step  # a facedistill head's warm-ups and moving statistics continue where the run stopped
    return epoch, step
