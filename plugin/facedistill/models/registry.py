"""The backbone registry, in its own module so model files can register without importing the package."""

from __future__ import annotations

from torch import nn

from facedistill.registry import Registry

# Factories take ``embedding_size`` plus model-specific keyword options and return an nn.Module that has an
# ``embedding_size: int`` attribute and maps [B, 3, 112, 112] to a raw (un-normalised) [B, embedding_size].
BACKBONES: Registry[nn.Module] = Registry[nn.Module]("backbone")

__all__ = ["BACKBONES"]
