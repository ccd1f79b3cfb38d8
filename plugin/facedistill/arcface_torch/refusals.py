"""A refusal in a torchrun job is one line, printed once: by rank 0, with every rank exiting non-zero.

A refusal is facedistill saying no to the user's input: a recipe key (``RecipeError``), a stale or unfinished
cache, a truncated ``.rec``, an unsafe or badly ordered ``.bin``, an image that does not decode, a missing file,
or any ``ValueError``/``OSError`` raised by facedistill's own code. Its message already names the key or file and
the fix, so a traceback (one per rank, under torchrun's failure block) only buries it. Every other exception, a bug,
keeps its traceback; ``FACEDISTILL_TRACEBACK=1`` shows the traceback of refusals too. A rank whose collective broke
because another rank exited says nothing: the rank that stopped first holds the error.

Under torchrun each rank also writes its line into the error file torchrun gives it (``TORCHELASTIC_ERROR_FILE``),
which torchrun's own failure summary prints in place of its pointer to the docs: a refusal that only one rank met
(a bad record in its share) is not lost when rank 0, blocked in a collective, is stopped without a word.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TextIO

from facedistill.config import ConfigError
from facedistill.data.images import ImageDecodeError
from facedistill.data.recordio import RecordIOError
from facedistill.data.rowstore import StaleCacheError
from facedistill.data.verification import PairsFormatError, UnsafePickleError
from facedistill.models.iresnet import CheckpointMismatchError

REFUSALS: tuple[type[BaseException], ...] = (
    ConfigError,
    StaleCacheError,
    RecordIOError,
    PairsFormatError,
    UnsafePickleError,
    ImageDecodeError,
    CheckpointMismatchError,
    FileNotFoundError,
)
PACKAGE = Path(__file__).resolve().parents[1]
# A DataLoader worker's exception reaches the main process as the same type with this text in front.
WORKER_PREFIX = "Caught "
GRACE_S = 5.0
# A collective (or the rendezvous store) that broke because another rank went away, in each backend's words: a
# peer that stops first (a refusal, a bug) breaks the others' next collective with one of these.
PEER_GONE = (
    # gloo, and the TCPStore's socket
    "Connection closed by peer",
    "Connection reset by peer",
    "Connection was likely closed",  # TCPStore (torch >= 2.3): "Failed to recv, got 0 bytes. Connection was ..."
    # NCCL, as torch 2.x's ProcessGroupNCCL words it (DistBackendError, a RuntimeError)
    "remote process exited or there was a network error",  # ncclGetErrorString(ncclRemoteError)
    "ncclRemoteError",
    "unexpected exit of a remote peer",  # ncclSystemError's gloss before NCCL had ncclRemoteError
    "NCCL communicator was aborted",
    "Some NCCL operations have failed or timed out",
    # A peer that exited without NCCL noticing leaves the survivors blocked until the watchdog gives up. A rank
    # that is itself the one stuck says so too, but its watchdog has already logged the same text (C++ logging,
    # not this hook), so the one-line summary loses nothing.
    "Watchdog caught collective operation timeout",
)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def raised_by_facedistill(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is facedistill's code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def is_refusal(error: BaseException) -> bool:
    if isinstance(error, REFUSALS):
        return True
    if isinstance(error, ValueError | OSError):
        return raised_by_facedistill(error) or str(PACKAGE) in str(error)  # a worker's error carries its traceback
    return False


def one_line(error: BaseException) -> str:
    """The refusal's message on one line; a DataLoader worker's error without the traceback torch wraps it in."""
    text = str(error)
    if text.startswith(WORKER_PREFIX) and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report(error: BaseException | str, stream: TextIO | None = None) -> None:
    """Say the refusal: ``error: MESSAGE`` on ``stream`` (stderr) from rank 0, and in every rank's torchrun error
    file. Other ranks then wait ``GRACE_S``: torchrun stops every rank as soon as one has exited, and rank 0,
    refusing the same input a moment later, must get to say it."""
    line = f"error: {one_line(error) if isinstance(error, BaseException) else error}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": str(int(time.time()))}))
    if rank() == 0:
        print(line, file=stream or sys.stderr, flush=True)
    elif error_file:
        time.sleep(GRACE_S)


def lost_a_peer(error: BaseException) -> bool:
    """A collective that failed because another rank has exited (gloo's or NCCL's words for it, ``PEER_GONE``):
    that rank's own error is the one to read, in torchrun's summary, so this one is not printed. Only the words
    count, not the type: NCCL raises the same ``DistBackendError`` for its own refusals of a bad call (a bug)."""
    return isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_GONE)


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if lost_a_peer(error) and not os.environ.get("FACEDISTILL_TRACEBACK"):
        return  # exit status 1, quietly
    if is_refusal(error) and not os.environ.get("FACEDISTILL_TRACEBACK"):
        # The real stderr: torch.distributed wraps this hook to put "[rankN]: " before every line it writes.
        report(error, sys.__stderr__)  # Python then exits with status 1, as for any uncaught exception
        return
    sys.__excepthook__(kind, error, tb)


def install() -> None:
    """Report uncaught refusals as one line for the rest of this process (the patched ``train_v2.py``)."""
    sys.excepthook = _excepthook
