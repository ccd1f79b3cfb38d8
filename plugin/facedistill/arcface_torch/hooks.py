"""The calls the patched ``train_v2.py`` makes into facedistill (see ``patches/README.md`` for each hunk).

Devices: NCCL and ``cuda:LOCAL_RANK`` where CUDA is available, exactly as upstream; gloo and the CPU otherwise, so
the same recipe runs on a laptop, in CI and on a GPU cluster.

Refusals: importing this module (the patched ``train_v2.py`` does, first of facedistill) makes every refusal one
line from rank 0 (``facedistill.arcface_torch.refusals``), wherever the run meets it: recipe, data, teacher, cache
or val targets.

Heads: ``build_head`` returns the framework's own ``PartialFC_V2(CombinedMarginLoss)``, built with upstream's
arguments, when ``config.loss`` is absent or ``"arcface"``, and a facedistill ``DistillHead`` otherwise; either way
after checking ``config.num_classes`` and ``config.num_image`` against the training set.

Warnings: a start prints none that is not about the user's config. Upstream's deprecated calls are replaced in the
patched files where that changes nothing (``grad_scaler`` here, ``torch.amp.autocast``); the two left are DDP's
advice on options upstream chose on purpose, filtered below by their exact text.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import distributed, nn

from facedistill.arcface_torch import recipe, refusals
from facedistill.arcface_torch.data import TeacherRows, open_framework_dataset
from facedistill.arcface_torch.recipe import Recipe, method_name

refusals.install()

# torch >= 2.13 deprecates DDP's broadcast_buffers=False for forward_sync_buffers=False, which would also sync the
# buffers at start-up (upstream opts out of that) and does not exist in older torch: upstream's call stays.
warnings.filterwarnings(
    "ignore", message=r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers`", category=FutureWarning
)
# Upstream passes find_unused_parameters=True and then calls _set_static_graph(), which makes it redundant; turning it
# off would change DDP's set-up of the framework's GPU runs, so the advice is dropped, not taken.
warnings.filterwarnings(
    "ignore",
    message=r"You passed find_unused_parameters=true to DistributedDataParallel, `_set_static_graph` will detect",
    category=UserWarning,
)


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


def grad_scaler(growth_interval: int) -> torch.amp.GradScaler:
    """The framework's loss scaler, as upstream makes it (``torch.cuda.amp.GradScaler(growth_interval=...)``) in the
    spelling current torch does not deprecate. Without CUDA it is made disabled: torch disables it there anyway,
    with a warning on every start; ``config.fp16`` then scales nothing and the step is plain fp32 (see
    ``recipe.cpu_fp16_warning``)."""
    return torch.amp.GradScaler("cuda", growth_interval=growth_interval, enabled=torch.cuda.is_available())


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
    """The run's margin head; a recipe that cannot run with its data, teacher or cache stops here, before any sample
    is read. A distillation run says on rank 0, in one line of the framework's log, what it distils."""
    rank = distributed.get_rank() if distributed.is_initialized() else 0
    if method_name(cfg) is None:
        if cfg.rec != "synthetic":  # upstream's generated batches have no classes or records to check
            recipe.check_training_set(cfg, open_framework_dataset(cfg.rec))
        return partial_fc_v2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    from facedistill.arcface_torch.head import build_distill_head

    world_size = distributed.get_world_size() if distributed.is_initialized() else 1
    head = build_distill_head(cfg, rank, world_size)
    if rank == 0:
        logging.info(head.summary)
    return head
