"""TorchTeacher: facedistill and arcface_torch checkpoints, margin-head centres and PartialFC shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from facedistill.teachers import (
    TorchTeacher,
    create_teacher,
    load_head_centres,
    merge_partial_fc_shards,
)

EMBEDDING = 8


class StandIn(nn.Module):
    """Small, with BatchNorm, so a teacher left in train mode would give batch-dependent embeddings."""

    def __init__(self, embedding_size: int = EMBEDDING) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def trained_stand_in(seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    model = StandIn()
    # Non-trivial running statistics, so eval mode and train mode disagree.
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def faces(n: int = 5, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def run_directly(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()((images.float() - 127.5) / 127.5)


def test_facedistill_checkpoint_with_head(tmp_path: Path) -> None:
    model = trained_stand_in()
    centres = torch.randn(11, EMBEDDING)
    path = tmp_path / "student.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": {"name": "standin", "embedding_size": EMBEDDING}},
            "head": {"weight": centres},
            "epoch": 3,
        },
        path,
    )
    teacher = TorchTeacher(path, model=StandIn())
    images = faces()
    got = teacher.embed(images)
    assert got.dtype == torch.float32 and got.shape == (5, EMBEDDING) and got.device.type == "cpu"
    assert torch.allclose(got, run_directly(model, images), atol=1e-6)
    # Batch composition must not matter (eval mode, no batch statistics).
    assert torch.allclose(teacher.embed(images[:1]), got[:1], atol=1e-6)
    assert not teacher.model.training

    assert teacher.embedding_size == EMBEDDING
    assert torch.equal(teacher.class_centres(), centres)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert teacher.teacher_id == f"standin-{digest[:16]}-RGB_mean127.5_std127.5"


def test_facedistill_checkpoint_through_create_model(tmp_path: Path) -> None:
    models = pytest.importorskip("facedistill.models")
    if not hasattr(models, "create_model"):
        pytest.skip("facedistill.models.create_model is not available yet")
    torch.manual_seed(0)
    model = models.create_model("mobilefacenet", embedding_size=32).eval()
    path = tmp_path / "mbf.pt"
    config = {"model": {"name": "mobilefacenet", "embedding_size": 32}}
    torch.save({"model": model.state_dict(), "config": config}, path)

    teacher = create_teacher(str(path), batch_size=2)
    assert isinstance(teacher, TorchTeacher)
    images = faces(3, size=112)
    assert torch.allclose(teacher.embed(images), run_directly(model, images), atol=1e-5)
    assert teacher.class_centres() is None
    assert teacher.teacher_id.startswith("mobilefacenet-")


def test_bare_state_dict_needs_arch(tmp_path: Path) -> None:
    model = trained_stand_in()
    path = tmp_path / "backbone.pth"
    # arcface_torch saves DistributedDataParallel-free keys, but some copies keep "module."
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)

    with pytest.raises(ValueError, match="bare state_dict.*pass arch="):
        TorchTeacher(path)
    with pytest.raises(ValueError, match="bare state_dict.*pass arch="):
        create_teacher(str(path))

    teacher = TorchTeacher(path, model=StandIn(), arch="standin")
    images = faces(4, seed=1)
    assert torch.allclose(teacher.embed(images), run_directly(model, images), atol=1e-6)


def test_mismatched_weights_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(StandIn(embedding_size=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight"):
        TorchTeacher(path, model=StandIn(), arch="standin")


def test_checkpoints_are_loaded_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": trained_stand_in()}, path)  # a whole module: needs unpickling code objects
    with pytest.raises(ValueError, match="weights_only"):
        TorchTeacher(path, model=StandIn())


def shard_blocks(world_size: int, classes: int = 37) -> list[torch.Tensor]:
    """Split like arcface_torch: rank r owns classes // ws + (r < classes % ws) contiguous centres."""
    torch.manual_seed(1)
    full = torch.randn(classes, EMBEDDING)
    sizes = [classes // world_size + int(rank < classes % world_size) for rank in range(world_size)]
    return list(torch.split(full, sizes))


def test_partial_fc_shards_merge_in_numeric_rank_order(tmp_path: Path) -> None:
    blocks = shard_blocks(12)  # ranks 10 and 11 sort before 2 as text
    for rank, block in enumerate(blocks):
        torch.save({"weight": block}, tmp_path / f"softmax_fc_gpu_{rank}.pt")
    expected = torch.cat(blocks)

    paths = sorted(tmp_path.glob("softmax_fc_gpu_*.pt"))  # lexicographic on purpose
    assert torch.equal(merge_partial_fc_shards(paths), expected)
    assert torch.equal(load_head_centres(tmp_path), expected)
    # One shard stands for the whole set: a single rank holds only a slice of the classes.
    assert torch.equal(load_head_centres(tmp_path / "softmax_fc_gpu_3.pt"), expected)

    (tmp_path / "softmax_fc_gpu_5.pt").unlink()
    with pytest.raises(ValueError, match=r"lack rank\(s\) \[5\]"):
        load_head_centres(tmp_path)


def test_other_arcface_torch_head_formats(tmp_path: Path) -> None:
    blocks = shard_blocks(3)
    expected = torch.cat(blocks)

    old = tmp_path / "old"
    old.mkdir()
    for rank, block in enumerate(blocks):
        torch.save(block, old / f"rank_{rank}_softmax_weight.pt")  # 2021 PartialFC.save_params
        torch.save(torch.zeros_like(block), old / f"rank_{rank}_softmax_weight_mom.pt")  # momentum: ignored
    assert torch.equal(load_head_centres(old), expected)

    resume = tmp_path / "resume"
    resume.mkdir()
    for rank, block in enumerate(blocks):
        state = {"epoch": 2, "state_dict_softmax_fc": {"weight": block}, "state_dict_backbone": {}}
        torch.save(state, resume / f"checkpoint_gpu_{rank}.pt")  # train_v2.py resume files
    assert torch.equal(load_head_centres(resume), expected)

    single = tmp_path / "head.pt"
    torch.save({"weight_activated": expected}, single)
    assert torch.equal(load_head_centres(single), expected)

    with pytest.raises(ValueError, match="mix naming schemes"):
        merge_partial_fc_shards([old / "rank_0_softmax_weight.pt", resume / "checkpoint_gpu_1.pt"])


def test_head_checkpoint_gives_class_centres(tmp_path: Path) -> None:
    model = trained_stand_in()
    backbone = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), backbone)
    blocks = shard_blocks(2)
    for rank, block in enumerate(blocks):
        torch.save({"weight": block}, tmp_path / f"softmax_fc_gpu_{rank}.pt")

    teacher = TorchTeacher(backbone, arch="standin", model=StandIn(), head_checkpoint=tmp_path)
    assert torch.equal(teacher.class_centres(), torch.cat(blocks))

    wrong = tmp_path / "wrong_head.pt"
    torch.save({"weight": torch.randn(5, EMBEDDING + 1)}, wrong)
    with pytest.raises(ValueError, match="head centres"):
        TorchTeacher(backbone, arch="standin", model=StandIn(), head_checkpoint=wrong)
