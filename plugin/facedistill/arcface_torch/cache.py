"""``facedistill arcface-torch cache-teacher CONFIG``: the teacher embedding of every record of a recipe's data.

The recipe is loaded through the framework's own (patched) ``get_config``, from the checkout the run starts in,
so relative paths in it (``config.rec``, ``config.teacher_cache``) mean what they mean to ``train_v2.py``. Under
torchrun every process embeds its share of the records into the same memory-mapped cache (rows are written in
chunks that any number of processes can later finish), then all wait for each other and rank 0 checks the whole.

The processes need no collective but that one wait, and it comes after hours of work that ends at different times on
different ranks (equal shares of rows, not of time: a resumed cache, a slower GPU or disk). So they meet in a gloo
group on the CPU, which NCCL's watchdog (10 minutes by default, then the job is aborted) does not watch, for as
long as ``wait`` (``--wait-hours``); a rank that dies still ends the wait at once (gloo sees the closed connection,
and torchrun stops the others). Each process embeds on GPU ``LOCAL_RANK``, bound before any group exists.

On a host without a GPU the processes share one set of cores, and one process embedding with all of them is the
faster way: 38 img/s against 33 img/s for two processes with one half each (SFace, 892 records, 2-core AVX-512
EPYC, three interleaved rounds of ``benchmarks/teacher_cache_speed.py --cache-nproc 1 2``). There rank 0 embeds
every record with every core and the other ranks only wait, so a CPU user can keep the ``--nproc_per_node`` of
their training command.

Before any image is embedded, the recipe is checked as training will check it (``recipe.check_training_set``,
``head.check_teacher``): class and image counts against ``config.rec``, the teacher's embedding size, its head's
shard files and class count, and ``config.teacher_subtract_mean`` against the centres it would centre. A cache
that training would refuse is never built.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from facedistill.arcface_torch.data import open_framework_dataset
from facedistill.arcface_torch.head import check_teacher
from facedistill.arcface_torch.recipe import (
    CACHE_COMMAND,
    RecipeError,
    check_training_set,
    method_name,
    teacher_cache_dir,
)
from facedistill.arcface_torch.teacher import create_recipe_teacher
from facedistill.teachers.cache import TeacherCache, build_teacher_cache
from facedistill.train.distributed import rank_device

# How long a rank that finished its share waits for the slowest one: long enough for shares that end hours apart.
DEFAULT_WAIT = datetime.timedelta(hours=24)


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


def join_ranks(wait: datetime.timedelta) -> tuple[dist.ProcessGroup | None, bool]:
    """The group the ranks meet in after their shares (None: the default group) and whether this call created the
    default group (and so destroys it). Always gloo: the meeting is a CPU barrier that waits up to ``wait``. A
    default group someone else made (NCCL, or gloo with its own timeout) is kept, and a gloo group made beside it,
    now, while every rank is here to make it with."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=wait)
        return None, True
    return dist.new_group(backend="gloo", timeout=wait), False


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` (a torch teacher's), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_recipe_teacher(
    config: str,
    root: str | Path = ".",
    batch_size: int = 64,
    workers: int = 2,
    overwrite: bool = False,
    wait: datetime.timedelta = DEFAULT_WAIT,
) -> str:
    """Embed the recipe's records with its teacher (this rank's share under torchrun); ``wait`` is how long a rank
    that has finished waits for the others."""
    if wait <= datetime.timedelta(0):
        raise ValueError(f"the wait for the other ranks must be positive, got {wait}")
    cfg = load_recipe(config, root)
    if method_name(cfg) is None or not cfg.get("teacher"):
        raise RecipeError(f"{config} sets no facedistill method with a teacher (config.loss, config.teacher)")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # GPU LOCAL_RANK, bound before any group exists, or the CPU where there is no GPU.
    host = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = str(rank_device(host, int(os.environ.get("LOCAL_RANK", 0))))
    # Every rank refuses a recipe that training would refuse before any group exists, and so before it embeds.
    dataset = open_framework_dataset(cfg.rec)
    check_training_set(cfg, dataset)
    # On GPUs every rank embeds its share on its own GPU; on a CPU host rank 0 embeds everything with every core.
    embedders = world_size if host.type == "cuda" else 1
    every_core = (os.cpu_count() or 1) if embedders < world_size and rank == 0 else None
    with torch_threads(every_core) if every_core else contextlib.nullcontext():
        teacher = create_recipe_teacher(cfg, device=device, threads=every_core)
        check_teacher(cfg, teacher.embedding_size, rank, world_size, read_head=True)
        group, owns_group = join_ranks(wait) if world_size > 1 else (None, False)
        directory = teacher_cache_dir(cfg)
        if rank < embedders:
            build_teacher_cache(
                teacher,
                dataset,
                directory,
                batch_size,
                workers,
                overwrite,
                progress=rank == 0,
                rank=rank,
                world_size=embedders,
                command=CACHE_COMMAND,
            )
    if world_size > 1:
        dist.barrier(group=group)
    cache = TeacherCache(directory, CACHE_COMMAND)
    cache.check(dataset, teacher.teacher_id)
    if owns_group:
        dist.destroy_process_group()
    elif group is not None:
        dist.destroy_process_group(group)
    return f"cached {cache.num_images} records x 2 views of {cache.teacher_id} in {directory}"
