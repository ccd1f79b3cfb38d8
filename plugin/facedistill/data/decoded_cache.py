"""The decoded-image cache: every training image decoded once into a uint8 memory map, so loaders outrun a GPU.

Layout of a cache directory (a ``facedistill.data.rowstore`` store)::

    images.u8      uint8 memory map [N, 112, 112, 3]: row i is image i, RGB, exactly as ``decode_image`` returns it
    chunks.done    one byte per chunk of rows: set once that chunk's images are on disk
    missing/       per chunk, the rows whose images were unreadable (built with skip_bad)
    labels.npy     int64 [N], the source dataset's labels
    manifest.json  format, source dataset fingerprint, N, classes, the store's layout

An image costs 37,632 bytes (1M images: 35 GiB), so the cache is for datasets that fit on a local disk, ideally in
the page cache: reading a batch is then one memory gather instead of 128 JPEG decodes. The cache stands in for its
source dataset: same indices, labels, classes and fingerprint, so a teacher cache built from either lines up with
both. Building is resumable chunk by chunk and serialised by a lock file, so several processes of one job may open
the same cache (the first builds it, the others wait and then read it); a build may also be split over processes
with ``rank``/``world_size``. A cache of another dataset, or an unfinished one, is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from facedistill.data.dataset_base import FaceDataset, ordered_loader
from facedistill.data.images import FACE_SIZE, ImageDecodeError
from facedistill.data.rowstore import (
    DEFAULT_CHUNK_ROWS,
    MANIFEST,
    RowLayout,
    RowStore,
    StaleCacheError,
    open_for_writing,
    read_manifest,
)

# Format 2: completion tracked by per-chunk markers (format 1 counted completed rows and is refused).
CACHE_FORMAT = 2
KIND = "decoded-images"
IMAGES = "images.u8"
LABELS = "labels.npy"
ROW_SHAPE = (FACE_SIZE[1], FACE_SIZE[0], 3)
WHAT = "decoded image cache"
COMMAND = "facedistill cache-images"
SPACE_ADVICE = "choose a directory with room, or leave data.decoded_cache unset to decode images on the fly"


def _describe_source(dataset: FaceDataset) -> str:
    for attribute in ("root", "rec_path"):
        if hasattr(dataset, attribute):
            return str(getattr(dataset, attribute))
    return type(dataset).__name__


def _open_store(directory: Path) -> RowStore:
    store = RowStore(directory, WHAT, COMMAND, {"kind": KIND, "format": CACHE_FORMAT})
    if store.layout.shape[1:] != ROW_SHAPE or store.layout.dtype != "uint8":
        raise StaleCacheError(
            f"{directory / MANIFEST}: rows {store.layout.shape} of {store.layout.dtype} are not images "
            f"{ROW_SHAPE} of uint8; rebuild it with `{COMMAND} --overwrite`"
        )
    return store


class DecodedImageDataset(FaceDataset):
    """A finished decoded-image cache read as a ``FaceDataset``: the same items as its source, with no decoding.

    Rows are read through a memory map opened lazily in each process (a DataLoader worker maps the file itself
    rather than receiving a pickled copy of it). ``__getitems__`` reads a whole batch in one gather.
    """

    def __init__(self, directory: str | Path, skip_bad: bool = False) -> None:
        super().__init__(skip_bad)
        self.directory = Path(directory)
        self.store = _open_store(self.directory)
        self.store.require_complete()
        self.manifest = self.store.manifest
        self.labels = np.load(self.directory / LABELS)
        if len(self.labels) != self.num_images:
            raise StaleCacheError(
                f"{self.directory / LABELS} holds {len(self.labels)} labels for {self.num_images} images; "
                f"rebuild the cache with `{COMMAND} --overwrite`"
            )
        self.num_classes = int(self.manifest["num_classes"])
        self.source = str(self.manifest.get("source", "?"))
        self.unreadable = frozenset(self.store.missing_rows().tolist())

    @property
    def num_images(self) -> int:
        return self.store.layout.num_rows

    @property
    def images(self) -> np.memmap:
        """The [N, H, W, 3] uint8 rows, mapped on first use in this process."""
        return self.store.data()

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
                f"({fingerprint}, {len(source)} images); rebuild it with `{COMMAND} --overwrite` "
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


def build_decoded_cache(
    dataset: FaceDataset,
    directory: str | Path,
    batch_size: int = 256,
    num_workers: int = 2,
    overwrite: bool = False,
    chunk_images: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DecodedImageDataset | None:
    """Decode every image of ``dataset`` into ``directory``; resumes a partial cache of the same dataset.

    Unreadable images stop the build (naming the file) unless ``dataset.skip_bad``: then they are recorded as
    unreadable rows, which the cache skips as its source would. Process ``rank`` of ``world_size`` decodes only its
    share of the unfinished chunks (``chunk_images`` rows each, fixed when the cache is created). The checked cache
    is returned once every chunk is done; None while other ranks are still writing theirs (the caller waits for
    them, then opens ``DecodedImageDataset(directory)``). A single process (the default) always gets the cache.
    """
    directory = Path(directory)
    num_images = len(dataset)
    identity = {
        "format": CACHE_FORMAT,
        "kind": KIND,
        "dataset_fingerprint": dataset.fingerprint(),
        "num_images": num_images,
        "num_classes": int(dataset.num_classes),
        "shape": [num_images, *ROW_SHAPE],
        "dtype": "uint8",
        "layout": "NHWC RGB",
    }
    layout = RowLayout(IMAGES, num_images, ROW_SHAPE, "uint8", chunk_images)

    def save_labels(target: Path) -> None:
        np.save(target / LABELS, np.asarray(dataset.labels, dtype=np.int64))

    with open_for_writing(
        directory,
        identity,
        layout,
        WHAT,
        COMMAND,
        overwrite=overwrite,
        rank=rank,
        world_size=world_size,
        extra={"source": _describe_source(dataset)},
        on_create=save_labels,
        space_advice=SPACE_ADVICE,
    ) as store:
        with store.writer(rank, world_size, desc="decoded image cache", progress=progress) as writer:
            if len(writer.rows):
                loader = ordered_loader(dataset, writer.rows.tolist(), batch_size, num_workers)
                for batch in loader:
                    indices = batch.indices.numpy()
                    writer.data[indices] = batch.images.permute(0, 2, 3, 1).numpy()
                    # The loader reads in order, so the batch covered the next len + skipped rows; the skipped ones
                    # (unreadable under skip_bad) are recorded as missing.
                    writer.advance(len(indices) + batch.skipped, written=indices)
        if not store.complete:
            return None
    cache = DecodedImageDataset(directory, dataset.skip_bad)
    cache.check(dataset)
    return cache


def open_decoded_cache(dataset: FaceDataset, directory: str | Path, num_workers: int | None = None) -> FaceDataset:
    """``dataset`` served from its decoded cache in ``directory``, built there first if missing or unfinished.

    A cache of another dataset is refused, never overwritten. Every process that calls this builds whatever is
    unfinished in one go, the others waiting on the build lock, so it suits several ranks of one job.
    """
    directory = Path(directory)
    if read_manifest(directory) is None or not _open_store(directory).complete:
        if num_workers is None:
            num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
        built = build_decoded_cache(dataset, directory, num_workers=num_workers)
        if built is not None:  # always: a single process writes every unfinished chunk
            return built
    cache = DecodedImageDataset(directory, dataset.skip_bad)
    cache.check(dataset)
    return cache
