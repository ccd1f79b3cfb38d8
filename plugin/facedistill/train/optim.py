"""Optimisers and learning-rate schedules (warm-up, then step, poly, cosine or constant), stepped per iteration."""

from __future__ import annotations

import math

import torch
from torch import nn

from facedistill.config import OptimSection, ScheduleSection


def build_optimizer(modules: list[nn.Module], section: OptimSection) -> torch.optim.Optimizer:
    """Weight decay on weights only: biases, BatchNorm and PReLU parameters (1-d) are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() > 1 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": section.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if section.name == "sgd":
        return torch.optim.SGD(groups, lr=section.lr, momentum=section.momentum, nesterov=section.nesterov)
    return torch.optim.AdamW(groups, lr=section.lr, betas=section.betas)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, section: ScheduleSection) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    warmup = int(round(section.warmup_epochs * steps_per_epoch))
    if step < warmup:
        start = section.warmup_start_factor
        return start + (1.0 - start) * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = section.min_lr_factor
    if section.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if section.name == "poly":
        return floor + (1.0 - floor) * (1.0 - min(1.0, progress)) ** section.power
    if section.name == "step":
        epoch = step / steps_per_epoch
        return section.gamma ** sum(epoch >= milestone for milestone in section.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, section: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, section)
    )
