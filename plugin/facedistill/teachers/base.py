"""What every teacher promises: embeddings for batches of aligned faces, with its own preprocessing.

Faces travel through facedistill as ``uint8`` tensors ``[B, 3, H, W]`` in RGB order. Teachers were trained
with very different input conventions (channel order, mean, scale), so each teacher declares its own
:class:`Preprocessing` and applies it itself; callers never normalise images for a teacher.

An ONNX teacher's preprocessing comes from its file when facedistill exported it, else from keys the user sets in a
front end (command line, YAML config, arcface_torch recipe): :class:`PreprocessingKeys` is how each front end spells
them, so that a refusal names the keys the user can edit.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from facedistill.registry import Registry

ColourOrder = Literal["RGB", "BGR"]
Triple = tuple[float, float, float]


def _is_number(value: object) -> bool:
    # A YAML or Python ``True`` is an int, but no one means a mean of 1 by it.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_scalar_or_triple(value: object, field: str) -> float | Triple:
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    numbers = isinstance(value, (tuple, list)) and all(_is_number(v) for v in value)
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


PREPROCESSING_FIELDS = ("colour_order", "mean", "std")


class PreprocessingError(ValueError):
    """A teacher's preprocessing is missing, malformed, given for a teacher that has its own, or contradicts what
    its model says; the one-line message names the keys to set or leave out."""


@dataclass(frozen=True)
class PreprocessingKeys:
    """How a front end spells the three preprocessing keys, so that a refusal names the ones the user can edit."""

    colour_order: str = "preprocessing.colour_order"
    mean: str = "preprocessing.mean"
    std: str = "preprocessing.std"

    def of(self, field: str) -> str:
        return str(getattr(self, field))

    def listed(self, fields: Sequence[str]) -> str:
        """``"a"``, ``"a and b"``, ``"a, b and c"``: the keys of ``fields``."""
        names = [self.of(field) for field in fields]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# The Python API's (``OnnxTeacher(path, preprocessing=...)``), the command line's flags (the commands that take
# --teacher) and the YAML config's teacher section; an arcface_torch recipe's keys are its own
# (facedistill.arcface_torch.recipe.RECIPE_PREPROCESSING_KEYS).
PYTHON_PREPROCESSING_KEYS = PreprocessingKeys()
CLI_PREPROCESSING_KEYS = PreprocessingKeys("--teacher-colour-order", "--teacher-mean", "--teacher-std")
CONFIG_PREPROCESSING_KEYS = PreprocessingKeys("teacher.colour_order", "teacher.mean", "teacher.std")


def given_preprocessing(
    value: Preprocessing | Mapping[str, object] | tuple | list | None,
    keys: PreprocessingKeys = PYTHON_PREPROCESSING_KEYS,
) -> dict[str, object]:
    """The preprocessing fields a caller gave, each checked on its own and normalised (numbers to floats or three
    floats): a :class:`Preprocessing` or ``(colour_order, mean, std)`` gives all three, a mapping those of its keys
    that are not None. Whether they are enough is the model's to say (:func:`resolve_preprocessing`)."""
    if value is None:
        return {}
    if isinstance(value, Preprocessing):
        return {field: getattr(value, field) for field in PREPROCESSING_FIELDS}
    if isinstance(value, (tuple, list)):
        if len(value) != 3:
            raise PreprocessingError(f"preprocessing must be (colour_order, mean, std), got {value!r}")
        value = dict(zip(PREPROCESSING_FIELDS, value, strict=True))
    if not isinstance(value, Mapping):
        raise TypeError(f"cannot build a Preprocessing from {value!r}")
    unknown = sorted(str(key) for key in set(value) - set(PREPROCESSING_FIELDS))
    if unknown:
        raise PreprocessingError(f"unknown preprocessing key {unknown[0]!r}; known: {', '.join(PREPROCESSING_FIELDS)}")
    checked: dict[str, object] = {}
    for field in PREPROCESSING_FIELDS:
        given = value.get(field)
        if given is None:
            continue
        key = keys.of(field)
        if field == "colour_order":
            if given not in ("RGB", "BGR"):
                raise PreprocessingError(f"{key} must be RGB or BGR, got {given!r}")
            checked[field] = given
            continue
        try:
            number = _as_scalar_or_triple(given, field)
        except ValueError:
            raise PreprocessingError(f"{key} must be a number or three numbers, got {given!r}") from None
        if field == "std" and 0.0 in (number if isinstance(number, tuple) else (number,)):
            raise PreprocessingError(f"{key} must not be zero, got {given!r}")
        checked[field] = number
    return checked


def same_preprocessing_value(a: object, b: object) -> bool:
    """Whether two values of one field mean the same: a number equals three equal numbers (floats compared to
    1e-6, as a value read back from text may have been rounded)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    first = a if isinstance(a, tuple) else (a, a, a)
    second = b if isinstance(b, tuple) else (b, b, b)
    return all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(first, second, strict=True))


def format_preprocessing_value(value: object) -> str:
    """A field's value as messages show it (``BGR``, ``127.5``, ``0.5,0.5,0.5``)."""
    return value if isinstance(value, str) else _fmt(value)  # type: ignore[arg-type]


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
