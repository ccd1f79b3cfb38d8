"""One optimisation step of the training loop, as one callable.

The loop (``facedistill.train.loop``) and the GPU throughput benchmark (``benchmarks/gpu_train_speed.py``) both
run this, so a speed-up measured by the benchmark is a speed-up of training, not of a copy of it. In order: mirror
(and with ``data.shift`` translate) the global batch's share of this rank, look up the cached teacher rows (mirror
rows for mirrored images), copy to the device, normalise into the training memory format, forward under autocast,
the method's loss terms, reduce them over the ranks, stop on a non-finite loss, backward (scaled for fp16), clip,
optimiser and schedule step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from facedistill.config import Config
from facedistill.data.datasets import Batch
from facedistill.data.images import normalise, random_horizontal_flip, random_shift
from facedistill.distill import DistillMethod
from facedistill.heads.sharded import clip_grad_norm_sharded_
from facedistill.teachers.cache import TeacherCache
from facedistill.train.distributed import Distributed, local_batch_size, pad_batch, sharded_heads, sync_overflow_


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """Per-step randomness derived from (seed, step), so a resumed run draws exactly what it would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainStep:
    forward: Callable[[torch.Tensor], torch.Tensor]
    method: DistillMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    steps_per_epoch: int
    # The global batch (every rank draws it, then trains on its contiguous share of rank_batch rows).
    batch_size: int
    seed: int = 0
    memory_format: torch.memory_format = torch.channels_last
    amp_dtype: torch.dtype | None = None
    cache: TeacherCache | None = None
    # Subtracted from every L2-normalised teacher row (``teacher.subtract_mean``), as from the centres' rows.
    teacher_offset: torch.Tensor | None = None
    flip: bool = True
    shift: int = 0
    mirror_rows: bool = True
    grad_clip: float = 0.0
    env: Distributed = field(default_factory=Distributed)
    # Appended to the divergence error: what the user should do (the loop names its last checkpoint).
    divergence_hint: str = ""

    @classmethod
    def from_config(cls, config: Config, **parts: Any) -> TrainStep:
        """The step a run of ``config`` takes: seed, batch size, memory format, flip, mirror rows and clipping come
        from the config; ``parts`` are the rest (forward, method, optimizer, scheduler, scaler, device, ...)."""
        return cls(
            batch_size=config.data.batch_size,
            seed=config.run.seed,
            memory_format=torch.channels_last if config.train.channels_last else torch.contiguous_format,
            flip=config.data.flip,
            shift=config.data.shift,
            mirror_rows=config.teacher.mirror_rows,
            grad_clip=config.train.grad_clip,
            **parts,
        )

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            # Every batch has the same shape (B x 3 x 112 x 112): cuDNN's timed choice of conv algorithms pays.
            torch.backends.cudnn.benchmark = True
        self.rank_batch = local_batch_size(self.batch_size, self.env.world_size)
        self.heads = list(sharded_heads(self.method).values())
        self.sharded_params = [head.weight for head in self.heads if head.learnable]
        self.replicated_params = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if all(p is not q for q in self.sharded_params)
        ]

    def __call__(self, batch: Batch, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, int]:
        """Train on ``batch`` as step ``step``. Returns the loss terms, ``[loss, *terms]`` over the global batch
        (detached), the images of the global batch that were skipped as unreadable, and the rows trained on."""
        env = self.env
        batch_skipped = batch.skipped
        if env.enabled:
            batch = pad_batch(batch, self.rank_batch)
        # Straight from the loader's (pinned, on a GPU run) batch to the device, then flipped and shifted there: a
        # host-side copy first would leave the transfer unpinned and synchronous.
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels
        mirrored = None
        # Drawn for the global batch and sliced, so each image flips and shifts as it would on one process; the
        # shift draws after the flip, so a run without it flips exactly as before.
        generator = step_generator(self.seed, step)
        share = {"global_batch": self.batch_size if env.enabled else None, "offset": env.rank * self.rank_batch}
        if self.flip:
            images, mirrored = random_horizontal_flip(images, generator, **share)
        if self.shift:
            images = random_shift(images, generator, self.shift, **share)
        teacher = None
        if self.cache is not None:
            rows = mirrored if self.mirror_rows and self.method.mirror_rows else None
            teacher = self.cache.rows(batch.indices, rows, self.teacher_offset)
            teacher = teacher.to(self.device, non_blocking=True)
        images = normalise(images).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)

        self.method.set_progress(step, step / self.steps_per_epoch)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            embeddings = self.forward(images)
        terms = self.method(embeddings.float(), labels, teacher)
        loss = sum(terms.values())
        # The loss and its terms over the global batch: every rank agrees on divergence and rank 0 logs them.
        values, batch_skipped = env.reduce_step(
            torch.stack([loss.detach(), *(term.detach() for term in terms.values())]), batch_skipped
        )
        if not torch.isfinite(values[0]):
            scale_note = f" (fp16 loss scale {self.scaler.get_scale():.1f})" if self.scaler.is_enabled() else ""
            raise TrainingDivergedError(f"loss is {values[0].item()} at step {step}{scale_note}{self.divergence_hint}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if env.enabled and self.scaler.is_enabled():
            sync_overflow_(self.heads)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            if env.enabled:
                # The centres' share of the norm is summed over ranks: all clip by the one global norm.
                clip_grad_norm_sharded_(self.replicated_params, self.sharded_params, self.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.replicated_params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms, values, batch_skipped, len(labels)
