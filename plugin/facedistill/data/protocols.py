"""Metadata readers for the CFP, IJB-B/IJB-C 1:1 and MegaFace-style evaluation protocols (pure parsing, no torch).

Formats, as checked against the dataset's own readme and the insightface evaluation scripts:

**CFP** (Celebrities in Frontal-Profile; the ``Readme.txt`` shipped with the dataset)::

    root/Data/Images/<id>/{frontal,profile}/<nn>.jpg      500 identities, 10 frontal + 4 profile each
    root/Protocol/Pair_list_F.txt                         "1 ../Data/Images/001/frontal/01.jpg" (5000 lines)
    root/Protocol/Pair_list_P.txt                         "1 ../Data/Images/001/profile/01.jpg" (2000 lines)
    root/Protocol/Split/{FF,FP}/01..10/{same,diff}.txt    "i,j" lines, 350 same + 350 diff pairs per split

Pair-list indices are 1-based ("numbers ranging from 1-5000 for Frontal and 1-2000 for Profiles") and the image
paths are relative to ``Protocol/``. In ``FP`` a pair is frontal ``i`` vs profile ``j``, in ``FF`` frontal vs
frontal. The ten splits are identity-disjoint and are the folds of the 10-fold protocol.

**IJB-B / IJB-C 1:1** (the metadata of insightface's IJB release, read by
``recognition/_evaluation_/ijb/ijb_11.py`` and ``recognition/arcface_torch/eval_ijbc.py``)::

    root/meta/<ijbb|ijbc>_face_tid_mid.txt          "1.jpg 1 69544": image name, template id, media id
    root/meta/<ijbb|ijbc>_template_pair_label.txt   "1 11065 1": template 1, template 2, label 1/0
    root/meta/<ijbb|ijbc>_name_5pts_score.txt       "1.jpg 46.060 62.026 ... 98.648 0.999": name, 5 (x, y)
                                                    landmarks in loose_crop pixel coordinates, detector score
    root/loose_crop/<name>                          loose face crops, *not* aligned

All three are single-space separated without a header (insightface reads them with
``pd.read_csv(sep=' ', header=None)``). insightface embeds images in the order of ``name_5pts_score.txt`` and
aggregates them with the template/media columns of ``face_tid_mid.txt`` row by row, i.e. it silently assumes both
files list the same images in the same order; :func:`read_ijb` checks that instead of assuming it.
Sizes for orientation: IJB-B 227,630 images, 12,115 templates, 8,010,270 pairs (10,270 genuine); IJB-C
469,375 images, 15,658,489 pairs (19,557 genuine).

**MegaFace-style identification** uses a list format of our own, because the real MegaFace devkit ships binary
feature files and matlab/C++ tools rather than lists::

    root/probes.tsv        "path<TAB>identity" per line (optional header line "path<TAB>identity")
    root/distractors.txt   one image path per line

In all three, blank lines are skipped; malformed lines raise :class:`PairsFormatError` naming file and line.

Every facedistill model expects aligned 112x112 faces, so all readers take ``aligned_dir``: the folder holding
the aligned copies, laid out as the originals (see each reader). Aligning is not done here: for CFP it is what
``facedistill.data.align`` does per identity folder; for IJB the 5 landmarks of ``name_5pts_score.txt`` (kept in
:attr:`IJBProtocol.landmarks`) should drive the warp (``facedistill.data.align.warp_to_template``), since the
published numbers use those landmarks, not a fresh detection.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedistill.data.verification import PairList, PairsFormatError

__all__ = [
    "CFP_SPLITS",
    "IJB_NAMES",
    "IJBProtocol",
    "MegaFaceProtocol",
    "read_cfp",
    "read_ijb",
    "read_megaface",
]

CFP_SPLITS = ("FP", "FF")
IJB_NAMES = ("IJBB", "IJBC")

PathLike = str | os.PathLike[str]


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of every non-blank line; a missing file is a FileNotFoundError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: protocol file not found") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_exists(paths: Sequence[str], source: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise FileNotFoundError(f"{source}: {len(missing)} image(s) of the protocol do not exist, e.g.\n  {shown}")


# ------------------------------------------------------------------------------------------------------------
# CFP
# ------------------------------------------------------------------------------------------------------------


def _read_cfp_image_list(path: Path) -> dict[int, str]:
    images: dict[int, str] = {}
    for lineno, line in _lines(path):
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            index = int(fields[0])
            if index < 1:
                raise ValueError
        except ValueError:
            raise PairsFormatError(
                f"{path}:{lineno}: expected '<index> <path>' with a 1-based index, got {line!r}"
            ) from None
        if index in images:
            raise PairsFormatError(f"{path}:{lineno}: index {index} is listed twice")
        # Paths are relative to Protocol/ ("../Data/Images/..."); normpath folds the "..".
        images[index] = os.path.normpath(path.parent / fields[1])
    if not images:
        raise PairsFormatError(f"{path}: no images listed")
    return images


def _read_cfp_pairs(
    path: Path, first: dict[int, str], second: dict[int, str], first_name: str, second_name: str
) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for lineno, line in _lines(path):
        fields = line.split(",")
        try:
            if len(fields) != 2:
                raise ValueError
            i, j = int(fields[0]), int(fields[1])
        except ValueError:
            raise PairsFormatError(f"{path}:{lineno}: expected 'i,j' (two 1-based indices), got {line!r}") from None
        for index, images, name in ((i, first, first_name), (j, second, second_name)):
            if index not in images:
                raise PairsFormatError(f"{path}:{lineno}: index {index} is not in {name} (got {line!r})")
        pairs.append((first[i], second[j]))
    if not pairs:
        raise PairsFormatError(f"{path}: no pairs")
    return pairs


def _cfp_split_dirs(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: CFP split folder not found")
    numbered = {}
    for entry in split_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            numbered[int(entry.name)] = entry
    if not numbered:
        raise PairsFormatError(f"{split_dir}: no numbered split folders (01 .. 10)")
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise PairsFormatError(f"{split_dir}: split folders must be numbered 1..K without gaps, got {sorted(numbered)}")
    return [numbered[k] for k in sorted(numbered)]


def read_cfp(
    root: PathLike, split: str = "FP", *, aligned_dir: PathLike | None = None, check_exists: bool = False
) -> PairList:
    """CFP frontal-profile (``split="FP"``) or frontal-frontal (``"FF"``) pairs as a :class:`PairList`.

    Fold ``k`` is split folder ``k + 1`` (``Split/FP/01`` is fold 0); within a fold the ``same.txt`` pairs come
    first, then ``diff.txt``, each in file order. Image paths are ``root/Data/Images/<id>/<view>/<nn>.jpg``, or
    with ``aligned_dir`` the same path relative to ``root/Data/Images`` under ``aligned_dir`` (the layout that
    aligning each ``Data/Images/<id>`` folder into ``aligned_dir/<id>`` produces).
    """
    root = Path(root)
    split = split.upper()
    if split not in CFP_SPLITS:
        raise ValueError(f"CFP split must be one of {CFP_SPLITS}, got {split!r}")
    protocol = root / "Protocol"
    frontal_file = protocol / "Pair_list_F.txt"
    frontal = _read_cfp_image_list(frontal_file)
    if split == "FP":
        second_file = protocol / "Pair_list_P.txt"
        second = _read_cfp_image_list(second_file)
    else:
        second_file, second = frontal_file, frontal

    if aligned_dir is not None:
        images_root = os.path.normpath(root / "Data" / "Images")
        aligned = Path(aligned_dir)

        def to_aligned(images: dict[int, str], source: Path) -> dict[int, str]:
            out = {}
            for index, path in images.items():
                relative = os.path.relpath(path, images_root)
                if relative.startswith(os.pardir):
                    raise PairsFormatError(
                        f"{source}: image {index} ({path}) is not under {images_root}, so its aligned copy "
                        f"cannot be located in {aligned}"
                    )
                out[index] = str(aligned / relative)
            return out

        frontal = to_aligned(frontal, frontal_file)
        second = frontal if split == "FF" else to_aligned(second, second_file)

    left: list[str] = []
    right: list[str] = []
    issame: list[bool] = []
    folds: list[int] = []
    for fold, folder in enumerate(_cfp_split_dirs(protocol / "Split" / split)):
        for name, same in (("same.txt", True), ("diff.txt", False)):
            pairs = _read_cfp_pairs(folder / name, frontal, second, frontal_file.name, second_file.name)
            left.extend(a for a, _ in pairs)
            right.extend(b for _, b in pairs)
            issame.extend([same] * len(pairs))
            folds.extend([fold] * len(pairs))
    if check_exists:
        _check_exists(list(dict.fromkeys(left + right)), protocol / "Split" / split)
    return PairList(left, right, np.asarray(issame, dtype=bool), np.asarray(folds, dtype=np.int64))


# ------------------------------------------------------------------------------------------------------------
# IJB-B / IJB-C
# ------------------------------------------------------------------------------------------------------------


@dataclass
class IJBProtocol:
    """IJB 1:1 template verification.

    Image ``k`` (``images[k]``, a file path) belongs to template ``templates[k]`` and media ``medias[k]``; pair
    ``p`` compares templates ``pairs_t1[p]`` and ``pairs_t2[p]``, genuine iff ``labels[p]``. ``scores`` are the
    detector (faceness) scores and ``landmarks`` the 5 points ``[N, 5, 2]`` in loose-crop coordinates, both from
    ``name_5pts_score.txt`` and ``None`` when that file is absent.
    """

    images: list[str]
    templates: np.ndarray
    medias: np.ndarray
    pairs_t1: np.ndarray
    pairs_t2: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    name: str = "IJBC"

    def __post_init__(self) -> None:
        self.templates = np.asarray(self.templates, dtype=np.int64).reshape(-1)
        self.medias = np.asarray(self.medias, dtype=np.int64).reshape(-1)
        self.pairs_t1 = np.asarray(self.pairs_t1, dtype=np.int64).reshape(-1)
        self.pairs_t2 = np.asarray(self.pairs_t2, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(self.labels).reshape(-1).astype(bool)
        n, p = len(self.images), self.pairs_t1.shape[0]
        if not (self.templates.shape[0] == self.medias.shape[0] == n):
            raise ValueError(
                f"images ({n}), templates ({self.templates.shape[0]}) and medias ({self.medias.shape[0]}) differ"
            )
        if not (self.pairs_t2.shape[0] == self.labels.shape[0] == p):
            raise ValueError(
                f"pairs_t1 ({p}), pairs_t2 ({self.pairs_t2.shape[0]}) and labels ({self.labels.shape[0]}) differ"
            )
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if self.scores.shape[0] != n:
                raise ValueError(f"{self.scores.shape[0]} detector scores for {n} images")
        if self.landmarks is not None:
            self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 5, 2)
            if self.landmarks.shape[0] != n:
                raise ValueError(f"{self.landmarks.shape[0]} landmark sets for {n} images")


# A vectorised check on the parsed table: a bool per row (True = valid) and the message for an invalid row.
RowCheck = tuple[Callable[[np.ndarray], np.ndarray], str]


def _locate_bad_row(path: Path, columns: int, expected: str, checks: Sequence[RowCheck]) -> None:
    """Re-read ``path`` line by line and raise at the first line that fails; the slow path, for errors only."""
    for lineno, line in _lines(path):
        fields = line.split()
        try:
            if len(fields) != columns:
                raise ValueError
            row = np.array([[int(f) for f in fields]], dtype=np.int64)
        except (ValueError, OverflowError):
            raise PairsFormatError(f"{path}:{lineno}: expected '{expected}', got {line!r}") from None
        for check, message in checks:
            if not bool(check(row)[0]):
                raise PairsFormatError(f"{path}:{lineno}: {message}, got {line!r}")


def _read_int_table(path: Path, columns: int, expected: str, checks: Sequence[RowCheck] = ()) -> np.ndarray:
    """A whitespace-separated integer table ``[rows, columns]``.

    IJB-C's pair list has 15.6 M lines, which a Python loop parses in about a minute; numpy's C parser takes a few
    seconds. Its error messages count rows without blank lines, so on any failure the file is re-scanned in Python
    to name the offending line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: protocol file not found")
    try:
        with warnings.catch_warnings():
            # An empty file is reported below with its name; numpy's own warning would only duplicate it.
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        table = None
    if table is None or (table.size and table.shape[1] != columns):
        _locate_bad_row(path, columns, expected, checks)
        raise PairsFormatError(f"{path}: not a table of {columns} integer columns ('{expected}')")
    if table.shape[0] == 0:
        raise PairsFormatError(f"{path}: file is empty")
    for check, message in checks:
        if not check(table).all():
            _locate_bad_row(path, columns, expected, checks)
            raise PairsFormatError(f"{path}: {message}")
    return table


def _ijb_meta_dir(root: Path, name: str) -> Path:
    # insightface's scripts take the folder above IJBB/ or IJBC/; accept either that or the dataset folder.
    for candidate in (root / "meta", root / name / "meta"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{root}: no meta/ folder (expected {root / 'meta'} or {root / name / 'meta'})")


def read_ijb(
    root: PathLike, name: str = "IJBC", *, aligned_dir: PathLike | None = None, check_exists: bool = False
) -> IJBProtocol:
    """Read IJB-B (``name="IJBB"``) or IJB-C (``"IJBC"``) 1:1 metadata from ``root/meta`` (or ``root/<name>/meta``).

    Images are ``root/loose_crop/<image name>``, or ``aligned_dir/<image name>`` when given: the 112x112 crops
    warped from the 5 landmarks (loose crops fail to decode as faces, by design). ``name_5pts_score.txt`` is
    optional; without it ``scores`` and ``landmarks`` are ``None``.
    """
    root = Path(root)
    name = name.upper()
    if name not in IJB_NAMES:
        raise ValueError(f"IJB set must be one of {IJB_NAMES}, got {name!r}")
    meta = _ijb_meta_dir(root, name)
    data_root = meta.parent
    prefix = name.lower()

    media_file = meta / f"{prefix}_face_tid_mid.txt"
    names, template_array, media_array = _read_ijb_media(media_file)
    known = np.unique(template_array)

    pair_file = meta / f"{prefix}_template_pair_label.txt"
    table = _read_int_table(
        pair_file,
        3,
        "<template 1> <template 2> <label 0/1>",
        (
            (lambda t: (t[:, 2] == 0) | (t[:, 2] == 1), "label must be 0 or 1"),
            (
                lambda t: np.isin(t[:, 0], known) & np.isin(t[:, 1], known),
                f"template id not listed in {media_file.name}",
            ),
        ),
    )

    scores: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    score_file = meta / f"{prefix}_name_5pts_score.txt"
    if score_file.is_file():
        scores, landmarks = _read_ijb_landmarks(score_file, names, media_file.name)

    image_dir = Path(aligned_dir) if aligned_dir is not None else data_root / "loose_crop"
    images = [str(image_dir / n) for n in names]
    if check_exists:
        _check_exists(images, media_file)
    return IJBProtocol(
        images=images,
        templates=template_array,
        medias=media_array,
        pairs_t1=table[:, 0],
        pairs_t2=table[:, 1],
        labels=table[:, 2].astype(bool),
        scores=scores,
        landmarks=landmarks,
        name=name,
    )


def _read_ijb_media(media_file: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<name>_face_tid_mid.txt``: image names, their template ids and media ids."""
    names: list[str] = []
    templates: list[int] = []
    medias: list[int] = []
    for lineno, line in _lines(media_file):
        fields = line.split()
        try:
            if len(fields) != 3:
                raise ValueError
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
        except ValueError:
            raise PairsFormatError(
                f"{media_file}:{lineno}: expected '<image name> <template id> <media id>', got {line!r}"
            ) from None
        names.append(fields[0])
    if not names:
        raise PairsFormatError(f"{media_file}: file is empty")
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def _read_ijb_landmarks(score_file: Path, names: list[str], media_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``<name>_name_5pts_score.txt``: detector scores [N] and 5-point landmarks [N, 5, 2], row by row with the
    media file's images (insightface pairs the two files by row)."""
    rows = _lines(score_file)
    if len(rows) != len(names):
        raise PairsFormatError(
            f"{score_file}: {len(rows)} images, but {media_name} lists {len(names)}; insightface pairs "
            f"the two files row by row, so they must list the same images in the same order"
        )
    scores = np.empty(len(rows), dtype=np.float32)
    landmarks = np.empty((len(rows), 10), dtype=np.float32)
    for k, (lineno, line) in enumerate(rows):
        fields = line.split()
        try:
            if len(fields) != 12:
                raise ValueError
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise PairsFormatError(
                f"{score_file}:{lineno}: expected '<image name> <10 landmark coordinates> <detector score>', "
                f"got {line!r}"
            ) from None
        if fields[0] != names[k]:
            raise PairsFormatError(
                f"{score_file}:{lineno}: image {fields[0]!r}, but row {k + 1} of {media_name} is "
                f"{names[k]!r}; both files must list the same images in the same order"
            )
        landmarks[k] = values[:10]
        scores[k] = values[10]
    return scores, landmarks.reshape(-1, 5, 2)


# ------------------------------------------------------------------------------------------------------------
# MegaFace-style identification
# ------------------------------------------------------------------------------------------------------------


@dataclass
class MegaFaceProtocol:
    """Probe images with their identity (``probe_ids[k]`` indexes ``identities``) and distractor images."""

    probe_images: list[str]
    probe_ids: np.ndarray
    distractor_images: list[str]
    identities: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.probe_ids = np.asarray(self.probe_ids).reshape(-1)
        if self.probe_ids.shape[0] != len(self.probe_images):
            raise ValueError(f"{self.probe_ids.shape[0]} probe ids for {len(self.probe_images)} probe images")


def read_megaface(
    root: PathLike,
    probes: PathLike = "probes.tsv",
    distractors: PathLike = "distractors.txt",
    *,
    aligned_dir: PathLike | None = None,
    check_exists: bool = False,
) -> MegaFaceProtocol:
    """Read ``probes.tsv`` (``path<TAB>identity``) and ``distractors.txt`` (one path per line) from ``root``.

    Relative paths resolve against ``aligned_dir`` when given, else against ``root``. Identities are numbered in
    order of first appearance. A probe image listed twice is an error: it would make a trial against itself.
    """
    root = Path(root)
    base = Path(aligned_dir) if aligned_dir is not None else root
    probe_file = root / probes
    distractor_file = root / distractors

    probe_images: list[str] = []
    probe_ids: list[int] = []
    identity_index: dict[str, int] = {}
    seen: dict[str, int] = {}
    for position, (lineno, line) in enumerate(_lines(probe_file)):
        fields = [f.strip() for f in line.split("\t")]
        if position == 0 and [f.lower() for f in fields] == ["path", "identity"]:
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise PairsFormatError(f"{probe_file}:{lineno}: expected 'path<TAB>identity', got {line!r}")
        path = str(base / fields[0])
        if path in seen:
            raise PairsFormatError(f"{probe_file}:{lineno}: {fields[0]} is already listed on line {seen[path]}")
        seen[path] = lineno
        probe_images.append(path)
        probe_ids.append(identity_index.setdefault(fields[1], len(identity_index)))
    if not probe_images:
        raise PairsFormatError(f"{probe_file}: no probe images")

    distractor_images: list[str] = []
    for lineno, line in _lines(distractor_file):
        if "\t" in line:
            raise PairsFormatError(f"{distractor_file}:{lineno}: expected one image path per line, got {line!r}")
        distractor_images.append(str(base / line))
    if not distractor_images:
        raise PairsFormatError(f"{distractor_file}: no distractor images")

    if check_exists:
        _check_exists(probe_images, probe_file)
        _check_exists(distractor_images, distractor_file)
    return MegaFaceProtocol(
        probe_images=probe_images,
        probe_ids=np.asarray(probe_ids, dtype=np.int64),
        distractor_images=distractor_images,
        identities=list(identity_index),
    )
