"""Dynamic int8 quantisation and the ONNX embedder: metadata kept, int8 close to fp32, same path as PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from facedistill.eval.verify import student_embedder
from facedistill.export.onnx import export_onnx, read_onnx_metadata
from facedistill.export.quantize import (
    QUANTIZATION_KEY,
    count_op_types,
    onnx_embedder,
    quantize_dynamic_int8,
    read_onnx_convention,
    read_quantization_info,
)

EMB = 32


class TinyDepthwiseNet(nn.Module):
    """Full conv, depthwise conv, a GDC-like head and a biased Linear + BatchNorm1d, as in the real backbones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=4, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),  # depthwise
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(32 * 2 * 2, EMB)
        self.features = nn.BatchNorm1d(EMB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.body(x), 1)))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyDepthwiseNet().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("quant")
    fp32 = export_onnx(model, folder / "model.onnx", metadata={"facedistill.method": "arcface"}).path
    int8 = quantize_dynamic_int8(fp32, folder / "model.int8.onnx")
    return model, fp32, int8


def test_metadata_is_kept_and_quantisation_recorded(models):
    _, fp32, int8 = models
    before, after = read_onnx_metadata(fp32), read_onnx_metadata(int8)
    assert before.items() <= after.items()
    assert after["facedistill.method"] == "arcface"
    record = json.loads(after[QUANTIZATION_KEY])
    assert record == read_quantization_info(int8)
    assert record["weight_type"] == "quint8"
    assert read_onnx_convention(int8).precision == "int8"
    assert read_onnx_convention(fp32).precision == "fp32"
    assert read_quantization_info(fp32) is None


def test_what_is_quantised(models):
    _, _, int8 = models
    ops = count_op_types(int8)
    record = read_quantization_info(int8)
    # Two full convolutions and the Linear become integer ops; the depthwise conv stays float by default.
    assert ops.get("ConvInteger") == 2
    assert ops.get("MatMulInteger") == 1
    assert ops.get("Conv") == 1
    assert "Gemm" not in ops and "MatMul" not in ops
    assert record["quantized_ops"] == {"ConvInteger": 2, "MatMulInteger": 1}
    assert record["float_compute_ops"] == {"Conv": 1}
    assert record["excluded_depthwise_convs"] == 1
    assert record["cosine_vs_fp32_random_min"] > 0.98
    assert int8.stat().st_size < record["source_bytes"]
    onnx.checker.check_model(onnx.load(str(int8)))


def test_int8_embeddings_close_to_fp32(models):
    _, fp32, int8 = models
    images = _images(5)
    ref = onnx_embedder(fp32)(images)
    got = onnx_embedder(int8, intra_op_threads=1)(images)
    assert got.shape == ref.shape == (5, EMB)
    assert torch.nn.functional.cosine_similarity(ref, got, dim=1).min() > 0.98


def test_quantise_everything_with_int8_weights(models, tmp_path):
    _, fp32, _ = models
    out = quantize_dynamic_int8(fp32, tmp_path / "all.onnx", weight_type="qint8", exclude_depthwise=False)
    assert count_op_types(out).get("ConvInteger") == 3
    assert "Conv" not in count_op_types(out)
    cos = torch.nn.functional.cosine_similarity(onnx_embedder(fp32)(_images(3)), onnx_embedder(out)(_images(3)))
    assert cos.min() > 0.98


def test_onnx_embedder_matches_student_embedder(models):
    model, fp32, _ = models
    images = _images(4, seed=1)
    ref = student_embedder(model)(images)
    got = onnx_embedder(fp32)(images)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) < 1e-4


def test_onnx_embedder_checks_its_input(models):
    _, fp32, _ = models
    embed = onnx_embedder(fp32)
    with pytest.raises(TypeError, match="uint8"):
        embed(_images(1).float())
    with pytest.raises(ValueError, match="112"):
        embed(torch.zeros(1, 3, 96, 96, dtype=torch.uint8))


def test_foreign_onnx_is_refused(models, tmp_path):
    _, fp32, int8 = models
    proto = onnx.load(str(fp32))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(ValueError, match="not a facedistill ONNX model"):
        onnx_embedder(foreign)
    with pytest.raises(ValueError, match="not a facedistill ONNX model"):
        quantize_dynamic_int8(foreign, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_dynamic_int8(int8, tmp_path / "twice.onnx")
    with pytest.raises(ValueError, match="must differ"):
        quantize_dynamic_int8(fp32, fp32)
    assert not (tmp_path / "q.onnx").exists()
    assert np.all([not p.name.endswith(".tmp") for p in tmp_path.iterdir()])
