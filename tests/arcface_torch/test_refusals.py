"""Refusals under torchrun: one line from rank 0, no traceback, a non-zero exit, before the run does any work."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from facedistill.arcface_torch import refusals
from facedistill.arcface_torch.recipe import RecipeError
from facedistill.data.recordio import RecordIOError
from facedistill.data.verification import read_bin, write_bin
from tests.arcface_torch.helpers import facedistill, run, torchrun


class _Shell:
    """Unpickling this would run a shell command (what a malicious .bin does to upstream's pickle.load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _child_lines(stderr: str) -> list[str]:
    """stderr without torchrun's own launch banner and failure summary (printed by the launcher, not the run)."""
    summary = stderr.find('Traceback (most recent call last):\n  File "<frozen runpy>"')
    return (stderr if summary < 0 else stderr[:summary]).splitlines()


def _assert_one_refusal(result: object, *needles: str) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    child = _child_lines(result.stderr)
    assert not any("Traceback" in line or line.startswith("  File ") for line in child), result.stderr[-4000:]
    # torchrun's failure summary shows the same line rather than its pointer to the docs.
    assert f"traceback : {errors[0]}" in result.stderr, result.stderr[-3000:]
    return errors[0]


def _variant(root: Path, name: str, base: str, extra: str) -> str:
    (root / "configs" / f"{name}.py").write_text((root / "configs" / f"{base}.py").read_text() + extra)
    return f"configs/{name}"


def test_a_truncated_rec_a_missing_rec_and_an_unsafe_val_target_are_each_one_line(patched_checkout: Path) -> None:
    root = patched_checkout
    truncated = root / "data" / "truncated"
    shutil.copytree(root / "data" / "tiny", truncated, ignore=shutil.ignore_patterns("teacher_cache", "*.bin"))
    rec = truncated / "train.rec"
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size // 2])
    recipe = _variant(root, "tiny_truncated", "tiny", 'config.rec = "data/truncated"\n')
    line = _assert_one_refusal(run(torchrun(2, "train_v2.py", recipe), cwd=root, check=False), "train.rec")
    assert "truncated" in line or "runs past" in line or "beyond" in line

    recipe = _variant(root, "tiny_norec", "tiny", 'config.rec = "data/nowhere"\n')
    _assert_one_refusal(
        run(torchrun(2, "train_v2.py", recipe), cwd=root, check=False), "config.rec = 'data/nowhere'", "pack"
    )

    # Val targets are checked on every rank when the recipe loads, before the run makes its work dir: upstream
    # loads them on rank 0 only, after the data and the model, and the other ranks died in their next collective.
    marker = root / "pwned"
    (root / "data" / "tiny" / "evil.bin").write_bytes(pickle.dumps(_Shell(marker)))
    recipe = _variant(root, "tiny_evil", "tiny", 'config.val_targets = ["tinylfw", "evil"]\n')
    _assert_one_refusal(run(torchrun(2, "train_v2.py", recipe), cwd=root, check=False), "evil.bin", "posix.system")
    assert not marker.exists()
    assert not (root / "work_dirs" / "tiny_evil").exists()

    images, issame = read_bin(root / "data" / "tiny" / "tinylfw.bin")
    write_bin(root / "data" / "tiny" / "sorted.bin", images, sorted(issame.tolist(), reverse=True))
    recipe = _variant(root, "tiny_sorted", "tiny", 'config.val_targets = ["sorted", "absent"]\n')
    result = run(torchrun(2, "train_v2.py", recipe), cwd=root, check=False)
    _assert_one_refusal(result, "sorted.bin: pairs 0-3 (fold 1 of 10) hold no impostor pair")
    assert result.stderr.count("warning: config.val_targets: data/tiny/absent.bin does not exist") == 1
    assert not (root / "work_dirs" / "tiny_sorted").exists()


def test_a_wrong_teacher_network_is_one_line_from_the_cache_command(patched_checkout: Path, tmp_path: Path) -> None:
    from facedistill.models import create_model

    teacher = tmp_path / "teacher_run"
    teacher.mkdir()
    torch.save(create_model("mbf", embedding_size=128).state_dict(), teacher / "model.pt")
    extra = (
        f'config.teacher = "{teacher}"\nconfig.teacher_network = "r50"\nconfig.teacher_cache = "{tmp_path / "cache"}"\n'
    )
    recipe = _variant(patched_checkout, "tiny_wrong_network", "tiny_md", extra)
    command = torchrun(2, "-m", "facedistill.cli", "arcface-torch", "cache-teacher", recipe)
    result = run(command, cwd=patched_checkout, check=False)
    _assert_one_refusal(result, "model.pt looks like mbf, config.teacher_network = 'r50'")
    assert not (tmp_path / "cache").exists()


def test_one_line_unwraps_a_dataloader_workers_error() -> None:
    wrapped = RecordIOError(
        "Caught RecordIOError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nfacedistill.data.recordio.RecordIOError: train.rec: truncated record\n'
    )
    assert refusals.one_line(wrapped) == "train.rec: truncated record"
    assert refusals.one_line(ValueError("a\n  b")) == "a b"


def test_refusals_are_facedistills_input_errors_and_bugs_keep_their_traceback() -> None:
    assert refusals.lost_a_peer(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:3466"))
    assert not refusals.lost_a_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert refusals.is_refusal(RecipeError("config.loss"))
    assert refusals.is_refusal(FileNotFoundError("x"))
    assert not refusals.is_refusal(RuntimeError("shape mismatch"))
    try:
        int("x")  # a ValueError raised outside facedistill: a bug, shown with its traceback
    except ValueError as error:
        assert not refusals.is_refusal(error)
    try:
        from facedistill.config import from_dict
        from facedistill.distill.margin_distillation import MarginDistillation

        from_dict(MarginDistillation.Params, {"m_min": -1.0})
    except ValueError as error:
        assert refusals.is_refusal(error)


# NCCL's words for a collective that broke because another rank went away, as torch 2.x's ProcessGroupNCCL raises
# them (``DistBackendError``, a RuntimeError) or as they reach Python from a work's ``wait()``.
NCCL_LOST_PEER = [
    torch.distributed.DistBackendError(
        "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:317, remote process exited or there was "
        "a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a "
        "remote process exiting prematurely.\nLast error:\nsocket recv failed"
    ),
    torch.distributed.DistBackendError(
        "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, unhandled system error (run with "
        "NCCL_DEBUG=INFO for details), NCCL version 2.14.3\nncclSystemError: System call (e.g. socket, malloc) or "
        "external library call failed or device error. It can be also caused by unexpected exit of a remote peer."
    ),
    torch.distributed.DistBackendError(
        "[Rank 1] NCCL communicator was aborted on rank 1. Original reason for failure was: [Rank 1] Watchdog caught "
        "collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, "
        "Timeout(ms)=600000) ran for 600046 milliseconds before timing out."
    ),
    torch.distributed.DistBackendError(
        "[PG ID 0 PG GUID 0(default_pg) Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
        "OpType=_ALLGATHER_BASE, NumelIn=512, NumelOut=4096, Timeout(ms)=1800000) ran for 1800089 milliseconds "
        "before timing out."
    ),
    RuntimeError(
        "[Rank 0] Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, "
        "subsequent GPU operations might run on corrupted/incomplete data."
    ),
    RuntimeError("NCCL communicator was aborted on rank 2."),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:46071"),
    torch.distributed.DistNetworkError("failed to recv, got 0 bytes; Connection reset by peer"),
    torch.distributed.DistNetworkError(
        "Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown or crash?"
    ),
]


@pytest.mark.parametrize("error", NCCL_LOST_PEER, ids=lambda error: str(error)[:40])
def test_nccls_words_for_a_lost_peer_are_recognised(error: RuntimeError) -> None:
    assert refusals.lost_a_peer(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x512 and 256x10)"),
        # NCCL refusing what this rank asked of it is a bug here, not a peer that went away.
        torch.distributed.DistBackendError(
            "NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, invalid usage (run with NCCL_DEBUG=WARN "
            "for details), NCCL version 2.21.5\nncclInvalidUsage: This usually reflects invalid usage of NCCL library."
        ),
        ValueError("Connection closed by peer"),  # not a collective's error
    ],
    ids=lambda error: str(error)[:40],
)
def test_other_errors_are_not_a_lost_peer(error: Exception) -> None:
    assert not refusals.lost_a_peer(error)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_report_prints_on_rank_zero_and_fills_every_ranks_error_file(
    rank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setattr(refusals, "GRACE_S", 0.0)
    refusals.report(RecipeError("config.teacher_network = 'r50'"))
    printed = capsys.readouterr().err
    assert printed == ("error: config.teacher_network = 'r50'\n" if rank == "0" else "")
    assert json.loads((tmp_path / "error.json").read_text())["message"] == "error: config.teacher_network = 'r50'"


def test_the_cli_refuses_an_unpatched_checkout_in_one_line(tmp_path: Path) -> None:
    result = run(
        facedistill("arcface-torch", "cache-teacher", "configs/x", "--root", str(tmp_path)), tmp_path, check=False
    )
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].startswith("error: ")
    assert "Traceback" not in result.stderr
