"""The one training loop: every method (ArcFace or any distillation) runs through ``train``.

Read it top to bottom: set up the run directory, data, teacher cache and centres, student, method, optimiser;
then iterate steps (flip, cached teacher rows, forward, method losses, backward, schedule); validate on a
declared validation set, checkpoint atomically, and at the end evaluate the reported model on the test sets and
export it to ONNX.

Under ``torchrun`` every process runs this same loop on its slice of each global batch (see
``facedistill.train.distributed``); rank 0 alone logs, validates, writes checkpoints, evaluates and exports.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from facedistill.config import Config, save_config
from facedistill.data.datasets import FaceDataset, collate_faces, open_training_set
from facedistill.data.samplers import IdentityBalancedSampler
from facedistill.data.splits import read_identity_list
from facedistill.distill import MethodContext, create_method, method_params
from facedistill.distill.context import TeacherSpec, build_teacher_side
from facedistill.models import create_model
from facedistill.teachers.cache import TeacherCache
from facedistill.train.checkpoint import load_checkpoint, save_checkpoint
from facedistill.train.distributed import (
    Distributed,
    check_replicated_parameters,
    checkpointed_bytes,
    ddp,
    gather_training_state,
    init_distributed,
    local_batch_size,
    local_indices,
    shard_training_state,
    sharded_heads,
    wrap_backbone,
)
from facedistill.train.logging import RunLogger
from facedistill.train.optim import build_optimizer, build_scheduler
from facedistill.train.recipe import validate_config
from facedistill.train.step import TrainStep, step_generator

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    epochs: float
    wall_seconds: float
    train_seconds: float
    images_per_second: float
    selected: str
    validation: dict[str, float] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    skipped_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "epochs": self.epochs,
            "wall_seconds": self.wall_seconds,
            "train_seconds": self.train_seconds,
            "images_per_second": self.images_per_second,
            "selected": self.selected,
            "validation": self.validation,
            "tests": self.tests,
            "skipped_images": self.skipped_images,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware runs it natively (Ampere+ GPUs; CPUs with AVX-512 bf16 / AMX), else fp16
    on GPUs and fp32 on CPUs."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_output_dir(run_dir: Path, needed_bytes: int = 0) -> None:
    """Fail before training, not after hours, when the run directory cannot be written or lacks the space for
    the checkpoints (``needed_bytes``: two full checkpoints, the last one and the one being written)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the run directory {run_dir}: {error.strerror or error}") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OSError(
            f"the run directory {run_dir} has {free / 2**20:.1f} MiB free but checkpoints need about "
            f"{needed_bytes / 2**20:.1f} MiB; free some space or choose another run.output_dir"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_method_context(
    config: Config, dataset: FaceDataset, steps_per_epoch: int, world_size: int = 1
) -> tuple[MethodContext, TeacherCache | None, torch.Tensor | None, dict[str, Any]]:
    """Load and check the teacher cache, then build the method's teacher side (``distill.context``). Every rank
    reads the whole cache, so the centres, typicalities and MarginDistillation's dataset normaliser are the same
    on all of them. Also returns the teacher offset (``teacher.subtract_mean``, else None) that the training step
    subtracts from the rows, as it was subtracted here from the centres."""
    method_cls, params = method_params(config.method)
    context = MethodContext(
        dataset.num_classes,
        config.model.embedding_size,
        steps_per_epoch=steps_per_epoch,
        shard_heads=world_size > 1 and method_cls.head_can_shard(params),
    )
    if not method_cls.needs_teacher:
        return context, None, None, {}
    assert config.teacher.cache, "validate_config requires teacher.cache for methods with a teacher"
    cache = TeacherCache(config.teacher.cache)
    teacher_id = None
    if config.teacher.spec:
        from facedistill.teachers import CONFIG_PREPROCESSING_KEYS, create_teacher

        # An .onnx teacher's preprocessing is part of its id: the same keys the cache was built with give the same id.
        teacher = create_teacher(
            config.teacher.spec,
            preprocessing=config.teacher.preprocessing(),
            preprocessing_keys=CONFIG_PREPROCESSING_KEYS,
        )
        teacher_id = teacher.teacher_id
    cache.check(dataset, teacher_id)
    if cache.embedding_size != config.model.embedding_size:
        raise ValueError(
            f"the teacher's embeddings are {cache.embedding_size}-d but the student's are "
            f"{config.model.embedding_size}-d; set model.embedding_size={cache.embedding_size} (the student uses "
            "the teacher's class centres, so the sizes must match)"
        )
    spec = TeacherSpec(
        cache,
        np.asarray(dataset.labels),
        dataset.num_classes,
        centres=config.teacher.centres,
        subtract_mean=config.teacher.subtract_mean,
    )
    side = build_teacher_side(spec)
    side.fill(context)
    return context, cache, side.offset, side.info(cache)


def train(config: Config, resume: bool = False, progress: bool = True) -> RunSummary:
    """Run a training run, or with ``resume`` continue it from the run directory's last checkpoint.

    Under ``torchrun`` (``WORLD_SIZE`` > 1), or inside a process group the caller initialised, every process calls
    this; each returns the summary, with the test results on rank 0 only.
    """
    # First, before the process group, the run directory or the data: a bad config is one line, on every rank.
    validate_config(config)
    env, device = init_distributed(resolve_device(config.run.device))
    try:
        return _train(config, env, device, resume, progress)
    except BaseException as error:
        # The failed run's frames hold its DDP reducer and sharded heads, which hold the process group: let them go
        # with the frames' locals (the traceback keeps its lines), so that nothing outlives the group below.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        env.close()


def _train(config: Config, env: Distributed, device: torch.device, resume: bool, progress: bool) -> RunSummary:
    """The run itself, in a frame of its own: when it returns, its ``Run`` (DDP, sharded heads) is gone before
    ``train`` destroys the process group that they hold."""
    run = set_up(config, env, device)
    # Rank 0 decides, so that no rank resumes while another starts afresh.
    if env.broadcast_flag(resume and env.is_main and (run.run_dir / LAST).exists(), device):
        restore(run)
    start(run, progress)
    while run.step < run.total_steps:
        train_epoch(run)
    return finish(run, progress)


@dataclass
class Run:
    """One training run's state: made by ``set_up``, advanced an epoch at a time by ``train_epoch``, closed by
    ``finish``. Every rank holds one; only rank 0 logs, validates and writes."""

    config: Config
    env: Distributed
    device: torch.device
    started: float
    dataset: FaceDataset
    steps_per_epoch: int
    total_steps: int
    balanced: IdentityBalancedSampler | None
    cache: TeacherCache | None
    teacher_offset: torch.Tensor | None
    teacher_info: dict[str, Any]
    val_set: Any
    model: torch.nn.Module
    synced_batchnorm: bool
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_step: TrainStep | None = None
    logger: RunLogger | None = None
    bar: tqdm | None = None
    step: int = 0
    best_val: float = -1.0
    skipped: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    trained_images: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.output_dir)

    @property
    def rank_batch(self) -> int:
        """Every rank draws the same global batch of data.batch_size images and trains on its contiguous share."""
        return local_batch_size(self.config.data.batch_size, self.env.world_size)

    @property
    def val_every(self) -> int:
        return max(1, int(round(self.config.train.val_every_epochs * self.steps_per_epoch)))


def set_up(config: Config, env: Distributed, device: torch.device) -> Run:
    """Run directory, data, teacher side, validation pairs, student, method, optimiser, schedule and scaler."""
    started = time.perf_counter()
    run_dir = Path(config.run.output_dir)
    if env.is_main:
        check_output_dir(run_dir)
        save_config(config, run_dir / "config.yaml")
    seed_everything(config.run.seed)
    dataset, steps_per_epoch, total_steps, balanced = open_data(config, env)
    context, cache, teacher_offset, teacher_info = prepare_method_context(
        config, dataset, steps_per_epoch, env.world_size
    )
    val_set = None
    if config.data.val_pairs and env.is_main:
        from facedistill.eval.verify import load_pairs_set

        val_set = load_pairs_set(config.data.val_pairs, config.data.val_images, name="val")

    # Seeded again because preparing the data may have drawn from the global generator (a DataLoader building a
    # cache draws its base seed), and the initial weights must not depend on whether a cache was built in this run.
    seed_everything(config.run.seed)
    model = create_model(config.model.name, embedding_size=config.model.embedding_size).to(device)
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model, synced_batchnorm = wrap_backbone(
        model.to(memory_format=memory_format), env, device, config.train.sync_batchnorm
    )
    method = create_method(config.method, context).to(device)
    if env.enabled:
        check_replicated_parameters(method, config.method["name"])
    optimizer = build_optimizer([model, method], config.optim)
    if env.is_main:
        # A checkpoint holds the weights plus up to two optimiser moments per weight; keep room for two of them.
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        check_output_dir(run_dir, needed_bytes=2 * 3 * (weight_bytes + checkpointed_bytes(method)))
    amp_dtype = resolve_amp(config.train.amp, device)
    return Run(
        config, env, device, started, dataset, steps_per_epoch, total_steps, balanced, cache, teacher_offset,
        teacher_info, val_set, model, synced_batchnorm, method, optimizer,
        build_scheduler(optimizer, total_steps, steps_per_epoch, config.schedule),
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), amp_dtype,
    )  # fmt: skip


def open_data(config: Config, env: Distributed) -> tuple[FaceDataset, int, int, IdentityBalancedSampler | None]:
    """The training set, its steps per epoch, the run's total steps and (``data.sampler``) the balanced sampler."""
    dataset = open_training_set(
        config.data.train,
        config.data.skip_bad_images,
        config.data.decoded_cache,
        exclude=read_identity_list(config.data.exclude_identities) if config.data.exclude_identities else None,
    )
    batch_size = config.data.batch_size
    steps_per_epoch = len(dataset) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{config.data.train}: {len(dataset)} images are fewer than one batch of {batch_size}")
    total_steps = config.train.max_steps or math.ceil(config.train.epochs * steps_per_epoch)
    balanced = None
    if config.data.sampler == "identity_balanced":
        balanced = IdentityBalancedSampler(dataset.labels, batch_size, config.data.images_per_identity, config.run.seed)
        rank_batch = local_batch_size(batch_size, env.world_size)
        if rank_batch % config.data.images_per_identity:
            raise ValueError(
                f"each of the {env.world_size} processes takes {rank_batch} images of a batch, not a multiple of "
                f"data.images_per_identity={config.data.images_per_identity}: an identity's images would be split "
                "between processes; change data.batch_size"
            )
    return dataset, steps_per_epoch, total_steps, balanced


def restore(run: Run) -> None:
    """Continue from the run directory's last checkpoint (every rank: each keeps only its shard of the head)."""
    # On the host, whatever the run trains on: loading onto a GPU would move the CPU RNG state there (which
    # torch.set_rng_state refuses) and the optimiser's step counters too; load_state_dict moves the weights and
    # the optimiser state to their parameters' device.
    state = load_checkpoint(run.run_dir / LAST, "cpu")
    method_state, optimizer_state = shard_training_state(run.method, run.optimizer, state["method"], state["optimizer"])
    run.model.load_state_dict(state["model"])
    run.method.load_state_dict(method_state)
    run.optimizer.load_state_dict(optimizer_state)
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.best_val, run.skipped = state["step"], state["best_val"], state["skipped"]
    # A resumed run reports the training time and images of all its parts (absent from older checkpoints).
    run.train_seconds = float(state.get("train_seconds", 0.0))
    run.trained_images = int(state.get("trained_images", 0))
    torch.set_rng_state(state["rng"])


def start(run: Run, progress: bool) -> None:
    """The training step, the log and the progress bar. After ``restore``: DDP starts every rank from rank 0's
    weights, which are then the checkpoint's."""
    config = run.config
    wrapped = ddp(run.model, run.device) if run.env.enabled else run.model
    run.train_step = TrainStep.from_config(
        config,
        forward=torch.compile(wrapped) if config.train.compile else wrapped,
        method=run.method,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        device=run.device,
        steps_per_epoch=run.steps_per_epoch,
        amp_dtype=run.amp_dtype,
        cache=run.cache,
        teacher_offset=run.teacher_offset,
        env=run.env,
        divergence_hint=f"; the last good checkpoint is {run.run_dir / LAST}. Lower optim.lr or raise "
        "schedule.warmup_epochs, then --resume",
    )
    run.logger = RunLogger(run.run_dir, enabled=run.env.is_main)
    show = progress and run.env.is_main
    run.bar = tqdm(total=run.total_steps, initial=run.step, desc=f"train {config.method['name']}", unit="step",
                   disable=not show)  # fmt: skip
    run.model.train()
    run.method.train()


def epoch_loader(run: Run) -> DataLoader:
    """This rank's batches of the rest of the current epoch (the same order on every rank and after a resume)."""
    config, batch_size = run.config, run.config.data.batch_size
    epoch, offset = divmod(run.step, run.steps_per_epoch)
    if run.balanced is not None:
        indices = [index for batch in run.balanced.epoch_batches(epoch)[offset:] for index in batch]
    else:
        order = torch.randperm(len(run.dataset), generator=step_generator(config.run.seed, -1 - epoch))
        indices = order[offset * batch_size : run.steps_per_epoch * batch_size].tolist()
    return DataLoader(
        run.dataset,
        batch_size=run.rank_batch,
        sampler=local_indices(indices, batch_size, run.env),
        drop_last=True,
        collate_fn=collate_faces,
        num_workers=config.data.num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if config.data.num_workers else None,
    )


def train_epoch(run: Run) -> None:
    """One epoch (or its rest): steps, logging, validation and checkpoints; training time excludes the last two."""
    config = run.config
    assert run.train_step is not None and run.bar is not None
    tick = time.perf_counter()
    for batch in epoch_loader(run):
        terms, values, batch_skipped, rows = run.train_step(batch, run.step)
        run.step += 1
        run.skipped += batch_skipped
        now = time.perf_counter()
        run.train_seconds += now - tick
        run.trained_images += rows * run.env.world_size
        run.bar.update(1)
        if run.env.is_main and (run.step % config.train.log_every == 0 or run.step == run.total_steps):
            log_step(run, terms, values.tolist())
        if config.data.val_pairs and (run.step % run.val_every == 0 or run.step == run.total_steps):
            validate(run)
        if run.step % config.train.checkpoint_every == 0 or run.step == run.total_steps:
            save(run, run.run_dir / LAST)
        if run.step >= run.total_steps:
            break
        tick = time.perf_counter()


def log_step(run: Run, terms: list[str], logged: list[float]) -> None:
    assert run.logger is not None and run.bar is not None
    speed = run.trained_images / max(run.train_seconds, 1e-9)
    row = dict(zip(terms, logged[1:], strict=True))
    row.update(loss=logged[0], lr=run.optimizer.param_groups[0]["lr"], images_per_second=speed,
               epoch=run.step / run.steps_per_epoch)  # fmt: skip
    run.logger.log("train", run.step, row)
    run.bar.set_postfix(loss=f"{logged[0]:.3f}", img_s=f"{speed:.0f}")


def validate(run: Run) -> None:
    """Accuracy on the validation pairs (rank 0), shared with every rank; the best model so far is kept when the
    run selects on it (``train.select=best_val``)."""
    config = run.config
    accuracy, accuracy_std = -1.0, 0.0
    if run.env.is_main:
        from facedistill.eval.verify import evaluate_pairs, student_embedder

        assert run.val_set is not None and run.logger is not None
        run.model.eval()
        embed = student_embedder(run.model, run.device, config.train.amp)
        result, _ = evaluate_pairs(
            embed, run.val_set, config.eval.flip, config.eval.batch_size, config.data.num_workers, False
        )
        run.model.train()
        accuracy, accuracy_std = result.accuracy_mean, result.accuracy_std
        # The AUC beside the accuracy: at a few hundred pairs it moves less from one evaluation to the next.
        run.logger.log("val", run.step, {"accuracy": accuracy, "std": accuracy_std, "auc": result.auc,
                                         "epoch": run.step / run.steps_per_epoch})  # fmt: skip
    # The others wait here for rank 0's result, so that all of them take part in the checkpoint.
    accuracy, accuracy_std = run.env.broadcast_floats([accuracy, accuracy_std], run.device)
    run.validation = {"accuracy": accuracy, "std": accuracy_std, "step": run.step}
    if accuracy > run.best_val:
        run.best_val = accuracy
        if config.train.select == "best_val":
            save(run, run.run_dir / BEST)


def checkpoint_state(run: Run) -> dict[str, Any] | None:
    """The checkpoint, whole (collective with several processes; None on ranks other than 0)."""
    gathered = gather_training_state(run.method, run.optimizer, run.env)
    if gathered is None:
        return None
    method_state, optimizer_state = gathered
    head = getattr(run.method, "head", None)
    # The whole head for a teacher-style "head" entry: the gathered one when it is sharded.
    sharded = "head" in sharded_heads(run.method)
    head_weight = method_state["head.weight"] if sharded else head.weight if head is not None else None
    return {
        "model": run.model.state_dict(),
        "method": method_state,
        "head": {"weight": head_weight.detach().cpu()} if head_weight is not None else {},
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "best_val": run.best_val,
        "skipped": run.skipped,
        "train_seconds": run.train_seconds,
        "trained_images": run.trained_images,
        "rng": torch.get_rng_state(),
        "config": run.config.to_dict(),
    }


def save(run: Run, path: Path) -> None:
    state = checkpoint_state(run)
    if state is not None:
        save_checkpoint(state, path)


def finish(run: Run, progress: bool) -> RunSummary:
    """Close the log, then on rank 0 evaluate the reported model on the test sets, export it and write the
    results and the run report."""
    config, env = run.config, run.env
    assert run.bar is not None and run.logger is not None
    run.bar.close()
    run.logger.close()
    # When any rank's train() returns, last.pt is complete; rank 0's evaluation below needs no other rank.
    env.barrier()
    if run.skipped and env.is_main:
        print(f"warning: {run.skipped} unreadable training images were skipped (data.skip_bad_images=true)")
    # validate_config made sure that best_val comes with data.val_pairs.
    selected = BEST if config.train.select == "best_val" else LAST
    summary = RunSummary(
        run_dir=run.run_dir,
        steps=run.step,
        epochs=run.step / run.steps_per_epoch,
        wall_seconds=time.perf_counter() - run.started,
        train_seconds=run.train_seconds,
        images_per_second=run.trained_images / max(run.train_seconds, 1e-9),
        selected=selected,
        validation=run.validation,
        skipped_images=run.skipped,
    )
    if not env.is_main:
        return summary
    model = reported_model(run, selected)
    summary.tests = evaluate_tests(config, model, run.device, run.run_dir, progress)
    if config.train.export_onnx:
        from facedistill.export.onnx import export_onnx

        export_onnx(
            model,
            run.run_dir / "model.onnx",
            metadata={"facedistill.model": config.model.name, "facedistill.method": config.method["name"]},
        )
    summary.wall_seconds = time.perf_counter() - run.started
    payload = {**summary.to_dict(), **run.teacher_info, "model": model_profile(config)}
    (run.run_dir / "results.json").write_text(json.dumps(payload, indent=2))
    from facedistill.eval.report import write_run_report

    try:
        write_run_report(run.run_dir)
    except Exception as error:  # a finished run must not fail because its report could not be drawn
        print(f"warning: run report not written: {error}")
    return summary


def reported_model(run: Run, selected: str) -> torch.nn.Module:
    """The model the run reports, in eval mode: the last or the best checkpoint's, as a plain backbone."""
    config, model = run.config, run.model
    if run.synced_batchnorm:
        # Evaluate and export the plain backbone: SyncBatchNorm is a training-time wrapper of the same weights.
        plain = create_model(config.model.name, embedding_size=config.model.embedding_size)
        plain.load_state_dict(model.state_dict())
        model = plain.to(run.device)
    if selected == BEST:
        model.load_state_dict(load_checkpoint(run.run_dir / BEST, run.device)["model"])
    return model.eval()


def model_profile(config: Config) -> dict[str, Any]:
    from facedistill.models.complexity import count_macs, count_parameters

    model = create_model(config.model.name, embedding_size=config.model.embedding_size)
    return {
        "name": config.model.name,
        "embedding_size": config.model.embedding_size,
        "params": count_parameters(model),
        "macs": count_macs(model),
    }


def evaluate_tests(
    config: Config, model: torch.nn.Module, device: torch.device, run_dir: Path, progress: bool
) -> dict[str, Any]:
    """Evaluate the reported model once on each declared test set; ROC curves go to ``roc_<name>.png``."""
    from facedistill.eval.metrics import plot_roc
    from facedistill.eval.verify import evaluate_pairs, load_pairs_set, student_embedder

    results: dict[str, Any] = {}
    embedder = student_embedder(model, device, config.train.amp)
    for test in config.eval.tests:
        pairs_set = load_pairs_set(test["pairs"], test.get("images"), test.get("name"))
        result, scores = evaluate_pairs(
            embedder, pairs_set, config.eval.flip, config.eval.batch_size, config.data.num_workers, progress
        )
        results[pairs_set.name] = result.to_dict()
        np.save(run_dir / f"scores_{pairs_set.name}.npy", scores)
        plot_roc(
            {config.method["name"]: result},
            run_dir / f"roc_{pairs_set.name}.png",
            f"{pairs_set.name}: {config.model.name} ({config.method['name']})",
        )
        print(f"{pairs_set.name}: {result.summary()}")
    return results
