"""The RecordIO and .bin parsers, fed random and mutated bytes, raise clean errors and never hang."""

import contextlib
import pickle

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facedistill.data.recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, pack_record
from facedistill.data.verification import PairsFormatError, UnsafePickleError, read_bin

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_rec(tmp_path):
    rec, idx = tmp_path / "f.rec", tmp_path / "f.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key in range(3):
            writer.write(key, pack_record(IRHeader(0, float(key), key, 0), bytes([key]) * (5 + key)))
    return rec, idx


@FUZZ
@given(data=st.data())
def test_recordio_reader_survives_mutations(tmp_path, data) -> None:
    rec, idx = _valid_rec(tmp_path)
    blob = bytearray(rec.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    rec.write_bytes(bytes(blob[:cut]))
    if data.draw(st.booleans()):
        idx.write_text(data.draw(st.text(alphabet="0123456789\t\n -x", max_size=40)))
    with contextlib.suppress(RecordIOError, FileNotFoundError), RecordIOReader(rec, idx) as reader:
        for key in reader.keys():  # noqa: SIM118  (keys() is the reader's API, not a dict's)
            reader.read(key)


@FUZZ
@given(payload=st.binary(max_size=200))
def test_bin_reader_survives_random_bytes(tmp_path, payload) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(payload)
    with contextlib.suppress(PairsFormatError, UnsafePickleError):
        read_bin(path)


@FUZZ
@given(data=st.data())
def test_bin_reader_survives_mutated_packs(tmp_path, data) -> None:
    blob = bytearray(pickle.dumps(([b"\xff\xd8a", b"\xff\xd8b"], [True]), protocol=data.draw(st.integers(0, 5))))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.bin"
    path.write_bytes(bytes(blob))
    with contextlib.suppress(PairsFormatError, UnsafePickleError):
        read_bin(path)
