"""The multi-process harness itself: a world or a command that hangs fails in bounded time, naming where each of
its processes waits."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.multiprocess import run_command, spawn_world


def _one_rank_never_arrives(rank: int, ports: list[int], marker: str) -> None:
    # A gloo timeout far beyond the test's: only the harness can end this world.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    Path(marker, f"joined{rank}").touch()
    if rank == 0:
        dist.barrier()
    else:
        _sleep_instead_of_the_barrier()


def _sleep_instead_of_the_barrier() -> None:
    time.sleep(3600)


def test_a_hung_world_fails_with_every_ranks_stack(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn_world(_one_rank_never_arrives, (str(tmp_path),), 2, tmp_path / "world", timeout_s=25)
    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert "did not finish in 25 s" in message
    # Both ranks met at the held store before the harness stopped them; each says where it waits.
    assert (tmp_path / "joined0").exists() and (tmp_path / "joined1").exists()
    rank0, rank1 = message.split("--- rank 1 stacks ---")
    assert " in barrier" in rank0 and "_one_rank_never_arrives" in rank0
    assert " in _sleep_instead_of_the_barrier" in rank1


def _raises_on_rank_1(rank: int, ports: list[int]) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()


def test_a_failed_rank_stops_the_world_with_the_others_stacks(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn_world(_raises_on_rank_1, (), 2, tmp_path, timeout_s=120)
    message = str(failure.value)
    assert "ValueError: rank 1 gives up" in message
    rank0 = message.split("--- rank 0 stacks ---")[1].split("--- rank 1 stacks ---")[0]
    # Stopped in its barrier, or out of it with gloo's lost-peer error: either way rank 0 says where it was.
    assert "barrier" in rank0, message


def test_a_hung_command_fails_with_the_stack_of_each_of_its_processes(tmp_path: Path) -> None:
    child = "import time\ntime.sleep(60)"
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}])"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([sys.executable, "-c", parent], cwd=tmp_path, timeout=3)
    assert time.monotonic() - started < 30
    message = str(failure.value)
    assert "did not finish in 3 s" in message
    # The launcher and its child, each dumped: the child sleeps, the parent waits for it.
    assert message.count("Current thread") == 2, message
    assert "line 2 in <module>" in message and " in wait" in message
