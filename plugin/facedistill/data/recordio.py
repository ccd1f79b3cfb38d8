"""MXNet/insightface RecordIO (``.rec`` + ``.idx``) read and written from the format, without mxnet.

Format (dmlc-core ``recordio.cc`` and ``mxnet/recordio.py``):

* A record on disk is one or more *frames*. A frame is ``uint32 magic`` (0xced7230a, little-endian),
  ``uint32 lrecord`` (upper 3 bits ``cflag``, lower 29 bits ``length``), ``length`` payload bytes and zero
  padding up to a multiple of 4.
* dmlc's writer splits a record wherever the 4 magic bytes occur at a 4-byte-aligned offset in the data, so a
  reader that scans for the magic can always resync. The parts carry ``cflag`` 1 (first), 2 (middle) and 3
  (last); the magic itself is dropped and re-inserted between the parts on reading. ``cflag`` 0 is a whole
  record. This module writes and reads all four, exactly as dmlc does.
* ``.idx`` is text, one ``key<TAB>byte_offset`` line per record.
* The payload of an image record is an ``IRHeader`` (``struct '<IfQQ'``: flag, label, id, id2); when
  ``flag > 0``, ``flag`` float32 labels follow the header and replace the scalar label. The rest is the
  encoded image.

insightface layouts. The *indexed* one (``face2rec2.py`` and :func:`pack_folder_to_recordio` write it,
``arcface_torch/dataset.py`` reads it): key 0 is a header record with label vector ``(N + 1, N + 1 + C)``; keys
``1..N`` are images in label order; keys ``N+1 .. N+C`` are one record per identity whose label vector is
``(first_image_key, end_image_key)``. The *flat* one (``insightface.data.RecBuilder``, used by ``insightface
rec.addmaskparam``): every key from 0 is an image, with a scalar label or, for ``add_image(img, [label, ...])``,
a label vector (``rec_add_mask_param`` writes 237 floats: the class, then mask parameters), so key 0 may be an
image whose ``flag > 0``. Which one a file is follows insightface's own rule (``rec_add_mask_param``): key 0 is the
header when its label is a vector of exactly 2 values, and the images are then ``range(1, int(label[0]))``;
otherwise every key of the ``.idx`` is an image. (arcface_torch's ``MXFaceDataset`` checks only ``flag > 0``, so it
takes the first image of a flat file with vector labels for a header and reads no images.) Image labels are the
scalar label (flag 0) or ``label[0]`` of the vector. A ``property`` file beside the ``.rec`` holds
``num_classes,height,width`` on its first line (RecBuilder adds the image count on a second).
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "MAGIC",
    "MAX_FRAME_LENGTH",
    "FaceRecord",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "frame_record",
    "iter_records",
    "open_face_record",
    "pack_folder_to_recordio",
    "pack_record",
    "read_property",
    "rebuild_index",
    "unpack_record",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_CFLAG_SHIFT = 29
MAX_FRAME_LENGTH = (1 << _CFLAG_SHIFT) - 1
_UINT64_MAX = (1 << 64) - 1
# Enough for the frame header, the IRHeader and a few float labels in one read while scanning labels.
_HEAD_PROBE = _FRAME.size + _IR.size + 4 * 8
_PROBE = struct.Struct("<IIIfQQ")  # frame header + IRHeader, parsed in one call by the label scan
_FLOAT = struct.Struct("<f")
_PROGRESS_THRESHOLD = 10_000
_FLOAT32_EXACT = 1 << 24

_REBUILD_HINT = (
    "The .idx may not belong to this .rec, or the file is truncated or corrupt: rebuild the index with "
    "facedistill.data.recordio.rebuild_index() or re-pack the dataset."
)


# Guards lazy opening (and seek+read where os.pread is missing). Replaced in a forked child, because a
# lock that another parent thread held at fork time would stay locked there forever.
_io_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    global _io_lock
    _io_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


class RecordIOError(ValueError):
    """A ``.rec``/``.idx``/``property`` file is malformed, truncated or inconsistent."""


@dataclass(frozen=True)
class IRHeader:
    """mxnet's image-record header. ``label`` is a float, or a tuple of floats stored after the header.

    As in ``mxnet.recordio.pack``, :func:`pack_record` derives the on-disk ``flag`` from ``label`` (0 for a
    scalar, the vector length otherwise), so ``flag`` given here is ignored when packing.
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int = 0


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Return the record payload for ``header`` + ``payload`` (mxnet ``recordio.pack``)."""
    for name in ("id", "id2"):
        value = getattr(header, name)
        if not isinstance(value, numbers.Integral) or not 0 <= int(value) <= _UINT64_MAX:
            raise ValueError(f"IRHeader.{name} must be an integer in [0, 2**64), got {value!r}")
    if isinstance(header.label, numbers.Real):
        head = _IR.pack(0, float(header.label), int(header.id), int(header.id2))
        return head + bytes(payload)
    vector = np.asarray(header.label, dtype="<f4").ravel()
    if vector.size == 0:
        # mxnet would write flag 0 here and the reader would see a scalar label of 0.
        raise ValueError("IRHeader.label vector is empty; use a scalar label instead")
    head = _IR.pack(int(vector.size), 0.0, int(header.id), int(header.id2))
    return head + vector.tobytes() + bytes(payload)


def unpack_record(data: bytes | bytearray | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the remaining bytes (mxnet ``unpack``)."""
    view = memoryview(data)
    if len(view) < _IR.size:
        raise RecordIOError(f"record is {len(view)} bytes, shorter than the {_IR.size}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(view, 0)
    if flag == 0:
        return IRHeader(0, float(label), id_, id2), bytes(view[_IR.size :])
    end = _IR.size + 4 * flag
    if end > len(view):
        raise RecordIOError(
            f"IRHeader flag says {flag} float labels follow, but the record has only "
            f"{len(view) - _IR.size} bytes after the header"
        )
    vector = np.frombuffer(view[_IR.size : end], dtype="<f4")
    return IRHeader(flag, tuple(float(x) for x in vector), id_, id2), bytes(view[end:])


def _encode_lrec(cflag: int, length: int) -> bytes:
    return _FRAME.pack(MAGIC, (cflag << _CFLAG_SHIFT) | length)


def frame_record(data: bytes | bytearray | memoryview) -> bytes:
    """Encode one record as the frames dmlc's ``RecordIOWriter::WriteRecord`` writes for it."""
    data = bytes(data)
    n = len(data)
    if n > MAX_FRAME_LENGTH:
        # A part can only be this long when no aligned magic splits it; keep the simple, safe limit.
        raise ValueError(f"record of {n} bytes exceeds the RecordIO limit of {MAX_FRAME_LENGTH} bytes")
    out = bytearray()
    start = 0
    hit = data.find(_MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:
            out += _encode_lrec(1 if start == 0 else 2, hit - start)
            out += data[start:hit]
            start = hit + 4
            hit = data.find(_MAGIC_BYTES, start)
        else:
            hit = data.find(_MAGIC_BYTES, hit + 1)
    out += _encode_lrec(3 if start else 0, n - start)
    out += data[start:]
    # start is a multiple of 4, so padding the last part pads the whole record as dmlc does.
    out += b"\x00" * (-n % 4)
    return bytes(out)


def _read_record_at(
    pread: Callable[[int, int], bytes], file_size: int, offset: int, where: Callable[[int], str]
) -> tuple[bytes, int]:
    """Read the record whose first frame starts at ``offset``; return it and the offset after it.

    ``where(pos)`` names the file, key and position for error messages. Every length is checked against
    ``file_size`` before reading, so a corrupt length field can neither hang nor allocate gigabytes.
    """
    if offset < 0 or offset % 4:
        raise RecordIOError(f"{where(offset)}: offset is not a valid frame start. {_REBUILD_HINT}")
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + _FRAME.size > file_size:
            raise RecordIOError(
                f"{where(pos)}: truncated record: the frame header needs {_FRAME.size} bytes but the file "
                f"ends at byte {file_size}. {_REBUILD_HINT}"
            )
        head = pread(pos, _FRAME.size)
        if len(head) < _FRAME.size:
            raise RecordIOError(f"{where(pos)}: file ended while reading a frame header. {_REBUILD_HINT}")
        magic, lrec = _FRAME.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{where(pos)}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}). {_REBUILD_HINT}")
        cflag, length = lrec >> _CFLAG_SHIFT, lrec & MAX_FRAME_LENGTH
        if cflag > 3:
            raise RecordIOError(f"{where(pos)}: invalid continuation flag {cflag}. {_REBUILD_HINT}")
        if not parts and cflag in (2, 3):
            raise RecordIOError(
                f"{where(pos)}: offset points into the middle of a multi-part record (cflag {cflag}). {_REBUILD_HINT}"
            )
        if parts and cflag in (0, 1):
            raise RecordIOError(
                f"{where(pos)}: multi-part record is missing its last part (found cflag {cflag}). {_REBUILD_HINT}"
            )
        data_end = pos + _FRAME.size + length
        if data_end > file_size:
            raise RecordIOError(
                f"{where(pos)}: truncated record: frame length {length} runs to byte {data_end} but the "
                f"file ends at byte {file_size}. {_REBUILD_HINT}"
            )
        chunk = pread(pos + _FRAME.size, length) if length else b""
        if len(chunk) < length:
            raise RecordIOError(f"{where(pos)}: file ended inside the record payload. {_REBUILD_HINT}")
        parts.append(chunk)
        pos = data_end + (-length % 4)
        if cflag in (0, 3):
            break
    record = parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
    return record, pos


def _parse_index(idx_path: Path, file_size: int, rec_path: Path) -> tuple[list[int], dict[int, int]]:
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}. "
                    f"Rebuild the index with facedistill.data.recordio.rebuild_index()."
                ) from None
            if key in offsets:
                raise RecordIOError(
                    f"{idx_path}:{lineno}: key {key} appears twice. Rebuild the index with "
                    f"facedistill.data.recordio.rebuild_index()."
                )
            if offset < 0 or offset + _FRAME.size > file_size:
                raise RecordIOError(
                    f"{idx_path}:{lineno}: key {key} points at byte offset {offset}, outside {rec_path} "
                    f"({file_size} bytes). {_REBUILD_HINT}"
                )
            keys.append(key)
            offsets[key] = offset
    return keys, offsets


class RecordIOReader:
    """Random access to an indexed RecordIO file (``.rec`` + ``.idx``).

    Safe to share with DataLoader workers: reads use ``os.pread`` where available (no shared file
    position), and the file is reopened lazily in every process, so forked workers never share an offset.
    The reader pickles without its file handle.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        if not self.idx_path.is_file():
            raise FileNotFoundError(
                f"RecordIO index not found: {self.idx_path} (for {self.rec_path}). Create it with "
                f"facedistill.data.recordio.rebuild_index()."
            )
        self._file_size = self.rec_path.stat().st_size
        self._keys, self._offsets = _parse_index(self.idx_path, self._file_size, self.rec_path)
        self._file: io.FileIO | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def _handle(self) -> io.FileIO:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            with _io_lock:
                if self._file is None or self._pid != pid:
                    # The inherited handle (if any) belongs to the parent; it is left for GC to close.
                    self._file = io.FileIO(self.rec_path, "rb")
                    self._pid = pid
        return self._file

    def _pread(self, offset: int, size: int) -> bytes:
        f = self._handle()
        if hasattr(os, "pread"):
            chunks = []
            while size > 0:
                chunk = os.pread(f.fileno(), size, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                size -= len(chunk)
            return b"".join(chunks)
        with _io_lock:
            f.seek(offset)
            return f.read(size) or b""

    def _where(self, key: int) -> Callable[[int], str]:
        return lambda pos: f"{self.rec_path}: key {key}, byte offset {pos}"

    def _offset(self, key: int) -> int:
        try:
            return self._offsets[key]
        except (KeyError, TypeError):
            raise RecordIOError(
                f"{self.rec_path}: key {key!r} is not in the index {self.idx_path} ({len(self._keys)} keys)"
            ) from None

    def keys(self) -> list[int]:
        """Record keys in ``.idx`` order."""
        return list(self._keys)

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s first frame in the ``.rec``."""
        return self._offset(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (multi-part records reassembled)."""
        offset = self._offset(key)
        record, _ = _read_record_at(self._pread, self._file_size, offset, self._where(key))
        return record

    def read_header(self, key: int) -> IRHeader:
        """The :class:`IRHeader` of ``key``'s record, reading only the first few dozen bytes."""
        offset = self._offset(key)
        head = self._pread(offset, min(_HEAD_PROBE, self._file_size - offset))
        if len(head) >= _FRAME.size:
            magic, lrec = _FRAME.unpack_from(head, 0)
            cflag, length = lrec >> _CFLAG_SHIFT, lrec & MAX_FRAME_LENGTH
            whole = offset + _FRAME.size + length <= self._file_size
            if magic == MAGIC and cflag == 0 and length >= _IR.size and whole:
                flag = _IR.unpack_from(head, _FRAME.size)[0]
                needed = _IR.size + 4 * flag
                if needed <= length and _FRAME.size + needed <= len(head):
                    header, _ = unpack_record(head[_FRAME.size : _FRAME.size + needed])
                    return header
        # Rare paths (long label vectors, multi-part or corrupt records) take the full, fully checked read.
        return self.read_ir(key)[0]

    def read_labels(self, keys: Sequence[int], *, progress: bool = False, desc: str = "labels") -> np.ndarray:
        """First label of each record (the scalar label, or ``label[0]`` of a vector) as float64.

        The fast loop behind :func:`open_face_record`'s label scan: one small read per record, with
        anything unusual handed to :meth:`read_header`, which reads fully and raises precise errors.
        """
        out = np.empty(len(keys), dtype=np.float64)
        offsets, size = self._offsets, self._file_size
        probe = _PROBE.size + 4
        fd = self._handle().fileno() if hasattr(os, "pread") else -1
        for i, key in enumerate(tqdm(keys, desc=desc, disable=not progress, mininterval=1.0)):
            offset = offsets.get(key)
            if offset is not None:
                head = os.pread(fd, probe, offset) if fd >= 0 else self._pread(offset, probe)
                if len(head) >= _PROBE.size:
                    magic, lrec, flag, label = _PROBE.unpack_from(head)[:4]
                    length = lrec & MAX_FRAME_LENGTH
                    if (
                        magic == MAGIC
                        and lrec >> _CFLAG_SHIFT == 0
                        and offset + _FRAME.size + length <= size
                        and length >= _IR.size + 4 * min(flag, 1)
                    ):
                        if flag == 0:
                            out[i] = label
                            continue
                        if len(head) >= probe:
                            out[i] = _FLOAT.unpack_from(head, _PROBE.size)[0]
                            continue
            header = self.read_header(key)
            out[i] = header.label if isinstance(header.label, float) else header.label[0]
        return out

    def read_ir(self, key: int) -> tuple[IRHeader, bytes]:
        """``unpack_record(read(key))``, with errors naming the file, key and offset."""
        record = self.read(key)
        try:
            return unpack_record(record)
        except RecordIOError as exc:
            where = self._where(key)(self._offsets[key])
            raise RecordIOError(f"{where}: {exc}. {_REBUILD_HINT}") from None

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RecordIOWriter:
    """Write an indexed RecordIO file; the ``.idx`` is written by :meth:`close`.

    Leaving the ``with`` block through an exception closes the ``.rec`` without writing an ``.idx``, so a
    half-written dataset is never mistaken for a complete one.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._file: io.BufferedWriter | None = open(self.rec_path, "wb")  # noqa: SIM115 - closed in close()
        self._entries: list[tuple[int, int]] = []
        self._seen: set[int] = set()
        self._pos = 0

    def write(self, key: int, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"RecordIOWriter for {self.rec_path} is closed")
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or int(key) < 0:
            raise ValueError(f"RecordIO keys must be non-negative integers, got {key!r}")
        key = int(key)
        if key in self._seen:
            raise ValueError(f"key {key} was already written to {self.rec_path}")
        framed = frame_record(data)
        self._file.write(framed)
        self._entries.append((key, self._pos))
        self._seen.add(key)
        self._pos += len(framed)

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        with open(self.idx_path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{key}\t{offset}\n" for key, offset in self._entries)

    def abort(self) -> None:
        """Close the ``.rec`` without writing the ``.idx``."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_records(rec_path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, record)`` for every record of a ``.rec`` in file order, without an index."""
    rec_path = Path(rec_path)
    file_size = rec_path.stat().st_size
    with open(rec_path, "rb") as f:

        def pread(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        pos = 0
        while pos < file_size:
            start = pos
            record, pos = _read_record_at(pread, file_size, start, lambda p: f"{rec_path}: byte offset {p}")
            yield start, record


def rebuild_index(
    rec_path: str | os.PathLike[str],
    idx_path: str | os.PathLike[str] | None = None,
    *,
    key: str = "header_id",
) -> Path:
    """Recreate the ``.idx`` of a ``.rec`` by scanning it.

    ``key="header_id"`` uses each record's ``IRHeader.id`` as its key, which is how insightface's
    ``face2rec2.py`` keyed its records; ``key="ordinal"`` numbers records 0, 1, ... in file order (for
    record files written without an index, e.g. by ``rec2shufrec.py``).
    """
    if key not in ("header_id", "ordinal"):
        raise ValueError(f"key must be 'header_id' or 'ordinal', got {key!r}")
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    lines: list[str] = []
    seen: set[int] = set()
    for ordinal, (offset, record) in enumerate(iter_records(rec_path)):
        if key == "ordinal":
            record_key = ordinal
        else:
            try:
                record_key = unpack_record(record)[0].id
            except RecordIOError as exc:
                raise RecordIOError(f"{rec_path}: byte offset {offset}: {exc}") from None
            if record_key in seen:
                raise RecordIOError(
                    f"{rec_path}: byte offset {offset}: IRHeader id {record_key} is not unique, so it "
                    f"cannot be the key; use rebuild_index(..., key='ordinal')"
                )
            seen.add(record_key)
        lines.append(f"{record_key}\t{offset}\n")
    tmp = idx_path.with_name(idx_path.name + ".partial")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, idx_path)
    return idx_path


def read_property(path: str | os.PathLike[str]) -> tuple[int, tuple[int, int] | None]:
    """Parse an insightface ``property`` file: ``(num_classes, (height, width) or None)``."""
    path = Path(path)
    first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    fields = [f.strip() for f in first[0].split(",")] if first else []
    try:
        if len(fields) not in (1, 3):
            raise ValueError
        values = [int(f) for f in fields]
    except ValueError:
        raise RecordIOError(
            f"{path}: first line must be 'num_classes,height,width' (e.g. '85742,112,112'), got "
            f"{first[0] if first else ''!r}"
        ) from None
    if values[0] <= 0 or any(v <= 0 for v in values[1:]):
        raise RecordIOError(f"{path}: values must be positive, got {first[0]!r}")
    return values[0], (values[1], values[2]) if len(values) == 3 else None


class FaceRecord:
    """An insightface face dataset in RecordIO form: image bytes and integer labels in dataset order.

    Use :func:`open_face_record`. Labels are read once by scanning the image headers; the object pickles
    cheaply (labels plus a :class:`RecordIOReader`) for DataLoader workers.
    """

    def __init__(
        self,
        reader: RecordIOReader,
        keys: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        image_size: tuple[int, int] | None,
        property_path: Path | None,
    ):
        self.reader = reader
        self.keys = keys
        self.labels = labels
        self.num_classes = num_classes
        self.image_size = image_size
        self.property_path = property_path

    @property
    def rec_path(self) -> Path:
        return self.reader.rec_path

    @property
    def num_images(self) -> int:
        return int(self.keys.shape[0])

    def __len__(self) -> int:
        return self.num_images

    def read_image_bytes(self, i: int) -> bytes:
        """Encoded bytes of image ``i`` (0-based, dataset order)."""
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"image index {i} out of range for {self.num_images} images in {self.rec_path}")
        return self.reader.read_ir(int(self.keys[i]))[1]

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> FaceRecord:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_face_record(rec_path: str | os.PathLike[str], *, progress: bool = True) -> FaceRecord:
    """Open an insightface ``train.rec`` (or a directory holding one) with its ``.idx`` and ``property``."""
    rec_path = Path(rec_path)
    if rec_path.is_dir():
        rec_path = rec_path / "train.rec"
    reader = RecordIOReader(rec_path)
    try:
        return _open_face_record(reader, progress)
    except BaseException:
        reader.close()
        raise


def _short_label(label: float | tuple[float, ...]) -> str:
    """A label for a one-line message: the scalar, or a vector's first two values and its length."""
    if isinstance(label, float):
        return f"{label:g}"
    shown = ", ".join(f"{value:g}" for value in label[:2])
    return f"({shown})" if len(label) <= 2 else f"({shown}, ... {len(label)} values)"


def _image_keys(reader: RecordIOReader) -> np.ndarray:
    """The image keys of an insightface ``.rec``, by insightface's rule (module docstring): ``1..N`` when key 0 is
    a header (a label vector of 2 values, ``(N + 1, N + 1 + C)``), every key of the ``.idx`` otherwise. A header
    that does not describe keys of the ``.idx`` is refused in one line naming the file, the key and the layout."""
    rec_path = reader.rec_path
    all_keys = reader.keys()
    header0 = reader.read_header(0) if 0 in reader else None
    if header0 is None or not isinstance(header0.label, tuple) or len(header0.label) != 2:
        return np.asarray(all_keys, dtype=np.int64)
    end = header0.label[0]
    if not math.isfinite(end) or end < 1 or end != int(end):
        raise RecordIOError(
            f"{rec_path}: key 0: header label {_short_label(header0.label)} is not an image key range; expected "
            "insightface's (N+1, N+1+C) with images at keys 1..N"
        )
    keys = np.arange(1, int(end), dtype=np.int64)
    missing = keys[np.isin(keys, np.asarray(all_keys, dtype=np.int64), invert=True)]
    if missing.size:
        raise RecordIOError(
            f"{rec_path}: key {int(missing[0])}: not in the .idx, but the key 0 header says images are keys "
            f"1..{int(end) - 1}; rebuild_index() or re-pack"
        )
    return keys


def _open_face_record(reader: RecordIOReader, progress: bool) -> FaceRecord:
    rec_path = reader.rec_path
    if len(reader) == 0:
        raise RecordIOError(f"{reader.idx_path}: the index is empty, so {rec_path} holds no images")
    keys = _image_keys(reader)
    if keys.size == 0:
        raise RecordIOError(f"{rec_path}: holds no image records")

    show = progress and keys.shape[0] > _PROGRESS_THRESHOLD
    raw = reader.read_labels(keys.tolist(), progress=show, desc=f"labels {rec_path.name}")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(raw) | (raw < 0) | (raw != np.floor(raw))
    if bad.any():
        i = int(np.argmax(bad))
        raise RecordIOError(
            f"{rec_path}: key {int(keys[i])}: image label {float(raw[i]):g} is not a non-negative integer; "
            "expected insightface image records (label = class)"
        )
    labels = raw.astype(np.int64)

    observed = int(labels.max()) + 1
    property_path = rec_path.parent / "property"
    image_size: tuple[int, int] | None = None
    if property_path.is_file():
        num_classes, image_size = read_property(property_path)
        if num_classes != observed:
            raise RecordIOError(
                f"{property_path}: says {num_classes} classes, but the image labels in {rec_path} run "
                f"0..{observed - 1} ({observed} classes). Fix or delete the property file, or re-pack."
            )
    else:
        property_path = None
        num_classes = observed
    return FaceRecord(reader, keys, labels, num_classes, image_size, property_path)


def _check_samples(samples: Sequence[tuple[str | Path, int]]) -> list[int]:
    if len(samples) == 0:
        raise ValueError("no samples to pack")
    labels: list[int] = []
    for i, (path, label) in enumerate(samples):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ValueError(f"sample {i} ({path}): label must be an integer, got {label!r}")
        label = int(label)
        if not labels and label != 0:
            raise ValueError(
                f"sample 0 ({path}): label {label}; labels must be contiguous 0..C-1 sorted by label, so the "
                f"first sample must have label 0"
            )
        previous = labels[-1] if labels else -1
        if label < previous:
            raise ValueError(
                f"sample {i} ({path}): label {label} follows label {previous}; samples must be sorted by "
                f"label (e.g. sorted(samples, key=lambda s: s[1]))"
            )
        if label > previous + 1:
            raise ValueError(
                f"sample {i} ({path}): label {label} follows label {previous}; labels must be contiguous "
                f"0..C-1 with at least one image each"
            )
        labels.append(label)
    return labels


def _check_image(path: Path, data: bytes, image_size: tuple[int, int] | None) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    if image_size is not None and (height, width) != tuple(image_size):
        raise ValueError(
            f"{path}: image is {height}x{width} (HxW) but the record is declared {image_size[0]}x"
            f"{image_size[1]}; align/resize the images first or pass image_size=None"
        )


def pack_folder_to_recordio(
    samples: Sequence[tuple[str | Path, int]],
    out_dir: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | None = (112, 112),
    progress: bool = True,
    overwrite: bool = False,
    verify_images: bool = True,
) -> Path:
    """Write ``out_dir/train.rec``, ``train.idx`` and ``property`` in the insightface layout.

    ``samples`` are ``(image_path, label)`` sorted by label, with labels 0..C-1 contiguous. Image files are
    stored byte for byte (no re-encoding). With ``verify_images`` each file must open as an image of
    ``image_size`` (height, width); ``image_size=None`` skips the size check and writes ``property``
    without a size. Files are written under temporary names and renamed at the end, so an interrupted pack
    leaves no ``train.rec``/``train.idx`` pair behind. Returns the path of ``train.rec``.
    """
    labels = _check_samples(samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path, prop_path = out_dir / "train.rec", out_dir / "train.idx", out_dir / "property"
    if not overwrite:
        existing = [p for p in (rec_path, idx_path, prop_path) if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True to replace it")

    num_images, num_classes = len(labels), labels[-1] + 1
    if num_images + num_classes + 1 > _FLOAT32_EXACT:
        # Key ranges live in float32 labels; past 2**24 they would silently round.
        raise ValueError(
            f"{num_images} images + {num_classes} identities exceed the 2**24 keys that the insightface "
            f"layout's float32 key ranges can represent exactly; split the dataset"
        )
    tmp_rec = rec_path.with_name("train.rec.partial")
    tmp_idx = idx_path.with_name("train.idx.partial")
    tmp_prop = prop_path.with_name("property.partial")
    try:
        with RecordIOWriter(tmp_rec, tmp_idx) as writer:
            first_identity_key = num_images + 1
            writer.write(0, pack_record(IRHeader(2, (first_identity_key, first_identity_key + num_classes), 0), b""))
            class_start = np.zeros(num_classes + 1, dtype=np.int64)
            show = progress and num_images > _PROGRESS_THRESHOLD
            for key, (path, label) in enumerate(tqdm(samples, desc="pack", disable=not show), start=1):
                data = Path(path).read_bytes()
                if verify_images:
                    _check_image(Path(path), data, image_size)
                writer.write(key, pack_record(IRHeader(0, float(label), key), data))
                class_start[int(label) + 1] = key + 1
            class_start[0] = 1
            for c in range(num_classes):
                key = first_identity_key + c
                start, end = int(class_start[c]), int(class_start[c + 1])
                writer.write(key, pack_record(IRHeader(2, (float(start), float(end)), key), b""))
        size = f",{image_size[0]},{image_size[1]}" if image_size is not None else ""
        tmp_prop.write_text(f"{num_classes}{size}\n", encoding="utf-8")
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_prop, prop_path)
    finally:
        for tmp in (tmp_rec, tmp_idx, tmp_prop):
            tmp.unlink(missing_ok=True)
    return rec_path
