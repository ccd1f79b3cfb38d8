"""Every test that starts several processes goes through here, so that none of them can hang silently.

Two rules, one implementation:

- **No port is probed, then bound later.** Binding port 0, closing it and handing the number to another process
  leaves a window in which anything on the machine can take it. A spawned world meets at TCPStores that *this*
  process binds on port 0 and holds until the world has ended, and its ranks join them as clients
  (``TORCHELASTIC_USE_AGENT_STORE``), exactly as torchrun's agent hosts the store its workers join; torchrun itself
  is started ``--standalone``, which binds its store the same way. A world of one process meets in a file.
- **A world that outlives its timeout says where it is.** Each spawned rank arms ``faulthandler`` for fatal signals
  and for SIGTERM (chained, so the rank still ends); when the world times out, or a rank fails and the others are
  stopped, every rank writes every thread's stack to a file and the failure message carries them. A command run
  by :func:`run_command` (torchrun, a benchmark) runs in its own session with ``PYTHONFAULTHANDLER=1``; on its
  timeout every process of the session gets SIGABRT, one at a time, and the message carries what they printed.

Each spawned rank also dies with this process (``PR_SET_PDEATHSIG``), so an interrupted test run leaves no rank
behind waiting in a collective.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

STACKS_FILE = "stacks-rank{rank}.txt"
# How long the stopped ranks get to write their stacks and exit before they are killed.
DUMP_GRACE_S = 5.0
STORE_HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def held_stores(count: int, world_size: int) -> Iterator[list[int]]:
    """``count`` TCPStore servers bound on port 0 by this process, for ``world_size`` clients each; yields their
    ports and closes them afterwards. One per process group that a world creates in turn (a process group's keys
    must not meet those of the one before it)."""
    stores = [
        dist.TCPStore(STORE_HOST, 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=60),
                      wait_for_workers=False)
        for _ in range(count)
    ]  # fmt: skip
    try:
        yield [store.port for store in stores]
    finally:
        del stores


def spawn_world(
    entry: Callable[..., None],
    args: Sequence[Any],
    nprocs: int,
    out_dir: Path,
    timeout_s: float,
    stores: int = 1,
    start_method: str = "spawn",
) -> None:
    """Run ``entry(rank, ports, *args)`` (a module-level function) in ``nprocs`` new processes and wait for all of
    them; fail the test, with every rank's stacks, when one raises or the world is not done in ``timeout_s``.

    Each rank sees torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, and
    ``MASTER_PORT`` set to the first store), so ``dist.init_process_group("gloo")`` joins the world; ``ports`` are
    the ``stores`` stores' ports, for an entry that creates several process groups in turn (set ``MASTER_PORT`` to
    the next before each).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with held_stores(stores, nprocs) as ports, pytest.MonkeyPatch.context() as patch:
        # Spawned interpreters import ``entry``'s module by name (tests.x.y) from this sys.path, which pytest's
        # importlib mode leaves without the repository root.
        patch.syspath_prepend(str(REPO_ROOT))
        context = mp.start_processes(
            _rank_main, args=(entry, tuple(args), ports, nprocs, str(out_dir)), nprocs=nprocs, join=False,
            start_method=start_method,
        )  # fmt: skip
        failure = ""
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1.0, grace_period=DUMP_GRACE_S):
                if time.monotonic() > deadline:
                    failure = f"the {nprocs}-process world did not finish in {timeout_s:.0f} s"
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            failure = str(error)
        finally:
            _stop(context.processes)
    if failure:
        pytest.fail(f"{failure}\n{rank_stacks(out_dir, nprocs)}", pytrace=False)


def rank_stacks(out_dir: Path, nprocs: int) -> str:
    """What each rank's faulthandler wrote when it was stopped, or its traceback when it raised (nothing for a rank
    that ended normally)."""
    parts = []
    for rank in range(nprocs):
        path = out_dir / STACKS_FILE.format(rank=rank)
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        parts.append(f"--- rank {rank} stacks ---\n{text or '(none: the rank ended before it was stopped)'}")
    return "\n".join(parts)


def _stop(processes: Sequence[Any]) -> None:
    """SIGTERM every live rank (its faulthandler dumps every thread, then it ends), then kill what is left."""
    alive = [process for process in processes if process.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + DUMP_GRACE_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _rank_main(rank: int, entry: Callable[..., None], args: tuple, ports: list[int], nprocs: int, out_dir: str) -> None:
    _die_with_parent()
    stacks = open(Path(out_dir, STACKS_FILE.format(rank=rank)), "w")  # noqa: SIM115 (open until the rank ends)
    faulthandler.enable(stacks, all_threads=True)
    faulthandler.register(signal.SIGTERM, stacks, all_threads=True, chain=True)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR=STORE_HOST,
        MASTER_PORT=str(ports[0]), TORCHELASTIC_USE_AGENT_STORE="True",
    )  # fmt: skip
    try:
        entry(rank, ports, *args)
    except BaseException:
        # Only the first failed rank's error reaches the parent: every rank's goes into the failure from here.
        stacks.write(f"{traceback.format_exc()}\n")
        stacks.flush()
        raise
    faulthandler.unregister(signal.SIGTERM)
    faulthandler.disable()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def file_rendezvous(directory: Path) -> str:
    """An ``init_method`` for a process group whose ranks share ``directory`` and need no port."""
    return f"file://{directory / 'rendezvous'}"


def run_command(
    args: Sequence[str],
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``args`` in a session of its own; on a timeout every process of it dumps its stacks (SIGABRT under
    ``PYTHONFAULTHANDLER``) and the test fails with them; with ``check``, a non-zero exit fails the test."""
    environment = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    command = " ".join(str(arg) for arg in args)
    process = subprocess.Popen(
        [str(arg) for arg in args], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _abort_session(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{command} did not finish in {timeout:.0f} s; each of its processes' stacks:\n"
            f"{stderr[-20000:]}\n--- stdout ---\n{stdout[-4000:]}",
            pytrace=False,
        )
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"{command} failed ({result.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}", pytrace=False)
    return result


def session_processes(session: int) -> list[int]:
    """The processes of a session, the deepest first (workers before the launcher that waits for them)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name, in parentheses, may hold spaces: the fields that follow it are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            parents[int(entry.name)] = int(fields[1])

    def depth(pid: int) -> int:
        level = 0
        while parents.get(pid) in parents:
            pid, level = parents[pid], level + 1
        return level

    return sorted(parents, key=depth, reverse=True)


def _abort_session(session: int) -> None:
    """Every process of the session dumps its stacks where it waits: all are frozen first (a launcher must not
    react to its workers' end before its own dump), then each is aborted and resumed alone, the deepest first, so
    that the dumps do not interleave on the stderr they share."""
    processes = session_processes(session)
    for pid in processes:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in processes:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.5)
    for pid in session_processes(session):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
