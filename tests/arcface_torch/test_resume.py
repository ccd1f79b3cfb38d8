"""``config.resume = True`` on another number of processes: the head's class blocks and their optimiser state recut
by class (``facedistill.arcface_torch.resume``), pure tensors first, then real ``train_v2.py`` runs under torchrun."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from facedistill.arcface_torch import resume
from facedistill.arcface_torch.resume import ResumeError, reshard_checkpoint, reshard_rows, restore, shard_sizes
from facedistill.heads.sharded import shard_range
from tests.arcface_torch.helpers import copy_upstream, facedistill, run, torchrun

D = 5


@pytest.mark.parametrize(("classes", "old", "new"), [(7, 2, 3), (7, 3, 2), (7, 1, 2), (7, 2, 1), (7, 3, 4), (6, 2, 3)])
def test_reshard_rows_gives_each_new_rank_its_classes_in_order(classes: int, old: int, new: int) -> None:
    full = torch.arange(classes * D, dtype=torch.float32).view(classes, D)
    shards = [full[slice(*shard_range(classes, r, old))].clone() for r in range(old)]
    blocks = [reshard_rows(shards, classes, rank, new) for rank in range(new)]
    assert [b.shape[0] for b in blocks] == shard_sizes(classes, new)
    assert torch.equal(torch.cat(blocks), full)
    for rank, block in enumerate(blocks):
        assert torch.equal(block, full[slice(*shard_range(classes, rank, new))])


def test_reshard_rows_refuses_blocks_that_are_not_the_partial_fc_split() -> None:
    with pytest.raises(ValueError, match=r"blocks of \[3, 4\] rows are not 7 classes split over 2 ranks \(\[4, 3\]\)"):
        reshard_rows([torch.zeros(3, D), torch.zeros(4, D)], 7, 0, 1)


def test_shard_sizes_are_upstreams_partial_fc_v2_split() -> None:
    # partial_fc_v2.py: num_local = C // W + (rank < C % W); class_start = C // W * rank + min(rank, C % W)
    for classes, world in ((7, 2), (7, 3), (10, 4), (3, 5)):
        starts = [classes // world * r + min(r, classes % world) for r in range(world)]
        sizes = [classes // world + int(r < classes % world) for r in range(world)]
        assert shard_sizes(classes, world) == sizes
        assert [shard_range(classes, r, world)[0] for r in range(world)] == starts


class _Head(nn.Module):
    """A PartialFC_V2-like head of ``rank``'s block of classes, with a replicated buffer beside it."""

    def __init__(self, classes: int, rank: int, world: int, trainable: bool = True) -> None:
        super().__init__()
        start, end = shard_range(classes, rank, world)
        weight = torch.zeros(end - start, D)
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("scale", torch.zeros(()))


def _saved_world(classes: int, world: int, optimizer: str, trainable: bool = True) -> tuple[list[dict], dict]:
    """Checkpoints as ``world`` ranks of train_v2.py save them, of known full tensors (returned too)."""
    torch.manual_seed(0)
    full = {"weight": torch.randn(classes, D), "momentum": torch.randn(classes, D), "second": torch.rand(classes, D)}
    backbone = torch.randn(3, 2)
    checkpoints = []
    for rank in range(world):
        rows = slice(*shard_range(classes, rank, world))
        net, head = nn.Linear(2, 3, bias=False), _Head(classes, rank, world, trainable)
        with torch.no_grad():
            net.weight.copy_(backbone)
            head.weight.copy_(full["weight"][rows])
            head.scale.fill_(64.0)
        opt = _optimizer(optimizer, net, head)
        index = 1  # the backbone's one parameter first, as train_v2.py orders the groups
        state = opt.state_dict()
        if trainable and optimizer == "sgd":
            state["state"] = {
                0: {"momentum_buffer": torch.ones(3, 2)},
                index: {"momentum_buffer": full["momentum"][rows]},
            }
        elif trainable:
            state["state"] = {
                0: {"step": torch.tensor(6.0), "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(3, 2)},
                index: {"step": torch.tensor(6.0), "exp_avg": full["momentum"][rows],
                        "exp_avg_sq": full["second"][rows]},
            }  # fmt: skip
        checkpoints.append(
            {
                "epoch": 2,
                "global_step": 6,
                "state_dict_backbone": net.state_dict(),
                "state_dict_softmax_fc": head.state_dict(),
                "state_optimizer": state,
                "state_lr_scheduler": {"last_epoch": 6},
            }
        )
    return checkpoints, {**full, "backbone": backbone}


def _optimizer(kind: str, net: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": net.parameters()}, {"params": head.parameters()}]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(groups, lr=0.1)


FILES = [Path(f"out/checkpoint_gpu_{rank}.pt") for rank in range(4)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_a_checkpoint_of_another_world_is_recut_by_class_head_and_optimiser_state(
    optimizer: str, old: int, new: int
) -> None:
    classes = 7
    checkpoints, full = _saved_world(classes, old, optimizer)
    for rank in range(new):
        rows = slice(*shard_range(classes, rank, new))
        net, head = nn.Linear(2, 3, bias=False), _Head(classes, rank, new)
        opt = _optimizer(optimizer, net, head)
        checkpoint = reshard_checkpoint(checkpoints, FILES[:old], head, opt, classes, rank, new)
        assert set(checkpoint) == set(checkpoints[0])
        assert torch.equal(checkpoint["state_dict_softmax_fc"]["weight"], full["weight"][rows])
        assert float(checkpoint["state_dict_softmax_fc"]["scale"]) == 64.0
        assert torch.equal(checkpoint["state_dict_backbone"]["weight"], full["backbone"])
        head_state = checkpoint["state_optimizer"]["state"][1]
        if optimizer == "sgd":
            assert torch.equal(head_state["momentum_buffer"], full["momentum"][rows])
        else:
            assert torch.equal(head_state["exp_avg"], full["momentum"][rows])
            assert torch.equal(head_state["exp_avg_sq"], full["second"][rows])
            assert float(head_state["step"]) == 6.0
        # What train_v2.py then does with it: upstream's own loads.
        net.load_state_dict(checkpoint["state_dict_backbone"])
        head.load_state_dict(checkpoint["state_dict_softmax_fc"])
        opt.load_state_dict(checkpoint["state_optimizer"])
        assert torch.equal(head.weight.detach(), full["weight"][rows])


def test_a_frozen_head_is_recut_too_and_has_no_optimiser_state() -> None:
    checkpoints, full = _saved_world(7, 2, "sgd", trainable=False)
    for rank in range(3):
        net, head = nn.Linear(2, 3, bias=False), _Head(7, rank, 3, trainable=False)
        checkpoint = reshard_checkpoint(checkpoints, FILES[:2], head, _optimizer("sgd", net, head), 7, rank, 3)
        assert torch.equal(
            checkpoint["state_dict_softmax_fc"]["weight"], full["weight"][slice(*shard_range(7, rank, 3))]
        )


def test_checkpoints_of_different_saves_are_refused_naming_the_file() -> None:
    checkpoints, _ = _saved_world(7, 2, "sgd")
    checkpoints[1] = {**checkpoints[1], "epoch": 1, "global_step": 3}
    net, head = nn.Linear(2, 3, bias=False), _Head(7, 0, 1)
    with pytest.raises(ResumeError, match=r"out/checkpoint_gpu_1.pt is of epoch 1, step 3, out/checkpoint_gpu_0.pt of"):
        reshard_checkpoint(checkpoints, FILES[:2], head, _optimizer("sgd", net, head), 7, 0, 1)


def test_a_missing_last_file_is_named_with_the_saved_process_count() -> None:
    checkpoints, _ = _saved_world(7, 3, "sgd")  # blocks of 3, 2, 2 classes; the third file is gone
    net, head = nn.Linear(2, 3, bias=False), _Head(7, 0, 1)
    with pytest.raises(ResumeError) as error:
        reshard_checkpoint(checkpoints[:2], FILES[:2], head, _optimizer("sgd", net, head), 7, 0, 1)
    assert str(error.value).startswith("out/checkpoint_gpu_2.pt is missing: ")
    assert "7 classes split over 3 processes" in str(error.value) and "\n" not in str(error.value)


def test_a_head_of_another_class_count_is_refused_with_both_shapes() -> None:
    checkpoints, _ = _saved_world(7, 2, "sgd")
    net, head = nn.Linear(2, 3, bias=False), _Head(9, 0, 1)
    with pytest.raises(
        ResumeError, match=r"\[\(4, 5\), \(3, 5\)\] in the 2 checkpoint_gpu_\*.pt .* \(9, 5\) in rank 0"
    ):
        reshard_checkpoint(checkpoints, FILES[:2], head, _optimizer("sgd", net, head), 9, 0, 1)


def test_a_gap_or_no_file_at_all_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match=r"holds no checkpoint_gpu_\*.pt: .* config.save_all_states = True"):
        resume.checkpoint_files(tmp_path)
    for rank in (0, 2):
        (tmp_path / f"checkpoint_gpu_{rank}.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match=rf"^{re.escape(str(tmp_path))}/checkpoint_gpu_1.pt is missing, beside 2"):
        resume.checkpoint_files(tmp_path)


@pytest.fixture(scope="module")
def lr_scheduler(upstream: Path, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The patched checkout's ``lr_scheduler.py`` (upstream's PolynomialLRWarmup, which train_v2.py resumes)."""
    root = copy_upstream(tmp_path_factory.mktemp("resume") / "arcface_torch")
    run(facedistill("arcface-torch", "patch", str(root)), cwd=root)
    spec = importlib.util.spec_from_file_location("patched_lr_scheduler", root / "lr_scheduler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_parts(lr_scheduler: ModuleType, classes: int, rank: int, world: int, images: int, batch: int) -> tuple:
    """train_v2.py's backbone, head, SGD and scheduler for ``world`` processes (2 epochs, 1 of warm-up)."""
    net, head = nn.Linear(2, 3, bias=False), _Head(classes, rank, world)
    opt = _optimizer("sgd", net, head)
    steps = images // (batch * world)
    return net, head, opt, lr_scheduler.PolynomialLRWarmup(opt, warmup_iters=steps, total_iters=2 * steps)


def _save_run(lr_scheduler: ModuleType, output: Path, classes: int, world: int, images: int, batch: int) -> None:
    """The checkpoints ``world`` processes save after one epoch of a 2-epoch run."""
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    full = torch.randn(classes, D)
    for rank in range(world):
        net, head, opt, scheduler = _run_parts(lr_scheduler, classes, rank, world, images, batch)
        steps = images // (batch * world)
        with torch.no_grad():
            head.weight.copy_(full[slice(*shard_range(classes, rank, world))])
        for _ in range(steps):
            opt.zero_grad()
            (net.weight.sum() + (head.weight**2).sum()).backward()  # per-class momentum
            opt.step()
            scheduler.step()
        checkpoint = {
            "epoch": 1,
            "global_step": steps,
            "state_dict_backbone": net.state_dict(),
            "state_dict_softmax_fc": head.state_dict(),
            "state_optimizer": opt.state_dict(),
            "state_lr_scheduler": scheduler.state_dict(),
        }
        torch.save(checkpoint, output / f"checkpoint_gpu_{rank}.pt")


def test_restore_on_the_saved_world_is_upstreams_own_file_as_it_was(
    lr_scheduler: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_run(lr_scheduler, tmp_path, 7, 1, 64, 8)
    saved = torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)
    saved["global_step"] = 5  # not epoch * steps per epoch: upstream's path takes it as it is
    torch.save(saved, tmp_path / "checkpoint_gpu_0.pt")
    net, head, opt, scheduler = _run_parts(lr_scheduler, 7, 0, 1, 64, 8)
    cfg = {"output": str(tmp_path), "num_classes": 7, "num_image": 64, "batch_size": 8}
    with caplog.at_level("INFO"):
        assert restore(cfg, 0, 1, net, head, opt, scheduler) == (1, 5)
    # The log says it resumed, as it does on another number of processes.
    assert "saved by 1 processes as this run has: epoch 1, step 5" in caplog.text
    assert scheduler.state_dict() == saved["state_lr_scheduler"]
    assert torch.equal(head.weight.detach(), saved["state_dict_softmax_fc"]["weight"])


def test_restore_on_another_world_continues_the_schedule_in_its_own_steps(
    lr_scheduler: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_run(lr_scheduler, tmp_path, 7, 2, 64, 8)  # 4 steps an epoch on 2 processes, 8 on 1
    saved = [torch.load(tmp_path / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(2)]
    full = torch.cat([s["state_dict_softmax_fc"]["weight"] for s in saved])
    momentum = torch.cat([s["state_optimizer"]["state"][1]["momentum_buffer"] for s in saved])
    net, head, opt, scheduler = _run_parts(lr_scheduler, 7, 0, 1, 64, 8)
    cfg = {"output": str(tmp_path), "num_classes": 7, "num_image": 64, "batch_size": 8}
    with caplog.at_level("INFO"):
        assert restore(cfg, 0, 1, net, head, opt, scheduler) == (1, 8)
    assert "saved by 2 processes, on 1: epoch 1, their step 4 is this run's step 8" in caplog.text
    assert torch.equal(head.weight.detach(), full)
    assert torch.equal(opt.state_dict()["state"][1]["momentum_buffer"], momentum)
    # The end of warm-up, in this run's steps: the base learning rate, then the decay over this run's 8 steps.
    assert (scheduler.last_epoch, scheduler.warmup_iters, scheduler.total_iters) == (8, 8, 16)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    fresh_net, fresh_head, fresh_opt, fresh = _run_parts(lr_scheduler, 7, 0, 1, 64, 8)
    for _ in range(12):
        fresh_opt.step()
        fresh.step()
    for _ in range(4):
        opt.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx(fresh.get_last_lr())


def test_a_stale_file_of_a_larger_run_beside_a_fitting_one_is_refused(lr_scheduler: ModuleType, tmp_path: Path) -> None:
    _save_run(lr_scheduler, tmp_path / "two", 7, 2, 64, 8)
    _save_run(lr_scheduler, tmp_path, 7, 1, 64, 8)
    shutil.copy(tmp_path / "two" / "checkpoint_gpu_1.pt", tmp_path / "checkpoint_gpu_1.pt")
    net, head, opt, scheduler = _run_parts(lr_scheduler, 7, 0, 1, 64, 8)
    cfg = {"output": str(tmp_path), "num_classes": 7, "num_image": 64, "batch_size": 8}
    with pytest.raises(
        ResumeError, match=r"checkpoint_gpu_1.pt is of epoch 1, step 4, .*checkpoint_gpu_0.pt of epoch 1"
    ):
        restore(cfg, 0, 1, net, head, opt, scheduler)


# train_v2.py's main() up to its resume block, under torchrun: what ``resume.restore`` loaded, saved per rank, and the
# run stopped there (the head's state is not observable once the run trains on).
CAPTURE = r"""
import argparse, sys
import torch
config, out = sys.argv[1], sys.argv[2]
import train_v2  # initialises the process group, as under torchrun
from facedistill.arcface_torch import resume

restore = resume.restore

def capture(cfg, rank, world_size, backbone, head, opt, scheduler):
    epoch, step = restore(cfg, rank, world_size, backbone, head, opt, scheduler)
    torch.save({"epoch": epoch, "step": step, "head": head.state_dict(), "optimizer": opt.state_dict(),
                "backbone": backbone.state_dict(), "lr": [group["lr"] for group in opt.param_groups],
                "last_epoch": scheduler.last_epoch, "total_iters": scheduler.total_iters}, f"{out}/restored_{rank}.pt")
    raise SystemExit(0)

resume.restore = capture
train_v2.main(argparse.Namespace(config=config))
"""
STEP = re.compile(r"Global Step: (\d+)")
IMAGES, BATCH, CLASSES = 138, 8, 6  # the tiny set of conftest.py


def _recipe(root: Path, name: str, base: str, **keys: object) -> str:
    lines = "".join(f"config.{key} = {value!r}\n" for key, value in keys.items())
    (root / "configs" / f"{name}.py").write_text((root / "configs" / f"{base}.py").read_text() + lines)
    return f"configs/{name}"


def _capture(root: Path, recipe: str, nproc: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run(torchrun(nproc, "capture_resume.py", recipe, str(out)), cwd=root)
    return [torch.load(out / f"restored_{rank}.pt", weights_only=True) for rank in range(nproc)]


def _head_rows(saved: list[dict], key: str) -> torch.Tensor:
    return torch.cat([checkpoint["state_dict_softmax_fc"][key] for checkpoint in saved])


def test_the_frameworks_arcface_run_resumes_on_another_number_of_processes(patched_checkout: Path) -> None:
    root = patched_checkout
    (root / "capture_resume.py").write_text(CAPTURE)
    output = root / "work_dirs" / "tiny_resume"
    keys = {"save_all_states": True, "output": "work_dirs/tiny_resume"}
    run(torchrun(2, "train_v2.py", _recipe(root, "tiny_resume", "tiny", num_epoch=1, **keys)), cwd=root)
    saved = [torch.load(output / f"checkpoint_gpu_{rank}.pt", weights_only=True) for rank in range(2)]
    assert [c["state_dict_softmax_fc"]["weight"].shape[0] for c in saved] == [3, 3]
    weight = _head_rows(saved, "weight")
    # The head's weight is the optimiser's last parameter (train_v2.py's second group).
    momentum = torch.cat([c["state_optimizer"]["state"][max(c["state_optimizer"]["state"])]["momentum_buffer"]
                          for c in saved])  # fmt: skip
    assert saved[0]["global_step"] == IMAGES // (2 * BATCH)
    on = _recipe(root, "tiny_resume_on", "tiny_resume", num_epoch=2, resume=True)

    # 2 -> 1 and 2 -> 3 (blocks of 2 classes, across the old blocks of 3): each rank's rows of the full head.
    for nproc in (1, 3):
        restored = _capture(root, on, nproc, root / f"restored_{nproc}")
        for rank, state in enumerate(restored):
            rows = slice(*shard_range(CLASSES, rank, nproc))
            assert torch.equal(state["head"]["weight"], weight[rows])
            head_state = state["optimizer"]["state"][max(state["optimizer"]["state"])]
            assert torch.equal(head_state["momentum_buffer"], momentum[rows])
            assert (state["epoch"], state["step"]) == (1, IMAGES // (nproc * BATCH))
            assert all(torch.equal(state["backbone"][k], v) for k, v in saved[0]["state_dict_backbone"].items())

    # The real run on 1 process: it says so, trains epoch 2 in its own steps, from where the schedule stood.
    result = run(torchrun(1, "train_v2.py", on), cwd=root)
    log = (output / "training.log").read_text()
    assert "saved by 2 processes, on 1: epoch 1, their step 8 is this run's step 17" in log, result.stderr[-3000:]
    steps = [int(step) for step in STEP.findall(log.split("saved by 2 processes, on 1")[-1])]  # the last start's
    assert steps and min(steps) > IMAGES // BATCH and max(steps) == 2 * (IMAGES // BATCH)
    assert torch.load(output / "checkpoint_gpu_0.pt", weights_only=True)["global_step"] == 2 * (IMAGES // BATCH)

    # checkpoint_gpu_1.pt is now the 2-process run's, of epoch 1: refused in one line, naming it.
    again = _recipe(root, "tiny_resume_again", "tiny_resume_on", num_epoch=3)
    refused = run(torchrun(2, "train_v2.py", again), cwd=root, check=False)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]
    stale = "work_dirs/tiny_resume/checkpoint_gpu_1.pt is of epoch 1, step 8, work_dirs/tiny_resume/checkpoint_gpu_0.pt"
    assert errors[0].startswith(f"error: {stale} of epoch 2, step 34: "), errors[0]

    # 1 -> 2 once the stale file is gone.
    (output / "checkpoint_gpu_1.pt").unlink()
    one = torch.load(output / "checkpoint_gpu_0.pt", weights_only=True)
    for rank, state in enumerate(_capture(root, again, 2, root / "restored_back")):
        rows = slice(*shard_range(CLASSES, rank, 2))
        assert torch.equal(state["head"]["weight"], one["state_dict_softmax_fc"]["weight"][rows])
        assert state["step"] == 2 * (IMAGES // (2 * BATCH))


def test_a_margin_distillation_run_resumes_on_another_number_of_processes(patched_checkout: Path) -> None:
    root = patched_checkout
    output = root / "work_dirs" / "tiny_md_resume"
    keys = {"save_all_states": True, "output": "work_dirs/tiny_md_resume"}
    run(torchrun(2, "train_v2.py", _recipe(root, "tiny_md_resume", "tiny_md", num_epoch=1, **keys)), cwd=root)
    saved = [torch.load(output / f"checkpoint_gpu_{rank}.pt", weights_only=True) for rank in range(2)]
    (key,) = [k for k, v in saved[0]["state_dict_softmax_fc"].items() if v.ndim == 2]
    centres = _head_rows(saved, key)
    assert centres.shape[0] == CLASSES
    on = _recipe(root, "tiny_md_resume_on", "tiny_md_resume", num_epoch=2, resume=True)
    run(torchrun(1, "train_v2.py", on), cwd=root)
    log = (output / "training.log").read_text()
    assert "saved by 2 processes, on 1: epoch 1, their step 8 is this run's step 17" in log
    resumed = torch.load(output / "checkpoint_gpu_0.pt", weights_only=True)
    assert resumed["global_step"] == 2 * (IMAGES // BATCH)
    # The teacher's frozen centres: the full matrix, in class order, as the two blocks held it.
    assert torch.equal(resumed["state_dict_softmax_fc"][key], centres)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
