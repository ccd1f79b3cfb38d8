from __future__ import annotations

import hashlib
import pickle
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedistill.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    frame_record,
    iter_records,
    open_face_record,
    pack_folder_to_recordio,
    pack_record,
    rebuild_index,
    unpack_record,
)

M = struct.pack("<I", 0xCED7230A)


def frame(cflag: int, payload: bytes) -> bytes:
    """A frame built by hand from the dmlc description, independent of the module under test."""
    return struct.pack("<II", 0xCED7230A, (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def make_images(root: Path, counts: tuple[int, ...] = (2, 3, 4)) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(0)
    samples = []
    for label, count in enumerate(counts):
        folder = root / f"id{label}"
        folder.mkdir(parents=True)
        for j in range(count):
            img = rng.integers(0, 255, size=(112, 112, 3), dtype=np.uint8)
            ext = ".png" if j % 2 else ".jpg"
            ok, buf = cv2.imencode(ext, img)
            assert ok
            path = folder / f"{j}{ext}"
            path.write_bytes(buf.tobytes())
            samples.append((path, label))
    return samples


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, list[tuple[Path, int]]]:
    samples = make_images(tmp_path / "images")
    rec = pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    return rec, samples


# --- format, checked against hand-built bytes ------------------------------------------------------


def test_magic_and_frame_match_hand_built_bytes() -> None:
    assert MAGIC == 0xCED7230A
    assert frame_record(b"abcde") == bytes.fromhex("0a23d7ce") + struct.pack("<I", 5) + b"abcde\0\0\0"
    assert frame_record(b"abcd") == frame(0, b"abcd")
    assert frame_record(b"") == frame(0, b"")


def test_irheader_matches_struct_layout() -> None:
    scalar = pack_record(IRHeader(0, 3.0, 7, 0), b"img")
    assert scalar == struct.pack("<IfQQ", 0, 3.0, 7, 0) + b"img"
    # A label vector sets flag to its length, zeroes the scalar label and precedes the payload (mxnet pack).
    vector = pack_record(IRHeader(0, (5.0, 9.0), 0, 0), b"xy")
    assert vector == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 9.0) + b"xy"
    assert unpack_record(scalar) == (IRHeader(0, 3.0, 7, 0), b"img")
    assert unpack_record(vector) == (IRHeader(2, (5.0, 9.0), 0, 0), b"xy")


def test_unpack_rejects_short_records() -> None:
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack_record(b"\0" * 10)
    with pytest.raises(RecordIOError, match="1000 float labels"):
        unpack_record(struct.pack("<IfQQ", 1000, 0.0, 0, 0) + b"\0" * 8)


def test_writer_file_bytes_and_idx_match_hand_built(tmp_path: Path) -> None:
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec) as w:
        w.write(0, b"abcde")
        w.write(5, b"")
        w.write(2, b"wxyz")
    assert rec.read_bytes() == frame(0, b"abcde") + frame(0, b"") + frame(0, b"wxyz")
    assert idx.read_text() == "0\t0\n5\t16\n2\t24\n"
    with RecordIOReader(rec) as r:
        assert r.keys() == [0, 5, 2]
        assert [r.read(k) for k in (2, 0, 5)] == [b"wxyz", b"abcde", b""]


def test_aligned_magic_splits_into_multipart_frames(tmp_path: Path) -> None:
    data = b"abcd" + M + b"efgh" + M + b"ij"
    expected = frame(1, b"abcd") + frame(2, b"efgh") + frame(3, b"ij")
    assert frame_record(data) == expected
    # An unaligned magic is left inside the frame, as dmlc only checks 4-byte-aligned positions.
    unaligned = b"a" + M + b"bcd"
    assert frame_record(unaligned) == frame(0, unaligned)
    assert frame_record(M) == frame(1, b"") + frame(3, b"")

    rec = tmp_path / "m.rec"
    rec.write_bytes(frame(0, b"head") + expected + frame(1, b"") + frame(3, b""))
    (tmp_path / "m.idx").write_text(f"0\t0\n1\t12\n2\t{12 + len(expected)}\n")
    with RecordIOReader(rec) as r:
        assert r.read(1) == data
        assert r.read(2) == M
    assert [payload for _, payload in iter_records(rec)] == [b"head", data, M]


def test_multipart_round_trip_through_writer(tmp_path: Path) -> None:
    payloads = [M * 3, b"x" * 7 + M, bytes(range(256)) * 3 + M + b"z"]
    with RecordIOWriter(tmp_path / "p.rec") as w:
        for key, p in enumerate(payloads):
            w.write(key, p)
    with RecordIOReader(tmp_path / "p.rec") as r:
        assert [r.read(k) for k in range(3)] == payloads


# --- insightface layout ----------------------------------------------------------------------------


def test_pack_and_read_back_identical(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, samples = packed
    assert rec.name == "train.rec"
    assert (rec.parent / "train.idx").is_file()
    assert (rec.parent / "property").read_text() == "3,112,112\n"
    with open_face_record(rec, progress=False) as ds:
        assert ds.num_images == len(ds) == 9
        assert ds.num_classes == 3
        assert ds.image_size == (112, 112)
        assert ds.labels.dtype == np.int64
        assert ds.labels.tolist() == [label for _, label in samples]
        for i, (path, _) in enumerate(samples):
            assert ds.read_image_bytes(i) == path.read_bytes()
    # A directory is accepted too.
    with open_face_record(rec.parent, progress=False) as ds:
        assert ds.num_images == 9


def test_packed_layout_is_insightface(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, samples = packed
    n, c = len(samples), 3
    with RecordIOReader(rec) as r:
        assert sorted(r.keys()) == list(range(n + 1 + c))
        head, payload = unpack_record(r.read(0))
        assert head.flag == 2 and head.label == (n + 1, n + 1 + c) and payload == b""
        # arcface_torch MXFaceDataset: imgidx = range(1, int(header.label[0]))
        assert list(range(1, int(head.label[0]))) == list(range(1, n + 1))
        for key in range(1, n + 1):
            h, _ = unpack_record(r.read(key))
            assert h == IRHeader(0, float(samples[key - 1][1]), key, 0)
            assert r.read_header(key) == h
        ranges = [unpack_record(r.read(n + 1 + label))[0].label for label in range(c)]
    assert ranges == [(1, 3), (3, 6), (6, 10)]


def test_face2rec2_style_vector_labels_and_headerless_files(tmp_path: Path) -> None:
    # face2rec2.py stores image labels as [label, aligned]; readers take label[0].
    rec = tmp_path / "v" / "train.rec"
    rec.parent.mkdir()
    with RecordIOWriter(rec) as w:
        w.write(0, pack_record(IRHeader(2, (4.0, 6.0), 0), b""))
        for key, label in zip((1, 2, 3), (0, 1, 1), strict=True):
            w.write(key, pack_record(IRHeader(0, (float(label), 1.0), key), f"img{key}".encode()))
    with open_face_record(rec, progress=False) as ds:
        assert ds.labels.tolist() == [0, 1, 1]
        assert ds.num_classes == 2 and ds.property_path is None and ds.image_size is None
        assert ds.read_image_bytes(2) == b"img3"

    # rec2shufrec.py-style: no header record, every key is an image with a scalar label.
    rec = tmp_path / "s" / "train.rec"
    rec.parent.mkdir()
    with RecordIOWriter(rec) as w:
        for key, label in enumerate((2, 0, 1)):
            w.write(key, pack_record(IRHeader(0, float(label), key), bytes([key])))
    with open_face_record(rec, progress=False) as ds:
        assert ds.labels.tolist() == [2, 0, 1]
        assert [ds.read_image_bytes(i) for i in range(3)] == [b"\0", b"\1", b"\2"]


def test_random_access_threads_and_pickle(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, samples = packed
    expected = [p.read_bytes() for p, _ in samples]
    order = list(range(len(samples))) * 5
    random.Random(0).shuffle(order)
    with open_face_record(rec, progress=False) as ds:
        assert [ds.read_image_bytes(i) for i in order] == [expected[i] for i in order]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ds.read_image_bytes, order)) == [expected[i] for i in order]
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.read_image_bytes(3) == expected[3]
        assert ds.read_image_bytes(-1) == expected[-1]
        with pytest.raises(IndexError):
            ds.read_image_bytes(len(samples))


class _Bytes:
    def __init__(self, ds: object) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, str]:
        data = self.ds.read_image_bytes(i)  # type: ignore[attr-defined]
        return i, hashlib.sha256(data).hexdigest()


def test_dataloader_workers_read_correct_records(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    torch = pytest.importorskip("torch")
    rec, samples = packed
    ds = open_face_record(rec, progress=False)
    ds.read_image_bytes(0)  # the parent opens its handle first; workers must not share its offset
    loader = torch.utils.data.DataLoader(_Bytes(ds), batch_size=None, num_workers=2, shuffle=True)
    got = dict(iter(loader))
    assert {int(i): h for i, h in got.items()} == {
        i: hashlib.sha256(p.read_bytes()).hexdigest() for i, (p, _) in enumerate(samples)
    }
    ds.close()


def test_rebuild_index(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, _ = packed
    idx = rec.with_suffix(".idx")
    original = idx.read_text()
    idx.unlink()
    with pytest.raises(FileNotFoundError, match="rebuild_index"):
        RecordIOReader(rec)
    rebuild_index(rec)
    rebuilt = dict(line.split("\t") for line in idx.read_text().splitlines())
    assert rebuilt == dict(line.split("\t") for line in original.splitlines())


# --- packing validation ----------------------------------------------------------------------------


def test_pack_validates_samples(tmp_path: Path) -> None:
    samples = make_images(tmp_path / "images", (2, 2))
    with pytest.raises(ValueError, match="sorted by label"):
        pack_folder_to_recordio([samples[i] for i in (0, 2, 1, 3)], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="first sample must have label 0"):
        pack_folder_to_recordio(list(reversed(samples)), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="contiguous"):
        pack_folder_to_recordio([(p, 2 * lab) for p, lab in samples], tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="first sample must have label 0"):
        pack_folder_to_recordio([(p, lab + 1) for p, lab in samples], tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="no samples"):
        pack_folder_to_recordio([], tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match=r"112x112 \(HxW\) but the record is declared 96x112"):
        pack_folder_to_recordio(samples, tmp_path / "e", image_size=(96, 112), progress=False)
    # A failed pack leaves nothing that looks like a dataset.
    assert list((tmp_path / "e").iterdir()) == []
    not_image = tmp_path / "x.jpg"
    not_image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.jpg: not a readable image"):
        pack_folder_to_recordio([(not_image, 0)], tmp_path / "f", progress=False)
    pack_folder_to_recordio(samples, tmp_path / "g", progress=False)
    with pytest.raises(FileExistsError):
        pack_folder_to_recordio(samples, tmp_path / "g", progress=False)
    pack_folder_to_recordio(samples, tmp_path / "g", progress=False, overwrite=True)


# --- corrupt input ---------------------------------------------------------------------------------


def _offsets(rec: Path) -> dict[int, int]:
    return {int(k): int(v) for k, v in (line.split("\t") for line in rec.with_suffix(".idx").read_text().splitlines())}


def test_truncated_rec(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, samples = packed
    n = len(samples)
    offsets = _offsets(rec)
    # Cut the file inside the last image record: keys after it now point past EOF, the image is short.
    data = rec.read_bytes()
    rec.write_bytes(data[: offsets[n] + 40])
    with pytest.raises(RecordIOError, match=rf"key {n + 1} points at byte offset {offsets[n + 1]}"):
        RecordIOReader(rec)
    rec.with_suffix(".idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items() if k <= n))
    with RecordIOReader(rec) as r:
        assert r.read(1) == pack_record(IRHeader(0, 0.0, 1), samples[0][0].read_bytes())
        with pytest.raises(RecordIOError, match=rf"train.rec: key {n}, byte offset {offsets[n]}: truncated"):
            r.read(n)


def test_bad_magic(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, _ = packed
    offsets = _offsets(rec)
    with open_face_record(rec, progress=False) as ds:
        with open(rec, "r+b") as f:  # corrupt in place, after the labels were scanned
            f.seek(offsets[2])
            f.write(b"\xde\xad\xbe\xef")
        with pytest.raises(RecordIOError) as info:
            ds.read_image_bytes(1)
    message = str(info.value)
    assert "train.rec: key 2" in message and f"byte offset {offsets[2]}" in message
    assert "bad magic 0xefbeadde" in message and "rebuild the index" in message
    # Opening scans every image header, so the corruption is caught up front too.
    with pytest.raises(RecordIOError, match="key 2, byte offset .*bad magic"):
        open_face_record(rec, progress=False)


def test_idx_offset_beyond_eof_and_bad_idx_lines(tmp_path: Path) -> None:
    rec = tmp_path / "t.rec"
    with RecordIOWriter(rec) as w:
        w.write(0, b"a" * 10)
        w.write(1, b"b" * 10)
    idx = rec.with_suffix(".idx")
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=r"t.idx:2: key 1 points at byte offset 4096, outside .*t.rec"):
        RecordIOReader(rec)
    idx.write_text("0\t0\n1\t-20\n")
    with pytest.raises(RecordIOError, match="key 1 points at byte offset -20"):
        RecordIOReader(rec)
    idx.write_text("0\t0\nbanana\n")
    with pytest.raises(RecordIOError, match=r"t.idx:2: expected 'key<TAB>offset'"):
        RecordIOReader(rec)
    idx.write_text("0\t0\n0\t20\n")
    with pytest.raises(RecordIOError, match=r"t.idx:2: key 0 appears twice"):
        RecordIOReader(rec)
    idx.write_text("0\t0\n1\t6\n")
    with RecordIOReader(rec) as r, pytest.raises(RecordIOError, match="key 1, byte offset 6"):
        r.read(1)
    idx.write_text("0\t0\n")
    with RecordIOReader(rec) as r, pytest.raises(RecordIOError, match=r"key 7 is not in the index .*t.idx"):
        r.read(7)


def test_huge_length_field_is_rejected_without_reading(tmp_path: Path) -> None:
    rec = tmp_path / "t.rec"
    rec.write_bytes(struct.pack("<II", MAGIC, (1 << 29) - 1) + b"x" * 16)
    rec.with_suffix(".idx").write_text("0\t0\n")
    with RecordIOReader(rec) as r, pytest.raises(RecordIOError, match="key 0.*frame length 536870911"):
        r.read(0)


def test_offset_into_middle_of_multipart_record(tmp_path: Path) -> None:
    rec = tmp_path / "t.rec"
    rec.write_bytes(frame(1, b"abcd") + frame(3, b"ef") + frame(1, b"gh"))
    rec.with_suffix(".idx").write_text("0\t0\n1\t12\n2\t24\n")
    with RecordIOReader(rec) as r:
        assert r.read(0) == b"abcd" + M + b"ef"
        with pytest.raises(RecordIOError, match="key 1.*middle of a multi-part record"):
            r.read(1)
        with pytest.raises(RecordIOError, match="key 2.*truncated"):
            r.read(2)


def test_property_mismatch_names_the_file(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, _ = packed
    prop = rec.parent / "property"
    prop.write_text("5,112,112\n")
    with pytest.raises(RecordIOError, match=r"property: says 5 classes, but the image labels .* run 0..2"):
        open_face_record(rec, progress=False)
    prop.write_text("three,112,112\n")
    with pytest.raises(RecordIOError, match="property: first line must be 'num_classes,height,width'"):
        open_face_record(rec, progress=False)
    # insightface's rec2shufrec.py appends more lines after the first; only the first matters.
    prop.write_text("3,112,112\n9\nshuffled\n")
    with open_face_record(rec, progress=False) as ds:
        assert ds.num_classes == 3


def test_label_scan_handles_multipart_images_and_rejects_bad_labels(tmp_path: Path) -> None:
    rec = tmp_path / "train.rec"
    # The IRHeader is 24 bytes, so an image starting with the magic splits the record into parts.
    images = [M + b"jpeg", b"plain", b"x" * 5 + M]
    with RecordIOWriter(rec) as w:
        w.write(0, pack_record(IRHeader(2, (4.0, 6.0), 0), b""))
        for key, (label, img) in enumerate(zip((0, 0, 1), images, strict=True), start=1):
            w.write(key, pack_record(IRHeader(0, (float(label), 1.0) if key == 3 else float(label), key), img))
    assert _offsets(rec)[2] - _offsets(rec)[1] == 2 * 8 + 24 + 4  # two frames for key 1
    with open_face_record(rec, progress=False) as ds:
        assert ds.labels.tolist() == [0, 0, 1]
        assert [ds.read_image_bytes(i) for i in range(3)] == images

    for bad in (1.5, -1.0, float("nan")):
        with RecordIOWriter(rec) as w:
            w.write(0, pack_record(IRHeader(0, 0.0, 0), b"a"))
            w.write(1, pack_record(IRHeader(0, bad, 1), b"b"))
        with pytest.raises(RecordIOError, match=r"train.rec: key 1: image label .* is not a non-negative integer"):
            open_face_record(rec, progress=False)


def test_truncated_last_image_is_caught_when_opening(packed: tuple[Path, list[tuple[Path, int]]]) -> None:
    rec, samples = packed
    n = len(samples)
    offsets = _offsets(rec)
    rec.write_bytes(rec.read_bytes()[: offsets[n] + 40])
    rec.with_suffix(".idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items() if k <= n))
    with pytest.raises(RecordIOError, match=rf"key {n}, byte offset {offsets[n]}: truncated"):
        open_face_record(rec, progress=False)


# --- insightface RecBuilder's flat layout, and layouts that cannot be read -------------------------------------------


def _recbuilder_style(rec: Path, labels: list[list[float] | float]) -> list[bytes]:
    """What ``insightface.data.RecBuilder.add_image`` writes: keys from 0, every one an image, no header record."""
    rec.parent.mkdir(parents=True, exist_ok=True)
    images = [f"jpeg{key}".encode() for key in range(len(labels))]
    with RecordIOWriter(rec) as w:
        for key, (label, image) in enumerate(zip(labels, images, strict=True)):
            w.write(key, pack_record(IRHeader(0, label if isinstance(label, float) else tuple(label), key), image))
    classes = int(max(lab if isinstance(lab, float) else lab[0] for lab in labels)) + 1
    (rec.parent / "property").write_text(f"{classes},112,112\n{len(labels)}\n")  # RecBuilder.close() adds the count
    return images


def test_recbuilder_vector_labels_with_an_image_at_key_0(tmp_path: Path) -> None:
    # rec_add_mask_param: [class, 0.0, 235 mask parameters], or [class] + 236 x -1.0 where no mask fitted.
    labels: list[list[float] | float] = [
        [0.0, 0.0, *np.linspace(-1, 1, 235)],
        [0.0, *[-1.0] * 236],
        [1.0, 0.0, *np.linspace(0, 2, 235)],
        [2.0, *[-1.0] * 236],
    ]
    rec = tmp_path / "masked" / "train.rec"
    images = _recbuilder_style(rec, labels)
    with RecordIOReader(rec) as r:
        assert r.read_header(0).flag == 237  # key 0 is an image whose header flag > 0, not an index header
    with open_face_record(rec, progress=False) as ds:
        assert ds.keys.tolist() == [0, 1, 2, 3]
        assert ds.labels.tolist() == [0, 0, 1, 2] and ds.num_classes == 3 and ds.image_size == (112, 112)
        assert [ds.read_image_bytes(i) for i in range(4)] == images


def test_recbuilder_scalar_labels(tmp_path: Path) -> None:
    rec = tmp_path / "flat" / "train.rec"
    images = _recbuilder_style(rec, [0.0, 0.0, 1.0])
    with open_face_record(rec, progress=False) as ds:
        assert ds.labels.tolist() == [0, 0, 1] and [ds.read_image_bytes(i) for i in range(3)] == images


def _one_line_naming(error: pytest.ExceptionInfo[RecordIOError], rec: Path, key: int) -> str:
    message = str(error.value)
    assert message.startswith(f"{rec}: key {key}: "), message
    # Short beside the path it names, whatever the length of the folder the test runs in.
    said = message.removeprefix(f"{rec}: key {key}: ")
    assert "\n" not in message and len(said) < 150, (len(said), message)
    return message


def test_unreadable_layouts_are_refused_in_one_short_line(tmp_path: Path) -> None:
    # A 2-value label at key 0 is a header by insightface's rule; (0, 1) is no image key range, as it is for an
    # image at key 0 that RecBuilder wrote with a [class, flag] vector label.
    rec = tmp_path / "pairs" / "train.rec"
    _recbuilder_style(rec, [[0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(RecordIOError) as error:
        open_face_record(rec, progress=False)
    assert "header label (0, 1) is not an image key range; expected insightface's (N+1, N+1+C)" in _one_line_naming(
        error, rec, 0
    )

    # A header that promises images the .idx does not list.
    rec = tmp_path / "short" / "train.rec"
    rec.parent.mkdir()
    with RecordIOWriter(rec) as w:
        w.write(0, pack_record(IRHeader(2, (5.0, 7.0), 0), b""))
        for key in (1, 2, 4):
            w.write(key, pack_record(IRHeader(0, 0.0, key), b"img"))
    with pytest.raises(RecordIOError) as error:
        open_face_record(rec, progress=False)
    assert "the key 0 header says images are keys 1..4" in _one_line_naming(error, rec, 3)

    # Records whose labels are not classes.
    rec = tmp_path / "floats" / "train.rec"
    _recbuilder_style(rec, [0.0, 0.5])
    with pytest.raises(RecordIOError) as error:
        open_face_record(rec, progress=False)
    assert "image label 0.5 is not a non-negative integer" in _one_line_naming(error, rec, 1)

    # A 237-value label at key 0 used to be taken for a header and refused with all 237 values in the message.
    rec = tmp_path / "masked" / "train.rec"
    _recbuilder_style(rec, [[0.0, *[-1.0] * 236], [0.5, *[-1.0] * 236]])
    with pytest.raises(RecordIOError) as error:
        open_face_record(rec, progress=False)
    _one_line_naming(error, rec, 1)


# --- insightface's own writer (RecBuilder) and arcface_torch's own key rule ------------------------------------------


def _mxnet_recordio_stand_in() -> object:
    """``mxnet.recordio`` as ``insightface.data.rec_builder`` uses it, backed by facedistill's writer.

    mxnet 1.9 cannot be imported with numpy >= 1.24, so RecBuilder's ``import mxnet`` is given this module. What the
    test exercises is RecBuilder's own code: which keys it writes, in which order, with which label layout, and
    its ``property`` file. The byte format under it is mxnet's (checked against hand-built frames above)."""
    import types

    class MXIndexedRecordIO:
        def __init__(self, idx_path: str, uri: str, flag: str) -> None:
            assert flag == "w"
            self.writer = RecordIOWriter(uri, idx_path)

        def write_idx(self, idx: int, buf: bytes) -> None:
            self.writer.write(idx, buf)

        def close(self) -> None:  # mxnet writes the .idx when the writer is closed or collected
            self.writer.close()

    def irheader(flag: int, label: object, id: int, id2: int) -> IRHeader:  # noqa: A002 - mxnet's field name
        return IRHeader(flag, tuple(float(v) for v in label) if isinstance(label, list) else float(label), id, id2)

    def pack_img(header: IRHeader, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
        ok, encoded = cv2.imencode(img_fmt, img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return pack_record(header, encoded.tobytes())

    return types.SimpleNamespace(
        MXIndexedRecordIO=MXIndexedRecordIO, IRHeader=irheader, pack=pack_record, pack_img=pack_img
    )


@pytest.fixture
def rec_builder(monkeypatch: pytest.MonkeyPatch) -> type:
    pytest.importorskip("insightface", reason="insightface is not installed (.[test] has it)")
    import importlib
    import sys
    import types

    monkeypatch.setitem(sys.modules, "mxnet", types.SimpleNamespace(recordio=_mxnet_recordio_stand_in()))
    monkeypatch.delitem(sys.modules, "insightface.data.rec_builder", raising=False)
    return importlib.import_module("insightface.data.rec_builder").RecBuilder


def _faces(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (112, 112)) for _ in range(count)]


@pytest.mark.parametrize("layout", ["scalar labels (add)", "vector labels (add_image, as rec_add_mask_param)"])
def test_rec_written_by_insightface_recbuilder_reads_image_and_label_identical(
    rec_builder: type, tmp_path: Path, layout: str
) -> None:
    out = tmp_path / "rec"
    builder = rec_builder(str(out))
    faces, classes = _faces(7, 0), [0, 0, 0, 1, 2, 2, 2]
    if layout.startswith("scalar"):
        for label in range(3):
            builder.add([face for face, c in zip(faces, classes, strict=True) if c == label])
    else:
        for face, label in zip(faces, classes, strict=True):
            # rec_add_mask_param's label: the class, then 236 mask parameters (here -1: no mask fitted).
            builder.add_image(face, [float(label), *[-1.0] * 236])
    builder.close()
    builder.writer.close()
    with RecordIOReader(out / "train.rec") as reader:
        keys = reader.keys()
        written = [unpack_record(reader.read(key))[1] for key in keys]
        assert reader.read_header(0).flag == (0 if layout.startswith("scalar") else 237)
    with open_face_record(out / "train.rec", progress=False) as ds:
        assert ds.labels.tolist() == classes and ds.num_classes == 3 and ds.image_size == (112, 112)
        assert [ds.read_image_bytes(i) for i in range(len(classes))] == written
        decoded = [cv2.imdecode(np.frombuffer(ds.read_image_bytes(i), np.uint8), cv2.IMREAD_COLOR) for i in range(7)]
    for image, face in zip(decoded, faces, strict=True):
        assert np.abs(image.astype(int) - face).mean() < 3  # JPEG q95 of the image RecBuilder was given


def _framework_image_keys(rec: Path) -> list[int]:
    """arcface_torch ``MXFaceDataset.__init__``'s rule, as its dataset.py writes it: key 0's header has flag > 0 ->
    images are ``range(1, int(header.label[0]))``, else every key of the .idx."""
    with RecordIOReader(rec) as reader:
        header, _ = unpack_record(reader.read(0))
        if header.flag > 0:
            return list(range(1, int(header.label[0])))
        return reader.keys()


def test_facedistill_pack_reads_with_the_framework_key_rule(tmp_path: Path) -> None:
    samples = make_images(tmp_path / "images")
    out = pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    rec = out / "train.rec" if out.is_dir() else out
    keys = _framework_image_keys(rec)
    with RecordIOReader(rec) as reader, open_face_record(rec, progress=False) as ds:
        assert keys == ds.keys.tolist()
        labels = [unpack_record(reader.read(key))[0].label for key in keys]
        framework_labels = [int(label[0] if isinstance(label, tuple) else label) for label in labels]
        assert framework_labels == ds.labels.tolist() == [label for _, label in samples]
        assert [unpack_record(reader.read(key))[1] for key in keys] == [Path(p).read_bytes() for p, _ in samples]
