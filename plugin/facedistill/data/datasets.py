"""Training datasets: identity folders and insightface RecordIO, both yielding (uint8 image, label, index).

The base class, the batch and the loaders live in :mod:`facedistill.data.dataset_base`, which the decoded-image cache
builds on too; they are re-exported here, where the rest of the package has always imported them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np

from facedistill.data.dataset_base import Batch, FaceDataset, collate_faces, ordered_loader
from facedistill.data.decoded_cache import open_decoded_cache
from facedistill.data.images import ImageDecodeError
from facedistill.data.recordio import open_face_record

__all__ = [
    "IMAGE_SUFFIXES",
    "Batch",
    "FaceDataset",
    "ImageFolderDataset",
    "RecordDataset",
    "collate_faces",
    "open_training_set",
    "ordered_loader",
    "scan_identity_folders",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def scan_identity_folders(root: str | Path) -> dict[str, list[str]]:
    """``{identity: sorted image file names}`` for every folder of ``root``, identities in sorted order.

    One listing shared by the training set and ``facedistill.data.splits``, so that a validation split and the
    training set opened with its exclusion see exactly the same identities and images (same suffixes, same order,
    independent of the file system's listing order).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training folder {root} does not exist")
    identities = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    return {
        identity: sorted(
            entry.name
            for entry in os.scandir(root / identity)
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
        )
        for identity in identities
    }


def _exclusion(exclude: Collection[str] | None) -> tuple[str, ...]:
    """``exclude`` as sorted unique names; a bare string or path is refused (it would exclude its characters)."""
    if exclude is None:
        return ()
    if isinstance(exclude, str | os.PathLike):
        raise TypeError(
            f"exclude must be a collection of identity names, got the single {type(exclude).__name__} {exclude!r}; "
            "read an identity list with facedistill.data.splits.read_identity_list(path)"
        )
    return tuple(sorted(set(exclude)))


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<image>``: identities sorted by name get labels 0..C-1, images sorted within each.

    ``exclude`` names identities left out of the set (a validation split's held-out identities): they are dropped
    before labels are assigned, so the labels of the rest stay contiguous 0..C-1 in sorted order, and the fingerprint
    records them, so that a teacher or decoded-image cache of the full set is refused for the subset and vice versa.
    """

    def __init__(self, root: str | Path, skip_bad: bool = False, exclude: Collection[str] | None = None) -> None:
        super().__init__(skip_bad)
        self.root = Path(root)
        excluded = _exclusion(exclude)
        folders = scan_identity_folders(self.root)
        unknown = [name for name in excluded if name not in folders]
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ValueError(
                f"{self.root}: cannot exclude {len(unknown)} identity name(s) that are not identity folders here: "
                f"{shown}; check that the identity list was made for this dataset"
            )
        dropped = set(excluded)
        identities = [identity for identity in folders if identity not in dropped]
        paths: list[str] = []
        labels: list[int] = []
        for label, identity in enumerate(identities):
            files = folders[identity]
            paths.extend(f"{identity}/{name}" for name in files)
            labels.extend([label] * len(files))
        if not paths:
            left = f" after excluding {len(excluded)} identities" if excluded else ""
            raise ValueError(
                f"{self.root} holds no images{left}; expected root/<identity>/<image>.jpg|png (one folder per identity)"
            )
        self.identities = identities
        self.excluded = excluded
        self.relative_paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(identities)

    def read_bytes(self, index: int) -> tuple[bytes, str]:
        path = self.root / self.relative_paths[index]
        try:
            return path.read_bytes(), str(path)
        except OSError as error:
            raise ImageDecodeError(f"{path}: cannot be read ({error.strerror or error})") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for relative, label in zip(self.relative_paths, self.labels, strict=True):
            size = (self.root / relative).stat().st_size
            digest.update(f"{relative}\t{label}\t{size}\n".encode())
        # The full set keeps the fingerprint it always had (existing caches stay valid); a subset names what it left
        # out, so it can never be taken for another subset or for the full set.
        if self.excluded:
            digest.update(("exclude\t" + "\t".join(self.excluded) + "\n").encode())
        return "folder:" + digest.hexdigest()[:24]


class RecordDataset(FaceDataset):
    """insightface ``train.rec`` + ``train.idx`` (+ ``property``), read without mxnet."""

    def __init__(self, rec_path: str | Path, skip_bad: bool = False) -> None:
        super().__init__(skip_bad)
        self.rec_path = Path(rec_path)
        self.records = open_face_record(self.rec_path)
        self.labels = np.asarray(self.records.labels, dtype=np.int64)
        self.num_classes = int(self.records.num_classes)

    def read_bytes(self, index: int) -> tuple[bytes, str]:
        return self.records.read_image_bytes(index), f"{self.rec_path} image #{index}"

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.rec_path.with_suffix(".idx").read_bytes())
        digest.update(str(self.rec_path.stat().st_size).encode())
        digest.update(self.labels.tobytes())
        return "recordio:" + digest.hexdigest()[:24]


def open_training_set(
    path: str | Path,
    skip_bad: bool = False,
    decoded_cache: str | Path | None = None,
    exclude: Collection[str] | None = None,
) -> FaceDataset:
    """A folder of identity folders, a ``.rec`` file, or a folder holding ``train.rec``.

    With ``decoded_cache`` (a directory) the images are served already decoded from that cache, which is built
    there first when missing or unfinished (``facedistill.data.decoded_cache``). ``exclude`` leaves identities out
    of an identity-folder set (see ``ImageFolderDataset``); a RecordIO set cannot drop identities without renumbering
    its stored labels, so it is refused there: pack it without them instead.
    """
    path = Path(path)
    excluded = _exclusion(exclude)
    dataset: FaceDataset
    if path.suffix == ".rec" or (path / "train.rec").exists():
        if excluded:
            raise ValueError(
                f"{path}: a RecordIO training set cannot exclude identities ({len(excluded)} given, e.g. "
                f"{excluded[0]}): its labels are stored in the records. Pack the identity folders without them, "
                "`facedistill pack SRC DST --exclude IDENTITY_LIST`, and train on that pack without the exclusion"
            )
        dataset = RecordDataset(path if path.suffix == ".rec" else path / "train.rec", skip_bad)
    else:
        dataset = ImageFolderDataset(path, skip_bad, exclude=excluded)
    if decoded_cache is None:
        return dataset
    return open_decoded_cache(dataset, decoded_cache)
