"""ONNX export: agreement with PyTorch, dynamic batch, metadata, and no side effects on the model."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import facedistill
from facedistill.export.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportReport,
    export_onnx,
    read_onnx_metadata,
    verify_onnx,
)

EMB = 32


class TinyFaceNet(nn.Module):
    """Small stand-in for a face backbone: BN and dropout make train/eval behave differently, and the
    ``view(x.size(0), -1)`` flatten is the classic place where a traced batch size gets baked in."""

    def __init__(self, emb: int = EMB) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.PReLU(8),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            nn.AdaptiveAvgPool2d(4),
        )
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 4 * 4, emb)
        self.features = nn.BatchNorm1d(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        x = x.view(x.size(0), -1)
        return self.features(self.fc(self.dropout(x)))


def _model(train: bool = True) -> TinyFaceNet:
    torch.manual_seed(0)
    m = TinyFaceNet()
    # Non-trivial running statistics, so an export that used batch statistics would not match.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.train(train)


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model(train=True)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, path, metadata={"facedistill.teacher": "r100", "run": "abc"})
    return model, report


def test_report(exported):
    _, report = exported
    assert isinstance(report, ExportReport)
    assert report.path.is_file()
    assert report.opset >= 17
    assert report.embedding_size == EMB
    assert report.input_size == (112, 112)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


@pytest.mark.parametrize("n", [3, 1])
def test_onnxruntime_matches_pytorch_dynamic_batch(exported, n):
    model, report = exported
    x = _batch(n)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    ref_model = _model(train=False)  # fresh identical weights, evaluated independently of the exporter
    with torch.no_grad():
        ref = ref_model(x).numpy()
    assert got.shape == (n, EMB)
    assert np.max(np.abs(got - ref)) < 1e-4
    # The raw embedding is exported, not a normalised one.
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    assert verify_onnx(report.path, model, x) < 1e-4
    assert verify_onnx(report.path, model, x.numpy()) < 1e-4


def test_graph_io_and_opset(exported):
    _, report = exported
    proto = onnx.load(str(report.path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    in_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param  # symbolic batch
    assert [d.dim_value for d in in_dims[1:]] == [3, 112, 112]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_metadata(exported):
    _, report = exported
    meta = read_onnx_metadata(report.path)
    assert meta["facedistill.input"] == "float32 NCHW RGB 112x112, (x-127.5)/127.5"
    assert meta["facedistill.output"] == "raw embedding, not L2-normalised"
    assert meta["facedistill.embedding_size"] == str(EMB)
    assert meta["facedistill.model"] == "TinyFaceNet"
    # The installed package's version (tests/test_version.py: setup.py's), not a constant that can drift.
    assert meta["facedistill.version"] == facedistill.__version__
    assert meta["facedistill.teacher"] == "r100"
    assert meta["run"] == "abc"
    assert report.metadata.items() <= meta.items()


def test_metadata_says_how_the_input_is_normalised_in_keys_a_teacher_reads(exported):
    # An exported student evaluated as a teacher (``facedistill eval --teacher model.onnx``) takes its preprocessing
    # from these keys: RGB, (x - 127.5) / 127.5 on raw 0..255 values, as the student was trained.
    _, report = exported
    meta = read_onnx_metadata(report.path)
    assert (meta["facedistill.colour_order"], meta["facedistill.mean"], meta["facedistill.std"]) == (
        "RGB",
        "127.5",
        "127.5",
    )


def test_callers_model_is_untouched(exported):
    model, _ = exported
    fresh = _model(train=True)
    assert model.training
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # BN running stats included


def test_eval_model_stays_eval_and_overwrite(tmp_path):
    model = _model(train=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    report = export_onnx(model, path, opset=18, metadata={"facedistill.model": "tiny-v2"})
    assert not any(m.training for m in model.modules())
    assert report.opset >= 18
    assert read_onnx_metadata(path)["facedistill.model"] == "tiny-v2"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left


def test_wrapped_model_is_unwrapped(tmp_path):
    report = export_onnx(nn.DataParallel(_model()), tmp_path / "dp.onnx", verify=False)
    assert report.max_abs_diff is None
    assert read_onnx_metadata(report.path)["facedistill.model"] == "TinyFaceNet"
    assert verify_onnx(report.path, _model(), _batch(2)) < 1e-4


def test_rejects_low_opset_and_bad_output(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(_model(), tmp_path / "a.onnx", opset=16)

    class NotAnEmbedder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1)  # [B, H, W]

    with pytest.raises(TypeError, match=r"\[B, d\]"):
        export_onnx(NotAnEmbedder(), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="dynamo exporter needs onnxscript")
def test_dynamo_exporter(tmp_path):
    report = export_onnx(_model(), tmp_path / "d.onnx", exporter="dynamo")
    assert report.exporter == "dynamo"
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert verify_onnx(report.path, _model(), _batch(1)) < 1e-4
