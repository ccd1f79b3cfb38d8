"""Small shared builders for tests (generated data, a deterministic stand-in teacher)."""

from __future__ import annotations

import datetime
import gc
import json
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facedistill.data.synthetic import write_identity_folders, write_pairs_tsv
from facedistill.teachers.base import Preprocessing, Teacher
from tests.multiprocess import spawn_world


class ProjectionTeacher(Teacher):
    """A fixed random projection of downsampled pixels: deterministic, cheap, and sensitive to mirroring."""

    def __init__(self, embedding_size: int = 16, seed: int = 0, fail_after_batches: int | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3 * 8 * 8, embedding_size, generator=generator)
        self.embedding_size = embedding_size
        self.preprocessing = Preprocessing("RGB", 127.5, 127.5)
        self.teacher_id = f"projection-{embedding_size}-{seed}"
        self.fail_after_batches = fail_after_batches
        self.calls = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after_batches is not None and self.calls >= self.fail_after_batches:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        x = F.adaptive_avg_pool2d(self.preprocessing.apply(images), 8).flatten(1)
        return x @ self.projection

    def class_centres(self) -> torch.Tensor | None:
        return None


def make_face_folders(root: Path, identities: int = 6, images: int = 6, test_identities: int = 6) -> tuple[Path, Path]:
    train = write_identity_folders(root / "train", identities, images)
    test = write_identity_folders(root / "test", test_identities, 4, first_identity=1000)
    pairs = write_pairs_tsv(test, root / "pairs.tsv", pairs_per_fold=3)
    return train, pairs


def gloo_world(
    rank_results: Callable[[int], dict], world_size: int, out_dir: Path, timeout_s: float = 180
) -> list[dict]:
    """Run ``rank_results(rank)`` (a module-level function) in a spawned gloo world of ``world_size`` CPU processes
    (``tests.multiprocess.spawn_world``: a held store, stacks on a timeout); return each rank's dict, failing with
    every rank's traceback if one raised."""
    spawn_world(_gloo_rank, (rank_results, str(out_dir)), world_size, out_dir, timeout_s)
    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    errors = [result["error"] for result in results if "error" in result]
    assert not errors, "\n".join(errors)
    return results


def _gloo_rank(rank: int, ports: list[int], rank_results: Callable[[int], dict], out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        results = rank_results(rank)
    except Exception:  # reported by the test, with the rank's traceback
        results = {"error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    # DDP's reducer and sharded heads hold the process group; gloo aborts the process ("terminate called without an
    # active exception") when they outlive it, so they are gone (rank_results returned) before it is destroyed.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
