"""Student and teacher backbones, looked up by name in :data:`BACKBONES`.

Every backbone maps an aligned [B, 3, 112, 112] face normalised to [-1, 1] to a raw (un-normalised)
[B, embedding_size] embedding and exposes ``embedding_size: int``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Imported for their registration side effect; the registry lives in its own module to avoid import cycles.
from facedistill.models import iresnet, mobilefacenet  # noqa: F401
from facedistill.models.complexity import count_macs, count_parameters, format_count
from facedistill.models.iresnet import (
    CheckpointMismatchError,
    IResNet,
    describe_checkpoint_architecture,
    load_arcface_torch_checkpoint,
)
from facedistill.models.mobilefacenet import MobileFaceNet
from facedistill.models.registry import BACKBONES

__all__ = [
    "BACKBONES",
    "CheckpointMismatchError",
    "IResNet",
    "MobileFaceNet",
    "count_macs",
    "count_parameters",
    "create_model",
    "describe_checkpoint_architecture",
    "format_count",
    "load_arcface_torch_checkpoint",
]


def create_model(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name``; unknown names raise KeyError listing the known ones."""
    model = BACKBONES.create(name, embedding_size=embedding_size, **kwargs)
    if getattr(model, "embedding_size", None) != embedding_size:
        raise TypeError(f"backbone '{name}' does not expose embedding_size={embedding_size}")
    return model
