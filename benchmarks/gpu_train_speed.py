"""Training throughput of MobileFaceNet-128 (112x112) on one GPU: ArcFace vs cached-teacher MarginDistillation.

    python benchmarks/gpu_train_speed.py                        # bf16 autocast, channels_last, batch 512
    python benchmarks/gpu_train_speed.py --amp fp16 --compile   # fp16 with GradScaler, torch.compile
    python benchmarks/gpu_train_speed.py --device cpu --batch-size 8 --steps 2 --warmup 1   # CI smoke run
    # the distillation zoo's rows (benchmarks/validation_study.py) on this CPU, fp32, 3 interleaved rounds
    python benchmarks/gpu_train_speed.py --device cpu --amp none --batch-size 128 --steps 8 --warmup 2 \
        --num-classes 269 --rounds 3 --rows arcface_shift4 md_centred_kd_shift4 zoo_kd zoo_gkd

Target: >= 8,000 img/s on one H100 for either method (default settings; the whole run takes well under 5 minutes,
about a minute more per method with --compile).

Self-contained: batches of random uint8 faces are generated in pinned host memory, and the teacher cache is an
in-memory ``TeacherCache`` of random unit float16 embeddings (image and mirror rows) with frozen random class
centres, so no dataset or teacher is needed. The student, method, optimiser and schedule are built with the
default recipe from the same registries as a run, and every step is the training loop's own ``TrainStep`` (flip,
cached teacher rows, copies, autocast forward, loss, finite check, backward, clipping, optimiser and schedule);
only the DataLoader is left out (``loader_speed.py`` measures it). Warm-up steps are excluded; the timed steps
are bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facedistill.config import Config
from facedistill.data.datasets import Batch
from facedistill.distill import METHODS, MethodContext, create_method
from facedistill.models import create_model
from facedistill.teachers.cache import TeacherCache
from facedistill.train.loop import resolve_amp
from facedistill.train.optim import build_optimizer, build_scheduler
from facedistill.train.step import TrainStep

METHOD_NAMES = ("arcface", "margin_distillation")


def in_memory_teacher_cache(num_images: int, embedding_size: int, generator: torch.Generator) -> TeacherCache:
    """A ``TeacherCache`` whose float16 [N, 2, d] rows live in memory: random unit embeddings of images and
    mirrors, read by the cache's own ``rows`` and ``typicality``."""
    rows = F.normalize(torch.randn(num_images, 2, embedding_size, generator=generator), dim=2)
    cache = TeacherCache.__new__(TeacherCache)
    cache.directory = Path("<in-memory random teacher>")
    cache.manifest = {
        "num_images": num_images,
        "embedding_size": embedding_size,
        "teacher_id": "random",
    }
    cache.embeddings = rows.numpy().astype(np.float16)
    return cache


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_speed(
    method_config: dict[str, object] | str,
    device: torch.device,
    batch_size: int = 512,
    steps: int = 30,
    warmup: int = 10,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    channels_last: bool = True,
    compile_model: bool = False,
    num_classes: int = 10_572,
    embedding_size: int = 128,
    pool_batches: int = 4,
    seed: int = 0,
) -> float:
    """Images/s of ``steps`` training steps of a method (a name, or a ``method`` section) after ``warmup`` untimed
    ones."""
    config = Config()
    config.method = dict(method_config) if isinstance(method_config, dict) else {"name": method_config}
    method_name = str(config.method["name"])
    config.model.embedding_size = embedding_size
    config.data.batch_size = batch_size
    config.train.channels_last = channels_last
    config.run.seed = seed
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pin = device.type == "cuda"
    num_images = pool_batches * batch_size
    # Batches as the DataLoader hands them over: uint8 [B, 3, 112, 112], pinned when the GPU reads them.
    pool = []
    for start in range(0, num_images, batch_size):
        images = torch.randint(0, 256, (batch_size, 3, 112, 112), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        batch = Batch(images, labels, torch.arange(start, start + batch_size), skipped=0)
        pool.append(batch.pin_memory() if pin else batch)

    total_steps = warmup + steps
    context = MethodContext(num_classes, embedding_size, steps_per_epoch=total_steps)
    cache = None
    if METHODS.get(method_name).needs_teacher:
        cache = in_memory_teacher_cache(num_images, embedding_size, generator)
        context.centres = F.normalize(torch.randn(num_classes, embedding_size, generator=generator), dim=1)
        all_labels = torch.cat([batch.labels for batch in pool]).numpy()
        context.typicality = cache.typicality(context.centres, all_labels)

    model = create_model(config.model.name, embedding_size=embedding_size).to(device)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    method = create_method(config.method, context).to(device)
    optimizer = build_optimizer([model, method], config.optim)
    scheduler = build_scheduler(optimizer, total_steps, total_steps, config.schedule)
    train_step = TrainStep.from_config(
        config,
        forward=torch.compile(model) if compile_model else model,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        device=device,
        steps_per_epoch=total_steps,
        amp_dtype=amp_dtype,
        cache=cache,
    )
    model.train()
    method.train()

    started = time.perf_counter()
    for step in range(total_steps):
        if step == warmup:
            _synchronize(device)
            started = time.perf_counter()
        train_step(pool[step % len(pool)], step)
    _synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (they include compilation)")
    parser.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "none"],
        default="auto",
        help="autocast dtype; auto: bf16 on GPUs that have it (H100), fp16 on older ones, fp32 on most CPUs",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the student, as train.compile")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--num-classes", type=int, default=10_572, help="identities (CASIA-WebFace: 10,572)")
    parser.add_argument("--methods", nargs="+", choices=METHODS.names(), default=list(METHOD_NAMES))
    parser.add_argument(
        "--rows", nargs="+", metavar="ROW", help="rows of benchmarks/validation_study.py instead of --methods: each "
        "row's method section, as the study trains it",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median of each is printed")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step allocates, tunes and compiles)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; pass --device cpu for a (slow) smoke run")
    amp_dtype = resolve_amp(args.amp, device)
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; MobileFaceNet-128 112x112, batch "
        f"{args.batch_size}, amp {amp_name}, {'contiguous' if args.contiguous else 'channels_last'}, compile "
        f"{'on' if args.compile else 'off'}, {args.num_classes} classes, "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )
    if args.rows:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import validation_study as study

        unknown = [row for row in args.rows if row not in study.ROWS]
        if unknown:
            parser.error(f"--rows: {unknown} are not rows of benchmarks/validation_study.py")
        sections = {row: study.ROWS[row]["method"] for row in args.rows}
    else:
        sections = {name: {"name": name} for name in args.methods}
    speeds: dict[str, list[float]] = {name: [] for name in sections}
    for round_index in range(args.rounds):
        for name, section in sections.items():
            speeds[name].append(
                step_speed(
                    section,
                    device,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    warmup=args.warmup,
                    amp_dtype=amp_dtype,
                    channels_last=not args.contiguous,
                    compile_model=args.compile,
                    num_classes=args.num_classes,
                )
            )
            rounds = f" (round {round_index + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"{name:22s} {speeds[name][-1]:9.1f} img/s{rounds}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = {name: float(np.median(values)) for name, values in speeds.items()}
    if args.rounds > 1:
        for name, value in results.items():
            print(f"{name:22s} {value:9.1f} img/s (median of {args.rounds})")
    baseline = next((name for name in results if sections[name]["name"] == "arcface"), None)
    for name, value in results.items():
        if baseline is not None and name != baseline:
            print(f"ratio {name} / {baseline}: {value / results[baseline]:.3f}")
    return results


if __name__ == "__main__":
    main()
