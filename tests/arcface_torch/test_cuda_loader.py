"""The patched ``dataset.py``'s CUDA loader (``DataLoaderX`` + ``BackgroundGenerator``), run on the CPU.

On a GPU the patched ``get_dataloader`` returns upstream's ``DataLoaderX``, which reads batches in a background
thread. Upstream's thread dies on a bad record and the training loop then waits for its next batch forever (one
rank hangs, the others meet NCCL's watchdog minutes later). CI has no GPU, so these tests emulate what differs:
``torch.cuda.set_device`` and the CUDA streams are stubbed, and ``local_rank`` is ``"cpu"``, so the batches'
copy to "the GPU" is a copy to the CPU. Every wait happens in a daemon thread with a deadline, so a regression
fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import traceback
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from facedistill.arcface_torch import refusals
from facedistill.arcface_torch.patching import apply
from facedistill.data.recordio import RecordIOError
from tests.arcface_torch.helpers import UPSTREAM, copy_upstream, import_patched_dataset

BAD_RECORD = "train.rec: record #2 is truncated (read 10 of 4096 bytes); repack it with `facedistill pack`"


@pytest.fixture(scope="module")
def patched_dataset(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The patched ``dataset.py`` of a fresh patched copy of upstream, imported as a module."""
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream arcface_torch snapshot not found at {UPSTREAM} (expected in ../shared beside the repo)")
    root = copy_upstream(tmp_path_factory.mktemp("cuda_loader") / "arcface_torch")
    apply(root)
    return import_patched_dataset(root, "patched_dataset_cuda_loader")


class _Stream:
    """A CUDA stream's calls that ``DataLoaderX`` makes, doing nothing (CPU copies need no ordering)."""

    def wait_stream(self, other: object) -> None:
        pass


@pytest.fixture
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **kwargs: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())


class _Records(Dataset):
    """Four samples; ``bad`` (if set) is a record that cannot be read, as facedistill's RecordIO reader says."""

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.bad:
            raise RecordIOError(BAD_RECORD)
        return torch.full((3,), float(index)), torch.tensor(index)


def _drain(loader: Any, deadline_s: float) -> tuple[list[Any], BaseException | None, str]:
    """Iterate ``loader`` in a daemon thread for at most ``deadline_s``: (batches, error raised, where the thread
    still waits: its stack, or "" once it has finished)."""
    batches: list[Any] = []
    raised: list[BaseException] = []

    def consume() -> None:
        try:
            for batch in loader:
                batches.append(batch)
        except BaseException as error:  # noqa: BLE001 - the test inspects whatever the loop would have seen
            raised.append(error)

    thread = threading.Thread(target=consume, name="training-loop", daemon=True)
    thread.start()
    thread.join(deadline_s)
    frame = sys._current_frames().get(thread.ident or -1) if thread.is_alive() else None
    waiting = "".join(traceback.format_stack(frame)) if frame is not None else ""
    return batches, (raised[0] if raised else None), waiting


@pytest.mark.parametrize(
    ("num_workers", "deadline_s"),
    # A worker process's error reaches the background thread re-raised by the DataLoader; starting the worker on
    # a busy shared CI core is the extra time.
    [(0, 2.0), (1, 20.0)],
)
def test_a_bad_record_stops_the_cuda_loader_with_its_error_instead_of_hanging(
    patched_dataset: ModuleType, emulated_cuda: None, num_workers: int, deadline_s: float
) -> None:
    loader = patched_dataset.DataLoaderX(
        local_rank="cpu", dataset=_Records(bad=2), batch_size=1, num_workers=num_workers
    )
    batches, error, waiting = _drain(loader, deadline_s)
    assert not waiting, f"next() still waits {deadline_s} s after the background thread died, at\n{waiting}"
    # DataLoaderX stages the next batch before it returns one: record 2's error ends the call that returns record 1.
    assert [int(labels) for _, labels in batches] == [0]
    assert isinstance(error, RecordIOError), repr(error)
    # The framework's refusal path reports it as one line naming the record (a worker's error carries torch's
    # "Caught RecordIOError in DataLoader worker process 0" wrapper, which the refusal strips).
    assert refusals.is_refusal(error) and refusals.one_line(error) == BAD_RECORD
    # The failed DataLoader iterator (and its worker process) stays reachable through the error's traceback cycle
    # only: shut it down here, not in a later test's thread whenever the garbage collector next runs.
    del batches, error, loader
    gc.collect()


def test_after_the_error_the_next_call_raises_it_again_rather_than_waiting(
    patched_dataset: ModuleType, emulated_cuda: None
) -> None:
    records = _Records(bad=0)
    generator = patched_dataset.BackgroundGenerator((records[index] for index in range(len(records))), "cpu")
    errors = []
    for _ in range(2):
        batches, error, waiting = _drain(generator, 2.0)
        assert not waiting, waiting
        assert batches == []
        errors.append(error)
    assert all(isinstance(error, RecordIOError) for error in errors) and errors[0] is errors[1]


def test_the_cuda_loader_still_serves_every_batch_then_stops(patched_dataset: ModuleType, emulated_cuda: None) -> None:
    loader = patched_dataset.DataLoaderX(local_rank="cpu", dataset=_Records(), batch_size=2, num_workers=0)
    assert loader.local_rank == "cpu" and isinstance(loader.stream, _Stream)
    for _ in range(2):  # two epochs: every __iter__ starts a new background thread
        batches, error, waiting = _drain(loader, 2.0)
        assert not waiting, waiting
        assert error is None
        assert [labels.tolist() for _, labels in batches] == [[0, 1], [2, 3]]
