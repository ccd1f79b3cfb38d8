"""Latency measurement: the result layout for PyTorch and onnxruntime (no timing thresholds: CI load varies)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from facedistill.export.latency import compare_latency, latency_report_markdown, measure_latency
from facedistill.export.onnx import export_onnx
from facedistill.export.quantize import quantize_dynamic_int8


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1),
        nn.PReLU(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
    ).eval()


def _check(result: dict, backend: str, precision: str, batch_sizes: tuple[int, ...]) -> None:
    assert result["backend"] == backend
    assert result["precision"] == precision
    assert result["threads"] == 1
    assert result["repeats"] == 2
    assert result["model_bytes"] > 0
    assert set(result["batches"]) == {str(b) for b in batch_sizes}
    for b in batch_sizes:
        stats = result["batches"][str(b)]
        assert stats["batch_size"] == b
        for key in ("ms_per_image_median", "ms_per_image_p90", "images_per_second"):
            assert stats[key] > 0
        assert stats["ms_per_image_p90"] >= stats["ms_per_image_median"]
    json.dumps(result)


def test_pytorch_and_onnxruntime(tmp_path):
    model = _tiny()
    threads_before = torch.get_num_threads()
    sizes = (1, 4)
    torch_result = measure_latency(model, batch_sizes=sizes, warmup=1, repeats=2, threads=1)
    assert torch.get_num_threads() == threads_before
    _check(torch_result, "pytorch", "fp32", sizes)

    fp32 = export_onnx(model, tmp_path / "m.onnx").path
    int8 = quantize_dynamic_int8(fp32, tmp_path / "m.int8.onnx")
    ort_fp32 = measure_latency(fp32, batch_sizes=sizes, warmup=1, repeats=2, threads=1)
    ort_int8 = measure_latency(int8, batch_sizes=sizes, warmup=0, repeats=2, threads=1, label="int8 model")
    _check(ort_fp32, "onnxruntime", "fp32", sizes)
    _check(ort_int8, "onnxruntime", "int8", sizes)
    assert ort_int8["label"] == "int8 model"

    table = latency_report_markdown([torch_result, ort_fp32, ort_int8])
    lines = table.splitlines()
    assert len(lines) == 5
    assert "batch 1: ms/img median" in lines[0] and "batch 4: img/s" in lines[0]
    assert lines[2].startswith("| PyTorch fp32 |") and lines[2].endswith("| 1.00x |")
    assert "| int8 model |" in lines[4]
    assert latency_report_markdown({"a": torch_result}).startswith("| model |")


def test_compare_latency_interleaves_and_takes_medians(tmp_path):
    model = _tiny()
    fp32 = export_onnx(model, tmp_path / "m.onnx").path
    results = compare_latency(
        {"torch": model, "onnx": fp32}, rounds=3, batch_sizes=(1, 2), warmup=0, repeats=2, threads=1
    )
    assert [r["label"] for r in results] == ["torch", "onnx"]
    for r in results:
        assert r["rounds"] == 3 and len(r["per_round"]) == 3
        for b in ("1", "2"):
            per_round = sorted(run["batches"][b]["ms_per_image_median"] for run in r["per_round"])
            assert r["batches"][b]["ms_per_image_median"] == per_round[1]
            assert r["batches"][b]["batch_size"] == int(b)
    json.dumps(results)
    assert "| onnx |" in latency_report_markdown(results)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure_latency(_tiny(), repeats=0)
    with pytest.raises(ValueError):
        measure_latency(_tiny(), batch_sizes=(0,))
    with pytest.raises(ValueError):
        latency_report_markdown([])
    with pytest.raises(ValueError):
        compare_latency({"m": _tiny()}, rounds=0)
