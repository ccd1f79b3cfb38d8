"""Teachers: frozen embedding models that students are distilled from, looked up by name in TEACHERS."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Imported for their registration side effect.
from facedistill.teachers import onnx_teacher, torch_teacher  # noqa: F401
from facedistill.teachers.base import (
    CLI_PREPROCESSING_KEYS,
    CONFIG_PREPROCESSING_KEYS,
    PREPROCESSING_FIELDS,
    TEACHERS,
    Preprocessing,
    PreprocessingError,
    PreprocessingKeys,
    Teacher,
    make_teacher_id,
    sha256_file,
)
from facedistill.teachers.onnx_teacher import OnnxTeacher, SFaceTeacher
from facedistill.teachers.torch_teacher import TorchTeacher, load_head_centres, merge_partial_fc_shards

__all__ = [
    "CLI_PREPROCESSING_KEYS",
    "CONFIG_PREPROCESSING_KEYS",
    "TEACHERS",
    "OnnxTeacher",
    "Preprocessing",
    "PreprocessingError",
    "PreprocessingKeys",
    "SFaceTeacher",
    "Teacher",
    "TorchTeacher",
    "create_teacher",
    "is_onnx_spec",
    "load_head_centres",
    "make_teacher_id",
    "merge_partial_fc_shards",
    "sha256_file",
]

_TORCH_SUFFIXES = (".pth", ".pt")


def is_onnx_spec(spec: str) -> bool:
    """Whether ``spec`` names an ONNX model of the caller's (``"onnx"`` with a path, or an ``.onnx`` file): the
    teachers whose preprocessing the caller may have to give. A registered teacher (``sface``) brings its own."""
    return spec == "onnx" or (spec not in TEACHERS and Path(spec).suffix.lower() == ".onnx")


def create_teacher(
    spec: str,
    preprocessing: Preprocessing | Mapping[str, object] | tuple | None = None,
    preprocessing_keys: PreprocessingKeys | None = None,
    **kwargs: Any,
) -> Teacher:
    """Build a teacher from a short spec.

    ``spec`` is a registered name (``"sface"``, or ``"onnx"``/``"torch"`` with their path keyword), a path
    ending in ``.onnx`` (``OnnxTeacher``), or a path ending in ``.pth``/``.pt`` (``TorchTeacher``; pass ``arch=``
    for a bare state_dict). ``kwargs`` go to the teacher's constructor.

    ``preprocessing`` is an ONNX model's input convention: a :class:`Preprocessing` or a mapping of some of
    ``colour_order``, ``mean``, ``std``. A model ``facedistill export`` wrote says it in its metadata (what is given
    must agree); any other ONNX file needs all three. ``preprocessing_keys`` names the keys as the caller's front end
    spells them; with it, keys given for a teacher that is not an ONNX model of the caller's are refused (they would
    be ignored, or override a teacher's own convention without a word). Without it (the Python API),
    ``preprocessing`` also reaches a ``TorchTeacher``, whose constructor takes one.
    """
    takes_keys = is_onnx_spec(spec)
    if preprocessing_keys is not None and not takes_keys:
        given = _given_fields(preprocessing)
        if given:
            raise PreprocessingError(
                f"{preprocessing_keys.of(given[0])} applies to an .onnx teacher only; {spec!r} has its own "
                "preprocessing: leave it out"
            )
    if takes_keys:
        kwargs["preprocessing"] = preprocessing
        if preprocessing_keys is not None:
            kwargs["preprocessing_keys"] = preprocessing_keys
    elif preprocessing is not None and preprocessing_keys is None:
        kwargs["preprocessing"] = preprocessing
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


def _given_fields(preprocessing: Preprocessing | Mapping[str, object] | tuple | None) -> list[str]:
    """The preprocessing fields a caller set, in the order of ``PREPROCESSING_FIELDS``."""
    if preprocessing is None:
        return []
    if isinstance(preprocessing, Mapping):
        return [field for field in PREPROCESSING_FIELDS if preprocessing.get(field) is not None]
    return list(PREPROCESSING_FIELDS)
