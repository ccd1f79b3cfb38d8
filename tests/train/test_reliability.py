"""Fault cases: a run killed with SIGKILL, a crash while writing a checkpoint, a malicious checkpoint, a loss that
turns NaN, a full disk. In every case nothing already written is lost."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from facedistill.config import load_config
from facedistill.distill.arcface import ArcFace
from facedistill.distill.base import METHODS
from facedistill.train import checkpoint as checkpoint_module
from facedistill.train import loop as loop_module
from facedistill.train.checkpoint import load_checkpoint, save_checkpoint
from facedistill.train.loop import train
from facedistill.train.step import TrainingDivergedError
from tests.helpers import make_face_folders

SETTINGS = [
    "method.name=arcface",
    "data.batch_size=8",
    "data.num_workers=0",
    "model.embedding_size=16",
    "train.log_every=1",
    "train.amp=none",
    "train.channels_last=false",
    "schedule.warmup_epochs=1",
    "optim.lr=0.05",
    "train.checkpoint_every=1",
    "train.export_onnx=false",
    "train.epochs=3",
]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_face_folders(tmp_path_factory.mktemp("faces"), identities=4, images=6, test_identities=4)


def _settings(train_dir, run_dir, *extra):
    return [f"data.train={train_dir}", f"run.output_dir={run_dir}", *SETTINGS, *extra]


def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(tmp_path, faces) -> None:
    train_dir, _ = faces
    kill_after = random.Random().randint(2, 7)  # of 9 steps
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "facedistill.cli", "train"]
    for setting in _settings(train_dir, run_dir):
        command += ["--set", setting]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "train.csv"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) - 1 >= kill_after:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = load_checkpoint(run_dir / "last.pt")
    killed_at = killed["step"]
    assert 0 < killed_at < 9, f"kill_after={kill_after}"

    train(load_config(None, _settings(train_dir, run_dir)), resume=True, progress=False)
    train(load_config(None, _settings(train_dir, tmp_path / "uninterrupted")), progress=False)
    resumed = load_checkpoint(run_dir / "last.pt")
    reference = load_checkpoint(tmp_path / "uninterrupted" / "last.pt")
    assert resumed["step"] == reference["step"] == 9
    # The resumed run counts the images and the training time of both its parts.
    assert resumed["trained_images"] == reference["trained_images"]
    assert resumed["train_seconds"] > killed["train_seconds"] > 0
    for part in ("model", "method"):
        for key, value in reference[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key} differs (killed after step {killed_at})"


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def crash_midway(state, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        torch.save({"model": _Exploit(marker)}, handle, pickle_module=pickle)
    with pytest.raises(ValueError, match="evil.pt cannot be loaded safely"):
        load_checkpoint(evil)
    assert not marker.exists()


class _NaNAfterThreeSteps(ArcFace):
    name = "test_nan_after_three_steps"

    def set_progress(self, step: int, epoch: float) -> None:
        self.step = step

    def forward(self, embeddings, labels, teacher):
        terms = super().forward(embeddings, labels, teacher)
        if self.step >= 3:
            terms["arcface"] = terms["arcface"] * float("nan")
        return terms


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, faces) -> None:
    if _NaNAfterThreeSteps.name not in METHODS:
        METHODS.register(_NaNAfterThreeSteps.name)(_NaNAfterThreeSteps)
    train_dir, _ = faces
    config = load_config(None, _settings(train_dir, tmp_path / "nan", f"method.name={_NaNAfterThreeSteps.name}"))
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 3.*last.pt"):
        train(config, progress=False)
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def test_full_disk_is_reported_before_training(tmp_path, faces, monkeypatch) -> None:
    train_dir, _ = faces
    monkeypatch.setattr(loop_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    with pytest.raises(OSError, match="MiB free but checkpoints need about"):
        train(load_config(None, _settings(train_dir, tmp_path / "full")), progress=False)
    assert not (tmp_path / "full" / "train.csv").exists()
