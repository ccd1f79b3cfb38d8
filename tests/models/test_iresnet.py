"""IResNet: state_dict layout of arcface_torch and checkpoint loading.

Expected keys and counts are derived by hand from deepinsight/insightface,
recognition/arcface_torch/backbones/iresnet.py:

* stem: conv1.weight, bn1.{weight,bias,running_mean,running_var,num_batches_tracked}, prelu.weight -> 7 keys;
* IBasicBlock: bn1 (5), conv1 (1), bn2 (5), prelu (1), conv2 (1), bn3 (5) -> 18 keys; the first block of every
  stage has stride 2, so it also has downsample.0.weight (1) and downsample.1.* (5) -> 24 keys;
* head: bn2 (5), fc.{weight,bias} (2), features (5) -> 12 keys; dropout has none.

Total = 7 + 12 + 4 * 6 + 18 * (number of blocks) = 43 + 18 * N, with N = 8, 16, 24, 49 for r18/34/50/100.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from facedistill.models import BACKBONES, create_model
from facedistill.models.complexity import count_macs, count_parameters, format_count
from facedistill.models.iresnet import (
    IRESNET_LAYERS,
    CheckpointMismatchError,
    IResNet,
    load_arcface_torch_checkpoint,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

LAYERS = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
}
KEY_COUNTS = {"iresnet18": 187, "iresnet34": 331, "iresnet50": 475, "iresnet100": 925}


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (() if name == "num_batches_tracked" else (c,)) for name in BN}


@pytest.fixture(scope="module")
def r18() -> IResNet:
    model = create_model("iresnet18")
    assert isinstance(model, IResNet)
    return model


def test_registered_layer_counts() -> None:
    assert {name: list(v) for name, v in IRESNET_LAYERS.items()} == LAYERS
    for name in LAYERS:
        assert name in BACKBONES


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_key_count_and_stage_depths(name: str) -> None:
    model = create_model(name)
    state = model.state_dict()
    assert len(state) == KEY_COUNTS[name] == 43 + 18 * sum(LAYERS[name])
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == LAYERS[name]
    assert model.embedding_size == 512


def test_r18_stem_head_and_first_block_keys(r18: IResNet) -> None:
    shapes = {k: tuple(v.shape) for k, v in r18.state_dict().items()}
    stem = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    first_block = {
        **_bn("layer1.0.bn1", 64),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        **_bn("layer1.0.bn2", 64),
        "layer1.0.prelu.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        **_bn("layer1.0.bn3", 64),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        **_bn("layer1.0.downsample.1", 64),
    }
    head = {**_bn("bn2", 512), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), **_bn("features", 512)}
    keys = list(shapes)
    assert keys[: len(stem) + len(first_block)] == list(stem) + list(first_block)
    assert keys[-len(head) :] == list(head)
    for expected in (stem, first_block, head):
        assert {k: shapes[k] for k in expected} == expected
    # Second block of a stage: no downsample. First block of stage 2 widens in conv1 and strides in conv2.
    assert "layer1.1.downsample.0.weight" not in shapes
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert r18.layer2[0].conv2.stride == (2, 2) and r18.layer2[0].conv1.stride == (1, 1)


def test_features_gamma_is_frozen_at_one(r18: IResNet) -> None:
    assert not r18.features.weight.requires_grad
    assert torch.equal(r18.features.weight, torch.ones(512))


@pytest.mark.parametrize("embedding_size", [128, 512])
def test_r18_forward_shape(embedding_size: int) -> None:
    model = create_model("iresnet18", embedding_size=embedding_size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, embedding_size)
    assert model.fc.weight.shape == (embedding_size, 25088)


@pytest.mark.parametrize(
    ("name", "params"),
    [("iresnet18", 24_025_600), ("iresnet50", 43_590_848), ("iresnet100", 65_156_160)],
)
def test_params(name: str, params: int) -> None:
    n_params = count_parameters(create_model(name))
    print(f"{name}(512): {n_params} params ({format_count(n_params)})")
    assert n_params == params


def test_r18_macs(r18: IResNet) -> None:
    # Only r18 is run to keep the suite fast; the same counter gives 6_309_330_944 MACs for iresnet50 and
    # 12_089_606_144 for iresnet100, the "12.1" FLOPs arcface_torch's README lists for r100 (its flops.py
    # prints ptflops MACs under the name GFLOPs).
    n_macs = count_macs(r18)
    print(f"iresnet18(512): {n_macs} MACs ({format_count(n_macs)})")
    assert n_macs == 2_609_954_816


def test_load_checkpoint_with_module_prefix(tmp_path: Path, r18: IResNet) -> None:
    source = create_model("iresnet18")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "backbone.pth"
    torch.save(OrderedDict((f"module.{k}", v) for k, v in source.state_dict().items()), path)
    target = create_model("iresnet18")
    assert load_arcface_torch_checkpoint(target, path) is target
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_load_checkpoint_plain_and_resume_file(tmp_path: Path, r18: IResNet) -> None:
    plain, resume = tmp_path / "backbone.pth", tmp_path / "checkpoint_gpu_0.pt"
    torch.save(r18.state_dict(), plain)
    torch.save({"epoch": 3, "state_dict_backbone": r18.state_dict()}, resume)
    for path in (plain, resume):
        target = create_model("iresnet18")
        load_arcface_torch_checkpoint(target, path)
        assert torch.equal(target.fc.weight, r18.fc.weight)


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path, r18: IResNet) -> None:
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in r18.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    load_arcface_torch_checkpoint(create_model("iresnet18"), path)


def test_wrong_depth_names_the_checkpoint_architecture(tmp_path: Path, r18: IResNet) -> None:
    path = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_arcface_torch_checkpoint(create_model("iresnet34"), path)
    message = str(info.value)
    assert "missing keys" in message
    assert "layer1.2.conv1.weight" in message
    assert "iresnet18 with embedding_size=512" in message


def test_wrong_embedding_size_reports_shapes(tmp_path: Path, r18: IResNet) -> None:
    path = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_arcface_torch_checkpoint(create_model("iresnet18", embedding_size=128), path)
    message = str(info.value)
    assert "shape mismatches" in message
    assert "fc.weight: checkpoint (512, 25088) vs model (128, 25088)" in message
    assert "missing keys" not in message


def test_mobilefacenet_checkpoint_into_iresnet_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "mbf.pth"
    torch.save(create_model("mobilefacenet", embedding_size=128).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="looks like mobilefacenet with embedding_size=128"):
        load_arcface_torch_checkpoint(create_model("iresnet18"), path)


def test_mbf_checkpoint_loads_into_mbf(tmp_path: Path) -> None:
    path = tmp_path / "mbf.pth"
    torch.save({f"module.{k}": v for k, v in create_model("mbf").state_dict().items()}, path)
    load_arcface_torch_checkpoint(create_model("mbf"), path)
    with pytest.raises(CheckpointMismatchError, match="looks like mbf with embedding_size=512"):
        load_arcface_torch_checkpoint(create_model("mobilefacenet"), path)


def test_non_state_dict_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    torch.save({"lr": 0.1}, path)
    with pytest.raises(CheckpointMismatchError, match="state_dict"):
        load_arcface_torch_checkpoint(create_model("mobilefacenet"), path)
