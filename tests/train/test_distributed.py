"""The training loop on two gloo processes against the same loop on one process with the same global batch.

Every two-process run of this module happens in one spawned world (starting interpreters costs seconds on a small
machine): each rank runs the jobs in order, each ``train()`` joining a fresh process group from torchrun's
environment variables as under ``torchrun``. The one-process references run here, in the test process.

The backbone is a tiny convolutional net without BatchNorm: PyTorch has no SyncBatchNorm on CPUs, so a BatchNorm
backbone on two CPU processes normalises with per-process statistics and cannot equal one process. The
``torchrun`` test at the end runs the real MobileFaceNet through the command line.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facedistill.config import load_config
from facedistill.data.datasets import ImageFolderDataset
from facedistill.heads.partial_fc import FrozenPartialFC
from facedistill.heads.sharded import ShardedMarginHead
from facedistill.models.registry import BACKBONES
from facedistill.teachers.cache import build_teacher_cache
from facedistill.train.checkpoint import load_checkpoint
from facedistill.train.loop import train
from tests.helpers import ProjectionTeacher, make_face_folders
from tests.multiprocess import spawn_world

WORLD = 2
STEPS, RESUME_AT = 6, 3  # 5 steps per epoch: the runs cross an epoch boundary
JOIN_TIMEOUT_S = 240.0  # two fresh interpreters importing torch on a loaded 2-core machine, then four short runs
TOL = {"atol": 1e-6, "rtol": 1e-5}
TINY = "tiny-test"


class TinyNet(nn.Module):
    """A few thousand weights, no batch statistics: each image's embedding depends on that image alone."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8 * 7 * 7, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 16)
        return self.fc(self.act(self.conv(x)).flatten(1))


if TINY not in BACKBONES:  # the spawned ranks import this module too
    BACKBONES.register(TINY)(TinyNet)


def _settings(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train={data['train']}",
        "data.batch_size=4",
        "data.num_workers=0",
        f"model.name={TINY}",
        "model.embedding_size=16",
        f"run.output_dir={run_dir}",
        "train.log_every=1",
        "train.amp=none",
        "train.channels_last=false",
        "train.export_onnx=false",
        "schedule.warmup_epochs=0",
        "optim.lr=0.1",
        f"train.max_steps={STEPS}",
        *extra,
    ]


def _md(data: dict[str, Path], run_dir: Path) -> list[str]:
    """MarginDistillation with the per-batch normaliser (a max over the global batch) and the per-image embedding
    term (a mean over each rank's rows), validation on rank 0 and a best-validation checkpoint."""
    return _settings(
        data,
        run_dir,
        "method.name=margin_distillation",
        "method.scale=16.0",
        "method.normaliser=batch",
        "method.embedding_weight=0.5",
        f"teacher.cache={data['cache']}",
        f"data.val_pairs={data['pairs']}",
        "train.select=best_val",
        "train.grad_clip=1.0",
    )


def _arcface(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """Learnable centres with SGD momentum (sharded optimiser state) and a clip that binds on most steps."""
    return _settings(data, run_dir, "method.name=arcface", "method.scale=16.0", "train.grad_clip=0.5", *extra)


def _constant(data: dict[str, Path], run_dir: Path, steps: int) -> list[str]:
    # A constant rate: a run of `steps` steps is the first `steps` steps of a longer one.
    return _arcface(data, run_dir, "schedule.name=constant", f"train.max_steps={steps}")


# --------------------------------------------------------------------------------------------------------------------
# The two-process world.


Job = tuple[str, list[str], bool, int]  # name, config overrides, resume, the step it must end at


def _holders_of_the_group() -> list[str]:
    """The live objects that hold the process group (DDP's reducer, sharded heads): none may outlive it."""
    kinds = (nn.parallel.DistributedDataParallel, ShardedMarginHead, FrozenPartialFC)
    return sorted(type(o).__name__ for o in gc.get_objects() if issubclass(type(o), kinds))


def _worker(rank: int, ports: list[int], jobs: list[Job], out_dir: str) -> None:
    torch.set_num_threads(1)
    results: dict[str, str] = {}
    destroy = dist.destroy_process_group

    def destroy_checking_holders(*args: object, **kwargs: object) -> None:
        # Unreachable holders in reference cycles count too: gc.get_objects lists them until they are collected.
        if holders := _holders_of_the_group():
            raise AssertionError(f"the process group is destroyed while {holders} still hold it")
        destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_checking_holders
    # Holders in reference cycles outlive their run until a collection: with none automatic, only the ones train()
    # makes itself free them, so the check above does not pass by the luck of an automatic collection's timing.
    gc.disable()
    for (name, settings, resume, steps), port in zip(jobs, ports, strict=True):
        # Each train() makes and destroys its own process group, so each meets at a store of its own.
        os.environ["MASTER_PORT"] = str(port)
        try:
            summary = train(load_config(None, settings), resume=resume, progress=False)
            results[name] = "" if summary.steps == steps else f"ended at step {summary.steps}, not {steps}"
        except Exception:
            results[name] = traceback.format_exc()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if results[name]:
            # Exit non-zero: the harness then stops the other rank, which waits in a collective of this job.
            raise RuntimeError(f"job {name} failed on rank {rank}")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faces")
    # 5 identities: the centres split unevenly over two ranks (3 + 2); 20 images, 5 batches of 4 per epoch.
    train_dir, pairs = make_face_folders(root, identities=5, images=4, test_identities=4)
    cache = root / "cache"
    build_teacher_cache(ProjectionTeacher(), ImageFolderDataset(train_dir), cache, num_workers=0, progress=False)
    return {"train": train_dir, "pairs": pairs, "cache": cache, "root": root}


@pytest.fixture(scope="module")
def two_processes(data: dict[str, Path]) -> Iterator[dict[str, Path]]:
    root = data["root"]
    runs = {name: root / name for name in ("md2", "arc2", "arc2_k", "arc1_k_to_2")}
    # 1 -> 2: a one-process run of RESUME_AT steps, which the world resumes to STEPS.
    train(load_config(None, _constant(data, runs["arc1_k_to_2"], RESUME_AT)), progress=False)
    jobs: list[Job] = [
        ("md", _md(data, runs["md2"]), False, STEPS),
        ("arcface", _arcface(data, runs["arc2"]), False, STEPS),
        ("arcface-k", _constant(data, runs["arc2_k"], RESUME_AT), False, RESUME_AT),
        ("resume-1-to-2", _constant(data, runs["arc1_k_to_2"], STEPS), True, STEPS),
    ]
    out_dir = root / "world"
    failure = ""
    try:
        spawn_world(_worker, (jobs, str(out_dir)), WORLD, out_dir, JOIN_TIMEOUT_S, stores=len(jobs))
    except pytest.fail.Exception as error:
        failure = str(error)
    per_rank = [_read_json(out_dir / f"rank{r}.json") for r in range(WORLD)]
    errors = {f"{name} (rank {r})": error for r in range(WORLD) for name, error in per_rank[r].items() if error}
    assert not failure and not errors, "\n".join([failure, *(f"{key}:\n{error}" for key, error in errors.items())])
    yield runs


def _read_json(path: Path) -> dict[str, str]:
    return json.loads(path.read_text()) if path.exists() else {}


def _losses(run_dir: Path) -> torch.Tensor:
    with open(run_dir / "train.csv") as handle:
        return torch.tensor([float(row["loss"]) for row in csv.DictReader(handle)], dtype=torch.float64)


def _assert_same_checkpoint(mine: Path, reference: Path) -> None:
    got, expected = load_checkpoint(mine), load_checkpoint(reference)
    assert got["step"] == expected["step"]
    for part in ("model", "method"):
        assert got[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            torch.testing.assert_close(got[part][key], value, **TOL, msg=lambda m, k=f"{part}.{key}": f"{k}: {m}")
    torch.testing.assert_close(got["head"]["weight"], expected["head"]["weight"], **TOL)
    expected_state, got_state = expected["optimizer"]["state"], got["optimizer"]["state"]
    assert got_state.keys() == expected_state.keys()
    for key, values in expected_state.items():
        for name, value in values.items():
            torch.testing.assert_close(got_state[key][name], value, **TOL, msg=lambda m, k=f"{key}.{name}": f"{k}: {m}")
    assert got["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    assert got["scheduler"] == expected["scheduler"]


def test_margin_distillation_on_two_processes_equals_one(two_processes: dict, data: dict, tmp_path: Path) -> None:
    reference = tmp_path / "md1"
    train(load_config(None, _md(data, reference)), progress=False)
    run = two_processes["md2"]
    torch.testing.assert_close(_losses(run), _losses(reference), **TOL)
    _assert_same_checkpoint(run / "last.pt", reference / "last.pt")
    _assert_same_checkpoint(run / "best.pt", reference / "best.pt")
    # Rank 0 alone logs, validates and reports.
    assert len((run / "train.csv").read_text().splitlines()) == STEPS + 1
    assert len((run / "val.csv").read_text().splitlines()) == len((reference / "val.csv").read_text().splitlines())
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == STEPS and results["selected"] == "best.pt"


def test_arcface_sharded_centres_and_momentum_equal_one_process(
    two_processes: dict, data: dict, tmp_path: Path
) -> None:
    reference = tmp_path / "arc1"
    train(load_config(None, _arcface(data, reference)), progress=False)
    run = two_processes["arc2"]
    torch.testing.assert_close(_losses(run), _losses(reference), **TOL)
    _assert_same_checkpoint(run / "last.pt", reference / "last.pt")
    # The checkpoint holds the whole head and its whole momentum, not rank 0's shard.
    state = load_checkpoint(run / "last.pt")
    assert state["method"]["head.weight"].shape == (5, 16)
    assert any(v["momentum_buffer"].shape == (5, 16) for v in state["optimizer"]["state"].values())


def test_resume_across_world_sizes(two_processes: dict, data: dict, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    train(load_config(None, _constant(data, reference, STEPS)), progress=False)
    # 2 -> 1: the world's RESUME_AT-step checkpoint, resumed here on one process.
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(two_processes["arc2_k"], two_to_one)
    assert load_checkpoint(two_to_one / "last.pt")["step"] == RESUME_AT
    train(load_config(None, _constant(data, two_to_one, STEPS)), resume=True, progress=False)
    _assert_same_checkpoint(two_to_one / "last.pt", reference / "last.pt")
    # 1 -> 2: resumed by the world from this process's RESUME_AT-step checkpoint.
    _assert_same_checkpoint(two_processes["arc1_k_to_2"] / "last.pt", reference / "last.pt")


def test_torchrun_distill_command(data: dict, tmp_path: Path) -> None:
    """The command line under torchrun, with MobileFaceNet: one summary, one log, a whole checkpoint."""
    run_dir = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command += ["-m", "facedistill.cli", "distill", "--data", str(data["train"]), "--cache", str(data["cache"])]
    command += ["--output", str(run_dir)]
    for setting in [
        "model.embedding_size=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.log_every=1",
        "train.amp=none",
        "train.channels_last=false",
        "train.export_onnx=false",
        "method.scale=16.0",
    ]:
        command += ["--set", setting]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count('"run_dir"') == 1, done.stdout
    assert json.loads(done.stdout[done.stdout.index("{") :])["steps"] == 2
    assert len((run_dir / "train.csv").read_text().splitlines()) == 3
    state = load_checkpoint(run_dir / "last.pt")
    assert state["step"] == 2 and state["method"]["head.weight"].shape == (5, 16)
    assert not any(key.startswith("module.") for key in state["model"])
