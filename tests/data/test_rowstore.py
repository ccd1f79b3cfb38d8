import json
import multiprocessing
import os

import numpy as np
import pytest

from facedistill.data import rowstore
from facedistill.data.rowstore import (
    DONE,
    MANIFEST,
    RowLayout,
    RowStore,
    StaleCacheError,
    open_for_writing,
    write_json_atomic,
)

WHAT, COMMAND = "test store", "facedistill make-test-store"
IDENTITY = {"format": 7, "kind": "test-rows", "fingerprint": "abc"}


def layout(num_rows: int = 10, chunk_rows: int = 4) -> RowLayout:
    return RowLayout("rows.i32", num_rows, (3,), "int32", chunk_rows)


def expected_rows(num_rows: int = 10) -> np.ndarray:
    """Row i holds (i, 2i, 3i) + 1, so no written row equals an unwritten (zero) one."""
    return (np.arange(num_rows, dtype=np.int32)[:, None] * np.array([1, 2, 3], dtype=np.int32)) + 1


def fill(
    directory,
    rank: int = 0,
    world_size: int = 1,
    fail_at_row: int | None = None,
    batch: int = 3,
    unreadable: frozenset[int] = frozenset(),
    **kwargs,
) -> list[int]:
    """Write this rank's pending rows in batches, like a cache builder does; returns the rows it wrote.
    ``fail_at_row`` raises (a kill) when the batch holding that row is about to be written."""
    kwargs.setdefault("identity", IDENTITY)
    kwargs.setdefault("layout", layout())
    wanted = expected_rows(kwargs["layout"].num_rows)
    written: list[int] = []
    opened = open_for_writing(directory, what=WHAT, command=COMMAND, rank=rank, world_size=world_size, **kwargs)
    with opened as store, store.writer(rank, world_size, progress=False) as writer:
        for start in range(0, len(writer.rows), batch):
            rows = writer.rows[start : start + batch]
            if fail_at_row is not None and fail_at_row in rows:
                raise KeyboardInterrupt("simulated kill")
            kept = np.asarray([row for row in rows if row not in unreadable], dtype=np.int64)
            writer.data[kept] = wanted[kept]
            written.extend(kept.tolist())
            writer.advance(len(rows), written=kept)
    return written


def test_rows_and_markers_of_a_finished_store(tmp_path) -> None:
    assert fill(tmp_path / "store") == list(range(10))
    store = RowStore(tmp_path / "store", WHAT, COMMAND, IDENTITY)
    assert store.complete and store.layout.num_chunks == 3 and store.rows_done == 10
    assert np.array_equal(store.data(), expected_rows())
    assert (tmp_path / "store" / DONE).read_bytes() == b"\x01\x01\x01"
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert {key: manifest[key] for key in IDENTITY} == IDENTITY
    assert manifest["store"]["shape"] == [10, 3] and manifest["store"]["chunk_rows"] == 4
    assert "completed" not in manifest
    store.require_complete()


def test_resume_after_a_kill_mid_chunk_redoes_only_unmarked_chunks_byte_identically(tmp_path) -> None:
    fill(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "part", fail_at_row=7)  # rows 0..5 were written: chunk 0 is done, chunk 1 half-written
    partial = RowStore(tmp_path / "part", WHAT, COMMAND)
    assert partial.done().tolist() == [True, False, False] and not partial.complete
    message = r"test store .*part is incomplete: 1/3 chunks \(4/10 rows\) done; run `facedistill make-test-store`"
    with pytest.raises(StaleCacheError, match=message):
        partial.require_complete()
    assert fill(tmp_path / "part") == list(range(4, 10))  # only the rows of unfinished chunks
    full = (tmp_path / "full" / "rows.i32").read_bytes()
    assert (tmp_path / "part" / "rows.i32").read_bytes() == full
    assert RowStore(tmp_path / "part", WHAT, COMMAND).complete


def test_a_chunk_whose_rows_were_written_but_not_marked_is_written_again(tmp_path, monkeypatch) -> None:
    real = rowstore.ChunkWriter._finish

    def killed_before_marking(self, chunks):
        if 1 in chunks:
            self.data.flush()
            raise KeyboardInterrupt("killed between flushing rows and marking the chunk")
        real(self, chunks)

    monkeypatch.setattr(rowstore.ChunkWriter, "_finish", killed_before_marking)
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "store", batch=4)
    monkeypatch.setattr(rowstore.ChunkWriter, "_finish", real)
    assert RowStore(tmp_path / "store", WHAT, COMMAND).done().tolist() == [True, False, False]
    assert fill(tmp_path / "store", batch=4) == list(range(4, 10))
    assert np.array_equal(RowStore(tmp_path / "store", WHAT, COMMAND).data(), expected_rows())


def test_ranks_take_every_world_size_th_chunk_and_any_world_size_finishes_the_store(tmp_path) -> None:
    many = layout(num_rows=23, chunk_rows=2)  # 12 chunks, the last one short
    assert fill(tmp_path / "store", rank=1, world_size=4, layout=many) == [2, 3, 10, 11, 18, 19]
    assert fill(tmp_path / "store", rank=0, world_size=3, layout=many) == [0, 1, 6, 7, 12, 13]  # 18, 19: done
    store = RowStore(tmp_path / "store", WHAT, COMMAND)
    assert store.pending_chunks(2, 3) == [2, 8, 11] and store.pending_chunks(1, 3) == [4, 7, 10]
    assert fill(tmp_path / "store", layout=many) == [4, 5, 8, 9, 14, 15, 16, 17, 20, 21, 22]
    assert np.array_equal(RowStore(tmp_path / "store", WHAT, COMMAND).data(), expected_rows(23))
    with pytest.raises(ValueError, match="rank 3 is not one of world_size=3"):
        store.pending_chunks(3, 3)


def _fill_concurrently(directory: str, rank: int, world_size: int, barrier, log: str) -> None:
    def on_create(target) -> None:
        with open(log, "a") as handle:
            handle.write(f"created by rank {rank}\n")

    wanted = expected_rows(40)
    with open_for_writing(
        directory, IDENTITY, layout(40, 2), WHAT, COMMAND, rank=rank, world_size=world_size, on_create=on_create
    ) as store:
        barrier.wait(timeout=60)  # every rank holds the store before any writes: they write at the same time
        with store.writer(rank, world_size, progress=False) as writer:
            for row in writer.rows:
                writer.data[row] = wanted[row]
                writer.advance(1)


def test_concurrent_processes_create_the_store_once_and_fill_it_together(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    log = tmp_path / "creations.log"
    processes = [
        context.Process(target=_fill_concurrently, args=(str(tmp_path / "store"), rank, 3, barrier, str(log)))
        for rank in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1  # one rank created it, the others validated its manifest
    store = RowStore(tmp_path / "store", WHAT, COMMAND)
    assert store.complete and np.array_equal(store.data(), expected_rows(40))


def test_a_store_of_another_identity_kind_or_format_is_refused_naming_its_manifest(tmp_path) -> None:
    fill(tmp_path / "store")
    with pytest.raises(StaleCacheError, match=r"store/manifest.json holds a test store of another source .*"):
        fill(tmp_path / "store", identity={**IDENTITY, "fingerprint": "xyz"})
    with pytest.raises(StaleCacheError, match=r"fingerprint 'abc' here, 'xyz' wanted.*pass --overwrite"):
        fill(tmp_path / "store", identity={**IDENTITY, "fingerprint": "xyz"})
    with pytest.raises(StaleCacheError, match=r"store/manifest.json is not the manifest of a test store"):
        RowStore(tmp_path / "store", WHAT, COMMAND, {"kind": "other-rows"})
    with pytest.raises(StaleCacheError, match=r"holds rows \(10, 3\) of int32 in rows.i32, not \(10, 4\)"):
        fill(tmp_path / "store", layout=RowLayout("rows.i32", 10, (4,), "int32", 4))
    with pytest.raises(FileNotFoundError, match=r"nothing is not a test store \(no manifest.json\); build one"):
        RowStore(tmp_path / "nothing", WHAT, COMMAND)


def test_an_old_format_manifest_that_counted_completed_rows_is_refused(tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    write_json_atomic(old / MANIFEST, {**IDENTITY, "format": 6, "completed": 10})
    (old / "rows.i32").write_bytes(expected_rows().tobytes())
    for attempt in (lambda: fill(old), lambda: RowStore(old, WHAT, COMMAND, IDENTITY)):
        with pytest.raises(
            StaleCacheError, match=r"old/manifest.json: .* of format 6 .* `facedistill make-test-store "
        ):
            attempt()
    # Without a format field to tell, a manifest without the store's layout is refused all the same.
    write_json_atomic(old / MANIFEST, {**IDENTITY, "completed": 10})
    with pytest.raises(StaleCacheError, match="written by another version.*--overwrite"):
        RowStore(old, WHAT, COMMAND)
    assert fill(old, overwrite=True) == list(range(10))


def test_overwrite_replaces_the_store_and_ranks_replace_only_a_foreign_one(tmp_path) -> None:
    fill(tmp_path / "store", unreadable=frozenset({5}))
    assert fill(tmp_path / "store", overwrite=True) == list(range(10))  # one process: everything again
    assert RowStore(tmp_path / "store", WHAT, COMMAND).missing_rows().tolist() == []
    # With several ranks, one may already be filling the matching store: overwrite resumes it.
    assert fill(tmp_path / "store", rank=1, world_size=2, overwrite=True) == []
    foreign = {**IDENTITY, "fingerprint": "new"}
    assert fill(tmp_path / "store", rank=1, world_size=2, overwrite=True, identity=foreign) == [4, 5, 6, 7]
    assert fill(tmp_path / "store", rank=0, world_size=2, overwrite=True, identity=foreign) == [0, 1, 2, 3, 8, 9]
    assert json.loads((tmp_path / "store" / MANIFEST).read_text())["fingerprint"] == "new"


def test_missing_rows_are_recorded_with_their_chunk(tmp_path, monkeypatch) -> None:
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "store", fail_at_row=9, unreadable=frozenset({1, 6}))
    assert RowStore(tmp_path / "store", WHAT, COMMAND).missing_rows().tolist() == [1, 6]
    fill(tmp_path / "store", unreadable=frozenset({8}))
    store = RowStore(tmp_path / "store", WHAT, COMMAND)
    assert store.missing_rows().tolist() == [1, 6, 8]
    assert not store.data()[[1, 6, 8]].any() and np.array_equal(store.data()[9], expected_rows()[9])


def test_a_writer_loop_that_loses_rows_leaves_their_chunk_open(tmp_path) -> None:
    opened = open_for_writing(tmp_path / "store", IDENTITY, layout(), WHAT, COMMAND)
    lost = pytest.raises(RuntimeError, match="only 3 of the 10 rows to write were reported")
    with lost, opened as store, store.writer(progress=False) as writer:
        writer.advance(3)
    assert not RowStore(tmp_path / "store", WHAT, COMMAND).done().any()


def test_chunk_size_is_fixed_when_the_store_is_created(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        fill(tmp_path / "store", fail_at_row=6)
    assert fill(tmp_path / "store", layout=layout(chunk_rows=2)) == list(range(4, 10))
    assert RowStore(tmp_path / "store", WHAT, COMMAND).layout.chunk_rows == 4


def test_too_little_disk_space_is_refused_before_allocating_and_the_file_is_sparse(tmp_path, monkeypatch) -> None:
    large = RowLayout("big.u8", 4096, (16384,), "uint8", 256)  # 64 MiB
    with open_for_writing(tmp_path / "sparse", IDENTITY, large, WHAT, COMMAND):
        pass
    data = tmp_path / "sparse" / "big.u8"
    assert data.stat().st_size == 2**26 and data.stat().st_blocks * 512 < 2**20

    class Usage:
        free = 1024

    monkeypatch.setattr(rowstore.shutil, "disk_usage", lambda path: Usage())
    full = open_for_writing(tmp_path / "full", IDENTITY, large, WHAT, COMMAND)
    with pytest.raises(OSError, match=r"test store .*full/big.u8 needs 0.06 GiB \(4096 rows x 16384 bytes;"), full:
        pass
    assert not (tmp_path / "full" / "big.u8").exists() and not (tmp_path / "full" / MANIFEST).exists()


def test_readers_in_other_processes_map_the_file_themselves(tmp_path) -> None:
    import pickle

    fill(tmp_path / "store")
    store = RowStore(tmp_path / "store", WHAT, COMMAND)
    store.data()
    copy = pickle.loads(pickle.dumps(store))
    assert copy._data is None and np.array_equal(copy.data(), expected_rows())
    assert os.path.samefile(copy.data_path, store.data_path)
