"""``facedistill arcface-torch cache-teacher`` under torchrun on GPUs, emulated on the CPU.

Each rank embeds its share for hours, and the shares end at different times; the ranks then meet once. That meeting
must not sit under NCCL's watchdog (10 minutes by default, which aborts the job), no rank may leave the device it
works on to a guess (torch's barrier on an unbound NCCL group picks ``rank % GPU count``), and each rank must embed
on GPU ``LOCAL_RANK``. The collectives are stubbed with a recorder; CUDA is reported with 4 GPUs.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from facedistill.arcface_torch import cache
from facedistill.arcface_torch.cli import arcface_torch_app

GPUS = 4


class _Group:
    """A process group the recorder made: its backend and timeout."""

    def __init__(self, backend: str, timeout: datetime.timedelta | None) -> None:
        self.backend, self.timeout = backend, timeout


class _Recorder:
    """``torch.distributed``'s group calls and ``torch.cuda``'s device calls, in order, as (name, kwargs)."""

    def __init__(self, initialised: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.default: _Group | None = _Group(initialised, None) if initialised else None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: GPUS)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.calls.append(("set_device", {"d": device})))
        monkeypatch.setattr(dist, "is_initialized", lambda: self.default is not None)
        monkeypatch.setattr(dist, "init_process_group", self.init_process_group)
        monkeypatch.setattr(dist, "new_group", self.new_group)
        monkeypatch.setattr(dist, "barrier", self.barrier)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: (group or self.default).backend)
        monkeypatch.setattr(
            dist, "destroy_process_group", lambda group=None: self.calls.append(("destroy", {"group": group}))
        )

    def init_process_group(self, backend: str | None = None, **kwargs: Any) -> None:
        self.calls.append(("init_process_group", {"backend": backend, **kwargs}))
        self.default = _Group(str(backend), kwargs.get("timeout"))

    def new_group(self, ranks: list[int] | None = None, **kwargs: Any) -> _Group:
        self.calls.append(("new_group", {"ranks": ranks, **kwargs}))
        return _Group(str(kwargs.get("backend") or (self.default and self.default.backend)), kwargs.get("timeout"))

    def barrier(self, group: _Group | None = None, **kwargs: Any) -> None:
        self.calls.append(("barrier", {"group": group or self.default, **kwargs}))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for call, kwargs in self.calls if call == name]


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[_Recorder, dict[str, Any]]:
    """Rank 1 of 8, LOCAL_RANK 3 of a 4-GPU node, with the recipe, teacher, data and cache stubbed: only the
    process-group and device choices of ``cache_recipe_teacher`` run."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    recorder = _Recorder()
    seen: dict[str, Any] = {}
    recipe = SimpleNamespace(rec=str(tmp_path), get=lambda key, default=None: {"teacher": "sface"}.get(key, default))

    def teacher(cfg: Any, device: str = "cpu", threads: int | None = None) -> Any:
        seen["teacher_device"] = device
        return SimpleNamespace(teacher_id="t", embedding_size=512)

    def build(*args: Any, **kwargs: Any) -> None:
        seen["build"] = kwargs
        recorder.calls.append(("build_teacher_cache", {}))

    class Cache:
        num_images, teacher_id = 10, "t"

        def __init__(self, directory: Path, command: str) -> None:
            pass

        def check(self, dataset: Any, teacher_id: str) -> None:
            recorder.calls.append(("check", {}))

    monkeypatch.setattr(cache, "load_recipe", lambda config, root=".": recipe)
    monkeypatch.setattr(cache, "method_name", lambda cfg: "margin_distillation")
    monkeypatch.setattr(cache, "create_recipe_teacher", teacher)
    monkeypatch.setattr(cache, "open_framework_dataset", lambda rec: object())
    # The recipe's checks against its data and teacher (tested for real in test_refusals_config.py).
    monkeypatch.setattr(cache, "check_training_set", lambda cfg, dataset: None)
    monkeypatch.setattr(cache, "check_teacher", lambda cfg, embedding_size, *args, **kwargs: [])
    monkeypatch.setattr(cache, "build_teacher_cache", build)
    monkeypatch.setattr(cache, "TeacherCache", Cache)
    recorder.install(monkeypatch)
    return recorder, seen


def _assert_no_device_is_guessed_and_the_wait_is(recorder: _Recorder, wait: datetime.timedelta) -> None:
    # The device is bound before any group exists, so nothing the group does can fall back to a guess.
    first_group = next(i for i, (name, _) in enumerate(recorder.calls) if name in ("init_process_group", "new_group"))
    assert ("set_device", {"d": 3}) in recorder.calls[:first_group], recorder.calls
    for init in recorder.named("init_process_group"):
        if init["backend"] == "nccl":  # an NCCL group knows its device and outlives a short watchdog
            assert init.get("device_id") == torch.device("cuda", 3), init
        assert init.get("timeout") is not None and init["timeout"] >= datetime.timedelta(minutes=30), init
    # The ranks meet once, after every rank's share, in a group NCCL's watchdog does not watch, for ``wait``.
    barriers = recorder.named("barrier")
    assert len(barriers) == 1, recorder.calls
    (barrier,) = barriers
    assert barrier["group"].backend == "gloo", barrier
    assert not barrier.get("device_ids"), barrier
    assert barrier["group"].timeout == wait, barrier
    order = [name for name, _ in recorder.calls]
    assert order.index("build_teacher_cache") < order.index("barrier") < order.index("check"), order


def test_ranks_embed_on_their_gpu_and_meet_without_nccls_watchdog(emulated: tuple[_Recorder, dict[str, Any]]) -> None:
    recorder, seen = emulated
    message = cache.cache_recipe_teacher("configs/x", batch_size=8, workers=0)
    assert message.startswith("cached 10 records")
    assert seen["teacher_device"] == "cuda:3"
    assert (seen["build"]["rank"], seen["build"]["world_size"]) == (1, 8)
    _assert_no_device_is_guessed_and_the_wait_is(recorder, cache.DEFAULT_WAIT)
    assert datetime.timedelta(hours=12) <= cache.DEFAULT_WAIT  # hours of uneven shares, not NCCL's 10 minutes
    assert {"group": None} in recorder.named("destroy"), recorder.calls


@pytest.mark.parametrize(
    ("option", "wait"), [([], cache.DEFAULT_WAIT), (["--wait-hours", "30"], datetime.timedelta(hours=30))]
)
def test_the_wait_for_the_slowest_rank_is_a_cli_option(
    option: list[str],
    wait: datetime.timedelta,
    emulated: tuple[_Recorder, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, _ = emulated
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the command installs its own; give it back after
    result = CliRunner().invoke(arcface_torch_app, ["cache-teacher", "configs/x", *option])
    assert result.exit_code == 0, result.output
    _assert_no_device_is_guessed_and_the_wait_is(recorder, wait)


def test_a_group_the_caller_made_is_kept_and_the_ranks_meet_in_a_gloo_group_of_their_own(
    emulated: tuple[_Recorder, dict[str, Any]],
) -> None:
    recorder, _ = emulated
    recorder.default = _Group("nccl", datetime.timedelta(minutes=10))
    cache.cache_recipe_teacher("configs/x", wait=datetime.timedelta(hours=5))
    assert not recorder.named("init_process_group"), recorder.calls
    assert all(destroyed["group"] is not None for destroyed in recorder.named("destroy")), recorder.calls
    (made,) = recorder.named("new_group")
    assert made["backend"] == "gloo", made
    _assert_no_device_is_guessed_and_the_wait_is(recorder, datetime.timedelta(hours=5))


def test_more_processes_than_gpus_is_refused_before_any_group(
    emulated: tuple[_Recorder, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, _ = emulated
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=4 but this node has 4 GPU\(s\).*--nproc_per_node"):
        cache.cache_recipe_teacher("configs/x")
    assert not recorder.calls, recorder.calls


@pytest.mark.parametrize("rank", [0, 1])
def test_on_a_cpu_host_rank_0_embeds_every_record_with_every_core_and_the_others_wait(
    rank: int, emulated: tuple[_Recorder, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, seen = emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    seen_while_building: dict[str, Any] = {}

    def teacher(cfg: Any, device: str = "cpu", threads: int | None = None) -> Any:
        # onnxruntime's threads are fixed when the teacher's session is made; a torch teacher runs on torch's.
        seen_while_building["threads"] = threads
        seen_while_building["torch_threads"] = torch.get_num_threads()
        return SimpleNamespace(teacher_id="t", embedding_size=512)

    monkeypatch.setattr(cache, "create_recipe_teacher", teacher)
    cache.cache_recipe_teacher("configs/x", batch_size=8, workers=0)
    if rank == 0:
        assert (seen["build"]["rank"], seen["build"]["world_size"]) == (0, 1)
        assert seen_while_building == {"threads": os.cpu_count(), "torch_threads": os.cpu_count()}
    else:
        assert "build" not in seen, seen
        assert seen_while_building == {"threads": None, "torch_threads": threads}
    # Every rank meets the others after the embedding, and leaves the process as it found it.
    order = [name for name, _ in recorder.calls]
    assert order.count("barrier") == 1 and order.index("barrier") < order.index("check"), order
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and torch.get_num_threads() == threads
