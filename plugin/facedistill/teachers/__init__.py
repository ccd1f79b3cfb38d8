"""Teachers: frozen embedding models that students are distilled from, looked up by name in TEACHERS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Imported for their registration side effect.
from facedistill.teachers import onnx_teacher, torch_teacher  # noqa: F401
from facedistill.teachers.base import TEACHERS, Preprocessing, Teacher, make_teacher_id, sha256_file
from facedistill.teachers.onnx_teacher import OnnxTeacher, SFaceTeacher
from facedistill.teachers.torch_teacher import TorchTeacher, load_head_centres, merge_partial_fc_shards

__all__ = [
    "TEACHERS",
    "OnnxTeacher",
    "Preprocessing",
    "SFaceTeacher",
    "Teacher",
    "TorchTeacher",
    "create_teacher",
    "load_head_centres",
    "make_teacher_id",
    "merge_partial_fc_shards",
    "sha256_file",
]

_TORCH_SUFFIXES = (".pth", ".pt")


def create_teacher(spec: str, **kwargs: Any) -> Teacher:
    """Build a teacher from a short spec.

    ``spec`` is a registered name (``"sface"``, or ``"onnx"``/``"torch"`` with their path keyword), a path
    ending in ``.onnx`` (``OnnxTeacher``; pass ``preprocessing=``), or a path ending in ``.pth``/``.pt``
    (``TorchTeacher``; pass ``arch=`` for a bare state_dict). ``kwargs`` go to the teacher's constructor.
    """
    if spec in TEACHERS:
        return TEACHERS.create(spec, **kwargs)
    suffix = Path(spec).suffix.lower()
    if suffix == ".onnx":
        return TEACHERS.create("onnx", path=spec, **kwargs)
    if suffix in _TORCH_SUFFIXES:
        return TEACHERS.create("torch", checkpoint_path=spec, **kwargs)
    known = ", ".join(TEACHERS.names())
    raise ValueError(
        f"unknown teacher {spec!r}: use a registered name ({known}), a .onnx file or a .pth/.pt checkpoint"
    )
