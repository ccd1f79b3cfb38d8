"""Does the data loader outrun training? Images/s of the training DataLoader, from JPEGs and from the decoded cache,
against the training step of MobileFaceNet, measured in one run.

    python benchmarks/loader_speed.py                                  # ../shared/data/celeba299, CPU
    python benchmarks/loader_speed.py --data DIR --cache /nvme/decoded --device cuda

(a) the DataLoader exactly as ``train.loop`` builds it (shuffled index list, ``collate_faces``, batch 128,
``prefetch_factor`` 4, pinned memory on a GPU) over the image folders (or RecordIO), for 0, 1 and 2 workers;
(b) the same over the decoded uint8 cache of the same dataset (built first into --cache, or a temporary directory,
and the build timed); (c) the ArcFace training step of MobileFaceNet-128 (``gpu_train_speed.step_speed``: the loop's
step without its loader; fp32 channels_last on CPUs without native bf16, bf16 autocast on GPUs), batch 128.
Loader figures are steady state: the first batch, which also pays for starting the workers, is not timed. Each
loader row prints its ratio to (c); the target is >= 5x, so that loading never stalls training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train_speed import device_name, step_speed  # noqa: E402

from facedistill.data.datasets import FaceDataset, collate_faces, open_training_set  # noqa: E402
from facedistill.data.decoded_cache import build_decoded_cache  # noqa: E402
from facedistill.train.loop import resolve_amp  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba299"
TARGET = 5.0


def loader_speed(
    dataset: FaceDataset, batch_size: int, num_workers: int, batches: int, device: torch.device, seed: int = 0
) -> float:
    """Steady-state images/s of the training loop's DataLoader over ``batches`` batches (the first one untimed)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    indices = order[: (batches + 1) * batch_size].tolist()
    # The arguments of train.loop's DataLoader.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,
        drop_last=True,
        collate_fn=collate_faces,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    images, started = 0, time.perf_counter()
    for number, batch in enumerate(loader):
        if number == 0:
            started = time.perf_counter()
            continue
        images += len(batch.labels)
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="identity folders or RecordIO")
    parser.add_argument("--cache", type=Path, default=None, help="decoded cache directory (default: temporary)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: pinned memory and the training step's device")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not args.data.exists():
        parser.error(f"{args.data} does not exist; pass --data (identity folders or RecordIO)")
    source = open_training_set(args.data)
    batches = min(args.batches, len(source) // args.batch_size - 1)
    if batches < 1:
        parser.error(f"{args.data} holds {len(source)} images: too few for two batches of {args.batch_size}")
    print(f"{args.data}: {len(source)} images; device {device_name(device)}; batch {args.batch_size}", flush=True)

    with tempfile.TemporaryDirectory(prefix="decoded-") as scratch:
        directory = args.cache or Path(scratch)
        tick = time.perf_counter()
        cached = build_decoded_cache(source, directory, num_workers=max(args.workers), progress=False)
        build_seconds = time.perf_counter() - tick
        print(f"decoded cache {directory}: {len(cached)} images ready in {build_seconds:.1f} s", flush=True)

        rows: list[tuple[str, int, float]] = []
        for label, dataset in (("JPEG", source), ("decoded cache", cached)):
            for workers in args.workers:
                speed = loader_speed(dataset, args.batch_size, workers, batches, device)
                rows.append((label, workers, speed))
                print(f"  loader {label:13s} workers={workers}: {speed:9.1f} img/s", flush=True)

    amp_dtype = resolve_amp("auto", device)
    training = step_speed(
        "arcface",
        device,
        batch_size=args.batch_size,
        steps=args.train_steps,
        warmup=1,
        amp_dtype=amp_dtype,
        num_classes=source.num_classes,
    )
    amp_name = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    print(f"training step (ArcFace, MobileFaceNet-128, {amp_name}, channels_last): {training:9.1f} img/s")
    print(f"\n{'loader':14s} {'workers':>7s} {'img/s':>10s} {'x training':>11s}")
    for label, workers, speed in rows:
        print(f"{label:14s} {workers:7d} {speed:10.1f} {speed / training:10.1f}x")
    for label in ("JPEG", "decoded cache"):
        best = max((speed, workers) for name, workers, speed in rows if name == label)
        verdict = "meets" if best[0] / training >= TARGET else "misses"
        print(
            f"best {label}: {best[0]:.1f} img/s with {best[1]} workers = {best[0] / training:.1f}x training "
            f"({verdict} the {TARGET:.0f}x target)"
        )


if __name__ == "__main__":
    main()
