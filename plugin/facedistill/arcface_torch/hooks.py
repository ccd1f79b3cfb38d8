"""The calls the patched ``train_v2.py`` makes into facedistill (see ``patches/README.md`` for each hunk).

Devices: NCCL and ``cuda:LOCAL_RANK`` where CUDA is available, exactly as upstream; gloo and the CPU otherwise, so
the same recipe runs on a laptop, in CI and on a GPU cluster.

Refusals: importing this module (the patched ``train_v2.py`` does, first of facedistill) makes every refusal one
line from rank 0 (``facedistill.arcface_torch.refusals``), wherever the run meets it: recipe, data, teacher, cache
or val targets.

Heads: ``build_head`` returns the framework's own ``PartialFC_V2(CombinedMarginLoss)``, built with upstream's
arguments, when ``config.loss`` is absent or ``"arcface"``, and a facedistill ``DistillHead`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import distributed, nn

from facedistill.arcface_torch import recipe, refusals
from facedistill.arcface_torch.data import TeacherRows
from facedistill.arcface_torch.recipe import Recipe, method_name

refusals.install()


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_device(local_rank: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)


def device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def device_ids(local_rank: int) -> list[int] | None:
    """DistributedDataParallel's ``device_ids``: this GPU, or None for a CPU module."""
    return [local_rank] if torch.cuda.is_available() else None


def teacher_rows(cfg: Recipe) -> TeacherRows | None:
    """``get_dataloader``'s ``teacher``: with a facedistill method, each sample carries its rows of the recipe's
    teacher cache, read by the DataLoader workers (None: the framework's own loss, upstream's samples). The cache
    is opened where a sample is first read, after ``build_head`` has checked it."""
    if method_name(cfg) is None:
        return None
    return TeacherRows(recipe.teacher_cache_dir(cfg), recipe.CACHE_COMMAND)


def data_shift(cfg: Recipe) -> int:
    """``get_dataloader``'s ``shift``: ``config.shift``, checked (0 when absent: upstream's augmentation)."""
    return recipe.data_shift(cfg)


def build_head(cfg: Recipe, margin_loss: nn.Module, partial_fc_v2: Callable[..., nn.Module]) -> nn.Module:
    """The run's margin head; a recipe that cannot run with its teacher or cache stops here, before training."""
    if method_name(cfg) is None:
        return partial_fc_v2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    from facedistill.arcface_torch.head import build_distill_head

    rank = distributed.get_rank() if distributed.is_initialized() else 0
    world_size = distributed.get_world_size() if distributed.is_initialized() else 1
    return build_distill_head(cfg, rank, world_size)
