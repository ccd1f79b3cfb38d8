"""``facedistill arcface-torch cache-teacher CONFIG``: the teacher embedding of every record of a recipe's data.

The recipe is loaded through the framework's own (patched) ``get_config``, from the checkout the run starts in,
so relative paths in it (``config.rec``, ``config.teacher_cache``) mean what they mean to ``train_v2.py``. Under
torchrun every process embeds its share of the records into the same memory-mapped cache (rows are written in
chunks that any number of processes can later finish), then all wait for each other and rank 0 checks the whole.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from facedistill.arcface_torch.data import open_framework_dataset
from facedistill.arcface_torch.hooks import backend
from facedistill.arcface_torch.recipe import CACHE_COMMAND, RecipeError, method_name, teacher_cache_dir
from facedistill.arcface_torch.teacher import create_recipe_teacher
from facedistill.teachers.cache import TeacherCache, build_teacher_cache


def load_recipe(config: str, root: str | Path = ".") -> Any:
    """The recipe as ``train_v2.py`` sees it: the framework's ``get_config``, run in the patched checkout ``root``
    (which becomes the working directory, as it is for ``train_v2.py``)."""
    from facedistill.arcface_torch.patching import FileState, resolve_root, status

    checkout = resolve_root(root)
    unpatched = [path for path, state in status(checkout).items() if state is not FileState.PATCHED]
    if unpatched:
        raise RecipeError(
            f"{checkout} is not patched ({', '.join(unpatched)}); run `facedistill arcface-torch patch {checkout}`"
        )
    os.chdir(checkout)
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module("utils.utils_config").get_config(config)


def cache_recipe_teacher(
    config: str, root: str | Path = ".", batch_size: int = 64, workers: int = 2, overwrite: bool = False
) -> str:
    cfg = load_recipe(config, root)
    if method_name(cfg) is None or not cfg.get("teacher"):
        raise RecipeError(f"{config} sets no facedistill method with a teacher (config.loss, config.teacher)")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend())
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    teacher = create_recipe_teacher(cfg, device=device)
    dataset = open_framework_dataset(cfg.rec)
    directory = teacher_cache_dir(cfg)
    build_teacher_cache(
        teacher,
        dataset,
        directory,
        batch_size,
        workers,
        overwrite,
        progress=rank == 0,
        rank=rank,
        world_size=world_size,
        command=CACHE_COMMAND,
    )
    if world_size > 1:
        dist.barrier()
    cache = TeacherCache(directory, CACHE_COMMAND)
    cache.check(dataset, teacher.teacher_id)
    if world_size > 1:
        dist.destroy_process_group()
    return f"cached {cache.num_images} records x 2 views of {cache.teacher_id} in {directory}"
