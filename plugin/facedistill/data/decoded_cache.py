"""The decoded-image cache: every training image decoded once into a uint8 memory map, so loaders outrun a GPU.

Layout of a cache directory::

    images.u8      uint8 memory map [N, 112, 112, 3]: row i is image i, RGB, exactly as ``decode_image`` returns it
    labels.npy     int64 [N], the source dataset's labels
    manifest.json  format, source dataset fingerprint, N, classes, shape, rows completed, unreadable rows

An image costs 37,632 bytes (1M images: 35 GiB), so the cache is for datasets that fit on a local disk, ideally in
the page cache: reading a batch is then one memory gather instead of 128 JPEG decodes. The cache stands in for its
source dataset: same indices, labels, classes and fingerprint, so a teacher cache built from either lines up with
both. Building is resumable (rows are flushed chunk by chunk and the manifest counts the complete ones) and
serialised by a lock file, so several processes of one job may open the same cache; a cache of another dataset,
or an unfinished one, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from facedistill.data.datasets import FaceDataset, collate_faces
from facedistill.data.images import FACE_SIZE, ImageDecodeError
from facedistill.teachers.cache import StaleCacheError, _write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders of one cache are then the user's to avoid
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT = 1
KIND = "decoded-images"
MANIFEST = "manifest.json"
IMAGES = "images.u8"
LABELS = "labels.npy"
LOCK = ".build.lock"
ROW_SHAPE = (FACE_SIZE[1], FACE_SIZE[0], 3)
ROW_BYTES = int(np.prod(ROW_SHAPE))
# Headroom beyond the image file itself, so that building the cache does not fill the disk to the last byte.
DISK_MARGIN_BYTES = 256 * 2**20


def _describe_source(dataset: FaceDataset) -> str:
    for attribute in ("root", "rec_path"):
        if hasattr(dataset, attribute):
            return str(getattr(dataset, attribute))
    return type(dataset).__name__


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


class DecodedImageDataset(FaceDataset):
    """A finished decoded-image cache read as a ``FaceDataset``: the same items as its source, with no decoding.

    Rows are read through a memory map opened lazily in each process (a DataLoader worker maps the file itself
    rather than receiving a pickled copy of it). ``__getitems__`` reads a whole batch in one gather.
    """

    def __init__(self, directory: str | Path, skip_bad: bool = False) -> None:
        super().__init__(skip_bad)
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(
                f"{self.directory} is not a decoded image cache (no {MANIFEST}); build one with "
                "`facedistill cache-images` or set data.decoded_cache"
            )
        if manifest.get("kind") != KIND or manifest.get("format") != CACHE_FORMAT:
            raise StaleCacheError(
                f"{self.directory / MANIFEST}: not a decoded image cache of format {CACHE_FORMAT} "
                f"(kind {manifest.get('kind')!r}, format {manifest.get('format')!r}); rebuild it with "
                "`facedistill cache-images --overwrite`"
            )
        self.manifest = manifest
        if int(manifest["completed"]) < self.num_images:
            raise StaleCacheError(
                f"decoded image cache {self.directory / IMAGES} is incomplete ({manifest['completed']}/"
                f"{self.num_images} images); run `facedistill cache-images` again (or train with "
                "data.decoded_cache set) to finish it"
            )
        images = self.directory / IMAGES
        if not images.exists() or images.stat().st_size != self.num_images * ROW_BYTES:
            raise StaleCacheError(
                f"{images} is missing or not {self.num_images} x {ROW_BYTES} bytes; rebuild the cache with "
                "`facedistill cache-images --overwrite`"
            )
        self.labels = np.load(self.directory / LABELS)
        if len(self.labels) != self.num_images:
            raise StaleCacheError(
                f"{self.directory / LABELS} holds {len(self.labels)} labels for {self.num_images} images; "
                "rebuild the cache with `facedistill cache-images --overwrite`"
            )
        self.num_classes = int(manifest["num_classes"])
        self.source = str(manifest.get("source", "?"))
        self.unreadable = frozenset(int(index) for index in manifest.get("unreadable", []))
        self._images: np.memmap | None = None

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def images(self) -> np.memmap:
        """The [N, H, W, 3] uint8 rows, mapped on first use in this process."""
        if self._images is None:
            self._images = np.memmap(
                self.directory / IMAGES, dtype=np.uint8, mode="r", shape=(self.num_images, *ROW_SHAPE)
            )
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def fingerprint(self) -> str:
        """The source dataset's fingerprint: teacher caches check a decoded cache as they check its source."""
        return str(self.manifest["dataset_fingerprint"])

    def check(self, source: FaceDataset) -> None:
        """Refuse a cache built from another dataset than ``source``, saying what to do."""
        fingerprint = source.fingerprint()
        if self.fingerprint() != fingerprint or self.num_images != len(source):
            raise StaleCacheError(
                f"decoded image cache {self.directory / MANIFEST} was built from another dataset "
                f"({self.fingerprint()}, {self.num_images} images) than {_describe_source(source)} "
                f"({fingerprint}, {len(source)} images); rebuild it with `facedistill cache-images --overwrite` "
                "or point data.decoded_cache at another directory"
            )

    def read_bytes(self, index: int) -> tuple[bytes, str]:
        raise NotImplementedError("a decoded image cache holds pixels, not encoded images")

    def _unreadable(self, index: int) -> None:
        if not self.skip_bad:
            raise ImageDecodeError(
                f"{self.source} image #{index} was unreadable when the decoded cache {self.directory} was built "
                "(with skip_bad); fix the image and rebuild, or set data.skip_bad_images=true"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int] | None]:
        # One gather for the batch (the DataLoader calls this with the batch's indices), transposed to [B, 3, H, W]
        # in one copy; the items are views of that batch, so collate_faces stacks them like decoded images.
        index = np.asarray(indices, dtype=np.int64)
        rows = self.images[index]
        batch = torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))
        labels = self.labels[index].tolist()
        items: list[tuple[torch.Tensor, int, int] | None] = []
        for position, (item, label) in enumerate(zip(index.tolist(), labels, strict=True)):
            if item in self.unreadable:
                self._unreadable(item)
                items.append(None)
            else:
                items.append((batch[position], label, item))
        return items


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Exclusive for the duration of a build: a second process (another rank of the same job) waits, then finds
    the cache finished instead of writing the same file at the same time."""
    if fcntl is None:
        yield
        return
    with open(directory / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building the decoded image cache {directory} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_disk_space(directory: Path, num_images: int) -> None:
    """Fail before allocating, not with a crash half-way: writing a memory map past a full disk kills the process
    with SIGBUS instead of raising an error."""
    path = directory / IMAGES
    needed = num_images * ROW_BYTES
    # The file is sparse: blocks already written by an interrupted build need no new space.
    allocated = path.stat().st_blocks * 512 if path.exists() else 0
    missing = needed - min(allocated, needed)
    free = shutil.disk_usage(directory).free
    if free < missing + DISK_MARGIN_BYTES:
        raise OSError(
            f"the decoded image cache {path} needs {needed / 2**30:.2f} GiB ({num_images} images x {ROW_BYTES} "
            f"bytes; {missing / 2**30:.2f} GiB still to write) but {directory} has {free / 2**30:.2f} GiB free; "
            "choose a directory with room, or leave data.decoded_cache unset to decode images on the fly"
        )


def build_decoded_cache(
    dataset: FaceDataset,
    directory: str | Path,
    batch_size: int = 256,
    num_workers: int = 2,
    overwrite: bool = False,
    chunk_images: int = 8192,
    progress: bool = True,
) -> DecodedImageDataset:
    """Decode every image of ``dataset`` into ``directory``; resumes a partial cache of the same dataset.

    Unreadable images stop the build (naming the file) unless ``dataset.skip_bad``: then they are recorded as
    unreadable rows, which the cache skips as its source would.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        return _build_locked(dataset, directory, batch_size, num_workers, overwrite, chunk_images, progress)


def _build_locked(
    dataset: FaceDataset,
    directory: Path,
    batch_size: int,
    num_workers: int,
    overwrite: bool,
    chunk_images: int,
    progress: bool,
) -> DecodedImageDataset:
    num_images = len(dataset)
    manifest_path = directory / MANIFEST
    expected = {
        "format": CACHE_FORMAT,
        "kind": KIND,
        "dataset_fingerprint": dataset.fingerprint(),
        "num_images": num_images,
        "num_classes": int(dataset.num_classes),
        "shape": [num_images, *ROW_SHAPE],
        "dtype": "uint8",
        "layout": "NHWC RGB",
    }
    completed, unreadable = 0, []
    old = None if overwrite else _read_manifest(directory)
    if old is not None:
        if old.get("kind") != KIND:
            raise StaleCacheError(
                f"{manifest_path} is not the manifest of a decoded image cache (kind {old.get('kind')!r}); "
                "choose another directory"
            )
        if {key: old.get(key) for key in expected} != expected:
            raise StaleCacheError(
                f"{manifest_path} holds decoded images of another dataset ({old.get('dataset_fingerprint')}, "
                f"{old.get('num_images')} images) than {_describe_source(dataset)} ({expected['dataset_fingerprint']}"
                f", {num_images} images); pass --overwrite to replace it or choose another directory"
            )
        completed, unreadable = int(old["completed"]), [int(index) for index in old.get("unreadable", [])]
    images_path = directory / IMAGES
    shape = (num_images, *ROW_SHAPE)
    resume = completed > 0 and images_path.exists() and images_path.stat().st_size == num_images * ROW_BYTES
    if not resume:
        completed, unreadable = 0, []
        images_path.unlink(missing_ok=True)
    _check_disk_space(directory, num_images)
    np.save(directory / LABELS, np.asarray(dataset.labels, dtype=np.int64))
    store = np.memmap(images_path, dtype=np.uint8, mode="r+" if resume else "w+", shape=shape)

    def write_manifest() -> None:
        store.flush()
        payload = {**expected, "source": _describe_source(dataset), "completed": completed, "unreadable": unreadable}
        _write_json_atomic(manifest_path, payload)

    write_manifest()
    if completed < num_images:
        loader = DataLoader(
            Subset(dataset, range(completed, num_images)),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_faces,
            shuffle=False,
        )
        bar = tqdm(total=num_images, initial=completed, desc="decoded image cache", unit="img", disable=not progress)
        since_flush = 0
        for batch in loader:
            indices = batch.indices.numpy()
            store[indices] = batch.images.permute(0, 2, 3, 1).numpy()
            size = len(indices) + batch.skipped
            if batch.skipped:
                # The loader reads in order, so this batch covered [completed, completed + size).
                unreadable.extend(sorted(set(range(completed, completed + size)) - set(indices.tolist())))
            completed += size
            since_flush += size
            bar.update(size)
            if since_flush >= chunk_images:
                write_manifest()
                since_flush = 0
        bar.close()
        write_manifest()
    cache = DecodedImageDataset(directory, dataset.skip_bad)
    cache.check(dataset)
    return cache


def open_decoded_cache(dataset: FaceDataset, directory: str | Path, num_workers: int | None = None) -> FaceDataset:
    """``dataset`` served from its decoded cache in ``directory``, built there first if missing or unfinished.

    A cache of another dataset is refused, never overwritten.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None or int(manifest.get("completed", 0)) < int(manifest.get("num_images", 1)):
        if num_workers is None:
            num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
        return build_decoded_cache(dataset, directory, num_workers=num_workers)
    cache = DecodedImageDataset(directory, dataset.skip_bad)
    cache.check(dataset)
    return cache
