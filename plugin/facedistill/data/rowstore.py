"""Row stores: the one resumable, shardable memory-mapped layout under the teacher and decoded-image caches.

Layout of a store directory::

    <data file>    memory map [N, *row_shape] of one numpy dtype, allocated sparse at creation
    chunks.done    uint8 memory map [ceil(N / chunk_rows)]: byte c is 1 once the rows of chunk c are written
    missing/       c.json: rows of chunk c that could not be produced (unreadable images), only where there are any
    manifest.json  the caller's identity fields (kind, format, fingerprint, ...) and the layout under "store"
    .build.lock    fcntl lock that serialises creating the store

Completion is tracked per fixed-size chunk of rows rather than as a count of finished rows, because a count only
describes a prefix written by one process. A chunk's marker is set only after its rows are flushed, so after a kill
at any point the finished chunks are exactly the marked ones and a resumed build redoes only the others. Process
``rank`` of ``world_size`` writes the pending chunks ``c`` with ``c % world_size == rank``: several processes fill
one store at once, each touching only its own rows and marker bytes, and a store begun by 4 processes can be
finished by 1 or 3. ``chunk_rows`` is fixed in the manifest at creation, so the chunks never move under a resume.

The manifest is written once, at creation, under the lock; later openers (other ranks, a resumed build) validate it
instead of creating the files again. Concurrent writers must share one host's page cache: memory maps of one file
on a network filesystem are not coherent across hosts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builders of one store are then the user's to avoid
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
DONE = "chunks.done"
MISSING = "missing"
LOCK = ".build.lock"
STORE_VERSION = 1
DEFAULT_CHUNK_ROWS = 4096
# Headroom beyond the data file itself, so that building a store does not fill the disk to the last byte.
DISK_MARGIN_BYTES = 256 * 2**20


class StaleCacheError(ValueError):
    """A store was built for another source or settings, in an older format, or is not finished yet."""


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` so that a reader (or a process killed half-way) never leaves or sees a partial file: write
    a sibling unique to this process, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The store manifest of ``directory``, or None when there is none (nothing was created there yet)."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing), printing ``waiting`` if another process has it.

    The kernel drops a process's locks when it dies, so a killed builder never leaves a stale lock behind.
    """
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class RowLayout:
    """What the data file holds: ``num_rows`` rows of ``row_shape`` and ``dtype``, finished ``chunk_rows`` at a
    time."""

    data_file: str
    num_rows: int
    row_shape: tuple[int, ...]
    dtype: str
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        if self.num_rows < 1 or self.chunk_rows < 1:
            raise ValueError(f"a row store needs at least one row and one row a chunk, not {self}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_rows, *self.row_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_rows / self.chunk_rows)

    def chunk(self, index: int) -> range:
        """The rows of chunk ``index``; the last chunk may be shorter."""
        return range(index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.num_rows))

    def to_manifest(self) -> dict[str, Any]:
        return {
            "version": STORE_VERSION,
            "data": self.data_file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunk_rows": self.chunk_rows,
            "num_chunks": self.num_chunks,
            "done": DONE,
        }

    @classmethod
    def from_manifest(cls, section: Any) -> RowLayout | None:
        """The layout a manifest records, or None when it records none this version can read."""
        if not isinstance(section, dict) or section.get("version") != STORE_VERSION:
            return None
        try:
            shape = [int(size) for size in section["shape"]]
            return cls(
                str(section["data"]), shape[0], tuple(shape[1:]), str(section["dtype"]), int(section["chunk_rows"])
            )
        except (KeyError, IndexError, TypeError, ValueError):
            return None


def _differences(old: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    return [
        f"{key} {old.get(key)!r} here, {value!r} wanted" for key, value in identity.items() if old.get(key) != value
    ]


def refuse_foreign(manifest_path: Path, old: dict[str, Any], identity: dict[str, Any], what: str, command: str) -> None:
    """Raise StaleCacheError, saying what to do, unless ``old`` holds every field of ``identity`` unchanged.

    A store of another kind is never to be overwritten by mistake, so it gets its own message; one of an older
    format (such as the caches that counted completed rows before chunk markers) must be rebuilt.
    """
    kind = identity.get("kind")
    if kind is not None and old.get("kind") not in (None, kind):
        raise StaleCacheError(
            f"{manifest_path} is not the manifest of a {what} (kind {old.get('kind')!r}, not {kind!r}); "
            "choose another directory"
        )
    if "format" in identity and old.get("format") != identity["format"]:
        raise StaleCacheError(
            f"{manifest_path}: this {what} is of format {old.get('format')!r} (kind {old.get('kind')!r}) but this "
            f"version reads and writes format {identity['format']}; rebuild it with `{command} --overwrite` "
            "(or pass --overwrite to replace it)"
        )
    differences = _differences(old, identity)
    if differences:
        raise StaleCacheError(
            f"{manifest_path} holds a {what} of another source or settings ({'; '.join(differences[:4])}); "
            "pass --overwrite to replace it or choose another directory"
        )


def check_disk_space(path: Path, layout: RowLayout, what: str, advice: str) -> None:
    """Fail before allocating, not with a crash half-way: writing a memory map past a full disk kills the process
    with SIGBUS instead of raising an error."""
    needed = layout.nbytes
    # The file is sparse: blocks already written by an interrupted build need no new space.
    allocated = path.stat().st_blocks * 512 if path.exists() else 0
    missing = needed - min(allocated, needed)
    free = shutil.disk_usage(path.parent).free
    if free < missing + DISK_MARGIN_BYTES:
        raise OSError(
            f"the {what} {path} needs {needed / 2**30:.2f} GiB ({layout.num_rows} rows x {layout.row_bytes} bytes; "
            f"{missing / 2**30:.2f} GiB still to write) but {path.parent} has {free / 2**30:.2f} GiB free; {advice}"
        )


class RowStore:
    """An existing store: its manifest, data rows (mapped lazily, once per process) and chunk markers.

    ``what`` names the store in messages ("teacher cache") and ``command`` is what builds or finishes it
    ("facedistill cache-teacher"). ``identity`` holds manifest fields the caller requires (at least kind and
    format when reading); a store whose fields differ is refused. Pickling drops the maps, so a DataLoader worker
    maps the files itself instead of receiving a copy of the rows.
    """

    def __init__(self, directory: str | Path, what: str, command: str, identity: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.what = what
        self.command = command
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(f"{self.directory} is not a {what} (no {MANIFEST}); build one with `{command}`")
        refuse_foreign(self.manifest_path, manifest, identity or {}, what, command)
        layout = RowLayout.from_manifest(manifest.get("store"))
        if layout is None:
            raise StaleCacheError(
                f"{self.manifest_path}: this {what} was written by another version (no chunk markers it can read); "
                f"rebuild it with `{command} --overwrite`"
            )
        self.manifest = manifest
        self.layout = layout
        for path, size, unit in (
            (self.data_path, layout.nbytes, layout.row_bytes),
            (self.done_path, layout.num_chunks, 1),
        ):
            if not path.exists() or path.stat().st_size != size:
                raise StaleCacheError(
                    f"{path} is missing or not {size // unit} x {unit} bytes; rebuild the {what} with "
                    f"`{command} --overwrite`"
                )
        self._data: np.memmap | None = None
        self._done: np.memmap | None = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def data_path(self) -> Path:
        return self.directory / self.layout.data_file

    @property
    def done_path(self) -> Path:
        return self.directory / DONE

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = state["_done"] = None
        return state

    def data(self) -> np.memmap:
        """The rows, read-only. Shared with the writers' maps, so rows finished later by another process show up."""
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=self.layout.dtype, mode="r", shape=self.layout.shape)
        return self._data

    def done(self) -> np.ndarray:
        """bool [num_chunks]: which chunks are finished now (read afresh: other processes may be writing)."""
        if self._done is None:
            self._done = np.memmap(self.done_path, dtype=np.uint8, mode="r", shape=(self.layout.num_chunks,))
        return np.asarray(self._done) != 0

    @property
    def chunks_done(self) -> int:
        return int(self.done().sum())

    @property
    def rows_done(self) -> int:
        return sum(len(self.layout.chunk(index)) for index in np.flatnonzero(self.done()).tolist())

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def require_complete(self) -> None:
        """Refuse to serve a store with unwritten rows (they read as zeros), saying how to finish it."""
        if not self.complete:
            raise StaleCacheError(
                f"{self.what} {self.directory} is incomplete: {self.chunks_done}/{self.layout.num_chunks} chunks "
                f"({self.rows_done}/{self.layout.num_rows} rows) done; run `{self.command}` again to finish it"
            )

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The unfinished chunks that process ``rank`` of ``world_size`` writes: those with c % world_size == rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world_size={world_size} processes")
        done = self.done()
        return [index for index in range(rank, self.layout.num_chunks, world_size) if not done[index]]

    def missing_rows(self) -> np.ndarray:
        """Sorted int64 rows that finished chunks recorded as not produced (e.g. unreadable images)."""
        done = self.done()
        rows: list[int] = []
        folder = self.directory / MISSING
        if folder.is_dir():
            for note in folder.glob("*.json"):
                if note.stem.isdigit() and int(note.stem) < len(done) and done[int(note.stem)]:
                    rows.extend(int(row) for row in json.loads(note.read_text())["rows"])
        return np.asarray(sorted(rows), dtype=np.int64)

    @contextmanager
    def writer(
        self, rank: int = 0, world_size: int = 1, desc: str = "rows", progress: bool = True
    ) -> Iterator[ChunkWriter]:
        """A ``ChunkWriter`` for this process's pending chunks; it marks chunks only as they finish."""
        writer = ChunkWriter(self, self.pending_chunks(rank, world_size), rank, world_size, desc, progress)
        try:
            yield writer
        finally:
            writer.close()
        writer.check_covered()


class ChunkWriter:
    """Fills the rows of some chunks in order and marks each chunk done once all its rows are flushed.

    ``rows`` lists the rows to produce, chunk after chunk in ascending order; the caller writes them into ``data``
    (a loader reading ``rows`` in order) and reports each step with ``advance``.
    """

    def __init__(
        self, store: RowStore, chunks: Sequence[int], rank: int, world_size: int, desc: str, progress: bool
    ) -> None:
        layout = store.layout
        self.store = store
        self.chunks = list(chunks)
        spans = [layout.chunk(index) for index in self.chunks]
        self.rows = np.concatenate([np.arange(span.start, span.stop) for span in spans] or [np.empty(0)]).astype(
            np.int64
        )
        self._ends = np.cumsum([len(span) for span in spans], dtype=np.int64)
        self._position = 0
        self._next = 0
        self._missing: dict[int, list[int]] = {}
        self.data = np.memmap(store.data_path, dtype=layout.dtype, mode="r+", shape=layout.shape)
        self._done = np.memmap(store.done_path, dtype=np.uint8, mode="r+", shape=(layout.num_chunks,))
        share = range(rank, layout.num_chunks, world_size)
        total = sum(len(layout.chunk(index)) for index in share)
        label = desc if world_size == 1 else f"{desc} [rank {rank}/{world_size}]"
        self._bar = tqdm(total=total, initial=total - len(self.rows), desc=label, unit="row", disable=not progress)

    def advance(self, count: int, written: np.ndarray | Sequence[int] | None = None) -> None:
        """The next ``count`` rows of ``rows`` were handled. ``written`` lists those actually produced (None: all);
        the others are recorded as missing. Chunks now fully handled are flushed, then marked done."""
        covered = self.rows[self._position : self._position + count]
        if len(covered) != count:
            raise ValueError(f"{count} rows reported but only {len(covered)} of this writer's rows remain")
        if written is not None:
            missing = np.setdiff1d(covered, np.asarray(written, dtype=np.int64))
            # Zeroed, not left as an earlier attempt may have written them: a store's bytes depend only on its rows.
            self.data[missing] = 0
            for row in missing.tolist():
                self._missing.setdefault(row // self.store.layout.chunk_rows, []).append(row)
        self._position += count
        self._bar.update(count)
        finished = []
        while self._next < len(self.chunks) and self._ends[self._next] <= self._position:
            finished.append(self.chunks[self._next])
            self._next += 1
        if finished:
            self._finish(finished)

    def _finish(self, chunks: list[int]) -> None:
        # Rows reach the disk before their markers: a marker never claims rows that a crash could still lose.
        self.data.flush()
        folder = self.store.directory / MISSING
        for index in chunks:
            note = folder / f"{index}.json"
            rows = sorted(self._missing.pop(index, []))
            if rows:
                folder.mkdir(exist_ok=True)
                write_json_atomic(note, {"chunk": index, "rows": rows})
            else:
                note.unlink(missing_ok=True)  # left by an earlier attempt at this chunk
            self._done[index] = 1
        self._done.flush()

    def close(self) -> None:
        self._bar.close()

    def check_covered(self) -> None:
        """After a loop that ended normally: every row handed out must have been reported, or chunks stay open."""
        if self._position != len(self.rows):
            raise RuntimeError(
                f"{self.store.what} {self.store.directory}: only {self._position} of the {len(self.rows)} rows to "
                "write were reported; the writing loop lost rows"
            )


@contextmanager
def open_for_writing(
    directory: str | Path,
    identity: dict[str, Any],
    layout: RowLayout,
    what: str,
    command: str,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    extra: dict[str, Any] | None = None,
    on_create: Callable[[Path], None] | None = None,
    space_advice: str = "choose a directory with room",
) -> Iterator[RowStore]:
    """Open the store in ``directory`` for writing, creating it (sparse data file, zeroed markers, manifest) first
    when there is none; a store whose manifest differs from ``identity`` is refused unless ``overwrite``.

    Creation is serialised by a lock, so several ranks starting together create the store once and the others
    validate it. With ``world_size == 1`` the lock is held until the block ends: a second single-process builder
    waits, then finds the rows written, instead of writing them again. With several ranks ``overwrite`` replaces only
    a store of another identity, layout or format and resumes a matching one, since another rank of the same job
    may already be filling it. ``layout.chunk_rows`` applies to a new store only; an existing one keeps its own.
    ``on_create(directory)`` writes the caller's side files of a new store, before its manifest exists. ``extra``
    fields go into the manifest but are not compared.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world_size={world_size} processes")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    waiting = f"waiting for another process writing the {what} {directory} ..."
    with file_lock(directory / LOCK, waiting):
        store = _create_or_open(
            directory, identity, layout, what, command, overwrite, world_size, extra, on_create, space_advice
        )
        if world_size == 1:
            yield store
            return
    yield store


def _matches(old: dict[str, Any], identity: dict[str, Any], layout: RowLayout) -> bool:
    stored = RowLayout.from_manifest(old.get("store"))
    return (
        not _differences(old, identity)
        and stored is not None
        and (stored.data_file, stored.shape, stored.dtype) == (layout.data_file, layout.shape, layout.dtype)
    )


def _create_or_open(
    directory: Path,
    identity: dict[str, Any],
    layout: RowLayout,
    what: str,
    command: str,
    overwrite: bool,
    world_size: int,
    extra: dict[str, Any] | None,
    on_create: Callable[[Path], None] | None,
    space_advice: str,
) -> RowStore:
    old = read_manifest(directory)
    if old is not None and not (overwrite and (world_size == 1 or not _matches(old, identity, layout))):
        refuse_foreign(directory / MANIFEST, old, identity, what, command)
        store = RowStore(directory, what, command)
        if not _matches(old, identity, layout):
            raise StaleCacheError(
                f"{directory / MANIFEST} holds rows {store.layout.shape} of {store.layout.dtype} in "
                f"{store.layout.data_file}, not {layout.shape} of {layout.dtype} in {layout.data_file}; "
                "pass --overwrite to replace it or choose another directory"
            )
        check_disk_space(store.data_path, store.layout, what, space_advice)
        return store
    # The manifest goes first and comes back last: a crash in between leaves no manifest, so the next opener
    # creates the store again instead of trusting half-made files.
    (directory / MANIFEST).unlink(missing_ok=True)
    data_path = directory / layout.data_file
    replaced = RowLayout.from_manifest((old or {}).get("store"))
    for path in {data_path, directory / DONE, directory / (replaced.data_file if replaced else layout.data_file)}:
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / MISSING, ignore_errors=True)
    check_disk_space(data_path, layout, what, space_advice)
    for path, size in ((data_path, layout.nbytes), (directory / DONE, layout.num_chunks)):
        with open(path, "wb") as handle:
            handle.truncate(size)  # sparse: zero bytes that take no disk blocks until rows are written
            handle.flush()
            os.fsync(handle.fileno())
    if on_create is not None:
        on_create(directory)
    write_json_atomic(directory / MANIFEST, {**identity, **(extra or {}), "store": layout.to_manifest()})
    return RowStore(directory, what, command)
