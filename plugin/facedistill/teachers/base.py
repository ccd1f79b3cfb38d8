"""What every teacher promises: embeddings for batches of aligned faces, with its own preprocessing.

Faces travel through facedistill as ``uint8`` tensors ``[B, 3, H, W]`` in RGB order. Teachers were trained
with very different input conventions (channel order, mean, scale), so each teacher declares its own
:class:`Preprocessing` and applies it itself; callers never normalise images for a teacher.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from facedistill.registry import Registry

ColourOrder = Literal["RGB", "BGR"]
Triple = tuple[float, float, float]


def _as_scalar_or_triple(value: object, field: str) -> float | Triple:
    if isinstance(value, (int, float)):
        return float(value)
    numbers = isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value)
    if numbers and len(value) == 3:  # type: ignore[arg-type]
        return (float(value[0]), float(value[1]), float(value[2]))  # type: ignore[index]
    raise ValueError(f"Preprocessing.{field} must be a number or three numbers, got {value!r}")


def _fmt(value: float | Triple) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}"


@dataclass(frozen=True)
class Preprocessing:
    """How a teacher turns ``uint8`` RGB faces into its float input.

    ``output = (reorder(images) - mean) / std`` on raw 0..255 values. Per-channel ``mean``/``std`` are given
    in the *model's* channel order, i.e. after the reordering to ``colour_order``.
    """

    colour_order: ColourOrder = "RGB"
    mean: float | Triple = 0.0
    std: float | Triple = 1.0

    def __post_init__(self) -> None:
        if self.colour_order not in ("RGB", "BGR"):
            raise ValueError(f"colour_order must be 'RGB' or 'BGR', got {self.colour_order!r}")
        # Frozen dataclass: normalising lists/ints here keeps equality and hashing well defined.
        object.__setattr__(self, "mean", _as_scalar_or_triple(self.mean, "mean"))
        std = _as_scalar_or_triple(self.std, "std")
        if any(s == 0 for s in (std if isinstance(std, tuple) else (std,))):
            raise ValueError("Preprocessing.std must not contain zeros")
        object.__setattr__(self, "std", std)

    @classmethod
    def coerce(cls, value: Preprocessing | Mapping[str, object] | tuple | list) -> Preprocessing:
        """Accept a Preprocessing, a config mapping, or ``(colour_order, mean, std)``."""
        if isinstance(value, Preprocessing):
            return value
        if isinstance(value, Mapping):
            return cls(**cast(Mapping[str, object], value))  # type: ignore[arg-type]
        if isinstance(value, (tuple, list)) and len(value) == 3:
            return cls(value[0], value[1], value[2])
        raise TypeError(f"cannot build a Preprocessing from {value!r}")

    def apply(self, images_uint8_rgb: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,H,W]`` RGB -> contiguous ``float32 [B,3,H,W]`` in the model's convention."""
        check_images(images_uint8_rgb)
        x = images_uint8_rgb.to(torch.float32)
        if self.colour_order == "BGR":
            x = x.flip(1)
        x = x - _channel_tensor(self.mean, x)
        x = x / _channel_tensor(self.std, x)
        return x.contiguous()

    def describe(self) -> str:
        """Short, file-name-safe summary, part of every teacher id (changing it invalidates caches)."""
        return f"{self.colour_order}_mean{_fmt(self.mean)}_std{_fmt(self.std)}"


def _channel_tensor(value: float | Triple, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def check_images(images: torch.Tensor, size: tuple[int, int] | None = None, who: str = "teacher") -> None:
    """Reject anything but ``uint8 [B,3,H,W]`` (and, when given, the expected ``(H, W)``)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{who} expects uint8 images (raw 0..255, RGB), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} expects images shaped [B,3,H,W], got {list(images.shape)}")
    if size is not None and tuple(images.shape[2:]) != tuple(size):
        h, w = size
        raise ValueError(
            f"{who} takes {h}x{w} faces but got {images.shape[2]}x{images.shape[3]}; "
            f"align/resize the faces to {h}x{w} first"
        )


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def make_teacher_id(model_name: str, weights_sha256: str, preprocessing: Preprocessing) -> str:
    """``<model>-<sha256[:16] of the weights file>-<preprocessing>``: stable across machines and paths."""
    return f"{model_name}-{weights_sha256[:16]}-{preprocessing.describe()}"


class Teacher(ABC):
    """A frozen embedding model that distillation queries.

    Subclasses set ``teacher_id``, ``embedding_size`` and ``preprocessing`` in ``__init__``.
    """

    teacher_id: str
    embedding_size: int
    preprocessing: Preprocessing

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,H,W]`` RGB -> raw (not L2-normalised) ``float32 [B, embedding_size]`` on CPU."""

    def class_centres(self) -> torch.Tensor | None:
        """``[C, embedding_size]`` margin-head weights when the teacher has them, else ``None``."""
        return None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.teacher_id!r}, d={self.embedding_size})"


# Defined next to Teacher (not in the package __init__) so implementation modules can register into it
# without importing the half-initialised package; facedistill.teachers re-exports it.
TEACHERS: Registry[Teacher] = Registry[Teacher]("teacher")
